"""``ccdrec compare``: CCD, its continual-learning competitors and its ablations on one harness.

A comparison directory holds one run directory per method and the comparison report::

    OUT/config.yaml            the base (CCD) configuration every method shares
    OUT/compare.json           the methods and ablations of the comparison (what --resume continues)
    OUT/ccd/                   CCD (:func:`ccdrec.pipeline.ccd.run_stream`)
    OUT/finetune/, OUT/lwckd/, OUT/lwckd-piw/, OUT/retrain/
                               the CL competitors (:mod:`ccdrec.pipeline.competitors`)
    OUT/ablation-NAME/         CCD with one switch (:data:`ABLATIONS`)
    OUT/kd-only/, OUT/kd-once/ distillation without continual student updates (:data:`KD_METHODS`)
    OUT/report.md, OUT/plots/  the comparison (:mod:`ccdrec.report.compare`)

Block 0 is trained once: the first run (CCD when it takes part) trains the teacher members and
distils D_0; every other run is seeded with those checkpoints (hard links) and their block-0
metric rows (:func:`ccdrec.pipeline.staged.share_stages`), so all methods start from identical
models. Ablations and the kd methods change only block k >= 1 switches, so they share CCD's block 0
(with its proxies); ``base_from`` (a sweep over cadences, :mod:`ccdrec.pipeline.sweep`) shares the
block 0 of another comparison's CCD run.
Every sub-run resumes after its last completed stage; ``--resume OUT`` continues the whole comparison.
``--from-run RUN`` starts a comparison from an existing ``ccdrec run`` directory: its configuration
is the comparison's, and its stages become CCD's (checkpoints linked, small files copied).

With the local executor the runs go one after another in this process (:func:`run_locally`). With
``--executor ray`` (:mod:`ccdrec.pipeline.cluster`) every run is a Ray task (:func:`run_on_ray`): the
run that trains block 0 goes first, up to ``b0/eval``; then every run, its rest included, at once,
each task declaring this process's CPU threads (``--threads``) and one GPU when the device is CUDA.
The driver creates the run directories (block 0 shared as above) and prints each run as its task
returns; a task checks its node as a teacher-member task does, then resumes its run from its
directory with the local executor, so the results are the local executor's. The comparison
directory must therefore be on storage every node reaches at the same path. A task whose worker or
node died runs once more; a run that still does not finish is named in one
:class:`~ccdrec.errors.StageLost` line after the others have finished, and ``--resume OUT`` continues.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.console import Console

from ccdrec.arguments import check_int
from ccdrec.checkpoint import atomic_write_json, read_json
from ccdrec.config import RunConfig
from ccdrec.data.stream import INTERACTIONS, UNIVERSE, Stream, load_stream
from ccdrec.device import resolve_device
from ccdrec.errors import CcdrecError, InvalidArgument, StageLost, WrongArgumentType
from ccdrec.option_values import comma_values, one_of, shell_word
from ccdrec.pipeline import cluster
from ccdrec.pipeline.ccd import run_stream
from ccdrec.pipeline.competitors import CL_METHODS, run_competitor, start_competitor
from ccdrec.pipeline.rundir import COMPARE_FILE, STREAM_FILE, RunDir, enclosing, refuse_part
from ccdrec.pipeline.staged import StopRequested, link_file, share_block0
from ccdrec.serve_bench import bench_markdown, bench_records, bench_serve, read_bench

CONFIG_FILE = "config.yaml"
BENCH_FILE = "bench_serve.json"


def _zero_replay(data: dict, side: str, fields: tuple[str, ...]) -> None:
    """Set ``fields`` of the ``side`` (student / teacher) replay budget to 0, per-block overrides included."""
    for f in fields:
        data[side]["replay"][f] = 0
    for override in data.get("blocks", {}).values():
        rc = override.get(f"{side}_replay")
        if rc is not None:
            for f in fields:
                rc[f] = 0


def _set(path: str, value) -> Callable[[dict], None]:
    def apply(data: dict) -> None:
        node = data
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value

    return apply


def _no_replay(data: dict) -> None:
    _zero_replay(data, "student", ("n_stability", "n_plasticity"))
    data["teacher"]["student_knowledge"] = False


ABLATIONS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "random-init": ("random instead of entity initialisation of new rows", _set("student.init", "random")),
    "one-hop-init": ("1-hop entity initialisation only", _set("student.init", "one_hop")),
    "no-proxies": (
        "neither proxy (n_S = n_P = 0 in student and teacher replay; the teacher still replays CL_k)",
        lambda d: (
            _zero_replay(d, "student", ("n_stability", "n_plasticity")),
            _zero_replay(d, "teacher", ("n_stability", "n_plasticity")),
        ),
    ),
    "no-stability": (
        "no stability proxy (n_S = 0 in student and teacher replay)",
        lambda d: (_zero_replay(d, "student", ("n_stability",)), _zero_replay(d, "teacher", ("n_stability",))),
    ),
    "no-plasticity": (
        "no plasticity proxy (n_P = 0 in student and teacher replay)",
        lambda d: (_zero_replay(d, "student", ("n_plasticity",)), _zero_replay(d, "teacher", ("n_plasticity",))),
    ),
    "no-replay": ("no replay at all (student replay off, teacher update without student knowledge)", _no_replay),
    "no-student-knowledge": ("teacher update without student-side replay", _set("teacher.student_knowledge", False)),
    "no-redistill": ("no re-distillation: keep updating the same student", _set("student.redistill", False)),
}


NEVER = 10**9  # a teacher update cycle longer than any stream: the teacher system is never updated


def _kd_only(data: dict) -> None:
    data["student"]["continual"] = False
    data["teacher"]["student_knowledge"] = False


def _kd_once(data: dict) -> None:
    _kd_only(data)
    data["student"]["redistill"] = False
    data["teacher"]["update_every"] = NEVER


KD_METHODS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "kd-only": (
        "a fresh D_k distilled at every teacher cycle and served unchanged (grown untrained) until the next; "
        "no student update, the teacher updated without student-side knowledge",
        _kd_only,
    ),
    "kd-once": (
        "the teacher system trained and D_0 distilled once, then served for ever (grown untrained); nothing updated",
        _kd_once,
    ),
}
METHODS = ("ccd", *KD_METHODS, *CL_METHODS)
DEFAULT_METHODS = ("ccd", *CL_METHODS)


def variant_config(cfg: RunConfig, switch: Callable[[dict], None]) -> RunConfig:
    """``cfg`` with ``switch`` applied to its JSON form, validated again."""
    data = cfg.model_dump(mode="json")
    switch(data)
    return RunConfig.model_validate(data)


def ablation_config(cfg: RunConfig, name: str) -> RunConfig:
    """CCD's configuration with the switch of ablation ``name`` (:data:`ABLATIONS`)."""
    if name not in ABLATIONS:
        raise CcdrecError(f"unknown ablation {name!r}; expected one of {', '.join(ABLATIONS)}")
    return variant_config(cfg, ABLATIONS[name][1])


def effective_ablations(cfg: RunConfig, ablations: list[str], console: Console | None = None) -> list[str]:
    """The ``ablations`` whose switch changes ``cfg`` (e.g. no-plasticity does nothing where n_P is 0
    on both sides already, as in the Yelp preset); the others are reported on ``console`` and dropped."""
    out = []
    for a in ablations:
        if ablation_config(cfg, a) == cfg:
            if console is not None:
                console.print(f"ablation {a} ({ABLATIONS[a][0]}) changes nothing in this configuration: skipped")
        else:
            out.append(a)
    return out


def parse_methods(text: str) -> list[str]:
    """``"ccd,finetune,lwckd"`` -> the list; an unknown, empty or repeated entry is a one-line error."""
    return comma_values(text, "--methods", one_of(METHODS, "method"))


def parse_ablations(text: str | None, enabled: bool) -> list[str]:
    """All ablations when ``enabled`` and ``text`` is None, else the comma-separated names in ``text``
    (an unknown, empty or repeated entry is a one-line error; so is giving both, which would leave one unsaid)."""
    if text is None:
        return list(ABLATIONS) if enabled else []
    if enabled:
        raise CcdrecError("--ablations runs every ablation and --ablation names some: give one of them")
    return comma_values(text, "--ablation", one_of(ABLATIONS, "ablation"))


def ablation_dir(name: str) -> str:
    return f"ablation-{name}"


def _started(d: Path) -> bool:
    return (d / "state.json").exists()


def _check_fresh(d: Path) -> None:
    if d.exists() and any(d.iterdir()) and not _started(d):
        raise CcdrecError(f"{d}: exists without state.json (an interrupted start); remove it and resume")


def adopt_run(source: Path, target: Path) -> None:
    """Make the CCD run directory ``source`` (already checked) the comparison's ``target`` (OUT/ccd).

    Checkpoints are hard-linked (never rewritten in place); the config, state and metrics are copied, so
    that finishing an incomplete run inside the comparison leaves ``source`` as it was.
    """
    src = RunDir.open(source)
    for f in sorted(p for p in src.path.rglob("*") if p.is_file()):
        rel = f.relative_to(src.path)
        if rel.parts[0] == "checkpoints":
            link_file(f, target / rel)
        elif rel.parts[0] in (CONFIG_FILE, STREAM_FILE, src.state_path.name, src.metrics_path.name):
            target.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(f.read_bytes())


def read_plan(out: Path) -> tuple[RunConfig, dict]:
    if out.is_file():
        raise CcdrecError(f"{out}: a file, not a comparison directory (one that `ccdrec compare` wrote)")
    if not out.is_dir():
        raise CcdrecError(f"{out}: no such comparison directory to resume")
    if not (out / COMPARE_FILE).exists():
        hint = ""
        if (out / "state.json").exists():
            hint = f": a run directory; continue it with ccdrec run --resume {shell_word(out)}"
        elif any((out / f).exists() for f in (UNIVERSE, INTERACTIONS)):
            hint = f": a stream directory (of `ccdrec data prepare`); compare on it with ccdrec compare --data {shell_word(out)}"
        raise CcdrecError(f"{out}: not a comparison directory (no {COMPARE_FILE}){hint}")
    plan = read_json(out / COMPARE_FILE)
    cfg = RunDir(out).load_config()
    return cfg, plan


def check_plan_arguments(cfg, methods, ablations, workers, max_blocks, resume: bool):
    """The arguments a comparison or a sweep shares, checked before anything is created: ``cfg`` a
    :class:`RunConfig` validated again (:meth:`~ccdrec.config.Strict.checked`), with ``max_blocks`` in it
    for a new one; ``methods`` / ``ablations`` None or non-empty lists of names (one string would be read
    letter by letter); ``workers`` an int of at least 1, ``max_blocks`` of at least 0. Returns
    ``(cfg, methods, ablations, workers, max_blocks)``."""
    if cfg is not None:
        if not isinstance(cfg, RunConfig):
            raise WrongArgumentType(
                f"cfg must be a ccdrec.config.RunConfig, not {type(cfg).__name__}: ccdrec.presets.load_config(...) makes one"
            )
        if max_blocks is not None and not resume:
            cfg = cfg.model_copy(update={"max_blocks": max_blocks})
        cfg = cfg.checked()
    for name, names in (("methods", methods), ("ablations", ablations)):
        if names is None:
            continue
        if isinstance(names, str) or not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise WrongArgumentType(f"{name} must be a list of names such as ['ccd', 'finetune'], not {names!r:.60}")
        if not names and name == "methods":
            raise InvalidArgument("methods is empty: give some, or None for the default methods")
    workers = None if workers is None else check_int("workers", workers)
    max_blocks = None if max_blocks is None else check_int("max_blocks", max_blocks, minimum=0)
    return cfg, None if methods is None else list(methods), None if ablations is None else list(ablations), workers, max_blocks


def run_compare(
    cfg: RunConfig | None,
    out: Path,
    methods: list[str] | None = None,
    ablations: list[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    bench: bool | None = None,
    bench_repeats: int = 3,
    from_run: Path | None = None,
    workers: int | None = None,
    max_blocks: int | None = None,
    base_from: Path | None = None,
    opened: Callable[[Path], None] | None = None,
    *,
    cell: bool = False,
) -> Path:
    """Run (or resume) a comparison into ``out``; returns the path of the comparison report.

    ``methods``: some of :data:`METHODS`; ``ablations``: some of :data:`ABLATIONS` (CCD takes part
    whenever ablations do). ``bench``: measure the serving cost of CCD's final teacher and student
    (:func:`ccdrec.serve_bench.bench_serve`) for the report (None: as the comparison was started, which
    ``compare.json`` records; a new one measures it). ``from_run``: an existing CCD run
    directory that becomes the comparison's CCD run (:func:`adopt_run`); its configuration replaces ``cfg``.
    On ``resume``, ``methods`` and ``ablations`` are added to the comparison's, and ``max_blocks`` takes
    every run on to that block (:meth:`RunDir.set_max_blocks`). ``base_from``: a CCD run directory of the
    same block 0 whose block-0 models a new CCD run shares instead of training them. ``opened`` is called
    with ``out`` once every check has passed and the comparison directory is created (or reopened).
    A comparison that is a cell of a sweep gets ``methods``, ``ablations`` and ``max_blocks`` on
    ``resume`` from its sweep only (``cell=True``; otherwise they are refused: :func:`refuse_part`).

    With the ``ray`` executor (the configuration's, or :func:`ccdrec.pipeline.cluster.use_executor`'s)
    the runs are Ray tasks (:func:`run_on_ray`); else they run here one after another. Raises
    CcdrecError for a directory, plan or option that cannot be used; StageLost when a run's task (or a
    stage of a run) was lost, after the others have finished.
    """
    cfg, methods, ablations, workers, max_blocks = check_plan_arguments(cfg, methods, ablations, workers, max_blocks, resume)
    bench_repeats = check_int("bench_repeats", bench_repeats)
    out = Path(out)
    console = console or Console(quiet=not progress)
    if cfg is not None and not resume:
        check_run_tasks(cfg)  # before anything is created
    cfg, plan, stream = open_comparison(cfg, out, methods, ablations, resume, from_run, workers, max_blocks, console, cell=cell)
    if bench is None:  # as the comparison was started: --resume keeps a --no-bench
        bench = plan.get("bench", True)
    elif plan.get("bench", True) != bench:
        plan = {**plan, "bench": bench}
        atomic_write_json(out / COMPARE_FILE, plan)
    if opened is not None:
        opened(out)
    comparison = Comparison(out, cfg, stream, plan["methods"], plan["ablations"], base_from)
    if cluster.chosen_executor(cfg.executor, cfg.ray_address)[0] == "ray":
        run_on_ray([comparison], out, console, workers)
    else:
        run_locally(comparison, progress, console, workers)
    return finish_comparison(comparison, bench, bench_repeats)


@dataclass(frozen=True)
class Comparison:
    """A comparison directory ready to run: its configuration and stream, its methods and ablations,
    and ``base_from``, the CCD run whose block 0 a new CCD run of it shares (None: it trains its own)."""

    out: Path
    cfg: RunConfig
    stream: Stream
    methods: list[str]
    ablations: list[str]
    base_from: Path | None = None


def open_comparison(
    cfg: RunConfig | None,
    out: Path,
    methods: list[str] | None,
    ablations: list[str] | None,
    resume: bool,
    from_run: Path | None,
    workers: int | None,
    max_blocks: int | None,
    console: Console,
    *,
    cell: bool = False,
) -> tuple[RunConfig, dict, Stream]:
    """Create the comparison directory ``out`` (configuration, stream record, plan; ``from_run``
    adopted as its CCD run), or reopen it on ``resume`` (plan extended, ``max_blocks`` applied); returns
    its configuration, plan and stream. Every check passes before anything is created or changed
    (CcdrecError otherwise)."""
    top = RunDir(out)
    if workers is not None and workers < 1:
        raise CcdrecError(f"workers must be at least 1, got {workers}")
    if resume:
        cfg, plan = read_plan(out)
        stream = top.open_stream(cfg)  # every check before anything changes
        if not cell:
            _refuse_changing_a_part(cfg, out, plan, methods, ablations, max_blocks)
        merged = merge_plan(cfg, plan, methods or [], ablations or [], console)
        if merged != plan:
            plan = merged
            atomic_write_json(out / COMPARE_FILE, plan)
        if max_blocks is not None:
            cfg = _extend_blocks(out, plan, max_blocks)
        return cfg, plan, stream
    top.check_creatable("comparison directory")
    if from_run is not None:
        source = RunDir.open(from_run)
        cfg = source.load_config()
        takes = "--from-run takes a run of ccdrec run or a comparison's ccd/"
        if (method := source.read_state().get("method")) is not None:  # a run directory, checked before anything
            raise CcdrecError(f"{from_run} is a run of {method}, not of CCD: {takes}")
        real = Path(from_run).resolve()  # a link to a comparison's run is that run
        if (whole := enclosing(real)) is not None and real.name != "ccd":
            raise CcdrecError(f"{from_run} is the {real.name} run of the {whole[0]} {whole[1]}, not its CCD run: {takes}")
        stream = source.open_stream(cfg)
    elif cfg is None:
        raise CcdrecError("a configuration is needed to start a comparison")
    else:
        stream = load_stream(cfg.dataset)
    methods = list(methods or DEFAULT_METHODS)
    if from_run is not None and "ccd" not in methods:
        methods.insert(0, "ccd")
    plan = merge_plan(cfg, {"version": 1, "methods": [], "ablations": []}, methods, ablations or [], console)
    resolve_device(cfg.device)  # refused before anything is created
    out.mkdir(parents=True, exist_ok=True)
    top.save_config(cfg)
    top.record_stream(cfg, stream)
    atomic_write_json(out / COMPARE_FILE, plan)
    if from_run is not None:
        adopt_run(from_run, out / "ccd")
    return cfg, plan, stream


def run_locally(c: Comparison, progress: bool, console: Console, workers: int | None) -> None:
    """Run (or resume) every run of ``c`` in this process, one after another: CCD, the kd methods, the
    CL competitors, the ablations. The first of CCD and the competitors trains block 0; the others share it."""
    out, cfg, stream, methods, ablations = c.out, c.cfg, c.stream, c.methods, c.ablations
    n = len(cfg.teacher.members)
    base: Path | None = None
    if "ccd" in methods:
        d = out / "ccd"
        _check_fresh(d)
        console.print(f"[bold]== ccd[/bold] ({d})")
        if c.base_from is not None and not _started(d):
            _start_shared(d, cfg, stream, Path(c.base_from), n)
        run_stream(None if _started(d) else cfg, d, resume=_started(d), progress=progress, console=console, workers=workers)
        base = d
    for m in (x for x in methods if x in KD_METHODS):
        d = out / m
        _check_fresh(d)
        console.print(f"[bold]== {m}[/bold] ({d}): {KD_METHODS[m][0]}")
        if not _started(d):
            _start_shared(d, variant_config(cfg, KD_METHODS[m][1]), stream, out / "ccd", n)
        run_stream(None, d, resume=True, progress=progress, console=console, workers=workers)
    for m in (x for x in methods if x in CL_METHODS):
        d = out / m
        _check_fresh(d)
        console.print(f"[bold]== {m}[/bold] ({d})")
        if _started(d):
            run_competitor(None, d, m, resume=True, progress=progress, console=console, workers=workers)
        else:
            run_competitor(cfg, d, m, progress=progress, console=console, base_from=base, workers=workers)
        base = base or d
    for a in ablations:
        d = out / ablation_dir(a)
        _check_fresh(d)
        console.print(f"[bold]== ablation {a}[/bold] ({d}): {ABLATIONS[a][0]}")
        if not _started(d):
            _start_shared(d, ablation_config(cfg, a), stream, out / "ccd", n)
        run_stream(None, d, resume=True, progress=progress, console=console, workers=workers)


def finish_comparison(c: Comparison, bench: bool = True, bench_repeats: int = 3) -> Path:
    """Measure CCD's serving cost (``bench``; else reuse an earlier measurement) and write the
    comparison report of ``c``, whose runs have finished; returns the report's path."""
    out, cfg, methods, ablations = c.out, c.cfg, c.methods, c.ablations
    bench_rows = None
    if "ccd" in methods:
        if bench:
            bench_rows = bench_serve(out / "ccd", repeats=bench_repeats, device=cfg.device)
            atomic_write_json(out / BENCH_FILE, bench_records(bench_rows))
        elif (out / BENCH_FILE).exists():
            bench_rows = read_bench(out / BENCH_FILE)  # measured by an earlier pass
    from ccdrec.report.compare import write_compare_report

    notes = variant_notes(methods, ablations)
    serving = bench_markdown(bench_rows) if bench_rows is not None else None
    return write_compare_report(out, comparison_runs(out, methods, ablations), serving, notes, start_note(cfg, methods))


# --- the runs as Ray tasks ----------------------------------------------------------------------


def run_names(methods: list[str], ablations: list[str]) -> list[str]:
    """The run directories of a comparison in the order they run locally: CCD, the kd methods, the CL
    competitors, the ablations."""
    kd, cl = [m for m in methods if m in KD_METHODS], [m for m in methods if m in CL_METHODS]
    return [*(["ccd"] if "ccd" in methods else []), *kd, *cl, *map(ablation_dir, ablations)]


def block0_owner(methods: list[str]) -> str | None:
    """The run that trains a comparison's block 0: CCD when it takes part, else the first CL competitor."""
    return "ccd" if "ccd" in methods else next((m for m in methods if m in CL_METHODS), None)


def check_run_tasks(cfg: RunConfig) -> None:
    """With the ``ray`` executor: join the cluster and check that a node can run one comparison run's
    task (this process's threads as CPUs, a GPU on CUDA); nothing with ``local``. Raises CcdrecError."""
    threads, gpus = cluster.task_threads(), int(resolve_device(cfg.device).type == "cuda")
    cluster.precheck(cfg.executor, cfg.ray_address, threads, gpus, "a comparison run's task", "give fewer --threads")


def _create_run(c: Comparison, name: str) -> None:
    """Create run ``name`` of ``c`` (not started) for a task to resume: seeded with block 0 of the
    block-0 owner (of ``c.base_from`` for CCD); the owner without ``base_from`` trains its own."""
    d, n, owner = c.out / name, len(c.cfg.teacher.members), block0_owner(c.methods)
    if name == "ccd":
        if c.base_from is not None:
            _start_shared(d, c.cfg, c.stream, Path(c.base_from), n)
        else:
            RunDir(d).create(c.cfg, c.stream)
    elif name in CL_METHODS:
        rd = RunDir(d)
        rd.create(c.cfg, c.stream)
        start_competitor(rd, name, n, None if name == owner else c.out / str(owner))
    else:
        switch = KD_METHODS[name][1] if name in KD_METHODS else ABLATIONS[name.removeprefix("ablation-")][1]
        _start_shared(d, variant_config(c.cfg, switch), c.stream, c.out / "ccd", n)


def _completed(d: Path) -> list[str]:
    return RunDir(d).read_state()["completed"] if _started(d) else []


def run_on_ray(comparisons: list[Comparison], top: Path, console: Console, workers: int | None) -> None:
    """Run (or resume) every run of ``comparisons`` as a Ray task (:func:`_resume_in_task`) on the
    cluster of the first one's executor (:func:`ccdrec.pipeline.cluster.chosen_executor`).

    First the block-0 owners (:func:`block0_owner`) that have not finished block 0, one task each up
    to ``b0/eval``; then every run, the owners' rest included, one task each, at once. The driver creates
    the runs (block 0 shared as :func:`run_locally` shares it); a task resumes its run from its
    directory with the local executor, this process's CPU threads (its declared CPUs) and one GPU when
    the device is CUDA, so the results are the local executor's. ``top``: the directory the runs are
    named relative to. Raises CcdrecError before any task when the cluster cannot run one
    (:func:`ccdrec.pipeline.cluster.check_resources`) or a run directory was left half-created; StageLost
    naming the runs that did not finish, once the others have."""
    first = comparisons[0].cfg
    check_run_tasks(first)
    threads, gpus = cluster.task_threads(), int(resolve_device(first.device).type == "cuda")
    for c in comparisons:  # every run directory checked before any task starts
        for name in run_names(c.methods, c.ablations):
            _check_fresh(c.out / name)
    owners = []
    for c in comparisons:
        owner = block0_owner(c.methods)
        if owner is None or (owner == "ccd" and c.base_from is not None and not _started(c.out / owner)):
            continue  # no runs, or CCD shares its block 0 (created below, once base_from has it)
        d = c.out / owner
        if not _started(d):
            _create_run(c, owner)
        if "b0/eval" not in _completed(d):
            owners.append(d)
    need = f"{threads} CPU{'s' if threads > 1 else ''}" + (", 1 GPU" if gpus else "")
    if owners:
        console.print(f"[bold]== block 0[/bold] of {', '.join(_label(d, top) for d in owners)} (Ray tasks, {need} each)")
        _run_tasks(owners, top, threads, gpus, workers, console, stop_after="b0/eval")
    runs = []
    for c in comparisons:
        for name in run_names(c.methods, c.ablations):
            if not _started(c.out / name):
                _create_run(c, name)
            runs.append(c.out / name)
    console.print(f"[bold]== {', '.join(_label(d, top) for d in runs)}[/bold] (Ray tasks, {need} each)")
    _run_tasks(runs, top, threads, gpus, workers, console)


def _label(d: Path, top: Path) -> str:
    return d.relative_to(top).as_posix()


def _run_tasks(
    runs: list[Path], top: Path, threads: int, gpus: int, workers: int | None, console: Console, stop_after: str | None = None
) -> None:
    """Resume ``runs`` (run directories the driver created) as Ray tasks declaring ``threads`` CPUs and
    ``gpus`` GPUs, each in a fresh worker process (which lets go of its run directory when it ends), and
    print each as its task returns. A task first checks its node (:func:`ccdrec.pipeline.cluster._stage_task`:
    the driver's versions, the run directory as the driver last wrote it) and runs once more if its
    worker or node died. Raises StageLost naming the runs that did not finish once the others have;
    re-raises a run's own exception (a bug; the other tasks cancelled); on an interruption the tasks
    are cancelled and the interruption re-raised."""
    ray = cluster.import_ray()
    task = ray.remote(max_calls=1)(cluster._stage_task)  # a fresh worker process for every run
    expected = cluster.versions()
    resume = partial(_resume_in_task, threads=threads, workers=workers, stop_after=stop_after)
    pending = {}
    for d in runs:
        path, done = str(d.resolve()), _completed(d)
        options = {"num_cpus": threads, "num_gpus": gpus, "max_retries": cluster.STAGE_RETRIES}
        ref = task.options(name=f"ccdrec compare {_label(d, top)}", **options).remote(
            resume, path, path, done[-1] if done else None, expected
        )
        pending[ref] = _label(d, top)
    lost = cluster.await_tasks(
        pending,
        lambda label, seconds: console.print(f"  {label} done ({seconds:.1f} s)"),
        _run_failure,
        lambda label: f"in run {label} of the comparison, a Ray task",
    )
    for label, why in lost:
        console.print(f"  {label} {why}")
    if lost:
        what = "; ".join(f"run {label} {why}" for label, why in lost)
        raise StageLost(f"{what}; the completed runs and stages are kept")


def _run_failure(e: BaseException) -> str | None:
    """Why a run's task did not finish, in a few words; None for an exception of the run's own code (a bug)."""
    ray = cluster.import_ray()
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, StageLost):
        return f"lost: {e.cause}"  # a local worker process of the run died
    return cluster._stage_failure(e)


def _hold_when_free(rd: RunDir) -> None:
    """Take the run directory (:meth:`RunDir.hold`), waiting up to ``cluster.VISIBLE_WAIT_S`` for the worker
    process of the run's previous task (its block 0), which holds it until that process has exited.
    Raises CcdrecError when another process still holds it then."""
    deadline = time.monotonic() + cluster.VISIBLE_WAIT_S
    while True:
        try:
            rd.hold()
            return
        except CcdrecError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _resume_in_task(path: str, threads: int, workers: int | None, stop_after: str | None = None) -> float:
    """A Ray task: resume the comparison run at ``path`` (CCD-family or, when its state names a method,
    a CL competitor) with the local executor and ``threads`` CPU threads, to its end or to ``stop_after``;
    returns its wall seconds. Raises CcdrecError when the run cannot be reopened or stays in use."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    d = Path(path)
    _hold_when_free(RunDir(d))
    method = RunDir(d).read_state().get("method")
    with cluster.use_executor("local"), suppress(StopRequested):
        if method is not None:
            run_competitor(None, d, method, resume=True, progress=False, stop_after=stop_after, workers=workers)
        else:
            run_stream(None, d, resume=True, progress=False, stop_after=stop_after, workers=workers)
    return time.perf_counter() - start


def start_note(cfg: RunConfig, methods: list[str]) -> str | None:
    """The report's sentence on where the methods start and how the competitors' Mult-VAE members are
    updated, when it differs from the default (every method from the same members and D_0)."""
    c = cfg.competitors
    competing = [m for m in methods if m in CL_METHODS]
    if not competing or (c.start == "distilled" and c.vae_kl):
        return None
    text = "Every method starts from the same block-0 teacher members (trained once); "
    if c.start == "plain":
        text += (
            "CCD's runs from D_0, the CL competitors' student-size model from the same model trained by BPR alone on "
            "block 0 (`competitors.start = plain`). "
        )
    else:
        text += "every student from D_0. "
    if not c.vae_kl and any(m.kind == "vae" for m in cfg.teacher.members):
        text += "The competitors' Mult-VAE members are updated without CCD's KL regulariser (`competitors.vae_kl = false`). "
    return text


def variant_notes(methods: list[str], ablations: list[str]) -> dict[str, str]:
    """Report label -> what it changes, for the kd methods and the ablations (labelled ``ccd/NAME``)."""
    return {m: KD_METHODS[m][0] for m in methods if m in KD_METHODS} | {f"ccd/{a}": ABLATIONS[a][0] for a in ablations}


def _start_shared(d: Path, cfg: RunConfig, stream, source: Path, n_members: int) -> None:
    """Create the CCD-family run ``d`` with ``cfg`` and seed it with block 0 of the CCD run ``source``."""
    rd = RunDir(d)
    rd.create(cfg, stream)
    share_block0(RunDir(source), rd, n_members)


def merge_plan(cfg: RunConfig, plan: dict, methods: list[str], ablations: list[str], console) -> dict:
    """``plan`` (a comparison's methods and ablations) with ``methods`` and ``ablations`` added, validated;
    ablations that change nothing in ``cfg`` are skipped, and CCD takes part whenever ablations or kd methods do."""
    for m in methods:
        if m not in METHODS:
            raise CcdrecError(f"unknown method {m!r}; expected some of {', '.join(METHODS)}")
    for a in ablations:
        if a not in ABLATIONS:
            raise CcdrecError(f"unknown ablation {a!r}; expected some of {', '.join(ABLATIONS)}")
    merged = list(dict.fromkeys([*plan["methods"], *methods]))
    new_ablations = [a for a in effective_ablations(cfg, list(dict.fromkeys(ablations)), console) if a not in plan["ablations"]]
    if (new_ablations or set(merged) & set(KD_METHODS)) and "ccd" not in merged:
        merged.insert(0, "ccd")
    return {**plan, "methods": merged, "ablations": [*plan["ablations"], *new_ablations]}


def _refuse_changing_a_part(
    cfg: RunConfig, out: Path, plan: dict, methods: list[str] | None, ablations: list[str] | None, max_blocks: int | None
) -> None:
    """Raise when the comparison ``out`` is a cell of a sweep and the resume would change its plan or its
    last block (:func:`refuse_part`), after the checks a sweep's own resume makes (so that the command
    it names works); a resume that changes nothing passes."""
    changes = []
    if merge_plan(cfg, plan, methods or [], ablations or [], Console(quiet=True)) != plan:
        changes += [f"--methods {','.join(methods)}" if methods else "", f"--ablation {','.join(ablations)}" if ablations else ""]
    if max_blocks is not None and max_blocks != cfg.max_blocks:
        for rd, _ in comparison_runs(out, plan["methods"], plan["ablations"]).values():
            if _started(rd.path):
                rd.check_max_blocks(max_blocks)
        changes.append(f"--max-blocks {max_blocks}")
    if change := " ".join(c for c in changes if c):
        refuse_part(out, change, "its comparisons keep one plan and stay at one block")


def _extend_blocks(out: Path, plan: dict, max_blocks: int) -> RunConfig:
    """Take the comparison and every run it has started on to block ``max_blocks``; its new configuration."""
    runs = [d for d, _ in comparison_runs(out, plan["methods"], plan["ablations"]).values() if _started(d.path)]
    for rd in runs:  # every run is checked before any is changed
        rd.check_max_blocks(max_blocks)
    for rd in runs:
        rd.set_max_blocks(max_blocks)
    top = RunDir(out)
    cfg = top.load_config().model_copy(update={"max_blocks": max_blocks})
    top.save_config(cfg)
    return cfg


def comparison_runs(out: Path, methods: list[str], ablations: list[str]) -> dict[str, tuple[RunDir, str]]:
    """Report label -> (run directory, kind ``ccd`` or ``cl``) of every run of a comparison."""
    runs: dict[str, tuple[RunDir, str]] = {}
    for m in methods:
        runs[m] = (RunDir(out / m), "cl" if m in CL_METHODS else "ccd")
    for a in ablations:
        runs[f"ccd/{a}"] = (RunDir(out / ablation_dir(a)), "ccd")
    return runs


__all__ = [
    "ABLATIONS",
    "DEFAULT_METHODS",
    "KD_METHODS",
    "METHODS",
    "Comparison",
    "start_note",
    "ablation_config",
    "block0_owner",
    "check_run_tasks",
    "comparison_runs",
    "effective_ablations",
    "finish_comparison",
    "open_comparison",
    "parse_ablations",
    "parse_methods",
    "run_compare",
    "run_locally",
    "run_names",
    "run_on_ray",
]
