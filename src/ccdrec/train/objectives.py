"""A model family's own training objective, one epoch at a time (method.md 4): BPR with sampled
negatives for embedding models (MF, LightGCN), the Mult-VAE loss with KL annealing for Mult-VAE. A
model names its family's objective (``Recommender.objective``); :func:`objective_for` builds it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import TrainConfig, bounded_batch
from ccdrec.data.stream import Block, pad_to
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.indexing import take_rows
from ccdrec.models.vae import MultVAE, rows_tensor
from ccdrec.train.callbacks import Callback, add_batch_losses
from ccdrec.train.losses import bpr_loss, vae_loss
from ccdrec.train.sampling import NegativeSampler


def embedding_l2(model: EmbeddingModel, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """LightGCN-style L2 on the batch's ego embeddings: (‖e_u‖² + ‖e_i‖² + mean_n ‖e_j‖²) / 2, batch mean."""
    u, i, j = take_rows(model.user_emb, users), take_rows(model.item_emb, pos), take_rows(model.item_emb, neg)
    return 0.5 * (u.pow(2).sum(-1) + i.pow(2).sum(-1) + j.pow(2).sum(-1).mean(-1)).mean()


def bpr_epoch(
    model: EmbeddingModel,
    opt: torch.optim.Optimizer,
    pairs: np.ndarray,
    sampler: NegativeSampler,
    cfg: TrainConfig,
    rng: np.random.Generator,
    epoch: int,
    callbacks: Sequence[Callback] = (),
) -> float:
    """One pass of BPR over ``pairs`` in shuffled minibatches of ``cfg.batch_size`` pairs, grown to bound
    the steps at ``cfg.max_steps`` (:func:`~ccdrec.config.bounded_batch`), plus the callbacks' batch
    losses; returns the mean loss."""
    order = rng.permutation(len(pairs))
    batch_size = bounded_batch(len(order), cfg.batch_size, cfg.max_steps)
    negs = sampler.sample(pairs[order, 0], cfg.negatives, rng)
    dev = model.device
    with_layers = any(getattr(cb, "uses_layers", False) for cb in callbacks)
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        u_np, i_np = pairs[idx, 0], pairs[idx, 1]
        users = torch.from_numpy(u_np).to(dev)
        pos = torch.from_numpy(i_np).to(dev)
        neg = torch.from_numpy(negs[start : start + len(idx)]).to(dev)
        reps = model.propagate(with_layers=True) if with_layers else model.propagate()
        u_rep, i_rep = reps
        eu = take_rows(u_rep, users)
        loss = bpr_loss((eu * take_rows(i_rep, pos)).sum(-1), torch.einsum("bd,bnd->bn", eu, take_rows(i_rep, neg)))
        if cfg.l2 > 0:
            loss = loss + cfg.l2 * embedding_l2(model, users, pos, neg)
        loss = add_batch_losses(loss, callbacks, model, reps, u_np, i_np, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / max(len(order), 1)


def vae_epoch(
    model: MultVAE,
    opt: torch.optim.Optimizer,
    matrix: sp.csr_matrix,
    cfg: TrainConfig,
    rng: np.random.Generator,
    step: list[int],
    callbacks: Sequence[Callback] = (),
    epoch: int = 0,
) -> float:
    """One pass of the Mult-VAE loss (plus the callbacks' batch losses) over the users with at least one
    row entry in ``matrix``, in minibatches of ``cfg.batch_size`` users grown to bound the steps at
    ``cfg.max_steps``; ``step`` counts optimiser steps across epochs (KL annealing)."""
    users = np.flatnonzero(np.diff(matrix.indptr))
    users = users[rng.permutation(len(users))]
    batch_size = bounded_batch(len(users), cfg.batch_size, cfg.max_steps)
    total = 0.0
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        x = rows_tensor(matrix, torch.from_numpy(batch), model.n_items, model.device)
        logits, mu, logvar = model(x)
        beta = min(cfg.beta_max, cfg.beta_max * step[0] / cfg.anneal_steps)
        loss = vae_loss(logits, x, mu, logvar, beta)
        loss = add_batch_losses(loss, callbacks, model, logits, batch, np.empty(0, dtype=np.int64), epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step[0] += 1
        total += loss.item() * len(batch)
    return total / max(len(users), 1)


class BPRObjective:
    """BPR over the block's train pairs, ``cfg.negatives`` sampled negatives per pair that avoid the
    user's train items and the ``avoid`` pairs (a sparse matrix, any smaller universe)."""

    def __init__(self, model: EmbeddingModel, block: Block, cfg: TrainConfig, avoid: sp.spmatrix | None = None, inputs=None):
        r = block.matrix("train", model.n_users, model.n_items)
        excluded = r if avoid is None else (r + pad_to(avoid, r.shape)).tocsr()
        self.sampler = NegativeSampler(excluded, model.n_items)
        self.pairs, self.cfg = block.train, cfg

    def epoch(self, model, opt, rng: np.random.Generator, epoch: int, callbacks: Sequence[Callback] = ()) -> float:
        return bpr_epoch(model, opt, self.pairs, self.sampler, self.cfg, rng, epoch, callbacks)


class VAEObjective:
    """The Mult-VAE loss over the rows of ``inputs`` (default: the block's train matrix); β is annealed
    over the optimiser steps of the whole fit."""

    def __init__(self, model: MultVAE, block: Block, cfg: TrainConfig, avoid=None, inputs: sp.csr_matrix | None = None):
        self.matrix = inputs if inputs is not None else block.matrix("train", model.n_users, model.n_items)
        self.cfg, self.step = cfg, [0]

    def epoch(self, model, opt, rng: np.random.Generator, epoch: int, callbacks: Sequence[Callback] = ()) -> float:
        return vae_epoch(model, opt, self.matrix, self.cfg, rng, self.step, callbacks, epoch)


OBJECTIVES = {"bpr": BPRObjective, "vae": VAEObjective}


def objective_for(model: Recommender, block: Block, cfg: TrainConfig, avoid=None, inputs=None):
    """The objective of ``model``'s family (``model.objective``) on ``block``."""
    return OBJECTIVES[model.objective](model, block, cfg, avoid=avoid, inputs=inputs)
