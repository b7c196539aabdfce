"""Build a model from its kind and size (the inverse of ``Recommender.config()``)."""

from __future__ import annotations

from ccdrec.errors import CcdrecError
from ccdrec.models.base import Recommender
from ccdrec.models.lightgcn import MF, LightGCN
from ccdrec.models.vae import MultVAE

MODELS: dict[str, type[Recommender]] = {"mf": MF, "lightgcn": LightGCN, "vae": MultVAE}


def build_model(kind: str, n_users: int, n_items: int, **kwargs) -> Recommender:
    if kind not in MODELS:
        raise CcdrecError(f"unknown model {kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[kind](n_users, n_items, **kwargs)
