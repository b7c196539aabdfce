"""Sorting score rows fast on either device.

On the CPU, NumPy's vectorised sorts are several times faster than ``torch.sort`` (measured here on
512 x 12,000 float32 rows: ``np.argsort`` 0.18 s vs ``torch.argsort`` 1.06 s; ``np.sort`` 0.04 s vs
``torch.sort`` 0.71 s). NumPy sorts plain int64 keys faster still than it argsorts floats, so the
descending order is read from one sort of packed keys (order-preserving score bits in the high half,
the column in the low half): 0.17 s instead of 0.23 s for 512 x 41,000 rows. NumPy sorts on one
core, so the rows are split over ``torch.get_num_threads()`` threads (the sorts release the GIL). On
CUDA, torch's own sorts are used.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _in_threads(fn, x: np.ndarray) -> None:
    """Apply the in-place row-wise ``fn`` to ``x``, its rows split over torch's thread count."""
    threads = min(torch.get_num_threads(), len(x) // 64)
    if threads <= 1:
        fn(x)
        return
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE < threads:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ccdrec-sort"), threads
    bounds = np.linspace(0, len(x), threads + 1).astype(int)
    list(_POOL.map(lambda ab: fn(x[ab[0] : ab[1]]), zip(bounds[:-1], bounds[1:], strict=True)))


def _sort_rows(x: np.ndarray) -> None:
    x.sort(axis=1)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """``order[b, r]`` = the item at rank r (0 = highest score) in row b."""
    if scores.device.type != "cpu":
        return scores.argsort(dim=1, descending=True, stable=True)
    x = np.asarray(scores.detach().numpy(), dtype=np.float32) + np.float32(0.0)  # one copy; -0.0 made +0.0
    bits = x.view(np.int32)
    # float order == signed-int order of these keys (negative floats have their magnitude bits flipped);
    # ~key makes it descending; ties keep column order (as a stable sort would)
    key = ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))
    packed = (key.astype(np.int64) << 32) | np.arange(x.shape[1], dtype=np.int64)
    _in_threads(_sort_rows, packed)
    return torch.from_numpy(packed & 0xFFFFFFFF)


def ascending_values(scores: torch.Tensor) -> torch.Tensor:
    """Each row's scores sorted in ascending order."""
    if scores.device.type != "cpu":
        return scores.sort(dim=1).values
    x = scores.detach().numpy().copy()
    _in_threads(_sort_rows, x)
    return torch.from_numpy(x)
