"""``ccdrec compare --seeds S1,S2,... --cadences M1,M2,...``: one comparison per seed and teacher cadence.

A sweep directory holds one comparison directory (:mod:`ccdrec.pipeline.compare`) per cell and the
sweep report::

    OUT/sweep.json             the cells' seeds and cadences, the methods and ablations
    OUT/config.yaml            the base configuration
    OUT/seed-S-every-M/        the comparison of seed S with the teacher updated every M student cycles
    OUT/report.md, OUT/plots/  the sweep (:mod:`ccdrec.report.sweep`)

A cell's configuration is the base one with ``seed = S`` (and every teacher member's seed moved by
``S x members``, so that the members differ between seeds too; seed 0 keeps the members' own seeds)
and ``teacher.update_every = M`` (method.md 5: the teacher update cycle CT = M student cycles).
Cells of one seed share block 0 (the teacher members and D_0 do not depend on the cadence): the
first cadence's CCD run trains it, the others link it. Every cell resumes after its last completed
stage; ``--resume OUT`` continues the whole sweep.

With the local executor the cells run one after another (:func:`ccdrec.pipeline.compare.run_compare`
each). With ``--executor ray`` every run of every cell is a Ray task
(:func:`ccdrec.pipeline.compare.run_on_ray`): the seeds' block 0 first, side by side, then all the
runs of all the cells at once; the results are the local executor's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from ccdrec.arguments import check_int
from ccdrec.checkpoint import atomic_write_json, read_json
from ccdrec.config import RunConfig
from ccdrec.data.stream import load_stream
from ccdrec.device import resolve_device
from ccdrec.errors import CcdrecError, InvalidArgument, WrongArgumentType
from ccdrec.option_values import comma_values
from ccdrec.pipeline import cluster
from ccdrec.pipeline.compare import (
    COMPARE_FILE,
    DEFAULT_METHODS,
    Comparison,
    check_plan_arguments,
    check_run_tasks,
    comparison_runs,
    finish_comparison,
    merge_plan,
    open_comparison,
    run_compare,
    run_on_ray,
    variant_notes,
)
from ccdrec.pipeline.rundir import SWEEP_FILE, RunDir


def parse_ints(text: str, option: str, minimum: int, maximum: int | None = None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: distinct integers in ``[minimum, maximum]``; a one-line error otherwise
    (an empty or repeated entry too: :mod:`ccdrec.option_values`)."""

    def parse(x: str) -> int:
        try:
            v = int(x)
        except ValueError:
            raise CcdrecError(f"{option} takes comma-separated integers, got {x!r}") from None
        if v < minimum:
            raise CcdrecError(f"{option}: every value must be at least {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise CcdrecError(f"{option}: every value must be at most {maximum}, got {v}")
        return v

    return comma_values(text, option, parse)


def cell_name(seed: int, cadence: int) -> str:
    return f"seed-{seed}-every-{cadence}"


def cell_config(cfg: RunConfig, seed: int, cadence: int) -> RunConfig:
    """The base configuration with run seed ``seed``, member seeds moved by ``seed x members`` and
    ``teacher.update_every = cadence``."""
    t = cfg.teacher
    n = len(t.members)
    members = [m.model_copy(update={"seed": m.seed + seed * n}) for m in t.members]
    teacher = t.model_copy(update={"members": members, "update_every": cadence})
    return RunConfig.model_validate(cfg.model_copy(update={"seed": seed, "teacher": teacher}).model_dump(mode="json"))


def is_sweep(out: Path) -> bool:
    return (Path(out) / SWEEP_FILE).exists()


def _int_list(name: str, values, least: int) -> list[int] | None:
    """``values`` (None: the default) as a non-empty list of distinct ints of at least ``least``."""
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, list | tuple) or not values:
        raise WrongArgumentType(f"{name} must be a non-empty list of ints, such as [0, 1, 2], not {values!r:.60}")
    checked = [check_int(f"{name}[{i}]", v, minimum=least) for i, v in enumerate(values)]
    if len(set(checked)) < len(checked):
        raise InvalidArgument(f"{name} repeats a value: {checked}")
    return checked


def run_sweep(
    cfg: RunConfig | None,
    out: Path,
    methods: list[str] | None = None,
    ablations: list[str] | None = None,
    seeds: list[int] | None = None,
    cadences: list[int] | None = None,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    workers: int | None = None,
    max_blocks: int | None = None,
    opened: Callable[[Path], None] | None = None,
) -> Path:
    """Run (or resume) a comparison for every (seed, cadence) cell into ``out``; returns the sweep report.

    ``seeds`` default to the configuration's seed, ``cadences`` to its ``teacher.update_every``. On
    ``resume`` the stored plan is continued (``methods`` and ``ablations`` are added to every cell) and
    ``max_blocks`` takes every cell on to that block. A cadence with no teacher cycle within the stream's
    blocks is noted on ``console``. ``opened`` is called with ``out`` once every check has passed and the
    sweep directory is created (or reopened).
    Raises :class:`CcdrecError` for a directory that is not a sweep, or not empty on a new sweep, and for
    ``workers`` below 1.
    """
    cfg, methods, ablations, workers, max_blocks = check_plan_arguments(cfg, methods, ablations, workers, max_blocks, resume)
    seeds, cadences = _int_list("seeds", seeds, 0), _int_list("cadences", cadences, 1)
    out = Path(out)
    console = console or Console(quiet=not progress)
    top = RunDir(out)
    if resume:
        if not is_sweep(out):
            raise CcdrecError(f"{out}: not a sweep directory (no {SWEEP_FILE})")
        plan = read_json(out / SWEEP_FILE)
        cfg = top.load_config()
        stream = top.open_stream(cfg)
        merged = merge_plan(cfg, plan, methods or [], ablations or [], console)  # keeps the seeds and cadences
        if merged != plan:
            plan = merged
            atomic_write_json(out / SWEEP_FILE, plan)
        if max_blocks is not None:
            cells = [out / cell_name(s, m) for s in plan["seeds"] for m in plan["cadences"]]
            for d in (d for d in cells if (d / COMPARE_FILE).exists()):  # every run checked before any changes
                for rd, _ in comparison_runs(d, plan["methods"], plan["ablations"]).values():
                    if rd.state_path.exists():
                        rd.check_max_blocks(max_blocks)
            cfg = cfg.model_copy(update={"max_blocks": max_blocks})
            top.save_config(cfg)
    else:
        if cfg is None:
            raise CcdrecError("a configuration is needed to start a sweep")
        top.check_creatable("sweep directory")
        seeds = seeds or [cfg.seed]
        cadences = cadences or [cfg.teacher.update_every]
        for s in seeds:  # every cell's configuration is valid before anything is created
            for m in cadences:
                cell_config(cfg, s, m)
        stream = load_stream(cfg.dataset)
        base = {"version": 1, "methods": [], "ablations": []}
        plan = merge_plan(cfg, base, list(methods or DEFAULT_METHODS), ablations or [], console)
        plan |= {"seeds": seeds, "cadences": cadences}
        resolve_device(cfg.device)
        check_run_tasks(cfg)  # with Ray: the cluster reached and big enough before anything is created
        out.mkdir(parents=True, exist_ok=True)
        top.save_config(cfg)
        top.record_stream(cfg, stream)
        atomic_write_json(out / SWEEP_FILE, plan)
    if opened is not None:
        opened(out)
    last = len(stream.blocks) - 1 if cfg.max_blocks is None else min(cfg.max_blocks, len(stream.blocks) - 1)
    for m in (m for m in plan["cadences"] if m > last):
        console.print(f"note: teacher updated every {m} student cycles: no teacher cycle within blocks 1..{last}")
    if cluster.chosen_executor(cfg.executor, cfg.ray_address)[0] == "ray":
        _run_cells_on_ray(cfg, out, plan, console, workers, max_blocks)
    else:
        _run_cells(cfg, out, plan, progress, console, workers, max_blocks)
    from ccdrec.report.sweep import write_sweep_report

    cells = {
        (s, m): comparison_runs(out / cell_name(s, m), plan["methods"], plan["ablations"])
        for s in plan["seeds"]
        for m in plan["cadences"]
    }
    return write_sweep_report(out, cells, variant_notes(plan["methods"], plan["ablations"]))


def _open_cell(out: Path, seed: int, cadence: int, console: Console) -> tuple[Path, bool]:
    """The directory of cell (``seed``, ``cadence``) and whether its comparison has started; a start
    interrupted before its plan was written (nothing was trained there) is removed."""
    d = out / cell_name(seed, cadence)
    console.print(f"[bold]=== seed {seed}, teacher updated every {cadence} student cycle(s)[/bold] ({d})")
    started = (d / COMPARE_FILE).exists()
    if not started and d.exists():
        shutil.rmtree(d)
    return d, started


def _run_cells(
    cfg: RunConfig, out: Path, plan: dict, progress: bool, console: Console, workers: int | None, max_blocks: int | None
) -> None:
    """Run (or resume) the cells' comparisons one after another (:func:`run_compare`, the local
    executor); a seed's later cadences share the first one's CCD block 0."""
    for s in plan["seeds"]:
        base_ccd: Path | None = None
        for m in plan["cadences"]:
            d, started = _open_cell(out, s, m, console)
            run_compare(
                None if started else cell_config(cfg, s, m),
                d,
                plan["methods"],
                plan["ablations"],
                resume=started,
                progress=progress,
                console=console,
                bench=False,
                workers=workers,
                max_blocks=max_blocks if started else None,
                base_from=None if started else base_ccd,
                cell=True,
            )
            if "ccd" in plan["methods"] and base_ccd is None:
                base_ccd = d / "ccd"


def _run_cells_on_ray(
    cfg: RunConfig, out: Path, plan: dict, console: Console, workers: int | None, max_blocks: int | None
) -> None:
    """Run (or resume) every cell's runs as Ray tasks together (:func:`ccdrec.pipeline.compare.run_on_ray`):
    the cells are opened first; the block 0 of every seed (its first cadence's CCD run, or each cell's
    first competitor without CCD) trains side by side; then all runs of all cells at once, a later
    cadence's CCD run sharing its seed's block 0; then each cell's report. Raises as :func:`run_on_ray`."""
    cells = []
    for s in plan["seeds"]:
        base_ccd: Path | None = None
        for m in plan["cadences"]:
            d, started = _open_cell(out, s, m, console)
            cell_cfg, cell_plan, stream = open_comparison(
                None if started else cell_config(cfg, s, m),
                d,
                plan["methods"],
                plan["ablations"],
                started,
                None,
                workers,
                max_blocks if started else None,
                console,
                cell=True,
            )
            # base_ccd even for a started cell: it only seeds a CCD run not started yet (same block 0, checked)
            cells.append(Comparison(d, cell_cfg, stream, cell_plan["methods"], cell_plan["ablations"], base_ccd))
            if "ccd" in plan["methods"] and base_ccd is None:
                base_ccd = d / "ccd"
    run_on_ray(cells, out, console, workers)
    for c in cells:
        finish_comparison(c, bench=False)


__all__ = ["SWEEP_FILE", "cell_config", "cell_name", "is_sweep", "parse_ints", "run_sweep"]
