"""LWC-KD (method.md 5.4): kNN graphs, the contrastive term, ID indexing, PIW, and the effect inside fit()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ccdrec.config import TrainConfig
from ccdrec.continual.lwckd import (
    LWCKD,
    OldEmbeddings,
    contrastive,
    contrastive_rows,
    knn_graph,
    sample_candidates,
)
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.models.graph import normalized_adjacency
from ccdrec.models.lightgcn import MF, LightGCN
from ccdrec.train.loop import fit


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny; a second intra-op thread only adds contention on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_binary(rng: np.random.Generator, n_rows: int, n_cols: int, p: float) -> sp.csr_matrix:
    m = (rng.random((n_rows, n_cols)) < p).astype(np.float32)
    return sp.csr_matrix(m)


# ---------------------------------------------------------------------------------------------
# knn_graph
# ---------------------------------------------------------------------------------------------


def brute_force_knn(x: np.ndarray, k: int) -> list[set[int]]:
    norms = np.linalg.norm(x, axis=1)
    xn = np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)
    sim = xn @ xn.T
    out = []
    for r in range(len(x)):
        cand = [(sim[r, s], s) for s in range(len(x)) if s != r and sim[r, s] > 0]
        cand.sort(key=lambda t: -t[0])
        out.append({s for _, s in cand[:k]})
    return out


def test_knn_graph_matches_brute_force_and_is_chunk_invariant():
    rng = np.random.default_rng(0)
    x = rng.random((40, 15)) * (rng.random((40, 15)) < 0.3)  # continuous values: distinct similarities
    x[[3, 17]] = 0.0  # rows without interactions
    expected = brute_force_knn(x, k=4)
    g = knn_graph(sp.csr_matrix(x), k=4, chunk=7)
    assert g.shape == (40, 40)
    assert np.all(g.data == 1.0)
    assert g.diagonal().sum() == 0
    got = [set(g.indices[g.indptr[r] : g.indptr[r + 1]].tolist()) for r in range(40)]
    assert got == expected
    assert got[3] == set() and got[17] == set()
    assert all(3 not in s and 17 not in s for s in got)
    for chunk in (1, 5, 40, 1000):
        assert (knn_graph(sp.csr_matrix(x), k=4, chunk=chunk) != g).nnz == 0


def test_knn_graph_binary_rows_and_k_larger_than_candidates():
    rng = np.random.default_rng(1)
    r = random_binary(rng, 25, 10, 0.2)
    g = knn_graph(r, k=100, chunk=6)
    co = (r @ r.T).toarray() > 0
    np.fill_diagonal(co, False)
    assert np.array_equal(g.toarray() > 0, co)  # k beyond the candidates: every row sharing a column
    g3 = knn_graph(r, k=3, chunk=4)
    assert np.all(np.diff(g3.indptr) <= 3)
    assert (g3.multiply(g) != g3).nnz == 0  # top-3 neighbours are a subset of the candidates


def test_knn_graph_breaks_ties_by_smaller_id():
    # row 0 shares exactly one column with each of rows 1..4, all of degree 1: four equal similarities
    r = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32))
    g = knn_graph(r, k=2, chunk=2)
    assert g[0].indices.tolist() == [1, 2]
    assert g[5].nnz == 0


# ---------------------------------------------------------------------------------------------
# contrastive
# ---------------------------------------------------------------------------------------------


def naive_contrastive(a: np.ndarray, cand: np.ndarray, mask: np.ndarray, tau: float) -> float:
    losses = []
    for r in range(a.shape[0]):
        if mask[r].sum() <= 0:
            continue
        logits = [float(a[r] @ cand[j]) / tau for j in range(cand.shape[0])]
        lse = math.log(sum(math.exp(s) for s in logits))
        total = sum(mask[r, j] * (logits[j] - lse) for j in range(cand.shape[0]))
        losses.append(-total / mask[r].sum())
    return sum(losses) / len(losses)


def test_contrastive_equals_naive_loop_dense_and_sparse():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 3))
    cand = rng.normal(size=(7, 3))
    mask = (rng.random((5, 7)) < 0.4) * rng.integers(1, 3, (5, 7)).astype(float)
    mask[2] = 0.0  # a row without weight is left out of the mean
    mask[0, 0] = 1.0
    expected = naive_contrastive(a, cand, mask, tau=2.0)
    at, ct = torch.tensor(a), torch.tensor(cand)
    for m in (torch.tensor(mask), sp.csr_matrix(mask), torch.tensor(mask).to_sparse()):
        got = contrastive(at, ct, m, tau=2.0)
        assert got.item() == pytest.approx(expected, rel=1e-9)
    losses, valid = contrastive_rows(at, ct, sp.csr_matrix(mask), tau=2.0)
    assert valid.tolist() == (mask.sum(1) > 0).tolist()
    assert losses[2].item() == 0.0


def test_contrastive_rejects_broadcasting_row_weights():
    a, cand = torch.randn(4, 3), torch.randn(6, 3)
    mask = torch.ones(4, 6)
    with pytest.raises(ValueError):
        contrastive(a, cand, mask, row_weights=torch.ones(4, 1))  # the release's (B,) * (B, 1) slip


# ---------------------------------------------------------------------------------------------
# ID indexing
# ---------------------------------------------------------------------------------------------

U0, I0, U1, I1 = 12, 9, 15, 11


def reference_layers(user_emb: torch.Tensor, item_emb: torch.Tensor, r: sp.csr_matrix, n_layers: int):
    """Per-layer embeddings by hand: E^{l+1} = Â E^l with a dense Â (tiny)."""
    adj = torch.tensor(normalized_adjacency(r).toarray(), dtype=torch.float64)
    e = torch.cat([user_emb, item_emb]).double()
    out = [e]
    for _ in range(n_layers):
        out.append(adj @ out[-1])
    n_u = user_emb.shape[0]
    return [(x[:n_u], x[n_u:]) for x in out]


def reference_loss(old_layers, cur_layers, r_old: np.ndarray, users, items, tau: float, weight: float) -> float:
    """LWC-KD with explicit ID look-ups: old row of entity e is old_layers[l][side][e]."""
    u_old, i_old = r_old.shape
    users = sorted({int(u) for u in users if u < u_old})
    items = sorted({int(i) for i in items if i < i_old})
    co_u = (r_old @ r_old.T > 0) & ~np.eye(u_old, dtype=bool)  # kNN with k beyond the candidates
    co_i = (r_old.T @ r_old > 0) & ~np.eye(i_old, dtype=bool)
    total = 0.0
    for (ou, oi), (cu, ci) in zip(old_layers, cur_layers, strict=True):
        ou, oi, cu, ci = (t.detach().double().numpy() for t in (ou, oi, cu, ci))
        cu, ci = cu[:u_old], ci[:i_old]
        total += naive_contrastive(ou[users], ci, r_old[users], tau)  # UI
        total += naive_contrastive(oi[items], cu, r_old.T[items], tau)  # IU
        total += naive_contrastive(ou[users], cu, co_u[users].astype(float), tau)  # UU
        total += naive_contrastive(oi[items], ci, co_i[items].astype(float), tau)  # II
    return weight * total / len(old_layers)


@pytest.fixture
def grown():
    """An old LightGCN on (U0, I0), its snapshot, and the model grown to (U1, I1) and moved."""
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    r_old = random_binary(rng, U0, I0, 0.35)
    r_new = random_binary(rng, U1, I1, 0.35)
    model = LightGCN(U0, I0, dim=4, layers=2)
    with torch.no_grad():
        model.user_emb.normal_()
        model.item_emb.normal_()
    old_ego = (model.user_emb.detach().clone(), model.item_emb.detach().clone())
    old = OldEmbeddings.from_model(model, r_old)
    model.grow(U1, I1, r_new, init="random")
    with torch.no_grad():
        model.user_emb.add_(0.5 * torch.randn_like(model.user_emb))
        model.item_emb.add_(0.5 * torch.randn_like(model.item_emb))
    return model, old, old_ego, r_old, r_new


def test_old_snapshot_is_indexed_by_id(grown):
    model, old, old_ego, r_old, _ = grown
    assert old.n_users == U0 and old.n_items == I0 and old.n_layers == 3
    ref = reference_layers(*old_ego, r_old, 2)
    for (u, i), (ru, ri) in zip(zip(old.users, old.items, strict=True), ref, strict=True):
        assert torch.allclose(u.double(), ru, atol=1e-6) and torch.allclose(i.double(), ri, atol=1e-6)


def test_lwckd_equals_hand_computed_reference_by_id(grown):
    model, old, old_ego, r_old, r_new = grown
    lwc = LWCKD(old, r_old, tau=2.0, weight=0.5, knn=100)
    users = np.array([14, 3, 0, 3, 11, 7, 12, 5])  # duplicates and new users (>= U0)
    items = np.array([1, 10, 9, 4, 4, 0, 8, 2])  # new items (>= I0)
    got = lwc(model, model.propagate(), users, items, 0)
    old_layers = reference_layers(*old_ego, r_old, 2)
    cur_layers = reference_layers(model.user_emb.detach(), model.item_emb.detach(), r_new, 2)
    expected = reference_loss(old_layers, cur_layers, r_old.toarray(), users, items, tau=2.0, weight=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert model.user_emb.grad is not None and model.user_emb.grad[:U0].abs().sum() > 0


def test_lwckd_reads_the_steps_own_propagation(grown, monkeypatch):
    """LightGCN's propagate(with_layers=True) carries the layers it averaged; LWC-KD (uses_layers) takes
    them instead of propagating the graph again, with the same loss and gradient as from a separate
    layer_embeddings(); a plain propagate() holds no layers."""
    import ccdrec.models.lightgcn as lightgcn

    model, old, _, r_old, _ = grown
    users, items = np.array([14, 3, 0, 11, 7]), np.array([1, 10, 9, 4, 0])
    passes = []
    real = lightgcn.propagate_symmetric
    monkeypatch.setattr(lightgcn, "propagate_symmetric", lambda adj, x: passes.append(1) or real(adj, x))

    assert model.propagate().layers is None and LWCKD.uses_layers
    passes.clear()
    reps = model.propagate(with_layers=True)
    assert len(passes) == 2 and len(reps.layers) == 3
    u, i = reps  # unpacks as the (users, items) pair it is
    assert torch.equal(u, torch.stack([lu for lu, _ in model.layer_embeddings()]).mean(0))
    passes.clear()
    shared = LWCKD(old, r_old, tau=2.0, weight=0.5, knn=100)(model, reps, users, items, 0)
    assert passes == []  # no second propagation
    shared.backward()
    grad_shared = model.user_emb.grad.clone()
    model.user_emb.grad = None
    fresh = LWCKD(old, r_old, tau=2.0, weight=0.5, knn=100)(model, tuple(model.propagate()), users, items, 0)
    assert passes == [1, 1, 1, 1]  # a plain pair has no layers: propagate() and layer_embeddings() each pass twice
    fresh.backward()
    assert shared.item() == pytest.approx(fresh.item(), rel=1e-6)
    torch.testing.assert_close(grad_shared, model.user_emb.grad)


def test_position_indexed_snapshot_gives_a_different_loss(grown):
    """Rows of the snapshot shuffled, as when old embeddings are fetched by position: the loss must change."""
    model, old, _, r_old, _ = grown
    users, items = np.arange(U0), np.arange(I0)
    right = LWCKD(old, r_old, tau=2.0, knn=5).loss_from_layers(model.layer_embeddings(), users, items)
    pu, pi = torch.randperm(U0, generator=torch.Generator().manual_seed(0)), torch.randperm(I0)
    shuffled = OldEmbeddings(tuple(u[pu] for u in old.users), tuple(i[pi] for i in old.items))
    wrong = LWCKD(shuffled, r_old, tau=2.0, knn=5).loss_from_layers(model.layer_embeddings(), users, items)
    assert abs(wrong.item() - right.item()) > 1e-3 * abs(right.item())


def test_only_new_entities_give_zero_loss(grown):
    model, old, _, r_old, _ = grown
    lwc = LWCKD(old, r_old)
    loss = lwc(model, model.propagate(), np.array([U0, U1 - 1]), np.array([I0, I1 - 1]), 0)
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# behaviour
# ---------------------------------------------------------------------------------------------


def planted_snapshot(seed: int = 4, n_users: int = 30, n_items: int = 20, dim: int = 8):
    """Old embeddings consistent with R: items random, users = scaled mean of their items."""
    rng = np.random.default_rng(seed)
    r = random_binary(rng, n_users, n_items, 0.25)
    items = torch.tensor(rng.normal(size=(n_items, dim)), dtype=torch.float32)
    deg = torch.tensor(np.maximum(np.asarray(r.sum(1)).ravel(), 1.0), dtype=torch.float32)
    users = 3.0 * torch.tensor(r.toarray()) @ items / deg[:, None]
    return OldEmbeddings((users,), (items,)), r


def test_loss_falls_as_current_embeddings_return_to_old():
    old, r = planted_snapshot()
    lwc = LWCKD(old, r, tau=1.0, knn=5)
    gen = torch.Generator().manual_seed(0)
    noise_u = torch.randn(old.users[0].shape, generator=gen)
    noise_i = torch.randn(old.items[0].shape, generator=gen)
    users, items = np.arange(old.n_users), np.arange(old.n_items)

    def loss_at(scale: float) -> float:
        layers = [(old.users[0] + scale * noise_u, old.items[0] + scale * noise_i)]
        return lwc.loss_from_layers(layers, users, items).item()

    far, near = loss_at(1.0), loss_at(0.1)
    assert near < far
    assert loss_at(3.0) > far


def test_terms_are_selectable():
    old, r = planted_snapshot()
    layers = [(old.users[0] + 0.2, old.items[0] - 0.1)]
    users, items = np.arange(old.n_users), np.arange(old.n_items)
    parts = {t: LWCKD(old, r, terms=(t,), knn=5).loss_from_layers(layers, users, items).item() for t in ("ui", "iu", "uu", "ii")}
    full = LWCKD(old, r, knn=5).loss_from_layers(layers, users, items).item()
    assert full == pytest.approx(sum(parts.values()), rel=1e-5)
    first = LWCKD(old, r, knn=5)
    shared = LWCKD(old, r, knn_graphs=(first.user_knn, first.item_knn))  # another member reusing the graphs
    assert shared.loss_from_layers(layers, users, items).item() == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError):
        LWCKD(old, r, terms=("ux",))


def test_piw_weights_differ_have_mean_one_and_change_the_loss():
    old, r = planted_snapshot()
    torch.manual_seed(0)
    cur = (old.users[0] + 0.5 * torch.randn_like(old.users[0]), old.items[0] + 0.5 * torch.randn_like(old.items[0]))
    users, items = np.arange(old.n_users), np.arange(old.n_items)
    plain = LWCKD(old, r, tau=1.0, knn=5, terms=("ui", "uu"))
    piw = LWCKD(old, r, tau=1.0, knn=5, terms=("ui", "uu"), piw=True)
    loss_plain = plain.loss_from_layers([cur], users, items)
    loss_piw = piw.loss_from_layers([cur], users, items)
    has_items = np.diff(r.indptr) > 0
    w = piw.last_piw
    assert w.shape == (old.n_users,)
    assert torch.all(w[torch.from_numpy(~has_items)] == 0)
    wk = w[torch.from_numpy(has_items)]
    assert wk.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert wk.std().item() > 1e-3 and wk.max() / wk.min() > 1.01
    assert abs(loss_piw.item() - loss_plain.item()) > 1e-5
    # the weights multiply per-user losses before the mean: (B,) * (B,)
    cand_i, cand_u = cur[1], cur[0]
    ui_rows, ui_valid = contrastive_rows(old.users[0], cand_i, r, 1.0)
    uu_rows, uu_valid = contrastive_rows(old.users[0], cand_u, piw.user_knn, 1.0)
    expected = (w * ui_rows)[ui_valid].mean() + (w * uu_rows)[uu_valid].mean()
    assert loss_piw.item() == pytest.approx(0.01 * expected.item(), rel=1e-5)


def test_piw_network_trains_jointly_through_the_returned_loss():
    old, r = planted_snapshot()
    model = MF(old.n_users + 3, old.n_items + 2, dim=8)
    with torch.no_grad():
        model.user_emb[: old.n_users] = old.users[0] + 0.3 * torch.randn_like(old.users[0])
        model.item_emb[: old.n_items] = old.items[0]
    lwc = LWCKD(old, r, tau=1.0, knn=5, piw=True)
    before = [p.detach().clone() for p in lwc.parameters()]
    users, items = np.arange(old.n_users + 3), np.arange(old.n_items + 2)
    lwc(model, model.propagate(), users, items, 0).backward()
    assert all(p.grad is not None for p in lwc.parameters())
    assert model.user_emb.grad is not None  # the model is regularised as well
    lwc(model, model.propagate(), users, items, 0)  # applies the PIW step left by the backward
    after = list(lwc.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(p.grad is None for p in after)


def test_lwckd_in_fit_keeps_old_users_closer_to_the_old_model():
    stream = synthetic_stream(n_blocks=2, base_users=100, base_items=60, new_users=20, new_items=10, per_user=12, seed=0)
    b0, b1 = stream[0], stream[1]
    torch.manual_seed(0)
    model = MF(b0.n_users, b0.n_items, dim=16)
    fit(model, b0, TrainConfig(epochs=10, batch_size=256, lr=0.02, eval_every=100, weight_decay=1e-4, l2=0.0))
    old = OldEmbeddings.from_model(model, b0.train_matrix)
    model.grow(b1.n_users, b1.n_items, b1.train_matrix, init="entity")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # eval_every > epochs: fit keeps the last epoch, so both runs are compared after the same training
    cfg = TrainConfig(epochs=5, batch_size=256, lr=0.02, eval_every=100, weight_decay=1e-4, l2=0.0)

    def similarity_to_old(lwc) -> float:
        m = MF(b1.n_users, b1.n_items, dim=16)
        m.load_state_dict(start)
        fit(m, b1, cfg, seed=1, callbacks=[lwc] if lwc else [])
        cur = m.propagate()[0][: old.n_users].detach()
        return torch.nn.functional.cosine_similarity(cur, old.final_users()).mean().item()

    plain = similarity_to_old(None)
    regularised = similarity_to_old(LWCKD(old, b0.train_matrix, tau=5.0, weight=0.1))
    assert regularised > plain + 0.01


# ---------------------------------------------------------------------------------------------
# sampled softmax (option ``candidates``)
# ---------------------------------------------------------------------------------------------


def test_sample_candidates_keeps_mask_columns_and_corrects_the_draws():
    rng = np.random.default_rng(6)
    a, cand = torch.tensor(rng.normal(size=(6, 3))), torch.tensor(rng.normal(size=(50, 3)))
    dense = (rng.random((6, 50)) < 0.08).astype(np.float32)
    dense[5] = 0.0  # a row without weight
    mask = sp.csr_matrix(dense)
    cs = sample_candidates(mask, 50, 10, torch.Generator().manual_seed(1))
    pos = np.unique(mask.indices)
    n_p, rest = len(pos), cs.index[cs.n_mask_cols :]
    assert cs.n_mask_cols == n_p and cs.index[:n_p].tolist() == pos.tolist()
    assert 0 < len(rest) <= 10 and not np.isin(rest.numpy(), pos).any() and len(set(rest.tolist())) == len(rest)
    assert torch.all(cs.offset[:n_p] == 0)
    assert torch.allclose(cs.offset[n_p:], torch.full((len(rest),), math.log((50 - n_p) / len(rest))))
    # the mask re-indexed onto C is the mask
    remapped = sp.csr_matrix((cs.vals.numpy(), (cs.rows.numpy(), cs.index[cs.cols].numpy())), shape=(6, 50))
    assert (remapped != mask).nnz == 0
    # the loss: softmax over C with the corrected logits
    idx, off = cs.index.numpy(), cs.offset.numpy()
    expected = []
    for r in range(5):
        logits = a[r].numpy() @ cand.numpy()[idx].T / 2.0 + off
        lse = math.log(np.exp(logits).sum())
        w = dense[r, idx]
        expected.append(-(w * (logits - lse)).sum() / w.sum())
    got = contrastive(a, cand, mask, tau=2.0, candidate_set=cs)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-9)
    again = contrastive(a, cand, mask, tau=2.0, candidates=10, generator=torch.Generator().manual_seed(1))
    assert again.item() == got.item()
    assert sample_candidates(mask, 50, 50) is None and sample_candidates(mask, 50, 80) is None


def sampled_example():
    """A small random LWC-KD problem, larger than the planted one so that S < N samples for real."""
    rng = np.random.default_rng(5)
    n_users, n_items, dim = 300, 200, 16
    r = random_binary(rng, n_users, n_items, 0.03)
    gen = torch.Generator().manual_seed(5)
    old = OldEmbeddings((torch.randn(n_users, dim, generator=gen),), (torch.randn(n_items, dim, generator=gen),))
    cur_u = old.users[0] + 0.5 * torch.randn(n_users, dim, generator=gen)
    cur_i = old.items[0] + 0.5 * torch.randn(n_items, dim, generator=gen)
    users, items = rng.choice(n_users, 40, replace=False), rng.choice(n_items, 50, replace=False)
    return old, r, (cur_u, cur_i), users, items


def loss_and_grad(lwc: LWCKD, cur, users, items) -> tuple[float, torch.Tensor]:
    cu, ci = (c.clone().requires_grad_() for c in cur)
    loss = lwc.loss_from_layers([(cu, ci)], users, items)
    loss.backward()
    return loss.item(), torch.cat([cu.grad.flatten(), ci.grad.flatten()])


def test_sampled_lwckd_with_candidates_at_least_n_is_exact(grown):
    model, old, _, r_old, _ = grown
    users, items = np.array([14, 3, 0, 3, 11, 7, 12, 5]), np.array([1, 10, 9, 4, 4, 0, 8, 2])
    exact = LWCKD(old, r_old, tau=2.0, knn=5).loss_from_layers(model.layer_embeddings(), users, items)
    for s in (max(U0, I0), 1000):
        sampled = LWCKD(old, r_old, tau=2.0, knn=5, candidates=s, seed=3).loss_from_layers(model.layer_embeddings(), users, items)
        assert sampled.item() == exact.item()
    with pytest.raises(ValueError):
        LWCKD(old, r_old, candidates=0)


def test_sampled_lwckd_is_close_to_full_on_average_with_aligned_gradient():
    old, r, cur, users, items = sampled_example()
    full, g_full = loss_and_grad(LWCKD(old, r, tau=2.0, weight=1.0, knn=5), cur, users, items)
    losses, grads = [], []
    for seed in range(50):
        loss, grad = loss_and_grad(LWCKD(old, r, tau=2.0, weight=1.0, knn=5, candidates=40, seed=seed), cur, users, items)
        losses.append(loss)
        grads.append(grad)
    assert len(set(losses)) > 1  # it does sample
    assert abs(np.mean(losses) / full - 1.0) < 0.10
    cosines = [torch.nn.functional.cosine_similarity(g, g_full, dim=0).item() for g in grads]
    assert min(cosines) > 0.5
    assert torch.nn.functional.cosine_similarity(torch.stack(grads).mean(0), g_full, dim=0).item() > 0.85


def test_sampled_lwckd_is_deterministic_per_seed_and_shares_one_draw_across_layers():
    old, r, cur, users, items = sampled_example()

    def two_calls(seed: int) -> list[float]:
        lwc = LWCKD(old, r, tau=2.0, knn=5, candidates=40, seed=seed)
        return [lwc.loss_from_layers([cur], users, items).item() for _ in range(2)]

    first = two_calls(7)
    assert two_calls(7) == first
    assert first[0] != first[1]  # the generator advances between calls
    assert two_calls(8) != first
    # one draw per term and call, shared by the layers: two identical layers give the one-layer loss
    two_layer_old = OldEmbeddings(old.users * 2, old.items * 2)
    one = LWCKD(old, r, tau=2.0, knn=5, candidates=40, seed=7).loss_from_layers([cur], users, items)
    two = LWCKD(two_layer_old, r, tau=2.0, knn=5, candidates=40, seed=7).loss_from_layers([cur, cur], users, items)
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_max_entities_contrasts_a_subset_of_the_batch():
    torch.manual_seed(0)
    old_u, old_i = torch.randn(30, 4), torch.randn(20, 4)
    r = sp.random(30, 20, density=0.3, random_state=0, format="csr")
    r.data[:] = 1
    old = OldEmbeddings((old_u,), (old_i,))
    users, items = np.arange(30), np.arange(20)
    layers = [(old_u + 0.3 * torch.randn(30, 4), old_i + 0.3 * torch.randn(20, 4))]
    full = LWCKD(old, r, terms=("ui", "iu")).loss_from_layers(layers, users, items)
    capped = LWCKD(old, r, terms=("ui", "iu"), max_entities=8, seed=1)
    losses = [capped.loss_from_layers(layers, users, items).item() for _ in range(200)]
    assert len(set(np.round(losses, 6))) > 1  # different subsets per call
    assert abs(np.mean(losses) - full.item()) < 0.1 * abs(full.item())  # an unbiased-ish estimate
