"""The C heap's policy for large blocks: keep them in the process instead of handing them back.

glibc's ``malloc`` serves a request above ``M_MMAP_THRESHOLD`` (at most 32 MB by default) with a fresh
``mmap`` and unmaps it on ``free``; every new page of the next such block is then a page fault. Scores
and logits here are blocks of that size at every step: a batch of 256 Gowalla users' Mult-VAE logits is
256 x 41,000 floats (42 MB), an evaluation chunk's scores 168 MB. Faulting their pages in again at each
allocation cost a Mult-VAE training step on one thread 150 ms instead of 80 ms.

:func:`keep_freed_memory` raises the mmap threshold and the trim threshold to 1 GiB, so freed blocks stay
in the heap and are reused. The peak resident memory is unchanged in principle (the heap holds what the
process once held at the same time) up to fragmentation. Without glibc (macOS, Windows, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LIMIT = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to 1 GiB in this process; False where that is not possible."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT))
