"""Compare two run directories bit for bit: ``python benchmarks/determinism.py RUN_A RUN_B``.

Two runs with the same configuration, seed and thread count must write the same ``metrics.jsonl``
(wall-clock fields aside: every key containing ``second`` or ``time``) and the same checkpoint tensors
(``checkpoints/*.pt``, loaded with ``weights_only=True``). Prints each differing metric row (field by
field, with the largest absolute difference) and each differing tensor (max |a - b| and how many
entries differ), then ``identical: yes`` or ``identical: no``; exits 1 when the runs differ.

``--checkpoints final`` compares only the checkpoints the runs' ``state.json`` points to at the end
(a resumed run may hold extra files of the stage that was interrupted).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def timeless(row: dict) -> dict:
    """A metric row without its wall-clock fields."""
    return {k: v for k, v in row.items() if "second" not in k and "time" not in k}


def read_rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [timeless(json.loads(x)) for x in lines if x.strip()]


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ("stage", "kind", "model", "k", "j"))


def value_diff(a, b) -> float | None:
    """|a - b| for two numbers (inf when only one is NaN), None for other values."""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return None
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def compare_rows(a: list[dict], b: list[dict], out) -> int:
    """Print the differing rows; returns how many rows differ (a missing row counts)."""
    bad = 0
    if len(a) != len(b):
        print(f"metrics: {len(a)} rows vs {len(b)} rows", file=out)
        bad += abs(len(a) - len(b))
    for n, (ra, rb) in enumerate(zip(a, b, strict=False)):
        if ra == rb:
            continue
        bad += 1
        fields = []
        for k in sorted(set(ra) | set(rb)):
            va, vb = ra.get(k, "<missing>"), rb.get(k, "<missing>")
            if va != vb:
                d = value_diff(va, vb)
                fields.append(f"{k}: {va!r} vs {vb!r}" + (f" (|diff| {d:.3g})" if d is not None else ""))
        print(f"metrics row {n} {'/'.join(row_key(ra))}: " + "; ".join(fields), file=out)
    return bad


def checkpoint_names(run: Path, final: bool) -> set[str]:
    if not final:
        return {p.name for p in (run / "checkpoints").glob("*.pt")}
    state = json.loads((run / "state.json").read_text())
    return {f"{name}.pt" for name in state["pointers"].values()}


def compare_checkpoints(a: Path, b: Path, final: bool, out) -> tuple[int, int]:
    """Print differing tensors; returns (files compared, files that differ or are missing)."""
    na, nb = checkpoint_names(a, final), checkpoint_names(b, final)
    bad = 0
    for name in sorted(na ^ nb):
        print(f"checkpoint {name}: only in {a if name in na else b}", file=out)
        bad += 1
    for name in sorted(na & nb):
        ta = torch.load(a / "checkpoints" / name, map_location="cpu", weights_only=True)
        tb = torch.load(b / "checkpoints" / name, map_location="cpu", weights_only=True)
        lines = []
        for key in sorted(set(ta) | set(tb)):
            x, y = ta.get(key), tb.get(key)
            if x is None or y is None:
                lines.append(f"  {key}: only in one run")
            elif x.shape != y.shape or x.dtype != y.dtype:
                lines.append(f"  {key}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            elif not torch.equal(x, y):
                if x.is_floating_point():
                    diff = (x.double() - y.double()).abs()
                    lines.append(
                        f"  {key}: max |diff| {diff.max().item():.3g}, {int((x != y).sum())} of {x.numel()} entries differ"
                    )
                else:
                    lines.append(f"  {key}: {int((x != y).sum())} of {x.numel()} entries differ")
        if lines:
            bad += 1
            print(f"checkpoint {name}:", file=out)
            for line in lines:
                print(line, file=out)
    return len(na & nb), bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument(
        "--checkpoints", choices=("all", "final"), default="all", help="all *.pt files, or those state.json points to"
    )
    args = ap.parse_args(argv)
    out = sys.stdout
    rows_a, rows_b = read_rows(args.run_a), read_rows(args.run_b)
    bad_rows = compare_rows(rows_a, rows_b, out)
    n_ckpt, bad_ckpt = compare_checkpoints(args.run_a, args.run_b, args.checkpoints == "final", out)
    print(f"metrics rows: {len(rows_a)} vs {len(rows_b)}, {bad_rows} differ (time fields ignored)", file=out)
    print(f"checkpoints: {n_ckpt} compared, {bad_ckpt} differ", file=out)
    same = bad_rows == 0 and bad_ckpt == 0
    print(f"identical: {'yes' if same else 'no'}", file=out)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
