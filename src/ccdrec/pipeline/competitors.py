"""The continual-learning (CL) competitors of CCD on the same harness (method.md 8).

A competitor updates the student-size model (``cfg.student.model``) and every teacher member
(``cfg.teacher.members``) block by block with one CL method alone: no teacher-student exchange, no
proxies, no replay. The teacher members are ensembled with the same rank ensemble as CCD (method.md 6).

Block 0 is the same as CCD's: the members are trained by :func:`ccdrec.pipeline.stages.train_member`
with CCD's seeds, and the student-size model **starts from D_0, the student CCD distils from E_0**
(same seed, same schedule), so every method starts from identical models. A comparison
(:mod:`ccdrec.pipeline.compare`) trains them once and shares them (:func:`share_base`).

For k >= 1, each model is updated by the method (:func:`cl_update`, :func:`cl_retrain`):

* ``finetune``   previous weights, grown with ``cfg.student.init`` (entity initialisation, method.md
  5.2), then the model's own loss on Tr_k (BPR; Mult-VAE: its VAE loss) with the stage schedules
  ``student.update`` / ``teacher.update`` / ``teacher.update_vae``;
* ``lwckd``      the same plus λ·LWC-KD towards the frozen model of block k-1 (method.md 5.4;
  λ = ``competitors.lwc_weight``, default ``teacher.lwc_weight``; τ, kNN, sampled candidates and
  entity cap from ``cfg.teacher``). LWC-KD is defined on embeddings: **Mult-VAE members are
  fine-tuned** under ``lwckd`` and ``lwckd-piw``;
* ``lwckd-piw``  LWC-KD with personalised imitation weights (``LWCKD(piw=True)``);
* ``retrain``    a fresh model of the same architecture trained on the union of the train pairs of
  blocks 0..k (:func:`union_block`) with the block-0 schedules ``teacher.base`` / ``teacher.base_vae``
  (the student-size model too: plain BPR, no distillation). Model selection on block k's validation
  split. A costly reference, not a competitor.

Evaluation is CCD's: after block k, the ensemble and the student-size model on the test split of
every block j <= k and on block k's new users, as rows ``model = "<method>:teacher"`` /
``"<method>:student"`` in ``metrics.jsonl``. Stages (``b0/teacher0``, ``b0/student``, ``b0/eval``,
``bK/student``, ``bK/teacherM``, ``bK/eval``) complete and resume like CCD's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ccdrec.config import ModelConfig, RunConfig, TrainConfig
from ccdrec.continual.lwckd import LWCKD, OldEmbeddings
from ccdrec.data.stream import Block, Stream, load_stream, pad_to
from ccdrec.device import resolve_device
from ccdrec.errors import CcdrecError
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.registry import build_model
from ccdrec.pipeline import stages
from ccdrec.pipeline.ccd import prepare_run
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.staged import TeacherStudentRun, check_shareable, fit_row, share_stages
from ccdrec.train.loop import FitResult, fit

CL_METHODS = ("finetune", "lwckd", "lwckd-piw", "retrain")
LWC_METHODS = ("lwckd", "lwckd-piw")
UNION = "union"


def check_method(method: str) -> str:
    if method not in CL_METHODS:
        raise CcdrecError(f"unknown continual-learning method {method!r}; expected one of {', '.join(CL_METHODS)}")
    return method


def union_block(stream: Stream, k: int) -> Block:
    """Block k with Tr = the deduplicated train pairs of blocks 0..k (for full retraining).

    Valid and test are block k's; validation pairs that are train pairs of an earlier block are
    dropped (they are masked as observed and could never be hit).
    """
    b = stream[k]
    train = stream.train_until(k)
    seen = set(map(tuple, train.tolist()))
    valid = b.valid[[tuple(p) not in seen for p in b.valid.tolist()]] if len(b.valid) else b.valid
    return Block(k, b.n_users, b.n_items, b.prev_users, b.prev_items, train, valid.reshape(-1, 2), b.test)


@dataclass
class CLResult:
    model: Recommender
    fit: FitResult | None
    lwc: LWCKD | None = None


def lwc_weight(cfg: RunConfig) -> float:
    w = cfg.competitors.lwc_weight
    return cfg.teacher.lwc_weight if w is None else w


def make_lwckd(old_model: EmbeddingModel, prev: Block, cfg: RunConfig, piw: bool, seed: int, knn_graphs=None) -> LWCKD:
    """LWC-KD (method.md 5.4) towards ``old_model`` (the model of block k-1) over R_{k-1}."""
    r_prev = pad_to(prev.train_matrix, (old_model.n_users, old_model.n_items))
    old = OldEmbeddings.from_model(old_model, r_prev)
    t = cfg.teacher
    return LWCKD(
        old,
        r_prev,
        tau=t.tau,
        weight=lwc_weight(cfg),
        knn=t.knn,
        piw=piw,
        piw_hidden=cfg.competitors.piw_hidden,
        piw_lr=cfg.competitors.piw_lr,
        knn_graphs=knn_graphs,
        candidates=t.lwc_candidates,
        seed=seed,
        max_entities=t.lwc_entities,
    )


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
) -> CLResult:
    """One CL update of ``model`` (trained on block k-1) on block k: ``finetune``, ``lwckd`` or ``lwckd-piw``.

    The model is cloned, grown to block k's universe with ``cfg.student.init`` and trained on Tr_k with
    ``schedule``; LWC-KD methods add λ·LWC-KD towards the unchanged ``model`` (embedding models only;
    Mult-VAE members are fine-tuned). ``knn_graphs``: the UU / II graphs of R_{k-1} to reuse.
    """
    if check_method(method) == "retrain":
        raise ValueError("full retraining starts from scratch: use cl_retrain")
    stages.seed_everything(seed)
    lwc = None
    if method in LWC_METHODS and isinstance(model, EmbeddingModel):
        lwc = make_lwckd(model, prev, cfg, method == "lwckd-piw", seed, knn_graphs)
    new = model.clone()
    new.grow(block.n_users, block.n_items, block.train_matrix, cfg.student.init)
    res = fit(new, block, schedule, seed=seed, progress=progress, label=label, extra_loss=lwc)
    return CLResult(new, res, lwc)


def cl_retrain(
    spec: ModelConfig, stream: Stream, k: int, schedule: TrainConfig, seed: int, device, progress: bool = False, label: str = ""
) -> CLResult:
    """Full retraining: a fresh ``spec`` model trained on the train pairs of blocks 0..k (:func:`union_block`)."""
    stages.seed_everything(seed)
    block = union_block(stream, k)
    model = build_model(spec.kind, block.n_users, block.n_items, **spec.kwargs()).to(device)
    res = fit(model, block, schedule, seed=seed, progress=progress, label=label)
    return CLResult(model, res)


def graph_of(stream: Stream, meta: dict, shape: tuple[int, int]):
    """The train matrix a checkpointed model was trained on: block ``meta["block"]``'s, or the union up to it."""
    k = int(meta.get("block", 0))
    if meta.get("graph") == UNION:
        return union_block(stream, k).matrix("train", *shape)
    return stream[k].matrix("train", *shape)


class CLStream(TeacherStudentRun):
    """One CL method over the stream, backed by a run directory (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, run_dir: RunDir, stream: Stream, method: str, progress: bool = True, console: Console | None = None
    ):
        super().__init__(run_dir, progress, console)
        self.cfg, self.stream, self.method = cfg, stream, check_method(method)
        self.device = resolve_device(cfg.device)
        self.members: list[Recommender | None] = [None] * len(cfg.teacher.members)
        self.student: Recommender | None = None
        self.last_block = len(stream) - 1 if cfg.max_blocks is None else min(cfg.max_blocks, len(stream) - 1)
        self._knn: dict[int, tuple] = {}
        self.workers = cfg.workers

    @classmethod
    def open_worker(cls, path: Path) -> CLStream:
        rd = RunDir.open(path)
        cfg = rd.load_config()
        return cls(cfg, rd, load_stream(cfg.dataset), rd.read_state()["method"], progress=False)

    def name(self, role: str) -> str:
        return f"{self.method}:{role}"

    def stage_list(self):
        out = []
        n = len(self.cfg.teacher.members)
        for m in range(n):
            out.append((f"b0/teacher{m}", lambda m=m: self.base_teacher(m)))
        out.append(("b0/student", self.base_student))
        out.append(("b0/eval", lambda: self.evaluate(0)))
        for k in range(1, self.last_block + 1):
            out.append((f"b{k}/student", lambda k=k: self.update_student(k)))
            for m in range(n):
                out.append((f"b{k}/teacher{m}", lambda k=k, m=m: self.update_teacher(k, m)))
            out.append((f"b{k}/eval", lambda k=k: self.evaluate(k)))
        return out

    # --- persistence -------------------------------------------------------------------------
    def load(self, name: str) -> Recommender:
        model, meta = self.rd.load_model(name, self.device)
        model.set_graph(graph_of(self.stream, meta, (model.n_users, model.n_items)))
        return model

    def save(self, name: str, model: Recommender, block: int) -> str:
        meta = {"block": block, "method": self.method}
        if self.method == "retrain" and block > 0:
            meta["graph"] = UNION
        return self.rd.save_model(name, model, meta)

    # --- block 0: the same models as CCD's ---------------------------------------------------
    def base_teacher(self, m: int) -> dict:
        res = stages.base_member(m, self.stream[0], self.cfg, self.device, self.progress)
        self.members[m] = res.model
        ptr = self.save(f"b0_teacher{m}", res.model, 0)
        return {"pointers": {f"teacher{m}": ptr}, "rows": [fit_row(self.name(f"teacher{m}"), res.fit, 0)]}

    def base_student(self) -> dict:
        """D_0, distilled from E_0 exactly as CCD does (same seed and schedule)."""
        block = self.stream[0]
        user_top, item_top = stages.teacher_lists(self.ensemble(), block, self.cfg.student.topn)
        seed = stages.stage_seed(self.cfg.seed, "b0/student")
        res = stages.generate_student(user_top, item_top, block, self.cfg, seed, self.device, None, self.progress)
        self.student = res.model
        ptr = self.save("b0_student", res.model, 0)
        return {"pointers": {"student": ptr}, "rows": [fit_row(self.name("student"), res.fit, 0)]}

    # --- block k >= 1 ------------------------------------------------------------------------
    def _update(self, model: Recommender, spec: ModelConfig, k: int, schedule: TrainConfig, base: TrainConfig, seed: int, label):
        if self.method == "retrain":
            return cl_retrain(spec, self.stream, k, base, seed, self.device, self.progress, label)
        res = cl_update(
            model,
            self.method,
            self.stream[k],
            self.stream[k - 1],
            self.cfg,
            schedule,
            seed,
            self._knn.get(k),
            self.progress,
            label,
        )
        if res.lwc is not None and k not in self._knn:
            self._knn[k] = (res.lwc.user_knn, res.lwc.item_knn)  # R_{k-1}'s graphs, shared by every model
        return res

    def update_student(self, k: int) -> dict:
        s = self.cfg.student
        seed = stages.stage_seed(self.cfg.seed, f"b{k}/student_update")
        res = self._update(self.student, s.model, k, s.update, self.cfg.teacher.base, seed, f"{self.method} student D_{k}")
        self.student = res.model
        ptr = self.save(f"b{k}_student", res.model, k)
        return {"pointers": {"student": ptr}, "rows": [fit_row(self.name("student"), res.fit, k)]}

    def update_teacher(self, k: int, m: int) -> dict:
        t = self.cfg.teacher
        member = t.members[m]
        vae = member.kind == "vae"
        seed = stages.stage_seed(member.seed, f"b{k}/teacher{m}")
        schedule, base = (t.update_vae, t.base_vae) if vae else (t.update, t.base)
        res = self._update(self.members[m], member, k, schedule, base, seed, f"{self.method} teacher {m} D_{k}")
        self.members[m] = res.model
        ptr = self.save(f"b{k}_teacher{m}", res.model, k)
        return {"pointers": {f"teacher{m}": ptr}, "rows": [fit_row(self.name(f"teacher{m}"), res.fit, k)]}

    def evaluate(self, k: int) -> dict:
        """r_{k,j} for j <= k of the ensemble and the student-size model, plus block k's new users (method.md 8)."""
        models = {self.name("teacher"): self.ensemble(), self.name("student"): self.student}
        return self.evaluate_and_show(models, k)


def model_prefix(rd: RunDir) -> str:
    """The prefix of a run's model names: ``""`` for a CCD run, ``"<method>:"`` for a CL run."""
    for r in rd.read_metrics():
        if r.get("kind") == "test" and str(r.get("model", "")).endswith("teacher"):
            return r["model"][: -len("teacher")]
    return ""


def share_base(source: RunDir, target: RunDir, method: str, n_members: int) -> None:
    """Seed ``target`` (a fresh CL run of ``method``) with block 0 of ``source`` (a CCD or CL run)."""
    check_shareable(source.load_config(), target.load_config(), source.path)
    src = model_prefix(source)
    roles = ["teacher", "student"] + [f"teacher{m}" for m in range(n_members)]
    rename = {f"{src}{r}": f"{method}:{r}" for r in roles}
    stage_names = [f"b0/teacher{m}" for m in range(n_members)] + ["b0/student", "b0/eval"]
    checkpoints = {f"teacher{m}": f"b0_teacher{m}" for m in range(n_members)} | {"student": "b0_student"}
    share_stages(source, target, stage_names, checkpoints, rename)


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
    cfg, rd = prepare_run(cfg, run_dir, resume, workers)
    if resume:
        rd.keep_metrics_of(set(rd.read_state()["completed"]))
        method = rd.read_state().get("method", method)
    else:
        state = rd.read_state()
        state["method"] = method
        rd.write_state(state)
        if base_from is not None:
            share_base(RunDir(base_from), rd, method, len(cfg.teacher.members))
    stream = load_stream(cfg.dataset)
    CLStream(cfg, rd, stream, method, progress=progress, console=console).run(stop_after=stop_after)
    from ccdrec.report.markdown import write_report

    write_report(rd)
    return rd


__all__ = [
    "CL_METHODS",
    "CLResult",
    "CLStream",
    "cl_retrain",
    "cl_update",
    "graph_of",
    "make_lwckd",
    "run_competitor",
    "share_base",
    "union_block",
]
