"""LightGCN (He et al., SIGIR 2020) and MF, which is LightGCN with zero layers (method.md 3).

Ego tables E⁰ initialised N(0, 0.01²); E^{l+1} = Â E^l over the current block's normalised
bipartite graph (see :mod:`ccdrec.models.graph`); final representation = mean of layers 0..L;
s(u, i) = <e_u, e_i>.
"""

from __future__ import annotations

import scipy.sparse as sp
import torch
from torch import nn

from ccdrec.models.base import INIT_STD, EmbeddingModel, InitStrategy, Representations, Scorer, check_growth
from ccdrec.models.checks import InvalidArgument, ModelNotReady, check_int, check_matrix
from ccdrec.models.graph import normalized_adjacency, propagate_symmetric, to_torch_sparse
from ccdrec.models.growth import entity_rows, grow_table


class LightGCN(EmbeddingModel):
    kind = "lightgcn"
    _graph_attrs = ("_adj",)

    def __init__(self, n_users: int, n_items: int, dim: int = 64, layers: int = 2):
        """``n_users`` x ``n_items`` ego tables of ``dim`` columns and ``layers`` propagation layers (0: MF);
        sizes and ``dim`` must be ints of at least 1, ``layers`` at least 0 (:class:`InvalidArgument` otherwise)."""
        n_users, n_items = check_int("n_users", n_users), check_int("n_items", n_items)
        dim, layers = check_int("dim", dim), check_int("layers", layers, minimum=0)
        super().__init__()
        self.dim = dim
        self.layers = layers
        self.user_emb = nn.Parameter(torch.randn(n_users, dim) * INIT_STD)
        self.item_emb = nn.Parameter(torch.randn(n_items, dim) * INIT_STD)
        self._adj: torch.Tensor | None = None

    @property
    def n_users(self) -> int:
        return self.user_emb.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_emb.shape[0]

    def config(self) -> dict:
        return {"kind": self.kind, "n_users": self.n_users, "n_items": self.n_items, "dim": self.dim, "layers": self.layers}

    def set_graph(self, train_matrix: sp.csr_matrix) -> None:
        """The propagation graph from ``train_matrix``, a SciPy sparse matrix of the model's universe (the
        train matrix of the block the model is sized for); another shape or type is an error (checks.check_matrix)."""
        train_matrix = check_matrix("the graph (train_matrix)", train_matrix, (self.n_users, self.n_items), values=True)
        if self.layers == 0:
            return
        self._adj = to_torch_sparse(normalized_adjacency(train_matrix), self.user_emb.device)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._adj is not None:
            self._adj = fn(self._adj)
        return out

    def layer_embeddings(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ego = torch.cat([self.user_emb, self.item_emb], dim=0)
        layers = [ego]
        if self.layers > 0:
            if self._adj is None:
                raise ModelNotReady(
                    "this LightGCN has no graph to propagate over: call model.set_graph(block.train_matrix) with the "
                    "train matrix of the block it is sized for (fit does; a model built or loaded by hand needs it)"
                )
            for _ in range(self.layers):
                layers.append(propagate_symmetric(self._adj, layers[-1]))
        return [(x[: self.n_users], x[self.n_users :]) for x in layers]

    def propagate(self, with_layers: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Final representations mean_l E^l; ``with_layers``: a :class:`Representations` that also holds
        the layers E^0..E^L, for a regulariser of the same step (held only when asked: they keep L + 1
        more (U + I, d) tables alive through the step)."""
        if self.layers == 0:
            return self.user_emb, self.item_emb
        per_layer = self.layer_embeddings()
        users = torch.stack([u for u, _ in per_layer]).mean(0)
        items = torch.stack([i for _, i in per_layer]).mean(0)
        return Representations(users, items, layers=per_layer if with_layers else None)

    @torch.no_grad()
    def scorer(self, context: sp.csr_matrix | None = None) -> Scorer:
        return self.scorer_of(tuple(t.detach() for t in self.propagate()))

    @torch.no_grad()
    def grow(self, n_users: int, n_items: int, train_matrix: sp.csr_matrix, init: InitStrategy = "entity") -> None:
        old_u, old_i = self.n_users, self.n_items
        n_users, n_items, r = check_growth(self, n_users, n_items, train_matrix, init)
        new_u = entity_rows(self.user_emb, self.item_emb, r, old_u, old_i, n_users, init)
        new_i = entity_rows(self.item_emb, self.user_emb, r.T.tocsr(), old_i, old_u, n_items, init)
        self.user_emb = nn.Parameter(grow_table(self.user_emb, n_users, new_u))
        self.item_emb = nn.Parameter(grow_table(self.item_emb, n_items, new_i))
        self._adj = None
        self.set_graph(r)


class MF(LightGCN):
    """BPR-MF: LightGCN with zero propagation layers."""

    kind = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int = 64, layers: int = 0):
        if layers != 0:
            raise InvalidArgument(f"layers must be 0 for MF (it has no propagation layers), not {layers!r}; use LightGCN")
        super().__init__(n_users, n_items, dim, layers=0)
