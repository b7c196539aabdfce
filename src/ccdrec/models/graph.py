"""The symmetric-normalised bipartite adjacency of LightGCN (method.md 3).

Â = D^{-1/2} A D^{-1/2} with A = [[0, R], [Rᵀ, 0]]; zero-degree nodes get 0. Built sparse only:
never a dense (U+I)² matrix.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def normalized_adjacency(train_matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Â for the bipartite graph of ``train_matrix`` (users x items), as a (U+I)² scipy CSR."""
    r = sp.csr_matrix(train_matrix, dtype=np.float32)
    n_u, n_i = r.shape
    a = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    deg = np.asarray(a.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        d = np.where(deg > 0, deg**-0.5, 0.0).astype(np.float32)
    dm = sp.diags(d)
    out = (dm @ a @ dm).tocsr()
    out.sort_indices()
    assert out.shape == (n_u + n_i, n_u + n_i)
    return out


def to_torch_sparse(m: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """A scipy matrix as a torch sparse CSR tensor (float32)."""
    m = sp.csr_matrix(m, dtype=np.float32)
    with warnings.catch_warnings():  # torch's notes that sparse CSR is "beta" and unchecked
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data),
            size=m.shape,
            device=device,
        )


class _SymmetricSpMM(torch.autograd.Function):
    """y = Â x for a *symmetric* sparse Â; the backward pass reuses Â (Âᵀ = Â) instead of transposing."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adj, grad)


def propagate_symmetric(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Â x with a cheap backward pass; Â must be symmetric (the normalised bipartite adjacency is)."""
    return _SymmetricSpMM.apply(adj, x)
