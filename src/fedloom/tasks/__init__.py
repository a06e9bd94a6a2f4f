"""Task adapters. ``TorchTask``, ``TorchLoop`` and ``HFTask`` are loaded lazily so that fedloom
never needs torch unless a workspace uses it."""

from typing import Any

from fedloom.tasks.base import (
    ChecksData,
    Classifier,
    DeclaresMetrics,
    LoadsData,
    LoadsModel,
    LoadsTestData,
    Metrics,
    ModelSource,
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
    "HFTask",
    "LoadsData",
    "LoadsModel",
    "LoadsTestData",
    "Metrics",
    "ModelSource",
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
    if name == "HFTask":
        from fedloom.tasks.hf_task import HFTask

        return HFTask
    if name == "TorchTask":
        from fedloom.tasks.torch_task import TorchTask

        return TorchTask
    if name == "TorchLoop":
        from fedloom.tasks.torch_loop import TorchLoop

        return TorchLoop
    raise AttributeError(name)
