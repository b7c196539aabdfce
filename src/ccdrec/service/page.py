"""The HTML page at ``/``: a run's summary, a per-block plot, the serving model and a recommendation form.

* the stream summary: LA / RA / H-mean of every evaluated model (teacher ensemble, distilled student
  D_k, served student, the student cycle's CL_k where it is not the one served) at the run's lead
  Recall@K / NDCG@K, from ``metrics.jsonl``
  (:func:`ccdrec.report.tables.summary`);
* the per-block plot: H_k of the lead Recall@K for every incremental block k >= 1 (before the first
  incremental block: LA_0 = r_(0,0)), as inline SVG (no image files, nothing read from a client's path);
* the serving model (``GET /model``, refreshed every 2 s, so a hot swap shows);
* a form that asks ``GET /recommend/{user}?k=`` (the ID as typed, untrimmed, ``encodeURIComponent``-ed;
  ``.`` and ``..``, which a browser drops from a path, by ``POST /recommend``) and shows the answer as a table (the version that
  answered, or the error the service gave).

Everything from the run is HTML-escaped; what a client types is only ever set as text by the script.
The summary and plot are rebuilt only when ``metrics.jsonl`` changes.
"""

from __future__ import annotations

import html
import os

from ccdrec.pipeline.rundir import RunDir
from ccdrec.report import tables
from ccdrec.report.markdown import NAMES

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def summary_html(rows: list[dict]) -> str:
    """The stream summary table as HTML (``id="summary-table"``)."""
    if not any(r.get("kind") == "test" for r in rows):
        return '<p id="summary-empty">No evaluation yet.</p>'
    df = tables.as_text(tables.summary(rows, tables.lead_metrics(rows)))
    df.index = [NAMES.get(m, m) for m in df.index]
    return df.to_html(table_id="summary-table", escape=True, border=0, index_names=False)


def plot_series(rows: list[dict]) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(title, {model: [(block, value), ...]}): H_k per incremental block, else LA_k of block 0."""
    metric = tables.lead_metrics(rows)[0]
    out: dict[str, list[tuple[int, float]]] = {}
    for model in tables.models_in(rows):
        pb = tables.per_block(rows, model, metric)
        pts = [(int(k), float(h)) for k, h in zip(pb.index, pb["H"], strict=True) if h == h]
        if pts:
            out[model] = pts
    if out:
        return f"H_k ({metric}) per block", out
    for model in tables.models_in(rows):
        s = tables.stream_scores(rows, model, metric)
        v = s.la(0)
        if v is not None and v == v:
            out[model] = [(0, float(v))]
    return f"LA_0 = r(0,0) ({metric})", out


def plot_svg(title: str, series: dict[str, list[tuple[int, float]]], width: int = 560, height: int = 260) -> str:
    """A line plot of ``series`` as inline SVG (``id="block-plot"``; one ``polyline.series`` per model)."""
    if not series:
        return '<p id="plot-empty">No block evaluated yet.</p>'
    left, right, top, bottom = 56, 170, 28, 36
    xs = sorted({k for pts in series.values() for k, _ in pts})
    ymax = max(v for pts in series.values() for _, v in pts) * 1.15 or 1.0
    x0, x1 = xs[0], xs[-1]

    def px(k: float) -> float:
        return left + (width - left - right) * (0.5 if x1 == x0 else (k - x0) / (x1 - x0))

    def py(v: float) -> float:
        return top + (height - top - bottom) * (1 - v / ymax)

    parts = [
        f'<svg id="block-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="16" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
    ]
    for k in xs:
        parts.append(f'<text x="{px(k):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{k}</text>')
    parts.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">block k</text>'
    )
    for i in range(5):
        v = ymax * i / 4
        parts.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.3f}</text>')
        parts.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{width - right}" y2="{py(v):.1f}" stroke="#ddd"/>')
    for n, (model, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        name = html.escape(NAMES.get(model, model))
        coords = " ".join(f"{px(k):.1f},{py(v):.1f}" for k, v in pts)
        parts.append(
            f'<polyline class="series" data-model="{html.escape(model)}" points="{coords}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        for k, v in pts:
            parts.append(
                f'<circle cx="{px(k):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}">'
                f"<title>{name}, block {k}: {v:.4f}</title></circle>"
            )
        ly = top + 16 * n + 8
        parts.append(
            f'<line x1="{width - right + 12}" y1="{ly}" x2="{width - right + 32}" y2="{ly}" stroke="{colour}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{width - right + 36}" y="{ly + 4}" font-size="11">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 62rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 0.2rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { color: #666; } dd { margin: 0; font-family: ui-monospace, monospace; }
form { display: flex; gap: 1rem; align-items: end; } label { display: flex; flex-direction: column; font-size: 0.9rem; }
#error { color: #b00020; }
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
function showModel(m) {
  for (const key of ["id", "role", "block", "stage", "loaded_at", "swaps"]) {
    const el = $("model-" + key);
    if (el) el.textContent = m[key] === null || m[key] === undefined ? "—" : String(m[key]);
  }
}
async function refreshModel() {
  try { const r = await fetch("/model"); if (r.ok) showModel(await r.json()); } catch (e) { /* keep the last */ }
}
setInterval(refreshModel, 2000);
function detail(body) {
  if (!body || body.detail === undefined) return "error";
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((d) => (d.loc || []).slice(-1)[0] + ": " + d.msg).join("; ");
}
$("recommend-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("user").value, k = $("k").value;  // exactly as typed: IDs may have spaces at either end
  const tbody = $("results").querySelector("tbody");
  tbody.replaceChildren(); $("error").hidden = true; $("answered-by").textContent = "";
  let r, body;
  try {
    if (user === "." || user === "..") {
      // a browser drops a "." or ".." path segment, %2E-encoded too: ask the batch endpoint for this one
      const ask = { users: [user] };
      if (k !== "") ask.k = Number(k);
      const headers = { "content-type": "application/json" };
      r = await fetch("/recommend", { method: "POST", headers: headers, body: JSON.stringify(ask) });
      body = await r.json();
      if (r.ok) body = { user: user, k: body.k, model: body.model, items: body.results[0].items };
    } else {
      r = await fetch("/recommend/" + encodeURIComponent(user) + "?k=" + encodeURIComponent(k));
      body = await r.json();
    }
  } catch (e) { $("error").textContent = "no answer: " + e; $("error").hidden = false; return; }
  if (!r.ok) { $("error").textContent = r.status + ": " + detail(body); $("error").hidden = false; return; }
  body.items.forEach((rec, i) => {
    const tr = document.createElement("tr");
    for (const v of [String(i + 1), rec.item, rec.score.toFixed(4)]) {
      const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
    }
    tbody.appendChild(tr);
  });
  $("answered-by").textContent = "user " + body.user + ", top " + body.k + ", answered by " + body.model;
  $("results").hidden = false;
});
"""


class Page:
    """Renders ``/`` for one run; the summary and plot are cached until ``metrics.jsonl`` changes."""

    def __init__(self, rd: RunDir, max_k: int):
        self.rd = rd
        self.max_k = max_k
        self._key: tuple | None = None
        self._body = ""

    def _summary(self) -> str:
        try:
            st = os.stat(self.rd.metrics_path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = None
        if key != self._key or not self._body:
            try:
                rows = self.rd.read_metrics()
            except Exception as e:  # a torn metrics file must not break the page
                rows, note = [], f"<p>metrics unreadable: {html.escape(str(e))}</p>"
            else:
                note = ""
            title, series = plot_series(rows)
            self._body = (
                f'<section id="summary"><h2>Stream summary</h2>{note}{summary_html(rows)}</section>'
                f'<section id="plot"><h2>Per block</h2>{plot_svg(title, series)}</section>'
            )
            self._key = key
        return self._body

    def render(self, model: dict) -> str:
        """The page, with ``model`` (``GET /model``'s answer) in the model box."""
        e = lambda v: html.escape("—" if v is None else str(v))  # noqa: E731
        rows = "".join(
            f'<dt>{label}</dt><dd id="model-{key}">{e(model.get(key))}</dd>'
            for key, label in (
                ("id", "model"),
                ("role", "role"),
                ("block", "block"),
                ("stage", "stage"),
                ("loaded_at", "loaded at"),
                ("swaps", "swaps"),
            )
        )
        run = e(model.get("run"))
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ccdrec serve: {run}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>ccdrec serve: <span id="run">{run}</span></h1>
<section id="model"><h2>Serving model</h2><dl>{rows}</dl></section>
{self._summary()}
<section id="recommend"><h2>Recommendations</h2>
<form id="recommend-form">
<label>user ID <input id="user" name="user" required autocomplete="off"></label>
<label>k <input id="k" name="k" type="number" min="1" max="{self.max_k}" value="20"></label>
<button id="submit" type="submit">Recommend</button>
</form>
<p id="error" role="alert" hidden></p>
<p id="answered-by"></p>
<table id="results" hidden><thead><tr><th>#</th><th>item</th><th>score</th></tr></thead><tbody></tbody></table>
</section>
<script>{SCRIPT}</script>
</body></html>
"""
