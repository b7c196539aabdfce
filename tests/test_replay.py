"""Proxy-guided replay and the Mult-VAE replay path (method.md 5.1, 5.3)."""

import copy
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from ccdrec.continual import (
    PreviousOutputKL,
    Proxy,
    ReplaySet,
    impute_replay,
    kl_to_previous,
    rank_of,
    replay_candidates,
    replay_pass,
    replay_weight,
    sample_replay,
)
from ccdrec.models import MF, MultVAE
from ccdrec.models.vae import rows_tensor


def _table_scorer(scores: torch.Tensor):
    return lambda users: scores[users]


def _random_exclude(rng, n_users, n_cols, p=0.2):
    return sp.csr_matrix((rng.random((n_users, n_cols)) < p).astype(np.float32))


def _proxy(n_users, n_items, seed, dim=4):
    g = torch.Generator().manual_seed(seed)
    return Proxy(torch.randn(n_users, dim, generator=g), torch.randn(n_items, dim, generator=g))


def _topa_brute(scores: np.ndarray, excl: np.ndarray, a: int) -> list[set[int]]:
    out = []
    for u in range(scores.shape[0]):
        cand = [i for i in np.argsort(-scores[u], kind="stable") if not excl[u, i] and np.isfinite(scores[u, i])]
        out.append(set(cand[:a]))
    return out


def _dense_exclude(exclude: sp.csr_matrix, n_users, n_items) -> np.ndarray:
    d = np.zeros((n_users, n_items), dtype=bool)
    e = exclude.toarray().astype(bool)
    d[: e.shape[0], : e.shape[1]] = e[:, :n_items]
    return d


def test_replay_weight_schedule():
    assert replay_weight(0) == 0.5
    assert math.isclose(replay_weight(10), 0.5 * math.exp(-1))
    assert math.isclose(replay_weight(5, decay=5.0), 0.5 * math.exp(-1))


def test_rank_of_matches_brute_force_with_ties_and_exclusion():
    rng = np.random.default_rng(0)
    n_users, n_items = 7, 11
    scores = torch.from_numpy(rng.integers(0, 4, (n_users, n_items)).astype(np.float32))  # many ties
    users = np.array([3, 0, 6, 2, 5])
    items = rng.integers(0, n_items, (len(users), 4))
    exclude = _random_exclude(rng, 6, 9)  # fewer rows and columns than the universe
    excl = _dense_exclude(exclude, n_users, n_items)
    s = scores.numpy()

    def brute_rank(u, i, skip):
        return sum(s[u, j] > s[u, i] and not skip[u, j] for j in range(n_items))

    none = np.zeros_like(excl)
    brute = np.array([[brute_rank(u, i, none) for i in row] for u, row in zip(users, items, strict=True)])
    brute_ex = np.array([[brute_rank(u, i, excl) for i in row] for u, row in zip(users, items, strict=True)])
    for chunk in (2, 100):
        np.testing.assert_array_equal(rank_of(_table_scorer(scores), users, items, n_items, chunk=chunk), brute)
        np.testing.assert_array_equal(rank_of(_table_scorer(scores), users, items, n_items, exclude, chunk=chunk), brute_ex)

    # 0 = top: with scores -i the ranking is 0, 1, 2, ...; a smaller scorer's missing items rank last
    def descending(u):
        return torch.from_numpy(-np.arange(n_items - 2, dtype=np.float32))[None].repeat(len(u), 1)

    assert rank_of(descending, np.array([0]), np.array([[0, 5, n_items - 1]]), n_items)[0].tolist() == [0, 5, n_items - 2]


def _setup(seed=0, n_users=12, n_items=30):
    rng = np.random.default_rng(seed)
    sp_, pp_ = _proxy(n_users, n_items - 4, seed + 1), _proxy(n_users - 2, n_items, seed + 2)  # smaller universes
    current = _proxy(n_users, n_items, seed + 3)
    exclude = _random_exclude(rng, n_users, n_items - 3)
    return sp_, pp_, current, exclude


def test_sample_replay_draws_from_proxy_top_a_without_excluded_items():
    n_users, n_items, a = 12, 30, 6
    sp_, pp_, current, exclude = _setup(n_users=n_users, n_items=n_items)
    excl = _dense_exclude(exclude, n_users, n_items)
    users = np.arange(n_users)
    for proxy, n_x in ((sp_, 3), (pp_, 2)):
        rs = sample_replay(
            current.scorer(),
            n_items,
            [(proxy.scorer(n_items=n_items), n_x)],
            users,
            exclude,
            a,
            rng=np.random.default_rng(1),
            chunk=5,
        )
        full = proxy.scorer(n_items=n_items)(torch.from_numpy(users)).numpy()
        top = _topa_brute(full, excl, a)
        assert len(rs) > 0
        assert not excl[rs.users, rs.items].any()
        for u in users:
            drawn = rs.items[rs.users == u]
            assert len(drawn) == len(set(drawn.tolist())) == min(n_x, len(top[u]))
            assert set(drawn.tolist()) <= top[u]
        assert set(rs.users.tolist()) <= set(range(proxy.n_users))  # users unknown to the proxy get nothing
        np.testing.assert_allclose(rs.labels, 1 / (1 + np.exp(-full[rs.users, rs.items])), rtol=1e-5)
        assert rs.users.dtype == np.int64 and rs.items.dtype == np.int64 and rs.labels.dtype == np.float32


def test_sample_replay_merges_sources_keeping_the_larger_label():
    n_users, n_items, a = 10, 25, 5
    sp_, pp_, current, exclude = _setup(seed=4, n_users=n_users, n_items=n_items)
    excl = _dense_exclude(exclude, n_users, n_items)
    users = np.arange(n_users)
    # n_X = A draws every candidate, so the merged set is known exactly
    rs = sample_replay(
        current.scorer(),
        n_items,
        [(sp_.scorer(), a), (pp_.scorer(), a)],
        users,
        exclude,
        a,
        rng=np.random.default_rng(0),
        chunk=3,
    )
    s_full = sp_.scorer(n_items=n_items)(torch.from_numpy(users)).numpy()
    p_full = pp_.scorer(n_items=n_items)(torch.from_numpy(users)).numpy()
    top_s, top_p = _topa_brute(s_full, excl, a), _topa_brute(p_full, excl, a)
    expect = {}
    for u in users:
        for full, top in ((s_full, top_s[u]), (p_full, top_p[u])):
            for i in top:
                y = 1 / (1 + math.exp(-full[u, i]))
                expect[(u, i)] = max(expect.get((u, i), -1.0), y)
    got = {(u, i): y for u, i, y in zip(rs.users.tolist(), rs.items.tolist(), rs.labels.tolist(), strict=True)}
    assert got.keys() == expect.keys()
    assert len(got) == len(rs)  # no duplicate pairs
    for k, y in expect.items():
        assert math.isclose(got[k], y, rel_tol=1e-5)


def test_rank_labels_are_the_current_models_own_scores_at_the_source_positions():
    n_users, n_items, a = 10, 25, 6
    _, _, current, exclude = _setup(seed=3, n_users=n_users, n_items=n_items)
    src = _proxy(n_users, n_items, seed=11)
    excl = _dense_exclude(exclude, n_users, n_items)
    users = np.arange(n_users)
    cur = current.scorer()(torch.from_numpy(users)).numpy()
    got = []
    for scale in (1.0, 50.0):  # the same ranking at another scale: source labels change, rank labels do not
        scaled = Proxy(src.user * scale, src.item)
        rs = sample_replay(
            current.scorer(), n_items, [(scaled.scorer(), a)], users, exclude, a, rng=np.random.default_rng(0), labels="rank"
        )
        got.append(rs)
        full = scaled.scorer()(torch.from_numpy(users)).numpy()
        for u in users:
            own = np.sort(cur[u][~excl[u]])[::-1]
            listed = [i for i in np.argsort(-full[u], kind="stable") if not excl[u, i]][:a]
            for i, y in zip(rs.items[rs.users == u], rs.labels[rs.users == u], strict=True):
                assert math.isclose(y, 1 / (1 + math.exp(-own[listed.index(i)])), rel_tol=1e-5)
    np.testing.assert_array_equal(got[0].items, got[1].items)
    np.testing.assert_allclose(got[0].labels, got[1].labels)
    # a source that is the current model itself labels each item with its own score
    rs = sample_replay(current.scorer(), n_items, [(current.scorer(), a)], users, exclude, a, labels="rank")
    np.testing.assert_allclose(rs.labels, 1 / (1 + np.exp(-cur[rs.users, rs.items])), rtol=1e-5)


def test_sample_replay_is_deterministic_given_the_rng():
    sp_, pp_, current, exclude = _setup(seed=7)
    args = (current.scorer(), 30, [(sp_.scorer(), 2), (pp_.scorer(), 3)], np.arange(12), exclude, 8)
    a = sample_replay(*args, eps=0.01, rng=np.random.default_rng(5), chunk=4)
    b = sample_replay(*args, eps=0.01, rng=np.random.default_rng(5), chunk=4)
    for x, y in ((a.users, b.users), (a.items, b.items), (a.labels, b.labels)):
        np.testing.assert_array_equal(x, y)
    assert len(sample_replay(*args[:2], [(sp_.scorer(), 0)], *args[3:])) == 0


def test_precomputed_candidates_draw_the_same_replay_set():
    sp_, pp_, current, exclude = _setup(seed=7)
    users = np.arange(12)
    fresh = sample_replay(
        current.scorer(),
        30,
        [(sp_.scorer(), 2), (pp_.scorer(), 3)],
        users,
        exclude,
        8,
        eps=0.01,
        rng=np.random.default_rng(5),
        chunk=4,
        labels="source",
    )
    cands = [(replay_candidates(x.scorer(), users, 30, exclude, 10, chunk=5), n) for x, n in ((sp_, 2), (pp_, 3))]
    again = sample_replay(
        current.scorer(), 30, cands, users, exclude, 8, eps=0.01, rng=np.random.default_rng(5), chunk=4, labels="source"
    )
    for x, y in ((fresh.users, again.users), (fresh.items, again.items), (fresh.labels, again.labels)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="other users"):
        sample_replay(current.scorer(), 30, cands, np.arange(20), exclude, 8)
    with pytest.raises(ValueError, match="requested"):
        sample_replay(current.scorer(), 30, cands, users, exclude, 12)


def test_sample_replay_favours_large_rank_disparity():
    n_users, n_items, a, n_x = 300, 200, 20, 5
    src = torch.full((n_users, n_items), -100.0)
    src[:, :a] = torch.arange(a, 0, -1, dtype=torch.float32)  # proxy top-A = items 0..19
    cur = torch.zeros(n_users, n_items)
    cur[:, :10] = -50.0  # forgotten by the current model: ranked at the bottom
    cur[:, 10:a] = 50.0  # still ranked at the top
    users = np.arange(n_users)

    def forgotten_share(eps):
        rs = sample_replay(
            _table_scorer(cur),
            n_items,
            [(_table_scorer(src), n_x)],
            users,
            None,
            a,
            eps=eps,
            rng=np.random.default_rng(0),
            chunk=128,
        )
        assert len(rs) == n_users * n_x
        return float((rs.items < 10).mean())

    assert forgotten_share(0.05) > 0.95
    assert 0.35 < forgotten_share(0.0) < 0.65  # ε = 0: uniform over the candidates


def test_replay_pass_moves_scores_towards_labels():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = MF(20, 15, dim=8)
    n = 60
    replay = ReplaySet(rng.integers(0, 20, n), rng.integers(0, 15, n), rng.choice([0.05, 0.95], n))

    def bce():
        with torch.no_grad():
            s = model.score_pairs(torch.from_numpy(replay.users), torch.from_numpy(replay.items))
            return F.binary_cross_entropy_with_logits(s, torch.from_numpy(replay.labels)).item()

    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    before = bce()
    losses = [replay_pass(model, opt, replay, 0.5, 16, rng) for _ in range(10)]
    assert bce() < before - 0.05
    assert losses[-1] < losses[0]
    assert replay_pass(model, opt, ReplaySet.empty(), 0.5, 16, rng) == 0.0


def test_impute_replay_fills_only_zero_entries():
    m = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    replay = ReplaySet(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 2, 3, 3]), np.full(5, 0.7))
    out = impute_replay(m, replay).toarray()
    expect = m.toarray()
    expect[0, 1] = expect[1, 2] = expect[2, 3] = 0.1
    np.testing.assert_allclose(out, expect)
    np.testing.assert_array_equal(m.toarray()[0], [1, 0, 0, 1])  # input untouched


def test_kl_to_previous_restricts_and_renormalises_old_columns():
    prev = torch.randn(3, 5)
    cur = torch.cat([prev + 2.0, torch.randn(3, 2)], dim=1)  # same distribution on the old columns
    assert kl_to_previous(prev, cur, 5).abs().item() < 1e-6
    assert kl_to_previous(prev, torch.randn(3, 7), 5).item() > 0


def _vae_setup():
    torch.manual_seed(0)
    n_users, n_old = 10, 12
    prev = MultVAE(n_users, n_old, dim=4)
    rng = np.random.default_rng(0)
    dense = (rng.random((n_users, n_old + 3)) < 0.3).astype(np.float32)
    dense[:, n_old:] = 0.0  # nobody has new items yet: the old columns' input is unchanged
    dense[:, 0] = 1.0
    return prev, sp.csr_matrix(dense), n_old


def test_previous_output_kl_zero_for_same_model_positive_otherwise():
    prev, matrix, n_old = _vae_setup()
    model = copy.deepcopy(prev)
    model.grow(prev.n_users, n_old + 3, matrix)
    users = np.arange(prev.n_users)
    reg = PreviousOutputKL(prev, np.array([0, 2, 4, 7]), n_old, matrix, weight=1.0)

    def loss(m):
        logits = m(rows_tensor(matrix, torch.from_numpy(users), m.n_items, "cpu"), stochastic=False)[0]
        return reg(m, logits, users, np.empty(0, np.int64), 0)

    assert loss(model).abs().item() < 1e-6
    with torch.no_grad():
        model.decoder.weight.add_(torch.randn_like(model.decoder.weight))
    value = loss(model)
    assert value.item() > 1e-3 and value.requires_grad
    nobody = PreviousOutputKL(prev, np.array([], dtype=np.int64), n_old, matrix)
    logits = model(rows_tensor(matrix, torch.from_numpy(users), model.n_items, "cpu"), stochastic=False)[0]
    assert nobody(model, logits, users, None, 0).item() == 0.0


# ------------------------------------------------------------------------------ sampled rank_W (rank_sample)


def _embedding_model(n_users, n_items, seed, dim=8):
    torch.manual_seed(seed)
    m = MF(n_users, n_items, dim=dim)
    with torch.no_grad():
        m.user_emb.normal_()
        m.item_emb.normal_()
    return m


def test_sampled_rank_estimates_the_exact_rank_among_non_excluded_items_without_bias():
    """rank_W from 2,000 of 20,000 items: within 4 standard errors n·sqrt(p(1-p)/m) of the exact rank
    everywhere, and unbiased on average; the user's excluded items never count, as in the exact rank."""
    from ccdrec.continual.replay import _count_above, _ExactRanking, _SampledRanking

    n_users, n_items, m = 64, 20_000, 2_000
    model = _embedding_model(n_users, n_items, seed=0)
    rng = np.random.default_rng(0)
    exclude = _random_exclude(rng, n_users, n_items, p=0.3)  # 30% excluded: the scale n_u / m matters
    batch = np.arange(n_users)
    items = torch.from_numpy(rng.integers(0, n_items, (n_users, 50)))
    reps = tuple(t.detach() for t in model.propagate())
    exact = _ExactRanking(model.scorer(), batch, n_items, exclude, "cpu")
    est = _SampledRanking(reps, batch, n_items, exclude, m, np.random.default_rng(1), "cpu")
    want, got = exact.rank_of(items), est.rank_of(items)
    n_valid = torch.from_numpy(n_items - np.diff(exclude.indptr)).float()[:, None]
    p = (want / n_valid).clamp(1e-3, 1 - 1e-3)
    se = n_valid * torch.sqrt(p * (1 - p) / (m * 0.7))
    assert bool(((got - want).abs() <= 4 * se + 2).all())
    assert abs(float((got - want).mean() / se.mean())) < 0.3  # 3,200 estimates: no systematic offset
    # the score at a rank position: the exact score at a nearby position
    pos = torch.arange(0, 200, 20).repeat(n_users, 1)
    at = est.score_at(pos)
    true_pos = _count_above(exact.sorted, at).float()  # where the returned score sits in the exact ranking
    step = est.scale  # n_u / m: items per sampled item
    # the sample's order statistic q read has a true rank with sd about step * sqrt(q + 1); at the top the
    # sample's maximum sits an exponential(step) number of items below the true top
    q = (pos + 0.5) / step
    assert bool(((true_pos - pos).abs() <= 4 * step * (q + 1).sqrt() + 4 * step).all())


def test_sampled_rank_is_used_only_past_rank_sample_items_and_keeps_the_draw_deterministic():
    from ccdrec.config import ReplayConfig
    from ccdrec.continual.replayer import Replayer

    n_users, n_items = 40, 3_000
    model = _embedding_model(n_users, n_items, seed=2)
    proxy = _proxy(n_users, n_items, seed=5, dim=8)
    exclude = _random_exclude(np.random.default_rng(3), n_users, n_items, p=0.05)

    def draw(rank_sample, seed=0):
        rc = ReplayConfig(top_a=30, n_stability=5, rank_sample=rank_sample, eps=1e-2)
        return Replayer([(proxy.scorer(), 5)], np.arange(n_users), exclude, rc, seed, n_items).sample(model)

    exact = draw(None)
    for same in (draw(n_items), draw(10**6)):  # not fewer than the universe: the exact ranking, bit for bit
        np.testing.assert_array_equal(same.items, exact.items)
        np.testing.assert_array_equal(same.labels, exact.labels)
    a, b = draw(500), draw(500)
    np.testing.assert_array_equal(a.items, b.items)
    assert len(a) == len(exact) == n_users * 5
    cands = replay_candidates(proxy.scorer(), np.arange(n_users), n_items, exclude, 30)
    for u, i in zip(a.users, a.items, strict=True):  # drawn from the source's candidates, never excluded
        assert i in cands.items[u].tolist() and not exclude[u, i]
    # a strong preference for forgotten items survives the estimate: the draws mostly agree with the exact ones
    overlap = len(set(zip(a.users, a.items, strict=True)) & set(zip(exact.users, exact.items, strict=True))) / len(exact)
    assert overlap > 0.5


def test_a_replay_pass_with_its_own_first_moment_does_not_carry_the_epochs_momentum_on():
    """momentum: own. With the epoch's Adam state, steps whose loss has no gradient still move the weights
    along the BPR pass's momentum; with the pass's own first moment they do not, and the epoch's momentum
    is back for the next epoch (the second moment stays shared)."""
    from ccdrec.continual.replay import own_first_moment

    def trained():
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.Adam([w], lr=0.1)
        (w * torch.tensor([1.0, -2.0, 3.0, 0.5])).sum().backward()
        opt.step()  # an epoch's step: momentum and second moment set
        return w, opt

    def idle_steps(w, opt, n=3):
        for _ in range(n):  # a replay pass whose loss gives no gradient
            opt.zero_grad()
            (w * 0).sum().backward()
            opt.step()

    w, opt = trained()
    before = w.detach().clone()
    idle_steps(w, opt)
    assert not torch.equal(w.detach(), before)  # shared: carried on by the momentum
    w, opt = trained()
    before, epoch_m = w.detach().clone(), opt.state[w]["exp_avg"].clone()
    kept: dict = {}
    with own_first_moment(opt, kept):
        idle_steps(w, opt)
    assert torch.equal(w.detach(), before)  # own: no gradient, no move
    assert torch.equal(opt.state[w]["exp_avg"], epoch_m) and torch.equal(kept[id(w)], torch.zeros(4))
