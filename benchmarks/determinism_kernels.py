"""Which torch kernels of a CCD run are bit-reproducible on several CPU threads, and what they cost.

``python benchmarks/determinism_kernels.py [--threads 2] [--repeats 10]``

Each kernel runs ``--repeats`` times on the same inputs (copied to a fresh, differently aligned buffer
each time) at the shapes of a Yelp block-0 teacher step: the normalised adjacency of D_0 (23,070 nodes,
234,734 non-zeros) times 32-d embeddings, BPR gathers of 4,096 x 5 rows with repeats, a Mult-VAE
encoder gather. Prints, per kernel, ``same`` or ``DIFFERS`` (how many repeats differ from the first
and the largest difference) and the mean milliseconds of one call (forward + backward where a
gradient is involved). A last block repeats the gathers under :func:`ccdrec.determinism.deterministic_kernels`.

``--epochs`` times whole BPR epochs instead: the gathers of before against now, with and without
:func:`ccdrec.determinism.deterministic_kernels`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from ccdrec.data.stream import load_stream
from ccdrec.determinism import deterministic_kernels
from ccdrec.models.graph import normalized_adjacency, propagate_symmetric, segment_spmm, to_torch_sparse
from ccdrec.models.indexing import take_pairs, take_rows


def realigned(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A copy of ``x`` at a random offset of 0-15 elements into a fresh buffer (on CUDA, 0-15 times 128
    elements: the caching allocator aligns every block to 512 bytes, and a CUDA reduction's order
    depends on its input's alignment)."""
    off = int(rng.integers(0, 16)) * (128 if x.is_cuda else 1)
    buf = torch.empty(x.numel() + off, dtype=x.dtype, device=x.device)
    out = buf[off : off + x.numel()].view_as(x)
    out.copy_(x)
    return out


def check(name: str, fn: Callable[[], torch.Tensor], repeats: int) -> None:
    outs = [fn() for _ in range(repeats)]
    bad = [o for o in outs[1:] if not torch.equal(o, outs[0])]
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    ms = (time.perf_counter() - start) / repeats * 1e3
    if bad:
        diff = max((o.double() - outs[0].double()).abs().max().item() for o in bad)
        verdict = f"DIFFERS ({len(bad)} of {repeats - 1} repeats, max |diff| {diff:.2g})"
    else:
        verdict = "same"
    print(f"{name:<46} {verdict:<44} {ms:8.2f} ms")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grad_of(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        w = x.clone().requires_grad_()
        loss_fn(w).backward()
        return w.grad

    return run


def epochs(repeats: int) -> None:
    """Seconds of one BPR epoch (LightGCN-32 and MF-32 on Yelp D_0, the quick preset's teacher
    schedule), gathers by ``table[index]`` (before) against :func:`take_rows` (now), with and without
    :func:`deterministic_kernels`; the variants alternate, and the median of ``repeats`` is shown."""
    import contextlib

    import ccdrec.models.base as base_mod
    import ccdrec.train.loop as loop

    try:  # where the BPR epoch lives
        import ccdrec.train.objectives as bpr_mod
    except ImportError:
        bpr_mod = loop
    from ccdrec.models.lightgcn import MF, LightGCN
    from ccdrec.presets import load_config
    from ccdrec.train.sampling import NegativeSampler

    block = load_stream("yelp")[0]
    r = block.matrix("train", block.n_users, block.n_items)
    cfg = load_config("yelp", preset="quick").teacher.base
    variants = {
        "table[index] (before)": (lambda t, i: t[i], contextlib.nullcontext),
        "take_rows": (take_rows, contextlib.nullcontext),
        "take_rows + deterministic_kernels (default)": (take_rows, deterministic_kernels),
    }
    for kind in (LightGCN, MF):
        torch.manual_seed(0)
        model = kind(block.n_users, block.n_items, dim=32)
        model.set_graph(r)
        opt = loop.make_optimizer(model, cfg)
        sampler = NegativeSampler(r, block.n_items)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(repeats):
            for name, (gather, ctx) in variants.items():
                bpr_mod.take_rows = base_mod.take_rows = gather
                with ctx():
                    start = time.perf_counter()
                    bpr_mod.bpr_epoch(model, opt, block.train, sampler, cfg, np.random.default_rng(rep), rep)
                    times[name].append(time.perf_counter() - start)
        bpr_mod.take_rows = base_mod.take_rows = take_rows
        for name, t in times.items():
            print(f"{kind.__name__}-32 BPR epoch, {name:<44} median {np.median(t):6.2f} s  min {min(t):6.2f} s")
    # a validation pass of the last model (scoring, masking, top-k), with and without the mode
    evals: dict[str, list[float]] = {"plain": [], "deterministic_kernels": []}
    for _ in range(repeats):
        for name, ctx in (("plain", contextlib.nullcontext), ("deterministic_kernels", deterministic_kernels)):
            with ctx():
                start = time.perf_counter()
                loop.evaluate_block(model, block, "valid")
                evals[name].append(time.perf_counter() - start)
    for name, t in evals.items():
        print(f"MF-32 validation pass, {name:<43} median {np.median(t):6.2f} s  min {min(t):6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", action="store_true", help="time BPR epochs of the variants instead (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.epochs:
        epochs(args.repeats)
        return
    torch.set_default_device(args.device)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=args.device).manual_seed(0)
    block = load_stream("yelp")[0]
    adj = to_torch_sparse(normalized_adjacency(block.matrix("train", block.n_users, block.n_items)), args.device)
    n, d, b = adj.shape[0], 32, 4096
    x = torch.randn(n, d, generator=gen) * 0.1
    users = torch.randint(0, block.n_users, (b,), generator=gen)
    items = torch.randint(0, block.n_items, (b, 5), generator=gen)
    g_u = torch.randn(b, d, generator=gen)
    g_i = torch.randn(b, 5, d, generator=gen)
    enc = torch.randn(64, block.n_items, generator=gen)
    cols = torch.randint(0, block.n_items, (60_000,), generator=gen)
    g_c = torch.randn(len(cols), 64, generator=gen)
    scores = torch.randn(1024, block.n_items, generator=gen)
    r = torch.randint(0, 1024, (40_000,), generator=gen)
    c = torch.randint(0, block.n_items, (40_000,), generator=gen)
    r_rows = torch.randint(0, 1024, (200_000,), generator=gen)
    v_rows = torch.randn(len(r_rows), generator=gen)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'kernel':<46} {'repeats':<44} {'time':>11}")

    def bpr_index(w):
        return (w[users] * g_u).sum() + (w[items] * g_i).sum()

    def bpr_take(w):
        return (take_rows(w, users) * g_u).sum() + (take_rows(w, items) * g_i).sum()

    check("sparse.mm(Â, X) (CSR)", lambda: torch.sparse.mm(adj, realigned(x, rng)), args.repeats)
    check("propagate_symmetric fwd+bwd (spmm)", grad_of(lambda w: (propagate_symmetric(adj, w) * x).sum(), x), args.repeats)
    check("scores U @ Iᵀ (1024 users)", lambda: realigned(x[:1024], rng) @ realigned(x[block.n_users :], rng).T, args.repeats)
    check("sum over 740K floats", lambda: realigned(x.reshape(-1), rng).sum(), args.repeats)
    check("index_add_ 200K rows into 1024", lambda: torch.zeros(1024).index_add_(0, r_rows, v_rows), args.repeats)
    check("scatter_add_ 200K into 1024", lambda: torch.zeros(1024).scatter_add_(0, r_rows, v_rows), args.repeats)
    check("BPR gather w[idx] fwd+bwd (index_put_ acc)", grad_of(bpr_index, x), args.repeats)
    check("BPR gather take_rows fwd+bwd (index_select)", grad_of(bpr_take, x), args.repeats)
    check("VAE encoder W.t()[cols] fwd+bwd", grad_of(lambda w: (w.t()[cols] * g_c).sum(), enc), args.repeats)
    check(
        "VAE encoder take_rows(W.t(), cols) fwd+bwd", grad_of(lambda w: (take_rows(w.t(), cols) * g_c).sum(), enc), args.repeats
    )
    check("pairs s[r, c] fwd+bwd", grad_of(lambda w: w[r, c].sum(), scores), args.repeats)
    check("pairs take_pairs(s, r, c) fwd+bwd", grad_of(lambda w: take_pairs(w, r, c).sum(), scores), args.repeats)

    def mask():
        s = scores.clone()
        s[r, c] = -torch.inf
        return s

    check("mask s[r, c] = -inf (evaluation)", mask, args.repeats)
    # deterministic alternatives of Â X where a sparse product's own kernel is not
    coo = adj.to_sparse_coo().coalesce()
    rows, cols_a = coo.indices()
    vals = coo.values()

    def gather_add(w):
        return torch.zeros_like(w).index_add_(0, rows, w.index_select(0, cols_a) * vals[:, None])

    check("COO sparse.mm(Â, X)", lambda: torch.sparse.mm(coo, realigned(x, rng)), args.repeats)
    check("gather + index_add_ (Â X)", lambda: gather_add(realigned(x, rng)), args.repeats)
    check("gather + segment_reduce (segment_spmm)", lambda: segment_spmm(adj, realigned(x, rng)), args.repeats)
    with deterministic_kernels():
        print("-- under deterministic_kernels()")
        check("COO sparse.mm(Â, X)", lambda: torch.sparse.mm(coo, realigned(x, rng)), args.repeats)
        check("gather + index_add_ (Â X)", lambda: gather_add(realigned(x, rng)), args.repeats)
        check("sparse.mm(Â, X)", lambda: torch.sparse.mm(adj, realigned(x, rng)), args.repeats)
        check("propagate_symmetric fwd+bwd (spmm)", grad_of(lambda w: (propagate_symmetric(adj, w) * x).sum(), x), args.repeats)
        check("index_add_ 200K rows into 1024", lambda: torch.zeros(1024).index_add_(0, r_rows, v_rows), args.repeats)
        check("BPR gather w[idx] fwd+bwd (sorting index_put_)", grad_of(bpr_index, x), args.repeats)
        check("BPR gather take_rows fwd+bwd", grad_of(bpr_take, x), args.repeats)
        check(
            "VAE encoder take_rows(W.t(), cols) fwd+bwd",
            grad_of(lambda w: (take_rows(w.t(), cols) * g_c).sum(), enc),
            args.repeats,
        )
        check("pairs take_pairs(s, r, c) fwd+bwd", grad_of(lambda w: take_pairs(w, r, c).sum(), scores), args.repeats)
        check("mask s[r, c] = -inf (evaluation)", mask, args.repeats)


if __name__ == "__main__":
    main()
