"""The kd-only / kd-once baselines, D_k started from CL_k, and sweeps over seeds and teacher cadences
(``ccdrec compare --seeds --cadences``): pure report functions on hand-made rows, then tiny end-to-end runs."""

import json
import math
import re

import pytest
import torch

from ccdrec import CcdrecError
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.eval.protocol import harmonic
from ccdrec.pipeline.ccd import CCDStream, run_stream
from ccdrec.pipeline.compare import ABLATIONS, KD_METHODS, METHODS, ablation_config, run_compare, variant_config
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.staged import base_signature
from ccdrec.pipeline.sweep import SWEEP_FILE, cell_config, parse_ints, run_sweep
from ccdrec.presets import load_config
from ccdrec.report import sweep as rs

OVERRIDES = [
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: mf, dim: 16, seed: 1}]",
]

# --------------------------------------------------------------------------------------------- configuration


def test_kd_methods_and_the_no_proxies_ablation_change_only_later_blocks():
    cfg = load_config("yelp", preset="paper-yelp")
    only = variant_config(cfg, KD_METHODS["kd-only"][1])
    assert not only.student.continual and only.student.redistill and not only.teacher.student_knowledge
    assert only.teacher.update_every == cfg.teacher.update_every
    once = variant_config(cfg, KD_METHODS["kd-once"][1])
    assert not once.student.continual and not once.student.redistill
    assert not any(once.teacher.is_teacher_cycle(k) for k in range(1, 1000))  # the teacher is never updated
    p = ablation_config(cfg, "no-proxies")
    assert all(
        p.student_replay(k).n_stability == p.student_replay(k).n_plasticity == 0
        and p.teacher_replay(k).n_stability == p.teacher_replay(k).n_plasticity == 0
        and p.teacher_replay(k).n_student == cfg.teacher_replay(k).n_student  # CL_k is still replayed
        for k in range(1, 6)
    )
    for c in (only, once, p):
        assert base_signature(c) == base_signature(cfg)  # block 0 is CCD's: shared


def test_cell_configs_move_run_and_member_seeds_and_set_the_cadence():
    cfg = load_config("yelp", preset="quick", overrides=OVERRIDES)
    same = cell_config(cfg, 0, 1)
    assert same == cfg  # seed 0, cadence 1: the configuration itself
    c = cell_config(cfg, 2, 5)
    assert c.seed == 2 and c.teacher.update_every == 5
    assert [m.seed for m in c.teacher.members] == [4, 5]  # 0 + 2 x 2, 1 + 2 x 2: never another seed's members
    assert base_signature(cell_config(cfg, 0, 5)) == base_signature(cfg) != base_signature(c)


def test_parse_ints():
    assert parse_ints("0, 1,2", "--seeds", 0) == [0, 1, 2]
    bad_lists = (("a", "integers"), ("0", "at least 1"), (" , ", "no value"), ("1,,2", "empty entry .2nd of 3"))
    for bad, msg in (*bad_lists, ("1,2,", "empty entry .3rd of 3"), ("1,2,01", "names 1 twice")):
        with pytest.raises(CcdrecError, match=msg):
            parse_ints(bad, "--cadences", 1)


def test_compare_help_names_every_method_and_ablation():
    from typer.testing import CliRunner

    from ccdrec.cli import app

    text = " ".join(CliRunner().invoke(app, ["compare", "--help"], terminal_width=400).output.split())
    for name in (*METHODS, *ABLATIONS):
        assert name in text, name


# --------------------------------------------------------------------------------------------- report functions


def rows_of(label, role, values):
    return [{"kind": "test", "model": f"{label}:{role}", "k": k, "j": j, "recall@20": v} for (k, j), v in values.items()]


def seed_rows(ccd_la, ft_la, lw_la):
    """One seed's labelled rows: blocks 1-2; RA 0.2 for everyone, LA as given per method."""
    out = []
    for label, la in (("ccd", ccd_la), ("finetune", ft_la), ("lwckd", lw_la)):
        for role in ("student", "teacher"):
            out += rows_of(label, role, {(1, 0): 0.2, (1, 1): la, (2, 0): 0.2, (2, 1): 0.2, (2, 2): la})
    out += rows_of("ccd", "distilled", {(1, 0): 0.1, (1, 1): 0.3, (2, 0): 0.05, (2, 1): 0.15, (2, 2): 0.3})
    return out


def test_seed_table_paired_gains_and_the_best_competitor():
    by_seed = {0: seed_rows(0.5, 0.4, 0.3), 1: seed_rows(0.5, 0.45, 0.6)}
    t = rs.seed_table(by_seed, ["ccd", "finetune"], "recall@20")
    mean = (harmonic(0.5, 0.2) + harmonic(0.5, 0.2)) / 2
    assert t.loc[("ccd", "served student"), "H"] == f"{mean:.4f} ± 0.0000"
    assert t.loc[("ccd", "distilled student D_k"), "seeds"] == 2
    assert ("finetune", "distilled student D_k") not in t.index  # a competitor has no D_k
    # finetune: mean H over seeds above lwckd's, so it is the one rival over the stream
    assert rs.best_competitor(by_seed, ["finetune", "lwckd"], "student", "recall@20", "test") == "finetune"
    assert rs.best_competitor(by_seed, ["finetune"], "student", "recall@20") is None  # no validation rows here
    g = rs.paired_gains(by_seed, "finetune", "student", "recall@20")
    g0, g1 = harmonic(0.5, 0.2) - harmonic(0.4, 0.2), harmonic(0.5, 0.2) - harmonic(0.45, 0.2)
    assert g.loc[1, "mean gain"] == pytest.approx((g0 + g1) / 2) and g.loc[1, "smallest"] == pytest.approx(g1)
    assert g.loc[1, "on every seed"] == "yes" and g.loc["H-mean", "seeds"] == 2
    lw = rs.paired_gains(by_seed, "lwckd", "student", "recall@20")
    assert lw.loc[2, "on every seed"] == "no"  # lwckd beats CCD on seed 1


def test_retention_table_divides_the_distilled_students_ra_by_the_teachers():
    by_seed = {0: seed_rows(0.5, 0.4, 0.3)}
    t = rs.retention_table(by_seed, "ccd", "recall@20")
    assert list(t.index) == [1, 2]
    assert t.loc[1, "E_k RA"] == pytest.approx(0.2) and t.loc[1, "D_k RA"] == pytest.approx(0.1)
    assert t.loc[2, "D_k RA"] == pytest.approx(0.1) and t.loc[2, "D_k / E_k"] == pytest.approx(0.5)
    assert t.loc[2, "CL_k RA"] == pytest.approx(0.2)


def test_cycle_seconds_split_student_and_teacher_cycles():
    ccd = {
        "seconds": {
            "b0/teacher0": 100.0,
            "b1/student_update": 2.0,
            "b1/eval": 9.0,
            "b2/student_update": 4.0,
            "b2/replay_candidates": 1.0,
            "b2/teacher0": 10.0,
            "b2/teacher1": 20.0,
            "b2/student": 5.0,
        }
    }
    s = rs.cycle_seconds(ccd, "ccd")
    assert s["student cycle (s)"] == 3.0 and s["teacher cycle (s)"] == 36.0 and s["teacher cycles"] == 1
    assert s["teacher compute (s)"] == 31.0  # the distillation is not the teacher's compute
    cl = {"seconds": {"b1/student": 1.0, "b1/teacher0": 3.0, "b2/student": 2.0, "b2/teacher0": 5.0, "b2/eval": 1.0}}
    s = rs.cycle_seconds(cl, "cl")
    assert s["student cycle (s)"] == 1.5 and s["teacher cycle (s)"] == 4.0 and s["teacher compute (s)"] == 8.0
    assert math.isnan(rs.mean_sd([])[0]) and math.isnan(rs.mean_sd([1.0])[1])


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepstream") / "synthetic"
    save_stream(synthetic_stream(n_blocks=3, seed=1), d)
    return d


def old_rows_equal(a, b, n_users, n_items):
    return torch.equal(a.user_emb[:n_users], b.user_emb[:n_users]) and torch.equal(a.item_emb[:n_items], b.item_emb[:n_items])


def test_kd_only_and_kd_once_serve_distilled_students_untrained(stream_dir, tmp_path):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    out = tmp_path / "cmp"
    report = run_compare(cfg, out, ["kd-only", "kd-once"], [], progress=False, bench=False)
    plan = json.loads((out / "compare.json").read_text())
    assert plan["methods"][0] == "ccd"  # the kd methods share CCD's block 0
    once, only = RunDir(out / "kd-once"), RunDir(out / "kd-only")
    done_once = set(once.read_state()["completed"])
    assert not any(s.startswith(("b1/teacher", "b2/teacher")) or s in ("b1/student", "b2/student") for s in done_once)
    assert {"b1/student_update", "b2/student_update", "b2/eval"} <= done_once
    assert "b0/teacher0" in once.read_state()["shared"]
    c = CCDStream.open_worker(once.path).ctx
    d0 = c.load("b0_student")
    assert old_rows_equal(c.load("b2_updated"), d0, d0.n_users, d0.n_items)  # D_0, grown twice, never trained
    c = CCDStream.open_worker(only.path).ctx
    d1 = c.load("b1_student")
    assert old_rows_equal(c.load("b2_updated"), d1, d1.n_users, d1.n_items)  # D_1 grown, not trained
    assert {"b1/teacher0", "b2/teacher1", "b2/student"} <= set(only.read_state()["completed"])
    assert "b2/replay_candidates" not in only.read_state()["completed"]  # no student-side knowledge
    text = report.read_text()
    assert "kd-only" in text and "kd-once" in text and KD_METHODS["kd-once"][0] in text
    served = [r for r in only.read_metrics() if r["kind"] == "test" and r["model"] == "served" and r["k"] == 2]
    assert len(served) == 3


def test_distillation_from_the_served_student_starts_from_its_weights(stream_dir):
    from ccdrec.data.stream import load_stream
    from ccdrec.models.registry import build_model
    from ccdrec.pipeline.stages.generation import generate_student

    stream = load_stream(str(stream_dir))
    b = stream[1]
    cfg = load_config(
        str(stream_dir), preset="quick", overrides=[*OVERRIDES, "student.distill.lr=1e-9", "student.distill.epochs=1"]
    )
    torch.manual_seed(5)
    served = build_model("lightgcn", b.n_users, b.n_items, dim=cfg.student.model.dim)
    served.set_graph(b.train_matrix)
    top_u = torch.full((b.n_users, 3), -1, dtype=torch.long).numpy()
    top_i = torch.full((b.n_items, 3), -1, dtype=torch.long).numpy()
    top_u[:, 0] = 0
    top_i[:, 0] = 0
    warm = generate_student(top_u, top_i, b, cfg, 1, "cpu", start=served).model
    cold = generate_student(top_u, top_i, b, cfg, 1, "cpu").model
    assert torch.allclose(warm.user_emb, served.user_emb, atol=1e-5)  # a learning rate of 1e-9 barely moves it
    assert not torch.allclose(cold.user_emb, served.user_emb, atol=1e-3)
    assert served.user_emb.requires_grad and warm is not served
    small = build_model("lightgcn", stream[0].n_users, stream[0].n_items, dim=cfg.student.model.dim)
    with pytest.raises(ValueError, match="universe"):
        generate_student(top_u, top_i, b, cfg, 1, "cpu", start=small)


def test_sweep_over_seeds_and_cadences_shares_block_zero_per_seed_and_resumes(stream_dir, tmp_path):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    out = tmp_path / "sweep"
    report = run_sweep(cfg, out, ["ccd", "finetune"], [], seeds=[0, 1], cadences=[1, 2], progress=False)
    plan = json.loads((out / SWEEP_FILE).read_text())
    assert plan["seeds"] == [0, 1] and plan["cadences"] == [1, 2]
    cells = sorted(p.name for p in out.iterdir() if p.name.startswith("seed-"))
    assert cells == ["seed-0-every-1", "seed-0-every-2", "seed-1-every-1", "seed-1-every-2"]
    # cadence 2 links the block 0 of cadence 1 (same seed); seed 1 trains its own
    shared = RunDir(out / "seed-0-every-2" / "ccd").read_state().get("shared", {})
    assert "b0/teacher0" in shared and "b0/student" in shared
    assert not RunDir(out / "seed-1-every-1" / "ccd").read_state().get("shared")
    a = (out / "seed-0-every-1" / "ccd" / "checkpoints" / "b0_teacher0.pt").stat()
    b = (out / "seed-0-every-2" / "ccd" / "checkpoints" / "b0_teacher0.pt").stat()
    assert a.st_ino == b.st_ino  # a hard link, not a copy
    m2 = RunDir(out / "seed-0-every-2" / "ccd").read_state()["completed"]
    assert "b1/teacher0" not in m2 and "b2/teacher0" in m2
    e0 = [r for r in RunDir(out / "seed-0-every-1" / "ccd").read_metrics() if r["kind"] == "test" and r["k"] == 0]
    e1 = [r for r in RunDir(out / "seed-1-every-1" / "ccd").read_metrics() if r["kind"] == "test" and r["k"] == 0]
    assert [r["recall@20"] for r in e0] != [r["recall@20"] for r in e1]  # another seed, other block-0 models
    text = report.read_text()
    for part in ("over 2 seed(s)", "paired gain over finetune", "Retention of ccd", "teacher compute (s)", "plots/cadence.png"):
        assert part in text, part
    # the cost table: teacher cycles counted as integers (2 blocks: 2 cycles every cycle, 1 every 2), never 2.0000
    cost = text.split("## Cost of a cycle")[1]
    cycles = [line.split("|")[7].strip() for line in cost.splitlines() if line.startswith("| ccd ")]
    assert cycles == ["2", "1"], cost
    assert (out / "plots" / "cadence.png").stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    run_sweep(None, out, resume=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == before  # nothing trained again
    with pytest.raises(CcdrecError, match="not a sweep"):
        run_sweep(None, out / "seed-0-every-1", resume=True, progress=False)
    with pytest.raises(CcdrecError, match=r"a sweep directory exists there; continue it with ccdrec compare --resume "):
        run_sweep(cfg, out, seeds=[0], progress=False)


def test_sweep_resume_takes_every_cell_on_and_cli_mistakes_are_one_line(stream_dir, tmp_path):
    from typer.testing import CliRunner

    from ccdrec.cli import app

    cfg = load_config(str(stream_dir), preset="quick", overrides=[*OVERRIDES, "max_blocks=1"])
    out = tmp_path / "sw"
    run_sweep(cfg, out, ["ccd", "kd-once"], [], cadences=[1, 5], progress=False)
    assert max(r["k"] for r in RunDir(out / "seed-0-every-5" / "ccd").read_metrics()) == 1
    with pytest.raises(CcdrecError, match="must be at least 1"):
        run_sweep(None, out, resume=True, progress=False, max_blocks=0)
    run_sweep(None, out, resume=True, progress=False, max_blocks=2)
    for cell in ("seed-0-every-1", "seed-0-every-5"):
        for run in ("ccd", "kd-once"):
            assert max(r["k"] for r in RunDir(out / cell / run).read_metrics()) == 2, (cell, run)
    with pytest.raises(CcdrecError, match="a sweep over seeds and cadences directory, not a run directory"):
        RunDir.open(out)
    cell = out / "seed-0-every-1"
    for kwargs, change in (({"max_blocks": 3}, "--max-blocks 3"), ({"methods": ["finetune"]}, "--methods finetune")):
        expected = f"{cell} is a part of the sweep {out}: {change} is made to the whole sweep"
        with pytest.raises(CcdrecError, match=re.escape(expected)):
            run_compare(None, cell, resume=True, progress=False, **kwargs)
    with pytest.raises(CcdrecError, match=re.escape(f"ccdrec compare --resume {out} --max-blocks 3")):
        run_stream(None, cell / "ccd", resume=True, progress=False, max_blocks=3)
    assert json.loads((cell / "compare.json").read_text())["methods"] == ["ccd", "kd-once"]
    with pytest.raises(CcdrecError, match="--max-blocks must be at least 2"):  # not a command that fails as well
        run_compare(None, cell, resume=True, progress=False, max_blocks=1)
    run_compare(None, cell, resume=True, progress=False, methods=["ccd"], max_blocks=2, bench=False)  # no change: goes on
    runner = CliRunner()
    for args, needle in (
        (["--seed", "3", "--seeds", "0,1"], "--seed and --seeds"),
        (["--seeds", "0", "--from-run", str(out / "seed-0-every-1" / "ccd")], "--from-run starts a single comparison"),
        (["--cadences", "0"], "at least 1"),
        (["--seeds", "0", "--bench"], "--bench: a sweep (--seeds, --cadences) does not measure serving cost"),
    ):
        res = runner.invoke(app, ["compare", "--data", str(stream_dir), "--out", str(tmp_path / "x"), *args])
        assert res.exit_code != 0 and needle in res.output + str(res.exception), (args, res.output)
    assert not (tmp_path / "x").exists()


def test_the_report_says_where_the_competitors_start():
    from ccdrec.pipeline.compare import start_note

    cfg = load_config("gowalla")
    assert start_note(cfg, ["ccd", "finetune"]) is None  # the default: every method from the same block 0
    plain = load_config("gowalla", overrides=["competitors.start=plain", "competitors.vae_kl=false"])
    note = start_note(plain, ["ccd", "finetune"])
    assert "trained by BPR alone on block 0" in note and "without CCD's KL regulariser" in note
    assert start_note(plain, ["ccd", "kd-only"]) is None  # no competitor takes part
