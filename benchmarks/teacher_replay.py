"""Benchmark: one teacher member's update (stage 3) of block k, replayed from a finished CCD run, under
configuration variants; prints the updated member's *validation* Recall@20 on every block so far.

This is how the teacher-side replay defaults are chosen (method.md 5.3; tune on validation, never on
test). The member, the proxies SP_{k-1} / PP_{k-1} and the student cycle's CL_k are read from the run
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

Each replays the run's own stage (:func:`ccdrec.pipeline.stage_replay.replay_stage`: the same code and seed
as the run, from the models the run held before that stage) on a scratch copy; the run is not changed.
Prints ``valid_recall@20[b<j>]`` for j <= k, then ``LA`` (block k), ``RA`` (mean over j < k), ``H`` and
``seconds`` (the stage, its set-up included).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

STAGES = {"teacher": "b{k}/teacher{m}", "student": "b{k}/student_update", "distill": "b{k}/student"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a CCD run directory that has completed block --block")
    ap.add_argument("--block", type=int, default=1, help="the block k whose teacher update is replayed (k >= 1)")
    ap.add_argument("--member", type=int, default=0, help="the ensemble member to update")
    ap.add_argument("--stage", choices=tuple(STAGES), default="teacher", help="the update to replay")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="configuration override key=value")
    args = ap.parse_args()
    from ccdrec.memory import keep_freed_memory

    keep_freed_memory()  # as the CLI and staged runs do (ccdrec.memory)

    import numpy as np
    from pydantic import ValidationError

    from ccdrec.config import RunConfig, validation_message
    from ccdrec.errors import CcdrecError
    from ccdrec.eval.metrics import evaluate_many
    from ccdrec.eval.protocol import harmonic
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.pipeline.stage_replay import replay_stage
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
    stage = STAGES[args.stage].format(k=k, m=m)
    start = time.perf_counter()
    try:
        # the stage as the run ran it (same code, same seed), on a scratch copy of the run's state before it
        state, stream = replay_stage(rd, stage, cfg)
    except CcdrecError as e:
        raise SystemExit(f"error: {e}") from None
    seconds = time.perf_counter() - start
    model = {"teacher": state.members[m], "student": state.updated, "distill": state.student}[args.stage]
    out = evaluate_many(model, [(stream[j], "valid", None) for j in range(k + 1)], (20,))
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
