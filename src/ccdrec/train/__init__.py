"""Training one model on one block: losses, negative sampling, the epoch loop with early stopping."""

from ccdrec.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
