"""Checks of the arguments of the public Python API: a user's mistake is one line naming the argument.

A wrong value is an :class:`InvalidArgument` (a ``ValueError``), a wrong type a :class:`WrongArgumentType`
(a ``TypeError``); both are also :class:`~ccdrec.errors.CcdrecError`, so the CLI prints them as one line
(exit code 2) like every other user mistake. Used by the models' constructors, ``fit``, the evaluation
and serving entry points, so that a mistake never surfaces as a NumPy, SciPy or torch message from deep
inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ccdrec.arguments import check_fraction, check_int, described, is_int, shown  # noqa: F401 - re-exported
from ccdrec.errors import CcdrecError, InvalidArgument, WrongArgumentType  # noqa: F401 - the argument errors, re-exported


class ModelNotReady(CcdrecError, RuntimeError):
    """A model used before what it needs is set (a LightGCN's graph, a Mult-VAE's input rows)."""


def check_ks(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty tuple (or list) of cut-offs, each an int of at least 1, as a tuple of ints."""
    if is_int(value) or not isinstance(value, (tuple, list)) or not value:
        raise WrongArgumentType(f"{name} must be a non-empty tuple of ints, e.g. (20, 50), not {shown(value)}")
    return tuple(check_int(f"{name}[{n}]", k) for n, k in enumerate(value))


def check_ids(name: str, value: Any, what: str = "item IDs") -> list:
    """``value``, a collection of IDs, as a list; a single ``str``/``bytes`` (which would be read as its
    characters), ``None`` or anything not iterable is a :class:`WrongArgumentType`, and so is an element
    that is not a ``str`` or an int."""
    if isinstance(value, (str, bytes, bytearray)):
        one = "one string" if isinstance(value, str) else f"one {type(value).__name__} object"
        text = shown(value)
        raise WrongArgumentType(f"{name} must be a list of {what}, not {one} ({text}); for one ID write [{text}]")
    if isinstance(value, Mapping):  # list() would take its keys and drop the values without a word
        raise WrongArgumentType(f"{name} must be a list of {what}, not a {type(value).__name__} (its values would be ignored)")
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise WrongArgumentType(f"{name} must be a list of {what}, not a {value.ndim}-dimensional array")
    try:
        out = list(value)
    except TypeError:
        raise WrongArgumentType(f"{name} must be a list of {what}, not {described(value)}") from None
    for x in out:
        if not (isinstance(x, str) or is_int(x)):
            raise WrongArgumentType(f"{name} must hold {what} (str or int), not {described(x)}")
    return out


def check_indices(name: str, value: Any, size: int | None, what: str = "indices") -> np.ndarray:
    """``value``, integer ``what`` in ``[0, size)`` (``size`` None: any non-negative), as a 1-D int64 array (a
    str, a float array or an index out of range is an error)."""
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        raise WrongArgumentType(f"{name} must be an array of {what}, not {described(value)}")
    arr = np.asarray(value)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise WrongArgumentType(f"{name} must be a 1-D array of integer {what}, not {arr.ndim}-D of {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if size is None and arr.size and arr.min() < 0:
        raise InvalidArgument(f"{name}: {what} must be non-negative, not {int(arr.min())}")
    if size is not None and arr.size and (arr.min() < 0 or arr.max() >= size):
        bad = int(arr[(arr < 0) | (arr >= size)][0])
        raise InvalidArgument(f"{name}: {what} must be in 0..{size - 1}, not {bad}")
    return arr


def check_universe(model: Any, block: Any, *, exact: bool, doing: str) -> None:
    """Raise :class:`InvalidArgument` unless ``model``'s universe (n_users x n_items) fits ``block``'s:
    equal to it (``exact``: training on the block), or at least as large (evaluation: a model grown past
    a block still scores that block)."""
    n_u, n_i = int(model.n_users), int(model.n_items)
    b_u, b_i = int(block.n_users), int(block.n_items)
    if (n_u, n_i) == (b_u, b_i) or (not exact and n_u >= b_u and n_i >= b_i):
        return
    msg = (
        f"cannot {doing}: the model has {n_u:,} x {n_i:,} (users x items) but block {block.index}'s universe is {b_u:,} x {b_i:,}"
    )
    if n_u <= b_u and n_i <= b_i:
        msg += (
            "; grow the model to the block first, as the continual update does: "
            "model.grow(block.n_users, block.n_items, block.train_matrix)"
        )
    elif exact:
        msg += "; train a model of the block's size: build_model(kind, block.n_users, block.n_items)"
    raise InvalidArgument(msg)


def check_matrix(
    name: str, value: Any, shape: tuple[int, int], *, at_most: bool = False, pairs: bool = False, values: bool = False
):
    """``value``, a SciPy sparse (users x items) matrix, as CSR: of exactly ``shape``, or with ``at_most`` of
    any universe up to it (an earlier block's). With ``pairs``, an ``(n, 2)`` integer array of (user, item)
    pairs is taken too and made that matrix. ``None``, a dense array or a list is a
    :class:`WrongArgumentType` (a dense matrix would be read as pairs, or pairs as a matrix); a shape that
    does not fit an :class:`InvalidArgument`; with ``values``, so is a stored value that is negative, NaN or
    infinite (interactions, or their weights)."""
    import scipy.sparse as sp

    if pairs and isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2:
        if not (value.size == 0 or np.issubdtype(value.dtype, np.integer)):
            raise WrongArgumentType(f"{name}: (user, item) pairs must be integers, not {value.dtype}")
        for col, limit, what in ((0, shape[0], "user"), (1, shape[1], "item")):
            ids = value[:, col]
            if ids.size and (ids.min() < 0 or ids.max() >= limit):
                bad = int(ids.min() if ids.min() < 0 else ids.max())
                raise InvalidArgument(f"{name}: {what} IDs must be in 0..{limit - 1}, not {bad}")
        data = np.ones(len(value), dtype=np.float32)
        return sp.csr_matrix((data, (value[:, 0], value[:, 1])), shape=shape)
    if not sp.issparse(value):
        also = " or an (n, 2) integer array of (user, item) pairs" if pairs else ""
        what = f"a dense {value.ndim}-D array of shape {value.shape}" if isinstance(value, np.ndarray) else described(value)
        raise WrongArgumentType(
            f"{name} must be a scipy.sparse (users x items) matrix{also}, not {what} (e.g. block.train_matrix)"
        )
    got = tuple(int(n) for n in value.shape)
    fits = got == tuple(shape) or (at_most and got[0] <= shape[0] and got[1] <= shape[1])
    if not fits:
        want = f"at most {shape[0]:,} x {shape[1]:,}" if at_most else f"{shape[0]:,} x {shape[1]:,}"
        raise InvalidArgument(f"{name} is {got[0]:,} x {got[1]:,} (users x items), not {want}, the model's universe")
    matrix = sp.csr_matrix(value)
    if values and matrix.nnz and not (np.isfinite(matrix.data).all() and (matrix.data >= 0).all()):
        raise InvalidArgument(f"{name} holds negative, NaN or infinite values: interactions are 1 (or a weight >= 0)")
    return matrix
