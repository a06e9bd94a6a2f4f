"""Task adapters. ``TorchTask`` and ``TorchLoop`` are loaded lazily so that fedloom
never needs torch unless a workspace uses it."""

from typing import Any

from fedloom.tasks.base import (
    ChecksData,
    Classifier,
    DeclaresMetrics,
    LoadsData,
    LoadsTestData,
    Metrics,
    SiteContext,
    SiteData,
    SiteDatasets,
    Split,
    Task,
)
from fedloom.tasks.numpy_task import NumpyTask, SoftmaxRegression

__all__ = [
    "ChecksData",
    "Classifier",
    "DeclaresMetrics",
    "LoadsData",
    "LoadsTestData",
    "Metrics",
    "NumpyTask",
    "SiteContext",
    "SiteData",
    "SiteDatasets",
    "SoftmaxRegression",
    "Split",
    "Task",
    "TorchLoop",
    "TorchTask",
]


def __getattr__(name: str) -> Any:
    if name == "TorchTask":
        from fedloom.tasks.torch_task import TorchTask

        return TorchTask
    if name == "TorchLoop":
        from fedloom.tasks.torch_loop import TorchLoop

        return TorchLoop
    raise AttributeError(name)
