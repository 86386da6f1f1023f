"""The one exception users see.

Every user-facing failure (bad input file, unknown target, calibration data
that does not fit the model, ...) raises :class:`SparseCompileError` with a
single-line message. The CLI prints it as ``error: <message>`` and exits with
status 1; anything else escaping is a bug in sparsecompile.
"""


class SparseCompileError(Exception):
    """A user-facing error with a one-line, actionable message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
