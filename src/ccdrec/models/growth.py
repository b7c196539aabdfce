"""Growing a model to a larger universe, and entity embedding initialisation (method.md 3, 5.2).

For a new user u of block k (items are symmetric, with R transposed):

* 1-hop: e¹ = mean of the ego embeddings of the *old* items u interacted with in block k (0 if none);
* 2-hop, "prominent entity trend": among the old users sharing at least one block-k item with u,
  the K = 20 most active in block k (filled up with the most active old users of block k when fewer
  exist; the K most active old users when none); e² = the mean of their embeddings;
* new row = (e¹ + e²) / 2. A new ID without any block-k interaction gets e²/2 of the most active
  old entities.

Options: ``random`` (N(0, 0.01²)) and ``one_hop`` (e¹ alone). Unlike the authors' release, exactly
K neighbours are used when exactly K exist (method.md 9).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.models.base import INIT_STD, InitStrategy

TREND_K = 20


def grow_table(table: torch.Tensor, n_rows: int, new_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``table`` with rows appended up to ``n_rows``; old rows are copied bit-identically."""
    n_old, dim = table.shape
    if n_rows < n_old:
        raise ValueError(f"cannot shrink a table from {n_old} to {n_rows} rows")
    if new_rows is None:
        new_rows = torch.randn(n_rows - n_old, dim, dtype=table.dtype, device=table.device) * INIT_STD
    return torch.cat([table.detach(), new_rows.to(table)], dim=0)


def entity_rows(
    own_table: torch.Tensor,
    other_table: torch.Tensor | None,
    matrix: sp.csr_matrix,
    n_old: int,
    n_other_old: int,
    n_new_total: int,
    strategy: InitStrategy = "entity",
    k: int = TREND_K,
) -> torch.Tensor:
    """Initial rows for entities ``[n_old, n_new_total)`` of one side (method.md 5.2).

    ``own_table``: old ego table of this side (n_old x d); ``other_table``: old ego table of the
    other side (its first ``n_other_old`` rows are old entities; ``None`` disables the 1-hop term);
    ``matrix``: block-k train matrix oriented this-side x other-side.
    """
    n_new = n_new_total - n_old
    dim = own_table.shape[1]
    if n_new <= 0:
        return own_table.new_zeros((0, dim))
    if strategy == "random" or n_old == 0:
        return torch.randn(n_new, dim, dtype=own_table.dtype, device=own_table.device) * INIT_STD
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m = m[:n_new_total]
    new_part = m[n_old:n_new_total]
    # 1-hop: mean of old neighbours of the other side.
    e1 = own_table.new_zeros((n_new, dim))
    if other_table is not None:
        hop = new_part[:, :n_other_old]
        cnt = np.asarray(hop.sum(axis=1)).ravel()
        if hop.nnz:
            summed = torch.from_numpy(hop @ other_table[:n_other_old].detach().cpu().numpy())
            e1 = (summed / torch.from_numpy(np.maximum(cnt, 1.0))[:, None]).to(own_table)
    if strategy == "one_hop":
        return e1
    # 2-hop: the K most active old same-side entities sharing a block-k neighbour.
    old_part = m[:n_old]
    activity = np.asarray(old_part.sum(axis=1)).ravel()
    by_activity = np.lexsort((np.arange(n_old), -activity))  # most active first, ties by ID
    default = by_activity[: min(k, n_old)]
    shared = (new_part @ old_part.T).tocsr()
    own_old = own_table[:n_old].detach()
    e2 = own_table.new_empty((n_new, dim))
    has_any = np.diff(new_part.indptr) > 0
    for r in range(n_new):
        cols = shared.indices[shared.indptr[r] : shared.indptr[r + 1]]
        if len(cols) >= k:
            order = np.lexsort((cols, -activity[cols]))
            chosen = cols[order[:k]]
        elif len(cols) > 0:
            rest = default[~np.isin(default, cols)][: k - len(cols)]
            chosen = np.concatenate([cols, rest])
        else:
            chosen = default
        e2[r] = own_old[torch.from_numpy(chosen)].mean(0)
    out = (e1 + e2) / 2
    # With no interaction at all, e¹ is zero and the row is e²/2 of the most active old entities.
    out[torch.from_numpy(~has_any)] = own_old[torch.from_numpy(default)].mean(0) / 2
    return out
