"""The report of a sweep (``ccdrec compare --seeds ... --cadences ...``): spread over seeds, CCD's paired
gain, retention, and H-mean against the teacher's compute per cadence (method.md 5, 8).

Input: per cell (seed, cadence) the labelled metric rows of its comparison
(:func:`ccdrec.report.compare.comparison_rows`) and the ``state.json`` of each run. All figures are
computed from those by the pure functions below:

* :func:`seed_table`      LA / RA / H-mean per method and role: mean and standard deviation over seeds;
* :func:`paired_gains`    per block k, CCD's H_k minus that of the one CL competitor with the best mean
                          stream H-mean, per seed; a gain is called one only when it holds on every seed;
* :func:`retention_table` per block k, RA_k of the teacher E_k, of the student D_k distilled from it and
                          of the served student CL_k (and D_k's RA as a fraction of E_k's);
* :func:`cycle_seconds`   a run's seconds per student cycle and per teacher cycle, and its teacher compute;
* :func:`cadence_table`   H-mean against teacher compute per method, role and cadence.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ccdrec.report import tables
from ccdrec.report.compare import (
    REFERENCE,
    ROLE_NAMES,
    SERVED_TEXT,
    block_bars,
    comparison_rows,
    pyplot,
    stopped_notes,
    stream_summary,
)
from ccdrec.report.markdown import markdown_table

CELL_ROLES = ("student", "teacher", "distilled", "updated")
_STAGE = re.compile(r"^b(\d+)/(.+)$")

Cells = dict[tuple[int, int], dict]  # (seed, cadence) -> label -> (RunDir, "ccd" | "cl")


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (NaN for fewer than two) and count of the values that are not NaN."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _pm(mean: float, sd: float) -> str:
    return tables.fmt(mean) if math.isnan(sd) else f"{tables.fmt(mean)} ± {tables.fmt(sd)}"


def seed_table(rows_by_seed: dict[int, list[dict]], labels: list[str], metric: str, split: str = "test") -> pd.DataFrame:
    """One row per (label, role) with rows present: LA / RA / H as "mean ± sd" over the seeds, and n
    (``split``: the r_(k,j) of the test or the validation splits)."""
    out = []
    for label in labels:
        for role in CELL_ROLES:
            per = [stream_summary(rows, label, role, metric, split) for rows in rows_by_seed.values()]
            if all(math.isnan(p["H"]) for p in per):
                continue
            row = {"method": label, "role": ROLE_NAMES[role]}
            for name in ("LA", "RA", "H"):
                m, sd, n = mean_sd([p[name] for p in per])
                row[name] = _pm(m, sd)
            row["seeds"] = n
            out.append(row)
    return pd.DataFrame(out).set_index(["method", "role"]) if out else pd.DataFrame()


def best_competitor(
    rows_by_seed: dict[int, list[dict]], competitors: list[str], role: str, metric: str, split: str = "valid"
) -> str | None:
    """The competitor with the highest stream H-mean averaged over the seeds (one for the whole stream),
    chosen on the validation splits by default."""
    means = {c: mean_sd([stream_summary(r, c, role, metric, split)["H"] for r in rows_by_seed.values()])[0] for c in competitors}
    means = {c: v for c, v in means.items() if not math.isnan(v)}
    return max(means, key=means.get) if means else None


def paired_gains(rows_by_seed: dict[int, list[dict]], rival: str, role: str, metric: str, ccd: str = "ccd") -> pd.DataFrame:
    """Per block k >= 1 (and the stream, row ``H-mean``): CCD's H_k minus ``rival``'s on each seed; the
    mean, sd, smallest gain and whether it is positive on every seed."""
    per_seed: dict[int, dict] = {}
    for seed, rows in rows_by_seed.items():
        a = tables.stream_scores(rows, f"{ccd}:{role}", metric)
        b = tables.stream_scores(rows, f"{rival}:{role}", metric)
        gains = {k: a.h(k) - b.h(k) for k in a.blocks if k >= 1 and (k, k) in b.r}
        gains["H-mean"] = stream_summary(rows, ccd, role, metric)["H"] - stream_summary(rows, rival, role, metric)["H"]
        per_seed[seed] = gains
    keys = [k for k in sorted({k for g in per_seed.values() for k in g if k != "H-mean"})] + ["H-mean"]
    out = []
    for k in keys:
        values = [g.get(k, math.nan) for g in per_seed.values()]
        m, sd, n = mean_sd(values)
        present = [v for v in values if not math.isnan(v)]
        row = {"block": k, "mean gain": m, "sd": sd, "smallest": min(present) if present else math.nan, "seeds": n}
        row["on every seed"] = "yes" if present and len(present) == len(values) and min(present) > 0 else "no"
        out.append(row)
    return pd.DataFrame(out).set_index("block")


def retention_table(rows_by_seed: dict[int, list[dict]], label: str, metric: str, split: str = "test") -> pd.DataFrame:
    """Per block k >= 1: RA_k of E_k (teacher), of D_k (distilled from it) and of CL_k (the student cycle's
    update: role ``updated`` where it is not the one served, else the served student), means over the seeds,
    and D_k's RA as a fraction of E_k's (the mean of the per-seed fractions)."""
    out = []
    teacher = [tables.stream_scores(rows, f"{label}:teacher", metric, split) for rows in rows_by_seed.values()]
    ks = sorted({k for s in teacher for k in s.blocks if k >= 1})
    for k in ks:
        ra = {role: [] for role in CELL_ROLES}
        frac = []
        for rows in rows_by_seed.values():
            got = {role: tables.stream_scores(rows, f"{label}:{role}", metric, split).ra(k) for role in CELL_ROLES}
            for role, v in got.items():
                ra[role].append(v)
            if got["teacher"] > 0 and not math.isnan(got["distilled"]):
                frac.append(got["distilled"] / got["teacher"])
        row = {"k": k, "E_k RA": mean_sd(ra["teacher"])[0], "D_k RA": mean_sd(ra["distilled"])[0]}
        updated = [s if math.isnan(u) else u for u, s in zip(ra["updated"], ra["student"], strict=True)]
        row |= {"D_k / E_k": mean_sd(frac)[0], "CL_k RA": mean_sd(updated)[0]}
        out.append(row)
    return pd.DataFrame(out).set_index("k") if out else pd.DataFrame()


def cycle_seconds(state: dict, kind: str) -> dict[str, float]:
    """A run's mean seconds per student cycle and per teacher cycle (blocks k >= 1, from ``state.json``),
    and its teacher compute: the total seconds of the teacher updates (members and replay candidates).

    CCD-family runs (``kind = "ccd"``): a student cycle is ``bK/student_update``; a teacher cycle is the
    replay candidates, the members' updates and the distillation ``bK/student``. Competitors (``"cl"``): a
    student cycle is ``bK/student``, a teacher cycle the members' updates."""
    student: dict[int, float] = {}
    teacher: dict[int, float] = {}
    compute = 0.0
    for name, secs in state.get("seconds", {}).items():
        m = _STAGE.match(name)
        if not m or int(m.group(1)) == 0 or m.group(2) == "eval":
            continue
        k, stage = int(m.group(1)), m.group(2)
        is_member = stage.startswith("teacher") or stage == "replay_candidates"
        if stage == ("student_update" if kind == "ccd" else "student"):
            student[k] = student.get(k, 0.0) + secs
        elif is_member or (kind == "ccd" and stage == "student"):
            teacher[k] = teacher.get(k, 0.0) + secs
            compute += secs if is_member else 0.0
    return {
        "student cycle (s)": mean_sd(list(student.values()))[0],
        "teacher cycle (s)": mean_sd(list(teacher.values()))[0],
        "teacher cycles": len(teacher),
        "teacher compute (s)": compute,
    }


def cadence_table(cells: dict[tuple[int, int], tuple[list[dict], dict]], labels: list[str], kinds: dict[str, str], metric: str):
    """One row per (label, cadence): the served student's and the teacher's stream H-mean (mean over the
    seeds) and the run's cycle seconds and teacher compute (means over the seeds).

    ``cells``: (seed, cadence) -> (labelled rows, label -> state.json)."""
    out = []
    for label in labels:
        for cadence in sorted({c for _, c in cells}):
            same = [(rows, states) for (_, c), (rows, states) in cells.items() if c == cadence and label in states]
            if not same:
                continue
            row: dict = {"method": label, "every": cadence}
            for role in ("student", "teacher"):
                row[f"{ROLE_NAMES[role]} H"] = mean_sd([stream_summary(rows, label, role, metric)["H"] for rows, _ in same])[0]
            secs = [cycle_seconds(states[label], kinds[label]) for _, states in same]
            for key in secs[0]:
                values = [s[key] for s in secs]
                if all(isinstance(v, int) for v in values) and len(set(values)) == 1:
                    row[key] = values[0]  # a count (teacher cycles), the same for every seed
                else:
                    row[key] = round(mean_sd(values)[0], 3)  # milliseconds are below the noise
            out.append(row)
    return pd.DataFrame(out).set_index(["method", "every"]) if out else pd.DataFrame()


def plot_cadence(table: pd.DataFrame, path: Path, metric: str) -> None:
    """H-mean (y) against teacher compute (x), one line per method through its cadences, per role."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, role in zip(axes, ("student", "teacher"), strict=True):
        col = f"{ROLE_NAMES[role]} H"
        for label in dict.fromkeys(table.index.get_level_values(0)):
            sub = table.loc[label].sort_index()
            x, y = sub["teacher compute (s)"].to_numpy(), sub[col].to_numpy()
            ax.plot(x, y, marker="o", label=label)
            for every, xi, yi in zip(sub.index, x, y, strict=True):
                ax.annotate(f"m={every}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{ROLE_NAMES[role]}: H-mean ({metric})", xlabel="teacher update compute (s)", ylabel="H-mean")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retention(table: pd.DataFrame, path: Path, label: str, metric: str) -> None:
    """Per block k: RA_k of E_k, D_k and CL_k (bars side by side)."""
    series = {col: table[col] for col in ("E_k RA", "D_k RA", "CL_k RA")}
    block_bars(series, path, f"{label}: retention of old blocks, RA_k ({metric})", "RA_k")


def _cell_dir(runs: dict) -> str:
    """The name of a cell's comparison directory (the parent of its runs' directories)."""
    rd, _ = next(iter(runs.values()))
    return Path(rd.path).parent.name


def write_sweep_report(out: Path, cells: Cells, notes: dict[str, str] | None = None) -> Path:
    """Write ``OUT/report.md`` and ``OUT/plots/*.png`` of a sweep. ``cells``: (seed, cadence) -> the
    comparison's runs (label -> (RunDir, kind)); ``notes``: what a method or ablation label changes."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    notes = notes or {}
    data = {}
    kinds: dict[str, str] = {}
    for key, runs in cells.items():
        rows = comparison_rows(runs)
        states = {label: rd.read_state() for label, (rd, _) in runs.items() if rd.state_path.exists()}
        data[key] = (rows, states)
        kinds |= {label: kind for label, (_, kind) in runs.items()}
    labels = list(kinds)
    competitors = [m for m, kind in kinds.items() if kind == "cl" and m not in REFERENCE]
    seeds = sorted({s for s, _ in cells})
    cadences = sorted({c for _, c in cells})
    all_rows = [r for rows, _ in data.values() for r in rows]
    lead, _ = tables.lead_metrics(all_rows)
    lines = [f"# Sweep: {out.name}\n"]
    lines.append(
        f"Seeds {', '.join(map(str, seeds))}; the teacher updated every {', '.join(map(str, cadences))} student cycle(s). "
        f"Test {lead}, LA / RA / H-mean over blocks k >= 1 (method.md 8); mean ± standard deviation over the seeds. "
        + SERVED_TEXT
        + "; distilled = D_k; teacher = the rank ensemble.\n"
    )
    links = [f"[seed {s}, every {c}]({_cell_dir(runs)}/report.md)" for (s, c), runs in cells.items() if runs]
    lines.append("Cells: " + ", ".join(links) + "\n")
    parts = {
        f"{label} (seed {s}, every {c})": [r for r in rows if r.get("method") == label]
        for (s, c), (rows, _) in data.items()
        for label in labels
    }
    lines += stopped_notes(parts, out)
    lines += [f"- `{m}`: {notes[m]}" for m in labels if m in notes]
    if any(m in notes for m in labels):
        lines.append("")
    for cadence in cadences:
        by_seed = {s: data[(s, c)][0] for (s, c) in data if c == cadence}
        lines.append(f"## Teacher updated every {cadence} student cycle(s)\n")
        lines.append(f"### LA / RA / H-mean over {len(by_seed)} seed(s), test splits ({lead})\n")
        lines.append(markdown_table(seed_table(by_seed, labels, lead)))
        lines.append(f"### The same on the validation splits, on which settings are chosen ({lead})\n")
        lines.append(markdown_table(seed_table(by_seed, labels, lead, "valid")))
        if "ccd" in kinds and competitors:
            for role in ("student", "teacher"):
                rival = best_competitor(by_seed, competitors, role, lead)
                if rival is None:
                    continue
                others = f" ({', '.join(competitors)})" if len(competitors) > 1 else " (the only one)"
                lines.append(f"### CCD's paired gain over {rival}, {ROLE_NAMES[role]} (H_k, {lead})\n")
                lines.append(
                    f"{rival} has the best mean validation H-mean of the CL competitors{others} for "
                    f"this role; the gain is CCD's test H_k minus {rival}'s test H_k on the same seed. It is a gain only "
                    "where it is positive on every seed.\n"
                )
                lines.append(markdown_table(paired_gains(by_seed, rival, role, lead)))
        for label in (m for m, kind in kinds.items() if kind == "ccd"):
            ret = retention_table(by_seed, label, lead)
            if ret.empty or ret["D_k RA"].isna().all():
                continue
            lines.append(
                f"### Retention of {label}: RA_k of the teacher, the student distilled from it, the student cycle's CL_k "
                f"(test, means over {len(by_seed)} seed(s))\n"
            )
            lines.append(markdown_table(ret))
            if label == "ccd":
                name = f"retention_every{cadence}.png"
                plot_retention(ret, plots / name, label, lead)
                lines.append(f"![retention](plots/{name})\n")
    table = cadence_table(data, labels, kinds, lead)
    if not table.empty:
        lines.append("## Cost of a cycle and H-mean against the teacher's compute\n")
        lines.append(
            "Seconds per student cycle and per teacher cycle (CCD: replay candidates, member updates and the "
            "distillation of D_k), and the total seconds of the teacher's member updates over the stream; means over the "
            "seeds. H-mean is the stream H-mean of the served student and of the teacher ensemble.\n"
        )
        lines.append(markdown_table(table))
        if len(cadences) > 1:
            plot_cadence(table, plots / "cadence.png", lead)
            lines.append("![H-mean against teacher compute](plots/cadence.png)\n")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "best_competitor",
    "cadence_table",
    "cycle_seconds",
    "mean_sd",
    "paired_gains",
    "retention_table",
    "seed_table",
    "write_sweep_report",
]
