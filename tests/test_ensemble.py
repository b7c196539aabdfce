"""Rank ensemble (method.md 6) and the teacher's top lists (method.md 7)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ccdrec.data.synthetic import synthetic_stream
from ccdrec.distill import RankEnsemble, top_lists
from ccdrec.eval.metrics import evaluate_block
from ccdrec.models import MF, LightGCN, MultVAE


class FixedScores:
    """A duck-typed Recommender whose scores are a fixed dense (users x items) matrix."""

    def __init__(self, scores):
        self.scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32)

    n_users = property(lambda self: self.scores.shape[0])
    n_items = property(lambda self: self.scores.shape[1])
    device = property(lambda self: torch.device("cpu"))

    def num_parameters(self) -> int:
        return 0

    def scorer(self, context=None):
        return lambda users: self.scores[users]


@pytest.fixture(scope="module")
def block():
    return synthetic_stream(n_blocks=1)[0]


def _lightgcn(block, seed):
    torch.manual_seed(seed)
    model = LightGCN(block.n_users, block.n_items, dim=8)
    model.set_graph(block.train_matrix)
    return model.eval()


def _copy(model, block):
    """A copy via the state dict (deepcopy fails on a LightGCN holding its sparse CSR graph)."""
    twin = LightGCN(block.n_users, block.n_items, dim=model.dim)
    twin.load_state_dict(model.state_dict())
    twin.set_graph(block.train_matrix)
    return twin.eval()


def test_identical_members_rank_like_the_member(block):
    member = _lightgcn(block, 0)
    ensemble = RankEnsemble([member, _copy(member, block), _copy(member, block)])
    users = torch.arange(block.n_users)
    expected = member.scorer()(users).argsort(dim=1, descending=True)
    got = ensemble.scorer()(users).argsort(dim=1, descending=True)
    assert torch.equal(got, expected)
    # as a Recommender for evaluation: same metrics as the member
    assert evaluate_block(ensemble, block, "test") == pytest.approx(evaluate_block(member, block, "test"))


def test_ensemble_equals_the_formula_by_hand():
    a = FixedScores([[0.9, 0.1, 0.5, 0.3, 0.7], [0.0, 1.0, 2.0, 3.0, 4.0]])
    b = FixedScores([[5.0, 4.0, 3.0, 2.0, 1.0], [0.2, -1.0, 0.1, 0.4, 0.3]])
    # 0-based ranks, worked out by hand
    ranks_a = np.array([[0, 4, 2, 3, 1], [4, 3, 2, 1, 0]])
    ranks_b = np.array([[0, 1, 2, 3, 4], [2, 4, 3, 0, 1]])
    users = torch.tensor([0, 1])
    for exponent, cap in ((0.05, 45_000), (0.5, 2)):
        expected = 0.5 * ((np.minimum(ranks_a, cap) + 1.0) ** -exponent + (np.minimum(ranks_b, cap) + 1.0) ** -exponent)
        got = RankEnsemble([a, b], exponent=exponent, rank_cap=cap).scorer()(users).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # with cap 2, ranks 2, 3, 4 share one weight: user 0's items 2, 3 (ranks 2,2 / 2,3) tie exactly
    capped = RankEnsemble([a, b], exponent=0.5, rank_cap=2).scorer()(users)
    assert capped[0, 2] == capped[0, 3]


def test_ensemble_members_of_different_kinds_share_one_universe(block):
    mf = MF(block.n_users, block.n_items, dim=4)
    ensemble = RankEnsemble([_lightgcn(block, 0), mf])
    assert (ensemble.n_users, ensemble.n_items) == (block.n_users, block.n_items)
    assert ensemble.num_parameters() == sum(m.num_parameters() for m in ensemble.members)
    with pytest.raises(ValueError):
        RankEnsemble([mf, MF(block.n_users, block.n_items + 1, dim=4)])
    with pytest.raises(ValueError):
        RankEnsemble([])


def test_ensemble_passes_the_context_to_vae_members(block):
    torch.manual_seed(0)
    vae = MultVAE(block.n_users, block.n_items, dim=8).eval()
    context = block.train_matrix
    users = torch.arange(block.n_users)
    expected = vae.scorer(context=context)(users).argsort(dim=1, descending=True)
    got = RankEnsemble([vae, vae]).scorer(context=context)(users).argsort(dim=1, descending=True)
    assert torch.equal(got, expected)
    assert evaluate_block(RankEnsemble([vae]), block, "test") == pytest.approx(evaluate_block(vae, block, "test"))


def _random_case(seed=0, n_users=23, n_items=17, density=0.3):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    observed = sp.random(n_users, n_items, density=density, format="csr", random_state=seed)
    observed.data[:] = 1.0
    return scores, observed


def _dense_top(scores, observed, n):
    """Brute force: mask observed with -inf, full argsort; rows / columns padded with -1."""
    masked = np.where(observed.toarray() > 0, -np.inf, scores)
    out = []
    for m in (masked, masked.T):
        order = np.argsort(-m, axis=1, kind="stable")[:, :n]
        top = np.where(np.isfinite(np.take_along_axis(m, order, 1)), order, -1)
        out.append(np.pad(top, ((0, 0), (0, n - top.shape[1])), constant_values=-1))
    return out


def test_top_lists_match_brute_force_and_exclude_observed():
    scores, observed = _random_case()
    n_users, n_items = scores.shape
    user_top, item_top = top_lists(FixedScores(scores).scorer(), n_users, n_items, observed, n=6, chunk=5)
    exp_user, exp_item = _dense_top(scores, observed, 6)
    np.testing.assert_array_equal(user_top, exp_user)
    np.testing.assert_array_equal(item_top, exp_item)
    dense = observed.toarray() > 0
    for u in range(n_users):
        items = user_top[u][user_top[u] >= 0]
        assert not dense[u, items].any()
        assert np.all(np.diff(scores[u, items]) <= 0)
    for i in range(n_items):
        us = item_top[i][item_top[i] >= 0]
        assert not dense[us, i].any()
        assert np.all(np.diff(scores[us, i]) <= 0)


def test_top_lists_are_chunk_size_invariant():
    scores, observed = _random_case(seed=1)
    runs = [top_lists(FixedScores(scores).scorer(), *scores.shape, observed, n=4, chunk=c) for c in (1, 3, 7, 1000)]
    for user_top, item_top in runs[1:]:
        np.testing.assert_array_equal(user_top, runs[0][0])
        np.testing.assert_array_equal(item_top, runs[0][1])
    user_only, none = top_lists(FixedScores(scores).scorer(), *scores.shape, observed, n=4, chunk=3, item_side=False)
    np.testing.assert_array_equal(user_only, runs[0][0])
    assert none is None


def test_top_lists_pad_short_rows_and_unscored_users():
    scores = np.arange(4 * 5, dtype=np.float32).reshape(4, 5)
    observed = sp.csr_matrix(np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]))
    scores[3, 4] = np.nan  # a broken score is never a candidate (NaN would sort first otherwise)
    user_top, item_top = top_lists(FixedScores(scores).scorer(), 4, 5, observed, n=4, users=np.array([0, 3]))
    np.testing.assert_array_equal(user_top[0], [4, 3, -1, -1])
    np.testing.assert_array_equal(user_top[3], [3, 2, 1, -1])
    assert (user_top[[1, 2]] == -1).all()  # not scored
    assert (item_top[0] == -1).all()  # observed by everyone
    np.testing.assert_array_equal(item_top[1], [3, -1])  # only scored users, observed ones removed
    np.testing.assert_array_equal(item_top[4], [0, -1])  # user 3's NaN dropped
    np.testing.assert_array_equal(item_top[3], [3, 0])


def test_top_lists_are_never_longer_than_what_they_rank():
    scores, observed = _random_case(seed=2)
    n_users, n_items = scores.shape
    user_top, item_top = top_lists(FixedScores(scores).scorer(), n_users, n_items, observed, n=10**9, chunk=5)
    assert user_top.shape == (n_users, n_items) and item_top.shape == (n_items, n_users)
    exp_user, exp_item = _dense_top(scores, observed, max(n_users, n_items))
    np.testing.assert_array_equal(user_top, exp_user[:, :n_items])
    np.testing.assert_array_equal(item_top, exp_item[:, :n_users])


def test_top_lists_of_an_ensemble_on_a_stream_block(block):
    ensemble = RankEnsemble([_lightgcn(block, 0), _lightgcn(block, 1)])
    user_top, item_top = top_lists(ensemble.scorer(), block.n_users, block.n_items, block.train_matrix, n=10, chunk=64)
    assert user_top.shape == (block.n_users, 10) and item_top.shape == (block.n_items, 10)
    assert not (block.train_matrix[np.repeat(np.arange(block.n_users), 10), user_top.ravel()] > 0).any()


def test_sketched_tail_ranks_keep_the_top_of_the_ensemble():
    class Fixed:
        def __init__(self, scores):
            self.s = scores
            self.n_users, self.n_items = scores.shape
            self.device = torch.device("cpu")

        def scorer(self, context=None):
            return lambda users: self.s[users]

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3000, generator=gen)
    members = [Fixed(base + 0.7 * torch.randn(64, 3000, generator=gen)) for _ in range(4)]
    users = torch.arange(64)
    exact = RankEnsemble(members).scorer()(users)
    approx = RankEnsemble(members, exact_top=200, sketch=256).scorer()(users)
    top_e, top_a = exact.topk(40).indices, approx.topk(40).indices
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 40 for a, b in zip(top_e, top_a, strict=True)])
    assert overlap > 0.95
    # ranks inside the exact top keep their exact weights
    assert (approx - exact).abs().max() < 0.02
