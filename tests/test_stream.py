"""Block streams: bundled data, the on-disk format, and clear errors for broken inputs."""

import gzip
import shutil

import numpy as np
import pytest

from ccdrec import CcdrecError
from ccdrec.data import load_stream
from ccdrec.data.split import split_block
from ccdrec.data.stream import bundled_path, save_stream
from ccdrec.data.synthetic import synthetic_stream


def test_bundled_yelp_matches_the_release():
    s = load_stream("yelp")
    assert len(s) == 6
    assert [(b.n_users, b.n_items) for b in s] == [
        (12248, 10822),
        (13367, 11345),
        (13896, 11634),
        (14399, 11970),
        (14761, 12197),
        (14950, 12261),
    ]
    b1 = s[1]
    assert b1.new_users == range(12248, 13367)
    # deduplicated: no repeated (user, item) pair inside a split
    for b in s:
        assert len(np.unique(b.train, axis=0)) == len(b.train)
    assert b1.train_matrix.shape == (13367, 11345) and b1.train_matrix.nnz == len(b1.train)


def test_round_trip_through_the_stream_format(tmp_path):
    s = synthetic_stream(seed=2)
    save_stream(s, tmp_path / "s")
    t = load_stream(tmp_path / "s")
    assert len(t) == len(s)
    for a, b in zip(s, t, strict=True):
        assert (a.n_users, a.n_items, a.prev_users, a.prev_items) == (b.n_users, b.n_items, b.prev_users, b.prev_items)
        for split in ("train", "valid", "test"):
            assert np.array_equal(a.split(split), b.split(split))


def test_synthetic_stream_grows_every_block():
    s = synthetic_stream(n_blocks=4, seed=0)
    for prev, b in zip(s.blocks, s.blocks[1:], strict=False):
        assert b.prev_users == prev.n_users and b.n_users > prev.n_users and b.n_items > prev.n_items
        new = b.train[b.train[:, 0] >= b.prev_users]
        assert len(new) > 0


def test_split_is_per_user_and_seeded():
    pairs = np.array([(u, i) for u in range(30) for i in range(20)])
    a = split_block(pairs, np.random.default_rng(1))
    b = split_block(pairs, np.random.default_rng(1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for u in range(30):
        assert (a["valid"][:, 0] == u).sum() == 2 and (a["test"][:, 0] == u).sum() == 2
    assert len(a["train"]) + len(a["valid"]) + len(a["test"]) == len(pairs)


def copy_yelp(tmp_path):
    d = tmp_path / "y"
    shutil.copytree(bundled_path("yelp"), d)
    return d


def test_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(CcdrecError, match="no stream directory"):
        load_stream(tmp_path / "missing")
    d = copy_yelp(tmp_path)
    (d / "universe.csv").unlink()
    with pytest.raises(CcdrecError, match="universe.csv: file is missing"):
        load_stream(d)
    d2 = tmp_path / "bad"
    d2.mkdir()
    (d2 / "universe.csv").write_text("block,users,items\n0,3,3\n")
    with gzip.open(d2 / "interactions.csv.gz", "wt") as f:
        f.write("block,split,user\n0,train,1\n")
    with pytest.raises(CcdrecError, match=r"interactions.csv.gz: missing column\(s\) item"):
        load_stream(d2)
    with gzip.open(d2 / "interactions.csv.gz", "wt") as f:
        f.write("block,split,user,item\n0,train,1,7\n")
    with pytest.raises(CcdrecError, match="outside its universe"):
        load_stream(d2)
    with gzip.open(d2 / "interactions.csv.gz", "wt") as f:
        f.write("block,split,user,item\n0,holdout,1,1\n")
    with pytest.raises(CcdrecError, match="unknown split"):
        load_stream(d2)


def test_a_directory_without_a_stream_says_what_it_is_and_what_to_give(tmp_path):
    import json
    import subprocess
    import sys

    run = tmp_path / "run"  # what `ccdrec run` leaves: state.json, stream.json (its stream), config, checkpoints
    run.mkdir()
    (run / "state.json").write_text("{}")
    (run / "stream.json").write_text(json.dumps({"source": str(tmp_path / "mine"), "sha256": "0", "blocks": 2}))
    with pytest.raises(CcdrecError) as exc:
        load_stream(run)
    assert str(exc.value) == (
        f"{run}: a run directory, not a stream directory made by `ccdrec data prepare`; "
        f"give the stream it ran on, {tmp_path / 'mine'}"
    )
    cmp = tmp_path / "cmp"  # a comparison: its runs below it
    shutil.copytree(run, cmp / "ccd")
    (cmp / "compare.json").write_text("{}")
    with pytest.raises(CcdrecError, match=r"cmp: a comparison directory, not a stream directory .* it ran on, .*mine$"):
        load_stream(cmp)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CcdrecError, match=r"empty: not a stream directory \(no universe.csv or interactions.csv.gz\)"):
        load_stream(tmp_path / "empty")
    with pytest.raises(CcdrecError, match="the stream path is empty"):
        load_stream("")

    def info(*args):
        return subprocess.run(
            [sys.executable, "-m", "ccdrec", "data", "info", *args], capture_output=True, text=True, cwd=tmp_path
        )

    for arg, message in (("run", "run: a run directory, not a stream directory"), ("", "the stream path is empty")):
        res = info(arg)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), res.stderr
