"""Process memory: the C heap's policy for large blocks, and the peak resident memory of a stage.

glibc's ``malloc`` serves a request above ``M_MMAP_THRESHOLD`` (at most 32 MB by default) with a fresh
``mmap`` and unmaps it on ``free``; every page of the next such block is then a page fault. Scores and
logits here are blocks of that size at every step: a batch of 256 Gowalla users' Mult-VAE logits is
256 x 41,000 floats (42 MB), an evaluation chunk's scores 168 MB. Faulting their pages in again at each
allocation made a Mult-VAE training step on one thread take 150 ms.

:func:`keep_freed_memory` raises the mmap threshold to 64 MB and the trim threshold to 512 MB, so such
training blocks stay in the heap and are reused (a Mult-VAE step: 72 ms), while larger ones (evaluation
chunks) are still mapped and unmapped; :func:`release_freed_memory` hands the heap's free pages back to
the system (``malloc_trim``), which a staged run does after every stage. Higher thresholds were faster
still but fragmented the heap: with 256 MB, the 168 MB score chunks of a Gowalla block's replay
candidates left holes that took that stage from 0.9 GB to 4.0 GB, and with 1 GB and no release a whole
Gowalla run's main process reached 7.4 GB. Without glibc (macOS, Windows, musl) these do nothing.

Training steps are the exception: a step allocates the same blocks as the step before it, so a heap
that keeps them cannot fragment, while blocks past 64 MB (an embedding table of 130,000 entities x 128
dimensions, its propagated layers and gradients, a large batch's negatives) would be faulted in anew at
every step. Inside :func:`reused_step_memory` (a model's training pass, not its validation or replay
draw), blocks up to 1 GB come from the heap; on leaving it the threshold is 64 MB again and the heap's
free pages go back to the system. A LightGCN-128 epoch on a planted stream of 80,000 users and 1.1M
train pairs (16 steps, 1 thread) took 36.4 s with glibc's defaults (11.4M page faults, 20 s of it in the
kernel) and 20.9 s with the 64 MB threshold; `benchmarks/scaling.py --stages teacher_epoch --max-steps 64
--threads 1` at 20,000 / 80,000 users: 11.4 / 73.9 s with glibc's defaults (`--heap glibc`), 11.3 / 44.1 s
as here (both with another job on the machine).

:func:`reset_peak_rss` and :func:`peak_rss_mb` measure one stage's own peak (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``); ``ru_maxrss`` cannot, as it never goes down, and a spawned
process inherits its parent's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_LIMIT = 64 << 20
STEP_MMAP_LIMIT = 1 << 30
TRIM_LIMIT = 512 << 20
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_policy = {"kept": False}  # whether this process chose the policy of keep_freed_memory


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 64 MB and trim threshold to 512 MB in this process; False where
    that is not possible."""
    libc = _libc()
    _policy["kept"] = (
        libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_LIMIT)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_LIMIT))
    )
    return _policy["kept"]


@contextmanager
def reused_step_memory() -> Iterator[None]:
    """Inside, glibc serves blocks up to 1 GB from the heap, so that the same blocks of every training step
    are reused instead of mapped and faulted in anew; on leaving, the 64 MB threshold is back and the
    heap's free pages are returned (:func:`release_freed_memory`). Does nothing unless this process
    called :func:`keep_freed_memory` (a library user's heap policy is left alone)."""
    libc = _libc()
    active = libc is not None and _policy["kept"]
    if active:
        libc.mallopt(M_MMAP_THRESHOLD, STEP_MMAP_LIMIT)
    try:
        yield
    finally:
        if active:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_LIMIT)
            libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Restart this process's peak resident memory count at its current RSS (Linux); False elsewhere."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`, in MB."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
