"""The competitors' Mult-VAE members carry CCD's KL regulariser; the student-size model can start plain."""

import json

import numpy as np
import pytest
import torch

from ccdrec.config import TrainConfig
from ccdrec.continual.replay import PreviousOutputKL
from ccdrec.data import load_stream
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.models.vae import MultVAE, rows_tensor
from ccdrec.pipeline.ccd import run_stream
from ccdrec.pipeline.competitors import cl_retrain, cl_update, run_competitor
from ccdrec.pipeline.context import stage_seed
from ccdrec.pipeline.stages import teacher_update
from ccdrec.presets import load_config
from ccdrec.train.loop import fit

MEMBERS = "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: mf, dim: 16, seed: 1}]"
SMALL = ["student.topn=10", "student.user_samples=50", "student.item_samples=50", MEMBERS]


@pytest.fixture(scope="module")
def small():
    return synthetic_stream(n_blocks=2, base_users=100, base_items=60, new_users=20, new_items=10, per_user=12, seed=0)


@pytest.fixture(scope="module")
def base_vae(small):
    torch.manual_seed(0)
    vae = MultVAE(small[0].n_users, small[0].n_items, dim=8)
    fit(vae, small[0], TrainConfig(epochs=3, batch_size=64, lr=3e-3, eval_every=100), seed=0)
    return vae


def kl_to_old(kl: PreviousOutputKL, model: MultVAE) -> float:
    """The regulariser's KL of ``model`` towards the old outputs over every persisting user (no weight)."""
    users = np.flatnonzero(kl._persists)
    model.eval()
    with torch.no_grad():
        x = rows_tensor(kl.matrix, torch.from_numpy(users), model.n_items, model.device)
        return kl(model, model(x, stochastic=False)[0], users).item() / kl.weight


def test_vae_members_carry_ccds_kl_regulariser(small, base_vae):
    b0, b1 = small[0], small[1]
    sched = TrainConfig(epochs=3, batch_size=64, lr=1e-2, eval_every=100)
    cfg = load_config(preset="quick", overrides=["teacher.vae_kl_weight=20.0"])
    on = cl_update(base_vae, "finetune", b1, b0, cfg, sched, seed=2)
    cfg_off = load_config(preset="quick", overrides=["teacher.vae_kl_weight=20.0", "competitors.vae_kl=false"])
    off = cl_update(base_vae, "finetune", b1, b0, cfg_off, sched, seed=2)
    # CCD's regulariser (the same function builds it), with the teacher's weight, on the persisting users
    want = teacher_update.vae_kl_towards(base_vae, b1, b0, b1.train_matrix, 20.0)
    assert isinstance(on.kl, PreviousOutputKL) and on.kl.weight == 20.0 and on.kl.prev_model is base_vae
    assert np.array_equal(on.kl._persists, want._persists) and on.kl.n_old_items == b0.n_items
    assert 0 < on.kl._persists.sum() < b1.n_users
    assert off.kl is None
    # the term enters the loss: the weights differ, and the outputs stay closer to the old ones
    assert not same(on.model.state_dict(), off.model.state_dict())
    assert kl_to_old(on.kl, on.model) < 0.8 * kl_to_old(on.kl, off.model)
    # every CL method gives it
    assert cl_update(base_vae, "lwckd-piw", b1, b0, cfg, sched, seed=2).kl is not None
    assert cfg.competitors.vae_kl and load_config(preset="quick").competitors.start == "distilled"


def test_vae_kl_weight_zero_means_no_term(small, base_vae):
    sched = TrainConfig(epochs=1, batch_size=64, lr=1e-3, eval_every=100)
    cfg = load_config(preset="quick", overrides=["teacher.vae_kl_weight=0"])
    assert cl_update(base_vae, "finetune", small[1], small[0], cfg, sched, seed=2).kl is None


# --------------------------------------------------------------------------------------------- plain start


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CCD run of block 0 and competitors seeded from it: distilled and plain starts."""
    root = tmp_path_factory.mktemp("start")
    save_stream(synthetic_stream(n_blocks=2, seed=1), root / "s")
    cfg = load_config(str(root / "s"), preset="quick", overrides=[*SMALL, "max_blocks=0"])
    plain = load_config(str(root / "s"), preset="quick", overrides=[*SMALL, "max_blocks=0", "competitors.start=plain"])
    run_stream(cfg, root / "ccd", progress=False)
    run_competitor(cfg, root / "distilled", "finetune", progress=False, base_from=root / "ccd")
    run_competitor(plain, root / "plain", "finetune", progress=False, base_from=root / "ccd")
    run_competitor(plain, root / "plain2", "lwckd", progress=False, base_from=root / "plain")
    return root, cfg, plain


def weights(path):
    return torch.load(path, weights_only=True)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shared(rd_path):
    return set(json.loads((rd_path / "state.json").read_text()).get("shared", {}))


def test_distilled_start_is_ccds_d0(runs):
    root, _, _ = runs
    ck = "checkpoints/b0_student.pt"
    assert shared(root / "distilled") == {"b0/teacher0", "b0/teacher1", "b0/student", "b0/eval"}
    assert (root / "distilled" / ck).read_bytes() == (root / "ccd" / ck).read_bytes()


def test_plain_start_trains_its_own_bpr_student_on_block_zero(runs):
    root, _, plain = runs
    assert shared(root / "plain") == {"b0/teacher0", "b0/teacher1"}  # the members are CCD's
    for m in (0, 1):
        ck = f"checkpoints/b0_teacher{m}.pt"
        assert (root / "plain" / ck).read_bytes() == (root / "ccd" / ck).read_bytes()
    got = weights(root / "plain" / "checkpoints" / "b0_student.pt")
    assert not same(got, weights(root / "ccd" / "checkpoints" / "b0_student.pt"))  # not D_0
    # it is full retraining's student of block 0: BPR alone on Tr_0, schedule teacher.base, seed of b0/student
    ref = cl_retrain(
        plain.student.model, load_stream(root / "s"), 0, plain.teacher.base, stage_seed(plain.seed, "b0/student"), "cpu"
    )
    assert same(got, {k: v.cpu() for k, v in ref.model.state_dict().items()})
    rows = [r for r in _rows(root / "plain") if r["kind"] == "fit" and r["model"] == "finetune:student" and r["k"] == 0]
    assert len(rows) == 1 and rows[0]["epochs"] == ref.fit.epochs_run > 0
    assert rows[0]["valid_recall@20"] == pytest.approx(ref.fit.best_valid["recall@20"])
    # block 0's evaluation is its own: the same ensemble, another student
    ccd, own = _test_rows(root / "ccd", ""), _test_rows(root / "plain", "finetune:")
    assert own["teacher"] == ccd["teacher"] and own["student"] != ccd["student"]
    # a second plain-start competitor takes that student, block 0's evaluation too
    assert shared(root / "plain2") == {"b0/teacher0", "b0/teacher1", "b0/student", "b0/eval"}
    assert same(weights(root / "plain2" / "checkpoints" / "b0_student.pt"), got)


def _rows(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _test_rows(d, prefix):
    out = {}
    for r in _rows(d):
        if r["kind"] == "test" and r["k"] == 0:
            out[r["model"][len(prefix) :]] = {k: v for k, v in r.items() if k.startswith(("recall", "ndcg"))}
    return out
