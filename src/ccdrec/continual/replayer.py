"""Proxy-guided replay as a training-loop hook (method.md 5.1, 5.3): who is replayed, what is excluded,
and the :class:`Replayer` that re-draws the replay set before an epoch and runs its BCE pass after it.

The replay set is drawn against the *current* model's ranking and re-drawn as the model moves
(method.md 5.1, 9); the sampling and the loss are :mod:`ccdrec.continual.replay`'s.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import ReplayConfig
from ccdrec.continual.replay import (
    Candidates,
    ReplaySet,
    own_first_moment,
    replay_candidates,
    replay_pass,
    replay_weight,
    sample_replay,
)
from ccdrec.data.stream import Block, pad_to
from ccdrec.models.base import EmbeddingModel, Recommender, Scorer
from ccdrec.train.callbacks import Callback


def old_active_users(block: Block) -> np.ndarray:
    """The old users of block k (ID < U_{k-1}), shape ``(U_{k-1},)``; replay runs for each of them (5.1)."""
    return np.arange(block.prev_users, dtype=np.int64)


def past_train(block: Block, prev: Block | None) -> sp.csr_matrix:
    """Each user's train items of blocks k-1 and k, a binary (U_k x I_k) CSR matrix (replay candidates
    exclude them, 5.1)."""
    r = block.train_matrix
    return r if prev is None else (r + pad_to(prev.train_matrix, r.shape)).tocsr()


class Replayer(Callback):
    """The training-loop callback of proxy-guided replay: re-sample before every ``resample_every``-th
    epoch, a BCE pass with weight λ_e = scale · exp(-e / decay) after every epoch's own pass.

    ``sources``: (scorer or precomputed :class:`Candidates`, items drawn per user) per source;
    ``users``: the replayed users; ``exclude``: their (user, item) pairs never replayed;
    ``context``: the train rows a context-reading model (Mult-VAE) scores from.
    """

    def __init__(
        self,
        sources: list[tuple[Scorer | Candidates, int]],
        users: np.ndarray,
        exclude: sp.csr_matrix,
        rc: ReplayConfig,
        seed: int,
        n_items: int,
        context: sp.csr_matrix | None = None,
    ):
        self.sources = [(s, n) for s, n in sources if n > 0]
        self.users, self.exclude, self.rc = users, exclude, rc
        self.n_items, self.context = n_items, context
        self.rng = np.random.default_rng(seed)
        self.replay = ReplaySet.empty()
        self.sizes: list[int] = []
        self.candidates: list[tuple[Candidates, int]] | None = None  # the fixed sources' candidates, once
        self.moments: dict[int, torch.Tensor] = {}  # the replay pass's own Adam first moments (momentum: own)

    @property
    def active(self) -> bool:
        return bool(self.sources) and len(self.users) > 0

    def candidates_of(self, scorer: Scorer, device) -> Candidates:
        """A source's top-A candidates for this replayer's users and exclusions."""
        return replay_candidates(scorer, self.users, self.n_items, self.exclude, self.rc.top_a, device=device)

    def sample(self, model: Recommender) -> ReplaySet:
        if not self.active:
            return ReplaySet.empty()
        if self.candidates is None:
            self.candidates = [
                (s if isinstance(s, Candidates) else self.candidates_of(s, model.device), n) for s, n in self.sources
            ]
        if isinstance(model, EmbeddingModel) and self.rc.rank_sample is not None and self.rc.rank_sample < self.n_items:
            with torch.no_grad():  # rank_W estimated from sampled items (ReplayConfig.rank_sample)
                reps = tuple(t.detach() for t in model.propagate())
            scorer = model.scorer_of(reps)
        else:
            reps, scorer = None, model.scorer(context=self.context)
        self.replay = sample_replay(
            scorer,
            self.n_items,
            self.candidates,
            self.users,
            self.exclude,
            self.rc.top_a,
            self.rc.eps,
            self.rng,
            device=model.device,
            labels=self.rc.labels,
            rank_sample=self.rc.rank_sample,
            reps=reps,
        )
        self.sizes.append(len(self.replay))
        return self.replay

    def on_epoch_start(self, model, opt, epoch: int) -> None:
        if epoch % self.rc.resample_every == 0:
            self.sample(model)

    def on_epoch_end(self, model, opt, epoch: int) -> None:
        weight = replay_weight(epoch, self.rc.scale, self.rc.decay)
        with own_first_moment(opt, self.moments) if self.rc.momentum == "own" else nullcontext():
            replay_pass(model, opt, self.replay, weight, self.rc.batch_size, self.rng, self.rc.max_steps)
