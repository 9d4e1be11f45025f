"""Errors a user can act on: printed as one line, exit code 2, before work starts."""


class UsageError(Exception):
    """Bad flag, bad file or bad data: the message names the flag or path."""


class CheckpointError(UsageError):
    """A checkpoint file is unreadable, foreign or inconsistent; the message names the file."""


class NumericalError(Exception):
    """The loss stopped being finite; the message names round, epoch and step."""
