"""Training objectives (method.md 3, 4).

* BPR: -log σ(s(u,i) - s(u,j)) averaged over (user, positive, negative) triples;
* Mult-VAE: multinomial log-likelihood -Σ_i x_ui log softmax(z_u)_i + β·KL(q(z|x) ‖ N(0, I)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ccdrec.models.indexing import take_pairs


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Mean BPR loss; ``neg`` may carry extra trailing negatives per positive (shape (B, n))."""
    if neg.dim() == pos.dim() + 1:
        pos = pos.unsqueeze(-1)
    return F.softplus(neg - pos).mean()


def vae_loss(logits: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> torch.Tensor:
    """Multinomial negative log-likelihood of ``target`` rows (dense, or sparse COO) plus β-weighted Gaussian KL."""
    log_p = F.log_softmax(logits, dim=1)
    if target.is_sparse:
        target = target.coalesce()
        (rows, cols), vals = target.indices(), target.values()
        nll = -(take_pairs(log_p, rows, cols) * vals).sum() / logits.shape[0]
    else:
        nll = -(log_p * target).sum(1).mean()
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1).mean()
    return nll + beta * kl
