"""The rank-based teacher ensemble and the teacher's top lists (method.md 6 and 7).

Rank ensemble (method.md 6). For member m let r_m(u, i) be the 0-based rank of item i in m's
ranking of all items for user u (0 = top). The ensemble score is

    E(u, i) = mean_m (min(r_m(u, i), rank_cap) + 1) ** (-exponent),   exponent = 0.05, rank_cap = 45,000,

so ranks past the cap share the weight of rank ``rank_cap``. Averaging rank weights instead of raw
scores makes members with different score scales (BPR models, Mult-VAE logits) comparable.

Top lists (method.md 7). The interesting list of a user is the teacher's top-n items *excluding the
user's observed items*, in teacher order; the interesting list of an item is its top-n users
excluding the users who observed it. Observed pairs are masked with ``-inf`` before ``topk`` (the
authors' release masked them with NaN, which torch sorts *first*, so their lists were filled with
the user's own training items; method.md 9). Everything is computed in user chunks: no
``n_users x n_items`` matrix is ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.eval.metrics import check_scores
from ccdrec.eval.ranking import add_rank_weights, ascending_values
from ccdrec.models.base import Recommender, Scorer
from ccdrec.models.checks import InvalidArgument, WrongArgumentType, check_fraction, check_indices, check_int

DEFAULT_EXPONENT = 0.05
DEFAULT_RANK_CAP = 45_000
DEFAULT_EXACT_TOP: int | None = None
DEFAULT_SKETCH = 1_024
PAD = -1


class RankEnsemble:
    """A teacher ensemble scoring E(u, i) = mean_m (min(r_m(u, i), rank_cap) + 1)^(-exponent) (method.md 6).

    Duck-types as a :class:`~ccdrec.models.base.Recommender` for evaluation and serving
    (``n_users``, ``n_items``, ``device``, ``scorer(context=None)``). All members must share the
    universe. Scores are computed on the first member's device, one user chunk at a time, with memory
    ``O(chunk x n_items)`` per member.
    """

    kind = "ensemble"

    def __init__(
        self,
        members: Sequence[Recommender],
        exponent: float = DEFAULT_EXPONENT,
        rank_cap: int = DEFAULT_RANK_CAP,
        exact_top: int | None = DEFAULT_EXACT_TOP,
        sketch: int = DEFAULT_SKETCH,
    ):
        if isinstance(members, Recommender | str) or not isinstance(members, Sequence):
            raise WrongArgumentType(f"members must be a list of models, not {type(members).__name__}")
        members = list(members)
        if not members:
            raise InvalidArgument("a RankEnsemble needs at least one member")
        if bad := [type(m).__name__ for m in members if not all(hasattr(m, a) for a in ("n_users", "n_items", "scorer"))]:
            raise WrongArgumentType(f"members must be models (MF, LightGCN, MultVAE: n_users, n_items, scorer), not {bad[0]}")
        universes = {(m.n_users, m.n_items) for m in members}
        if len(universes) != 1:
            raise InvalidArgument(f"ensemble members must share one universe (n_users, n_items), got {sorted(universes)}")
        exponent = check_fraction("exponent", exponent, low=1e-12, high=math.inf)
        rank_cap = check_int("rank_cap", rank_cap, minimum=0)
        exact_top = None if exact_top is None else check_int("exact_top", exact_top)
        sketch = check_int("sketch", sketch)
        self.members = members
        self.exponent = float(exponent)
        self.rank_cap = int(rank_cap)
        self.exact_top = exact_top
        self.sketch = int(sketch)

    @property
    def n_users(self) -> int:
        return self.members[0].n_users

    @property
    def n_items(self) -> int:
        return self.members[0].n_items

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members)

    @property
    def uses_context(self) -> bool:
        return any(getattr(m, "uses_context", True) for m in self.members)

    def eval(self) -> RankEnsemble:
        for m in self.members:
            m.eval()
        return self

    def position_weights(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(n_items,) weight of each rank position: (min(r, rank_cap) + 1)^(-exponent)."""
        ranks = torch.arange(self.n_items, dtype=torch.float64).clamp_max(self.rank_cap)
        return (ranks + 1.0).pow(-self.exponent).to(device=device or self.device, dtype=torch.float32)

    def scorer(self, context: sp.csr_matrix | None = None) -> Scorer:
        """A no-grad function mapping user IDs to their (B, n_items) ensemble scores.

        ``context`` is passed on to every member (the Mult-VAE's input rows; embedding models ignore it).
        Each member's scorer is built once here, so propagated state is cached across chunks.
        """
        many = self.context_scorer([context])

        def score(users: torch.Tensor) -> torch.Tensor:
            return next(many(users, [torch.arange(len(users), device=users.device)]))

        return score

    def context_scorer(self, contexts: Sequence[sp.csr_matrix | None]) -> Callable[..., Iterator[torch.Tensor]]:
        """Scores of one user chunk under several contexts, ranking context-free members only once.

        ``score(users, rows)`` yields, for each context c in turn, the (len(rows[c]), n_items) scores of
        ``users[rows[c]]``, equal to ``self.scorer(contexts[c])(users[rows[c]])``. Members whose scores
        ignore the context (MF, LightGCN) are ranked once for all ``users``; only context members
        (Mult-VAE) are ranked per context. Members' rank weights are summed context-free members first,
        then context members, each group in member order (the same order for every context).
        Memory: two ``len(users) x n_items`` blocks besides the members' own.
        """
        free = [m for m in self.members if not getattr(m, "uses_context", True)]
        bound = [m for m in self.members if getattr(m, "uses_context", True)]
        free_scorers = [m.scorer(context=None) for m in free]
        bound_scorers = [[m.scorer(context=c) for m in bound] for c in contexts]
        device = self.device
        weights = self.position_weights(device)
        n_members = len(self.members)
        exact = self.exact_top is None or self.exact_top >= self.n_items or self.sketch >= self.n_items
        columns = None
        if not exact:
            gen = torch.Generator().manual_seed(0)
            columns = torch.randperm(self.n_items, generator=gen)[: self.sketch].to(device)

        def add_weights(acc: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            """acc += the rank weights of ``scores`` (exact ranks, or sketched below ``exact_top``)."""
            scores = scores.to(device=device, dtype=torch.float32)
            if columns is None:
                add_rank_weights(acc, scores, weights)
            else:
                acc += self._sketched_weights(torch.nan_to_num(scores, nan=-torch.inf), weights, columns)
            return acc

        @torch.no_grad()
        def score(users: torch.Tensor, rows: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
            shared = None
            if free_scorers:
                shared = torch.zeros(len(users), self.n_items, device=device)
                for s in free_scorers:
                    add_weights(shared, s(users))
            for scorers, r in zip(bound_scorers, rows, strict=True):
                r = r.to(device)
                if len(r) == 0:
                    yield torch.zeros(0, self.n_items, device=device)
                    continue
                out = shared[r] if shared is not None else torch.zeros(len(r), self.n_items, device=device)
                sub = users[r.to(users.device)]
                for s in scorers:
                    add_weights(out, s(sub))
                yield out / n_members

        return score

    def _sketched_weights(self, scores: torch.Tensor, weights: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Rank weights with exact ranks for each row's top ``exact_top`` items and estimated ranks below.

        A full sort of every row costs O(n log n) per user and member (seconds per chunk on a CPU at
        Gowalla's 41K items). Instead, the top ``exact_top`` items get their exact rank (``topk``); every
        other item gets the rank n · (share of a fixed random sketch of ``sketch`` items scoring higher),
        at least ``exact_top``. The rank weight (r + 1)^(-0.05) is flat in the tail (0.708 at rank 1,000,
        0.589 at 40,000), so the estimate moves tail weights little while the top ranks stay exact.
        """
        n, top = scores.shape[1], int(self.exact_top)
        sample = ascending_values(scores.index_select(1, columns))
        above = sample.shape[1] - torch.searchsorted(sample, scores.contiguous(), right=True)
        est = (above.float() * (n / sample.shape[1])).clamp(min=top, max=n - 1).long()
        out = weights[est]
        top_idx = scores.topk(top, dim=1).indices
        out.scatter_(1, top_idx, weights[:top].expand(scores.shape[0], top))
        return out


def _chunk_pairs(observed: sp.csr_matrix, batch: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(row position in ``batch``, column) of the non-zeros of ``observed[batch]`` inside ``n_cols``."""
    inside = batch < observed.shape[0]
    sub = observed[batch[inside]]
    rows = np.repeat(np.flatnonzero(inside), np.diff(sub.indptr))
    keep = sub.indices < n_cols
    return rows[keep], sub.indices[keep].astype(np.int64)


@torch.no_grad()
def top_lists(
    scorer: Scorer,
    n_users: int,
    n_items: int,
    observed: sp.spmatrix | None,
    n: int = 40,
    chunk: int = 512,
    users: np.ndarray | None = None,
    *,
    device: torch.device | str = "cpu",
    item_side: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The teacher's interesting lists for RRD (user side) and IR-RRD (item side), method.md 7.

    Returns ``(user_top, item_top)``, (n_users, min(n, n_items)) and (n_items, min(n, scored users)):
    ``user_top[u]`` holds the ``n`` highest-scored items of user u
    that u has not observed, in descending score order; ``item_top[i]`` the ``n`` highest-scored users
    (among ``users``) that have not observed item i, in descending score order. Observed pairs (the
    non-zeros of ``observed``; a smaller matrix covers an earlier universe) are masked with ``-inf``
    before ``topk``, NaN scores likewise. Rows with fewer than ``n`` candidates, and the rows of users
    that are not scored, are padded with -1. ``users=None`` scores every user. ``item_side=False``
    skips the item side (``item_top`` is None).

    The item side keeps a running top-``n`` per item: each chunk's own top-``n`` users per item are
    merged into it, so memory is ``O(n_items x n)`` besides the chunk's scores; ties between equal
    scores are broken arbitrarily.
    """
    n, chunk = check_int("n", n), check_int("chunk", chunk)
    if not callable(scorer):
        raise WrongArgumentType(f"scorer must be a function of user indices (model.scorer()), not {type(scorer).__name__}")
    n_users, n_items = check_int("n_users", n_users), check_int("n_items", n_items)
    observed = sp.csr_matrix(observed) if observed is not None else sp.csr_matrix((n_users, n_items), dtype=np.float32)
    users = (
        np.arange(n_users, dtype=np.int64) if users is None else np.unique(check_indices("users", users, n_users, "user indices"))
    )
    k_user, n = min(n, n_items), min(n, max(len(users), 1))  # no list is longer than what it ranks
    user_top = np.full((n_users, k_user), PAD, dtype=np.int64)
    # the running item-side top lists, one column per item
    best_scores = torch.full((n, n_items), -torch.inf, device=device)
    best_users = torch.full((n, n_items), PAD, dtype=torch.long, device=device)
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        scores = scorer(torch.from_numpy(batch).to(device))
        check_scores(scores, len(batch), n_items)
        scores = scores.to(device=device, dtype=torch.float32)
        scores = torch.nan_to_num(scores, nan=-torch.inf)
        r, c = _chunk_pairs(observed, batch, n_items)
        scores[torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)] = -torch.inf
        # user side
        vals, idx = scores.topk(k_user, dim=1)
        idx = torch.where(torch.isfinite(vals), idx, PAD)
        user_top[batch] = idx.cpu().numpy()
        if not item_side:
            continue
        # item side: this chunk's candidates per item, merged into the running top-n
        vals, ids = _item_candidates(scores, best_scores[-1], torch.from_numpy(batch).to(device), n)
        if vals is None:
            continue
        vals, pos = torch.cat([best_scores, vals], dim=0).topk(n, dim=0)
        best_scores, best_users = vals, torch.cat([best_users, ids], dim=0).gather(0, pos)
    if not item_side:
        return user_top, None
    item_top = torch.where(torch.isfinite(best_scores), best_users, PAD).T.contiguous().cpu().numpy()
    return user_top, item_top


def _item_candidates(
    scores: torch.Tensor, floor: torch.Tensor, users: torch.Tensor, n: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The entries of a chunk's ``scores`` (users x items) that may enter the items' running top-n.

    Only scores above ``floor`` (each item's current n-th best) can. Returns ``(values, users)`` as
    ``(m, n_items)`` columns padded with -inf / PAD, or ``(None, None)`` when no entry qualifies. Once a
    few chunks have been merged, few entries clear the floor, so the candidates are gathered sparsely
    instead of by a ``topk`` down every item's column of the chunk (63 ms for 512 x 12,000 on one core).
    """
    above = scores > floor
    count = int(above.sum())
    if count == 0:
        return None, None
    if count * 8 > above.numel():  # the first chunks: most entries qualify
        vals, pos = scores.topk(min(n, scores.shape[0]), dim=0)
        return vals, users[pos]
    rows, cols = above.nonzero(as_tuple=True)  # row-major: rows ascending within each item
    cols, order = cols.sort(stable=True)
    rows = rows[order]
    per_item = torch.bincount(cols, minlength=scores.shape[1])
    slot = torch.arange(len(cols), device=cols.device) - (per_item.cumsum(0) - per_item)[cols]
    m = int(per_item.max())
    vals = torch.full((m, scores.shape[1]), -torch.inf, device=scores.device)
    ids = torch.full((m, scores.shape[1]), PAD, dtype=torch.long, device=scores.device)
    vals[slot, cols] = scores[rows, cols]
    ids[slot, cols] = users[rows]
    return vals, ids


def top_matrix(top: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Binary CSR matrix of the (row, entry) pairs of a padded top list (row r -> its valid entries)."""
    rows, cols = np.nonzero(top >= 0)
    m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, top[rows, cols])), shape=(top.shape[0], n_cols))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
