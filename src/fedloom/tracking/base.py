"""What every tracker hears, the plan as flat parameters, a round as named metrics,
and the set of trackers a run writes to."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedloom.core.errors import PlanError
from fedloom.core.records import InstructionKind, RoundRecord
from fedloom.plan import Plan

log = logging.getLogger("fedloom.tracking")

TRACKERS = ("mlflow", "tensorboard")


@dataclass(frozen=True)
class TrackSpec:
    """One ``--track`` value: ``mlflow``, ``mlflow=URI``, ``tensorboard`` or
    ``tensorboard=DIR``."""

    kind: str
    target: str | None = None


def parse_track(values: Iterable[str]) -> tuple[TrackSpec, ...]:
    """The ``--track`` values, each checked; a bad one is a :class:`PlanError` naming it."""
    specs: list[TrackSpec] = []
    problems: list[str] = []
    for value in values:
        kind, sep, target = value.partition("=")
        kind = kind.strip().lower()
        if kind not in TRACKERS:
            problems.append(f"--track: unknown tracker {value!r}; choose {' or '.join(TRACKERS)}")
        elif sep and not target.strip():
            problems.append(f"--track: {kind}= needs a value ({kind}=URI or just {kind})")
        elif any(s.kind == kind for s in specs):
            problems.append(f"--track: {kind} is given twice")
        else:
            specs.append(TrackSpec(kind, target.strip() or None))
    if problems:
        raise PlanError(problems, source="command line")
    return tuple(specs)


def plan_params(plan: Plan, plan_hash: str) -> dict[str, str]:
    """The plan as flat ``section.key`` parameters, with its hash and fedloom's version."""
    from fedloom.core.version import __version__

    flat: dict[str, str] = {"plan_hash": plan_hash, "fedloom_version": __version__}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = str(value)[:500]  # MLflow keeps a parameter's first 6000 chars

    walk("", plan.model_dump(mode="json"))
    return flat


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """One round's metrics by name: ``train/<m>`` or ``eval/<m>`` for the
    sample-weighted mean over the sites that answered, ``<site>/train/<m>`` for each
    site, the sites that answered and failed, and the privacy spent. Non-finite values
    are left out (a tracker refuses them)."""
    kind = "train" if record.kind is InstructionKind.TRAIN else "eval"
    out: dict[str, float] = {}
    for name, value in record.metrics.items():
        out[f"{kind}/{name}"] = value
    for result in record.results:
        for name, value in result.metrics.items():
            out[f"{result.site}/{kind}/{name}"] = value
    out[f"{kind}/sites_answered"] = float(len(record.results))
    out[f"{kind}/sites_failed"] = float(len(record.failures))
    for name, spent in record.privacy.items():
        if isinstance(spent, int | float):
            out[f"privacy/{name}"] = float(spent)
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class Tracker(Protocol):
    """One tracking backend. Each call may raise: :class:`TrackerSet` turns that into
    a warning and stops calling the tracker."""

    name: str

    def round_closed(self, record: RoundRecord) -> None: ...

    def finished(self, summary: Mapping[str, Any], run_dir: Path) -> None: ...

    def failed(self, status: str, run_dir: Path) -> None: ...


class TrackerSet:
    """The run's trackers. A tracker that raises is reported once and dropped: a
    tracking server that goes away must not stop the federation."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)
        self.dropped: list[str] = []

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as err:  # noqa: BLE001 - any backend's failure, reported
                self.trackers.remove(tracker)
                why = f"{type(err).__name__}: {err}"
                self.dropped.append(f"{tracker.name}: {why}")
                log.warning("tracking: %s failed and is switched off: %s", tracker.name, why)

    def round_closed(self, record: RoundRecord) -> None:
        self._each("round_closed", record)

    def finished(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        self._each("finished", summary, run_dir)

    def failed(self, status: str, run_dir: Path) -> None:
        self._each("failed", status, run_dir)


def open_trackers(
    specs: Sequence[TrackSpec], plan: Plan, plan_hash: str, run_dir: Path, workspace: Path
) -> TrackerSet:
    """Start a tracker for each spec (a bad URI or a missing package fails here, before
    any round), each already holding the plan's parameters."""
    trackers: list[Tracker] = []
    for spec in specs:
        if spec.kind == "mlflow":
            from fedloom.tracking.mlflow import MLflowTracker

            trackers.append(MLflowTracker.start(spec.target, plan, plan_hash, run_dir, workspace))
        else:
            from fedloom.tracking.tensorboard import TensorBoardTracker

            trackers.append(TensorBoardTracker.start(spec.target, plan, plan_hash, run_dir))
    return TrackerSet(trackers)
