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


def spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Â x for a sparse CSR Â, bit-reproducible on the CPU (for a fixed thread count) and on CUDA.

    On the CPU, torch's CSR product splits the *rows* over the threads and sums each row in one
    thread, so it is reproducible for a fixed thread count (``benchmarks/determinism_kernels.py``).
    On CUDA, cuSPARSE's product is not reproducible from run to run (its last bits vary, even under
    ``torch.use_deterministic_algorithms``), so the rows are summed as segments instead: the
    ``nnz x d`` products ``Â_rc · x_c`` are gathered and each row's segment is reduced in order
    (``torch.segment_reduce``), which involves no atomic adds.
    """
    if x.device.type == "cpu":
        return torch.sparse.mm(adj, x)
    return segment_spmm(adj, x)


def segment_spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Â x for a sparse CSR Â by gathering the non-zeros' products and reducing each row's segment."""
    products = x.index_select(0, adj.col_indices()) * adj.values().unsqueeze(1).to(x.dtype)
    return torch.segment_reduce(products, "sum", offsets=adj.crow_indices(), axis=0, unsafe=True, initial=0.0)


class _SymmetricSpMM(torch.autograd.Function):
    """y = Â x for a *symmetric* sparse Â; the backward pass reuses Â (Âᵀ = Â) instead of transposing.

    Both directions are the product :func:`spmm`: no scatter or atomic add is involved, so the
    gradient is as reproducible as the forward pass.
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return spmm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, spmm(ctx.adj, grad)


def propagate_symmetric(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Â x with a cheap backward pass; Â must be symmetric (the normalised bipartite adjacency is)."""
    return _SymmetricSpMM.apply(adj, x)
