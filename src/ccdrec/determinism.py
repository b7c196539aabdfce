"""Bit-identical runs: the same seed and thread count give the same metrics and checkpoints.

Every stage seeds its own generators (:func:`ccdrec.pipeline.context.stage_seed`), so what remains is
the kernels (``benchmarks/determinism_kernels.py`` checks each one the training uses):

* CPU: ``index_put_(accumulate=True)``, autograd's backward of ``table[index]``, adds repeated rows
  with atomics in thread order; the training code's gathers go through :mod:`ccdrec.models.indexing`
  instead (``index_select``, whose backward ``index_add_`` is reproducible and faster). The CSR
  product, dense products, ``index_add_``, ``scatter_add_``, reductions, the Adam step and the NumPy
  sorts of :mod:`ccdrec.eval.ranking` are reproducible for a fixed thread count.
* CUDA: ``index_add_``, ``scatter_add_`` and the gathers' backward passes use atomics unless torch's
  deterministic mode is on (:func:`deterministic_kernels`); cuSPARSE's product is not reproducible
  even then, so LightGCN's propagation sums segments there (:func:`ccdrec.models.graph.spmm`).

:func:`deterministic_kernels` switches torch to its deterministic implementations while a stage runs
(:func:`ccdrec.pipeline.staged.run_measured`): needed on CUDA, a safety net on the CPU (a
differentiable ``table[index]`` added later takes torch's sorting kernel instead of the atomic one).
cuBLAS gets a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``). Ops without a deterministic
implementation only warn (``warn_only``). Uninitialised memory is not filled with NaN (torch's
default in this mode): nothing here reads it, and filling every ``empty`` costs time.
Results still depend on the thread count and the hardware: runs are comparable bit for bit with the
same ``--threads`` on the same kind of machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """torch's deterministic kernels inside the block (the previous settings are restored after it)."""
    # cuBLAS reads this when it first allocates a workspace: set it before any CUDA product runs
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = before[2]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[3], before[4]
