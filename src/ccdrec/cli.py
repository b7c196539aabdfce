"""The ``ccdrec`` command line: the only place that parses arguments."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ccdrec.errors import CcdrecError

app = typer.Typer(
    help="Continual Collaborative Distillation for recommenders on a stream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect bundled streams and prepare your own logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 160)


@data_app.command("info")
def data_info(source: str = typer.Argument(..., help="bundled dataset (yelp, gowalla) or a stream directory")) -> None:
    """Print a per-block table: universe, new users/items, train/valid/test counts."""
    from ccdrec.data import load_stream

    stream = load_stream(source)
    df = stream.summary()
    table = Table(title=f"stream {stream.name}")
    for col in df.columns:
        table.add_column(col, justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:,}" for v in row])
    console.print(table)


@data_app.command("prepare")
def data_prepare(
    log: Path = typer.Argument(..., help="interaction log: CSV (.csv, .csv.gz) or Parquet"),
    out: Path = typer.Option(..., "--out", help="output stream directory"),
    user_col: str = typer.Option("user", help="user ID column"),
    item_col: str = typer.Option("item", help="item ID column"),
    time_col: str = typer.Option("timestamp", help="timestamp column (unix seconds or date strings)"),
    min_user: int = typer.Option(10, help="k-core: minimum interactions per user"),
    min_item: int = typer.Option(10, help="k-core: minimum interactions per item"),
    base_fraction: float = typer.Option(0.5, help="share of interactions in the base block D_0"),
    blocks: int = typer.Option(5, help="number of incremental blocks after D_0"),
    seed: int = typer.Option(0, help="seed of the per-user train/valid/test split"),
    force: bool = typer.Option(False, help="replace an existing output directory"),
) -> None:
    """Cut a timestamped log into a block stream (k-core, time blocks, per-user 80/10/10 split)."""
    from ccdrec.data.prepare import prepare_stream

    stream = prepare_stream(
        log,
        out,
        user_col=user_col,
        item_col=item_col,
        time_col=time_col,
        min_user=min_user,
        min_item=min_item,
        base_fraction=base_fraction,
        n_blocks=blocks,
        seed=seed,
        force=force,
    )
    console.print(f"wrote {out}: {len(stream)} blocks, {stream.n_users:,} users, {stream.n_items:,} items")
    data_info(str(out))


@app.command("train")
def train(
    dataset: str = typer.Option("yelp", help="bundled dataset or stream directory"),
    block: int = typer.Option(0, help="block to train on (its train split)"),
    model: str = typer.Option("lightgcn", help="mf, lightgcn or vae"),
    dim: int = typer.Option(128, help="embedding dimension"),
    layers: int = typer.Option(2, help="LightGCN layers"),
    seed: int = typer.Option(0, help="random seed"),
    epochs: int | None = typer.Option(None, help="maximum epochs (default: the model's schedule)"),
    lr: float | None = typer.Option(None, help="learning rate"),
    batch_size: int | None = typer.Option(None, help="batch size"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Path | None = typer.Option(None, help="write the best model here as OUT.pt + OUT.json"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Train one model on one block with early stopping; print validation and test metrics."""
    from ccdrec.checkpoint import save_model
    from ccdrec.config import ModelConfig
    from ccdrec.data import load_stream
    from ccdrec.device import resolve_device
    from ccdrec.eval import evaluate_block
    from ccdrec.models import build_model
    from ccdrec.train.schedules import default_schedule

    stream = load_stream(dataset)
    if not 0 <= block < len(stream):
        raise CcdrecError(f"--block {block} is out of range: {stream.name} has blocks 0..{len(stream) - 1}")
    mcfg = ModelConfig(kind=model, dim=dim, layers=layers)
    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
    cfg = default_schedule(mcfg.kind).model_copy(update=overrides)
    b = stream[block]
    m = build_model(mcfg.kind, b.n_users, b.n_items, **mcfg.kwargs()).to(resolve_device(device))
    from ccdrec.train import fit

    start = time.perf_counter()
    res = fit(m, b, cfg, seed=seed, progress=progress, label=f"{model}-{dim} on {stream.name} D_{block}")
    test = evaluate_block(m, b, "test")
    console.print(f"best epoch {res.best_epoch + 1} of {res.epochs_run}; {time.perf_counter() - start:.1f} s")
    console.print(f"valid recall@20 {res.best_valid['recall@20']:.4f}  ndcg@20 {res.best_valid['ndcg@20']:.4f}")
    console.print(f"test  recall@20 {test['recall@20']:.4f}  ndcg@20 {test['ndcg@20']:.4f}")
    if out is not None:
        save_model(m, out, {"dataset": stream.name, "block": block, "seed": seed, "valid": res.best_valid, "test": test})
        console.print(f"saved {out}.pt / {out}.json")


def _set_threads(threads: int | None) -> None:
    """Cap torch's CPU threads. Concurrent jobs whose OpenMP threads outnumber the cores spin against
    each other (with two 2-thread runs on 2 cores, a Yelp teacher update took 267 s instead of 34 s)."""
    if threads is not None:
        if threads < 1:
            raise CcdrecError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _run_config(data, dataset, preset, config, set_, seed, device, max_blocks):
    """The resolved configuration of ``run`` / ``compare`` options, and the data source's short name."""
    from ccdrec.presets import load_config

    source = str(data) if data is not None else dataset or "yelp"
    overrides = list(set_)
    overrides += [f"{k}={v}" for k, v in (("seed", seed), ("device", device), ("max_blocks", max_blocks)) if v is not None]
    return load_config(source, preset, config, overrides), Path(source).name


def _refuse_on_resume(command: str, **given) -> None:
    """``--resume`` continues with the stored configuration: options that would change it are errors."""
    named = [f"--{k.rstrip('_').replace('_', '-')}" for k, v in given.items() if v not in (None, [], False)]
    if named:
        raise CcdrecError(
            f"--resume continues with the run's stored configuration; {', '.join(named)} cannot change it "
            f"(start a new {command} instead)"
        )


@app.command("run")
def run(
    dataset: str | None = typer.Option(None, help="bundled dataset: yelp (default) or gowalla"),
    data: Path | None = typer.Option(None, help="a stream directory made by `ccdrec data prepare` (instead of --dataset)"),
    preset: str | None = typer.Option(
        None, help="configuration preset: yelp, gowalla, paper-yelp, quick (default: the dataset's)"
    ),
    config: Path | None = typer.Option(None, help="YAML or TOML file with configuration fields (over the preset)"),
    set_: list[str] = typer.Option([], "--set", help="override one field, e.g. --set student.update.epochs=5 (repeatable)"),
    seed: int | None = typer.Option(None, help="run seed (default 0)"),
    device: str | None = typer.Option(None, help="auto, cpu or cuda"),
    max_blocks: int | None = typer.Option(
        None, help="stop after this incremental block (with --resume: take a finished run on to this block)"
    ),
    out: Path | None = typer.Option(None, help="run directory (default: runs/DATASET-PRESET-TIME)"),
    resume: Path | None = typer.Option(None, help="continue an interrupted run directory from its last completed stage"),
    progress: bool = typer.Option(True, help="show live progress"),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores); give concurrent jobs cores/jobs each"),
    workers: int | None = typer.Option(
        None, help="processes training a block's teacher members side by side (default: the configuration's; gowalla preset 2)"
    ),
) -> None:
    """Run CCD over the whole stream: teachers, distillation, student and teacher updates, report."""
    from ccdrec.pipeline.ccd import run_stream

    _set_threads(threads)
    if resume is not None:
        _refuse_on_resume(
            "run", dataset=dataset, data=data, preset=preset, config=config, set_=set_, seed=seed, device=device, out=out
        )
        cfg, run_dir = None, resume
        if max_blocks is not None:
            from ccdrec.pipeline.rundir import RunDir

            RunDir.open(resume).set_max_blocks(max_blocks)
    else:
        cfg, name = _run_config(data, dataset, preset, config, set_, seed, device, max_blocks)
        run_dir = out or Path("runs") / f"{name}-{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"run directory: {run_dir}")
    try:
        rd = run_stream(cfg, run_dir, resume=resume is not None, progress=progress, console=console, workers=workers)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: ccdrec run --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130) from None
    console.print(f"report: {rd.path / 'report.md'}")
    from ccdrec.report import tables

    summary = tables.summary(rd.read_metrics())
    if not summary.empty:
        console.print(summary.to_string(float_format=lambda v: f"{v:.4f}"))


@app.command("recommend")
def recommend(
    run_dir: Path = typer.Argument(..., help="a run directory written by `ccdrec run`"),
    user: str = typer.Option(..., "--user", help="user ID, as in the original log"),
    k: int = typer.Option(20, "-k", help="number of items"),
) -> None:
    """Print the served student's top-K unseen items for one user, in the original IDs."""
    from ccdrec.serve import load_run

    served = load_run(run_dir)
    for rank, rec in enumerate(served.recommend(user, k), 1):
        print(f"{rank}\t{rec.item}\t{rec.score:.4f}")


@app.command("compare")
def compare(
    dataset: str | None = typer.Option(None, help="bundled dataset: yelp (default) or gowalla"),
    data: Path | None = typer.Option(None, help="a stream directory made by `ccdrec data prepare` (instead of --dataset)"),
    methods: str | None = typer.Option(
        None,
        help="comma-separated methods: ccd, finetune, lwckd, lwckd-piw, retrain (default: all; with --resume: "
        "methods to add to the comparison)",
    ),
    ablations: bool = typer.Option(False, "--ablations", help="also run every ablation of CCD (as config switches)"),
    only_ablations: str | None = typer.Option(
        None,
        "--ablation",
        help="comma-separated subset of ablations: random-init, one-hop-init, no-stability, no-plasticity, no-replay, "
        "no-student-knowledge, no-redistill",
    ),
    preset: str | None = typer.Option(None, help="configuration preset (default: the dataset's)"),
    config: Path | None = typer.Option(None, help="YAML or TOML file with configuration fields (over the preset)"),
    set_: list[str] = typer.Option([], "--set", help="override one field of every method's configuration (repeatable)"),
    seed: int | None = typer.Option(None, help="run seed (default 0)"),
    device: str | None = typer.Option(None, help="auto, cpu or cuda"),
    max_blocks: int | None = typer.Option(
        None, help="stop after this incremental block (with --resume: take every run of the comparison on to this block)"
    ),
    out: Path | None = typer.Option(None, help="comparison directory (default: runs/compare-DATASET-PRESET-TIME)"),
    resume: Path | None = typer.Option(
        None, help="continue a comparison directory (and add the --methods / --ablation(s) given)"
    ),
    from_run: Path | None = typer.Option(
        None, help="use this `ccdrec run` directory as the CCD run (its configuration is the comparison's)"
    ),
    bench: bool = typer.Option(True, help="measure CCD's serving cost (teacher ensemble vs student) for the report"),
    progress: bool = typer.Option(True, help="show live progress"),
    threads: int | None = typer.Option(None, help="CPU threads (default: all cores); give concurrent jobs cores/jobs each"),
    workers: int | None = typer.Option(
        None, help="processes training a block's teacher members side by side (default: the configuration's; gowalla preset 2)"
    ),
) -> None:
    """Run CCD, its continual-learning competitors and ablations on one harness; write OUT/report.md.

    Block-0 teachers and D_0 are trained once and shared by every method. The report holds LA / RA / H-mean of student and teacher per method, CCD's per-block H_k gain over the best competitor (table and bar plot), new-user metrics and training time.
    """  # noqa: E501
    from ccdrec.pipeline.compare import parse_ablations, parse_methods, run_compare

    _set_threads(threads)
    method_list = parse_methods(methods) if methods is not None else None
    ablation_list = parse_ablations(only_ablations, ablations)
    if resume is not None:
        _refuse_on_resume(
            "comparison",
            dataset=dataset,
            data=data,
            preset=preset,
            config=config,
            set_=set_,
            seed=seed,
            device=device,
            out=out,
            from_run=from_run,
        )
        cfg, out_dir = None, resume
    else:
        cfg, name = _run_config(data, dataset, preset, config, set_, seed, device, max_blocks)
        out_dir = out or Path("runs") / f"compare-{name}-{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"comparison directory: {out_dir}")
    try:
        report = run_compare(
            cfg,
            out_dir,
            method_list,
            ablation_list,
            resume=resume is not None,
            progress=progress,
            console=console,
            bench=bench,
            from_run=from_run,
            workers=workers,
            max_blocks=max_blocks if resume is not None else None,
        )
    except KeyboardInterrupt:
        print(f"interrupted; continue with: ccdrec compare --resume {out_dir}", file=sys.stderr)
        raise SystemExit(130) from None
    console.print(f"report: {report}")


@app.command("bench-serve")
def bench_serve_command(
    run_dir: Path = typer.Argument(..., help="a run directory of `ccdrec run` (or a competitor run of `ccdrec compare`)"),
    batch: int = typer.Option(1024, help="users in the batch measurement"),
    repeats: int = typer.Option(10, help="timed repetitions per measurement (the median is reported)"),
    k: int = typer.Option(20, "-k", help="recommendation list length"),
    device: str = typer.Option("cpu", help="auto, cpu or cuda"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the figures to this JSON file"),
) -> None:
    """Serving cost of the final teacher ensemble vs the final served student: parameters, memory, top-K latency."""
    from ccdrec.serve_bench import TARGET_SPEEDUP, bench_records, bench_serve, format_bench, speedup

    df = bench_serve(run_dir, batch=batch, repeats=repeats, k=k, device=device)
    text = format_bench(df)
    table = Table(title=f"serving cost of {run_dir} (top-{k}, seen items excluded, median of {repeats})")
    table.add_column("model")
    for col in text.columns:
        table.add_column(col, justify="right")
    for name, row in text.iterrows():
        table.add_row(str(name), *[str(v) for v in row])
    console.print(table)
    met = "met" if speedup(df) >= TARGET_SPEEDUP else "NOT met"
    console.print(f"student batch speed-up {speedup(df):.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {met})")
    if json_out is not None:
        from ccdrec.checkpoint import atomic_write_json

        atomic_write_json(json_out, bench_records(df))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: user mistakes become one-line errors with exit code 2.

    SIGTERM (what ``kill``, ``timeout`` and job schedulers send) takes the path of Ctrl-C: the
    completed stages are kept, the workers are stopped and the resume command is printed.
    """
    import signal

    from ccdrec.memory import keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app(standalone_mode=False)
    except CcdrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as e:
        from ccdrec.config import validation_message

        print(f"error: invalid option: {validation_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise
