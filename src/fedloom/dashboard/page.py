"""The dashboard's page: one self-contained HTML document, its style and script inline.

It loads nothing from anywhere but its own server: every second its script asks
``api/state`` (sending the token it was opened with, if any) and draws what it gets.
Every text a site sent (its name, a failure's reason, a metric's name) is set as text,
never as markup, so a site cannot make the page run anything.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fedloom dashboard</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px;display:flex;gap:24px;
 align-items:baseline;flex-wrap:wrap}
header h1{font-size:1.2em;margin:0}header .sub{color:#aab;font-size:.9em}
main{padding:16px 24px;max-width:1200px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px #0002;
 min-width:150px}
.card .label{color:#667;font-size:.8em;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:1.6em;font-weight:600;margin-top:4px}
section{background:#fff;border-radius:8px;padding:12px 16px;margin-top:14px;
 box-shadow:0 1px 3px #0002}
h2{font-size:1em;margin:0 0 8px}
table{border-collapse:collapse;width:100%}td,th{padding:4px 8px;text-align:left;
 border-bottom:1px solid #eee;font-size:.92em}th{color:#667;font-weight:500}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:.85em;color:#fff}
.answered{background:#2e8540}.pending{background:#c98a00}.uploading{background:#2867c9}
.failed{background:#c0392b}.withdrawn{background:#7b4fa0}.idle{background:#9aa0aa}
#error{display:none;background:#fff3cd;border:1px solid #e0c060;border-radius:8px;
 padding:10px 16px;margin-top:14px}
.curves{display:flex;gap:16px;flex-wrap:wrap}svg{background:#fafbfc;border-radius:6px}
.muted{color:#667}.reason{color:#a12}
</style></head>
<body>
<header><h1>fedloom</h1><span id="run">-</span><span id="run-status" class="sub"></span>
<span class="sub">read-only</span><span id="updated" class="sub"></span></header>
<main>
<div id="error"><b id="error-text"></b><div id="error-hint" class="muted"></div></div>
<div class="cards">
 <div class="card"><div class="label">round</div><div class="value" id="round">-</div></div>
 <div class="card"><div class="label">now</div><div class="value" id="now">-</div></div>
 <div class="card"><div class="label">epsilon spent</div>
  <div class="value" id="epsilon">-</div></div>
 <div class="card"><div class="label">bytes sent / received</div>
  <div class="value" id="bytes">-</div></div>
</div>
<section><h2>The round under way</h2><div id="current" class="muted">-</div></section>
<section><h2>Sites</h2><table><thead><tr><th>site</th><th>status</th>
<th>last contact</th><th>last answered</th><th>failures</th><th>latest failure</th>
</tr></thead><tbody id="sites"></tbody></table></section>
<section><h2>Metrics, the sample-weighted mean of each round</h2>
<div id="curves" class="curves"></div></section>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const headers = token ? {Authorization: "Bearer " + token} : {};
const SVG = "http://www.w3.org/2000/svg";
function $(id) { return document.getElementById(id); }
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function ago(s) { return s === null || s === undefined ? "-" : s.toFixed(1) + " s ago"; }
function showError(text, hint) {
  $("error").style.display = "block"; $("error-text").textContent = text;
  $("error-hint").textContent = hint || "";
}
function render(d) {
  $("updated").textContent = "updated " + new Date(d.updated * 1000).toLocaleTimeString();
  if (!d.ok) { showError(d.error, d.hint); return; }
  $("error").style.display = "none";
  $("run").textContent = "run " + d.run.name;
  $("run-status").textContent = d.run.status + (d.aggregator.running ? "" : " (no aggregator)")
    + (d.run.error ? ": " + d.run.error : "");
  const r = d.rounds, planned = r.planned === null ? "?" : r.planned;
  const round = d.now && d.now.round !== null ? Math.min(d.now.round, r.planned || d.now.round)
    : r.finished;
  $("round").textContent = "round " + round + " of " + planned;
  $("round").dataset.finished = r.finished;
  $("bytes").textContent = bytes(r.bytes_sent) + " / " + bytes(r.bytes_received);
  $("epsilon").textContent = d.privacy ? Number(d.privacy.epsilon).toPrecision(3)
    + (d.privacy.epsilon_budget ? " of " + d.privacy.epsilon_budget : "") : "no DP";
  renderNow(d.now, r);
  renderSites(d.sites);
  renderCurves(d.curves);
}
function renderNow(now, r) {
  const box = $("current"); box.replaceChildren();
  if (!now) { $("now").textContent = "-";
    box.textContent = r.finished + " rounds finished; no aggregator serves the run now"; return; }
  if (now.round === null) {
    $("now").textContent = now.finished ? "finishing" : "between rounds";
    box.textContent = now.finished ? "the federation is over: telling the sites"
      : "between rounds"; return;
  }
  $("now").textContent = now.kind === "evaluate" ? "final evaluation" : "training";
  box.append(el("div", "round " + now.round + " (" + now.kind + ", attempt " + now.attempt
    + "): " + now.answered.length + " of " + now.selected.length + " answered"
    + (now.seconds_left === null ? "" : ", " + now.seconds_left.toFixed(0)
    + " s to its deadline")));
  if (now.pending.length) box.append(el("div", "pending: " + now.pending.join(", ")));
  for (const [site, got] of Object.entries(now.uploading))
    box.append(el("div", "uploading: " + site + " (" + bytes(got) + ")"));
  for (const [site, reason] of Object.entries(now.failed)) {
    const line = el("div", "failed: " + site + ": "); line.append(el("span", reason, "reason"));
    box.append(line);
  }
}
function renderSites(sites) {
  const body = $("sites"); body.replaceChildren();
  for (const s of sites) {
    const tr = el("tr"); tr.dataset.site = s.site; tr.dataset.status = s.status;
    tr.append(el("td", s.site));
    const st = el("td"); st.append(el("span", s.status, "badge " + s.status)); tr.append(st);
    tr.append(el("td", ago(s.seen_seconds_ago)));
    const last = s.last_answered;
    tr.append(el("td", last === null ? "-" : last.kind === "evaluate" ? "final evaluation"
      : "round " + last.round));
    tr.append(el("td", s.failures, "n"));
    tr.append(el("td", s.withdrawn ? "withdrew: " + s.withdrawn : s.last_failure || "-",
      s.withdrawn || s.last_failure ? "reason" : ""));
    body.append(tr);
  }
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
function renderCurves(curves) {
  const box = $("curves"); box.replaceChildren();
  const names = Object.keys(curves);
  if (!names.length) { box.append(el("span", "no round has finished yet", "muted")); return; }
  const W = 340, H = 180, L = 48, R = 12, T = 24, B = 26;
  for (const name of names) {
    const pts = curves[name]; const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
    let lo = Math.min(...ys), hi = Math.max(...ys); if (hi === lo) { hi += 0.5; lo -= 0.5; }
    const x0 = Math.min(...xs), x1 = Math.max(x0 + 1, Math.max(...xs));
    const X = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const Y = y => H - B - (y - lo) / (hi - lo) * (H - T - B);
    const g = svg("svg", {width: W, height: H, "data-metric": name});
    const title = svg("text", {x: L, y: 16, "font-size": 13, "font-weight": 600});
    title.textContent = name + "  " + ys[ys.length - 1].toPrecision(4); g.append(title);
    g.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#bbb"}));
    g.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#bbb"}));
    for (const [v, y] of [[hi, T], [lo, H - B]]) {
      const t = svg("text", {x: L - 4, y: y + 4, "font-size": 10, "text-anchor": "end",
        fill: "#667"}); t.textContent = v.toPrecision(3); g.append(t);
    }
    for (const [v, x, anchor] of [[x0, L, "start"], [x1, W - R, "end"]]) {
      const t = svg("text", {x: x, y: H - 8, "font-size": 10, "text-anchor": anchor,
        fill: "#667"}); t.textContent = "round " + v; g.append(t);
    }
    g.append(svg("polyline", {points: pts.map(p => X(p[0]) + "," + Y(p[1])).join(" "),
      fill: "none", stroke: "#2867c9", "stroke-width": 2}));
    for (const p of pts) g.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2.5,
      fill: "#2867c9"}));
    box.append(g);
  }
}
async function poll() {
  try {
    const resp = await fetch("api/state", {headers: headers, cache: "no-store"});
    if (resp.status === 401) showError("this dashboard needs its token",
      "open the address with ?token=TOKEN, the token it was started with");
    else render(await resp.json());
  } catch (err) {
    showError("the dashboard's server does not answer", String(err));
  }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""
