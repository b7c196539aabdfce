"""The whole CCD stream on the synthetic stream: runs, reports, resumes to identical metrics, serves."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import suppress

import numpy as np
import pytest
import torch

from ccdrec import CcdrecError, load_run
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.pipeline.ccd import run_stream
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.staged import StopRequested
from ccdrec.presets import load_config
from ccdrec.report import tables

OVERRIDES = [
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: vae, dim: 16, seed: 1}]",
]


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream") / "synthetic"
    save_stream(synthetic_stream(n_blocks=3, seed=1), d)
    return d


@pytest.fixture(scope="module")
def full_run(stream_dir, tmp_path_factory):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    out = tmp_path_factory.mktemp("runs") / "full"
    run_stream(cfg, out, progress=False)
    return cfg, out


def metric_lines(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def test_run_writes_every_evaluation_and_report(full_run):
    cfg, out = full_run
    rows = metric_lines(out)
    for model in ("teacher", "student"):
        got = {(r["k"], r["j"]) for r in rows if r["kind"] == "test" and r["model"] == model}
        assert got == {(k, j) for k in range(3) for j in range(k + 1)}
    served = {(r["k"], r["j"]) for r in rows if r["kind"] == "test" and r["model"] == "served"}
    assert served == {(k, j) for k in (1, 2) for j in range(k + 1)}
    assert {r["k"] for r in rows if r["kind"] == "new_users"} == {1, 2}
    report = (out / "report.md").read_text()
    assert "r_(k,j)" in report and (out / "plots" / "h_per_block.png").stat().st_size > 1000
    assert "The served student is D_k after each teacher cycle" in report and "student.serve: distilled" in report
    state = json.loads((out / "state.json").read_text())
    if sys.platform.startswith("linux"):  # every stage's own peak RSS: at least the interpreter with torch loaded
        assert set(state["peak_rss_mb"]) == set(state["completed"]) and min(state["peak_rss_mb"].values()) > 50
        assert "peak RSS (MB)" in report
    summary = tables.summary(rows)
    assert set(summary.index) == {"teacher", "student", "served", "updated"}
    # student.serve = distilled: after a teacher cycle D_k is served (scored once, under both names), and the
    # student cycle's CL_k is reported beside it; the run's served pointer names D_k
    scores = {(r["model"], r["kind"], r["k"], r["j"]): r["recall@20"] for r in rows if r["kind"] in ("test", "valid")}
    for (model, kind, k, j), v in scores.items():
        if model == "served":
            assert v == scores[("student", kind, k, j)]
    assert any(v != scores[("served", kind, k, j)] for (m, kind, k, j), v in scores.items() if m == "updated")
    assert state["pointers"]["served"] == state["pointers"]["student"] == "b2_student"
    assert state["pointers"]["updated"] == "b2_updated"
    # the served student is far above random on the block it was trained on
    la = [r["recall@20"] for r in rows if r["kind"] == "test" and r["model"] == "served" and r["j"] == r["k"]]
    assert min(la) > 3 * 20 / 160


def test_resume_after_interruption_gives_identical_metrics(full_run, stream_dir, tmp_path):
    cfg, out = full_run
    part = tmp_path / "part"
    with pytest.raises(StopRequested):
        run_stream(cfg, part, progress=False, stop_after="b1/teacher0")
    # a kill in the middle of the next stage leaves a torn metrics line and a stray checkpoint
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"stage": "b1/teacher1", "kind": "fit", "mod')
    run_stream(None, part, resume=True, progress=False)
    assert metric_lines(part) == metric_lines(out)


def test_a_finished_run_goes_on_to_later_blocks(full_run, tmp_path):
    cfg, out = full_run
    short = tmp_path / "short"
    run_stream(cfg.model_copy(update={"max_blocks": 1}), short, progress=False)
    assert max(r["k"] for r in metric_lines(short)) == 1
    with pytest.raises(CcdrecError, match="has run through block 1; --max-blocks must be at least 1"):
        RunDir(short).set_max_blocks(0)
    assert RunDir(short).set_max_blocks(2).max_blocks == RunDir(short).load_config().max_blocks == 2
    run_stream(None, short, resume=True, progress=False)
    assert metric_lines(short) == metric_lines(out)  # as if it had been started with every block


def test_teacher_members_in_worker_processes_give_the_same_metrics(full_run, tmp_path):
    cfg, out = full_run
    par = tmp_path / "par"
    torch.set_num_threads(2)  # two worker processes need two threads: with one, they are capped at one (next test)
    try:
        run_stream(cfg, par, progress=False, workers=2)
    finally:
        torch.set_num_threads(1)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731 - member stages may finish in any order
    assert sorted(metric_lines(par), key=key) == sorted(metric_lines(out), key=key)
    state = json.loads((par / "state.json").read_text())
    assert {"b1/teacher0", "b1/teacher1", "b2/eval"} <= set(state["completed"])
    if sys.platform.startswith("linux"):  # measured in the worker that ran the stage, too
        assert set(state["peak_rss_mb"]) == set(state["completed"])
    with pytest.raises(CcdrecError, match="workers"):
        run_stream(None, par, resume=True, progress=False, workers=0)


def test_workers_fall_back_to_one_process_for_a_script_read_from_stdin(full_run, tmp_path):
    cfg, out = full_run
    (tmp_path / "config.json").write_text(cfg.model_copy(update={"max_blocks": 1}).model_dump_json())
    script = (
        "from pathlib import Path\n"
        "from ccdrec.config import RunConfig\n"
        "from ccdrec.pipeline.ccd import run_stream\n"
        f"cfg = RunConfig.model_validate_json(Path({str(tmp_path / 'config.json')!r}).read_text())\n"
        f"run_stream(cfg, Path({str(tmp_path / 'run')!r}), progress=True, workers=2)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "one process: workers cannot re-import a program read from stdin" in " ".join(res.stdout.split())
    assert metric_lines(tmp_path / "run") == [r for r in metric_lines(out) if r["k"] <= 1]


def test_shared_teacher_replay_candidates_change_nothing(full_run):
    import torch

    from ccdrec.pipeline.ccd import CCDStream
    from ccdrec.pipeline.stages.teacher_update import teacher_candidates, update_teacher

    _, out = full_run
    run = CCDStream.open_worker(out)
    run.restore()
    state = run.state
    block, prev = run.stream[2], run.stream[1]
    cands = teacher_candidates(*state.proxies, state.served, block, prev, run.cfg, "cpu")
    assert set(cands) == {"stability", "student"}  # the default budgets: n_S = n_C = 5, n_P = 0
    for member in state.members:
        a, b = (
            update_teacher(member, *state.proxies, state.served, block, prev, run.cfg, 3, candidates=c).model
            for c in (None, cands)
        )
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name


def test_resume_rejects_a_corrupt_run_directory(full_run, tmp_path):
    _, out = full_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "state.json").write_text("{not json")
    with pytest.raises(CcdrecError, match="state.json"):
        run_stream(None, broken, resume=True, progress=False)
    with pytest.raises(CcdrecError, match="no such run directory"):
        run_stream(None, tmp_path / "missing", resume=True, progress=False)


def test_new_run_refuses_a_non_empty_directory_and_says_what_it_is(full_run, stream_dir, tmp_path):
    cfg, out = full_run
    with pytest.raises(
        CcdrecError,
        match=r"a run directory exists there; continue it with ccdrec run --resume .*, or give --out a new directory$",
    ):
        run_stream(cfg, out, progress=False)
    # --resume would not help with a stream directory, or a directory of other files
    with pytest.raises(CcdrecError, match="a stream directory, not a place for a new run directory; give --out a new directory$"):
        run_stream(cfg, stream_dir, progress=False)
    cmp = tmp_path / "cmp 1"  # a run of a comparison goes on with the comparison (its runs stay at one block)
    (cmp / "ccd").mkdir(parents=True)
    (cmp / "compare.json").write_text("{}")
    (cmp / "ccd" / "state.json").write_text("{}")
    with pytest.raises(
        CcdrecError, match=r"a run of the comparison .*cmp 1 exists there; continue it with ccdrec compare --resume '.*cmp 1'"
    ):
        run_stream(cfg, cmp / "ccd", progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CcdrecError, match=r"exists and is not empty \(not ccdrec's; give --out a new or empty directory\)$"):
        run_stream(cfg, tmp_path, progress=False)


def test_recommend_serves_unseen_items_in_original_ids(full_run, stream_dir):
    _, out = full_run
    served = load_run(out)
    recs = served.recommend("3", k=10)
    assert len(recs) == 10
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    stream = served.stream
    seen = {int(i) for b in stream.blocks for s in ("train", "valid", "test") for u, i in b.split(s) if u == 3}
    assert not seen & {int(r.item) for r in recs}
    with pytest.raises(CcdrecError, match="unknown user"):
        served.recommend("no-such-user")
    assert served.recommend(" 3 ", k=10) == recs  # spaces around an ID that is not itself spaced are ignored


def test_same_seed_same_metrics(full_run, tmp_path):
    cfg, out = full_run
    cfg2 = cfg.model_copy(update={"max_blocks": 1})
    run_stream(cfg2, tmp_path / "again", progress=False)
    again = metric_lines(tmp_path / "again")
    first = [r for r in metric_lines(out) if int(r["stage"].split("/")[0][1:]) <= 1]
    assert again == first
    assert np.isfinite([r["recall@20"] for r in again if r["kind"] == "test"]).all()


def test_student_update_negatives_avoid_the_saved_teacher_lists(full_run, stream_dir):
    from ccdrec.data.stream import load_stream
    from ccdrec.pipeline.ccd import CCDStream
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.pipeline.stages.avoid import avoid_lists
    from ccdrec.pipeline.stages.generation import teacher_lists
    from ccdrec.pipeline.stages.student_update import teacher_top

    cfg, out = full_run
    stream = load_stream(str(stream_dir))
    run = CCDStream(cfg, RunDir(out), stream, progress=False)
    run.restore()  # the final state: E_2, D_2 and the b2 lists
    saved = teacher_top(run.ctx, run.state, 2)
    assert saved is not None and teacher_top(run.ctx, run.state, 1) is None  # only the latest block's lists
    fresh, _ = teacher_lists(run.state.ensemble(cfg), stream[2], cfg.student.topn)
    np.testing.assert_array_equal(saved, fresh)
    # as block 3's negatives would: every old user's saved top items are avoided
    b = stream[2]
    avoid = avoid_lists(run.ctx, [], b, (b.n_users, b.n_items), [saved])
    rows, cols = np.nonzero(saved[: b.prev_users] >= 0)
    assert np.all(avoid[rows, saved[rows, cols]] == 1)
    assert avoid[b.prev_users :].nnz == 0  # new users are not old users


@pytest.mark.parametrize(("stage", "model"), [("distill", "student"), ("student", "updated")])
def test_stage_replay_benchmark_reproduces_the_runs_validation_recall(full_run, stage, model):
    """benchmarks/teacher_replay.py rebuilds block 1's D_1 / CL_1 from the run's checkpoints."""
    _, out = full_run
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "teacher_replay.py")
    res = subprocess.run(
        [sys.executable, script, str(out), "--block", "1", "--stage", stage], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    printed = dict(line.split(": ") for line in res.stdout.splitlines())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (want,) = [r["recall@20"] for r in rows if r["kind"] == "valid" and r["model"] == model and r["k"] == r["j"] == 1]
    assert float(printed["valid_recall@20[b1]"]) == pytest.approx(want, abs=1e-4)
    assert float(printed["LA"]) == pytest.approx(want, abs=1e-4) and 0 < float(printed["RA"]) <= 1


def test_sigterm_stops_a_run_that_resumes_to_the_same_metrics(full_run, stream_dir, tmp_path):
    import signal
    import time

    _, out = full_run
    part = tmp_path / "part"
    cmd = [sys.executable, "-m", "ccdrec", "run", "--data", str(stream_dir), "--preset", "quick", "--out", str(part)]
    cmd += [a for o in OVERRIDES for a in ("--set", o)] + ["--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        state = part / "state.json"
        if state.exists() and len(json.loads(state.read_text())["completed"]) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # 143, as a shell reports a SIGTERM
    assert f"continue with: ccdrec run --resume {part} --threads 1 --no-progress\n" in err and "Traceback" not in err
    done = json.loads((part / "state.json").read_text())["completed"]
    assert 2 <= len(done) < len(json.loads((out / "state.json").read_text())["completed"])
    run_stream(None, part, resume=True, progress=False)
    assert metric_lines(part) == metric_lines(out)


def test_the_stages_see_the_pointers_of_stages_completed_after_a_restore(full_run, tmp_path):
    """A stage reads what earlier stages of the same process wrote (E_k's saved top lists, the shared
    replay candidates): the run state's pointers are the executor's live ones, not a copy."""
    from ccdrec.pipeline.ccd import CCDStream
    from ccdrec.pipeline.context import StageOutput

    _, out = full_run
    shutil.copytree(out, tmp_path / "run")
    run = CCDStream.open_worker(tmp_path / "run")
    run.restore()
    run.complete("b2/later", StageOutput({"teacher_top": "b3_teacher_top"}), 0.0)
    assert run.state.pointer("teacher_top", "b3_teacher_top") == "b3_teacher_top"


def test_student_cycles_between_teacher_cycles(stream_dir, tmp_path):
    """teacher.update_every = 2 on blocks 1..2 of a 3-block stream: block 1 is a student cycle (CL_1 is
    served and handed on, the ensemble is E_0's), block 2 a teacher cycle whose members learn blocks 1-2."""
    from ccdrec.data.stream import load_stream
    from ccdrec.pipeline.ccd import CCDStream

    overrides = [*OVERRIDES, "teacher.update_every=2", "student.avoid_top=5"]  # E's saved lists are long enough
    cfg = load_config(str(stream_dir), preset="quick", overrides=overrides)
    out = tmp_path / "m2"
    run_stream(cfg, out, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert [s for s in state["completed"] if s.startswith("b1/")] == ["b1/student_update", "b1/eval"]
    assert {"b2/teacher0", "b2/teacher1", "b2/replay_candidates", "b2/student"} <= set(state["completed"])
    assert state["outputs"]["b1/student_update"]["student"] == "b1_updated"  # CL_1 starts block 2
    rows = metric_lines(out)
    models_1 = {r["model"] for r in rows if r["kind"] == "test" and r["k"] == 1}
    assert models_1 == {"teacher", "served"}  # no new D_1 between teacher cycles
    # the ensemble evaluated after block 1 is E_0's members, grown to block 1's universe untrained
    from ccdrec.pipeline.context import RunState
    from ccdrec.pipeline.stages.evaluation import evaluate_models

    stream = load_stream(str(stream_dir))
    run = CCDStream.open_worker(out)
    e0 = RunState([run.ctx.load(f"b0_teacher{m}") for m in range(2)])
    again = evaluate_models({"teacher": e0.ensemble(cfg, stream[1])}, stream, 1, tuple(cfg.ks))
    logged = [r for r in rows if r["stage"] == "b1/eval" and r["model"] == "teacher"]
    assert [{k: v for k, v in r.items() if k != "stage"} for r in logged] == again
    meta = json.loads((out / "checkpoints" / "b2_teacher0.json").read_text())["meta"]
    assert meta["first"] == 1  # trained on the span of blocks 1-2
    span = stream.span(1, 2)
    assert len(span.train) > len(stream[2].train) and span.prev_users == stream[0].n_users
    # resumed after the student cycle: the same metrics
    part = tmp_path / "part"
    with pytest.raises(StopRequested):
        run_stream(cfg, part, progress=False, stop_after="b1/eval")
    # block 2's student update avoids E's lists as last distilled (block 0): E has not changed since, and
    # the ensemble is not ranked again
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.pipeline.stages.student_update import student_avoid, teacher_top

    run = CCDStream(cfg, RunDir(part), stream, progress=False)
    run.restore()
    top = teacher_top(run.ctx, run.state, cfg.teacher.last_cycle(1))
    assert top is not None and top.shape[0] == stream[0].n_users
    ranked = []
    real = RunState.ensemble
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunState, "ensemble", lambda self, *a, **kw: ranked.append(1) or real(self, *a, **kw))
        avoid = student_avoid(run.ctx, run.state, 2, top)
    assert not ranked and avoid.shape == (stream[1].n_users, stream[1].n_items)
    for u in (0, top.shape[0] - 1):
        assert set(top[u, : cfg.student.avoid_top]) <= set(avoid[u].indices)
    del run
    run_stream(None, part, resume=True, progress=False)
    assert metric_lines(part) == metric_lines(out)


def test_teacher_update_negatives_avoid_the_teacher_and_student_side_lists(stream_dir, tmp_path, monkeypatch):
    """``teacher.avoid_top = N``: a BPR member's update samples no negative among old users' top-N items of
    the ensemble as last distilled, of SP, PP and CL_k; off by default."""
    from ccdrec.data.stream import load_stream
    from ccdrec.pipeline.ccd import CCDStream
    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.pipeline.staged import StopRequested
    from ccdrec.pipeline.stages import teacher_update as tu
    from ccdrec.pipeline.stages.avoid import avoid_top
    from ccdrec.pipeline.stages.student_update import teacher_top

    n = 5
    cfg = load_config(str(stream_dir), preset="quick", overrides=[*OVERRIDES, f"teacher.avoid_top={n}"])
    out = tmp_path / "run"
    with suppress(StopRequested):
        run_stream(cfg, out, progress=False, stop_after="b1/replay_candidates")
    stream = load_stream(str(stream_dir))
    run = CCDStream(cfg, RunDir(out), stream, progress=False)
    run.restore()  # after block 1's student update: SP, PP, CL_1 and E_0's saved lists
    avoid = tu.teacher_avoid(run.ctx, run.state, 1).tocsr()
    b, prev = stream[1], stream[0]
    shape = (b.n_users, b.n_items)
    assert avoid.shape == shape and avoid[b.prev_users :].nnz == 0  # old users only
    lists = teacher_top(run.ctx, run.state, 0)[: b.prev_users, :n]
    rows, cols = np.nonzero(lists >= 0)
    assert np.all(avoid[rows, lists[rows, cols]] == 1)
    users = np.arange(b.prev_users)
    scorers = [p.scorer(n_items=b.n_items) for p in run.state.proxies] + [run.state.served.scorer()]
    observed = tu.past_train(b, prev)
    side = avoid_top(scorers, shape, observed, n, users, "cpu")
    assert (side - side.multiply(avoid)).nnz == 0  # every student-side top item is avoided

    # the BPR member is updated with exactly these negatives avoided; the Mult-VAE member samples none
    passed = {}
    real_fit = tu.fit

    def spy(model, block, cfg_, **kw):
        passed[type(model).__name__] = kw.get("avoid")
        return real_fit(model, block, cfg_, **kw)

    monkeypatch.setattr(tu, "fit", spy)
    with suppress(StopRequested):
        run_stream(None, out, resume=True, progress=False, stop_after="b1/teacher1")
    assert (passed["LightGCN"] != avoid).nnz == 0 and passed["MultVAE"] is None
    off = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    assert off.teacher.avoid_top == 0
    assert tu.teacher_avoid(CCDStream(off, RunDir(out), stream, progress=False).ctx, None, 1) is None


def test_a_fresh_process_warm_up_is_not_a_stage_time(monkeypatch):
    """A stage's seconds exclude a new process's one-off start-up (an optimiser's first import of
    torch._dynamo): the stage-cost tables of a resumed run, a worker or a Ray task stay comparable."""
    import time

    from ccdrec.pipeline import staged

    staged.warm_up()  # this process's own one-off costs, paid as a stage would pay them
    monkeypatch.setattr(staged, "warm_up", lambda: time.sleep(0.3))
    _, seconds, _ = staged.run_measured(lambda: {})
    assert seconds < 0.3  # the warm-up is not inside the stage's clock
    code = (
        "import sys, time; from ccdrec.pipeline.staged import warm_up, run_measured; warm_up(); "
        "print('torch._dynamo' in sys.modules, run_measured(lambda: {})[1] < 0.2)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True True"  # a fresh process: after the warm-up, an empty stage costs nothing


def test_a_small_catalogue_that_users_half_observe_distils_finite_students(tmp_path):
    """60 users with 25 of 50 items each: a teacher list of 40 is longer than what is left to list and
    every uninteresting sample is observed or listed. Every student used to become NaN in its first
    distillation step, score 'well' in the report and recommend nothing."""
    import torch

    from ccdrec.data.prepare import prepare_stream

    rng = np.random.default_rng(0)
    picks = [(u, rng.choice(50, 25, replace=False), rng.integers(0, 10**7, 25)) for u in range(60)]
    rows = [(f"u{u}", f"i{i}", int(t)) for u, items, times in picks for i, t in zip(items, times, strict=True)]
    log = tmp_path / "log.csv"
    log.write_text("user,item,timestamp\n" + "\n".join(f"{u},{i},{1_600_000_000 + t}" for u, i, t in rows) + "\n")
    prepare_stream(log, tmp_path / "s", min_user=2, min_item=2, n_blocks=1, seed=0)
    overrides = [o for o in OVERRIDES if not o.startswith("student.topn")]
    cfg = load_config(str(tmp_path / "s"), preset="quick", overrides=overrides)
    assert cfg.student.topn == 40
    run_stream(cfg, tmp_path / "run", progress=False)
    for name in ("b0_student", "b1_updated", "b1_student"):
        weights = torch.load(tmp_path / "run" / "checkpoints" / f"{name}.pt", weights_only=True)
        assert all(bool(torch.isfinite(w).all()) for w in weights.values()), name
    recs = load_run(tmp_path / "run").recommend("u1", k=5)
    assert len(recs) == 5 and all(np.isfinite(r.score) for r in recs)
    res = subprocess.run(
        [sys.executable, "-m", "ccdrec", "recommend", str(tmp_path / "run"), "--user", "u1", "-k", "1000"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    n = len(res.stdout.splitlines())
    assert res.returncode == 0 and 0 < n < 50
    assert f"note: only {n} item(s) are left to recommend (seen and given items are not recommended), 1000 asked" in res.stderr
    # a checkpoint written by an earlier version that let the training diverge: refused, not an empty list
    path = tmp_path / "run" / "checkpoints" / f"{RunDir(tmp_path / 'run').read_state()['pointers']['served']}.pt"
    weights = torch.load(path, weights_only=True)
    torch.save({k: torch.full_like(w, float("nan")) for k, w in weights.items()}, path)
    with pytest.raises(CcdrecError, match=r"has non-finite \(NaN or infinite\) weights: its training diverged, so it cannot"):
        load_run(tmp_path / "run")
    from ccdrec.serve_bench import bench_serve

    with pytest.raises(CcdrecError, match=r"has non-finite \(NaN or infinite\) weights"):
        bench_serve(tmp_path / "run", repeats=1)


def test_held_out_pairs_prepare_set_aside_are_never_recommended(tmp_path):
    """A held-out pair whose item had no train pair in its block is set aside (left_out.json), not stored;
    it is the user's interaction all the same, so recommend must not offer it as unseen."""
    from ccdrec.data.prepare import prepare_stream

    rng = np.random.default_rng(0)
    log = [f"u{n % 150},i{x},{1_600_000_000 + 3600 * n}" for n, x in enumerate(rng.integers(0, 120, 1200))]
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + "\n".join(log) + "\n")
    prepare_stream(tmp_path / "log.csv", tmp_path / "s", min_user=2, min_item=2, n_blocks=2)
    aside = json.loads((tmp_path / "s" / "left_out.json").read_text())["pairs"]
    assert aside
    run_stream(load_config(str(tmp_path / "s"), preset="quick", overrides=OVERRIDES), tmp_path / "run", progress=False)
    served = load_run(tmp_path / "run")
    offered = {u: {r.item for r in served.recommend(u, k=200)} for u in {u for u, _ in aside}}
    assert not any(i in offered[u] for u, i in aside)
    for ask in (lambda: served.recommend("y" * 100_000), lambda: served.recommend_for_items(["x" * 100_000] * 3)):
        with pytest.raises(CcdrecError) as exc:  # an unknown ID of any length is shown cut, not echoed whole
            ask()
        assert len(str(exc.value)) < 300
