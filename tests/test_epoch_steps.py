"""The bound on steps per epoch (``TrainConfig.max_steps``, ``ReplayConfig.max_steps``): an epoch that
would take more steps grows its batch instead, so that its cost stays linear in the interactions; an
epoch under the bound is exactly what it was without one."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

from ccdrec.config import MAX_STEPS, ReplayConfig, TrainConfig, bounded_batch
from ccdrec.continual.replay import ReplaySet, replay_pass
from ccdrec.models import LightGCN, MultVAE
from ccdrec.train.objectives import bpr_epoch, vae_epoch
from ccdrec.train.sampling import NegativeSampler


@given(n=st.integers(0, 10**7), batch=st.integers(1, 10**5), max_steps=st.none() | st.integers(1, 10**4))
def test_bounded_batch_bounds_the_steps_and_never_shrinks_the_batch(n, batch, max_steps):
    b = bounded_batch(n, batch, max_steps)
    assert b >= batch
    steps = -(-n // b)
    if max_steps is None or -(-n // batch) <= max_steps:
        assert b == batch  # under the bound: unchanged
    else:
        assert steps <= max_steps
        assert -(-n // (b - 1)) > max_steps  # the smallest batch that keeps the bound


def test_the_default_bound_is_above_every_bundled_epoch():
    # Gowalla D_0 distillation (the largest bundled epoch): 417,977 pairs at batch 1,024 = 409 steps
    assert bounded_batch(417_977, 1024, MAX_STEPS) == 1024
    assert TrainConfig().max_steps == ReplayConfig().max_steps == MAX_STEPS


class _CountingAdam(torch.optim.Adam):
    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _bpr_run(max_steps: int | None) -> tuple[int, list[torch.Tensor], int]:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n_users, n_items = 40, 30
    pairs = np.unique(np.stack([rng.integers(0, n_users, 400), rng.integers(0, n_items, 400)], 1), axis=0)
    train = sp.csr_matrix((np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
    model = LightGCN(n_users, n_items, dim=8)
    model.set_graph(train)
    opt = _CountingAdam(model.parameters(), lr=1e-2)
    cfg = TrainConfig(batch_size=16, max_steps=max_steps)
    bpr_epoch(model, opt, pairs, NegativeSampler(train, n_items), cfg, np.random.default_rng(1), 0)
    return opt.steps, [p.detach().clone() for p in model.parameters()], len(pairs)


def test_bpr_epoch_takes_at_most_max_steps_and_is_unchanged_under_the_bound():
    free, free_weights, n = _bpr_run(None)
    assert free == -(-n // 16)
    bounded, _, _ = _bpr_run(5)
    assert bounded == 5
    loose, loose_weights, _ = _bpr_run(free)  # a bound the epoch does not reach changes nothing, bit for bit
    assert loose == free
    assert all(torch.equal(a, b) for a, b in zip(free_weights, loose_weights, strict=True))


@pytest.mark.parametrize("max_steps, expected", [(None, 25), (4, 4), (25, 25)])
def test_replay_pass_takes_at_most_max_steps(max_steps, expected):
    rng = np.random.default_rng(0)
    model = LightGCN(20, 15, dim=8)
    model.set_graph(sp.random(20, 15, density=0.3, format="csr", random_state=0, dtype=np.float32))
    replay = ReplaySet(rng.integers(0, 20, 400), rng.integers(0, 15, 400), rng.random(400).astype(np.float32))
    opt = _CountingAdam(model.parameters(), lr=1e-2)
    replay_pass(model, opt, replay, 0.5, 16, rng, max_steps)
    assert opt.steps == expected


@pytest.mark.parametrize("max_steps", [None, 3])
def test_vae_epoch_takes_at_most_max_steps(max_steps):
    torch.manual_seed(0)
    matrix = sp.random(40, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    matrix.data[:] = 1.0
    users = int((np.diff(matrix.indptr) > 0).sum())
    model = MultVAE(40, 30, dim=8)
    opt = _CountingAdam(model.parameters(), lr=1e-3)
    cfg = TrainConfig(batch_size=4, max_steps=max_steps)
    vae_epoch(model, opt, matrix, cfg, np.random.default_rng(0), [0])
    assert users > 12  # more than 3 steps of 4 users without the bound
    assert opt.steps == (-(-users // 4) if max_steps is None else max_steps)
