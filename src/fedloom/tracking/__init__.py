"""Experiment tracking at the aggregator: every round's aggregate and per-site metrics,
the plan and its hash, and the final model, sent to MLflow and/or written as
TensorBoard event files (docs/tracking.md).

Only the aggregator (or the simulating command) tracks: sites need no tracker
credentials, and what is tracked is what the aggregator already received, so the site
policy's metric rules hold. A tracker that fails mid-run is switched off with a
warning; the federation goes on."""

from fedloom.tracking.base import (
    TRACKERS,
    Tracker,
    TrackerSet,
    TrackSpec,
    open_trackers,
    parse_track,
    plan_params,
    round_metrics,
)

__all__ = [
    "TRACKERS",
    "TrackSpec",
    "Tracker",
    "TrackerSet",
    "open_trackers",
    "parse_track",
    "plan_params",
    "round_metrics",
]
