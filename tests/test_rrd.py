"""RRD / IR-RRD ranking distillation (method.md 7)."""

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import ccdrec.distill.rrd as rrd
from ccdrec.config import TrainConfig
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.distill import RRDObjective, distill_student, rrd_loss, top_lists
from ccdrec.models import MF, LightGCN, MultVAE
from ccdrec.train.loop import fit


def _naive(a, b, mask=None):
    """L = -Σ_t [a_t - log(Σ_{j>=t} e^{a_j} + Σ_m e^{b_m})], row mean, written as plain loops."""
    losses = []
    for r in range(len(a)):
        items = [float(a[r][t]) for t in range(len(a[r])) if mask is None or mask[r][t]]
        below = sum(math.exp(float(x)) for x in b[r])
        losses.append(-sum(items[t] - math.log(sum(math.exp(x) for x in items[t:]) + below) for t in range(len(items))))
    return sum(losses) / len(losses)


def test_rrd_loss_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    assert rrd_loss(a, b).item() == pytest.approx(_naive(a, b), rel=1e-12)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, True, True, False]])
    assert rrd_loss(a, b, mask).item() == pytest.approx(_naive(a, b, mask), rel=1e-12)


def test_rrd_loss_masks_padding_and_collisions_out_entirely():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 4, generator=g), torch.randn(2, 6, generator=g)
    padded = torch.cat([a, torch.full((2, 3), 1e6)], dim=1).requires_grad_()
    mask = torch.arange(7).expand(2, -1) < 4
    loss = rrd_loss(padded, b, mask)
    assert loss.item() == pytest.approx(rrd_loss(a, b).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(padded.grad).all() and (padded.grad[:, 4:] == 0).all()
    keep = torch.tensor([[True, True, False, True, True, False]] * 2)
    with_junk = b.masked_fill(~keep, 1e6)
    expected = rrd_loss(a, b[:, [0, 1, 3, 4]]).item()
    assert rrd_loss(a, with_junk, uninteresting_mask=keep).item() == pytest.approx(expected, rel=1e-6)
    # a row without any valid interesting entry takes no part in the mean
    mask[1] = False
    assert rrd_loss(padded, b, mask).item() == pytest.approx(rrd_loss(a[:1], b[:1]).item(), rel=1e-6)


def test_rrd_gradient_raises_interesting_over_uninteresting():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 6, generator=g).requires_grad_(), torch.randn(4, 20, generator=g).requires_grad_()
    loss = rrd_loss(a, b)
    loss.backward()
    assert (b.grad > 0).all()  # every uninteresting score is pushed down
    assert (a.grad.sum(1) < 0).all()  # the interesting list as a whole is pushed up
    with torch.no_grad():
        a2, b2 = a - 0.1 * a.grad, b - 0.1 * b.grad
        assert (a2.mean(1) - b2.mean(1) > a.mean(1) - b.mean(1)).all()
        assert rrd_loss(a2, b2) < loss


def test_rrd_prefers_the_list_in_the_students_own_order():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g, dtype=torch.float64)
    losses = {p: rrd_loss(a[:, list(p)], b).item() for p in itertools.permutations(range(4))}
    student_order = tuple(a[0].argsort(descending=True).tolist())
    assert losses[student_order] == min(losses.values())
    assert all(v > losses[student_order] for p, v in losses.items() if p != student_order)


def _low_rank_teacher(n_users=30, n_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_users, 3, generator=g) @ torch.randn(3, n_items, generator=g)
    return top_lists(lambda u: scores[u], n_users, n_items, None, n=5)


@pytest.mark.parametrize("side", ["user", "item"])
def test_rrd_objective_alone_teaches_the_teachers_top_lists(side):
    user_top, item_top = _low_rank_teacher()
    n_users, n_items = user_top.shape[0], item_top.shape[0]
    w_user, w_item = (1.0, 0.0) if side == "user" else (0.0, 1.0)
    objective = RRDObjective(
        user_top, item_top, n_items, n_users, user_samples=20, item_samples=20, weight_user=w_user, weight_item=w_item, seed=0
    )
    torch.manual_seed(0)
    student = MF(n_users, n_items, dim=8)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    users, items = np.arange(n_users), np.arange(n_items)

    def overlap():
        got_user, got_item = top_lists(student.scorer(), n_users, n_items, None, n=5)
        got, want = (got_user, user_top) if side == "user" else (got_item, item_top)
        return np.mean([len(set(x) & set(y)) for x, y in zip(got, want, strict=True)])

    before = overlap()
    for epoch in range(150):
        loss = objective(student, student.propagate(), users, items, epoch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 1.5 and overlap() > 4.0


def test_rrd_objective_validates_its_inputs():
    user_top, item_top = _low_rank_teacher()
    with pytest.raises(ValueError):
        RRDObjective(user_top, item_top, n_items=30, n_users=40)  # swapped universe
    objective = RRDObjective(user_top, item_top, n_items=40, n_users=30)
    with pytest.raises(TypeError):
        objective(None, torch.zeros(3, 40), np.array([0]), np.array([0]), 0)  # VAE logits, not (users, items)
    block = synthetic_stream(n_blocks=1)[0]
    with pytest.raises(TypeError):
        distill_student(MultVAE(block.n_users, block.n_items, dim=4), block, user_top, item_top, TrainConfig(epochs=1))


def _overlap(model, block, teacher_top, k):
    top, _ = top_lists(model.scorer(), block.n_users, block.n_items, block.train_matrix, n=k)
    return np.mean([len(set(x) & set(y)) for x, y in zip(top, teacher_top[:, :k], strict=True)])


def test_distillation_pulls_the_student_toward_the_teacher():
    block = synthetic_stream(n_blocks=1)[0]
    torch.manual_seed(0)
    teacher = LightGCN(block.n_users, block.n_items, dim=32)
    fit(teacher, block, TrainConfig(epochs=20, batch_size=256, lr=0.02, eval_every=20), seed=0)
    # top-10 lists: on a 120-item catalogue the default 40 would be a third of it
    user_top, item_top = top_lists(teacher.scorer(), block.n_users, block.n_items, block.train_matrix, n=10)
    cfg = TrainConfig(epochs=10, batch_size=256, lr=0.01, eval_every=10)
    torch.manual_seed(1)
    distilled = MF(block.n_users, block.n_items, dim=8)
    result = distill_student(distilled, block, user_top, item_top, cfg, seed=1, user_samples=100, item_samples=100, weight=0.1)
    torch.manual_seed(1)
    plain = MF(block.n_users, block.n_items, dim=8)
    fit(plain, block, cfg, seed=1)
    assert result.epochs_run == 10
    assert _overlap(distilled, block, user_top, 10) > _overlap(plain, block, user_top, 10) + 0.3


def test_distill_student_negatives_avoid_the_teachers_lists_and_extra_pairs(monkeypatch):
    block = synthetic_stream(n_blocks=1)[0]
    user_top = np.full((block.n_users, 3), -1)
    user_top[0] = [5, 7, -1]
    item_top = np.full((block.n_items, 3), -1)
    extra = sp.csr_matrix(([1.0], ([2], [9])), shape=(3, 10))  # an earlier, smaller universe
    seen = {}
    monkeypatch.setattr(rrd, "fit", lambda model, blk, cfg, **kw: seen.update(kw))
    distill_student(MF(block.n_users, block.n_items, dim=4), block, user_top, item_top, TrainConfig(epochs=1), exclude=extra)
    excl = seen["avoid"].tocoo()
    assert seen["avoid"].shape == (block.n_users, block.n_items)
    assert set(zip(excl.row.tolist(), excl.col.tolist(), strict=True)) == {(0, 5), (0, 7), (2, 9)}
    assert [type(cb) for cb in seen["callbacks"]] == [RRDObjective]


def test_uninteresting_mask_marks_interesting_and_observed_sampled_columns():
    from ccdrec.distill.rrd import _Side

    rng = np.random.default_rng(2)
    n_rows, n_cols = 30, 25
    top = rng.integers(-1, n_cols, (n_rows, 4))
    observed = sp.csr_matrix((rng.random((n_rows, n_cols)) < 0.15).astype(np.float32))
    side = _Side(top, n_cols, 12, observed)
    rows = torch.from_numpy(np.sort(rng.choice(n_rows, 9, replace=False)))
    cols = torch.from_numpy(rng.integers(0, n_cols, 40))  # with repeated columns
    dense = observed.toarray() > 0
    for r in range(n_rows):
        dense[r, top[r][top[r] >= 0]] = True
    expected = dense[rows.numpy()][:, cols.numpy()]
    np.testing.assert_array_equal(side._excluded(rows, cols).numpy(), expected)


# --------------------------------------------------------------------------------------------- retention-aware selection


def test_teacher_agreement_is_recall_of_the_teachers_lists_and_weighs_into_selection():
    from ccdrec.distill.agreement import TeacherAgreement, old_users_sample
    from ccdrec.eval.protocol import harmonic

    block = synthetic_stream(n_blocks=1)[0]
    torch.manual_seed(0)
    teacher = LightGCN(block.n_users, block.n_items, dim=16)
    teacher.set_graph(block.train_matrix)
    user_top, _ = top_lists(teacher.scorer(), block.n_users, block.n_items, block.train_matrix, n=10, item_side=False)
    users = np.arange(0, block.n_users, 2)
    agree = TeacherAgreement(user_top, users, block.train_matrix, "recall@5")
    valid = {"recall@5": 0.2}
    agree.on_validate(teacher, 0, valid)
    assert valid["teacher_recall@5"] == pytest.approx(1.0)  # the teacher agrees with its own top-5
    assert valid["retention_h@5"] == pytest.approx(harmonic(0.2, 1.0))
    other = LightGCN(block.n_users, block.n_items, dim=16)
    other.set_graph(block.train_matrix)
    valid = {"recall@5": None}
    agree.on_validate(other, 0, valid)
    assert 0 <= valid["teacher_recall@5"] < 0.5 and valid["retention_h@5"] == valid["teacher_recall@5"]
    listed = np.array([True, False, True, True, True])
    assert old_users_sample(4, listed, 10, 0).tolist() == [0, 2, 3]
    assert len(old_users_sample(4, listed, 2, 0)) == 2


def test_fit_selects_on_a_figure_a_callback_adds():
    """``fit(select=...)`` keeps the epoch a callback's figure prefers, not the best validation recall."""
    from ccdrec.train.callbacks import Callback

    class Decreasing(Callback):
        def on_validate(self, model, epoch, valid):
            valid["x"] = -float(epoch)

    block = synthetic_stream(n_blocks=1)[0]
    cfg = TrainConfig(epochs=4, batch_size=256, lr=0.02, eval_every=1, patience=10)
    torch.manual_seed(0)
    res = fit(MF(block.n_users, block.n_items, dim=8), block, cfg, seed=0, callbacks=[Decreasing()], select="x")
    assert res.best_epoch == 0 and res.epochs_run == 4 and res.best_valid["x"] == 0.0
    torch.manual_seed(0)
    plain = fit(MF(block.n_users, block.n_items, dim=8), block, cfg, seed=0)
    assert plain.best_epoch > 0  # on recall alone a later epoch wins


def test_covering_epochs_distil_every_listed_row_once():
    """``steps_per_epoch``: the rows of an epoch's steps partition every user (item) with a list."""
    block = synthetic_stream(n_blocks=1)[0]
    rng = np.random.default_rng(0)
    user_top = rng.integers(0, block.n_items, size=(block.n_users, 4))
    user_top[::7] = -1  # users without a list are never drawn
    item_top = rng.integers(0, block.n_users, size=(block.n_items, 4))
    steps = 3
    obj = RRDObjective(user_top, item_top, block.n_items, block.n_users, 20, 20, seed=0, steps_per_epoch=steps)
    model = MF(block.n_users, block.n_items, dim=4)
    seen = []
    for epoch in range(2):
        obj.on_epoch_start(model, None, epoch)
        rows = [obj._rows(obj.user_side, np.arange(2), obj._generator(model.device)).tolist() for _ in range(steps)]
        flat = sorted(x for r in rows for x in r)
        assert flat == [u for u in range(block.n_users) if u % 7]  # each listed user exactly once
        assert all(r == sorted(r) for r in rows)
        seen.append(rows)
    assert seen[0] != seen[1]  # a fresh order every epoch
    plain = RRDObjective(user_top, item_top, block.n_items, block.n_users, 20, 20, seed=0)
    assert len(plain._rows(plain.user_side, np.array([1, 1, 2]), plain._generator(model.device))) == 2


@pytest.mark.parametrize(
    ("scores", "patience", "capped"),
    [
        ([0.1, 0.2, 0.3, 0.4], 10, True),  # still improving when the cap ends it
        ([0.1, 0.3, 0.2, 0.2], 10, False),  # the best epoch is not the last
        ([0.4, 0.3, 0.2, 0.1], 2, False),  # early stopping ended it
    ],
)
def test_fit_says_when_its_epoch_cap_ended_it_still_improving(scores, patience, capped):
    """``FitResult.capped``: the cap, not early stopping, ended a fit whose last validation was the best;
    the fit row carries it and the run report names the stage."""
    from ccdrec.pipeline.context import fit_row
    from ccdrec.report.tables import capped_note
    from ccdrec.train.callbacks import Callback

    class Scripted(Callback):
        def on_validate(self, model, epoch, valid):
            valid["x"] = scores[epoch]

    block = synthetic_stream(n_blocks=1)[0]
    cfg = TrainConfig(epochs=4, batch_size=256, eval_every=1, patience=patience)
    res = fit(MF(block.n_users, block.n_items, dim=4), block, cfg, seed=0, callbacks=[Scripted()], select="x")
    assert res.capped is capped
    row = {**fit_row("teacher0", res, 0), "stage": "b0/teacher0"}
    assert row.get("capped", False) is capped
    note = capped_note([row, {**row, "kind": "test"}])
    assert (note is not None) is capped
    if capped:
        assert note.startswith("1 training stage(s)") and "b0/teacher0" in note


def test_stream_selection_reads_every_earlier_blocks_validation():
    """``select_on = stream``: every validation adds RA over the earlier blocks' validation splits and
    H(LA, RA) (method.md 8 on validation), and the kept epoch is the one with the best H."""
    from ccdrec.eval.metrics import evaluate_block
    from ccdrec.eval.protocol import harmonic
    from ccdrec.train.loop import stream_validation

    stream = synthetic_stream(n_blocks=3)
    block, past = stream[2], stream.blocks[:2]
    cfg = TrainConfig(epochs=4, batch_size=256, eval_every=1, patience=10, select_on="stream")
    torch.manual_seed(0)
    model = MF(block.n_users, block.n_items, dim=4)
    la = evaluate_block(model, block, "valid")["recall@20"]
    got = stream_validation(model, past, {"recall@20": la}, cfg)
    ra = np.mean([evaluate_block(model, b, "valid")["recall@20"] for b in past])
    assert got["stream_ra@20"] == pytest.approx(ra, abs=1e-12) and got["stream_h@20"] == pytest.approx(harmonic(la, ra))

    res = fit(model, block, cfg, seed=0, past=past)
    hs = [row["valid_stream_h@20"] for row in res.history]
    assert res.best_epoch == int(np.argmax(hs)) and res.best_valid["stream_h@20"] == max(hs)
    plain = fit(MF(block.n_users, block.n_items, dim=4), block, cfg, seed=0)  # no earlier blocks: the block alone
    assert "stream_h@20" not in plain.best_valid


def test_masked_logsumexp_matches_torch_in_value_and_gradient_and_ignores_masked_entries():
    from ccdrec.distill.rrd import masked_logsumexp

    gen = torch.Generator().manual_seed(3)
    b = torch.randn(5, 7, dtype=torch.float64, generator=gen) * 4
    keep = torch.rand(5, 7, generator=gen) > 0.4
    keep[2] = False  # a row with nothing kept
    keep[3] = True
    ref_b, b = b.clone().requires_grad_(), b.clone().requires_grad_()
    ref = torch.logsumexp(torch.where(keep, ref_b, torch.full_like(ref_b, torch.finfo(b.dtype).min / 4)), 1, keepdim=True)
    got = masked_logsumexp(b, keep)
    kept = [r for r in range(5) if keep[r].any()]
    assert torch.allclose(got[kept], ref[kept], rtol=1e-12, atol=0)
    assert got[2].item() < -1e300  # very negative and finite
    weights = torch.randn(5, 1, dtype=torch.float64, generator=gen)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(b.grad, ref_b.grad, rtol=1e-12, atol=1e-300)
    assert (b.grad[~keep] == 0).all() and (b.grad[2] == 0).all()
    assert torch.autograd.gradcheck(lambda x: masked_logsumexp(x, keep), (b.detach().clone().requires_grad_(),))
    assert torch.allclose(masked_logsumexp(b.detach()), torch.logsumexp(b.detach(), 1, keepdim=True), rtol=1e-12)
    with pytest.raises(ValueError, match="bool mask"):
        masked_logsumexp(b.detach(), keep.double())


def test_a_short_list_without_any_uninteresting_entry_has_finite_gradients():
    """A small catalogue: a user's list is shorter than n (padded) and every sampled column is observed or
    listed. The padded terms' log(0) used to make NaN gradients, and the student's weights NaN in one step."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    padded = torch.cat([a, torch.zeros(2, 2, dtype=torch.float64)], dim=1).requires_grad_()
    mask = torch.arange(5).expand(2, -1) < 3
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    loss = rrd_loss(padded, b, mask, nothing)
    loss.backward()
    assert torch.isfinite(padded.grad).all() and (padded.grad[:, 3:] == 0).all()
    plain = a.clone().requires_grad_()
    expected = rrd_loss(plain, b, uninteresting_mask=nothing)  # the list alone: no uninteresting entry
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(padded.grad[:, :3], plain.grad, rtol=1e-12)


def test_fit_stops_a_training_whose_weights_become_nan():
    from ccdrec.errors import TrainingDiverged
    from ccdrec.train.callbacks import Callback

    class Poison(Callback):
        def on_epoch_end(self, model, opt, epoch):
            if epoch == 1:
                with torch.no_grad():
                    model.item_emb[3, 0] = float("nan")

    block = synthetic_stream(n_blocks=1)[0]
    cfg = TrainConfig(epochs=4, batch_size=256, lr=0.02, eval_every=1, patience=10)
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 2 \(distil D_0\): its weights are no longer "
                       r"finite; a smaller learning rate for it \(now 0.02\) may help$"):  # fmt: skip
        fit(MF(block.n_users, block.n_items, dim=8), block, cfg, seed=0, callbacks=[Poison()], label="distil D_0")
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 1 \(train\): its loss is nan"):
        fit(MF(block.n_users, block.n_items, dim=8), block, cfg.model_copy(update={"lr": 1e30}), seed=0)


def test_rrd_loss_stays_finite_when_a_list_spreads_past_the_float64_range():
    """A suffix far below the row's maximum (a gap past ~745) underflowed to 0 and its log gave -inf with a
    NaN gradient; it now takes the log-space sum: L = log 2 for scores (gap, 0) against one sample at 0."""
    for gap in (700.0, 750.0, 1e5):
        a = torch.tensor([[gap, 0.0]], requires_grad=True)
        loss = rrd_loss(a, torch.tensor([[0.0]]))
        loss.backward()
        assert loss.item() == pytest.approx(math.log(2), abs=1e-4), gap
        assert torch.allclose(a.grad, torch.tensor([[0.0, -0.5]]), atol=1e-4), (gap, a.grad)
