"""Training one model on one block: losses, negative sampling, the epoch loop with early stopping."""

from ccdrec.train.callbacks import Callback
from ccdrec.train.loop import FitResult, fit

__all__ = ["Callback", "FitResult", "fit"]
