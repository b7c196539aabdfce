"""Student generation (Stage 1, method.md 6-7): the rank-based teacher ensemble and RRD / IR-RRD."""

from ccdrec.distill.ensemble import RankEnsemble, top_lists
from ccdrec.distill.rrd import RRDObjective, distill_student, rrd_loss

__all__ = ["RRDObjective", "RankEnsemble", "distill_student", "rrd_loss", "top_lists"]
