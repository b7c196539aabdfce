"""The comparison report of ``ccdrec compare`` (method.md 8): pure tables over metric rows, Markdown, plots.

Every run of a comparison writes its own ``metrics.jsonl``. :func:`label_rows` renames each run's
reported models to ``"<method>:<role>"`` with role ``student`` (the served student: CCD's D_k after a
teacher cycle, else CL_k, ``student.serve``; a competitor's student-size model) or ``teacher`` (the
ensemble E_k); CCD's distilled D_k is role ``distilled`` and its student cycle's CL_k, where it is not the
one served, role ``updated``. All numbers of the report come from those rows through the functions below:

* :func:`comparison_table`  stream LA / RA / H-mean per method and role (method.md 8);
* :func:`bold_best`         the table as text with the best value of every column in bold;
* :func:`rival`             the one CL competitor CCD is compared with: the best stream H-mean on validation;
* :func:`block_gains`       per block k, CCD's H_k minus that competitor's H_k;
* :func:`stream_gain`       the same on the stream H-mean;
* :func:`new_user_table`    block k's new users per method;
* :func:`time_table`        seconds per method from ``state.json`` (block 0, blocks 1..K, evaluation).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ccdrec.eval.protocol import StreamScores
from ccdrec.option_values import shell_word
from ccdrec.report import tables
from ccdrec.report.markdown import integer_blocks, markdown_table

ROLES = ("student", "teacher")
CCD_ROLES = {"served": "student", "teacher": "teacher", "student": "distilled", "updated": "updated"}
REFERENCE = ("retrain",)
ROLE_NAMES = {
    "student": "served student",
    "teacher": "teacher ensemble",
    "distilled": "distilled student D_k",
    "updated": "student update CL_k",
}
SERVED_TEXT = (
    "Student = the served student (CCD: D_k once a teacher cycle has distilled it, CL_k between teacher cycles "
    "or with student.serve=update; competitors: the student-size model updated by the CL method); with the teacher "
    "updated every m > 1 blocks, the D_k and CL_k rows cover its cycles only"
)


def cl_roles(method: str) -> dict[str, str]:
    """Model name -> role for a competitor run of ``method``."""
    return {f"{method}:student": "student", f"{method}:teacher": "teacher"}


def label_rows(rows: list[dict], method: str, roles: dict[str, str]) -> list[dict]:
    """The rows of one run whose model has a role, renamed ``"<method>:<role>"`` and tagged with both."""
    out = []
    for r in rows:
        role = roles.get(r.get("model"))
        if role is not None:
            out.append({**r, "model": f"{method}:{role}", "method": method, "role": role})
    return out


def _scores(rows: list[dict], method: str, role: str, metric: str) -> StreamScores:
    return tables.stream_scores(rows, f"{method}:{role}", metric)


def stream_summary(rows: list[dict], method: str, role: str, metric: str, split: str = "test") -> dict[str, float]:
    """Stream LA / RA / H-mean of ``method``'s ``role`` on the test (or validation) splits; NaN without rows."""
    s = tables.stream_scores(rows, f"{method}:{role}", metric, split)
    return s.summary() if s.r else {"LA": math.nan, "RA": math.nan, "H": math.nan}


def comparison_table(rows: list[dict], methods: list[str], metric: str = "recall@20", roles=ROLES) -> pd.DataFrame:
    """Stream LA / RA / H-mean (blocks k >= 1) of every method, one column triple per role."""
    data = []
    for m in methods:
        row = {}
        for role in roles:
            summ = stream_summary(rows, m, role, metric)
            row.update({f"{role} {name}": v for name, v in summ.items()})
        data.append(row)
    return pd.DataFrame(data, index=pd.Index(methods, name="method"))


def bold_best(df: pd.DataFrame, exclude=(), fmt: str = "{:.4f}") -> pd.DataFrame:
    """``df`` as text, the highest value of each column in **bold** (ties at display precision all bold).

    Rows in ``exclude`` (a reference such as full retraining) are shown but never compete; NaN is "—".
    """
    out = pd.DataFrame(index=df.index, columns=df.columns, dtype=object)
    for col in df.columns:
        cand = df.loc[[i for i in df.index if i not in exclude], col].dropna()
        best = fmt.format(cand.max()) if len(cand) else None
        for i in df.index:
            v = df.at[i, col]
            if pd.isna(v):
                out.at[i, col] = tables.MISSING
                continue
            text = fmt.format(v)
            out.at[i, col] = f"**{text}**" if text == best and i not in exclude else text
    return out


def rival(rows: list[dict], competitors: list[str], role: str = "student", metric: str = "recall@20") -> tuple[str | None, str]:
    """The one CL competitor CCD is compared with over the whole stream: the highest stream H-mean of
    ``role`` on the validation splits (on the test splits for runs written before validation rows were
    recorded); returns (its name or None, the split it was chosen on)."""
    for split in ("valid", "test"):
        h = {c: stream_summary(rows, c, role, metric, split)["H"] for c in competitors}
        h = {c: v for c, v in h.items() if not math.isnan(v)}
        if h:
            return max(h, key=h.get), split
    return None, "valid"


def block_gains(
    rows: list[dict], competitors: list[str], ccd: str = "ccd", role: str = "student", metric: str = "recall@20"
) -> pd.DataFrame:
    """Per block k >= 1: CCD's H_k, the H_k of the one competitor :func:`rival` picks for the stream (its
    name in column ``competitor``) and the gain CCD − competitor."""
    s = _scores(rows, ccd, role, metric)
    best, _ = rival(rows, competitors, role, metric)
    comp = _scores(rows, best, role, metric) if best else None
    out = []
    for k in (k for k in s.blocks if k >= 1):
        h = comp.h(k) if comp is not None and (k, k) in comp.r else math.nan
        out.append({f"{ccd} H_k": s.h(k), "competitor": best or "–", "competitor H_k": h, "gain": s.h(k) - h})
    columns = [f"{ccd} H_k", "competitor", "competitor H_k", "gain"]  # also when there is no block k >= 1 yet
    return pd.DataFrame(out, columns=columns, index=pd.Index([k for k in s.blocks if k >= 1], name="k"))


def stream_gain(
    rows: list[dict], competitors: list[str], ccd: str = "ccd", role: str = "student", metric: str = "recall@20"
) -> dict:
    """CCD's stream H-mean, that of the competitor :func:`rival` picks (and its name), and the gain."""
    table = comparison_table(rows, [ccd, *competitors], metric, roles=(role,))[f"{role} H"]
    best, _ = rival(rows, competitors, role, metric)
    return {
        "ccd": float(table[ccd]),
        "competitor": best,
        "competitor H": float(table[best]) if best else math.nan,
        "gain": float(table[ccd] - table[best]) if best else math.nan,
    }


def new_user_table(rows: list[dict], methods: list[str], role: str = "student", metric: str = "recall@20") -> pd.DataFrame:
    """Block k's new users (test split of block k): one row per method, one column per block k."""
    data = {}
    for m in methods:
        sel = [r for r in rows if r.get("kind") == "new_users" and r.get("model") == f"{m}:{role}"]
        data[m] = {f"D_{r['k']}": r.get(metric) for r in sorted(sel, key=lambda r: r["k"])}
    df = pd.DataFrame.from_dict(data, orient="index")
    df.index.name = "method"
    return df


def time_table(states: dict[str, dict]) -> pd.DataFrame:
    """Seconds per run from ``state.json``: block 0, blocks 1..K (training), evaluation, total.

    Stages shared from another run (``state["shared"]``) count 0 here; the ``shared`` column names them.
    """
    out = []
    for state in states.values():
        secs = state.get("seconds", {})
        shared = state.get("shared", {})
        row = {"block 0 (s)": 0.0, "blocks 1..K (s)": 0.0, "evaluation (s)": 0.0}
        for name, v in secs.items():
            if name in shared:
                continue
            if name.endswith("/eval"):
                row["evaluation (s)"] += v
            elif name.startswith("b0/"):
                row["block 0 (s)"] += v
            else:
                row["blocks 1..K (s)"] += v
        row["total (s)"] = row["block 0 (s)"] + row["blocks 1..K (s)"] + row["evaluation (s)"]
        row["shared block 0"] = "yes" if any(n.startswith("b0/") for n in shared) else ""
        out.append(row)
    return pd.DataFrame(out, index=pd.Index(list(states), name="method"))


# --------------------------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def block_bars(series: dict[str, pd.Series], path: Path, title: str, ylabel: str, zero_line: bool = False) -> None:
    """Grouped bars per block k: one bar per named series (values indexed by block; missing as 0)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ks = sorted({k for v in series.values() for k in v.index})
    width = 0.8 / max(len(series), 1)
    for n, (name, values) in enumerate(series.items()):
        xs = [ks.index(k) + (n - (len(series) - 1) / 2) * width for k in values.index]
        ax.bar(xs, values.fillna(0.0), width=width, label=name)
    if zero_line:
        ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ks)), [f"D_{k}" for k in ks])  # one labelled tick per block
    ax.set(title=title, xlabel="block", ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gains(gains: dict[str, pd.DataFrame], path: Path, metric: str = "recall@20") -> None:
    """Grouped bars: per block k, CCD's H_k gain over the competitor :func:`rival` picks, one bar per role."""
    series = {ROLE_NAMES.get(role, role): g["gain"] for role, g in gains.items()}
    block_bars(series, path, f"CCD's H_k gain over the best CL competitor ({metric})", "gain", zero_line=True)


def plot_h(rows: list[dict], methods: list[str], path: Path, metric: str = "recall@20") -> None:
    """H_k per block of every method, one panel per role."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ROLES), figsize=(10, 3.5))
    for ax, role in zip(axes, ROLES, strict=True):
        for m in methods:
            s = _scores(rows, m, role, metric)
            ks = sorted({r["k"] for r in tables.test_rows(rows, f"{m}:{role}") if r["k"] >= 1})
            if ks:
                ax.plot(ks, [s.h(k) for k in ks], marker="o", label=m)
        ax.set(title=f"{ROLE_NAMES[role]}: H_k ({metric})", xlabel="block k")
        ax.grid(alpha=0.3)
        integer_blocks(ax)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- report


def comparison_rows(runs: dict) -> list[dict]:
    """All labelled rows of a comparison: ``runs`` maps a label to (RunDir, ``"ccd"`` or ``"cl"``)."""
    rows: list[dict] = []
    for label, (rd, kind) in runs.items():
        if not rd.metrics_path.exists():
            continue
        roles = CCD_ROLES if kind == "ccd" else cl_roles(label)
        rows += label_rows(rd.read_metrics(), label, roles)
    return rows


def stopped_notes(parts: dict[str, list[dict]], out: Path) -> list[str]:
    """The report's lines on where its runs (``parts``: a name -> its rows) stop: none evaluated past
    block 0 yet, or runs that end at different blocks (:func:`tables.coverage_note`); [] when neither."""
    resume = f"ccdrec compare --resume {shell_word(out)}"
    if all(tables.last_block(rows) in (None, 0) for rows in parts.values()):
        return [
            "**Note:** no run has evaluated an incremental block yet (LA / RA / H-mean start at block 1, so the "
            f"tables below are empty); {resume} --max-blocks K takes the runs on to block K.\n"
        ]
    note = tables.coverage_note(parts, resume)
    return [] if note is None else [f"**Note:** {note}.\n"]


def write_compare_report(
    out: Path, runs: dict, serving: str | None = None, notes: dict[str, str] | None = None, start: str | None = None
) -> Path:
    """Write ``OUT/report.md`` and ``OUT/plots/*.png`` of a comparison (see :mod:`ccdrec.pipeline.compare`).

    ``serving``: the Markdown of CCD's serving cost (:func:`ccdrec.serve_bench.bench_markdown`);
    ``notes``: what each ablation or other CCD-family method changes, by report label
    (``ccd/no-replay``, ``kd-only``); ``start``: the sentence saying where the methods start, when they do
    not all start from the same block-0 models."""
    notes = notes or {}
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    labels = list(runs)
    ablations = [m for m in labels if m.startswith("ccd/")]
    methods = [m for m in labels if m not in ablations]
    competitors = [m for m, (_, kind) in runs.items() if kind == "cl" and m not in REFERENCE]
    lines = [f"# Comparison: {out.name}\n"]
    lines.append(
        (start or "Every method starts from the same block-0 models (teacher members and D_0, trained once). ")
        + SERVED_TEXT
        + "; teacher = the rank ensemble of the members. LA / RA / H-mean over blocks k >= 1 (method.md 8). Best in bold"
        + (
            f"; {', '.join(r for r in REFERENCE if r in runs)} is a costly reference and does not compete"
            if set(REFERENCE) & set(runs)
            else ""
        )
        + ".\n"
    )
    lines.append("Runs: " + ", ".join(f"[{m}]({rd.path.name}/report.md)" for m, (rd, _) in runs.items()) + "\n")
    lines += stopped_notes({m: [r for r in rows if r.get("method") == m] for m in labels}, out)
    lead, lead_ndcg = tables.lead_metrics(rows)
    for metric in (lead, lead_ndcg):
        lines.append(f"## LA / RA / H-mean ({metric})\n")
        lines.append(markdown_table(bold_best(comparison_table(rows, methods, metric), exclude=REFERENCE)))
    lines += [f"- `{m}`: {notes[m]}" for m in methods if m in notes]
    if any(m in notes for m in methods):
        lines.append("")
    if ablations:
        for metric in (lead, lead_ndcg):
            lines.append(f"## Ablations of CCD: LA / RA / H-mean ({metric})\n")
            lines.append(markdown_table(bold_best(comparison_table(rows, ["ccd", *ablations], metric))))
        for m in ablations:
            lines.append(f"- `{m}`: {notes.get(m, '')}")
        lines.append("")
    if "ccd" in runs and competitors:
        lines.append(f"## CCD's gain over the best CL competitor ({', '.join(competitors)})\n")
        lines.append(
            "Per role, one competitor for the whole stream: the one with the best stream H-mean on the validation "
            "splits (on the test splits for runs without validation rows), compared at every block.\n"
        )
        gains = {}
        for metric in (lead, lead_ndcg):
            for role in ROLES:
                g = block_gains(rows, competitors, role=role, metric=metric)
                if metric == lead:
                    gains[role] = g
                sg = stream_gain(rows, competitors, role=role, metric=metric)
                split = rival(rows, competitors, role, metric)[1]
                lines.append(f"### {ROLE_NAMES[role]} against {sg['competitor']} (chosen on {split}), H_k per block ({metric})\n")
                lines.append(markdown_table(g.assign(gain=g["gain"].map(lambda v: tables.fmt(v, "+.4f")))))
                lines.append(
                    f"Stream H-mean: ccd {tables.fmt(sg['ccd'])}, {sg['competitor']} "
                    f"{tables.fmt(sg['competitor H'])}, gain {tables.fmt(sg['gain'], '+.4f')}\n"
                )
        if any(not g.empty for g in gains.values()):
            plot_gains(gains, plots / "gains.png", lead)
            lines.append("![CCD's H_k gain per block](plots/gains.png)\n")
    if rows:
        plot_h(rows, labels, plots / "h_per_block.png", lead)
        lines.append("## H_k per block\n")
        lines.append("![H_k per block](plots/h_per_block.png)\n")
    for role in ROLES:
        lines.append(f"## New users of block k, {ROLE_NAMES[role]} (test {lead})\n")
        lines.append(markdown_table(new_user_table(rows, labels, role, lead)))
    lines.append("## Training time\n")
    states = {m: rd.read_state() for m, (rd, _) in runs.items() if rd.state_path.exists()}
    lines.append(markdown_table(time_table(states), ".1f"))
    if serving is not None:
        lines.append("## Serving cost: CCD's final teacher ensemble vs served student\n")
        lines.append(serving)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
