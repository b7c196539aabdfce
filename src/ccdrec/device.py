"""Device choice: CUDA when present (or asked for), else the CPU."""

from __future__ import annotations

import torch

from ccdrec.errors import CcdrecError


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise CcdrecError("--device cuda was asked for, but no CUDA device is available")
    if pref not in ("cpu", "cuda"):
        raise CcdrecError(f"unknown device {pref!r}; expected auto, cpu or cuda")
    return torch.device(pref)
