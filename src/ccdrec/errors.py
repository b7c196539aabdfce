"""The one exception type for user mistakes: bad input files, bad options, bad run directories.

The CLI turns a :class:`CcdrecError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class CcdrecError(Exception):
    """A problem the user can fix (a missing column, an unknown dataset, a corrupt run directory)."""


class InvalidArgument(CcdrecError, ValueError):
    """An argument of the right type with a value outside what the function accepts."""


class WrongArgumentType(CcdrecError, TypeError):
    """An argument of the wrong type."""


class BlockOutOfRange(CcdrecError, IndexError):
    """A block index past the stream's blocks (``stream[6]`` of a stream with blocks 0..5)."""


class TrainingDiverged(CcdrecError):
    """A training's loss or weights became NaN or infinite; the message names the training and the epoch.
    Its weights are not kept (a run directory's stage does not complete, so nothing non-finite is saved)."""


class StageLost(Exception):
    """A stage did not complete because the process running it died (killed, out of memory).

    The completed stages are kept; the run continues with ``--resume``. The CLI prints the message
    and the resume command on one line and exits with code 1.
    """
