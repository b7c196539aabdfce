"""The stages of CCD on one block (method.md 4, 5, 7), as plain functions over models.

* :func:`train_member`      block 0: one teacher member on Tr_0 with its own loss (4.1);
* :func:`teacher_lists`     the rank ensemble's interesting lists (6, 7);
* :func:`generate_student`  stage 1: a fresh student distilled from the ensemble (7);
* :func:`update_student`    stage 2: grow D_{k-1}, BPR + proxy-guided replay (5.1, 5.2);
* :func:`update_teacher`    stage 3: grow a member, BPR + LWC-KD + replay from SP, PP, CL_k (5.3, 5.4);
* :func:`update_proxies`    the stability / plasticity EMAs (5.1).

Every stage takes an explicit seed, so a stage re-run after an interruption gives the same result.
Orchestration, checkpoints and evaluation live in :mod:`ccdrec.pipeline.ccd`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import MemberConfig, ReplayConfig, RunConfig
from ccdrec.continual.lwckd import LWCKD, OldEmbeddings
from ccdrec.continual.proxy import Proxy, ema_update
from ccdrec.continual.replay import (
    Candidates,
    PreviousOutputKL,
    ReplaySet,
    impute_replay,
    replay_candidates,
    replay_pass,
    replay_weight,
    sample_replay,
)
from ccdrec.data.stream import Block, pad_to
from ccdrec.distill.ensemble import RankEnsemble, top_lists, top_matrix
from ccdrec.distill.rrd import distill_student
from ccdrec.models.base import EmbeddingModel, Recommender, Scorer
from ccdrec.models.registry import build_model
from ccdrec.models.vae import MultVAE
from ccdrec.train.loop import FitResult, fit


def stage_seed(base: int, name: str) -> int:
    """A stable per-stage seed derived from the run seed and the stage's name."""
    return (base * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@dataclass
class StageResult:
    model: Recommender
    fit: FitResult | None


def train_member(member: MemberConfig, block: Block, cfg: RunConfig, seed: int, device, progress=False, label="") -> StageResult:
    """Block 0, step 1: train one teacher member on Tr_0 with its own loss (method.md 4)."""
    seed_everything(seed)
    model = build_model(member.kind, block.n_users, block.n_items, **member.kwargs()).to(device)
    schedule = cfg.teacher.base_vae if member.kind == "vae" else cfg.teacher.base
    res = fit(model, block, schedule, seed=seed, progress=progress, label=label)
    return StageResult(model, res)


def base_member(m: int, block: Block, cfg: RunConfig, device, progress=False) -> StageResult:
    """Block 0 member ``m`` as every run trains it (seeded from the member's seed and ``b0/teacher{m}``)."""
    member = cfg.teacher.members[m]
    seed = stage_seed(member.seed, f"b0/teacher{m}")
    return train_member(member, block, cfg, seed, device, progress, label=f"D_0 teacher {m} ({member.kind}-{member.dim})")


def teacher_lists(ensemble: RankEnsemble, block: Block, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's top-n items per user and top-n users per item, excluding observed pairs (7)."""
    r = block.train_matrix
    return top_lists(ensemble.scorer(context=r), ensemble.n_users, ensemble.n_items, r, n=n, device=ensemble.device)


def avoid_top(
    scorers: list[Scorer], shape: tuple[int, int], observed: sp.csr_matrix, n: int, users: np.ndarray, device
) -> sp.csr_matrix:
    """Union of each scorer's top-n unobserved items for ``users``, as a binary ``shape`` matrix.

    BPR negatives of old users avoid these likely positives (method.md 5.1, 7). Every scorer must
    score the universe ``shape``.
    """
    out = sp.csr_matrix(shape, dtype=np.float32)
    if n <= 0 or len(users) == 0:
        return out
    observed = pad_to(observed, shape)
    for scorer in scorers:
        user_top, _ = top_lists(scorer, shape[0], shape[1], observed, n=n, users=users, device=device, item_side=False)
        out = out + top_matrix(user_top, shape[1])
    out.data[:] = 1.0
    return out


def generate_student(
    user_top: np.ndarray, item_top: np.ndarray, block: Block, cfg: RunConfig, seed: int, device, avoid=None, progress=False
) -> StageResult:
    """Stage 1: distil a fresh student from the ensemble's lists: BPR + RRD + IR-RRD (method.md 7)."""
    seed_everything(seed)
    s = cfg.student
    student = build_model(s.model.kind, block.n_users, block.n_items, **s.model.kwargs()).to(device)
    res = distill_student(
        student,
        block,
        user_top,
        item_top,
        s.distill,
        seed=seed,
        progress=progress,
        exclude=avoid,
        user_samples=min(s.user_samples, block.n_items),
        item_samples=min(s.item_samples, block.n_users),
        weight=s.rrd_weight,
        label=f"distil D_{block.index}",
    )
    return StageResult(student, res)


def past_train(block: Block, prev: Block | None) -> sp.csr_matrix:
    """Each user's train items of blocks k-1 and k (replay candidates exclude them, 5.1)."""
    r = block.train_matrix
    return r if prev is None else (r + pad_to(prev.train_matrix, r.shape)).tocsr()


class Replayer:
    """fit() hooks for proxy-guided replay: re-sample before every epoch, a BCE pass after its BPR pass.

    The replay set is drawn against the *current* model's ranking and re-drawn as the model moves
    (method.md 5.1, 9).
    """

    def __init__(
        self,
        sources: list[tuple[Scorer | Candidates, int]],
        users: np.ndarray,
        exclude: sp.csr_matrix,
        rc: ReplayConfig,
        seed: int,
        n_items: int,
        context: sp.csr_matrix | None = None,
    ):
        self.sources = [(s, n) for s, n in sources if n > 0]
        self.users, self.exclude, self.rc = users, exclude, rc
        self.n_items, self.context = n_items, context
        self.rng = np.random.default_rng(seed)
        self.replay = ReplaySet.empty()
        self.sizes: list[int] = []
        self.candidates: list[tuple[Candidates, int]] | None = None  # the fixed sources' candidates, once

    @property
    def active(self) -> bool:
        return bool(self.sources) and len(self.users) > 0

    def candidates_of(self, scorer: Scorer, device) -> Candidates:
        """A source's top-A candidates for this replayer's users and exclusions."""
        return replay_candidates(scorer, self.users, self.n_items, self.exclude, self.rc.top_a, device=device)

    def sample(self, model: Recommender) -> ReplaySet:
        if not self.active:
            return ReplaySet.empty()
        if self.candidates is None:
            self.candidates = [
                (s if isinstance(s, Candidates) else self.candidates_of(s, model.device), n) for s, n in self.sources
            ]
        self.replay = sample_replay(
            model.scorer(context=self.context),
            self.n_items,
            self.candidates,
            self.users,
            self.exclude,
            self.rc.top_a,
            self.rc.eps,
            self.rng,
            device=model.device,
            labels=self.rc.labels,
        )
        self.sizes.append(len(self.replay))
        return self.replay

    def before_epoch(self, model, opt, epoch: int) -> None:
        if epoch % self.rc.resample_every == 0:
            self.sample(model)

    def after_epoch_pass(self, model, opt, epoch: int) -> None:
        weight = replay_weight(epoch, self.rc.scale, self.rc.decay)
        replay_pass(model, opt, self.replay, weight, self.rc.batch_size, self.rng)


def old_active_users(block: Block) -> np.ndarray:
    """The old users (ID < U_{k-1}); replay runs for each of them (5.1)."""
    return np.arange(block.prev_users, dtype=np.int64)


def update_student(
    prev_student: EmbeddingModel,
    sp_proxy: Proxy,
    pp_proxy: Proxy,
    avoid: sp.csr_matrix | None,
    block: Block,
    prev: Block,
    cfg: RunConfig,
    seed: int,
    progress=False,
) -> tuple[StageResult, Replayer]:
    """Stage 2 (method.md 5.1): CL_k from D_{k-1}, grown with entity initialisation, BPR + replay.

    ``avoid``: pairs BPR negatives must avoid (the top-N of E_{k-1}, D_{k-1}, SP and PP for old users).
    """
    seed_everything(seed)
    s = cfg.student
    k = block.index
    model = prev_student.clone()
    model.grow(block.n_users, block.n_items, block.train_matrix, s.init)
    rc = cfg.student_replay(k)
    n_i = block.n_items
    old_users = old_active_users(block)
    observed = past_train(block, prev)
    replayer = Replayer(
        [(sp_proxy.scorer(n_items=n_i), rc.n_stability), (pp_proxy.scorer(n_items=n_i), rc.n_plasticity)],
        old_users,
        observed,
        rc,
        seed + 1,
        n_i,
    )
    res = fit(
        model,
        block,
        s.update,
        seed=seed,
        progress=progress,
        label=f"update CL_{k}",
        exclude=avoid,
        before_epoch=replayer.before_epoch if replayer.active else None,
        after_epoch_pass=replayer.after_epoch_pass if replayer.active else None,
    )
    return StageResult(model, res), replayer


def update_proxies(sp_proxy: Proxy, pp_proxy: Proxy, student: EmbeddingModel, w_s: float, w_p: float) -> tuple[Proxy, Proxy]:
    """SP_{k-1} = w_S·SP_{k-2} + (1-w_S)·D_{k-1}, PP likewise with w_P; new rows copy D_{k-1} (5.1)."""
    return ema_update(sp_proxy, student, w_s), ema_update(pp_proxy, student, w_p)


TEACHER_SOURCES = ("stability", "plasticity", "student")


def teacher_replay_sources(
    sp_proxy: Proxy | None,
    pp_proxy: Proxy | None,
    served: Recommender | None,
    rc: ReplayConfig,
    n_items: int,
    candidates: dict[str, Candidates] | None = None,
) -> dict[str, tuple[Scorer | Candidates, int]]:
    """The replay sources of a teacher update with a budget (5.3): SP, PP and CL_k by name, each as its
    precomputed ``candidates`` when given, else as a scorer of the block's universe."""
    given = candidates or {}
    scorers = {
        "stability": (lambda: sp_proxy.scorer(n_items=n_items), sp_proxy, rc.n_stability),
        "plasticity": (lambda: pp_proxy.scorer(n_items=n_items), pp_proxy, rc.n_plasticity),
        "student": (lambda: served.scorer(), served, rc.n_student),
    }
    return {
        name: (given[name] if name in given else make(), n)
        for name, (make, source, n) in scorers.items()
        if source is not None and n > 0
    }


def teacher_candidates(
    sp_proxy: Proxy | None, pp_proxy: Proxy | None, served: Recommender | None, block: Block, prev: Block, cfg: RunConfig, device
) -> dict[str, Candidates]:
    """Block k's replay candidates of SP, PP and CL_k for the teacher update (5.3). They are the same for
    every member, so they are computed once per block instead of once per member."""
    rc = cfg.teacher_replay(block.index)
    users, observed = old_active_users(block), past_train(block, prev)
    sources = teacher_replay_sources(sp_proxy, pp_proxy, served, rc, block.n_items)
    return {
        name: replay_candidates(scorer, users, block.n_items, observed, rc.top_a, device=device)
        for name, (scorer, _) in sources.items()
    }


def update_teacher(
    member: Recommender,
    sp_proxy: Proxy | None,
    pp_proxy: Proxy | None,
    served: Recommender | None,
    block: Block,
    prev: Block,
    cfg: RunConfig,
    seed: int,
    progress=False,
    label: str = "",
    candidates: dict[str, Candidates] | None = None,
) -> StageResult:
    """Stage 3 (method.md 5.3): grow member m, then BPR + λ_LWC·LWC-KD + replay from SP, PP and CL_k.

    Replay ranks against the teacher's own current ranking. Mult-VAE members take the replayed pairs
    into their input/target rows (value 0.1) and a KL term towards their previous outputs instead.
    Pass ``None`` proxies / student for a teacher update without student-side knowledge;
    ``candidates``: the sources' :func:`teacher_candidates` of this block, if already computed.
    """
    seed_everything(seed)
    t = cfg.teacher
    k = block.index
    n_u, n_i = block.n_users, block.n_items
    rc = cfg.teacher_replay(k)
    observed = past_train(block, prev)
    sources = list(teacher_replay_sources(sp_proxy, pp_proxy, served, rc, n_i, candidates).values())
    model = member.clone()
    if isinstance(model, MultVAE):
        model.grow(n_u, n_i, block.train_matrix, cfg.student.init)
        replayer = Replayer(sources, old_active_users(block), observed, rc, seed + 1, n_i, context=block.train_matrix)
        replay = replayer.sample(model)
        vae_input = impute_replay(block.train_matrix, replay, t.vae_replay_value) if len(replay) else block.train_matrix
        persisting = np.intersect1d(np.unique(block.train[:, 0]), np.unique(prev.train[:, 0]))
        member.eval()
        kl = PreviousOutputKL(member, persisting, prev.n_items, vae_input, t.vae_kl_weight) if t.vae_kl_weight > 0 else None
        res = fit(model, block, t.update_vae, seed=seed, progress=progress, label=label, vae_input=vae_input, extra_loss=kl)
        return StageResult(model, res)
    old = OldEmbeddings.from_model(member, pad_to(prev.train_matrix, (member.n_users, member.n_items)))
    model.grow(n_u, n_i, block.train_matrix, cfg.student.init)
    lwc = None
    if t.lwc_weight > 0:
        lwc = LWCKD(
            old,
            pad_to(prev.train_matrix, (old.n_users, old.n_items)),
            tau=t.tau,
            weight=t.lwc_weight,
            knn=t.knn,
            candidates=t.lwc_candidates,
            seed=seed,
            max_entities=t.lwc_entities,
        )
    replayer = Replayer(sources, old_active_users(block), observed, rc, seed + 1, n_i)
    res = fit(
        model,
        block,
        t.update,
        seed=seed,
        progress=progress,
        label=label,
        extra_loss=lwc,
        before_epoch=replayer.before_epoch if replayer.active else None,
        after_epoch_pass=replayer.after_epoch_pass if replayer.active else None,
    )
    return StageResult(model, res)
