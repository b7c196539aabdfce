"""The hooks through which a stage adds to the training loop (:func:`ccdrec.train.loop.fit`)."""

from __future__ import annotations

import numpy as np
import torch

from ccdrec.errors import WrongArgumentType
from ccdrec.models.base import Recommender


class Callback:
    """A hook into :func:`ccdrec.train.loop.fit`; override what you need (the defaults do nothing).

    ``batch_loss(model, out, users, items, epoch)`` is added to every minibatch's loss: ``out`` is the
    objective's forward output (an embedding model's ``propagate()``, a Mult-VAE's logits), ``users`` /
    ``items`` the minibatch's users and positive items (numpy; no items for a Mult-VAE batch).
    ``uses_layers``: the batch loss reads the per-layer embeddings of ``out`` (an embedding model's
    ``propagate(with_layers=True)``), so the step keeps them instead of propagating twice.
    """

    uses_layers: bool = False

    def on_epoch_start(self, model: Recommender, opt: torch.optim.Optimizer, epoch: int) -> None:
        """Before the epoch's pass (e.g. re-draw a replay set against the current ranking)."""

    def batch_loss(self, model: Recommender, out, users: np.ndarray, items: np.ndarray, epoch: int) -> torch.Tensor | None:
        """An extra loss term for this minibatch, or None."""
        return None

    def on_epoch_end(self, model: Recommender, opt: torch.optim.Optimizer, epoch: int) -> None:
        """After the epoch's own pass, before validation (e.g. a replay pass)."""

    def on_validate(self, model: Recommender, epoch: int, valid: dict) -> None:
        """After a validation, before model selection: may add figures to ``valid`` (e.g. the agreement
        with a teacher that model selection then weighs, ``fit(select=...)``)."""


def add_batch_losses(loss: torch.Tensor, callbacks, model, out, users: np.ndarray, items: np.ndarray, epoch: int) -> torch.Tensor:
    """``loss`` plus every callback's :meth:`Callback.batch_loss` for the minibatch, in order."""
    for cb in callbacks:
        extra = cb.batch_loss(model, out, users, items, epoch)
        if extra is None:
            continue
        if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
            what = f"a tensor of shape {tuple(extra.shape)}" if isinstance(extra, torch.Tensor) else type(extra).__name__
            raise WrongArgumentType(f"{type(cb).__name__}.batch_loss must return None or a scalar tensor, not {what}")
        loss = loss + extra.reshape(())
    return loss
