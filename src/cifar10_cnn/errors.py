"""Errors a user can act on: the CLI prints them as one line, without a stack trace."""


class UserError(Exception):
    """Bad input or a situation the user can fix; the message says what was wrong and what to do."""


class DataError(UserError):
    """The dataset is missing, corrupt, or does not match the real CIFAR-10."""


class CheckpointError(UserError):
    """A checkpoint or weights file cannot be read."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""
