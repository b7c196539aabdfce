"""A model version: one fully loaded, verified model of a run directory, and the ID that names it.

A version is built whole, beside the one serving (:func:`load_version`), and never changes afterwards;
the service swaps one reference to it, so a request that took a version at its start finishes on it.

* ``role``: ``"student"``, the checkpoint ``state.json`` points to as ``served`` (else ``student``),
  what ``ccdrec recommend`` serves; or ``"teacher"``, the rank ensemble of the ``teacherM`` pointers
  (method.md 6), served the same way to compare the cost;
* ``id``: ``NAME@SHA12``, the checkpoint name and the first 12 hex digits of the SHA-256 of its ``.pt``
  file (the teacher: the member names joined with ``+`` and the first 12 hex digits of the SHA-256 of
  the members' digests); every answer of the service names the version that computed it;
* ``block``: the run's block when the version was loaded (seen items: every split of blocks 0..block);
  ``stage``: the completed stage that wrote the checkpoint (``b3/student_update`` for ``b3_updated``,
  ``b3/student`` for ``b3_student``, ``b3/teacher1`` for ``b3_teacher1``), else the run's last
  completed stage;
* ``loaded_at``: when the version was ready (Unix seconds; ISO 8601 with milliseconds in ``GET /model``).

Verification before a version may serve (otherwise :class:`RefusedVersion` with the reason): the
checkpoint files exist and load (tensors + JSON) and did not change while they were read (SHA-256
before and after the load); every parameter is finite; the universe (n_users, n_items) is that of the
block the checkpoint was trained on and within the stream's vocabularies; the propagated
representations of an embedding model are finite, and the scores of a probe user are finite.

Cold start (``POST /recommend/items``): a user described only by the items they just interacted with is
scored by :meth:`ccdrec.serve.ServedRun.recommend_for_items` (the entity initialisation a new user gets
at growth, method.md 5.2), as ``ccdrec recommend --items`` does. The teacher ensemble has no cold-start
path (:attr:`ModelVersion.has_cold_start`).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ccdrec.checkpoint import stem_file
from ccdrec.data.stream import Stream, file_sha256
from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir
from ccdrec.serve import ServedRun

ROLES = ("student", "teacher")
# bK_updated: CL_k (bK_served in run directories written before D_k could be served)
_STAGE_OF = {"updated": "student_update", "served": "student_update", "student": "student"}


class RefusedVersion(CcdrecError):
    """A newer model version that may not serve (corrupt, half-written, inconsistent); the reason says why."""


def iso_time(t: float) -> str:
    """Unix seconds as local ISO 8601 time with milliseconds and the UTC offset."""
    lt = time.localtime(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt) + f".{int(t * 1000) % 1000:03d}" + time.strftime("%z", lt)


def role_pointers(state: dict, role: str, n_members: int) -> tuple[str, ...]:
    """The checkpoint names ``state.json`` points to for ``role`` (one name for the student)."""
    ptr = state.get("pointers") or {}
    if role == "student":
        name = ptr.get("served") or ptr.get("student")
        return (str(name),) if name else ()
    names = tuple(ptr.get(f"teacher{m}") for m in range(n_members))
    return names if all(names) else ()


def checkpoint_digest(rd: RunDir, names: tuple[str, ...]) -> str:
    """SHA-256 (hex) of the ``.pt`` file of one checkpoint, or of the digests of several in order."""
    try:
        digests = [file_sha256(stem_file(rd.ckpt(n), ".pt")) for n in names]
    except OSError as e:
        raise RefusedVersion(f"checkpoint {'+'.join(names)}: {e.strerror or e} ({Path(e.filename or '').name})") from None
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def stage_of(state: dict, name: str) -> str | None:
    """The completed stage that wrote checkpoint ``name`` (see the module docstring)."""
    completed = list(state.get("completed") or [])
    m = re.fullmatch(r"b(\d+)_([A-Za-z]+\d*)", name.split("+")[0])
    if m:
        stage = f"b{m.group(1)}/{_STAGE_OF.get(m.group(2), m.group(2))}"
        if stage in completed:
            return stage
    return completed[-1] if completed else None


class EnsembleRun(ServedRun):
    """The run's teacher ensemble (the ``teacherM`` pointers) behind the :class:`ServedRun` interface:
    the same seen-item masking and top-k, scores = rank-ensemble weights (method.md 6)."""

    role = "teacher"

    def __init__(self, rd: RunDir, stream: Stream, state: dict, names: tuple[str, ...], exact_top, device: str = "cpu"):
        from ccdrec.checkpoint import read_json
        from ccdrec.distill.ensemble import RankEnsemble

        members, metas = [], []
        for name in names:
            members.append(rd.load_attached(name, stream, device).eval())
            metas.append(read_json(stem_file(rd.ckpt(name), ".json")).get("meta", {}))
        self.model = RankEnsemble(members, exact_top=exact_top)
        self.checkpoint, self.meta = "+".join(names), metas[0]
        self.block = int(state.get("block", 0))
        self.stream = stream
        self._reps = None
        self._scorer = self.model.scorer()
        self._index_universe(self.model.n_users, self.model.n_items)


def _modules(run: ServedRun) -> list[torch.nn.Module]:
    return list(getattr(run.model, "members", [run.model]))


def verify(run: ServedRun, stream: Stream) -> None:
    """Raise :class:`RefusedVersion` unless ``run`` may serve (see the module docstring)."""
    for module in _modules(run):
        for pname, p in module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise RefusedVersion(f"{run.checkpoint}: non-finite weights in {pname}")
    n_u, n_i = run.model.n_users, run.model.n_items
    b = int(run.meta.get("block", run.block))
    if not 0 <= b < len(stream):
        raise RefusedVersion(f"{run.checkpoint}: trained on block {b}, the stream has blocks 0..{len(stream) - 1}")
    if (n_u, n_i) != (stream[b].n_users, stream[b].n_items):
        raise RefusedVersion(
            f"{run.checkpoint}: universe {n_u:,} x {n_i:,} is not block {b}'s ({stream[b].n_users:,} x {stream[b].n_items:,})"
        )
    if len(run.user_ids) != n_u or len(run.item_ids) != n_i:
        raise RefusedVersion(f"{run.checkpoint}: universe {n_u:,} x {n_i:,} is larger than the stream's vocabularies")
    if run._reps is not None and not all(bool(np.isfinite(r).all()) for r in run._reps):
        raise RefusedVersion(f"{run.checkpoint}: non-finite propagated representations")
    for uid in {0, n_u - 1}:
        if not bool(np.isfinite(run.scores(uid)).all()):
            raise RefusedVersion(f"{run.checkpoint}: non-finite scores for user index {uid}")


@dataclass
class ModelVersion:
    """A loaded and verified model of a run (see the module docstring); read-only once built."""

    run: ServedRun
    role: str
    run_name: str
    checkpoints: tuple[str, ...]
    sha256: str
    block: int
    stage: str | None
    loaded_at: float = field(default_factory=time.time)
    item_names: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_names = [str(x) for x in self.run.item_ids]

    @property
    def id(self) -> str:
        return f"{'+'.join(self.checkpoints)}@{self.sha256[:12]}"

    @property
    def key(self) -> tuple:
        """What the watcher compares with ``state.json``: the checkpoint names and the block."""
        return (self.checkpoints, self.block)

    @property
    def n_users(self) -> int:
        return int(self.run.model.n_users)

    @property
    def n_items(self) -> int:
        return int(self.run.model.n_items)

    def user_index(self, user: str) -> int | None:
        """The index of original user ID ``user``, or None when it is not in the universe."""
        try:
            return self.run.user_index(user)
        except CcdrecError:
            return None

    def items(self, idx: np.ndarray, scores: np.ndarray) -> list[dict]:
        """``[{"item": original ID, "score": float}, ...]`` of item indices and their scores."""
        names = self.item_names
        return [{"item": names[i], "score": s} for i, s in zip(idx.tolist(), scores.tolist(), strict=True)]

    def recommend(self, uid: int, k: int) -> list[dict]:
        """The top-``k`` unseen items of user index ``uid``, best first (as ``ccdrec recommend``)."""
        return self.items(*self.run.top(uid, k))

    @property
    def has_cold_start(self) -> bool:
        from ccdrec.models.vae import MultVAE

        return self.run._reps is not None or isinstance(self.run.model, MultVAE)

    def describe(self) -> dict:
        """What ``GET /model`` shows of this version."""
        return {
            "id": self.id,
            "role": self.role,
            "run": self.run_name,
            "checkpoint": "+".join(self.checkpoints),
            "sha256": self.sha256,
            "block": self.block,
            "stage": self.stage,
            "loaded_at": iso_time(self.loaded_at),
            "users": self.n_users,
            "items": self.n_items,
            "kind": getattr(self.run.model, "kind", type(self.run.model).__name__),
        }


def load_version(
    rd: RunDir, stream: Stream, state: dict, role: str = "student", exact_top=None, n_members: int = 0
) -> ModelVersion:
    """Load, verify and name the ``role`` model ``state`` points to (raises :class:`RefusedVersion`).

    ``stream`` is the run's stream, opened and checked once (:meth:`RunDir.open_stream`);
    ``n_members`` and ``exact_top`` (teacher) come from the run's configuration.
    """
    if role not in ROLES:
        raise CcdrecError(f"unknown role {role!r}: {' or '.join(ROLES)}")
    names = role_pointers(state, role, n_members)
    if not names:
        what = (
            "no student yet (D_0 is distilled once block 0's teachers are trained; serve it from then on)"
            if role == "student"
            else "not every teacher member yet"
        )
        raise RefusedVersion(f"{rd.path}: the run has {what}")
    before = checkpoint_digest(rd, names)
    try:
        if role == "student":
            run = ServedRun(rd.path, stream=stream, state=state)
        else:
            run = EnsembleRun(rd, stream, state, names, exact_top)
    except CcdrecError as e:
        raise RefusedVersion(str(e)) from None
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as e:
        raise RefusedVersion(
            f"checkpoint {'+'.join(names)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    verify(run, stream)
    if checkpoint_digest(rd, names) != before:
        raise RefusedVersion(f"checkpoint {'+'.join(names)} changed while it was loaded")
    return ModelVersion(
        run=run,
        role=role,
        run_name=rd.path.name,
        checkpoints=names,
        sha256=before,
        block=int(state.get("block", 0)),
        stage=stage_of(state, names[0]),
    )
