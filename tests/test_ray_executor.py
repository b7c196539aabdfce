"""``--executor ray``: a block's teacher members as Ray tasks give the local executor's results bit for bit
(metric rows, times aside, and checkpoints), a lost task names its stages and the run resumes, and the
checks before any work (Ray missing, an address without Ray, a task on a node that differs). The runs of
``ccdrec compare`` (and of a sweep) as Ray tasks give the local comparison's runs; a failed or lost run
task is named, with the resume command, after the others finish, and ``--resume`` completes it.

The Ray tests start one local Ray instance with 2 CPUs for the module; they are skipped without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from rich.console import Console

from ccdrec.checkpoint import load_tensors
from ccdrec.cli import app
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.errors import CcdrecError, StageLost
from ccdrec.pipeline import cluster, compare
from ccdrec.pipeline.ccd import run_stream
from ccdrec.pipeline.compare import run_compare
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.sweep import run_sweep
from ccdrec.presets import load_config

OVERRIDES = [
    "max_blocks=1",
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: vae, dim: 16, seed: 1}]",
]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream") / "synthetic"
    save_stream(synthetic_stream(n_blocks=2, seed=1), d)
    return d


@pytest.fixture(scope="module")
def local_run(stream_dir, tmp_path_factory):
    """The run with the local executor (one process, one thread as every test here): the reference."""
    out = tmp_path_factory.mktemp("runs") / "local"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture is made before the function fixtures that set it
    try:
        run_stream(load_config(str(stream_dir), preset="quick", overrides=OVERRIDES), out, progress=False)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def local_compare(stream_dir, tmp_path_factory):
    """CCD, finetune and the random-init ablation compared with the local executor (one thread): the reference."""
    out = tmp_path_factory.mktemp("compare") / "local"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
        run_compare(cfg, out, ["ccd", "finetune"], ["random-init"], progress=False, bench=False)
    finally:
        torch.set_num_threads(before)
    return out


COMPARED = ("ccd", "finetune", "ablation-random-init")


def timeless_rows(run: Path) -> list[dict]:
    """The metric rows without wall-clock fields, in a fixed order (member stages finish in any order)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [{k: v for k, v in r.items() if "second" not in k and "time" not in k} for r in rows]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def assert_same_run(a: Path, b: Path) -> None:
    """Equal metric rows (times aside), equal completed stages and bit-identical checkpoint tensors."""
    assert timeless_rows(a) == timeless_rows(b)
    state_a, state_b = (json.loads((r / "state.json").read_text()) for r in (a, b))
    assert sorted(state_a["completed"]) == sorted(state_b["completed"])
    assert state_a["pointers"] == state_b["pointers"]
    names = sorted(p.name for p in (a / "checkpoints").glob("*.pt"))
    assert names and names == sorted(p.name for p in (b / "checkpoints").glob("*.pt"))
    for name in names:
        ta, tb = load_tensors(a / "checkpoints" / name), load_tensors(b / "checkpoints" / name)
        assert ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_teacher_members_as_ray_tasks_give_the_local_executors_results(local_ray, stream_dir, local_run, tmp_path, monkeypatch):
    groups = []
    run_group = cluster.run_stage_group
    monkeypatch.setattr(cluster, "run_stage_group", lambda names, *a, **kw: groups.append(names) or run_group(names, *a, **kw))
    cfg = load_config(str(stream_dir), preset="quick", overrides=[*OVERRIDES, "executor=ray"])  # the configuration field
    out = tmp_path / "ray"
    run_stream(cfg, out, progress=False)
    assert groups == [["b0/teacher0", "b0/teacher1"], ["b1/teacher0", "b1/teacher1"]]
    assert_same_run(local_run, out)
    state = json.loads((out / "state.json").read_text())
    assert {"b0/teacher0", "b0/teacher1", "b1/teacher0", "b1/teacher1"} <= set(state["completed"])
    if sys.platform.startswith("linux"):  # measured in the Ray worker that ran the stage
        assert set(state["peak_rss_mb"]) == set(state["completed"])


def _kill_tasks(title: bytes, stop: threading.Event) -> None:
    """SIGKILL every process whose title starts with ``title`` (a Ray worker running such a task) until ``stop``."""
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            with suppress(OSError, ValueError):
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title):
                    os.kill(int(proc.name), signal.SIGKILL)
        stop.wait(0.02)


@pytest.mark.slow  # 12-27 s: Ray starts a fresh worker process (torch imported anew) for every killed one
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the Ray workers in /proc")
def test_a_lost_task_names_its_stages_and_the_run_resumes_to_the_same_results(local_ray, stream_dir, local_run, tmp_path):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    out = tmp_path / "lost"
    stop = threading.Event()
    killer = threading.Thread(target=_kill_tasks, args=(b"ray::ccdrec b1/teacher", stop), daemon=True)
    killer.start()
    try:
        with cluster.use_executor("ray"), pytest.raises(StageLost) as lost:
            run_stream(cfg, out, progress=False)
    finally:
        stop.set()
        killer.join()
    message = str(lost.value)
    assert "stage b1/teacher0 lost" in message and "stage b1/teacher1 lost" in message, message
    assert "worker process died" in message and "\n" not in message
    state = json.loads((out / "state.json").read_text())
    assert "b1/student_update" in state["completed"] and "b1/teacher0" not in state["completed"]
    with cluster.use_executor("ray"):  # the configuration says local: resumed on Ray all the same
        run_stream(None, out, resume=True, progress=False)
    assert_same_run(local_run, out)


def test_a_failed_task_names_its_stage_after_the_others_complete(local_ray, local_run):
    done = []
    complete = lambda name, result: done.append((name, result.path))  # noqa: E731
    group = [str(local_run), "nowhere"]  # a stage "run" here is RunDir.open of its name: the second one fails
    with pytest.raises(StageLost, match=r"^stage nowhere failed: nowhere: no such run directory; the completed stages are kept$"):
        cluster.run_stage_group(group, RunDir.open, complete, local_run, None, cpus=1, gpus=0)
    assert done == [(str(local_run), local_run)]
    with pytest.raises(ValueError) as bug:  # a stage's own exception (a bug) keeps its type and traceback
        cluster.run_stage_group(["b1/teacher0"], int, complete, local_run, None, cpus=1, gpus=0)
    assert "in stage b1/teacher0, a Ray task" in bug.value.__notes__


def test_ray_checks_fail_before_any_work(local_ray):
    cluster.check_resources(2, 0)
    with pytest.raises(CcdrecError, match="largest: 2 CPUs"):
        cluster.check_resources(3, 0)
    with pytest.raises(CcdrecError, match="1 GPU"):
        cluster.check_resources(1, 1)


def test_a_cluster_too_small_for_a_task_creates_no_directory(local_ray, stream_dir, tmp_path):
    """The resource check comes before the run (or comparison, or sweep) directory is made, so the
    corrected command can use the same --out."""
    for cmd, extra in (("run", []), ("compare", ["--methods", "ccd,finetune"]), ("compare", ["--seeds", "0,1"])):
        out = tmp_path / f"{cmd}{len(extra)}"
        args = [cmd, "--data", str(stream_dir), "--preset", "quick", "--no-progress", "--out", str(out), *extra]
        with pytest.raises(CcdrecError, match="largest: 2 CPUs"):
            app([*args, "--executor", "ray", "--threads", "3"], standalone_mode=False)
        assert not out.exists()


def test_ray_tasks_may_take_more_threads_than_the_drivers_machine_has(local_ray, stream_dir, tmp_path, monkeypatch):
    """--threads past 4 x this machine's cores is refused for local work, but with --executor ray it is the
    tasks' CPUs on the cluster's nodes (here the cluster check refuses 5 of its 2); the driver keeps its cores."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    before = torch.get_num_threads()
    out = tmp_path / "run"
    args = ["run", "--data", str(stream_dir), "--preset", "quick", "--no-progress", "--out", str(out), "--threads", "5"]
    try:
        with pytest.raises(CcdrecError, match=r"--threads must be between 1 and 4 \(4 x the 1 cores; more with --executor ray"):
            app(args, standalone_mode=False)
        with pytest.raises(CcdrecError, match=r"--threads must be between 1 and 4 \(4 x the 1 cores\), got 5$"):
            app(["train", "--data", str(stream_dir), "--threads", "5"], standalone_mode=False)  # no --executor there
        for cmd in (args, ["compare", *args[1:], "--methods", "ccd,finetune"]):
            with pytest.raises(CcdrecError, match="needs 5 CPUs.*largest: 2 CPUs"):
                app([*cmd, "--executor", "ray"], standalone_mode=False)
            assert torch.get_num_threads() == 1 and not out.exists()  # the driver: min(threads, cores)
    finally:
        torch.set_num_threads(before)


def test_an_unreachable_head_says_how_to_start_one():
    with pytest.raises(CcdrecError, match=r"Connection refused; start its head with `ray start --head"):
        cluster.check_reachable("127.0.0.1:1")
    with pytest.raises(CcdrecError, match="99999 is not a port"):
        cluster.check_reachable("127.0.0.1:99999")


def test_a_task_refuses_a_node_that_differs_from_the_driver(local_run, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "VISIBLE_WAIT_S", 0.0)
    ran = []
    here = cluster.versions()
    assert cluster._stage_task(ran.append, "b1/teacher0", str(local_run), "b1/eval", here) is None and ran == ["b1/teacher0"]
    with pytest.raises(CcdrecError, match="install the same versions on every node"):
        cluster._stage_task(ran.append, "b1/teacher0", str(local_run), None, {**here, "torch": "0.0"})
    with pytest.raises(CcdrecError, match="storage every node reaches"):
        cluster._stage_task(ran.append, "b1/teacher0", str(tmp_path / "elsewhere"), None, here)
    with pytest.raises(CcdrecError, match="storage every node reaches"):  # a stale copy: the driver's last stage is missing
        cluster._stage_task(ran.append, "b1/teacher0", str(local_run), "b2/eval", here)
    assert ran == ["b1/teacher0"]


def test_executor_options_are_checked_before_anything_is_created(stream_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["run", "--data", str(stream_dir), "--preset", "quick", "--no-progress", "--out", str(out)]
    with pytest.raises(CcdrecError, match="give --executor ray with it"):
        app([*args, "--ray-address", "auto"], standalone_mode=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(CcdrecError, match=r"^--executor ray needs Ray: pip install 'ccdrec\[ray\]'$"):
        app([*args, "--executor", "ray"], standalone_mode=False)
    with pytest.raises(CcdrecError, match=r"pip install 'ccdrec\[ray\]'"):  # the configuration field, too
        app([*args, "--set", "executor=ray"], standalone_mode=False)
    assert not out.exists()
    with pytest.raises(CcdrecError, match="cannot reach the Ray cluster at 127.0.0.1:1"):  # not minutes of ray.init
        cluster.check_reachable("127.0.0.1:1")
    with pytest.raises(CcdrecError, match="unknown executor"):
        with cluster.use_executor("dask"):
            pass


# --------------------------------------------------------------------------------------------- compare


def test_compare_runs_as_ray_tasks_give_the_local_executors_results(local_ray, stream_dir, local_compare, tmp_path, monkeypatch):
    groups = []
    run_tasks = compare._run_tasks
    monkeypatch.setattr(
        compare, "_run_tasks", lambda runs, *a, **kw: groups.append([d.name for d in runs]) or run_tasks(runs, *a, **kw)
    )
    out = tmp_path / "ray"
    with cluster.use_executor("ray"):
        cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
        report = run_compare(cfg, out, ["ccd", "finetune"], ["random-init"], progress=False, bench=False)
    assert groups == [["ccd"], list(COMPARED)]  # CCD's block 0 first, then every run (CCD's rest too) at once
    for name in COMPARED:
        assert_same_run(local_compare / name, out / name)
    assert report == out / "report.md" and report.exists()


def test_a_failed_run_task_is_named_after_the_others_finish(local_ray, local_run, tmp_path):
    top = tmp_path / "cmp"
    shutil.copytree(local_run, top / "ccd")
    shutil.copytree(local_run, top / "finetune")
    (top / "finetune" / "config.yaml").unlink()  # its task fails when it reopens the run
    (top / "ccd" / "report.md").unlink()  # the other task writes it again
    lines = []
    console = Console(quiet=True)
    console.print = lines.append
    failed = r"^run finetune failed: .*finetune: not a ccdrec run directory \(no config.yaml\); the completed runs and stages"
    with pytest.raises(StageLost, match=failed):
        compare._run_tasks([top / "ccd", top / "finetune"], top, threads=1, gpus=0, workers=None, console=console)
    assert any(x.startswith("  ccd done (") for x in lines), lines  # the other run finished and was printed
    assert (top / "ccd" / "report.md").exists()


@pytest.mark.slow  # 30-60 s: a killed task's worker process is started anew (torch imported again), then a resume
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the Ray workers in /proc")
def test_a_lost_run_task_names_the_run_and_the_resume_command_and_resume_completes_it(
    local_ray, stream_dir, local_compare, tmp_path, capsys
):
    out = tmp_path / "cmp"
    sets = [x for o in OVERRIDES for x in ("--set", o)]
    args = ["compare", "--data", str(stream_dir), "--preset", "quick", *sets, "--methods", "ccd,finetune"]
    args += ["--ablation", "random-init", "--no-bench", "--no-progress", "--executor", "ray", "--out", str(out)]
    stop = threading.Event()
    killer = threading.Thread(target=_kill_tasks, args=(b"ray::ccdrec compare finetune", stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(SystemExit) as exit_:
            app(args, standalone_mode=False)
    finally:
        stop.set()
        killer.join()
    assert exit_.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "error: run finetune lost: its Ray worker process died (killed or out of memory); the completed runs and "
        f"stages are kept; continue with: ccdrec compare --resume {out} --no-progress"  # the options a run does not keep
    )
    assert "b1/eval" in RunDir(out / "ablation-random-init").read_state()["completed"]  # the others finished
    app(["compare", "--resume", str(out), "--no-bench", "--no-progress", "--executor", "ray"], standalone_mode=False)
    for name in COMPARED:
        assert_same_run(local_compare / name, out / name)


@pytest.mark.slow  # about 30 s: two sweeps over two cadences
def test_a_sweep_as_ray_tasks_gives_the_local_sweeps_runs(local_ray, stream_dir, tmp_path):
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    cells = ("seed-0-every-1", "seed-0-every-2")
    run_sweep(cfg, tmp_path / "local", ["ccd", "finetune"], [], cadences=[1, 2], progress=False)
    with cluster.use_executor("ray"):
        run_sweep(cfg, tmp_path / "ray", ["ccd", "finetune"], [], cadences=[1, 2], progress=False)
    for cell in cells:
        for name in ("ccd", "finetune"):
            assert_same_run(tmp_path / "local" / cell / name, tmp_path / "ray" / cell / name)
    shared = RunDir(tmp_path / "ray" / cells[1] / "ccd").read_state()["shared"]
    assert set(shared.values()) == {str(tmp_path / "ray" / cells[0] / "ccd")}  # the second cadence's block 0 is the first's
