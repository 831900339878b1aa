"""The one exception family for user mistakes; the CLI turns it into a message and an exit code."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, corrupt input).

    The CLI prints the message without a traceback and exits with `exit_code`.
    """

    exit_code = 1


class ConfigError(UserError):
    """A wrong, unknown or missing configuration key or command-line value (exit code 2)."""

    exit_code = 2


class DataError(UserError):
    """Input data that cannot be used as given: missing, unreadable or corrupt (exit code 1)."""

    exit_code = 1


class TrainingError(UserError):
    """Training cannot go on (e.g. the losses diverged); the message says what was kept (exit code 1)."""

    exit_code = 1


class BusyError(UserError):
    """A folder this command would write is being written by another process (exit code 2)."""

    exit_code = 2
