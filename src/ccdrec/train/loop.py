"""The epoch loop: one model, one block, early stopping on validation (method.md 3-4).

:func:`fit` runs the model family's own objective (:mod:`ccdrec.train.objectives`: BPR for embedding
models, the VAE loss for Mult-VAE) over the block's train split, validates every ``eval_every`` epochs
(and after the last epoch, so no epoch is left unevaluated — unlike the authors' release, method.md 9),
keeps the best weights (:class:`EarlyStopping`) and restores them at the end. Everything a later stage
adds plugs in as a :class:`Callback`: a loss added to every minibatch (LWC-KD, RRD, the Mult-VAE KL
term), work before an epoch (re-drawing a replay set) or after its own pass (the replay pass). The
loop knows no model family and no stage of CCD.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import TrainConfig
from ccdrec.data.stream import Block
from ccdrec.errors import InvalidArgument, TrainingDiverged
from ccdrec.eval.metrics import DEFAULT_KS, evaluate_block, evaluate_many
from ccdrec.eval.protocol import harmonic
from ccdrec.memory import reused_step_memory
from ccdrec.models.base import Recommender
from ccdrec.models.checks import WrongArgumentType, check_int, check_matrix, check_universe
from ccdrec.train.callbacks import Callback
from ccdrec.train.objectives import objective_for


@dataclass
class FitResult:
    """The training summary of :func:`fit`: the best epoch (0-based) and its validation metrics, the
    per-epoch history, seconds in all and to the best epoch, epochs run, and ``capped``: the epoch cap
    (``TrainConfig.epochs``) ended training while its last validation was the best so far, so early
    stopping did not decide and more epochs may still have helped."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    seconds_to_best: float = 0.0
    epochs_run: int = 0
    capped: bool = False


class EarlyStopping:
    """Model selection on validation: keeps the weights of the best ``select_metric`` seen so far and
    stops after ``patience`` evaluations without gain (never before ``min_epochs``). Without validation
    users the metric is missing and the last epoch is kept."""

    def __init__(self, cfg: TrainConfig, result: FitResult, start: float, key: str | None = None):
        self.cfg, self.result, self.start = cfg, result, start
        self.key = key or cfg.select_metric
        self.best_state: dict | None = None
        self.best_score, self.bad = -1.0, 0

    def observe(self, model: Recommender, epoch: int, valid: dict) -> None:
        if self.key not in valid or self.key == "users":  # 'users' is a count, not a quality to maximise
            figures = [k for k in valid if k != "users"]
            raise InvalidArgument(
                f"select={self.key!r} is not a figure the validation gives; it gives {', '.join(map(repr, figures))}"
            )
        score = valid[self.key]
        if score is None:  # no validation users: nothing to select on, the last epoch is kept
            self.result.best_epoch, self.result.best_valid = epoch, valid
        elif score > self.best_score:
            self.best_score, self.result.best_epoch, self.bad = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
            self.result.best_valid = valid
            self.result.seconds_to_best = time.perf_counter() - self.start
        else:
            self.bad += 1

    def should_stop(self, epoch: int) -> bool:
        return self.bad >= self.cfg.patience and epoch + 1 >= self.cfg.min_epochs


def check_train_config(cfg) -> TrainConfig:
    """``cfg``, a :class:`TrainConfig`, validated again (:meth:`ccdrec.config.Strict.checked`: ``model_copy``
    skips pydantic's checks), the copy to train with; not a TrainConfig is a one-line
    :class:`WrongArgumentType` saying how to make one, a value out of range or of the wrong type, or a
    field that does not exist, an :class:`InvalidArgument`."""
    if not isinstance(cfg, TrainConfig):
        raise WrongArgumentType(
            f"cfg must be a ccdrec.config.TrainConfig, not {type(cfg).__name__}: make one with TrainConfig(**settings) "
            "(e.g. TrainConfig(epochs=20)) or take a model family's schedule with ccdrec.config.default_schedule(kind)"
        )
    try:
        return cfg.checked()
    except InvalidArgument as e:
        raise InvalidArgument(f"cfg.{e}") from None


def check_blocks(name: str, blocks) -> list[Block]:
    """``blocks``, a sequence of :class:`Block`, as a list (one Block or anything else is a :class:`WrongArgumentType`)."""
    if isinstance(blocks, Block) or not isinstance(blocks, (list, tuple)) or not all(isinstance(b, Block) for b in blocks):
        raise WrongArgumentType(f"{name} must be a list of Blocks (e.g. stream.blocks[:k]), not {type(blocks).__name__}")
    return list(blocks)


def make_optimizer(model: Recommender, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam / AdamW over the model's parameters, with torch's fused kernel where the device has one.

    The fused update makes one pass over each table instead of several: a Gowalla MF epoch takes 2.2 s
    instead of 2.7 s here, a Mult-VAE step 84 ms instead of 96 ms (the tables are updated densely every
    step, so the update is a large share of a step).
    """
    cfg = check_train_config(cfg)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def check_finite(model: Recommender, loss, label: str, epoch: int, cfg: TrainConfig) -> None:
    """Raise :class:`~ccdrec.errors.TrainingDiverged` if epoch ``epoch``'s loss or any weight of ``model`` is
    NaN or infinite: such a model ranks at random and recommends nothing, and every later step keeps it so."""
    bad = loss is not None and not np.isfinite(loss)
    if not bad and all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    what = f"its loss is {loss}" if bad else "its weights are no longer finite"
    raise TrainingDiverged(
        f"training diverged in epoch {epoch + 1}{f' ({label})' if label else ''}: {what}; a smaller learning rate for it "
        f"(now {cfg.lr:g}) may help"
    )


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
    callbacks: Sequence[Callback] = (),
    avoid: sp.spmatrix | None = None,
    inputs: sp.csr_matrix | None = None,
    select: str | None = None,
    past: Sequence[Block] = (),
) -> FitResult:
    """Train ``model`` on ``block``'s train split with early stopping; restores the best weights.

    ``callbacks``: :class:`Callback` hooks, called in order. ``avoid`` and ``inputs`` go to the model
    family's objective: the (user, item) pairs the BPR negatives must avoid beyond the user's train items
    (a SciPy sparse matrix of the model's universe or an earlier, smaller one, or an (n, 2) integer array
    of pairs); a Mult-VAE's input/target rows (a sparse matrix of the model's universe; default: the
    block's train matrix). ``select``: the validation
    figure model selection maximises (default ``cfg.select_metric``; a callback's ``on_validate`` may
    add it). ``past``: the blocks before ``block``; with ``cfg.select_on = "stream"`` every validation
    also scores them (:func:`stream_validation`) and selection maximises ``stream_h@K`` unless
    ``select`` names another figure. Raises :class:`~ccdrec.errors.InvalidArgument` (a ValueError) at the
    first validation if it does not give ``select``, naming the figures it gives.

    Mistakes are one-line errors before any training: ``cfg`` not a :class:`TrainConfig`, ``block`` not a
    :class:`Block`, a model whose universe is not the block's (a model of an earlier block is grown to it
    first: :meth:`~ccdrec.models.base.Recommender.grow`), ``past`` not a list of blocks, ``seed`` not an int.
    """
    cfg = check_train_config(cfg)
    if not isinstance(model, Recommender):
        raise WrongArgumentType(f"model must be a ccdrec.models.Recommender (MF, LightGCN, MultVAE), not {type(model).__name__}")
    if not isinstance(block, Block):
        raise WrongArgumentType(f"block must be a ccdrec.data.stream.Block (e.g. stream[0]), not {type(block).__name__}")
    check_universe(model, block, exact=True, doing=f"train on block {block.index}")
    past = check_blocks("past", past)
    seed = check_int("seed", seed, minimum=0)
    universe = (model.n_users, model.n_items)
    if avoid is not None:
        if model.objective == "vae":
            raise InvalidArgument("avoid is for BPR models (MF, LightGCN): a Mult-VAE draws no negatives")
        avoid = check_matrix("avoid", avoid, universe, at_most=True, pairs=True)
    if inputs is not None:
        if model.objective != "vae":
            raise InvalidArgument("inputs is for a Mult-VAE (its input/target rows); a BPR model trains on the block's pairs")
        inputs = check_matrix("inputs", inputs, universe, values=True)
    if isinstance(callbacks, Callback | str | bytes) or not isinstance(callbacks, Sequence):
        raise WrongArgumentType(f"callbacks must be a list of Callback objects (or () for none), not {type(callbacks).__name__}")
    if bad := [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]:
        raise WrongArgumentType(f"callbacks must be Callback objects (subclass ccdrec.train.Callback), not {bad[0]}")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise InvalidArgument(
            "the model's weights are not finite (NaN or infinite) before training: an earlier training diverged? "
            "build a new model or load a checkpoint"
        )
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    r = block.matrix("train", model.n_users, model.n_items)
    model.set_graph(r)
    opt = make_optimizer(model, cfg)
    objective = objective_for(model, block, cfg, avoid=avoid, inputs=inputs)
    result = FitResult(best_epoch=-1, best_valid={})
    start = time.perf_counter()
    streaming = cfg.select_on == "stream" and len(past) > 0
    if streaming and select is None:
        select = f"stream_h@{cfg.select_metric.split('@')[1]}"
    selection = EarlyStopping(cfg, result, start, select)
    bar = _progress(progress, label, cfg.epochs)
    try:
        for epoch in range(cfg.epochs):
            model.train()
            for cb in callbacks:
                cb.on_epoch_start(model, opt, epoch)
            with reused_step_memory():  # the training passes; validation and replay draws map their chunks
                loss = objective.epoch(model, opt, rng, epoch, callbacks)
                for cb in callbacks:
                    cb.on_epoch_end(model, opt, epoch)
            try:
                check_finite(model, loss, label, epoch, cfg)
            except TrainingDiverged:
                if selection.best_state is not None:  # the model is left as its best epoch so far, not NaN
                    model.load_state_dict(selection.best_state)
                raise
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_decay
            model.eval()
            row = {"epoch": epoch, "loss": loss, "seconds": time.perf_counter() - start}
            last = epoch == cfg.epochs - 1
            if (epoch + 1) % cfg.eval_every == 0 or last:
                valid = evaluate_block(model, block, "valid", ks=selection_ks(cfg.select_metric), chunk=cfg.eval_chunk)
                if streaming:
                    valid.update(stream_validation(model, past, valid, cfg))
                for cb in callbacks:
                    cb.on_validate(model, epoch, valid)
                row.update({f"valid_{k}": v for k, v in valid.items()})
                selection.observe(model, epoch, valid)
            result.history.append(row)
            bar.advance(row)
            if selection.should_stop(epoch):
                break
    finally:
        bar.close()
    result.epochs_run = len(result.history)
    result.capped = selection.best_state is not None and result.best_epoch == result.epochs_run - 1 == cfg.epochs - 1
    if selection.best_state is not None:
        model.load_state_dict(selection.best_state)
        model.set_graph(r)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def stream_validation(model: Recommender, past: Sequence[Block], valid: dict, cfg: TrainConfig) -> dict[str, float | None]:
    """The stream's figures on validation for ``TrainConfig.select_on = "stream"``, from ``valid`` (the
    trained block's validation, LA) and the validation splits of the ``past`` blocks:

        stream_ra@K = mean over past blocks j with validation users of m_j,   m = cfg.select_metric
        stream_h@K  = 2 · LA · RA / (LA + RA)   (method.md 8's H_k, on validation)

    One scoring pass serves every past block (:func:`ccdrec.eval.metrics.evaluate_many`). A figure
    without users is None; ``stream_h`` is then the other one."""
    cfg, past = check_train_config(cfg), check_blocks("past", past)
    metric, k = cfg.select_metric, cfg.select_metric.split("@")[1]
    scores = evaluate_many(model, [(b, "valid", None) for b in past], ks=selection_ks(metric), chunk=cfg.eval_chunk)
    seen = [s[metric] for s in scores if s.get(metric) is not None]
    ra, la = (float(np.mean(seen)) if seen else None), valid.get(metric)
    h = la if ra is None else ra if la is None else harmonic(la, ra)
    return {f"stream_ra@{k}": ra, f"stream_h@{k}": h}


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
