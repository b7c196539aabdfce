"""``prepare_stream``: a user's interaction log -> stream directory (method.md section 2)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ccdrec.data.prepare as prepare_mod
from ccdrec.data.prepare import prepare_stream
from ccdrec.data.stream import SPLITS, load_stream
from ccdrec.errors import CcdrecError

KW = dict(min_user=3, min_item=3, base_fraction=0.5, n_blocks=3, seed=0)
T0 = pd.Timestamp("2021-03-01")


def make_log(n_users: int = 40, n_items: int = 30, per_user: int = 8, seed: int = 1) -> pd.DataFrame:
    """A random log with unix-second timestamps, plus rows the k-core filter must remove."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, per_user, replace=False):
            rows.append((f"u{u}", f"i{i}", int(rng.integers(0, 10**6))))
    rows += [("lonely", "i0", 5), ("u0", "rare", 7), ("u1", "rare", 9)]  # user with 1, item with 2 interactions
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def reference(df: pd.DataFrame, min_user: int, min_item: int, **_) -> pd.DataFrame:
    """Straightforward pandas version of dedup + iterative k-core, in time order (ties by user, then item)."""
    df = df.sort_values(["timestamp", "user", "item"], kind="stable").drop_duplicates(["user", "item"])
    while True:
        ok = (df.groupby("user")["item"].transform("size") >= min_user) & (
            df.groupby("item")["user"].transform("size") >= min_item
        )
        if ok.all():
            return df.reset_index(drop=True)
        df = df[ok]


def original_pairs(stream, block) -> pd.DataFrame:
    pairs = np.concatenate([block.split(s) for s in SPLITS])
    return pd.DataFrame({"user": stream.user_vocab[pairs[:, 0]], "item": stream.item_vocab[pairs[:, 1]]})


def stream_files(path) -> dict[str, str]:
    """The stream's files (not ``prepare.json``, which records how the log was read)."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.name == "prepare.json":
            continue
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()  # gzip headers hold a mtime
        out[f.name] = data.decode()
    return out


def leftovers(tmp_path, keep=("log",)) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(keep))


def test_csv_with_string_ids_and_iso_datetimes(tmp_path):
    raw = make_log()
    log = raw.assign(timestamp=[(T0 + pd.Timedelta(seconds=int(t))).isoformat() for t in raw["timestamp"]])
    log.to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    ref = reference(raw, **KW)
    n = len(ref)
    assert (ref.groupby("user").size() >= 3).all() and (ref.groupby("item").size() >= 3).all()  # k-core holds
    assert "lonely" not in set(stream.user_vocab) and "rare" not in set(stream.item_vocab)

    # IDs by first appearance along the timeline, vocabularies back to the original IDs
    assert list(stream.user_vocab) == list(pd.unique(ref["user"]))
    assert list(stream.item_vocab) == list(pd.unique(ref["item"]))
    assert len(stream) == KW["n_blocks"] + 1 and stream.name == "out"

    pos = {(u, i): p for p, (u, i) in enumerate(zip(ref["user"], ref["item"], strict=True))}
    # KeyError here: an output pair that is not in the deduplicated, k-core filtered log
    positions = [np.array([pos[ui] for ui in zip(*original_pairs(stream, b).to_numpy().T, strict=True)]) for b in stream]
    expected = [0.5 * n] + [0.5 * n / 3] * 3
    seen_users: set[int] = set()
    for k, (block, p) in enumerate(zip(stream, positions, strict=True)):
        assert len(np.unique(p)) == len(p)  # no pair twice
        if k:
            assert p.min() > positions[k - 1].max()  # time order: block k comes after block k-1
        assert 0.8 * expected[k] <= len(p) <= expected[k] + 1  # the split may only drop some valid/test pairs
        assert block.n_users == ref["user"].iloc[: p.max() + 1].nunique()
        end = positions[k + 1].min() if k + 1 < len(stream) else n
        assert ref["item"].iloc[: p.max() + 1].nunique() <= block.n_items <= ref["item"].iloc[:end].nunique()
        users = set(np.concatenate([block.split(s)[:, 0] for s in SPLITS]).tolist())
        assert {u for u in users if u >= block.prev_users} == set(block.new_users)  # new users are [U_{k-1}, U_k)
        assert not seen_users & set(block.new_users)
        seen_users |= users
    assert sum(len(original_pairs(stream, b)) for b in stream) >= 0.9 * n


def test_block_sizes_follow_base_fraction(tmp_path):
    make_log(n_users=60).to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **{**KW, "base_fraction": 0.7, "n_blocks": 4})
    sizes = np.array([sum(len(b.split(s)) for s in SPLITS) for b in stream])
    n = len(reference(make_log(n_users=60), **KW))
    assert 0.9 * 0.7 * n <= sizes[0] <= 0.7 * n + 1
    assert all(0.85 * 0.3 * n / 4 <= s <= 0.3 * n / 4 + 1 for s in sizes[1:])


def test_csv_gz_matches_csv_and_same_seed_is_identical(tmp_path):
    log = make_log()
    log.to_csv(tmp_path / "log.csv", index=False)
    log.to_csv(tmp_path / "log.csv.gz", index=False)
    prepare_stream(tmp_path / "log.csv", tmp_path / "a", **KW)
    prepare_stream(tmp_path / "log.csv.gz", tmp_path / "b", **KW)
    prepare_stream(tmp_path / "log.csv", tmp_path / "c", **{**KW, "seed": 1})
    a, b, c = (stream_files(tmp_path / x) for x in "abc")
    assert set(a) == {"interactions.csv.gz", "universe.csv", "users.json", "items.json", "left_out.json"}
    assert a == b
    assert a["interactions.csv.gz"] != c["interactions.csv.gz"] and a["universe.csv"] == c["universe.csv"]


def test_parquet_with_int_ids_and_unix_seconds(tmp_path):
    raw = make_log()
    log = pd.DataFrame(
        {
            "uid": raw["user"].str.removeprefix("u").replace("lonely", "999").astype(np.int64) + 1000,
            "iid": raw["item"].str.removeprefix("i").replace("rare", "777").astype(np.int64),
            "ts": raw["timestamp"] + 1_600_000_000,
        }
    )
    log.to_parquet(tmp_path / "log.parquet")
    stream = prepare_stream(tmp_path / "log.parquet", tmp_path / "out", user_col="uid", item_col="iid", time_col="ts", **KW)
    ref = reference(log.rename(columns={"uid": "user", "iid": "item", "ts": "timestamp"}), **KW)
    assert list(stream.user_vocab) == [str(u) for u in pd.unique(ref["user"])]
    assert list(stream.item_vocab) == [str(i) for i in pd.unique(ref["item"])]
    reloaded = load_stream(tmp_path / "out")
    assert list(reloaded.user_vocab) == list(stream.user_vocab)
    assert "1999" not in set(stream.user_vocab) and "777" not in set(stream.item_vocab)


def test_parquet_datetime_column_and_pq_extension(tmp_path):
    raw = make_log()
    log = raw.assign(timestamp=T0 + pd.to_timedelta(raw["timestamp"], unit="s"))
    log.to_parquet(tmp_path / "log.pq")
    make_log().to_csv(tmp_path / "log.csv", index=False)
    prepare_stream(tmp_path / "log.pq", tmp_path / "a", **KW)
    prepare_stream(tmp_path / "log.csv", tmp_path / "b", **KW)
    assert stream_files(tmp_path / "a") == stream_files(tmp_path / "b")


def _chain_log(rows):
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def test_duplicates_keep_earliest_and_ties_go_by_user_then_item(tmp_path):
    # 12 users x 12 items, all pairs; every interaction at the same time except the duplicates
    rows = [(f"u{u}", f"i{i}", 100) for u in (5, 3, 9, 0, 1, 2, 4, 6, 7, 8, 10, 11) for i in range(12)]
    rows += [("u5", "i0", 500), ("u3", "i1", 50)]  # later duplicate: ignored; earlier duplicate: moves to the front
    _chain_log(rows).to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    # u3 first (its earlier duplicate), then the ties at 100 by user as written ("u10" < "u2"), not by row
    assert list(stream.user_vocab) == ["u3", "u0", "u1", "u10", "u11", "u2", "u4", "u5", "u6", "u7", "u8", "u9"]
    assert list(stream.item_vocab[:4]) == ["i1", "i0", "i10", "i11"]
    all_pairs = pd.concat([original_pairs(stream, b) for b in stream])
    assert not all_pairs.duplicated().any()
    assert len(all_pairs) <= 144


def test_iterative_kcore(tmp_path):
    # a dense 5x5 core plus a cascade that only the repeated filter removes: item "w" (1 user) goes first,
    # then user "z" (left with 2 items), then item "y" (left with 2 users), then user "x" (left with 2 items)
    rows = [(f"u{u}", f"i{i}", u * 10 + i) for u in range(5) for i in range(5)]
    rows += [("x", "i0", 60), ("x", "i1", 61), ("x", "y", 62), ("u0", "y", 63)]
    rows += [("z", "i0", 70), ("z", "y", 71), ("z", "w", 72)]
    df = prepare_mod._kcore(
        pd.DataFrame({"user": [r[0] for r in rows], "item": [r[1] for r in rows], "time": [r[2] for r in rows]}), 3, 3
    )
    assert set(df["user"]) == {f"u{u}" for u in range(5)} and set(df["item"]) == {f"i{i}" for i in range(5)}
    assert (df.groupby("user").size() >= 3).all() and (df.groupby("item").size() >= 3).all()
    assert list(df["time"]) == sorted(df["time"])  # order preserved


def test_numeric_timestamps_as_strings_sort_numerically(tmp_path):
    # "9" < "10" as numbers but not as strings: later rows get bigger numbers with more digits
    rows = [(f"u{u}", f"i{i}", str(10 ** (u % 4) + u * 13 + i)) for u in range(12) for i in range(12)]
    log = _chain_log(rows)
    log.to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    ref = reference(log.assign(timestamp=log["timestamp"].astype(int)), **KW)
    assert list(stream.user_vocab) == list(pd.unique(ref["user"]))


def test_force_replaces_existing_output(tmp_path):
    make_log().to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "universe.csv").write_text("block,users,items\n")  # --force replaces a stream directory
    (out / "stale.txt").write_text("old")
    stream = prepare_stream(tmp_path / "log.csv", out, force=True, **KW)
    assert not (out / "stale.txt").exists() and len(stream) == 4
    assert leftovers(tmp_path) == ["out"]


def test_empty_existing_output_is_fine_and_relative_name_is_not_bundled(tmp_path, monkeypatch):
    make_log().to_csv(tmp_path / "log.csv", index=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yelp").mkdir()
    stream = prepare_stream("log.csv", "yelp", **KW)
    assert stream.n_users < 100 and stream.source == (tmp_path / "yelp").resolve()


def _write(tmp_path, name, df=None, text=None):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    elif name.endswith((".parquet", ".pq")):
        df.to_parquet(path)
    else:
        df.to_csv(path, index=False)
    return path


BAD_LOGS = {
    "missing file": ("log_missing.tsv", None, None, {}, "file is missing"),
    "json log": ("log.json", None, "{}", {}, "looks like JSON, not a delimited text log"),
    "empty file": ("log_empty.csv", None, "", {}, "empty"),
    "header only": ("log_header.csv", None, "user,item,timestamp\n", {}, "no rows"),
    # pandas would read the first 'item' and call the second 'item.1'
    "column named twice": ("log_dup.csv", None, "user,item,item,timestamp\nu,i,1,5\n", {}, "names column 'item' twice"),
    "column named twice, picked renamed": (
        "log_dup2.csv",
        None,
        "user,item,item,timestamp\nu,i,1,5\n",
        {"item_col": "item.1"},
        "names column 'item' twice",
    ),
    "missing column": (
        "log_cols.csv",
        make_log().rename(columns={"item": "movie"}),
        None,
        {},
        "'item'; available: 'user', 'movie'",
    ),
    # a name that differs only by case or spaces, or is spelt close, is named; spaces around the header's names
    # (", " separators) come with a command that strips them (the IDs have them too)
    "missing column, other case": (
        "log_case.csv",
        None,
        "User,Item,Timestamp\nu,i,5\n",
        {},
        "did you mean 'User', 'Item', 'Timestamp'?",
    ),
    "missing column, spaces after the separator": (
        "log_space.csv",
        None,
        "user, item, timestamp\nu, i, 5\n",
        {},
        "did you mean ' item', ' timestamp'? Column names match exactly, case and spaces included. This header has spaces "
        "around its names, likely after each ',', and so will the IDs: remove them and prepare again, e.g. sed -E ",
    ),
    "missing column, misspelt": ("log_typo.csv", None, "usr,item,timestamp\nu,i,5\n", {}, "did you mean 'usr'?"),
    "missing column, other names": (
        "log_ids.csv",
        None,
        "user_id,item_id,time\nu,i,5\n",
        {},
        "did you mean 'user_id', 'item_id', 'time'? Column names match exactly, case and spaces included: give "
        "--user-col user_id, --item-col item_id, --time-col time.",
    ),
    "missing column parquet": (
        "log_cols.parquet",
        make_log(),
        None,
        {"time_col": "ts"},
        "available: 'user', 'item', 'timestamp'",
    ),
    "bad timestamp": (
        "log_time.csv",
        make_log().assign(timestamp=lambda d: d["timestamp"].astype(str).where(d.index != 3, "yesterday-ish")),
        None,
        {},
        "1 unparsable timestamp(s), e.g. 'yesterday-ish'",
    ),
    "missing values": ("log_na.csv", make_log().assign(item=lambda d: d["item"].mask(d.index % 50 == 0)), None, {}, "7 missing"),
    "too few left": ("log_few.csv", make_log(), None, {"n_blocks": 30}, "too few"),
    "nothing left": ("log_none.csv", make_log(), None, {"min_user": 50}, "no interactions left"),
    "base_fraction": ("log_p.csv", make_log(), None, {"base_fraction": 1.0}, "base_fraction"),
    "n_blocks": ("log_p.csv", make_log(), None, {"n_blocks": 0}, "n_blocks"),
    "min_item": ("log_p.csv", make_log(), None, {"min_item": 0}, "--min-item"),
    "same columns": ("log_p.csv", make_log(), None, {"item_col": "user"}, "must differ"),
    "text named .gz, read as text": ("log_bad.csv.gz", None, "not gzip at all", {}, "available: 'not gzip at all'"),
    "row with an extra field": (
        "log_rag.csv",
        None,
        "user,item,timestamp\n1,2,3\n4,5,6,7\n",
        {},
        "line 3 has 4 fields where the lines before it have 3",
    ),
    "corrupt parquet": ("log_bad.parquet", None, "PAR1, then not parquet", {}, "the Parquet file is truncated or corrupt"),
    "text named parquet": ("log_txt.parquet", None, "user,item,timestamp\n", {}, "looks like text, not Parquet"),
    "zip named csv": ("log_zip.csv", None, "PK\x03\x04 and more", {}, "looks like a zip archive, not a log; unpack it"),
}


@pytest.mark.parametrize("case", list(BAD_LOGS))
def test_bad_input_raises_one_line_error_and_leaves_nothing(tmp_path, case):
    name, df, text, kw, needle = BAD_LOGS[case]
    log = tmp_path / name if case == "missing file" else _write(tmp_path, name, df, text)
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(log, tmp_path / "out", **{**KW, **kw})
    msg = str(exc.value)
    assert name in msg and "\n" not in msg and needle in msg
    assert leftovers(tmp_path) == []


def test_non_empty_output_without_force_is_refused(tmp_path):
    make_log().to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):  # no --force hint for a directory --force would not replace either
        with pytest.raises(
            CcdrecError,
            match=r"out already exists and is not a stream directory \(no universe.csv\); give --out a new directory$",
        ):
            prepare_stream(tmp_path / "log.csv", out, force=force, **KW)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == ["out"]
    prepare_stream(tmp_path / "log.csv", tmp_path / "s", **KW)
    with pytest.raises(CcdrecError, match=r"already holds a stream \(use --force to replace it\)$"):
        prepare_stream(tmp_path / "log.csv", tmp_path / "s", **KW)


def test_force_refuses_to_delete_the_log_itself(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "universe.csv").write_text("block,users,items\n")
    make_log().to_csv(out / "log.csv", index=False)
    with pytest.raises(CcdrecError, match="log.csv.*inside the output"):
        prepare_stream(out / "log.csv", out, force=True, **KW)
    assert (out / "log.csv").exists()


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    make_log().to_csv(tmp_path / "log.csv", index=False)

    def half_save(stream, path):
        (path / "interactions.csv.gz").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod, "save_stream", half_save)
    with pytest.raises(CcdrecError, match="disk full"):
        prepare_stream(tmp_path / "log.csv", tmp_path / "sub" / "out", **KW)
    assert not (tmp_path / "sub" / "out").exists() and list((tmp_path / "sub").iterdir()) == []


def test_vocab_round_trip_keeps_ids_that_look_like_numbers(tmp_path):
    rows = [(f"00{u}", f"NA{i}" if i else "NA", u * 12 + i) for u in range(12) for i in range(12)]
    _chain_log(rows).to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    assert set(stream.user_vocab) == {f"00{u}" for u in range(12)}
    assert "NA" in set(stream.item_vocab)


# --- timestamps: one reading per column -----------------------------------------------------

DMY = "%d/%m/%Y %H:%M"
MDY = "%m/%d/%Y %H:%M"


def dated_log(fmt: str = DMY, n: int = 60, step_hours: int = 36) -> tuple[pd.DataFrame, pd.DatetimeIndex]:
    """``u{i%6},i{i:02d},<date>``: one interaction every ``step_hours`` from 2024-01-01, rows in time order."""
    times = pd.date_range("2024-01-01", periods=n, freq=f"{step_hours}h")
    log = pd.DataFrame({"user": [f"u{i % 6}" for i in range(n)], "item": [f"i{i:02d}" for i in range(n)]})
    return log.assign(timestamp=times.strftime(fmt)), times


DATED_KW = dict(min_user=1, min_item=1, base_fraction=0.5, n_blocks=2, seed=0)
DATED_BLOCK_ITEMS = [[f"i{i:02d}" for i in range(30)], [f"i{i:02d}" for i in range(30, 45)], [f"i{i:02d}" for i in range(45, 60)]]


def new_items(stream) -> list[list[str]]:
    return [list(stream.item_vocab[b.prev_items : b.n_items]) for b in stream]


@pytest.mark.parametrize("fmt", [DMY, MDY, "%d.%m.%Y %H:%M", "%Y/%m/%d %H:%M", "%d/%m/%y %I:%M %p", "%m-%d-%Y %H:%M:%S"])
def test_dates_are_read_with_one_format_decided_by_the_whole_column(tmp_path, fmt):
    # 02/01/2024 is 2 January here because 13/01/2024 is in the same column (and 01/13/2024 makes it month-first)
    log, times = dated_log(fmt)
    keys = prepare_mod._time_keys(log["timestamp"], tmp_path / "log.csv", "timestamp")
    assert list(pd.to_datetime(keys)) == list(times)
    log.to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **DATED_KW)
    assert list(stream.item_vocab) == [f"i{i:02d}" for i in range(60)]  # first appearance = the true time order
    assert new_items(stream) == DATED_BLOCK_ITEMS


def test_time_format_decides_an_ambiguous_column(tmp_path):
    log, times = dated_log(DMY, n=40, step_hours=7)  # 01/01/2024 .. 12/01/2024: no field exceeds 12
    log.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(tmp_path / "log.csv", tmp_path / "out", **DATED_KW)
    msg = str(exc.value)
    assert "log.csv" in msg and "ambiguous" in msg and "\n" not in msg
    assert "--time-format '%m/%d/%Y %H:%M' or '%d/%m/%Y %H:%M'" in msg
    assert leftovers(tmp_path) == []
    for fmt, expected in ((DMY, times), (MDY, pd.to_datetime(log["timestamp"], format=MDY))):
        keys = prepare_mod._time_keys(log["timestamp"], tmp_path / "log.csv", "timestamp", time_format=fmt)
        assert list(pd.to_datetime(keys)) == list(expected)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", time_format=DMY, **{**DATED_KW, "n_blocks": 1})
    assert list(stream.item_vocab) == [f"i{i:02d}" for i in range(40)]


def test_iso_8601_timestamps_with_zones_and_offsets(tmp_path):
    values = ["2024-01-02", "2024-01-02T03:04:05Z", "2024-01-02T03:04:05+02:00", "2024-01-02 00:30", "2024-01-13T00:00"]
    keys = prepare_mod._time_keys(pd.Series(values), tmp_path / "log.csv", "timestamp")
    expected = ["2024-01-02 00:00:00", "2024-01-02 03:04:05", "2024-01-02 01:04:05", "2024-01-02 00:30:00", "2024-01-13 00:00:00"]
    assert list(pd.to_datetime(keys)) == [pd.Timestamp(t) for t in expected]


def mixed_dates(d: pd.DataFrame) -> pd.Series:
    iso = pd.to_datetime(d["timestamp"], format=DMY).dt.strftime("%Y-%m-%dT%H:%M")
    return d["timestamp"].where(d.index % 2 == 0, iso)


BAD_DATES = {
    # no first or second field above 12: day-first and month-first both read every value
    "ambiguous": (dated_log(DMY, n=40, step_hours=7)[0], "ambiguous: every value reads as"),
    # 13/01/2024 and 01/13/2024 in one column: neither order reads them all
    "both orders": (
        dated_log(DMY)[0].assign(timestamp=lambda d: d["timestamp"].where(d.index != 59, "01/13/2024 00:00")),
        "1 unparsable timestamp(s), e.g. '01/13/2024 00:00'",
    ),
    "iso and slashed": (dated_log(DMY)[0].assign(timestamp=mixed_dates), "30 unparsable timestamp(s)"),
    "unix and iso": (
        make_log().assign(timestamp=lambda d: d["timestamp"].astype(str).where(d.index != 5, "2024-01-02")),
        "1 unparsable timestamp(s), e.g. '2024-01-02'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATES))
def test_undecidable_or_mixed_date_columns_are_one_line_errors(tmp_path, case):
    log, needle = BAD_DATES[case]
    log.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(tmp_path / "log.csv", tmp_path / "out", **DATED_KW)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'log.csv'}: column 'timestamp'") and needle in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


NON_FINITE = {
    "csv inf": ("log.csv", "inf", "'inf'"),
    "csv -inf": ("log.csv", "-inf", "'-inf'"),
    "csv 1e300": ("log.csv", "1e300", "'1e300'"),
    "csv nan": ("log.csv", "nan", "'nan'"),
    "csv year 9999": ("log.csv", "9999-01-01", None),
    "csv before 1900": ("log.csv", "1899-12-31", None),
    "parquet inf": ("log.parquet", np.inf, "inf"),
    "parquet -inf": ("log.parquet", -np.inf, "-inf"),
    "parquet 1e300": ("log.parquet", 1e300, "1e+300"),
    "parquet datetime 2300": ("log.parquet", pd.Timestamp("2300-01-01"), "Timestamp('2300-01-01 00:00:00')"),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_and_out_of_range_timestamps_are_unparsable(tmp_path, case):
    name, value, shown = NON_FINITE[case]
    log = make_log()
    if isinstance(value, pd.Timestamp):
        ts = (T0 + pd.to_timedelta(log["timestamp"], unit="s")).astype("datetime64[us]")
        ts.iloc[7] = value
    elif isinstance(value, float):
        ts = log["timestamp"].astype(float)
        ts.iloc[7] = value
    else:
        ts = (
            (T0 + pd.to_timedelta(log["timestamp"], unit="s")).dt.strftime("%Y-%m-%d %H:%M:%S")
            if "-" in value[1:]
            else log["timestamp"].astype(str)
        )
        ts.iloc[7] = value
    path = _write(tmp_path, name, log.assign(timestamp=ts))
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(path, tmp_path / "out", **KW)
    msg = str(exc.value)
    if "1e300" in case:  # a number, read in the unit of the other rows
        assert f"{path}: column 'timestamp' has 1 timestamp(s) outside 1900-01-01..2199-12-31 UTC when read as seconds " in msg
        assert f"(the unit of the other {len(log) - 1:,} rows), e.g. {shown} in data row 8 (far past 2199): fix or " in msg
    else:
        assert f"{path}: column 'timestamp' has 1 unparsable timestamp(s), e.g. {shown or repr(value)}" in msg
    assert "1900-01-01..2199-12-31" in msg and "\n" not in msg
    assert leftovers(tmp_path) == []


def test_millisecond_and_nanosecond_numbers_are_timestamps(tmp_path):
    raw = make_log()
    ms = raw["timestamp"] * 1000 + 1_600_000_000_000  # 13 digits
    keys = prepare_mod._time_keys(ms.astype(str), tmp_path / "log.csv", "timestamp")
    assert keys.dtype == np.int64 and list(keys) == list(ms)
    ns = pd.Series([1_700_000_000_000_000_001, 1_700_000_000_000_000_002, 1_700_000_000_000_000_000])
    assert list(np.argsort(prepare_mod._time_keys(ns.astype(str), tmp_path / "log.csv", "t"), kind="stable")) == [2, 0, 1]
    raw.assign(timestamp=ms).to_csv(tmp_path / "log.csv", index=False)
    prepare_stream(tmp_path / "log.csv", tmp_path / "a", time_unit="ms", **KW)
    raw.to_csv(tmp_path / "log2.csv", index=False)
    prepare_stream(tmp_path / "log2.csv", tmp_path / "b", **KW)
    assert stream_files(tmp_path / "a") == stream_files(tmp_path / "b")  # same order as the seconds
    with pytest.raises(CcdrecError, match=r"outside 1900-01-01..2199-12-31 UTC when read as seconds \(given by --time-unit\), "
                       r"e\.g\. '16\d{11}' in data row 1 .*; --time-unit ms \(milliseconds\) reads them within"):  # fmt: skip
        prepare_stream(tmp_path / "log.csv", tmp_path / "c", time_unit="s", **KW)


# --- IDs round-trip; nothing left behind -----------------------------------------------------

WEIRD_IDS = [
    "a\rb", "c\nd", "e\r\nf", "\r", "x,y", 'say "hi"', "tab\there", "nul\x00", "trail\x00", "\x00", "ünï😀", " lead",
    "trail ", "NA", "null", "None", "nan", "N/A", "#", "007", "1e3", "-", "\\", "\u2028", "'", "[1]", '"', "\x1b[0m",
]  # fmt: skip


@pytest.mark.parametrize("name", ["log.csv", "log.csv.gz", "log.parquet"])
def test_any_string_id_round_trips(tmp_path, name):
    import csv
    import json

    users = WEIRD_IDS[:12]
    rows = [(u, i, n * 12 + k) for n, u in enumerate(users) for k, i in enumerate(WEIRD_IDS) if (n + k) % 3]
    log = _chain_log(rows)
    path = tmp_path / name
    if name.endswith(".parquet"):
        log.to_parquet(path)
    else:
        log.to_csv(path, index=False, quoting=csv.QUOTE_ALL)  # a valid CSV: every field quoted
    stream = prepare_stream(path, tmp_path / "out", **KW)
    ref = reference(log, **KW)
    assert list(stream.user_vocab) == list(pd.unique(ref["user"])) and set(stream.user_vocab) == set(users)
    assert list(stream.item_vocab) == list(pd.unique(ref["item"])) and set(stream.item_vocab) == set(WEIRD_IDS)
    again = load_stream(tmp_path / "out")
    assert list(again.user_vocab) == list(stream.user_vocab) and list(again.item_vocab) == list(stream.item_vocab)
    assert again.item_vocab.dtype == object and all(type(v) is str for v in again.item_vocab)
    assert json.loads((tmp_path / "out" / "items.json").read_text()) == list(stream.item_vocab)
    assert (tmp_path / "out" / "items.json").read_bytes().isascii()
    assert leftovers(tmp_path) == ["out"]


def test_vocabularies_of_earlier_versions_are_still_read(tmp_path):
    make_log().to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    for kind, vocab in (("users", stream.user_vocab), ("items", stream.item_vocab)):
        (tmp_path / "out" / f"{kind}.json").unlink()
        pd.DataFrame({"id": np.arange(len(vocab)), "original": vocab}).to_csv(tmp_path / "out" / f"{kind}.csv", index=False)
    old = load_stream(tmp_path / "out")
    assert list(old.user_vocab) == list(stream.user_vocab) and list(old.item_vocab) == list(stream.item_vocab)


def _corrupt_users(stream, path):
    from ccdrec.data.stream import save_stream

    save_stream(stream, path)
    (path / "users.json").write_text('["only one"]')


def _different_users(stream, path):
    from ccdrec.data.stream import save_stream

    save_stream(stream, path)
    (path / "users.json").write_text(json.dumps([f"{v}!" for v in stream.user_vocab]))


def _bug(stream, path):
    (path / "interactions.csv.gz").write_text("partial")
    raise RuntimeError("a bug, not a user mistake")


@pytest.mark.parametrize(
    "save, error, needle",
    [
        (_corrupt_users, CcdrecError, "does not read back"),
        (_different_users, CcdrecError, "does not read back as written (the user vocabulary differs)"),
        (_bug, RuntimeError, "a bug"),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_a_stream_that_does_not_read_back_leaves_nothing(tmp_path, monkeypatch, save, error, needle, existing):
    make_log().to_csv(tmp_path / "log.csv", index=False)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "universe.csv").write_text("block,users,items\n")  # a stream --force may replace
        (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(prepare_mod, "save_stream", save)
    with pytest.raises(error) as exc:
        prepare_stream(tmp_path / "log.csv", out, force=existing, **KW)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert leftovers(tmp_path) == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "universe.csv"]


# --- headerless, tab-separated, gzip, ratings --------------------------------------------------


def udata_like(rng_seed: int = 3) -> pd.DataFrame:
    """A small log shaped like MovieLens u.data: user, item, rating 1..5, unix seconds (with ties)."""
    rng = np.random.default_rng(rng_seed)
    rows = [(u, int(i), int(rng.integers(1, 6)), 880_000_000 + int(rng.integers(0, 500)) * 60)
            for u in range(1, 41) for i in rng.choice(np.arange(1, 31), 12, replace=False)]  # fmt: skip
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


@pytest.mark.parametrize("name, sep", [("u.data.gz", "\\t"), ("u.data", "tab"), ("ratings.tsv", None), ("export.bin", "\t")])
def test_headerless_tab_separated_log(tmp_path, name, sep):
    log = udata_like()
    text = log.to_csv(sep="\t", header=False, index=False)
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode())) if name.endswith((".gz", ".bin")) else path.write_text(text)
    kw = {"file_format": "csv"} if name == "export.bin" else {}  # no telling extension: --format; gzip is sniffed
    columns = "user,item,rating,timestamp"
    stream = prepare_stream(path, tmp_path / "out", sep=sep, header=False, columns=columns, **kw, **KW)
    ref = reference(log.astype({"user": str, "item": str}), **KW)
    assert list(stream.user_vocab) == list(pd.unique(ref["user"])) and list(stream.item_vocab) == list(pd.unique(ref["item"]))
    pairs = pd.concat([original_pairs(stream, b) for b in stream])
    assert set(map(tuple, pairs.to_numpy())) <= set(zip(ref["user"], ref["item"], strict=True))
    assert 0.9 * len(ref) <= len(pairs) <= len(ref)


def test_min_rating_keeps_well_rated_interactions(tmp_path):
    log = udata_like()
    log.to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", rating_col="rating", min_rating=4, **KW)
    ref = reference(log[log["rating"] >= 4].astype({"user": str, "item": str}), **KW)
    assert list(stream.user_vocab) == list(pd.unique(ref["user"])) and list(stream.item_vocab) == list(pd.unique(ref["item"]))
    pairs = pd.concat([original_pairs(stream, b) for b in stream])
    good = set(zip(log["user"].astype(str), log["item"].astype(str), strict=True)) - set(
        zip(log.loc[log["rating"] < 4, "user"].astype(str), log.loc[log["rating"] < 4, "item"].astype(str), strict=True)
    )
    assert set(map(tuple, pairs.to_numpy())) <= good


UDATA = udata_like().to_csv(sep="\t", header=False, index=False)
BAD_OPTIONS = {
    "no header without columns": ("u.data", UDATA, {"sep": "\t", "header": False}, "--no-header needs --columns"),
    "columns without no-header": ("u.data", UDATA, {"sep": "\t", "columns": "user,item,rating,timestamp"}, "give --no-header"),
    "column count": (
        "u.data",
        UDATA,
        {"sep": "\t", "header": False, "columns": "user,item,timestamp"},
        "--columns names 3 column(s) (user,item,timestamp) but the file has 4",
    ),
    "duplicate column name": ("u.data", UDATA, {"header": False, "columns": "user,item,user,timestamp"}, "'user' more than once"),
    "wrong separator": ("u.data", UDATA, {}, "give --sep"),
    "header looks like data": ("u.data", UDATA, {"sep": "\t"}, "give --no-header --columns"),
    "blank multi-char sep": ("u.data", UDATA, {"sep": "  "}, "--sep must be one character, 'tab'"),
    "sep with a quote": ("u.data", UDATA, {"sep": 'a"b'}, "without quotes or line breaks"),
    "min rating without column": ("log.csv", None, {"min_rating": 4}, "--min-rating needs --rating-col"),
    "rating column without min": ("log.csv", None, {"rating_col": "rating"}, "--rating-col needs --min-rating"),
    "rating column missing": ("log.csv", None, {"rating_col": "stars", "min_rating": 4}, "missing column(s) 'stars'"),
    "rating not numeric": (
        "log.csv",
        "user,item,timestamp,rating\n" + "u,i,1,good\n" * 30,
        {"rating_col": "rating", "min_rating": 4},
        "column 'rating' has 30 non-numeric rating(s), e.g. 'good'",
    ),
    "nothing rated enough": (
        "log.csv",
        None,
        {"rating_col": "rating", "min_rating": 9},
        "no interaction has a 'rating' of at least 9",
    ),
    "unknown format": ("u.data", UDATA, {"file_format": "xlsx"}, "--format must be one of csv, parquet"),
    "name that tells nothing, text": ("u.item", UDATA, {}, "give --sep tab --no-header --columns"),
    "sep for parquet": ("log.parquet", None, {"sep": ";"}, "apply to text logs, not Parquet"),
    "time unit": ("log.csv", None, {"time_unit": "days"}, "--time-unit must be one of s, ms, us, ns"),
    "format and unit": ("log.csv", None, {"time_unit": "s", "time_format": "%Y"}, "not both"),
    "bad time format": ("log.csv", None, {"time_format": "%Q"}, "invalid time format '%Q'"),
    "time format for numbers": ("log.parquet", None, {"time_format": "%Y"}, "holds numbers"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_reading_options_are_one_line_errors(tmp_path, case):
    name, text, kw, needle = BAD_OPTIONS[case]
    path = _write(tmp_path, name, udata_like(), text)
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(path, tmp_path / "out", **{**KW, **kw})
    msg = str(exc.value)
    assert str(path) in msg and needle in msg and "\n" not in msg
    assert leftovers(tmp_path, keep=("log", "u.")) == []


MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "u.data.gz"


@pytest.mark.slow
@pytest.mark.skipif(not MOVIELENS.exists(), reason=f"MovieLens 100K not found at {MOVIELENS} (shared data, not in the repo)")
def test_movielens_100k_through_the_cli(tmp_path):
    columns = ["user", "item", "rating", "timestamp"]
    raw = pd.read_csv(MOVIELENS, sep="\t", header=None, names=columns, dtype=str)
    assert (len(raw), raw["user"].nunique(), raw["item"].nunique()) == (100_000, 943, 1_682)
    args = ["data", "prepare", str(MOVIELENS), "--sep", "\\t", "--no-header", "--columns", ",".join(columns)]
    for extra, kept in (([], raw), (["--rating-col", "rating", "--min-rating", "4"], raw[raw["rating"].astype(int) >= 4])):
        out = tmp_path / f"ml{len(extra)}"
        res = ccdrec(*args, "--out", str(out), *extra)
        assert res.returncode == 0, res.stderr
        stream = load_stream(out)
        ref = reference(kept.assign(timestamp=kept["timestamp"].astype(np.int64)), min_user=10, min_item=10)
        assert (stream.n_users, stream.n_items) == (ref["user"].nunique(), ref["item"].nunique())
        assert list(stream.user_vocab) == list(pd.unique(ref["user"])) and list(stream.item_vocab) == list(pd.unique(ref["item"]))
        pairs = pd.concat([original_pairs(stream, b) for b in stream])
        assert set(map(tuple, pairs.to_numpy())) <= set(zip(ref["user"], ref["item"], strict=True))
        assert 0.99 * len(ref) <= len(pairs) <= len(ref)
        assert f"wrote {out}: 6 blocks, {ref['user'].nunique():,} users, {ref['item'].nunique():,} items" in res.stdout
    assert (stream.n_users, len(ref)) != (943, 100_000)  # the rating filter did something


# --- notes, the CLI --------------------------------------------------------------------------


def test_blocks_without_evaluation_users_or_new_users_are_noted(tmp_path):
    # every item once: no valid/test item is trained on in its block; all 6 users appear in D_0
    dated_log()[0].to_csv(tmp_path / "log.csv", index=False)
    with pytest.warns(prepare_mod.PrepareWarning) as caught:
        prepare_stream(tmp_path / "log.csv", tmp_path / "out", **DATED_KW)
    notes = [str(w.message) for w in caught if w.category is prepare_mod.PrepareWarning]
    assert [n.split(" (")[0] for n in notes] == [
        "log.csv: 60 rows read; 60 interactions kept, 36 of them in the splits",  # the rows accounted for, first
        "block 0 has no valid and no test users",
        "block 1 has no valid and no test users",
        "incremental block 1 has no new users",
        "block 2 has no valid and no test users",
        "incremental block 2 has no new users",
        "24 held-out interaction(s) left out",  # every valid / test item is untrained in its block
    ]
    growing = make_log(n_users=60)
    growing["timestamp"] += growing["user"].str.removeprefix("u").replace("lonely", "0").astype(int) * 10**6  # users join in turn
    growing["timestamp"] += 1_600_000_000  # in 2020 (in 1970 they would be noted: a likely wrong unit)
    growing.to_csv(tmp_path / "log2.csv", index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", prepare_mod.PrepareWarning)
        prepare_stream(tmp_path / "log2.csv", tmp_path / "out2", **{**KW, "n_blocks": 1})
    notes = [str(w.message) for w in caught if w.category is prepare_mod.PrepareWarning]
    assert len(notes) == 1 and notes[0].startswith("log2.csv: 483 rows read; ")  # a healthy stream: the accounting alone


def ccdrec(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "from ccdrec.cli import main; main()", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_prints_the_stream_it_wrote_and_notes(tmp_path):
    dated_log()[0].to_csv(tmp_path / "log.csv", index=False)
    args = ["--min-user", "1", "--min-item", "1", "--blocks", "2"]
    res = ccdrec("data", "prepare", "log.csv", "--out", "yelp", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote yelp: 3 blocks, 6 users, 60 items" in res.stdout
    assert "stream yelp" in res.stdout and "12,248" not in res.stdout  # not the bundled Yelp table
    table = [line.split("│")[1:-1] for line in res.stdout.splitlines() if line.startswith("│")]
    assert [[c.strip() for c in row[:5]] for row in table] == [
        ["0", "6", "30", "6", "30"],
        ["1", "6", "45", "0", "15"],
        ["2", "6", "60", "0", "15"],
    ]
    # the same note of several blocks is given once (merged_block_notes)
    assert "note: blocks 0-2 (3 blocks) have no valid and no test users" in res.stderr
    assert "note: incremental blocks 1-2 (2 blocks) have no new users (every user in them appeared" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_bad_input_is_one_error_line_and_exit_2(tmp_path):
    dated_log(DMY, n=40, step_hours=7)[0].to_csv(tmp_path / "log.csv", index=False)
    res = ccdrec("data", "prepare", str(tmp_path / "log.csv"), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'log.csv'}: column 'timestamp' is ambiguous")
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert leftovers(tmp_path) == []


# --- property: any small log either fails cleanly or maps back to its filtered pairs ----------

ID_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=4)  # any code point but surrogates
FORMS = {
    "unix": lambda t: str(1_700_000_000 + t),
    "iso": lambda t: (T0 + pd.Timedelta(seconds=t)).isoformat() + "Z",
    "dmy": lambda t: (T0 + pd.Timedelta(seconds=t)).strftime(DMY),
}


@st.composite
def small_logs(draw):
    tiny = draw(st.integers(0, 3)) == 3
    users = draw(st.lists(ID_TEXT, min_size=1 if tiny else 5, max_size=8, unique=True))
    items = draw(st.lists(ID_TEXT, min_size=1 if tiny else 5, max_size=8, unique=True))
    pairs = draw(st.permutations([(u, i) for u in users for i in items]))
    pairs = pairs[: draw(st.integers(0, 4) if tiny else st.integers(24, len(pairs)))]
    pairs += draw(st.lists(st.sampled_from(pairs), max_size=8)) if pairs else []  # repeated pairs
    # times in steps of 72 minutes over 20 days from 1 March: a day-first column is decidable only if it reaches the 13th
    times = draw(st.lists(st.integers(0, 400).map(lambda m: m * 4320), min_size=len(pairs), max_size=len(pairs)))
    form = st.sampled_from(list(FORMS))
    forms = draw(st.one_of(st.lists(form, min_size=1, max_size=1), st.lists(form, min_size=2, max_size=2)))
    which = draw(st.lists(st.integers(0, len(forms) - 1), min_size=len(pairs), max_size=len(pairs)))  # two forms: mixed
    log = pd.DataFrame(
        {"user": [u for u, _ in pairs], "item": [i for _, i in pairs], "t": times}, columns=["user", "item", "t"], dtype=object
    )
    log["timestamp"] = [FORMS[forms[w]](t) for t, w in zip(times, which, strict=True)]
    kind = draw(st.sampled_from(["log.csv", "log.csv.gz", "log.parquet"]))
    kw = dict(min_user=draw(st.sampled_from([1, 1, 2])), min_item=draw(st.sampled_from([1, 1, 2])))
    return log, kind, {**kw, "base_fraction": 0.5, "n_blocks": draw(st.sampled_from([1, 1, 2]))}


def documented_bounds(n: int, base_fraction: float, n_blocks: int) -> list[int]:
    """The cut of the module docstring: D_0 = the first round(base_fraction * n), then n_blocks equal parts."""
    n0 = int(round(base_fraction * n))
    return [0] + [n0 + int(x) for x in np.round(np.linspace(0, n - n0, n_blocks + 1))]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(small_logs())
def test_property_prepare_fails_cleanly_or_maps_back_to_the_filtered_log(case):
    import csv
    import tempfile

    log, kind, kw = case
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = d / kind
        data = log[["user", "item", "timestamp"]]
        if kind.endswith(".parquet"):
            data.astype(str).to_parquet(path)
        else:
            data.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
        try:
            stream = prepare_stream(path, d / "out", seed=0, **kw)
        except CcdrecError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            assert sorted(p.name for p in d.iterdir()) == [kind]  # no output, no temporary directory
            return
        assert sorted(p.name for p in d.iterdir()) == sorted([kind, "out"])
        ref = reference(log.rename(columns={"timestamp": "text", "t": "timestamp"}), kw["min_user"], kw["min_item"])
        assert list(stream.user_vocab) == list(pd.unique(ref["user"]))
        assert list(stream.item_vocab) == list(pd.unique(ref["item"]))
        again = load_stream(d / "out")
        assert list(again.user_vocab) == list(stream.user_vocab) and list(again.item_vocab) == list(stream.item_vocab)
        bounds = documented_bounds(len(ref), kw["base_fraction"], kw["n_blocks"])
        for b, lo, hi in zip(stream, bounds[:-1], bounds[1:], strict=True):
            expected = set(zip(ref["user"].iloc[lo:hi], ref["item"].iloc[lo:hi], strict=True))
            got = {s: set(map(tuple, original_pairs_of(stream, b, s))) for s in SPLITS}
            trained = {i for _, i in got["train"]}
            assert got["train"] | got["valid"] | got["test"] <= expected
            assert all(i in trained for _, i in got["valid"] | got["test"])
            # a pair of the block missing from every split is a valid/test pair whose item nobody trains on there
            assert all(i not in trained for _, i in expected - got["train"] - got["valid"] - got["test"])
            assert b.n_users == ref["user"].iloc[:hi].nunique() and b.n_items == ref["item"].iloc[:hi].nunique()


def original_pairs_of(stream, block, split: str) -> np.ndarray:
    pairs = block.split(split)
    return np.stack([stream.user_vocab[pairs[:, 0]], stream.item_vocab[pairs[:, 1]]], axis=1) if len(pairs) else pairs


def test_timestamps_read_in_an_unlikely_unit_are_noted(tmp_path):
    import warnings as w

    from ccdrec.data.prepare import PrepareWarning

    rows = "\n".join(f"u{i % 40},i{(i * 7) % 31},{1600000000 + 3600 * i}" for i in range(400))
    (tmp_path / "log.csv").write_text("user,item,timestamp\n" + rows + "\n")
    small = {"min_user": 2, "min_item": 2, "n_blocks": 2}
    for unit, noted in ((None, False), ("s", False), ("ns", True)):
        with w.catch_warnings(record=True) as caught:
            w.simplefilter("always")
            prepare_stream(tmp_path / "log.csv", tmp_path / f"s-{unit}", time_unit=unit, **small)
        notes = [str(c.message) for c in caught if issubclass(c.category, PrepareWarning)]
        assert any("span 1970-01-01" in n and "check the unit" in n for n in notes) == noted, notes


def test_held_out_pairs_of_items_nobody_trains_on_are_counted_in_a_note(tmp_path):
    import warnings as w

    from ccdrec.data.prepare import PrepareWarning

    rng = np.random.default_rng(0)
    items = rng.integers(0, 120, 1200)  # rare enough that some item of a block is held out only
    log = pd.DataFrame({"user": [f"u{i % 150}" for i in range(1200)], "item": [f"i{x}" for x in items]})
    log["timestamp"] = 1600000000 + 3600 * np.arange(1200)
    log.drop_duplicates(["user", "item"]).to_csv(tmp_path / "log.csv", index=False)
    n = len(log.drop_duplicates(["user", "item"]))
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        stream = prepare_stream(tmp_path / "log.csv", tmp_path / "s", min_user=2, min_item=2, n_blocks=2)
    kept = sum(len(b.split(s)) for b in stream for s in ("train", "valid", "test"))
    notes = [str(c.message) for c in caught if issubclass(c.category, PrepareWarning) and "left out" in str(c.message)]
    assert len(notes) == 1, notes
    dropped = int(notes[0].split(" ")[0].replace(",", ""))
    assert dropped > 0 and kept + dropped <= n  # <: the k-core filter may remove some first


def test_parquet_ids_as_bytes_are_text_and_containers_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    log = pd.DataFrame(
        {
            "user": [f"u{i % 100}".encode() for i in range(n)],
            "item": [f"i{x}".encode() for x in rng.integers(0, 60, n)],
            "timestamp": 1600000000 + 60 * np.arange(n),
        }
    )
    log.to_parquet(tmp_path / "b.parquet")
    small = {"min_user": 2, "min_item": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = prepare_stream(tmp_path / "b.parquet", tmp_path / "s", **small)
    assert set(stream.user_vocab) == {f"u{i}" for i in range(100)} and stream.item_vocab[0].startswith("i")
    log["user"] = [[i] for i in range(n)]
    log.to_parquet(tmp_path / "l.parquet")
    with pytest.raises(CcdrecError, match="column 'user' holds .* values, not IDs"):
        prepare_stream(tmp_path / "l.parquet", tmp_path / "l", **small)


def test_a_log_that_is_not_utf8_says_how_to_convert_it(tmp_path):
    rows = ["user,item,timestamp"] + [f"u{i % 50}\xe9,i{(i * 7) % 31},{1600000000 + 60 * i}" for i in range(2000)]
    (tmp_path / "lat.csv").write_text("\n".join(rows) + "\n", encoding="latin-1")
    with pytest.raises(CcdrecError, match=r"lat.csv: not UTF-8 text \(it holds the byte 0xe9\); convert the log to UTF-8"):
        prepare_stream(tmp_path / "lat.csv", tmp_path / "s", min_user=2, min_item=2)
    assert not (tmp_path / "s").exists()
    # a UTF-16 export (its byte order mark says so) is converted from UTF-16, not Latin-1; the command works
    (tmp_path / "wide.csv").write_text("\n".join(rows) + "\n", encoding="utf-16")
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(tmp_path / "wide.csv", tmp_path / "s", min_user=2, min_item=2)
    command = str(exc.value).split("e.g. ")[-1]
    assert command == f"iconv -f utf-16 -t utf-8 {tmp_path / 'wide.csv'} > {tmp_path / 'utf8-wide.csv'}"
    if shutil.which("iconv"):
        subprocess.run(command, shell=True, cwd="/", check=True)
        assert prepare_stream(tmp_path / "utf8-wide.csv", tmp_path / "s", min_user=2, min_item=2).user_vocab[0].endswith("\xe9")


# --- notes on what was read: the rows accounted for, unlikely timestamps, spaced IDs -------------------


def prepare_notes(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", prepare_mod.PrepareWarning)
        stream = prepare_stream(*args, **kwargs)
    return stream, [str(w.message) for w in caught if w.category is prepare_mod.PrepareWarning]


def stored_count(stream) -> int:
    return sum(len(b.stored(s)) for b in stream for s in SPLITS)


def test_a_note_accounts_for_every_row_read(tmp_path):
    log = udata_like()  # 480 rows, ratings 1..5
    repeats = log.iloc[:25].assign(timestamp=lambda d: d["timestamp"] + 7)  # 25 pairs again, later
    lonely = pd.DataFrame({"user": [999, 999], "item": [1, 2], "rating": [5, 5], "timestamp": [880_000_000] * 2})
    full = pd.concat([log, repeats, lonely], ignore_index=True)
    full.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = prepare_notes(tmp_path / "log.csv", tmp_path / "out", rating_col="rating", min_rating=3, **KW)
    rated = full[full["rating"] >= 3].astype({"user": str, "item": str})
    unique = rated.drop_duplicates(["user", "item"])
    kept = reference(rated, **KW)
    stored = stored_count(stream)
    assert len(full) > len(rated) > len(unique) > len(kept) > stored  # every step drops something here
    assert notes[0] == (
        f"log.csv: {len(full):,} rows read; {len(full) - len(rated):,} rated below 3 dropped (--min-rating); "
        f"{len(rated) - len(unique):,} repeated user-item row(s) dropped (the earliest kept); "
        f"{len(unique) - len(kept):,} removed by the k-core filter (min_user=3, min_item=3); {len(kept):,} interactions kept, "
        f"{stored:,} of them in the splits ({len(kept) - stored:,} held-out ones set aside, see below)"
    )
    assert sum(1 for n in notes if "rows read" in n) == 1
    # the command line prints it as one note line, on stderr
    res = ccdrec("data", "prepare", "log.csv", "--out", "cli", "--rating-col", "rating", "--min-rating", "3",
                 "--min-user", "3", "--min-item", "3", "--blocks", "3", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if "rows read" in line] == [f"note: {notes[0]}"]


def shuffled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    return df.sample(frac=1, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("cut", [{"n_blocks": 3}, {"window": "1h"}])
def test_the_row_order_of_the_log_does_not_change_the_stream(tmp_path, cut):
    log = udata_like()  # times in whole minutes over ~8 hours: many interactions share a second
    log = pd.concat([log, log.iloc[::9].assign(timestamp=lambda d: d["timestamp"] + 60)], ignore_index=True)  # repeats
    assert log["timestamp"].duplicated().sum() > 100
    kw = {**KW, "n_blocks": None, **cut}
    files = []
    for seed in range(4):
        shuffled(log, seed).to_csv(tmp_path / f"log{seed}.csv", index=False)
        prepare_stream(tmp_path / f"log{seed}.csv", tmp_path / f"s{seed}", **kw)
        out = tmp_path / f"s{seed}"
        record = json.loads((out / "prepare.json").read_text())
        assert len(record["rows_sha256"]) == 64  # the rows as read (data append refuses them again): the same
        files.append({**stream_files(out), "prepare.json": record})
    assert all(f == files[0] for f in files[1:])
    # the order is time, then user, then item as written: IDs by first appearance along it
    stream = load_stream(tmp_path / "s0")
    ref = reference(log.astype({"user": str, "item": str}), **KW)
    assert list(stream.user_vocab) == list(pd.unique(ref["user"])) and list(stream.item_vocab) == list(pd.unique(ref["item"]))


def test_a_log_in_another_format_than_given_says_which_it_looks_like(tmp_path):
    log = make_log()
    log.to_parquet(tmp_path / "log.parquet")
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(tmp_path / "log.parquet", tmp_path / "s", file_format="csv", **KW)
    msg = str(exc.value)
    assert "looks like Parquet" in msg and "--format parquet" in msg and "UTF-8" not in msg and "iconv" not in msg
    (tmp_path / "log.parquet").rename(tmp_path / "export.bin")  # a name that does not tell: the content does
    auto = prepare_stream(tmp_path / "export.bin", tmp_path / "auto", **KW)
    assert set(auto.user_vocab) <= set(log["user"]) and len(auto) == 4
    (tmp_path / "log.csv.gz").write_bytes(gzip.compress(log.to_csv(index=False).encode()))
    with pytest.raises(CcdrecError, match=r"log.csv.gz: looks like gzip-compressed .* --format says Parquet; give --format csv"):
        prepare_stream(tmp_path / "log.csv.gz", tmp_path / "s", file_format="parquet", **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto", "export.bin", "log.csv.gz"]


def test_numeric_timestamps_before_1980_or_in_the_future_are_noted_with_the_likely_unit(tmp_path):
    log = udata_like()  # unix seconds of 1997
    log.to_csv(tmp_path / "log.csv", index=False)
    for name, kw in {"ms": {"time_unit": "ms"}, "ms, window": {"time_unit": "ms", "window": "1m"}}.items():
        _, notes = prepare_notes(tmp_path / "log.csv", tmp_path / name, **{**KW, "n_blocks": None, **kw})
        odd = [n for n in notes if "numeric timestamps" in n]
        assert len(odd) == 1 and "read as milliseconds since 1970 (given by --time-unit) span 1970-01-11" in odd[0], notes
        assert "before 1980" in odd[0] and "--time-unit s (seconds) reads them as 1997-" in odd[0]
    for unit in ("s", None):
        _, notes = prepare_notes(tmp_path / "log.csv", tmp_path / f"fine-{unit}", time_unit=unit, **KW)
        assert not any("numeric timestamps" in n for n in notes), notes
    log.assign(timestamp=log["timestamp"] + 5_000_000_000).to_csv(tmp_path / "future.csv", index=False)  # seconds in 2155
    _, notes = prepare_notes(tmp_path / "future.csv", tmp_path / "future", **KW)
    odd = [n for n in notes if "numeric timestamps" in n]
    assert len(odd) == 1 and "after tomorrow" in odd[0] and "no unit puts them within 1980 .. tomorrow" in odd[0], notes


def test_ids_with_spaces_after_the_separator_are_kept_and_noted_with_how_to_strip_them(tmp_path):
    log = udata_like()
    rows = [f"{u}, {i}, {r}, {t}" for u, i, r, t in log.itertuples(index=False)]
    (tmp_path / "log.csv").write_text("user,item,rating,timestamp\n" + "\n".join(rows) + "\n")
    stream, notes = prepare_notes(tmp_path / "log.csv", tmp_path / "s", **KW)
    assert all(i.startswith(" ") for i in stream.item_vocab) and not any(u != u.strip() for u in stream.user_vocab)
    spaced = [n for n in notes if "whitespace" in n]
    assert len(spaced) == 1 and spaced[0].startswith(f"{len(stream.item_vocab)} item ID(s) begin or end with whitespace")
    assert "kept as written" in spaced[0]
    command = spaced[0].split("e.g. ")[-1]
    assert command.startswith("sed ") and command.endswith(f"{tmp_path / 'log.csv'} > {tmp_path / 'stripped-log.csv'}")
    if shutil.which("sed") is None:
        pytest.skip("no sed to try the command with")
    subprocess.run(command, shell=True, cwd="/", check=True)  # the paths as given: it runs from anywhere
    clean, notes = prepare_notes(tmp_path / "stripped-log.csv", tmp_path / "clean", **KW)
    assert not any("whitespace" in n for n in notes)
    assert list(clean.item_vocab) == [i.strip() for i in stream.item_vocab] and stream_files(tmp_path / "clean").keys()


@pytest.mark.parametrize("name", ["log.csv", "log.tsv", "log.csv.gz"])
def test_a_header_with_spaces_after_the_separator_comes_with_a_command_that_fixes_the_log(tmp_path, name):
    """The command in the error runs as written from any directory, and the log it writes prepares."""
    if shutil.which("sed") is None or shutil.which("zcat") is None:
        pytest.skip("no sed / zcat to try the command with")
    sep = "\t" if ".tsv" in name else ","
    log = udata_like()
    lines = [sep.join(["user", " item", " rating", " timestamp"])]
    lines += [sep.join([str(u), f" {i}", f" {r}", f" {t}"]) for u, i, r, t in log.itertuples(index=False)]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "in dir" / name  # a directory, and a space in it
    path.parent.mkdir()
    path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(path, tmp_path / "s", **KW)
    msg = str(exc.value)
    assert "did you mean ' item', ' timestamp'?" in msg and "\n" not in msg
    command = msg.split("e.g. ")[-1].removesuffix(")")
    subprocess.run(command, shell=True, cwd="/", check=True)
    fixed = path.with_name(f"stripped-{name}")
    stream = prepare_stream(fixed, tmp_path / "s", **KW)
    assert not any(i != i.strip() for i in stream.item_vocab) and len(stream.item_vocab) > 0


def test_data_info_counts_the_held_out_interactions_prepare_left_out(tmp_path):
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user": [f"u{i % 150}" for i in range(1200)], "item": [f"i{x}" for x in rng.integers(0, 120, 1200)]})
    log["timestamp"] = 1600000000 + 3600 * np.arange(1200)
    log.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = prepare_notes(tmp_path / "log.csv", tmp_path / "s", min_user=2, min_item=2, n_blocks=2)
    left = next(n for n in notes if "left out (per block D_0..D_2: " in n)
    per_block = [int(x) for x in left.split("D_0..D_2: ")[1].split(")")[0].split(" / ")]
    assert sum(per_block) > 0
    table = load_stream(tmp_path / "s").summary()
    assert table["left_out"].tolist() == per_block  # what prepare left out, per block
    assert (table["dropped_valid"] == 0).all() and (table["dropped_test"] == 0).all()  # (another count: see the note)
    kept = int(notes[0].split("; ")[-1].split(" interactions kept")[0].replace(",", ""))
    assert stored_count(stream) + sum(per_block) == kept
    res = ccdrec("data", "info", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    header = next(line for line in res.stdout.splitlines() if "left_out" in line)
    assert header.index("test") < header.index("left_out") < header.index("dropped_valid")
    assert f"left_out: {sum(per_block):,} held-out interaction(s) set aside" in res.stderr  # notes on stderr, as prepare's
    assert "note:" not in res.stdout


def write_log(path: Path, header: str, rows: list[str]) -> Path:
    text = "\n".join([header, *rows]) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


@pytest.mark.parametrize("name, body", [("log.csv", "\t"), ("log.csv.gz", "\t"), ("log.csv", ";")])
def test_rows_separated_unlike_the_header_are_named_with_a_command_that_fixes_the_header(tmp_path, name, body):
    """A comma header over tab- (or semicolon-) separated rows reads as one field per row: the error names the
    line and what it holds, and its command, run from anywhere, gives a log that prepares as a clean one."""
    if shutil.which("sed") is None or shutil.which("zcat") is None:
        pytest.skip("no sed / zcat to try the command with")
    log = udata_like()
    rows = [body.join(map(str, r)) for r in log.itertuples(index=False)]
    (tmp_path / "in dir").mkdir()  # a directory, and a space in it
    path = write_log(tmp_path / "in dir" / name, "user,item,rating,timestamp", rows)
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(path, tmp_path / "s", **KW)
    msg = str(exc.value)
    alt = {"\t": "tab", ";": "semicolon"}[body]
    what = f"line 2 (data row 1) has 1 field(s), {rows[0]!r}, where the header names 4"
    assert f"column 'item' has {len(log)} missing value(s): {what}" in msg
    assert f"the rows are {alt}-separated under a comma-separated header" in msg and "\n" not in msg
    subprocess.run(msg.split("e.g. ")[-1], shell=True, cwd="/", check=True)
    flag = msg.split("give --sep ")[1].split(",")[0].strip("'")
    fixed = prepare_stream(path.with_name(f"header-{name}"), tmp_path / "fixed", sep=flag, **KW)
    log.to_csv(tmp_path / "clean.csv", index=False)
    clean = prepare_stream(tmp_path / "clean.csv", tmp_path / "clean", **KW)
    assert stream_files(tmp_path / "fixed") == stream_files(tmp_path / "clean")
    assert list(fixed.item_vocab) == list(clean.item_vocab)


def test_short_rows_and_empty_fields_are_named_by_line(tmp_path):
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    short = rows[:6] + ["", "7,3,5"] + rows[6:]  # a blank line (skipped) and a row without its timestamp at line 9
    with pytest.raises(CcdrecError, match=r"column 'timestamp' has 1 missing value\(s\): line 9 \(data row 7\) has 3 "
                       r"field\(s\), '7,3,5', "
                       r"where the header names 4; fill or remove the short rows$"):  # fmt: skip
        prepare_stream(write_log(tmp_path / "short.csv", "user,item,rating,timestamp", short), tmp_path / "s", **KW)
    empty = rows[:3] + ["7,,5,880000000"] + rows[3:]
    with pytest.raises(CcdrecError, match=r"column 'item' has 1 missing value\(s\), e.g. line 5 \(data row 4\): "
                       r"'7,,5,880000000' \(an empty "
                       r"field\); fill or remove such rows$"):  # fmt: skip
        prepare_stream(write_log(tmp_path / "empty.csv", "user,item,rating,timestamp", empty), tmp_path / "s", **KW)


def test_rows_with_more_fields_than_the_header_are_refused_and_a_separator_ending_every_line_is_read(tmp_path):
    """pandas reads a row's surplus leading fields as row labels and shifts every column: refused, naming
    the line. A separator at the end of every line (an empty last field) is read as the fields it ends."""
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    with pytest.raises(CcdrecError, match=r"the rows have more fields than the header names \(line 2: 4 fields, the header "
                       r"names 3\), so every column would be read shifted; name every field in the header line$"):  # fmt: skip
        prepare_stream(write_log(tmp_path / "extra.csv", "user,item,timestamp", rows), tmp_path / "s", **KW)
    trailing = prepare_stream(
        write_log(tmp_path / "trailing.csv", "user,item,rating,timestamp", [r + "," for r in rows]), tmp_path / "t", **KW
    )
    log.to_csv(tmp_path / "clean.csv", index=False)
    clean = prepare_stream(tmp_path / "clean.csv", tmp_path / "clean", **KW)
    assert stream_files(tmp_path / "t") == stream_files(tmp_path / "clean")
    assert list(trailing.user_vocab) == list(clean.user_vocab) and list(trailing.item_vocab) == list(clean.item_vocab)


def test_per_block_counts_list_every_block_when_few_and_only_the_counted_ones_when_many():
    assert prepare_mod._per_block(0, [0, 3, 1]) == "per block D_0..D_2: 0 / 3 / 1"
    assert prepare_mod._per_block(0, [0] * 20 + [2] + [0] * 5 + [1, 0]) == "in D_20: 2, D_26: 1"
    many = prepare_mod._per_block(1, [1] * 15)
    assert many.startswith("in D_1: 1, D_2: 1") and many.endswith("D_12: 1 and 3 more blocks")


def test_one_timestamp_in_another_unit_is_named_not_a_reason_to_read_the_column_in_another_unit(tmp_path):
    """Seconds of 2021 with one value that is the year 2300 in seconds: it used to make the whole column
    milliseconds (every row in 1970) with a vague note; now that row is named."""
    log = make_log()
    log["timestamp"] = log["timestamp"] + 1_610_000_000
    log.loc[5, "timestamp"] = 10_413_792_000
    log.to_csv(tmp_path / "far.csv", index=False)
    with pytest.raises(CcdrecError, match=r"has 1 timestamp\(s\) outside 1900-01-01..2199-12-31 UTC when read as seconds "
                       rf"\(the unit of the other {len(log) - 1:,} rows\), e.g. '10413792000' in data row 6 "
                       r"\(the year 229\d\): fix or remove"):  # fmt: skip
        prepare_stream(tmp_path / "far.csv", tmp_path / "s", **KW)
    log.loc[5, "timestamp"] = 1_610_000_000
    log.loc[:9, "timestamp"] = log.loc[:9, "timestamp"] * 1000  # ten rows in milliseconds
    log.to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(CcdrecError, match=r"has 10 timestamp\(s\) outside .* in milliseconds they would fall within 1980 .. "
                       r"tomorrow \(a column mixing units\?\)"):  # fmt: skip
        prepare_stream(tmp_path / "mixed.csv", tmp_path / "s", **KW)


def test_timestamps_all_equal_are_noted_as_such_not_as_a_wrong_unit(tmp_path):
    log = make_log().assign(timestamp=1_600_000_000)
    log.to_csv(tmp_path / "same.csv", index=False)
    _, notes = prepare_notes(tmp_path / "same.csv", tmp_path / "s", **KW)
    same = next(n for n in notes if "within one minute" in n)
    assert "the blocks follow the order of ties (user, then item), not time" in same and "no unit" not in same


@pytest.mark.parametrize("sep, flag", [("::", "'::'"), ("  ", "whitespace"), (" \t ", "whitespace")])
def test_movielens_1m_and_whitespace_aligned_logs_are_guessed_and_read(tmp_path, sep, flag):
    """``u::i::r::t`` (MovieLens 1M, no header) and columns aligned by runs of spaces: the errors name the
    separator that splits the line, and with it the log prepares as the same rows written with tabs do."""
    log = udata_like()
    (tmp_path / "ratings.dat").write_text("\n".join(sep.join(map(str, r)) for r in log.itertuples(index=False)) + "\n")
    cols = "user,item,rating,timestamp"
    at = "at whitespace" if flag == "whitespace" else f"at each {sep!r}"
    with pytest.raises(CcdrecError, match=rf"but the file has 1 \(separated by ','\); split {at} it has 4: give --sep {flag}$"):
        prepare_stream(tmp_path / "ratings.dat", tmp_path / "s", header=False, columns=cols, **KW)
    with pytest.raises(CcdrecError, match=rf"split {at} it has 4, which look like data: give --sep {flag} --no-header"):
        prepare_stream(tmp_path / "ratings.dat", tmp_path / "s", **KW)
    got = prepare_stream(tmp_path / "ratings.dat", tmp_path / "s", sep=flag.strip("'"), header=False, columns=cols, **KW)
    log.to_csv(tmp_path / "u.tsv", sep="\t", index=False, header=False)
    want = prepare_stream(tmp_path / "u.tsv", tmp_path / "t", header=False, columns=cols, **KW)
    assert stream_files(tmp_path / "s") == stream_files(tmp_path / "t")
    assert list(got.user_vocab) == list(want.user_vocab) and list(got.item_vocab) == list(want.item_vocab)


def test_reading_errors_say_what_is_wrong_with_the_log(tmp_path):
    """The parsers' own messages (tokenizing, EOF inside a string, a truncated gzip or Parquet file, a
    compressed file of another kind) become what is wrong and what to do; a text log named .gz is read."""
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    header = "user,item,rating,timestamp"
    cases = {
        "extra.csv": (write_log(tmp_path / "extra.csv", header, rows[:5] + ["7,3,5,880000000,x"] + rows[5:]),
                      r"line 7 has 5 fields where the lines before it have 4 \(a separator inside an ID\?"),
        "quote.csv": (write_log(tmp_path / "quote.csv", header, rows[:5] + ['"7,3,5,880000000'] + rows[5:]),
                      r"a quote \(\"\) opened on line 7 is never closed"),
    }  # fmt: skip
    text = (tmp_path / "extra.csv").read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(text)[:200])
    cases["cut.csv.gz"] = (tmp_path / "cut.csv.gz", r"the gzip-compressed log is truncated or corrupt \(")
    log.to_parquet(tmp_path / "full.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "full.parquet").read_bytes()[:300])
    cases["cut.parquet"] = (tmp_path / "cut.parquet", r"the Parquet file is truncated or corrupt, or not Parquet \(")
    import bz2

    (tmp_path / "log.csv.bz2").write_bytes(bz2.compress(text))
    cases["log.csv.bz2"] = (tmp_path / "log.csv.bz2", r"looks like bzip2-compressed, not a log; decompress it")
    for name, (path, message) in cases.items():
        with pytest.raises(CcdrecError, match=message):
            prepare_stream(path, tmp_path / "s", **KW)
        assert not (tmp_path / "s").exists(), name
    plain = write_log(tmp_path / "plain.csv", header, rows)
    (tmp_path / "named.csv.gz").write_bytes(plain.read_bytes())  # text, named as gzip
    prepare_stream(tmp_path / "named.csv.gz", tmp_path / "a", **KW)
    prepare_stream(plain, tmp_path / "b", **KW)
    assert stream_files(tmp_path / "a") == stream_files(tmp_path / "b")


def test_ids_that_differ_only_in_unicode_form_or_hold_control_characters_are_noted(tmp_path):
    import ast
    import unicodedata

    log = udata_like().astype({"user": str, "item": str})
    composed, decomposed = "\u00e9", unicodedata.normalize("NFD", "\u00e9")
    log["item"] = [(composed if n % 2 else decomposed) + i for n, i in enumerate(log["item"])]
    log.loc[3, "user"] = "7\x00"
    log.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = prepare_notes(tmp_path / "log.csv", tmp_path / "s", min_user=1, min_item=1, base_fraction=0.5, n_blocks=3)
    twins = next(n for n in notes if "Unicode form" in n)
    assert twins.startswith("30 item ID(s) are the same text as another in another Unicode form (e.g. ")
    a, b = twins.split("(e.g. ")[1].split("), kept")[0].split(" and ")
    assert a != b and unicodedata.normalize("NFC", ast.literal_eval(a)) == unicodedata.normalize("NFC", ast.literal_eval(b))
    assert "1 user ID(s) hold control or invisible characters (e.g. '7\\x00'), kept as written" in notes
    assert len(stream.item_vocab) == 60  # kept distinct, as written


def test_ids_that_read_like_a_missing_value_are_noted_and_kept(tmp_path):
    log = udata_like().astype({"user": str, "item": str})
    log.loc[log.index % 7 == 0, "item"] = "NaN"
    log.loc[log.index % 11 == 0, "user"] = " null"
    log.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = prepare_notes(tmp_path / "log.csv", tmp_path / "s", min_user=1, min_item=1, base_fraction=0.5, n_blocks=3)
    assert any(n.startswith("1 item ID(s) read like a missing value ('NaN'): each is kept as one ID") for n in notes), notes
    assert any(n.startswith("1 user ID(s) read like a missing value (' null')") for n in notes), notes
    assert "NaN" in set(stream.item_vocab)  # kept, as the note says


def test_the_content_of_a_log_decides_and_json_binary_and_comment_lines_are_named(tmp_path):
    """A text log without a telling name is read (gzip and Parquet already were); JSON, binary data and a
    comment first line say what they are, with a command for the comment."""
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    header = "user,item,rating,timestamp"
    write_log(tmp_path / "ratings", header, rows)
    write_log(tmp_path / "ratings.csv", header, rows)
    prepare_stream(tmp_path / "ratings", tmp_path / "a", **KW)
    prepare_stream(tmp_path / "ratings.csv", tmp_path / "b", **KW)
    assert stream_files(tmp_path / "a") == stream_files(tmp_path / "b")
    log.to_json(tmp_path / "log.jsonl", orient="records", lines=True)
    with pytest.raises(CcdrecError, match=r"log.jsonl: looks like JSON, not a delimited text log; convert it"):
        prepare_stream(tmp_path / "log.jsonl", tmp_path / "s", **KW)
    (tmp_path / "log.bin").write_bytes(("user,item,rating,timestamp\n" + "\u00e9,1,2,3\n" * 40).encode("latin-1"))
    with pytest.raises(CcdrecError, match=r"log.bin: not UTF-8 text \(it holds the byte 0xe9\); convert the log to UTF-8"):
        prepare_stream(tmp_path / "log.bin", tmp_path / "s", **KW)  # a name that tells nothing: text, by its bytes
    (tmp_path / "blob.csv").write_bytes(b"user,item\x00\x01\x02" * 10)
    with pytest.raises(CcdrecError, match=r"blob.csv: looks like binary data \(control bytes\), not a text log"):
        prepare_stream(tmp_path / "blob.csv", tmp_path / "s", **KW)
    if shutil.which("grep") is None:
        return
    write_log(tmp_path / "c.csv", "# exported 2021", [header, *rows])
    with pytest.raises(CcdrecError, match=r"the first line is a comment: drop the comment lines first, e.g. ") as exc:
        prepare_stream(tmp_path / "c.csv", tmp_path / "s", **KW)
    subprocess.run(str(exc.value).split("e.g. ")[-1].removesuffix(")"), shell=True, cwd="/", check=True)
    prepare_stream(tmp_path / "data-c.csv", tmp_path / "c", **KW)
    assert stream_files(tmp_path / "c") == stream_files(tmp_path / "b")


def test_dates_without_a_time_are_noted_unless_a_window_of_days_cuts_the_blocks(tmp_path):
    log = make_log()
    log["timestamp"] = (T0 + pd.to_timedelta(log["timestamp"] // 86_400 * 3, unit="D")).dt.strftime("%Y-%m-%d")
    log.to_csv(tmp_path / "days.csv", index=False)
    _, notes = prepare_notes(tmp_path / "days.csv", tmp_path / "a", **KW)
    days = [n for n in notes if n.startswith("every timestamp is a whole day (")]
    assert len(days) == 1 and "a block may begin or end inside a day; --window 1d (or a multiple)" in days[0]
    weekly = {k: v for k, v in KW.items() if k != "n_blocks"}
    _, notes = prepare_notes(tmp_path / "days.csv", tmp_path / "b", window="7d", **weekly)
    assert not any("whole day" in n for n in notes)
    log.assign(timestamp=make_log()["timestamp"] + 1_600_000_000).to_csv(tmp_path / "secs.csv", index=False)
    _, notes = prepare_notes(tmp_path / "secs.csv", tmp_path / "c", **KW)
    assert not any("whole day" in n for n in notes)


@pytest.mark.parametrize("odd, shown", [(0, "1970-01-01 00:00:00"), (-1_603_223_255, "1919-03-14 04:12:25"), (1_610_000, None)])
def test_one_timestamp_before_1980_among_plausible_ones_is_named(tmp_path, odd, shown):
    """One 0, one negative value or one value in another unit among seconds of 2021 used to be kept at the
    start of the timeline, with a note that no unit fits; it is an error naming its row."""
    log = make_log()
    log["timestamp"] = log["timestamp"] + 1_610_000_000
    log.loc[4, "timestamp"] = odd
    log.to_csv(tmp_path / "log.csv", index=False)
    with pytest.raises(CcdrecError, match=rf"has 1 timestamp\(s\) outside 1980 \.\. tomorrow, where the other {len(log) - 1:,} "
                       rf"fall, read as seconds, e\.g\. '{odd}' in data row 5 \({shown or '.*'} UTC\)"):  # fmt: skip
        prepare_stream(tmp_path / "log.csv", tmp_path / "s", **KW)
    log.loc[:40, "timestamp"] = 0  # more than 1%: a column mostly counting from its own origin is a note, not an error
    log.to_csv(tmp_path / "many.csv", index=False)
    _, notes = prepare_notes(tmp_path / "many.csv", tmp_path / "m", **KW)
    assert any("before 1980" in n for n in notes)


def test_second_probe_inputs_say_what_they_are_and_their_commands_work(tmp_path):
    """A gzip-compressed tar or Parquet file, a JSON array, a headerless log whose first row repeats a
    value, a header line starting with '#', rows that switch separator part-way, a wrong one-letter --sep."""
    import io
    import tarfile

    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    header = "user,item,rating,timestamp"
    clean = write_log(tmp_path / "clean.csv", header, rows)
    prepare_stream(clean, tmp_path / "clean", **KW)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(clean, arcname="clean.csv")
    (tmp_path / "logs.tar.gz").write_bytes(buf.getvalue())
    log.to_parquet(tmp_path / "log.parquet")
    (tmp_path / "log.parquet.gz").write_bytes(gzip.compress((tmp_path / "log.parquet").read_bytes()))
    for name, message in (
        ("logs.tar.gz", "a gzip-compressed tar archive, not a log; unpack it"),
        ("log.parquet.gz", "gzip-compressed Parquet; decompress it first"),
    ):
        with pytest.raises(CcdrecError, match=message):
            prepare_stream(tmp_path / name, tmp_path / "s", **KW)
    log.to_json(tmp_path / "arr.json", orient="records", indent=2)
    with pytest.raises(CcdrecError, match="looks like JSON") as exc:
        prepare_stream(tmp_path / "arr.json", tmp_path / "s", **KW)
    subprocess.run(str(exc.value).split("e.g. ")[-1], shell=True, cwd=tmp_path, check=True)
    prepare_stream(tmp_path / "arr.parquet", tmp_path / "j", **KW)
    assert stream_files(tmp_path / "j") == stream_files(tmp_path / "clean")
    write_log(tmp_path / "bare.csv", "4,45,4,1600211476", rows)
    with pytest.raises(CcdrecError, match=r"the first line \('4', '45', '4', '1600211476'\) looks like data, not a header: "
                       r"give --no-header --columns$"):  # fmt: skip
        prepare_stream(tmp_path / "bare.csv", tmp_path / "s", **KW)
    if shutil.which("sed") is None:
        return
    write_log(tmp_path / "hash.csv", "#" + header, rows)
    with pytest.raises(CcdrecError, match=r"the header line starts with '#': remove it, e.g. ") as exc:
        prepare_stream(tmp_path / "hash.csv", tmp_path / "s", **KW)
    subprocess.run(str(exc.value).split("e.g. ")[-1].removesuffix(")"), shell=True, cwd="/", check=True)
    prepare_stream(tmp_path / "header-hash.csv", tmp_path / "h", **KW)
    assert stream_files(tmp_path / "h") == stream_files(tmp_path / "clean")
    half = len(rows) // 2
    write_log(tmp_path / "mixed.csv", header, rows[:half] + [r.replace(",", "\t") for r in rows[half:]])
    mixes = r"while the rows before it are comma-separated: the log mixes separators; separate every row by comma, e.g. "
    where = rf"line {half + 2} \(data row {half + 1}\) has 1 field\(s\), .* Split at each tab it has 4"
    with pytest.raises(CcdrecError, match=rf"{where}, {mixes}") as exc:
        prepare_stream(tmp_path / "mixed.csv", tmp_path / "s", **KW)
    subprocess.run(str(exc.value).split("e.g. ")[-1], shell=True, cwd="/", check=True)
    prepare_stream(tmp_path / "one-sep-mixed.csv", tmp_path / "m", **KW)
    assert stream_files(tmp_path / "m") == stream_files(tmp_path / "clean")
    with pytest.raises(CcdrecError) as exc:
        prepare_stream(clean, tmp_path / "s", sep="a", **KW)
    assert "--user-col" not in str(exc.value) and "did you mean" not in str(exc.value)


def test_a_field_of_spaces_is_empty_and_invisible_characters_are_noted(tmp_path):
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    write_log(tmp_path / "blank.csv", "user,item,rating,timestamp", rows[:3] + ["7, ,3,880000000"] + rows[3:])
    with pytest.raises(CcdrecError, match=r"has 1 missing value\(s\), e.g. line 5 \(data row 4\): '7, ,3,880000000' \(an empty"):
        prepare_stream(tmp_path / "blank.csv", tmp_path / "s", **KW)
    log = log.astype({"item": str})
    log.loc[0, "item"] = "1\u200b"  # a zero-width space
    log.to_csv(tmp_path / "zw.csv", index=False)
    _, notes = prepare_notes(tmp_path / "zw.csv", tmp_path / "z", min_user=1, min_item=1, base_fraction=0.5, n_blocks=3)
    assert "1 item ID(s) hold control or invisible characters (e.g. '1\\u200b'), kept as written" in notes


def test_a_separator_ending_some_lines_is_named_with_a_command_that_removes_it(tmp_path):
    if shutil.which("sed") is None:
        pytest.skip("no sed to try the command with")
    log = udata_like()
    rows = [",".join(map(str, r)) for r in log.itertuples(index=False)]
    header = "user,item,rating,timestamp"
    prepare_stream(write_log(tmp_path / "clean.csv", header, rows), tmp_path / "clean", **KW)
    write_log(tmp_path / "even.csv", header, [r + "," if n % 2 else r for n, r in enumerate(rows)])
    with pytest.raises(CcdrecError, match=r"line 3 ends with a separator \(an empty last field\) and not every line") as exc:
        prepare_stream(tmp_path / "even.csv", tmp_path / "s", **KW)
    subprocess.run(str(exc.value).split("e.g. ")[-1], shell=True, cwd="/", check=True)
    prepare_stream(tmp_path / "trimmed-even.csv", tmp_path / "even", **KW)
    assert stream_files(tmp_path / "even") == stream_files(tmp_path / "clean")
    # from the first data row on, every other line: each field read under its name, the empty one dropped
    write_log(tmp_path / "odd.csv", header, [r + "," if n % 2 == 0 else r for n, r in enumerate(rows)])
    prepare_stream(tmp_path / "odd.csv", tmp_path / "odd", **KW)
    assert stream_files(tmp_path / "odd") == stream_files(tmp_path / "clean")


def test_a_header_split_at_single_spaces_where_runs_separate_it_suggests_whitespace(tmp_path):
    log = udata_like()
    rows = ["  ".join(map(str, r)) for r in log.itertuples(index=False)]
    write_log(tmp_path / "aligned.txt", "  ".join(["user", "item", "rating", "timestamp"]), rows)
    with pytest.raises(CcdrecError, match=r"the header has empty names \(separators side by side\); if the fields are "
                       r"separated by runs of spaces or tabs, give --sep whitespace$"):  # fmt: skip
        prepare_stream(tmp_path / "aligned.txt", tmp_path / "s", sep=" ", **KW)
    prepare_stream(tmp_path / "aligned.txt", tmp_path / "s", sep="whitespace", **KW)


def test_notes_that_say_the_same_of_many_blocks_are_said_once():
    from ccdrec.data.prepare import merged_block_notes

    why = "(a user needs 3 or more interactions in a block, ...); its evaluation will be empty"
    notes = ["u.csv: 10 rows read", *(f"block {k} has no test users {why}" for k in (3, 4, 5, 9)), "block 7 has no valid users"]
    notes += [f"incremental block {k} has no new users (every user in it appeared in an earlier block)" for k in (2, 6)]
    assert merged_block_notes(notes) == [
        "u.csv: 10 rows read",
        "blocks 3-5, 9 (4 blocks) have no test users (a user needs 3 or more interactions in a block, ...); "
        "their evaluation will be empty",
        "block 7 has no valid users",
        "incremental blocks 2, 6 (2 blocks) have no new users (every user in them appeared in an earlier block)",
    ]
    many = merged_block_notes([f"block {k} has no test users" for k in range(0, 100, 2)], shown=3)
    assert many == ["blocks 0, 2, 4 and 47 more range(s) (50 blocks) have no test users"]
