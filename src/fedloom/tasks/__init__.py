"""Task adapters. ``TorchTask`` is loaded lazily so that fedloom never needs torch
unless a workspace uses it."""

from typing import Any

from fedloom.tasks.base import SiteContext, SiteData, Task
from fedloom.tasks.numpy_task import NumpyTask, SoftmaxRegression

__all__ = ["NumpyTask", "SiteContext", "SiteData", "SoftmaxRegression", "Task", "TorchTask"]


def __getattr__(name: str) -> Any:
    if name == "TorchTask":
        from fedloom.tasks.torch_task import TorchTask

        return TorchTask
    raise AttributeError(name)
