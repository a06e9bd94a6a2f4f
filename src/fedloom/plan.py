"""The plan: ``federation.yaml``, validated, with ``key=value`` overrides and a hash.

Every problem is collected and reported at once with its path and a hint
(``strategy.server_lr: must be > 0 (got -1)``), never as a traceback. The *plan hash*
is the sha256 of the validated plan as canonical JSON plus every ``.py`` file of the
workspace: the contract a data owner approves and every site checks.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedloom.compression.settings import CompressionPlan, compression_problems
from fedloom.core.errors import PlanError, WorkspaceError
from fedloom.core.records import Accountant, TrainSettings
from fedloom.core.site_name import roster_of, site_name_problem
from fedloom.data.datasets import REGRESSION_DATASETS
from fedloom.data.partition import parse_partition
from fedloom.docpages import doc_ref
from fedloom.privacy.settings import PrivacyPlan, privacy_problems
from fedloom.workspace import WorkspaceCode

if TYPE_CHECKING:
    from fedloom.strategies.base import Strategy

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
MAX_NESTING = 16  # sections and lists inside one another, in the file or an override
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


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SyntheticData(_Frozen):
    alpha: Annotated[float, Field(ge=0, le=MAX_SYNTHETIC, allow_inf_nan=False)] = 0.5
    beta: Annotated[float, Field(ge=0, le=MAX_SYNTHETIC, allow_inf_nan=False)] = 0.5


class DataPlan(_Frozen):
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


class TrainingPlan(_Frozen):
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

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        problem = device_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class EvaluationPlan(_Frozen):
    final: bool = True  # evaluate the final global model at every site
    # in each training round, evaluate the received global model and the locally trained
    # one on the site's validation split (false: train only; benchmarks, large runs)
    each_round: bool = True


class DeadlinePlan(_Frozen):
    round_seconds: Annotated[float, Field(gt=0, le=MAX_ROUND_SECONDS, allow_inf_nan=False)] = 600.0
    min_fraction: Fraction = 1.0
    retries: Annotated[int, Field(ge=0, le=MAX_RETRIES)] = 2


class Plan(_Frozen):
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
            raise ValueError(f"at most {MAX_SITES} sites (got {_shown(size)})")
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
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


TRAIN_SETTINGS_ON_THE_WIRE = ("epochs", "batch_size", "lr", "momentum", "weight_decay")
# options added after plans were approved: left out of the hash while at their default
_LATER_OPTIONS: dict[str, dict[str, Any]] = {
    "data": {"path": None},
    "training": {
        "optimizer": "sgd",
        "schedule": "constant",
        "grad_accumulation": 1,
        "grad_clip": 0.0,
        "device": "auto",
        "precision": "fp32",
        "deterministic": False,
        "local": [],
    },
}


# ----------------------------------------------------------------- loading


class RefusedYAML(yaml.MarkedYAMLError):
    """Valid YAML that a plan may not use (see :class:`StrictLoader`)."""


class StrictLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key written twice in one mapping; anchors and
    aliases (a few hundred bytes of them expand to gigabytes, the "billion laughs");
    nesting deeper than :data:`MAX_NESTING`; and numbers longer than any setting."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise RefusedYAML(
                None,
                None,
                "anchors and aliases (&name, *name, <<: *name) are not accepted; "
                "write each value out",
                event.start_mark,
            )
        if self._depth >= MAX_NESTING:
            raise RefusedYAML(
                None,
                None,
                f"sections and lists are nested more than {MAX_NESTING} deep",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _bounded_int(loader: StrictLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > 40:  # more digits than any setting takes
        raise RefusedYAML(
            None,
            None,
            f"a number of {len(node.value)} characters is longer than any setting takes",
            node.start_mark,
        )
    return loader.construct_yaml_int(node)


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is written twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def _where(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark
    return "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"


def read_plan_file(workspace: Path) -> dict[str, Any]:
    path = workspace / PLAN_FILE
    if not workspace.is_dir():
        raise WorkspaceError(
            f"{workspace} is not a folder", hint="create one with `fedloom init DIR`"
        )
    if not path.is_file():
        raise WorkspaceError(
            f"{path} not found", hint="a workspace holds federation.yaml; see `fedloom init`"
        )
    with path.open("rb") as f:
        data = f.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(
            [f"the file is larger than {MAX_PLAN_BYTES} bytes (1 MiB), the most a plan takes"],
            source=str(path),
        )
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=StrictLoader)  # noqa: S506
    except UnicodeDecodeError as err:
        raise PlanError(
            [f"not UTF-8 text ({err.reason} at byte {err.start})"], source=str(path)
        ) from err
    except RefusedYAML as err:
        raise PlanError([f"{err.problem}{_where(err)}"], source=str(path)) from err
    except yaml.YAMLError as err:
        raise PlanError([f"not valid YAML: {err}"], source=str(path)) from err
    except (ValueError, RecursionError) as err:  # a value yaml itself cannot build
        raise PlanError([f"cannot read the file: {err}"], source=str(path)) from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PlanError(["the plan must be a mapping of keys to values"], source=str(path))
    return raw


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {_shown(item)}: expected key=value, e.g. rounds=5")
            continue
        if key.count(".") >= MAX_NESTING:
            problems.append(f"override {_shown(item)}: a key at most {MAX_NESTING} deep")
            continue
        try:
            value = yaml.load(text, Loader=StrictLoader) if text.strip() else ""  # noqa: S506
        except RefusedYAML as err:
            problems.append(f"override {_shown(item)}: {err.problem}")
            continue
        except (yaml.YAMLError, ValueError, RecursionError):
            value = text
        parsed.append(([p for p in key.strip().split(".")], value))
    if problems:
        raise PlanError(problems, source="overrides")
    return parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``raw`` with each ``a.b.c=value`` set. Changing ``strategy.name`` drops the old
    strategy's parameters (unless they are overridden too)."""
    out: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    items = parse_overrides(overrides)
    strategy = out.get("strategy")
    for path, value in items:
        if path == ["strategy", "name"] and isinstance(strategy, dict):
            if strategy.get("name", "fedavg") != value:
                out["strategy"] = {"name": value}
    for path, value in items:
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def validate_plan(raw: Mapping[str, Any], *, source: str = PLAN_FILE) -> Plan:
    """The validated plan, or a :class:`PlanError` listing every problem."""
    problems: list[str] = []
    plan: Plan | None = None
    try:
        plan = Plan.model_validate(raw)
    except pydantic.ValidationError as err:
        problems.extend(describe_error(e) for e in err.errors())
    strategy_raw = raw.get("strategy") if isinstance(raw, Mapping) else {}
    strategy_problems, strategy = _check_strategy(
        strategy_raw if isinstance(strategy_raw, Mapping) else {}
    )
    problems.extend(strategy_problems)
    if problems:
        raise PlanError(problems, source=source)
    assert plan is not None and strategy is not None  # noqa: S101 - no problems: both valid
    return _spelled_out(plan, strategy, source)


def _spelled_out(plan: Plan, strategy: Strategy, source: str) -> Plan:
    """The plan with every strategy parameter spelled out, defaults included, so that
    writing a default explicitly does not change the plan hash."""
    from fedloom.strategies import parameters_of

    params = parameters_of(strategy)
    per_round = plan.per_round
    problems = privacy_problems(
        plan.privacy,
        strategy=plan.strategy.name,
        needs_updates=strategy.needs_updates,
        per_round=per_round,
        max_samples=plan.training.max_samples,
    )
    problems += compression_problems(plan.compression, plan.privacy)
    if problems:
        raise PlanError(problems, source=source)
    if strategy.min_updates() > per_round:
        selected = params.get("num_selected")
        field = "num_selected" if selected and selected > per_round else "num_byzantine"
        raise PlanError(
            [
                f"strategy.{field}: {plan.strategy.name} with these parameters needs at "
                f"least {strategy.min_updates()} updates a round, but only {per_round} sites "
                "take part in a round; lower it, or add sites"
            ],
            source=source,
        )
    return plan.model_copy(update={"strategy": StrategyPlan(name=plan.strategy.name, **params)})


def _check_strategy(strategy: Mapping[str, Any]) -> tuple[list[str], Strategy | None]:
    """The problems of the plan's strategy section, and the strategy if it has none."""
    from fedloom.strategies import STRATEGIES, parameter_defaults

    name = strategy.get("name", "fedavg")
    if name not in STRATEGIES:
        problem = f"strategy.name: unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        return [problem], None
    cls = STRATEGIES[name]
    known = list(parameter_defaults(name))
    params = {k: v for k, v in strategy.items() if k != "name"}
    takes = ", ".join(known) if known else "no parameters"
    problems = [
        f"strategy.{key}: strategy {name!r} has no parameter {key!r}{_did_you_mean(key, known)}; "
        f"it takes {takes}"
        for key in params
        if key not in known
    ]
    try:
        built = pydantic.TypeAdapter(cls).validate_python(
            {k: v for k, v in params.items() if k in known}
        )
    except pydantic.ValidationError as err:
        problems += [describe_error(e, prefix=("strategy",), strategy=name) for e in err.errors()]
        return problems, None
    return problems, (None if problems else built)


def load_plan(workspace: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """Read ``federation.yaml`` of ``workspace``, apply overrides, validate."""
    ws = Path(workspace)
    raw = apply_overrides(read_plan_file(ws), overrides)
    source = str(ws / PLAN_FILE) + (" with overrides" if overrides else "")
    return validate_plan(raw, source=source)


def attack_warnings(plan: Plan, attackers: int) -> tuple[str, ...]:
    """Warnings, not errors: what the plan's strategy cannot withstand when ``attackers``
    sites of the roster attack (``fedloom simulate --attackers``). The worst round has
    ``min(attackers, plan.per_round)`` of them among its sites; the strategy is warned
    about when it withstands fewer (:meth:`~fedloom.strategies.base.Strategy.tolerated`).
    """
    from fedloom.strategies import build_strategy

    if attackers <= 0:
        return ()
    strategy = build_strategy(plan.strategy.name, plan.strategy_params)
    n = plan.per_round
    bad = min(attackers, n)
    held = strategy.tolerated(n)
    if bad <= held:
        return ()
    name, params = plan.strategy.name, plan.strategy_params
    attack = f"{bad} of the {n} sites in a round attack"
    instead = "filtered-mean or geometric-median, which need no count of attackers"
    if 2 * bad >= n:
        return (
            f"strategy.name: {attack}: no robust strategy withstands half the updates or "
            "more; add honest sites or attack fewer",
        )
    if not strategy.needs_updates:
        return (
            f"strategy.name: {name} averages every update, so one attacking site moves the "
            f"model as far as it likes, and {attack}; use a robust strategy: {instead}",
        )
    if name == "trimmed-mean":
        return (
            f"strategy.trim_fraction: {params['trim_fraction']} trims {held} of the {n} "
            f"updates from each end of every coordinate, but {attack}; set it to at least "
            f"{bad / n:.3g} ({bad}/{n}), or use filtered-mean, which needs no count of "
            "attackers",
        )
    if name in ("krum", "multi-krum"):
        selected = params.get("num_selected")
        if selected is not None and n - selected < bad <= params["num_byzantine"]:
            return (
                f"strategy.num_selected: multi-krum keeps {selected} of the {n} updates, so "
                f"it averages in at least {bad - (n - selected)} attacking update(s) when "
                f"{attack}; set it to at most {n - bad}, or leave it null",
            )
        return (
            f"strategy.num_byzantine: {name} withstands num_byzantine = "
            f"{params['num_byzantine']} attacking sites, but {attack}; set it to at least "
            f"{bad} (which needs {2 * bad + 3} sites a round), or use {instead}",
        )
    return (
        f"strategy.name: {name} withstands {held} attacking site(s) of the {n} in a round, "
        f"but {attack}",
    )


def plan_hash(plan: Plan, workspace: str | Path | WorkspaceCode) -> str:
    """sha256 over the canonical JSON of ``plan`` and every ``.py`` file of the workspace.

    Pass the :class:`WorkspaceCode` the task is loaded from to hash exactly the bytes
    that run; a folder is read afresh."""
    code = workspace if isinstance(workspace, WorkspaceCode) else WorkspaceCode.read(workspace)
    h = hashlib.sha256()
    h.update(b"fedloom-plan-v1\0")
    h.update(plan.canonical_json().encode())
    code.update(h)
    return h.hexdigest()


# -------------------------------------------------------------- messages

_HINTS = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be text",
    "missing": "is required",
    "dict_type": "must be a section of key: value lines",
    "model_type": "must be a section of key: value lines",
    "model_attributes_type": "must be a section of key: value lines",
    "list_type": "must be a list",
    "finite_number": "must be a finite number",
}


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number of thousands of digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


PLAN_DOCS = doc_ref("plan")


def _section_keys(path: Sequence[str]) -> list[str]:
    """The keys the plan accepts in the section at ``path`` (``[]`` for the top level
    returns the plan's own keys)."""
    model: type[BaseModel] = Plan
    for part in path:
        annotation = getattr(model.model_fields.get(part), "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    """`` (did you mean `rounds`?)`` for the known key nearest to ``key``, or ``""``."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def describe_error(error: Any, prefix: tuple[str, ...] = (), strategy: str | None = None) -> str:
    loc = [str(p) for p in (*prefix, *error["loc"]) if not str(p).startswith("function-")]
    # unions report each branch (int, list[str]); keep the path readable
    loc = [p for p in loc if p not in {"int", "list[str]", "constrained-int"}]
    path = ".".join(loc) or "(top level)"
    kind = error["type"]
    ctx = {
        k: (f"{v:g}" if isinstance(v, float) else v) for k, v in (error.get("ctx") or {}).items()
    }
    got = error.get("input")
    if kind == "extra_forbidden":
        where = f"strategy {strategy!r}" if strategy else "this section"
        known = [] if strategy else _section_keys(loc[:-1])
        guess = _did_you_mean(loc[-1], known) if loc else ""
        return f"{path}: unknown key for {where}{guess}; check its spelling in {PLAN_DOCS}"
    if kind in ("literal_error", "enum"):
        return f"{path}: must be one of {ctx.get('expected')} (got {_shown(got)})"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return message if not loc else f"{path}: {message}"
    text = _HINTS.get(kind, error["msg"]).format(**ctx) if kind in _HINTS else error["msg"]
    shown = "" if kind == "missing" else f" (got {_shown(got)})"
    return f"{path}: {text}{shown}"
