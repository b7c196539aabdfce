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

import numpy as np
import torch

from ccdrec.errors import CcdrecError, InvalidArgument, WrongArgumentType
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


def _plain(value):
    """A numpy scalar as the Python number it holds (``np.int64(2)`` -> 2), for :func:`json_text`."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a {type(value).__name__}")


def json_text(obj, indent: int | None = 2, *, finite: bool = False) -> str:
    """``obj`` as JSON text, numpy scalars written as the numbers they hold; a value JSON cannot hold (a
    tensor, an array, a set, ...; with ``finite``, NaN and infinities too, which JSON has no words for) is
    an :class:`InvalidArgument` naming its type, raised before any file is touched."""
    try:
        return json.dumps(obj, indent=indent, sort_keys=True, default=_plain, allow_nan=not finite)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"cannot be written as JSON: {e} (give plain numbers, strings, lists and dicts)") from None


def atomic_write_json(path: Path, obj) -> None:
    text = json_text(obj).encode()
    atomic_write_bytes(path, lambda f: f.write(text))


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


def _stem(stem) -> Path:
    """A checkpoint's stem as a Path: a non-empty path (``Path("")`` would be the current directory)."""
    if not isinstance(stem, str | os.PathLike):
        raise WrongArgumentType(f"stem must be a path (str or Path), not {type(stem).__name__}")
    if not str(stem).strip() or not Path(stem).name:
        raise InvalidArgument(f"stem must name a file, such as 'models/mf', not {str(stem)!r}")
    return Path(stem)


def save_model(model: Recommender, stem: Path, meta: dict | None = None) -> None:
    """Write ``stem.pt`` (weights) and then ``stem.json`` (architecture + ``meta``, a dict of JSON values;
    numpy scalars are written as numbers). ``meta`` that JSON cannot hold (NaN and infinities too: JSON has
    no words for them) is an :class:`InvalidArgument` before either file is written, so an existing pair
    is never left half replaced."""
    if not isinstance(model, Recommender):
        raise WrongArgumentType(f"model must be a ccdrec model (a Recommender), not {type(model).__name__}")
    stem = _stem(stem)
    if meta is not None and not isinstance(meta, dict):
        raise WrongArgumentType(f"meta must be a dict, not {type(meta).__name__}")
    info = json_text({"format": FORMAT_VERSION, "model": model.config(), "meta": meta or {}}, finite=True).encode()
    save_tensors(stem_file(stem, ".pt"), model.state_dict())
    atomic_write_bytes(stem_file(stem, ".json"), lambda f: f.write(info))


def load_model(stem: Path, device: torch.device | str = "cpu") -> tuple[Recommender, dict]:
    """Rebuild a model saved by :func:`save_model`; returns (model, meta). Call ``set_graph`` before use.

    ``device``: as :func:`ccdrec.device.resolve_device` takes it. A ``stem`` whose files are missing,
    damaged or not a ccdrec model checkpoint, and an unknown device, are :class:`CcdrecError`.
    """
    from ccdrec.device import resolve_device

    stem = _stem(stem)
    dev = resolve_device(device)
    where = stem_file(stem, ".json")
    if where.is_dir():
        raise CcdrecError(f"{where}: is a directory, not a model checkpoint's JSON file")
    info = read_json(where)
    version = info.get("format") if isinstance(info, dict) else None
    cfg = info.get("model") if type(version) is int and version == FORMAT_VERSION else None
    if not isinstance(cfg, dict) or not isinstance(info.get("meta", {}), dict):
        raise CcdrecError(f"{where}: not a ccdrec model checkpoint of format {FORMAT_VERSION}")
    cfg = dict(cfg)
    weights = stem_file(stem, ".pt")
    state = load_tensors(weights)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CcdrecError(f"{weights}: not a ccdrec model's weights (a dict of named tensors)")
    try:
        kind, n_users, n_items = cfg.pop("kind"), cfg.pop("n_users"), cfg.pop("n_items")
        with torch.device("meta"):  # the architecture's shapes, checked against the weights before any memory is taken
            shapes = {k: tuple(v.shape) for k, v in build_model(kind, n_users, n_items, **cfg).state_dict().items()}
    except (KeyError, TypeError, ValueError) as e:
        detail = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise CcdrecError(f"{where}: not a ccdrec model checkpoint of format {FORMAT_VERSION} ({detail})") from None
    stored = {k: tuple(v.shape) for k, v in state.items()}
    if stored != shapes:
        differ = sorted(set(shapes) ^ set(stored)) or [k for k in shapes if shapes[k] != stored[k]]
        raise CcdrecError(
            f"{weights}: weights do not match the architecture of {where.name} ({differ[0]}: "
            f"{stored.get(differ[0], 'missing')} stored, {shapes.get(differ[0], 'none')} expected)"
        )
    model = build_model(kind, n_users, n_items, **cfg)
    model.load_state_dict(state)
    return model.to(dev), info.get("meta", {})
