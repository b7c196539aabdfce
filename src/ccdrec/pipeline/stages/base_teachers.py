"""Block 0: every teacher member trained on Tr_0 with its own loss (method.md 4): BPR for MF and
LightGCN members, the Mult-VAE loss for Mult-VAE members, each with its own seed and schedule."""

from __future__ import annotations

from ccdrec.config import MemberConfig, RunConfig
from ccdrec.data.stream import Block
from ccdrec.models.registry import build_model
from ccdrec.pipeline.context import RunContext, RunState, StageOutput, Trained, fit_row, seed_everything, stage_seed
from ccdrec.train.loop import fit


def train_member(member: MemberConfig, block: Block, cfg: RunConfig, seed: int, device, progress=False, label="") -> Trained:
    """One teacher member, freshly built and trained on ``block``'s train split with early stopping."""
    seed_everything(seed)
    model = build_model(member.kind, block.n_users, block.n_items, **member.kwargs()).to(device)
    schedule = cfg.teacher.base_vae if member.kind == "vae" else cfg.teacher.base
    res = fit(model, block, schedule, seed=seed, progress=progress, label=label)
    return Trained(model, res)


def base_member(m: int, block: Block, cfg: RunConfig, device, progress=False) -> Trained:
    """Block 0 member ``m`` as every run trains it (seeded from the member's seed and ``b0/teacher{m}``)."""
    member = cfg.teacher.members[m]
    seed = stage_seed(member.seed, f"b0/teacher{m}")
    return train_member(member, block, cfg, seed, device, progress, label=f"D_0 teacher {m} ({member.kind}-{member.dim})")


def base_teacher(ctx: RunContext, state: RunState, m: int) -> StageOutput:
    """Stage ``b0/teacher{m}``: member ``m`` on D_0 (the same for CCD and every competitor)."""
    res = base_member(m, ctx.stream[0], ctx.cfg, ctx.device, ctx.progress)
    state.members[m] = res.model
    ptr = ctx.save(f"b0_teacher{m}", res.model, 0)
    return StageOutput({f"teacher{m}": ptr}, [fit_row(ctx.name(f"teacher{m}"), res.fit, 0)])
