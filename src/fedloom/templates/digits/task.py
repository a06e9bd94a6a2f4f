"""The digits task: a 64-128-10 MLP (9.6k parameters). fedloom runs the training loop."""

from torch import nn

from fedloom.tasks import TorchTask


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


task = TorchTask(build_model)
