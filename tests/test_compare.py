"""CL competitors, CCD ablations and the comparison report, on tiny synthetic streams (seconds)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ccdrec import CcdrecError
from ccdrec.config import TrainConfig
from ccdrec.continual.proxy import Proxy
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.eval.protocol import harmonic
from ccdrec.models import MF, LightGCN
from ccdrec.models.vae import MultVAE
from ccdrec.pipeline.compare import ABLATIONS, ablation_config, parse_ablations, parse_methods, run_compare
from ccdrec.pipeline.competitors import cl_retrain, cl_update, lwc_weight, run_competitor
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.staged import StopRequested, base_signature
from ccdrec.pipeline.stages.student_update import update_student
from ccdrec.pipeline.stages.teacher_update import lwckd_towards
from ccdrec.presets import load_config
from ccdrec.report import compare as rc
from ccdrec.train.loop import fit

FAST = TrainConfig(epochs=5, batch_size=256, lr=0.02, eval_every=100, weight_decay=0.0, l2=0.0)
OVERRIDES = [
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: mf, dim: 16, seed: 1}]",
]


@pytest.fixture(scope="module")
def small():
    return synthetic_stream(n_blocks=3, base_users=100, base_items=60, new_users=20, new_items=10, per_user=12, seed=0)


@pytest.fixture(scope="module")
def base_mf(small):
    torch.manual_seed(0)
    model = MF(small[0].n_users, small[0].n_items, dim=16)
    fit(model, small[0], FAST.model_copy(update={"epochs": 10}), seed=0)
    return model


def cfg_with(*overrides):
    return load_config(preset="quick", overrides=list(overrides))


def top_overlap(model, old_model, n: int = 10) -> float:
    """Mean share of each old user's top-n old items that the model still ranks in its top-n."""
    u0, i0 = old_model.n_users, old_model.n_items
    old_u, old_i = old_model.propagate()
    cur_u, cur_i = model.propagate()
    a = (old_u @ old_i.T).topk(n, dim=1).indices.tolist()
    b = (cur_u[:u0] @ cur_i[:i0].T).topk(n, dim=1).indices.tolist()
    return float(np.mean([len(set(x) & set(y)) / n for x, y in zip(a, b, strict=True)]))


# --------------------------------------------------------------------------------------------- competitors


def test_finetune_grows_and_changes_old_rows_without_touching_the_previous_model(small, base_mf):
    before = base_mf.user_emb.detach().clone()
    res = cl_update(base_mf, "finetune", small[1], small[0], cfg_with(), FAST, seed=1)
    new = res.model
    assert (new.n_users, new.n_items) == (small[1].n_users, small[1].n_items)
    assert res.lwc is None and res.fit.epochs_run == FAST.epochs
    assert torch.equal(base_mf.user_emb.detach(), before)  # the previous model is left as it was
    moved = (new.user_emb.detach()[: before.shape[0]] - before).norm(dim=1)
    assert (moved > 0).float().mean() > 0.5  # fine-tuning moves old rows


def test_lwckd_regulariser_is_nonzero_and_pulls_towards_the_old_model(small, base_mf):
    cfg = cfg_with("competitors.lwc_weight=1.0")
    sched = FAST.model_copy(update={"lr": 0.05})
    plain = cl_update(base_mf, "finetune", small[1], small[0], cfg, sched, seed=1)
    lwc = cl_update(base_mf, "lwckd", small[1], small[0], cfg, sched, seed=1)
    assert lwc.lwc is not None and lwc.lwc.weight == 1.0 and not lwc.lwc.piw
    assert all(v.item() > 0 for v in lwc.lwc.last_terms.values())
    # the old users' rankings stay closer to the old model's ...
    assert top_overlap(lwc.model, base_mf) > top_overlap(plain.model, base_mf)
    # ... and the exact LWC-KD loss towards the old model is lower
    exact_cfg = cfg_with("teacher.lwc_candidates=null", "teacher.lwc_entities=null")
    exact = lwckd_towards(base_mf, small[0], exact_cfg, lwc_weight(exact_cfg), 0)
    users, items = np.arange(base_mf.n_users), np.arange(base_mf.n_items)

    def probe(m):
        u, i = m.propagate()
        return exact.loss_from_layers([(u[: base_mf.n_users], i[: base_mf.n_items])], users, items).item()

    assert probe(lwc.model) < 0.95 * probe(plain.model)
    # the default weight is the teacher's λ_LWC
    default = cl_update(base_mf, "lwckd", small[1], small[0], cfg_with(), FAST, seed=1)
    assert default.lwc.weight == cfg_with().teacher.lwc_weight


def test_piw_weights_differ_across_users_and_change_the_loss(small, base_mf):
    cfg = cfg_with("competitors.lwc_weight=1.0")
    b0, b1 = small[0], small[1]
    grown = base_mf.clone()
    grown.grow(b1.n_users, b1.n_items, b1.train_matrix, "entity")
    with torch.no_grad():
        grown.user_emb.add_(0.3 * torch.randn_like(grown.user_emb))
    users, items = b1.train[:200, 0], b1.train[:200, 1]
    plain = lwckd_towards(base_mf, b0, cfg, lwc_weight(cfg), seed=0, piw=False)
    piw = lwckd_towards(base_mf, b0, cfg, lwc_weight(cfg), seed=0, piw=True)
    loss_plain = plain(grown, grown.propagate(), users, items)
    loss_piw = piw(grown, grown.propagate(), users, items)
    w = piw.last_piw[piw.last_piw > 0]
    assert len(w) > 5 and w.std().item() > 1e-4 and w.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert abs(loss_piw.item() - loss_plain.item()) > 1e-6
    a = cl_update(base_mf, "lwckd", b1, b0, cfg, FAST, seed=1).model
    b = cl_update(base_mf, "lwckd-piw", b1, b0, cfg, FAST, seed=1).model
    assert not torch.equal(a.user_emb, b.user_emb)


def test_vae_members_are_fine_tuned_under_lwckd(small):
    b0, b1 = small[0], small[1]
    torch.manual_seed(0)
    vae = MultVAE(b0.n_users, b0.n_items, dim=8)
    sched = TrainConfig(epochs=2, batch_size=64, lr=1e-3, eval_every=100)
    fit(vae, b0, sched, seed=0)
    ft = cl_update(vae, "finetune", b1, b0, cfg_with(), sched, seed=2)
    lw = cl_update(vae, "lwckd-piw", b1, b0, cfg_with(), sched, seed=2)
    assert lw.lwc is None and ft.model.n_items == b1.n_items
    assert all(torch.equal(x, y) for x, y in zip(ft.model.state_dict().values(), lw.model.state_dict().values(), strict=True))


def test_retrain_is_a_fresh_model_on_all_train_pairs_so_far(small):
    block = small.union_block(2)
    want = np.unique(np.concatenate([small[0].train, small[1].train, small[2].train]), axis=0)
    assert np.array_equal(block.train, want)
    train = set(map(tuple, want.tolist()))
    assert len(block.valid) > 0 and not any(tuple(p) in train for p in block.valid.tolist())
    # block 2's test pairs, less those the union trains on (observed, so never targets)
    assert block.test.tolist() == [p for p in small[2].test.tolist() if tuple(p) not in train]
    assert len(block.test) < len(small[2].test) and block.n_users == small[2].n_users
    spec = cfg_with().student.model  # LightGCN-8
    res = cl_retrain(spec, small, 2, FAST, seed=0, device="cpu")
    assert isinstance(res.model, LightGCN) and (res.model.n_users, res.model.n_items) == (small[2].n_users, small[2].n_items)
    assert res.model._adj._nnz() == 2 * len(want)  # its graph is the union of all train pairs
    with pytest.raises(ValueError, match="cl_retrain"):
        cl_update(res.model, "retrain", small[2], small[1], cfg_with(), FAST, seed=0)


# --------------------------------------------------------------------------------------------- ablations


def test_ablations_change_only_their_switch_and_share_block_zero():
    cfg = load_config("yelp", preset="paper-yelp")
    for name in ABLATIONS:
        assert base_signature(ablation_config(cfg, name)) == base_signature(cfg)
    a = ablation_config(cfg, "no-stability")
    for k, o in a.blocks.items():
        assert o.student_replay.n_stability == 0 and o.teacher_replay.n_stability == 0
        assert o.student_replay.n_plasticity == cfg.blocks[k].student_replay.n_plasticity
    assert a.student.replay.n_stability == 0 and a.teacher.replay.n_stability == 0
    p = ablation_config(cfg, "no-plasticity")
    assert all(p.student_replay(k).n_plasticity == 0 and p.teacher_replay(k).n_plasticity == 0 for k in range(1, 6))
    assert ablation_config(cfg, "random-init").student.init == "random"
    assert ablation_config(cfg, "one-hop-init").student.init == "one_hop"
    assert not ablation_config(cfg, "no-student-knowledge").teacher.student_knowledge
    assert not ablation_config(cfg, "no-redistill").student.redistill
    r = ablation_config(cfg, "no-replay")
    assert not r.teacher.student_knowledge and all(
        r.student_replay(k).n_stability == r.student_replay(k).n_plasticity == 0 for k in range(1, 6)
    )
    with pytest.raises(CcdrecError, match="unknown ablation"):
        ablation_config(cfg, "no-such")


def test_an_ablation_that_changes_nothing_is_skipped():
    from ccdrec.pipeline.compare import effective_ablations

    plain = load_config("yelp")  # n_P = 0 on both sides already
    assert effective_ablations(plain, ["no-plasticity", "no-stability"]) == ["no-stability"]
    paper = load_config("yelp", preset="paper-yelp")  # per-block n_P > 0
    assert effective_ablations(paper, ["no-plasticity", "no-stability"]) == ["no-plasticity", "no-stability"]


def test_no_replay_samples_nothing(small, base_mf):
    cfg = cfg_with("student.replay.n_stability=3", "student.replay.n_plasticity=2")
    proxy = Proxy.from_model(base_mf)
    b0, b1 = small[0], small[1]
    _, with_replay = update_student(base_mf, proxy, proxy, None, b1, b0, cfg, seed=0)
    assert with_replay.active and sum(with_replay.sizes) > 0
    _, without = update_student(base_mf, proxy, proxy, None, b1, b0, ablation_config(cfg, "no-replay"), seed=0)
    assert not without.active and without.sizes == [] and len(without.replay) == 0


def test_parse_methods_and_ablations():
    assert parse_methods("ccd, lwckd") == ["ccd", "lwckd"]
    with pytest.raises(CcdrecError, match="unknown method"):
        parse_methods("ccd,sgd")
    with pytest.raises(CcdrecError, match="--methods names 'ccd' twice"):
        parse_methods("ccd, lwckd,ccd")
    with pytest.raises(CcdrecError, match="--ablation has an empty entry"):
        parse_ablations("no-replay,,no-proxies", False)
    assert parse_ablations(None, True) == list(ABLATIONS) and parse_ablations(None, False) == []
    assert parse_ablations("no-replay", False) == ["no-replay"]
    with pytest.raises(CcdrecError, match="unknown ablation"):
        parse_ablations("no-such", False)
    with pytest.raises(CcdrecError, match="--ablations runs every ablation and --ablation names some: give one of them"):
        parse_ablations("no-replay", True)


# --------------------------------------------------------------------------------------------- report tables


def metric_rows(model, values, extra=None):
    """Hand-made test rows {(k, j): recall@20}; ndcg@20 = recall / 2."""
    return [
        {"kind": "test", "model": model, "k": k, "j": j, "recall@20": v, "ndcg@20": v / 2, **(extra or {})}
        for (k, j), v in values.items()
    ]


CCD_STUDENT = {(0, 0): 0.9, (1, 0): 0.2, (1, 1): 0.4, (2, 0): 0.1, (2, 1): 0.3, (2, 2): 0.5}
FT_STUDENT = {(0, 0): 0.9, (1, 0): 0.1, (1, 1): 0.3, (2, 0): 0.1, (2, 1): 0.1, (2, 2): 0.2}
LWC_STUDENT = {(0, 0): 0.9, (1, 0): 0.1, (1, 1): 0.5, (2, 0): 0.1, (2, 1): 0.1, (2, 2): 0.1}
RETRAIN_STUDENT = {(0, 0): 0.9, (1, 0): 0.9, (1, 1): 0.9, (2, 0): 0.9, (2, 1): 0.9, (2, 2): 0.9}
TEACHER = {(0, 0): 0.5, (1, 0): 0.5, (1, 1): 0.5, (2, 0): 0.5, (2, 1): 0.5, (2, 2): 0.5}


@pytest.fixture
def hand_rows():
    ccd_raw = metric_rows("served", {kj: v for kj, v in CCD_STUDENT.items() if kj[0] > 0})
    ccd_raw += metric_rows("student", {kj: 0.01 for kj in CCD_STUDENT})  # D_k: role "distilled", not the student
    ccd_raw += metric_rows("teacher", {kj: v + 0.1 for kj, v in TEACHER.items()})
    ccd_raw += [{"kind": "new_users", "model": "served", "k": 1, "j": 1, "recall@20": 0.33, "ndcg@20": 0.1}]
    rows = rc.label_rows(ccd_raw, "ccd", rc.CCD_ROLES)
    for method, student in (("finetune", FT_STUDENT), ("lwckd", LWC_STUDENT), ("retrain", RETRAIN_STUDENT)):
        raw = metric_rows(f"{method}:student", student) + metric_rows(f"{method}:teacher", TEACHER)
        raw += [{"kind": "new_users", "model": f"{method}:student", "k": 1, "j": 1, "recall@20": 0.2, "ndcg@20": 0.1}]
        rows += rc.label_rows(raw + metric_rows("other", TEACHER), method, rc.cl_roles(method))
    return rows


def test_label_rows_maps_models_to_roles(hand_rows):
    ccd = {r["model"] for r in hand_rows if r["method"] == "ccd"}
    assert ccd == {"ccd:student", "ccd:teacher", "ccd:distilled"}
    assert not any(r["model"].endswith("other") for r in hand_rows)
    served = [r for r in hand_rows if r["model"] == "ccd:student" and r["kind"] == "test"]
    assert {(r["k"], r["j"]): r["recall@20"] for r in served} == {kj: v for kj, v in CCD_STUDENT.items() if kj[0] > 0}


def test_comparison_table_la_ra_h(hand_rows):
    t = rc.comparison_table(hand_rows, ["ccd", "finetune", "lwckd", "retrain"])
    la, ra = (0.4 + 0.5) / 2, (0.2 + 0.2) / 2
    assert t.loc["ccd", "student LA"] == pytest.approx(la)
    assert t.loc["ccd", "student RA"] == pytest.approx(ra)
    assert t.loc["ccd", "student H"] == pytest.approx(2 * la * ra / (la + ra))
    assert t.loc["ccd", "teacher H"] == pytest.approx(0.6)
    assert t.loc["finetune", "student LA"] == pytest.approx(0.25) and t.loc["finetune", "student RA"] == pytest.approx(0.1)
    nd = rc.comparison_table(hand_rows, ["ccd"], "ndcg@20")
    assert nd.loc["ccd", "student LA"] == pytest.approx(la / 2)


def test_bold_best_marks_the_best_competing_value_per_column(hand_rows):
    t = rc.comparison_table(hand_rows, ["ccd", "finetune", "lwckd", "retrain"])
    text = rc.bold_best(t, exclude=("retrain",))
    assert text.loc["ccd", "student H"].startswith("**") and not text.loc["finetune", "student H"].startswith("**")
    assert text.loc["retrain", "student H"] == f"{t.loc['retrain', 'student H']:.4f}"  # the reference never wins
    assert text.loc["ccd", "teacher H"] == "**0.6000**"
    # ties at display precision are all bold
    assert text.loc["finetune", "teacher H"] == text.loc["lwckd", "teacher H"] == "0.5000"
    assert rc.bold_best(t.loc[["finetune", "lwckd"]]).loc["lwckd", "teacher H"] == "**0.5000**"
    t.loc["lwckd", "student LA"] = float("nan")
    assert rc.bold_best(t).loc["lwckd", "student LA"] == "—"


def test_block_gains_against_one_competitor_for_the_whole_stream(hand_rows):
    # no validation rows here: the competitor is chosen on the test splits (lwckd: LA 0.3, RA 0.1)
    assert rc.rival(hand_rows, ["finetune", "lwckd"]) == ("lwckd", "test")
    g = rc.block_gains(hand_rows, ["finetune", "lwckd"], role="student")
    assert list(g.index) == [1, 2]
    h1 = {"ccd": harmonic(0.4, 0.2), "finetune": harmonic(0.3, 0.1), "lwckd": harmonic(0.5, 0.1)}
    h2 = {"ccd": harmonic(0.5, 0.2), "finetune": harmonic(0.2, 0.1), "lwckd": harmonic(0.1, 0.1)}
    # the same competitor at every block, even where another one is better (finetune at block 2)
    assert g["competitor"].tolist() == ["lwckd", "lwckd"]
    assert g["gain"].tolist() == pytest.approx([h1["ccd"] - h1["lwckd"], h2["ccd"] - h2["lwckd"]])
    teacher = rc.block_gains(hand_rows, ["finetune", "lwckd"], role="teacher")
    assert teacher["gain"].tolist() == pytest.approx([0.1, 0.1])
    sg = rc.stream_gain(hand_rows, ["finetune", "lwckd"], role="student")
    assert sg["competitor"] == "lwckd"
    assert sg["gain"] == pytest.approx(harmonic(0.45, 0.2) - harmonic(0.3, 0.1))
    # with validation rows, the choice follows them: finetune best on validation
    valid = [dict(r, kind="valid") for r in hand_rows if r.get("kind") == "test"]
    for r in valid:
        if r["model"] == "finetune:student":
            r["recall@20"] = 0.9
    assert rc.rival(hand_rows + valid, ["finetune", "lwckd"]) == ("finetune", "valid")
    assert rc.block_gains(hand_rows + valid, ["finetune", "lwckd"])["competitor"].tolist() == ["finetune", "finetune"]


def test_new_user_and_time_tables(hand_rows):
    nu = rc.new_user_table(hand_rows, ["ccd", "finetune"], "student")
    assert nu.loc["ccd", "D_1"] == 0.33 and nu.loc["finetune", "D_1"] == 0.2
    states = {
        "ccd": {"seconds": {"b0/teacher0": 10.0, "b0/student": 2.0, "b0/eval": 1.0, "b1/student_update": 3.0, "b1/eval": 0.5}},
        "finetune": {
            "seconds": {"b0/teacher0": 0.0, "b0/eval": 0.0, "b1/student": 1.0, "b1/teacher0": 2.0, "b1/eval": 0.25},
            "shared": {"b0/teacher0": "x", "b0/eval": "x"},
        },
    }
    t = rc.time_table(states)
    assert t.loc["ccd", "block 0 (s)"] == 12.0 and t.loc["ccd", "blocks 1..K (s)"] == 3.0
    assert t.loc["ccd", "evaluation (s)"] == 1.5 and t.loc["ccd", "total (s)"] == 16.5
    assert t.loc["finetune", "blocks 1..K (s)"] == 3.0 and t.loc["finetune", "shared block 0"] == "yes"
    assert t.loc["finetune", "total (s)"] == 3.25


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmpstream") / "synthetic"
    save_stream(synthetic_stream(n_blocks=2, seed=1), d)
    return d


@pytest.fixture(scope="module")
def comparison(stream_dir, tmp_path_factory):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    report = run_compare(
        cfg,
        out,
        ["ccd", "finetune", "lwckd", "lwckd-piw", "retrain"],
        ["no-replay", "no-redistill"],
        progress=False,
        bench_repeats=1,
    )
    return cfg, out, report


def read_rows(d):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def test_compare_end_to_end_writes_the_report(comparison):
    cfg, out, report = comparison
    text = report.read_text()
    for part in (
        "LA / RA / H-mean (recall@20)",
        "gain over the best CL competitor",
        "New users",
        "Training time",
        "Serving cost",
    ):
        assert part in text
    assert "ccd/no-replay" in text and "**" in text
    assert (out / "plots" / "gains.png").stat().st_size > 1000 and (out / "plots" / "h_per_block.png").exists()
    for m in ("finetune", "lwckd", "lwckd-piw", "retrain"):
        rows = read_rows(out / m)
        got = {(r["model"], r["k"], r["j"]) for r in rows if r["kind"] == "test"}
        assert got == {(f"{m}:{role}", k, j) for role in ("student", "teacher") for k in (0, 1) for j in range(k + 1)}
        assert {r["k"] for r in rows if r["kind"] == "new_users"} == {1}
        state = RunDir(out / m).read_state()
        assert state["shared"].keys() == {"b0/teacher0", "b0/teacher1", "b0/student", "b0/eval"}
        # block-0 models are CCD's own checkpoints, not retrained copies
        for name in ("b0_teacher0", "b0_teacher1", "b0_student"):
            assert (out / m / "checkpoints" / f"{name}.pt").read_bytes() == (
                out / "ccd" / "checkpoints" / f"{name}.pt"
            ).read_bytes()
    abl = RunDir(out / "ablation-no-replay")
    assert abl.load_config().teacher.student_knowledge is False
    assert "b0/teacher0" in abl.read_state()["shared"] and "proxies" in abl.read_state()["pointers"]
    # E_0's top lists come with block 0, so block 1's student update needs no ensemble pass of its own
    top = "checkpoints/b0_teacher_top.pt"
    assert os.stat(abl.path / top).st_ino == os.stat(out / "ccd" / top).st_ino

    # the ablations do what their names say: no replayed pair, no fresh D_1
    def replayed(d):
        return [r["replay_pairs"] for r in read_rows(d) if r["kind"] == "fit" and r["model"] == "updated"]

    assert replayed(out / "ccd")[0] > 0 and replayed(out / "ablation-no-replay") == [0]

    def same_weights(d):
        a, b = (torch.load(d / "checkpoints" / f"{n}.pt", weights_only=True) for n in ("b1_student", "b1_updated"))
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert same_weights(out / "ablation-no-redistill") and not same_weights(out / "ccd")
    bench = json.loads((out / "bench_serve.json").read_text())
    assert [r["model"] for r in bench] == ["teacher ensemble", "student", "teacher / student"]


def test_compare_resume_runs_nothing_again(comparison):
    _, out, _ = comparison
    before = {m: read_rows(out / m) for m in ("ccd", "finetune", "ablation-no-replay")}
    report = run_compare(None, out, resume=True, progress=False, bench=False)
    assert {m: read_rows(out / m) for m in before} == before
    assert "Serving cost" in report.read_text()  # the earlier measurement is kept
    with pytest.raises(CcdrecError, match=r"a comparison directory exists there; continue it with ccdrec compare --resume "):
        run_compare(load_config(preset="quick"), out, ["ccd"], progress=False)
    with pytest.raises(CcdrecError, match=r"not a comparison directory .*continue it with ccdrec run --resume"):
        run_compare(None, out / "ccd", resume=True, progress=False)
    with pytest.raises(CcdrecError, match=r"give one of its runs \(e\.g\. .*/ccd\)"):
        RunDir.open(out)  # a comparison given where a run is expected: CCD's run is the example


def test_standalone_competitor_trains_the_same_block_zero_and_resumes(comparison, tmp_path):
    cfg, out, _ = comparison
    with pytest.raises(StopRequested):
        run_competitor(cfg, tmp_path / "ft", "finetune", progress=False, stop_after="b1/student")
    run_competitor(None, tmp_path / "ft", "finetune", resume=True, progress=False)
    assert read_rows(tmp_path / "ft") == read_rows(out / "finetune")


def test_sharing_refuses_a_different_block_zero(comparison, tmp_path):
    cfg, out, _ = comparison
    other = cfg.model_copy(update={"seed": 7})
    with pytest.raises(CcdrecError, match="cannot share"):
        run_competitor(other, tmp_path / "x", "lwckd", progress=False, base_from=out / "ccd")


def ccdrec(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from ccdrec.cli import main; main()", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_compare_help_and_errors(tmp_path, stream_dir):
    out = ccdrec("compare", "--help")
    assert out.returncode == 0 and "--ablations" in out.stdout
    out = ccdrec("compare", "--methods", "ccd,sgd", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "unknown method 'sgd'" in out.stderr
    out = ccdrec("compare", "--resume", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such comparison directory" in out.stderr
    out = ccdrec("compare", "--from-run", str(tmp_path / "missing"), "--out", str(tmp_path / "y"))
    assert out.returncode == 2 and "no such run directory" in out.stderr
    (tmp_path / "afile").write_text("")
    out = ccdrec("compare", "--resume", str(tmp_path / "afile"))
    assert out.returncode == 2 and "afile: a file, not a comparison directory" in out.stderr
    out = ccdrec("compare", "--data", str(stream_dir), "--out", str(tmp_path / "afile" / "sub"))
    assert out.returncode == 2 and out.stderr.strip().endswith("(a part of the path is a file)"), out.stderr


def test_compare_from_an_existing_run_reuses_its_stages(comparison, tmp_path):
    cfg, out, _ = comparison
    src = out / "ccd"
    before = {p.name: p.read_bytes() for p in (src / "metrics.jsonl", src / "state.json")}
    report = run_compare(None, tmp_path / "cmp", ["finetune"], from_run=src, progress=False, bench=False)
    got = tmp_path / "cmp"
    assert read_rows(got / "ccd") == read_rows(src)  # nothing of CCD trained again
    assert read_rows(got / "finetune") == read_rows(out / "finetune")  # the same block 0, so the same run
    assert os.stat(got / "ccd" / "checkpoints" / "b1_student.pt").st_ino == os.stat(src / "checkpoints" / "b1_student.pt").st_ino
    assert {p.name: p.read_bytes() for p in (src / "metrics.jsonl", src / "state.json")} == before
    assert "finetune" in report.read_text()
    with pytest.raises(CcdrecError, match="no such run directory"):
        run_compare(None, tmp_path / "cmp2", ["finetune"], from_run=tmp_path / "nope", progress=False)


def test_only_a_ccd_run_is_compared_from_and_a_comparisons_run_goes_on_with_it(comparison, tmp_path):
    from ccdrec.pipeline.ccd import run_stream

    _, out, _ = comparison
    takes = r"is a run of finetune, not of CCD: --from-run takes a run of ccdrec run or a comparison.s ccd/"
    with pytest.raises(CcdrecError, match=takes):
        run_compare(None, tmp_path / "p1", ["lwckd"], from_run=out / "finetune", progress=False)
    with pytest.raises(CcdrecError, match=r"is the ablation-no-replay run of the comparison .*, not its CCD run"):
        run_compare(None, tmp_path / "p2", ["finetune"], from_run=out / "ablation-no-replay", progress=False)
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()
    state = (out / "ccd" / "state.json").read_bytes()
    expected = f"is a part of the comparison {out}: --max-blocks 2 is made to the whole comparison, so that its runs "
    expected += f"stay at one block: ccdrec compare --resume {out} --max-blocks 2"
    with pytest.raises(CcdrecError, match=re.escape(expected)):
        run_stream(None, out / "ccd", resume=True, progress=False, max_blocks=2)
    (tmp_path / "link").symlink_to(out / "ccd")  # a link to a part is that part
    with pytest.raises(CcdrecError, match=re.escape(f"is a part of the comparison {out}")):
        run_stream(None, tmp_path / "link", resume=True, progress=False, max_blocks=2)
    (tmp_path / "ablation").symlink_to(out / "ablation-no-replay")
    with pytest.raises(CcdrecError, match=r"is the ablation-no-replay run of the comparison .*, not its CCD run"):
        run_compare(None, tmp_path / "p3", ["finetune"], from_run=tmp_path / "ablation", progress=False)
    with pytest.raises(
        CcdrecError, match=re.escape(f"is a run of finetune, not of CCD: it goes on with ccdrec compare --resume {out}")
    ):
        run_stream(None, out / "finetune", resume=True, progress=False)
    assert (out / "ccd" / "state.json").read_bytes() == state and not (tmp_path / "p3").exists()


def test_a_report_says_when_its_runs_end_at_different_blocks_or_none_has_an_incremental_block(hand_rows, tmp_path):
    parts = {m: [r for r in hand_rows if r["method"] == m] for m in ("ccd", "finetune")}
    assert rc.stopped_notes(parts, tmp_path) == []  # both end at block 2
    short = {**parts, "finetune": [r for r in parts["finetune"] if r["k"] <= 1]}
    (note,) = rc.stopped_notes(short, tmp_path)
    assert "the runs end at different blocks (ccd at block 2, finetune at block 1)" in note
    assert f"ccdrec compare --resume {tmp_path} --max-blocks 2 takes every run to one block" in note
    block0 = {m: [r for r in rows if r["k"] == 0] for m, rows in parts.items()}
    (note,) = rc.stopped_notes(block0, tmp_path)
    assert "no run has evaluated an incremental block yet" in note


def test_compare_resume_adds_methods_and_takes_every_run_on_to_later_blocks(comparison, tmp_path):
    cfg, out, _ = comparison
    got = tmp_path / "cmp"
    run_compare(cfg.model_copy(update={"max_blocks": 0}), got, ["ccd", "finetune"], progress=False, bench=False)
    assert {r["k"] for r in read_rows(got / "finetune")} == {0}
    run_compare(None, got, ["lwckd", "finetune"], resume=True, progress=False, max_blocks=1)  # bench as started
    plan = json.loads((got / "compare.json").read_text())
    assert plan["methods"] == ["ccd", "finetune", "lwckd"] and plan["bench"] is False
    assert not (got / "bench_serve.json").exists()  # a resume measured it although the comparison was started without
    for m in ("ccd", "finetune", "lwckd"):  # the same runs as a comparison started with every block
        assert read_rows(got / m) == read_rows(out / m)
        assert RunDir(got / m).load_config().max_blocks == 1
    with pytest.raises(CcdrecError, match="must be at least 1"):
        run_compare(None, got, resume=True, progress=False, bench=False, max_blocks=0)


def test_competitors_update_their_teachers_every_teacher_cycle(tmp_path):
    """teacher.update_every = 2: a competitor's members are updated at block 2 on blocks 1-2, its
    student at every block; its stale ensemble is still evaluated after block 1."""
    save_stream(synthetic_stream(n_blocks=3, seed=1), tmp_path / "s")
    cfg = load_config(tmp_path / "s", preset="quick", overrides=[*OVERRIDES, "teacher.update_every=2"])
    rd = run_competitor(cfg, tmp_path / "ft", "finetune", progress=False)
    state = rd.read_state()
    assert "b1/teacher0" not in state["completed"] and "b2/teacher0" in state["completed"]
    assert {"b1/student", "b2/student", "b1/eval"} <= set(state["completed"])
    meta = json.loads((rd.path / "checkpoints" / "b2_teacher0.json").read_text())["meta"]
    assert meta["first"] == 1 and meta["method"] == "finetune"
    rows = rd.read_metrics()
    assert {r["model"] for r in rows if r["kind"] == "test" and r["k"] == 1} == {"finetune:teacher", "finetune:student"}


def test_report_tables_keep_the_numbers_as_formatted():
    import pandas as pd

    from ccdrec.report.markdown import markdown_table

    df = pd.DataFrame({"method": ["ccd", "finetune"], "H": [0.2330, 0.004], "gain": [0.0040, -0.0011]}).set_index("method")
    lines = markdown_table(df).splitlines()
    assert lines[2].split("|")[2:4] == [" 0.2330 ", "  0.0040 "]  # trailing zeros kept, numbers right-aligned
    assert "-0.0011" in lines[3] and lines[1].startswith("|:-") and lines[1].endswith("-:|")


def test_report_tables_show_metrics_to_four_places_seconds_to_tenths_and_counts_as_integers():
    """The run report's training table once showed validation Recall with 3 decimals, and the sweep's cost
    table 12,345 s as 1.235e+04: metrics take 4 places, seconds tenths, epochs stay integers."""
    import pandas as pd

    from ccdrec.report import tables
    from ccdrec.report.markdown import markdown_table

    rows = [
        {
            "kind": "fit",
            "stage": "b0/student",
            "model": "student",
            "best_epoch": 7,
            "epochs": 10,
            "valid_recall@20": 0.12345,
            "train_seconds": 12.34,
        },
        {"kind": "fit", "stage": "b1/student_update", "model": "updated", "train_seconds": 0.5},  # untrained: no epochs
    ]
    text = markdown_table(tables.fit_table(rows))
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()[2:]]
    assert cells[0][1:] == ["b0/student", "student", "7", "10", "0.1235", "12.3"]
    assert cells[1][3:] == ["—", "—", "—", "0.5"]
    cost = pd.DataFrame({"student cycle (s)": [12345.678], "served student H": [0.07]}, index=pd.Index(["ccd"], name="method"))
    cells = [c.strip() for c in markdown_table(cost).splitlines()[2].split("|")[1:-1]]
    assert cells == ["ccd", "12345.7", "0.0700"]
