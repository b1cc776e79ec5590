"""The exceptions that the command line turns into one line on stderr instead of a traceback.

Library code raises :class:`UserError` (or a subclass) for anything the user can fix: a missing
image, an unknown layer, a bad weight, a corrupt weights file. The CLI catches exactly these and
prints ``nstjax: error: <message>`` with exit code 2; anything else is a bug and keeps its
traceback. :class:`RunInterrupted` (SIGINT/SIGTERM) is not a user error and exits 128 + signum.
"""

from __future__ import annotations

import errno
import os


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


def why_missing(path: str | os.PathLike, what: str = "file") -> str:
    """Why a path that does not exist (``Path.exists()`` is False) does not: a loop of symbolic
    links, a link to a missing file, or nothing there (``no such <what>``)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"a loop of symbolic links, not {'an' if what[:1] in 'aeiou' else 'a'} {what}"
        if os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot open ({e.strerror or e})"
    return f"no such {what}"
