"""What the round loop needs from the plan, and the callables it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedloom.compression.codecs import Compression
from fedloom.core.records import TrainSettings

Signer = Callable[[bytes], bytes]
"""Signs a message with the aggregator's key (the federation's PKI); None: unsigned."""


StepHandler = Callable[[str, int, bytes], bytes]
"""``handler(site, round, payload) -> reply`` for one step of a multi-step round. The
site's identity comes from the transport; the handler may block (a barrier until every
selected site has spoken), so it must honour the round's deadline itself."""


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """What the round loop needs from the plan."""

    roster: tuple[str, ...]
    rounds: int
    sites_per_round: int
    min_fraction: float
    round_deadline: float  # seconds
    max_retries: int = 2
    max_samples: int = 100_000
    seed: int = 0
    settings: TrainSettings = field(default_factory=TrainSettings)
    final_evaluation: bool = True
    run_id: str = "run"  # names the run in attempt ids (RUN/ROUND.ATTEMPT)
    # a site silent (no heartbeat, no call) this long is dropped from the round; None: only
    # the round's deadline drops it (the in-process simulation has no heartbeats)
    dead_after: float | None = None
    # how updates and the global model travel (the plan's compression section)
    compression: Compression = field(default_factory=Compression)
    # each site's update compared with the last step (aggregator/probe.py)
    contribution_proxy: bool = False
