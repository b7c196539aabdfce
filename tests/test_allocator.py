"""The heap policy of ccdrec.allocator: large freed blocks stay in the process."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, numpy as np
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
def mapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    a = np.ones(nbytes // 8)
    mapped = libc.mallinfo2().hblkhd - before
    del a
    return mapped
print(mapped_by(64 << 20))
from ccdrec.allocator import keep_freed_memory
print(keep_freed_memory())
print(mapped_by(64 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap_after_keep_freed_memory():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 64 << 20  # glibc's default: a fresh mmap for a 64 MB block
    assert out[1] == "True"
    assert int(out[2]) == 0  # now served from (and returned to) the heap
