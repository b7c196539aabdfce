"""The epoch loop: one model, one block, early stopping on validation Recall@20 (method.md 3-4).

:func:`fit` runs the model's own objective (BPR for embedding models, the VAE loss for Mult-VAE)
over the block's train split, validates every ``eval_every`` epochs (and after the last epoch, so no
epoch is left unevaluated — unlike the authors' release, method.md 9), keeps the best weights and
restores them at the end. Later stages plug in through ``extra_loss`` (added to every batch: LWC-KD,
RRD), ``after_epoch_pass`` (a replay pass) and ``before_epoch`` (re-sampling).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import TrainConfig
from ccdrec.data.stream import Block, pad_to
from ccdrec.eval.metrics import DEFAULT_KS, evaluate_block
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.indexing import take_rows
from ccdrec.models.vae import MultVAE, rows_tensor
from ccdrec.train.losses import bpr_loss, vae_loss
from ccdrec.train.sampling import NegativeSampler

ExtraLoss = Callable[[Recommender, object, np.ndarray, np.ndarray, int], torch.Tensor]
EpochHook = Callable[[Recommender, torch.optim.Optimizer, int], None]


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_to_best: float = 0.0
    epochs_run: int = 0


def make_optimizer(model: Recommender, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam / AdamW over the model's parameters, with torch's fused kernel where the device has one.

    The fused update makes one pass over each table instead of several: a Gowalla MF epoch takes 2.2 s
    instead of 2.7 s here, a Mult-VAE step 84 ms instead of 96 ms (the tables are updated densely every
    step, so the update is a large share of a step).
    """
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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
    extra_loss: ExtraLoss | None = None,
) -> float:
    """One pass of BPR over ``pairs`` in shuffled minibatches; returns the mean loss."""
    order = rng.permutation(len(pairs))
    negs = sampler.sample(pairs[order, 0], cfg.negatives, rng)
    dev = model.device
    total = 0.0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        u_np, i_np = pairs[idx, 0], pairs[idx, 1]
        users = torch.from_numpy(u_np).to(dev)
        pos = torch.from_numpy(i_np).to(dev)
        neg = torch.from_numpy(negs[start : start + len(idx)]).to(dev)
        reps = model.propagate()
        u_rep, i_rep = reps
        eu = take_rows(u_rep, users)
        loss = bpr_loss((eu * take_rows(i_rep, pos)).sum(-1), torch.einsum("bd,bnd->bn", eu, take_rows(i_rep, neg)))
        if cfg.l2 > 0:
            loss = loss + cfg.l2 * embedding_l2(model, users, pos, neg)
        if extra_loss is not None:
            loss = loss + extra_loss(model, reps, u_np, i_np, epoch)
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
    extra_loss: ExtraLoss | None = None,
    epoch: int = 0,
) -> float:
    """One pass of the Mult-VAE loss over the users with at least one row entry in ``matrix``."""
    users = np.flatnonzero(np.diff(matrix.indptr))
    users = users[rng.permutation(len(users))]
    total = 0.0
    for start in range(0, len(users), cfg.batch_size):
        batch = users[start : start + cfg.batch_size]
        x = rows_tensor(matrix, torch.from_numpy(batch), model.n_items, model.device)
        logits, mu, logvar = model(x)
        beta = min(cfg.beta_max, cfg.beta_max * step[0] / cfg.anneal_steps)
        loss = vae_loss(logits, x, mu, logvar, beta)
        if extra_loss is not None:
            loss = loss + extra_loss(model, logits, batch, np.empty(0, dtype=np.int64), epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step[0] += 1
        total += loss.item() * len(batch)
    return total / max(len(users), 1)


def selection_ks(select_metric: str) -> tuple[int, ...]:
    """The cut-offs a validation computes: the default ones and the one of ``select_metric``
    (``recall@K`` / ``ndcg@K``, checked by :class:`ccdrec.config.TrainConfig`)."""
    k = int(select_metric.split("@")[1])
    return DEFAULT_KS if k in DEFAULT_KS else (*DEFAULT_KS, k)


def fit(
    model: Recommender,
    block: Block,
    cfg: TrainConfig,
    seed: int = 0,
    progress: bool = False,
    label: str = "train",
    exclude: sp.spmatrix | None = None,
    vae_input: sp.csr_matrix | None = None,
    extra_loss: ExtraLoss | None = None,
    before_epoch: EpochHook | None = None,
    after_epoch_pass: EpochHook | None = None,
) -> FitResult:
    """Train ``model`` on ``block``'s train split with early stopping; restores the best weights.

    ``exclude``: extra (user, item) pairs negatives must avoid, beyond the user's train items.
    ``vae_input``: the VAE's input/target rows (default: the block's train matrix).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    r = block.matrix("train", model.n_users, model.n_items)
    model.set_graph(r)
    opt = make_optimizer(model, cfg)
    sampler = None
    if isinstance(model, EmbeddingModel):
        excl = r if exclude is None else (r + pad_to(exclude, r.shape)).tocsr()
        sampler = NegativeSampler(excl, model.n_items)
    best_state, best_score, best_epoch, bad = None, -1.0, -1, 0
    result = FitResult(best_epoch=-1, best_valid={})
    start = time.perf_counter()
    step = [0]
    bar = _progress(progress, label, cfg.epochs)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            if before_epoch is not None:
                before_epoch(model, opt, epoch)
            if isinstance(model, MultVAE):
                loss = vae_epoch(model, opt, vae_input if vae_input is not None else r, cfg, rng, step, extra_loss, epoch)
            else:
                loss = bpr_epoch(model, opt, block.train, sampler, cfg, rng, epoch, extra_loss)
            if after_epoch_pass is not None:
                after_epoch_pass(model, opt, epoch)
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_decay
            model.eval()
            row = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - start}
            last = epoch == cfg.epochs - 1
            if (epoch + 1) % cfg.eval_every == 0 or last:
                valid = evaluate_block(model, block, "valid", ks=selection_ks(cfg.select_metric), chunk=cfg.eval_chunk)
                row.update({f"valid_{k}": v for k, v in valid.items()})
                score = valid[cfg.select_metric]
                if score is None:  # no validation users: nothing to select on, the last epoch is kept
                    best_epoch, result.best_valid = epoch, valid
                elif score > best_score:
                    best_score, best_epoch, bad = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                    result.best_valid = valid
                    result.seconds_to_best = time.perf_counter() - start
                else:
                    bad += 1
            result.history.append(row)
            bar.advance(row)
            if bad >= cfg.patience and epoch + 1 >= cfg.min_epochs:
                break
    finally:
        bar.close()
    result.epochs_run = len(result.history)
    if best_state is not None:
        model.load_state_dict(best_state)
        model.set_graph(r)
    model.eval()
    result.best_epoch = best_epoch
    result.seconds = time.perf_counter() - start
    return result


class _progress:
    """A rich progress bar over epochs showing the latest loss and validation Recall@20."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, info="")

    def advance(self, row: dict) -> None:
        if self.bar is None:
            return
        info = f"loss {row['loss']:.4f}"
        if row.get("valid_recall@20") is not None:
            info += f"  valid R@20 {row['valid_recall@20']:.4f}"
        self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
