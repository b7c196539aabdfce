"""Turn a user's own interaction log into a stream directory (method.md section 2, data).

The procedure behind ``ccdrec data prepare``:

1. Read the log and keep the user, item and timestamp columns (and the rating column, if any).
   The file type comes from the name: text (``.csv``, ``.tsv``, ``.txt``, ``.dat``, ``.data``, or any
   name ending ``.gz``, which is read as gzip-compressed text) or Parquet (``.parquet``, ``.pq``);
   ``file_format`` (``--format csv|parquet``) overrides it. Text logs are separated by ``sep``
   (``--sep``: one character, ``tab`` or ``\\t``; default ``,``, tab for ``.tsv``) and have a header
   line, unless ``header=False`` (``--no-header``), when ``columns`` (``--columns user,item,...``) names
   every column of the file. IDs are kept exactly as written (as strings; ``NA``, ``null``, spaces,
   commas, quotes and line breaks included); only empty cells are missing.
2. With ``rating_col`` and ``min_rating`` (``--rating-col``, ``--min-rating``) keep only the
   interactions rated at least ``min_rating``, as implicit feedback. Ratings must be finite numbers.
3. Timestamps, one reading for the whole column (never one per value):

   * numbers (also as text) count ``time_unit`` units (``--time-unit s|ms|us|ns``) since 1970-01-01
     UTC. Without a unit the smallest of s, ms, us, ns that puts every value inside the window is
     taken, so 10-digit seconds and 13-digit milliseconds both work;
   * date/time strings: ISO 8601 (``2024-01-02``, ``2024-01-02T03:04:05Z``, offsets allowed), or else the
     one format that fits every value. A day/month order is decided by the whole column: ``13/01/2024``
     anywhere makes it day-first, ``01/13/2024`` month-first; a column where no field exceeds 12 is
     ambiguous and an error (give ``time_format``, ``--time-format '%d/%m/%Y %H:%M'``, a strftime format);
     values in different forms are an error too. Time zones are converted to UTC; naive times are UTC.

   Every timestamp must be finite and lie in the window 1900-01-01 .. 2199-12-31 UTC
   (:data:`TIME_WINDOW`); anything else, NaN and ``inf`` included, is an unparsable timestamp.
4. Reject missing values, sort by time, then user, then item (IDs compared as written, by code point:
   the same rows give the same stream whatever their order in the file) and drop repeated (user, item)
   pairs, keeping the earliest occurrence.
5. Iterative k-core filter: drop users with fewer than ``min_user`` and items with fewer than
   ``min_item`` interactions, repeatedly, until nothing changes.
6. Cut the timeline: the first ``base_fraction`` of the interactions form block D_0, the rest
   ``n_blocks`` incremental blocks D_1..D_K of (about) equal interaction count, or, with ``window``
   (``--window 7d``; ``N`` + ``s``/``m``/``h``/``d``/``w``), one block per calendar window: window m
   holds the timestamps in ``[t0 + m·W, t0 + (m+1)·W)``, t0 the last timestamp of D_0 (ties with it
   after the cut fall into window 0). Windows are measured on the timestamps as read in step 3:
   dates in UTC, numbers in their unit (given by ``--time-unit`` or inferred; an inferred unit is
   named in a note, so that e.g. day counts read as seconds are noticed). A window without
   interactions (after the k-core filter) is skipped with a note; a window with fewer than
   :data:`MIN_PER_BLOCK` interactions is merged into the next one (the block spans both, with a
   note) and a short last window into the block before it, so blocks follow the same minimum as
   with ``n_blocks`` without failing on a quiet week. Fewer than :data:`MIN_PER_BLOCK` interactions
   after D_0 in all is an error.
7. Assign integer IDs in order of first appearance along the timeline of step 4 (users and items
   separately), so the universe is cumulative and block k's new users are exactly the IDs
   [U_{k-1}, U_k) (items likewise).
8. Split every block per user into train/valid/test with :func:`ccdrec.data.split.split_block`,
   block k with its own generator ``numpy.random.default_rng([seed, k])`` (:func:`split_rng`), so a block
   is split the same way whether it was prepared with the others or appended later (earlier versions
   used one generator for all blocks in order: a re-prepared log gets other splits). A block without valid or test
   users, and an incremental block without new users, is reported as a :class:`PrepareWarning`
   (the CLI prints it as a ``note:`` line); it is not an error.
9. Write the stream with :func:`ccdrec.data.stream.save_stream` (vocabularies ``users.json`` /
   ``items.json``: JSON lists of the original IDs) into a temporary directory next to ``out``, read it
   back and compare it with what was meant to be written, and only then rename it into place: a
   failure of any kind never leaves ``out`` or the temporary directory behind. ``prepare.json``
   (:data:`PREPARE_FILE`) records the reading options, the resolved timestamp reading (numbers and
   their unit, or the date format), the k-core minimums, seed, base fraction, ``blocks`` or
   ``window`` (with its anchor t0) and the last timestamp: ``ccdrec data append``
   (:mod:`ccdrec.data.append`) reads it to treat new rows the same way.

Every problem the user can fix raises :class:`ccdrec.errors.CcdrecError` with a one-line message that
names the file. Notes (:class:`PrepareWarning`) account for the rows (read, rated below ``min_rating``,
duplicate pairs, removed by the k-core filter, kept), flag numeric timestamps that read as dates before
1980 or after tomorrow (naming the unit that would fit), and IDs that begin or end with whitespace
(kept as written).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ccdrec.config import SEED_MAX
from ccdrec.data.split import split_block
from ccdrec.data.stream import SPLITS, UNIVERSE, Block, Stream, load_stream, save_stream, write_siblings
from ccdrec.errors import CcdrecError, WrongArgumentType
from ccdrec.filemode import plain_mode

try:
    from pandas.tseries.api import guess_datetime_format
except ImportError:  # pandas < 2.2
    from pandas._libs.tslibs.parsing import guess_datetime_format

TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".dat", ".data")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = ("csv", "parquet")
MIN_PER_BLOCK = 10  # fewest interactions a block may have after the k-core filter
DEFAULT_BLOCKS = 5
PREPARE_FILE = "prepare.json"  # how the stream was prepared (options, timestamp reading, last time): data append reads it
PREPARE_VERSION = 1
# the held-out pairs set aside (item without a train pair in its block), as written in the log, so that
# data append knows them as already seen: {"pairs": [[user, item], ...]}
SET_ASIDE_FILE = "left_out.json"
COLUMN_OPTIONS = ("--user-col", "--item-col", "--time-col", "--rating-col")  # data prepare's, in the order read
TIME_UNITS = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}  # per second
TIME_WINDOW = ("1900-01-01", "2200-01-01")  # every timestamp must lie in [start, end) UTC
_WINDOW_S = (-2_208_988_800, 7_258_118_400)  # TIME_WINDOW in unix seconds
_WINDOW_TEXT = "1900-01-01..2199-12-31 UTC"
_MAX_GUESSES = 20  # distinct values whose guessed formats are tried on the whole column

_READ_ERRORS = (ValueError, OSError, EOFError, pd.errors.ParserError, pa.ArrowException)


class PrepareWarning(UserWarning):
    """Something about a prepared stream worth knowing that is not an error (e.g. a block without test users)."""


_BLOCK_NOTE = re.compile(r"^((?:incremental )?)block (\d+) has (.*)$", re.S)


def merged_block_notes(notes: list[str], shown: int = 12) -> list[str]:
    """``notes`` with the per-block ones that say the same of several blocks given once, in the place of
    the first: ``block 3 has no test users (...)`` and ``block 7 has ...`` become ``blocks 3 and 7 have
    no test users (...)``, the block numbers as ranges (``3-5, 9``), at most ``shown`` of them and a count
    (a ``--window 1h`` over months made thousands of notes). Other notes are kept as they are."""
    order: list[str | tuple[str, str]] = []
    blocks: dict[tuple[str, str], list[int]] = {}
    for note in notes:
        m = _BLOCK_NOTE.match(note)
        if m is None:
            order.append(note)
            continue
        key = (m.group(1), m.group(3))
        if key not in blocks:
            blocks[key] = []
            order.append(key)
        blocks[key].append(int(m.group(2)))
    out = []
    for entry in order:
        if isinstance(entry, str):
            out.append(entry)
            continue
        (prefix, rest), ks = entry, blocks[entry]
        if len(ks) == 1:
            out.append(f"{prefix}block {ks[0]} has {rest}")
            continue
        runs = _ranges(sorted(set(ks)))
        listed = ", ".join(runs[:shown]) + (f" and {len(runs) - shown} more range(s)" if len(runs) > shown else "")
        rest = rest.replace("; its ", "; their ").replace(" in it ", " in them ")  # said of several blocks
        out.append(f"{prefix}blocks {listed} ({len(set(ks)):,} blocks) have {rest}")
    return out


def _ranges(ks: list[int]) -> list[str]:
    """Sorted block numbers as ranges: [3, 4, 5, 9] -> ['3-5', '9']."""
    out, start = [], None
    for i, k in enumerate(ks):
        if start is None:
            start = k
        if i + 1 == len(ks) or ks[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return out


def prepare_stream(
    log: str | Path,
    out: str | Path,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    min_user: int = 10,
    min_item: int = 10,
    base_fraction: float = 0.5,
    n_blocks: int | None = None,
    seed: int = 0,
    force: bool = False,
    sep: str | None = None,
    header: bool = True,
    columns: str | Sequence[str] | None = None,
    rating_col: str | None = None,
    min_rating: float | None = None,
    time_format: str | None = None,
    time_unit: str | None = None,
    file_format: str | None = None,
    window: str | None = None,
) -> Stream:
    """Prepare the interaction ``log`` into the stream directory ``out`` and return it loaded.

    D_0 holds the first ``base_fraction`` of the (k-core filtered, deduplicated) interactions in time
    order; then either ``n_blocks`` (default 5) incremental blocks of equal interaction count, or, with
    ``window`` (``"7d"``, ``"12h"``, ...; :func:`parse_window`), one block per calendar window measured
    from the last timestamp of D_0 (:func:`window_labels`: empty windows skipped, windows with fewer
    than :data:`MIN_PER_BLOCK` interactions merged into the next). ``n_blocks`` and ``window`` together
    are an error. ``out`` must not exist or be empty unless ``force`` is set, in which case it is
    replaced. The reading options are described in the module docstring; they are recorded with the
    resolved timestamp reading in ``out/prepare.json`` (:data:`PREPARE_FILE`) for ``ccdrec data append``.
    Notes about the result (the rows read, dropped at each step and kept; blocks without valid/test users
    or new users, skipped or merged windows; unlikely numeric timestamps; IDs with surrounding whitespace)
    are issued as :class:`PrepareWarning` after it is written.
    """
    for what, given in (("log", log), ("output", out)):
        if not isinstance(given, str | os.PathLike):
            hint = " (write a DataFrame to a file first: df.to_parquet('log.parquet'))" if what == "log" else ""
            raise WrongArgumentType(f"the {what} must be a path (str or Path), not {type(given).__name__}{hint}")
        if isinstance(given, str) and not given.strip():  # Path("") would be ".", the current directory
            raise CcdrecError(f"the {what} path is empty")
    log, out = Path(log), Path(out)
    if window is not None and n_blocks is not None:
        raise CcdrecError(f"{log}: give either --blocks (equal-count blocks) or --window (calendar windows), not both")
    window_s = parse_window(window) if window is not None else None
    n_blocks = DEFAULT_BLOCKS if n_blocks is None else n_blocks
    _check_params(log, user_col, item_col, time_col, rating_col, min_user, min_item, base_fraction, n_blocks, seed)
    # numpy numbers pass the checks; prepare.json is written with the plain numbers they hold
    min_user, min_item, n_blocks, seed = int(min_user), int(min_item), int(n_blocks), int(seed)
    base_fraction = float(base_fraction)
    min_rating = min_rating.item() if isinstance(min_rating, np.generic) else min_rating
    _check_time_options(log, time_format, time_unit)
    names = _column_names(log, header, columns)
    sep = _separator(log, sep)
    wanted = (user_col, item_col, time_col) + ((rating_col,) if rating_col is not None else ())
    _check_rating_options(log, rating_col, min_rating)
    file_format = _file_format(log, file_format)
    _check_out(log, out, force)
    df = _read_log(log, wanted, file_format=file_format, sep=sep, names=names, options=COLUMN_OPTIONS)
    n_read = len(df)
    reading = _time_reading(df[time_col], log, time_col, time_format=time_format, time_unit=time_unit)
    check_time_outliers(reading, df[time_col], f"{log}: column {time_col!r}")
    df = _interactions(df, user_col, item_col, reading.keys, rating_col, min_rating, log)
    n_rated = len(df)
    df = _dedup_in_time_order(df)
    n_unique = len(df)
    digest = rows_sha256(df)
    id_notes = lookalike_ids_notes(df["user"], df["item"])
    df = _kcore(df, min_user, min_item)
    notes: list[str] = []
    if window_s is None:
        labels = _block_labels(len(df), base_fraction, n_blocks, log, min_user, min_item)
        anchor = None
    else:
        n0 = _base_size(len(df), base_fraction, log, min_user, min_item)
        anchor = df["time"].iloc[n0 - 1].item()
        inc = window_labels(df["time"].to_numpy()[n0:], anchor, window_s * reading.per_second, window, reading.per_second, log)
        labels = np.concatenate([np.zeros(n0, dtype=np.int64), inc.labels + 1])
        notes += inc.notes
    odd = _odd_times(df["time"], reading, time_unit) if reading.label == "numbers" else []
    if window_s is not None and reading.label == "numbers" and time_unit is None and not odd:
        first, last = (_utc(df["time"].iloc[i].item(), reading.per_second) for i in (0, -1))
        notes.append(
            f"--window {window}: numeric timestamps read as {_UNIT_NAMES[reading.unit]} since 1970 ({first} .. {last}); "
            "give --time-unit if they count something else"
        )
    notes += odd + _whole_days_notes(df["time"], reading.per_second, window_s)
    stream, block_notes, (users, items) = _build_stream(out.name, df, labels, seed, log)
    left_out, aside = set_aside(users, items, df, labels, stream.blocks)
    steps = [
        (n_read - n_rated, f"rated below {min_rating:g} dropped (--min-rating)" if min_rating is not None else ""),
        (n_rated - n_unique, "repeated user-item row(s) dropped (the earliest kept)"),
        (n_unique - len(df), f"removed by the k-core filter (min_user={min_user}, min_item={min_item})"),
    ]
    notes.insert(0, rows_note(log, n_read, steps, len(df), sum(left_out)))
    kind = file_format or _kind(log)
    notes += spaced_ids_notes(log, stream.user_vocab, stream.item_vocab, kind, sep or _default_sep(log)) + id_notes
    record = {
        "version": PREPARE_VERSION,
        "read": {
            "user_col": user_col,
            "item_col": item_col,
            "time_col": time_col,
            "sep": sep,
            "header": header,
            "columns": list(names) if names is not None else None,
            "rating_col": rating_col,
            "min_rating": min_rating,
            "file_format": file_format,
        },
        "time": reading.describe(),
        "min_user": min_user,
        "min_item": min_item,
        "seed": seed,
        "base_fraction": base_fraction,
        "blocks": None if window is not None else n_blocks,
        "window": window.strip().lower() if window is not None else None,
        "window_seconds": window_s,
        "window_anchor": anchor,
        "last_time": df["time"].iloc[-1].item(),
        "last_time_utc": _utc(df["time"].iloc[-1].item(), reading.per_second),
        "left_out": left_out,
        "rows_sha256": digest,  # data append refuses these rows (and every appended log's) a second time
        "appends": [],
    }
    stream = _write_atomically(stream, log, out, force, extra={PREPARE_FILE: record, SET_ASIDE_FILE: {"pairs": aside}})
    for note in notes + block_notes:
        warnings.warn(note, PrepareWarning, stacklevel=2)
    return stream


_PLAUSIBLE_FROM_S = 315_532_800  # 1980-01-01 UTC in unix seconds: numeric timestamps before it are suspect


def _odd_times(times: pd.Series, reading, time_unit: str | None, now_s: float | None = None) -> list[str]:
    """A note when numeric timestamps, read in their unit, fall before 1980, after tomorrow (``now_s`` + 1 day,
    default the clock) or all within a minute: most likely the unit is wrong (seconds read as milliseconds);
    the unit that puts them all within 1980 .. tomorrow is named if there is one. The blocks follow the
    order either way, so it is a note, not an error (a log may count seconds from its own start)."""
    first, last = times.min().item(), times.max().item()
    per = reading.per_second
    latest_s = (time.time() if now_s is None else now_s) + 86_400
    reasons = []
    if first < _PLAUSIBLE_FROM_S * per:
        reasons.append("before 1980")
    if last > latest_s * per:
        reasons.append("after tomorrow")
    if last - first < 60 * per:
        reasons.append("within one minute")
    if not reasons:
        return []

    def fits(unit: str) -> bool:
        return first / TIME_UNITS[unit] >= _PLAUSIBLE_FROM_S and last / TIME_UNITS[unit] <= latest_s

    how = "given by --time-unit" if time_unit is not None else "guessed"
    likely = [u for u in TIME_UNITS if u != reading.unit and fits(u)]
    if reasons == ["within one minute"]:
        hint = "so the blocks follow the order of ties (user, then item), not time: check the time column"
    elif likely:
        unit = likely[0]
        hint = (
            f"--time-unit {unit} ({_UNIT_NAMES[unit]}) reads them as {_utc(first, TIME_UNITS[unit])} .. "
            f"{_utc(last, TIME_UNITS[unit])}: check the unit"
        )
    else:
        hint = "no unit puts them within 1980 .. tomorrow: check the unit, unless they count from another origin"
    return [
        f"numeric timestamps read as {_UNIT_NAMES[reading.unit]} since 1970 ({how}) span {_utc(first, per)} .. "
        f"{_utc(last, per)}, {' and '.join(reasons)}; {hint}"
    ]


def _whole_days_notes(times: pd.Series, per_second: int, window_s: int | None) -> list[str]:
    """A note when every timestamp is a whole day (dates without a time) and days repeat: the interactions
    of one day are then ordered by user and item, and a block of ``--blocks`` may begin or end inside a day;
    a ``--window`` of whole days cuts at midnight instead."""
    keys = times.to_numpy()
    day = 86_400 * per_second
    if (window_s is not None and window_s % 86_400 == 0) or not np.issubdtype(keys.dtype, np.integer):
        return []
    if len(keys) < 2 or (keys % day).any():
        return []
    days = len(np.unique(keys))
    if days >= len(keys):
        return []
    if days == 1:
        return ["every timestamp is the same day: the blocks follow the order of ties (user, then item), not time"]
    return [
        f"every timestamp is a whole day ({days:,} distinct days for {len(keys):,} interactions): the interactions of "
        "one day are ordered by user, then item, so a block may begin or end inside a day; --window 1d (or a "
        "multiple) cuts the incremental blocks at midnight (the base block still ends where --base-fraction puts it)"
    ]


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def rows_note(log: Path, n_read: int, steps: list[tuple[int, str]], kept: int, left_out: int) -> str:
    """One line accounting for the rows of ``log``: read, dropped or removed at each of ``steps`` ((count,
    what) pairs; zero counts are left out), kept, and the held-out interactions of those not stored
    because their item has no train interaction in the block (``left_out``; the block notes detail them)."""
    parts = [f"{_plural(n_read, 'row')} read"] + [f"{n:,} {what}" for n, what in steps if n]
    kept_text = f"{_plural(kept, 'interaction')} kept"
    if left_out:
        kept_text += f", {kept - left_out:,} of them in the splits ({left_out:,} held-out ones set aside, see below)"
    return f"{log.name}: " + "; ".join([*parts, kept_text])


def spaced_ids_notes(log: Path, users, items, kind: str, sep: str, again: str = "prepare") -> list[str]:
    """A note when IDs among ``users`` / ``items`` begin or end with whitespace (``1, 242, ...``: spaces after
    the separator): they are kept as written, so ``242`` would not find `` 242``; says how to strip them and
    ``prepare`` (or ``append``) again."""
    counts = {}
    example = None
    for what, ids in (("user", users), ("item", items)):
        spaced = [str(v) for v in ([] if ids is None else ids) if str(v) != str(v).strip()]
        if spaced:
            counts[what] = len(spaced)
            example = example or (spaced[0], what)
    if not counts:
        return []
    which = " and ".join(f"{n:,} {what} ID(s)" for what, n in counts.items())
    (shown, what), option = example, "--user" if example[1] == "user" else "--items"
    hint = _strip_hint(log, kind, sep, "in the logs you append" if again == "append" else "and prepare again")
    return [
        f"{which} begin or end with whitespace, e.g. {shown!r}: IDs are kept as written, so {shown.strip()!r} "
        f"is not {shown!r} (in recommend {option}, for instance); {hint}"
    ]


def lookalike_ids_notes(users, items) -> list[str]:
    """A note when distinct IDs are the same text in another Unicode form (``é`` composed and decomposed:
    NFC differs from NFD, so they are two users or items), when IDs hold control characters (a NUL,
    a line break), which a terminal does not show, and when IDs read like a missing value (``nan``,
    ``NULL``: :data:`MISSING_WORDS`); IDs are kept as written either way."""
    import unicodedata

    notes = []
    for what, ids in (("user", users), ("item", items)):
        distinct = pd.unique(pd.Series(ids, dtype=object).astype(str))
        forms = pd.Series([unicodedata.normalize("NFC", i) for i in distinct])
        twins = forms.duplicated(keep=False)
        if twins.any():
            first = forms[twins].iloc[0]
            example = [ascii(i) for i in distinct[(forms == first).to_numpy()][:2]]  # escaped: they look the same
            n = int(twins.sum() - forms[twins].nunique())
            notes.append(
                f"{n:,} {what} ID(s) are the same text as another in another Unicode form (e.g. {' and '.join(example)}), "
                "kept as distinct IDs; normalise the log to one form (NFC: python's unicodedata.normalize) if they "
                "name the same"
            )
        control = [i for i in distinct if any(unicodedata.category(c) in ("Cc", "Cf") for c in i)]
        if control:
            notes.append(
                f"{len(control):,} {what} ID(s) hold control or invisible characters (e.g. {ascii(control[0])}), kept as written"
            )
        missing = [i for i in distinct if i.strip().casefold() in MISSING_WORDS]
        if missing:
            notes.append(
                f"{len(missing):,} {what} ID(s) read like a missing value ({', '.join(map(repr, missing[:3]))}): each is kept "
                "as one ID for all its rows; if the log's writer put them for missing IDs (pandas' astype(str) writes "
                "'nan'), leave those rows out of the log"
            )
    return notes


# IDs that a writer of a log likely put for a missing value (compared case-insensitively)
MISSING_WORDS = frozenset({"nan", "none", "null", "na", "n/a", "nil", "<na>", "nat"})


def _strip_hint(log: Path, kind: str, sep: str, then: str = "and prepare again") -> str:
    """How to strip the spaces around IDs, ``then`` what (``and prepare again``; for an append, where the rows
    are in the stream as written, ``in the logs you append``)."""
    if kind == "parquet":
        return f"to drop the spaces, strip the ID columns first (pandas: df[col] = df[col].str.strip()) {then}"
    if (cmd := _strip_command(log, sep)) is None:
        return f"to drop them, remove the spaces around the separators in the log {then}"
    return f"if they are spaces around the separators, remove them {then}, e.g. {cmd}"


def _sed(sep: str) -> tuple[str, str] | None:
    """``sep`` in a sed script: (as a pattern, as a replacement), ``\\t`` for a tab, ``[c]`` / ``c`` for a
    printable character; None for one a script cannot name plainly (several characters, ``] ^ \\ / & '``)."""
    if sep == "\t":
        return "\\t", "\\t"
    if len(sep) != 1 or sep in "]^\\/&'" or not sep.isprintable():
        return None
    return f"[{sep}]", sep


def _strip_command(log: Path, sep: str) -> str | None:
    """A ``sed`` command that removes the spaces around ``sep`` in a text log (:func:`rewrite_command`),
    or None for a separator a sed script cannot name plainly."""
    if (named := _sed(sep)) is None:
        return None
    pattern, replacement = named
    return rewrite_command(log, f"sed -E 's/^ +//; s/ *{pattern} */{replacement}/g; s/ +$//'", "stripped")


def rewrite_command(log: Path, text_filter: str, prefix: str) -> str:
    """A shell command that runs ``text_filter`` (a command reading a file argument or standard input,
    e.g. ``sed -E '...'``) over the log's text and writes ``PREFIX-NAME`` beside it: the paths as given
    (a directory included, quoted), a gzip log read and written compressed."""
    name = log.name
    if _is_gzip(log):
        out = log.with_name(f"{prefix}-{name}" if name.lower().endswith(".gz") else f"{prefix}-{name}.gz")
        return f"zcat {shlex.quote(str(log))} | {text_filter} | gzip > {shlex.quote(str(out))}"
    return f"{text_filter} {shlex.quote(str(log))} > {shlex.quote(str(log.with_name(f'{prefix}-{name}')))}"


def _interactions(df: pd.DataFrame, user_col, item_col, times: np.ndarray, rating_col, min_rating, log: Path) -> pd.DataFrame:
    """(user, item, time) rows as strings and time keys, rows rated below ``min_rating`` dropped."""
    df = pd.DataFrame(
        {
            "user": _ids(df[user_col], log),
            "item": _ids(df[item_col], log),
            "time": times,
            "keep": True if rating_col is None else _rating_mask(df[rating_col], log, rating_col, min_rating),
        }
    )
    df = df[df.pop("keep")].reset_index(drop=True)
    if len(df) == 0:
        raise CcdrecError(f"{log}: no interaction has a {rating_col!r} of at least {min_rating}")
    return df


# --- calendar windows ---------------------------------------------------------------------

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_WINDOW_RE = re.compile(r"([0-9]+)([A-Za-z]+)")
_WINDOW_MAX = 300 * 366 * 86_400  # longer than the 1900 .. 2199 timestamps may span
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def parse_window(text: str) -> int:
    """The length in seconds of a calendar window written ``N`` + unit: ``s`` (seconds), ``m`` (minutes),
    ``h`` (hours), ``d`` (days) or ``w`` (weeks), e.g. ``7d``, ``12h``, ``90m``; anything else is a
    :class:`CcdrecError`."""
    m = _WINDOW_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None or int(m.group(1)) == 0 or m.group(2) not in _WINDOW_UNITS:
        unit = m.group(2) if m else ""
        hint = ""
        if unit in ("M", "mo", "mon", "month", "months", "y", "Y", "yr", "year", "years"):
            hint = "; months and years have no fixed length: give days or weeks (30d, 4w, 365d)"
        elif unit not in _WINDOW_UNITS and unit.lower() in _WINDOW_UNITS:
            hint = f"; units are lower case ({unit.lower()})"
        raise CcdrecError(
            f"--window must be a whole positive number followed by s, m (minutes), h, d or w (e.g. 7d, 12h, 90m), "
            f"got {text!r}{hint}"
        )
    seconds = int(m.group(1)) * _WINDOW_UNITS[m.group(2)]
    if seconds > _WINDOW_MAX:
        raise CcdrecError(f"--window {text.strip()} is longer than the 300 years timestamps may span (1900 .. 2199)")
    return seconds


def _utc(key, per_second: int) -> str:
    """A time key as a UTC date and time (``2021-03-01 12:00:00``)."""
    return pd.Timestamp(int(round(key * 10**9 / per_second)) if per_second != 10**9 else int(key), unit="ns").strftime(
        "%Y-%m-%d %H:%M:%S"
    )


class WindowCut(NamedTuple):
    labels: np.ndarray  # 0-based incremental block of each interaction
    notes: list[str]


def window_labels(times: np.ndarray, anchor, width: int, window: str, per_second: int, log: Path, *, start: int = 0) -> WindowCut:
    """Cut time-ordered incremental interactions into blocks by calendar window.

    ``times``: time keys (``per_second`` units per second), sorted; ``anchor``: the key windows are
    measured from (the last timestamp of D_0); ``width``: the window in key units. Window ``m`` holds
    the keys in ``[anchor + m·width, anchor + (m+1)·width)``; keys before the first window ``start``
    (late rows of an append) count as window ``start``. Windows without interactions are skipped (one
    note lists them); a window with fewer than :data:`MIN_PER_BLOCK` interactions is merged into the
    next one (a note says so), and a short remainder at the end into the block before it. Fewer than
    :data:`MIN_PER_BLOCK` interactions in all is a :class:`CcdrecError`.
    """
    n = len(times)
    if n < MIN_PER_BLOCK:
        raise CcdrecError(
            f"{log}: only {n} interactions after the base block, too few for one {window} block (at least {MIN_PER_BLOCK} needed)"
        )
    offsets = np.asarray(times) - anchor
    if np.issubdtype(offsets.dtype, np.integer):
        win = offsets // width
    else:
        win = np.floor(offsets / width).astype(np.int64)
    win = np.maximum(win, start)
    present, counts = np.unique(win, return_counts=True)
    notes = []
    gaps = np.diff(present) - 1  # the empty windows between two present ones (never listed whole: 1s over decades)
    n_empty = int(gaps.sum())
    if n_empty:
        first = [int(present[g]) + 1 + j for g in np.flatnonzero(gaps)[:3] for j in range(min(int(gaps[g]), 3))][:3]
        shown = ", ".join(_window_text(anchor, width, per_second, m) for m in first)
        more = f" and {n_empty - 3:,} more" if n_empty > 3 else ""
        notes.append(f"{n_empty:,} {window} window(s) without interactions skipped: {shown}{more}")
    groups: list[list[int]] = []  # windows per block
    size = 0
    for m, c in zip(present.tolist(), counts.tolist(), strict=True):
        if groups and size < MIN_PER_BLOCK:
            groups[-1].append(m)
        else:
            groups.append([m])
            size = 0
        size += c
    if size < MIN_PER_BLOCK and len(groups) > 1:  # a short last block joins the one before it
        last = groups.pop()
        groups[-1].extend(last)
    merged = [g for g in groups if len(g) > 1]
    if merged:
        shown = "; ".join(
            f"{_window_text(anchor, width, per_second, g[0])} .. {_window_text(anchor, width, per_second, g[-1], end=True)}"
            for g in merged[:3]
        )
        more = f" and {len(merged) - 3} more" if len(merged) > 3 else ""
        notes.append(
            f"{len(merged)} block(s) span several {window} windows because a window had fewer than {MIN_PER_BLOCK} "
            f"interactions: {shown}{more}"
        )
    block_of = {m: b for b, g in enumerate(groups) for m in g}
    labels = np.array([block_of[m] for m in present.tolist()], dtype=np.int64)[np.searchsorted(present, win)]
    return WindowCut(labels, notes)


def _window_text(anchor, width: int, per_second: int, m: int, end: bool = False) -> str:
    t = anchor + (m + int(end)) * width
    return _utc(t, per_second)


# --- checks -------------------------------------------------------------------------------


def _check_params(
    log: Path, user_col, item_col, time_col, rating_col, min_user, min_item, base_fraction, n_blocks, seed=0
) -> None:
    def bad(msg: str) -> CcdrecError:
        return CcdrecError(f"{log}: {msg}")

    if isinstance(base_fraction, bool) or not (isinstance(base_fraction, (int, float)) and 0 < base_fraction < 1):
        raise bad(f"--base-fraction (base_fraction) must be strictly between 0 and 1, got {base_fraction!r}")
    for name, value in (("--blocks (n_blocks)", n_blocks), ("--min-user", min_user), ("--min-item", min_item)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise bad(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise bad(f"--seed must be an integer in 0..{SEED_MAX}, got {seed!r}")
    cols = [user_col, item_col, time_col] + ([rating_col] if rating_col is not None else [])
    if len(set(cols)) < len(cols):
        raise bad(f"user, item, time (and rating) columns must differ, got {', '.join(map(repr, cols))}")


def _check_time_options(log: Path, time_format: str | None, time_unit: str | None) -> None:
    if time_format is not None and time_unit is not None:
        raise CcdrecError(f"{log}: give either --time-format (date strings) or --time-unit (numbers), not both")
    if time_format is not None and (not isinstance(time_format, str) or "%" not in time_format):
        raise CcdrecError(f"{log}: --time-format must be a strftime format such as '%d/%m/%Y %H:%M', got {time_format!r}")
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise CcdrecError(f"{log}: --time-unit must be one of {', '.join(TIME_UNITS)}, got {time_unit!r}")


def _check_rating_options(log: Path, rating_col: str | None, min_rating: float | None) -> None:
    if min_rating is not None and rating_col is None:
        raise CcdrecError(f"{log}: --min-rating needs --rating-col (the column that holds the ratings)")
    if rating_col is not None and min_rating is None:
        raise CcdrecError(f"{log}: --rating-col needs --min-rating (keep interactions rated at least this)")
    if min_rating is not None and (
        isinstance(min_rating, bool) or not isinstance(min_rating, (int, float, np.number)) or not math.isfinite(min_rating)
    ):
        raise CcdrecError(f"{log}: --min-rating must be a finite number, got {min_rating!r}")


def _column_names(log: Path, header: bool, columns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The names of a headerless file's columns (None for a file with a header line)."""
    if columns is None:
        if not header:
            raise CcdrecError(
                f"{log}: --no-header needs --columns naming every column of the file, e.g. user,item,rating,timestamp"
            )
        return None
    if header:
        raise CcdrecError(
            f"{log}: --columns names the columns of a file without a header line; give --no-header as well "
            "(pick the columns of a file with a header with --user-col, --item-col and --time-col)"
        )
    names = tuple(c.strip() for c in (columns.split(",") if isinstance(columns, str) else columns))
    if not names or any(not c for c in names):
        raise CcdrecError(f"{log}: --columns must be comma-separated non-empty names, got {columns!r}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise CcdrecError(f"{log}: --columns names {', '.join(map(repr, dup))} more than once")
    return names


WHITESPACE = "whitespace"  # --sep whitespace: fields separated by runs of spaces and tabs


def _separator(log: Path, sep: str | None) -> str | None:
    """The field separator of a text log: one character, ``tab``, ``whitespace`` (runs of spaces and tabs),
    or a string such as MovieLens 1M's ``::`` (None: the default for its kind)."""
    if sep is None:
        return None
    resolved = {"tab": "\t", "\\t": "\t", WHITESPACE: WHITESPACE}.get(sep.lower() if isinstance(sep, str) else sep, sep)
    blank = isinstance(resolved, str) and len(resolved) > 1 and not resolved.strip()  # "  ": two spaces, ambiguous
    if not isinstance(resolved, str) or not resolved or any(c in '"\r\n' for c in resolved) or blank:
        raise CcdrecError(
            f"{log}: --sep must be one character, 'tab' / '\\t', 'whitespace' (runs of spaces and tabs) or a string "
            f"such as '::', without quotes or line breaks; got {sep!r}"
        )
    return resolved


def _pandas_text(text: dict) -> dict:
    """pandas' reading options of a text log: a separator of several characters (``::``) is matched as
    written, which takes pandas' Python parser (slower than its C parser, which reads one character)."""
    if text.get("sep") == WHITESPACE:
        return {**text, "sep": r"\s+"}  # pandas' C parser reads this one pattern
    if len(text.get("sep", ",")) == 1:
        return text
    return {**text, "sep": re.escape(text["sep"]), "engine": "python"}


def _split_fields(line: str, sep: str) -> list[str]:
    """The fields of one line of a text log: the csv module's (quotes) for a one-character separator."""
    if sep == WHITESPACE:
        return line.split()
    if len(sep) == 1:
        return next(csv.reader([line], delimiter=sep), [])
    return line.split(sep) if line else []


def _file_format(log: Path, file_format: str | None) -> str | None:
    if file_format is None:
        return None
    if not isinstance(file_format, str) or file_format.lower() not in FORMATS:
        raise CcdrecError(f"{log}: --format must be one of {', '.join(FORMATS)}, got {file_format!r}")
    return file_format.lower()


def _check_out(log: Path, out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CcdrecError(f"cannot prepare {log}: output {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not (out / UNIVERSE).exists():  # --force replaces a stream, never another directory: no hint of it here
        raise CcdrecError(
            f"cannot prepare {log}: output directory {out} already exists and is not a stream directory (no {UNIVERSE}); "
            "give --out a new directory"
        )
    if not force:
        raise CcdrecError(f"cannot prepare {log}: output directory {out} already holds a stream (use --force to replace it)")
    if log.resolve().is_relative_to(out.resolve()):
        raise CcdrecError(f"cannot prepare {log}: it lies inside the output directory {out}, which --force would delete")


def _name_kind(log: Path) -> str | None:
    """``csv`` or ``parquet`` as the file name tells, else None."""
    name = log.name.lower()
    if name.endswith(".gz") or name.endswith(TEXT_SUFFIXES):
        return "csv"
    return "parquet" if name.endswith(PARQUET_SUFFIXES) else None


def _auto_kind(log: Path) -> str | None:
    """The kind the name tells, else the content (Parquet's or gzip's magic bytes, or text: no more
    control bytes than text has, :func:`_binary_bytes`), else None."""
    return _name_kind(log) or {"parquet": "parquet", "gzip": "csv", "text": "csv"}.get(_sniff(log))


def _kind(log: Path) -> str:
    """``csv`` (any text log, also gzip-compressed) or ``parquet``, from the file name; for a name that does
    not tell, from the content (Parquet's or gzip's magic bytes)."""
    kind = _auto_kind(log)
    if kind is not None:
        return kind
    _check_content(log, "csv", given=False)  # an archive, a compressed or binary file: says what it looks like
    supported = ", ".join(TEXT_SUFFIXES + PARQUET_SUFFIXES)
    raise CcdrecError(
        f"{log}: unknown file type; expected one of {supported}, any name ending .gz (gzip-compressed text), "
        "or give --format csv|parquet"
    )


# --- reading ------------------------------------------------------------------------------

_MAGIC = (  # the first bytes of the binary formats a log is mistaken for: (bytes, kind, what it is)
    (b"PAR1", "parquet", "Parquet"),
    (b"\x1f\x8b", "gzip", "gzip-compressed"),
    (b"PK\x03\x04", "zip", "a zip archive"),
    (b"BZh", "bzip2", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "a 7-Zip archive"),
    (b"SQLite format 3\x00", "sqlite", "an SQLite database"),
    (b"\x89HDF\r\n\x1a\n", "hdf5", "HDF5"),
    (b"ARROW1", "arrow", "an Arrow IPC (Feather) file"),
    (b"\x93NUMPY", "npy", "a NumPy array"),
)


def _sniff(log: Path) -> str | None:
    """The kind of binary file ``log`` starts like (a key of :data:`_MAGIC`'s second column), or None."""
    head = _head(log)
    kind = next((kind for magic, kind, _ in _MAGIC if head.startswith(magic)), None)
    if kind is None and head and not _binary_bytes(head):
        return "text"  # in some encoding: its reading says if it is not UTF-8
    return kind


def _head(log: Path, size: int = 65536) -> bytes:
    """The log's first ``size`` bytes (empty if it cannot be read)."""
    try:
        with open(log, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _binary_bytes(head: bytes) -> bool:
    """More than 5% control bytes other than tab and line ends (a NUL inside an ID is text), and no UTF-16
    byte order mark."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    control = sum(head.count(bytes([c])) for c in (*range(0, 9), 11, 12, *range(14, 32)))
    return control > 0.05 * len(head)


def _check_content(log: Path, kind: str, given: bool) -> None:
    """A one-line error when the bytes of ``log`` say it is not what it is about to be read as (``kind``,
    from ``--format`` when ``given``, else from the name): Parquet read as text, text as Parquet, or an
    archive or other binary format that is neither."""
    sniffed = _sniff(log)
    what = {k: w for _, k, w in _MAGIC}
    how = "--format" if given else "its name"
    if kind == "csv" and sniffed == "parquet":
        auto = given and _auto_kind(log) == "parquet"
        instead = "leave --format out (the name or the content tells)" if auto else "name it .parquet"
        raise CcdrecError(
            f"{log}: looks like Parquet (it starts with PAR1), not text as {how} says; give --format parquet, or {instead}"
        )
    if kind == "parquet" and sniffed in (None, "gzip", "text"):
        looks = "gzip-compressed (text, presumably)" if sniffed == "gzip" else "text, not Parquet (no PAR1 at its start)"
        instead = ", or leave --format out" if given and _auto_kind(log) == "csv" else ""
        raise CcdrecError(f"{log}: looks like {looks}, but {how} says Parquet; give --format csv{instead}")
    if kind == "csv" and sniffed == "gzip":
        try:
            with gzip.open(log, "rb") as f:
                inner = f.read(65536)
        except (OSError, EOFError):
            inner = b""  # a truncated or corrupt gzip file: its reading says so
        if inner.startswith(b"PAR1"):
            raise CcdrecError(f"{log}: gzip-compressed Parquet; decompress it first (gunzip -k), Parquet is compressed inside")
        if inner[257:262] == b"ustar":
            raise CcdrecError(f"{log}: a gzip-compressed tar archive, not a log; unpack it (tar xzf) and prepare the log inside")
        if inner and _binary_bytes(inner):
            raise CcdrecError(f"{log}: gzip-compressed binary data (control bytes), not a text log; export it to CSV or Parquet")
    if kind == "csv" and sniffed in (None, "text"):
        head = _head(log)
        if _binary_bytes(head):
            raise CcdrecError(f"{log}: looks like binary data (control bytes), not a text log; export it to CSV or Parquet")
        if head.lstrip()[:1] in (b"{", b"["):
            lines = head.lstrip()[:1] == b"{"  # JSON Lines: one object per line; else one array
            read = f"pd.read_json({str(log)!r}{', lines=True' if lines else ''})"
            cmd = f'python -c "import pandas as pd; {read}.to_parquet({log.stem + ".parquet"!r})"'
            raise CcdrecError(f"{log}: looks like JSON, not a delimited text log; convert it to Parquet or CSV first, e.g. {cmd}")
    if sniffed not in (None, "gzip", "parquet", "text"):
        hint = "unpack it" if sniffed in ("zip", "7z") else "decompress it" if sniffed in ("bzip2", "xz", "zstd") else "export it"
        raise CcdrecError(
            f"{log}: looks like {what[sniffed]}, not a log; {hint} to a text log (.csv, .tsv; gzip-compressed is fine) "
            "or to Parquet first"
        )


def _default_sep(log: Path) -> str:
    """The separator of a text log without --sep: tab for a ``.tsv`` (``.tsv.gz``) name, else a comma."""
    return "\t" if log.name.lower().removesuffix(".gz").endswith(".tsv") else ","


def _read_log(
    log: Path,
    columns: tuple[str, ...],
    *,
    file_format: str | None = None,
    sep: str | None = None,
    names: tuple[str, ...] | None = None,
    options: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The ``columns`` of the log, as read (IDs of a text log stay strings); checks missing values.
    ``options``: the command-line option naming each column, for the errors' hints (None: ``data append``,
    which reads as the stream's log was read)."""
    if not log.exists():
        raise CcdrecError(f"{log}: file is missing")
    if not log.is_file():
        raise CcdrecError(f"{log}: not a file")
    kind = file_format or _kind(log)
    if kind == "parquet" and (sep is not None or names is not None):
        raise CcdrecError(f"{log}: --sep, --no-header and --columns apply to text logs, not Parquet")
    if log.stat().st_size == 0:
        raise CcdrecError(f"{log}: file is empty")
    _check_content(log, kind, given=file_format is not None)
    text = {}
    if kind == "csv":
        text = {"sep": sep or _default_sep(log), "compression": "gzip" if _is_gzip(log) else None}
    try:
        available = _columns(log, kind, text, names, appending=options is None)
        _require_columns(log, columns, available, text, options)
        df = _read_columns(log, kind, list(columns), text, names)
    except pd.errors.EmptyDataError:
        raise CcdrecError(f"{log}: file is empty") from None
    except UnicodeDecodeError as e:
        encoding = "utf-16" if e.object[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"  # a UTF-16 byte order mark
        raise CcdrecError(
            f"{log}: not UTF-8 text (it holds the byte 0x{e.object[e.start : e.start + 1].hex()}); "
            f"convert the log to UTF-8 first, e.g. {rewrite_command(log, f'iconv -f {encoding} -t utf-8', 'utf8')}"
        ) from None
    except _READ_ERRORS as e:
        raise CcdrecError(f"{log}: {_read_error(e, kind, text, log)}") from None
    if len(df) == 0:
        raise CcdrecError(f"{log}: no rows")
    n_names, df = len(df.columns), df[list(columns)]
    missing = df.isna()
    if text:  # a field of spaces (tabs) only is as empty as an empty one: an ID ' ' would look like none
        missing |= df.apply(lambda c: c.str.fullmatch(r"[ \t]+").fillna(False) if pd.api.types.is_string_dtype(c) else False)
    if missing.to_numpy().any():
        col = next(c for c in columns if missing[c].any())
        first = int(np.argmax(missing.any(axis=1).to_numpy()))
        example = _missing_example(log, text, names, n_names, first, options)
        raise CcdrecError(f"{log}: column {col!r} has {int(missing[col].sum())} missing value(s){example}")
    return df


_SEPARATOR_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space", "whitespace": "whitespace"}


def _split_at(sep: str) -> str:
    """``at each tab``, ``at each '::'``, ``at whitespace``: where a line is split."""
    return "at whitespace" if sep == WHITESPACE else f"at each {_separator_name(sep)}"


def _separator_name(sep: str) -> str:
    """``tab``, ``comma``, ...; else the separator quoted (``'::'``)."""
    return _SEPARATOR_NAMES.get(sep, repr(sep))


def _open_text(log: Path, text: dict):
    """The text log open for reading lines as written (gzip-compressed or not; bad UTF-8 replaced)."""
    opener = gzip.open if text.get("compression") == "gzip" else open
    return opener(log, "rt", encoding="utf-8", errors="replace", newline="")


def _log_row(log: Path, text: dict, header: bool, position: int) -> tuple[int, list[str]] | None:
    """The line number (1-based; a quoted field may span lines: its last) and fields of data row ``position``
    (0-based, blank lines skipped as pandas skips them) of a text log, read by the csv module; None if the
    log has no such row."""
    sep = text["sep"]
    with _open_text(log, text) as f:
        if len(sep) == 1:
            reader = csv.reader(f, delimiter=sep)
            rows = ((reader.line_num, fields) for fields in reader)
        else:
            rows = ((n, _split_fields(line.rstrip("\r\n"), sep)) for n, line in enumerate(f, 1))
        at = -1 if header else 0
        for line, fields in rows:
            if not fields:
                continue
            if at == position:
                return line, fields
            at += 1
    return None


def _missing_example(log: Path, text: dict, names: tuple[str, ...] | None, n_names: int, position: int, options) -> str:
    """What the first row with a missing value looks like in the log, and what likely made it so: a row with
    fewer fields than the header (rows separated by another character than the header, a short row) or an
    empty field; '' for a Parquet log (or a row the csv module does not find)."""
    if not text:
        return ""
    found = _log_row(log, text, names is None, position)
    if found is None:
        return ""
    line, fields = found
    shown = (" " if text["sep"] == WHITESPACE else text["sep"]).join(fields)
    shown = repr(shown if len(shown) <= 60 else shown[:57] + "...")
    if len(fields) >= n_names:
        return f", e.g. line {line} (data row {position + 1:,}): {shown} (an empty field); fill or remove such rows"
    where = "the header names" if names is None else "--columns name"
    what = f"line {line} (data row {position + 1:,}) has {len(fields)} field(s), {shown}, where {where} {n_names}"
    sep = text["sep"]
    alt = _guess_separator(fields[0], sep, n_names) if len(fields) == 1 else None
    if alt is None:
        return f": {what}; fill or remove the short rows"
    alt_name, sep_name = _separator_name(alt), _separator_name(sep)
    split = f". Split {_split_at(alt)} it has {n_names}"
    if options is None:  # data append reads the new log as the stream's log was read
        return f": {what}{split}: separate the new log's fields by {sep_name}, header and rows, as the stream's log was"
    first = _log_row(log, text, names is None, 0) if position > 0 else None
    if names is not None or (first is not None and len(first[1]) >= n_names):  # earlier rows split under sep
        fix = ""
        if _sed(alt) and _sed(sep):
            fix = ", e.g. " + rewrite_command(log, f"sed 's/{_sed(alt)[0]}/{_sed(sep)[1]}/g'", "one-sep")
        mixes = f"while the rows before it are {sep_name}-separated: the log mixes separators"
        return f": {what}{split}, {mixes}; separate every row by {sep_name}{fix}"
    fix = f"separate the header by {alt_name} too and give --sep {_sep_flag(alt)}"
    if _sed(alt) and _sed(sep):
        fix += ", e.g. " + rewrite_command(log, f"sed '1s/{_sed(sep)[0]}/{_sed(alt)[1]}/g'", "header")
    return f": {what}{split}: the rows are {alt_name}-separated under a {sep_name}-separated header; {fix}"


def _line(log: Path, text: dict, number: int) -> str | None:
    """Line ``number`` (1-based) of a text log, without its line end; None past the end."""
    with _open_text(log, text) as f:
        for n, line in enumerate(f, 1):
            if n == number:
                return line.rstrip("\r\n")
    return None


def _trailing_separator_hint(log: Path, text: dict, number: int) -> str | None:
    """When line ``number`` ends with the separator (an empty last field) and so does not every line: what
    to do, with a sed command that removes separators at line ends; else None."""
    sep, line = text.get("sep", ","), _line(log, text, number)
    if line is None or not line.endswith(sep) or _sed(sep) is None:
        return None
    fix = rewrite_command(log, f"sed -E 's/{_sed(sep)[0]}+$//'", "trimmed")
    return f"line {number} ends with a separator (an empty last field) and not every line does: remove them, e.g. {fix}"


def _read_error(e: Exception, kind: str, text: dict, log: Path) -> str:
    """What a reading error of pandas, gzip or pyarrow means for the log, and what to do."""
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", detail)
    if fields:
        want, line, saw = fields.groups()
        if trailing := _trailing_separator_hint(log, text, int(line)):
            return trailing
        quote = 'quote that field with ", or ' if len(text.get("sep", ",")) == 1 and text.get("sep") != WHITESPACE else ""
        return (
            f"line {line} has {saw} fields where the lines before it have {want} (a separator inside an ID? {quote}fix or "
            "remove the row)"
        )
    quote = re.search(r"EOF inside string starting (?:at|with) (?:row|line) (\d+)", detail)
    if quote:
        return (
            f'a quote (") opened on line {int(quote.group(1)) + 1} is never closed, so the rest of the file would be '
            "one field; close it, or remove the quote characters"
        )
    if text.get("compression") == "gzip" and isinstance(e, (EOFError, OSError)):
        return f"the gzip-compressed log is truncated or corrupt ({detail}); copy or compress it again"
    if kind == "parquet":
        return f"the Parquet file is truncated or corrupt, or not Parquet ({detail}); write it again"
    return f"cannot be read as {kind.upper()} ({detail})"


def _is_gzip(log: Path) -> bool:
    """Whether the log's bytes are gzip's, whatever its name (a text log named ``.gz`` is read as text)."""
    with open(log, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _columns(log: Path, kind: str, text: dict, names: tuple[str, ...] | None, appending: bool = False) -> list[str]:
    """The log's column names: its header's (a name given twice is an error: pandas would rename the
    second ``item.1`` and read the first silently), or ``names`` for a headerless text log."""
    if kind == "parquet":
        return _distinct_header(log, [str(c) for c in pq.read_schema(log).names])
    if names is None:
        header = pd.read_csv(log, header=None, nrows=1, dtype=str, keep_default_na=False, **_pandas_text(text))
        return _distinct_header(log, [str(c) for c in header.iloc[0].tolist()], appending)
    first = pd.read_csv(log, header=None, nrows=1, dtype=str, keep_default_na=False, **_pandas_text(text))
    if first.shape[1] != len(names):
        hint = ""
        if first.shape[1] == 1:
            guess = _guess_separator(str(first.iloc[0, 0]), text["sep"], len(names))
            hint = "; is --sep right?"
            if guess and appending:
                hint = (
                    f"; split {_split_at(guess)} it has {len(names)}: separate its fields by {_separator_name(text['sep'])}, "
                    "as the stream's log was"
                )
            elif guess:
                hint = f"; split {_split_at(guess)} it has {len(names)}: give --sep {_sep_flag(guess)}"
        raise CcdrecError(
            f"{log}: --columns names {len(names)} column(s) ({','.join(names)}) but the file has {first.shape[1]} "
            f"(separated by {text['sep']!r}){hint}"
        )
    return list(names)


_GUESSED_SEPARATORS = ("\t", ";", "|", "::", ",", " ")


def _guess_separator(line: str, sep: str, fields: int | None = None) -> str | None:
    """The common separator (tab, ``;``, ``|``, ``::``, comma, space, else runs of whitespace) other than
    ``sep`` that splits ``line`` into ``fields`` non-empty fields, or (None) into the most, at least 2; None
    if none does."""
    counts, padded = {}, {}
    for c in (*_GUESSED_SEPARATORS, WHITESPACE):
        parts = _split_fields(line.strip(), c)
        if c != sep and all(x.strip() for x in parts):
            counts[c], padded[c] = len(parts), any(x != x.strip() for x in parts)
    counts = dict(sorted(counts.items(), key=lambda kv: padded[kv[0]]))  # fields without spaces around them first
    if fields is not None:
        return next((c for c, n in counts.items() if n == fields), None)
    best = max(counts, key=lambda c: counts[c], default=None)  # the first of the most
    return best if best is not None and counts[best] >= 2 else None


def _sep_flag(sep: str) -> str:
    """``sep`` as --sep takes it on a shell command line: ``tab``, ``whitespace``, ``,``, else quoted."""
    return "tab" if sep == "\t" else sep if sep in (",", WHITESPACE) else f"'{sep}'"


def _distinct_header(log: Path, header: list[str], appending: bool = False) -> list[str]:
    twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
    if twice is not None and any(_is_number(c) for c in header):
        fix = "the stream's log had a header line: give the new log one" if appending else "give --no-header --columns"
        raise CcdrecError(f"{log}: the first line ({', '.join(map(repr, header))}) looks like data, not a header: {fix}")
    if twice == "":
        raise CcdrecError(
            f"{log}: the header has empty names (separators side by side); if the fields are separated by runs of "
            "spaces or tabs, give --sep whitespace"
        )
    if twice is not None:
        raise CcdrecError(f"{log}: the header names column {twice!r} twice; rename one of them")
    return header


def _require_columns(
    log: Path, wanted: tuple[str, ...], available: list[str], text: dict, options: Sequence[str] | None = None
) -> None:
    """Every ``wanted`` column is ``available``, else a one-line error with what is likely wrong. ``options``:
    the command-line option that names each wanted column (``data prepare``); None where the reading is
    the stream's and no option changes it (``data append``)."""
    missing = [c for c in wanted if c not in available]
    if not missing:
        return
    guesses = _near_names(missing, available)  # per missing name: the available one it likely means, or None
    if len({g for g in guesses if g is not None}) < sum(g is not None for g in guesses):
        guesses = [None] * len(guesses)  # one column for several: a wrong --sep, not a misspelt name
    near = list(dict.fromkeys(g for g in guesses if g is not None))
    hint = ""
    sep_text = _separator_name(text["sep"]) if text else ""
    fixed = f"the stream's log is {sep_text}-separated: separate the new log's fields so too"  # data append: no options
    guess = _guess_separator(available[0], text["sep"]) if text and len(available) == 1 else None
    commented = text and available and available[0].lstrip().startswith("#")
    if commented and available[0].lstrip().lstrip("#").strip() in wanted:
        uncomment = rewrite_command(log, "sed '1s/^ *#//'", "header")
        hint = f" (the header line starts with '#': remove it, e.g. {uncomment})"
    elif commented:
        drop = rewrite_command(log, "grep -v '^#'", "data")
        hint = f" (the first line is a comment: drop the comment lines first, e.g. {drop})"
    elif guess is not None:
        fields = _split_fields(available[0].strip(), guess)
        hint = f" (the header has one column: split {_split_at(guess)} it has {len(fields)}"
        if options is None:
            hint += f"; {fixed})"
        elif all(_is_number(f) for f in fields if f.strip()) or any(_is_number(f) for f in fields):
            hint += f", which look like data: give --sep {_sep_flag(guess)} --no-header --columns with a name per field)"
        else:
            hint += f": give --sep {_sep_flag(guess)})"
    elif text and len(available) == 1:
        hint = f" (the header has one column: is the file separated by something other than {text['sep']!r}? " + (
            "give --sep)" if options is not None else f"{fixed})"
        )
    elif (
        text and available and (all(_is_number(c) for c in available) or (any(_is_number(c) for c in available) and not near))
    ):  # numbers (a timestamp) and no name like a wanted one: a data line
        hint = (
            " (the first line looks like data: for a file without a header line give --no-header --columns)"
            if options is not None
            else " (the first line looks like data, but the stream's log had a header line naming "
            f"{', '.join(map(repr, wanted))}: give the new log the same header)"
        )
    elif near:
        hint = f" (did you mean {', '.join(map(repr, near))}? Column names match exactly, case and spaces included"
        if options is not None and all(n == n.strip() for n in near):
            flags = dict(zip(wanted, options, strict=False))
            pairs = [(flags[m], n) for m, n in zip(missing, guesses, strict=True) if n]
            hint += ": give " + ", ".join(f"{flag} {shlex.quote(n)}" for flag, n in pairs)
        elif options is None:
            hint += f"; the stream reads columns {', '.join(map(repr, wanted))}: name them so in the new log's header"
        hint += "."
        if any(n != n.strip() for n in near):
            sep = text.get("sep", ",") if text else ","
            cmd = _strip_command(log, sep)
            fix = f"remove them and prepare again, e.g. {cmd}" if cmd else "remove the spaces around the separators"
            hint += f" This header has spaces around its names, likely after each {sep!r}, and so will the IDs: {fix}"
        hint += ")"
    raise CcdrecError(
        f"{log}: missing column(s) {', '.join(map(repr, missing))}; available: {', '.join(map(repr, available)) or 'none'}{hint}"
    )


def _near_names(missing: list[str], available: list[str]) -> list[str | None]:
    """For each missing column name, the available one it most likely means: the same name up to
    surrounding spaces and case, else one that contains it or is contained in it (``user_id`` for
    ``user``, ``time`` for ``timestamp``), else a close spelling (difflib); None where nothing is near."""
    import difflib

    found: list[str | None] = []
    for name in missing:
        key = name.strip().casefold()
        same = [a for a in available if a.strip().casefold() == key]
        within = [a for a in available if key and (key in a.casefold() or (len(a.strip()) >= 3 and a.strip().casefold() in key))]
        close = same or within[:1] or difflib.get_close_matches(name, available, n=1, cutoff=0.75)
        found.append(close[0] if close else None)
    return found


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_columns(log: Path, kind: str, columns: list[str], text: dict, names: tuple[str, ...] | None) -> pd.DataFrame:
    if kind == "parquet":
        return pd.read_parquet(log, columns=columns)
    # strings throughout, and only empty cells are missing: IDs such as "007" or "NA" stay as written.
    # Every column is read (not usecols, with which pandas drops a row's extra fields silently), so that a
    # row with more fields than the header is a tokenizing error naming its line.
    options = _pandas_text(text)
    if names is not None:
        options = {**options, "header": None, "names": list(names)}
    df = pd.read_csv(log, dtype=str, keep_default_na=False, na_values=[""], **options)
    if isinstance(df.index, pd.RangeIndex):
        return df
    # Rows with more fields than names: pandas takes the leading fields as row labels and reads every column
    # shifted. A separator that ends every line (an empty last field) is read as the fields it ends.
    if df.index.nlevels == 1 and df[df.columns[-1]].isna().all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)  # it warns that the empty last field is dropped
            return pd.read_csv(log, dtype=str, keep_default_na=False, na_values=[""], index_col=False, **options)
    found = _log_row(log, text, names is None, 0)
    if found and (trailing := _trailing_separator_hint(log, text, found[0])):
        raise CcdrecError(f"{log}: {trailing}")
    fields = len(found[1]) if found else df.index.nlevels + len(df.columns)
    where = "the header names" if names is None else "--columns names"
    raise CcdrecError(
        f"{log}: the rows have more fields than {where} (line {found[0] if found else 2}: {fields} fields, "
        f"{where} {len(df.columns)}), so every column would be read shifted; "
        + ("name every field in the header line" if names is None else "name every field in --columns")
    )


def _ids(col: pd.Series, log: Path | None = None) -> np.ndarray:
    """Original IDs as strings (integral floats, e.g. from a Parquet column, lose their ``.0``; bytes are
    read as UTF-8). A column of lists, mappings or other containers holds no IDs: CcdrecError."""
    if pd.api.types.is_float_dtype(col):
        values = col.to_numpy(dtype=np.float64)
        if np.all((np.mod(values, 1) == 0) & (np.abs(values) < 2**53)):
            col = col.astype(np.int64)
    values = col.to_numpy(dtype=object)
    if col.dtype == object and len(values):
        kinds = {type(v) for v in values}
        odd = [k for k in kinds if issubclass(k, (list, tuple, dict, set, np.ndarray))]
        if odd:
            raise CcdrecError(f"{log}: column {col.name!r} holds {odd[0].__name__} values, not IDs")
        if bytes in kinds:
            try:
                values = np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in values], dtype=object)
            except UnicodeDecodeError:
                raise CcdrecError(f"{log}: column {col.name!r} holds bytes that are not UTF-8 text") from None
    return np.array([str(v) for v in values], dtype=object)


def _rating_mask(col: pd.Series, log: Path, name: str, min_rating: float) -> np.ndarray:
    """Which rows are rated at least ``min_rating``; every rating must be a finite number."""
    if pd.api.types.is_bool_dtype(col):
        raise CcdrecError(f"{log}: column {name!r} holds booleans, not ratings")
    ratings = col if pd.api.types.is_numeric_dtype(col) else pd.to_numeric(col, errors="coerce")
    values = ratings.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        raise CcdrecError(
            f"{log}: column {name!r} has {int(bad.sum())} non-numeric rating(s), e.g. {_plain(col[bad].iloc[0])!r} "
            "(ratings must be finite numbers)"
        )
    return values >= min_rating


def _plain(value):
    """A numpy scalar as the Python value it holds, for messages (``inf``, not ``np.float64(inf)``)."""
    return value.item() if isinstance(value, np.generic) else value


# --- timestamps ---------------------------------------------------------------------------


class _Reading(NamedTuple):
    """One way to read a whole timestamp column: sortable keys, and which values it cannot read."""

    label: str  # "numbers" or a strftime format (or "ISO8601")
    keys: np.ndarray  # int64 nanoseconds for datetimes, int64/float64 numbers otherwise; junk where bad
    bad: np.ndarray  # bool per value: unparsable or outside TIME_WINDOW
    unit: str | None = None  # numbers: the unit they count (a key of TIME_UNITS); None for datetimes

    @property
    def per_second(self) -> int:
        """Key units per second (10**9 for datetimes, whose keys are nanoseconds)."""
        return TIME_UNITS[self.unit] if self.unit is not None else 10**9

    def describe(self) -> dict:
        """How the column was read, so that :mod:`ccdrec.data.append` reads new rows the same way."""
        if self.label == "numbers":
            return {"kind": "numbers", "unit": self.unit, "per_second": self.per_second}
        if self.label == "datetimes":
            return {"kind": "datetimes", "per_second": self.per_second}
        return {"kind": "dates", "format": self.label, "per_second": self.per_second}


def _time_keys(
    col: pd.Series, log: Path, name: str, *, time_format: str | None = None, time_unit: str | None = None
) -> np.ndarray:
    """A sortable key per row from ONE reading of the whole column (see the module docstring)."""
    return _time_reading(col, log, name, time_format=time_format, time_unit=time_unit).keys


def _time_reading(
    col: pd.Series,
    log: Path,
    name: str,
    *,
    time_format: str | None = None,
    time_unit: str | None = None,
    appending: bool = False,
) -> _Reading:
    """The one reading of the whole column that :func:`_time_keys` takes (``appending``: in the stream's
    unit or format, for ``data append``, whose errors say so): ``.keys``, and ``.per_second``
    and ``.describe()`` (to measure windows, and to read more rows the same way)."""
    where = f"{log}: column {name!r}"
    if pd.api.types.is_bool_dtype(col):
        raise CcdrecError(f"{where} holds booleans, not timestamps")
    if pd.api.types.is_datetime64_any_dtype(col):
        if time_format is not None or time_unit is not None:
            raise CcdrecError(f"{where} holds datetimes: --time-format and --time-unit apply to text and numeric timestamps")
        readings = [_datetime_reading("datetimes", col)]
    elif pd.api.types.is_numeric_dtype(col):
        if time_format is not None:
            raise CcdrecError(f"{where} holds numbers: --time-format applies to date strings (see --time-unit)")
        readings = [_numeric_reading(col, time_unit)]
    elif time_format is not None:
        readings = [_format_reading(col.astype(str).str.strip(), time_format, log)]
    else:
        values = col.astype(str).str.strip()
        texts = values
        readings = []
        if time_unit is not None or pd.to_numeric(_sample(values), errors="coerce").notna().any():
            numbers = pd.to_numeric(values, errors="coerce")
            readings.append(_numeric_reading(numbers, time_unit))
            texts = values[numbers.isna()]
        if not readings or (readings[0].bad.any() and time_unit is None):
            readings += _datetime_readings(texts, values, log)
    return _choose(readings, col, where, time_format, time_unit, appending)


def _choose(readings: list[_Reading], col: pd.Series, where: str, time_format, time_unit, appending: bool = False) -> _Reading:
    fits = [r for r in readings if not r.bad.any()]
    if fits:
        first = fits[0]
        for other in fits[1:]:
            differ = first.keys != other.keys
            if differ.any():
                example = _plain(col[differ].iloc[0])
                raise CcdrecError(
                    f"{where} is ambiguous: every value reads as {first.label!r} and as {other.label!r}, e.g. {example!r} "
                    f"(no field exceeds 12 to tell day from month); give --time-format {first.label!r} or {other.label!r}"
                )
        return first
    best = min(readings, key=lambda r: int(r.bad.sum()))  # the first of the best: numbers before dates
    if best.label == "numbers" and np.isfinite(best.keys[best.bad]).all():
        raise CcdrecError(f"{where} has {_out_of_window(best, col, time_unit, appending)}")
    if best.label == "numbers":
        unit = repr(time_unit) if time_unit else "s, ms, us or ns (--time-unit)"
        hint = f"numeric timestamps must be finite counts of {unit} since 1970 within {_WINDOW_TEXT}"
    elif best.label == "datetimes":
        hint = f"timestamps must lie within {_WINDOW_TEXT}"
    elif time_format is not None:
        hint = f"format {time_format!r}, within {_WINDOW_TEXT}"
    else:
        hint = (
            f"timestamps must be numbers, or dates in one format for the whole column, within {_WINDOW_TEXT}; "
            f"the closest reading is {best.label!r}; give --time-format"
        )
    example = _plain(col[best.bad].iloc[0])
    raise CcdrecError(f"{where} has {int(best.bad.sum())} unparsable timestamp(s), e.g. {example!r} ({hint})")


def _plausible(values: np.ndarray, unit: str, now_s: float | None = None) -> np.ndarray:
    """Per value: does it fall within 1980 .. tomorrow (``now_s`` + 1 day, default the clock) read in ``unit``."""
    per = TIME_UNITS[unit]
    latest_s = (time.time() if now_s is None else now_s) + 86_400
    return np.isfinite(values) & (values >= _PLAUSIBLE_FROM_S * per) & (values <= latest_s * per)


OUTLIER_SHARE = 0.01  # at most this share of numeric timestamps off the plausible range is an error, not a note


def check_time_outliers(reading: _Reading, col: pd.Series, where: str, stream_plausible: bool = False) -> None:
    """A one-line error for numeric timestamps before 1980 or after tomorrow in the reading's unit when the
    others fall within: at most 1% of them (one second count of 0, one value in seconds among milliseconds),
    or, with ``stream_plausible`` (``data append`` to a stream whose timestamps fall within), any of them. A
    column mostly off the range is not an error (a log may count from its own start): a note says so."""
    if reading.label != "numbers" or reading.unit is None:
        return
    values = np.asarray(reading.keys, dtype=np.float64)
    ok = _plausible(values, reading.unit)
    off = np.flatnonzero(~ok)
    if not len(off) or not (stream_plausible or ok.any() and len(off) <= max(1, OUTLIER_SHARE * len(values))):
        return
    first = int(off[0])
    unit = _UNIT_NAMES[reading.unit]
    other = [u for u in TIME_UNITS if u != reading.unit and _plausible(values[off[:1000]], u).all()]
    if stream_plausible:
        within = f"where the stream's timestamps fall, read as {unit} (the stream's unit)"
    else:
        within = f"where the other {int(ok.sum()):,} fall, read as {unit}"
    if other and stream_plausible:
        fix = f"; in {_UNIT_NAMES[other[0]]} they would fall within: write them in {unit}, as the stream's"
    elif other:
        fix = f"; in {_UNIT_NAMES[other[0]]} they would fall within (a column mixing units?): fix or remove those rows"
    else:
        fix = ": fix or remove those rows"
    raise CcdrecError(
        f"{where} has {len(off):,} timestamp(s) outside 1980 .. tomorrow, {within}, e.g. {_plain(col.iloc[first])!r} "
        f"in data row {first + 1:,} ({_utc(values[first], reading.per_second)} UTC){fix}"
    )


def _out_of_window(reading: _Reading, col: pd.Series, time_unit: str | None, appending: bool = False) -> str:
    """What numeric timestamps outside ``TIME_WINDOW`` in the reading's unit are: how many, the first (its
    data row and year), the unit they were read in and why, and a unit that would fit them, if one does."""
    bad = np.flatnonzero(reading.bad)
    first = int(bad[0])
    value, per = float(reading.keys[first]), reading.per_second
    year = 1970 + value / per / 31_556_952
    when = f"the year {int(year)}" if abs(year) < 1e6 else ("far past 2199" if year > 0 else "long before 1900")
    why = f"the unit of the other {len(col) - len(bad):,} rows"
    if time_unit:
        why = "the stream's unit" if appending else "given by --time-unit"
    values = np.asarray(reading.keys[bad[:1000]], dtype=np.float64)
    other = [u for u in TIME_UNITS if _plausible(values, u).all()]
    named, fix = (_UNIT_NAMES[other[0]], "") if other else ("", ": fix or remove those rows")
    if other and appending:
        fix = f"; in {named} they fall within 1980 .. tomorrow: write them in {_UNIT_NAMES[reading.unit]}, as the stream's"
    elif other and len(bad) == len(col):
        fix = f"; --time-unit {other[0]} ({named}) reads them within 1980 .. tomorrow"
    elif other:
        fix = f"; in {named} they would fall within 1980 .. tomorrow (a column mixing units?): fix or remove those rows"
    return (
        f"{len(bad):,} timestamp(s) outside {_WINDOW_TEXT} when read as {_UNIT_NAMES[reading.unit]} ({why}), e.g. "
        f"{_plain(col.iloc[first])!r} in data row {first + 1:,} ({when}){fix}"
    )


def _numeric_reading(numbers: pd.Series, time_unit: str | None, now_s: float | None = None) -> _Reading:
    """Numbers in ``time_unit``, else in the unit that puts the most of them within 1980 .. tomorrow (``now_s``
    + 1 day), the smallest of those that ties; where no unit puts any there (a log counting from its own
    start), the smallest unit that fits them all in ``TIME_WINDOW``. NaN, inf and out-of-window are bad: so
    one value in another unit (a year-2300 second among seconds of 2020) is an error naming it, not a
    reason to read the whole column in milliseconds, in 1970."""
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    units = [time_unit] if time_unit else list(TIME_UNITS)
    plausible = {u: int(_plausible(values, u, now_s).sum()) for u in units}
    most = max(plausible.values())
    if most > 0:
        units = [next(u for u in units if plausible[u] == most)]
    bad, chosen = None, None
    for unit in units:
        lo, hi = (bound * TIME_UNITS[unit] for bound in _WINDOW_S)
        unit_bad = ~(finite & (values >= lo) & (values < hi))
        if bad is None or unit_bad.sum() < bad.sum():
            bad, chosen = unit_bad, unit
        if not bad.any():
            break
    if pd.api.types.is_integer_dtype(numbers) and not bad.any():
        return _Reading("numbers", numbers.to_numpy(dtype=np.int64), bad, chosen)  # exact, even for 19-digit nanoseconds
    return _Reading("numbers", values, bad, chosen)


def _to_utc(values: pd.Series, fmt: str, log: Path) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pd.to_datetime(values, format=fmt, utc=True, errors="coerce")
        except ValueError as e:  # a bad directive in a user's format
            raise CcdrecError(f"{log}: invalid time format {fmt!r} ({str(e).splitlines()[0]})") from None


def _format_reading(values: pd.Series, fmt: str, log: Path) -> _Reading:
    return _datetime_reading(fmt, _to_utc(values, fmt, log))


def _datetime_reading(label: str, parsed: pd.Series) -> _Reading:
    """Keys as int64 UTC nanoseconds; NaT and values outside :data:`TIME_WINDOW` are bad."""
    parsed = parsed.dt.tz_localize("UTC") if parsed.dt.tz is None else parsed.dt.tz_convert("UTC")
    lo, hi = (pd.Timestamp(t, tz="UTC") for t in TIME_WINDOW)
    bad = (parsed.isna() | (parsed < lo) | (parsed >= hi)).to_numpy(dtype=bool)
    keys = np.zeros(len(parsed), dtype=np.int64)
    keys[~bad] = parsed[~bad].dt.tz_localize(None).astype("datetime64[ns]").to_numpy().view(np.int64)
    return _Reading(label, keys, bad)


def _sample(values: pd.Series) -> pd.Series:
    """Up to :data:`_MAX_GUESSES` distinct ``values``, spread over their order of appearance."""
    unique = pd.unique(values.to_numpy(dtype=object))
    picks = np.unique(np.linspace(0, len(unique) - 1, min(len(unique), _MAX_GUESSES)).astype(int))
    return pd.Series(unique[picks], dtype=object)


def _parses(sample: pd.Series, fmt: str) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pd.to_datetime(sample, format=fmt, errors="coerce", utc=True).notna()


def _datetime_readings(texts: pd.Series, values: pd.Series, log: Path) -> list[_Reading]:
    """Readings of the whole column ``values`` with the formats that fit a sample of ``texts`` (the values
    that are not numbers): ISO 8601 alone if it reads every value, else every format that reads the whole
    sample, else (for the error message) the one that reads most of it."""
    sample = _sample(texts)
    if _parses(sample, "ISO8601").all():
        iso = _format_reading(values, "ISO8601", log)
        if not iso.bad.any():
            return [iso]
    formats = ["ISO8601", *_guess_formats(sample)]
    counts = {fmt: int(_parses(sample, fmt).sum()) for fmt in formats}
    full = [fmt for fmt in formats if counts[fmt] == len(sample)] or [max(formats, key=counts.__getitem__)]
    return [_format_reading(values, fmt, log) for fmt in full]


def _guess_formats(sample: pd.Series) -> list[str]:
    """Candidate formats: pandas' guesses (month-first and day-first) for the ``sample`` values, then the
    common numeric forms pandas does not guess (2-digit years, 12-hour clocks); each reads some of it."""
    candidates: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in sample:
            for dayfirst in (False, True):
                fmt = guess_datetime_format(str(text), dayfirst=dayfirst)
                if fmt and fmt not in candidates and not _year_day_month(fmt):
                    candidates.append(fmt)
    candidates += [fmt for fmt in _common_formats() if fmt not in candidates]
    return [fmt for fmt in candidates if _parses(sample, fmt).any()]


def _common_formats() -> list[str]:
    """Day/month/year forms with ``/``, ``.`` or ``-``, 4- or 2-digit years, 24- or 12-hour times."""
    dates = [f"%{a}{sep}%{b}{sep}%{y}" for sep in "/.-" for a, b in (("d", "m"), ("m", "d")) for y in "Yy"]
    return [d + t for d in dates for t in ("", " %H:%M", " %H:%M:%S", " %I:%M %p", " %I:%M:%S %p")]


def _year_day_month(fmt: str) -> bool:
    """Year-first dates are year-month-day; a guessed year-day-month reading is never meant."""
    y, d, m = fmt.find("%Y"), fmt.find("%d"), fmt.find("%m")
    return 0 <= y < d < m


# --- filtering and cutting ----------------------------------------------------------------


def _time_order(df: pd.DataFrame) -> np.ndarray:
    """The row order by time, then user, then item (IDs compared as written, by code point): one order for
    a set of rows whatever the order of the file, so IDs, blocks and splits never depend on it."""
    users = pd.factorize(df["user"].to_numpy(dtype=object), sort=True)[0]
    items = pd.factorize(df["item"].to_numpy(dtype=object), sort=True)[0]
    return np.lexsort((items, users, df["time"].to_numpy()))


def rows_sha256(df: pd.DataFrame) -> str:
    """SHA-256 (hex) of a log's rows as read: (user, item, time) after :func:`_dedup_in_time_order`, so
    the same rows give the same digest whatever their order in the file, its compression or line endings."""
    text = df[["user", "item", "time"]].to_csv(index=False, header=False, lineterminator="\n")
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _dedup_in_time_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in :func:`_time_order`, each (user, item) pair kept at its earliest occurrence."""
    df = df.iloc[_time_order(df)].reset_index(drop=True)
    return df.drop_duplicates(["user", "item"], keep="first").reset_index(drop=True)


def _kcore(df: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Drop users with < ``min_user`` and items with < ``min_item`` interactions until stable."""
    users, _ = pd.factorize(df["user"])
    items, _ = pd.factorize(df["item"])
    keep = np.ones(len(df), dtype=bool)
    while True:
        n_user = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        n_item = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        new_keep = keep & (n_user[users] >= min_user) & (n_item[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return df[keep].reset_index(drop=True)
        keep = new_keep


def _base_size(n: int, base_fraction: float, log: Path, min_user: int, min_item: int) -> int:
    """How many of ``n`` time-ordered interactions form D_0 (at least :data:`MIN_PER_BLOCK`)."""
    if n == 0:
        raise CcdrecError(f"{log}: no interactions left after the k-core filter (min_user={min_user}, min_item={min_item})")
    n0 = int(round(base_fraction * n))
    if n0 < MIN_PER_BLOCK:
        raise CcdrecError(
            f"{log}: only {n} interactions left after the k-core filter (min_user={min_user}, min_item={min_item}): "
            f"block 0 would get {n0} with base_fraction={base_fraction} (at least {MIN_PER_BLOCK} needed)"
        )
    return n0


def _block_labels(n: int, base_fraction: float, n_blocks: int, log: Path, min_user: int, min_item: int) -> np.ndarray:
    """Block index of each of ``n`` time-ordered interactions: D_0 takes ``base_fraction``, the rest equal parts."""
    if n == 0:
        raise CcdrecError(f"{log}: no interactions left after the k-core filter (min_user={min_user}, min_item={min_item})")
    n0 = int(round(base_fraction * n))
    if (n_blocks + 1) * MIN_PER_BLOCK > n:  # checked before any array of n_blocks is made
        raise CcdrecError(
            f"{log}: only {n} interactions left after the k-core filter (min_user={min_user}, min_item={min_item}), "
            f"too few for the base block and {n_blocks} incremental block(s) of at least {MIN_PER_BLOCK} each "
            f"({(n_blocks + 1) * MIN_PER_BLOCK} needed)"
        )
    bounds = np.concatenate([[0], n0 + np.round(np.linspace(0, n - n0, n_blocks + 1)).astype(np.int64)])
    sizes = np.diff(bounds)
    if sizes.min() < MIN_PER_BLOCK:
        raise CcdrecError(
            f"{log}: only {n} interactions left after the k-core filter (min_user={min_user}, min_item={min_item}), "
            f"too few for base_fraction={base_fraction} and {n_blocks} blocks: block {int(sizes.argmin())} would get "
            f"{int(sizes.min())} (at least {MIN_PER_BLOCK} needed)"
        )
    return np.repeat(np.arange(n_blocks + 1), sizes)


def _build_stream(
    name: str, df: pd.DataFrame, labels: np.ndarray, seed: int, log: Path
) -> tuple[Stream, list[str], tuple[np.ndarray, np.ndarray]]:
    """IDs by first appearance, cumulative universes and per-block splits (:func:`build_blocks`).

    Also returns notes for the user (blocks without valid or test users, incremental blocks without new
    users) and the rows' integer (user, item) IDs.
    """
    users, user_vocab = pd.factorize(df["user"])
    items, item_vocab = pd.factorize(df["item"])
    blocks, notes = build_blocks(users, items, labels, seed, log)
    as_str = lambda v: np.array([str(x) for x in v], dtype=object)  # noqa: E731  (object: NULs and widths kept)
    return Stream(name, blocks, as_str(user_vocab), as_str(item_vocab)), notes, (users, items)


def split_rng(seed: int, block: int) -> np.random.Generator:
    """The generator of block ``block``'s per-user split: derived from (``seed``, ``block``) alone, so a
    block is split the same way whether the stream was prepared at once or grown by ``data append``."""
    return np.random.default_rng([int(seed), int(block)])


def build_blocks(
    users: np.ndarray,
    items: np.ndarray,
    labels: np.ndarray,
    seed: int,
    log: Path,
    *,
    first: int = 0,
    prev: tuple[int, int] = (0, 0),
) -> tuple[list[Block], list[str]]:
    """Blocks ``first``, ``first + 1``, ... from integer (user, item) IDs of time-ordered interactions and
    their 0-based block ``labels``; the universe grows from ``prev`` = (U, I) before block ``first``.
    Each block is split per user by :func:`split_block` with :func:`split_rng`; notes as in ``_build_stream``."""
    blocks: list[Block] = []
    notes: list[str] = []
    prev_u, prev_i = prev
    left_out: list[int] = []  # per block: held-out pairs whose item has no train pair in the block
    for j in range(int(labels.max()) + 1):
        k = first + j
        mask = labels == j
        n_u = max(prev_u, int(users[mask].max()) + 1)
        n_i = max(prev_i, int(items[mask].max()) + 1)
        splits = split_block(np.stack([users[mask], items[mask]], axis=1), split_rng(seed, k))
        if len(splits["train"]) == 0:
            raise CcdrecError(f"{log}: block {k} has no train interactions")
        empty = [s for s in ("valid", "test") if len(splits[s]) == 0]
        if empty:
            notes.append(
                f"block {k} has no {' and no '.join(empty)} users (a user needs 3 or more interactions in a block, "
                "with items trained on there, to be evaluated on it); its evaluation will be empty"
            )
        if k > 0 and n_u == prev_u:
            notes.append(f"incremental block {k} has no new users (every user in it appeared in an earlier block)")
        left_out.append(int(mask.sum()) - sum(len(splits[s]) for s in ("train", "valid", "test")))
        blocks.append(Block(k, n_u, n_i, prev_u, prev_i, **splits))
        prev_u, prev_i = n_u, n_i
    if sum(left_out):
        notes.append(
            f"{sum(left_out):,} held-out interaction(s) left out ({_per_block(first, left_out)}): their item has no "
            "train interaction in the block, so no model can have "
            "learnt the item there (data info lists them as left_out)"
        )
    return blocks, notes


def _per_block(first: int, counts: list[int], shown: int = 12) -> str:
    """``per block D_0..D_2: 0 / 3 / 1``; past ``shown`` blocks only those with a count, ``in D_22: 2, D_27: 2``."""
    if len(counts) <= shown:
        return f"per block {_block_range(first, len(counts))}: {' / '.join(map(str, counts))}"
    some = [(first + j, c) for j, c in enumerate(counts) if c]
    more = f" and {len(some) - shown} more blocks" if len(some) > shown else ""
    return "in " + ", ".join(f"D_{k}: {c:,}" for k, c in some[:shown]) + more


def set_aside(
    users: np.ndarray, items: np.ndarray, written: pd.DataFrame, labels: np.ndarray, blocks: list[Block]
) -> tuple[list[int], list[list[str]]]:
    """The held-out interactions that ``blocks`` (:func:`build_blocks` of the integer ``users``, ``items``
    and 0-based block ``labels`` of time-ordered rows) set aside because their item has no train pair in
    the block: their count per block, and the pairs as the log writes them (``written``'s ``user`` and
    ``item`` on the same rows), [user, item] in row order."""
    counts: list[int] = []
    pairs: list[list[str]] = []
    for j, b in enumerate(blocks):
        rows = np.flatnonzero(labels == j)
        stored = np.concatenate([b.stored(s) for s in SPLITS]).astype(np.int64)
        codes = users[rows].astype(np.int64) * b.n_items + items[rows]
        aside = rows[~np.isin(codes, stored[:, 0] * b.n_items + stored[:, 1])]
        counts.append(len(aside))
        pairs += [[str(written["user"].iat[r]), str(written["item"].iat[r])] for r in aside]
    return counts, pairs


def _block_range(first: int, n: int) -> str:
    return f"D_{first}" if n == 1 else f"D_{first}..D_{first + n - 1}"


# --- writing ------------------------------------------------------------------------------


def _write_atomically(
    stream: Stream, log: Path, out: Path, force: bool, extra: dict[str, dict] | None = None, check=None
) -> Stream:
    """Write into a temporary sibling of ``out``, read it back and check it, then rename it into place
    (replacing ``out`` if allowed). ``extra``: JSON files written beside the stream (``prepare.json``);
    ``check``: called with the stream read back, may raise to refuse it.
    Returns the stream as read back, named and sourced as ``out``.
    Whatever goes wrong, the temporary directory is removed and ``out`` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for note in clear_stale_writes(out):
            warnings.warn(note, PrepareWarning, stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)).resolve()
        tmp.chmod(plain_mode(directory=True))  # mkdtemp's is owner-only
    except OSError as e:
        raise CcdrecError(f"{out}: cannot create the output directory ({e})") from None
    try:
        save_stream(stream, tmp)
        for fname, content in (extra or {}).items():
            (tmp / fname).write_text(json.dumps(content, indent=1) + "\n", encoding="ascii")
        try:
            loaded = load_stream(tmp)  # an absolute path: never a bundled name
        except CcdrecError as e:
            raise CcdrecError(f"cannot prepare {log}: the stream written for {out} does not read back ({e})") from None
        _check_read_back(stream, loaded, log, out)
        if check is not None:
            check(loaded)
        _replace(tmp, log, out, force)
    except OSError as e:
        raise CcdrecError(f"{out}: cannot write the stream ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded.name, loaded.source = out.name, out.resolve()
    return loaded


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or no way to tell: leave its files alone
    return True


def clear_stale_writes(out: Path) -> list[str]:
    """Clean up after a write of the stream ``out`` whose process was killed (``kill -9``, a power cut):
    the temporary siblings it leaves are named ``.NAME.tmp-PID-*`` (the new stream being written) and
    ``.NAME.old-PID-*`` (the stream it replaces, between two renames). When process PID is gone, a
    ``tmp`` sibling is removed, and an ``old`` one is put back as ``out`` if ``out`` is missing (the kill
    fell between the renames), else removed. Siblings of a live process, and names without a PID
    (written by an earlier ccdrec), are left alone. Returns one line per stream put back."""
    notes = []
    for kind, pid, sibling in write_siblings(out):
        if _alive(pid):
            continue
        if kind == "old" and not out.exists():
            sibling.rename(out)
            notes.append(f"{out}: put back the stream a killed write had moved aside ({sibling.name})")
        else:
            shutil.rmtree(sibling, ignore_errors=True)
    return notes


def _check_read_back(written: Stream, loaded: Stream, log: Path, out: Path) -> None:
    """The stream read back from disk must equal the one written, vocabularies included."""

    def same_vocab(a, b) -> bool:
        return (a is None) == (b is None) and (a is None or list(map(str, a)) == list(map(str, b)))

    problem = None
    if len(loaded) != len(written):
        problem = f"{len(loaded)} blocks instead of {len(written)}"
    else:
        for a, b in zip(written, loaded, strict=True):
            sizes = (a.n_users, a.n_items, a.prev_users, a.prev_items) != (b.n_users, b.n_items, b.prev_users, b.prev_items)
            if sizes or not all(np.array_equal(a.split(s), b.split(s)) for s in SPLITS):
                problem = f"block {a.index} differs"
                break
    if problem is None and not same_vocab(written.user_vocab, loaded.user_vocab):
        problem = "the user vocabulary differs"
    if problem is None and not same_vocab(written.item_vocab, loaded.item_vocab):
        problem = "the item vocabulary differs"
    if problem is not None:
        raise CcdrecError(f"cannot prepare {log}: the stream written for {out} does not read back as written ({problem})")


def _replace(tmp: Path, log: Path, out: Path, force: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    _check_out(log, out, force)  # it may have been filled since the first check
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:  # also Ctrl-C: put the old stream back
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
