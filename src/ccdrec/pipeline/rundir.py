"""The run directory: resolved config, per-stage checkpoints, metrics, and the resume state.

Layout::

    RUN/config.yaml        the resolved configuration (what ran)
    RUN/stream.json        the stream it runs on: its source and content hash (checked on every reopening)
    RUN/state.json         completed stages and the checkpoint each role currently points to
    RUN/metrics.jsonl      one JSON line per evaluation, tagged with its stage
    RUN/checkpoints/       NAME.pt (tensors) + NAME.json (architecture) per stage output
    RUN/report.md, plots/  written at the end

Every file is written atomically; ``state.json`` is written last in a stage, so a stage counts as
done only when all its outputs are on disk. On resume, metric lines of unfinished stages are dropped
and the temporary files of writes a kill cut short are removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from ccdrec.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_model,
    load_tensors,
    read_json,
    save_model,
    save_tensors,
    stem_file,
)
from ccdrec.config import RunConfig, validation_message
from ccdrec.data.stream import BUNDLED, INTERACTIONS, UNIVERSE, Block, Stream, load_stream
from ccdrec.errors import CcdrecError
from ccdrec.models.base import Recommender
from ccdrec.option_values import shell_word

STATE_VERSION = 1
STREAM_FILE = "stream.json"
COMPARE_FILE = "compare.json"  # a comparison directory's plan (pipeline/compare.py)
SWEEP_FILE = "sweep.json"  # a sweep directory's plan (pipeline/sweep.py)
LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}  # run directories this process holds (RunDir.hold)
UNION_GRAPH = "union"  # checkpoint meta "graph": trained on the union of blocks 0..k (full retraining)


def trained_on(stream: Stream, meta: dict) -> Block:
    """The block whose train split a checkpoint (its ``meta``) was trained on: block ``meta["block"]``,
    the union of blocks 0..k (``meta["graph"] == "union"``, full retraining), or the span of blocks
    ``meta["first"]``..k (a teacher updated every few cycles)."""
    k = int(meta.get("block", 0))
    if meta.get("graph") == UNION_GRAPH:
        return stream.union_block(k)
    return stream.span(int(meta.get("first", k)), k)


def enclosing(path: Path) -> tuple[str, Path] | None:
    """The outermost comparison or sweep that directory ``path`` is a part of, as ("comparison" or
    "sweep", its directory, relative where ``path`` is): a run in ``OUT/`` of ``ccdrec compare``, a
    comparison (cell) of a sweep, a run of a sweep's cell; None for a directory that stands alone. The
    parts of one must stay at one block and one plan, so they are taken on through it. Symbolic links
    are followed: a link to a part is that part."""
    here = Path(path).resolve()
    parent, grand = here.parent, here.parent.parent
    if (grand / SWEEP_FILE).exists() and (parent / COMPARE_FILE).exists():
        found = ("sweep", grand)
    elif (parent / SWEEP_FILE).exists():
        found = ("sweep", parent)
    elif (parent / COMPARE_FILE).exists():
        found = ("comparison", parent)
    else:
        return None
    kind, where = found
    return kind, where if Path(path).is_absolute() else Path(os.path.relpath(where))


def refuse_part(path: Path, change: str, why: str) -> None:
    """Raise :class:`CcdrecError` when directory ``path`` is a part of a comparison or sweep
    (:func:`enclosing`): ``change`` (e.g. ``--max-blocks 3``) must be made to the whole, so that ``why``."""
    if (whole := enclosing(path)) is not None:
        kind, where = whole
        raise CcdrecError(
            f"{path} is a part of the {kind} {where}: {change} is made to the whole {kind}, so that {why}: "
            f"ccdrec compare --resume {shell_word(where)} {change}"
        )


# Defaults that changed after runs were written: a stored configuration without the field was written by
# code that behaved as the old default, and a resumed run must go on as it started.
CHANGED_DEFAULTS = {("student", "distill_from"): "scratch", ("student", "serve"): "update"}


def stored_defaults(data):
    """A stored configuration (parsed YAML) with the old default of every :data:`CHANGED_DEFAULTS` field it lacks."""
    if not isinstance(data, dict):
        return data
    for (section, key), old in CHANGED_DEFAULTS.items():
        part = data.get(section)
        if isinstance(part, dict) and key not in part:
            data = {**data, section: {**part, key: old}}
    return data


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def ckpt(self, name: str) -> Path:
        return self.path / "checkpoints" / name

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory (a clear error when there is none)."""
        rd = cls(Path(path))
        if rd.path.is_file():
            raise CcdrecError(f"{rd.path}: a file, not a run directory (one that `ccdrec run` wrote)")
        if not rd.path.is_dir():
            raise CcdrecError(f"{rd.path}: no such run directory")
        if not rd.config_path.exists() and all((rd.path / f).exists() for f in ("universe.csv", "interactions.csv.gz")):
            raise CcdrecError(
                f"{rd.path}: a stream directory (of `ccdrec data prepare`), not a run; run CCD on it with "
                f"`ccdrec run --data {shell_word(rd.path)}`"
            )
        if not rd.state_path.exists():
            for plan, what in (("compare.json", "a comparison"), ("sweep.json", "a sweep over seeds and cadences")):
                if (rd.path / plan).exists():
                    runs = sorted(p.parent for p in rd.path.glob("**/state.json"))
                    runs.sort(key=lambda d: d.name != "ccd")  # CCD's run first: the one usually meant
                    example = f" (e.g. {runs[0]})" if runs else ""
                    raise CcdrecError(f"{rd.path}: {what} directory, not a run directory: give one of its runs{example}")
        return rd

    # --- creation and validation -------------------------------------------------------------
    def check_creatable(self, what: str = "run directory") -> None:
        """Raise CcdrecError unless a new run (``what``: or comparison, sweep) can be created here: the path
        is missing or an empty directory. Nothing is created."""
        if self.path.exists() and not self.path.is_dir():
            raise CcdrecError(f"{self.path}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()):
            if (self.path / UNIVERSE).exists() or (self.path / INTERACTIONS).exists():
                raise CcdrecError(f"{self.path}: a stream directory, not a place for a new {what}; give --out a new directory")
            kinds = {"state.json": ("run directory", "run"), "compare.json": ("comparison directory", "compare"),
                     "sweep.json": ("sweep directory", "compare")}  # fmt: skip
            found = [kind for f, kind in kinds.items() if (self.path / f).exists()]
            if not found:
                raise CcdrecError(f"{self.path}: exists and is not empty (not ccdrec's; give --out a new or empty directory)")
            kind, command = found[0]
            if kind == "run directory" and (self.path.parent / "compare.json").exists():  # one run of a comparison
                raise CcdrecError(
                    f"{self.path}: a run of the comparison {self.path.parent} exists there; continue it with ccdrec compare "
                    f"--resume {shell_word(self.path.parent)}, or give --out a new directory"
                )
            raise CcdrecError(
                f"{self.path}: a {kind} exists there; continue it with ccdrec {command} --resume {shell_word(self.path)}, "
                "or give --out a new directory"
            )

    def create(self, cfg: RunConfig, stream: Stream) -> None:
        """A new run of ``cfg`` on ``stream`` (its content hash is recorded, :meth:`open_stream`)."""
        self.check_creatable()
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_config(cfg)
        self.record_stream(cfg, stream)
        self.write_state({"version": STATE_VERSION, "completed": [], "pointers": {}, "seconds": {}})
        atomic_write_bytes(self.metrics_path, lambda f: None)

    def record_stream(self, cfg: RunConfig, stream: Stream) -> None:
        """Write ``stream.json``: the source of ``cfg``, the content hash of ``stream`` and its number of
        blocks (the hash is also the prefix digest of those blocks, :meth:`Stream.prefix_digest`)."""
        atomic_write_json(self.path / STREAM_FILE, {"source": cfg.dataset, "sha256": stream.digest, "blocks": len(stream)})

    def stream_blocks(self) -> int:
        """The number of blocks of the run's stream as last opened (``stream.json``; 0 if not recorded)."""
        return int(read_json(self.path / STREAM_FILE).get("blocks") or 0)

    def open_stream(self, cfg: RunConfig) -> Stream:
        """The stream of this run, checked against the content hash recorded when it started: a run never
        goes on (resume, compare, recommend, serve) on a stream that has changed under it.

        A stream that only gained blocks (``ccdrec data append``) is the same stream: it is accepted when
        the prefix digest of its first ``blocks`` blocks (``stream.json``; runs recorded before the
        count was written: any prefix) equals the recorded hash. The record is then moved on to the
        longer stream (best effort: a read-only run directory keeps its old record), so that the
        appended blocks, which the run may go on to use, are protected from then on too.

        A stream directory that has moved is named as gone, with the line of ``config.yaml`` that points the
        run at its new place (the content hash is checked there as anywhere); the record follows it.
        """
        if not cfg.dataset.strip():
            raise CcdrecError(
                f"{self.path}: `dataset:` in {self.config_path} is empty; write the stream directory's absolute path"
            )
        if cfg.dataset not in BUNDLED and not Path(cfg.dataset).is_absolute():
            raise CcdrecError(
                f"{self.path}: its stream directory {cfg.dataset} (`dataset:` in {self.config_path}) must be an absolute "
                "path: the run is used from any working directory"
            )
        if cfg.dataset not in BUNDLED and Path(cfg.dataset).exists() and not Path(cfg.dataset).is_dir():
            raise CcdrecError(
                f"{self.path}: its stream directory {cfg.dataset} (`dataset:` in {self.config_path}) is a file, not a "
                "directory; write the stream directory's absolute path there"
            )
        if cfg.dataset not in BUNDLED and not Path(cfg.dataset).is_dir():
            raise CcdrecError(
                f"{self.path}: its stream directory {cfg.dataset} (`dataset:` in {self.config_path}) is not there (moved "
                "or removed); move it back, or write its new absolute path there (its content is still checked against "
                "the stream the run started on)"
            )
        stream = load_stream(cfg.dataset)
        recorded = self.path / STREAM_FILE
        if not recorded.exists():
            raise CcdrecError(
                f"{self.path}: {STREAM_FILE} is missing, so the stream cannot be checked against the one the run "
                "started on; restore the file from a copy of the run directory, or start a new run"
            )
        record = read_json(recorded)
        expected = record.get("sha256")
        updated = {**record, "source": cfg.dataset}
        if expected != stream.digest:
            if not _is_prefix(stream, expected, record.get("blocks")):
                raise CcdrecError(
                    f"{self.path}: its stream {cfg.dataset} has changed since the run started (content hash "
                    f"{str(expected)[:12]} recorded, {stream.digest[:12]} now; appending blocks is the only "
                    "change a run follows); restore the stream or start a new run"
                )
            updated.update(sha256=stream.digest, blocks=len(stream))
        if updated != record:  # grown (data append) or moved (a new `dataset:`): recorded, best effort
            try:
                atomic_write_json(recorded, updated)
            except OSError:
                pass
        return stream

    def hold(self) -> None:
        """Take the run directory for this process until it exits (an exclusive ``flock`` on ``.lock``);
        a second ``run`` / ``--resume`` of the same directory is a one-line error instead of two
        processes writing one state."""
        key = self.path.resolve()
        if key in _HELD:
            return
        import fcntl

        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CcdrecError(f"{self.path}: the run directory is in use by another ccdrec process") from None
        _HELD[key] = fd  # released when the process exits

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of atomic writes that a kill cut short (``.NAME.*.tmp``)."""
        for tmp in self.path.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    def load_config(self) -> RunConfig:
        if not self.config_path.exists():
            raise CcdrecError(f"{self.path}: not a ccdrec run directory (no config.yaml)")
        try:
            data = yaml.safe_load(self.config_path.read_text())
            if not isinstance(data, dict):
                what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of fields"
                raise CcdrecError(f"{self.config_path}: not a run configuration ({what}); restore it from a copy of the run")
            return RunConfig.model_validate(stored_defaults(data))
        except yaml.YAMLError as e:
            raise CcdrecError(f"{self.config_path}: corrupt YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise CcdrecError(f"{self.config_path}: not UTF-8 text; restore it from a copy of the run") from None
        except ValidationError as e:
            raise CcdrecError(f"{self.config_path}: incompatible configuration ({validation_message(e)})") from None

    def save_config(self, cfg: RunConfig) -> None:
        atomic_write_bytes(
            self.config_path, lambda f: f.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
        )

    def check_max_blocks(self, max_blocks: int) -> None:
        """Raise unless the run can stop at block ``max_blocks``: a block already under way cannot be taken back."""
        completed = self.read_state()["completed"]
        started = max((int(name.split("/")[0][1:]) for name in completed), default=0)
        if max_blocks < started:
            where = "has run through" if f"b{started}/eval" in completed else "has started"
            raise CcdrecError(f"{self.path}: the run {where} block {started}; --max-blocks must be at least {started}")

    def set_max_blocks(self, max_blocks: int) -> RunConfig:
        """Let the stored run go on to block ``max_blocks`` (or stop there); returns the new configuration.

        A run that stopped at its last block continues with the next one on resume. The blocks it has
        already started cannot be taken back: ``max_blocks`` below them is an error.
        """
        self.check_max_blocks(max_blocks)
        cfg = self.load_config().model_copy(update={"max_blocks": max_blocks})
        self.save_config(cfg)
        return cfg

    def read_state(self) -> dict:
        state = read_json(self.state_path)
        if not isinstance(state, dict) or not isinstance(state.get("pointers"), dict):
            raise CcdrecError(f"{self.state_path}: not a run state (expected a JSON object with completed stages and pointers)")
        if state.get("version") != STATE_VERSION or not isinstance(state.get("completed"), list):
            raise CcdrecError(f"{self.state_path}: incompatible run state (version {state.get('version')!r})")
        return state

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    # --- artefacts ---------------------------------------------------------------------------
    def save_model(self, name: str, model: Recommender, meta: dict | None = None) -> str:
        save_model(model, self.ckpt(name), meta)
        return name

    def load_model(self, name: str, device) -> tuple[Recommender, dict]:
        """(model, meta); ``meta["block"]`` is the block whose train graph the model was trained on."""
        return load_model(self.ckpt(name), device)

    def load_attached(self, name: str, stream: Stream, device, with_meta: bool = False):
        """A checkpointed model attached to the train graph it was trained on: block ``meta["block"]``'s,
        or with ``meta["graph"] == "union"`` (full retraining) the train pairs of blocks 0..k, or with
        ``meta["first"]`` the span of blocks first..k (a teacher updated every few cycles); with
        ``with_meta``, (model, meta). The one place that re-attaches a checkpoint (runs, resume, workers,
        serving). Raises CcdrecError for a checkpoint with NaN or infinite weights (a training that diverged
        in a version that did not stop it): it would rank at random and recommend nothing."""
        model, meta = self.load_model(name, device)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise CcdrecError(
                f"{self.path}: checkpoint {name} has non-finite (NaN or infinite) weights: its training diverged, so it "
                "cannot rank; run it again: a training that diverges now stops the run with an error naming it"
            )
        model.set_graph(trained_on(stream, meta).matrix("train", model.n_users, model.n_items))
        return (model, meta) if with_meta else model

    def save_tensors(self, name: str, tensors: dict) -> str:
        save_tensors(stem_file(self.ckpt(name), ".pt"), tensors)
        return name

    def load_tensors(self, name: str) -> dict:
        return load_tensors(stem_file(self.ckpt(name), ".pt"))

    # --- metrics -----------------------------------------------------------------------------
    def append_metrics(self, rows: list[dict]) -> None:
        with open(self.metrics_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for n, line in enumerate(self.metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CcdrecError(f"{self.metrics_path}:{n}: corrupt metrics line") from None
        return rows

    def keep_metrics_of(self, completed: set[str]) -> None:
        """Drop metric lines of stages that did not complete (an interrupted stage re-runs)."""
        text = self.metrics_path.read_text() if self.metrics_path.exists() else ""
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line).get("stage") in completed:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
        atomic_write_bytes(self.metrics_path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))


def _is_prefix(stream: Stream, expected, n_blocks) -> bool:
    """Whether ``stream`` starts with the blocks whose digest is ``expected`` and has more after them
    (``n_blocks`` of them, or any number when the record does not say)."""
    if not isinstance(expected, str):
        return False
    if isinstance(n_blocks, int) and not isinstance(n_blocks, bool):
        return 1 <= n_blocks < len(stream) and stream.prefix_digest(n_blocks) == expected
    return any(stream.prefix_digest(n) == expected for n in range(len(stream) - 1, 0, -1))
