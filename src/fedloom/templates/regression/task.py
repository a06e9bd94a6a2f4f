"""The regression task: a 10-32-1 MLP predicting diabetes progression, mean squared
error loss, R² (primary) and mean absolute error reported. fedloom runs the loop."""

from torch import nn

from fedloom.tasks import TorchTask
from fedloom.tasks.metrics import mae, r2


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))


task = TorchTask(build_model, loss=nn.functional.mse_loss, metrics={"r2": r2, "mae": mae})
