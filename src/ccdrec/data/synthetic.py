"""A synthetic block stream with planted preferences and drift, for tests and examples.

Users and items belong to latent clusters; a user's interactions fall in its own cluster with
probability ``affinity`` and are uniform otherwise, so a model that learns the clusters scores far
above random. Every block brings new users and new items (IDs appended in order of first
appearance) and the cluster popularity drifts from block to block.
"""

from __future__ import annotations

import numpy as np

from ccdrec.arguments import check_fraction, check_int
from ccdrec.data.split import split_block
from ccdrec.data.stream import Block, Stream
from ccdrec.errors import InvalidArgument


def synthetic_stream(
    n_blocks: int = 4,
    base_users: int = 200,
    base_items: int = 120,
    new_users: int = 40,
    new_items: int = 20,
    clusters: int = 6,
    per_user: int = 15,
    affinity: float = 0.9,
    old_user_activity: float = 0.6,
    seed: int = 0,
) -> Stream:
    """A :class:`Stream` of ``n_blocks`` blocks (block 0 plus ``n_blocks - 1`` incremental ones).

    Sizes are ints: ``n_blocks``, ``base_users``, ``base_items``, ``clusters`` and ``per_user`` at least 1
    (``base_items`` at least ``clusters``, so that every cluster has items), ``new_users`` / ``new_items``
    at least 0; ``affinity`` and ``old_user_activity`` are fractions in [0, 1]; a mistake is an
    :class:`~ccdrec.errors.InvalidArgument` or :class:`~ccdrec.errors.WrongArgumentType`."""
    n_blocks, base_users, base_items = (
        check_int("n_blocks", n_blocks),
        check_int("base_users", base_users),
        check_int("base_items", base_items),
    )
    new_users, new_items = check_int("new_users", new_users, minimum=0), check_int("new_items", new_items, minimum=0)
    clusters, per_user = check_int("clusters", clusters), check_int("per_user", per_user)
    seed = check_int("seed", seed, minimum=0)
    if base_items < clusters:
        raise InvalidArgument(f"base_items ({base_items}) must be at least clusters ({clusters}): every cluster needs an item")
    affinity = check_fraction("affinity", affinity, closed=True)
    old_user_activity = check_fraction("old_user_activity", old_user_activity, closed=True)
    rng = np.random.default_rng(seed)
    total_u = base_users + new_users * (n_blocks - 1)
    total_i = base_items + new_items * (n_blocks - 1)
    user_cluster = rng.integers(0, clusters, total_u)
    item_cluster = np.arange(total_i) % clusters
    blocks: list[Block] = []
    prev_u = prev_i = 0
    for k in range(n_blocks):
        n_u = base_users + new_users * k
        n_i = base_items + new_items * k
        # drift: each block favours a rotating subset of items inside every cluster
        weight = np.exp(rng.normal(0, 1.0, n_i))
        weight[prev_i:n_i] *= 3.0  # new items are trendy
        active = np.concatenate([np.flatnonzero(rng.random(prev_u) < old_user_activity), np.arange(prev_u, n_u)])
        rows = []
        for u in active:
            same = np.flatnonzero(item_cluster[:n_i] == user_cluster[u])
            n_same = rng.binomial(per_user, affinity)
            p = weight[same] / weight[same].sum()
            liked = rng.choice(same, size=min(n_same, len(same)), replace=False, p=p)
            noise = rng.integers(0, n_i, per_user - n_same)
            for i in np.concatenate([liked, noise]):
                rows.append((u, i))
        splits = split_block(np.array(rows, dtype=np.int64), rng)
        blocks.append(Block(k, n_u, n_i, prev_u, prev_i, **splits))
        prev_u, prev_i = n_u, n_i
    return Stream("synthetic", blocks)
