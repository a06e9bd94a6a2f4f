"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from fedloom.orchestration import RoundRecord

MAX_SITE_LINES = 30


def plot_accuracy(history: tuple[RoundRecord, ...], path: Path, *, test: float | None) -> None:
    """Accuracy of the global model at each site, by round (one line per site).

    A training round ``r`` first evaluates the model of round ``r - 1``; the final
    evaluation round evaluates the last one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        x = record.round - 1  # round r (and the final evaluation) sees the model of r - 1
        for r in record.results:
            if "global_accuracy" in r.metrics:
                series.setdefault(r.site, []).append((x, r.metrics["global_accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    names = sorted(series)
    for site in names[:MAX_SITE_LINES]:
        xs, ys = zip(*series[site], strict=True)
        ax.plot(xs, ys, linewidth=1, alpha=0.8, label=site if len(names) <= 12 else None)
    if test is not None and history:
        ax.axhline(test, color="black", linestyle="--", linewidth=1, label=f"test {test:.3f}")
    ax.set_xlabel("global model after round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy on the site's validation split")
    shown = "" if len(names) <= MAX_SITE_LINES else f" (first {MAX_SITE_LINES} of {len(names)})"
    ax.set_title(f"Global model accuracy per site{shown}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if (0 < len(names) <= 12) or (test is not None and history):  # a legend with lines
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
