"""Held-out pairs a block trains on are not targets (method.md 2, 8): dropped on load, counted, and the
stream's files and digest stay as they are."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from ccdrec.data import load_stream
from ccdrec.data.stream import INTERACTIONS, Block, held_out_pairs, save_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.eval.metrics import MASK_OF


def with_overlaps(tmp_path):
    """A synthetic stream written with held-out rows that repeat pairs of the same block: block 0 gets
    3 train pairs as valid, 5 other train pairs, 2 valid pairs and 1 of the 3 above as test (8 test
    rows to drop); block 1 gets 4 train pairs as test. Returns (clean stream, directory)."""
    clean = synthetic_stream(n_blocks=2, seed=3)
    save_stream(clean, tmp_path / "s")
    b0, b1 = clean[0], clean[1]
    extra = [
        (0, "valid", b0.train[0:3]),
        (0, "test", b0.train[3:8]),
        (0, "test", b0.valid[0:2]),
        (0, "test", b0.train[0:1]),
        (1, "test", b1.train[10:14]),
    ]
    path = tmp_path / "s" / INTERACTIONS
    df = pd.read_csv(path)
    rows = [pd.DataFrame({"block": k, "split": s, "user": p[:, 0], "item": p[:, 1]}) for k, s, p in extra]
    with gzip.open(path, "wt") as f:
        pd.concat([df, *rows]).to_csv(f, index=False)
    return clean, tmp_path / "s"


def test_loading_drops_held_out_pairs_the_block_trains_on(tmp_path):
    clean, d = with_overlaps(tmp_path)
    s = load_stream(d)
    assert [b.dropped for b in s] == [{"valid": 3, "test": 8}, {"valid": 0, "test": 4}]
    for a, b in zip(clean, s, strict=True):  # exactly the held-out sets of the stream without repeats
        for split in ("train", "valid", "test"):
            assert np.array_equal(a.split(split), b.split(split))
    # what the files hold is kept: the repeated rows are still in the stored splits
    assert [len(s[0].stored(x)) - len(clean[0].split(x)) for x in ("train", "valid", "test")] == [0, 3, 8]
    assert len(s[1].stored("test")) == len(clean[1].test) + 4
    # no test target is masked at test time, no valid target at validation time
    for b in s:
        for split, masks in MASK_OF.items():
            target = b.matrix(split)
            for m in masks:
                assert target.multiply(b.matrix(m)).nnz == 0
    table = s.summary()
    assert table["dropped_valid"].tolist() == [3, 0] and table["dropped_test"].tolist() == [8, 4]
    assert "valid 3 / 0; test 8 / 4" in s.dropped_note()
    assert clean.dropped_note() is None


def test_the_digest_and_the_files_stay_about_what_is_stored(tmp_path):
    clean, d = with_overlaps(tmp_path)
    s = load_stream(d)
    assert s.digest != clean.digest  # the files differ, so the content hash does
    save_stream(s, tmp_path / "again")  # writing a loaded stream writes the rows as given
    again = load_stream(tmp_path / "again")
    assert again.digest == s.digest and [b.dropped for b in again] == [b.dropped for b in s]
    assert s.prefix_digest(1) == load_stream(d).prefix_digest(1)
    # the merged blocks of full retraining and teacher spans: block 1's held-out pairs less those they train on
    union = s.union_block(1)
    trained = {tuple(p) for p in union.train.tolist()}
    for split in ("valid", "test"):
        want = [p for p in s[1].split(split).tolist() if tuple(p) not in trained]
        assert union.split(split).tolist() == want and s.span(0, 1).split(split).tolist() == want
    assert union.dropped["test"] > 0  # old users meet old items again in block 1


def test_held_out_pairs_masks():
    train = np.array([[0, 0], [0, 1], [1, 2]])
    valid = np.array([[0, 1], [0, 3], [1, 4]])
    test = np.array([[0, 0], [0, 3], [1, 5], [2, 2]])
    keep_valid, keep_test = held_out_pairs(train, valid, test)
    assert keep_valid.tolist() == [False, True, True]  # (0, 1) is a train pair
    assert keep_test.tolist() == [False, False, True, True]  # (0, 0) train, (0, 3) valid; (2, 2) another user's
    empty = np.zeros((0, 2), dtype=np.int64)
    assert [m.tolist() for m in held_out_pairs(train, empty, empty)] == [[], []]
    b = Block(0, 3, 6, 0, 0, train, valid, test)
    assert b.dropped == {"valid": 1, "test": 2} and np.array_equal(b.stored("test"), test)
    assert b.test.tolist() == [[1, 5], [2, 2]] and b.stored("train") is b.train


@pytest.mark.parametrize("name", ["yelp", "gowalla"])
def test_bundled_digests_are_those_of_their_files(name):
    """The digest of a bundled stream is what it was before held-out pairs were dropped on load: run
    directories that recorded it keep working."""
    want = {
        "yelp": "fc9b89748ebce4c9759b75923a520e92edb214f37965af4292e9818693027d3e",
        "gowalla": "e8db337953aeadce844d8ff2da2c0a728b28e12930dd25bca35d2eeb497755d8",
    }
    assert load_stream(name).digest == want[name]


def test_left_out_counts_come_from_prepare_json_and_only_when_they_fit(tmp_path):
    s = synthetic_stream(n_blocks=2, seed=3)
    save_stream(s, tmp_path / "s")
    assert "left_out" not in load_stream(tmp_path / "s").summary().columns  # unknown: no column
    assert load_stream(tmp_path / "s").left_out_note() is None
    for bad in ([1], [1, 2, 3], [1, -2], "3", [1.5, 2]):  # not one count per block: ignored (information only)
        (tmp_path / "s" / "prepare.json").write_text(json.dumps({"left_out": bad}))
        assert load_stream(tmp_path / "s").left_out is None
    (tmp_path / "s" / "prepare.json").write_text(json.dumps({"left_out": [0, 11]}))
    loaded = load_stream(tmp_path / "s")
    table = loaded.summary()
    columns = list(table.columns)
    assert table["left_out"].tolist() == [0, 11] and columns.index("left_out") == columns.index("test") + 1
    note = loaded.left_out_note()
    assert "left_out: 11 held-out interaction(s) set aside" in note and "(per block D_0..D_1: 0 / 11)" in note
    assert loaded.digest == s.digest  # information only: not part of the stream's content
