"""Serving cost of a run: the final teacher ensemble against the final served student (method.md 8).

For each of the two, measured in one process:

* ``parameters``: the number of trainable parameters (the ensemble: all members together);
* ``serving_mb``: the tensors that must be kept to serve, in MiB: for MF / LightGCN the final
  (propagated) user and item representations the scorer caches; for Mult-VAE the encoder, μ head and
  decoder plus the users' input rows (sparse); the ensemble: all its members;
* ``one_user_ms`` / ``batch_ms``: the latency of a top-20 recommendation excluding the user's seen
  items (every split of every block so far) for one user, and for a batch of 1,024 users: scores,
  masking of seen items and ``topk``; the teacher also ranks every member's full item list and
  aggregates the rank weights (method.md 6). Median over ``repeats`` timed runs after one warm-up run;
  the single-user runs cycle through different users. Precomputation done once at load time
  (LightGCN propagation) is not counted.

The ratio row is teacher / student for every column. The issue's target: the student serves the
batch at least 20x faster than the teacher ensemble.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ccdrec.data.stream import Stream
from ccdrec.device import resolve_device
from ccdrec.distill.ensemble import RankEnsemble
from ccdrec.errors import CcdrecError
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.vae import MultVAE
from ccdrec.pipeline.rundir import RunDir

TARGET_SPEEDUP = 20.0
MIB = 1024 * 1024


@dataclass
class ServingModels:
    """The final teacher ensemble and served student of a run, with every user's seen items."""

    teacher: RankEnsemble
    student: Recommender
    seen: sp.csr_matrix
    stream: Stream
    block: int


DEFAULT_BATCH = 1024  # users of the batch measurement


def seen_matrix(stream: Stream, block: int, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary ``shape`` matrix of every (user, item) of every split of blocks 0..``block``."""
    pairs = np.concatenate([b.split(s) for b in stream.blocks[: block + 1] for s in ("train", "valid", "test")])
    keep = (pairs[:, 0] < shape[0]) & (pairs[:, 1] < shape[1])
    pairs = pairs[keep]
    m = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32), (pairs[:, 0], pairs[:, 1])), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def load_serving(run_dir: str | Path, device: str = "cpu") -> ServingModels:
    """The final models of a CCD or competitor run directory (pointers ``teacherM`` and ``served`` / ``student``)."""
    rd = RunDir.open(run_dir)
    cfg = rd.load_config()
    state = rd.read_state()
    ptr = state["pointers"]
    dev = resolve_device(device)
    stream = rd.open_stream(cfg)

    def load(name: str) -> Recommender:
        return rd.load_attached(name, stream, dev).eval()

    names = [ptr.get(f"teacher{m}") for m in range(len(cfg.teacher.members))]
    if any(n is None for n in names):
        raise CcdrecError(f"{rd.path}: the run has not trained every teacher member yet")
    student_name = ptr.get("served") or ptr.get("student")
    if student_name is None:
        raise CcdrecError(f"{rd.path}: the run has no student yet")
    teacher = RankEnsemble([load(n) for n in names], exact_top=cfg.teacher.ensemble_exact_top)
    student = load(student_name)
    block = int(state.get("block", 0))
    return ServingModels(teacher, student, seen_matrix(stream, block, (student.n_users, student.n_items)), stream, block)


def _csr_bytes(m: sp.csr_matrix | None) -> int:
    return 0 if m is None else int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)


@torch.no_grad()
def serving_bytes(model) -> int:
    """Bytes of the tensors that must be kept to serve ``model`` (see the module docstring)."""
    if isinstance(model, RankEnsemble):
        return sum(serving_bytes(m) for m in model.members)
    if isinstance(model, EmbeddingModel):
        users, items = model.propagate()
        return int(users.numel() * users.element_size() + items.numel() * items.element_size())
    if isinstance(model, MultVAE):
        params = [p for name, p in model.named_parameters() if not name.startswith("logvar")]
        return int(sum(p.numel() * p.element_size() for p in params)) + _csr_bytes(model._context)
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def num_parameters(model) -> int:
    return int(model.num_parameters())


def recommender(model, seen: sp.csr_matrix, k: int = 20) -> Callable[[np.ndarray], torch.Tensor]:
    """users -> (B, k) item IDs: the top-``k`` items of each user, seen items excluded (the serving path)."""
    scorer = model.scorer()
    device = model.device
    n_items = model.n_items

    def recommend(users: np.ndarray) -> torch.Tensor:
        scores = scorer(torch.from_numpy(users).to(device)).float()
        sub = seen[users]
        rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
        cols = sub.indices
        keep = cols < n_items
        scores[torch.from_numpy(rows[keep]).to(device), torch.from_numpy(cols[keep].astype(np.int64)).to(device)] = -torch.inf
        return scores.topk(min(k, n_items), dim=1).indices

    return recommend


def median_seconds(fn: Callable[[int], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of ``fn(i)`` over ``repeats`` runs (i = 0..repeats-1), after one warm-up run."""
    fn(0)
    sync()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, seen: sp.csr_matrix, users: np.ndarray, batch: int, repeats: int, k: int = 20) -> dict:
    """Parameters, serving MiB, and median one-user / batch latency (ms) of one model."""
    rec = recommender(model, seen, k)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    one = median_seconds(lambda i: rec(users[i % len(users)][None]), repeats, sync)
    batch_users = users[:batch]
    many = median_seconds(lambda i: rec(batch_users), repeats, sync)
    return {
        "parameters": num_parameters(model),
        "serving_mb": serving_bytes(model) / MIB,
        "one_user_ms": one * 1e3,
        "batch_ms": many * 1e3,
        "batch_users": len(batch_users),
    }


def bench_models(teacher, student, seen: sp.csr_matrix, batch: int = 1024, repeats: int = 10, k: int = 20, seed: int = 0):
    """The serving-cost table of ``teacher`` and ``student`` (rows teacher, student, teacher / student);
    ``df.attrs["k"]`` is the length of the lists measured: ``k``, or every item where there are fewer."""
    if batch < 1 or repeats < 1:
        raise CcdrecError("batch and repeats must be at least 1")
    n_users = min(teacher.n_users, student.n_users)
    rng = np.random.default_rng(seed)
    users = rng.permutation(n_users)[: max(batch, repeats)].astype(np.int64)
    t = measure(teacher, seen, users, batch, repeats, k)
    s = measure(student, seen, users, batch, repeats, k)
    ratio = {c: t[c] / s[c] if s[c] else float("nan") for c in ("parameters", "serving_mb", "one_user_ms", "batch_ms")}
    ratio["batch_users"] = float("nan")
    df = pd.DataFrame([t, s, ratio], index=pd.Index(["teacher ensemble", "student", "teacher / student"], name="model"))
    df.attrs["k"] = min(k, teacher.n_items)  # a list is never longer than the items there are
    return df


def bench_serve(
    run_dir: str | Path, batch: int = DEFAULT_BATCH, repeats: int = 10, k: int = 20, device: str = "cpu", seed: int = 0
):
    """Measure the serving cost of a run's final teacher ensemble and served student (module docstring)."""
    models = load_serving(run_dir, device)
    return bench_models(models.teacher, models.student, models.seen, batch, repeats, k, seed)


def speedup(df: pd.DataFrame) -> float:
    """Teacher / student latency on the batch."""
    return float(df.loc["teacher / student", "batch_ms"])


def format_bench(df: pd.DataFrame) -> pd.DataFrame:
    """The serving-cost table as text: counts with thousands separators, ratios as ``12.3x``."""
    out = pd.DataFrame(index=df.index, dtype=object)
    for name, row in df.iterrows():
        if name == "teacher / student":
            out.loc[name, "parameters"] = f"{row['parameters']:.1f}x"
            out.loc[name, "serving MiB"] = f"{row['serving_mb']:.1f}x"
            out.loc[name, "1 user (ms)"] = f"{row['one_user_ms']:.1f}x"
            out.loc[name, "batch (ms)"] = f"{row['batch_ms']:.1f}x"
        else:
            out.loc[name, "parameters"] = f"{int(row['parameters']):,}"
            out.loc[name, "serving MiB"] = f"{row['serving_mb']:.3f}"
            out.loc[name, "1 user (ms)"] = f"{row['one_user_ms']:.3f}"
            out.loc[name, "batch (ms)"] = f"{row['batch_ms']:.3f}"
    batch = int(df["batch_users"].dropna().iloc[0]) if df["batch_users"].notna().any() else 0
    return out.rename(columns={"batch (ms)": f"batch of {batch:,} (ms)"})


def bench_markdown(df: pd.DataFrame) -> str:
    """The figures of :func:`bench_serve` as a Markdown table and the student's batch speed-up against its target."""
    met = "met" if speedup(df) >= TARGET_SPEEDUP else "NOT met"
    table = format_bench(df).to_markdown()
    return f"{table}\n\nBatch speed-up of the student: {speedup(df):.1f}x (target >= {TARGET_SPEEDUP:.0f}x: {met}).\n"


COUNTS = ("parameters", "batch_users")


def bench_records(df: pd.DataFrame) -> list[dict]:
    """The serving-cost table as JSON-able records (NaN -> None)."""
    records = df.reset_index().to_dict(orient="records")

    def value(model: str, key: str, v):
        if isinstance(v, float) and v != v:
            return None
        if key in COUNTS and model != "teacher / student" and isinstance(v, float) and v.is_integer():
            return int(v)  # a count (the ratio row's NaN made the column float)
        return v

    return [{k: value(r["model"], k, v) for k, v in r.items()} for r in records]


def read_bench(path: str | Path) -> pd.DataFrame:
    """A serving-cost table written by :func:`bench_records` (JSON) back as a DataFrame."""
    from ccdrec.checkpoint import read_json

    records = read_json(Path(path))
    if not isinstance(records, list) or not records or "model" not in records[0]:
        raise CcdrecError(f"{path}: not a serving-cost table")
    return pd.DataFrame(records).set_index("model").astype(float)
