"""Proxy-guided replay (method.md 5.1 for the student, 5.3 for the teacher members).

For each old user u and each source X (the proxies SP, PP; for the teacher also the served student
CL_k) with a budget n_X > 0:

* candidates C_X(u) = X's top-A items for u after removing u's excluded items (train items of blocks
  k-1 and k);
* rank disparity d(u, i) = rank_W(u, i) − rank_X(u, i), with rank_W the 0-based rank of i in the
  **current** model's full ranking for u and rank_X its position in X's candidate list; a large d
  means X still ranks i high while the model has pushed it down, i.e. forgotten knowledge;
* n_X items are drawn from C_X(u) without replacement with probability ∝ exp(ε · d(u, i)), ε = 1e-4;
* each drawn pair gets the soft label y = σ(s_X(u, i)); the sources are merged, keeping the larger
  label for a pair drawn from several sources.

Both ranks are taken over the same candidate universe: every item of the current universe except u's
excluded items (an excluded item never counts as "above" another). rank_X is therefore the position in
X's list after exclusion, and rank_W counts the non-excluded items the current model scores strictly
higher.

Deviation from the authors' release fixed here (method.md 9): the student side ranked against the
fixed starting student D_{k-1} and was sampled once per block. This module takes the *current* model's
scorer, and the stage code re-samples (:func:`sample_replay`) whenever the model has moved (e.g. at
each evaluation / epoch), on the student and teacher side alike.

Training: :func:`replay_pass` runs λ_e · BCEWithLogits(s_model(u, i), y) over the replay set after the
block's BPR pass, λ_e = :func:`replay_weight` (0.5·exp(−e/10) student, 0.5·exp(−e/5) teacher).
Mult-VAE members do not take a BCE pass: :func:`impute_replay` writes the replayed pairs into their
input/target rows with value 0.1 and :class:`PreviousOutputKL` regularises their output towards the
previous block's model (method.md 5.3).

Memory: every score computation works on ``chunk x n_items`` blocks of users, never a full
users x items matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from ccdrec.config import ReplayLabels, bounded_batch
from ccdrec.eval.ranking import ascending_values
from ccdrec.models.base import EmbeddingModel, Scorer
from ccdrec.models.checks import InvalidArgument, check_int
from ccdrec.models.indexing import take_rows
from ccdrec.models.vae import MultVAE, rows_tensor
from ccdrec.train.callbacks import Callback

DEFAULT_EPS = 1e-4
VAE_REPLAY_VALUE = 0.1


@dataclass
class ReplaySet:
    """Replayed (user, item) pairs with soft labels: ``users``/``items`` int64, ``labels`` float32."""

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.float32)
        if not (len(self.users) == len(self.items) == len(self.labels)):
            raise ValueError("replay users, items and labels must have the same length")

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def empty(cls) -> ReplaySet:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))


def replay_weight(epoch: int, scale: float = 0.5, decay: float = 10.0) -> float:
    """λ_e = scale · exp(−e / decay): 0.5·exp(−e/10) for the student (5.1), decay 5 for teachers (5.3);
    ``epoch`` is the 0-based epoch index, ``decay`` positive."""
    epoch = check_int("epoch", epoch, minimum=0)
    if not decay > 0:
        raise InvalidArgument(f"decay must be positive, not {decay}")
    return scale * math.exp(-epoch / decay)


# --------------------------------------------------------------------------------------------- helpers


def _fit_columns(scores: torch.Tensor, n_items: int, copy: bool = True) -> torch.Tensor:
    """``scores`` cut or padded with −inf to exactly ``n_items`` columns: a fresh copy (callers mask
    it in place; never write into a scorer's cached tensor), or a possible view with ``copy=False``."""
    scores = scores.float()
    if scores.shape[1] > n_items:
        scores = scores[:, :n_items]
    elif scores.shape[1] < n_items:
        pad = scores.new_full((scores.shape[0], n_items - scores.shape[1]), -torch.inf)
        return torch.cat([scores, pad], dim=1)
    return scores.clone() if copy else scores


def _excluded(exclude: sp.csr_matrix | None, users: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(row position, column) of ``exclude[users]``'s entries inside ``n_items``; rows past its end are empty."""
    if exclude is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    inside = users < exclude.shape[0]
    pos = np.flatnonzero(inside)
    sub = exclude[users[inside]]
    rows = np.repeat(pos, np.diff(sub.indptr))
    keep = sub.indices < n_items
    return rows[keep], sub.indices[keep].astype(np.int64)


def _mask(scores: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    if len(rows):
        dev = scores.device
        scores[torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev)] = -torch.inf
    return scores


def _count_above(sorted_asc: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``sorted_asc`` are strictly greater than each of ``values``."""
    return sorted_asc.shape[1] - torch.searchsorted(sorted_asc, values.contiguous(), right=True)


def _as_csr(m: sp.spmatrix | None) -> sp.csr_matrix | None:
    return None if m is None else sp.csr_matrix(m)


# ----------------------------------------------------------------------------------------------- ranks


def rank_of(
    scorer: Scorer,
    users: np.ndarray,
    items: np.ndarray,
    n_items: int,
    exclude: sp.spmatrix | None = None,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """0-based rank of each ``items[b, a]`` in the scorer's full ranking for ``users[b]`` (0 = top).

    rank(u, i) = |{j in universe, j not excluded for u : s(u, j) > s(u, i)}| — ties count nothing (an
    item tied with i is not above it). Items in ``exclude`` (a CSR matrix, rows by user ID, possibly
    fewer rows/columns than the universe) are left out of the count: they are the user's own train
    items, which are never candidates, so the rank is the rank among the candidates. The rank of an
    excluded item itself is still reported (among the non-excluded ones).

    Computed ``chunk`` users at a time: memory is O(chunk x n_items).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if items.ndim == 1:
        items = items[:, None]
    if items.shape[0] != len(users):
        raise ValueError(f"items must have one row per user: {items.shape} vs {len(users)} users")
    exclude = _as_csr(exclude)
    out = np.empty(items.shape, dtype=np.int64)
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        scores = _fit_columns(scorer(torch.from_numpy(batch).to(device)), n_items, copy=False)
        target = scores.gather(1, torch.from_numpy(items[start : start + chunk]).to(scores.device))
        ranks = _count_above(ascending_values(scores, masked=_excluded(exclude, batch, n_items)), target)
        out[start : start + len(batch)] = ranks.cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- replay


@dataclass
class Candidates:
    """A source's replay candidates C_X(u) for sorted unique ``users``: X's top-A non-excluded items
    per user in X's order (``items[r, a]`` has rank_X = a), with X's scores (−inf pads rows with
    fewer than A candidates). A source is fixed while a model trains, so its candidates are computed
    once (:func:`replay_candidates`) and reused every time the replay set is re-drawn."""

    users: np.ndarray
    items: torch.Tensor
    scores: torch.Tensor

    def rows(self, batch: np.ndarray, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``a`` candidates (items, scores) of each user of ``batch`` (all must be known)."""
        if a > self.items.shape[1]:
            raise ValueError(f"candidates hold {self.items.shape[1]} items per user, {a} requested")
        pos = np.searchsorted(self.users, batch)
        if len(batch) and (pos.max() >= len(self.users) or not np.array_equal(self.users[pos], batch)):
            raise ValueError("replay candidates were computed for other users")
        pos_t = torch.from_numpy(pos).to(self.items.device)
        return self.items[pos_t, :a], self.scores[pos_t, :a]


def replay_candidates(
    scorer: Scorer,
    users: np.ndarray,
    n_items: int,
    exclude: sp.spmatrix | None,
    top_a: int,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
) -> Candidates:
    """X's top-``top_a`` items for each of ``users`` after removing each user's ``exclude`` items (5.1)."""
    users = np.unique(np.asarray(users, dtype=np.int64))
    exclude = _as_csr(exclude)
    a = min(int(top_a), n_items)
    items, scores = [], []
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        src = _fit_columns(scorer(torch.from_numpy(batch).to(device)).to(device), n_items)
        top_scores, top_items = _mask(src, *_excluded(exclude, batch, n_items)).topk(a, dim=1)
        items.append(top_items)
        scores.append(top_scores)
    if not items:
        return Candidates(users, torch.zeros(0, a, dtype=torch.long, device=device), torch.zeros(0, a, device=device))
    return Candidates(users, torch.cat(items), torch.cat(scores))


class _ExactRanking:
    """The current model's full ranking of a chunk of users: rank_W and the score at a rank position."""

    def __init__(self, scorer: Scorer, batch: np.ndarray, n_items: int, exclude: sp.csr_matrix | None, device):
        # rank_W counts non-excluded items only: they are masked in the sorted copy; the candidates
        # (never excluded) are read from the unmasked scores
        self.scores = _fit_columns(scorer(torch.from_numpy(batch).to(device)), n_items, copy=False)
        self.sorted = ascending_values(self.scores, masked=_excluded(exclude, batch, n_items))
        self.device = self.scores.device

    def rank_of(self, items: torch.Tensor) -> torch.Tensor:
        return _count_above(self.sorted, self.scores.gather(1, items)).float()

    def score_at(self, position: torch.Tensor) -> torch.Tensor:
        return self.sorted.gather(1, self.sorted.shape[1] - 1 - position)


class _SampledRanking:
    """rank_W estimated from ``sample`` items drawn uniformly (with replacement) for a chunk of users.

    With m of the sample's items not excluded for u and n_u items not excluded in the universe,
    rank_W(u, i) ≈ |{sampled j not excluded: s(u, j) > s(u, i)}| · n_u / m, an unbiased estimate whose
    standard error is n_u · sqrt(p(1 − p) / m) for a true rank p · n_u; the score at rank position r is
    read at position r · m / n_u of the sample's ranking. Cost: chunk x sample, not chunk x n_items.
    """

    def __init__(self, reps, batch: np.ndarray, n_items: int, exclude, sample: int, rng: np.random.Generator, device):
        users, items = reps
        self.device = users.device
        self.users = take_rows(users, torch.from_numpy(batch).to(self.device))
        self.items = items
        drawn = np.sort(rng.integers(0, n_items, sample))
        rows, cols = _excluded(exclude, batch, n_items)
        lo, hi = np.searchsorted(drawn, cols, "left"), np.searchsorted(drawn, cols, "right")
        hits = hi - lo  # sampled copies of each excluded (row, item) pair
        mask_rows = np.repeat(rows, hits)
        mask_cols = np.repeat(lo - np.cumsum(hits) + hits, hits) + np.arange(int(hits.sum()))
        scores = self.users @ take_rows(items, torch.from_numpy(drawn).to(self.device)).T
        self.sorted = ascending_values(scores, masked=(mask_rows, mask_cols))
        kept = sample - np.bincount(mask_rows, minlength=len(batch))
        valid = n_items - np.bincount(rows, minlength=len(batch))
        self.kept = torch.from_numpy(np.maximum(kept, 1)).to(self.device, torch.float32)[:, None]
        self.scale = torch.from_numpy(valid / np.maximum(kept, 1)).to(self.device, torch.float32)[:, None]

    def rank_of(self, items: torch.Tensor) -> torch.Tensor:
        targets = (self.users[:, None, :] * self.items[items]).sum(-1)
        return _count_above(self.sorted, targets).float() * self.scale

    def score_at(self, position: torch.Tensor) -> torch.Tensor:
        pos = ((position.float() + 0.5) / self.scale).long().clamp_(max=self.kept.long() - 1)
        return self.sorted.gather(1, self.sorted.shape[1] - 1 - pos)


def sample_replay(
    current_scorer: Scorer,
    n_items: int,
    sources: Sequence[tuple[Scorer | Candidates, int]],
    users: np.ndarray,
    exclude: sp.spmatrix | None,
    top_a: int,
    eps: float = DEFAULT_EPS,
    rng: np.random.Generator | None = None,
    chunk: int = 1024,
    device: torch.device | str = "cpu",
    labels: ReplayLabels = "source",
    rank_sample: int | None = None,
    reps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ReplaySet:
    """Proxy-guided replay set for ``users`` (method.md 5.1; 5.3 with sources SP, PP and CL_k).

    ``current_scorer``: the model being trained (its ranking gives rank_W, re-sample as it moves);
    ``sources``: ``(scorer_X, n_X)`` pairs, e.g. ``[(sp.scorer(n_items=n), n_S), (pp.scorer(n_items=n), n_P)]``
    (scorers of a smaller universe are padded with −inf), or ``(candidates_X, n_X)`` with X's
    :func:`replay_candidates` for these users, ``exclude`` and at least ``top_a`` items; ``exclude``:
    CSR of each user's train items of blocks k-1 and k (rows by user ID; may have fewer rows/columns
    than the universe).

    For each user and source: candidates = X's top-``top_a`` non-excluded items (positions rank_X =
    0..A-1), d = rank_W − rank_X, draw min(n_X, |candidates|) of them without replacement with
    P ∝ exp(ε·d) — by Gumbel-top-k (keys ε·d − max + Gumbel noise from ``rng``; taking the n_X largest
    keys is exactly successive sampling without replacement ∝ exp(ε·d)), label σ(s_X(u, i)) for
    ``labels="source"``. ``labels="rank"`` calibrates the label to the current model's own scale: y =
    σ(s_W of the item the current model ranks at position rank_X), i.e. "score the item as you score
    your rank_X-th item". Sources' logits are not calibrated probabilities: on Yelp a served student
    CL_2's top logits are about 0.07 (labels ≈ 0.5) while a stability proxy's are about 12 (labels ≈ 1),
    so source labels pull a teacher's scores of its own top items towards 0 (see :data:`ReplayLabels`).
    Sources are merged keeping the larger label of a repeated pair. Deterministic given ``rng``.
    ``users`` is deduplicated; users unknown to a source (a −inf row, e.g. beyond a proxy's table) get
    nothing from it. Returns pairs sorted by (user, item).

    ``rank_sample`` with ``reps``, the current embedding model's propagated (users, items) tables
    (``EmbeddingModel.propagate``, at least ``n_items`` item rows): when the universe has more than
    ``rank_sample`` items, rank_W and the rank-position scores are estimated from ``rank_sample``
    sampled items per chunk (:class:`_SampledRanking`), so the draw costs users x ``rank_sample``
    instead of users x items; else (and without ``reps``) the exact full ranking.
    """
    rng = np.random.default_rng() if rng is None else rng
    users = np.unique(np.asarray(users, dtype=np.int64))
    users = users[users >= 0]
    exclude = _as_csr(exclude)
    active = [(source, int(n)) for source, n in sources if int(n) > 0]
    if not active or len(users) == 0 or top_a <= 0 or n_items <= 0:
        return ReplaySet.empty()
    a = min(int(top_a), n_items)
    active = [
        (c if isinstance(c, Candidates) else replay_candidates(c, users, n_items, exclude, a, chunk, device), n)
        for c, n in active
    ]
    sampled = reps is not None and rank_sample is not None and rank_sample < n_items <= reps[1].shape[0]
    out_u, out_i, out_y = [], [], []
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        if sampled:
            ranking = _SampledRanking(reps, batch, n_items, exclude, rank_sample, rng, device)
        else:
            ranking = _ExactRanking(current_scorer, batch, n_items, exclude, device)
        dev = ranking.device
        position = torch.arange(a, device=dev, dtype=torch.float32)
        for candidates, n_draw in active:
            top_items, top_scores = (t.to(dev) for t in candidates.rows(batch, a))
            valid = torch.isfinite(top_scores)
            logits = eps * (ranking.rank_of(top_items) - position)
            logits = logits.masked_fill(~valid, -torch.inf)
            logits = logits - logits.max(dim=1, keepdim=True).values.nan_to_num(neginf=0.0)
            gumbel = torch.from_numpy(rng.gumbel(size=logits.shape).astype(np.float32)).to(dev)
            keys, pick = (logits + gumbel).topk(min(n_draw, a), dim=1)
            drawn = torch.isfinite(keys)
            rows = torch.arange(len(batch), device=dev)[:, None].expand_as(pick)[drawn]
            out_u.append(batch[rows.cpu().numpy()])
            out_i.append(top_items.gather(1, pick)[drawn].cpu().numpy())
            if labels == "source":
                label_logits = top_scores.gather(1, pick)
            else:  # "rank": the current model's own score at position rank_X of its ranking
                label_logits = ranking.score_at(pick)
            out_y.append(torch.sigmoid(label_logits[drawn]).cpu().numpy())
        del ranking  # its chunk x n_items blocks go before the next chunk's are made (peak memory)
    return _merge_max(np.concatenate(out_u), np.concatenate(out_i), np.concatenate(out_y), n_items)


def _merge_max(users: np.ndarray, items: np.ndarray, labels: np.ndarray, n_items: int) -> ReplaySet:
    """Unique (user, item) pairs, each with the largest label it was drawn with."""
    if len(users) == 0:
        return ReplaySet.empty()
    key = users.astype(np.int64) * n_items + items.astype(np.int64)
    uniq, inverse = np.unique(key, return_inverse=True)
    best = np.full(len(uniq), -np.inf, dtype=np.float32)
    np.maximum.at(best, inverse, labels.astype(np.float32))
    return ReplaySet(uniq // n_items, uniq % n_items, best)


@contextmanager
def own_first_moment(opt: torch.optim.Optimizer, kept: dict[int, torch.Tensor]) -> Iterator[None]:
    """Run the block with each parameter's Adam first moment (``exp_avg``) swapped for the one in ``kept``
    (zeros the first time), then keep that in ``kept`` and put the optimiser's own back.

    A replay pass that shares the epoch's optimiser otherwise starts from the BPR pass's momentum, and
    Adam moves every row in that direction for about 1 / (1 - β1) steps whatever the replay loss is (with
    the replay weight at 1e-9, a Gowalla MF member's update lost 0.006 of its validation H). The second
    moment stays shared, so the replay weight keeps its scale against the BPR gradients.
    """
    swapped = []
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            mine = kept.get(id(p))
            if mine is None or mine.shape != state["exp_avg"].shape:
                mine = torch.zeros_like(state["exp_avg"])
            swapped.append((p, state, state["exp_avg"]))
            state["exp_avg"] = mine
    try:
        yield
    finally:
        for p, state, epoch_moment in swapped:
            kept[id(p)] = state["exp_avg"]
            state["exp_avg"] = epoch_moment


def replay_pass(
    model: EmbeddingModel,
    opt: torch.optim.Optimizer,
    replay: ReplaySet,
    weight: float,
    batch_size: int,
    rng: np.random.Generator,
    max_steps: int | None = None,
) -> float:
    """One shuffled pass of ``weight · BCEWithLogits(s_model(u, i), y)`` (batch mean) over ``replay``, in
    minibatches of ``batch_size`` pairs grown to bound the steps at ``max_steps`` (:func:`~ccdrec.config.bounded_batch`).

    Representations come from ``model.propagate()`` per minibatch (LightGCN propagates through the
    block's graph). Returns the mean weighted loss per pair; does nothing (returns 0.0) for an empty
    set or a zero weight. (method.md writes λ_e · Σ; the batch mean keeps the scale independent of the
    batch size, like the BPR term it is added to.)
    """
    if len(replay) == 0 or weight == 0.0:
        return 0.0
    dev = model.device
    order = rng.permutation(len(replay))
    batch_size = bounded_batch(len(order), batch_size, max_steps)
    total = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        users = torch.from_numpy(replay.users[idx]).to(dev)
        items = torch.from_numpy(replay.items[idx]).to(dev)
        labels = torch.from_numpy(replay.labels[idx]).to(dev)
        scores = model.score_pairs(users, items, model.propagate())
        loss = weight * F.binary_cross_entropy_with_logits(scores, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(order)


# ----------------------------------------------------------------------------------- Mult-VAE members


def impute_replay(matrix: sp.spmatrix, replay: ReplaySet, value: float = VAE_REPLAY_VALUE) -> sp.csr_matrix:
    """``matrix`` with the replayed pairs written as ``value`` where the entry is 0 (method.md 5.3).

    Existing non-zero entries (the block's observed 1s) are kept; the result is the VAE's input and
    target rows (pass it to ``fit(..., inputs=...)``).
    """
    m = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    m.sum_duplicates()
    if len(replay) == 0:
        return m
    u, i = replay.users, replay.items
    if u.min() < 0 or i.min() < 0 or u.max() >= m.shape[0] or i.max() >= m.shape[1]:
        raise ValueError(f"replayed pairs fall outside the matrix of shape {m.shape}")
    key = np.unique(u * m.shape[1] + i)
    u, i = key // m.shape[1], key % m.shape[1]
    free = np.asarray(m[u, i]).ravel() == 0
    add = sp.csr_matrix((np.full(int(free.sum()), value, np.float32), (u[free], i[free])), shape=m.shape)
    return (m + add).tocsr()


def kl_to_previous(prev_logits: torch.Tensor, logits: torch.Tensor, n_old_items: int | None = None) -> torch.Tensor:
    """mean_rows KL(softmax(prev) ‖ softmax(cur)) over the first ``n_old_items`` columns, renormalised.

    The previous model knows only the items that existed before; both distributions are restricted to
    those columns and renormalised there. ``prev_logits`` is treated as a constant.
    """
    n = prev_logits.shape[1] if n_old_items is None else int(n_old_items)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    log_p = F.log_softmax(prev_logits[:, :n].detach().float(), dim=1)
    log_q = F.log_softmax(logits[:, :n].float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


class PreviousOutputKL(Callback):
    """A Mult-VAE training callback whose batch loss is weight · KL(previous model's output ‖ current)
    for persisting users.

    method.md 5.3: a Mult-VAE member is regularised towards the output distribution of its block-(k-1)
    self on the items that existed before (the first ``n_old_items`` columns, renormalised), for the
    batch rows whose users persist from block k-1 (``persisting_users``). The previous outputs are
    recomputed without gradient from ``prev_model`` (deterministic: no dropout, z = μ) on the same input
    rows, i.e. the rows of ``matrix`` — the VAE input given to ``fit`` (e.g. :func:`impute_replay`'s
    output) — cut to the first ``n_old_items`` columns. The batch loss receives only the logits and the
    batch's user IDs, so the object holds ``matrix`` to rebuild those rows.
    """

    def __init__(
        self,
        prev_model: MultVAE,
        persisting_users: np.ndarray,
        n_old_items: int,
        matrix: sp.spmatrix,
        weight: float = 1.0,
    ):
        if prev_model.n_items < n_old_items:
            raise ValueError(f"previous model has {prev_model.n_items} items < n_old_items={n_old_items}")
        self.prev_model = prev_model
        self.n_old_items = int(n_old_items)
        self.matrix = sp.csr_matrix(matrix, dtype=np.float32)
        self.weight = float(weight)
        persisting = np.asarray(persisting_users, dtype=np.int64)
        self._persists = np.zeros(self.matrix.shape[0], dtype=bool)
        self._persists[persisting[(persisting >= 0) & (persisting < self.matrix.shape[0])]] = True

    def __call__(self, model, logits: torch.Tensor, users: np.ndarray, _unused=None, epoch: int = 0) -> torch.Tensor:
        users = np.asarray(users, dtype=np.int64)
        inside = users < len(self._persists)
        keep = np.zeros(len(users), dtype=bool)
        keep[inside] = self._persists[users[inside]]
        if self.weight == 0.0 or not keep.any():
            return logits.new_zeros(())
        kept = torch.from_numpy(users[keep])
        prev_dev = self.prev_model.device
        with torch.no_grad():
            x = rows_tensor(self.matrix, kept, self.prev_model.n_items, prev_dev, below=self.n_old_items)
            prev_logits = self.prev_model(x, stochastic=False)[0].to(logits.device)
        rows = torch.from_numpy(np.flatnonzero(keep)).to(logits.device)
        return self.weight * kl_to_previous(prev_logits, take_rows(logits, rows), self.n_old_items)

    batch_loss = __call__
