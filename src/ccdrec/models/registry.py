"""Build a model from its kind and size (the inverse of ``Recommender.config()``)."""

from __future__ import annotations

import inspect

from ccdrec.errors import InvalidArgument, WrongArgumentType
from ccdrec.models.base import Recommender
from ccdrec.models.lightgcn import MF, LightGCN
from ccdrec.models.vae import MultVAE

MODELS: dict[str, type[Recommender]] = {"mf": MF, "lightgcn": LightGCN, "vae": MultVAE}


def build_model(kind: str, n_users: int, n_items: int, **kwargs) -> Recommender:
    """A new model of ``kind`` (``mf``, ``lightgcn`` or ``vae``) over ``n_users`` x ``n_items`` with the
    architecture's keyword arguments (``dim``, ``layers``, ``dropout``, as its class takes them). An unknown
    kind, or an argument the kind does not take, is an :class:`InvalidArgument`; a kind that is not a
    string a :class:`WrongArgumentType`."""
    if not isinstance(kind, str):
        raise WrongArgumentType(f"kind must be a string ({', '.join(MODELS)}), not {type(kind).__name__}")
    if kind not in MODELS:
        raise InvalidArgument(f"unknown model {kind!r}; expected one of {', '.join(MODELS)}")
    takes = [n for n in inspect.signature(MODELS[kind].__init__).parameters if n not in ("self", "n_users", "n_items")]
    unknown = sorted(set(kwargs) - set(takes))
    if unknown:
        raise InvalidArgument(f"a {kind} model takes {', '.join(takes)}, not {', '.join(unknown)}")
    return MODELS[kind](n_users, n_items, **kwargs)
