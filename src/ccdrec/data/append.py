"""New interactions of a log -> the next block(s) of a prepared stream (``ccdrec data append``).

This is how CCD runs on data that keeps arriving: ``ccdrec data append STREAM NEW_LOG`` adds blocks,
``ccdrec run --resume RUN --max-blocks K`` carries a run on to them (a run accepts a stream that only
gained blocks, :meth:`ccdrec.pipeline.rundir.RunDir.open_stream`), ``ccdrec serve`` swaps in each new
student. The stream's existing blocks, IDs and files are never changed; only blocks are added.

What happens to ``NEW_LOG``, with the options ``ccdrec data prepare`` recorded in ``STREAM/prepare.json``
(:data:`ccdrec.data.prepare.PREPARE_FILE`; a stream without it cannot be appended to):

1. It is read with the same reading options (columns, separator, header, rating filter) and its
   timestamps with the stream's *resolved* reading: numbers in the same unit (even when the unit was
   inferred at prepare time), dates in the same format. A log whose timestamps cannot be read that way
   is an error.
   A log whose rows, as read and deduplicated, are those of the log the stream was prepared from or of
   one appended before (:func:`ccdrec.data.prepare.rows_sha256` in ``prepare.json``; whatever their
   order, compression or line endings) is refused: everything in it is in the stream or was left out.
2. Its rows are deduplicated in time order (time, then user, then item as written: the same rows give
   the same blocks whatever their order; earliest kept) and pairs already in the stream (any block, any
   split, or set aside as held-out: :data:`ccdrec.data.prepare.SET_ASIDE_FILE`) are dropped. A note
   accounts for the rows: read, rated below the stream's ``min_rating``, repeated, already in the
   stream, removed by the k-core filter (4), kept.
3. Rows older than the stream's last timestamp (late arrivals) are **kept**, with a note: they go into
   the first new block (existing blocks never change).
4. k-core filter together with the stream's counts: a new interaction (u, i) is kept when u has at
   least ``min_user`` and i at least ``min_item`` interactions counting the pairs stored in the stream
   (every block and split) plus the new interactions still kept, repeated until nothing changes. So an
   old user's single new interaction is kept, and a new user needs ``min_user`` new interactions (with
   items that pass). Stored pairs are never removed. Preparing the whole log at once can keep other
   rows, since there the filter sees every row together.
5. Blocks: ``n_blocks`` equal-count blocks, or ``window`` calendar windows; by default one block, or
   the stream's window if it was prepared with one. Windows continue the stream's grid (anchored at
   the last timestamp of D_0) when the width is the stream's, else they are measured from the
   stream's last timestamp; the rest of the window the stream's last block ends in becomes a block of
   its own. Empty and short windows are treated as in :func:`ccdrec.data.prepare.window_labels`; a
   block with fewer than :data:`~ccdrec.data.prepare.MIN_PER_BLOCK` interactions is an error.
6. IDs: the vocabularies are kept as they are and new users / items get the next IDs in order of first
   appearance along the new blocks, so block k's new users are still ``[U_{k-1}, U_k)``;
   ``universe.csv`` gains one row per block.
7. Each new block k is split per user with the generator of (seed, k)
   (:func:`ccdrec.data.prepare.split_rng`): a block with the same interactions is split as it would be
   had it been prepared with the others. Whole-log preparation and prepare + append give the same
   stream only when the cut falls on a block boundary and the k-core filter removes the same rows.
8. The grown stream is written into a temporary directory beside ``STREAM``, read back and checked
   (its first blocks must hash exactly as the old stream, :meth:`Stream.prefix_digest`), and renamed
   into place; on any failure nothing is left behind and ``STREAM`` is unchanged. ``prepare.json``
   records the new last timestamp and the append.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ccdrec.data import prepare as P
from ccdrec.data.stream import SPLITS, Stream, check_stream_dir, load_stream
from ccdrec.errors import CcdrecError, WrongArgumentType


def read_set_aside(stream_dir: Path) -> list[list[str]]:
    """The held-out pairs the stream set aside, as written in the log ([user, item]; :data:`P.SET_ASIDE_FILE`);
    empty for a stream prepared before they were recorded."""
    path = stream_dir / P.SET_ASIDE_FILE
    if not path.exists():
        return []
    try:
        pairs = json.loads(path.read_text(encoding="utf-8"))["pairs"]
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise ValueError("not a list of [user, item] pairs")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CcdrecError(f"{path}: unreadable ({e}); prepare the stream again") from None
    return pairs


def used_logs(record: dict) -> dict[str, str]:
    """:func:`ccdrec.data.prepare.rows_sha256` of each log the stream was prepared from or appended (as
    recorded; older streams recorded none) -> how it was used, e.g. "appended as block 6"."""
    used = {record["rows_sha256"]: "prepared from them"} if record.get("rows_sha256") else {}
    for a in record.get("appends", []):
        if a.get("rows_sha256"):
            first, last = a["blocks"]
            blocks = f"block {first}" if first == last else f"blocks {first}..{last}"
            used.setdefault(a["rows_sha256"], f"appended as {blocks}")
    return used


def read_record(stream_dir: Path) -> dict:
    """The ``prepare.json`` of ``stream_dir`` (a one-line :class:`CcdrecError` when missing or unreadable)."""
    path = Path(stream_dir) / P.PREPARE_FILE
    if not path.exists():
        raise CcdrecError(
            f"{stream_dir}: no {P.PREPARE_FILE}, so how its log was read is unknown; only streams written by "
            "`ccdrec data prepare` (this version or later) can be appended to"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise CcdrecError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("version") != P.PREPARE_VERSION:
        raise CcdrecError(f"{path}: unknown format (version {record.get('version') if isinstance(record, dict) else None!r})")
    return record


def append_stream(stream_dir: str | Path, log: str | Path, *, n_blocks: int | None = None, window: str | None = None) -> Stream:
    """Append the interactions of ``log`` to the stream in ``stream_dir`` as its next block(s) (module
    docstring) and return the grown stream as read back. ``n_blocks`` (>= 1) or ``window`` (``"7d"``...),
    not both. Notes (late rows, dropped duplicates, skipped windows, blocks without test users) are
    issued as :class:`ccdrec.data.prepare.PrepareWarning` after the stream is written. Every problem
    the user can fix raises :class:`CcdrecError` with a one-line message; the stream is then unchanged.
    """
    for what, given in (("stream directory", stream_dir), ("new log", log)):
        if not isinstance(given, str | os.PathLike):
            raise WrongArgumentType(f"the {what} must be a path (str or Path), not {type(given).__name__}")
        if not str(given).strip():  # Path("") would be ".", the current directory
            raise CcdrecError(f"the {what} path is empty")
    stream_dir, log = Path(stream_dir), Path(log)
    if n_blocks is not None and window is not None:
        raise CcdrecError(f"{log}: give either --blocks (equal-count blocks) or --window (calendar windows), not both")
    if n_blocks is not None and (isinstance(n_blocks, bool) or not isinstance(n_blocks, (int, np.integer)) or n_blocks < 1):
        raise CcdrecError(f"{log}: --blocks must be an integer >= 1, got {n_blocks!r}")
    for note in P.clear_stale_writes(stream_dir) if stream_dir.parent.is_dir() else []:  # after a killed append
        warnings.warn(note, P.PrepareWarning, stacklevel=2)
    if not stream_dir.is_dir():
        raise CcdrecError(f"no stream directory {str(stream_dir)!r}")
    check_stream_dir(stream_dir, bundled=False)
    record = read_record(stream_dir)
    if log.resolve().is_relative_to(stream_dir.resolve()):
        raise CcdrecError(f"{log}: lies inside the stream directory {stream_dir}, which is rewritten; move it out first")
    window_s = P.parse_window(window) if window is not None else None
    if n_blocks is None and window is None and record.get("window"):
        window, window_s = record["window"], int(record["window_seconds"])
    stream = load_stream(stream_dir)
    if stream.user_vocab is None or stream.item_vocab is None:
        raise CcdrecError(f"{stream_dir}: the stream has no vocabularies (users.json, items.json) to extend")

    df, per_second, n_read = _read_new(log, record)
    n_rated = len(df)
    notes: list[str] = []
    df = P._dedup_in_time_order(df)
    n_unique = len(df)
    digest = P.rows_sha256(df)
    if (used := used_logs(record).get(digest)) is not None:
        raise CcdrecError(
            f"{log}: its rows (as read, whatever their order, compression or line endings) are already in the stream "
            f"({used}): stored there, or left out when they were read; nothing to append"
        )
    user_pos = {u: i for i, u in enumerate(stream.user_vocab.tolist())}
    item_pos = {v: i for i, v in enumerate(stream.item_vocab.tolist())}
    spaced = [n for col, pos in (("user", user_pos), ("item", item_pos)) if (n := _spaced_ids_note(df[col], pos, col))]
    notes += spaced
    uid = df["user"].map(user_pos).fillna(-1).to_numpy(dtype=np.int64)
    iid = df["item"].map(item_pos).fillna(-1).to_numpy(dtype=np.int64)
    stored = np.concatenate([b.stored(s) for b in stream for s in SPLITS])  # as in the files
    known = (uid >= 0) & (iid >= 0)
    dup = np.zeros(len(df), dtype=bool)
    dup[known] = np.isin(uid[known] * stream.n_items + iid[known], stored[:, 0] * stream.n_items + stored[:, 1])
    # and the held-out pairs the stream set aside (seen, in no split): appending a log twice adds nothing
    old_aside = read_set_aside(stream_dir)
    if old_aside:
        seen = pd.MultiIndex.from_tuples([tuple(p) for p in old_aside])
        dup |= pd.MultiIndex.from_arrays([df["user"].astype(str), df["item"].astype(str)]).isin(seen)
    df, uid, iid = df[~dup].reset_index(drop=True), uid[~dup], iid[~dup]
    keep = _kcore_with_counts(df, uid, iid, stored, stream, int(record["min_user"]), int(record["min_item"]))
    df, uid, iid = df[keep].reset_index(drop=True), uid[keep], iid[keep]
    min_rating = record["read"]["min_rating"]
    steps = [
        (n_read - n_rated, f"rated below {min_rating:g} dropped (the stream's --min-rating)" if min_rating is not None else ""),
        (n_rated - n_unique, "repeated user-item row(s) dropped (the earliest kept)"),
        (int(dup.sum()), "already in the stream (in its splits, or set aside as held-out) dropped"),
        (
            int((~keep).sum()),
            f"removed by the k-core filter (min_user={record['min_user']}, min_item={record['min_item']}, "
            "counting the stream's interactions)",
        ),
    ]
    account = P.rows_note(log, n_read, steps, len(df), 0).removeprefix(f"{log.name}: ")  # every row read, accounted for
    if len(df) == 0:
        raise CcdrecError(f"{log}: no new interaction left ({account})" + "".join(f"; {n}" for n in spaced))
    last = record["last_time"]
    times = df["time"].to_numpy()
    late = times < last
    if late.any():
        notes.append(
            f"{int(late.sum()):,} new interaction(s) are older than the stream's last timestamp ({record['last_time_utc']} UTC); "
            "kept in the first new block"
        )
    try:
        if window is not None:
            width = window_s * per_second
            same_grid = record.get("window_anchor") is not None and record.get("window_seconds") == window_s
            anchor = record["window_anchor"] if same_grid else last
            start = int((last - anchor) // width)
            cut = P.window_labels(times, anchor, width, window, per_second, log, start=start)
            labels = cut.labels
            notes += cut.notes
        else:
            labels = _equal_parts(len(df), n_blocks or 1, log)
    except CcdrecError as e:  # too few for a block: say where the rows went
        raise CcdrecError(f"{e} ({account})") from None
    users = _extend_ids(uid, df["user"].to_numpy(dtype=object), len(stream.user_vocab))
    items = _extend_ids(iid, df["item"].to_numpy(dtype=object), len(stream.item_vocab))
    first = len(stream)
    blocks, block_notes = P.build_blocks(
        users, items, labels, int(record["seed"]), log, first=first, prev=(stream.n_users, stream.n_items)
    )
    left_out, aside = P.set_aside(users, items, df, labels, blocks)
    notes.insert(0, P.rows_note(log, n_read, steps, len(df), sum(left_out)))
    new_users = [u for u in pd.unique(df["user"].to_numpy(dtype=object)[uid < 0])]
    new_items = [i for i in pd.unique(df["item"].to_numpy(dtype=object)[iid < 0])]
    grown = Stream(
        stream.name,
        stream.blocks + blocks,
        np.array(list(stream.user_vocab) + [str(u) for u in new_users], dtype=object),
        np.array(list(stream.item_vocab) + [str(i) for i in new_items], dtype=object),
    )
    r = record["read"]
    kind = r["file_format"] or P._kind(log)
    if not spaced:  # else said of these IDs already, and better
        notes += P.spaced_ids_notes(log, new_users, new_items, kind, r["sep"] or P._default_sep(log), again="append")
    notes += P.lookalike_ids_notes([*stream.user_vocab, *map(str, new_users)], [*stream.item_vocab, *map(str, new_items)])
    old_left_out = record.get("left_out")
    new_last = max(last, times.max().item())
    record = {
        **record,
        "last_time": new_last,
        "last_time_utc": P._utc(new_last, per_second),
        # one count per block, or none at all (a stream prepared before they were recorded)
        "left_out": old_left_out + left_out if isinstance(old_left_out, list) and len(old_left_out) == first else None,
        "appends": [
            *record.get("appends", []),
            {
                "log": log.name,
                "rows_sha256": digest,
                "interactions": len(df),
                "blocks": [first, len(grown) - 1],
                "window": window,
                "n_blocks": None if window is not None else (n_blocks or 1),
            },
        ],
    }
    old_digest = stream.digest
    loaded = P._write_atomically(
        grown,
        log,
        stream_dir,
        True,
        extra={P.PREPARE_FILE: record, P.SET_ASIDE_FILE: {"pairs": old_aside + aside}},
        check=lambda s: _check_prefix(s, first, old_digest, stream_dir),
    )
    for note in notes + block_notes:
        warnings.warn(note, P.PrepareWarning, stacklevel=2)
    return loaded


def _spaced_ids_note(ids: pd.Series, known: dict, what: str) -> str | None:
    """A note when new ``what`` IDs differ from stored ones only by spaces around them (``' 12'`` in the log
    for the stream's ``'12'``, or ``'12'`` for ``' 12'``): IDs are kept as written, so they name new users or
    items, which the k-core filter then often removes."""
    unknown = pd.unique(ids[~ids.isin(known.keys())].astype(str))
    stored = {str(k).strip(): str(k) for k in known}  # the stream's IDs without their spaces
    near = [(i, stored[i.strip()]) for i in unknown if i.strip() in stored]
    if not near:
        return None
    given, meant = near[0]
    fix = "remove the spaces in the log" if given != given.strip() else "write them as the stream does in the log"
    return (
        f"{len(near):,} {what} ID(s) of the log differ from the stream's {what} IDs only by spaces around them "
        f"(e.g. {given!r} for {meant!r}), so they name new {what}s; {fix} if they are the same"
    )


def _check_prefix(loaded: Stream, n: int, digest: str, stream_dir: Path) -> None:
    if loaded.prefix_digest(n) != digest:
        raise CcdrecError(f"{stream_dir}: the appended stream would change its first {n} blocks; nothing written")


def _read_new(log: Path, record: dict) -> tuple[pd.DataFrame, int, int]:
    """(user, item, time) of ``log`` read as the stream's log was (rows rated below the stream's
    ``min_rating`` dropped), the time keys per second, and the number of rows read."""
    r, t = record["read"], record["time"]
    wanted = (r["user_col"], r["item_col"], r["time_col"]) + ((r["rating_col"],) if r["rating_col"] is not None else ())
    names = tuple(r["columns"]) if r["columns"] is not None else None
    raw = P._read_log(log, wanted, file_format=r["file_format"], sep=r["sep"], names=names)
    if names is not None and len(raw) and all(str(raw[c].iloc[0]).strip().casefold() == c.strip().casefold() for c in wanted):
        raise CcdrecError(
            f"{log}: its first line is a header ({', '.join(repr(str(raw[c].iloc[0])) for c in wanted)}), but the stream's "
            f"log had none: drop it, e.g. {P.rewrite_command(log, 'tail -n +2', 'body')}"
        )
    col = raw[r["time_col"]]
    if t["kind"] == "numbers":
        reading = P._time_reading(col, log, r["time_col"], time_unit=t["unit"], appending=True)
    elif t["kind"] == "dates":
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_datetime64_any_dtype(col):
            raise CcdrecError(f"{log}: column {r['time_col']!r} must hold dates in the stream's format {t['format']!r}")
        reading = P._time_reading(col, log, r["time_col"], time_format=t["format"])
    else:
        reading = P._time_reading(col, log, r["time_col"])
    last_s = record["last_time"] / reading.per_second
    P.check_time_outliers(reading, col, f"{log}: column {r['time_col']!r}", P._PLAUSIBLE_FROM_S <= last_s <= time.time() + 86_400)
    if reading.describe() != t:
        raise CcdrecError(
            f"{log}: column {r['time_col']!r} reads as {_what(reading.describe())}, the stream's timestamps as {_what(t)}"
        )
    return (
        P._interactions(raw, r["user_col"], r["item_col"], reading.keys, r["rating_col"], r["min_rating"], log),
        reading.per_second,
        len(raw),
    )


def _what(t: dict) -> str:
    if t["kind"] == "numbers":
        return f"numbers of {P._UNIT_NAMES[t['unit']]}"
    return "datetimes" if t["kind"] == "datetimes" else f"dates in format {t['format']!r}"


def _kcore_with_counts(df, uid, iid, stored, stream, min_user: int, min_item: int) -> np.ndarray:
    """Which new rows pass the k-core filter counted with the stream's stored pairs (module docstring, 4)."""
    u_codes, _ = pd.factorize(pd.Series(np.where(uid >= 0, uid.astype(str), "new:" + df["user"].astype(str))))
    i_codes, _ = pd.factorize(pd.Series(np.where(iid >= 0, iid.astype(str), "new:" + df["item"].astype(str))))
    n_u, n_i = (u_codes.max(initial=-1) + 1), (i_codes.max(initial=-1) + 1)
    stored_u = np.bincount(stored[:, 0], minlength=stream.n_users)
    stored_i = np.bincount(stored[:, 1], minlength=stream.n_items)
    base_u = np.zeros(n_u, dtype=np.int64)
    base_i = np.zeros(n_i, dtype=np.int64)
    base_u[u_codes[uid >= 0]] = stored_u[uid[uid >= 0]]
    base_i[i_codes[iid >= 0]] = stored_i[iid[iid >= 0]]
    keep = np.ones(len(df), dtype=bool)
    while True:
        cnt_u = base_u + np.bincount(u_codes[keep], minlength=n_u)
        cnt_i = base_i + np.bincount(i_codes[keep], minlength=n_i)
        new_keep = keep & (cnt_u[u_codes] >= min_user) & (cnt_i[i_codes] >= min_item)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def _equal_parts(n: int, n_blocks: int, log: Path) -> np.ndarray:
    bounds = np.round(np.linspace(0, n, n_blocks + 1)).astype(np.int64)
    sizes = np.diff(bounds)
    if sizes.min() < P.MIN_PER_BLOCK:
        raise CcdrecError(
            f"{log}: {n} new interactions are too few for {n_blocks} block(s): a block would get {int(sizes.min())} "
            f"(at least {P.MIN_PER_BLOCK} needed)"
        )
    return np.repeat(np.arange(n_blocks), sizes)


def _extend_ids(ids: np.ndarray, names: np.ndarray, n_old: int) -> np.ndarray:
    """``ids`` with the unknown ones (-1) numbered from ``n_old`` in order of first appearance of ``names``."""
    out = ids.copy()
    new = ids < 0
    codes, _ = pd.factorize(pd.Series(names[new]))
    out[new] = n_old + codes
    return out
