"""MLflow: one MLflow run for each fedloom run, in the experiment named after the plan.

The store is the tracking URI given (``--track mlflow=URI``), else the environment's
``MLFLOW_TRACKING_URI``, else a SQLite file beside the run folders
(``runs/mlflow.db``, artefacts in ``runs/mlartifacts``). A resumed aggregator carries on
the MLflow run it started (found by the run folder's tag)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedloom.core.errors import PlanError, TransportError
from fedloom.core.records import RoundRecord
from fedloom.plan import Plan
from fedloom.tracking.base import plan_params, round_metrics

RUN_DIR_TAG = "fedloom.run_dir"
BATCH = 100  # MLflow takes at most 100 parameters and 1000 metrics a batch
STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "cancelled": "KILLED"}


def default_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent / 'mlflow.db'}"


class MLflowTracker:
    name = "mlflow"

    def __init__(self, client: Any, run_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = uri

    @classmethod
    def start(
        cls, target: str | None, plan: Plan, plan_hash: str, run_dir: Path, workspace: Path
    ) -> MLflowTracker:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise PlanError(
                [f"--track mlflow: MLflow is not installed ({err}); pip install 'fedloom[track]'"],
                source="command line",
            ) from err
        for noisy in ("mlflow", "alembic"):  # table creation is logged at INFO on stderr
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = target or default_uri(run_dir)
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(plan.name)
            if experiment is None:
                local = target is None and "MLFLOW_TRACKING_URI" not in os.environ
                where = (run_dir.parent / "mlartifacts").resolve().as_uri() if local else None
                experiment_id = client.create_experiment(plan.name, artifact_location=where)
            else:
                experiment_id = experiment.experiment_id
            tag = str(run_dir.resolve())
            found = client.search_runs(
                [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{tag}'", max_results=1
            )
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
            else:
                run = client.create_run(
                    experiment_id,
                    run_name=run_dir.name,
                    tags={RUN_DIR_TAG: tag, "fedloom.plan_hash": plan_hash},
                )
                run_id = run.info.run_id
                params = [Param(k, v) for k, v in plan_params(plan, plan_hash).items()]
                for i in range(0, len(params), BATCH):
                    client.log_batch(run_id, params=params[i : i + BATCH])
        except Exception as err:  # noqa: BLE001 - whatever the store says, said once
            raise TransportError(
                f"--track mlflow: the tracking store {uri} cannot be used: "
                f"{type(err).__name__}: {(str(err).strip() or '?').splitlines()[0]}",
                hint="check the tracking URI (sqlite:///path.db, http://host:5000, ...)",
            ) from err
        return cls(client, run_id, uri)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 10 * BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i : i + 10 * BATCH])

    def round_closed(self, record: RoundRecord) -> None:
        self._log(round_metrics(record), record.round)

    def finished(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        final = {
            f"final/{k}": float(v)
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._log(final, int(summary.get("rounds_finished", 0)))
        self.client.log_artifact(self.run_id, str(run_dir / "final.safetensors"), "model")
        for name in ("summary.json", "plan.json"):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name), "run")
        self.client.set_terminated(self.run_id, "FINISHED")

    def failed(self, status: str, run_dir: Path) -> None:
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))
