"""Mult-VAE (Liang et al., WWW 2018), a teacher member for Gowalla (method.md 3).

Input: the user's L2-normalised binary item row; encoder items -> d (tanh), μ and log σ² heads
d -> d, reparameterisation in training and μ at evaluation, decoder d -> items; the loss is the
multinomial log-likelihood + β·KL (see :func:`ccdrec.train.losses.vae_loss`).

The user's input row comes from a *context* matrix: the block's train matrix given to
:meth:`set_graph` by default, or the matrix the caller passes to :meth:`scorer` (evaluation on block j
conditions on block j's train interactions).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ccdrec.models.base import InitStrategy, Recommender, Scorer, check_growth, check_index_tensor
from ccdrec.models.checks import ModelNotReady, WrongArgumentType, check_fraction, check_int, check_matrix
from ccdrec.models.growth import entity_rows
from ccdrec.models.indexing import take_rows


def rows_tensor(matrix: sp.csr_matrix, users: torch.Tensor, n_items: int, device, below: int | None = None) -> torch.Tensor:
    """The rows of ``matrix`` for ``users`` as a sparse (len(users), n_items) COO tensor.

    Columns at or past ``n_items`` (or ``below``, when given) are dropped. Rows stay sparse: a dense
    batch of Gowalla rows is 256 x 41,000 floats, and dropout and normalisation over it cost more than
    the whole encoder on the non-zeros.
    """
    idx = users.cpu().numpy()
    sub = sp.csr_matrix(matrix[idx])
    sub.sum_duplicates()
    rows = np.repeat(np.arange(len(idx)), np.diff(sub.indptr))
    limit = n_items if below is None else min(n_items, below)
    keep = sub.indices < limit
    indices = torch.from_numpy(np.vstack([rows[keep], sub.indices[keep]]).astype(np.int64))
    values = torch.from_numpy(np.asarray(sub.data[keep], dtype=np.float32))
    return torch.sparse_coo_tensor(indices, values, (len(idx), n_items), device=device, is_coalesced=True, check_invariants=False)


class MultVAE(Recommender):
    kind = "vae"
    objective = "vae"
    _graph_attrs = ("_context",)

    def __init__(self, n_users: int, n_items: int, dim: int = 64, dropout: float = 0.5):
        """A Mult-VAE over ``n_items`` items with a ``dim``-dimensional latent space and input ``dropout``; sizes
        and ``dim`` must be ints of at least 1, ``dropout`` a number in [0, 1) (:class:`InvalidArgument` otherwise)."""
        n_users, n_items = check_int("n_users", n_users), check_int("n_items", n_items)
        dim, dropout = check_int("dim", dim), check_fraction("dropout", dropout)
        super().__init__()
        self.dim = dim
        self.dropout = dropout
        self._n_users = n_users
        self.encoder = nn.Linear(n_items, dim)
        self.mu = nn.Linear(dim, dim)
        self.logvar = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, n_items)
        for lin in (self.encoder, self.mu, self.logvar, self.decoder):
            nn.init.xavier_normal_(lin.weight)
            nn.init.normal_(lin.bias, std=0.001)
        self._context: sp.csr_matrix | None = None

    @property
    def n_users(self) -> int:
        return self._n_users

    @property
    def n_items(self) -> int:
        return self.decoder.out_features

    def config(self) -> dict:
        return {"kind": self.kind, "n_users": self.n_users, "n_items": self.n_items, "dim": self.dim, "dropout": self.dropout}

    def set_graph(self, train_matrix: sp.csr_matrix) -> None:
        """The users' input rows: ``train_matrix``, a SciPy sparse matrix of the model's universe; another
        shape or type is an error (checks.check_matrix)."""
        train_matrix = check_matrix("the input rows (train_matrix)", train_matrix, (self.n_users, self.n_items), values=True)
        self._context = sp.csr_matrix(train_matrix, dtype=np.float32)

    def input_rows(self, users: torch.Tensor, context: sp.csr_matrix | None = None) -> torch.Tensor:
        ctx = context if context is not None else self._context
        if ctx is None:
            raise ModelNotReady(
                "this Mult-VAE has no input rows: call model.set_graph(block.train_matrix) with the train matrix of the "
                "block it is sized for (fit does), or pass a context matrix"
            )
        if not sp.issparse(ctx):
            raise WrongArgumentType(f"context must be a scipy.sparse (users x items) matrix, not {type(ctx).__name__}")
        users = check_index_tensor(users, ctx.shape[0])
        return rows_tensor(ctx, users, self.n_items, self.device)

    def _encode_sparse(self, x: torch.Tensor, stochastic: bool) -> torch.Tensor:
        """encoder(dropout(normalize(x))) computed on the non-zeros of a sparse COO batch only."""
        x = x.coalesce()
        (rows, cols), vals = x.indices(), x.values()
        norm = torch.zeros(x.shape[0], device=vals.device).index_add_(0, rows, vals * vals).sqrt().clamp_min(1e-12)
        vals = F.dropout(vals / norm[rows], self.dropout, training=stochastic)
        contrib = take_rows(self.encoder.weight.t(), cols) * vals[:, None]
        return torch.zeros(x.shape[0], self.dim, device=vals.device).index_add(0, rows, contrib) + self.encoder.bias

    def forward(self, x: torch.Tensor, stochastic: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, μ and log σ² for binary (or soft) input rows ``x`` (dense, or sparse COO).

        ``stochastic`` (default: ``self.training``) switches input dropout and reparameterisation on.
        """
        stochastic = self.training if stochastic is None else stochastic
        if x.is_sparse:
            h = torch.tanh(self._encode_sparse(x, stochastic))
        else:
            h = F.normalize(x, dim=1)
            h = F.dropout(h, self.dropout, training=stochastic)
            h = torch.tanh(self.encoder(h))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if stochastic else mu
        return self.decoder(z), mu, logvar

    def scorer(self, context: sp.csr_matrix | None = None) -> Scorer:
        def score(users: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self(self.input_rows(users, context), stochastic=False)[0]

        return score

    @torch.no_grad()
    def grow(self, n_users: int, n_items: int, train_matrix: sp.csr_matrix, init: InitStrategy = "entity") -> None:
        """Widen the encoder input and decoder output; new items start from the item-side trend."""
        old_i = self.n_items
        n_users, n_items, train_matrix = check_growth(self, n_users, n_items, train_matrix, init)
        self._n_users = n_users
        if n_items > old_i:
            d = self.dim
            table = torch.cat([self.decoder.weight, self.decoder.bias[:, None], self.encoder.weight.T], dim=1)
            strategy = "random" if init == "random" else "entity"
            r = sp.csr_matrix(train_matrix).T.tocsr()
            new = entity_rows(table, None, r, old_i, 0, n_items, strategy)
            enc, dec = nn.Linear(n_items, d), nn.Linear(d, n_items)
            enc.weight.copy_(torch.cat([self.encoder.weight, new[:, d + 1 :].T], dim=1))
            enc.bias.copy_(self.encoder.bias)
            dec.weight.copy_(torch.cat([self.decoder.weight, new[:, :d]], dim=0))
            dec.bias.copy_(torch.cat([self.decoder.bias, new[:, d]]))
            self.encoder, self.decoder = enc.to(self.device), dec.to(self.device)
        self.set_graph(train_matrix)
