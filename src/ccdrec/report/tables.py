"""Tables computed from the rows of ``metrics.jsonl`` (method.md 8): r_{k,j}, LA/RA/H, new users.

Pure functions over lists of metric rows, so that every number in a report is reproducible from the
run directory alone. A metric over no users is missing (``None`` in the rows, NaN in the tables) and
shown as "—" (:func:`as_text`); an r_(k,j) with j > k does not exist and is shown empty.
"""

from __future__ import annotations

import math
import numbers
import re

import pandas as pd

from ccdrec.errors import InvalidArgument, WrongArgumentType
from ccdrec.eval.protocol import StreamScores

MISSING = "—"
_METRIC = re.compile(r"^(recall|ndcg)@(\d+)$")


def lead_metrics(rows: list[dict]) -> tuple[str, str]:
    """(Recall@K, NDCG@K) at the smallest cut-off K the rows' evaluations were computed with."""
    ks = {int(m.group(2)) for r in rows if r.get("kind") == "test" for key in r if (m := _METRIC.match(key))}
    k = min(ks) if ks else 20
    return f"recall@{k}", f"ndcg@{k}"


def fmt(value, spec: str = ".4f") -> str:
    """A number as text; a missing one (None, NaN, pandas' NA) as "—"."""
    if value is None or value is pd.NA or (isinstance(value, numbers.Real) and math.isnan(value)):
        return MISSING
    if isinstance(value, numbers.Integral):
        return str(value)
    return format(value, spec) if isinstance(value, numbers.Real) else str(value)


SECONDS_SPEC = ".1f"  # a time in seconds: tenths (milliseconds are below the noise); never in exponent form


def is_seconds(column) -> bool:
    """A column of times in seconds, by its name: ``... (s)`` or one that names seconds."""
    name = str(column)
    return name.endswith("(s)") or "seconds" in name


def as_text(df: pd.DataFrame, spec: str = ".4f") -> pd.DataFrame:
    """``df`` with every number formatted by :func:`fmt` with ``spec``, columns of seconds
    (:func:`is_seconds`) with :data:`SECONDS_SPEC` (missing values "—", empty strings kept)."""
    out = df.astype(object)
    for col in out.columns:
        col_spec = SECONDS_SPEC if is_seconds(col) else spec
        out[col] = out[col].map(lambda v, s=col_spec: v if isinstance(v, str) else fmt(v, s))
    return out


def test_rows(rows: list[dict], model: str, split: str = "test") -> list[dict]:
    """The r_(k,j) rows of ``model`` on the test splits (``split="valid"``: on the validation splits)."""
    return [r for r in rows if r.get("kind") == split and r.get("model") == model]


def models_in(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r.get("kind") == "test" and r["model"] not in seen:
            seen.append(r["model"])
    return seen


EVALUATED = ("test", "valid", "new_users")


def check_rows(rows, metric: str | None = None, model: str | None = None) -> None:
    """``rows`` a list of metric rows (``RunDir.read_metrics()``, the lines of ``metrics.jsonl``); ``metric``
    one they hold and ``model`` one they evaluate, when they hold any evaluation. A misspelt name would
    give a table of NaN, which reads as "no users to evaluate": an :class:`InvalidArgument` naming the
    ones there are."""
    if isinstance(rows, str | bytes | dict) or not isinstance(rows, list | tuple) or not all(isinstance(r, dict) for r in rows):
        raise WrongArgumentType(f"rows must be a list of metric rows (RunDir(path).read_metrics()), not {type(rows).__name__}")
    evaluated = [r for r in rows if r.get("kind") in EVALUATED]
    if not evaluated:
        return
    if metric is not None:
        if not isinstance(metric, str):
            raise WrongArgumentType(f"a metric is a name such as 'recall@20', not {metric!r:.40}")
        held = sorted({k for r in evaluated for k in r if "@" in k})
        if metric not in held:
            raise InvalidArgument(f"no metric {metric!r} in these rows; they hold {', '.join(held)}")
    if model is not None and model not in {r.get("model") for r in evaluated}:
        raise InvalidArgument(f"no model {model!r} in these rows; they evaluate {', '.join(models_in(rows))}")


def stream_scores(rows: list[dict], model: str, metric: str = "recall@20", split: str = "test") -> StreamScores:
    """The r_(k,j) of ``model`` on the test splits (``split="valid"``: on the validation splits); a model
    the rows do not evaluate gives no r_(k,j) (a comparison asks for every method's roles)."""
    check_rows(rows, metric)
    s = StreamScores()
    for r in test_rows(rows, model, split):
        s.add(r["k"], r["j"], r.get(metric))
    return s


def rkj_table(rows: list[dict], model: str, metric: str = "recall@20") -> pd.DataFrame:
    """The r_{k,j} matrix: one row per block k the model was evaluated after, one column per test block j;
    NaN where r_(k,j) is missing (no test users), an empty string where j > k (not seen yet)."""
    check_rows(rows, metric, model)
    sel = test_rows(rows, model)
    ks = sorted({r["k"] for r in sel})
    js = sorted({r["j"] for r in sel})
    s = stream_scores(rows, model, metric)
    data = {f"D_{j}": [s.r.get((k, j), math.nan) if j <= k else "" for k in ks] for j in js}
    return pd.DataFrame(data, index=[f"after D_{k}" for k in ks], dtype=object)


def per_block(rows: list[dict], model: str, metric: str = "recall@20") -> pd.DataFrame:
    """LA_k, RA_k and H_k for each incremental block k >= 1 the model was evaluated after (NaN: missing)."""
    s = stream_scores(rows, model, metric)
    ks = sorted({r["k"] for r in test_rows(rows, model) if r["k"] >= 1})
    return pd.DataFrame(
        {"LA": [s.la(k) for k in ks], "RA": [s.ra(k) for k in ks], "H": [s.h(k) for k in ks]}, index=pd.Index(ks, name="k")
    )


def summary(rows: list[dict], metrics: tuple[str, ...] = ("recall@20", "ndcg@20")) -> pd.DataFrame:
    """Stream LA / RA / H-mean of every evaluated model, for each metric."""
    if isinstance(metrics, str) or not isinstance(metrics, list | tuple):
        raise WrongArgumentType(f"metrics must be a tuple of names such as ('recall@20',), not {metrics!r:.40}")
    for metric in metrics:
        check_rows(rows, metric)
    out = []
    for model in models_in(rows):
        row = {"model": model}
        for metric in metrics:
            summ = stream_scores(rows, model, metric).summary()
            row.update({f"{name} {metric}": v for name, v in summ.items()})
        out.append(row)
    return pd.DataFrame(out).set_index("model") if out else pd.DataFrame()


def new_users(rows: list[dict], metric: str = "recall@20") -> pd.DataFrame:
    """Block k's new users (test split of block k), per model and block."""
    check_rows(rows, metric)
    sel = [r for r in rows if r.get("kind") == "new_users"]
    if not sel:
        return pd.DataFrame()
    df = pd.DataFrame(sel)
    return df.pivot_table(index="k", columns="model", values=metric, aggfunc="first")


def fit_table(rows: list[dict], metric: str = "recall@20") -> pd.DataFrame:
    sel = [r for r in rows if r.get("kind") == "fit"]
    if not sel:
        return pd.DataFrame()
    cols = ["stage", "model", "best_epoch", "epochs", f"valid_{metric}", "train_seconds"]
    df = pd.DataFrame(sel)
    for col in ("best_epoch", "epochs"):  # counts stay integers beside a row without any (an untrained stage)
        if col in df.columns:
            df[col] = df[col].astype("Int64")
    return df[[c for c in cols if c in df.columns]]


def last_block(rows: list[dict]) -> int | None:
    """The last block k with test rows r_(k,j) in ``rows`` (None: no test rows)."""
    return max((int(r["k"]) for r in rows if r.get("kind") == "test"), default=None)


def coverage_note(parts: dict[str, list[dict]], resume: str) -> str | None:
    """A sentence when the runs of a report (``parts``: a name -> its rows) end at different blocks, whose
    stream figures then average different blocks, with the command ``resume`` (a ``ccdrec compare
    --resume OUT``) that takes every run to the same one; None when they end at one block (or none)."""
    last = {name: k for name, k in ((name, last_block(rows)) for name, rows in parts.items()) if k is not None}
    if len(set(last.values())) <= 1:
        return None
    ends = ", ".join(f"{name} at block {k}" for name, k in last.items())
    return (
        f"the runs end at different blocks ({ends}): stream figures over different blocks do not compare, and a "
        f"table's mean or gain mixes them; {resume} --max-blocks {max(last.values())} takes every run to one block"
    )


def capped_note(rows: list[dict], shown: int = 8) -> str | None:
    """A sentence naming the training stages whose epoch cap ended them while their last validation was
    the best (``fit`` rows marked ``capped``, :class:`ccdrec.train.loop.FitResult`), or None if none did."""
    names = [str(r.get("stage", r.get("model"))) for r in rows if r.get("kind") == "fit" and r.get("capped")]
    if not names:
        return None
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return (
        f"{len(names)} training stage(s) reached their epoch cap still improving (best epoch = last): {listed}. "
        "Early stopping did not end them: more epochs (the `epochs` of the schedule that trains each: teacher.base / "
        "teacher.base_vae at block 0, teacher.update / teacher.update_vae after it, student.distill, student.update) "
        "may learn their block better, at more time; for the updates the cap also bounds forgetting."
    )
