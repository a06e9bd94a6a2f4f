"""TensorBoard event files, written with tensorboardX: every round's metrics as scalars
(step: the round), the plan and its hash as text, into ``runs/<run>/tensorboard`` or the
folder given (``--track tensorboard=DIR``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedloom.core.errors import PlanError
from fedloom.core.records import RoundRecord
from fedloom.plan import Plan
from fedloom.tracking.base import plan_params, round_metrics


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, writer: Any, logdir: Path) -> None:
        self.writer = writer
        self.logdir = logdir

    @classmethod
    def start(
        cls, target: str | None, plan: Plan, plan_hash: str, run_dir: Path
    ) -> TensorBoardTracker:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise PlanError(
                [
                    f"--track tensorboard: tensorboardX is not installed ({err}); "
                    "pip install 'fedloom[track]'"
                ],
                source="command line",
            ) from err
        logdir = Path(target) / run_dir.name if target else run_dir / "tensorboard"
        writer = SummaryWriter(logdir=str(logdir))
        params = plan_params(plan, plan_hash)
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer.add_text("plan", f"| parameter | value |\n|---|---|\n{table}", 0)
        writer.add_text("plan_hash", plan_hash, 0)
        writer.flush()
        return cls(writer, logdir)

    def round_closed(self, record: RoundRecord) -> None:
        for name, value in round_metrics(record).items():
            self.writer.add_scalar(name, value, record.round)
        self.writer.flush()

    def finished(self, summary: Mapping[str, Any], run_dir: Path) -> None:
        step = int(summary.get("rounds_finished", 0))
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"final/{key}", float(value), step)
        self.writer.add_text("final_model", str(run_dir / "final.safetensors"), step)
        self.writer.close()

    def failed(self, status: str, run_dir: Path) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()
