"""Training objectives (method.md 3, 4).

* BPR: -log σ(s(u,i) - s(u,j)) averaged over (user, positive, negative) triples;
* Mult-VAE: multinomial log-likelihood -Σ_i x_ui log softmax(z_u)_i + β·KL(q(z|x) ‖ N(0, I)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccdrec.errors import WrongArgumentType
from ccdrec.models.indexing import take_pairs


def _check_tensors(loss: str, **tensors) -> None:
    """A one-line :class:`WrongArgumentType` for an argument that is not a floating-point tensor (a NumPy
    array, a list, integer scores) instead of torch's error from deep inside the loss."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise WrongArgumentType(f"{loss}: {name} must be a floating-point torch tensor, not {what}")


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean BPR loss; ``neg`` may carry extra trailing negatives per positive (shape (B, n)).

    Raises :class:`~ccdrec.errors.WrongArgumentType` unless both are floating-point tensors."""
    _check_tensors("bpr_loss", pos=pos, neg=neg)
    if neg.dim() == pos.dim() + 1:
        pos = pos.unsqueeze(-1)
    return F.softplus(neg - pos).mean()


def vae_loss(logits: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """Multinomial negative log-likelihood of ``target`` rows (dense, or sparse COO) plus β-weighted Gaussian KL.

    Raises :class:`~ccdrec.errors.WrongArgumentType` unless the four are floating-point tensors."""
    _check_tensors("vae_loss", logits=logits, target=target, mu=mu, logvar=logvar)
    log_p = F.log_softmax(logits, dim=1)
    if target.is_sparse:
        target = target.coalesce()
        (rows, cols), vals = target.indices(), target.values()
        nll = -(take_pairs(log_p, rows, cols) * vals).sum() / logits.shape[0]
    else:
        nll = -(log_p * target).sum(1).mean()
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean()
    return nll + beta * kl
