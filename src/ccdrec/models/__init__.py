"""Models behind one interface (:class:`Recommender`): MF, LightGCN, Mult-VAE."""

from ccdrec.models.base import EmbeddingModel, Recommender, Scorer
from ccdrec.models.lightgcn import MF, LightGCN
from ccdrec.models.registry import build_model
from ccdrec.models.vae import MultVAE

__all__ = ["MF", "EmbeddingModel", "LightGCN", "MultVAE", "Recommender", "Scorer", "build_model"]
