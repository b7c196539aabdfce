"""ccdrec: Continual Collaborative Distillation (CCD, KDD 2024) for recommenders on a stream.

Nothing is imported eagerly beyond the names below; heavy modules load when first used.
"""

from ccdrec.errors import CcdrecError

__all__ = ["CcdrecError", "__version__"]
__version__ = "0.1.0"
