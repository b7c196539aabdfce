"""The command line: help everywhere, one-line errors with exit code 2, the main commands on tiny data."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ccdrec.checkpoint import load_model
from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream


def ccdrec(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "from ccdrec.cli import main; main()", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "synth"
    save_stream(synthetic_stream(n_blocks=2, seed=3), d)
    return d


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "info"], ["data", "prepare"], ["train"], ["run"], ["recommend"]])
def test_every_command_has_help(cmd):
    out = ccdrec(*cmd, "--help")
    assert out.returncode == 0 and "Usage" in out.stdout


def test_no_help_text_holds_brackets_that_rich_would_swallow_as_markup():
    """Rich reads ``[default: x]`` (a bracket opening with a lower-case letter, #, / or @) as a style tag and
    prints nothing of it: such text in an option's help or a command's docstring must be escaped (``\\[``)."""
    import re

    import typer

    from ccdrec.cli import app

    tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[\]]*\]")
    found, commands = [], [("ccdrec", typer.main.get_command(app))]
    while commands:
        name, command = commands.pop()
        texts = [("help", command.help or "")] + [(p.name, getattr(p, "help", None) or "") for p in command.params]
        found += [f"{name} {what}: {m.group()}" for what, text in texts for m in tag.finditer(text)]
        commands += [(f"{name} {sub}", c) for sub, c in getattr(command, "commands", {}).items()]
    assert len(commands) == 0 and not found, found


def test_data_info_bundled_table():
    out = ccdrec("data", "info", "yelp")
    assert out.returncode == 0
    assert "new_users" in out.stdout and "12,248" in out.stdout and "117,367" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "info", "no-such-stream"], "no stream directory 'no-such-stream'"),
        (["train", "--dataset", "yelp", "--block", "9"], "--block 9 is out of range"),
        # train's mistakes name its options, not the configuration fields behind them
        (["train", "--dataset", "yelp", "--model", "transformer"], "--model: Input should be 'mf', 'lightgcn' or 'vae'"),
        (["train", "--dataset", "yelp", "--model", "mf", "--dim", "0"], "--dim: Input should be greater than or equal to 1"),
        (["train", "--dataset", "yelp", "--model", "mf", "--batch-size", "0"], "--batch-size: Input should be greater"),
        (["run", "--resume", "/nonexistent/run"], "no such run directory"),
        (["run", "--dataset", "yelp", "--set", "student.model.dim=-3"], "invalid configuration: student.model.dim"),
        (["run", "--dataset", "yelp", "--preset", "nope"], "unknown preset"),
        (["run", "--dataset", "yelp", "--threads", "0"], "--threads must be between 1 and"),
        (["recommend", "/nonexistent/run", "--user", "1"], "no such run directory"),
        (["run", "--resume", "/nonexistent/run", "--preset", "quick"], "--preset cannot change it"),
        (["compare", "--resume", "/nonexistent/cmp", "--set", "seed=1", "--seed", "2"], "--set, --seed cannot change it"),
        # one value given two ways: neither silently wins
        (["run", "--dataset", "yelp", "--seed", "1", "--set", "seed=2"], "--seed and --set seed: give one of them"),
        (["run", "--dataset", "yelp", "--set", "seed=1", "--set", "seed=2"], "--set names seed twice"),
        (["compare", "--dataset", "yelp", "--seeds", "0,1", "--set", "seed=5"], "--seeds and --set seed"),
        (["compare", "--dataset", "yelp", "--cadences", "2", "--set", "teacher.update_every=3"], "--cadences and --set"),
        (["run", "--dataset", "yelp", "--set", "=3"], "names no field before '='"),
        (["run", "--dataset", "yelp", "--set", "teacher.members.0.dim=4"], "teacher.members is a list; set it whole"),
        (["run", "--dataset", "yelp", "--config", "/"], "a directory; --config takes a YAML or TOML file"),
        (["bench-serve", "/nonexistent/run", "--json", "/"], "--json /: a directory"),
        (["run", "--dataset", "yelp", "--max-blocks", "1", "--max-blocks=0"], "--max-blocks is given twice; give it once"),
        (["compare", "--dataset", "yelp", "--ablations", "--ablation", "no-replay"], "--ablations runs every ablation"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, message):
    out = ccdrec(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_train_prints_metrics_and_saves(stream_dir, tmp_path):
    out = ccdrec(
        "train",
        "--data",
        str(stream_dir),
        "--model",
        "mf",
        "--dim",
        "8",
        "--epochs",
        "3",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "m_lr0.01"),  # a dot in the name is part of it: OUT.pt is m_lr0.01.pt, not m_lr0.pt
    )
    assert out.returncode == 0, out.stderr
    assert "valid recall@20" in out.stdout and "test  recall@20" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_lr0.01.json", "m_lr0.01.pt"]
    assert "m_lr0.01.pt" in out.stdout and "m_lr0.pt" not in out.stdout
    model, _ = load_model(tmp_path / "m_lr0.01")
    assert model.kind == "mf" and model.dim == 8
    refused = ccdrec("train", "--data", str(stream_dir), "--threads", "0")  # concurrent jobs cap theirs, as with run
    assert refused.returncode == 2 and "--threads must be between 1 and" in refused.stderr


def test_run_then_recommend(stream_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = ccdrec(
        "run",
        "--data",
        str(stream_dir),
        "--preset",
        "quick",
        "--set",
        "student.topn=10",
        "--set",
        "teacher.members=[{kind: mf, dim: 8}]",
        "--out",
        str(run_dir),
        "--no-progress",
        "--threads",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert (run_dir / "report.md").exists()
    rec = ccdrec("recommend", str(run_dir), "--user", "5", "-k", "5")
    assert rec.returncode == 0, rec.stderr
    lines = rec.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("1\t")
    bad = ccdrec("recommend", str(run_dir), "--user", "999999")
    assert bad.returncode == 2 and "unknown user" in bad.stderr


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])  # SIGINT (Ctrl-C), SIGTERM: 128 + the signal
def test_an_interruption_a_library_swallowed_still_exits_with_the_signals_code(signum, code, monkeypatch, capsys, tmp_path):
    """Ctrl-C during a lazy import was caught somewhere below and the command exited 0 silently."""
    import signal

    from ccdrec import cli

    def swallowing_app(**kwargs):
        try:
            cli._interrupt(signum, None)
        except KeyboardInterrupt:
            pass  # as an import machinery or a C reader may do

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    monkeypatch.setattr(cli, "app", swallowing_app)
    monkeypatch.setattr(cli, "_SIGNALLED", [])
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert exc.value.code == code and "interrupted" in capsys.readouterr().err
    # interrupted before the directory exists: no resume hint that cannot work
    with pytest.raises(SystemExit), cli._resumable("compare", tmp_path / "never", None, None, True):
        raise KeyboardInterrupt
    assert "nothing was written yet" in capsys.readouterr().err


def test_an_option_given_twice_is_found_before_a_double_dash_and_set_may_repeat():
    from ccdrec.cli import repeated_option

    assert repeated_option(["run", "--seed", "1", "--threads", "2"]) is None
    assert repeated_option(["run", "--set", "a=1", "--set", "b=2"]) is None
    assert repeated_option(["run", "--seed=1", "--threads", "2", "--seed", "3"]) == "--seed"
    assert repeated_option(["recommend", "RUN", "-k", "5", "-k", "6"]) == "-k"
    assert repeated_option(["run", "--", "--seed", "--seed"]) is None
    assert repeated_option(["train", "--lr", "-1", "--dim", "-1"]) is None  # negative numbers are values
    assert repeated_option(["compare", "--bench", "--no-bench"]) == "--bench / --no-bench"  # one on/off option
    assert repeated_option(["run", "--no-progress", "--threads", "1"]) is None


def test_an_interruption_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside torch's native initialisation aborted the process from C++
    ('terminate called ... KeyboardInterrupt', exit 134) or left the import half done (exit 130): the
    signal handler defers it past the import (SIGALRM), then raises it."""
    import importlib
    import signal
    import time

    from ccdrec import cli

    (tmp_path / "slow_module.py").write_text(
        "import signal, sys\nfrom ccdrec import cli\ncli._interrupt(signal.SIGTERM, sys._getframe())\nDONE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_SIGNALLED", [])
    before = signal.signal(signal.SIGALRM, cli._raise_deferred)
    try:
        with pytest.raises(KeyboardInterrupt):
            module = importlib.import_module("slow_module")  # the handler returns inside the import
            assert module.DONE  # the module is whole
            time.sleep(5)  # the deferred interruption lands here, after the import
        assert cli._SIGNALLED == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):  # outside an import it is raised at once
            cli._interrupt(signal.SIGTERM, sys._getframe())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_sigterm_at_any_moment_of_startup_ends_with_143_and_no_abort(tmp_path):
    save_stream(synthetic_stream(n_blocks=2, seed=1), tmp_path / "s")
    for delay in (0.3, 0.6, 0.8, 0.9, 1.0, 1.2, 1.5):
        out = tmp_path / f"r{delay}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ccdrec", "run", "--data", str(tmp_path / "s"), "--preset", "quick", "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (143, 0), (delay, proc.returncode, err[-500:])  # 0: it finished first
        assert "terminate called" not in err and "Traceback" not in err, err[-500:]


def test_empty_paths_files_and_stream_directories_given_as_runs_say_what_they_are(tmp_path):
    """``--resume ""`` (an unset variable) used to be the current directory; a log or a stream directory
    given where a run directory goes said only that it is not one."""
    from ccdrec.cli import empty_path

    assert empty_path(["run", "--resume", ""]) == "--resume" and empty_path(["compare", "--out="]) == "--out"
    assert empty_path(["recommend", "", "--user", "1"]) == "the run directory of `ccdrec recommend`"
    assert empty_path(["run", "--resume", "r", "--set", "a="]) is None and empty_path(["recommend", "r", "--items", ""]) is None
    for args, what in ((["run", "--resume", ""], "--resume"), (["bench-serve", ""], "the run directory of `ccdrec bench-serve`")):
        res = ccdrec(*args, cwd=tmp_path)
        assert res.returncode == 2
        assert res.stderr.strip() == f"error: {what} is an empty path (an unset shell variable?); give the path"
    (tmp_path / "log.csv").write_text("user,item,timestamp\n")
    res = ccdrec("recommend", "log.csv", "--user", "1", cwd=tmp_path)
    assert res.stderr.strip() == "error: log.csv: a file, not a run directory (one that `ccdrec run` wrote)"
    res = ccdrec("data", "info", "log.csv", cwd=tmp_path)
    assert "a file, not a stream directory; a log becomes one with `ccdrec data prepare log.csv --out DIR`" in res.stderr
    from ccdrec.data.stream import save_stream
    from ccdrec.data.synthetic import synthetic_stream

    save_stream(synthetic_stream(n_blocks=1), tmp_path / "s")
    res = ccdrec("run", "--resume", "s", cwd=tmp_path)
    assert res.returncode == 2 and "s: a stream directory (of `ccdrec data prepare`), not a run; run CCD on it with " \
        "`ccdrec run --data s`" in res.stderr  # fmt: skip


def test_data_info_says_when_a_stream_directory_is_broken(tmp_path):
    from ccdrec.data.prepare import prepare_stream

    rng = np.random.default_rng(0)
    pairs = zip(rng.integers(0, 30, 900), rng.integers(0, 25, 900), strict=True)
    rows = [f"u{u},i{i},{1_600_000_000 + 60 * n}" for n, (u, i) in enumerate(pairs)]
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    prepare_stream(tmp_path / "log.csv", tmp_path / "s", min_user=2, min_item=2, n_blocks=2)
    (tmp_path / "s" / "prepare.json").write_text("{")
    res = ccdrec("data", "info", str(tmp_path / "s"))
    assert res.returncode == 0 and "prepare.json is not a JSON object, so the left_out counts are not shown" in res.stderr
    (tmp_path / "s" / "users.json").unlink()
    res = ccdrec("data", "info", str(tmp_path / "s"))
    assert res.returncode == 2 and "has the items' original IDs (items.json) but not the users' (users.json)" in res.stderr


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="deferral needs setitimer")
def test_an_interruption_during_a_checkpoint_write_waits_until_the_file_is_written(tmp_path):
    """SIGTERM inside torch.save's write used to come out of torch's C++ writer as a RuntimeError with a
    traceback (exit 1); it is raised once the file is in place."""
    import torch

    from ccdrec import cli
    from ccdrec.checkpoint import atomic_write_bytes

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGTERM, cli._interrupt)
    signal.signal(signal.SIGALRM, cli._raise_deferred)

    def write(f):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write
        torch.save({"w": torch.arange(1000.0)}, f)

    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(tmp_path / "m.pt", write)  # the write completes first
            time.sleep(5)  # the deferred interruption comes here
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(1000.0))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)
        cli._SIGNALLED.clear()


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="deferral needs setitimer")
def test_an_interruption_during_a_checkpoint_read_waits_until_it_is_read(tmp_path, monkeypatch):
    """torch.load calls back into Python from C++ as torch.save does: an interruption inside it is raised
    once the checkpoint is read, not out of torch's reader."""
    import torch

    from ccdrec import cli
    from ccdrec.checkpoint import load_tensors, save_tensors

    save_tensors(tmp_path / "m.pt", {"w": torch.arange(1000.0)})
    real_load, got = torch.load, {}

    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the read
        got["inside"] = True  # the handler has run by now, and deferred the interruption
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGTERM, cli._interrupt)
    signal.signal(signal.SIGALRM, cli._raise_deferred)
    try:
        with pytest.raises(KeyboardInterrupt):
            got["tensors"] = load_tensors(tmp_path / "m.pt")  # the read completes first
            time.sleep(5)  # the deferred interruption comes here
        assert got["inside"] and torch.equal(got["tensors"]["w"], torch.arange(1000.0))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)
        cli._SIGNALLED.clear()


def test_running_out_of_memory_is_one_line_and_a_run_says_how_to_resume(stream_dir, tmp_path, capsys):
    from ccdrec import cli

    assert cli.out_of_memory(ValueError("bad")) is None and cli.out_of_memory(RuntimeError("shape mismatch")) is None
    torch_cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 80000000000 bytes. Error code 12"
    )
    assert cli.out_of_memory(torch_cpu).startswith("out of memory (a step asked for 74.5 GiB; ")
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)")
    assert "a step asked for 2.00 GiB" in cli.out_of_memory(cuda) and cli.out_of_memory(MemoryError()).startswith(
        "out of memory (a smaller"
    )
    run = tmp_path / "my run"  # a printed command quotes a path the shell would split
    run.mkdir()
    (run / "state.json").write_text("{}")
    for where, kept in (
        (
            run,
            f"the completed stages are kept; continue with: ccdrec run --resume '{run}' once more memory is free, or "
            f"after making the model or batch smaller in {run / 'config.yaml'}",
        ),
        (tmp_path / "new", "nothing was written yet"),
    ):
        with pytest.raises(SystemExit) as stop, cli._resumable("run", where, None, None, True):
            raise torch_cpu
        assert stop.value.code == 1 and kept in capsys.readouterr().err
    with (
        pytest.raises(RuntimeError, match="shape mismatch"),
        cli._resumable("run", run, None, None, True),
    ):  # not memory: as it was
        raise RuntimeError("shape mismatch")
    # a model far larger than memory (tens of GiB of embeddings): one line, no traceback
    out = ccdrec("train", "--data", str(stream_dir), "--threads", "1", "--epochs", "1", "--dim", "100000000", "--no-progress")
    assert (
        out.returncode == 1 and out.stderr.startswith("error: out of memory (a step asked for ") and "Traceback" not in out.stderr
    )
    assert len(out.stderr.strip().splitlines()) == 1
