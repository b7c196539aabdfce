"""Hot swap: the slot holding the serving model version, and the watcher that swaps in newer ones.

Protocol (the run directory's, :mod:`ccdrec.pipeline.rundir`): a stage writes its checkpoints
atomically and ``state.json`` last, so a checkpoint ``state.json`` points to is complete. The watcher
(:class:`RunWatcher`, a daemon thread) looks at ``state.json`` every ``interval`` seconds (0.5 by
default; a ``stat`` per look, the file is read only when it changed). When the checkpoint(s) it points
to for the served role, or the run's block, differ from the serving version's, it loads the new version
beside the old one (:func:`~ccdrec.service.version.load_version`: full load, verification, warm-up)
and then swaps :attr:`ModelSlot.current`, one reference assignment, atomic in Python. A request reads
``slot.current`` once at its start and computes its whole answer with that version, which stays alive as
long as a request holds it; the answer names it (``model``).

A version of a block past the stream the service read (blocks appended with ``ccdrec data append`` after
it started, which ``ccdrec run --resume`` went on to) makes the watcher read the run's stream again
(:meth:`RunDir.open_stream`, with its checks) before it loads the version.

A version that fails to load or verify (missing, truncated or corrupt checkpoint, non-finite weights,
wrong universe) is refused with one log line (logger ``ccdrec.service``, level WARNING) and the old
version keeps serving; the same target is tried again only once its files change (size or mtime). A
missing or unreadable ``state.json`` is logged once and ignored until it changes. Swaps are logged at
level INFO. The last refusals and swaps are kept for ``GET /model`` (at most :data:`HISTORY` each).

:func:`publish` is the writer's side for tests and benchmarks: it writes a checkpoint and then points
``state.json`` at it, as a completed stage does (``completed`` is left alone: stage names belong to
the run's configuration). Use it on a copy of a run: ``ccdrec run --resume`` would continue from the
published checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from ccdrec.checkpoint import stem_file
from ccdrec.data.stream import Stream
from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.service.version import ModelVersion, RefusedVersion, iso_time, load_version, role_pointers

log = logging.getLogger("ccdrec.service")
HISTORY = 20


class ModelSlot:
    """The serving version (``current``), with a record of swaps and refusals."""

    def __init__(self, version: ModelVersion):
        self.current = version
        self.swaps = 0
        self.history: deque[dict] = deque([_event(version)], maxlen=HISTORY)
        self.refused: deque[dict] = deque(maxlen=HISTORY)
        self._lock = threading.Lock()  # serialises writers; readers never take it

    def swap(self, version: ModelVersion) -> ModelVersion:
        """Make ``version`` the serving one; returns the one it replaces (requests holding it finish on it)."""
        with self._lock:
            old, self.current = self.current, version
            self.swaps += 1
            self.history.append(_event(version))
        return old

    def refuse(self, target: str, reason: str) -> None:
        with self._lock:
            self.refused.append({"target": target, "reason": reason, "at": iso_time(time.time())})


def _event(v: ModelVersion) -> dict:
    return {"id": v.id, "block": v.block, "stage": v.stage, "loaded_at": iso_time(v.loaded_at)}


def _stat_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class RunWatcher:
    """Polls a run directory and swaps newer versions of ``role`` into ``slot`` (module docstring).

    ``check()`` does one look (tests call it directly); ``start()`` runs it every ``interval`` seconds
    in a daemon thread until ``stop()``. ``loader`` builds a version from a state (default:
    :func:`load_version` with the run's stream).
    """

    def __init__(
        self,
        slot: ModelSlot,
        rd: RunDir,
        stream: Stream,
        role: str = "student",
        interval: float = 0.5,
        n_members: int = 0,
        exact_top=None,
        loader: Callable[[dict], ModelVersion] | None = None,
    ):
        self.slot, self.rd, self.stream, self.role = slot, rd, stream, role
        self.interval = float(interval)
        self.n_members = n_members
        self.loader = loader or (lambda state: load_version(rd, self.stream, state, role, exact_top, n_members))
        self._state_stat = _stat_key(rd.state_path)
        self._state: dict | None = None
        self._refused: tuple | None = None  # (target key, files' stat) of the last refusal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the look ----------------------------------------------------------------------------
    def _files(self, names: tuple[str, ...]) -> tuple:
        return tuple(_stat_key(stem_file(self.rd.ckpt(n), s)) for n in names for s in (".pt", ".json"))

    def check(self) -> bool:
        """Look once; True when a newer version was swapped in."""
        stat = _stat_key(self.rd.state_path)
        if stat != self._state_stat or self._state is None:
            if stat is None:
                if self._state_stat is not None or self._state is None:
                    log.warning("%s is missing; still serving %s", self.rd.state_path, self.slot.current.id)
                self._state_stat, self._state = None, {}
                return False
            self._state_stat = stat
            try:
                self._state = self.rd.read_state()
            except CcdrecError as e:
                log.warning("cannot read the run state (%s); still serving %s", e, self.slot.current.id)
                self._state = {}
                return False
        state = self._state
        if not state:
            return False
        names = role_pointers(state, self.role, self.n_members)
        if not names:
            return False
        target = (names, int(state.get("block", 0)))
        if target == self.slot.current.key:
            return False
        files = self._files(names)
        if self._refused == (target, files):
            return False  # refused already; tried again once its files change
        label = f"{'+'.join(names)} (block {target[1]})"
        if target[1] >= len(self.stream):
            # the run went on to blocks appended to its stream (`ccdrec data append`) after the service started
            try:
                self.stream = self.rd.open_stream(self.rd.load_config())
            except CcdrecError as e:
                return self._refuse(target, files, label, f"its stream could not be read again: {e}")
            log.info("the run's stream has grown to %d blocks; read it again", len(self.stream))
        try:
            version = self.loader(state)
        except RefusedVersion as e:
            return self._refuse(target, files, label, str(e))
        except Exception as e:  # anything else a broken checkpoint may raise must not stop the watcher
            return self._refuse(target, files, label, f"{type(e).__name__}: {e}")
        old = self.slot.swap(version)
        self._refused = None
        log.info("swapped in %s (block %d, %s); was %s", version.id, version.block, version.stage, old.id)
        return True

    def _refuse(self, target: tuple, files: tuple, label: str, reason: str) -> bool:
        self._refused = (target, files)
        self.slot.refuse(label, reason)
        log.warning("refused %s: %s; still serving %s", label, reason, self.slot.current.id)
        return False

    # --- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ccdrec-run-watcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let the watcher die; the service keeps the serving version
                log.exception("run watcher: unexpected error; still serving %s", self.slot.current.id)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def publish(rd: RunDir, model, name: str, role: str = "served", block: int | None = None, meta: dict | None = None) -> str:
    """Write ``model`` as checkpoint ``name`` and then point ``state.json``'s ``role`` at it (a test hook).

    ``block``: the block the model was trained on (its ``meta["block"]``; default: the run's block).
    Returns ``name``. See the module docstring.
    """
    state = rd.read_state()
    b = int(state.get("block", 0)) if block is None else int(block)
    rd.save_model(name, model, {"block": b, **(meta or {})})
    point(rd, {role: name})
    return name


def point(rd: RunDir, pointers: dict[str, str]) -> None:
    """Update ``state.json``'s pointers (atomically, as the last write of a stage)."""
    state = rd.read_state()
    state["pointers"].update(pointers)
    rd.write_state(state)
