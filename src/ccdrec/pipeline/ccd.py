"""The CCD stream end to end (method.md 4-5): the stage order, checkpoints, evaluation, resume.

Block 0: train every teacher member, ensemble E_0, distil D_0, SP_0 = PP_0 = D_0.
Block k >= 1, in this order: student update (CL_k), the teacher-side replay candidates of SP, PP and
CL_k (computed once, shared by the members), teacher update of every member, ensemble E_k, student
generation (D_k). After each block, E_k, CL_k and D_k are evaluated on the test split of every
block j <= k (the r_{k,j} protocol, method.md 8) and on block k's new users.

Each stage is named (``b0/teacher2``, ``b3/student_update``, ...), seeded from the run seed and its
name, and marks itself complete in ``state.json`` only after its outputs are on disk, so
:func:`run_stream` with ``resume=True`` continues after any interruption with identical results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ccdrec.config import RunConfig
from ccdrec.continual.proxy import Proxy
from ccdrec.continual.replay import Candidates
from ccdrec.data.stream import Stream, load_stream, pad_to
from ccdrec.device import resolve_device
from ccdrec.distill.ensemble import top_matrix
from ccdrec.errors import CcdrecError
from ccdrec.models.base import Recommender
from ccdrec.pipeline import stages
from ccdrec.pipeline.rundir import RunDir
from ccdrec.pipeline.staged import TeacherStudentRun, fit_row

REPORTED = ("teacher", "served", "student")


class CCDStream(TeacherStudentRun):
    """The state of a CCD run between stages, backed by a run directory."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, stream: Stream, progress: bool = True, console: Console | None = None):
        super().__init__(run_dir, progress, console)
        self.cfg, self.stream = cfg, stream
        self.device = resolve_device(cfg.device)
        self.members: list[Recommender | None] = [None] * len(cfg.teacher.members)
        self.student: Recommender | None = None  # D_k
        self.served: Recommender | None = None  # CL_k
        self.proxies: tuple[Proxy, Proxy] | None = None
        last = len(stream) - 1 if cfg.max_blocks is None else min(cfg.max_blocks, len(stream) - 1)
        self.last_block = last
        self.workers = cfg.workers

    @classmethod
    def open_worker(cls, path: Path) -> CCDStream:
        rd = RunDir.open(path)
        cfg = rd.load_config()
        return cls(cfg, rd, load_stream(cfg.dataset), progress=False)

    # --- stage list --------------------------------------------------------------------------
    def stage_list(self) -> list[tuple[str, Callable[[], dict]]]:
        out: list[tuple[str, Callable[[], dict]]] = []
        n = len(self.cfg.teacher.members)
        for m in range(n):
            out.append((f"b0/teacher{m}", lambda m=m: self.base_teacher(m)))
        out.append(("b0/student", lambda: self.distil(0)))
        out.append(("b0/eval", lambda: self.evaluate(0)))
        for k in range(1, self.last_block + 1):
            out.append((f"b{k}/student_update", lambda k=k: self.student_update(k)))
            if self.cfg.teacher.student_knowledge:
                out.append((f"b{k}/replay_candidates", lambda k=k: self.replay_candidates(k)))
            for m in range(n):
                out.append((f"b{k}/teacher{m}", lambda k=k, m=m: self.teacher_update(k, m)))
            out.append((f"b{k}/student", lambda k=k: self.distil(k)))
            out.append((f"b{k}/eval", lambda k=k: self.evaluate(k)))
        return out

    def seed(self, name: str) -> int:
        return stages.stage_seed(self.cfg.seed, name)

    # --- persistence -------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the models every pointer of ``state.json`` names (resume)."""
        super().restore()
        ptr = self.state["pointers"]
        if "served" in ptr:
            self.served = self.load(ptr["served"])
        if "proxies" in ptr:
            t = self.rd.load_tensors(ptr["proxies"])
            self.proxies = (Proxy(t["sp_user"], t["sp_item"]).to(self.device), Proxy(t["pp_user"], t["pp_item"]).to(self.device))

    def load(self, name: str) -> Recommender:
        """A checkpointed model, attached to the train graph of the block it was trained on."""
        model, meta = self.rd.load_model(name, self.device)
        block = self.stream[int(meta.get("block", 0))]
        model.set_graph(block.matrix("train", model.n_users, model.n_items))
        return model

    def save(self, name: str, model: Recommender, block: int) -> str:
        return self.rd.save_model(name, model, {"block": block})

    def save_proxies(self, name: str) -> str:
        sp_, pp_ = self.proxies
        return self.rd.save_tensors(name, {"sp_user": sp_.user, "sp_item": sp_.item, "pp_user": pp_.user, "pp_item": pp_.item})

    # --- stages ------------------------------------------------------------------------------
    def base_teacher(self, m: int) -> dict:
        res = stages.base_member(m, self.stream[0], self.cfg, self.device, self.progress)
        self.members[m] = res.model
        ptr = self.save(f"b0_teacher{m}", res.model, 0)
        return {"pointers": {f"teacher{m}": ptr}, "rows": [fit_row(f"teacher{m}", res.fit, 0)]}

    def distil(self, k: int) -> dict:
        block = self.stream[k]
        pointers, rows = {}, []
        if k > 0 and not self.cfg.student.redistill:
            # ablation: keep updating the same student, never re-distil
            self.student = self.served
        else:
            user_top, item_top = stages.teacher_lists(self.ensemble(), block, self.cfg.student.topn)
            # E_k's top lists also serve block k+1's student update (its negatives avoid them)
            pointers["teacher_top"] = self.rd.save_tensors(f"b{k}_teacher_top", {"user_top": torch.from_numpy(user_top)})
            avoid = self.distil_avoid(k) if k > 0 else None
            res = stages.generate_student(
                user_top, item_top, block, self.cfg, self.seed(f"b{k}/student"), self.device, avoid, self.progress
            )
            self.student = res.model
            rows.append(fit_row("student", res.fit, k))
        pointers["student"] = self.save(f"b{k}_student", self.student, k)
        if k == 0:
            self.proxies = (Proxy.from_model(self.student), Proxy.from_model(self.student))
            pointers["proxies"] = self.save_proxies("b0_proxies")
        return {"pointers": pointers, "rows": rows}

    def avoid(self, scorers, block, shape, lists: list[np.ndarray] = ()):
        """Old users' top-N items of ``scorers`` and of the precomputed top ``lists`` (universe
        ``shape``), for BPR negatives to avoid."""
        n = self.cfg.student.avoid_top
        if n <= 0:
            return None
        users = np.arange(block.prev_users, dtype=np.int64)
        observed = stages.past_train(block, self.stream[block.index - 1] if block.index else None)
        out = stages.avoid_top(scorers, shape, observed, n, users, self.device)
        for top in lists:
            out = out + pad_to(top_matrix(top[: block.prev_users, :n], shape[1]), shape)
        out.data[:] = 1.0
        return out.tocsr()

    def distil_avoid(self, k: int):
        """Block k's avoid lists for the distillation's negatives (7): the top items of SP_{k-1},
        PP_{k-1} (``self.proxies``) and CL_k (``self.served``)."""
        block = self.stream[k]
        scorers = [p.scorer(n_items=block.n_items) for p in self.proxies] + [self.served.scorer()]
        return self.avoid(scorers, block, (block.n_users, block.n_items))

    def student_avoid(self, k: int, top: np.ndarray | None):
        """Block k's avoid lists for the student update's negatives (5.1): the top items of D_{k-1}
        (``self.student``), SP_{k-1}, PP_{k-1} and E_{k-1}: its saved top lists ``top`` when they are
        long enough, else the ensemble of ``self.members``."""
        block, prev = self.stream[k], self.stream[k - 1]
        scorers = [self.student.scorer()] + [p.scorer(n_items=prev.n_items) for p in self.proxies]
        lists = []
        if top is not None and top.shape[1] >= self.cfg.student.avoid_top:
            lists.append(top)  # E_{k-1}'s top items, as distilled into D_{k-1}
        else:
            scorers.insert(0, self.ensemble().scorer(context=prev.train_matrix))
        return self.avoid(scorers, block, (prev.n_users, prev.n_items), lists)

    def teacher_top(self, k: int) -> np.ndarray | None:
        """E_k's top lists of users, saved by the distillation of block k (None if not saved)."""
        ptr = self.state["pointers"].get("teacher_top")
        if ptr != f"b{k}_teacher_top":
            return None
        return self.rd.load_tensors(ptr)["user_top"].numpy()

    def student_update(self, k: int) -> dict:
        block, prev = self.stream[k], self.stream[k - 1]
        pointers = {}
        if k >= 2:
            w_s, w_p = self.cfg.proxy_weights(k)
            self.proxies = stages.update_proxies(*self.proxies, self.student, w_s, w_p)
            pointers["proxies"] = self.save_proxies(f"b{k}_proxies")
        avoid = self.student_avoid(k, self.teacher_top(k - 1))
        res, replayer = stages.update_student(
            self.student, *self.proxies, avoid, block, prev, self.cfg, self.seed(f"b{k}/student_update"), self.progress
        )
        self.served = res.model
        pointers["served"] = self.save(f"b{k}_served", self.served, k)
        rows = [fit_row("served", res.fit, k, replay_pairs=int(np.mean(replayer.sizes)) if replayer.sizes else 0)]
        return {"pointers": pointers, "rows": rows}

    def replay_candidates(self, k: int) -> dict:
        """The teacher-side replay candidates of SP, PP and CL_k for block k, shared by every member (5.3)."""
        block, prev = self.stream[k], self.stream[k - 1]
        found = stages.teacher_candidates(*self.proxies, self.served, block, prev, self.cfg, self.device)
        tensors = {"users": torch.from_numpy(stages.old_active_users(block))}
        for name, c in found.items():
            tensors[f"{name}_items"], tensors[f"{name}_scores"] = c.items, c.scores
        return {"pointers": {"replay_candidates": self.rd.save_tensors(f"b{k}_replay_candidates", tensors)}, "rows": []}

    def load_candidates(self, k: int) -> dict[str, Candidates] | None:
        """Block k's saved teacher-side replay candidates (None when this run has not computed them)."""
        ptr = self.state["pointers"].get("replay_candidates")
        if ptr != f"b{k}_replay_candidates":
            return None
        t = self.rd.load_tensors(ptr)
        users = t["users"].numpy()
        return {
            name: Candidates(users, t[f"{name}_items"].to(self.device), t[f"{name}_scores"].to(self.device))
            for name in stages.TEACHER_SOURCES
            if f"{name}_items" in t
        }

    def teacher_update(self, k: int, m: int) -> dict:
        block, prev = self.stream[k], self.stream[k - 1]
        know = self.cfg.teacher.student_knowledge
        sp_, pp_ = self.proxies if know else (None, None)
        res = stages.update_teacher(
            self.members[m],
            sp_,
            pp_,
            self.served if know else None,
            block,
            prev,
            self.cfg,
            stages.stage_seed(self.cfg.teacher.members[m].seed, f"b{k}/teacher{m}"),
            self.progress,
            label=f"D_{k} teacher {m} update",
            candidates=self.load_candidates(k) if know else None,
        )
        self.members[m] = res.model
        ptr = self.save(f"b{k}_teacher{m}", res.model, k)
        return {"pointers": {f"teacher{m}": ptr}, "rows": [fit_row(f"teacher{m}", res.fit, k)]}

    def evaluate(self, k: int) -> dict:
        """r_{k,j} for j <= k of E_k, CL_k and D_k, plus block k's new users (method.md 8)."""
        models = {"teacher": self.ensemble(), "student": self.student}
        if k > 0:
            models["served"] = self.served
        return self.evaluate_and_show(models, k)


def prepare_run(cfg: RunConfig | None, run_dir: Path, resume: bool, workers: int | None = None) -> tuple[RunConfig, RunDir]:
    """The configuration and directory of a new run, or of the run to resume (its stored configuration).

    ``workers``, if given, replaces the configuration's number of worker processes (it changes how
    fast a run goes, not what it computes, so a run may be resumed with another number).
    """
    if workers is not None and workers < 1:
        raise CcdrecError(f"workers must be at least 1, got {workers}")
    if resume:
        rd = RunDir.open(run_dir)
        cfg = rd.load_config()
    elif cfg is None:
        raise CcdrecError("a configuration is needed to start a run")
    else:
        rd = RunDir(run_dir)
        rd.create(cfg)
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})
    return cfg, rd


def run_stream(
    cfg: RunConfig | None,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
    console: Console | None = None,
    workers: int | None = None,
) -> RunDir:
    """Run (or resume) CCD over a stream into ``run_dir``; writes metrics and the report.

    ``workers``: the number of worker processes, instead of the configuration's (see :func:`prepare_run`)."""
    cfg, rd = prepare_run(cfg, run_dir, resume, workers)
    if resume:
        rd.keep_metrics_of(set(rd.read_state()["completed"]))
    stream = load_stream(cfg.dataset)
    runner = CCDStream(cfg, rd, stream, progress=progress, console=console)
    runner.run(stop_after=stop_after)
    from ccdrec.report.markdown import write_report

    write_report(rd)
    return rd
