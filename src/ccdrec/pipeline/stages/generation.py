"""Stage 1, student generation (method.md 7): the rank ensemble E_k's interesting lists, then a fresh
student D_k distilled from them with BPR + RRD + IR-RRD; its old users' negatives avoid the top items of
SP_{k-1}, PP_{k-1} and CL_k. At block 0, D_0 also starts both proxies (SP_0 = PP_0 = D_0, 5.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import RunConfig
from ccdrec.continual.proxy import Proxy
from ccdrec.data.stream import Block
from ccdrec.distill.agreement import DEFAULT_USERS, old_users_sample
from ccdrec.distill.ensemble import RankEnsemble, top_lists
from ccdrec.distill.rrd import distill_student
from ccdrec.models.base import Recommender
from ccdrec.models.registry import build_model
from ccdrec.pipeline.context import RunContext, RunState, StageOutput, Trained, fit_row, seed_everything
from ccdrec.pipeline.stages.avoid import avoid_lists


def teacher_lists(ensemble: RankEnsemble, block: Block, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's top-n items per user (U_k x n) and top-n users per item (I_k x n), observed pairs
    excluded (7)."""
    r = block.train_matrix
    return top_lists(ensemble.scorer(context=r), ensemble.n_users, ensemble.n_items, r, n=n, device=ensemble.device)


def generate_student(
    user_top: np.ndarray,
    item_top: np.ndarray,
    block: Block,
    cfg: RunConfig,
    seed: int,
    device,
    avoid: sp.csr_matrix | None = None,
    progress=False,
    start: Recommender | None = None,
    past: Sequence[Block] = (),
) -> Trained:
    """A student distilled from the ensemble's lists: BPR + RRD + IR-RRD (method.md 7).

    ``avoid``: (user, item) pairs the BPR negatives must avoid. With ``student.distill_select = retention``
    model selection also weighs the agreement with the lists on up to 2,000 old users. ``start``: a student of block's universe
    whose copy is trained (``student.distill_from = update``: CL_k); None: fresh random weights (the paper).
    ``past``: the blocks before ``block``, for ``student.distill.select_on = stream``.
    Raises ValueError if ``start`` is not of the block's universe."""
    seed_everything(seed)
    s = cfg.student
    retention = None
    if s.distill_select == "retention" and block.prev_users > 0:
        listed = (np.asarray(user_top) >= 0).any(axis=1)
        retention = old_users_sample(block.prev_users, listed, DEFAULT_USERS, seed)
    if start is None:
        student = build_model(s.model.kind, block.n_users, block.n_items, **s.model.kwargs()).to(device)
    elif (start.n_users, start.n_items) != (block.n_users, block.n_items):
        raise ValueError(f"a distillation start of {start.n_users} x {start.n_items} for block {block.index}'s universe")
    else:
        student = start.clone().to(device).train()
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
        retention_users=retention,
        cover=s.distill_cover,
        past=past,
    )
    return Trained(student, res)


def distil_avoid(ctx: RunContext, state: RunState, k: int) -> sp.csr_matrix | None:
    """Block k's avoid lists for the distillation's negatives: the top items of SP_{k-1}, PP_{k-1}
    (``state.proxies``) and CL_k (``state.updated``)."""
    block = ctx.stream[k]
    scorers = [p.scorer(n_items=block.n_items) for p in state.proxies] + [state.updated.scorer()]
    return avoid_lists(ctx, scorers, block, (block.n_users, block.n_items))


def distil(ctx: RunContext, state: RunState, k: int) -> StageOutput:
    """Stage ``bK/student``: D_k from E_k, from scratch or from CL_k (``student.distill_from``); with
    ``student.redistill`` off, k >= 1: D_k = CL_k. With ``student.serve = distilled``, D_k (k >= 1) is
    served from then on."""
    block = ctx.stream[k]
    out = StageOutput()
    if k > 0 and not ctx.cfg.student.redistill:
        state.student = state.updated  # ablation: keep updating the same student, never re-distil
    else:
        user_top, item_top = teacher_lists(state.ensemble(ctx.cfg), block, ctx.cfg.student.topn)
        # E_k's top lists also serve block k+1's student update (its negatives avoid them)
        out.pointers["teacher_top"] = ctx.rd.save_tensors(f"b{k}_teacher_top", {"user_top": torch.from_numpy(user_top)})
        avoid = distil_avoid(ctx, state, k) if k > 0 else None
        start = state.updated if k > 0 and ctx.cfg.student.distill_from == "update" else None
        seed = ctx.seed(f"b{k}/student")
        res = generate_student(
            user_top, item_top, block, ctx.cfg, seed, ctx.device, avoid, ctx.progress, start, past=ctx.stream.blocks[:k]
        )
        state.student = res.model
        out.rows.append(fit_row(ctx.name("student"), res.fit, k))
    out.pointers["student"] = ctx.save(f"b{k}_student", state.student, k)
    if k > 0 and ctx.cfg.student.serve == "distilled":
        state.served = state.student
        out.pointers["served"] = out.pointers["student"]
    if k == 0:
        state.proxies = (Proxy.from_model(state.student), Proxy.from_model(state.student))
        out.pointers["proxies"] = ctx.save_proxies("b0_proxies", state.proxies)
    return out


def distil_base(ctx: RunContext, state: RunState) -> StageOutput:
    """Stage ``b0/student`` of a competitor: D_0 distilled from E_0 exactly as CCD does (same seed and
    schedule), without the lists and proxies that only CCD's later stages read."""
    block = ctx.stream[0]
    user_top, item_top = teacher_lists(state.ensemble(ctx.cfg), block, ctx.cfg.student.topn)
    res = generate_student(user_top, item_top, block, ctx.cfg, ctx.seed("b0/student"), ctx.device, None, ctx.progress)
    state.student = res.model
    return StageOutput({"student": ctx.save("b0_student", res.model, 0)}, [fit_row(ctx.name("student"), res.fit, 0)])
