"""The simulation's workers: how many, and starting them (worker processes on this
machine, one worker in this process with ``--workers 0``, or actors on a Ray cluster),
each placed on its device."""

from __future__ import annotations

import os

from fedloom.plan import Plan
from fedloom.simulation.options import SimulationOptions
from fedloom.simulation.ray_backend import start_ray_workers
from fedloom.simulation.worker import LocalWorker, Placement, ProcessWorker, Worker


def worker_processes(plan: Plan, options: SimulationOptions) -> int:
    """How many worker processes a simulation starts on this machine: one per core (or
    ``options.workers``), never more than the sites of a round (the rest would only
    idle); 0 with ``--workers 0`` (every task in this process) or on Ray."""
    if options.backend is not None:
        return 0
    wanted = (os.cpu_count() or 1) if options.workers is None else options.workers
    return max(0, min(wanted, plan.per_round))


def start_workers(
    workspace: str,
    plan_json: str,
    attack_json: str,
    options: SimulationOptions,
    plan: Plan,
    digest: str,
) -> list[Worker]:
    """Start the simulation's workers and wait until each is ready; if one fails to
    start, those already started are closed."""
    # a request carries a batch of sites: each gets the plan's round_seconds
    call_timeout = plan.deadline.round_seconds  # per site: a worker multiplies it by the batch
    if options.backend is not None:
        return start_ray_workers(
            options.backend,
            workspace,
            plan_json,
            attack_json,
            workers=options.workers,
            sites_per_round=plan.per_round,
            call_timeout=call_timeout,
        )
    count = worker_processes(plan, options)
    root = str(options.state_root) if options.state_root is not None else None
    if count <= 0:
        device = "cuda" if options.gpus else None
        placement = Placement(device=device, state_root=root)
        return [LocalWorker(workspace, plan_json, attack_json, digest, placement)]
    workers: list[Worker] = []
    try:
        for i in range(count):
            placement, gpu = Placement(state_root=root), None
            if options.gpus:  # worker i sees GPU i % gpus alone; workers sharing it split it
                gpu = i % options.gpus
                sharing = len(range(gpu, count, options.gpus))
                fraction = 1.0 / sharing if sharing > 1 else None
                placement = Placement(device="cuda", memory_fraction=fraction, state_root=root)
            workers.append(
                ProcessWorker(
                    workspace,
                    plan_json,
                    attack_json,
                    call_timeout=call_timeout,
                    plan_hash=digest,
                    placement=placement,
                    visible_gpu=gpu,
                )
            )
        for w in workers:
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers
