"""Staged runs backed by a run directory: the stage-completion + pointers pattern, and shared stages.

A staged run is a list of named stages (``b0/teacher2``, ``b3/eval``, ...). Each stage returns the
checkpoints it wrote (``pointers``: role -> checkpoint name) and its metric rows; the stage counts as
done only when :meth:`StagedRun.complete` has appended the rows and then written ``state.json``, so an
interrupted run resumes after its last completed stage (the same protocol as
:class:`ccdrec.pipeline.ccd.CCDStream`).

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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ccdrec.data.stream import Stream
from ccdrec.distill.ensemble import RankEnsemble
from ccdrec.errors import CcdrecError
from ccdrec.eval.metrics import evaluate_many
from ccdrec.memory import keep_freed_memory, peak_rss_mb, release_freed_memory, reset_peak_rss
from ccdrec.pipeline.rundir import RunDir

Stage = tuple[str, Callable[[], dict]]


class StopRequested(Exception):
    """Raised after the stage named by ``stop_after`` (used to test resumption)."""


def stage_block(name: str) -> int:
    """The block index of a stage name ``bK/...``."""
    return int(name.split("/")[0][1:])


class StagedRun:
    """Runs ``stage_list()`` in order, skipping completed stages; subclasses define stages and ``restore``.

    Stages that :meth:`parallel_group` puts in one group (a block's teacher members: each depends only
    on its own previous version and on checkpoints written before the group) may run side by side in
    ``workers`` processes. A worker rebuilds the run from its directory with :meth:`open_worker`,
    runs one stage, which writes its checkpoints, and hands back the stage's pointers and rows; only
    this process writes ``state.json`` and ``metrics.jsonl``, so an interruption loses at most the
    stages still running, and a resumed run repeats exactly those.
    """

    workers = 1

    def __init__(self, run_dir: RunDir, progress: bool = True, console: Console | None = None):
        self.rd = run_dir
        self.progress = progress
        self.console = console or Console(quiet=not progress)
        self.state = run_dir.read_state()

    def stage_list(self) -> list[Stage]:
        raise NotImplementedError

    def restore(self) -> None:
        """Load the models the pointers of ``state.json`` name (resume)."""

    def parallel_group(self, name: str) -> str | None:
        """A key shared by stages that may run side by side (None: run this stage alone)."""
        return None

    @classmethod
    def open_worker(cls, path: Path) -> StagedRun:
        """This run, rebuilt in a worker process from its directory (without progress display)."""
        raise NotImplementedError

    def complete(
        self, name: str, pointers: dict[str, str], rows: list[dict], seconds: float, block: int, peak_mb: float | None = None
    ) -> None:
        for row in rows:
            row.setdefault("stage", name)
        self.rd.append_metrics(rows)
        self.state["pointers"].update(pointers)
        self.state["completed"].append(name)
        self.state["seconds"][name] = round(seconds, 3)
        if peak_mb is not None:
            self.state.setdefault("peak_rss_mb", {})[name] = round(peak_mb)
        self.state["block"] = block
        self.rd.write_state(self.state)

    def run(self, stop_after: str | None = None) -> None:
        keep_freed_memory()
        done = set(self.state["completed"])
        todo = self.stage_list()
        known = {name for name, _ in todo}
        if done - known:
            raise CcdrecError(f"{self.rd.path}: state names stages this configuration does not have: {sorted(done - known)[:3]}")
        self.restore()
        todo = [(name, fn) for name, fn in todo if name not in done]
        workers = self.workers
        if workers > 1 and not _main_can_be_spawned():
            self.console.print("one process: workers cannot re-import a program read from stdin")
            workers = 1
        i = 0
        while i < len(todo):
            name, fn = todo[i]
            group = self.parallel_group(name) if workers > 1 else None
            if group is not None:
                names = [name]
                while i + len(names) < len(todo) and self.parallel_group(todo[i + len(names)][0]) == group:
                    names.append(todo[i + len(names)][0])
                if len(names) > 1:
                    self.run_parallel(names)
                    i += len(names)
                    if stop_after in names:
                        raise StopRequested(stop_after)
                    continue
            self.console.print(f"[bold]{name}[/bold]")
            out, seconds, peak = run_measured(fn)
            self.complete(name, out["pointers"], out["rows"], seconds, stage_block(name), peak)
            i += 1
            if stop_after == name:
                raise StopRequested(name)

    def run_parallel(self, names: list[str]) -> None:
        """Run the stages ``names`` in ``workers`` spawned processes, completing each as it finishes,
        then reload the models their pointers name."""
        workers = min(self.workers, len(names))
        threads = max(1, torch.get_num_threads() // workers)
        self.console.print(f"[bold]{', '.join(names)}[/bold] ({workers} processes, {threads} threads each)")
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(),),
        )
        try:
            futures = {pool.submit(_run_in_worker, type(self), str(self.rd.path), n, threads): n for n in names}
            for fut in as_completed(futures):
                name = futures[fut]
                out, seconds, peak = fut.result()
                self.complete(name, out["pointers"], out["rows"], seconds, stage_block(name), peak)
                self.console.print(f"  {name} done ({seconds:.1f} s)")
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
    """A staged run holding teacher members (``self.members``) and a student (``self.student``).

    Subclasses set ``cfg`` and implement ``load(name)`` (a checkpoint attached to its graph).
    """

    cfg = None
    members: list
    student = None

    def load(self, name: str):
        raise NotImplementedError

    def restore(self) -> None:
        """Load the teacher members and the student that the pointers of ``state.json`` name (resume)."""
        ptr = self.state["pointers"]
        for m in range(len(self.members)):
            if f"teacher{m}" in ptr:
                self.members[m] = self.load(ptr[f"teacher{m}"])
        if "student" in ptr:
            self.student = self.load(ptr["student"])

    def parallel_group(self, name: str) -> str | None:
        """A block's teacher member stages (``bK/teacherM``) may run side by side."""
        block, _, role = name.partition("/")
        return f"{block}/teachers" if role.startswith("teacher") else None

    def ensemble(self) -> RankEnsemble:
        """The rank ensemble of the current teacher members (method.md 6)."""
        return RankEnsemble([m for m in self.members if m is not None], exact_top=self.cfg.teacher.ensemble_exact_top)

    def evaluate_and_show(self, models: dict, k: int) -> dict:
        """The stage result of block k's evaluation of ``models``; prints each model's r_(k,k)."""
        rows = evaluate_models(models, self.stream, k, tuple(self.cfg.ks))
        width = max(len(name) for name in models)
        for r in rows:
            if r["kind"] == "test" and r["j"] == k:
                self.console.print(
                    f"  block {k}  {r['model']:<{width}} test recall@20 {r['recall@20']:.4f}  ndcg@20 {r['ndcg@20']:.4f}"
                )
        return {"pointers": {}, "rows": rows}


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


def run_measured(fn: Callable[[], dict]) -> tuple[dict, float, float | None]:
    """A stage's result, wall seconds and own peak resident memory in MB (None where not measurable);
    the heap's free pages go back to the system after it (:mod:`ccdrec.memory`)."""
    measurable = reset_peak_rss()  # else VmHWM would be the whole process's peak
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb() if measurable else None
    release_freed_memory()
    return out, seconds, peak


def _run_in_worker(kind: type[StagedRun], path: str, name: str, threads: int) -> tuple[dict, float, float | None]:
    """Worker process: rebuild the run of ``kind`` at ``path``, run stage ``name``, return its result."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    runner = kind.open_worker(Path(path))
    runner.restore()
    return run_measured(dict(runner.stage_list())[name])


def evaluate_models(models: dict, stream: Stream, k: int, ks: tuple[int, ...]) -> list[dict]:
    """r_{k,j} rows (test split of every block j <= k), block k's new-user rows and its validation row
    (``kind: valid``; the teacher ensemble's own validation quality), per named model (method.md 8)."""
    rows = []
    block = stream[k]
    requests = [("valid", k, block, "valid", None)] + [("test", j, stream[j], "test", None) for j in range(k + 1)]
    if k > 0:
        requests.append(("new_users", k, block, "test", np.arange(block.prev_users, block.n_users)))
    for name, model in models.items():
        results = evaluate_many(model, [(b, split, users) for _, _, b, split, users in requests], ks=ks)
        for (kind, j, *_), out in zip(requests, results, strict=True):
            rows.append({"kind": kind, "model": name, "k": k, "j": j, **out})
    return rows


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
    state["completed"].extend(stages)
    state["seconds"].update(dict.fromkeys(stages, 0.0))
    state["shared"] = {**state.get("shared", {}), **dict.fromkeys(stages, str(source.path))}
    state["block"] = max((stage_block(s) for s in stages), default=0)
    target.write_state(state)


def fit_row(model: str, res, k: int, **extra) -> dict:
    """A ``kind: fit`` metric row from a :class:`ccdrec.train.loop.FitResult` (None: no training)."""
    row = {"kind": "fit", "model": model, "k": k, **extra}
    if res is not None:
        row.update({"best_epoch": res.best_epoch + 1, "epochs": res.epochs_run, "train_seconds": round(res.seconds, 3)})
        row.update({f"valid_{m}": v for m, v in res.best_valid.items() if m != "users"})
    return row


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
    }


def check_shareable(source_cfg, target_cfg, source_path: Path) -> None:
    """Raise unless ``source_cfg`` and ``target_cfg`` train the same block-0 models."""
    a, b = base_signature(source_cfg), base_signature(target_cfg)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise CcdrecError(f"{source_path}: cannot share its block-0 models: the configurations differ in {', '.join(diff)}")
