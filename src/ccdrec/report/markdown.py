"""The Markdown report of a run with PNG plots (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ccdrec.report import tables

NAMES = {"teacher": "teacher ensemble E_k", "served": "served student CL_k", "student": "distilled student D_k"}


def _md(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    if df.empty:
        return "_(none)_\n"
    return df.to_markdown(floatfmt=floatfmt) + "\n"


def plot_h(rows: list[dict], path: Path, metric: str = "recall@20") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for model in tables.models_in(rows):
        pb = tables.per_block(rows, model, metric)
        if pb.empty:
            continue
        axes[0].plot(pb.index, pb["H"], marker="o", label=NAMES.get(model, model))
        s = tables.stream_scores(rows, model, metric)
        ks = s.blocks
        axes[1].plot(ks, [s.la(k) for k in ks], marker="o", label=NAMES.get(model, model))
    axes[0].set(title=f"H_k ({metric})", xlabel="block k")
    axes[1].set(title=f"LA_k = r_(k,k) ({metric})", xlabel="block k")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rd) -> Path:
    """Write ``report.md`` (and ``plots/*.png``) of a run directory from its metrics and state."""
    rows = rd.read_metrics()
    state = rd.read_state()
    out = rd.path / "report.md"
    plots = rd.path / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# CCD run: {rd.path.name}\n", f"Stages completed: {len(state['completed'])}\n"]
    lines.append("## Stream summary (LA / RA / H-mean over blocks k >= 1)\n")
    lines.append(_md(tables.summary(rows)))
    if any(r.get("kind") == "test" for r in rows):
        plot_h(rows, plots / "h_per_block.png")
        lines.append("![H_k and LA_k per block](plots/h_per_block.png)\n")
    for model in tables.models_in(rows):
        for metric in ("recall@20", "ndcg@20"):
            lines.append(f"## {NAMES.get(model, model)}: r_(k,j) test {metric}\n")
            lines.append(_md(tables.rkj_table(rows, model, metric)))
        lines.append(f"Per block ({model}, recall@20):\n")
        lines.append(_md(tables.per_block(rows, model)))
    lines.append("## New users of block k (test recall@20)\n")
    lines.append(_md(tables.new_users(rows)))
    lines.append("## Training (best epoch by validation recall@20 of the block)\n")
    lines.append(_md(tables.fit_table(rows), ".3f"))
    lines.append("## Time and peak memory per stage\n")
    secs = pd.Series(state.get("seconds", {}), name="seconds", dtype=float)
    peaks = pd.Series(state.get("peak_rss_mb", {}), name="peak RSS (MB)", dtype=float)
    table = pd.concat([secs, peaks.reindex(secs.index)], axis=1) if len(peaks) else secs.to_frame()  # older runs: no peaks
    lines.append(_md(table, ".1f"))
    lines.append(f"Total: {secs.sum():.1f} s\n")
    out.write_text("\n".join(lines))
    return out
