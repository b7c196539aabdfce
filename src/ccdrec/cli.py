"""The ``ccdrec`` command line: the only place that parses arguments."""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from ccdrec.errors import CcdrecError, StageLost
from ccdrec.option_values import shell_word

app = typer.Typer(
    help="Continual Collaborative Distillation for recommenders on a stream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect bundled streams and prepare your own logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _print_version(given: bool) -> None:
    if given:
        from ccdrec import __version__

        print(f"ccdrec {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Continual Collaborative Distillation for recommenders on a stream."""


console = Console(width=None if sys.stdout.isatty() else 160)
note_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # the data commands' notes

# Options shared by `run` and `compare` (and `train`), defined once.
DatasetOpt = Annotated[str | None, typer.Option(help="bundled dataset: yelp (default) or gowalla")]
DataOpt = Annotated[Path | None, typer.Option(help="a stream directory made by `ccdrec data prepare` (instead of --dataset)")]
PresetOpt = Annotated[
    str | None, typer.Option(help="configuration preset: yelp, gowalla, paper-yelp, quick (default: the dataset's)")
]
ConfigOpt = Annotated[Path | None, typer.Option(help="YAML or TOML file with configuration fields (over the preset)")]
SetOpt = Annotated[
    list[str], typer.Option("--set", help="override one configuration field, e.g. --set student.update.epochs=5 (repeatable)")
]
SEED_MAX = 2**32 - 1  # = ccdrec.config.SEED_MAX (tested); the configuration is imported lazily, after --help
SeedOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="run seed (default 0) of the student's and the replay's stages; each teacher member trains with its "
        "own seed (set in teacher.members), which --seed leaves alone and compare --seeds S moves by S x members",
    ),
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda")]
ProgressOpt = Annotated[bool, typer.Option(help="show live progress")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads (default: all cores); give concurrent jobs cores/jobs each")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="processes training a block's teacher members side by side (default: the configuration's; gowalla preset 2)"
    ),
]


class Executor(StrEnum):
    """``--executor``: where a block's teacher members train (:mod:`ccdrec.pipeline.cluster`)."""

    local = "local"
    ray = "ray"


ExecutorOpt = Annotated[
    Executor | None,
    typer.Option(
        help="where a block's teacher members train: local (here, in --workers processes) or ray (Ray tasks on the "
        "cluster of --ray-address, the run directory on storage every node reaches; pip install 'ccdrec\\[ray]') "
        "(default: the configuration's, local)"
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="the Ray cluster of --executor ray: HOST:PORT of its head or auto (default: RAY_ADDRESS, else a local Ray instance)"
    ),
]


def print_stream_table(stream) -> None:
    """Print ``stream``'s per-block table: universe, new users/items, active users, split sizes, and the
    held-out pairs dropped because their block trains on them (a note)."""
    df = stream.summary()
    table = Table(title=f"stream {stream.name}")
    for col in df.columns:
        table.add_column(col, justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:,}" for v in row])
    console.print(table)
    if note := stream.dropped_note():
        note_console.print(f"note: {note}", soft_wrap=True, markup=False)


def _stream_source(dataset: str | None, data: Path | None, default: str | None = "yelp") -> str | Path | None:
    """The stream of ``--dataset`` (always a bundled name) or ``--data`` (always a directory); ``default``
    when neither is given."""
    from ccdrec.data.stream import BUNDLED

    if dataset is not None and data is not None:
        raise CcdrecError("give --dataset (a bundled dataset) or --data (a stream directory), not both")
    if data is not None:
        return data
    if dataset is None and default is None:
        return None
    name = dataset or default
    if name not in BUNDLED:
        hint = f"; for the stream directory {name} use --data {name}" if Path(name).is_dir() else ""
        raise CcdrecError(f"unknown dataset {name!r}: --dataset names a bundled stream ({', '.join(BUNDLED)}){hint}")
    return name


@data_app.command("info")
def data_info(source: str = typer.Argument(..., help="bundled dataset (yelp, gowalla) or a stream directory")) -> None:
    """Print a per-block table: universe, new users/items, train/valid/test counts (notes on stderr)."""
    from ccdrec.data import load_stream
    from ccdrec.data.stream import BUNDLED

    if source in BUNDLED and Path(source).exists():
        raise CcdrecError(
            f"{source!r} names both a bundled dataset and ./{source} here: write ./{source} for the directory, "
            "or run from another directory for the bundled stream"
        )
    stream = load_stream(source)  # a bundled name, else a directory ('' is refused, never read as '.')
    print_stream_table(stream)
    if note := stream.left_out_note():
        note_console.print(f"note: {note}", soft_wrap=True, markup=False)
    record = Path(source) / "prepare.json" if source not in BUNDLED else None
    if record is not None and record.exists() and not _json_object(record):
        note_console.print(
            f"note: {record} is not a JSON object, so the left_out counts are not shown and `data append` refuses "
            "the stream; prepare it again from its log",
            soft_wrap=True,
            markup=False,
        )


def _json_object(path: Path) -> bool:
    import json

    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


@data_app.command("prepare")
def data_prepare(
    log: str = typer.Argument(
        ...,
        help="interaction log: text (.csv, .tsv, .txt, .dat, .data; gzip-compressed too) or Parquet",
    ),
    out: str = typer.Option(..., "--out", help="output stream directory"),
    user_col: str = typer.Option("user", help="user ID column"),
    item_col: str = typer.Option("item", help="item ID column"),
    time_col: str = typer.Option("timestamp", help="timestamp column (unix time or date strings)"),
    min_user: int = typer.Option(10, help="k-core: minimum interactions per user"),
    min_item: int = typer.Option(10, help="k-core: minimum interactions per item"),
    base_fraction: float = typer.Option(0.5, help="share of interactions in the base block D_0"),
    blocks: int | None = typer.Option(None, help="number of incremental blocks of equal size after D_0 (default 5)"),
    window: str | None = typer.Option(
        None,
        help="instead of --blocks: one incremental block per calendar window after D_0, e.g. 7d, 1d, 12h, 90m, 2w "
        "(empty windows skipped, windows under 10 interactions merged into the next)",
    ),
    seed: int = typer.Option(0, min=0, help="seed of the per-user train/valid/test split"),
    force: bool = typer.Option(False, help="replace an existing output directory"),
    sep: str | None = typer.Option(
        None,
        help="field separator of a text log: one character, 'tab' / '\\t', 'whitespace' (runs of spaces and tabs) or a "
        "string such as '::' (MovieLens 1M) (default: ',' or tab for .tsv)",
    ),
    header: bool = typer.Option(
        True, "--header/--no-header", help="whether a text log starts with a header line (--no-header needs --columns)"
    ),
    columns: str | None = typer.Option(
        None, help="names of every column of a headerless text log, comma-separated, e.g. user,item,rating,timestamp"
    ),
    rating_col: str | None = typer.Option(None, help="rating column; with --min-rating keeps only well-rated interactions"),
    min_rating: float | None = typer.Option(
        None, help="keep interactions rated at least this (as implicit feedback); needs --rating-col"
    ),
    time_format: str | None = typer.Option(
        None, help="strftime format of date strings, e.g. '%d/%m/%Y %H:%M' (default: ISO 8601 or the one format that fits all)"
    ),
    time_unit: str | None = typer.Option(
        None,
        help="unit of numeric timestamps since 1970: s, ms, us or ns (default: the one that puts the most of them "
        "within 1980 .. tomorrow)",
    ),
    file_format: str | None = typer.Option(
        None, "--format", help="csv (text, gzip-compressed or not) or parquet, when the file name does not tell"
    ),
) -> None:
    """Cut a timestamped log into a block stream (k-core, time blocks, per-user 80/10/10 split).

    Notes about the result (e.g. a block without test users) are printed as `note:` lines on stderr.
    """
    from ccdrec.data.prepare import prepare_stream

    with _prepare_notes():
        stream = prepare_stream(
            log,  # as given: prepare_stream refuses an empty path (Path("") would be ".")
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
            sep=sep,
            header=header,
            columns=columns,
            rating_col=rating_col,
            min_rating=min_rating,
            time_format=time_format,
            time_unit=time_unit,
            file_format=file_format,
            window=window,
        )
        console.print(f"wrote {out}: {len(stream)} blocks, {stream.n_users:,} users, {stream.n_items:,} items")
        print_stream_table(stream)  # the stream just written, whatever its directory is called


@contextmanager
def _prepare_notes() -> Iterator[None]:
    """Print the :class:`PrepareWarning` notes of the block as `note:` lines on stderr (after its output)."""
    import warnings

    from ccdrec.data.prepare import PrepareWarning, merged_block_notes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrepareWarning)
        yield
    for w in caught:
        if not issubclass(w.category, PrepareWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for note in merged_block_notes([str(w.message) for w in caught if issubclass(w.category, PrepareWarning)]):
        print(f"note: {note}", file=sys.stderr)


@data_app.command("append")
def data_append(
    stream_dir: str = typer.Argument(..., help="a stream directory made by `ccdrec data prepare` (it holds prepare.json)"),
    log: str = typer.Argument(..., help="the new interactions: a log in the format of the one the stream was prepared from"),
    blocks: int | None = typer.Option(None, help="cut the new interactions into this many blocks of equal size"),
    window: str | None = typer.Option(
        None, help="cut them by calendar window instead, e.g. 7d, 12h (default: the stream's window, else one block)"
    ),
) -> None:
    """Append new interactions to a stream as its next block(s); `ccdrec run --resume RUN --max-blocks K` goes on to them.

    The log is read and filtered with the options the stream was prepared with (prepare.json); pairs already in the stream are dropped, new IDs are appended to the vocabularies, the existing blocks are unchanged. Notes are printed as `note:` lines on stderr.
    """  # noqa: E501
    import warnings

    from ccdrec.data.append import append_stream
    from ccdrec.data.prepare import PrepareWarning, clear_stale_writes

    for what, given in (("stream directory", stream_dir), ("new log", log)):
        if not given.strip():  # never read as '.', the current directory
            raise CcdrecError(f"the {what} path is empty")
    from ccdrec.data.stream import check_stream_dir

    if Path(stream_dir).is_dir():
        check_stream_dir(Path(stream_dir), bundled=False)  # (not a bundled dataset, which cannot grow)
    with _prepare_notes():
        for note in clear_stale_writes(Path(stream_dir)):  # a killed write's leftovers, a stream it moved aside
            warnings.warn(note, PrepareWarning, stacklevel=1)
        before = len(load_stream_dir(Path(stream_dir)))
        stream = append_stream(stream_dir, log, n_blocks=blocks, window=window)
        added = f"block {before}" if len(stream) - 1 == before else f"blocks {before}..{len(stream) - 1}"
        done = f"appended {added} to {stream_dir}: {len(stream)} blocks, {stream.n_users:,} users, {stream.n_items:,} items"
        try:
            console.print(done)
            print_stream_table(stream)
        except KeyboardInterrupt:  # the blocks are written: an interruption now only cuts the table short
            print(f"{done} (interrupted while printing its table)", file=sys.stderr)


def load_stream_dir(path: Path):
    """The stream in directory ``path`` (never a bundled name)."""
    from ccdrec.data import load_stream

    return load_stream(Path(path))


@app.command("train")
def train(
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    block: int = typer.Option(0, help="block to train on (its train split)"),
    model: str = typer.Option("lightgcn", help="mf, lightgcn or vae"),
    dim: int = typer.Option(128, help="embedding dimension"),
    layers: int | None = typer.Option(None, min=0, help="LightGCN layers (default 2; lightgcn only)"),
    seed: int = typer.Option(0, min=0, help="random seed"),
    epochs: int | None = typer.Option(None, help="maximum epochs (default: the model's schedule)"),
    lr: float | None = typer.Option(None, help="learning rate"),
    batch_size: int | None = typer.Option(None, help="batch size"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Path | None = typer.Option(None, help="write the best model here as OUT.pt + OUT.json"),
    progress: bool = typer.Option(True, help="show a progress bar"),
    threads: ThreadsOpt = None,
) -> None:
    """Train one model on one block with early stopping; print validation and test metrics."""
    from ccdrec.checkpoint import save_model, stem_file
    from ccdrec.config import ModelConfig, TrainConfig, default_schedule
    from ccdrec.data import load_stream
    from ccdrec.device import resolve_device
    from ccdrec.eval import evaluate_block
    from ccdrec.models import build_model
    from ccdrec.pipeline.context import seed_everything

    _set_threads(threads)
    if layers is not None and model != "lightgcn":
        raise CcdrecError(f"--layers is the number of LightGCN propagation layers; --model {model} has none")
    if out is not None:
        if out.is_dir():
            raise CcdrecError(f"--out {out}: a directory; give a file name (OUT.pt and OUT.json are written)")
        out = out.with_suffix("") if out.suffix in (".pt", ".json") else out
        for written in (stem_file(out, ".pt"), stem_file(out, ".json")):
            _check_output_file(written, "--out")
            if written.exists():
                raise CcdrecError(f"--out {written}: exists; remove it or give another name")
    stream = load_stream(_stream_source(dataset, data))
    if not 0 <= block < len(stream):
        raise CcdrecError(f"--block {block} is out of range: {stream.name} has blocks 0..{len(stream) - 1}")
    try:  # a mistake names the option given, not the configuration field behind it
        mcfg = ModelConfig(kind=model, dim=dim, **({} if layers is None else {"layers": layers}))
        overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size}.items() if v is not None}
        cfg = TrainConfig.model_validate({**default_schedule(mcfg.kind).model_dump(), **overrides})  # checked, unlike a copy
    except ValidationError as e:
        from ccdrec.config import validation_message

        field, _, message = validation_message(e).partition(": ")
        option = {"kind": "--model", "batch_size": "--batch-size"}.get(field, f"--{field}")
        raise CcdrecError(f"{option}: {message}") from None
    b = stream[block]
    if seed > SEED_MAX:
        raise CcdrecError(f"--seed must be at most {SEED_MAX}, got {seed}")
    seed_everything(seed)  # the model's initial weights too, so that a seed repeats the run
    m = build_model(mcfg.kind, b.n_users, b.n_items, **mcfg.kwargs()).to(resolve_device(device))
    from ccdrec.train import fit

    start = time.perf_counter()
    res = fit(m, b, cfg, seed=seed, progress=progress, label=f"{model}-{dim} on {stream.name} D_{block}")
    test = evaluate_block(m, b, "test")
    console.print(f"best epoch {res.best_epoch + 1} of {res.epochs_run}; {time.perf_counter() - start:.1f} s")
    from ccdrec.report.tables import fmt

    for name, got in (("valid", res.best_valid), ("test ", test)):
        recall, ndcg = fmt(got.get("recall@20")), fmt(got.get("ndcg@20"))
        console.print(f"{name} recall@20 {recall}  ndcg@20 {ndcg}  ({got.get('users', 0):,} users)")
    if out is not None:
        save_model(m, out, {"dataset": stream.name, "block": block, "seed": seed, "valid": res.best_valid, "test": test})
        console.print(f"saved {stem_file(out, '.pt')} / {stem_file(out, '.json')}")


def _check_output_file(path: Path, option: str) -> None:
    """An output file written at the end of long work is checked before it starts: not a directory, and
    no file where a directory above it would be made. Raises CcdrecError naming ``option``."""
    if path.is_dir():
        raise CcdrecError(f"{option} {path}: a directory; give a file name")
    above = next((d for d in path.absolute().parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise CcdrecError(f"{option} {path}: {above} is a file, not a directory")
    if above is not None:  # a file can be made there (a trial file, removed at once)
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=above):
                pass
        except OSError as e:
            raise CcdrecError(f"{option} {path}: no file can be written in {above} ({e.strerror or e})") from None


def _set_threads(threads: int | None, executor: Executor | None = None, *, cluster: bool = False) -> None:
    """Cap torch's CPU threads. Concurrent jobs whose OpenMP threads outnumber the cores spin against
    each other (with two 2-thread runs on 2 cores, a Yelp teacher update took 267 s instead of 34 s).

    At most 4 x this machine's cores, except with ``--executor ray``: its tasks take ``threads`` CPUs of
    the cluster's nodes (:func:`_executor`; the cluster check says when no node has them), and this
    process, the driver, keeps ``min(threads, cores)``."""
    if threads is not None:
        cores = os.cpu_count() or 1
        most = 4 * cores
        on_ray = executor is not None and executor.value == "ray"
        if threads < 1 or (threads > most and not on_ray):
            ray = "; more with --executor ray, for the cluster's nodes" if cluster else ""  # a command that has it
            raise CcdrecError(f"--threads must be between 1 and {most} (4 x the {cores} cores{ray}), got {threads}")
        import torch

        torch.set_num_threads(threads if threads <= most else cores)


def _run_config(data, dataset, preset, config, set_, seed, device, max_blocks, **shadowing):
    """The resolved configuration of ``run`` / ``compare`` options, and the data source's short name.

    An option and a ``--set`` of the configuration key it sets are refused together (``shadowing``: the
    options that replace a key at run time, such as ``workers``); the stream is named by ``--dataset``
    or ``--data`` only."""
    from ccdrec.presets import load_config, override_key

    overrides = list(set_)
    given = {override_key(item) for item in overrides}
    if "dataset" in given:
        raise CcdrecError("--set dataset: name the stream with --dataset NAME or --data DIR")
    source = _stream_source(dataset, data, default=None)  # None: the --config file's, else yelp
    options = (("seed", seed), ("device", device), ("max_blocks", max_blocks))
    for k, v in (*options, *shadowing.items()):
        if v is not None and k in given:
            raise CcdrecError(f"--{k.replace('_', '-')} and --set {k}: give one of them")
    overrides += [f"{k}={v}" for k, v in options if v is not None]
    cfg = load_config(source, preset, config, overrides)
    return cfg, Path(cfg.dataset).name


def out_of_memory(e: BaseException) -> str | None:
    """``out of memory (...)`` for an allocation that failed (Python's MemoryError, torch's CPU allocator or
    CUDA), naming the size asked for where torch says it; None for any other error."""
    text = str(e)
    if not (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text) or re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]iB)", text)
    size = ""
    if asked:
        n = int(asked.group(1)) if asked.group(1).isdigit() else None
        size = asked.group(1) if n is None else f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
        size = f"a step asked for {size}; "
    return f"out of memory ({size}a smaller model, batch or --threads, or a machine with more memory, may fit)"


@contextmanager
def _resumable(command: str, path: Path, threads: int | None, workers: int | None, progress: bool) -> Iterator[None]:
    """An interruption (Ctrl-C, SIGTERM), a lost worker stage or memory running out ends ``command`` with
    the line that resumes it, with the options given that a run does not store (``--threads``,
    ``--workers``, ``--no-progress``)."""
    again = [f"--threads {threads}" if threads is not None else "", f"--workers {workers}" if workers is not None else ""]
    again.append("" if progress else "--no-progress")
    hint = " ".join(["continue with: ccdrec", command, "--resume", shell_word(path), *(a for a in again if a)])
    written = lambda: any((Path(path) / f).exists() for f in ("state.json", "compare.json", "sweep.json"))  # noqa: E731
    try:
        yield
    except KeyboardInterrupt:
        if not written():
            hint = "nothing was written yet: start the command again"
        print(f"interrupted; {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    except StageLost as e:
        print(f"error: {e}; {hint}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MemoryError, RuntimeError) as e:
        if (oom := out_of_memory(e)) is None:
            raise
        kept = "nothing was written yet"
        if written():  # a resume keeps the stored configuration: a model too large for memory is made smaller there
            smaller = f"after making the model or batch smaller in {Path(path) / 'config.yaml'}"
            kept = f"the completed stages are kept; {hint} once more memory is free, or {smaller}"
        print(f"error: {oom}; {kept}", file=sys.stderr)
        raise SystemExit(1) from None


def _named(what: str) -> Callable[[Path], None]:
    """Print ``what: PATH`` once a run's directory is created or reopened (after every check has passed,
    so that a refused start names no directory)."""
    return lambda path: console.print(f"{what}: {path}")


@contextmanager
def _executor(executor: Executor | None, ray_address: str | None, cfg, threads: int | None) -> Iterator[None]:
    """The staged runs inside use ``--executor`` / ``--ray-address`` when given (else their configuration's,
    ``cfg`` for a new run), their Ray tasks ``--threads`` CPUs; with Ray, it is imported and the cluster
    joined first, before anything is created."""
    from ccdrec.pipeline.cluster import connect, use_executor, use_task_threads

    kind = executor.value if executor is not None else None
    with use_executor(kind, ray_address), use_task_threads(threads):
        if kind == "ray" or (kind is None and cfg is not None and cfg.executor == "ray"):
            connect(ray_address or (cfg.ray_address if cfg is not None else None))
        yield


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
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer reads the default, it is never mutated
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    max_blocks: int | None = typer.Option(
        None, min=0, help="stop after this incremental block (with --resume: take a finished run on to this block)"
    ),
    out: Path | None = typer.Option(None, help="run directory (default: runs/DATASET-PRESET-TIME)"),
    resume: Path | None = typer.Option(None, help="continue an interrupted run directory from its last completed stage"),
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run CCD over the whole stream: teachers, distillation, student and teacher updates, report."""
    from ccdrec.pipeline.ccd import run_stream

    _set_threads(threads, executor, cluster=True)
    if resume is not None:
        _refuse_on_resume(
            "run", dataset=dataset, data=data, preset=preset, config=config, set_=set_, seed=seed, device=device, out=out
        )
        cfg, run_dir = None, resume
    else:
        cfg, name = _run_config(
            data,
            dataset,
            preset,
            config,
            set_,
            seed,
            device,
            max_blocks,
            workers=workers,
            executor=executor,
            ray_address=ray_address,
        )
        run_dir = out or Path("runs") / f"{name}-{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _resumable("run", run_dir, threads, workers, progress), _executor(executor, ray_address, cfg, threads):
        rd = run_stream(
            cfg,
            run_dir,
            resume=resume is not None,
            progress=progress,
            console=console,
            workers=workers,
            max_blocks=max_blocks if resume is not None else None,
            opened=_named("run directory"),
        )
    console.print(f"report: {rd.path / 'report.md'}")
    from ccdrec.report import tables

    rows = rd.read_metrics()
    summary = tables.summary(rows, tables.lead_metrics(rows))
    if not summary.empty:
        console.print(tables.as_text(summary).to_string())
    if note := tables.capped_note(rows):
        console.print(f"note: {note}", markup=False)
    _more_blocks_note(rd.path)


def _more_blocks_note(path: Path) -> None:
    """Note, after a run, comparison or sweep, that it stops (``--max-blocks``) before its stream's last
    block, with the command that takes it on (e.g. after ``ccdrec data append``): for a part of a
    comparison or sweep, the command of the whole, so that its runs stay at one block."""
    from ccdrec.pipeline.rundir import RunDir, enclosing

    whole = enclosing(path)
    path = Path(path) if whole is None else whole[1]
    command = "compare" if any((path / f).exists() for f in ("compare.json", "sweep.json")) else "run"
    rd = RunDir(path)
    stopped, last = rd.load_config().max_blocks, rd.stream_blocks() - 1
    if stopped is not None and stopped < last:
        what = "run" if command == "run" else "sweep" if (path / "sweep.json").exists() else "comparison"
        console.print(
            f"note: the {what} stops at block {stopped} (--max-blocks) and its stream has blocks 0..{last}; "
            f"ccdrec {command} --resume {shell_word(path)} --max-blocks {last} takes it on",
            markup=False,
        )


@app.command("recommend")
def recommend(
    run_dir: Path = typer.Argument(..., help="a run directory written by `ccdrec run`"),
    user: str | None = typer.Option(None, "--user", help="user ID, as in the original log"),
    items: str | None = typer.Option(
        None,
        "--items",
        help="instead of --user: a new user's items, comma-separated original item IDs (cold start, no retraining)",
    ),
    k: int = typer.Option(20, "-k", min=1, help="number of items"),
) -> None:
    """Print the served student's top-K unseen items for one user, in the original IDs.

    With --items, for a user the student has never seen: the row entity initialisation gives a new user
    with these items (method.md 5.2), those items excluded. Unknown items are listed in a `note:` line.
    """
    from ccdrec.option_values import comma_list
    from ccdrec.serve import load_run

    if (user is None) == (items is None):
        raise CcdrecError("give --user (a known user) or --items (a new user's items), one of them")
    if items is not None:
        # a user may have interacted with an item twice; an ID is looked up as written, else without the
        # spaces around it (IDs may begin with a space; "12, 40" names 40), as the HTTP service and load_run do
        given = comma_list(items, "--items", repeats=True, strip=False)
    served = load_run(run_dir)
    if items is None:
        recs = served.recommend(user, k)
    else:
        got = served.recommend_for_items(given, k)
        if got.unknown:
            from ccdrec.serve import shown_ids

            print(f"note: {len(got.unknown)} unknown item(s) left out: {shown_ids(got.unknown, 10)}", file=sys.stderr)
        recs = got.items
    for rank, rec in enumerate(recs, 1):
        print(f"{rank}\t{rec.item}\t{rec.score:.4f}")
    if len(recs) < k:
        left = "no item is" if not recs else f"only {len(recs)} item(s) are"
        print(f"note: {left} left to recommend (seen and given items are not recommended), {k} asked for", file=sys.stderr)


@app.command("compare")
def compare(
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    methods: str | None = typer.Option(
        None,
        help="comma-separated methods: ccd, finetune, lwckd, lwckd-piw, retrain (the default: these five), kd-only, "
        "kd-once (with --resume: methods to add to the comparison)",
    ),
    ablations: bool = typer.Option(False, "--ablations", help="also run every ablation of CCD (as config switches)"),
    only_ablations: str | None = typer.Option(
        None,
        "--ablation",
        help="comma-separated subset of ablations: random-init, one-hop-init, no-proxies, no-stability, no-plasticity, "
        "no-replay, no-student-knowledge, no-redistill",
    ),
    seeds: str | None = typer.Option(
        None, help="comma-separated run seeds, e.g. 0,1,2: one comparison per seed, reported with mean and spread"
    ),
    cadences: str | None = typer.Option(
        None,
        help="comma-separated teacher update cycles in student cycles, e.g. 1,2,5: one comparison per cadence, "
        "reported as H-mean against the teacher's compute",
    ),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = [],  # noqa: B006 - typer reads the default, it is never mutated
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    max_blocks: int | None = typer.Option(
        None, min=0, help="stop after this incremental block (with --resume: take every run of the comparison on to this block)"
    ),
    out: Path | None = typer.Option(None, help="comparison directory (default: runs/compare-DATASET-PRESET-TIME)"),
    resume: Path | None = typer.Option(
        None, help="continue a comparison directory (and add the --methods / --ablation(s) given)"
    ),
    from_run: Path | None = typer.Option(
        None, help="use this `ccdrec run` directory as the CCD run (its configuration is the comparison's)"
    ),
    bench: bool | None = typer.Option(
        None,
        "--bench/--no-bench",
        help="measure CCD's serving cost (teacher ensemble vs student) for the report \\[default: bench; --resume: as "
        "started; a sweep (--seeds, --cadences): no bench]",
        show_default=False,
    ),
    progress: ProgressOpt = True,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Run CCD, its continual-learning competitors and ablations on one harness; write OUT/report.md.

    Block-0 teachers and D_0 are trained once and shared by every method. The report holds LA / RA / H-mean of student and teacher per method, CCD's per-block H_k gain over the one CL competitor with the best stream H-mean on validation (table and bar plot), new-user metrics and training time.
    With --seeds and/or --cadences: one comparison per seed and cadence in OUT/seed-S-every-M/, and OUT/report.md over them (mean and spread over seeds, CCD's paired gain, retention, H-mean against teacher compute).
    """  # noqa: E501
    from ccdrec.pipeline.compare import parse_ablations, parse_methods, run_compare
    from ccdrec.pipeline.sweep import is_sweep, parse_ints, run_sweep
    from ccdrec.presets import override_key

    _set_threads(threads, executor, cluster=True)
    method_list = parse_methods(methods) if methods is not None else None
    ablation_list = parse_ablations(only_ablations, ablations)
    seed_list = parse_ints(seeds, "--seeds", 0, SEED_MAX) if seeds is not None else None
    cadence_list = parse_ints(cadences, "--cadences", 1) if cadences is not None else None
    sweep = seed_list is not None or cadence_list is not None
    if seed_list is not None and seed is not None:
        raise CcdrecError("--seed and --seeds: give every seed in --seeds")
    for option, key, values in (("--seeds", "seed", seed_list), ("--cadences", "teacher.update_every", cadence_list)):
        if values is not None and any(override_key(item) == key for item in set_):
            raise CcdrecError(f"{option} and --set {key}: give every value in {option}")
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
            seeds=seeds,
            cadences=cadences,
        )
        cfg, out_dir = None, resume
        sweep = is_sweep(resume)
    elif from_run is not None:  # the run's stored configuration is the comparison's
        if sweep:
            raise CcdrecError("--from-run starts a single comparison; --seeds and --cadences cannot be used with it")
        given = {"--dataset": dataset, "--data": data, "--preset": preset, "--config": config, "--set": set_}
        given |= {"--seed": seed, "--device": device, "--max-blocks": max_blocks}
        named = [option for option, value in given.items() if value not in (None, [])]
        if named:
            raise CcdrecError(f"--from-run compares with the run's stored configuration; {', '.join(named)} cannot change it")
        cfg, out_dir = None, out or Path("runs") / f"compare-{Path(from_run).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        cfg, name = _run_config(
            data,
            dataset,
            preset,
            config,
            set_,
            seed,
            device,
            max_blocks,
            workers=workers,
            executor=executor,
            ray_address=ray_address,
        )
        out_dir = out or Path("runs") / f"compare-{name}-{preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if sweep and bench:
        raise CcdrecError(
            "--bench: a sweep (--seeds, --cadences) does not measure serving cost; measure a CCD run of it with "
            "ccdrec bench-serve OUT/seed-S-every-M/ccd"
        )
    with _resumable("compare", out_dir, threads, workers, progress), _executor(executor, ray_address, cfg, threads):
        if sweep:
            report = run_sweep(
                cfg,
                out_dir,
                method_list,
                ablation_list,
                seeds=seed_list,
                cadences=cadence_list,
                resume=resume is not None,
                progress=progress,
                console=console,
                workers=workers,
                max_blocks=max_blocks if resume is not None else None,
                opened=_named("sweep directory"),
            )
            console.print(f"report: {report}")
            _report_notes(report)
            return
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
            opened=_named("comparison directory"),
        )
    console.print(f"report: {report}")
    _report_notes(report)


def _report_notes(report: Path) -> None:
    """After a comparison or sweep: the notes its report opens with (runs that end at different blocks,
    none past block 0), then where it stops against its stream's last block."""
    for line in report.read_text().splitlines():
        if line.startswith(NOTE := "**Note:** "):
            console.print(f"note: {line[len(NOTE) :]}", markup=False)
    _more_blocks_note(report.parent)


@app.command("bench-serve")
def bench_serve_command(
    run_dir: Path = typer.Argument(..., help="a run directory of `ccdrec run` (or a competitor run of `ccdrec compare`)"),
    batch: int | None = typer.Option(None, min=1, help="users in the batch measurement \\[default: 1,024, or every user]"),
    repeats: int = typer.Option(10, min=1, help="timed repetitions per measurement (the median is reported)"),
    k: int = typer.Option(20, "-k", min=1, help="recommendation list length"),
    device: str = typer.Option("cpu", help="auto, cpu or cuda"),
    json_out: Path | None = typer.Option(
        None, "--json", help="also write the figures to this JSON file (its missing directories are made)"
    ),
    threads: ThreadsOpt = None,
) -> None:
    """Serving cost of the final teacher ensemble vs the final served student: parameters, memory, top-K latency."""
    from ccdrec.serve_bench import DEFAULT_BATCH, TARGET_SPEEDUP, bench_records, bench_serve, format_bench, speedup

    _set_threads(threads)
    if json_out is not None:
        _check_output_file(json_out, "--json")
    df = bench_serve(run_dir, batch=batch or DEFAULT_BATCH, repeats=repeats, k=k, device=device)
    text = format_bench(df)
    listed, measured = df.attrs.get("k", k), int(df.loc["student", "batch_users"])
    if batch is not None and measured < batch:  # a --batch given; the default takes every user of a small stream
        print(
            f"note: --batch {batch:,} is more than the {measured:,} users there are; the batch measured has them all",
            file=sys.stderr,
        )
    if listed < k:
        print(f"note: -k {k} is more than the {listed:,} items there are; the lists measured hold all", file=sys.stderr)
    table = Table(title=f"serving cost of {run_dir} (top-{listed}, seen items excluded, median of {repeats})")
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


_SIGNALLED: list[int] = []  # the signals received: an interruption is reported even where a library swallowed it


RETRY_SECONDS = 0.05  # an interruption that arrives during an import or a file write is raised this long after, retried


UNINTERRUPTIBLE_IO = frozenset({"atomic_write_bytes", "load_tensors"})  # of ccdrec/checkpoint.py


def _uninterruptible(frame) -> bool:
    """Whether ``frame`` runs inside an import (a module's body, torch's native initialisation) or a
    checkpoint's write or read (:func:`ccdrec.checkpoint.atomic_write_bytes`, :func:`~ccdrec.checkpoint.load_tensors`;
    ``torch.save`` and ``torch.load`` call back into Python from C++): an exception raised there can leave a
    module half-initialised, abort the process from C++, or come out of torch's reader or writer as a
    RuntimeError with a traceback."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith("<frozen importlib") or (
            code.co_name in UNINTERRUPTIBLE_IO and code.co_filename.endswith("checkpoint.py")
        ):
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame) -> None:
    """SIGINT / SIGTERM: KeyboardInterrupt, the path of Ctrl-C; during an import or a file write it is
    deferred (SIGALRM after :data:`RETRY_SECONDS`, :func:`_raise_deferred`) until that is done."""
    _SIGNALLED.append(signum)
    _raise_deferred(signum, frame)


def _raise_deferred(signum, frame) -> None:
    import signal

    if _uninterruptible(frame) and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        return
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: user mistakes become one-line errors with exit code 2.

    SIGTERM (what ``kill``, ``timeout`` and job schedulers send) takes the path of Ctrl-C: the
    completed stages are kept, the workers are stopped and the resume command is printed. An
    interruption ends with the shell's code for the signal, 128 + its number (Ctrl-C 130, SIGTERM
    143), also where a library caught the KeyboardInterrupt (an import, a file read) and carried on or
    turned it into an error.
    """
    import signal

    from ccdrec.memory import keep_freed_memory

    keep_freed_memory()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _raise_deferred)  # an interruption deferred past an import
    try:
        _dispatch()
    except SystemExit as e:
        if _SIGNALLED:
            if e.code != 130:  # 130: the interruption was reported where it was caught
                print("interrupted", file=sys.stderr)
            sys.exit(128 + _SIGNALLED[0])
        raise
    if _SIGNALLED:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + _SIGNALLED[0])


REPEATABLE = frozenset({"--set"})  # options that take one value per use


def repeated_option(args: list[str]) -> str | None:
    """The first option of ``args`` (before a ``--``) given twice, other than a :data:`REPEATABLE` one, an
    on/off pair (``--bench`` and ``--no-bench``) counting as one option; click would keep the last value
    without a word, which hides a mistyped command line."""
    seen: dict[str, str] = {}
    for token in args:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not (name.startswith("--") and len(name) > 2 or len(name) == 2 and name[0] == "-" and name[1].isalpha()):
            continue
        key = "--" + name[5:] if name.startswith("--no-") else name
        if key in seen and name not in REPEATABLE:
            return name if seen[key] == name else f"{seen[key]} / {name}"
        seen[key] = name
    return None


PATH_OPTIONS = frozenset({"--resume", "--out", "--from-run", "--json", "--data", "--config"})
RUN_DIR_COMMANDS = frozenset({"recommend", "serve", "bench-serve"})  # their first argument is a run directory


def empty_path(args: list[str]) -> str | None:
    """What in ``args`` is an empty path (``--resume ""``, ``--out=``, ``recommend ""``: an unset shell
    variable), or None. Click reads ``""`` as the current directory, which turns the mistake into a
    puzzling error about ``.``, or worse, a run written into the current directory."""
    if len(args) > 1 and args[0] in RUN_DIR_COMMANDS and args[1] == "":
        return f"the run directory of `ccdrec {args[0]}`"
    for n, token in enumerate(args):
        if token == "--":
            break
        name, eq, value = token.partition("=")
        if name in PATH_OPTIONS and ((eq and not value) or (not eq and n + 1 < len(args) and args[n + 1] == "")):
            return name
    return None


def _dispatch() -> None:
    """Run the command line; every way it can fail ends in :class:`SystemExit` with its code and message."""
    try:
        if twice := repeated_option(sys.argv[1:]):
            raise CcdrecError(f"{twice} is given twice; give it once")
        if empty := empty_path(sys.argv[1:]):
            raise CcdrecError(f"{empty} is an empty path (an unset shell variable?); give the path")
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
    except TyperException as e:  # usage errors: unknown option, bad value, missing argument
        show = getattr(e, "show", None)
        if callable(show):
            show()
        else:
            print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:  # what click makes of an end of input it did not expect
        print("error: aborted (unexpected end of input)", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a path the user gave that cannot be written or read (a file for a directory, ...)
        where = f": {e.filename}" if e.filename else ""
        why = " (a part of the path is a file)" if e.errno == errno.ENOTDIR else ""
        print(f"error: {e.strerror or type(e).__name__}{where}{why}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if (oom := out_of_memory(e)) is None:
            raise
        print(f"error: {oom}", file=sys.stderr)
        sys.exit(1)


@app.command("serve")
def serve_command(
    run_dir: Path = typer.Argument(
        ...,
        help="a run directory written by `ccdrec run` (finished, or still running once its first student D_0 is distilled)",
    ),
    host: str = typer.Option("127.0.0.1", help="address to listen on: loopback by default; 0.0.0.0 for every interface"),
    port: int = typer.Option(8000, help="TCP port"),
    teacher: bool = typer.Option(False, "--teacher", help="serve the teacher ensemble instead of the student (to compare costs)"),
    poll: float = typer.Option(0.5, help="seconds between looks at the run directory for a newer student"),
    threads: int = typer.Option(1, help="CPU threads of torch in the service"),
    access_log: bool = typer.Option(False, "--access-log", help="log every request"),
) -> None:
    r"""Serve the run's student over HTTP, swapping in each newer student the run completes.

    GET /recommend/{user}?k=20, POST /recommend (a batch of users), POST /recommend/items (cold start), GET /health, GET /model, the page at / and the OpenAPI schema at /docs. Needs `pip install 'ccdrec\[serve]'`.
    """  # noqa: E501
    from ccdrec.service.server import check_options, serve

    check_options(port, poll, threads)  # finite and in range: `--poll nan` is a one-line error, exit 2
    role = "teacher" if teacher else "student"
    serve(run_dir, host=host, port=port, role=role, poll_seconds=poll, access_log=access_log, threads=threads)
