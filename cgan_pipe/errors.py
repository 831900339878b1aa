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


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop by SIGINT or SIGTERM; `kept` says what it saved first. The CLI exits with
    128 + the signal's number (130, 143), as a shell reports a process that such a signal ended."""

    def __init__(self, signal_number: int, kept: str = ""):
        super().__init__(signal_number, kept)
        self.signal_number, self.kept = signal_number, kept
