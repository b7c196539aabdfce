"""Stage 2, student update (method.md 5.1, 5.2): the proxies take their step from D_{k-1}; then CL_k
is D_{k-1} grown to block k's universe with entity initialisation and trained on Tr_k by BPR, with the
old users' negatives avoiding the top items of E_{k-1}, D_{k-1}, SP and PP, and proxy-guided replay
from SP and PP."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ccdrec.config import RunConfig
from ccdrec.continual.proxy import Proxy, ema_update
from ccdrec.continual.replayer import Replayer, old_active_users, past_train
from ccdrec.data.stream import Block
from ccdrec.models.base import EmbeddingModel
from ccdrec.pipeline.context import RunContext, RunState, StageOutput, Trained, fit_row, grown, seed_everything
from ccdrec.pipeline.stages.avoid import avoid_lists
from ccdrec.train.loop import fit


def update_proxies(sp_proxy: Proxy, pp_proxy: Proxy, student: EmbeddingModel, w_s: float, w_p: float) -> tuple[Proxy, Proxy]:
    """SP_{k-1} = w_S·SP_{k-2} + (1-w_S)·D_{k-1}, PP likewise with w_P; new rows copy D_{k-1} (5.1)."""
    return ema_update(sp_proxy, student, w_s), ema_update(pp_proxy, student, w_p)


def teacher_top(ctx: RunContext, state: RunState, k: int) -> np.ndarray | None:
    """E_k's top lists of users (U_k x topn item IDs), saved by the distillation of block k (None if not)."""
    name = state.pointer("teacher_top", f"b{k}_teacher_top")
    return None if name is None else ctx.rd.load_tensors(name)["user_top"].numpy()


def student_avoid(ctx: RunContext, state: RunState, k: int, top: np.ndarray | None) -> sp.csr_matrix | None:
    """Block k's avoid lists for the student update's negatives (5.1): the top items of D_{k-1}
    (``state.student``), SP_{k-1}, PP_{k-1} and E_{k-1}: its top lists ``top`` as saved by the distillation
    of the last teacher cycle (E has not changed since; users and items that came later have none) when
    they are long enough, else the ensemble of ``state.members``."""
    block, prev = ctx.stream[k], ctx.stream[k - 1]
    scorers = [state.student.scorer()] + [p.scorer(n_items=prev.n_items) for p in state.proxies]
    lists = []
    if top is not None and top.shape[1] >= ctx.cfg.student.avoid_top:
        lists.append(top)  # E_{k-1}'s top items, as distilled into D_{k-1}
    else:
        scorers.insert(0, state.ensemble(ctx.cfg, prev).scorer(context=prev.train_matrix))
    return avoid_lists(ctx, scorers, block, (prev.n_users, prev.n_items), lists)


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
    past: Sequence[Block] = (),
) -> tuple[Trained, Replayer]:
    """CL_k from D_{k-1}: grown with entity initialisation, then BPR + replay from SP and PP (5.1).

    ``avoid``: pairs BPR negatives must avoid (the top-N of E_{k-1}, D_{k-1}, SP and PP for old users);
    ``past``: the blocks before block k, for ``student.update.select_on = stream``.
    """
    seed_everything(seed)
    s = cfg.student
    k = block.index
    model = prev_student.clone()
    model.grow(block.n_users, block.n_items, block.train_matrix, s.init)
    rc = cfg.student_replay(k)
    n_i = block.n_items
    replayer = Replayer(
        [(sp_proxy.scorer(n_items=n_i), rc.n_stability), (pp_proxy.scorer(n_items=n_i), rc.n_plasticity)],
        old_active_users(block),
        past_train(block, prev),
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
        callbacks=[replayer] if replayer.active else [],
        avoid=avoid,
        past=past,
    )
    return Trained(model, res), replayer


def student_update(ctx: RunContext, state: RunState, k: int) -> StageOutput:
    """Stage ``bK/student_update``: the proxies' EMA step (k >= 2), the avoid lists, then CL_k.

    ``state.student`` is the student this cycle starts from: D_{k-1} after a teacher cycle, else
    CL_{k-1} (a cycle that is not a teacher cycle hands on CL_k, ``teacher.update_every``)."""
    out = StageOutput()
    if not ctx.cfg.student.continual:
        return carry_student(ctx, state, k)
    if k >= 2:
        w_s, w_p = ctx.cfg.proxy_weights(k)
        state.proxies = update_proxies(*state.proxies, state.student, w_s, w_p)
        out.pointers["proxies"] = ctx.save_proxies(f"b{k}_proxies", state.proxies)
    # E as last distilled: between teacher cycles the ensemble is unchanged, and its saved lists spare a ranking
    avoid = student_avoid(ctx, state, k, teacher_top(ctx, state, ctx.cfg.teacher.last_cycle(k - 1)))
    block, prev = ctx.stream[k], ctx.stream[k - 1]
    res, replayer = update_student(
        state.student,
        *state.proxies,
        avoid,
        block,
        prev,
        ctx.cfg,
        ctx.seed(f"b{k}/student_update"),
        ctx.progress,
        past=ctx.stream.blocks[:k],
    )
    state.updated = state.served = res.model  # served until a teacher cycle distils D_k (student.serve)
    ptr = ctx.save(f"b{k}_updated", state.updated, k)
    out.pointers |= {"updated": ptr, "served": ptr}
    if not ctx.cfg.teacher.is_teacher_cycle(k):
        # a student cycle between teacher cycles: the next cycle (and the proxies' step) starts from CL_k
        state.student = state.updated
        out.pointers["student"] = ptr
    replayed = int(np.mean(replayer.sizes)) if replayer.sizes else 0
    out.rows.append(fit_row(ctx.name("updated"), res.fit, k, replay_pairs=replayed))
    return out


def carry_student(ctx: RunContext, state: RunState, k: int) -> StageOutput:
    """Stage ``bK/student_update`` with ``student.continual`` off (the kd-only / kd-once baselines): no
    stage 2; CL_k is the last distilled student grown untrained to block k's universe (entity
    initialisation, 5.2), so that it can rank block k's new users and items. The proxies do not step."""
    state.student = state.updated = state.served = grown(state.student, ctx.stream[k], ctx.cfg)
    # the next cycle carries it on (a teacher cycle may distil a new one)
    ptr = ctx.save(f"b{k}_updated", state.served, k)
    return StageOutput({"updated": ptr, "served": ptr, "student": ptr}, [fit_row(ctx.name("updated"), None, k)])
