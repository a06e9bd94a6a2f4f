"""``fedloom report RUN``: one self-contained HTML file of a run folder: the plan and
its hash, the summary, the metric curves, each site's final figures, contribution
scores, the privacy spent and every failure. Everything is read from the files the run
wrote (``summary.json``, ``metrics.jsonl``, ``plan.json``, its PNGs); images are
embedded as data URIs, and the page loads nothing from anywhere."""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedloom.core.errors import WorkspaceError

ROW_FIELDS = {
    "attempt", "claimed_samples", "close_reason", "kind", "num_samples", "round", "site",
    "status", "reason", "traceback", "dp_sgd_accountant", "epsilon", "delta", "clip",
    "accountant", "noise_multiplier",
}  # fmt: skip
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:1em;overflow:auto}img{max-width:100%}
.bad{color:#a00}.ok{color:#070}code{background:#f3f3f3;padding:0 3px}
"""


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The run folder's summary, metric rows and plan; a folder that is not a run's is
    refused with what it lacks."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise WorkspaceError(
            f"{run_dir} is not a run folder: it has no summary.json",
            hint="name a folder under runs/ that `fedloom simulate` or the aggregator wrote",
        )
    try:
        summary = json.loads(summary_file.read_text())
        metrics = run_dir / "metrics.jsonl"
        rows = (
            [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            if metrics.exists()
            else []
        )
        plan_file = run_dir / "plan.json"
        plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkspaceError(f"{run_dir}: a file of the run cannot be read: {err}") from err
    return summary, rows, plan


def round_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Each metric of the training rounds, the sample-weighted mean over the sites that
    answered, round by round (the last attempt of a round counts)."""
    last: dict[int, int] = {}
    ok = [r for r in rows if r.get("kind") == "train" and r.get("status") == "ok"]
    for r in ok:
        last[r["round"]] = max(last.get(r["round"], 0), r.get("attempt", 1))
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for r in ok:
        if r.get("attempt", 1) != last[r["round"]]:
            continue
        weight = float(r.get("num_samples") or 0)
        for name, value in r.items():
            if name in ROW_FIELDS or name.endswith("_samples") or weight <= 0:
                continue
            if not isinstance(value, int | float):
                continue
            if isinstance(value, bool) or not math.isfinite(value):
                continue
            cell = sums[name][r["round"]]
            cell[0] += weight * value
            cell[1] += weight
    return {
        name: [(rnd, s / w) for rnd, (s, w) in sorted(by_round.items()) if w > 0]
        for name, by_round in sorted(sums.items())
    }


def final_site_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[Mapping[str, Any]]]:
    """Each site's row of the final evaluation, or else of the last training round."""
    for kind in ("evaluate", "train"):
        mine = [r for r in rows if r.get("kind") == kind and r.get("status") == "ok"]
        if mine:
            last = max(r["round"] for r in mine)
            chosen = [r for r in mine if r["round"] == last]
            label = "final evaluation" if kind == "evaluate" else f"round {last}"
            return label, sorted(chosen, key=lambda r: r["site"])
    return "", []


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: Sequence[str], body: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = []
    for row in body:
        cells = "".join(
            f'<td class="n">{_e(_fmt(c))}</td>'
            if isinstance(c, int | float) and not isinstance(c, bool)
            else f"<td>{_e(c)}</td>"
            for c in row
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _curves_image(curves: dict[str, list[tuple[int, float]]]) -> str:
    from fedloom.plots import plot_curves

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.png"
        plot_curves(curves, path)
        return _image(path, "metric curves, round by round")


def render(run_dir: Path) -> str:
    """The report of ``run_dir`` as one HTML document."""
    summary, rows, plan = read_run(run_dir)
    name = summary.get("plan_name") or plan.get("name") or run_dir.name
    status = str(summary.get("status", "?"))
    parts = [
        f"<h1>{_e(name)}: run {_e(summary.get('run_name', run_dir.name))}</h1>",
        f'<p>status <b class="{"ok" if status == "completed" else "bad"}">{_e(status)}</b>'
        f" &middot; {_e(summary.get('rounds_finished', '?'))} of {_e(summary.get('rounds', '?'))}"
        f" rounds &middot; {_e(summary.get('sites', '?'))} sites &middot; strategy "
        f"<code>{_e(summary.get('strategy', '?'))}</code></p>",
        f"<p>plan hash <code>{_e(summary.get('plan_hash', '?'))}</code></p>",
    ]
    if summary.get("error"):
        parts.append(f'<p class="bad">error: {_e(summary["error"])}</p>')
    scalars = [
        (k, v)
        for k, v in summary.items()
        if (isinstance(v, int | float | str) or v is None)
        and k not in {"run_name", "status", "plan_name", "plan_hash", "error"}
    ]
    parts += ["<h2>Summary</h2>", _table(["figure", "value"], scalars)]
    curves = round_curves(rows)
    if curves:
        parts += ["<h2>Curves</h2>", "<p>Sample-weighted mean over the sites, by round.</p>"]
        parts.append(_curves_image(curves))
    for png in sorted(run_dir.glob("*.png")):
        if png.name not in ("contributions.png", "cross_site.png", "contribution_proxy.png"):
            parts.append(_image(png, png.stem))
    label, final = final_site_rows(rows)
    if final:
        names = sorted({k for r in final for k in r if k not in ROW_FIELDS})
        parts += [f"<h2>Sites ({_e(label)})</h2>"]
        parts.append(
            _table(
                ["site", "samples", *names],
                (
                    [r["site"], r.get("num_samples", ""), *(r.get(n, "") for n in names)]
                    for r in final
                ),
            )
        )
    parts += _cross_site(summary, run_dir)
    parts += _contributions(summary, run_dir)
    parts += _proxy(summary, run_dir)
    parts += _privacy(summary)
    parts += _failures(rows)
    parts += ["<h2>Plan</h2>", f"<pre>{_e(json.dumps(plan, indent=2))}</pre>"]
    title = f"{name}: {summary.get('run_name', run_dir.name)}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n<p><small>fedloom report: every figure is read from the run folder.</small></p>"
        "</body></html>\n"
    )


def _contributions(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    scores = summary.get("contributions")
    if not isinstance(scores, Mapping):
        return []
    methods = list(scores.get("methods", []))
    sites = scores.get("sites", {})
    body = [
        [rank, site, *(sites.get(site, {}).get(m, "") for m in methods)]
        for rank, site in enumerate(scores.get("ranking", []), start=1)
    ]
    out = [
        "<h2>Contributions</h2>",
        f"<p>Each site's contribution to {_e(scores.get('metric', '?'))} (whole federation "
        f"{_e(_fmt(scores.get('full')))}, initial model {_e(_fmt(scores.get('empty')))}; "
        f"{_e(scores.get('runs', '?'))} coalitions trained).</p>",
        _table(["rank", "site", *methods], body),
    ]
    chart = run_dir / "contributions.png"
    if chart.exists():
        out.append(_image(chart, "contributions"))
    return out


def _proxy(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    proxy = summary.get("contribution_proxy")
    if not isinstance(proxy, Mapping):
        return []
    sites = proxy.get("sites", {})
    body = [
        [rank, site, _fmt(sites[site]["mean_cosine"]), sites[site]["rounds"]]
        for rank, site in enumerate(proxy.get("ranking", []), start=1)
        if isinstance(sites.get(site), Mapping)
    ]
    out = [
        "<h2>Contribution proxy</h2>",
        "<p>Each site's update against the federation's last step, by the aggregator "
        "(mean cosine over the rounds; evaluation.contributions).</p>",
        _table(["rank", "site", "mean cosine", "rounds"], body),
    ]
    chart = run_dir / "contribution_proxy.png"
    if chart.exists():
        out.append(_image(chart, "contribution proxy"))
    return out


def _cross_site(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    found = summary.get("cross_site")
    if not isinstance(found, Mapping):
        return []
    sites = list(found.get("sites", []))
    body = [[s, *row] for s, row in zip(sites, found.get("values", []), strict=False)]
    out = [
        "<h2>Cross-site evaluation</h2>",
        f"<p>Each site's local model (row) at every site (column), "
        f"{_e(found.get('metric', '?'))}: diagonal mean {_e(_fmt(found.get('diagonal_mean')))}, "
        f"off-diagonal mean {_e(_fmt(found.get('off_diagonal_mean')))}.</p>",
        _table(["model of", *sites], body),
    ]
    chart = run_dir / "cross_site.png"
    if chart.exists():
        out.append(_image(chart, "cross-site evaluation"))
    return out


def _privacy(summary: Mapping[str, Any]) -> list[str]:
    if summary.get("epsilon") is None and "dp_sgd_accountant" not in summary:
        return ["<h2>Privacy</h2>", "<p>No differential privacy in this run.</p>"]
    lines = [
        (k, summary[k])
        for k in ("epsilon", "delta", "accountant", "dp_sgd_accountant", "stopped_early")
        if k in summary
    ]
    by_round = summary.get("epsilon_by_round") or {}
    out = ["<h2>Privacy</h2>", _table(["figure", "value"], lines)]
    if by_round:
        out.append(_table(["round", "epsilon spent"], list(by_round.items())))
    return out


def _failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return ["<h2>Failures</h2>", "<p>None: every site answered every round.</p>"]
    body = [
        [r.get("round"), r.get("attempt"), r.get("site"), r.get("status"), r.get("reason", "")]
        for r in failed
    ]
    return ["<h2>Failures</h2>", _table(["round", "attempt", "site", "status", "reason"], body)]
