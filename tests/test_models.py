"""Shared model checks (style.md lesson 4): every model passes the same mixin on the synthetic stream."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ccdrec.checkpoint import load_model, save_model
from ccdrec.config import TrainConfig
from ccdrec.eval import evaluate_block
from ccdrec.models import MF, LightGCN, MultVAE
from ccdrec.models.growth import entity_rows
from ccdrec.train import fit

MODELS = {
    "mf": lambda b: MF(b.n_users, b.n_items, 16),
    "lightgcn": lambda b: LightGCN(b.n_users, b.n_items, 16, 2),
    "vae": lambda b: MultVAE(b.n_users, b.n_items, 32, dropout=0.2),
}
SCHEDULES = {
    "mf": TrainConfig(epochs=30, batch_size=256, lr=1e-2, weight_decay=0, patience=30),
    "lightgcn": TrainConfig(epochs=30, batch_size=256, lr=1e-2, weight_decay=0, patience=30),
    "vae": TrainConfig(epochs=60, batch_size=64, lr=3e-3, weight_decay=0, patience=60, anneal_steps=200),
}


@pytest.mark.parametrize("kind", MODELS)
def test_recovers_planted_preferences(stream, kind):
    b = stream[0]
    torch.manual_seed(0)
    model = MODELS[kind](b)
    fit(model, b, SCHEDULES[kind], seed=0)
    trained = evaluate_block(model, b, "test")["recall@20"]
    # random ranking: each test item lands in the top 20 with probability about 20 / n_items
    random_recall = 20 / b.n_items
    assert trained > 2.5 * random_recall, (trained, random_recall)


@pytest.mark.parametrize("kind", MODELS)
def test_grow_keeps_old_parameters_bit_identical(stream, kind):
    b0, b1 = stream[0], stream[1]
    model = MODELS[kind](b0)
    model.set_graph(b0.train_matrix)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.grow(b1.n_users, b1.n_items, b1.train_matrix)
    assert (model.n_users, model.n_items) == (b1.n_users, b1.n_items)
    after = model.state_dict()
    for name, old in before.items():
        new = after[name]
        # old rows (and old columns of the VAE encoder) are untouched
        sl = tuple(slice(0, s) for s in old.shape)
        assert torch.equal(new[sl], old), name
    scores = model.scorer()(torch.arange(b1.n_users))
    assert scores.shape == (b1.n_users, b1.n_items) and torch.isfinite(scores).all()


@pytest.mark.parametrize("kind", MODELS)
def test_checkpoint_round_trip(stream, kind, tmp_path):
    b = stream[0]
    model = MODELS[kind](b)
    model.set_graph(b.train_matrix)
    save_model(model, tmp_path / "m", {"note": "x"})
    loaded, meta = load_model(tmp_path / "m")
    loaded.set_graph(b.train_matrix)
    users = torch.arange(10)
    assert meta == {"note": "x"}
    assert torch.equal(model.scorer()(users), loaded.scorer()(users))


def test_lightgcn_needs_no_dense_adjacency(stream):
    b = stream[0]
    m = LightGCN(b.n_users, b.n_items, 4, 2)
    m.set_graph(b.train_matrix)
    assert m._adj.layout == torch.sparse_csr


def test_mf_is_lightgcn_without_layers(stream):
    b = stream[0]
    m = MF(b.n_users, b.n_items, 4)
    u, i = m.propagate()
    assert u is m.user_emb and i is m.item_emb


def hand_graph():
    """Old users 0..3, old items 0..2; new user 4 and new item 3 in block k.

    Block-k interactions: u0:{0,1}, u1:{0}, u2:{2}, u3:{3}, u4 (new):{0, 3}.
    """
    pairs = [(0, 0), (0, 1), (1, 0), (2, 2), (3, 3), (4, 0), (4, 3)]
    r = sp.csr_matrix((np.ones(len(pairs)), tuple(zip(*pairs, strict=True))), shape=(5, 4))
    users = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2)
    items = torch.tensor([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]])
    return r, users, items


def test_entity_init_on_a_hand_made_graph():
    r, users, items = hand_graph()
    e1 = torch.tensor([10.0, 0.0])  # mean of u4's OLD items = item 0 (item 3 is new)
    # old users sharing a block-k item with u4: u0 (item 0, 2 interactions), u1 (item 0, 1), u3 (item 3, 1).
    # K = 1: the most active sharer u0.
    row1 = entity_rows(users, items, r, n_old=4, n_other_old=3, n_new_total=5, k=1)
    assert torch.allclose(row1[0], (e1 + users[0]) / 2)
    # K = 2: u0, then u1 (ties in activity broken by ID).
    row2 = entity_rows(users, items, r, n_old=4, n_other_old=3, n_new_total=5, k=2)
    assert torch.allclose(row2, torch.tensor([[(10 + 1) / 2, (0 + 2) / 2]]))
    # K = 3: exactly three sharers: all of them (the release averaged all old users here, method.md 9).
    row3 = entity_rows(users, items, r, n_old=4, n_other_old=3, n_new_total=5, k=3)
    assert torch.allclose(row3[0], (e1 + users[[0, 1, 3]].mean(0)) / 2)
    # K = 4: fill up with the most active old user of the block not chosen yet: u2.
    row4 = entity_rows(users, items, r, n_old=4, n_other_old=3, n_new_total=5, k=4)
    assert torch.allclose(row4[0], (e1 + users.mean(0)) / 2)
    # one-hop option: e1 alone; random option: small noise
    assert torch.allclose(entity_rows(users, items, r, 4, 3, 5, "one_hop"), e1[None])
    assert entity_rows(users, items, r, 4, 3, 5, "random").abs().max() < 0.1


def test_entity_init_item_side_and_no_interaction():
    r, users, items = hand_graph()
    rt = r.T.tocsr()
    # new item 3: its old users = u3 -> e1 = users[3]; old items sharing a user with it: item 0 (via u4) -> e2
    row = entity_rows(items, users, rt, n_old=3, n_other_old=4, n_new_total=4, k=1)
    assert torch.allclose(row[0], (users[3] + items[0]) / 2)
    # a new user with no interaction at all (ID 5 in a 6-user universe) gets e2/2 of the most active old users
    r6 = sp.csr_matrix((r.data, r.indices, r.indptr.tolist() + [r.nnz]), shape=(6, 4))
    rows = entity_rows(users, items, r6, n_old=4, n_other_old=3, n_new_total=6, k=2)
    assert torch.allclose(rows[1], users[[0, 1]].mean(0) / 2)


def test_vae_sparse_rows_give_the_dense_forward_loss_and_gradients():
    from ccdrec.models.vae import MultVAE, rows_tensor
    from ccdrec.train.losses import vae_loss

    rng = np.random.default_rng(0)
    m = sp.random(30, 50, density=0.1, random_state=1, format="csr", dtype=np.float32)
    m.data[:] = rng.choice([1.0, 0.1], size=m.nnz).astype(np.float32)
    users = torch.tensor([3, 0, 7, 29, 12])
    torch.manual_seed(0)
    model = MultVAE(30, 50, 8).eval()
    sparse = rows_tensor(m, users, 50, "cpu")
    dense = torch.from_numpy(m[users.numpy()].toarray())
    assert sparse.is_sparse and torch.equal(sparse.to_dense(), dense)
    grads = []
    for x in (sparse, dense):
        model.zero_grad()
        logits, mu, logvar = model(x, stochastic=False)
        loss = vae_loss(logits, x, mu, logvar, beta=0.2)
        loss.backward()
        grads.append((loss.detach(), logits.detach(), model.encoder.weight.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # columns at or past ``below`` are dropped (a previous model's universe)
    assert int(rows_tensor(m, users, 50, "cpu", below=20).coalesce().indices()[1].max()) < 20
