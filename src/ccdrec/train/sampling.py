"""Uniform negative sampling with per-user exclusion sets (method.md 4, 5.1, 7).

Excluded (user, item) pairs (the user's positives, and optionally likely positives such as the top-40
of the teacher and the proxies) are encoded as sorted int64 keys ``user * n_items + item``; rejected
draws are redrawn a bounded number of times.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MAX_REDRAWS = 20


def pair_keys(matrix: sp.spmatrix) -> np.ndarray:
    """Sorted unique keys ``row * n_cols + col`` of the non-zeros of ``matrix``.

    Read from the canonical CSR form (rows in order, sorted and merged columns), which is already
    sorted and unique: ``np.unique`` of the keys takes seconds on a million pairs (numpy 2's hash path).
    """
    csr = sp.csr_matrix(matrix, copy=True)
    csr.sum_duplicates()
    rows = np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))
    return rows * csr.shape[1] + csr.indices.astype(np.int64)


class NegativeSampler:
    """Draws items uniformly from ``[0, n_items)`` avoiding each user's excluded items."""

    def __init__(self, exclude: sp.spmatrix, n_items: int | None = None):
        self.n_items = int(n_items or exclude.shape[1])
        if exclude.shape[1] != self.n_items:
            exclude = (
                sp.csr_matrix(exclude)[:, : self.n_items]
                if exclude.shape[1] > self.n_items
                else sp.csr_matrix(exclude, shape=(exclude.shape[0], self.n_items))
            )
        self.keys = pair_keys(exclude)

    def excluded(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        k = users.astype(np.int64) * self.n_items + items
        pos = np.searchsorted(self.keys, k)
        pos = np.minimum(pos, len(self.keys) - 1) if len(self.keys) else pos
        return self.keys[pos] == k if len(self.keys) else np.zeros(len(k), dtype=bool)

    def sample(self, users: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(len(users), n)`` negative items."""
        flat_users = np.repeat(users, n)
        items = rng.integers(0, self.n_items, size=len(flat_users))
        bad = self.excluded(flat_users, items)
        for _ in range(MAX_REDRAWS):
            if not bad.any():
                break
            idx = np.flatnonzero(bad)
            items[idx] = rng.integers(0, self.n_items, size=len(idx))
            bad[idx] = self.excluded(flat_users[idx], items[idx])
        return items.reshape(len(users), n)
