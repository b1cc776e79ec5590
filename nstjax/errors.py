"""The exceptions that the command line turns into one line on stderr instead of a traceback.

Library code raises :class:`UserError` (or a subclass) for anything the user can fix: a missing
image, an unknown layer, a bad weight, a corrupt weights file. The CLI catches exactly these and
prints ``nstjax: error: <message>`` with exit code 2; anything else is a bug and keeps its
traceback. :class:`RunInterrupted` (SIGINT/SIGTERM) is not a user error and exits 128 + signum.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback. The message is
    made one line here (values shown with ``repr`` may span several)."""

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class WeightsError(UserError):
    """The VGG-19 weights could not be found, fetched, verified or read."""


class ImageError(UserError):
    """An image could not be read or is unusable."""


class ConfigError(UserError):
    """A config value is invalid."""


class RunInterrupted(Exception):
    """A run stopped early by SIGINT or SIGTERM after saving what it had (not a user error: the CLI
    exits with ``128 + signum``, the shell convention, 130 for SIGINT and 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum = signum
        self.step = step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
