"""The CCD stream end to end (method.md 4-5): the stage order, checkpoints, evaluation, resume.

Block 0: train every teacher member, ensemble E_0, distil D_0, SP_0 = PP_0 = D_0.
Block k >= 1, in this order: student update (CL_k), the teacher-side replay candidates of SP, PP and
CL_k (computed once, shared by the members), teacher update of every member, ensemble E_k, student
generation (D_k). After each block, E_k, CL_k and D_k are evaluated on the test split of every
block j <= k (the r_{k,j} protocol, method.md 8) and on block k's new users.

With ``teacher.update_every`` = m > 1 (teacher update cycle CT = m student cycles, method.md 5), only
blocks m, 2m, ... are teacher cycles with all of these stages; every other block is a student cycle:
the student update alone (CL_k from CL_{k-1}; the proxies step from it), then the evaluation, where
the ensemble is the last one, grown untrained to the block's universe. A teacher cycle's members learn
the train pairs of every block since their last update (:meth:`ccdrec.data.stream.Stream.span`).

Each stage is named (``b0/teacher2``, ``b3/student_update``, ...), seeded from the run seed and its
name, and marks itself complete in ``state.json`` only after its outputs are on disk, so
:func:`run_stream` with ``resume=True`` continues after any interruption with identical results.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from ccdrec.arguments import check_int
from ccdrec.config import RunConfig
from ccdrec.data.stream import Stream, load_stream
from ccdrec.device import resolve_device
from ccdrec.errors import CcdrecError, InvalidArgument, WrongArgumentType
from ccdrec.option_values import shell_word
from ccdrec.pipeline import cluster
from ccdrec.pipeline.context import StageOutput
from ccdrec.pipeline.rundir import RunDir, enclosing, refuse_part
from ccdrec.pipeline.staged import TeacherStudentRun, stage_threads
from ccdrec.pipeline.stages import base_teachers, evaluation, generation, student_update, teacher_update


class CCDStream(TeacherStudentRun):
    """The order of CCD's stages over a stream, backed by a run directory (the stages themselves are
    :mod:`ccdrec.pipeline.stages`' modules)."""

    def stage_list(self) -> list[tuple[str, Callable[[], StageOutput]]]:
        out: list[tuple[str, Callable[[], StageOutput]]] = []
        n = len(self.cfg.teacher.members)
        for m in range(n):
            out.append((f"b0/teacher{m}", lambda m=m: base_teachers.base_teacher(self.ctx, self.state, m)))
        out.append(("b0/student", lambda: generation.distil(self.ctx, self.state, 0)))
        out.append(("b0/eval", lambda: self.evaluate(0)))
        for k in range(1, self.last_block + 1):
            out.append((f"b{k}/student_update", lambda k=k: student_update.student_update(self.ctx, self.state, k)))
            if self.cfg.teacher.is_teacher_cycle(k):
                if self.cfg.teacher.student_knowledge:
                    out.append(
                        (f"b{k}/replay_candidates", lambda k=k: teacher_update.replay_candidates_stage(self.ctx, self.state, k))
                    )
                for m in range(n):
                    out.append((f"b{k}/teacher{m}", lambda k=k, m=m: teacher_update.teacher_update(self.ctx, self.state, k, m)))
                out.append((f"b{k}/student", lambda k=k: generation.distil(self.ctx, self.state, k)))
            out.append((f"b{k}/eval", lambda k=k: self.evaluate(k)))
        return out

    def evaluate(self, k: int) -> StageOutput:
        """r_{k,j} for j <= k of E_k, D_k, the served student and (when it is not the one served) CL_k,
        plus block k's new users (method.md 8). Between teacher cycles the ensemble is the last one (its
        staleness is measured) and there is no new D_k. A model under two names is scored once."""
        models = {"teacher": self.state.ensemble(self.cfg, self.stream[k])}
        if k == 0 or self.cfg.teacher.is_teacher_cycle(k):
            models["student"] = self.state.student
        if k > 0:
            models["served"] = self.state.served
            if self.state.updated is not self.state.served:
                models["updated"] = self.state.updated
        return evaluation.evaluate(self.ctx, models, k)


def prepare_run(
    cfg: RunConfig | None,
    run_dir: Path,
    resume: bool,
    workers: int | None = None,
    max_blocks: int | None = None,
    method: str = "ccd",
) -> tuple[RunConfig, RunDir, Stream]:
    """The configuration, directory and stream of a new run, or of the run to resume (its stored
    configuration, on the stream it started on).

    Every check (configuration, stream and its content hash, ``max_blocks``) passes before anything is
    created or changed: a failed start leaves no directory, a refused resume leaves the run as it was.
    A resumed run drops the metric rows of unfinished stages and the temporary files of interrupted writes.
    ``workers``, if given, replaces the configuration's number of worker processes (it changes how
    fast a run goes, not what it computes, so a run may be resumed with another number).
    ``max_blocks`` takes a resumed run on to that block (:meth:`RunDir.check_max_blocks`), and stops a new
    one there (its configuration's ``max_blocks``). ``method``: ``ccd`` (a CCD-family run; a competitor's
    run is refused) or ``cl`` (a competitor's, :func:`ccdrec.pipeline.competitors.run_competitor`).
    """
    if not isinstance(run_dir, str | os.PathLike):
        raise WrongArgumentType(f"run_dir must be a path (str or Path), not {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    if workers is not None:
        workers = check_int("workers", workers)
    if max_blocks is not None:
        max_blocks = check_int("max_blocks", max_blocks, minimum=0)
    if cfg is not None and not isinstance(cfg, RunConfig):
        raise WrongArgumentType(
            f"cfg must be a ccdrec.config.RunConfig, not {type(cfg).__name__}: RunConfig(**settings) or "
            "ccdrec.presets.load_config(...) makes one"
        )
    if cfg is not None:
        if max_blocks is not None and not resume:  # a new run stops there, as --max-blocks on the command line
            cfg = cfg.model_copy(update={"max_blocks": max_blocks})
        cfg = cfg.checked()  # model_copy(update=...) skips pydantic's checks: a bad value is refused before anything

        resolve_device(cfg.device)  # a device that is not there is refused before anything is created
    if resume:
        rd = RunDir.open(run_dir)
        cfg = rd.load_config()
        resolve_device(cfg.device)
        completed = set(rd.read_state()["completed"])
        stream = rd.open_stream(cfg)
        if method == "ccd" and (competitor := rd.read_state().get("method")) is not None:  # pipeline/competitors.py
            whole = enclosing(run_dir)
            goes_on = f"ccdrec compare --resume {shell_word(whole[1])}" if whole else "ccdrec.pipeline.competitors.run_competitor"
            raise CcdrecError(f"{run_dir} is a run of {competitor}, not of CCD: it goes on with {goes_on}")
        if max_blocks is not None:
            rd.check_max_blocks(max_blocks)
            if max_blocks != cfg.max_blocks:
                refuse_part(run_dir, f"--max-blocks {max_blocks}", "its runs stay at one block")
        rd.hold()  # every check has passed: from here on the directory changes
        if max_blocks is not None:
            cfg = cfg.model_copy(update={"max_blocks": max_blocks})
            rd.save_config(cfg)
        rd.remove_partial_writes()
        rd.keep_metrics_of(completed)
    elif cfg is None:
        raise CcdrecError("a configuration is needed to start a run")
    else:
        rd = RunDir(run_dir)
        rd.check_creatable()
        stream = load_stream(cfg.dataset)
        # threads of a teacher-member task
        threads = stage_threads(workers or cfg.workers, len(cfg.teacher.members), cluster.task_threads())
        gpus = int(resolve_device(cfg.device).type == "cuda")
        remedy = "give fewer --threads or more --workers"
        cluster.precheck(cfg.executor, cfg.ray_address, threads, gpus, "a teacher-member task", remedy)
        rd.create(cfg, stream)
        rd.hold()
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})
    return cfg, rd, stream


def max_blocks_note(cfg: RunConfig, stream: Stream) -> str | None:
    """One line when ``max_blocks`` is past the stream's last block (the run ends there), else None."""
    last = len(stream) - 1
    if cfg.max_blocks is None or cfg.max_blocks <= last:
        return None
    return (
        f"max_blocks {cfg.max_blocks}, but the stream has blocks 0..{last}: the run ends at block {last} (blocks "
        "appended later with `ccdrec data append` are taken on with --resume)"
    )


def stream_notes(cfg: RunConfig, stream: Stream) -> list[str]:
    """What of the configuration the stream leaves without effect or meaning, each as one line: a
    ``max_blocks`` or a per-block override past the stream's last block, a cut-off K of Recall@K that
    ranks every item of block 0 (every held-out item is then in the top K: Recall@K is 1 by construction)."""
    last, notes = len(stream) - 1, [n for n in [max_blocks_note(cfg, stream)] if n]
    if beyond := sorted(k for k in cfg.blocks if k > last):
        notes.append(
            f"per-block overrides for block(s) {', '.join(map(str, beyond))}, but the stream has blocks 0..{last}: they "
            "apply only to blocks appended later"
        )
    n_items = stream[0].n_items
    if wide := [k for k in cfg.ks if k >= n_items]:
        notes.append(
            f"cut-off(s) {', '.join(map(str, wide))} of ks rank all {n_items:,} items of block 0, so Recall@K is 1 by "
            f"construction there: choose cut-offs below {n_items:,} (--set 'ks=[...]')"
        )
    return notes


def run_stream(
    cfg: RunConfig | None,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: str | None = None,
    console: Console | None = None,
    workers: int | None = None,
    max_blocks: int | None = None,
    opened: Callable[[Path], None] | None = None,
) -> RunDir:
    """Run (or resume) CCD over a stream into ``run_dir``; writes metrics and the report.

    ``workers``: the number of worker processes, instead of the configuration's; ``max_blocks``: with
    ``resume``, take the run on to this block (see :func:`prepare_run`); ``opened`` is called with the
    run directory once every check has passed and it is created (or reopened), before any training."""
    if stop_after is not None and not (isinstance(stop_after, str) and re.fullmatch(r"b\d+/[a-z_]+\d*", stop_after)):
        raise InvalidArgument(f"stop_after must name a stage such as 'b0/eval' or 'b1/teacher0', not {stop_after!r:.60}")
    cfg, rd, stream = prepare_run(cfg, run_dir, resume, workers, max_blocks)
    if opened is not None:
        opened(rd.path)
    runner = CCDStream(cfg, rd, stream, progress=progress, console=console)
    if (note := stream.dropped_note()) and not resume:
        runner.console.print(f"note: {note}")
    resumed_note = max_blocks_note(cfg, stream) if max_blocks is not None else None  # --resume --max-blocks K
    for note in stream_notes(cfg, stream) if not resume else [n for n in [resumed_note] if n]:
        runner.console.print(f"note: {note}")
    runner.run(stop_after=stop_after)
    from ccdrec.report.markdown import write_report

    write_report(rd)
    return rd
