import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ccdrec.eval import StreamScores, harmonic, rank_metrics
from ccdrec.eval.metrics import evaluate_block


def fixed_scorer(scores: np.ndarray):
    t = torch.tensor(scores, dtype=torch.float32)
    return lambda users: t[users]


def csr(rows, n_users, n_items):
    r = [u for u, items in rows.items() for _ in items]
    c = [i for items in rows.values() for i in items]
    return sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n_users, n_items))


def test_hand_computed_recall_and_ndcg():
    # user 0 ranks items 0>1>2>3>4; its test items are {1, 3}; item 0 is a train item (masked).
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    target = csr({0: [1, 3]}, 1, 5)
    exclude = csr({0: [0]}, 1, 5)
    out = rank_metrics(fixed_scorer(scores), target, exclude, 5, ks=(1, 2, 3))
    # ranking after masking: 1, 2, 3, 4
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(0.5)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@1"] == pytest.approx(1.0)
    ideal2 = 1 + 1 / np.log2(3)
    assert out["ndcg@2"] == pytest.approx(1.0 / ideal2)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / ideal2)
    assert out["users"] == 1


def test_without_mask_train_item_takes_a_slot():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    target = csr({0: [1, 3]}, 1, 5)
    out = rank_metrics(fixed_scorer(scores), target, None, 5, ks=(1,))
    assert out["recall@1"] == 0.0


def test_users_without_targets_are_skipped_and_mean_is_over_users():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0, 0, 0]])
    target = csr({0: [0], 1: [0]}, 3, 3)
    out = rank_metrics(fixed_scorer(scores), target, None, 3, ks=(1,))
    assert out["users"] == 2
    assert out["recall@1"] == pytest.approx(0.5)


def test_chunk_size_invariance():
    rng = np.random.default_rng(0)
    n_u, n_i = 97, 60
    scores = rng.normal(size=(n_u, n_i))
    target = sp.random(n_u, n_i, density=0.05, random_state=1, format="csr")
    target.data[:] = 1
    exclude = sp.random(n_u, n_i, density=0.1, random_state=2, format="csr")
    exclude = (exclude - exclude.multiply(target)).tocsr()
    exclude.eliminate_zeros()
    ref = rank_metrics(fixed_scorer(scores), target, exclude, n_i, chunk=1000)
    for chunk in (1, 7, 32, 96):
        assert rank_metrics(fixed_scorer(scores), target, exclude, n_i, chunk=chunk) == ref


def test_target_from_smaller_universe_is_padded():
    scores = np.array([[1.0, 2.0, 3.0, 9.0]])  # item 3 is newer than the target's universe
    target = csr({0: [2]}, 1, 3)
    out = rank_metrics(fixed_scorer(scores), target, None, 4, ks=(1, 2))
    assert out["recall@1"] == 0.0 and out["recall@2"] == 1.0


def test_evaluate_block_masks_the_other_splits(stream):
    b = stream[0]

    class Oracle:
        """Scores each user's train items highest, then the test items: only the masking lets test items in."""

        n_users, n_items, device = b.n_users, b.n_items, torch.device("cpu")

        def scorer(self, context=None):
            dense = torch.from_numpy((2 * b.matrix("train") + b.matrix("test")).toarray())
            return lambda users: dense[users]

    out = evaluate_block(Oracle(), b, "test", ks=(20,))
    assert out["users"] == len(np.unique(b.test[:, 0]))
    assert out["recall@20"] == pytest.approx(1.0)  # train items masked, so every test item reaches the top
    valid = evaluate_block(Oracle(), b, "valid", ks=(20,))
    assert valid["recall@20"] < 0.5  # test items are masked for validation, valid items score 0


def test_stream_scores_la_ra_h():
    s = StreamScores()
    s.add(0, 0, 0.5)
    s.add(1, 0, 0.2)
    s.add(1, 1, 0.4)
    s.add(2, 0, 0.1)
    s.add(2, 1, 0.3)
    s.add(2, 2, 0.6)
    assert s.la(2) == 0.6 and s.ra(2) == pytest.approx(0.2)
    assert s.h(1) == pytest.approx(harmonic(0.4, 0.2))
    summ = s.summary()
    assert summ["LA"] == pytest.approx(0.5)
    assert summ["RA"] == pytest.approx(0.2)
    assert summ["H"] == pytest.approx(2 * 0.5 * 0.2 / 0.7)
    with pytest.raises(ValueError):
        s.add(1, 2, 0.1)


def test_descending_order_matches_a_stable_argsort():
    from ccdrec.eval.ranking import descending_order

    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 300)).astype(np.float32)
    x[:, ::5] = np.round(x[:, ::5])  # ties
    x[0, :4] = -np.inf
    x[1, 10] = np.float32(3.4e38)
    expected = np.argsort(-x, axis=1, kind="stable")
    got = descending_order(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_ascending_values_sort_masked_entries_as_minus_inf_without_touching_the_scores():
    from ccdrec.eval.ranking import ascending_values

    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((140, 50)).astype(np.float32))
    before = x.clone()
    rows, cols = rng.integers(0, 140, 300), rng.integers(0, 50, 300)  # unsorted, with repeats
    expected = x.numpy().copy()
    expected[rows, cols] = -np.inf
    got = ascending_values(x, masked=(rows, cols))
    np.testing.assert_array_equal(got.numpy(), np.sort(expected, axis=1))
    assert torch.equal(x, before)
    np.testing.assert_array_equal(ascending_values(x).numpy(), np.sort(x.numpy(), axis=1))


def test_rank_weights_are_added_at_each_items_rank():
    from ccdrec.eval.ranking import add_rank_weights

    rng = np.random.default_rng(5)
    x = rng.standard_normal((150, 97)).astype(np.float32)  # > 64 rows: split over threads and slabs
    x[:, ::7] = np.round(x[:, ::7])  # ties
    x[3, :5] = np.nan  # NaN ranks last, like -inf
    x[4, 1], x[4, 2] = -0.0, 0.0
    weights = torch.from_numpy(rng.random(97).astype(np.float32))
    acc = torch.from_numpy(rng.random((150, 97)).astype(np.float32))
    expected = acc.numpy().copy()
    order = np.argsort(-np.nan_to_num(x, nan=-np.inf), axis=1, kind="stable")
    for b in range(150):
        expected[b, order[b]] += weights.numpy()
    add_rank_weights(acc, torch.from_numpy(x), weights)
    np.testing.assert_array_equal(acc.numpy(), expected)
    with pytest.raises(ValueError):
        add_rank_weights(acc, torch.from_numpy(x[:, :5]), weights)


@pytest.mark.parametrize("kind", ["lightgcn", "vae", "ensemble", "mixed"])
def test_one_scoring_pass_gives_the_numbers_of_separate_evaluations(kind):
    from ccdrec.data.synthetic import synthetic_stream
    from ccdrec.distill.ensemble import RankEnsemble
    from ccdrec.eval.metrics import evaluate_many
    from ccdrec.models import LightGCN, MultVAE

    stream = synthetic_stream(n_blocks=3, seed=4)
    last = stream[2]
    torch.manual_seed(0)
    if kind == "vae":
        model = MultVAE(last.n_users, last.n_items, 16).eval()
    else:
        model = LightGCN(last.n_users, last.n_items, 16)
        if kind == "ensemble":
            model = RankEnsemble([model, LightGCN(last.n_users, last.n_items, 8)])
        if kind == "mixed":  # a Mult-VAE member reads each block's context, the LightGCN members do not
            vae = MultVAE(last.n_users, last.n_items, 16).eval()
            model = RankEnsemble([vae, model, LightGCN(last.n_users, last.n_items, 8)])
    for m in getattr(model, "members", [model]):
        m.set_graph(last.matrix("train", last.n_users, last.n_items))
    new = np.arange(last.prev_users, last.n_users)
    requests = [(last, "valid", None), (stream[0], "test", None), (stream[1], "test", None), (last, "test", new)]
    got = evaluate_many(model, requests, chunk=37)
    want = [evaluate_block(model, b, split, users=u, chunk=64) for b, split, u in requests]
    assert got == pytest.approx(want, rel=1e-6)
    assert all(r["users"] > 0 for r in got)


def test_a_mixed_ensemble_ranks_its_context_free_members_once_per_user():
    from ccdrec.data.synthetic import synthetic_stream
    from ccdrec.distill.ensemble import RankEnsemble
    from ccdrec.eval.metrics import evaluate_many
    from ccdrec.models import MF, MultVAE

    stream = synthetic_stream(n_blocks=3, seed=5)
    last = stream[2]
    torch.manual_seed(0)
    mf, vae = MF(last.n_users, last.n_items, 8), MultVAE(last.n_users, last.n_items, 8).eval()
    scored = {"mf": 0, "vae": 0}

    def counting(model, name):
        build = model.scorer

        def scorer(context=None):
            inner = build(context=context)

            def score(users):
                scored[name] += len(users)
                return inner(users)

            return score

        model.scorer = scorer

    counting(mf, "mf")
    counting(vae, "vae")
    requests = [(b, "test", None) for b in stream]
    evaluate_many(RankEnsemble([vae, mf]), requests, chunk=16)
    users = [set(np.flatnonzero(np.diff(b.matrix("test", last.n_users, last.n_items).indptr))) for b in stream]
    assert scored["mf"] == len(set().union(*users))  # once per user, whatever the number of blocks
    assert scored["vae"] == sum(len(u) for u in users)  # once per block that evaluates the user
