"""The task interface: the user's code that builds the model, trains and evaluates.

A workspace's task module defines one object named ``task`` that satisfies
:class:`Task`. Most users never implement it by hand: :class:`~fedloom.tasks.TorchTask`
takes a model and a loss and runs fedloom's loop, :class:`~fedloom.tasks.TorchLoop`
takes the user's own loop (model, data, train and evaluate functions), and
:class:`~fedloom.tasks.NumpyTask` takes three plain functions.

What a task may do beyond the three methods it must have is declared by small
protocols (:class:`LoadsData`, :class:`LoadsTestData`, :class:`Classifier`,
:class:`DeclaresMetrics`, :class:`ChecksData`), checked with ``isinstance``; the
framework never guesses from attribute names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from fedloom.core.records import DPSGDSettings, EvalOutput, LoopSettings, TrainOutput, TrainSettings
from fedloom.core.weights import Weights

if TYPE_CHECKING:
    import torch


class Split(NamedTuple):
    """One split of a site's data held as arrays: features ``x`` and targets ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:  # the number of samples, as for any dataset
        return len(self.y)


@dataclass(frozen=True)
class SiteData:
    """One site's local data as arrays: a training split and a validation split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_val(self) -> int:
        return len(self.y_val)

    @property
    def train(self) -> Split:
        return Split(self.x_train, self.y_train)

    @property
    def val(self) -> Split:
        return Split(self.x_val, self.y_val)


@dataclass(frozen=True)
class SiteDatasets:
    """One site's data as datasets of the task's own choosing: a torch ``Dataset``, a
    list of file paths, anything with a length. fedloom never looks inside them; it
    hands ``train`` to the task's training and ``val`` to its evaluation."""

    train: Any
    val: Any = ()

    @property
    def num_train(self) -> int:
        return _length(self.train)

    @property
    def num_val(self) -> int:
        return _length(self.val)


AnySiteData = SiteData | SiteDatasets


def _length(data: Any) -> int:
    return len(data) if isinstance(data, Sized) else 0


def as_site_data(value: object, where: str) -> AnySiteData:
    """What a task's data function returned, as site data: a :class:`SiteData`, a
    :class:`SiteDatasets`, or a ``(train, val)`` pair of datasets."""
    from fedloom.core.errors import TaskError

    if isinstance(value, SiteData | SiteDatasets):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return SiteDatasets(value[0], value[1])
    raise TaskError(
        f"{where} returned {type(value).__name__}; expected (train, val) datasets, "
        "SiteDatasets(train, val) or SiteData(x_train, y_train, x_val, y_val)"
    )


@dataclass(frozen=True)
class SiteContext:
    """Everything a site's code needs for one call, in one object.

    ``seed`` is already keyed by (plan seed, round, site, "train"); take every random
    choice from it (:attr:`rng`, :meth:`torch_generator`) and a run stays reproducible.
    """

    site: str
    index: int  # the site's position in the sorted roster (-1: not a plan site)
    round: int  # 0 outside the rounds (loading data, the final test)
    seed: int
    data_path: Path | None = None  # the site's data: --data, or data.path/<site>
    options: Mapping[str, object] = field(default_factory=dict)
    # sample-level DP-SGD asked by the plan (privacy.dp_sgd); None: plain training
    dp_sgd: DPSGDSettings | None = None
    # training rounds this site has been selected for so far, this one included (an upper
    # bound on the rounds it trained: what DP-SGD's accountant composes)
    rounds_selected: int = 1
    total_rounds: int = 0  # the plan's rounds (0: not known, as in the baseline)
    device: str = "cpu"  # a torch device name, already resolved from the plan's `auto`
    state_dir: Path | None = None  # the site's own folder, kept across rounds and restarts
    loop: LoopSettings = LoopSettings()
    # the round's training settings (the plan's, as the strategy set them: FedProx's
    # proximal_mu): what TorchLoop hands a user's own train function
    settings: TrainSettings = TrainSettings()
    # SCAFFOLD's correction c - c_i by tensor name (empty: none): a task that declares
    # supports_scaffold adds it to the gradient of each of its local steps
    correction: Mapping[str, np.ndarray] = field(default_factory=dict)
    # where FedProx's term pulls (None: the weights training starts from); Ditto trains a
    # site's personal model towards the global model with it
    anchor: Mapping[str, np.ndarray] | None = None
    # metrics the task logged with log_metric(), sent with its answer
    logged: dict[str, float] = field(default_factory=dict)
    # objects whose state the site keeps between rounds (keep()), saved after training
    kept: dict[str, Any] = field(default_factory=dict)

    @property
    def rng(self) -> np.random.Generator:
        """A NumPy generator seeded from :attr:`seed` (a fresh one at each access)."""
        return np.random.default_rng(self.seed)

    def torch_generator(self) -> torch.Generator:
        """A CPU torch generator seeded from :attr:`seed`: give it to your
        ``DataLoader(..., generator=ctx.torch_generator())``."""
        import torch

        return torch.Generator().manual_seed(self.seed % 2**63)

    def log_metric(self, name: str, value: float) -> None:
        """Report a number for this round (a training loss, a learning rate): it is
        sent with the site's answer, subject to the site policy's metric rules."""
        self.logged[str(name)] = float(value)

    def keep(self, **objects: Any) -> bool:
        """Keep these objects' state at the site from one round to the next.

        Give it the torch objects of your own loop that carry state across rounds,
        once they are built: ``ctx.keep(optimizer=opt, scheduler=sched)``. Each must
        have ``state_dict()``/``load_state_dict()`` (an optimiser, a learning-rate
        scheduler, a ``GradScaler``). Their state from the site's last training round,
        if there was one, is loaded into them now; when your train function returns,
        :class:`~fedloom.tasks.TorchLoop` saves their state again. The names are the
        keys: keep the same object under the same name every round.

        The state lives in the site's state folder (:attr:`state_dir`, file
        ``kept.safetensors``: tensors as safetensors, the rest as JSON, no pickle); it
        never leaves the site and survives restarts. Where there is no state folder
        (the centralised baseline, the test set) this does nothing and returns False.

        Returns True when some state was restored (not the site's first round).
        """
        if self.state_dir is None:
            return False
        from fedloom.tasks.kept_state import KEPT_FILE, restore

        restored = restore(self.state_dir / KEPT_FILE, objects)
        self.kept.update(objects)
        return bool(restored)

    @property
    def progress(self) -> float:
        """How far the federation is, in (0, 1]: this round over the plan's rounds."""
        return min(1.0, self.round / self.total_rounds) if self.total_rounds else 1.0


@runtime_checkable
class Task(Protocol):
    """What every task has: an initial model, a training step, an evaluation."""

    def init_weights(self, seed: int) -> Weights:
        """The initial global model (called once, at the aggregator)."""
        ...

    def train(
        self, weights: Weights, data: Any, settings: TrainSettings, context: SiteContext
    ) -> TrainOutput:
        """Train from ``weights`` on the site's data (a :class:`SiteData`, or the
        :class:`SiteDatasets` the task's data function returned); return the locally
        trained weights (not a delta)."""
        ...

    def evaluate(self, weights: Weights, data: Any, context: SiteContext) -> EvalOutput:
        """Metrics of ``weights`` on one split: a :class:`Split` ``(x, y)`` of arrays,
        or a dataset the task's data function returned."""
        ...


@runtime_checkable
class LoadsData(Protocol):
    """A task that builds a site's data itself (from ``context.data_path``: a file or a
    folder of the site's own), instead of taking a built-in dataset's share."""

    def load_data(self, context: SiteContext) -> AnySiteData | tuple[Any, Any]: ...


class DataFunctions:
    """A task's data given as two functions of the context, as :class:`TorchLoop` and
    :class:`~fedloom.tasks.hf_task.HFTask` take them: ``data(ctx)`` returns the site's
    ``(train, val)``, ``test_data(ctx)`` the test set; either may be None."""

    data_fn: Callable[[SiteContext], Any] | None = None
    test_data_fn: Callable[[SiteContext], Any] | None = None

    def load_data(self, context: SiteContext) -> AnySiteData | None:
        if self.data_fn is None:
            return None
        return as_site_data(self.data_fn(context), "the task's data function")

    def load_test_data(self, context: SiteContext) -> Any:
        return None if self.test_data_fn is None else self.test_data_fn(context)


@runtime_checkable
class LoadsTestData(Protocol):
    """A task that builds the held-out test set (simulation, ``--baseline``):
    ``context.data_path`` is ``data.path/test`` when the plan names a data folder."""

    def load_test_data(self, context: SiteContext) -> Any: ...


@runtime_checkable
class Classifier(Protocol):
    """A task whose targets are class indices ``0..num_classes-1``."""

    num_classes: int


@dataclass(frozen=True)
class Metrics:
    """The metrics a task reports and which one judges a model: ``primary`` leads the
    progress line, the tables, the plots and ``--baseline``; metrics named in
    ``lower_is_better`` improve downwards (a loss, an error), the others upwards."""

    primary: str = "accuracy"
    lower_is_better: tuple[str, ...] = ("loss",)

    def better(self, name: str) -> str:
        """``"lower"`` or ``"higher"``: which way ``name`` improves."""
        lowers = self.lower_is_better
        return "lower" if any(fnmatch.fnmatchcase(name, p) for p in lowers) else "higher"


CLASSIFICATION = Metrics()


@runtime_checkable
class DeclaresMetrics(Protocol):
    """A task that says which of its metrics is primary."""

    metrics: Metrics


def metrics_of(task: object) -> Metrics:
    """The task's declared metrics; a task that declares none is a classifier's
    (``accuracy`` primary, ``loss`` lower is better)."""
    declared = task.metrics if isinstance(task, DeclaresMetrics) else None
    return declared if isinstance(declared, Metrics) else CLASSIFICATION


@runtime_checkable
class ChecksData(Protocol):
    """A task that can tell, before any round, whether a site's data fits it (the
    targets its loss needs, the shape its model takes). ``check_data`` raises
    :class:`~fedloom.core.errors.TaskError` naming the mismatch and the fix."""

    def check_data(self, weights: Weights, data: Any, context: SiteContext) -> None: ...


@runtime_checkable
class DescribesModel(Protocol):
    """A task that knows its whole model's size, base included, when only some of its
    tensors travel (a LoRA adapter on a pretrained base): the run's summary shows the
    bytes that travel against it."""

    def model_bytes(self) -> int: ...


@dataclass(frozen=True)
class ModelSource:
    """The plan's ``model`` section as a task uses it: the base model's folder (None
    when the plan names none) and which tensors are federated: ``"all"``,
    ``"trainable"`` or fnmatch patterns of tensor names."""

    base: Path | None = None
    federated: str | tuple[str, ...] = "all"


@runtime_checkable
class LoadsModel(Protocol):
    """A task that loads its model from a folder on disk (a pretrained base, as
    :class:`~fedloom.tasks.hf_task.HFTask` does) and federates only some of its
    tensors. The task loader hands it the plan's ``model`` section before any call."""

    def use_model(self, source: ModelSource) -> None: ...
