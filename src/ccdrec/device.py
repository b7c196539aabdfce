"""Device choice: CUDA when present (or asked for), else the CPU."""

from __future__ import annotations

import re

import torch

from ccdrec.errors import CcdrecError

_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def resolve_device(pref: str | torch.device = "auto") -> torch.device:
    """The torch device for ``pref``: ``auto`` (CUDA when present, else the CPU), ``cpu`` (``cpu:N`` is the
    CPU too), ``cuda`` or ``cuda:N`` (any case), or a ``torch.device`` of those kinds. A CUDA device that is not there, or
    any other name, is a :class:`CcdrecError` (one line, for the command line's ``--device`` too)."""
    if isinstance(pref, torch.device):
        pref = str(pref)
    match = _DEVICE.fullmatch(pref.strip().lower()) if isinstance(pref, str) else None
    if match is None or (match[2] is not None and match[1] == "auto"):
        raise CcdrecError(f"unknown device {pref!r}; expected auto, cpu, cuda or cuda:N")
    kind, index = match[1], match[2]
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CcdrecError(f"device {pref!r} was asked for, but no CUDA device is available")
        if index is not None and int(index) >= count:
            raise CcdrecError(f"device {pref!r} was asked for, but this machine has CUDA devices cuda:0..cuda:{count - 1}")
        return torch.device("cuda" if index is None else f"cuda:{int(index)}")
    return torch.device("cpu")
