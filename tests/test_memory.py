"""ccdrec.memory: large freed blocks stay in the heap until released; a stage's own peak RSS."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")

HELPERS = """
import ctypes, numpy as np
from ccdrec import memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
def mapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    a = np.ones(nbytes // 8)
    mapped = libc.mallinfo2().hblkhd - before
    del a
    return mapped
"""

PROBE = (
    HELPERS
    + """
print(mapped_by(48 << 20))
print(memory.keep_freed_memory())
print(mapped_by(48 << 20))
print(mapped_by(96 << 20))
held = rss_mb()
memory.release_freed_memory()
print(held - rss_mb())
print(memory.reset_peak_rss())
base = memory.peak_rss_mb()
a = np.ones(200 << 17); del a
print(memory.peak_rss_mb() - base)
memory.release_freed_memory(); memory.reset_peak_rss()
print(memory.peak_rss_mb() - base)
"""
)


def test_heap_policy_and_stage_peak():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 48 << 20  # glibc's default: a fresh mmap for a 48 MB block
    assert out[1] == "True"
    assert int(out[2]) == 0  # now served from the heap, and kept there when freed ...
    assert int(out[3]) >= 96 << 20  # (blocks above 64 MB are still mapped)
    assert float(out[4]) > 40  # ... until released
    assert out[5] == "True"
    assert float(out[6]) > 190  # a 200 MB block raises the peak
    assert float(out[7]) < 50  # reset: the peak restarts from the current RSS


STEPS = (
    HELPERS
    + """
with memory.reused_step_memory():  # the process did not choose ccdrec's heap policy: nothing changes
    print(mapped_by(48 << 20))
memory.keep_freed_memory()
with memory.reused_step_memory():
    print(mapped_by(160 << 20))  # a training step's block past 64 MB comes from the heap ...
    print(mapped_by(160 << 20))
    held = rss_mb()
print(held - rss_mb())  # ... and the heap's free pages are released on leaving
print(mapped_by(160 << 20))  # outside a training pass such a block is mapped again
"""
)


def test_training_steps_reuse_their_large_blocks():
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 48 << 20  # glibc's default policy is left alone
    assert int(out[1]) == 0 and int(out[2]) == 0
    assert float(out[3]) > 100
    assert int(out[4]) >= 160 << 20
