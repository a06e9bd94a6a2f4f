"""The site's own count of what its data has paid: a budget the aggregator cannot reset.

The aggregator stops a run before its epsilon budget is spent, but a site cannot verify
that, and an aggregator could start the same plan again (``--new-run``) and ask for more.
So each site counts the DP updates it has sent for a plan (by its hash) in
``STATE/privacy-spent.json`` and refuses, before anything leaves, an update that would
take its epsilon past its limit: the plan's ``epsilon_budget``, or its policy's
``dp.max_epsilon`` if lower. Each update is counted as one Gaussian mechanism of the
plan's noise multiplier, composed by the plan's accountant (``privacy.accountant``), as
the aggregator's accountant counts a full round (under
distributed noise, a round that loses sites has less noise than that: the aggregator's
ledger, not this count, records it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fedloom.core.errors import PolicyError
from fedloom.core.records import Accountant
from fedloom.pki.common import write_atomic
from fedloom.privacy import dp as dpmath
from fedloom.privacy.accounting import label

SPENT_FILE = "privacy-spent.json"


class SiteBudget:
    """Counts this site's DP updates per plan hash, durably, and refuses one too many."""

    def __init__(
        self,
        path: Path,
        *,
        plan_hash: str,
        noise_multiplier: float,
        delta: float,
        limit: float,
        accountant: Accountant = Accountant.RDP,
    ) -> None:
        self.path = path
        self.plan_hash = plan_hash
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.limit = limit
        self.accountant = accountant
        self._lock = threading.Lock()

    def sent(self) -> int:
        """How many DP updates this site has sent for the plan."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as err:
            raise PolicyError(
                f"cannot read this site's privacy count {self.path}: {err}",
                hint="restore it from a backup; deleting it forgets what the data has paid",
            ) from err
        return int(data.get("plans", {}).get(self.plan_hash, 0))

    def charge(self, round: int) -> float:
        """Count one more update for the plan (before it is sent) and return the epsilon
        spent with it; :class:`PolicyError` (nothing counted) if that passes the limit."""
        with self._lock:
            count = self.sent() + 1
            spent = dpmath.epsilon([self.noise_multiplier] * count, self.delta, self.accountant)
            if spent > self.limit:
                raise PolicyError(
                    f"round {round}: this site's privacy budget is spent: another update "
                    f"would bring its epsilon to {spent:.3g}, over its limit {self.limit:g} "
                    f"(delta {self.delta:g}, {label(self.accountant)} accountant; "
                    f"{count - 1} update(s) already sent for this plan)",
                    hint="the site sends no more updates for this plan; a new plan (a new "
                    "hash) starts a new count",
                )
            try:
                data = json.loads(self.path.read_text())
            except FileNotFoundError:
                data = {}
            plans = dict(data.get("plans", {}))
            plans[self.plan_hash] = count
            text = json.dumps({"plans": plans}, indent=1, sort_keys=True) + "\n"
            write_atomic(self.path, text.encode(), mode=0o600, error=PolicyError)
            return spent
