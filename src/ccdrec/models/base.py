"""The model interface shared by every teacher member and every student (style.md lesson 1).

Everything downstream (evaluation, ensemble, distillation, replay, serving) talks to models only
through :class:`Recommender`: score users against all items, set the block's graph, grow the universe.
Embedding models (MF, LightGCN) additionally expose ego tables and propagated embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal, get_args

import scipy.sparse as sp
import torch
from torch import nn

from ccdrec.models.checks import InvalidArgument, WrongArgumentType, check_int
from ccdrec.models.indexing import take_rows

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""Maps a 1-D tensor of user IDs to a (len(users), n_items) score tensor."""

InitStrategy = Literal["entity", "one_hop", "random"]
INIT_STD = 0.01


def check_growth(model: Recommender, n_users: int, n_items: int, train_matrix, init: str) -> tuple[int, int, sp.csr_matrix]:
    """The arguments of :meth:`Recommender.grow` checked: sizes are ints no smaller than the model's,
    ``train_matrix`` is (n_users x n_items), ``init`` one of :data:`InitStrategy`; returns
    ``(n_users, n_items, train_matrix as CSR)``."""
    n_users, n_items = check_int("n_users", n_users), check_int("n_items", n_items)
    if n_users < model.n_users or n_items < model.n_items:
        raise InvalidArgument(
            f"grow: a model of {model.n_users:,} x {model.n_items:,} (users x items) cannot shrink to {n_users:,} x {n_items:,}"
        )
    if not (sp.issparse(train_matrix) or hasattr(train_matrix, "shape")):
        raise WrongArgumentType(f"train_matrix must be a SciPy sparse matrix, not {type(train_matrix).__name__}")
    if tuple(train_matrix.shape) != (n_users, n_items):
        shape = " x ".join(f"{n:,}" for n in train_matrix.shape)
        raise InvalidArgument(
            f"train_matrix is {shape} but the grown universe is {n_users:,} x {n_items:,} "
            "(give block.train_matrix of the block grown to)"
        )
    if init not in get_args(InitStrategy):
        raise InvalidArgument(f"init must be one of {', '.join(get_args(InitStrategy))}, not {init!r}")
    return n_users, n_items, sp.csr_matrix(train_matrix)


class Representations(tuple):
    """The (users, items) final representations of one propagation, (U, d) and (I, d), unpacked like a pair.

    ``layers``: the per-layer (users, items) embeddings E^0..E^L they were computed from, in the same
    autograd graph (LightGCN; None when the model has no layers to share). A regulariser of the same
    training step (LWC-KD, method.md 5.4) reads them instead of propagating the graph a second time, so
    that a step propagates once forward and once backward.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] | None

    def __new__(cls, users: torch.Tensor, items: torch.Tensor, layers=None):
        reps = super().__new__(cls, (users, items))
        reps.layers = layers
        return reps


class Recommender(nn.Module, ABC):
    """A model over a universe of ``n_users`` x ``n_items`` that scores by user-item affinity."""

    kind: str = "model"
    objective: str = "bpr"  # the training objective of the family (ccdrec.train.objectives): bpr or vae

    @property
    @abstractmethod
    def n_users(self) -> int: ...

    @property
    @abstractmethod
    def n_items(self) -> int: ...

    @abstractmethod
    def set_graph(self, train_matrix: sp.csr_matrix) -> None:
        """Attach the current block's train matrix R_k (LightGCN's graph, the VAE's input rows)."""

    @abstractmethod
    def scorer(self, context: sp.csr_matrix | None = None) -> Scorer:
        """A no-grad scoring function with propagated state cached, for evaluation and serving.

        ``context``: the users' known interactions, for models that condition on them (Mult-VAE);
        embedding models ignore it.
        """

    @abstractmethod
    def grow(self, n_users: int, n_items: int, train_matrix: sp.csr_matrix, init: InitStrategy = "entity") -> None:
        """Append rows for new users/items; old parameters stay bit-identical (method.md 3)."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-able constructor arguments; ``build_model(**config)`` rebuilds the architecture."""

    def clone(self) -> Recommender:
        """An independent copy: same architecture, copied weights, the same (shared, read-only) graph."""
        cfg = {k: v for k, v in self.config().items() if k != "kind"}
        twin = type(self)(**cfg).to(self.device)
        twin.load_state_dict(self.state_dict())
        for name in self._graph_attrs:
            setattr(twin, name, getattr(self, name))
        twin.train(self.training)
        return twin

    _graph_attrs: tuple[str, ...] = ()

    uses_context: bool = True
    """Whether scores depend on the ``context`` of :meth:`scorer` (False: one scoring serves every block)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def check_index_tensor(values: torch.Tensor, size: int | None, name: str = "user index") -> torch.Tensor:
    """``values``: a 1-D tensor of integer indices (any integer dtype; ``uint8`` too, which torch would read
    as a mask), in ``0..size-1`` (``size`` None: any non-negative index), returned as int64; else a one-line
    :class:`~ccdrec.errors.InvalidArgument` / :class:`~ccdrec.errors.WrongArgumentType` naming ``name``."""
    integer = isinstance(values, torch.Tensor) and not (
        values.is_floating_point() or values.is_complex() or values.dtype == torch.bool
    )
    if not integer or values.dim() != 1:
        what = f"{values.dim()}-D {values.dtype} tensor" if isinstance(values, torch.Tensor) else type(values).__name__
        raise WrongArgumentType(f"{name}: a scorer takes a 1-D integer tensor of indices, not a {what}")
    values = values.long()
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if size is None and lo < 0:
            raise InvalidArgument(f"{name}: indices must be non-negative, not {lo}")
        if size is not None and (lo < 0 or hi >= size):
            raise InvalidArgument(f"{name} {lo if lo < 0 else hi} is outside the model's universe 0..{size - 1}")
    return values


class EmbeddingModel(Recommender):
    """A model scoring s(u, i) = <e_u, e_i> from user and item ego tables (MF, LightGCN)."""

    uses_context = False

    user_emb: nn.Parameter
    item_emb: nn.Parameter

    @abstractmethod
    def layer_embeddings(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (users, items) embeddings, layer 0 = ego tables (for LWC-KD)."""

    @abstractmethod
    def propagate(self, with_layers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Final (users, items) representations, differentiable; ``with_layers``: a :class:`Representations`
        that also carries the per-layer embeddings (:meth:`layer_embeddings`) of the same pass."""

    @staticmethod
    def scorer_of(reps: tuple[torch.Tensor, torch.Tensor]) -> Scorer:
        """The scorer of propagated (users, items) tables (:meth:`propagate`): s(u, ·) = e_u E_itemsᵀ."""
        users, items = reps

        def score(u: torch.Tensor) -> torch.Tensor:
            return users[check_index_tensor(u, users.shape[0])] @ items.T

        return score

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor, reps=None) -> torch.Tensor:
        u, i = reps if reps is not None else self.propagate()
        return (take_rows(u, users) * take_rows(i, items)).sum(-1)
