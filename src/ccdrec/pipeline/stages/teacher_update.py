"""Stage 3, teacher update (method.md 5.3, 5.4): every member is grown to block k's universe and
trained on Tr_k by its own loss plus λ_LWC·LWC-KD towards its previous version, with the student
side's knowledge (SP, PP and the student cycle's CL_k) replayed into it. Mult-VAE members take the
replayed pairs into their input/target rows and a KL term towards their previous outputs instead.

The replay candidates of SP, PP and CL_k are the same for every member, so stage
``bK/replay_candidates`` computes them once per block and the member stages read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import RunConfig
from ccdrec.continual.lwckd import LWCKD, OldEmbeddings
from ccdrec.continual.proxy import Proxy
from ccdrec.continual.replay import Candidates, PreviousOutputKL, impute_replay, replay_candidates
from ccdrec.continual.replayer import Replayer, old_active_users, past_train
from ccdrec.data.stream import Block, pad_to
from ccdrec.models.base import EmbeddingModel, Recommender, Scorer
from ccdrec.models.vae import MultVAE
from ccdrec.pipeline.context import RunContext, RunState, StageOutput, Trained, fit_row, seed_everything
from ccdrec.pipeline.stages.avoid import avoid_lists
from ccdrec.pipeline.stages.student_update import teacher_top
from ccdrec.train.loop import fit

TEACHER_SOURCES = ("stability", "plasticity", "student")


def lwckd_towards(
    old_model: EmbeddingModel, prev: Block, cfg: RunConfig, weight: float, seed: int, piw: bool = False, knn_graphs=None
) -> LWCKD:
    """LWC-KD (method.md 5.4) with weight ``weight`` towards ``old_model`` (the model of block k-1) over
    R_{k-1}; ``piw``: with personalised imitation weights; ``knn_graphs``: R_{k-1}'s UU / II graphs to reuse."""
    r_prev = pad_to(prev.train_matrix, (old_model.n_users, old_model.n_items))
    t = cfg.teacher
    return LWCKD(
        OldEmbeddings.from_model(old_model, r_prev),
        r_prev,
        tau=t.tau,
        weight=weight,
        knn=t.knn,
        piw=piw,
        piw_hidden=cfg.competitors.piw_hidden,
        piw_lr=cfg.competitors.piw_lr,
        knn_graphs=knn_graphs,
        candidates=t.lwc_candidates,
        seed=seed,
        max_entities=t.lwc_entities,
    )


def vae_kl_towards(old_model: MultVAE, block: Block, prev: Block, inputs, weight: float) -> PreviousOutputKL | None:
    """The Mult-VAE member's regulariser of a teacher update (method.md 5.3): ``weight``·KL(output of
    ``old_model``, the member of block k-1 ‖ current output) on the old items (``prev``'s universe) for the
    users who train in both ``block`` and ``prev``, the rows computed from ``inputs`` (the VAE input given to
    ``fit``, ``block.train_matrix`` or its imputed rows). None when ``weight`` is 0.

    CCD's teacher update and the competitors' Mult-VAE members (``competitors.vae_kl``) both use it, so a
    gain of CCD's teacher comes from the student side's knowledge, not from this regulariser.
    ``old_model`` is put in eval mode (its outputs are deterministic targets).
    """
    persisting = np.intersect1d(np.unique(block.train[:, 0]), np.unique(prev.train[:, 0]))
    old_model.eval()
    return PreviousOutputKL(old_model, persisting, prev.n_items, inputs, weight) if weight > 0 else None


def teacher_replay_sources(
    sp_proxy: Proxy | None,
    pp_proxy: Proxy | None,
    served: Recommender | None,
    rc,
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
    """Block k's replay candidates of SP, PP and CL_k for the teacher update (5.3), by source name."""
    rc = cfg.teacher_replay(block.index)
    users, observed = old_active_users(block), past_train(block, prev)
    sources = teacher_replay_sources(sp_proxy, pp_proxy, served, rc, block.n_items)
    return {
        name: replay_candidates(scorer, users, block.n_items, observed, rc.top_a, device=device)
        for name, (scorer, _) in sources.items()
    }


def _update_vae_member(
    member: MultVAE,
    sources,
    block: Block,
    prev: Block,
    cfg: RunConfig,
    seed: int,
    progress: bool,
    label: str,
    past: Sequence[Block] = (),
) -> Trained:
    """A Mult-VAE member: replayed pairs imputed into its input/target rows (value ``vae_replay_value``)
    and ``vae_kl_weight``·KL(previous output ‖ current) on the users of both blocks (5.3)."""
    t = cfg.teacher
    model = member.clone()
    model.grow(block.n_users, block.n_items, block.train_matrix, cfg.student.init)
    rc = cfg.teacher_replay(block.index)
    users, observed = old_active_users(block), past_train(block, prev)
    replayer = Replayer(sources, users, observed, rc, seed + 1, block.n_items, context=block.train_matrix)
    replay = replayer.sample(model)
    vae_input = impute_replay(block.train_matrix, replay, t.vae_replay_value) if len(replay) else block.train_matrix
    kl = vae_kl_towards(member, block, prev, vae_input, t.vae_kl_weight)
    callbacks = [kl] if kl is not None else []
    res = fit(
        model, block, t.update_vae, seed=seed, progress=progress, label=label, callbacks=callbacks, inputs=vae_input, past=past
    )
    return Trained(model, res)


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
    avoid: sp.csr_matrix | None = None,
    past: Sequence[Block] = (),
) -> Trained:
    """One member's update (5.3): grow it, then BPR + λ_LWC·LWC-KD + replay from SP, PP and CL_k.

    Replay ranks against the teacher's own current ranking. Pass ``None`` proxies / student for a teacher
    update without student-side knowledge; ``candidates``: the sources' :func:`teacher_candidates` of
    this block, if already computed; ``avoid``: (user, item) pairs a BPR member's negatives avoid
    (:func:`teacher_avoid`; a Mult-VAE member samples no negatives); ``past``: the blocks before ``block``,
    for ``select_on = stream`` (:func:`earlier_blocks`).
    """
    seed_everything(seed)
    t = cfg.teacher
    rc = cfg.teacher_replay(block.index)
    sources = list(teacher_replay_sources(sp_proxy, pp_proxy, served, rc, block.n_items, candidates).values())
    if isinstance(member, MultVAE):
        return _update_vae_member(member, sources, block, prev, cfg, seed, progress, label, past)
    lwc = lwckd_towards(member, prev, cfg, t.lwc_weight, seed) if t.lwc_weight > 0 else None
    model = member.clone()
    model.grow(block.n_users, block.n_items, block.train_matrix, cfg.student.init)
    replayer = Replayer(sources, old_active_users(block), past_train(block, prev), rc, seed + 1, block.n_items)
    res = fit(
        model,
        block,
        t.update,
        seed=seed,
        progress=progress,
        label=label,
        callbacks=([lwc] if lwc else []) + ([replayer] if replayer.active else []),
        avoid=avoid,
        past=past,
    )
    return Trained(model, res)


def teacher_avoid(ctx: RunContext, state: RunState, k: int) -> sp.csr_matrix | None:
    """The pairs a teacher update's BPR negatives avoid at teacher cycle k (``teacher.avoid_top`` = N > 0,
    as in the authors' code): old users' top-N items of the ensemble as last distilled (its saved top
    lists, cut to N), of SP, PP and CL_k (when the teacher takes student-side knowledge); None when off."""
    n = ctx.cfg.teacher.avoid_top
    if n <= 0:
        return None
    block, prev = teacher_blocks(ctx, k)
    shape = (block.n_users, block.n_items)
    scorers = []
    if ctx.cfg.teacher.student_knowledge:
        scorers = [p.scorer(n_items=block.n_items) for p in state.proxies] + [state.updated.scorer()]
    top = teacher_top(ctx, state, ctx.cfg.teacher.span_start(k) - 1)
    lists = [top[:, :n]] if top is not None else []
    return avoid_lists(ctx, scorers, block, shape, lists, n=n, prev=prev)


def teacher_blocks(ctx: RunContext, k: int) -> tuple[Block, Block]:
    """What the teacher update of teacher cycle k trains on and what it had trained on before: the
    blocks since its last update as one block (:meth:`ccdrec.data.stream.Stream.span`) and the span of
    its previous update (block 0 for the first). With ``teacher.update_every`` = 1: blocks k and k-1."""
    t = ctx.cfg.teacher
    first = t.span_start(k)
    prev_last = first - 1
    prev_first = max(prev_last - t.update_every + 1, 0) if prev_last > 0 else 0
    return ctx.stream.span(first, k), ctx.stream.span(prev_first, prev_last)


def earlier_blocks(ctx: RunContext, k: int) -> list[Block]:
    """The blocks before the span a teacher update of teacher cycle k trains on (:func:`teacher_blocks`)."""
    return ctx.stream.blocks[: ctx.cfg.teacher.span_start(k)]


def span_meta(ctx: RunContext, k: int) -> dict:
    """Checkpoint metadata of a member trained on a span of several blocks (its graph's first block)."""
    first = ctx.cfg.teacher.span_start(k)
    return {"first": first} if first != k else {}


def replay_candidates_stage(ctx: RunContext, state: RunState, k: int) -> StageOutput:
    """Stage ``bK/replay_candidates``: the candidates of SP, PP and CL_k, shared by every member (5.3)."""
    block, prev = teacher_blocks(ctx, k)
    found = teacher_candidates(*state.proxies, state.updated, block, prev, ctx.cfg, ctx.device)
    tensors = {"users": torch.from_numpy(old_active_users(block))}
    for name, c in found.items():
        tensors[f"{name}_items"], tensors[f"{name}_scores"] = c.items, c.scores
    return StageOutput({"replay_candidates": ctx.rd.save_tensors(f"b{k}_replay_candidates", tensors)})


def load_candidates(ctx: RunContext, state: RunState, k: int) -> dict[str, Candidates] | None:
    """Block k's saved teacher-side replay candidates (None when this run has not computed them)."""
    name = state.pointer("replay_candidates", f"b{k}_replay_candidates")
    if name is None:
        return None
    t = ctx.rd.load_tensors(name)
    users = t["users"].numpy()
    return {
        source: Candidates(users, t[f"{source}_items"].to(ctx.device), t[f"{source}_scores"].to(ctx.device))
        for source in TEACHER_SOURCES
        if f"{source}_items" in t
    }


def teacher_update(ctx: RunContext, state: RunState, k: int, m: int) -> StageOutput:
    """Stage ``bK/teacher{m}``: member m on the blocks since its last update (:func:`teacher_blocks`),
    with the student side's knowledge when enabled."""
    know = ctx.cfg.teacher.student_knowledge
    sp_, pp_ = state.proxies if know else (None, None)
    block, prev = teacher_blocks(ctx, k)
    res = update_teacher(
        state.members[m],
        sp_,
        pp_,
        state.updated if know else None,
        block,
        prev,
        ctx.cfg,
        ctx.seed(f"b{k}/teacher{m}", base=ctx.cfg.teacher.members[m].seed),
        ctx.progress,
        label=f"D_{k} teacher {m} update",
        candidates=load_candidates(ctx, state, k) if know else None,
        avoid=teacher_avoid(ctx, state, k) if not isinstance(state.members[m], MultVAE) else None,
        past=earlier_blocks(ctx, k),
    )
    state.members[m] = res.model
    ptr = ctx.save(f"b{k}_teacher{m}", res.model, k, **span_meta(ctx, k))
    return StageOutput({f"teacher{m}": ptr}, [fit_row(ctx.name(f"teacher{m}"), res.fit, k)])
