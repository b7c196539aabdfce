"""Per-user random train/valid/test split inside one block (method.md 2).

Each user's interactions of the block are shuffled and cut about 80/10/10, with at least one
valid and one test item for users with three or more interactions (users with fewer keep all of
them in train). Valid/test items that no user trains on in the block are then dropped.
"""

from __future__ import annotations

import numpy as np


def split_block(pairs: np.ndarray, rng: np.random.Generator, valid: float = 0.1, test: float = 0.1) -> dict[str, np.ndarray]:
    """Split deduplicated (user, item) ``pairs`` of one block into ``train``/``valid``/``test``.

    Each split comes back sorted by (user, item), the canonical order of a loaded stream.
    """
    pairs = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    order = np.lexsort((rng.random(len(pairs)), pairs[:, 0]))  # group by user, random inside
    pairs = pairs[order]
    users, starts, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    pos = np.arange(len(pairs)) - np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    n_test = np.where(n >= 3, np.maximum(1, np.round(n * test)), 0).astype(np.int64)
    n_valid = np.where(n >= 3, np.maximum(1, np.round(n * valid)), 0).astype(np.int64)
    label = np.where(pos < n_test, 2, np.where(pos < n_test + n_valid, 1, 0))
    train = pairs[label == 0]
    trained_items = np.unique(train[:, 1])
    out = {"train": np.unique(train, axis=0)}
    for name, code in (("valid", 1), ("test", 2)):
        part = pairs[label == code]
        out[name] = np.unique(part[np.isin(part[:, 1], trained_items)], axis=0).reshape(-1, 2)
    return out
