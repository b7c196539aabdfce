"""Faults users meet around runs: empty evaluation targets, configured cut-offs, run directories that
depend on the working directory, a local directory named like a bundled dataset, a stream changed
under a run, a dead worker process, and failed starts or kills that leave files behind."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ccdrec import CcdrecError, load_run
from ccdrec.data.stream import Block, Stream, load_stream, save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.eval.metrics import rank_metrics
from ccdrec.eval.protocol import StreamScores
from ccdrec.pipeline.ccd import run_stream
from ccdrec.presets import load_config
from ccdrec.report import tables

MEMBERS = "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: mf, dim: 16, seed: 1}]"
SMALL = ["student.topn=10", "student.user_samples=50", "student.item_samples=50", MEMBERS]


def ccdrec(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ccdrec", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_error_line(res, code=2):
    assert res.returncode == code, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def files_of(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# --- empty evaluation targets are missing, not 0 ----------------------------------------------


def test_a_metric_over_no_users_is_missing():
    import scipy.sparse as sp

    empty = sp.csr_matrix((3, 4), dtype=np.float32)
    res = rank_metrics(lambda users: np.zeros((len(users), 4)), empty, None, 4)
    assert res["users"] == 0 and res["recall@20"] is None and res["ndcg@50"] is None


def test_missing_values_are_left_out_of_every_mean():
    s = StreamScores()
    for (k, j), v in {(0, 0): 0.4, (1, 0): 0.2, (1, 1): 0.3, (2, 0): 0.1, (2, 1): None, (2, 2): float("nan")}.items():
        s.add(k, j, v)
    assert math.isnan(s.la(2)) and s.ra(2) == pytest.approx(0.1) and math.isnan(s.h(2))
    summ = s.summary()
    assert summ["LA"] == pytest.approx(0.3)  # LA_2 is missing: the mean of LA_1 alone
    assert summ["RA"] == pytest.approx((0.2 + 0.1) / 2)
    assert summ["H"] == pytest.approx(2 * 0.3 * 0.15 / 0.45)


def no_targets_in_last_block(seed: int = 1) -> Stream:
    """A 3-block synthetic stream whose last block has no valid or test pairs and no new users."""
    s = synthetic_stream(n_blocks=3, seed=seed)
    last, prev = s.blocks[2], s.blocks[1]
    old = last.train[(last.train[:, 0] < prev.n_users) & (last.train[:, 1] < prev.n_items)]
    empty = np.zeros((0, 2), dtype=np.int64)
    s.blocks[2] = Block(2, prev.n_users, prev.n_items, prev.n_users, prev.n_items, old, empty, empty)
    return s


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """A run with cut-off 10 only, on a stream whose last block has nothing to evaluate."""
    d = tmp_path_factory.mktemp("empty")
    save_stream(no_targets_in_last_block(), d / "stream")
    tens = [f"{s}.select_metric=recall@10" for s in ("teacher.base", "teacher.update", "student.distill", "student.update")]
    cfg = load_config(d / "stream", preset="quick", overrides=[*SMALL, "ks=[10]", *tens])
    run_stream(cfg, d / "run", progress=False)
    return d / "run"


def test_empty_targets_are_missing_in_metrics_and_reports(sparse_run):
    rows = [json.loads(x) for x in (sparse_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] in ("test", "new_users", "valid") and r["k"] == 2 and r.get("j", 2) == 2]
    assert last and all(r["users"] == 0 and r["recall@10"] is None and r["ndcg@10"] is None for r in last)
    for model in ("teacher", "served"):
        s = tables.stream_scores(rows, model, "recall@10")
        la1 = s.la(1)
        assert tables.summary(rows, ("recall@10",)).loc[model, "LA recall@10"] == pytest.approx(la1)  # LA_2 left out
        assert s.ra(2) == pytest.approx((s.r[(2, 0)] + s.r[(2, 1)]) / 2)
    # the distillation of block 2 had no validation users: it keeps its last epoch instead of failing
    fit = [r for r in rows if r["kind"] == "fit" and r["stage"] == "b2/student"]
    assert fit[0]["best_epoch"] == fit[0]["epochs"]
    report = (sparse_run / "report.md").read_text()
    assert "—" in report and "recall@10" in report and "recall@20" not in report and "nan" not in report.lower()


def test_blocks_not_yet_seen_are_blank_in_tables():
    rows = [
        {"kind": "test", "model": "m", "k": 0, "j": 0, "recall@20": 0.5, "users": 3},
        {"kind": "test", "model": "m", "k": 1, "j": 0, "recall@20": 0.4, "users": 3},
        {"kind": "test", "model": "m", "k": 1, "j": 1, "recall@20": None, "users": 0},
    ]
    text = tables.as_text(tables.rkj_table(rows, "m"))
    assert text.loc["after D_0"].tolist() == ["0.5000", ""]
    assert text.loc["after D_1"].tolist() == ["0.4000", "—"]


def test_plots_label_blocks_with_integers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ccdrec.report.markdown import integer_blocks

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [0.1, 0.2, 0.3])
    integer_blocks(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


# --- cut-offs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("ks=[10]", "teacher.base.select_metric, teacher.update.select_metric (recall@20) not among the cut-offs ks=[10]"),
        ("ks=[0]", "every cut-off must be at least 1"),
        ("ks=[]", "at least 1 item"),
        ("ks=[20, 20]", "cut-offs must differ"),
        ("student.update.select_metric=precision@5", "student.update.select_metric"),
    ],
)
def test_cut_offs_are_checked_before_any_work(override, message, tmp_path):
    with pytest.raises(CcdrecError, match="invalid configuration"):
        load_config("yelp", overrides=[override])
    res = ccdrec("run", "--dataset", "yelp", "--set", override, "--out", str(tmp_path / "r"))
    assert message in one_error_line(res)
    assert not (tmp_path / "r").exists()


# --- run directories: any working directory, the stream's identity, failed starts ----------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A CLI run to block 0 on a stream given by a relative path, started in ``root/a``."""
    root = tmp_path_factory.mktemp("cwd")
    (root / "a" / "streams").mkdir(parents=True)
    (root / "b").mkdir()
    save_stream(synthetic_stream(n_blocks=3, seed=2), root / "a" / "streams" / "base")
    args = ["run", "--data", "streams/base", "--out", "runs/x", "--preset", "quick", "--max-blocks", "0", "--no-progress"]
    for item in SMALL:
        args += ["--set", item]
    res = ccdrec(*args, cwd=root / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("run directory: runs/x\n")  # named once created, before any training
    return root


def test_a_run_works_from_any_working_directory(cli_run):
    run = cli_run / "a" / "runs" / "x"
    rec = ccdrec("recommend", str(run), "--user", "0", "-k", "5", cwd=cli_run / "b")
    assert rec.returncode == 0, rec.stderr
    assert len(rec.stdout.strip().splitlines()) == 5
    assert json.loads((run / "stream.json").read_text())["source"] == str(cli_run / "a" / "streams" / "base")


def test_a_run_that_stops_before_its_streams_end_says_how_to_go_on(cli_run, tmp_path):
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)  # --max-blocks 0 on a stream of blocks 0..2
    res = ccdrec("run", "--resume", str(run), "--no-progress", cwd=cli_run / "b")
    assert res.returncode == 0, res.stderr[-2000:]
    hint = (
        f"note: the run stops at block 0 (--max-blocks) and its stream has blocks 0..2; ccdrec run --resume {run} --max-blocks 2"
    )
    assert hint in " ".join(res.stdout.split())


def test_a_comparison_that_stops_before_its_streams_end_says_how_to_go_on(cli_run, tmp_path):
    out = tmp_path / "cmp x"
    args = ["compare", "--data", str(cli_run / "a" / "streams" / "base"), "--methods", "ccd,finetune", "--out", str(out)]
    args += ["--preset", "quick", "--max-blocks", "0", "--no-bench", "--no-progress", "--threads", "1"]
    for item in SMALL:
        args += ["--set", item]
    res = ccdrec(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    hint = "note: the comparison stops at block 0 (--max-blocks) and its stream has blocks 0..2; "
    hint += f"ccdrec compare --resume '{out}' --max-blocks 2"
    assert hint in " ".join(res.stdout.split())


def test_a_moved_stream_is_named_with_the_line_that_points_the_run_at_its_new_place(cli_run, tmp_path):
    """It used to say "no stream directory '...' (bundled datasets: yelp, gowalla)", nothing about the run
    or how to point it at the stream's new place."""
    import shutil

    run, moved = tmp_path / "x", tmp_path / "moved"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    shutil.copytree(cli_run / "a" / "streams" / "base", moved)
    config = run / "config.yaml"
    old = str(cli_run / "a" / "streams" / "base")
    config.write_text(config.read_text().replace(old, str(tmp_path / "gone")))  # as if the stream had moved
    for args in (["recommend", str(run), "--user", "0"], ["run", "--resume", str(run), "--max-blocks", "1"]):
        line = one_error_line(ccdrec(*args, cwd=cli_run / "b"))
        assert f"its stream directory {tmp_path / 'gone'} (`dataset:` in {config}) is not there (moved or removed)" in line
        assert "write its new absolute path there" in line
    config.write_text(config.read_text().replace(str(tmp_path / "gone"), str(moved)))  # what the message says to do
    rec = ccdrec("recommend", str(run), "--user", "0", "-k", "5", cwd=cli_run / "b")
    assert rec.returncode == 0, rec.stderr
    assert json.loads((run / "stream.json").read_text())["source"] == str(moved)  # the record follows it
    other = tmp_path / "other"
    save_stream(synthetic_stream(n_blocks=3, seed=5), other)  # another stream is not taken for it
    config.write_text(config.read_text().replace(str(moved), str(other)))
    assert "has changed since the run started" in one_error_line(ccdrec("recommend", str(run), "--user", "0"))
    config.write_text(config.read_text().replace(str(other), "moved"))  # relative: read from where?
    assert "must be an absolute path" in one_error_line(ccdrec("recommend", str(run), "--user", "0", cwd=tmp_path))
    (tmp_path / "afile").write_text("x")
    config.write_text(config.read_text().replace("dataset: moved", f"dataset: {tmp_path / 'afile'}"))
    assert (
        "(`dataset:` in" in (line := one_error_line(ccdrec("recommend", str(run), "--user", "0")))
        and "is a file, not a directory" in line
    )
    config.write_text(config.read_text().replace(f"dataset: {tmp_path / 'afile'}", "dataset: ''"))
    assert f"`dataset:` in {config} is empty" in one_error_line(ccdrec("recommend", str(run), "--user", "0"))


def test_a_changed_stream_is_refused_and_nothing_changes(cli_run, tmp_path):
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    stream = cli_run / "a" / "streams" / "base"
    before = files_of(run)
    original = {p.name: p.read_bytes() for p in stream.iterdir()}
    try:
        save_stream(synthetic_stream(n_blocks=3, seed=5), stream)  # re-prepared with another seed
        for args in (["run", "--resume", str(run), "--max-blocks", "2"], ["recommend", str(run), "--user", "0"]):
            assert "has changed since the run started" in one_error_line(ccdrec(*args, cwd=cli_run / "b"))
        with pytest.raises(CcdrecError, match="has changed since the run started"):
            load_run(run)
        assert files_of(run) == before  # no file of the run changed (config.yaml keeps its max_blocks)
    finally:
        for name, data in original.items():
            (stream / name).write_bytes(data)


def test_a_run_without_its_stream_record_is_refused(cli_run, tmp_path):
    """Without stream.json nothing tells whether the stream changed under the run: refused, not guessed."""
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    (run / "stream.json").unlink()
    before = files_of(run)
    for args in (["run", "--resume", str(run), "--max-blocks", "2"], ["recommend", str(run), "--user", "0"]):
        assert "stream.json is missing" in one_error_line(ccdrec(*args, cwd=cli_run / "b"))
    assert files_of(run) == before


def test_resume_from_elsewhere_removes_files_of_interrupted_writes(cli_run, tmp_path):
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    torn = [run / "checkpoints" / ".b1_served.pt.abc123.tmp", run / ".state.json.xyz.tmp"]
    for f in torn:
        f.write_bytes(b"half a write")
    res = ccdrec("run", "--resume", str(run), "--no-progress", cwd=cli_run / "b")  # max_blocks 0: nothing left to run
    assert res.returncode == 0, res.stderr[-2000:]
    assert not any(f.exists() for f in torn)


def test_a_local_directory_named_like_a_bundled_dataset(tmp_path, monkeypatch):
    save_stream(synthetic_stream(n_blocks=2, seed=3), tmp_path / "yelp")
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("yelp")).dataset == str(tmp_path / "yelp")
    assert load_stream(Path("yelp")).n_users == 240  # the directory, not the bundled Yelp
    info = ccdrec("data", "info", "./yelp", cwd=tmp_path)
    assert info.returncode == 0 and "240" in info.stdout and "12,248" not in info.stdout
    assert "names both a bundled dataset and ./yelp" in one_error_line(ccdrec("data", "info", "yelp", cwd=tmp_path))
    assert "use --data" in one_error_line(ccdrec("run", "--dataset", str(tmp_path / "yelp"), cwd=tmp_path))
    assert "not both" in one_error_line(ccdrec("run", "--dataset", "yelp", "--data", "yelp", cwd=tmp_path))


def test_a_failed_start_creates_nothing(tmp_path):
    res = ccdrec("run", "--data", "missing_dir", "--out", "runs/y", cwd=tmp_path)
    assert "no stream directory" in one_error_line(res)
    assert not (tmp_path / "runs").exists()
    res = ccdrec("compare", "--data", "missing_dir", "--out", "cmp", cwd=tmp_path)
    assert "no stream directory" in one_error_line(res)
    assert not (tmp_path / "cmp").exists()


# --- a dead worker process ----------------------------------------------------------------------


def _spawned_workers(parent: int) -> list[int]:
    """PIDs of the multiprocessing workers (not the resource tracker) started by ``parent``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def test_more_workers_than_threads_are_capped_at_the_threads(tmp_path):
    """--workers 3 --threads 1 ran two 1-thread worker processes, two threads under --threads 1: the worker
    processes are capped at the run's threads, with a note (the metrics do not depend on them)."""
    save_stream(synthetic_stream(n_blocks=2, seed=4), tmp_path / "s")
    args = [
        sys.executable,
        "-m",
        "ccdrec",
        "run",
        "--data",
        str(tmp_path / "s"),
        "--out",
        str(tmp_path / "r"),
        "--max-blocks",
        "0",
    ]
    args += ["--preset", "quick", "--threads", "1", "--workers", "3", "--no-progress", "--set", MEMBERS]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = " ".join(res.stdout.split())
    assert "3 worker processes capped at 1: each takes at least one of the 1 thread(s) this run may use (--threads)" in text
    assert "processes," not in text and "b0/teacher1" in text  # the members ran one after the other, in this process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dead_worker_names_the_lost_stage_and_the_resume_command(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=4), tmp_path / "s")
    args = [sys.executable, "-m", "ccdrec", "run", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r")]
    args += ["--preset", "quick", "--workers", "2", "--no-progress", "--set", MEMBERS]
    args += ["--set", "teacher.base.epochs=400", "--set", "teacher.base.patience=400"]  # long enough to be killed
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        workers: list[int] = []
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.2)
            workers = _spawned_workers(proc.pid)
        assert workers, "no worker process started"
        time.sleep(3.0)  # inside their stages
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stage") and "b0/teacher" in line and "lost" in line
    assert line.endswith(f"continue with: ccdrec run --resume {tmp_path / 'r'} --workers 2 --no-progress")
    assert json.loads((tmp_path / "r" / "state.json").read_text())["completed"] == []


# --- more members of the same kinds (found by trying the tool as a new user) -------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--lr", "nan", "--epochs", "1"], "lr: Input should be a finite number"),
        (["train", "--batch-size", "0", "--epochs", "1"], "--batch-size: Input should be greater than or equal to 1"),
        (["run", "--set", "student.update.lr=.inf"], "student.update.lr: Input should be a finite number"),
        (["run", "--set", "teacher.members=[]"], "teacher.members: List should have at least 1 item"),
        (["run", "--set", "blocks={-1: {}}"], "incremental blocks k >= 1"),
        (["run", "--threads", "100000"], "--threads must be between 1 and"),
        (["run", "--preset", ""], "unknown preset ''"),
        (["compare", "--ablation", ""], "--ablation names no value"),
        (["compare", "--from-run", "somewhere", "--preset", "quick"], "stored configuration; --preset cannot"),
        (["run", "--dataset", "yelp", "--set", "dataset=gowalla"], "--set dataset: name the stream with --dataset"),
        (["compare", "--workers", "2", "--set", "workers=1"], "--workers and --set workers: give one of them"),
        (["run", "--executor", "local", "--set", "executor=ray"], "--executor and --set executor: give one of them"),
        (["run", "--set", "student.model.kind=vae"], "the student is an embedding model"),
        (["run", "--set", "student.model.kind=foo"], "the student is an embedding model: kind mf or lightgcn, not 'foo'"),
        (["compare", "--seeds", "0,4294967296"], "--seeds: every value must be at most 4294967295"),
        (["run", "--set", "seed=4294967296"], "seed: Input should be less than or equal to 4294967295"),
    ],
)
def test_more_bad_options_are_one_line_errors_that_create_nothing(args, message, tmp_path):
    res = ccdrec(*args, "--out", str(tmp_path / "o"), cwd=tmp_path) if args[0] != "train" else ccdrec(*args, cwd=tmp_path)
    assert message in one_error_line(res)
    assert not (tmp_path / "o").exists()


def test_usage_limits_of_numbers(tmp_path):
    for args in (["data", "prepare", "log.csv", "--out", "x", "--seed", "-5"], ["bench-serve", "run", "-k", "0"]):
        res = ccdrec(*args, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "Invalid value" in res.stderr


def test_paths_the_system_refuses_are_one_line_errors(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=3), tmp_path / "s")
    (tmp_path / "afile").write_text("not a directory")
    res = ccdrec("train", "--data", str(tmp_path / "s"), "--model", "mf", "--dim", "4", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "afile" / "m"))  # fmt: skip
    assert "afile" in one_error_line(res)
    for sweep in ([], ["--seeds", "0,1"]):  # a comparison, a sweep
        res = ccdrec("compare", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "afile"), *sweep)
        assert "afile: exists and is not a directory" in one_error_line(res)
        assert "directory:" not in res.stdout


def test_broken_run_and_stream_files_are_one_line_errors(cli_run, tmp_path):
    import gzip
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    (run / "state.json").write_text("[]")
    assert "not a run state" in one_error_line(ccdrec("recommend", str(run), "--user", "0"))
    assert "not a run state" in one_error_line(ccdrec("run", "--resume", str(run)))
    config = (run / "config.yaml").read_text()
    for text, message in (("", "not a run configuration (empty)"), ("seed: -1\n", "seed: Input should be greater")):
        (run / "config.yaml").write_text(text)
        assert message in one_error_line(ccdrec("run", "--resume", str(run)))
    (run / "config.yaml").write_text(config)
    stream = tmp_path / "cut"
    shutil.copytree(cli_run / "a" / "streams" / "base", stream)
    data = (stream / "interactions.csv.gz").read_bytes()
    (stream / "interactions.csv.gz").write_bytes(data[:500])  # a truncated gzip file
    assert gzip.decompress(data)  # the original is whole
    assert "cannot be read as CSV" in one_error_line(ccdrec("data", "info", str(stream)))


def test_prepare_force_replaces_only_a_stream(tmp_path):
    rows = "\n".join(f"u{i % 12},i{i % 9},{1600000000 + 3600 * i}" for i in range(400))
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + rows + "\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "important.doc").write_text("keep me")
    res = ccdrec("data", "prepare", "log.csv", "--out", "docs", "--force", "--min-user", "2", "--min-item", "2", cwd=tmp_path)
    assert "is not a stream directory" in one_error_line(res)
    assert (tmp_path / "docs" / "important.doc").read_text() == "keep me"
    small = ("--min-user", "2", "--min-item", "2")
    res = ccdrec("data", "prepare", "log.csv", "--out", "s", "--blocks", "100000000000", *small, cwd=tmp_path)
    assert "too few for the base block and 100000000000 incremental block(s)" in one_error_line(res)
    assert not (tmp_path / "s").exists()
    for option, value in (("--blocks", "0"), ("--min-user", "0"), ("--base-fraction", "1")):  # named as on the command line
        res = ccdrec("data", "prepare", "log.csv", "--out", "s", option, value, cwd=tmp_path)
        assert f"{option} " in one_error_line(res) and not (tmp_path / "s").exists()


def test_a_run_directory_in_use_is_refused(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=6), tmp_path / "s")
    cfg = load_config(tmp_path / "s", preset="quick", overrides=[*SMALL, "max_blocks=0"])
    run_stream(cfg, tmp_path / "r", progress=False)  # this process holds the run directory from now on
    res = ccdrec("run", "--resume", str(tmp_path / "r"), "--no-progress")
    assert "in use by another ccdrec process" in one_error_line(res)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_or_bad_workers_create_nothing(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=3), tmp_path / "s")
    cases = [["run", "--device", "cuda"], ["compare", "--device", "cuda"], ["compare", "--seeds", "0,1", "--device", "cuda"]]
    commands = (["run"], ["compare"], ["compare", "--seeds", "0,1"])
    cases += [[*command, "--workers", "0"] for command in commands]
    for args in cases:
        res = ccdrec(*args, "--data", str(tmp_path / "s"), "--out", str(tmp_path / "o"))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "o").exists(), args
        assert "directory:" not in res.stdout, args  # a refused start names no directory


def test_a_run_written_before_a_default_changed_resumes_with_the_old_default(tmp_path):
    """student.distill_from became "update" (then named "served"); a stored configuration without it was
    written by code that distilled from scratch, and a resumed run must go on as it started. One written
    with the old name "served" goes on distilling from CL_k."""
    import yaml

    from ccdrec.pipeline.rundir import RunDir
    from ccdrec.presets import load_config

    cfg = load_config(preset="quick")
    assert cfg.student.distill_from == "update"
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    data = cfg.model_dump(mode="json")
    del data["student"]["distill_from"]
    rd.config_path.write_text(yaml.safe_dump(data))
    assert rd.load_config().student.distill_from == "scratch"
    rd.save_config(cfg)
    assert rd.load_config().student.distill_from == "update"  # written now: the stored value holds
    data["student"]["distill_from"] = "served"
    rd.config_path.write_text(yaml.safe_dump(data))
    assert rd.load_config().student.distill_from == "update"
    assert load_config(preset="quick", overrides=["student.distill_from=served"]).student.distill_from == "update"


def test_a_config_file_names_the_stream_or_agrees_with_the_command_line(tmp_path):
    from ccdrec.presets import load_config

    (tmp_path / "g.yaml").write_text("dataset: gowalla\n")
    cfg = load_config(None, None, tmp_path / "g.yaml")
    assert cfg.dataset == "gowalla" and cfg.teacher.members[0].kind == "vae"  # and the gowalla preset
    res = ccdrec("run", "--config", "g.yaml", "--dataset", "yelp", "--out", "o", cwd=tmp_path)
    assert "g.yaml names the dataset 'gowalla' and the command line 'yelp'" in one_error_line(res)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00s")
    assert "bin.yaml: not UTF-8 text" in one_error_line(ccdrec("run", "--config", "bin.yaml", "--out", "o", cwd=tmp_path))
    assert not (tmp_path / "o").exists()


def test_train_with_a_seed_repeats_itself(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=3), tmp_path / "s")
    args = ["train", "--data", str(tmp_path / "s"), "--model", "lightgcn", "--dim", "8", "--epochs", "2", "--seed", "3"]
    runs = [ccdrec(*args, "--no-progress") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    metrics = [[line for line in r.stdout.splitlines() if "recall@20" in line] for r in runs]
    assert len(metrics[0]) == 2 and metrics[0] == metrics[1]


def test_train_out_is_a_stem_and_never_overwrites(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=3), tmp_path / "s")
    args = ["train", "--data", str(tmp_path / "s"), "--model", "mf", "--dim", "4", "--epochs", "1", "--no-progress"]
    res = ccdrec(*args, "--out", "m.pt", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.pt").is_file() and (tmp_path / "m.json").is_file() and not (tmp_path / "m.pt.pt").exists()
    assert "exists; remove it" in one_error_line(ccdrec(*args, "--out", "m", cwd=tmp_path))
    (tmp_path / "d").mkdir()
    assert "a directory; give a file name" in one_error_line(ccdrec(*args, "--out", "d", cwd=tmp_path))
    assert "--model mf has none" in one_error_line(ccdrec(*args, "--layers", "3", cwd=tmp_path))


def test_a_user_of_a_block_the_run_has_not_reached_is_named_as_such(cli_run):
    from ccdrec.data.stream import load_stream

    stream = load_stream(str(cli_run / "a" / "streams" / "base"))
    later = stream.user_vocab[stream[1].n_users] if stream.user_vocab is not None else str(stream[1].n_users)
    res = ccdrec("recommend", str(cli_run / "a" / "runs" / "x"), "--user", str(later))
    line = one_error_line(res)
    assert f"unknown user '{later}'" in line and "first appears in block 2" in line and "reached block 0" in line
    assert "first appears" not in one_error_line(ccdrec("recommend", str(cli_run / "a" / "runs" / "x"), "--user", "nobody"))


def test_a_run_notes_what_of_its_configuration_the_stream_leaves_without_effect(stream):
    from ccdrec.pipeline.ccd import stream_notes

    last, n_items = len(stream) - 1, stream[0].n_items
    assert stream_notes(load_config(None, preset="quick"), stream) == []
    overrides = [f"ks=[20, {n_items}]", "blocks={2: {w_stability: 0.5}, 99: {w_stability: 0.5}}"]
    cfg = load_config(None, preset="quick", overrides=overrides)
    notes = stream_notes(cfg.model_copy(update={"max_blocks": last + 3}), stream)
    assert len(notes) == 3
    assert f"max_blocks {last + 3}" in notes[0] and f"blocks 0..{last}" in notes[0]
    assert "block(s) 99," in notes[1] and " 2," not in notes[1]
    assert f"cut-off(s) {n_items} of ks" in notes[2] and "Recall@K is 1" in notes[2]


def test_written_files_and_prepared_streams_get_the_umasks_permissions_not_owner_only(tmp_path):
    import stat

    from ccdrec.checkpoint import atomic_write_json
    from ccdrec.data.prepare import prepare_stream

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
        rng = np.random.default_rng(0)
        log = tmp_path / "log.csv"
        users, items = rng.integers(0, 30, 3000), rng.integers(0, 40, 3000)
        rows = [f"{u},{i},{1_600_000_000 + n}" for n, (u, i) in enumerate(zip(users, items, strict=True))]
        log.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
        prepare_stream(log, tmp_path / "s", min_user=2, min_item=2, n_blocks=2)
        assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in (tmp_path / "s").iterdir())
    finally:
        os.umask(old)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, a directory no file can be made in")
def test_an_output_file_that_cannot_be_written_is_refused_before_the_work():
    from ccdrec.cli import _check_output_file

    with pytest.raises(CcdrecError, match=r"--json /proc/ccdrec-x\.json: no file can be written in /proc"):
        _check_output_file(Path("/proc/ccdrec-x.json"), "--json")
    _check_output_file(Path("/tmp/ccdrec-check/x.json"), "--json")  # a directory to be made under a writable one


def test_resuming_to_a_block_past_the_streams_end_says_where_the_run_ends(cli_run, tmp_path):
    import shutil

    run = tmp_path / "x"
    shutil.copytree(cli_run / "a" / "runs" / "x", run)
    res = ccdrec("run", "--resume", str(run), "--max-blocks", "9", "--no-progress", cwd=cli_run / "a")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "note: max_blocks 9, but the stream has blocks 0..2: the run ends at block 2" in res.stdout.replace("\n", " ")
