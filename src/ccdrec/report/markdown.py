"""The Markdown report of a run with PNG plots (matplotlib, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ccdrec.errors import WrongArgumentType
from ccdrec.report import tables

NAMES = {
    "teacher": "teacher ensemble E_k",
    "served": "served student",
    "student": "distilled student D_k",
    "updated": "student update CL_k",
}
SERVED = {  # what the served student is, by student.serve
    "distilled": "The served student is D_k after each teacher cycle and the student cycle's CL_k between them "
    "(student.serve: distilled); CL_k is also reported apart as the student update where D_k is the one served.",
    "update": "The served student is the student cycle's CL_k (student.serve: update, the paper).",
}


def markdown_table(df: pd.DataFrame, spec: str = ".4f") -> str:
    """A table as Markdown, numbers formatted by ``spec`` (columns of seconds: tenths, :func:`tables.as_text`),
    missing values "—"."""
    if df.empty:
        return "_(none)_\n"
    if df.index.nlevels > 1:  # one column per level, not a tuple per row
        df = df.reset_index().set_index(df.index.names[0])
    # the numbers as formatted (tabulate would parse them again and drop trailing zeros: 0.0040 -> 0.004)
    align = ["left"] + ["right" if pd.api.types.is_numeric_dtype(df[c]) else "left" for c in df.columns]
    return tables.as_text(df, spec).to_markdown(disable_numparse=True, colalign=align) + "\n"


def integer_blocks(ax) -> None:
    """Block indices on the x axis as integer ticks (never 1.5, 2.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
        ks = sorted({r["k"] for r in tables.test_rows(rows, model)})
        axes[1].plot(ks, [s.la(k) for k in ks], marker="o", label=NAMES.get(model, model))
    axes[0].set(title=f"H_k ({metric})", xlabel="block k")
    axes[1].set(title=f"LA_k = r_(k,k) ({metric})", xlabel="block k")
    for ax in axes:
        ax.grid(alpha=0.3)
        integer_blocks(ax)
    if axes[1].get_legend_handles_labels()[0]:  # nothing to label before the first incremental block
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rd) -> Path:
    """Write ``report.md`` (and ``plots/*.png``) of a run directory, a ``ccdrec.pipeline.rundir.RunDir``,
    from its metrics and state; a path is a :class:`~ccdrec.errors.WrongArgumentType` saying so."""
    if isinstance(rd, str | os.PathLike):
        raise WrongArgumentType(f"write_report takes a RunDir, not a path: write_report(RunDir({str(rd)!r}))")
    rows = rd.read_metrics()
    state = rd.read_state()
    out = rd.path / "report.md"
    plots = rd.path / "plots"
    plots.mkdir(exist_ok=True)
    lines = [f"# CCD run: {rd.path.name}\n", f"Stages completed: {len(state['completed'])}\n"]
    lead, lead_ndcg = tables.lead_metrics(rows)
    lines.append("## Stream summary (LA / RA / H-mean over blocks k >= 1; — : no users to evaluate)\n")
    lines.append(markdown_table(tables.summary(rows, (lead, lead_ndcg))))
    if any(r.get("model") == "served" for r in rows) and rd.config_path.exists():
        cfg = rd.load_config()
        serve, teacher_every = cfg.student.serve, cfg.teacher.update_every
        lines.append(
            SERVED[serve]
            + (
                f" The teacher is updated every {teacher_every} blocks, so D_k and CL_k rows cover its cycles only."
                if teacher_every > 1 and serve == "distilled"
                else ""
            )
            + "\n"
        )
    if any(r.get("kind") == "test" for r in rows):
        plot_h(rows, plots / "h_per_block.png", lead)
        lines.append("![H_k and LA_k per block](plots/h_per_block.png)\n")
    for model in tables.models_in(rows):
        for metric in (lead, lead_ndcg):
            lines.append(f"## {NAMES.get(model, model)}: r_(k,j) test {metric}\n")
            lines.append(markdown_table(tables.rkj_table(rows, model, metric)))
        lines.append(f"Per block ({model}, {lead}):\n")
        lines.append(markdown_table(tables.per_block(rows, model, lead)))
    lines.append(f"## New users of block k (test {lead})\n")
    lines.append(markdown_table(tables.new_users(rows, lead)))
    lines.append(f"## Training (best epoch by validation {lead} of the block)\n")
    lines.append(markdown_table(tables.fit_table(rows, lead)))
    if note := tables.capped_note(rows):
        lines.append(f"Note: {note}\n")
    lines.append("## Time and peak memory per stage\n")
    secs = pd.Series(state.get("seconds", {}), name="seconds", dtype=float)
    peaks = pd.Series(state.get("peak_rss_mb", {}), name="peak RSS (MB)", dtype=float)
    table = pd.concat([secs, peaks.reindex(secs.index)], axis=1) if len(peaks) else secs.to_frame()  # older runs: no peaks
    lines.append(markdown_table(table, ".1f"))
    lines.append(f"Total: {secs.sum():.1f} s\n")
    out.write_text("\n".join(lines))
    return out
