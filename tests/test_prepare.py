"""``prepare_stream``: a user's interaction log -> stream directory (method.md section 2)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

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
    """Straightforward pandas version of dedup + iterative k-core, in time order."""
    df = df.sort_values("timestamp", kind="stable").drop_duplicates(["user", "item"])
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
    out = {}
    for f in sorted(path.iterdir()):
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
    assert set(a) == {"interactions.csv.gz", "universe.csv", "users.csv", "items.csv"}
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


def test_duplicates_keep_earliest_and_ties_keep_row_order(tmp_path):
    # 12 users x 12 items, all pairs; every interaction at the same time except the duplicates
    rows = [(f"u{u}", f"i{i}", 100) for u in (5, 3, 9, 0, 1, 2, 4, 6, 7, 8, 10, 11) for i in range(12)]
    rows += [("u5", "i0", 500), ("u3", "i1", 50)]  # later duplicate: ignored; earlier duplicate: moves to the front
    _chain_log(rows).to_csv(tmp_path / "log.csv", index=False)
    stream = prepare_stream(tmp_path / "log.csv", tmp_path / "out", **KW)
    assert list(stream.user_vocab[:3]) == ["u3", "u5", "u9"]  # u3 first (earlier duplicate), then row order
    assert list(stream.item_vocab[:2]) == ["i1", "i0"]
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
    "unknown extension": ("log.json", None, "{}", {}, "unknown file type"),
    "empty file": ("log_empty.csv", None, "", {}, "empty"),
    "header only": ("log_header.csv", None, "user,item,timestamp\n", {}, "no rows"),
    "missing column": (
        "log_cols.csv",
        make_log().rename(columns={"item": "movie"}),
        None,
        {},
        "'item'; available: 'user', 'movie'",
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
    "min_item": ("log_p.csv", make_log(), None, {"min_item": 0}, "min_item"),
    "same columns": ("log_p.csv", make_log(), None, {"item_col": "user"}, "must differ"),
    "corrupt gzip": ("log_bad.csv.gz", None, "not gzip at all", {}, "cannot be read"),
    "corrupt parquet": ("log_bad.parquet", None, "not parquet", {}, "cannot be read"),
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
    with pytest.raises(CcdrecError, match="out.*not empty"):
        prepare_stream(tmp_path / "log.csv", out, **KW)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(tmp_path) == ["out"]


def test_force_refuses_to_delete_the_log_itself(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
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
