"""Benchmark: one teacher member's update (stage 3) of block k, replayed from a finished CCD run, under
configuration variants; prints the updated member's *validation* Recall@20 on every block so far.

This is how the teacher-side replay defaults are chosen (method.md 5.3; tune on validation, never on
test). The member, the proxies SP_{k-1} / PP_{k-1} and the served student CL_k are read from the run
directory's checkpoints, so every variant starts from the same state; nothing in the run is changed.

    python benchmarks/teacher_replay.py RUN --block 2
    python benchmarks/teacher_replay.py RUN --block 2 --set teacher.replay.labels=source
    python benchmarks/teacher_replay.py RUN --block 2 --set teacher.student_knowledge=false
    python benchmarks/teacher_replay.py RUN --block 2 --set teacher.replay.scale=1e-9   # same steps, no pull

``--stage student`` replays the student update (stage 2, method.md 5.1) of block k instead: CL_k from
D_{k-1}, SP_{k-1} / PP_{k-1} and the negatives' avoid lists, as the run built them::

    python benchmarks/teacher_replay.py RUN --block 2 --stage student --set student.avoid_top=0

``--stage distill`` replays the student generation (stage 1, method.md 7) of block k: a fresh D_k
distilled from the stored members of E_k, with the negatives' avoid lists of SP_{k-1}, PP_{k-1} and
CL_k::

    python benchmarks/teacher_replay.py RUN --block 2 --stage distill --set student.rrd_weight=0.1

Prints ``valid_recall@20[b<j>]`` for j <= k, then ``LA`` (block k), ``RA`` (mean over j < k), ``H`` and
``seconds`` (the update alone).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a CCD run directory that has completed block --block")
    ap.add_argument("--block", type=int, default=1, help="the block k whose teacher update is replayed (k >= 1)")
    ap.add_argument("--member", type=int, default=0, help="the ensemble member to update")
    ap.add_argument("--stage", choices=("teacher", "student", "distill"), default="teacher", help="the update to replay")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="configuration override key=value")
    args = ap.parse_args()
    from ccdrec.memory import keep_freed_memory

    keep_freed_memory()  # as the CLI and staged runs do (ccdrec.memory)

    import numpy as np
    from pydantic import ValidationError

    from ccdrec.config import RunConfig, validation_message
    from ccdrec.continual.proxy import Proxy
    from ccdrec.data import load_stream
    from ccdrec.errors import CcdrecError
    from ccdrec.eval.metrics import evaluate_many
    from ccdrec.eval.protocol import harmonic
    from ccdrec.pipeline import stages
    from ccdrec.pipeline.ccd import CCDStream
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.presets import apply_override

    k, m = args.block, args.member
    try:
        rd = RunDir.open(args.run)
        data = rd.load_config().model_dump()
        for item in args.overrides:
            data = apply_override(data, item)
        cfg = RunConfig.model_validate(data)
    except (CcdrecError, ValidationError) as e:
        raise SystemExit(f"error: {validation_message(e) if isinstance(e, ValidationError) else e}") from None
    if not 1 <= k or not 0 <= m < len(cfg.teacher.members):
        raise SystemExit(f"error: --block must be >= 1 and --member in 0..{len(cfg.teacher.members) - 1}")
    stream = load_stream(cfg.dataset)
    run = CCDStream(cfg, rd, stream, progress=False)
    try:
        t = rd.load_tensors("b0_proxies" if k == 1 else f"b{k}_proxies")  # SP_{k-1}, PP_{k-1}
        if args.stage == "student":
            run.student = run.load(f"b{k - 1}_student")  # D_{k-1}
            run.members = [run.load(f"b{k - 1}_teacher{i}") for i in range(len(cfg.teacher.members))]
            top = rd.load_tensors(f"b{k - 1}_teacher_top")["user_top"].numpy()
        elif args.stage == "distill":
            run.members = [run.load(f"b{k}_teacher{i}") for i in range(len(cfg.teacher.members))]
            run.served = run.load(f"b{k}_served")
        else:
            member, served = run.load(f"b{k - 1}_teacher{m}"), run.load(f"b{k}_served")
    except (CcdrecError, FileNotFoundError) as e:
        raise SystemExit(f"error: {args.run} has not completed block {k}: {e}") from None
    proxies = (Proxy(t["sp_user"], t["sp_item"]).to(run.device), Proxy(t["pp_user"], t["pp_item"]).to(run.device))
    run.proxies = proxies
    start = time.perf_counter()
    if args.stage == "student":  # as CCDStream.student_update, from the stored D_{k-1}, proxies and E_{k-1} lists
        avoid = run.student_avoid(k, top)
        res, _ = stages.update_student(
            run.student, *proxies, avoid, stream[k], stream[k - 1], cfg, run.seed(f"b{k}/student_update")
        )
    elif args.stage == "distill":  # as CCDStream.distil: E_k's lists, avoid lists of SP_{k-1}, PP_{k-1}, CL_k
        block = stream[k]
        user_top, item_top = stages.teacher_lists(run.ensemble(), block, cfg.student.topn)
        avoid = run.distil_avoid(k)
        res = stages.generate_student(user_top, item_top, block, cfg, run.seed(f"b{k}/student"), run.device, avoid)
    else:
        know = cfg.teacher.student_knowledge
        res = stages.update_teacher(
            member,
            *(proxies if know else (None, None)),
            served if know else None,
            stream[k],
            stream[k - 1],
            cfg,
            stages.stage_seed(cfg.teacher.members[m].seed, f"b{k}/teacher{m}"),
        )
    seconds = time.perf_counter() - start
    out = evaluate_many(res.model, [(stream[j], "valid", None) for j in range(k + 1)], (20,))
    recall = [o["recall@20"] for o in out]
    for j, r in enumerate(recall):
        print(f"valid_recall@20[b{j}]: {r:.4f}")
    la, ra = recall[k], float(np.mean(recall[:k]))
    print(f"LA: {la:.4f}")
    print(f"RA: {ra:.4f}")
    print(f"H: {harmonic(la, ra):.4f}")
    print(f"seconds: {seconds:.1f}")


if __name__ == "__main__":
    main()
