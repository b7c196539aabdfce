"""ccdrec: Continual Collaborative Distillation (CCD, KDD 2024) for recommenders on a stream.

Nothing is imported eagerly beyond the names below; heavy modules load when first used.
"""

from ccdrec.errors import CcdrecError

__all__ = ["CcdrecError", "__version__", "load_run"]
__version__ = "0.1.0"


def load_run(run_dir, device: str = "cpu"):
    """Open a run directory to serve its student (see :mod:`ccdrec.serve`)."""
    from ccdrec.serve import load_run as _load_run

    return _load_run(run_dir, device)
