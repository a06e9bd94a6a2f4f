"""The plan's schema: every section of ``federation.yaml`` as a frozen pydantic model, with
the limits that keep a hostile or mistyped plan from costing memory or time."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedloom.analysis.query import AnalysisPlan
from fedloom.compression.settings import CompressionPlan
from fedloom.core.frozen import Frozen
from fedloom.core.records import Accountant, TrainSettings
from fedloom.core.site_name import roster_of, site_name_problem
from fedloom.core.validation import shown
from fedloom.data.datasets import REGRESSION_DATASETS
from fedloom.data.partition import parse_partition
from fedloom.privacy.settings import PrivacyPlan
from fedloom.tasks.base import ModelSource

if TYPE_CHECKING:
    pass


PLAN_FILE = "federation.yaml"
PLAN_VERSION = 1

# The caps of the numeric settings (docs/plan.md#limits): far beyond any sensible
# plan, so that a typo or a hostile plan fails here, in a line, instead of running for
# hours, exhausting memory or overflowing.
MAX_SITES = 10_000
MAX_ROUNDS = 100_000
MAX_EPOCHS = 1_000
MAX_BATCH_SIZE = 1_000_000
MAX_SAMPLES = 1_000_000_000
MAX_SEED = 2**63 - 1  # SQLite's largest integer
MAX_LR = 100.0
MAX_WEIGHT_DECAY = 10.0
MAX_SYNTHETIC = 100.0
MAX_ROUND_SECONDS = 604_800.0  # a week
MAX_RETRIES = 100
MAX_PLAN_BYTES = 1 << 20  # federation.yaml
MAX_GRAD_ACCUMULATION = 10_000
MAX_GRAD_CLIP = 1e6


def device_problem(value: str) -> str | None:
    """Why ``value`` is not a device fedloom knows (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``), or None."""
    if value in ("auto", "cpu", "cuda", "mps"):
        return None
    index = value.removeprefix("cuda:")
    if value.startswith("cuda:") and index.isdigit() and len(index) <= 3:
        return None
    return f"must be auto, cpu, cuda, cuda:N or mps (got {value!r})"


PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class SyntheticData(Frozen):
    alpha: Annotated[float, Field(ge=0, le=MAX_SYNTHETIC, allow_inf_nan=False)] = 0.5
    beta: Annotated[float, Field(ge=0, le=MAX_SYNTHETIC, allow_inf_nan=False)] = 0.5


class DataPlan(Frozen):
    dataset: Literal[
        "digits", "breast_cancer", "wine", "mnist", "diabetes", "synthetic", "custom"
    ] = "digits"
    partition: str = "iid"
    val_fraction: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.2
    test_fraction: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.2
    synthetic: SyntheticData = SyntheticData()
    # a folder of the workspace holding one entry per site, named after it (and `test`
    # for the test set): what each simulated site's data function receives as its path
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _inside_workspace(cls, value: str | None) -> str | None:
        if value is None:
            return None
        rel = PurePosixPath(value)
        if not value or rel.is_absolute() or ".." in rel.parts or "\\" in value:
            raise ValueError(f"must name a folder inside the workspace, like data (got {value!r})")
        return rel.as_posix()

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        parse_partition(value)  # raises ValueError listing the accepted forms
        return value


class StrategyPlan(BaseModel):
    """``name`` plus that strategy's parameters (validated against the strategy)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str = "fedavg"


class PersonalPlan(Frozen):
    """Ditto (Li et al., 2021): each site also trains a personal model of its own, kept
    in its state folder, pulled towards the global model by ``lam``."""

    # the weight of (lam / 2) * ||v - w_global||^2 in the personal model's loss
    lam: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 0.1
    # local epochs of the personal model in each round the site trains
    epochs: Annotated[int, Field(gt=0, le=MAX_EPOCHS, strict=True)] = 1


class TrainingPlan(Frozen):
    epochs: Annotated[int, Field(gt=0, le=MAX_EPOCHS, strict=True)] = 1
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE, strict=True)] = 32
    lr: Annotated[float, Field(gt=0, le=MAX_LR, allow_inf_nan=False)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=MAX_WEIGHT_DECAY, allow_inf_nan=False)] = 0.0
    # a site's claimed sample count is capped here
    max_samples: Annotated[int, Field(gt=0, le=MAX_SAMPLES, strict=True)] = 100_000
    # the built-in loop's (TorchTask's) optimiser, its learning rate across the rounds,
    # gradient accumulation and clipping (docs/tasks.md#the-built-in-loop)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_accumulation: Annotated[int, Field(gt=0, le=MAX_GRAD_ACCUMULATION, strict=True)] = 1
    grad_clip: Annotated[float, Field(ge=0, le=MAX_GRAD_CLIP, allow_inf_nan=False)] = 0.0
    # where a site's torch code runs; each site may choose its own (collaborator --device)
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for the forward pass
    deterministic: bool = False  # torch's deterministic algorithms (GPU: slower)
    # tensors (fnmatch patterns of their names) that never leave a site: kept in its state
    # folder, sent as zero updates (batch-norm statistics, as in FedBN: "*running_*")
    local: tuple[str, ...] = ()
    # Ditto's personal model at each site (None: none)
    personal: PersonalPlan | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        problem = device_problem(value)
        if problem:
            raise ValueError(problem)
        return value


FEDERATED_CHOICES = ("all", "trainable")


class ModelPlan(Frozen):
    """The model a task loads from disk rather than builds from code: a pretrained base
    (a folder ``save_pretrained`` wrote) and which of its tensors the federation trains
    together. The plan hash covers the base's configuration and a digest of its weights,
    so every site provably starts from the same base."""

    # the base model's folder: relative to the workspace, or absolute
    base: str | None = None
    # which tensors travel and are aggregated: all of them, the trainable ones (a LoRA
    # adapter's), or those whose names match fnmatch patterns; the rest stay at the site
    federated: str | tuple[str, ...] = "all"
    # a model file the federation starts from instead of the task's init_weights: a
    # safetensors file, a run folder or an aggregator checkpoint (relative to the
    # workspace, or absolute); the plan hash covers its bytes
    initial: str | None = None

    @field_validator("base", "initial")
    @classmethod
    def _base_is_a_folder_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\0" in value):
            raise ValueError(f"must name a file or folder (got {value!r})")
        return value

    @field_validator("federated")
    @classmethod
    def _federated_choice(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, str):
            if value not in FEDERATED_CHOICES:
                raise ValueError(
                    f"must be all, trainable or a list of tensor-name patterns (got {value!r})"
                )
            return value
        if not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise ValueError(
                f"a list of tensor-name patterns must name at least one, none empty "
                f"(got {list(value)!r})"
            )
        return value


class EvaluationPlan(Frozen):
    final: bool = True  # evaluate the final global model at every site
    # the aggregator's per-round contribution proxy: each update's cosine with the last
    # step (aggregator/probe.py); impossible under secure aggregation or DP
    contributions: bool = False
    # in each training round, evaluate the received global model and the locally trained
    # one on the site's validation split (false: train only; benchmarks, large runs)
    each_round: bool = True


class DeadlinePlan(Frozen):
    round_seconds: Annotated[float, Field(gt=0, le=MAX_ROUND_SECONDS, allow_inf_nan=False)] = 600.0
    min_fraction: Fraction = 1.0
    retries: Annotated[int, Field(ge=0, le=MAX_RETRIES)] = 2


class Plan(Frozen):
    version: Literal[1] = 1
    name: str = "federation"
    task: str = "task.py"
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    rounds: Annotated[int, Field(gt=0, le=MAX_ROUNDS, strict=True)] = 10
    sites: PositiveInt | list[str] = 4
    sites_per_round: Annotated[int, Field(gt=0, le=MAX_SITES, strict=True)] | None = None
    data: DataPlan = DataPlan()
    strategy: StrategyPlan = StrategyPlan()
    training: TrainingPlan = TrainingPlan()
    evaluation: EvaluationPlan = EvaluationPlan()
    deadline: DeadlinePlan = DeadlinePlan()
    privacy: PrivacyPlan = PrivacyPlan()
    compression: CompressionPlan = CompressionPlan()
    model: ModelPlan = ModelPlan()
    analysis: AnalysisPlan | None = None  # a federated analysis instead of training

    @model_validator(mode="before")
    @classmethod
    def _analysis_defaults(cls, raw: Any) -> Any:
        """An analysis is one round with no evaluation, each site of weight 1."""
        if not isinstance(raw, dict) or not isinstance(raw.get("analysis"), dict):
            return raw
        training = raw.get("training")
        return {
            "rounds": 1,
            "evaluation": {"final": False, "each_round": False},
            **raw,
            "training": {"max_samples": 1, **(training if isinstance(training, dict) else {})},
        }

    @model_validator(mode="after")
    def _proxy_sees_each_update(self) -> Plan:
        if self.evaluation.contributions and (self.privacy.dp or self.privacy.secure_aggregation):
            raise ValueError(
                "evaluation.contributions: the contribution proxy compares each site's own "
                "update with the federation's step, which secure aggregation hides from the "
                "aggregator and DP forbids releasing; turn one of them off"
            )
        return self

    @model_validator(mode="after")
    def _analysis_is_one_plain_round(self) -> Plan:
        if self.analysis is None:
            return self
        problems = [
            "rounds: 1" if self.rounds != 1 else "",
            "strategy: fedavg" if self.strategy.name != "fedavg" else "",
            "no privacy.dp (analysis.dp noises the statistics)" if self.privacy.dp else "",
            "no privacy.dp_sgd" if self.privacy.dp_sgd else "",
        ]
        sa = self.privacy.secure_aggregation
        if sa is not None and sa.clip_range is None:
            problems.append(
                "privacy.secure_aggregation.clip_range above any count or sum a site can "
                "hold (at most 1e6, with bits: 64)"
            )
        wanted = [p for p in problems if p]
        if wanted:
            raise ValueError(f"analysis: an analysis needs {'; '.join(wanted)}")
        return self

    @field_validator("task")
    @classmethod
    def _task_inside_workspace(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or path.suffix != ".py" or "\\" in value:
            raise ValueError(
                f"must name a .py file inside the workspace, like task.py (got {value!r}): "
                "the plan hash covers only the workspace's own code"
            )
        return value

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_shape(cls, value: Any) -> Any:
        names = isinstance(value, list) and all(isinstance(s, str) for s in value)
        if isinstance(value, bool) or not (isinstance(value, int) or names):
            raise ValueError(
                f"must be a number of sites (e.g. 8) or a list of site names (got {value!r})"
            )
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        size = value if isinstance(value, int) else len(value)
        if size > MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites (got {shown(size)})")
        return value

    @field_validator("sites")
    @classmethod
    def _distinct_names(cls, value: int | list[str]) -> int | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one site")
            bad = [p for p in map(site_name_problem, value) if p is not None]
            if bad:
                more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
                raise ValueError("; ".join(bad[:3]) + more)
            dupes = sorted(s for s, n in Counter(value).items() if n > 1)
            if dupes:
                raise ValueError(f"site names must be distinct; repeated: {dupes}")
            folded = Counter(s.lower() for s in value)
            alike = sorted(s for s in value if folded[s.lower()] > 1)
            if alike:
                raise ValueError(
                    f"site names must differ in more than case (they name folders, and some "
                    f"file systems ignore case): {alike}"
                )
        return value

    @model_validator(mode="after")
    def _synthetic_has_no_partition(self) -> Plan:
        if self.data.dataset == "synthetic" and self.data.partition != "iid":
            raise ValueError(
                "data.partition: the synthetic dataset makes each site's own data, so it "
                f"takes no partition (got {self.data.partition!r}); remove it"
            )
        return self

    @model_validator(mode="after")
    def _regression_takes_no_label_partition(self) -> Plan:
        if self.data.dataset in REGRESSION_DATASETS:
            kind = parse_partition(self.data.partition).kind.value
            if kind in ("dirichlet", "shards"):
                raise ValueError(
                    f"data.partition: {self.data.partition} deals samples out by class label, "
                    f"but {self.data.dataset} is a regression dataset (its targets are "
                    "numbers, not labels); use iid or quantity:<alpha>"
                )
        return self

    @model_validator(mode="after")
    def _data_path_is_custom_data(self) -> Plan:
        if self.data.path is not None and self.data.dataset != "custom":
            raise ValueError(
                f"data.path: a folder of the sites' own data is read by the task's data "
                f"function, with dataset: custom only (got dataset: {self.data.dataset}); "
                "set data.dataset: custom, or remove data.path"
            )
        return self

    @model_validator(mode="after")
    def _per_round_fits(self) -> Plan:
        if self.sites_per_round is not None and self.sites_per_round > len(self.roster):
            raise ValueError(
                f"sites_per_round: must be at most the number of sites, {len(self.roster)} "
                f"(got {self.sites_per_round})"
            )
        return self

    @property
    def roster(self) -> tuple[str, ...]:
        """Site names, sorted. A count ``n`` names them ``site-01`` … ``site-n``."""
        return roster_of(self.sites)

    @property
    def per_round(self) -> int:
        """How many sites take part in a round: ``sites_per_round``, else every site."""
        return self.sites_per_round or len(self.roster)

    def initial_model_path(self, root: Path) -> Path | None:
        """The plan's ``model.initial`` resolved against the workspace ``root``."""
        if self.model.initial is None:
            return None
        path = Path(self.model.initial).expanduser()
        return path if path.is_absolute() else root / path

    def model_source(self, root: Path) -> ModelSource:
        """The plan's model section as the task loader hands it to a task, the base
        model's folder resolved against the workspace ``root``."""
        from fedloom.workspace import base_model_folder

        base = self.model.base
        folder = base_model_folder(root, base) if base is not None else None
        return ModelSource(folder, self.model.federated)

    def train_settings(self) -> TrainSettings:
        """The plan's local training settings, as sites receive them."""
        return TrainSettings(
            **self.training.model_dump(include=set(TRAIN_SETTINGS_ON_THE_WIRE)),
            evaluate=self.evaluation.each_round,
        )

    @property
    def strategy_params(self) -> dict[str, Any]:
        return dict(self.strategy.model_extra or {})

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        # options added after plans were approved count only when set away from their
        # default, so that such a plan keeps its hash (and its sites' approval)
        if data["privacy"]["accountant"] == Accountant.RDP.value:
            del data["privacy"]["accountant"]
        for section, defaults in _LATER_OPTIONS.items():
            for key, default in defaults.items():
                if data[section].get(key) == default:
                    del data[section][key]
        if self.model == ModelPlan():  # a section added later: absent while at its default
            del data["model"]
        elif data["model"]["initial"] is None:  # added later still
            del data["model"]["initial"]
        if data["analysis"] is None:  # likewise
            del data["analysis"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


TRAIN_SETTINGS_ON_THE_WIRE = ("epochs", "batch_size", "lr", "momentum", "weight_decay")
# options added after plans were approved: left out of the hash while at their default
_LATER_OPTIONS: dict[str, dict[str, Any]] = {
    "data": {"path": None},
    "evaluation": {"contributions": False},
    "training": {
        "optimizer": "sgd",
        "schedule": "constant",
        "grad_accumulation": 1,
        "grad_clip": 0.0,
        "device": "auto",
        "precision": "fp32",
        "deterministic": False,
        "local": [],
        "personal": None,
    },
}
