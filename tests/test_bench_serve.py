"""bench-serve: parameters, serving memory and top-K latency of the final teacher ensemble vs the student."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ccdrec import CcdrecError
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.models import MF, LightGCN
from ccdrec.models.vae import MultVAE
from ccdrec.serve_bench import (
    bench_records,
    bench_serve,
    format_bench,
    load_serving,
    read_bench,
    recommender,
    seen_matrix,
    serving_bytes,
    speedup,
)

OVERRIDES = [
    "student.topn=10",
    "student.user_samples=50",
    "student.item_samples=50",
    "teacher.members=[{kind: lightgcn, dim: 32, seed: 0}, {kind: vae, dim: 16, seed: 1}]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, finished_run):
    return finished_run(tmp_path_factory.mktemp("bench"), synthetic_stream(n_blocks=2, seed=2), OVERRIDES)


def test_bench_serve_returns_sane_positive_numbers(run_dir, tmp_path):
    df = bench_serve(run_dir, batch=64, repeats=2)
    assert list(df.index) == ["teacher ensemble", "student", "teacher / student"]
    for name in ("teacher ensemble", "student"):
        row = df.loc[name]
        assert row["parameters"] > 0 and row["serving_mb"] > 0
        assert row["one_user_ms"] > 0 and row["batch_ms"] > 0 and row["batch_users"] == 64
    t, s = df.loc["teacher ensemble"], df.loc["student"]
    assert s["parameters"] < t["parameters"] and s["serving_mb"] < t["serving_mb"]
    assert df.loc["teacher / student", "parameters"] == pytest.approx(t["parameters"] / s["parameters"])
    assert speedup(df) == pytest.approx(t["batch_ms"] / s["batch_ms"])
    text = format_bench(df)
    path = tmp_path / "bench.json"
    records = {r["model"]: r for r in bench_records(df)}
    assert records["student"]["batch_users"] == 64 and isinstance(records["student"]["parameters"], int)  # counts
    assert isinstance(records["teacher / student"]["parameters"], float) and records["teacher / student"]["batch_users"] is None
    path.write_text(json.dumps(bench_records(df)))
    back = read_bench(path)
    assert back.loc["student", "parameters"] == s["parameters"] and np.isnan(back.loc["teacher / student", "batch_users"])
    assert text.loc["student", "parameters"] == f"{int(s['parameters']):,}" and "batch of 64 (ms)" in text.columns


def test_served_models_are_the_final_ones(run_dir):
    models = load_serving(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert models.block == 1 and len(models.teacher.members) == 2
    # student.serve = distilled: after block 1's teacher cycle its D_1 is the served student
    assert models.student.n_users == models.teacher.n_users and state["pointers"]["served"] == "b1_student"
    served = torch.load(run_dir / "checkpoints" / "b1_student.pt", weights_only=True)
    got = models.student.state_dict()
    assert set(got) == set(served) and all(torch.equal(got[key], served[key]) for key in got)
    assert models.teacher.num_parameters() == sum(m.num_parameters() for m in models.teacher.members)


def test_recommendations_exclude_seen_items_in_score_order(run_dir):
    models = load_serving(run_dir)
    stream = models.stream
    seen = models.seen
    users = np.array([0, 5, models.student.n_users - 1])
    top = recommender(models.student, seen, k=20)(users).numpy()
    scores = models.student.scorer()(torch.from_numpy(users)).numpy()
    for row, u in enumerate(users):
        mine = {int(i) for b in stream.blocks for s in ("train", "valid", "test") for uu, i in b.split(s) if uu == u}
        assert not mine & set(top[row].tolist())
        assert np.all(np.diff(scores[row, top[row]]) <= 1e-6)
        assert seen[u].nnz == len(mine)


def test_serving_bytes_count_what_the_scorer_keeps():
    lg = LightGCN(10, 7, dim=4)
    r = seen_matrix(synthetic_stream(n_blocks=1, base_users=10, base_items=7, per_user=3, seed=0), 0, (10, 7))
    lg.set_graph(r)
    assert serving_bytes(lg) == (10 + 7) * 4 * 4
    assert serving_bytes(MF(10, 7, dim=2)) == (10 + 7) * 2 * 4
    vae = MultVAE(10, 7, dim=3)
    vae.set_graph(r)
    weights = (7 * 3 + 3) + (3 * 3 + 3) + (3 * 7 + 7)  # encoder, μ head, decoder (no log σ² head)
    assert serving_bytes(vae) == weights * 4 + r.nnz * 4 + r.nnz * 4 + (10 + 1) * 4


def test_bench_rejects_bad_inputs(run_dir, tmp_path):
    with pytest.raises(CcdrecError, match="no such run directory"):
        bench_serve(tmp_path / "missing")
    with pytest.raises(CcdrecError, match="at least 1"):
        bench_serve(run_dir, batch=0)


def test_cli_bench_serve(run_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "from ccdrec.cli import main; main()", "bench-serve"]
    out = subprocess.run(
        [*cmd, str(run_dir), "--batch", "32", "--repeats", "1", "--json", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "teacher / student" in out.stdout and "speed-up" in out.stdout
    records = json.loads((tmp_path / "b.json").read_text())
    assert records[1]["model"] == "student" and records[2]["batch_users"] is None
    out = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "no such run directory" in out.stderr
    # a -k past the catalogue measures lists of every item, and says so instead of naming a top-K it did not
    # measure; so does a --batch past the users; --threads as every command that computes has it
    models = load_serving(run_dir, "cpu")
    n_items, n_users = models.teacher.n_items, min(models.teacher.n_users, models.student.n_users)
    out = subprocess.run(
        [*cmd, str(run_dir), "--batch", "100000", "--repeats", "1", "-k", "100000", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"-k 100000 is more than the {n_items:,} items" in out.stderr and f"top-{n_items}," in out.stdout
    assert f"--batch 100,000 is more than the {n_users:,} users there are" in out.stderr
