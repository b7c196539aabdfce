"""Stability and plasticity proxies of the student (method.md 5.1).

A proxy is a frozen copy of the student's **ego tables** (user (U, d), item (I, d)); it scores
s_X(u, i) = <p_u, q_i> with no propagation. After block 0 both proxies are copies of the first
student, SP_0 = PP_0 = D_0 (:meth:`Proxy.from_model`). After each later student D_{k-1}:

    SP_{k-1} = w_S · SP_{k-2} + (1 − w_S) · D_{k-1}      (w_S ≈ 0.9..1.0: slow, the stability proxy)
    PP_{k-1} = w_P · PP_{k-2} + (1 − w_P) · D_{k-1}      (w_P ≈ 0.0..0.1: fast, the plasticity proxy)

for the rows the previous proxy already had; rows new to D_{k-1} copy D_{k-1} (:func:`ema_update`).

A proxy lives on a universe that can be smaller than the current one: its scorer can be asked for a
larger item universe, and items beyond its table score −inf (never a replay candidate); users beyond
its table get a whole row of −inf (no candidates), so callers may pass any user IDs.
"""

from __future__ import annotations

import scipy.sparse as sp
import torch

from ccdrec.arguments import check_fraction
from ccdrec.errors import WrongArgumentType
from ccdrec.models.base import EmbeddingModel, Scorer, check_index_tensor


class Proxy:
    """Frozen ego tables ``user`` (U, d) and ``item`` (I, d) scoring by dot product."""

    kind = "proxy"

    def __init__(self, user: torch.Tensor, item: torch.Tensor):
        if user.dim() != 2 or item.dim() != 2 or user.shape[1] != item.shape[1]:
            raise ValueError(f"proxy tables must be (U, d) and (I, d), got {tuple(user.shape)} and {tuple(item.shape)}")
        self.user = user.detach().clone().float()
        self.item = item.detach().clone().float()

    @property
    def n_users(self) -> int:
        return self.user.shape[0]

    @property
    def n_items(self) -> int:
        return self.item.shape[0]

    @property
    def dim(self) -> int:
        return self.user.shape[1]

    @property
    def device(self) -> torch.device:
        return self.user.device

    def to(self, device: torch.device | str) -> Proxy:
        """A copy of the proxy on ``device``."""
        return Proxy(self.user.to(device), self.item.to(device))

    @classmethod
    def from_model(cls, model: EmbeddingModel) -> Proxy:
        """A copy of the model's ego tables (e.g. SP_0 = PP_0 = D_0)."""
        return cls(model.user_emb, model.item_emb)

    def scorer(self, context: sp.csr_matrix | None = None, n_items: int | None = None) -> Scorer:
        """users -> (B, n_items) scores <p_u, q_i>; ``context`` is ignored (ego tables only).

        ``n_items`` (default: the proxy's own) may exceed the proxy's item table: the extra columns
        score −inf. Users outside the proxy's table get a row of −inf.
        """
        n = self.n_items if n_items is None else int(n_items)
        user, item = self.user, self.item[:n]

        def score(users: torch.Tensor) -> torch.Tensor:
            users = check_index_tensor(users, None, "users").to(self.device)
            known = users < self.n_users
            out = user[users.clamp(max=self.n_users - 1)] @ item.T
            if n > self.n_items:
                pad = out.new_full((len(users), n - self.n_items), -torch.inf)
                out = torch.cat([out, pad], dim=1)
            if not bool(known.all()):
                out[~known] = -torch.inf
            return out

        return score

    def score_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """s_X(u, i) for paired 1-D tensors; −inf where u or i lies outside the proxy's tables."""
        users, items = (
            check_index_tensor(users, None, "users").to(self.device),
            check_index_tensor(items, None, "items").to(self.device),
        )
        known = (users < self.n_users) & (items < self.n_items)
        s = (self.user[users.clamp(max=self.n_users - 1)] * self.item[items.clamp(max=self.n_items - 1)]).sum(-1)
        return torch.where(known, s, torch.full_like(s, -torch.inf))

    def state(self) -> dict[str, torch.Tensor]:
        """Plain tensors for a checkpoint (no pickled objects)."""
        return {"user": self.user.cpu(), "item": self.item.cpu()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Proxy:
        return cls(state["user"], state["item"])

    def __repr__(self) -> str:
        return f"Proxy(n_users={self.n_users}, n_items={self.n_items}, dim={self.dim})"


@torch.no_grad()
def ema_update(prev: Proxy, student: EmbeddingModel, weight: float) -> Proxy:
    """The next proxy: ``weight · prev + (1 − weight) · student`` on prev's rows, student's rows beyond.

    method.md 5.1: rows that existed in ``prev`` (its first ``prev.n_users`` / ``prev.n_items`` rows)
    move by an exponential moving average towards the student's ego rows; rows new in the student copy
    the student. ``weight = 1`` keeps prev's rows exactly, ``weight = 0`` copies the student.
    """
    weight = check_fraction("proxy weight", weight, closed=True)
    if not isinstance(student, EmbeddingModel):
        raise WrongArgumentType(f"a proxy follows an embedding student (MF, LightGCN), not a {type(student).__name__}")
    su, si = student.user_emb.detach().float(), student.item_emb.detach().float()
    if su.shape[0] < prev.n_users or si.shape[0] < prev.n_items:
        raise ValueError(
            f"student universe {(su.shape[0], si.shape[0])} is smaller than the proxy's {(prev.n_users, prev.n_items)}"
        )
    if su.shape[1] != prev.dim:
        raise ValueError(f"student dimension {su.shape[1]} != proxy dimension {prev.dim}")

    def mix(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = new.clone().to(old.device)
        n = old.shape[0]
        if weight == 1.0:
            out[:n] = old
        elif weight > 0.0:
            out[:n] = weight * old + (1.0 - weight) * out[:n]
        return out

    return Proxy(mix(prev.user, su), mix(prev.item, si))
