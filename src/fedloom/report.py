"""What a run leaves behind in ``runs/<run-name>/``.

``metrics.jsonl`` (one line per site per round), ``summary.json``,
``final.safetensors`` (the final global model), ``plan.json`` (the validated plan)
and ``<primary>.png`` (each site's figure of the global model, round by round, by the
task's primary metric: ``accuracy.png`` for a classifier).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from fedloom.core.errors import DiskError, WorkspaceError, disk_error, naming
from fedloom.core.events import Event, RoundClosed
from fedloom.core.records import (
    Accountant,
    FailureKind,
    InstructionKind,
    RoundRecord,
    finished_rounds,
)
from fedloom.figures import metric_names, plot_file, worst_value
from fedloom.plan import Plan
from fedloom.results import SimulationResult, SiteFailed, contribution_proxy
from fedloom.store import save_weights
from fedloom.store.runs import ended_as
from fedloom.strategies.scaffold import zero_controls

if TYPE_CHECKING:
    from fedloom.tracking import TrackerSet


def record_rows(
    record: RoundRecord, dp_sgd_accountant: Accountant | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of one round (one attempt of it). A site's row holding its
    ``dp_sgd_epsilon`` names the accountant that computed it (``dp_sgd_accountant``)."""
    base = {
        "round": record.round,
        "kind": record.kind.value,
        "attempt": record.attempt,
        "close_reason": record.close_reason.value,
        **dict(record.privacy),  # epsilon, delta, clip once the round was aggregated
    }
    for r in record.results:
        row = {
            **base,
            "site": r.site,
            "status": "ok",
            "num_samples": r.num_samples,
            "claimed_samples": r.claimed_samples,
            **dict(r.metrics),
        }
        if dp_sgd_accountant is not None and "dp_sgd_epsilon" in r.metrics:
            row["dp_sgd_accountant"] = dp_sgd_accountant.value
        yield row
    for f in record.failures:
        yield {**base, "site": f.site, "status": f.kind.value, "reason": f.reason}


def final_site_metrics(history: tuple[RoundRecord, ...]) -> dict[str, dict[str, float]]:
    """Each site's metrics of the final global model (the final evaluation round)."""
    evaluations = [r for r in history if r.kind is InstructionKind.EVALUATE]
    if not evaluations:
        return {}
    return {r.site: dict(r.metrics) for r in evaluations[-1].results}


def summary(result: SimulationResult, run_name: str) -> dict[str, Any]:
    finished = len(finished_rounds(result.history))
    return {
        "run_name": run_name,
        "status": "completed",
        **_plan_fields(result.plan, result.plan_hash),
        **({"strategy": result.strategy} if result.strategy else {}),
        "rounds_finished": finished,
        **({} if result.plan.analysis is not None else metric_fields(result)),
        "wall_seconds": result.wall_seconds,
        "seconds_per_round": result.wall_seconds / max(1, finished),
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        **_model_size_fields(result),
        "attackers": list(result.attackers),
        "failures": sum(len(r.failures) for r in result.history),
        "close_reasons": {str(r.round): r.close_reason.value for r in result.history},
        **_privacy_fields(result),
        **_analysis_fields(result),
        **_proxy_fields(result),
    }


def _proxy_fields(result: SimulationResult) -> dict[str, Any]:
    proxy = contribution_proxy(result.history)
    return {} if proxy is None else {"contribution_proxy": proxy}


def _analysis_fields(result: SimulationResult) -> dict[str, Any]:
    """An analysis plan's statistics (``analysis``), from the sites' summed blocks."""
    query = result.plan.analysis
    done = [r for r in result.history if r.aggregated]
    if query is None or not done:
        return {}
    from fedloom.analysis import analysis_results, totals

    sites = len(done[-1].results)
    epsilon = None if query.dp is None else query.dp.epsilon(result.plan.privacy.accountant)
    summed = totals(result.final_weights, sites)
    return {"analysis": analysis_results(query, summed, sites, epsilon)}


def _model_size_fields(result: SimulationResult) -> dict[str, Any]:
    """What travels of the model against the whole of it, when the task knows the whole
    (``federated_bytes``: the federated tensors, sent to and from each site a round;
    ``model_bytes``: the whole model, a frozen base included; under SCAFFOLD a float32
    control variate travels with each float tensor)."""
    if result.model_bytes is None:
        return {}
    federated = sum(int(a.nbytes) for a in result.final_weights.values())
    if result.plan.strategy.name == "scaffold":
        federated += sum(int(a.nbytes) for a in zero_controls(result.final_weights).values())
    return {"federated_bytes": federated, "model_bytes": result.model_bytes}


def metric_fields(result: SimulationResult) -> dict[str, Any]:
    """The summary's figures, by the task's declared metrics: the primary metric and
    which way it improves, ``test_<metric>`` for each metric, the sites' mean and worst
    of the primary (the worst is the highest of a lower-is-better metric), and
    ``centralized_<metric>`` (``--baseline``). A classifier's are ``test_accuracy``,
    ``test_loss``, ``mean_site_accuracy``, ``worst_site_accuracy``,
    ``centralized_accuracy`` and ``centralized_loss``.

    Undeclared (``result.metrics`` None: the task was not loaded), only the test set's
    metrics are named, and no site figure."""
    declared = result.metrics
    central = result.centralized_metrics or {}
    if declared is None:
        return {
            "primary_metric": None,
            "primary_better": None,
            **{f"test_{k}": _num(v) for k, v in sorted(result.test_metrics.items())},
        }
    names = metric_names(declared, result.test_metrics, central)
    primary = declared.primary
    sites = final_site_metrics(result.history)
    values = [m[f"global_{primary}"] for m in sites.values() if f"global_{primary}" in m]
    finite = [v for v in values if math.isfinite(v)]
    mine = [m[f"personal_{primary}"] for m in sites.values() if f"personal_{primary}" in m]
    personal = [v for v in mine if math.isfinite(v)]
    return {
        "primary_metric": primary,
        "primary_better": declared.better(primary),
        **{f"test_{k}": _num(result.test_metrics.get(k)) for k in names},
        f"mean_site_{primary}": _num(sum(finite) / len(finite)) if finite else None,
        f"worst_site_{primary}": _num(worst_value(declared, primary, finite)),
        # Ditto (training.personal): each site's own model on its validation split
        **(
            {
                f"mean_personal_{primary}": _num(sum(personal) / len(personal)),
                f"worst_personal_{primary}": _num(worst_value(declared, primary, personal)),
            }
            if personal
            else {}
        ),
        **{
            f"centralized_{k}": _num(central.get(k)) if result.centralized_metrics else None
            for k in names
        },
    }


def _privacy_fields(result: SimulationResult) -> dict[str, Any]:
    """Epsilon spent (at the plan's delta), per round and in all, the accountant that
    computed it, and an early stop."""
    out: dict[str, Any] = {}
    spent = [r for r in result.history if r.privacy]
    if spent:
        last = spent[-1].privacy
        out["epsilon"] = _epsilon(last)
        out["delta"] = last.get("delta")
        out["accountant"] = last.get("accountant")
        out["epsilon_by_round"] = {str(r.round): _epsilon(r.privacy) for r in spent}
    if result.plan.privacy.dp_sgd is not None:  # each site reports its own dp_sgd_epsilon
        out["dp_sgd_accountant"] = result.plan.privacy.accountant.value
    if result.stopped_early:
        out["stopped_early"] = result.stopped_early
        out["rounds_trained"] = len(spent) if spent else None
    return out


class RunRecorder:
    """Writes a run folder as the run goes: ``metrics.jsonl`` grows round by round, so a
    run that fails or is stopped keeps what it did, with a ``summary.json`` saying why."""

    def __init__(self, run_dir: Path, *, plan: Plan | None = None) -> None:
        self._dp_sgd_accountant = _dp_sgd_accountant(plan)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            self._metrics = open(run_dir / "metrics.jsonl", "w")  # noqa: SIM115 - kept open
        except FileExistsError as err:
            raise WorkspaceError(
                f"{run_dir} already exists", hint="pick another --run-name, or remove that folder"
            ) from err
        except OSError as err:
            raise _folder_error(err, run_dir) from err
        self.run_dir = run_dir
        self.history: list[RoundRecord] = []  # every attempt closed, as the events said
        self.finished: dict[str, Any] | None = None
        self._tracebacks: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()
        self.tracker: TrackerSet | None = None  # set by the command that tracks

    @classmethod
    def reopen(
        cls,
        run_dir: Path,
        history: Iterable[RoundRecord],
        *,
        rewrite: bool = True,
        plan: Plan | None = None,
    ) -> RunRecorder:
        """Carry on a resumed run's folder: ``metrics.jsonl`` is rewritten from the
        recorded history (the state database is the record), then grows as before.
        Without ``rewrite`` (the database lost its per-site records), it is appended to."""
        history = list(history)  # written, then kept
        recorder = cls.__new__(cls)
        recorder._dp_sgd_accountant = _dp_sgd_accountant(plan)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if rewrite:
                tmp = run_dir / "metrics.jsonl.tmp"
                with open(tmp, "w") as fh:
                    _write_rows(fh, history, recorder._dp_sgd_accountant)
                tmp.replace(run_dir / "metrics.jsonl")
            recorder._metrics = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - kept open
        except OSError as err:
            raise _folder_error(err, run_dir) from err
        recorder.run_dir = run_dir
        recorder.history = history
        recorder.finished = None
        recorder._tracebacks = {}
        recorder._lock = threading.Lock()
        recorder.tracker = None
        return recorder

    def site_failed(self, failure: SiteFailed) -> None:
        """Keep the task's traceback of a simulated site's failure, for the ``traceback``
        field of its row in ``metrics.jsonl`` (written when its round closes)."""
        if failure.traceback:
            with self._lock:
                self._tracebacks[(failure.round, failure.site)] = failure.traceback

    def on_event(self, event: Event) -> None:
        if isinstance(event, RoundClosed):
            rows = list(record_rows(event.record, self._dp_sgd_accountant))
            with self._lock:
                for row in rows:
                    if row["status"] == FailureKind.ERROR.value:
                        trace = self._tracebacks.pop((row["round"], row["site"]), None)
                        if trace is not None:
                            row["traceback"] = trace
            with naming(self.run_dir / "metrics.jsonl"):
                for row in rows:
                    self._metrics.write(json.dumps(row, sort_keys=True) + "\n")
                self._metrics.flush()
            self.history.append(event.record)
            if self.tracker is not None:
                self.tracker.round_closed(event.record)

    def finish(self, result: SimulationResult, *, plot: bool = True) -> dict[str, Any]:
        """Write the final model, the plan, the plot and the summary; return the summary.

        Each file is written whole and renamed into place, the summary last: a folder
        whose ``summary.json`` says ``completed`` has all of them. Called twice, the
        second call returns the first one's summary."""
        if self.finished is not None:
            return self.finished
        with naming(self.run_dir / "metrics.jsonl"):
            self._metrics.close()
        data = summary(result, self.run_dir.name)
        save_weights(self.run_dir / "final.safetensors", result.final_weights)
        _write_text(
            self.run_dir / "plan.json",
            json.dumps(result.plan.model_dump(mode="json"), indent=2) + "\n",
        )
        if plot and result.plan.analysis is None:  # an analysis has no metric to plot
            plot_metrics(self.run_dir, result, data)
        if plot and "contribution_proxy" in data:
            plot_proxy(self.run_dir / "contribution_proxy.png", data["contribution_proxy"])
        _write_text(self.run_dir / "summary.json", json.dumps(data, indent=2) + "\n")
        self.finished = data
        if self.tracker is not None:
            self.tracker.finished(data, self.run_dir)
        return data

    def discard(self) -> None:
        """Remove the run folder's files, and the folder if that empties it: for a run
        that never opened a round, and so is not recorded (see
        :func:`fedloom.deployment.server.serve`). Best effort: what cannot be removed
        stays."""
        with contextlib.suppress(OSError):
            self._metrics.close()
            for name in ("metrics.jsonl", "summary.json", "plan.json"):
                (self.run_dir / name).unlink(missing_ok=True)
            self.run_dir.rmdir()  # only if empty: anything else there is not ours

    def fail(
        self,
        plan: Plan,
        plan_hash: str,
        error: BaseException,
        *,
        history: Iterable[RoundRecord] | None = None,
    ) -> None:
        """Record why the run ended early, next to the metrics it had written, with the
        rounds it finished: counted in ``history`` (a deployed aggregator's state
        database, the record ``fedloom status`` reads), else in what this recorder
        heard. If the disk refuses (it may be why the run ended), the folder stays as
        it was."""
        try:
            self._fail(plan, plan_hash, error, self.history if history is None else history)
        except OSError:
            pass  # the error being handled is the one to report
        if self.tracker is not None:
            self.tracker.failed(ended_as(error), self.run_dir)

    def _fail(
        self, plan: Plan, plan_hash: str, error: BaseException, history: Iterable[RoundRecord]
    ) -> None:
        self._metrics.close()
        data = {
            "run_name": self.run_dir.name,
            "status": ended_as(error),
            "error": str(error) or type(error).__name__,
            **_plan_fields(plan, plan_hash),
            "rounds_finished": len(finished_rounds(history)),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
        (self.run_dir / "plan.json").write_text(
            json.dumps(plan.model_dump(mode="json"), indent=2) + "\n"
        )


def plot_proxy(path: Path, proxy: Mapping[str, Any]) -> None:
    """A bar per site: its mean update cosine with the federation's last step."""
    from fedloom.plots import plot_contributions

    scores = {"update_cosine": {s: v["mean_cosine"] for s, v in proxy["sites"].items()}}
    with naming(path):
        plot_contributions(scores, path, "", ylabel="mean cosine with the last step")


def plot_metrics(run_dir: Path, result: SimulationResult, data: Mapping[str, Any]) -> None:
    """Write the plot of the primary metric, ``<primary>.png`` (``accuracy.png`` for a
    classifier); a task not loaded (``result.metrics`` None) has none."""
    declared = result.metrics
    if declared is None:
        return
    from fedloom.plots import plot_primary

    path = run_dir / plot_file(declared)
    tmp = path.with_name(f"{path.stem}.tmp.png")  # the suffix names the format
    with naming(tmp):
        plot_primary(
            result.history,
            tmp,
            declared.primary,
            test=data.get(f"test_{declared.primary}"),
            baseline=data.get(f"centralized_{declared.primary}"),
            better=declared.better(declared.primary),
        )
    tmp.replace(path)


def _folder_error(err: OSError, run_dir: Path) -> WorkspaceError | DiskError:
    return disk_error(err) or WorkspaceError(
        f"cannot write the run folder {run_dir}: {err.strerror}"
    )


def _write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or is as it was: written aside, then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        tmp.write_text(text)
    tmp.replace(path)


def _write_rows(
    fh: IO[str], records: Iterable[RoundRecord], dp_sgd_accountant: Accountant | None
) -> None:
    """``metrics.jsonl`` lines: one per site per record."""
    for record in records:
        for row in record_rows(record, dp_sgd_accountant):
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def _dp_sgd_accountant(plan: Plan | None) -> Accountant | None:
    """The accountant of the sites' DP-SGD epsilons, under DP-SGD."""
    if plan is None or plan.privacy.dp_sgd is None:
        return None
    return plan.privacy.accountant


def _plan_fields(plan: Plan, plan_hash: str) -> dict[str, Any]:
    return {
        "plan_name": plan.name,
        "rounds": plan.rounds,
        "sites": len(plan.roster),
        "strategy": plan.strategy.name,
        "plan_hash": plan_hash,
    }


def _epsilon(privacy: Mapping[str, float | str]) -> float | None:
    value = privacy.get("epsilon")
    return _num(value) if isinstance(value, float | int) else None


def _num(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)
