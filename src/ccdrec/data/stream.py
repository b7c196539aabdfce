"""The stream of blocks D_0..D_K (method.md section 2).

A stream directory holds ``interactions.csv.gz`` (``block,split,user,item``) and ``universe.csv``
(``block,users,items`` = the cumulative universe U_k, I_k after block k), and, for streams made by
``ccdrec data prepare``, the vocabularies ``users.json`` / ``items.json``: a JSON list (ASCII, escaped)
of the original IDs as strings, entry ``id`` -> original, so any string survives, line breaks included.
Streams written by earlier versions have ``users.csv`` / ``items.csv`` (row ``id`` -> ``original``),
which are still read. IDs are assigned in order of first appearance, so block k's new users are ``[U_{k-1}, U_k)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ccdrec.arguments import check_int
from ccdrec.errors import BlockOutOfRange, CcdrecError, InvalidArgument, WrongArgumentType
from ccdrec.option_values import shell_word

SPLITS = ("train", "valid", "test")
BUNDLED = ("yelp", "gowalla")
BUNDLED_SHA256 = {
    "yelp": "cd26d7bcf53a07156391930428c3423d90aac390ee17928db5c0c3deaf3429b4",
    "gowalla": "80124baea4e20e35ac384c7b2e2b26dbb033fa05a2e42024b1b26fc8a3b4bf69",
}
INTERACTIONS = "interactions.csv.gz"
UNIVERSE = "universe.csv"


def pad_to(matrix: sp.spmatrix, shape: tuple[int, int]) -> sp.csr_matrix:
    """``matrix`` as CSR of ``shape``: an earlier (smaller) universe is padded, a larger one cut."""
    m = sp.csr_matrix(matrix)
    if m.shape == tuple(shape):
        return m
    coo = m.tocoo()
    keep = (coo.row < shape[0]) & (coo.col < shape[1])
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=shape)


def _pairs_matrix(pairs: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    data = np.ones(len(pairs), dtype=np.float32)
    m = sp.csr_matrix((data, (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def held_out_pairs(train: np.ndarray, valid: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which ``valid`` and ``test`` pairs of one block are held-out targets: boolean masks of their rows.

    method.md 2 splits a block's interactions into train / valid / test (a partition: a pair the user
    trains on in the block is not a held-out target of that block) and 8 masks, at test time, the
    user's train and valid items of the block. A pair listed in several splits (the bundled Yelp lists
    repeat some) would be masked and still counted in |G|, so: a ``test`` pair that is a ``train`` or
    ``valid`` pair of the block is not a target, nor a ``valid`` pair that is a ``train`` pair.
    All three are ``(n, 2)`` integer arrays of (user, item) with non-negative IDs.
    """
    if len(train) + len(valid) == 0 or len(valid) + len(test) == 0:
        return np.ones(len(valid), dtype=bool), np.ones(len(test), dtype=bool)
    width = int(max(p[:, 1].max(initial=-1) for p in (train, valid, test) if len(p))) + 1

    def keys(pairs: np.ndarray) -> np.ndarray:
        return np.asarray(pairs[:, 0], dtype=np.int64) * width + np.asarray(pairs[:, 1], dtype=np.int64)

    train_k, valid_k = keys(train), keys(valid)
    keep_valid = ~_among(valid_k, train_k)
    keep_test = ~(_among(keys(test), train_k) | _among(keys(test), valid_k))
    return keep_valid, keep_test


def _among(keys: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``np.isin(keys, ref)``, by binary search when ``ref`` is sorted (a loaded split is)."""
    if len(ref) == 0:
        return np.zeros(len(keys), dtype=bool)
    if (ref[1:] < ref[:-1]).any():
        ref = np.sort(ref)
    pos = np.minimum(np.searchsorted(ref, keys), len(ref) - 1)
    return ref[pos] == keys


@dataclass(eq=False)
class Block:
    """One block D_k: its train/valid/test pairs inside the cumulative universe.

    ``train``, ``valid`` and ``test`` are ``(n, 2)`` int64 arrays of (user, item) pairs, deduplicated per
    split in a loaded stream (a block built by hand keeps its pairs as given). Built with pairs
    that are in several splits, a block keeps only the held-out targets of :func:`held_out_pairs` in
    ``valid`` and ``test`` (method.md 2, 8), so every consumer sees the same held-out sets; the pairs
    as given (what the stream's files hold) stay available as :meth:`stored`, and :attr:`dropped`
    counts the difference per split.
    """

    index: int
    n_users: int
    n_items: int
    prev_users: int
    prev_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    _given: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._check()
        keep_valid, keep_test = held_out_pairs(self.train, self.valid, self.test)
        for name, keep in (("valid", keep_valid), ("test", keep_test)):
            if not keep.all():
                given = getattr(self, name)
                self._given[name] = given
                setattr(self, name, given[keep])

    def _check(self) -> None:
        """The sizes as ints with 0 <= previous <= current universe, and each split an (n, 2) integer
        array (a list of pairs is taken) of IDs inside the universe; a mistake is one line naming it
        (:class:`InvalidArgument`, or :class:`WrongArgumentType` for a type), not a SciPy or torch error later."""
        for name in ("index", "n_users", "n_items", "prev_users", "prev_items"):
            setattr(self, name, check_int(f"Block {name}", getattr(self, name), minimum=0))
        for prev, now in (("prev_users", "n_users"), ("prev_items", "n_items")):
            if getattr(self, prev) > getattr(self, now):
                raise InvalidArgument(f"Block {prev} ({getattr(self, prev)}) is larger than {now} ({getattr(self, now)})")
        for name in SPLITS:
            given = getattr(self, name)
            pairs = np.asarray(given) if isinstance(given, (list, tuple, np.ndarray)) else None
            if pairs is None:
                raise WrongArgumentType(f"Block {name} must be an (n, 2) array of (user, item) pairs, not {type(given).__name__}")
            if pairs.size == 0:
                pairs = pairs.reshape(0, 2).astype(np.int64)
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise InvalidArgument(f"Block {name} must be an (n, 2) array of (user, item) pairs, not shape {pairs.shape}")
            if not np.issubdtype(pairs.dtype, np.integer):
                raise WrongArgumentType(f"Block {name} must hold integer IDs, not {pairs.dtype} (convert with .astype(np.int64))")
            for col, what, limit in ((0, "user", self.n_users), (1, "item", self.n_items)):
                ids = pairs[:, col]
                if len(ids) and (ids.min() < 0 or ids.max() >= limit):
                    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                    raise InvalidArgument(f"Block {name} has {what} ID {bad}, outside the universe 0..{limit - 1}")
            setattr(self, name, pairs.astype(np.int64, copy=False))

    @property
    def dropped(self) -> dict[str, int]:
        """How many pairs of the given ``valid`` / ``test`` lists were not held-out targets (see the class)."""
        return {name: len(self._given[name]) - len(self.split(name)) if name in self._given else 0 for name in ("valid", "test")}

    def stored(self, name: str) -> np.ndarray:
        """Split ``name`` as the block was given it (the stream's files), before held-out pairs it trains
        on were dropped: what :attr:`Stream.digest` hashes and :func:`save_stream` writes."""
        return self._given.get(name, self.split(name))

    @property
    def new_users(self) -> range:
        """IDs of the users that enter the universe in this block: [U_{k-1}, U_k)."""
        return range(self.prev_users, self.n_users)

    @property
    def new_items(self) -> range:
        return range(self.prev_items, self.n_items)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise CcdrecError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def matrix(self, name: str, n_users: int | None = None, n_items: int | None = None) -> sp.csr_matrix:
        """Binary CSR matrix of one split, shaped to this block's universe (or a larger one); a smaller
        shape is an :class:`InvalidArgument`."""
        shape = (self.n_users if n_users is None else n_users, self.n_items if n_items is None else n_items)
        for size, least, what in ((shape[0], self.n_users, "n_users"), (shape[1], self.n_items, "n_items")):
            if check_int(what, size, minimum=0) < least:
                raise InvalidArgument(
                    f"{what} {size} is smaller than block {self.index}'s universe ({self.n_users} users x {self.n_items} items)"
                )
        return _pairs_matrix(self.split(name), int(shape[0]), int(shape[1]))

    @cached_property
    def train_matrix(self) -> sp.csr_matrix:
        """R_k: the block's train interactions as a binary (U_k x I_k) CSR matrix."""
        return self.matrix("train")

    def users_with(self, name: str) -> np.ndarray:
        return np.unique(self.split(name)[:, 0])


@dataclass(eq=False)
class Stream:
    """A named sequence of blocks with optional vocabularies back to the original IDs."""

    name: str
    blocks: list[Block]
    user_vocab: np.ndarray | None = None
    item_vocab: np.ndarray | None = None
    source: Path | None = field(default=None)
    # per block: held-out interactions that `data prepare` / `data append` set aside because their item has no
    # train interaction in the block (so they are in no split); from prepare.json, None when unknown
    left_out: list[int] | None = field(default=None)

    def __post_init__(self) -> None:
        """A stream is at least one :class:`Block`, numbered 0, 1, ... in order, each block's previous universe
        the universe of the block before it (block 0's is empty), and vocabularies, when given, covering the
        last universe; a mistake is one line (:class:`InvalidArgument` / :class:`WrongArgumentType`)."""
        if not isinstance(self.name, str):
            raise WrongArgumentType(f"a stream's name is a string, not {type(self.name).__name__}")
        if not isinstance(self.blocks, list | tuple) or not all(isinstance(b, Block) for b in self.blocks):
            raise WrongArgumentType(f"stream {self.name}: blocks must be a list of Block objects")
        if not self.blocks:
            raise InvalidArgument(f"stream {self.name}: a stream has at least one block (block 0)")
        self.blocks = list(self.blocks)
        users = items = 0
        for k, b in enumerate(self.blocks):
            if b.index != k:
                raise InvalidArgument(
                    f"stream {self.name}: block {k} in the list has index {b.index}; blocks are numbered 0, 1, ..."
                )
            if (b.prev_users, b.prev_items) != (users, items):
                raise InvalidArgument(
                    f"stream {self.name}: block {k} starts from a universe of {b.prev_users} x {b.prev_items} (users x items), "
                    f"but block {k - 1}'s is {users} x {items}"
                    if k
                    else f"stream {self.name}: block 0 starts from an empty universe, not {b.prev_users} x {b.prev_items}"
                )
            users, items = b.n_users, b.n_items
        for what, vocab, size in (("user", self.user_vocab, users), ("item", self.item_vocab, items)):
            if vocab is not None and (isinstance(vocab, str | bytes) or not isinstance(vocab, np.ndarray | list | tuple)):
                raise WrongArgumentType(
                    f"stream {self.name}: the {what} vocabulary is an array or list of IDs, not {type(vocab).__name__}"
                )
            ids = [] if vocab is None else [str(v) for v in vocab]
            if len(set(ids)) < len(ids):
                twice = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
                raise InvalidArgument(
                    f"stream {self.name}: the {what} vocabulary holds {twice!r:.60} twice; one ID names one {what}"
                )
            if vocab is not None and len(vocab) < size:
                raise InvalidArgument(f"stream {self.name}: the {what} vocabulary has {len(vocab)} IDs for {size} {what}s")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, k: int) -> Block:
        """Block ``k`` (negative from the end, as a list's); a slice gives a list of blocks. A ``k`` that is
        not a whole number is a :class:`~ccdrec.errors.WrongArgumentType` (a TypeError), one out of range a
        :class:`~ccdrec.errors.BlockOutOfRange` (an IndexError) naming the blocks there are."""
        if isinstance(k, slice):
            return self.blocks[k]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise WrongArgumentType(f"a block is indexed by a whole number (stream[0]), not {type(k).__name__} {k!r:.40}")
        if not -len(self.blocks) <= k < len(self.blocks):
            raise BlockOutOfRange(f"block {k} is out of range: {self.name} has blocks 0..{len(self.blocks) - 1}")
        return self.blocks[k]

    def __iter__(self):
        return iter(self.blocks)

    @property
    def n_users(self) -> int:
        return self.blocks[-1].n_users

    @property
    def n_items(self) -> int:
        return self.blocks[-1].n_items

    def summary(self) -> pd.DataFrame:
        """Per-block table: universe, new entities, split sizes, the held-out interactions set aside when the
        stream was prepared (``left_out``: their item has no train interaction in the block, so they are in
        no split; only for streams whose ``prepare.json`` records them, see :attr:`left_out`), and the
        held-out pairs of the files dropped on loading because the block trains on them (``dropped_valid``,
        ``dropped_test``; :class:`Block`, :meth:`dropped_note`)."""
        known = self.left_out is not None and len(self.left_out) == len(self.blocks)
        rows = []
        for b in self.blocks:
            row = {
                "block": b.index,
                "users": b.n_users,
                "items": b.n_items,
                "new_users": len(b.new_users),
                "new_items": len(b.new_items),
                "active_users": int(len(np.unique(b.train[:, 0]))),
                "train": len(b.train),
                "valid": len(b.valid),
                "test": len(b.test),
            }
            if known:
                row["left_out"] = int(self.left_out[b.index])
            row["dropped_valid"] = b.dropped["valid"]
            row["dropped_test"] = b.dropped["test"]
            rows.append(row)
        return pd.DataFrame(rows)

    def left_out_note(self) -> str | None:
        """One line on the held-out interactions set aside when the stream was prepared (:attr:`left_out`),
        per block, and how they differ from ``dropped_valid`` / ``dropped_test``; None when there are none."""
        if not self.left_out or not any(self.left_out) or len(self.left_out) != len(self.blocks):
            return None
        return (
            f"stream {self.name}: left_out: {sum(self.left_out):,} held-out interaction(s) set aside when the stream was "
            f"prepared (per block D_0..D_{len(self.blocks) - 1}: {' / '.join(f'{n:,}' for n in self.left_out)}) because "
            "their item has no train interaction in the block; they are in no split (dropped_valid / dropped_test count "
            "held-out pairs of the files that are also train pairs of their block)"
        )

    def dropped_note(self) -> str | None:
        """One line for the user on the held-out pairs dropped because the block trains on them
        (:class:`Block`), per block; None when there are none."""
        counts = [b.dropped for b in self.blocks]
        if not any(d["valid"] or d["test"] for d in counts):
            return None
        valid, test = (" / ".join(f"{d[s]:,}" for d in counts) for s in ("valid", "test"))
        return (
            f"stream {self.name}: held-out pairs that are also train (for test: or valid) pairs of their block are not "
            f"targets (method.md 2, 8); dropped per block D_0..D_{len(counts) - 1}: valid {valid}; test {test}"
        )

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the stream's content (every block's universe and splits as stored, :meth:`Block.stored`,
        the vocabularies): a run records it and refuses to continue on a stream that has changed since.
        It is about the files: which held-out pairs a block drops on load does not enter it."""
        h = hashlib.sha256()
        for b in self.blocks:
            h.update(np.asarray([b.index, b.n_users, b.n_items, b.prev_users, b.prev_items], dtype=np.int64).tobytes())
            for s in SPLITS:
                pairs = np.ascontiguousarray(b.stored(s), dtype=np.int64)
                h.update(np.int64(len(pairs)).tobytes() + pairs.tobytes())
        for vocab in (self.user_vocab, self.item_vocab):
            h.update(b"-" if vocab is None else json.dumps([str(v) for v in vocab]).encode())
        return h.hexdigest()

    def prefix_digest(self, n_blocks: int) -> str:
        """SHA-256 of blocks ``0..n_blocks-1`` as :attr:`digest` hashes a stream of only those blocks: their
        universes and splits, and the vocabularies cut to their universe (U, I after block ``n_blocks-1``).

        ``prefix_digest(len(stream)) == digest`` when the vocabularies cover exactly the universe (every
        loaded stream), so a digest recorded by a run is also the prefix digest of the blocks it knew;
        ``ccdrec data append`` only adds blocks, and leaves every prefix digest of the old stream as it was.
        Raises :class:`CcdrecError` unless ``n_blocks`` is an int with ``1 <= n_blocks <= len(self)``.
        """
        n_blocks = check_int("n_blocks", n_blocks)
        if n_blocks > len(self.blocks):
            raise CcdrecError(f"stream {self.name}: no prefix of {n_blocks} blocks (it has {len(self.blocks)})")
        last = self.blocks[n_blocks - 1]
        part = Stream(
            self.name,
            self.blocks[:n_blocks],
            None if self.user_vocab is None else self.user_vocab[: last.n_users],
            None if self.item_vocab is None else self.item_vocab[: last.n_items],
        )
        return part.digest

    def block_index(self, k: int) -> int:
        """Block ``k`` as a non-negative index (negative from the end), checked as ``stream[k]`` checks it."""
        self[k]  # a type or range mistake is the error stream[k] gives
        return int(k) % len(self.blocks)

    def train_until(self, k: int) -> np.ndarray:
        """All deduplicated train pairs of blocks 0..k (for the full-retraining reference)."""
        k = self.block_index(k)
        pairs = np.concatenate([b.train for b in self.blocks[: k + 1]])
        return np.unique(pairs, axis=0)

    def span(self, first: int, last: int) -> Block:
        """Blocks ``first..last`` as one block, what a teacher updated every few cycles trains on
        (method.md 5, teacher update cycle): Tr = the deduplicated train pairs of those blocks; valid and
        test are block ``last``'s less the pairs the span trains on (:class:`Block`); the universe is
        block ``last``'s and the previous universe block ``first - 1``'s. A span of one block is that
        block itself. Indices as ``stream[k]`` takes them; ``first`` after ``last`` is an :class:`InvalidArgument`.
        """
        first, last = self.block_index(first), self.block_index(last)
        if first > last:
            raise InvalidArgument(f"a span runs from an earlier block to a later one, not from block {first} to {last}")
        if first == last:
            return self.blocks[last]
        before = self.blocks[first - 1] if first > 0 else None
        prev = (before.n_users, before.n_items) if before is not None else (0, 0)
        return self._merged(first, last, *prev)

    def union_block(self, k: int) -> Block:
        """Block k with Tr = the deduplicated train pairs of blocks 0..k (for full retraining).

        Valid and test are block k's; those that are train pairs of an earlier block are dropped
        (:class:`Block`: they are masked as observed and could never be hit).
        """
        k = self.block_index(k)
        b = self.blocks[k]
        return self._merged(0, k, b.prev_users, b.prev_items)

    def _merged(self, first: int, last: int, prev_users: int, prev_items: int) -> Block:
        """Block ``last`` with the deduplicated train pairs of blocks ``first..last``, its held-out pairs
        that are among them dropped (:class:`Block`); the previous universe is given."""
        b = self.blocks[last]
        train = np.unique(np.concatenate([x.train for x in self.blocks[first : last + 1]]), axis=0)
        return Block(last, b.n_users, b.n_items, prev_users, prev_items, train, b.valid, b.test)


def write_siblings(out: Path) -> list[tuple[str, int, Path]]:
    """The temporary siblings a write of the stream directory ``out`` makes (``data prepare`` / ``append``):
    ``(kind, pid, path)`` for ``.NAME.tmp-PID-*`` (kind ``tmp``: the new stream being written) and
    ``.NAME.old-PID-*`` (kind ``old``: the stream it replaces, between two renames), sorted by name."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[^/]*")
    if not out.name or not out.parent.is_dir():
        return []
    found = []
    for sibling in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_dir():
            found.append((match[1], int(match[2]), sibling))
    return found


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("ccdrec.data") / "bundled" / name))


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_stream(source: str | Path) -> Stream:
    """Load a bundled stream by name (the string ``"yelp"`` or ``"gowalla"``) or a stream directory.

    A :class:`~pathlib.Path` is always a directory, never a bundled name (``Path("yelp")`` is the
    directory ``./yelp``); a string is a bundled name when it is one, else a directory.
    Raises :class:`CcdrecError` with a one-line message for anything wrong with the input.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise WrongArgumentType(
            f"source must be a bundled stream's name ({', '.join(BUNDLED)}) or a stream directory (a str or a Path), "
            f"not {type(source).__name__}"
        )
    name = str(source)
    if isinstance(source, str) and not source.strip():
        raise CcdrecError(
            f"the stream path is empty: give a stream directory made by `ccdrec data prepare` or a bundled dataset "
            f"({', '.join(BUNDLED)})"
        )
    if isinstance(source, str) and name in BUNDLED:
        path = bundled_path(name)
        digest = file_sha256(path / INTERACTIONS)
        if digest != BUNDLED_SHA256[name]:
            raise CcdrecError(f"bundled stream {name!r} is corrupt: SHA-256 {digest} does not match the release")
    else:
        path = Path(source)
        if path.is_file():
            raise CcdrecError(
                f"{name}: a file, not a stream directory; a log becomes one with "
                f"`ccdrec data prepare {shell_word(name)} --out DIR`"
            )
        if not path.is_dir():
            aside = [a for kind, _, a in write_siblings(path) if kind == "old"]
            if aside:
                raise CcdrecError(
                    f"no stream directory {name!r}: a killed write moved it aside as {aside[0].name}; the next "
                    f"`ccdrec data append` of it puts it back (or rename that directory to {path.name})"
                )
            raise CcdrecError(f"no stream directory {name!r} (bundled datasets: {', '.join(BUNDLED)})")
        check_stream_dir(path)
        name = path.name
    return _read_stream_dir(path, name)


_RUN_MARKERS = ("state.json", "stream.json")  # ccdrec.pipeline.rundir: every run directory has them
_PLAN_MARKERS = {"compare.json": "a comparison directory", "sweep.json": "a sweep directory"}  # directories of runs


def check_stream_dir(path: Path, bundled: bool = True) -> None:
    """A one-line :class:`CcdrecError` when the directory ``path`` holds no stream at all (neither
    ``universe.csv`` nor ``interactions.csv.gz``): it says so, and for a run, comparison or sweep directory
    (often passed for its stream) that it is one and which stream to pass instead. A directory with one
    of the two files is a damaged stream, left to the reader to name the missing file. ``bundled``: whether
    the message offers the bundled datasets instead (not where only a prepared stream will do)."""
    path = Path(path)
    if (path / UNIVERSE).exists() or (path / INTERACTIONS).exists():
        return
    what = next((w for f, w in _PLAN_MARKERS.items() if (path / f).exists()), None)
    records = [path / "stream.json"] if what is None else sorted(path.glob("**/stream.json"))
    if what is None and any((path / f).exists() for f in _RUN_MARKERS):
        what = "a run directory"
    if what is None:
        raise CcdrecError(
            f"{path}: not a stream directory (no {UNIVERSE} or {INTERACTIONS}): give a directory made by "
            f"`ccdrec data prepare`" + (f" or a bundled dataset ({', '.join(BUNDLED)})" if bundled else "")
        )
    source = next((s for s in map(_recorded_source, records) if s), None)
    instead = f"the stream it ran on, {source}" if source else "the stream directory it ran on"
    raise CcdrecError(f"{path}: {what}, not a stream directory made by `ccdrec data prepare`; give {instead}")


def _recorded_source(record: Path) -> str | None:
    """The stream source a run recorded in its ``stream.json`` (None when missing or unreadable)."""
    try:
        source = json.loads(record.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and source else None


def resolve_source(source: str | Path) -> str:
    """How a run records its stream: a bundled name as it is, a directory as an absolute path, so that
    the run works from any working directory (``str`` names follow :func:`load_stream`)."""
    if isinstance(source, str) and source in BUNDLED:
        return source
    return str(Path(source).expanduser().resolve())


def _read_csv(path: Path, columns: tuple[str, ...], **kwargs) -> pd.DataFrame:
    if not path.exists():
        raise CcdrecError(f"{path}: file is missing")
    try:
        df = pd.read_csv(path, **kwargs)
    except (ValueError, OSError, EOFError, zlib.error, pd.errors.ParserError) as e:  # EOFError: a truncated gzip file
        raise CcdrecError(f"{path}: cannot be read as CSV ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CcdrecError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _read_stream_dir(path: Path, name: str) -> Stream:
    universe = _read_csv(path / UNIVERSE, ("block", "users", "items")).sort_values("block")
    df = _read_csv(path / INTERACTIONS, ("block", "split", "user", "item"))
    for col in ("block", "user", "item"):
        if not pd.api.types.is_integer_dtype(df[col]):
            raise CcdrecError(f"{path / INTERACTIONS}: column {col!r} must hold integers")
    bad = set(df["split"].unique()) - set(SPLITS)
    if bad:
        raise CcdrecError(f"{path / INTERACTIONS}: unknown split value(s) {sorted(map(str, bad))}")
    n_blocks = len(universe)
    if list(universe["block"]) != list(range(n_blocks)):
        raise CcdrecError(f"{path / UNIVERSE}: blocks must be numbered 0..K without gaps")
    blocks: list[Block] = []
    prev_u = prev_i = 0
    for k, (n_u, n_i) in enumerate(zip(universe["users"].astype(int), universe["items"].astype(int), strict=True)):
        part = df[df["block"] == k]
        if part["user"].to_numpy().max(initial=-1) >= n_u or part["item"].to_numpy().max(initial=-1) >= n_i:
            raise CcdrecError(f"{path}: block {k} has IDs outside its universe ({n_u} users, {n_i} items)")
        if n_u < prev_u or n_i < prev_i:
            raise CcdrecError(f"{path / UNIVERSE}: universe sizes must not shrink (block {k})")
        splits = {}
        for s in SPLITS:
            pairs = part.loc[part["split"] == s, ["user", "item"]].to_numpy(dtype=np.int64)
            splits[s] = np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), dtype=np.int64)
        if len(splits["train"]) == 0:
            raise CcdrecError(f"{path / INTERACTIONS}: block {k} has no train interactions")
        blocks.append(Block(k, int(n_u), int(n_i), prev_u, prev_i, **splits))
        prev_u, prev_i = int(n_u), int(n_i)
    if df["block"].max() >= n_blocks or df["block"].min() < 0:
        raise CcdrecError(f"{path / INTERACTIONS}: block numbers outside 0..{n_blocks - 1}")
    user_vocab = _read_vocab(path, "users", prev_u)
    item_vocab = _read_vocab(path, "items", prev_i)
    if (user_vocab is None) != (item_vocab is None) and (path / "prepare.json").exists():  # data prepare writes both
        have, lack = ("users", "items") if item_vocab is None else ("items", "users")
        raise CcdrecError(
            f"{path}: has the {have}' original IDs ({have}.json) but not the {lack}' ({lack}.json): the stream directory "
            "is incomplete; prepare it again from its log"
        )
    return Stream(name, blocks, user_vocab, item_vocab, source=path, left_out=_read_left_out(path, n_blocks))


def _read_left_out(directory: Path, n_blocks: int) -> list[int] | None:
    """The per-block ``left_out`` counts that ``prepare.json`` records (:attr:`Stream.left_out`); None when the
    file, or the record, is missing, unreadable or not one count per block (it is information only: a
    stream reads the same without it)."""
    path = directory / "prepare.json"
    if not path.exists():
        return None
    try:
        counts = json.loads(path.read_text(encoding="utf-8")).get("left_out")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(counts, list) and len(counts) == n_blocks
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return None
    return counts


def _read_vocab(directory: Path, kind: str, size: int) -> np.ndarray | None:
    """The original IDs of ``kind`` (users, items) as an object array of str, or None without a vocabulary.

    ``KIND.json`` (a JSON list of strings) is read if present, else the ``KIND.csv`` of earlier versions.
    """
    path = directory / f"{kind}.json"
    if path.exists():
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise CcdrecError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(vocab, list) or len(vocab) != size or not all(isinstance(v, str) for v in vocab):
            raise CcdrecError(f"{path}: vocabulary must be a JSON list of {size} strings (the IDs 0..{size - 1} in order)")
        return np.array(vocab, dtype=object)  # object, never fixed-width str: trailing NULs are kept
    path = directory / f"{kind}.csv"
    if not path.exists():
        return None
    df = _read_csv(path, ("id", "original"), dtype={"original": str}, keep_default_na=False)
    if len(df) != size or not (df["id"].to_numpy() == np.arange(size)).all():
        raise CcdrecError(f"{path}: vocabulary must list IDs 0..{size - 1} in order")
    return df["original"].astype(str).to_numpy(dtype=object)


def save_stream(stream: Stream, path: Path) -> None:
    """Write ``stream`` in the stream-directory format that :func:`load_stream` reads: every block's
    splits as given (:meth:`Block.stored`), so writing a loaded stream keeps its files and digest. Not a
    :class:`Stream`, or a path that is a file, is a one-line error before anything is written."""
    if not isinstance(stream, Stream):
        raise WrongArgumentType(f"save_stream takes a Stream, not {type(stream).__name__} (Stream(name, blocks) makes one)")
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise WrongArgumentType(f"the stream directory must be a non-empty path, not {path!r:.40}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CcdrecError(f"{path}: a file, not a directory to write a stream in")
    path.mkdir(parents=True, exist_ok=True)
    frames = []
    for b in stream.blocks:
        for s in SPLITS:
            pairs = b.stored(s)  # as given: held-out pairs dropped on load stay in the files
            frames.append(pd.DataFrame({"block": b.index, "split": s, "user": pairs[:, 0], "item": pairs[:, 1]}))
    pd.concat(frames).to_csv(path / INTERACTIONS, index=False)
    pd.DataFrame(
        {
            "block": [b.index for b in stream.blocks],
            "users": [b.n_users for b in stream.blocks],
            "items": [b.n_items for b in stream.blocks],
        }
    ).to_csv(path / UNIVERSE, index=False)
    for kind, vocab in (("users", stream.user_vocab), ("items", stream.item_vocab)):
        if vocab is not None:  # JSON, ASCII-escaped: no ID can break a line or a field
            text = json.dumps([str(v) for v in vocab], ensure_ascii=True)
            (path / f"{kind}.json").write_text(text + "\n", encoding="ascii")
