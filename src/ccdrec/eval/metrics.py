"""Full-ranking Recall@K and NDCG@K, computed in user chunks (method.md 8).

Every item of the model's universe is a candidate, except the user's other-split items of the same
block (test: train and valid are removed; valid: train and test). Recall@K = |top-K ∩ G| / |G|;
NDCG@K = DCG@K / IDCG with the ideal DCG over min(|G|, K) positions. Memory is bounded by
``chunk x n_items``; per-user values are averaged once at the end, so the result does not depend
on the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.data.stream import Block, pad_to
from ccdrec.models.base import Recommender, Scorer
from ccdrec.models.checks import InvalidArgument, WrongArgumentType, check_indices, check_int, check_ks, check_universe

DEFAULT_KS = (20, 50)
MASK_OF = {"test": ("train", "valid"), "valid": ("train", "test")}


def _rows(m: sp.csr_matrix, users: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(row position, column) of the non-zeros of ``m[users]`` that fall inside ``n_cols``."""
    sub = m[users]
    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    keep = sub.indices < n_cols
    return rows[keep], sub.indices[keep]


def _check_run(ks, chunk) -> tuple[tuple[int, ...], int]:
    """The cut-offs ``ks`` (a non-empty tuple of ints >= 1) and ``chunk`` (an int >= 1), checked."""
    return check_ks("ks", ks), check_int("chunk", chunk)


def _check_users(users, n_users: int | None = None) -> np.ndarray | None:
    """``users`` (None, or integer user indices in 0..n_users-1; any non-negative ones without
    ``n_users``) as an int64 array."""
    return None if users is None else check_indices("users", users, n_users, "user indices")


_NO_SPLIT = object()


def _check_block(block, split=_NO_SPLIT) -> None:
    if not isinstance(block, Block):
        raise WrongArgumentType(f"block must be a ccdrec.data.stream.Block (e.g. stream[0]), not {type(block).__name__}")
    if split is not _NO_SPLIT and (not isinstance(split, str) or split not in MASK_OF):
        raise InvalidArgument(f"evaluation split must be 'valid' or 'test', not {split!r}")


def _check_model(model) -> None:
    if not all(hasattr(model, a) for a in ("n_users", "n_items", "scorer")):
        raise WrongArgumentType(
            f"model must be a ccdrec model (MF, LightGCN, MultVAE, a RankEnsemble), not {type(model).__name__}"
        )


@dataclass
class Target:
    """One evaluation target: the held-out items of each user, the items masked from the ranking,
    and the users evaluated (``None``: every user with a target item)."""

    target: sp.csr_matrix
    exclude: sp.csr_matrix | None
    users: np.ndarray | None = None


def rank_metrics(
    scorer: Scorer,
    target: sp.csr_matrix,
    exclude: sp.csr_matrix | None,
    n_items: int,
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over ``users`` (default: every user with a target item), and ``users``
    (how many were evaluated). Over no users every metric is ``None`` (missing, not 0).

    ``target`` and ``exclude`` are binary CSR matrices whose rows are user IDs; their column count may
    be smaller than ``n_items`` (an earlier block's universe). ``ks`` must be a non-empty tuple of ints of at
    least 1, ``chunk`` an int of at least 1.
    """
    return rank_metrics_many(scorer, [Target(target, exclude, users)], n_items, ks, chunk, device)[0]


class _Tally:
    """Per-user Recall@K / NDCG@K of one :class:`Target`, filled one user chunk at a time."""

    def __init__(self, t: Target, n_items: int, ks: tuple[int, ...]):
        self.target = _as_csr("target", t.target, n_items)
        self.exclude = None if t.exclude is None else _as_csr("exclude", t.exclude, n_items)
        if self.exclude is not None and self.exclude.shape[0] < self.target.shape[0]:  # users past its rows mask nothing
            self.exclude = pad_to(self.exclude, (self.target.shape[0], self.exclude.shape[1]))
        self.n_items, self.ks = n_items, ks
        self.counts = np.diff(self.target.indptr)
        users = np.flatnonzero(self.counts) if t.users is None else np.unique(_check_users(t.users))
        users = users[users < self.target.shape[0]]
        self.users = users[self.counts[users] > 0]
        self.kmax = min(max(ks), n_items)
        self.discounts = 1.0 / np.log2(np.arange(2, self.kmax + 2))
        self.per_user = {f"{m}@{k}": np.zeros(len(self.users)) for k in ks for m in ("recall", "ndcg")}

    def wanted(self, batch: np.ndarray) -> np.ndarray:
        """The users of the sorted ``batch`` that this target evaluates."""
        lo, hi = np.searchsorted(self.users, [batch[0], batch[-1] + 1])
        return self.users[lo:hi]

    def add(self, batch: np.ndarray, scores: torch.Tensor) -> None:
        """Score rows of the sorted, unique users ``batch`` (the rows of ``scores``)."""
        lo, hi = np.searchsorted(self.users, [batch[0], batch[-1] + 1])
        if lo == hi:
            return
        mine = self.users[lo:hi]
        dev = scores.device
        scores = scores[torch.from_numpy(np.searchsorted(batch, mine)).to(dev)]
        if self.exclude is not None:
            r, c = _rows(self.exclude, mine, self.n_items)
            scores[torch.from_numpy(r).to(dev), torch.from_numpy(c).to(dev)] = -torch.inf
        top = scores.topk(self.kmax, dim=1).indices.cpu().numpy()
        r, c = _rows(self.target, mine, self.n_items)
        # hits[b, p]: is the item at position p of row b a target item? (pair keys, no dense row mask)
        hits = np.isin(np.arange(len(mine))[:, None] * self.n_items + top, r * self.n_items + c)
        n_true = self.counts[mine].astype(np.float64)
        for k in self.ks:
            kk = min(k, self.kmax)
            h = hits[:, :kk]
            self.per_user[f"recall@{k}"][lo:hi] = h.sum(1) / n_true
            dcg = (h * self.discounts[:kk]).sum(1)
            ideal = np.cumsum(self.discounts[:kk])[np.minimum(n_true, kk).astype(int) - 1]
            self.per_user[f"ndcg@{k}"][lo:hi] = dcg / ideal

    def result(self) -> dict[str, float]:
        # a metric over no users is missing (None in metrics.jsonl), not 0
        res = {name: float(v.mean()) if len(v) else None for name, v in self.per_user.items()}
        res["users"] = int(len(self.users))
        return res


def _as_csr(name: str, matrix, n_items: int) -> sp.csr_matrix:
    """A (users x items) target or mask as CSR without stored zeros: a SciPy sparse matrix, or a dense 2-D
    array or tensor, of at most ``n_items`` columns (an earlier universe's may have fewer); more columns
    are an :class:`InvalidArgument` (items outside the ranking would count in |G| and never be hit)."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    if not sp.issparse(matrix) and not (isinstance(matrix, np.ndarray) and matrix.ndim == 2):
        raise WrongArgumentType(f"{name} must be a (users x items) scipy.sparse matrix or 2-D array, not {type(matrix).__name__}")
    m = sp.csr_matrix(matrix)
    if m.shape[1] > n_items:
        raise InvalidArgument(f"{name} has {m.shape[1]:,} item columns, more than the {n_items:,} items ranked")
    if m.nnz and not m.data.all():  # a stored 0 is no interaction (a copy: the caller's matrix is left alone)
        m = m.copy()
        m.eliminate_zeros()
    return m


def _check_device(device) -> torch.device:
    """``device`` as a torch device; a name torch does not know is an :class:`InvalidArgument`."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument(f"unknown device {device!r:.40}; expected e.g. 'cpu' or 'cuda'") from None


def check_scores(scores, rows: int, n_items: int) -> None:
    """A scorer's answer for ``rows`` users must be a (rows, n_items) tensor: one score per item of the universe."""
    if not isinstance(scores, torch.Tensor):
        raise WrongArgumentType(f"the scorer must return a torch.Tensor of scores, not {type(scores).__name__}")
    if scores.dim() != 2 or tuple(scores.shape) != (rows, n_items):
        raise InvalidArgument(
            f"the scorer returned scores of shape {tuple(scores.shape)} for {rows} users; expected ({rows}, {n_items}): "
            "one score per item of the model's universe"
        )


def _per_context(scorers: list[Scorer]):
    """One scorer per context as a :func:`rank_metrics_contexts` scorer (each scores only its rows)."""

    def score(users: torch.Tensor, rows):
        for s, r in zip(scorers, rows, strict=True):
            yield s(users[r.to(users.device)]) if len(r) else None

    return score


def rank_metrics_many(
    scorer: Scorer,
    targets: list[Target],
    n_items: int,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """:func:`rank_metrics` of several targets from one scoring pass over the union of their users.

    Every user is scored once, then each target masks and ranks its own copy of the user's row, so the
    result equals separate calls (a rank ensemble's sorts or a LightGCN's scoring are paid once).
    """
    return rank_metrics_contexts(_per_context([scorer]), [targets], n_items, ks, chunk, device)[0]


def rank_metrics_contexts(
    context_scorer,
    groups: list[list[Target]],
    n_items: int,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> list[list[dict[str, float]]]:
    """:func:`rank_metrics_many` of several groups of targets, group g scored under context g.

    ``context_scorer(users, rows)`` yields, for each group in turn, the scores of ``users[rows[g]]``
    under that group's context (:meth:`ccdrec.distill.ensemble.RankEnsemble.context_scorer`: an
    ensemble ranks its context-free members once per user chunk for all groups). One pass over the
    union of all groups' users; each group scores only the users it evaluates.
    """
    ks, chunk = _check_run(ks, chunk)
    device = _check_device(device)
    n_items = check_int("n_items", n_items)
    tallies = [[_Tally(t, n_items, ks) for t in g] for g in groups]
    every = [t.users for g in tallies for t in g]
    union = np.unique(np.concatenate(every)) if every else np.empty(0, dtype=np.int64)
    for start in range(0, len(union), chunk):
        batch = union[start : start + chunk]
        wanted = [np.unique(np.concatenate([t.wanted(batch) for t in g])) if g else batch[:0] for g in tallies]
        rows = [torch.from_numpy(np.searchsorted(batch, w)) for w in wanted]
        scores = context_scorer(torch.from_numpy(batch).to(device), rows)
        for g, w, sc in zip(tallies, wanted, scores, strict=True):
            if len(w) and g:
                check_scores(sc, len(w), n_items)
            for t in g if len(w) else ():
                t.add(w, sc.float())
    return [[t.result() for t in g] for g in tallies]


def evaluate_block(
    model: Recommender,
    block: Block,
    split: str = "test",
    users: np.ndarray | None = None,
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
    scorer: Scorer | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on one split of ``block`` with the masking of method.md 8.

    Pass ``scorer`` to reuse propagated state across several blocks. The model's universe must hold the
    block's (a model of an earlier block is grown to it first, :meth:`~ccdrec.models.base.Recommender.grow`);
    ``users`` (default: every user with a target item) are user indices; ``ks`` a non-empty tuple of ints
    of at least 1, ``chunk`` an int of at least 1. Mistakes are one-line ``ValueError`` / ``TypeError``.
    """
    ks, chunk = _check_run(ks, chunk)
    t = block_target(model, block, split, users)
    if scorer is not None and not callable(scorer):
        raise WrongArgumentType(f"scorer must be a function of user indices (model.scorer()), not {type(scorer).__name__}")
    if scorer is None:
        scorer = model.scorer(context=block.matrix("train", model.n_users, model.n_items))
    return rank_metrics(scorer, t.target, t.exclude, model.n_items, t.users, ks, chunk, model.device)


def block_target(model: Recommender, block: Block, split: str, users: np.ndarray | None = None) -> Target:
    """The :class:`Target` of one split of ``block`` in ``model``'s universe, masked as in method.md 8."""
    _check_model(model)
    _check_block(block, split)
    check_universe(model, block, exact=False, doing=f"evaluate on block {block.index}")
    users = _check_users(users, model.n_users)
    n_u, n_i = model.n_users, model.n_items
    mask = block.matrix(MASK_OF[split][0], n_u, n_i) + block.matrix(MASK_OF[split][1], n_u, n_i)
    return Target(block.matrix(split, n_u, n_i), mask.tocsr(), users)


def evaluate_many(
    model: Recommender,
    requests: list[tuple[Block, str, np.ndarray | None]],
    ks: tuple[int, ...] = DEFAULT_KS,
    chunk: int = 1024,
) -> list[dict[str, float]]:
    """:func:`evaluate_block` for each ``(block, split, users)`` request, in one pass over the union of
    their users. A model whose scores ignore the context (``uses_context`` False: MF, LightGCN and their
    ensembles) scores each user once; one that reads it (a Mult-VAE reads the block's train rows as its
    input) scores each block's users under that block's context, and a rank ensemble with Mult-VAE
    members (``context_scorer``) still ranks its context-free members once per user."""
    ks, chunk = _check_run(ks, chunk)
    if not isinstance(requests, (list, tuple)) or not all(isinstance(r, (list, tuple)) and len(r) == 3 for r in requests):
        raise WrongArgumentType("requests must be a list of (block, split, users) triples, e.g. [(stream[0], 'test', None)]")
    _check_model(model)
    for block, split, users in requests:
        _check_block(block, split)
        check_universe(model, block, exact=False, doing=f"evaluate on block {block.index}")
        _check_users(users, model.n_users)
    groups: dict[int, list[int]] = {}
    for n, (block, _, _) in enumerate(requests):
        groups.setdefault(block.index if getattr(model, "uses_context", True) else -1, []).append(n)
    order = list(groups.values())
    contexts = [requests[g[0]][0].matrix("train", model.n_users, model.n_items) for g in order]
    if hasattr(model, "context_scorer"):
        # a rank ensemble ranks its context-free members once for every block's targets
        scorer = model.context_scorer(contexts)
    else:
        scorer = _per_context([model.scorer(context=c) for c in contexts])
    targets = [[block_target(model, *requests[n]) for n in g] for g in order]
    out: list[dict[str, float]] = [{} for _ in requests]
    for g, res in zip(order, rank_metrics_contexts(scorer, targets, model.n_items, ks, chunk, model.device), strict=True):
        for n, r in zip(g, res, strict=True):
            out[n] = r
    return out
