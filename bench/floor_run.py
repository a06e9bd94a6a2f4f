"""The floor: the workload as a plain torch loop, no framework.

    python bench/runners/floor_run.py --workload JSON --out FILE

Each round trains every site in turn from the global model (1 epoch of SGD, the
workload's batch size and learning rate) and averages the results in numpy, weighted
by sample count. Nothing is evaluated, serialised or sent anywhere: everything a
framework adds beyond this is overhead. torch keeps its default thread count.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/workloads.py
from workloads import Workload, build_model, runner_main, site_data  # noqa: E402


def run(w: Workload) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    torch.manual_seed(0)
    model = build_model(w.hidden)
    names = list(model.state_dict())
    global_w = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in site_data(w.sites)]
    rng = np.random.default_rng(0)
    setup = time.perf_counter() - started
    seconds = []
    for _ in range(w.rounds):
        t0 = time.perf_counter()
        total = {k: np.zeros_like(v) for k, v in global_w.items()}
        samples = 0
        for x, y in data:
            n = len(y)
            if w.noop:
                local = global_w
            else:
                with torch.no_grad():
                    for k, t in model.state_dict().items():
                        t.copy_(torch.from_numpy(global_w[k]))
                opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum)
                for _ in range(w.epochs):
                    order = torch.from_numpy(rng.permutation(n))
                    for s in range(0, n, w.batch_size):
                        idx = order[s : s + w.batch_size]
                        opt.zero_grad(set_to_none=True)
                        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                        opt.step()
                local = {k: v.detach().numpy() for k, v in model.state_dict().items()}
            for k in names:
                total[k] += local[k] * np.float32(n)
            samples += n
        global_w = {k: total[k] / np.float32(samples) for k in names}
        seconds.append(time.perf_counter() - t0)
    return {
        "framework": "floor",
        "version": f"torch {torch.__version__}",
        "workload": w.to_json(),
        "round_seconds": seconds,
        "setup_seconds": setup,
        "wall_seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    sys.exit(runner_main("floor", run, __doc__.split("\n\n")[0]))
