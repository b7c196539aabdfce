"""Bit-identical runs: the same seed and thread count give the same metrics and checkpoints.

Every stage seeds its own generators (:func:`ccdrec.pipeline.stages.stage_seed`), so what remains is
the kernels. On the CPU the training code avoids the one torch kernel whose floating-point sums
depend on thread timing, ``index_put_(accumulate=True)`` (autograd's backward of ``table[index]``):
its gathers go through :mod:`ccdrec.models.indexing`. The other kernels a run uses are deterministic
for a fixed thread count (measured: CSR ``sparse.mm``, MKL matrix products, ``index_add_``,
``scatter_add_``, reductions, the fused Adam step, NumPy sorts in threads over disjoint rows).

:func:`deterministic_kernels` additionally switches torch to its deterministic implementations while
a stage runs, as a safety net on the CPU (a differentiable ``table[index]`` added later takes torch's
sorting kernel instead of the atomic one) and for CUDA (``index_add_``, ``scatter_add_`` and the
backward passes of gathers use atomics there; cuBLAS needs a fixed workspace). Ops that have no
deterministic implementation only warn (``warn_only``). Uninitialised memory is not filled with NaN
(torch's default in this mode): nothing here reads it, and filling every ``empty`` costs time.
Results still depend on the thread count and the hardware; runs are comparable bit for bit only
with the same ``--threads`` on the same kind of machine.
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
