"""Serving the student: top-K recommendations of a finished (or partial) run, in the original IDs.

The served model is the one the run's ``served`` pointer names: the newest student, D_K once block K's
teacher cycle has distilled it (``student.serve = distilled``, the default), else the student cycle's CL_K
(before the first incremental block: D_0). Items the
user has interacted with in any block so far (every split) are never recommended.

A recommendation for one user costs one (n_items,) score vector: an embedding student's propagated
user and item representations are computed once at load time (numpy, float32), the user's seen items
(a CSR-like index built once) are masked with -inf, and the top ``k`` are taken with a partial sort.
The HTTP service (:mod:`ccdrec.service`) serves through the same :meth:`ServedRun.top`, so its lists
equal ``ccdrec recommend``'s.

Cold start (:meth:`ServedRun.recommend_for_items`, ``ccdrec recommend RUN --items``, ``POST
/recommend/items``): a user the student has never seen, known by the items they just interacted with,
gets the row entity initialisation gives a new user at growth (method.md 5.2), computed by the model's
own :meth:`~ccdrec.models.base.Recommender.grow`, without any training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.data.stream import Stream
from ccdrec.device import resolve_device
from ccdrec.errors import CcdrecError
from ccdrec.models.base import EmbeddingModel
from ccdrec.models.checks import InvalidArgument, WrongArgumentType, check_ids, check_indices, check_int, is_int
from ccdrec.pipeline.rundir import RunDir, trained_on


@dataclass
class Recommendation:
    item: str
    score: float


@dataclass
class ColdStart:
    """The answer of :meth:`ServedRun.recommend_for_items`.

    ``items``: the top-k recommendations, best first, the given items excluded; ``used``: the given item
    IDs that are in the served universe (duplicates removed, in the order given), which made the new
    user's row; ``unknown``: the given IDs that are not (reported, never silently dropped).
    """

    items: list[Recommendation]
    used: list[str]
    unknown: list[str]


def shown_ids(ids: Sequence[str], n: int) -> str:
    """The first ``n`` of ``ids`` as a message shows them: quoted, each cut to 60 characters, `` ...`` after."""
    cut = [repr(x) if len(repr(x)) <= 60 else repr(x)[:57] + "..." for x in list(ids)[:n]]
    return ", ".join(cut) + (" ..." if len(ids) > n else "")


def top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the ``k`` best of ``scores`` (an (n_items,) array, modified in place: the
    ``exclude`` indices become -inf), best first; fewer when fewer than ``k`` are left. ``k`` must be an
    int of at least 1."""
    k = min(check_int("k", k), len(scores))
    scores[exclude[exclude < len(scores)]] = -np.inf
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

    role = "student"  # what messages call the served model

    def __init__(self, run_dir: Path, device: str = "cpu", *, stream: Stream | None = None, state: dict | None = None):
        rd = RunDir.open(run_dir)
        cfg = rd.load_config()
        state = rd.read_state() if state is None else state
        ptr = state["pointers"]
        name = ptr.get("served") or ptr.get("student")
        if name is None:
            raise CcdrecError(
                f"{rd.path}: the run has no student yet (D_0 is distilled once block 0's teachers are trained; "
                "serve it from then on)"
            )
        self.block = int(state.get("block", 0))
        self.stream: Stream = rd.open_stream(cfg) if stream is None else stream
        self.model, self.meta = rd.load_attached(name, self.stream, device, with_meta=True)
        self.checkpoint = str(name)
        self.init = cfg.student.init if cfg.student.init != "random" else "entity"  # cold start (recommend_for_items)
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
        self._item_index: dict[str, int] | None = None
        self._train: sp.csr_matrix | None = None
        self._later: dict[str, int] | None = None  # users of blocks not reached yet (first_block)
        seen = [b.split(s) for b in self.stream.blocks[: self.block + 1] for s in ("train", "valid", "test")]
        pairs = np.concatenate([*seen, self._set_aside_seen()])
        order = np.argsort(pairs[:, 0], kind="stable")
        self._seen_users, self._seen_items = pairs[order, 0], pairs[order, 1]
        self._seen_ptr = np.searchsorted(self._seen_users, np.arange(n_u + 1))

    def _set_aside_seen(self) -> np.ndarray:
        """(m, 2) user and item indices of the held-out pairs ``data prepare`` set aside in blocks 0..``block``
        (``left_out.json``, in block order; their item had no train pair in its block): interactions of the
        log all the same, so never recommended. Empty for a stream without the record."""
        from ccdrec.data.append import read_set_aside

        counts, source = self.stream.left_out, getattr(self.stream, "source", None)
        pairs = read_set_aside(Path(source)) if counts and source is not None else []
        if not pairs or sum(counts) != len(pairs):
            return np.empty((0, 2), dtype=np.int64)
        items = self._item_positions()  # exactly as written: a set-aside item may be in no block's vocabulary
        known = [(self._user_index.get(u), items.get(i)) for u, i in pairs[: sum(counts[: self.block + 1])]]
        return np.array([p for p in known if None not in p], dtype=np.int64).reshape(-1, 2)

    def _user_key(self, user: str | int) -> str:
        """An original user ID as the key it is looked up by (as given, else without surrounding spaces)."""
        if not (isinstance(user, str) or is_int(user)):
            raise WrongArgumentType(f"user must be one user ID (a str or an int), not {type(user).__name__} {user!r:.60}")
        key = str(user)
        if key not in self._user_index and key.strip() in self._user_index:
            key = key.strip()
        return key

    def first_block(self, user: str | int) -> int | None:
        """The block of the stream in which ``user``, an ID outside the served universe, first appears, when
        it is in a block the served model has not reached yet; else None. (A dictionary of the later users,
        built at the first call, makes every later call O(1).)"""
        if self._later is None:
            n, sizes = len(self.user_ids), np.asarray([b.n_users for b in self.stream])
            vocab = self.stream.user_vocab
            ids = vocab[n:].astype(str) if vocab is not None else np.arange(n, sizes[-1]).astype(str)  # no vocabulary: 0..n-1
            blocks = np.searchsorted(sizes, np.arange(n, n + len(ids)), side="right")
            self._later = dict(zip(reversed(ids.tolist()), reversed(blocks.tolist()), strict=True))  # the first wins
        return self._later.get(self._user_key(user))

    def later_hint(self, user: str | int) -> str:
        """``; it first appears in block k of the stream, and the served student has reached block b`` for an
        ID of a block the served model has not reached yet (:meth:`first_block`); else nothing. The end of
        :meth:`user_index`'s error (``ccdrec recommend``) and of the HTTP service's 404."""
        first = self.first_block(user)
        if first is None:
            return ""
        return f"; it first appears in block {first} of the stream, and the served {self.role} has reached block {self.block}"

    def user_index(self, user: str | int) -> int:
        """The row of an original user ID (as given, else without surrounding spaces, as ``--items`` reads IDs).

        ``user`` must be one ID, a ``str`` or an int (:class:`WrongArgumentType` otherwise); an unknown one is a
        :class:`CcdrecError` that names the block a user of a later block first appears in (:meth:`later_hint`)."""
        key = self._user_key(user)
        if key not in self._user_index:
            raise CcdrecError(
                f"unknown user {shown_ids([key], 1)}: not in the served {self.role}'s universe ({len(self.user_ids):,} users)"
                + self.later_hint(key)
            )
        return self._user_index[key]

    def _uid(self, uid: int) -> int:
        """A user index checked: an int in 0..n_users-1."""
        if not is_int(uid):
            raise WrongArgumentType(f"uid must be a user index (an int; user_index(ID) gives it), not {type(uid).__name__}")
        if not 0 <= uid < len(self._seen_ptr) - 1:
            raise InvalidArgument(f"uid must be a user index in 0..{len(self._seen_ptr) - 2}, not {uid}")
        return int(uid)

    def seen(self, uid: int) -> np.ndarray:
        """Item indices user ``uid`` has interacted with in any split of blocks 0..``block``."""
        uid = self._uid(uid)
        return self._seen_items[self._seen_ptr[uid] : self._seen_ptr[uid + 1]]

    def scores(self, uid: int) -> np.ndarray:
        """(n_items,) float32 scores of user index ``uid`` against every item (a fresh array)."""
        uid = self._uid(uid)
        if self._reps is not None:
            users, items_t = self._reps
            return users[uid] @ items_t
        return self._scorer(torch.tensor([uid], device=self.model.device))[0].float().cpu().numpy()

    def top(self, uid: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) of the top-``k`` unseen items of user index ``uid``, best first (fewer
        when fewer than ``k`` items are unseen)."""
        return top_k(self.scores(uid), self.seen(uid), k)

    def recommend(self, user: str | int, k: int = 20) -> list[Recommendation]:
        """Top-``k`` unseen items for ``user`` (an original user ID, a str or an int), best first; ``k`` must be
        an int of at least 1 (:class:`~ccdrec.models.checks.InvalidArgument` otherwise)."""
        check_int("k", k)
        items, scores = self.top(self.user_index(user), k)
        return [Recommendation(str(self.item_ids[i]), float(s)) for i, s in zip(items.tolist(), scores.tolist(), strict=True)]

    def item_index(self, item: str | int) -> int | None:
        """The index of original item ID ``item`` in the served universe (as given, else without surrounding
        spaces, as a user ID is looked up), or None when it is not in it."""
        key, items = str(item), self._item_positions()
        found = items.get(key)
        return items.get(key.strip()) if found is None else found

    def _item_positions(self) -> dict[str, int]:
        """Original item ID -> index in the served universe (built once)."""
        if self._item_index is None:
            self._item_index = {str(x): i for i, x in enumerate(self.item_ids)}
        return self._item_index

    def _train_graph(self) -> sp.csr_matrix:
        """The train matrix the served model is attached to (its block's, or the union of blocks 0..k)."""
        if self._train is None:
            self._train = trained_on(self.stream, self.meta).matrix("train", self.model.n_users, self.model.n_items)
        return self._train

    def cold_start_scores(self, item_idx: Sequence[int]) -> np.ndarray:
        """(n_items,) float32 scores for a new user whose interactions are the item indices ``item_idx``.

        MF and LightGCN students: the model is copied and grown by one user with its own
        :meth:`~ccdrec.models.base.Recommender.grow`, the train matrix being the served block's with
        the new user's row appended, so the row is exactly what a new user with these block items gets
        at growth (method.md 5.2: (e¹ + e²) / 2, e¹ the mean of the items' ego embeddings, e² the mean
        of the K = 20 most active users sharing one of them; ``one_hop`` runs: e¹ alone; ``random``
        runs use the entity initialisation, a random row being no answer). The scores are then the
        grown model's own: for LightGCN the propagated representations over the grown graph, in which
        the new user is linked to its items (its layers are the normalised sums over those items, and
        the items' representations include the new user), as a model grown at the next block would
        score before training. An approximation that keeps the served item representations would
        skip the propagation (O(nnz · d · layers) per call: a few ms on the bundled streams) but
        rank differently from the grown model; the exact scores were preferred. MF needs no
        propagation (its scores are the grown ego row against the item table).
        Mult-VAE students encode the items as the user's input row (the VAE has no user rows to grow).
        Raises :class:`CcdrecError` for a model without a cold-start path (the teacher ensemble).
        """
        from ccdrec.models.vae import MultVAE

        n_u, n_i = self.model.n_users, self.model.n_items
        idx = np.unique(check_indices("item_idx", item_idx, n_i, "item indices"))
        row = sp.csr_matrix((np.ones(len(idx), dtype=np.float32), (np.zeros(len(idx), dtype=np.int64), idx)), shape=(1, n_i))
        with torch.no_grad():
            if isinstance(self.model, EmbeddingModel):
                grown = sp.vstack([self._train_graph(), row], format="csr")
                twin = self.model.clone()
                twin.grow(n_u + 1, n_i, grown, self.init)
                users, items = twin.propagate()
                return (users[n_u] @ items.T).float().cpu().numpy()
            if isinstance(self.model, MultVAE):
                scores = self.model.scorer(row)(torch.zeros(1, dtype=torch.long, device=self.model.device))
                return scores[0].float().cpu().numpy()
        raise CcdrecError(f"{self.checkpoint}: no cold-start path for a {type(self.model).__name__}; serve the student")

    def recommend_for_items(self, items: Sequence[str | int], k: int = 20) -> ColdStart:
        """Top-``k`` items for a user the student has never seen, from the original IDs of the ``items`` they
        just interacted with (cold start without retraining; :meth:`cold_start_scores`, method.md 5.2).

        The given items are excluded. Unknown IDs are left out of the row and returned in ``.unknown``;
        none known or no item given is a :class:`CcdrecError`. ``items`` must be a list (any iterable) of
        IDs, each a ``str`` or an int: one string is a ``TypeError`` (it would be read as its characters),
        and so is ``None``; ``k`` must be an int of at least 1.
        """
        check_int("k", k)
        names = list(dict.fromkeys(str(x) for x in check_ids("items", items)))
        if not names:
            raise CcdrecError("give at least one item the user interacted with")
        pos = [self.item_index(n) for n in names]
        unknown = [n for n, i in zip(names, pos, strict=True) if i is None]
        used = [n for n, i in zip(names, pos, strict=True) if i is not None]
        if not used:
            shown = shown_ids(unknown, 5)
            raise CcdrecError(
                f"none of the {len(names)} item(s) is in the served student's universe ({len(self.item_ids):,} items): {shown}"
            )
        idx = np.array([i for i in pos if i is not None], dtype=np.int64)
        top, scores = top_k(self.cold_start_scores(idx), idx, k)
        recs = [Recommendation(str(self.item_ids[i]), float(s)) for i, s in zip(top.tolist(), scores.tolist(), strict=True)]
        return ColdStart(recs, used, unknown)


def load_run(run_dir: str | Path, device: str = "cpu") -> ServedRun:
    """Open a run directory for serving: ``load_run(RUN).recommend(user, k=20)``, ``load_run(RUN).recommend_for_items([...])``."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise WrongArgumentType(f"run_dir must be the path of a run directory (a str or a Path), not {type(run_dir).__name__}")
    if not str(run_dir).strip():  # never read as '.', the current directory (as the command line refuses it)
        raise InvalidArgument("run_dir is an empty path; give the path of a run directory")
    return ServedRun(Path(run_dir), resolve_device(device))
