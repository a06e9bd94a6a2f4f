"""PNG plots of a run (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

from fedloom.core.records import RoundRecord

MAX_SITE_LINES = 30


def plot_primary(
    history: tuple[RoundRecord, ...],
    path: Path,
    primary: str,
    *,
    test: float | None,
    baseline: float | None = None,
    better: str = "higher",
) -> None:
    """The global model's ``primary`` metric at each site, by round (one line per site),
    with the final model's test figure and the centralised baseline's as dashed and
    dotted lines. ``better`` (``"higher"`` or ``"lower"``) is the way the metric
    improves: the legend goes where the curves are not heading.

    A training round ``r`` first evaluates the model of round ``r - 1``; the final
    evaluation round evaluates the last one. A metric that stays within 0..1 (accuracy,
    Dice, IoU) is drawn on that scale; any other on its own.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    key = f"global_{primary}"
    series: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        x = record.round - 1  # round r (and the final evaluation) sees the model of r - 1
        for r in record.results:
            if key in r.metrics:
                series.setdefault(r.site, []).append((x, r.metrics[key]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    names = sorted(series)
    for site in names[:MAX_SITE_LINES]:
        xs, ys = zip(*series[site], strict=True)
        ax.plot(xs, ys, linewidth=1, alpha=0.8, label=site if len(names) <= 12 else None)
    lines = [(test, "test", "--"), (baseline, "centralised", ":")]
    drawn = [(v, label, style) for v, label, style in lines if v is not None and history]
    for value, label, style in drawn:
        ax.axhline(value, color="black", linestyle=style, linewidth=1, label=f"{label} {value:.3f}")
    ax.set_xlabel("global model after round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{primary} on the site's validation split")
    shown = "" if len(names) <= MAX_SITE_LINES else f" (first {MAX_SITE_LINES} of {len(names)})"
    ax.set_title(f"Global model {primary} per site{shown}")
    values = [v for s in series.values() for _, v in s] + [v for v, _, _ in drawn]
    if all(0 <= v <= 1 for v in values if math.isfinite(v)):
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if (0 < len(names) <= 12) or drawn:  # a legend with lines
        # away from where the curves end up: low for a loss, high for an accuracy
        ax.legend(fontsize=7, ncol=2, loc="upper right" if better == "lower" else "lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_contributions(
    scores: dict[str, dict[str, float]], path: Path, metric: str, ylabel: str | None = None
) -> None:
    """A bar per site and method (``scores``: method -> site -> score), the sites in
    the order of the first method's ``ranking`` (most valuable first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(scores)
    lead = scores["shapley"] if "shapley" in scores else scores[methods[0]]
    sites = sorted(lead, key=lambda s: (-lead[s], s))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(sites) + 2), 4.5), dpi=100)
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sites))]
        ax.bar(xs, [scores[method][s] for s in sites], width, label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sites)), sites, rotation=45, ha="right")
    ax.set_ylabel(ylabel or f"contribution to test {metric}")
    ax.set_title("Each site's contribution (most valuable first)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One small panel per metric (``curves``: name -> [(round, value)]), round on x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(curves)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=90, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = curves[name]
        ax.plot([r for r, _ in points], [v for _, v in points], marker="o", markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_matrix(values: list[list[float]], sites: list[str], path: Path, metric: str) -> None:
    """A heat map: row = whose model, column = the site that evaluated it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sites)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 3), max(4, 0.6 * n + 2)), dpi=100)
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(n), sites, rotation=45, ha="right")
    ax.set_yticks(range(n), sites)
    ax.set_xlabel("evaluated at")
    ax.set_ylabel("model of")
    if n <= 12:
        low, high = image.get_clim()
        for i in range(n):
            for j in range(n):
                light = (values[i][j] - low) > 0.6 * (high - low)  # viridis is light on top
                ax.text(
                    j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if light else "white",
                )  # fmt: skip
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title("Cross-site evaluation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
