"""Staged runs backed by a run directory: the stage-completion + pointers pattern, and shared stages.

A staged run is a list of named stages (``b0/teacher2``, ``b3/eval``, ...). Each stage returns a
:class:`~ccdrec.pipeline.context.StageOutput`: the checkpoints it wrote (``pointers``: role -> checkpoint
name) and its metric rows; the stage counts as done only when :meth:`StagedRun.complete` has appended
the rows and then written ``state.json`` (which also records every stage's own pointers under
``outputs``), so an interrupted run resumes after its last completed stage.

:func:`share_stages` seeds a fresh run directory with completed stages of another run (block 0 of
the comparison: the teacher members and D_0 are trained once and shared by every method). The
checkpoint files are hard-linked (copied where links are impossible), the stages' metric rows copied
(models renamed on request), and the stages marked complete with 0 seconds and their origin under
``state["shared"]``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from functools import cache, partial
from pathlib import Path

import torch
from rich.console import Console

from ccdrec.config import RunConfig
from ccdrec.data.stream import Stream
from ccdrec.determinism import deterministic_kernels
from ccdrec.errors import CcdrecError, StageLost
from ccdrec.memory import keep_freed_memory, peak_rss_mb, release_freed_memory, reset_peak_rss
from ccdrec.pipeline import cluster
from ccdrec.pipeline.context import RunContext, RunState, StageOutput
from ccdrec.pipeline.rundir import RunDir

Stage = tuple[str, Callable[[], StageOutput]]


class StopRequested(Exception):
    """Raised after the stage named by ``stop_after`` (used to test resumption)."""


def stage_block(name: str) -> int:
    """The block index of a stage name ``bK/...``."""
    return int(name.split("/")[0][1:])


class StagedRun:
    """Runs ``stage_list()`` in order, skipping completed stages; subclasses define stages and ``restore``.

    Stages that :meth:`parallel_group` puts in one group (a block's teacher members: each depends only
    on its own previous version and on checkpoints written before the group) may run side by side in
    ``workers`` processes (executor ``local``) or as Ray tasks on a cluster (executor ``ray``,
    :mod:`ccdrec.pipeline.cluster`). A worker rebuilds the run from its directory with
    :meth:`open_worker`, runs one stage, which writes its checkpoints, and hands back the stage's
    pointers and rows; only this process writes ``state.json`` and ``metrics.jsonl``, so an
    interruption loses at most the stages still running, and a resumed run repeats exactly those.
    A worker stage trains with :meth:`stage_threads` threads on :meth:`stage_device`, as it would here.
    """

    workers = 1
    executor = "local"  # or "ray" (the configuration's; cluster.use_executor overrides it)
    ray_address: str | None = None

    def __init__(self, run_dir: RunDir, progress: bool = True, console: Console | None = None):
        self.rd = run_dir
        self.progress = progress
        self.console = console or Console(quiet=not progress)
        self.record = run_dir.read_state()  # the contents of state.json

    def stage_list(self) -> list[Stage]:
        raise NotImplementedError

    def restore(self) -> None:
        """Load the models the pointers of ``state.json`` name (resume)."""

    def parallel_group(self, name: str) -> str | None:
        """A key shared by stages that may run side by side (None: run this stage alone)."""
        return None

    @classmethod
    def open_worker(cls, path: Path, device: str | None = None) -> StagedRun:
        """This run, rebuilt in a worker process from its directory (without progress display), on
        ``device`` (``cpu`` / ``cuda``; None: the configuration's)."""
        raise NotImplementedError

    def stage_device(self) -> str | None:
        """The device type (``cpu`` / ``cuda``) worker stages run on: this process's (None: the worker's own choice)."""
        return None

    def stage_threads(self, group: int, on_ray: bool = False) -> int:
        """CPU threads of each worker stage of a group of ``group`` stages (:func:`stage_threads`), of
        the Ray tasks' threads (:func:`ccdrec.pipeline.cluster.task_threads`) when ``on_ray``."""
        return stage_threads(self.workers, group, cluster.task_threads() if on_ray else None)

    def complete(self, name: str, out: StageOutput, seconds: float, peak_mb: float | None = None) -> None:
        """Record stage ``name`` as done: its metric rows, then ``state.json`` with its pointers."""
        for row in out.rows:
            row.setdefault("stage", name)
        self.rd.append_metrics(out.rows)
        self.record["pointers"].update(out.pointers)
        self.record.setdefault("outputs", {})[name] = dict(out.pointers)
        self.record["completed"].append(name)
        self.record["seconds"][name] = round(seconds, 3)
        if peak_mb is not None:
            self.record.setdefault("peak_rss_mb", {})[name] = round(peak_mb)
        self.record["block"] = stage_block(name)
        self.rd.write_state(self.record)

    def run(self, stop_after: str | None = None) -> None:
        keep_freed_memory()
        done = set(self.record["completed"])
        todo = self.stage_list()
        known = {name for name, _ in todo}
        if done - known:
            raise CcdrecError(f"{self.rd.path}: state names stages this configuration does not have: {sorted(done - known)[:3]}")
        if stop_after is not None and stop_after not in known:
            raise CcdrecError(
                f"stop_after {stop_after!r} is not a stage of this run; its stages are {', '.join(list(known)[:4])}, ..."
            )
        self.restore()
        todo = [(name, fn) for name, fn in todo if name not in done]
        executor, address = cluster.chosen_executor(self.executor, self.ray_address)
        groups = Counter(g for g in (self.parallel_group(name) for name, _ in todo) if g is not None)
        on_ray = executor == "ray" and bool(groups)
        if on_ray:  # before any stage: a missing Ray, an unreachable cluster or too small nodes are one-line errors
            cluster.connect(address)
            cluster.check_resources(self.stage_threads(min(groups.values()), on_ray), int(self.stage_device() == "cuda"))
        workers = self.workers
        if workers > (threads := torch.get_num_threads()) and not on_ray:  # --workers 3 --threads 1 ran 2 threads
            self.console.print(
                f"note: {workers} worker processes capped at {threads}: each takes at least one of the {threads} thread(s) "
                "this run may use (--threads)"
            )
            workers = self.workers = threads
        if workers > 1 and not on_ray and not _main_can_be_spawned():
            self.console.print("note: one process: workers cannot re-import a program read from stdin")
            workers = 1
        i = 0
        while i < len(todo):
            name, fn = todo[i]
            group = self.parallel_group(name) if workers > 1 or on_ray else None
            if group is not None:
                names = [name]
                while i + len(names) < len(todo) and self.parallel_group(todo[i + len(names)][0]) == group:
                    names.append(todo[i + len(names)][0])
                if len(names) > 1 or on_ray:  # on Ray even a lone member is a task (it may need a GPU node)
                    (self.run_on_ray if on_ray else self.run_parallel)(names)
                    i += len(names)
                    if stop_after in names:
                        raise StopRequested(stop_after)
                    continue
            self.console.print(f"[bold]{name}[/bold]")
            out, seconds, peak = run_measured(fn)
            self.complete(name, out, seconds, peak)
            i += 1
            if stop_after == name:
                raise StopRequested(name)

    def _complete_worker_stage(self, name: str, result: tuple[StageOutput, float, float | None]) -> None:
        out, seconds, peak = result
        self.complete(name, out, seconds, peak)
        self.console.print(f"  {name} done ({seconds:.1f} s)")

    def run_on_ray(self, names: list[str]) -> None:
        """Run the stages ``names`` as Ray tasks (:func:`ccdrec.pipeline.cluster.run_stage_group`),
        completing each as it finishes, then reload the models their pointers name."""
        threads, device = self.stage_threads(len(names), on_ray=True), self.stage_device()
        gpus = int(device == "cuda")
        need = f"{threads} CPU{'s' if threads > 1 else ''}" + (", 1 GPU" if gpus else "")
        self.console.print(f"[bold]{', '.join(names)}[/bold] (Ray tasks, {need} each)")
        completed = self.record["completed"]
        cluster.run_stage_group(
            names,
            partial(_run_in_worker, type(self), str(self.rd.path.resolve()), threads=threads, device=device),
            self._complete_worker_stage,
            self.rd.path,
            completed[-1] if completed else None,
            cpus=threads,
            gpus=gpus,
        )
        self.restore()

    def run_parallel(self, names: list[str]) -> None:
        """Run the stages ``names`` in ``workers`` spawned processes, completing each as it finishes,
        then reload the models their pointers name."""
        workers = min(self.workers, len(names))
        threads = self.stage_threads(len(names))
        each = f"{threads} thread{'s' if threads > 1 else ''} each"
        self.console.print(f"[bold]{', '.join(names)}[/bold] ({workers} processes, {each})")
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(),),
        )
        try:
            futures = {
                pool.submit(_run_in_worker, type(self), str(self.rd.path), n, threads, self.stage_device()): n for n in names
            }
            done: set[str] = set()
            try:
                for fut in as_completed(futures):
                    self._complete_worker_stage(futures[fut], fut.result())
                    done.add(futures[fut])
            except BrokenProcessPool:
                # a worker died: keep what the others finished, name what was lost
                for fut, name in futures.items():
                    if name not in done and fut.done() and not fut.cancelled() and fut.exception() is None:
                        self._complete_worker_stage(name, fut.result())
                        done.add(name)
                lost = [n for n in names if n not in done]
                what = f"stage {lost[0]} was" if len(lost) == 1 else f"stages {', '.join(lost)} were"
                raise StageLost(
                    f"{what} lost: a worker process died (killed or out of memory); the completed stages are kept"
                ) from None
        except BaseException:
            # interrupted, or a stage failed: stop the other workers now instead of waiting for them
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                proc.terminate()
            raise
        pool.shutdown()
        self.restore()


class TeacherStudentRun(StagedRun):
    """A staged run of teacher members and a student over a stream: its :class:`RunContext` (``ctx``)
    and the :class:`RunState` (``state``) its stages carry; subclasses give the order of the stages.

    ``prefix`` names the run's models in metric rows; ``meta`` is stored with every checkpoint.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: RunDir,
        stream: Stream,
        progress: bool = True,
        console: Console | None = None,
        prefix: str = "",
        meta: dict | None = None,
    ):
        super().__init__(run_dir, progress, console)
        self.ctx = RunContext(cfg, stream, run_dir, progress, self.console, prefix, meta or {})
        self.state = RunState([None] * len(cfg.teacher.members), pointers=self.record["pointers"])
        self.workers = cfg.workers
        self.executor, self.ray_address = cfg.executor, cfg.ray_address
        last = len(stream) - 1
        self.last_block = last if cfg.max_blocks is None else min(cfg.max_blocks, last)

    @property
    def cfg(self) -> RunConfig:
        return self.ctx.cfg

    @property
    def stream(self) -> Stream:
        return self.ctx.stream

    @classmethod
    def worker_kwargs(cls, rd: RunDir) -> dict:
        """Constructor arguments beyond the configuration that a worker reads from the run directory."""
        return {}

    @classmethod
    def open_worker(cls, path: Path, device: str | None = None) -> TeacherStudentRun:
        rd = RunDir.open(path)
        cfg = rd.load_config()
        if device is not None:
            cfg = cfg.model_copy(update={"device": device})
        return cls(cfg, rd, rd.open_stream(cfg), progress=False, **cls.worker_kwargs(rd))

    def stage_device(self) -> str:
        return self.ctx.device.type

    def restore(self) -> None:
        """Load the models that the pointers of ``state.json`` name (resume, and after worker stages)."""
        self.state = RunState.restore(self.ctx, self.record["pointers"])

    def parallel_group(self, name: str) -> str | None:
        """A block's teacher member stages (``bK/teacherM``) may run side by side."""
        block, _, role = name.partition("/")
        return f"{block}/teachers" if role.startswith("teacher") else None


def _main_can_be_spawned() -> bool:
    """Whether a spawned worker can re-import the main program: it can from a file or ``python -c``, not
    from a script read from stdin (multiprocessing looks for a file named ``<stdin>``)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or os.path.exists(path)


def _exit_with_parent(parent: int) -> None:
    """Stop this worker process when the process that started it is gone (killed mid-group)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _start_worker(parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def stage_threads(workers: int, group: int, total: int | None = None) -> int:
    """CPU threads of each worker stage of a group of ``group`` stages: ``total`` threads (default: this
    process's) shared by the stages that run at once (``workers``, at most ``group``)."""
    return max(1, (total or torch.get_num_threads()) // min(workers, group))


@cache
def warm_up() -> None:
    """Pay a fresh process's one-off costs before the first stage is timed: the first use of torch's
    deterministic settings and of an optimiser imports ``torch._dynamo`` (2-3 s here), which would
    otherwise count as the first stage's time in every new process (a resume, a worker, a Ray task)."""
    with deterministic_kernels():
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def run_measured(fn: Callable[[], dict]) -> tuple[dict, float, float | None]:
    """A stage's result, wall seconds and own peak resident memory in MB (None where not measurable);
    the heap's free pages go back to the system after it (:mod:`ccdrec.memory`)."""
    warm_up()
    measurable = reset_peak_rss()  # else VmHWM would be the whole process's peak
    start = time.perf_counter()
    with deterministic_kernels():  # same seed and thread count, same bits (ccdrec.determinism)
        out = fn()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb() if measurable else None
    release_freed_memory()
    return out, seconds, peak


def _run_in_worker(
    kind: type[StagedRun], path: str, name: str, threads: int, device: str | None = None
) -> tuple[dict, float, float | None]:
    """Worker process or Ray task: rebuild the run of ``kind`` at ``path`` on ``device``, run stage
    ``name`` with ``threads`` threads, return its result."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    runner = kind.open_worker(Path(path), device)
    runner.restore()
    return run_measured(dict(runner.stage_list())[name])


def link_file(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (a copy where links are impossible), replacing ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def share_stages(
    source: RunDir,
    target: RunDir,
    stages: list[str],
    checkpoints: dict[str, str],
    rename: dict[str, str] | None = None,
) -> None:
    """Mark ``stages`` of ``source`` as completed in ``target`` (a freshly created run directory).

    ``checkpoints``: target role -> name of a checkpoint of ``source`` (``b0_teacher0``, ...); its files
    are linked into ``target`` under the same name and the role points to it. ``rename``: model names
    of the copied metric rows (source name -> target name; rows of other models are dropped when
    ``rename`` is given).
    """
    src_state = source.read_state()
    missing = [s for s in stages if s not in src_state["completed"]]
    if missing:
        raise CcdrecError(f"{source.path}: cannot share stages it has not completed: {missing[:3]}")
    state = target.read_state()
    if state["completed"]:
        raise CcdrecError(f"{target.path}: shared stages can only seed a fresh run directory")
    for name in checkpoints.values():
        files = [f for f in (source.ckpt(f"{name}.pt"), source.ckpt(f"{name}.json")) if f.exists()]
        if not files:
            raise CcdrecError(f"{source.path}: checkpoint {name!r} is missing")
        for f in files:
            link_file(f, target.ckpt(f.name))
    rows = []
    for r in source.read_metrics():
        if r.get("stage") not in stages:
            continue
        if rename is not None:
            if r.get("model") not in rename:
                continue
            r = {**r, "model": rename[r["model"]]}
        rows.append(r)
    target.append_metrics(rows)
    state["pointers"].update(checkpoints)
    src_outputs = src_state.get("outputs", {})
    state.setdefault("outputs", {}).update(
        {s: {r: c for r, c in src_outputs[s].items() if checkpoints.get(r) == c} for s in stages if s in src_outputs}
    )
    state["completed"].extend(stages)
    state["seconds"].update(dict.fromkeys(stages, 0.0))
    state["shared"] = {**state.get("shared", {}), **dict.fromkeys(stages, str(source.path))}
    state["block"] = max((stage_block(s) for s in stages), default=0)
    target.write_state(state)


def model_prefix(rd: RunDir) -> str:
    """The prefix of a run's model names: ``""`` for a CCD run, ``"<method>:"`` for a CL run."""
    for r in rd.read_metrics():
        if r.get("kind") == "test" and str(r.get("model", "")).endswith("teacher"):
            return r["model"][: -len("teacher")]
    return ""


def block0_start(rd: RunDir, cfg: RunConfig) -> str:
    """What a run's ``b0/student`` is: ``"distilled"`` (D_0, CCD's) or, for a CL run
    (:mod:`ccdrec.pipeline.competitors`), its ``competitors.start``."""
    return cfg.competitors.start if rd.read_state().get("method") is not None else "distilled"


def share_block0(source: RunDir, target: RunDir, n_members: int, prefix: str | None = None) -> None:
    """Seed ``target``, a fresh run, with block 0 of ``source`` (a CCD or CL run of the same block 0):
    the teacher members, D_0 and the block-0 metric rows. The student and block 0's evaluation are
    shared only when both runs start the same student (:func:`block0_start`; a plain start also needs
    the same ``teacher.base``); else ``target`` trains and evaluates its own.

    ``prefix``: the model-name prefix of a competitor ``target`` (``"finetune:"``; the rows are renamed
    to it); None for a CCD ``target`` (an ablation), which also takes D_0's proxies and E_0's top lists.
    """
    src_cfg, tgt_cfg = source.load_config(), target.load_config()
    check_shareable(src_cfg, tgt_cfg, source.path)
    stages = [f"b0/teacher{m}" for m in range(n_members)]
    checkpoints = {f"teacher{m}": f"b0_teacher{m}" for m in range(n_members)}
    start = block0_start(source, src_cfg)
    if start == block0_start(target, tgt_cfg) and (start == "distilled" or src_cfg.teacher.base == tgt_cfg.teacher.base):
        stages += ["b0/student", "b0/eval"]  # else the target makes its own student (and evaluates block 0 with it)
        checkpoints["student"] = "b0_student"
    rename = None
    if prefix is None:
        checkpoints["proxies"] = "b0_proxies"
        if source.ckpt("b0_teacher_top.pt").exists():
            checkpoints["teacher_top"] = "b0_teacher_top"  # E_0's top lists: block 1's student update reuses them
    else:
        src = model_prefix(source)
        roles = ["teacher", "student"] + [f"teacher{m}" for m in range(n_members)]
        rename = {f"{src}{r}": f"{prefix}{r}" for r in roles}
    share_stages(source, target, stages, checkpoints, rename)


def base_signature(cfg) -> dict:
    """The configuration fields that determine block 0 (teacher members, E_0, D_0 and its evaluation).

    Two runs whose signatures are equal train identical block-0 models, so one can share them with the
    other (:func:`share_stages`).
    """
    t, s = cfg.teacher, cfg.student
    kinds = {m.kind for m in t.members}
    return {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "ks": list(cfg.ks),
        "members": [m.model_dump() for m in t.members],
        # a schedule matters only if some member trains with it
        "base": t.base.model_dump() if kinds - {"vae"} else None,
        "base_vae": t.base_vae.model_dump() if "vae" in kinds else None,
        "ensemble_exact_top": t.ensemble_exact_top,
        "student_model": s.model.model_dump(),
        "distill": s.distill.model_dump(),
        "topn": s.topn,
        "user_samples": s.user_samples,
        "item_samples": s.item_samples,
        "rrd_weight": s.rrd_weight,
        "distill_cover": s.distill_cover,
    }


def check_shareable(source_cfg, target_cfg, source_path: Path) -> None:
    """Raise unless ``source_cfg`` and ``target_cfg`` train the same block-0 models."""
    a, b = base_signature(source_cfg), base_signature(target_cfg)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise CcdrecError(f"{source_path}: cannot share its block-0 models: the configurations differ in {', '.join(diff)}")
