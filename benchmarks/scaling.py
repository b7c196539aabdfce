"""Benchmark: how the cost of each stage grows with users and interactions.

Synthetic streams with planted preferences (users in latent clusters, each interacting mostly inside its
cluster, items' popularity Zipf-like) at increasing size: ``--users`` (items = users x ``--items-ratio``,
``--per-user`` interactions per user, fixed). For each size, every stage runs alone in a fresh
process (so that its peak RSS is its own) and is timed:

* ``teacher_epoch``    one BPR epoch of a block-0 teacher member (LightGCN, dim 128, the default schedule);
* ``evaluation``       one full-ranking evaluation (Recall@20 / NDCG@20 of every test user, in user chunks);
* ``ensemble_top``     the rank ensemble of 3 members with the top-40 lists of every user and item;
* ``distill_epoch``    one distillation epoch (student LightGCN dim 8, BPR + RRD + IR-RRD);
* ``replay_candidates`` the stability proxy's top-A candidates of every old active user (a full ranking,
                       once per block) and the first draw of the replay set;
* ``student_epoch``    one student-update epoch on the next block (grown student, BPR + proxy replay),
                       the candidates at hand.

Prints ``stage users items interactions seconds peak_rss_mb`` per stage and size (with ``--repeat N``:
the fastest of N runs, each run's seconds last), then per stage the
log-log slope of seconds against users, against interactions and against users x items (the cells a
full ranking scores), and of peak RSS against users (least squares over the sizes). ``--max-steps``
bounds the steps of a BPR or replay epoch (``TrainConfig.max_steps``; the library's default binds only
from about 2M pairs per epoch, so a small bound shows at these sizes the regime a large stream is in).
Stages of a size stop being run once one exceeds ``--stage-limit`` seconds. ``--heap ccdrec`` (default)
uses the C heap as ``ccdrec`` commands do (:func:`ccdrec.memory.keep_freed_memory`, training passes in
:func:`ccdrec.memory.reused_step_memory`); ``--heap glibc`` keeps the C library's defaults.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import time

import numpy as np

from ccdrec.config import MAX_STEPS, RANK_SAMPLE

STAGES = ("teacher_epoch", "evaluation", "ensemble_top", "distill_epoch", "replay_candidates", "student_epoch")


def planted_stream(n_users: int, n_items: int, per_user: int, seed: int = 0):
    """Two blocks (block 1: 10% new users, 5% new items; 60% of old users active) with planted
    preferences: 85% of a user's interactions in its cluster (clusters of about 200 items), skewed towards
    the cluster's first items, the rest uniform; repeated pairs are dropped (few: the skew is mild)."""
    from ccdrec.data.split import split_block
    from ccdrec.data.stream import Block, Stream

    rng = np.random.default_rng(seed)
    clusters = max(1, n_items // 200)
    u1, i1 = n_users + n_users // 10, n_items + n_items // 20
    user_cluster = rng.integers(0, clusters, u1)
    item_cluster = rng.integers(0, clusters, i1)
    blocks, prev_u, prev_i = [], 0, 0
    for k, (n_u, n_i) in enumerate(((n_users, n_items), (u1, i1))):
        order = np.argsort(item_cluster[:n_i], kind="stable")
        starts = np.searchsorted(item_cluster[:n_i][order], np.arange(clusters + 1))
        users = np.arange(n_u) if k == 0 else np.concatenate([np.flatnonzero(rng.random(prev_u) < 0.6), np.arange(prev_u, n_u)])
        u = np.repeat(users, per_user)
        same = rng.random(len(u)) < 0.85
        c = user_cluster[u]
        size = np.maximum(starts[c + 1] - starts[c], 1)
        pos = np.minimum((size * rng.random(len(u)) ** 1.5).astype(np.int64), size - 1)  # skewed within the cluster
        items = np.where(same, order[np.minimum(starts[c] + pos, n_i - 1)], rng.integers(0, n_i, len(u)))
        pairs = np.unique(np.stack([u, items], 1), axis=0)
        blocks.append(Block(k, n_u, n_i, prev_u, prev_i, **split_block(pairs, rng)))
        prev_u, prev_i = n_u, n_i
    return Stream("planted", blocks)


def run_stage(
    stage: str,
    n_users: int,
    n_items: int,
    per_user: int,
    threads: int,
    max_steps: int | None,
    rank_sample: int | None,
    heap: str,
    q,
    rrd_samples: int = 1000,
) -> None:
    import contextlib

    import torch

    from ccdrec.memory import keep_freed_memory, reused_step_memory

    if heap == "ccdrec":
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # Adam's first use imports torch._dynamo (2 s): not a stage's cost
    from ccdrec.config import TrainConfig, default_schedule
    from ccdrec.distill.ensemble import RankEnsemble, top_lists
    from ccdrec.distill.rrd import RRDObjective
    from ccdrec.eval.metrics import evaluate_block
    from ccdrec.models import LightGCN
    from ccdrec.train.objectives import objective_for

    stream = planted_stream(n_users, n_items, per_user)
    b0, b1 = stream[0], stream[1]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def epoch(model, block, cfg, callbacks=()):
        model.set_graph(block.matrix("train", model.n_users, model.n_items))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        for cb in callbacks:
            cb.on_epoch_start(model, opt, 0)
        with reused_step_memory() if heap == "ccdrec" else contextlib.nullcontext():  # as ccdrec.train.loop.fit
            objective_for(model, block, cfg).epoch(model, opt, rng, 0, callbacks)
            for cb in callbacks:
                cb.on_epoch_end(model, opt, 0)

    teacher = LightGCN(b0.n_users, b0.n_items, dim=128)
    teacher.set_graph(b0.train_matrix)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if stage == "teacher_epoch":
        epoch(teacher, b0, default_schedule("lightgcn").model_copy(update={"max_steps": max_steps}))
    elif stage == "evaluation":
        evaluate_block(teacher.eval(), b0, "test")
    elif stage == "ensemble_top":
        members = [teacher] + [LightGCN(b0.n_users, b0.n_items, dim=128) for _ in range(2)]
        for m in members:
            m.set_graph(b0.train_matrix)
        ens = RankEnsemble(members)
        top_lists(ens.scorer(context=b0.train_matrix), b0.n_users, b0.n_items, b0.train_matrix, n=40)
    else:
        student = LightGCN(b0.n_users, b0.n_items, dim=8)
        cfg = TrainConfig(epochs=1, batch_size=1024, lr=5e-3, max_steps=max_steps)
        lists = top_lists(teacher.scorer(), b0.n_users, b0.n_items, b0.train_matrix, n=40)
        if stage == "distill_epoch":
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            start = time.perf_counter()
            rrd = RRDObjective(
                *lists,
                b0.n_items,
                b0.n_users,
                user_samples=min(rrd_samples, b0.n_items),
                item_samples=min(rrd_samples, b0.n_users),
                observed=b0.train_matrix,
            )
            epoch(student, b0, cfg, [rrd])
        else:
            from ccdrec.config import ReplayConfig
            from ccdrec.continual.proxy import Proxy
            from ccdrec.continual.replayer import Replayer, old_active_users, past_train

            student.grow(b1.n_users, b1.n_items, b1.train_matrix, "entity")
            proxy = Proxy.from_model(student)
            sources = [(proxy.scorer(n_items=b1.n_items), 1)]
            rc = ReplayConfig(max_steps=max_steps, rank_sample=rank_sample)
            replay = Replayer(sources, old_active_users(b1), past_train(b1, b0), rc, 1, b1.n_items)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            start = time.perf_counter()
            replay.sample(student)  # the proxy's top-A candidates: a full ranking of the old users, once per block
            if stage == "student_epoch":  # the epoch proper: BPR and replay with the candidates at hand
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                start = time.perf_counter()
                epoch(student, b1, cfg, [replay])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put((seconds, peak, before, len(b0.train) + len(b0.valid) + len(b0.test), b0.n_users * b0.n_items))


def slope(x, y) -> float:
    ok = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b > 0]
    if len(ok) < 2:
        return math.nan
    lx, ly = np.log([a for a, _ in ok]), np.log([b for _, b in ok])
    return float(np.polyfit(lx, ly, 1)[0])


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def user_counts(text: str) -> list[int]:
    from ccdrec.errors import CcdrecError
    from ccdrec.option_values import comma_values

    try:
        return comma_values(text, "--users", positive)
    except CcdrecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def stage_names(text: str) -> list[str]:
    from ccdrec.errors import CcdrecError
    from ccdrec.option_values import comma_values, one_of

    try:
        return comma_values(text, "--stages", one_of(STAGES, "stage"))
    except CcdrecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def step_bound(text: str) -> int | None:
    """A positive count, or none / null for no bound (--max-steps, --rank-sample)."""
    return None if text.strip().lower() in ("none", "null") else positive(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--users", type=user_counts, default="10000,20000,40000,80000", help="comma-separated user counts (default: %(default)s)"
    )
    ap.add_argument("--items-ratio", type=float, default=0.1, help="items per user of the universe (default: %(default)s)")
    ap.add_argument("--per-user", type=positive, default=20, help="interactions per user in block 0 (default: %(default)s)")
    ap.add_argument("--stages", type=stage_names, default=",".join(STAGES), help="comma-separated stages (default: all)")
    ap.add_argument("--threads", type=positive, default=2, help="torch threads of every stage (default: %(default)s)")
    ap.add_argument(
        "--max-steps",
        type=step_bound,
        default=MAX_STEPS,
        help="steps per epoch of BPR and replay passes before the batch grows (TrainConfig.max_steps; "
        "none or null: no bound; default: %(default)s)",
    )
    ap.add_argument(
        "--rank-sample",
        type=step_bound,
        default=RANK_SAMPLE,
        help="the student epoch's replay draw estimates rank_W from this many sampled items when the universe has "
        "more (ReplayConfig.rank_sample; none or null: always exact; default: %(default)s)",
    )
    ap.add_argument(
        "--rrd-samples",
        type=positive,
        default=1000,
        help="the distillation epoch's uninteresting samples per minibatch on each side (student.user_samples and "
        "item_samples, capped at the universe; default: %(default)s)",
    )
    ap.add_argument(
        "--stage-limit",
        type=float,
        default=600.0,
        help="seconds; a stage past it is not run at larger sizes (default: 600)",
    )
    ap.add_argument(
        "--heap",
        choices=("ccdrec", "glibc"),
        default="ccdrec",
        help="the C heap as ccdrec commands use it, or glibc's defaults (default: %(default)s)",
    )
    ap.add_argument(
        "--repeat",
        type=positive,
        default=1,
        help="runs of every stage and size, each in a fresh process; seconds = the fastest (on a shared machine other "
        "work only adds time), peak RSS = the largest, and each run's seconds are printed last (default: 1)",
    )
    args = ap.parse_args()
    max_steps = args.max_steps
    if len(args.users) < 2:
        print("# one size only: no slope can be fitted", flush=True)
    print(
        f"# threads {args.threads}, max_steps {max_steps}, rank_sample {args.rank_sample}, heap {args.heap}, "
        f"rrd_samples {args.rrd_samples}",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    results: dict[str, list[tuple[int, int, int, float, float]]] = {s: [] for s in args.stages}
    skipped: set[str] = set()
    header = "stage users items interactions seconds peak_rss_mb rss_before_stage_mb"
    print(header + (" seconds_each_run" if args.repeat > 1 else ""), flush=True)
    for n_users in args.users:
        n_items = max(int(n_users * args.items_ratio), 100)
        for stage in results:
            if stage in skipped:
                continue
            runs = []
            for _ in range(args.repeat):
                q = ctx.Queue()
                stage_args = (
                    stage,
                    n_users,
                    n_items,
                    args.per_user,
                    args.threads,
                    max_steps,
                    args.rank_sample,
                    args.heap,
                    q,
                    args.rrd_samples,
                )
                p = ctx.Process(target=run_stage, args=stage_args)
                p.start()
                p.join()
                if p.exitcode != 0:
                    print(f"{stage} {n_users} {n_items} failed (exit {p.exitcode})", flush=True)
                    skipped.add(stage)
                    break
                runs.append(q.get())
            if stage in skipped:
                continue
            seconds = min(r[0] for r in runs)  # the least disturbed run (as timeit): other work only adds time
            _, peak, before, inter, cells = max(runs, key=lambda r: r[1])
            results[stage].append((n_users, inter, cells, seconds, peak))
            each = " " + "/".join(f"{r[0]:.2f}" for r in runs) if args.repeat > 1 else ""
            print(f"{stage} {n_users} {n_items} {inter} {seconds:.2f} {peak:.0f} {before:.0f}{each}", flush=True)
            if seconds > args.stage_limit:
                skipped.add(stage)
    print("stage slope_seconds_vs: users interactions users_x_items; slope_rss_vs_users", flush=True)
    for stage, rows in results.items():
        users, inter, cells, secs, rss = ([r[c] for r in rows] for c in range(5))
        fits = (slope(users, secs), slope(inter, secs), slope(cells, secs), slope(users, rss))
        print(stage, " ".join(f"{f:.2f}" for f in fits), flush=True)


if __name__ == "__main__":
    main()
