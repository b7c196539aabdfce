"""Full-ranking Recall@K and NDCG@K, computed in user chunks (method.md 8).

Every item of the model's universe is a candidate, except the user's other-split items of the same
block (test: train and valid are removed; valid: train and test). Recall@K = |top-K ∩ G| / |G|;
NDCG@K = DCG@K / IDCG with the ideal DCG over min(|G|, K) positions. Memory is bounded by
``chunk x n_items``; per-user values are averaged once at the end, so the result does not depend
on the chunk size.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.data.stream import Block
from ccdrec.models.base import Recommender, Scorer

DEFAULT_KS = (20, 50)
MASK_OF = {"test": ("train", "valid"), "valid": ("train", "test")}


def _rows(m: sp.csr_matrix, users: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(row position, column) of the non-zeros of ``m[users]`` that fall inside ``n_cols``."""
    sub = m[users]
    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    keep = sub.indices < n_cols
    return rows[keep], sub.indices[keep]


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
    """Mean Recall@K / NDCG@K over ``users`` (default: every user with a target item).

    ``target`` and ``exclude`` are binary CSR matrices whose rows are user IDs; their column count may
    be smaller than ``n_items`` (an earlier block's universe).
    """
    target = sp.csr_matrix(target)
    counts = np.diff(target.indptr)
    if users is None:
        users = np.flatnonzero(counts)
    else:
        users = np.asarray(users, dtype=np.int64)
        users = users[(users < target.shape[0])]
        users = users[counts[users] > 0]
    kmax = min(max(ks), n_items)
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    per_user = {f"{m}@{k}": np.zeros(len(users)) for k in ks for m in ("recall", "ndcg")}
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        scores = scorer(torch.from_numpy(batch).to(device)).float()
        if exclude is not None:
            r, c = _rows(exclude, batch, n_items)
            scores[torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)] = -torch.inf
        top = scores.topk(kmax, dim=1).indices.cpu().numpy()
        r, c = _rows(target, batch, n_items)
        truth = np.zeros((len(batch), n_items), dtype=bool)
        truth[r, c] = True
        hits = np.take_along_axis(truth, top, axis=1)
        n_true = counts[batch].astype(np.float64)
        for k in ks:
            kk = min(k, kmax)
            h = hits[:, :kk]
            per_user[f"recall@{k}"][start : start + len(batch)] = h.sum(1) / n_true
            dcg = (h * discounts[:kk]).sum(1)
            ideal = np.cumsum(discounts[:kk])[np.minimum(n_true, kk).astype(int) - 1]
            per_user[f"ndcg@{k}"][start : start + len(batch)] = dcg / ideal
    out = {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user.items()}
    out["users"] = int(len(users))
    return out


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

    Pass ``scorer`` to reuse propagated state across several blocks.
    """
    if split not in MASK_OF:
        raise ValueError(f"evaluation split must be 'valid' or 'test', not {split!r}")
    n_u, n_i = model.n_users, model.n_items
    mask = block.matrix(MASK_OF[split][0], n_u, n_i) + block.matrix(MASK_OF[split][1], n_u, n_i)
    if scorer is None:
        scorer = model.scorer(context=block.matrix("train", n_u, n_i))
    return rank_metrics(scorer, block.matrix(split, n_u, n_i), mask.tocsr(), n_i, users, ks, chunk, model.device)
