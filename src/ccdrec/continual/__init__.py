"""Continual learning of the student and the teachers: proxies, proxy-guided replay (method.md 5.1, 5.3)."""

from ccdrec.continual.proxy import Proxy, ema_update
from ccdrec.continual.replay import (
    Candidates,
    PreviousOutputKL,
    ReplaySet,
    impute_replay,
    kl_to_previous,
    rank_of,
    replay_candidates,
    replay_pass,
    replay_weight,
    sample_replay,
)

__all__ = [
    "Candidates",
    "PreviousOutputKL",
    "Proxy",
    "ReplaySet",
    "ema_update",
    "impute_replay",
    "kl_to_previous",
    "rank_of",
    "replay_candidates",
    "replay_pass",
    "replay_weight",
    "sample_replay",
]
from ccdrec.continual.lwckd import LWCKD, OldEmbeddings, PIWNet, contrastive, contrastive_rows, knn_graph  # noqa: E402, F401
