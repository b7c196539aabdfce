"""Full-ranking evaluation (method.md 8): metrics in user chunks and the r_{k,j} protocol."""

from ccdrec.eval.metrics import evaluate_block, rank_metrics
from ccdrec.eval.protocol import StreamScores, harmonic

__all__ = ["StreamScores", "evaluate_block", "harmonic", "rank_metrics"]
