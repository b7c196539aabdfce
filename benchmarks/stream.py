"""Benchmark: the default full CCD stream on a bundled dataset.

Prints one ``name: value`` line per figure: the wall seconds of every stage, ``total_seconds``,
``peak_rss_mb`` (with ``--workers N``: this process's peak plus N times the largest worker's), the
final stream ``teacher_LA/RA/H`` and ``student_LA/RA/H`` (Recall@20, the served student: D_k after a
teacher cycle, ``student.serve``), and per block the served student's r_(k,k) against a student of the same size trained
only on block k without a teacher (``baseline_rkk_k``).
Targets on a 2-core CPU: Yelp <= 30 minutes; Gowalla <= 60 minutes and <= 6 GB peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="yelp")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="configuration override key=value")
    ap.add_argument("--out", type=Path, default=None, help="keep the run directory here")
    ap.add_argument("--no-baseline", action="store_true", help="skip the no-teacher student baseline")
    ap.add_argument(
        "--baseline-only",
        action="store_true",
        help="only train the no-teacher students of the run directory --out and print their r_(k,k) lines",
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--workers", type=int, default=None, help="processes training teacher members side by side")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run directory --out; total_seconds is then the sum of the stages' own seconds",
    )
    args = ap.parse_args()

    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.presets import load_config

    if (args.resume or args.baseline_only) and args.out is None:
        ap.error("--resume and --baseline-only need --out RUN_DIR")
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(args.threads, 1))
    if args.baseline_only:
        print_baseline(RunDir.open(args.out))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="ccdrec-bench-")) / "run"
    start = time.perf_counter()
    if args.resume:
        rd = run_stream(None, out, resume=True, progress=False, workers=args.workers)
    else:
        cfg = load_config(args.dataset, args.preset, None, args.overrides)
        rd = run_stream(cfg, out, progress=False, workers=args.workers)
    total = time.perf_counter() - start
    state = rd.read_state()
    for name, secs in state["seconds"].items():
        print(f"stage_seconds[{name}]: {secs:.1f}")
    if args.resume:
        total = sum(state["seconds"].values())  # every stage's own wall time, across the interruptions
    print(f"total_seconds: {total:.1f}")
    print_memory(state, rd.load_config().workers)
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        print(f"gpu_peak_allocated_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
    print_quality(rd)
    if not args.no_baseline:
        print_baseline(rd)
    if args.out is None:
        shutil.rmtree(out.parent, ignore_errors=True)


def print_memory(state: dict, workers: int) -> None:
    """Peak resident memory: of this process, of the largest worker stage (a block's teacher member
    stages ``bK/teacherM`` run in workers), and their bound when ``workers`` worker processes run
    beside this one (``peak_rss_mb``). A stage's own peak comes from ``state.json``."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = state.get("peak_rss_mb", {})
    for name, mb in peaks.items():
        print(f"stage_peak_rss_mb[{name}]: {mb:.0f}")
    if workers > 1:
        worker = max((mb for name, mb in peaks.items() if name.partition("/")[2].startswith("teacher")), default=0.0)
        print(f"peak_rss_main_mb: {own:.0f}")
        print(f"peak_rss_worker_mb: {worker:.0f}")
        own += workers * worker
    print(f"peak_rss_mb: {own:.0f}")


def print_quality(rd) -> None:
    """The stream's LA / RA / H of teacher and served student, and block 0's teacher quality."""
    from ccdrec.report import tables

    rows = rd.read_metrics()
    for model, label in (("teacher", "teacher"), ("served", "student")):
        summ = tables.stream_scores(rows, model).summary()
        for key in ("LA", "RA", "H"):
            print(f"{label}_{key}: {summ[key]:.4f}")
    d0 = [r for r in rows if r.get("kind") == "fit" and r.get("stage", "").startswith("b0/teacher")]
    e0 = [r for r in rows if r.get("kind") == "test" and r["model"] == "teacher" and r["k"] == 0]
    if d0:
        print(f"teacher_members_D0_best_valid_recall@20: {max(r['valid_recall@20'] for r in d0):.4f}")
    if e0:
        print(f"teacher_ensemble_D0_test_recall@20: {e0[0]['recall@20']:.4f}")
    v0 = [r for r in rows if r.get("kind") == "valid" and r["model"] == "teacher" and r["k"] == 0]
    if v0:
        print(f"teacher_ensemble_D0_valid_recall@20: {v0[0]['recall@20']:.4f}")


def print_baseline(rd) -> None:
    """Per block k, a student of the same size trained only on block k without a teacher, against the
    run's served student (test r_(k,k))."""
    from ccdrec.data import load_stream
    from ccdrec.eval import evaluate_block
    from ccdrec.models import build_model
    from ccdrec.train import fit

    cfg, rows = rd.load_config(), rd.read_metrics()
    stream = load_stream(cfg.dataset)
    s = cfg.student
    last = len(stream) - 1 if cfg.max_blocks is None else cfg.max_blocks
    served = {r["k"]: r["recall@20"] for r in rows if r.get("kind") == "test" and r["model"] == "served" and r["j"] == r["k"]}
    for k in range(1, last + 1):
        b = stream[k]
        model = build_model(s.model.kind, b.n_users, b.n_items, **s.model.kwargs())
        sched = cfg.teacher.base.model_copy(update={"epochs": max(cfg.teacher.base.epochs, 30)})
        fit(model, b, sched, seed=cfg.seed)
        base = evaluate_block(model, b, "test")["recall@20"]
        print(
            f"baseline_rkk_{k}: {base:.4f}  served_rkk_{k}: {served.get(k, float('nan')):.4f}  "
            f"gain_{k}: {served.get(k, float('nan')) / base - 1:+.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
