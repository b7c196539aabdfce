"""Turn a user's own interaction log into a stream directory (method.md section 2, data).

The procedure behind ``ccdrec data prepare``:

1. Read the log (CSV, gzipped CSV or Parquet, chosen by extension) and keep the user, item and
   timestamp columns. IDs may be strings or integers; their originals are kept as strings.
   Timestamps are numbers (e.g. unix seconds) or date/time strings that :func:`pandas.to_datetime`
   parses (time zones are converted to UTC; naive times are taken as UTC).
2. Reject missing values, sort by time (stable: ties keep the original row order) and drop repeated
   (user, item) pairs, keeping the earliest occurrence.
3. Iterative k-core filter: drop users with fewer than ``min_user`` and items with fewer than
   ``min_item`` interactions, repeatedly, until nothing changes.
4. Cut the timeline: the first ``base_fraction`` of the interactions form block D_0, the rest
   ``n_blocks`` incremental blocks D_1..D_K of (about) equal interaction count.
5. Assign integer IDs in order of first appearance along the timeline (users and items
   separately), so the universe is cumulative and block k's new users are exactly the IDs
   [U_{k-1}, U_k) (items likewise).
6. Split every block per user into train/valid/test with :func:`ccdrec.data.split.split_block`,
   using one ``numpy.random.default_rng(seed)`` for all blocks in order.
7. Write the stream with :func:`ccdrec.data.stream.save_stream` plus the vocabularies
   (``users.csv`` / ``items.csv``: ``id -> original``) into a temporary directory next to ``out``
   and rename it into place, so a failure never leaves partial output behind.

Every problem the user can fix raises :class:`ccdrec.errors.CcdrecError` with a one-line message that
names the file.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ccdrec.data.split import split_block
from ccdrec.data.stream import Block, Stream, load_stream, save_stream
from ccdrec.errors import CcdrecError

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
MIN_PER_BLOCK = 10  # fewest interactions a block may have after the k-core filter

_READ_ERRORS = (ValueError, OSError, EOFError, pd.errors.ParserError, pa.ArrowException)


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
    n_blocks: int = 5,
    seed: int = 0,
    force: bool = False,
) -> Stream:
    """Prepare the interaction ``log`` into the stream directory ``out`` and return it loaded.

    The stream has ``n_blocks + 1`` blocks: D_0 with the first ``base_fraction`` of the (k-core
    filtered, deduplicated) interactions in time order, then ``n_blocks`` equal incremental blocks.
    ``out`` must not exist or be empty unless ``force`` is set, in which case it is replaced.
    """
    log, out = Path(log), Path(out)
    _check_params(log, user_col, item_col, time_col, min_user, min_item, base_fraction, n_blocks)
    _check_out(log, out, force)
    df = _read_log(log, (user_col, item_col, time_col))
    df = pd.DataFrame(
        {
            "user": _ids(df[user_col]),
            "item": _ids(df[item_col]),
            "time": _time_keys(df[time_col], log, time_col),
        }
    )
    df = _dedup_in_time_order(df)
    df = _kcore(df, min_user, min_item)
    labels = _block_labels(len(df), base_fraction, n_blocks, log, min_user, min_item)
    stream = _build_stream(out.name, df, labels, seed, log)
    _write_atomically(stream, log, out, force)
    return load_stream(out.resolve())  # resolved: a relative "yelp" must not load the bundled stream


# --- checks -------------------------------------------------------------------------------


def _check_params(log: Path, user_col, item_col, time_col, min_user, min_item, base_fraction, n_blocks) -> None:
    def bad(msg: str) -> CcdrecError:
        return CcdrecError(f"{log}: {msg}")

    if not (isinstance(base_fraction, (int, float)) and 0 < base_fraction < 1):
        raise bad(f"base_fraction must be strictly between 0 and 1, got {base_fraction!r}")
    for name, value in (("n_blocks", n_blocks), ("min_user", min_user), ("min_item", min_item)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise bad(f"{name} must be an integer >= 1, got {value!r}")
    if len({user_col, item_col, time_col}) < 3:
        raise bad(f"user, item and time columns must differ, got {user_col!r}, {item_col!r}, {time_col!r}")


def _check_out(log: Path, out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CcdrecError(f"cannot prepare {log}: output {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise CcdrecError(
            f"cannot prepare {log}: output directory {out} already exists and is not empty (use force to replace it)"
        )
    if log.resolve().is_relative_to(out.resolve()):
        raise CcdrecError(f"cannot prepare {log}: it lies inside the output directory {out}, which force would delete")


def _kind(log: Path) -> str:
    name = log.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    supported = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
    raise CcdrecError(f"{log}: unknown file type; expected one of {supported}")


# --- reading ------------------------------------------------------------------------------


def _read_log(log: Path, columns: tuple[str, str, str]) -> pd.DataFrame:
    """The three ``columns`` of the log, as read (IDs of a CSV stay strings); checks missing values."""
    if not log.exists():
        raise CcdrecError(f"{log}: file is missing")
    if not log.is_file():
        raise CcdrecError(f"{log}: not a file")
    kind = _kind(log)
    if log.stat().st_size == 0:
        raise CcdrecError(f"{log}: file is empty")
    try:
        available = _columns(log, kind)
        _require_columns(log, columns, available)
        df = _read_columns(log, kind, list(columns))
    except pd.errors.EmptyDataError:
        raise CcdrecError(f"{log}: file is empty") from None
    except _READ_ERRORS as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CcdrecError(f"{log}: cannot be read as {kind.upper()} ({detail})") from None
    if len(df) == 0:
        raise CcdrecError(f"{log}: no rows")
    for col in columns:
        n_missing = int(df[col].isna().sum())
        if n_missing:
            raise CcdrecError(f"{log}: column {col!r} has {n_missing} missing value(s)")
    return df


def _columns(log: Path, kind: str) -> list[str]:
    if kind == "csv":
        return [str(c) for c in pd.read_csv(log, nrows=0).columns]
    return [str(c) for c in pq.read_schema(log).names]


def _require_columns(log: Path, wanted: tuple[str, ...], available: list[str]) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        raise CcdrecError(
            f"{log}: missing column(s) {', '.join(map(repr, missing))}; available: {', '.join(map(repr, available)) or 'none'}"
        )


def _read_columns(log: Path, kind: str, columns: list[str]) -> pd.DataFrame:
    if kind == "csv":
        # strings throughout, and only empty cells are missing: IDs such as "007" or "NA" stay as written
        return pd.read_csv(log, usecols=columns, dtype=str, keep_default_na=False, na_values=[""])
    return pd.read_parquet(log, columns=columns)


def _ids(col: pd.Series) -> np.ndarray:
    """Original IDs as strings (integral floats, e.g. from a Parquet column, lose their ``.0``)."""
    if pd.api.types.is_float_dtype(col) and np.all(np.mod(col.to_numpy(), 1) == 0):
        col = col.astype(np.int64)
    return col.astype(str).to_numpy(dtype=object)


def _time_keys(col: pd.Series, log: Path, name: str) -> np.ndarray:
    """A sortable key per row: the number itself (float64), or the UTC datetime as an int64 count."""
    if pd.api.types.is_bool_dtype(col):
        raise CcdrecError(f"{log}: column {name!r} holds booleans, not timestamps")
    if pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=np.float64)
    if pd.api.types.is_datetime64_any_dtype(col):
        return _datetime_keys(col)
    numbers = pd.to_numeric(col, errors="coerce")
    if not numbers.isna().any():
        return numbers.to_numpy(dtype=np.float64)
    parsed = _parse_datetimes(col.astype(str))
    if parsed.isna().any():  # report against whichever reading fits more of the values
        bad = numbers.isna() if numbers.isna().sum() < parsed.isna().sum() else parsed.isna()
        example = col[bad].iloc[0]
        raise CcdrecError(f"{log}: column {name!r} has {int(bad.sum())} unparsable timestamp(s), e.g. {example!r}")
    return _datetime_keys(parsed)


def _parse_datetimes(col: pd.Series) -> pd.Series:
    """UTC datetimes, NaT where a value does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parsed = pd.to_datetime(col, errors="coerce", utc=True)
        if parsed.isna().any():  # the format inferred from the first value may not fit them all
            parsed = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
    return parsed


def _datetime_keys(col: pd.Series) -> np.ndarray:
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    return col.to_numpy().astype(np.int64)  # in the column's own unit, which is all ordering needs


# --- filtering and cutting ----------------------------------------------------------------


def _dedup_in_time_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by time (stable), each (user, item) pair kept at its earliest occurrence."""
    order = np.argsort(df["time"].to_numpy(), kind="stable")
    df = df.iloc[order].reset_index(drop=True)
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


def _block_labels(n: int, base_fraction: float, n_blocks: int, log: Path, min_user: int, min_item: int) -> np.ndarray:
    """Block index of each of ``n`` time-ordered interactions: D_0 takes ``base_fraction``, the rest equal parts."""
    if n == 0:
        raise CcdrecError(f"{log}: no interactions left after the k-core filter (min_user={min_user}, min_item={min_item})")
    n0 = int(round(base_fraction * n))
    bounds = np.concatenate([[0], n0 + np.round(np.linspace(0, n - n0, n_blocks + 1)).astype(np.int64)])
    sizes = np.diff(bounds)
    if sizes.min() < MIN_PER_BLOCK:
        raise CcdrecError(
            f"{log}: only {n} interactions left after the k-core filter (min_user={min_user}, min_item={min_item}), "
            f"too few for base_fraction={base_fraction} and {n_blocks} blocks: block {int(sizes.argmin())} would get "
            f"{int(sizes.min())} (at least {MIN_PER_BLOCK} needed)"
        )
    return np.repeat(np.arange(n_blocks + 1), sizes)


def _build_stream(name: str, df: pd.DataFrame, labels: np.ndarray, seed: int, log: Path) -> Stream:
    """IDs by first appearance, cumulative universes and per-block splits (one generator, blocks in order)."""
    users, user_vocab = pd.factorize(df["user"])
    items, item_vocab = pd.factorize(df["item"])
    rng = np.random.default_rng(seed)
    blocks: list[Block] = []
    prev_u = prev_i = 0
    for k in range(int(labels.max()) + 1):
        mask = labels == k
        n_u = max(prev_u, int(users[mask].max()) + 1)
        n_i = max(prev_i, int(items[mask].max()) + 1)
        splits = split_block(np.stack([users[mask], items[mask]], axis=1), rng)
        if len(splits["train"]) == 0:
            raise CcdrecError(f"{log}: block {k} has no train interactions")
        blocks.append(Block(k, n_u, n_i, prev_u, prev_i, **splits))
        prev_u, prev_i = n_u, n_i
    as_str = lambda v: np.asarray(v, dtype=object).astype(str)  # noqa: E731
    return Stream(name, blocks, as_str(user_vocab), as_str(item_vocab))


# --- writing ------------------------------------------------------------------------------


def _write_atomically(stream: Stream, log: Path, out: Path, force: bool) -> None:
    """Write into a temporary sibling of ``out``, then rename it into place (replacing ``out`` if allowed)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise CcdrecError(f"{out}: cannot create the output directory ({e})") from None
    try:
        save_stream(stream, tmp)
        _replace(tmp, log, out, force)
    except OSError as e:
        raise CcdrecError(f"{out}: cannot write the stream ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, log: Path, out: Path, force: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    _check_out(log, out, force)  # it may have been filled since the first check
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
