"""The avoid lists of BPR negatives (method.md 5.1, 7): the items that the teacher side and the student
side rank highly for an old user are likely positives, so the negatives of that user avoid them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ccdrec.continual.replayer import past_train
from ccdrec.data.stream import Block, pad_to
from ccdrec.distill.ensemble import top_lists, top_matrix
from ccdrec.models.base import Scorer
from ccdrec.pipeline.context import RunContext


def avoid_top(
    scorers: list[Scorer], shape: tuple[int, int], observed: sp.csr_matrix, n: int, users: np.ndarray, device
) -> sp.csr_matrix:
    """Union of each scorer's top-n unobserved items for ``users``, as a binary ``shape`` matrix.

    Every scorer must score the universe ``shape`` = (users, items).
    """
    out = sp.csr_matrix(shape, dtype=np.float32)
    if n <= 0 or len(users) == 0:
        return out
    observed = pad_to(observed, shape)
    for scorer in scorers:
        user_top, _ = top_lists(scorer, shape[0], shape[1], observed, n=n, users=users, device=device, item_side=False)
        out = out + top_matrix(user_top, shape[1])
    out.data[:] = 1.0
    return out


def avoid_lists(
    ctx: RunContext,
    scorers: list[Scorer],
    block: Block,
    shape: tuple[int, int],
    lists: list[np.ndarray] = (),
    n: int | None = None,
    prev: Block | None = None,
) -> sp.csr_matrix | None:
    """Old users' top-``n`` items (default ``student.avoid_top``) of ``scorers`` and of the precomputed
    top ``lists`` (user x rank arrays of item IDs) in the universe ``shape``, their train items of
    ``block`` and ``prev`` (default: the block before ``block``) left out; None when ``n`` is 0."""
    n = ctx.cfg.student.avoid_top if n is None else n
    if n <= 0:
        return None
    users = np.arange(block.prev_users, dtype=np.int64)
    if prev is None and block.index:
        prev = ctx.stream[block.index - 1]
    observed = past_train(block, prev)
    out = avoid_top(scorers, shape, observed, n, users, ctx.device)
    for top in lists:
        out = out + pad_to(top_matrix(top[: block.prev_users, :n], shape[1]), shape)
    out.data[:] = 1.0
    return out.tocsr()
