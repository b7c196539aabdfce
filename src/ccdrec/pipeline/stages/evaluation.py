"""Evaluation after block k (method.md 8): every reported model on the test split of every block
j <= k (r_(k,j)), on block k's new users, and on the validation split of every block j <= k (the same
protocol on validation, on which settings are chosen; test splits are for the final report)."""

from __future__ import annotations

import numpy as np

from ccdrec.data.stream import Stream
from ccdrec.eval.metrics import evaluate_many
from ccdrec.pipeline.context import RunContext, StageOutput
from ccdrec.report.tables import fmt


def evaluate_models(models: dict, stream: Stream, k: int, ks: tuple[int, ...]) -> list[dict]:
    """r_{k,j} rows (``kind: test``, test split of every block j <= k), block k's new-user rows and the
    same r_{k,j} on the validation splits (``kind: valid``), per named model (method.md 8). One scoring
    pass per model serves every split, and every name of a model given under several names."""
    rows = []
    block = stream[k]
    requests = [("valid", j, stream[j], "valid", None) for j in range(k + 1)]
    requests += [("test", j, stream[j], "test", None) for j in range(k + 1)]
    if k > 0:
        requests.append(("new_users", k, block, "test", np.arange(block.prev_users, block.n_users)))
    scored: dict[int, list] = {}  # id(model) -> its results
    for name, model in models.items():
        if id(model) not in scored:
            scored[id(model)] = evaluate_many(model, [(b, split, users) for _, _, b, split, users in requests], ks=ks)
        for (kind, j, *_), out in zip(requests, scored[id(model)], strict=True):
            rows.append({"kind": kind, "model": name, "k": k, "j": j, **out})
    return rows


def evaluate(ctx: RunContext, models: dict, k: int) -> StageOutput:
    """Stage ``bK/eval`` of ``models`` (name -> model); prints each model's r_(k,k)."""
    rows = evaluate_models(models, ctx.stream, k, tuple(ctx.cfg.ks))
    width = max(len(name) for name in models)
    recall, ndcg = ctx.cfg.metrics
    for r in rows:
        if r["kind"] == "test" and r["j"] == k:
            scores = f"test {recall} {fmt(r[recall])}  {ndcg} {fmt(r[ndcg])}"
            ctx.console.print(f"  block {k}  {r['model']:<{width}} {scores}  ({r['users']:,} users)")
    return StageOutput(rows=rows)
