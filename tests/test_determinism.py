"""Same seed, same thread count: bit-identical metrics (times aside) and checkpoints.

The fast test runs the whole CCD stream on a synthetic stream large enough that torch's kernels
split their work over two threads (tens of thousands of training pairs, minibatches full of repeated
users and items), once in this process and once in a fresh process with another hash seed. On a
single thread, or on the tiny streams of the other tests, the thread-order-dependent kernels
(``index_put_(accumulate=True)`` behind ``table[index]``'s backward pass) happen to agree.

The slow test runs Yelp ``--preset quick`` three times through the CLI, once killed with SIGKILL
mid-run and resumed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from ccdrec.data.stream import save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.determinism import deterministic_kernels
from ccdrec.models.graph import normalized_adjacency, segment_spmm, spmm, to_torch_sparse
from ccdrec.models.indexing import take_pairs, take_rows
from ccdrec.pipeline.ccd import run_stream
from ccdrec.presets import load_config

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
OVERRIDES = [
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 16, seed: 0}, {kind: vae, dim: 16, seed: 1}]",
    "teacher.base.epochs=2",
    "teacher.base_vae.epochs=2",
    "student.distill.epochs=2",
]


def compare_runs(a: Path, b: Path, *options: str) -> str:
    """The report of ``benchmarks/determinism.py A B`` (its last line says ``identical: yes/no``)."""
    spec = importlib.util.spec_from_file_location("determinism_bench", ROOT / "benchmarks" / "determinism.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.main([str(a), str(b), *options])
    return out.getvalue()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def test_same_seed_gives_bit_identical_runs_on_two_threads(tmp_path, two_threads):
    stream_dir = tmp_path / "stream"
    # block 0: 1,600 users x 800 items, 19,000 train pairs: minibatches of 4,096 repeat most items
    stream = synthetic_stream(n_blocks=3, base_users=1600, base_items=800, new_users=200, new_items=80, per_user=16, seed=3)
    save_stream(stream, stream_dir)
    cfg = load_config(str(stream_dir), preset="quick", overrides=OVERRIDES)
    run_stream(cfg, tmp_path / "a", progress=False)
    # the same run in a fresh process (other heap layout, other hash seed)
    script = (
        "import sys, torch\n"
        "from ccdrec.config import RunConfig\n"
        "from ccdrec.pipeline.ccd import run_stream\n"
        f"torch.set_num_threads({THREADS})\n"
        "run_stream(RunConfig.model_validate_json(sys.stdin.read()), sys.argv[1], progress=False)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b")], input=cfg.model_dump_json(), capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = compare_runs(tmp_path / "a", tmp_path / "b")
    assert report.rstrip().endswith("identical: yes"), report


def test_deterministic_gathers_equal_indexing_in_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(50, 4, generator=gen, requires_grad=True)
    idx = torch.randint(0, 50, (30, 3), generator=gen)  # repeated rows
    weights = torch.randn(30, 3, 4, generator=gen)
    (take_rows(table, idx) * weights).sum().backward()
    got = table.grad.clone()
    table.grad = None
    (table[idx] * weights).sum().backward()
    assert torch.equal(take_rows(table, idx), table[idx])
    torch.testing.assert_close(got, table.grad)
    rows, cols = torch.randint(0, 50, (40,), generator=gen), torch.randint(0, 4, (40,), generator=gen)
    assert torch.equal(take_pairs(table, rows, cols), table[rows, cols])


def test_segment_product_equals_the_sparse_product():
    r = sp.random(30, 20, density=0.2, format="csr", dtype=np.float32, random_state=1)
    r.data[:] = 1.0
    adj = to_torch_sparse(normalized_adjacency(sp.vstack([r, sp.csr_matrix((3, 20))]).tocsr()))  # 3 users without items
    x = torch.randn(adj.shape[0], 5)
    torch.testing.assert_close(segment_spmm(adj, x), torch.sparse.mm(adj, x))
    assert torch.equal(spmm(adj, x), torch.sparse.mm(adj, x))  # the CPU keeps torch's own product


def test_deterministic_kernels_restores_the_previous_settings():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.utils.deterministic.fill_uninitialized_memory


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _ccdrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "ccdrec", "run", "--no-progress", "--threads", str(THREADS), *args]


@pytest.mark.slow
def test_yelp_quick_runs_and_a_killed_resumed_run_are_bit_identical(tmp_path):
    quick = ("--dataset", "yelp", "--preset", "quick")
    for name in ("a", "b"):
        subprocess.run(_ccdrec(*quick, "--out", str(tmp_path / name)), check=True, capture_output=True, timeout=1800)
    report = compare_runs(tmp_path / "a", tmp_path / "b")
    print(f"== {tmp_path / 'a'} vs {tmp_path / 'b'}\n{report}")
    assert report.rstrip().endswith("identical: yes"), report

    # a third run, killed with SIGKILL once block 1's student update is complete, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_ccdrec(*quick, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if "b1/student_update" in json.loads((killed / "state.json").read_text())["completed"]:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = json.loads((killed / "state.json").read_text())
    assert "b1/student_update" in state["completed"] and "b5/eval" not in state["completed"], "the run was not killed mid-run"
    subprocess.run(_ccdrec("--resume", str(killed)), check=True, capture_output=True, timeout=1800)
    report = compare_runs(tmp_path / "a", killed)
    print(f"== {tmp_path / 'a'} vs {killed} (killed after {len(state['completed'])} stages, resumed)\n{report}")
    assert report.rstrip().endswith("identical: yes"), report
    assert len(_rows(killed)) == len(_rows(tmp_path / "a"))
