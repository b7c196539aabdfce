"""Data that keeps arriving: ``data prepare --window``, ``data append``, a run carried on to appended blocks,
and cold-start recommendations from a new user's items (``recommend --items``, ``recommend_for_items``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ccdrec.data import prepare as P
from ccdrec.data.append import append_stream
from ccdrec.data.prepare import MIN_PER_BLOCK, PREPARE_FILE, prepare_stream, split_rng
from ccdrec.data.split import split_block
from ccdrec.data.stream import SPLITS, load_stream
from ccdrec.data.synthetic import synthetic_stream
from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.serve import load_run
from test_prepare import reference as kcore_reference  # dedup + iterative k-core, in plain pandas

T0 = 1_600_000_000  # unix seconds
DAY = 86_400
KW = dict(min_user=2, min_item=2)
SMALL = [
    "teacher.members=[{kind: mf, dim: 8, seed: 0}]",
    "student.user_samples=20",
    "student.item_samples=20",
    "student.topn=10",
]


def ccdrec(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ccdrec", *args], capture_output=True, text=True, timeout=timeout)


def one_error_line(res) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def notes_of(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught]


def weekly_log(seed: int = 3, n_blocks: int = 4) -> pd.DataFrame:
    """A synthetic stream's interactions as a log: block k's pairs at random times of week k (shuffled rows)."""
    s = synthetic_stream(n_blocks=n_blocks, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for b in s:
        pairs = np.concatenate([b.split(x) for x in SPLITS])
        times = T0 + b.index * 7 * DAY + rng.integers(0, 7 * DAY, len(pairs))
        rows += [(f"u{u}", f"i{i}", int(t)) for (u, i), t in zip(pairs.tolist(), times.tolist(), strict=True)]
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"]).sample(frac=1, random_state=seed).reset_index(drop=True)


def predicted_blocks(df: pd.DataFrame, base_fraction: float, seconds: int) -> pd.Series:
    """The block of every row of the k-cored, time-ordered ``df`` by the documented window rule, in pandas."""
    n0 = int(round(base_fraction * len(df)))
    t0 = df["timestamp"].iloc[n0 - 1]
    window = (df["timestamp"].iloc[n0:] - t0) // seconds
    counts = window.value_counts().sort_index()
    groups: list[list] = []  # windows of each block
    sizes: list[int] = []
    for w, c in counts.items():  # empty windows never appear; short ones merge into the next
        if sizes and sizes[-1] < MIN_PER_BLOCK:
            groups[-1].append(w)
            sizes[-1] += c
        else:
            groups.append([w])
            sizes.append(c)
    if len(sizes) > 1 and sizes[-1] < MIN_PER_BLOCK:
        groups[-2] += groups.pop()
    block_of = {w: b + 1 for b, g in enumerate(groups) for w in g}
    return pd.concat([pd.Series(0, index=df.index[:n0]), window.map(block_of)])


def stored(block) -> int:
    return sum(len(block.split(s)) for s in SPLITS)


# --- data prepare --window ------------------------------------------------------------------------


def test_window_blocks_follow_calendar_windows_skip_empty_and_merge_short(tmp_path):
    log = weekly_log()
    # a quiet stretch: drop days 16..20 (empty 1d windows) and thin days 22..23 to a few rows (a short window)
    day = (log["timestamp"] - T0) // DAY
    keep = ~day.between(16, 20) & ~(day.between(22, 23) & (log.index % 100 != 0))
    log = log[keep].reset_index(drop=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = notes_of(prepare_stream, tmp_path / "log.csv", tmp_path / "s", window="1d", **KW)
    ref = kcore_reference(log, **KW)
    ref["block"] = predicted_blocks(ref, 0.5, DAY)
    assert len(stream) == ref["block"].max() + 1
    got = pd.concat(
        pd.DataFrame({"user": stream.user_vocab[p[:, 0]], "item": stream.item_vocab[p[:, 1]], "got": b.index})
        for b in stream
        for p in [np.concatenate([b.split(s) for s in SPLITS])]
    ).merge(ref, on=["user", "item"])
    assert (got["got"] == got["block"]).all() and len(got) > 0.9 * len(ref)
    assert any("window(s) without interactions skipped" in n for n in notes)
    assert any("span several 1d windows" in n for n in notes)
    assert any("read as seconds since 1970" in n for n in notes)
    record = json.loads((tmp_path / "s" / PREPARE_FILE).read_text())
    n0 = int((ref["block"] == 0).sum())
    assert record["window"] == "1d" and record["window_seconds"] == DAY and record["blocks"] is None
    assert record["window_anchor"] == ref["timestamp"].iloc[n0 - 1] and record["last_time"] == ref["timestamp"].max()
    assert record["time"] == {"kind": "numbers", "unit": "s", "per_second": 1}


def test_window_with_dates_and_the_per_block_split(tmp_path):
    log = weekly_log(n_blocks=3)
    log["timestamp"] = pd.to_datetime(log["timestamp"], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    log.to_csv(tmp_path / "log.csv", index=False)
    stream, notes = notes_of(prepare_stream, tmp_path / "log.csv", tmp_path / "s", window="7d", **KW)
    assert not any("since 1970" in n for n in notes)  # dates: no unit to guess
    assert json.loads((tmp_path / "s" / PREPARE_FILE).read_text())["time"]["kind"] == "dates"
    # each block is split by its own generator of (seed, block): D_0 (no pair dropped by its split) splits again the same
    b = stream[0]
    again = split_block(np.concatenate([b.split(s) for s in SPLITS]), split_rng(0, 0))
    assert all(np.array_equal(again[s], b.split(s)) for s in SPLITS)


def test_window_mistakes_are_one_line_errors(tmp_path):
    weekly_log().to_csv(tmp_path / "log.csv", index=False)
    for window in ("7", "7days", "0d", "-1d", "1.5d", "d"):
        with pytest.raises(CcdrecError, match="--window must be"):
            prepare_stream(tmp_path / "log.csv", tmp_path / "s", window=window, **KW)
    with pytest.raises(CcdrecError, match="not both"):
        prepare_stream(tmp_path / "log.csv", tmp_path / "s", window="7d", n_blocks=3, **KW)
    tiny = pd.DataFrame({"user": ["a", "b"] * 12, "item": [f"i{j}" for j in range(24)], "timestamp": T0 + np.arange(24)})
    tiny.to_csv(tmp_path / "tiny.csv", index=False)
    with pytest.raises(CcdrecError, match="only 7 interactions after the base block, too few for one 100w block"):
        prepare_stream(tmp_path / "tiny.csv", tmp_path / "t", window="100w", min_user=1, min_item=1, base_fraction=0.7)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    res = ccdrec("data", "prepare", str(tmp_path / "log.csv"), "--out", str(tmp_path / "s"), "--window", "7d", "--blocks", "2")
    assert "not both" in one_error_line(res)
    res = ccdrec("data", "prepare", str(tmp_path / "log.csv"), "--out", str(tmp_path / "s"), "--window", "weekly")
    assert "--window must be" in one_error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "tiny.csv"]  # nothing left behind


def test_window_units_are_lower_case_bounded_and_a_fine_window_over_a_long_span_is_cheap(tmp_path):
    """``1M`` used to mean one minute (units were lower-cased); a month has no fixed length. A window longer
    than timestamps may span is refused as such. A 1 s window over a century used to build an array of
    every empty window (out of memory); the empty ones are counted, and the left-out note lists only the
    blocks that left something out once there are many."""
    weekly_log().to_csv(tmp_path / "log.csv", index=False)
    for window, hint in (("1M", "months and years have no fixed length"), ("2y", "no fixed length"), ("7D", "lower case (d)")):
        with pytest.raises(CcdrecError, match=rf"--window must be .* got '{window}'; .*{re.escape(hint)}"):
            prepare_stream(tmp_path / "log.csv", tmp_path / "s", window=window, **KW)
    with pytest.raises(CcdrecError, match=r"--window 99999999999999w is longer than the 300 years"):
        prepare_stream(tmp_path / "log.csv", tmp_path / "s", window="99999999999999w", **KW)
    log = weekly_log()
    late = log["user"] == log["user"].mode()[0]
    log.loc[~late, "timestamp"] -= 40 * 365 * DAY  # every other user's interactions 40 years before
    log.to_csv(tmp_path / "far.csv", index=False)
    _, notes = notes_of(prepare_stream, tmp_path / "far.csv", tmp_path / "f", window="1s", **KW)
    skipped = next(n for n in notes if "window(s) without interactions skipped" in n)
    assert int(skipped.split(" ")[0].replace(",", "")) > 1_000_000_000


# --- data append ----------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path):
    """A weekly log cut at day 17 (a stream prepared from the first part), the rest in two halves."""
    log = weekly_log()
    cut = T0 + 17 * DAY
    first = log[log["timestamp"] < cut]
    rest = log[log["timestamp"] >= cut].sort_values("timestamp", kind="stable")
    first.to_csv(tmp_path / "first.csv", index=False)
    half = T0 + 21 * DAY  # a 2d-window boundary of the stream's grid? not necessarily: see the test
    rest[rest["timestamp"] < half].to_csv(tmp_path / "rest1.csv", index=False)
    rest[rest["timestamp"] >= half].to_csv(tmp_path / "rest2.csv", index=False)
    rest.to_csv(tmp_path / "rest.csv", index=False)
    return tmp_path, log


def test_append_keeps_the_stream_and_extends_it(parts):
    d, _ = parts
    old = prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)
    files_before = {p.name: p.read_bytes() for p in (d / "s").iterdir() if p.name != PREPARE_FILE}
    new, notes = notes_of(append_stream, d / "s", d / "rest.csv", n_blocks=2)
    assert len(new) == len(old) + 2
    assert new.prefix_digest(len(old)) == old.digest and new.digest != old.digest
    assert list(new.user_vocab[: len(old.user_vocab)]) == list(old.user_vocab)  # append-only vocabularies
    assert list(new.item_vocab[: len(old.item_vocab)]) == list(old.item_vocab)
    assert (
        sum(
            1
            for n in notes
            if n.startswith("rest.csv: ") and " already in the stream (in its splits, or set aside as held-out) dropped; " in n
        )
        == 1
    )
    for k in (len(old), len(old) + 1):  # IDs by first appearance: block k's new users are [U_{k-1}, U_k)
        b = new[k]
        users = np.concatenate([b.split(s) for s in SPLITS])[:, 0]
        assert users.max() < b.n_users and b.prev_users == new[k - 1].n_users
    universe = pd.read_csv(d / "s" / "universe.csv")
    assert list(universe["users"]) == [b.n_users for b in new]
    stored_pairs = {tuple(p) for b in new for s in SPLITS for p in b.split(s).tolist()}
    assert sum(stored(b) for b in new) == len(stored_pairs)  # no pair twice
    record = json.loads((d / "s" / PREPARE_FILE).read_text())
    assert record["appends"][0]["blocks"] == [3, 4] and record["last_time"] >= T0 + 27 * DAY
    assert sorted(p.name for p in d.iterdir()) == sorted(["first.csv", "rest1.csv", "rest2.csv", "rest.csv", "s"])
    for name in ("users.json", "items.json", "universe.csv"):
        assert (d / "s" / name).read_bytes() != files_before[name]


def test_append_kcore_counts_the_stream_and_keeps_late_rows(tmp_path):
    log = weekly_log(n_blocks=2)
    log.to_csv(tmp_path / "log.csv", index=False)
    old = prepare_stream(tmp_path / "log.csv", tmp_path / "s", n_blocks=1, min_user=3, min_item=3)
    u_old, i_old = old.user_vocab[0], old.item_vocab[0]
    seen = {(old.user_vocab[u], old.item_vocab[i]) for b in old for s in SPLITS for u, i in b.split(s).tolist()}
    fresh = [i for i in old.item_vocab if (u_old, i) not in seen][:1]
    new_rows = [(u_old, fresh[0], T0 - DAY)]  # an old user's one new interaction, older than the stream: kept
    new_rows += [("newbie", it, T0 + 30 * DAY + j) for j, it in enumerate(old.item_vocab[:3])]  # 3 >= min_user: kept
    new_rows += [("shy", it, T0 + 30 * DAY) for it in old.item_vocab[:2]]  # 2 < min_user: dropped
    new_rows += [(f"x{j}", "brand-new", T0 + 31 * DAY) for j in range(2)]  # a new item with 2 < min_item: dropped
    new_rows += [(u_old, i_old, T0 + 32 * DAY)]  # already in the stream: dropped
    new_rows += [(f"u{j}", "hit", T0 + 33 * DAY) for j in range(6)]  # a new item of 6 old users: kept
    pd.DataFrame(new_rows, columns=["user", "item", "timestamp"]).to_csv(tmp_path / "new.csv", index=False)
    new, notes = notes_of(append_stream, tmp_path / "s", tmp_path / "new.csv")
    assert len(new) == len(old) + 1
    pairs = {(new.user_vocab[u], new.item_vocab[i]) for s in SPLITS for u, i in new[-1].split(s).tolist()}
    expected = {(u_old, fresh[0])} | {("newbie", it) for it in old.item_vocab[:3]} | {(f"u{j}", "hit") for j in range(6)}
    assert pairs <= expected and len(pairs) >= 7  # (valid/test items no one trains on in the block are dropped by the split)
    assert not {"shy", "x0", "x1"} & set(new.user_vocab) and "brand-new" not in set(new.item_vocab)
    assert list(new.user_vocab[len(old.user_vocab) :]) == ["newbie"]
    assert list(new.item_vocab[len(old.item_vocab) :]) == ["hit"]
    assert any("older than the stream's last timestamp" in n and "kept in the first new block" in n for n in notes)
    # one line accounts for the new rows: 15 read, 1 already stored, 4 (shy's 2, brand-new's 2) cut by the k-core filter
    assert notes[0].startswith(
        "new.csv: 15 rows read; 1 already in the stream (in its splits, or set aside as held-out) dropped; "
        "4 removed by the k-core filter (min_user=3, min_item=3, "
        "counting the stream's interactions); 10 interactions kept"
    ), notes


def test_append_on_the_window_grid_gives_the_same_blocks_in_pieces(tmp_path):
    """Appending the rest at once or in two pieces cut on a window boundary gives the same stream, when the
    k-core filter removes nothing and no pair repeats (the documented conditions)."""
    d = tmp_path
    log = weekly_log().sort_values("timestamp", kind="stable").drop_duplicates(["user", "item"])
    cut = T0 + 17 * DAY
    log[log["timestamp"] < cut].to_csv(d / "first.csv", index=False)
    rest = log[log["timestamp"] >= cut]
    rest.to_csv(d / "rest.csv", index=False)
    for name in "ab":
        prepare_stream(d / "first.csv", d / name, window="2d", min_user=1, min_item=1)
    record = json.loads((d / "a" / PREPARE_FILE).read_text())
    whole = append_stream(d / "a", d / "rest.csv")  # default: the stream's 2d windows
    width, anchor = 2 * DAY, record["window_anchor"]
    boundary = anchor + ((record["last_time"] - anchor) // width + 3) * width  # 3 windows on, inside the rest
    assert rest["timestamp"].min() < boundary < rest["timestamp"].max()
    rest[rest["timestamp"] < boundary].to_csv(d / "p1.csv", index=False)
    rest[rest["timestamp"] >= boundary].to_csv(d / "p2.csv", index=False)
    append_stream(d / "b", d / "p1.csv")
    pieces = append_stream(d / "b", d / "p2.csv")
    assert len(pieces) == len(whole) > 5
    assert pieces.digest == whole.digest


def test_append_failures_change_nothing(parts):
    d, _ = parts
    old = prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)
    pairs = np.concatenate([b.split(s) for b in old for s in SPLITS])
    dup = pd.DataFrame({"user": old.user_vocab[pairs[:, 0]], "item": old.item_vocab[pairs[:, 1]], "timestamp": T0 + 40 * DAY})
    dup.to_csv(d / "dup.csv", index=False)

    def snapshot():
        return {p.name: p.read_bytes() for p in (d / "s").iterdir()}

    before = snapshot()
    with pytest.raises(CcdrecError, match=rf"no new interaction left \({len(dup):,} rows read; {len(dup):,} already in the "
                       r"stream \(in its splits, or set aside as held-out\) dropped; 0 interactions kept\)$"):  # fmt: skip
        append_stream(d / "s", d / "dup.csv")  # nothing new
    n_rest = len(pd.read_csv(d / "rest1.csv"))
    with pytest.raises(CcdrecError, match=rf"too few for 1000 block.* \({n_rest:,} rows read; .*interactions kept\)$"):
        append_stream(d / "s", d / "rest1.csv", n_blocks=1000)
    with pytest.raises(CcdrecError, match="not both"):
        append_stream(d / "s", d / "rest1.csv", n_blocks=2, window="1d")
    pd.read_csv(d / "rest1.csv").assign(timestamp="yesterday").to_csv(d / "bad.csv", index=False)
    with pytest.raises(CcdrecError, match="unparsable timestamp"):
        append_stream(d / "s", d / "bad.csv")
    pd.read_csv(d / "rest1.csv").rename(columns={"item": "thing"}).to_csv(d / "cols.csv", index=False)
    with pytest.raises(CcdrecError, match="missing column"):
        append_stream(d / "s", d / "cols.csv")
    # the stream's IDs with a space before them name new users and items, which k-core removes: said so
    few = dup.head(3)  # three new users of one interaction each: too few for the k-core filter
    spaced = pd.DataFrame(
        {"user": " " + few["user"].astype(str), "item": " " + few["item"].astype(str), "timestamp": T0 + 40 * DAY}
    )
    spaced.to_csv(d / "spaced.csv", index=False)
    example = repr(" " + str(few["user"].iloc[0]))
    said = r"removed by the k-core filter .*; \d+ user ID\(s\) of the log differ from the stream's user IDs only by spaces "
    said += rf"around them \(e\.g\. {re.escape(example)} for .*\), so they name new users; remove the spaces in the log if "
    said += r"they are the same; \d+ item ID\(s\) of the log"

    with pytest.raises(CcdrecError, match=said):
        append_stream(d / "s", d / "spaced.csv")
    assert snapshot() == before
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary directory left
    (d / "t").mkdir()
    (d / "t" / "universe.csv").write_text("block,users,items\n")
    with pytest.raises(CcdrecError, match="no prepare.json"):
        append_stream(d / "t", d / "rest1.csv")
    res = ccdrec("data", "append", str(d / "s"), str(d / "dup.csv"))
    assert "no new interaction left" in one_error_line(res)


def test_appending_what_the_stream_has_read_adds_nothing(parts):
    """The same log twice (or the log the stream was prepared from) is refused, the stream unchanged; the
    held-out pairs a stream set aside (in no split) count as already in it when a later log has them again."""
    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)
    append_stream(d / "s", d / "rest1.csv")
    before = {p.name: p.read_bytes() for p in (d / "s").iterdir()}
    # the same rows in another order, gzipped, with CRLF line ends: the same rows as read
    pd.read_csv(d / "first.csv").sample(frac=1, random_state=1).to_csv(d / "first.csv.gz", index=False, lineterminator="\r\n")
    for log, used in (
        ("rest1.csv", "appended as block 3"),
        ("first.csv", "prepared from them"),
        ("first.csv.gz", "prepared from them"),
    ):
        with pytest.raises(CcdrecError, match=rf"{log}: its rows \(as read, .*\) are already in the stream \({used}\)"):
            append_stream(d / "s", d / log)
    assert {p.name: p.read_bytes() for p in (d / "s").iterdir()} == before
    aside = json.loads((d / "s" / P.SET_ASIDE_FILE).read_text())["pairs"]
    stream = load_stream(d / "s")
    assert len(aside) == sum(stream.left_out) > 0  # the pairs behind data info's left_out counts
    stored_pairs = {(stream.user_vocab[u], stream.item_vocab[i]) for b in stream for s in SPLITS for u, i in b.split(s).tolist()}
    assert not {tuple(p) for p in aside} & stored_pairs
    again = pd.DataFrame(aside, columns=["user", "item"]).assign(timestamp=T0 + 40 * DAY)
    more = pd.concat([pd.read_csv(d / "rest2.csv", dtype={"user": str, "item": str}), again])
    more.to_csv(d / "more.csv", index=False)
    seen = {tuple(p) for p in more[["user", "item"]].drop_duplicates().itertuples(index=False)} & (
        stored_pairs | {tuple(p) for p in aside}
    )
    new, notes = notes_of(append_stream, d / "s", d / "more.csv")
    assert f"; {len(seen):,} already in the stream (in its splits, or set aside as held-out) dropped; " in notes[0]
    added = {(new.user_vocab[u], new.item_vocab[i]) for s in SPLITS for u, i in new[len(stream)].split(s).tolist()}
    assert not {tuple(p) for p in aside} & added


def test_a_new_log_with_or_without_a_header_unlike_the_streams_says_how_to_fix_it(parts):
    """data append has no reading options: its hints name what to change in the new log, never an option."""
    d, _ = parts
    prepare_stream(d / "first.csv", d / "headed", n_blocks=2, **KW)
    pd.read_csv(d / "rest1.csv").to_csv(d / "bare.csv", index=False, header=False)
    with pytest.raises(CcdrecError) as exc:
        append_stream(d / "headed", d / "bare.csv")
    assert "the stream's log had a header line naming 'user', 'item', 'timestamp': give the new log the same header" in str(
        exc.value
    )
    assert "--" not in str(exc.value).split("(", 1)[1]
    pd.read_csv(d / "first.csv").to_csv(d / "first_bare.csv", index=False, header=False)
    prepare_stream(d / "first_bare.csv", d / "bare", n_blocks=2, header=False, columns="user,item,timestamp", **KW)
    for name in ("rest1.csv", "rest1.csv.gz"):
        pd.read_csv(d / "rest1.csv").to_csv(d / f"h-{name}", index=False)
        with pytest.raises(CcdrecError) as exc:
            append_stream(d / "bare", d / f"h-{name}")
        msg = str(exc.value)
        assert "its first line is a header ('user', 'item', 'timestamp'), but the stream's log had none: drop it" in msg
        if shutil.which("tail") and shutil.which("zcat"):
            subprocess.run(msg.split("e.g. ")[-1], shell=True, cwd="/", check=True)
            append_stream(d / "bare", d / f"body-h-{name}")  # the command's output appends
            shutil.rmtree(d / "bare")
            prepare_stream(d / "first_bare.csv", d / "bare", n_blocks=2, header=False, columns="user,item,timestamp", **KW)
    rename = pd.read_csv(d / "rest1.csv").rename(columns={"user": "User"})
    rename.to_csv(d / "renamed.csv", index=False)
    with pytest.raises(CcdrecError, match=r"did you mean 'User'\?.*the stream reads columns 'user', 'item', 'timestamp'"):
        append_stream(d / "headed", d / "renamed.csv")


def test_append_does_not_depend_on_the_row_order_and_accounts_for_the_rows(parts):
    d, log = parts
    rest = pd.read_csv(d / "rest.csv")
    rest["timestamp"] = rest["timestamp"] // 3600 * 3600  # whole hours: many ties
    rest = pd.concat([rest, rest.iloc[::10]], ignore_index=True)  # and repeated rows
    assert rest["timestamp"].duplicated().sum() > 50
    digests, notes_seen = set(), []
    for seed in range(3):
        prepare_stream(d / "first.csv", d / f"s{seed}", n_blocks=2, **KW)
        rest.sample(frac=1, random_state=seed).to_csv(d / f"new{seed}.csv", index=False)
        new, notes = notes_of(append_stream, d / f"s{seed}", d / f"new{seed}.csv", n_blocks=2)
        digests.add(new.digest)
        notes_seen.append(notes[0].split(": ", 1)[1])
    assert len(digests) == 1 and len(set(notes_seen)) == 1
    n_repeats = len(rest) - len(rest.drop_duplicates(["user", "item"]))
    assert notes_seen[0].startswith(
        f"{len(rest):,} rows read; {n_repeats:,} repeated user-item row(s) dropped (the earliest kept); "
    )
    # prepare.json counts the held-out interactions set aside per block, the appended blocks too: data info shows them
    record = json.loads((d / "s0" / PREPARE_FILE).read_text())
    assert len(record["left_out"]) == len(new) and load_stream(d / "s0").summary()["left_out"].tolist() == record["left_out"]
    kept = int(notes_seen[0].split("; ")[-1].split(" interactions kept")[0].replace(",", ""))
    assert sum(stored(b) for b in new.blocks[3:]) + sum(record["left_out"][3:]) == kept


def test_a_run_directory_is_not_a_stream_to_append_to(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text("{}")
    (run / "stream.json").write_text(json.dumps({"source": "/data/streams/mine", "sha256": "0", "blocks": 3}))
    weekly_log().to_csv(tmp_path / "new.csv", index=False)
    expected = (
        "run: a run directory, not a stream directory made by `ccdrec data prepare`; "
        "give the stream it ran on, /data/streams/mine"
    )
    with pytest.raises(CcdrecError, match=expected):
        append_stream(run, tmp_path / "new.csv")
    assert one_error_line(ccdrec("data", "append", str(run), str(tmp_path / "new.csv"))).endswith(expected)
    assert one_error_line(ccdrec("data", "append", "", str(tmp_path / "new.csv"))) == "error: the stream directory path is empty"
    assert sorted(p.name for p in run.iterdir()) == ["state.json", "stream.json"]


# --- a run carried on to appended blocks, and cold start -----------------------------------------


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """A run on a stream prepared from the first part of a log, the rest appended as two blocks, the run
    resumed on to them (Python API; the CLI path is ``test_cli_append_resume_recommend``, slow)."""
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.presets import load_config

    d = tmp_path_factory.mktemp("grown")
    log = weekly_log()
    log[log["timestamp"] < T0 + 14 * DAY].to_csv(d / "first.csv", index=False)
    log[log["timestamp"] >= T0 + 14 * DAY].to_csv(d / "rest.csv", index=False)
    prepare_stream(d / "first.csv", d / "s", n_blocks=1, **KW)
    run_stream(load_config(str(d / "s"), preset="quick", overrides=SMALL), d / "run", progress=False)
    first_state = json.loads((d / "run" / "state.json").read_text())
    append_stream(d / "s", d / "rest.csv", n_blocks=2)
    run_stream(None, d / "run", resume=True, progress=False, max_blocks=3)
    return d, first_state


def test_a_run_goes_on_to_appended_blocks(grown_run):
    d, first_state = grown_run
    state = json.loads((d / "run" / "state.json").read_text())
    assert first_state["block"] == 1 and state["block"] == 3
    assert state["completed"][: len(first_state["completed"])] == first_state["completed"]
    assert {"b2/eval", "b3/eval"} <= set(state["completed"])
    record = json.loads((d / "run" / "stream.json").read_text())
    assert record["blocks"] == 4 and record["sha256"] == load_stream(d / "s").digest  # the record moved on
    served = load_run(d / "run")
    assert len(served.recommend("u0", 5)) == 5
    assert served.model.n_users == load_stream(d / "s")[3].n_users


def test_a_running_service_swaps_in_the_students_of_blocks_appended_after_it_started(tmp_path):
    """``ccdrec serve`` reads the run's stream when it starts; the run then goes on to blocks appended since
    (``data append``, ``run --resume --max-blocks``): the watcher reads the grown stream again and swaps the
    new students in, instead of refusing each with an IndexError from the old stream."""
    from ccdrec.pipeline.ccd import run_stream
    from ccdrec.presets import load_config
    from ccdrec.service.swap import ModelSlot, RunWatcher
    from ccdrec.service.version import load_version

    log = weekly_log()
    log[log["timestamp"] < T0 + 14 * DAY].to_csv(tmp_path / "first.csv", index=False)
    log[log["timestamp"] >= T0 + 14 * DAY].to_csv(tmp_path / "rest.csv", index=False)
    prepare_stream(tmp_path / "first.csv", tmp_path / "s", n_blocks=1, **KW)
    run_stream(load_config(str(tmp_path / "s"), preset="quick", overrides=SMALL), tmp_path / "run", progress=False)
    rd = RunDir(tmp_path / "run")
    stream = rd.open_stream(rd.load_config())
    slot = ModelSlot(load_version(rd, stream, rd.read_state()))
    watcher = RunWatcher(slot, rd, stream)
    assert slot.current.block == 1 and len(stream) == 2
    append_stream(tmp_path / "s", tmp_path / "rest.csv", n_blocks=2)
    run_stream(None, tmp_path / "run", resume=True, progress=False, max_blocks=3)
    assert watcher.check(), list(slot.refused)
    assert slot.current.block == 3 and len(watcher.stream) == 4 and not slot.refused
    new_user = load_stream(tmp_path / "s").user_vocab[-1]
    assert len(slot.current.run.recommend(new_user, 5)) == 5


def test_a_stream_changed_in_the_blocks_a_run_used_is_still_refused(grown_run, tmp_path):
    import shutil

    d, _ = grown_run
    shutil.copytree(d / "run", tmp_path / "run")
    shutil.copytree(d / "s", tmp_path / "s")
    cfg = RunDir(tmp_path / "run").load_config()
    (tmp_path / "run" / "config.yaml").write_text(
        (tmp_path / "run" / "config.yaml").read_text().replace(str(d / "s"), str(tmp_path / "s"))
    )
    assert cfg.dataset == str(d / "s")
    # the appended blocks are protected too: drop the last block -> refused
    universe = pd.read_csv(tmp_path / "s" / "universe.csv")
    universe.iloc[:-1].to_csv(tmp_path / "s" / "universe.csv", index=False)
    inter = pd.read_csv(tmp_path / "s" / "interactions.csv.gz")
    inter[inter["block"] < 3].to_csv(tmp_path / "s" / "interactions.csv.gz", index=False)
    n_users = universe["users"].iloc[-2]
    users = json.loads((tmp_path / "s" / "users.json").read_text())[:n_users]
    (tmp_path / "s" / "users.json").write_text(json.dumps(users))
    n_items = universe["items"].iloc[-2]
    items = json.loads((tmp_path / "s" / "items.json").read_text())[:n_items]
    (tmp_path / "s" / "items.json").write_text(json.dumps(items))
    with pytest.raises(CcdrecError, match="has changed since the run started"):
        load_run(tmp_path / "run")


def grown_copy_top(served, given: list[str], k: int) -> list[str]:
    """The top-k of a new user with the ``given`` items, by growing a copy of the served model."""
    model = served.model.clone()
    meta_block = served.stream[int(served.meta["block"])]
    base = meta_block.matrix("train", model.n_users, model.n_items).tolil()
    idx = [list(served.item_ids).index(g) for g in given]
    base.resize((model.n_users + 1, model.n_items))
    for i in idx:
        base[model.n_users, i] = 1.0
    model.grow(model.n_users + 1, model.n_items, base.tocsr(), "entity")
    with torch.no_grad():
        scores = model.scorer()(torch.tensor([model.n_users - 1]))[0].numpy()
    scores[idx] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return [str(served.item_ids[i]) for i in order]


def test_cold_start_equals_the_grown_model_and_excludes_the_given_items(grown_run):
    d, _ = grown_run
    served = load_run(d / "run")
    assert served.model.kind == "lightgcn" and served.model.layers > 0  # the propagated path
    given = [str(x) for x in served.item_ids[[3, 10, 42]]]
    got = served.recommend_for_items(given + ["no-such-item", given[0]], k=15)
    assert got.unknown == ["no-such-item"] and got.used == given
    names = [r.item for r in got.items]
    assert names == grown_copy_top(served, given, 15)
    assert not set(given) & set(names) and len(names) == 15
    scores = [r.score for r in got.items]
    assert scores == sorted(scores, reverse=True)
    # not the old 1-hop mean of the served item representations
    items_t = served._reps[1]
    idx = [served.item_index(g) for g in given]
    old = items_t[:, idx].mean(axis=1) @ items_t
    assert not np.allclose(old[[served.item_index(n) for n in names]], scores)
    with pytest.raises(CcdrecError, match="none of the 1 item"):
        served.recommend_for_items(["no-such-item"])
    # an item ID with spaces around it is found as a user ID is (the HTTP service passes IDs as sent)
    padded = served.recommend_for_items([f" {g}\t" for g in given], k=15)
    assert padded.unknown == [] and [r.item for r in padded.items] == names
    # the CLI prints the same list, and a note naming the unknown item
    res = ccdrec("recommend", str(d / "run"), "--items", ",".join(given + ["no-such-item"]), "-k", "15")
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [r[1] for r in rows] == names and [r[2] for r in rows] == [f"{s:.4f}" for s in scores]
    assert res.stderr.strip() == "note: 1 unknown item(s) left out: 'no-such-item'"


def test_cold_start_of_an_mf_student_is_the_grown_row(grown_run):
    """MF: no propagation, the score is the grown ego row against the item table."""
    from ccdrec.models.lightgcn import MF

    d, _ = grown_run
    served = load_run(d / "run")
    mf = MF(served.model.n_users, served.model.n_items, dim=8)
    served.model, served._reps = mf, None
    given = [str(x) for x in served.item_ids[[1, 2]]]
    got = served.recommend_for_items(given, k=10)
    assert [r.item for r in got.items] == grown_copy_top(served, given, 10)


@pytest.mark.slow
def test_cli_append_resume_recommend(tmp_path):
    """The whole path on the command line: prepare part of a log, run, append the rest, resume, recommend."""
    d = tmp_path
    log = weekly_log()
    log[log["timestamp"] < T0 + 14 * DAY].to_csv(d / "first.csv", index=False)
    log[log["timestamp"] >= T0 + 14 * DAY].to_csv(d / "rest.csv", index=False)
    res = ccdrec("data", "prepare", str(d / "first.csv"), "--out", str(d / "s"), "--blocks", "1",
                 "--min-user", "2", "--min-item", "2")  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = ccdrec("run", "--data", str(d / "s"), "--preset", "quick", "--out", str(d / "run"), "--no-progress",
                 *[x for o in SMALL for x in ("--set", o)])  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = ccdrec("data", "append", str(d / "s"), str(d / "rest.csv"), "--blocks", "2")
    assert res.returncode == 0 and "appended blocks 2..3" in res.stdout, res.stderr[-3000:]
    res = ccdrec("run", "--resume", str(d / "run"), "--max-blocks", "2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    again = ccdrec("run", "--resume", str(d / "run"), "--no-progress")  # nothing to do: says how to go on
    hint = "note: the run stops at block 2 (--max-blocks) and its stream has blocks 0..3; "
    hint += f"ccdrec run --resume {d / 'run'} --max-blocks 3 takes it on"
    assert again.returncode == 0 and hint in " ".join(again.stdout.split()), again.stdout[-2000:]
    res = ccdrec("run", "--resume", str(d / "run"), "--max-blocks", "3", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "note: the run stops" not in res.stdout
    assert json.loads((d / "run" / "state.json").read_text())["block"] == 3
    rec = ccdrec("recommend", str(d / "run"), "--user", "u0", "-k", "5")
    assert rec.returncode == 0 and len(rec.stdout.strip().splitlines()) == 5, rec.stderr
    served = load_run(d / "run")
    given = [str(x) for x in served.item_ids[[3, 10, 42]]]
    got = served.recommend_for_items(given, k=15)
    res = ccdrec("recommend", str(d / "run"), "--items", ",".join(given + ["no-such-item"]), "-k", "15")
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [r[1] for r in rows] == [r.item for r in got.items] and [r[2] for r in rows] == [f"{r.score:.4f}" for r in got.items]
    assert res.stderr.strip() == "note: 1 unknown item(s) left out: 'no-such-item'"
    assert "none of the 1 item" in one_error_line(ccdrec("recommend", str(d / "run"), "--items", "zzz"))
    assert "--items has an empty entry" in one_error_line(ccdrec("recommend", str(d / "run"), "--items", f"{given[0]},,x"))
    assert "one of them" in one_error_line(ccdrec("recommend", str(d / "run"), "--items", "a", "--user", "u0"))
    assert "one of them" in one_error_line(ccdrec("recommend", str(d / "run")))


ML100K = Path("/work/shared/data/ml-100k/u.data.gz")


@pytest.mark.slow
@pytest.mark.skipif(not ML100K.exists(), reason=f"MovieLens 100K is not at {ML100K} (read in place, never copied)")
def test_ml100k_weekly_windows_and_appends_in_two_halves(tmp_path):
    opts = dict(sep="\t", header=False, columns="user,item,rating,timestamp")
    stream, _ = notes_of(prepare_stream, ML100K, tmp_path / "w", window="7d", **opts)
    raw = pd.read_csv(ML100K, sep="\t", names=["user", "item", "rating", "timestamp"], dtype={"user": str, "item": str})
    ref = kcore_reference(raw, 10, 10)
    ref["block"] = predicted_blocks(ref, 0.5, 7 * DAY)
    assert len(stream) == ref["block"].max() + 1 > 10  # the number of blocks pandas predicts
    sizes = ref.groupby("block").size()
    assert [sum(len(b.split(s)) for s in SPLITS) for b in stream][0] <= sizes.iloc[0]
    # the first half of the log prepared weekly, the second half appended in two pieces on the weekly grid
    raw = raw.sort_values("timestamp", kind="stable")
    half, three_q = raw["timestamp"].quantile([0.5, 0.75]).tolist()
    raw[raw["timestamp"] < half].to_csv(tmp_path / "a.tsv", sep="\t", header=False, index=False)
    raw[(raw["timestamp"] >= half) & (raw["timestamp"] < three_q)].to_csv(tmp_path / "b.tsv", sep="\t", header=False, index=False)
    raw[raw["timestamp"] >= three_q].to_csv(tmp_path / "c.tsv", sep="\t", header=False, index=False)
    first = prepare_stream(tmp_path / "a.tsv", tmp_path / "s", window="7d", **opts)
    second, notes = notes_of(append_stream, tmp_path / "s", tmp_path / "b.tsv")
    third = append_stream(tmp_path / "s", tmp_path / "c.tsv")
    assert len(first) < len(second) < len(third)
    assert second.prefix_digest(len(first)) == first.digest and third.prefix_digest(len(second)) == second.digest
    record = json.loads((tmp_path / "s" / PREPARE_FILE).read_text())
    assert [a["blocks"][0] for a in record["appends"]] == [len(first), len(second)]
    assert record["last_time"] == raw["timestamp"].max()
    # every appended block lies inside consecutive weeks of the stream's grid (anchored at the end of its D_0)
    anchor, week = record["window_anchor"], 7 * DAY
    t_of = raw.drop_duplicates(["user", "item"]).set_index(["user", "item"])["timestamp"]
    last_week = -1
    for b in third.blocks[len(first) :]:
        pairs = np.concatenate([b.split(s) for s in SPLITS])
        t = t_of.loc[list(zip(third.user_vocab[pairs[:, 0]], third.item_vocab[pairs[:, 1]], strict=True))].to_numpy()
        weeks = (t - anchor) // week
        assert weeks.min() >= last_week
        last_week = weeks.max()


@pytest.mark.parametrize(
    "counts, blocks",
    [
        ([20, 3], [0, 0]),  # two windows, the last short: one block
        ([20, 20, 3], [0, 1, 1]),  # the short remainder joins the block before it, the others stay
        ([20, 20, 20, 3], [0, 1, 2, 2]),
        ([20, 4, 20, 3], [0, 1, 1, 1]),  # a short window joins the next; the short end joins that block
    ],
)
def test_a_short_last_window_joins_the_block_before_it(counts, blocks):
    times = np.concatenate([np.full(c, 10 * w + 1, dtype=np.int64) for w, c in enumerate(counts)])
    cut = P.window_labels(times, 0, 10, "10s", 1, Path("log.csv"))
    expected = np.concatenate([np.full(c, b) for c, b in zip(counts, blocks, strict=True)])
    assert cut.labels.tolist() == expected.tolist()


def test_a_new_log_separated_unlike_the_streams_says_so(parts):
    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)
    rest = pd.read_csv(d / "rest1.csv")
    text = ",".join(rest.columns) + "\n" + "\n".join("\t".join(map(str, r)) for r in rest.itertuples(index=False)) + "\n"
    (d / "tabs.csv").write_text(text)
    with pytest.raises(CcdrecError) as exc:
        append_stream(d / "s", d / "tabs.csv")
    msg = str(exc.value)
    line = text.splitlines()[1]
    assert f"line 2 (data row 1) has 1 field(s), {line!r}, where the header names 3. Split at each tab it has 3" in msg
    assert msg.endswith("separate the new log's fields by comma, header and rows, as the stream's log was") and "--" not in msg


def test_new_timestamps_in_another_unit_than_the_streams_say_so(parts):
    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)
    rest = pd.read_csv(d / "rest1.csv")
    rest.assign(timestamp=rest["timestamp"] * 1000).to_csv(d / "ms.csv", index=False)
    with pytest.raises(CcdrecError, match=rf"has {len(rest):,} timestamp\(s\) outside .* when read as seconds "
                       r"\(the stream's unit\), e\.g\. .*; in milliseconds they fall within 1980 \.\. tomorrow: "
                       r"write them in seconds, as the stream's$"):  # fmt: skip
        append_stream(d / "s", d / "ms.csv")


def test_new_timestamps_in_seconds_for_a_millisecond_stream_are_refused(tmp_path):
    log = weekly_log()
    log["timestamp"] = log["timestamp"] * 1000
    first, rest = log[log["timestamp"] < log["timestamp"].quantile(0.7)], log[log["timestamp"] >= log["timestamp"].quantile(0.7)]
    first.to_csv(tmp_path / "first.csv", index=False)
    rest.assign(timestamp=rest["timestamp"] // 1000).to_csv(tmp_path / "secs.csv", index=False)
    prepare_stream(tmp_path / "first.csv", tmp_path / "s", n_blocks=2, **KW)
    with pytest.raises(CcdrecError, match=r"timestamp\(s\) outside 1980 \.\. tomorrow, where the stream's timestamps fall, "
                       r"read as milliseconds \(the stream's unit\), .*in seconds they would fall within: write them in "
                       r"milliseconds"):  # fmt: skip
        append_stream(tmp_path / "s", tmp_path / "secs.csv")


def test_ids_that_differ_from_the_streams_only_by_spaces_are_named_either_way():
    from ccdrec.data.append import _spaced_ids_note

    known = {"12": 0, " 90": 1, "7": 2}
    log_spaced = _spaced_ids_note(pd.Series([" 12", "7", "new"]), known, "user")
    assert log_spaced.startswith("1 user ID(s) of the log differ from the stream's user IDs only by spaces around them")
    assert "(e.g. ' 12' for '12')" in log_spaced and "remove the spaces in the log if they are the same" in log_spaced
    stream_spaced = _spaced_ids_note(pd.Series(["90", "91"]), known, "item")  # the stream has ' 90'
    assert "(e.g. '90' for ' 90'), so they name new items; write them as the stream does in the log" in stream_spaced
    assert _spaced_ids_note(pd.Series(["12", "new"]), known, "user") is None


def test_an_append_killed_between_its_writes_is_cleaned_up_by_the_next(parts):
    """kill -9 leaves the temporary siblings of a write (``.s.tmp-PID-*``, and between the two renames the
    old stream as ``.s.old-PID-*`` with ``s`` missing): the next append removes what a dead process left,
    puts a moved-aside stream back, and leaves a live process's files alone."""
    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=1, **KW)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (d / f".s.tmp-{pid}-abc").mkdir()
    (d / f".s.tmp-{os.getpid()}-live").mkdir()  # a write still going on (this process)
    (d / ".s.tmp-earlier").mkdir()  # no PID: written by an earlier ccdrec, left alone
    digest = load_stream(d / "s").digest
    (d / "s").rename(d / f".s.old-{pid}-xyz")
    with pytest.warns(P.PrepareWarning, match="put back the stream a killed write had moved aside"):
        grown = append_stream(d / "s", d / "rest1.csv")
    assert grown.prefix_digest(2) == digest and len(grown) == 3
    left = sorted(p.name for p in d.iterdir() if p.name.startswith(".s."))
    assert left == sorted([".s.tmp-earlier", f".s.tmp-{os.getpid()}-live"]), left


def test_the_cli_puts_back_a_stream_a_killed_write_moved_aside_and_a_missing_one_is_named(parts):
    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=1, **KW)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / "s").rename(d / f".s.old-{int(dead.stdout)}-xyz")
    with pytest.raises(CcdrecError, match="a killed write moved it aside as .s.old-.*the next `ccdrec data append`") as e:
        load_stream(d / "s")
    assert "\n" not in str(e.value)
    out = subprocess.run(
        [sys.executable, "-m", "ccdrec", "data", "append", str(d / "s"), str(d / "rest1.csv")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "put back the stream a killed write had moved aside" in out.stderr
    assert len(load_stream(d / "s")) == 3 and not list(d.glob(".s.*"))


def test_an_interruption_after_the_append_has_written_says_it_was_appended_and_exits_0(parts, monkeypatch, capsys):
    import ccdrec.cli as cli

    d, _ = parts
    prepare_stream(d / "first.csv", d / "s", n_blocks=2, **KW)

    def ctrl_c(stream):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "print_stream_table", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["ccdrec", "data", "append", str(d / "s"), str(d / "rest1.csv")])
    try:
        cli.main()  # returns: exit status 0
    except SystemExit as ended:
        assert ended.code in (0, None)
    err = capsys.readouterr().err
    assert "appended block 3 to" in err and "4 blocks" in err and "interrupted while printing its table" in err
    assert len(load_stream(d / "s")) == 4
