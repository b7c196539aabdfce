"""Serving the student: top-K recommendations of a finished (or partial) run, in the original IDs.

The served model is the last student update CL_K (before the first incremental block: D_0). Items the
user has interacted with in any block so far (every split) are never recommended.

A recommendation for one user costs one (n_items,) score vector: an embedding student's propagated
user and item representations are computed once at load time (numpy, float32), the user's seen items
(a CSR-like index built once) are masked with -inf, and the top ``k`` are taken with a partial sort.
The HTTP service (:mod:`ccdrec.service`) serves through the same :meth:`ServedRun.top`, so its lists
equal ``ccdrec recommend``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccdrec.data.stream import Stream
from ccdrec.errors import CcdrecError
from ccdrec.models.base import EmbeddingModel
from ccdrec.pipeline.rundir import RunDir


@dataclass
class Recommendation:
    item: str
    score: float


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the ``k`` best of ``scores`` (an (n_items,) array, modified in place: the
    ``exclude`` indices become -inf), best first; fewer when fewer than ``k`` are left."""
    scores[exclude[exclude < len(scores)]] = -np.inf
    k = min(k, len(scores))
    if k < 1:
        return np.empty(0, dtype=np.int64), scores[:0]
    part = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
    order = part[np.argsort(-scores[part], kind="stable")]
    order = order[np.isfinite(scores[order])]
    return order, scores[order]


class ServedRun:
    """The served student of a run directory, ready to recommend.

    ``stream`` (the run's stream, already opened and checked) and ``state`` (a ``state.json`` already
    read) spare a reload when a service loads a newer student of the same run; by default both are read
    from ``run_dir``. ``checkpoint`` is the name of the checkpoint served, ``meta`` its metadata.
    """

    def __init__(self, run_dir: Path, device: str = "cpu", *, stream: Stream | None = None, state: dict | None = None):
        rd = RunDir.open(run_dir)
        cfg = rd.load_config()
        state = rd.read_state() if state is None else state
        ptr = state["pointers"]
        name = ptr.get("served") or ptr.get("student")
        if name is None:
            raise CcdrecError(f"{rd.path}: the run has no student yet (it stopped before distilling D_0)")
        self.model, meta = rd.load_model(name, device)
        self.checkpoint, self.meta = str(name), meta
        self.block = int(state.get("block", 0))
        self.stream: Stream = rd.open_stream(cfg) if stream is None else stream
        trained_on = self.stream[int(meta.get("block", self.block))]
        self.model.set_graph(trained_on.matrix("train", self.model.n_users, self.model.n_items))
        self.model.eval()
        self._reps: tuple[np.ndarray, np.ndarray] | None = None  # (users (n_u, d), items transposed (d, n_i))
        if isinstance(self.model, EmbeddingModel):  # propagate once (LightGCN), score with numpy
            with torch.no_grad():
                users, items = (t.detach().float().cpu().numpy() for t in self.model.propagate())
            self._reps = (np.ascontiguousarray(users), np.ascontiguousarray(items.T))
        else:
            self._scorer = self.model.scorer()
        self._index_universe(self.model.n_users, self.model.n_items)

    def _index_universe(self, n_u: int, n_i: int) -> None:
        """The original IDs of the served universe and every user's seen items (blocks 0..``block``)."""
        self.user_ids = self.stream.user_vocab[:n_u] if self.stream.user_vocab is not None else np.arange(n_u).astype(str)
        self.item_ids = self.stream.item_vocab[:n_i] if self.stream.item_vocab is not None else np.arange(n_i).astype(str)
        self._user_index = {str(u): i for i, u in enumerate(self.user_ids)}
        seen = [b.split(s) for b in self.stream.blocks[: self.block + 1] for s in ("train", "valid", "test")]
        pairs = np.concatenate(seen)
        order = np.argsort(pairs[:, 0], kind="stable")
        self._seen_users, self._seen_items = pairs[order, 0], pairs[order, 1]
        self._seen_ptr = np.searchsorted(self._seen_users, np.arange(n_u + 1))

    def user_index(self, user: str | int) -> int:
        key = str(user)
        if key not in self._user_index:
            raise CcdrecError(f"unknown user {key!r}: not in the served student's universe ({len(self.user_ids):,} users)")
        return self._user_index[key]

    def seen(self, uid: int) -> np.ndarray:
        """Item indices user ``uid`` has interacted with in any split of blocks 0..``block``."""
        return self._seen_items[self._seen_ptr[uid] : self._seen_ptr[uid + 1]]

    def scores(self, uid: int) -> np.ndarray:
        """(n_items,) float32 scores of user index ``uid`` against every item (a fresh array)."""
        if self._reps is not None:
            users, items_t = self._reps
            return users[uid] @ items_t
        return self._scorer(torch.tensor([uid], device=self.model.device))[0].float().cpu().numpy()

    def top(self, uid: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) of the top-``k`` unseen items of user index ``uid``, best first (fewer
        when fewer than ``k`` items are unseen)."""
        return top_k(self.scores(uid), self.seen(uid), k)

    def recommend(self, user: str | int, k: int = 20) -> list[Recommendation]:
        """Top-``k`` unseen items for ``user`` (an original user ID), best first."""
        if k < 1:
            raise CcdrecError("k must be at least 1")
        items, scores = self.top(self.user_index(user), k)
        return [Recommendation(str(self.item_ids[i]), float(s)) for i, s in zip(items.tolist(), scores.tolist(), strict=True)]


def load_run(run_dir: str | Path, device: str = "cpu") -> ServedRun:
    """Open a run directory for serving: ``load_run(RUN).recommend(user, k=20)``."""
    return ServedRun(Path(run_dir), device)
