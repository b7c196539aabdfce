"""The permissions of the files and directories ccdrec writes through ``tempfile`` (owner-only there)
before moving them into place: those a plainly created file or directory gets under the process's
umask, so that a run or stream directory on shared storage is readable by whom the user's others are."""

from __future__ import annotations

import functools
import os


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # umask can only be read by setting it; read once per process
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``mkdir()`` give a new file / directory under this process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()
