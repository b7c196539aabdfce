"""Checkpoints as plain tensors + JSON (style.md lesson 6): nothing is ever unpickled.

A model checkpoint ``NAME`` is two files: ``NAME.pt`` (``torch.save`` of a flat dict of tensors,
loaded with ``weights_only=True``) and ``NAME.json`` (architecture and metadata). Both are written
to a temporary file first and moved into place, so an interrupted write never leaves a half file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ccdrec.errors import CcdrecError
from ccdrec.filemode import plain_mode
from ccdrec.models.base import Recommender
from ccdrec.models.registry import build_model

FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place. The file
    gets the permissions a plainly created one would (the temporary file's own are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # (not on Windows before Python 3.13)
            os.fchmod(fd, plain_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CcdrecError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CcdrecError(f"{path}: corrupt JSON ({e})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, lambda f: torch.save(flat, f))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CcdrecError(f"{path}: file is missing") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CcdrecError(f"{path}: corrupt or incompatible tensor file ({type(e).__name__})") from None


def stem_file(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (``m_lr0.01`` -> ``m_lr0.01.pt``): the suffix is added to the name as given,
    never put in place of what follows its last dot (``Path.with_suffix`` made ``m_lr0.pt`` of it)."""
    stem = Path(stem)
    return stem.with_name(stem.name + suffix)


def save_model(model: Recommender, stem: Path, meta: dict | None = None) -> None:
    """Write ``stem.pt`` (weights) and then ``stem.json`` (architecture + ``meta``)."""
    stem = Path(stem)
    save_tensors(stem_file(stem, ".pt"), model.state_dict())
    atomic_write_json(stem_file(stem, ".json"), {"format": FORMAT_VERSION, "model": model.config(), "meta": meta or {}})


def load_model(stem: Path, device: torch.device | str = "cpu") -> tuple[Recommender, dict]:
    """Rebuild a model saved by :func:`save_model`; returns (model, meta). Call ``set_graph`` before use."""
    stem = Path(stem)
    info = read_json(stem_file(stem, ".json"))
    if info.get("format") != FORMAT_VERSION or "model" not in info:
        raise CcdrecError(f"{stem_file(stem, '.json')}: not a ccdrec model checkpoint of format {FORMAT_VERSION}")
    cfg = dict(info["model"])
    model = build_model(cfg.pop("kind"), cfg.pop("n_users"), cfg.pop("n_items"), **cfg)
    state = load_tensors(stem_file(stem, ".pt"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CcdrecError(f"{stem_file(stem, '.pt')}: weights do not match the architecture ({str(e).splitlines()[0]})") from None
    return model.to(device), info.get("meta", {})
