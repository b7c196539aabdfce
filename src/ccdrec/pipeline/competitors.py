"""The continual-learning (CL) competitors of CCD on the same harness (method.md 8).

A competitor updates the student-size model (``cfg.student.model``) and every teacher member
(``cfg.teacher.members``) block by block with one CL method alone: no teacher-student exchange, no
proxies, no replay. The teacher members are ensembled with the same rank ensemble as CCD (method.md 6).

Block 0's members are CCD's: trained by :mod:`ccdrec.pipeline.stages.base_teachers` with CCD's seeds.
The student-size model (``competitors.start``) **starts from D_0, the student CCD distils from E_0**
(``"distilled"``, the default: same seed, same schedule), so every method starts from identical models;
or (``"plain"``) from the student-size model trained by BPR alone on Tr_0 with ``teacher.base``, as full
retraining trains it (:func:`plain_base`, seed of stage ``b0/student``), so that no competitor starts
from CCD's distillation. A comparison (:mod:`ccdrec.pipeline.compare`) trains block 0 once and shares it
(:func:`ccdrec.pipeline.staged.share_block0`; a plain start shares only the members and trains its own
student).

For k >= 1, each model is updated by the method (:func:`cl_update`, :func:`cl_retrain`):

* ``finetune``   previous weights, grown with ``cfg.student.init`` (entity initialisation, method.md
  5.2), then the model's own loss on Tr_k (BPR; Mult-VAE: its VAE loss) with the stage schedules
  ``student.update`` / ``teacher.update`` / ``teacher.update_vae``. Mult-VAE members also carry CCD's
  teacher-update regulariser ``teacher.vae_kl_weight``·KL(previous output ‖ current) on the persisting
  users (method.md 5.3, :func:`~ccdrec.pipeline.stages.teacher_update.vae_kl_towards`, the same
  function CCD uses) unless ``competitors.vae_kl`` is false, so that CCD's teacher gain measures the
  student side's knowledge, not this regulariser;
* ``lwckd``      the same plus λ·LWC-KD towards the frozen model of block k-1 (method.md 5.4;
  λ = ``competitors.lwc_weight``, default ``teacher.lwc_weight``; τ, kNN, sampled candidates and
  entity cap from ``cfg.teacher``). LWC-KD is defined on embeddings: **Mult-VAE members are
  fine-tuned** (with the KL above) under ``lwckd`` and ``lwckd-piw``;
* ``lwckd-piw``  LWC-KD with personalised imitation weights (``LWCKD(piw=True)``);
* ``retrain``    a fresh model of the same architecture trained on the union of the train pairs of
  blocks 0..k (:meth:`ccdrec.data.stream.Stream.union_block`) with the block-0 schedules ``teacher.base`` / ``teacher.base_vae``
  (the student-size model too: plain BPR, no distillation). Model selection on block k's validation
  split. A costly reference, not a competitor.

Evaluation is CCD's: after block k, the ensemble and the student-size model on the test split of
every block j <= k and on block k's new users, as rows ``model = "<method>:teacher"`` /
``"<method>:student"`` in ``metrics.jsonl``. Stages (``b0/teacher0``, ``b0/student``, ``b0/eval``,
``bK/student``, ``bK/teacherM``, ``bK/eval``) complete and resume like CCD's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ccdrec.config import ModelConfig, RunConfig, TrainConfig
from ccdrec.continual.lwckd import LWCKD
from ccdrec.continual.replay import PreviousOutputKL
from ccdrec.data.stream import Block, Stream
from ccdrec.errors import CcdrecError
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.registry import build_model
from ccdrec.pipeline.ccd import prepare_run
from ccdrec.pipeline.context import RunContext, RunState, StageOutput, fit_row, seed_everything
from ccdrec.pipeline.rundir import UNION_GRAPH, RunDir
from ccdrec.pipeline.staged import TeacherStudentRun, share_block0
from ccdrec.pipeline.stages import base_teachers, evaluation, generation
from ccdrec.pipeline.stages.teacher_update import earlier_blocks, lwckd_towards, span_meta, teacher_blocks, vae_kl_towards
from ccdrec.train.loop import FitResult, fit

CL_METHODS = ("finetune", "lwckd", "lwckd-piw", "retrain")
LWC_METHODS = ("lwckd", "lwckd-piw")


def check_method(method: str) -> str:
    if method not in CL_METHODS:
        raise CcdrecError(f"unknown continual-learning method {method!r}; expected one of {', '.join(CL_METHODS)}")
    return method


@dataclass
class CLResult:
    model: Recommender
    fit: FitResult | None
    lwc: LWCKD | None = None
    kl: PreviousOutputKL | None = None


def lwc_weight(cfg: RunConfig) -> float:
    w = cfg.competitors.lwc_weight
    return cfg.teacher.lwc_weight if w is None else w


def cl_update(
    model: Recommender,
    method: str,
    block: Block,
    prev: Block,
    cfg: RunConfig,
    schedule: TrainConfig,
    seed: int,
    knn_graphs=None,
    progress: bool = False,
    label: str = "",
    past: Sequence[Block] = (),
) -> CLResult:
    """One CL update of ``model`` (trained on block k-1) on block k: ``finetune``, ``lwckd`` or ``lwckd-piw``.

    The model is cloned, grown to block k's universe with ``cfg.student.init`` and trained on Tr_k with
    ``schedule``; LWC-KD methods add λ·LWC-KD towards the unchanged ``model`` (embedding models only;
    Mult-VAE members are fine-tuned). A Mult-VAE ``model`` carries, with every method, CCD's KL towards
    its own outputs (:func:`vae_kl_towards`, weight ``teacher.vae_kl_weight``) unless
    ``competitors.vae_kl`` is false. ``knn_graphs``: the UU / II graphs of R_{k-1} to reuse; ``past``: the
    blocks before ``block``, for ``schedule.select_on = stream``.
    """
    if check_method(method) == "retrain":
        raise ValueError("full retraining starts from scratch: use cl_retrain")
    seed_everything(seed)
    lwc = None
    if method in LWC_METHODS and isinstance(model, EmbeddingModel):
        lwc = lwckd_towards(model, prev, cfg, lwc_weight(cfg), seed, piw=method == "lwckd-piw", knn_graphs=knn_graphs)
    new = model.clone()
    new.grow(block.n_users, block.n_items, block.train_matrix, cfg.student.init)
    kl = None
    if cfg.competitors.vae_kl and model.objective == "vae":  # the Mult-VAE family's own loss
        kl = vae_kl_towards(model, block, prev, block.train_matrix, cfg.teacher.vae_kl_weight)
    callbacks = [c for c in (lwc, kl) if c is not None]
    res = fit(new, block, schedule, seed=seed, progress=progress, label=label, callbacks=callbacks, past=past)
    return CLResult(new, res, lwc, kl)


def cl_retrain(
    spec: ModelConfig, stream: Stream, k: int, schedule: TrainConfig, seed: int, device, progress: bool = False, label: str = ""
) -> CLResult:
    """Full retraining: a fresh ``spec`` model trained on the train pairs of blocks 0..k (:meth:`Stream.union_block`)."""
    seed_everything(seed)
    block = stream.union_block(k)
    model = build_model(spec.kind, block.n_users, block.n_items, **spec.kwargs()).to(device)
    res = fit(model, block, schedule, seed=seed, progress=progress, label=label)
    return CLResult(model, res)


def plain_base(ctx: RunContext, state: RunState) -> StageOutput:
    """Stage ``b0/student`` of a competitor with ``competitors.start = "plain"``: the student-size model
    trained by BPR alone on Tr_0 with ``teacher.base``, as full retraining's student (:func:`cl_retrain`),
    seeded from the stage name. The teacher members of block 0 are not involved."""
    cfg = ctx.cfg
    res = cl_retrain(
        cfg.student.model, ctx.stream, 0, cfg.teacher.base, ctx.seed("b0/student"), ctx.device, ctx.progress, "plain student D_0"
    )
    state.student = res.model
    return StageOutput({"student": ctx.save("b0_student", res.model, 0)}, [fit_row(ctx.name("student"), res.fit, 0)])


class CLStream(TeacherStudentRun):
    """One CL method over the stream, backed by a run directory (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, run_dir: RunDir, stream: Stream, method: str, progress: bool = True, console: Console | None = None
    ):
        self.method = check_method(method)
        super().__init__(cfg, run_dir, stream, progress, console, prefix=f"{method}:", meta={"method": method})
        self._knn: dict[int, tuple] = {}

    @classmethod
    def worker_kwargs(cls, rd: RunDir) -> dict:
        return {"method": rd.read_state()["method"]}

    def stage_list(self):
        out = []
        n = len(self.cfg.teacher.members)
        for m in range(n):
            out.append((f"b0/teacher{m}", lambda m=m: base_teachers.base_teacher(self.ctx, self.state, m)))
        start = plain_base if self.cfg.competitors.start == "plain" else generation.distil_base
        out.append(("b0/student", lambda: start(self.ctx, self.state)))
        out.append(("b0/eval", lambda: self.evaluate(0)))
        for k in range(1, self.last_block + 1):
            out.append((f"b{k}/student", lambda k=k: self.update_student(k)))
            if self.cfg.teacher.is_teacher_cycle(k):  # the members every teacher.update_every blocks
                for m in range(n):
                    out.append((f"b{k}/teacher{m}", lambda k=k, m=m: self.update_teacher(k, m)))
            out.append((f"b{k}/eval", lambda k=k: self.evaluate(k)))
        return out

    def save(self, name: str, model: Recommender, k: int, **meta) -> str:
        union = {"graph": UNION_GRAPH} if self.method == "retrain" and k > 0 else {}
        return self.ctx.save(name, model, k, **union, **meta)

    # --- block k >= 1 ------------------------------------------------------------------------
    def _update(
        self,
        model: Recommender,
        spec: ModelConfig,
        k: int,
        schedule: TrainConfig,
        base: TrainConfig,
        seed: int,
        label,
        blocks,
        past: Sequence[Block],
    ):
        """``model`` updated on ``blocks`` = (what it learns now, what it learned last time); ``past``: the
        blocks before the first, for ``select_on = stream``."""
        if self.method == "retrain":
            return cl_retrain(spec, self.stream, k, base, seed, self.ctx.device, self.progress, label)
        block, prev = blocks
        key = (prev.index, prev.prev_users, len(prev.train))  # the R_{k-1} whose kNN graphs LWC-KD needs
        res = cl_update(
            model, self.method, block, prev, self.cfg, schedule, seed, self._knn.get(key), self.progress, label, past=past
        )
        if res.lwc is not None and key not in self._knn:
            self._knn[key] = (res.lwc.user_knn, res.lwc.item_knn)  # shared by every model updated from R_{k-1}
        return res

    def update_student(self, k: int) -> StageOutput:
        s = self.cfg.student
        seed = self.ctx.seed(f"b{k}/student_update")
        blocks = (self.stream[k], self.stream[k - 1])
        label = f"{self.method} student D_{k}"
        past = self.stream.blocks[:k]
        res = self._update(self.state.student, s.model, k, s.update, self.cfg.teacher.base, seed, label, blocks, past)
        self.state.student = res.model
        ptr = self.save(f"b{k}_student", res.model, k)
        return StageOutput({"student": ptr}, [fit_row(self.ctx.name("student"), res.fit, k)])

    def update_teacher(self, k: int, m: int) -> StageOutput:
        t = self.cfg.teacher
        member = t.members[m]
        vae = member.kind == "vae"
        seed = self.ctx.seed(f"b{k}/teacher{m}", base=member.seed)
        schedule, base = (t.update_vae, t.base_vae) if vae else (t.update, t.base)
        blocks = teacher_blocks(self.ctx, k)  # the blocks since the members' last update
        label = f"{self.method} teacher {m} D_{k}"
        res = self._update(self.state.members[m], member, k, schedule, base, seed, label, blocks, earlier_blocks(self.ctx, k))
        self.state.members[m] = res.model
        ptr = self.save(f"b{k}_teacher{m}", res.model, k, **({} if self.method == "retrain" else span_meta(self.ctx, k)))
        return StageOutput({f"teacher{m}": ptr}, [fit_row(self.ctx.name(f"teacher{m}"), res.fit, k)])

    def evaluate(self, k: int) -> StageOutput:
        """r_{k,j} for j <= k of the ensemble and the student-size model, plus block k's new users (method.md 8)."""
        teacher = self.state.ensemble(self.cfg, self.stream[k])  # grown to block k between teacher cycles
        models = {self.ctx.name("teacher"): teacher, self.ctx.name("student"): self.state.student}
        return evaluation.evaluate(self.ctx, models, k)


def start_competitor(rd: RunDir, method: str, n_members: int, base_from: Path | None = None) -> None:
    """Mark the new run directory ``rd`` as a run of CL ``method`` and, with ``base_from``, seed it with
    that run's block-0 models (``n_members`` teacher members) instead of training them."""
    state = rd.read_state()
    state["method"] = method
    rd.write_state(state)
    if base_from is not None:
        share_block0(RunDir(base_from), rd, n_members, prefix=f"{method}:")


def run_competitor(
    cfg: RunConfig | None,
    run_dir: Path,
    method: str,
    resume: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
    console: Console | None = None,
    base_from: Path | None = None,
    workers: int | None = None,
) -> RunDir:
    """Run (or resume) one CL method over a stream into ``run_dir``; writes metrics and the run report.

    ``base_from``: a finished (at least block 0) CCD or CL run directory whose block-0 models this run
    shares instead of training them again; its configuration must agree on block 0.
    """
    check_method(method)
    cfg, rd, stream = prepare_run(cfg, run_dir, resume, workers, method="cl")
    if resume:
        method = rd.read_state().get("method", method)
    else:
        start_competitor(rd, method, len(cfg.teacher.members), base_from)
    CLStream(cfg, rd, stream, method, progress=progress, console=console).run(stop_after=stop_after)
    from ccdrec.report.markdown import write_report

    write_report(rd)
    return rd


__all__ = ["CL_METHODS", "CLResult", "CLStream", "cl_retrain", "cl_update", "plain_base", "run_competitor", "start_competitor"]
