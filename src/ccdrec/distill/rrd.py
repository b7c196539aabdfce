"""Ranking distillation from the teacher ensemble into a fresh student (Stage 1, method.md 7).

RRD (relaxed ranking distillation, Kang et al. CIKM 2020), user side. For user u let a_1..a_n be the
student's scores of the teacher's interesting items (its top-n excluding u's observed items, in teacher
order) and b_1..b_M the scores of a uniform sample of uninteresting items (items outside the list).
The loss is the negative Plackett–Luce log-likelihood of the interesting list being ranked, in order,
above all the uninteresting items:

    L_u = −Σ_t [ a_t − log( Σ_{j≥t} e^{a_j} + Σ_m e^{b_m} ) ].

IR-RRD is the same on the item side: for item i, its teacher's interesting users (top-n excluding
the users who observed it) above a sample of uninteresting users. Student generation minimises

    BPR(Tr_k) + 0.01 · RRD + 0.01 · IR-RRD,

with BPR negatives that also avoid the teacher's interesting items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ccdrec.config import TrainConfig, bounded_batch
from ccdrec.data.stream import Block, pad_to
from ccdrec.distill.agreement import TeacherAgreement
from ccdrec.distill.ensemble import top_matrix
from ccdrec.errors import InvalidArgument, WrongArgumentType
from ccdrec.models.base import EmbeddingModel, Recommender
from ccdrec.models.indexing import take_rows
from ccdrec.train.callbacks import Callback
from ccdrec.train.loop import FitResult, fit

DEFAULT_USER_SAMPLES = 1000
DEFAULT_ITEM_SAMPLES = 1000
DEFAULT_WEIGHT = 0.01


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with masked-out entries replaced by a very negative *finite* value (keeps gradients NaN-free)."""
    if mask is None:
        return x
    return torch.where(mask, x, torch.full_like(x, torch.finfo(x.dtype).min / 4))


class _MaskedLogSumExp(torch.autograd.Function):
    """log Σ_m keep_m · e^{b_m} per row of a (B, M) ``b``, in a few passes over the (B, M) scores.

    ``torch.logsumexp`` of the masked scores costs a masking pass, its own four forward passes and
    three backward ones besides the mask's; here the forward keeps e^{b − max} (0 where masked out) and
    the backward is one product, ∂/∂b_m = keep_m · e^{b_m − lse}. The RRD term is most of a
    distillation step's time, so this is where its time goes (method.md 7). A row with nothing kept
    gets a very negative finite value and zero gradients.
    """

    @staticmethod
    def forward(ctx, b: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        low = torch.finfo(b.dtype).min / 4
        x = b if keep is None else b.masked_fill(~keep, low)
        top = x.amax(1, keepdim=True)
        e = x.sub(top).exp_()
        total = e.sum(1, keepdim=True)
        none = top <= low  # nothing kept in the row: e^{b - max} is 1 there, not 0
        if keep is not None and bool(none.any()):
            e.masked_fill_(none, 0.0)
            total = total.masked_fill(none, 1.0)
        ctx.save_for_backward(e, total)
        return top + total.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        e, total = ctx.saved_tensors
        return e * (grad / total), None


def masked_logsumexp(b: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1) log Σ_m e^{b_m} over the entries of each row of ``b`` (B, M) that ``keep`` marks (all when None)."""
    if keep is not None and (keep.shape != b.shape or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool mask of shape {tuple(b.shape)}, got {keep.dtype} {tuple(keep.shape)}")
    return _MaskedLogSumExp.apply(b, keep)


def rrd_loss(
    interesting: torch.Tensor,
    uninteresting: torch.Tensor,
    mask: torch.Tensor | None = None,
    uninteresting_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over rows of L = −Σ_t [a_t − log(Σ_{j≥t} e^{a_j} + Σ_m e^{b_m})] (method.md 7).

    ``interesting``: (B, n) student scores a_1..a_n of the interesting list, in teacher order;
    ``uninteresting``: (B, M) student scores b_1..b_M of the sampled uninteresting entries.
    ``mask`` (B, n) and ``uninteresting_mask`` (B, M) mark the valid entries (False = padding or a
    sampled collision): a masked entry takes no part in the list, neither as a term nor in any sum.
    Rows without a valid interesting entry are left out of the mean; with none at all the loss is 0.
    Computed stably: with c = max(max_j a_j, log Σ_m e^{b_m}) per row, each denominator is
    c + log(Σ_{j≥t} e^{a_j − c} + e^{log Σ_m e^{b_m} − c}), its suffix sums one reversed ``cumsum`` in
    float64 (the n list entries are few; the M samples go through :func:`masked_logsumexp`).
    """
    if not isinstance(interesting, torch.Tensor) or not isinstance(uninteresting, torch.Tensor):
        raise WrongArgumentType("rrd_loss takes torch tensors of scores")
    if interesting.dim() != 2 or uninteresting.dim() != 2 or interesting.shape[0] != uninteresting.shape[0]:
        raise InvalidArgument(
            f"expected (B, n) and (B, M) scores, got {tuple(interesting.shape)} and {tuple(uninteresting.shape)}"
        )
    if interesting.shape[1] == 0:
        raise InvalidArgument("the interesting lists are empty (B, 0): there is nothing to distil")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != interesting.shape):
        raise InvalidArgument(f"mask must be a bool tensor of shape {tuple(interesting.shape)}")
    a = _masked(interesting, mask)
    below = masked_logsumexp(uninteresting, uninteresting_mask)  # log Σ_m e^{b_m}
    c = torch.maximum(a.amax(1, keepdim=True), below).detach()  # the value does not depend on c
    wide = torch.float64 if a.dtype != torch.float64 else a.dtype
    tail = (a - c).to(wide).exp().flip(1).cumsum(1).flip(1) + (below - c).to(wide).exp()
    if mask is not None:
        # past a row's last valid entry the sum is 0 when no uninteresting entry is kept either (a list
        # shorter than n, every sampled column observed or listed: a small catalogue); its log is -inf and,
        # though torch.where drops the term, the gradient 0 · (1/0) is NaN. Those terms are dropped anyway.
        tail = tail.masked_fill(~mask, 1.0)
    # a suffix far below the row's maximum (a gap past ~745 in float64) underflows to 0: those positions
    # take the log-space suffix sum instead (the rest keep the value above, bit for bit)
    underflow = tail == 0
    denominator = c + tail.masked_fill(underflow, 1.0).log().to(a.dtype)
    if bool(underflow.any()):
        exact = torch.logaddexp(torch.logcumsumexp(a.flip(1), dim=1).flip(1), below.expand_as(a))
        denominator = torch.where(underflow, exact, denominator)
    terms = interesting - denominator
    if mask is None:
        return -terms.sum(1).mean()
    terms = torch.where(mask, terms, torch.zeros_like(terms))
    rows = mask.any(1)
    if not bool(rows.any()):
        return interesting.sum() * 0.0
    return -terms.sum(1)[rows].mean()


class _Side:
    """One side of the distillation: rows (users or items) with interesting columns (items or users).

    Each minibatch draws one uniform sample of ``samples`` columns shared by all its rows (a row's
    uninteresting set is that sample minus its interesting and observed columns). Sharing the sample
    turns the uninteresting scores into one (B x d)(d x M) product whose backward pass is cheap, where
    per-row samples need a (B x M x d) gather and a slow scatter-add backward.
    """

    def __init__(self, top: np.ndarray, n_cols: int, samples: int, observed: sp.spmatrix | None):
        self.top = torch.from_numpy(np.ascontiguousarray(top, dtype=np.int64))
        self.n_cols = int(n_cols)
        self.samples = int(samples)
        excluded = top_matrix(top, n_cols)
        if observed is not None:
            excluded = excluded + pad_to(observed, excluded.shape)
        self.excluded = excluded.tocsr()
        self.excluded.eliminate_zeros()
        self._device: torch.device | None = None
        self._first: np.ndarray | None = None  # see _excluded
        self._count: np.ndarray | None = None

        self.listed = torch.from_numpy(np.flatnonzero((np.asarray(top) >= 0).any(axis=1)))
        self.order, self.cursor = self.listed, 0

    def to(self, device: torch.device) -> None:
        if self._device != device:
            self.top, self.listed, self._device = self.top.to(device), self.listed.to(device), device
            self.order = self.order.to(device)

    def start_epoch(self, gen: torch.Generator) -> None:
        """A fresh order of every listed row for an epoch that covers them all (:meth:`next_rows`)."""
        pick = torch.randperm(len(self.listed), generator=gen, device=gen.device).to(self.listed.device)
        self.order, self.cursor = self.listed[pick], 0

    def next_rows(self, steps: int) -> torch.Tensor:
        """The next ceil(rows / ``steps``) rows of the epoch's order (empty once all are used), sorted."""
        chunk = -(-len(self.listed) // max(steps, 1))
        rows = self.order[self.cursor : self.cursor + chunk]
        self.cursor += chunk
        return rows.sort().values

    def draw_rows(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` distinct rows drawn uniformly from every row that has an interesting list.

        The rows are not the minibatch's own users / items: those are only the entities active in the
        current block, and distilling only them would leave every other user of the universe (most old
        users) without the teacher's knowledge — the student would forget them.
        """
        n = min(n, len(self.listed))
        pick = torch.randperm(len(self.listed), generator=gen, device=gen.device)[:n].to(self.listed.device)
        return self.listed[pick].sort().values

    def loss(self, row_rep: torch.Tensor, col_rep: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        top = self.top[rows]
        mask = top >= 0
        r = take_rows(row_rep, rows)
        a = (r.unsqueeze(1) * take_rows(col_rep, top.clamp_min(0))).sum(-1)
        sampled = torch.randint(0, self.n_cols, (self.samples,), generator=gen, device=gen.device)
        b = r @ take_rows(col_rep, sampled.to(r.device)).T
        return rrd_loss(a, b, mask, ~self._excluded(rows, sampled).to(r.device))

    def _excluded(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: is sampled column ``cols[m]`` interesting or observed for row ``rows[b]``.

        Built from the rows' excluded columns (a few dozen per row) looked up in the sorted sample through
        two column-indexed tables kept between calls, not from a dense (B, M) slice of the matrix; a
        column sampled several times is marked at each place."""
        r, c = rows.cpu().numpy(), cols.cpu().numpy()
        ex = self.excluded
        if self._first is None:
            self._first, self._count = np.zeros(self.n_cols, np.int64), np.zeros(self.n_cols, np.int64)
        order = np.argsort(c, kind="stable")
        distinct, first, count = np.unique(c[order], return_index=True, return_counts=True)
        self._first[distinct], self._count[distinct] = first, count
        starts, lens = ex.indptr[r], np.diff(ex.indptr)[r]
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        col_of = ex.indices[np.repeat(starts, lens) + within]
        lo, n = self._first[col_of], self._count[col_of]
        self._count[distinct] = 0  # the tables are all zero again between calls
        at = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        mask = np.zeros((len(r), len(c)), dtype=bool)
        mask[np.repeat(np.repeat(np.arange(len(r)), lens), n), order[at]] = True
        return torch.from_numpy(mask)


class RRDObjective(Callback):
    """weight_user · RRD + weight_item · IR-RRD beside a BPR minibatch, as a training-loop callback whose
    batch loss this is (method.md 7).

    Called as ``(model, reps, users_np, pos_np, epoch)`` with ``reps = model.propagate()`` of the step.
    Each step distils as many users (items) as the minibatch has distinct users (positive items), drawn
    uniformly from all users (items) with an interesting list — not only the block's active ones.
    User side: for each drawn user u, the scores <e_u, e_i> of ``user_top[u]`` (the teacher's
    interesting items, in order, -1 = padding) against ``user_samples`` items drawn uniformly (one
    sample shared by the step's users). Item side: for each drawn item i, the scores of ``item_top[i]``
    (its interesting users) against ``item_samples`` uniformly drawn users. Sampled entries that fall in
    the interesting list (or in ``observed``, when given) are masked out of the uninteresting sum.
    A weight of 0 switches its side off.

    ``steps_per_epoch`` (the epoch's minibatches): each epoch instead covers every user (item) with a
    list exactly once, ceil(rows / steps) of them per step in a fresh random order, so the distillation a
    user receives does not shrink with the block's size (``student.distill_cover``; beyond the paper).
    """

    def __init__(
        self,
        user_top: np.ndarray,
        item_top: np.ndarray,
        n_items: int,
        n_users: int,
        user_samples: int = DEFAULT_USER_SAMPLES,
        item_samples: int = DEFAULT_ITEM_SAMPLES,
        weight_user: float = DEFAULT_WEIGHT,
        weight_item: float = DEFAULT_WEIGHT,
        seed: int = 0,
        observed: sp.spmatrix | None = None,
        steps_per_epoch: int | None = None,
    ):
        user_top, item_top = np.asarray(user_top), np.asarray(item_top)
        if user_top.ndim != 2 or user_top.shape[0] != n_users:
            raise ValueError(f"user_top must be (n_users={n_users}, n), got {user_top.shape}")
        if item_top.ndim != 2 or item_top.shape[0] != n_items:
            raise ValueError(f"item_top must be (n_items={n_items}, n), got {item_top.shape}")
        if user_top.max(initial=-1) >= n_items or item_top.max(initial=-1) >= n_users:
            raise ValueError("top lists refer to IDs outside the universe")
        if min(user_samples, item_samples) < 1:
            raise ValueError("user_samples and item_samples must be positive")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.weight_user, self.weight_item = float(weight_user), float(weight_item)
        self.seed = seed
        self.steps = steps_per_epoch
        obs_t = None if observed is None else sp.csr_matrix(observed).T.tocsr()
        self.user_side = _Side(user_top, n_items, user_samples, observed)
        self.item_side = _Side(item_top, n_users, item_samples, obs_t)
        self._gen: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
        return self._gen

    def on_epoch_start(self, model: Recommender, opt: torch.optim.Optimizer, epoch: int) -> None:
        if self.steps is not None:
            gen = self._generator(model.device)
            for side in (self.user_side, self.item_side):
                side.to(model.device)
                side.start_epoch(gen)

    def _rows(self, side: _Side, batch: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        if self.steps is not None:
            return side.next_rows(self.steps)
        return side.draw_rows(len(np.unique(batch)), gen)

    def __call__(self, model: Recommender, reps, users_np: np.ndarray, pos_np: np.ndarray, epoch: int) -> torch.Tensor:
        if not (isinstance(reps, tuple | list) and len(reps) == 2):
            raise TypeError("RRDObjective needs (user, item) representations from an embedding model's propagate()")
        user_rep, item_rep = reps
        device = user_rep.device
        gen = self._generator(device)
        loss = user_rep.new_zeros(())
        if self.weight_user > 0 and len(users_np):
            self.user_side.to(device)
            users = self._rows(self.user_side, users_np, gen)
            if len(users):
                loss = loss + self.weight_user * self.user_side.loss(user_rep, item_rep, users, gen)
        if self.weight_item > 0 and len(pos_np):
            self.item_side.to(device)
            items = self._rows(self.item_side, pos_np, gen)
            if len(items):
                loss = loss + self.weight_item * self.item_side.loss(item_rep, user_rep, items, gen)
        return loss

    batch_loss = __call__


def distill_student(
    student: Recommender,
    block: Block,
    user_top: np.ndarray,
    item_top: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    exclude: sp.spmatrix | None = None,
    user_samples: int = DEFAULT_USER_SAMPLES,
    item_samples: int = DEFAULT_ITEM_SAMPLES,
    weight: float = DEFAULT_WEIGHT,
    exclude_observed: bool = True,
    label: str = "distill",
    retention_users: np.ndarray | None = None,
    cover: bool = False,
    past: Sequence[Block] = (),
) -> FitResult:
    """Stage 1 (method.md 7): train ``student`` with BPR(Tr_k) + weight·RRD + weight·IR-RRD.

    ``user_top`` / ``item_top``: the teacher's interesting lists from :func:`~ccdrec.distill.top_lists`
    (shaped to the student's universe, -1 = padding). BPR negatives avoid the user's train items, the
    teacher's interesting items and ``exclude`` (e.g. the top-40 of the proxies and CL_k).
    ``exclude_observed``: keep the block's train pairs out of the uninteresting samples as well.
    ``retention_users``: old users on which model selection also weighs the agreement with the
    teacher's lists (:class:`ccdrec.distill.agreement.TeacherAgreement`); None: block k's validation alone.
    ``cover``: every epoch distils every listed user and item once (``RRDObjective(steps_per_epoch=...)``).
    ``past``: the blocks before ``block``, for ``cfg.select_on = stream`` (:func:`ccdrec.train.loop.fit`).
    The student is trained in place (pass a freshly initialised one) and keeps its best-validation weights.
    """
    if not isinstance(student, EmbeddingModel):
        raise TypeError(f"ranking distillation needs an embedding student (MF, LightGCN), got {type(student).__name__}")
    n_u, n_i = student.n_users, student.n_items
    objective = RRDObjective(
        user_top,
        item_top,
        n_i,
        n_u,
        user_samples=user_samples,
        item_samples=item_samples,
        weight_user=weight,
        weight_item=weight,
        seed=seed,
        observed=block.matrix("train", n_u, n_i) if exclude_observed else None,
        steps_per_epoch=-(-len(block.train) // bounded_batch(len(block.train), cfg.batch_size, cfg.max_steps)) if cover else None,
    )
    negatives_avoid = top_matrix(np.asarray(user_top), n_i)
    if exclude is not None:
        negatives_avoid = (negatives_avoid + pad_to(exclude, (n_u, n_i))).tocsr()
    callbacks: list = [objective]
    select = None
    if retention_users is not None:
        observed = block.matrix("train", n_u, n_i)
        agreement = TeacherAgreement(user_top, retention_users, observed, cfg.select_metric, cfg.eval_chunk)
        callbacks.append(agreement)
        select = agreement.key
    return fit(
        student,
        block,
        cfg,
        seed=seed,
        progress=progress,
        label=label,
        callbacks=callbacks,
        avoid=negatives_avoid,
        select=select,
        past=past,
    )
