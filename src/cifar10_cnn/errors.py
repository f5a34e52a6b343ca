"""Errors a user can act on: the CLI prints them as one line, without a stack trace."""


class UserError(Exception):
    """Bad input or a situation the user can fix; the message says what was wrong and what to do."""


class DataError(UserError):
    """The dataset is missing, corrupt, or does not match the real CIFAR-10."""


class CheckpointError(UserError):
    """A checkpoint or weights file cannot be read."""


class FileError(UserError, ValueError):
    """A file we read but did not just write (a run's JSON or CSV, a --config) that is not a regular file, is
    too large, or does not hold what it should."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), at most limit characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
