"""The lines `fedloom simulate` prints and logs about its run: the data, the attack,
where the sites' work runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedloom.cli.common import count

if TYPE_CHECKING:
    from fedloom.attacks import Attack
    from fedloom.plan import Plan
    from fedloom.simulation.options import SimulationOptions


def data_text(plan: Plan) -> str:
    """The plan's data for the run header: a partition only where one is made (a
    custom task's data and the synthetic sites are each site's own)."""
    data = plan.data
    if data.dataset == "custom":
        return f"the task's own ({data.path}/<site>)" if data.path else "the task's own"
    if data.dataset == "synthetic":
        return "synthetic (each site its own)"
    return f"{data.dataset} ({data.partition})"


SHOWN_ATTACKERS = 10  # the most attacking sites the header names (summary.json has all)


def attack_line(attack: Attack, sites: int) -> str:
    """The run header's line naming the attack and the sites that run it."""
    from fedloom.attacks import attack_text

    names = sorted(attack.attackers)
    shown = ", ".join(names[:SHOWN_ATTACKERS])
    if len(names) > SHOWN_ATTACKERS:
        shown += f" and {len(names) - SHOWN_ATTACKERS} more (summary.json lists them all)"
    return f"attack {attack_text(attack)}, by {len(names)} of {count(sites, 'site')}: {shown}"


def starting_line(plan: Plan, options: SimulationOptions) -> str | None:
    """The line said while the workers start (each loads the task, which can take
    seconds): None where the tasks run in this process."""
    from fedloom.simulation.pool import worker_processes

    if options.backend is not None:
        return "starting Ray workers for the sites' local work"
    n = worker_processes(plan, options)
    if n == 0:
        return None
    return f"starting {n} worker process{'' if n == 1 else 'es'} for the sites' local work"


def workers_text(options: SimulationOptions) -> str:
    """Where the sites' tasks run, for the run's log."""
    if options.backend is not None:
        return "Ray actors"
    if options.workers == 0:
        return "every task in this process's main thread (--workers 0)"
    many = "one per core" if options.workers is None else str(options.workers)
    on = f" on {count(options.gpus, 'GPU')}" if options.gpus else ""
    return f"worker processes: {many}{on}"
