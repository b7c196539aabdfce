"""Model selection of a distilled student that sees retention: its agreement with the teacher's lists
on old users (issue 18; beyond the paper, which selects D_k on block k's validation split alone, method.md 7).

Block k's validation split holds only the users active in block k, so selecting D_k on it alone
rewards plasticity: a fresh student stopped after an epoch or two scores well there while its old
users' rows are still near their random start. The teacher's interesting lists of the old users need
no old data, and say how much of E_k's knowledge of them D_k holds:

    teacher_recall@K = mean over sampled old users u of |top-K(D_k, u) ∩ top-K(E_k, u)| / min(K, |top-K(E_k, u)|)

(Recall@K with E_k's top-K as the relevant set; u's train items are masked on both sides, as the lists
exclude them), and model selection maximises

    retention_h@K = 2 · v · a / (v + a),   v = the validation select metric, a = teacher_recall@K.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ccdrec.distill.ensemble import top_matrix
from ccdrec.eval.metrics import rank_metrics
from ccdrec.eval.protocol import harmonic
from ccdrec.models.base import Recommender
from ccdrec.train.callbacks import Callback

DEFAULT_USERS = 2000


class TeacherAgreement(Callback):
    """Adds ``teacher_recall@K`` and ``retention_h@K`` to every validation of :func:`ccdrec.train.loop.fit`.

    ``user_top``: (U, n) the teacher's interesting items per user (-1 = padding; only the first K are
    used); ``users``: the old users to check (IDs); ``observed``: (U, I) the block's train pairs, masked;
    ``metric``: the validation figure it is combined with (``recall@K`` or ``ndcg@K``; K is taken from it).
    ``retention_h@K`` is the harmonic mean of the two; where either is missing (no users), the other.
    """

    def __init__(self, user_top: np.ndarray, users: np.ndarray, observed: sp.spmatrix, metric: str, chunk: int = 1024):
        self.metric = metric
        self.k = int(metric.split("@")[1])
        top = np.asarray(user_top)[:, : self.k]
        self.target = top_matrix(top, int(observed.shape[1]))
        self.users = np.unique(np.asarray(users, dtype=np.int64))
        self.observed = sp.csr_matrix(observed)
        self.chunk = chunk

    @property
    def key(self) -> str:
        """The validation figure model selection maximises."""
        return f"retention_h@{self.k}"

    def on_validate(self, model: Recommender, epoch: int, valid: dict) -> None:
        observed = self.observed[:, : model.n_items]
        scorer = model.scorer(context=observed)
        got = rank_metrics(scorer, self.target, observed, model.n_items, self.users, (self.k,), self.chunk, model.device)
        a, v = got[f"recall@{self.k}"], valid.get(self.metric)
        valid[f"teacher_recall@{self.k}"] = a
        valid[self.key] = v if a is None else a if v is None else harmonic(v, a)


def old_users_sample(n_old: int, listed: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` users drawn (without replacement, seeded) among the old users ``0..n_old-1`` that have
    a list (``listed``: bool per user)."""
    candidates = np.flatnonzero(np.asarray(listed[:n_old]))
    if len(candidates) <= n:
        return candidates
    return np.sort(np.random.default_rng(seed).choice(candidates, size=n, replace=False))


__all__ = ["DEFAULT_USERS", "TeacherAgreement", "old_users_sample"]
