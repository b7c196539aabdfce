"""Stability / plasticity proxies (method.md 5.1)."""

import pytest
import torch

from ccdrec.continual import Proxy, ema_update
from ccdrec.models import MF


def _student(n_users, n_items, dim=4, seed=0):
    torch.manual_seed(seed)
    m = MF(n_users, n_items, dim)
    with torch.no_grad():
        m.user_emb.normal_()
        m.item_emb.normal_()
    return m


def test_from_model_is_a_frozen_copy():
    m = _student(5, 7)
    p = Proxy.from_model(m)
    assert (p.n_users, p.n_items, p.dim) == (5, 7, 4)
    assert torch.equal(p.user, m.user_emb.detach()) and torch.equal(p.item, m.item_emb.detach())
    with torch.no_grad():
        m.user_emb.add_(1.0)
    assert not torch.equal(p.user, m.user_emb.detach())
    assert not p.user.requires_grad


def test_ema_update_formula_and_new_rows():
    prev = Proxy.from_model(_student(4, 6, seed=1))
    student = _student(7, 9, seed=2)
    w = 0.9
    new = ema_update(prev, student, w)
    assert (new.n_users, new.n_items) == (7, 9)
    su, si = student.user_emb.detach(), student.item_emb.detach()
    torch.testing.assert_close(new.user[:4], w * prev.user + (1 - w) * su[:4])
    torch.testing.assert_close(new.item[:6], w * prev.item + (1 - w) * si[:6])
    assert torch.equal(new.user[4:], su[4:]) and torch.equal(new.item[6:], si[6:])


def test_ema_update_extremes():
    prev = Proxy.from_model(_student(4, 6, seed=1))
    student = _student(5, 8, seed=2)
    keep = ema_update(prev, student, 1.0)
    assert torch.equal(keep.user[:4], prev.user) and torch.equal(keep.item[:6], prev.item)
    assert torch.equal(keep.user[4:], student.user_emb.detach()[4:])
    copy = ema_update(prev, student, 0.0)
    assert torch.equal(copy.user, student.user_emb.detach()) and torch.equal(copy.item, student.item_emb.detach())


def test_ema_update_rejects_smaller_student():
    prev = Proxy.from_model(_student(4, 6))
    with pytest.raises(ValueError):
        ema_update(prev, _student(3, 6), 0.5)
    with pytest.raises(ValueError):
        ema_update(prev, _student(4, 5), 0.5)


def test_scorer_pads_larger_universe_and_unknown_users():
    p = Proxy.from_model(_student(3, 4))
    s = p.scorer()(torch.tensor([0, 2]))
    torch.testing.assert_close(s, p.user[[0, 2]] @ p.item.T)
    big = p.scorer(n_items=6)(torch.tensor([1, 5]))
    assert big.shape == (2, 6)
    torch.testing.assert_close(big[0, :4], p.user[1] @ p.item.T)
    assert torch.isneginf(big[0, 4:]).all() and torch.isneginf(big[1]).all()
    pairs = p.score_pairs(torch.tensor([0, 1, 2]), torch.tensor([3, 5, 0]))
    torch.testing.assert_close(pairs[[0, 2]], torch.stack([p.user[0] @ p.item[3], p.user[2] @ p.item[0]]))
    assert torch.isneginf(pairs[1])


def test_state_round_trip():
    p = Proxy.from_model(_student(3, 4))
    state = p.state()
    assert set(state) == {"user", "item"} and all(isinstance(v, torch.Tensor) for v in state.values())
    q = Proxy.from_state(state)
    assert torch.equal(q.user, p.user) and torch.equal(q.item, p.item)
