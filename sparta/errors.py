"""Errors that mean "the user asked for something wrong", as opposed to bugs.

The CLI prints a ``SpartaError`` as one line on stderr and exits with code 2; any other exception
is a bug and keeps its traceback.
"""


class SpartaError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""


class ConfigError(SpartaError, ValueError):
    """A config key, type or value is invalid."""


class DataError(SpartaError):
    """A dataset is missing or not in its official on-disk layout."""


class CheckpointError(SpartaError):
    """A checkpoint or run directory is missing, corrupted or does not fit."""


class DivergedError(SpartaError):
    """Training produced a non-finite loss or weights; the last good checkpoint is kept."""


class Interrupted(SpartaError):
    """A stop signal (SIGTERM, SIGINT) arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
