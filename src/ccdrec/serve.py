"""Serving the student: top-K recommendations of a finished (or partial) run, in the original IDs.

The served model is the last student update CL_K (before the first incremental block: D_0). Items the
user has interacted with in any block so far (every split) are never recommended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ccdrec.data.stream import Stream, load_stream
from ccdrec.errors import CcdrecError
from ccdrec.pipeline.rundir import RunDir


@dataclass
class Recommendation:
    item: str
    score: float


class ServedRun:
    """The served student of a run directory, ready to recommend."""

    def __init__(self, run_dir: Path, device: str = "cpu"):
        rd = RunDir.open(run_dir)
        cfg = rd.load_config()
        state = rd.read_state()
        ptr = state["pointers"]
        name = ptr.get("served") or ptr.get("student")
        if name is None:
            raise CcdrecError(f"{rd.path}: the run has no student yet (it stopped before distilling D_0)")
        self.model, meta = rd.load_model(name, device)
        self.block = int(state.get("block", 0))
        self.stream: Stream = load_stream(cfg.dataset)
        trained_on = self.stream[int(meta.get("block", self.block))]
        self.model.set_graph(trained_on.matrix("train", self.model.n_users, self.model.n_items))
        self.model.eval()
        self._scorer = self.model.scorer()
        n_u, n_i = self.model.n_users, self.model.n_items
        self.user_ids = self.stream.user_vocab[:n_u] if self.stream.user_vocab is not None else np.arange(n_u).astype(str)
        self.item_ids = self.stream.item_vocab[:n_i] if self.stream.item_vocab is not None else np.arange(n_i).astype(str)
        self._user_index = {str(u): i for i, u in enumerate(self.user_ids)}
        seen = [b.split(s) for b in self.stream.blocks[: self.block + 1] for s in ("train", "valid", "test")]
        pairs = np.concatenate(seen)
        order = np.argsort(pairs[:, 0], kind="stable")
        self._seen_users, self._seen_items = pairs[order, 0], pairs[order, 1]

    def user_index(self, user: str | int) -> int:
        key = str(user)
        if key not in self._user_index:
            raise CcdrecError(f"unknown user {key!r}: not in the served student's universe ({len(self.user_ids):,} users)")
        return self._user_index[key]

    def seen(self, uid: int) -> np.ndarray:
        lo, hi = np.searchsorted(self._seen_users, [uid, uid + 1])
        return self._seen_items[lo:hi]

    def recommend(self, user: str | int, k: int = 20) -> list[Recommendation]:
        """Top-``k`` unseen items for ``user`` (an original user ID), best first."""
        if k < 1:
            raise CcdrecError("k must be at least 1")
        uid = self.user_index(user)
        scores = self._scorer(torch.tensor([uid], device=self.model.device))[0].float()
        seen = self.seen(uid)
        scores[torch.from_numpy(seen[seen < len(scores)]).to(scores.device)] = -torch.inf
        k = min(k, int(torch.isfinite(scores).sum()))
        top = scores.topk(k)
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        return [Recommendation(str(self.item_ids[i]), float(s)) for s, i in pairs]


def load_run(run_dir: str | Path, device: str = "cpu") -> ServedRun:
    """Open a run directory for serving: ``load_run(RUN).recommend(user, k=20)``."""
    return ServedRun(Path(run_dir), device)
