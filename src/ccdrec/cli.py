"""The ``ccdrec`` command line: the only place that parses arguments."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ccdrec.errors import CcdrecError

app = typer.Typer(help="Continual Collaborative Distillation for recommenders on a stream.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect bundled streams and prepare your own logs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()


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

    stream = prepare_stream(log, out, user_col=user_col, item_col=item_col, time_col=time_col, min_user=min_user,
                            min_item=min_item, base_fraction=base_fraction, n_blocks=blocks, seed=seed, force=force)
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
    epochs: Optional[int] = typer.Option(None, help="maximum epochs (default: the model's schedule)"),
    lr: Optional[float] = typer.Option(None, help="learning rate"),
    batch_size: Optional[int] = typer.Option(None, help="batch size"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Optional[Path] = typer.Option(None, help="write the best model here as OUT.pt + OUT.json"),
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


def main() -> None:
    """Entry point: user mistakes become one-line errors with exit code 2."""
    try:
        app(standalone_mode=False)
    except CcdrecError as e:
        print(f"error: {e}", file=sys.stderr)
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
