"""What every stage of a run shares (:class:`RunContext`), what it carries from stage to stage
(:class:`RunState`) and what a stage hands back (:class:`StageOutput`).

A stage is a function ``stage(ctx, state, ...) -> StageOutput``: it reads the models it needs from
``state``, writes its checkpoints through ``ctx`` (tensors + JSON in the run directory), puts the new
models back into ``state`` and returns the checkpoint each role now points to and its metric rows.
The executor (:class:`ccdrec.pipeline.staged.StagedRun`) records them in ``state.json`` and
``metrics.jsonl`` only after the stage returns, so a stage is done whole or not at all.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console

from ccdrec.config import RunConfig
from ccdrec.continual.proxy import Proxy
from ccdrec.data.stream import Block, Stream
from ccdrec.device import resolve_device
from ccdrec.distill.ensemble import RankEnsemble
from ccdrec.models.base import Recommender
from ccdrec.pipeline.rundir import RunDir
from ccdrec.train.loop import FitResult


def stage_seed(base: int, name: str) -> int:
    """A stable per-stage seed derived from a base seed (the run's or a member's) and the stage's name."""
    return (base * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def grown(model: Recommender, block: Block, cfg: RunConfig) -> Recommender:
    """A copy of ``model`` grown to ``block``'s universe with ``student.init`` over its train matrix (any
    random rows drawn from a generator of their own: the global one is left as it was)."""
    copy = model.clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(block.index, "grown"))
        copy.grow(block.n_users, block.n_items, block.train_matrix, cfg.student.init)
    return copy.eval()


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators (a stage also seeds its own generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@dataclass
class Trained:
    """A model a stage trained, with its training summary (None: no training, e.g. a kept model)."""

    model: Recommender
    fit: FitResult | None


def fit_row(model: str, res: FitResult | None, k: int, **extra) -> dict:
    """A ``kind: fit`` metric row from a training summary (``res`` None: no training)."""
    row = {"kind": "fit", "model": model, "k": k, **extra}
    if res is not None:
        row.update({"best_epoch": res.best_epoch + 1, "epochs": res.epochs_run, "train_seconds": round(res.seconds, 3)})
        if res.capped:
            row["capped"] = True
        row.update({f"valid_{m}": v for m, v in res.best_valid.items() if m != "users"})
    return row


@dataclass
class StageOutput:
    """A stage's result: ``pointers`` (role -> checkpoint name, e.g. ``teacher2 -> b3_teacher2``) and the
    metric ``rows`` it appends to ``metrics.jsonl``."""

    pointers: dict[str, str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


@dataclass
class RunContext:
    """The configuration, stream, run directory and device of a run, and its checkpoint I/O.

    ``prefix`` names the run's models in metric rows (``""`` for CCD, ``"finetune:"`` for a competitor);
    ``meta`` is stored with every checkpoint (a competitor records its method).
    """

    cfg: RunConfig
    stream: Stream
    rd: RunDir
    progress: bool = False
    console: Console = field(default_factory=lambda: Console(quiet=True))
    prefix: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.cfg.device)

    def seed(self, name: str, base: int | None = None) -> int:
        """The seed of stage ``name``, from the run seed (or ``base``, e.g. a member's seed)."""
        return stage_seed(self.cfg.seed if base is None else base, name)

    def name(self, role: str) -> str:
        """A model's name in metric rows."""
        return f"{self.prefix}{role}"

    def save(self, name: str, model: Recommender, block: int, **meta) -> str:
        """Checkpoint ``model``, trained on block ``block``'s train graph (``meta`` adds to the record)."""
        return self.rd.save_model(name, model, {"block": block, **self.meta, **meta})

    def load(self, name: str) -> Recommender:
        """A checkpointed model attached to the train graph it was trained on (:meth:`RunDir.load_attached`)."""
        return self.rd.load_attached(name, self.stream, self.device)

    def save_proxies(self, name: str, proxies: tuple[Proxy, Proxy]) -> str:
        sp_, pp_ = proxies
        return self.rd.save_tensors(name, {"sp_user": sp_.user, "sp_item": sp_.item, "pp_user": pp_.user, "pp_item": pp_.item})

    def load_proxies(self, name: str) -> tuple[Proxy, Proxy]:
        t = self.rd.load_tensors(name)
        return Proxy(t["sp_user"], t["sp_item"]).to(self.device), Proxy(t["pp_user"], t["pp_item"]).to(self.device)


@dataclass
class RunState:
    """The models a run carries between stages (method.md 4-5).

    ``members``: the teacher members; ``student``: the distilled student D_k (a competitor's
    student-size model); ``updated``: the student cycle's update CL_k; ``served``: the student served now
    (CL_k, or D_k once a teacher cycle has distilled it, ``student.serve``); ``proxies``: (SP, PP);
    ``pointers``: the checkpoint each role currently points to (those of ``state.json``).
    """

    members: list[Recommender | None]
    student: Recommender | None = None
    updated: Recommender | None = None
    served: Recommender | None = None
    proxies: tuple[Proxy, Proxy] | None = None
    pointers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def restore(cls, ctx: RunContext, pointers: dict[str, str]) -> RunState:
        """The state that ``pointers`` name, loaded from the run directory (an empty one for a new run)."""
        n = len(ctx.cfg.teacher.members)
        state = cls([None] * n, pointers=pointers)  # the live dict: stages completed later update it
        loaded: dict[str, Recommender] = {}  # a checkpoint that several roles point to is one model

        def load(name: str) -> Recommender:
            if name not in loaded:
                loaded[name] = ctx.load(name)
            return loaded[name]

        for m in range(n):
            if f"teacher{m}" in pointers:
                state.members[m] = load(pointers[f"teacher{m}"])
        if "student" in pointers:
            state.student = load(pointers["student"])
        if "served" in pointers:
            state.served = load(pointers["served"])
        updated = pointers.get("updated", pointers.get("served"))  # run directories before the pointer: served = CL_k
        if updated is not None:
            state.updated = load(updated)
        if "proxies" in pointers:
            state.proxies = ctx.load_proxies(pointers["proxies"])
        return state

    def ensemble(self, cfg: RunConfig, block: Block | None = None) -> RankEnsemble:
        """The rank ensemble E of the current teacher members (method.md 6).

        With ``block``: members from an earlier universe (a teacher not updated since,
        ``teacher.update_every`` > 1) are grown to ``block``'s universe by entity initialisation over its
        train interactions (method.md 5.2) without training, so that the stale ensemble ranks every user
        and item of the block; the members themselves are not changed.
        """
        members = [m for m in self.members if m is not None]
        if block is not None:
            members = [m if (m.n_users, m.n_items) == (block.n_users, block.n_items) else grown(m, block, cfg) for m in members]
        return RankEnsemble(members, exact_top=cfg.teacher.ensemble_exact_top)

    def pointer(self, role: str, name: str) -> str | None:
        """``name`` if ``role`` points to that checkpoint, else None (e.g. E_k's top lists of block k)."""
        return name if self.pointers.get(role) == name else None
