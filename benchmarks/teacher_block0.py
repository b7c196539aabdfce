"""Benchmark: LightGCN-128 on Yelp D_0 (speed and quality), then full-ranking evaluation of Gowalla D_0.

Prints one ``name: value`` line per figure. Target on a 2-core CPU: best validation Recall@20 >= 0.1224
within 400 s of training + evaluation; Gowalla evaluation (64-d model, all D_0 users) under 2 GB RSS.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from a parent process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="yelp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="override the schedule's maximum epochs")
    ap.add_argument("--skip-gowalla", action="store_true", help="skip the Gowalla evaluation figure")
    ap.add_argument("--gowalla-only", action="store_true", help="only the Gowalla evaluation (own process)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (CUDA also prints the GPU's memory peak)")
    args = ap.parse_args()
    from ccdrec.memory import keep_freed_memory

    keep_freed_memory()  # as the CLI and staged runs do (ccdrec.memory)
    from ccdrec.device import resolve_device

    device = resolve_device(args.device)
    if args.gowalla_only:
        gowalla_eval(device)
        return

    from ccdrec.config import default_schedule
    from ccdrec.data import load_stream
    from ccdrec.eval import evaluate_block
    from ccdrec.models import LightGCN
    from ccdrec.train import fit

    stream = load_stream(args.dataset)
    b = stream[0]
    cfg = default_schedule("lightgcn")
    if args.epochs:
        cfg = cfg.model_copy(update={"epochs": args.epochs})
    torch.manual_seed(args.seed)
    model = LightGCN(b.n_users, b.n_items, 128, 2).to(device)
    res = fit(model, b, cfg, seed=args.seed)
    test = evaluate_block(model, b, "test")
    print(
        f"schedule: batch {cfg.batch_size}, lr {cfg.lr} x {cfg.lr_decay}/epoch, negatives {cfg.negatives}, "
        f"l2 {cfg.l2}, wd {cfg.weight_decay}"
    )
    print(f"epochs_run: {res.epochs_run}")
    print(f"best_epoch: {res.best_epoch + 1}")
    print(f"seconds_per_epoch: {res.seconds / res.epochs_run:.2f}")
    print(f"train_seconds: {res.seconds_to_best:.1f}")
    print(f"best_valid_recall@20: {res.best_valid['recall@20']:.4f}")
    print(f"test_recall@20: {test['recall@20']:.4f}")
    print(f"test_ndcg@20: {test['ndcg@20']:.4f}")
    print(f"peak_rss_mb: {peak_rss_mb():.0f}")
    print_gpu_peak(device)
    if not args.skip_gowalla:
        # a fresh process, so that its peak RSS is the evaluation's own
        subprocess.run([sys.executable, __file__, "--gowalla-only", "--device", str(device)], check=True)


def print_gpu_peak(device, prefix: str = "") -> None:
    """The GPU's peak allocated memory of this process (CUDA only)."""
    if torch.device(device).type == "cuda":
        print(f"{prefix}gpu_peak_allocated_mb: {torch.cuda.max_memory_allocated() / 2**20:.0f}")


def gowalla_eval(device) -> None:
    from ccdrec.data import load_stream
    from ccdrec.eval import evaluate_block
    from ccdrec.models import MF

    g = load_stream("gowalla")[0]
    m = MF(g.n_users, g.n_items, 64).to(device)
    start = time.perf_counter()
    out = evaluate_block(m, g, "test")
    print(f"gowalla_eval_users: {out['users']}")
    print(f"gowalla_eval_seconds: {time.perf_counter() - start:.1f}")
    print(f"gowalla_eval_peak_rss_mb: {peak_rss_mb():.0f}")
    print_gpu_peak(device, "gowalla_eval_")


if __name__ == "__main__":
    main()
