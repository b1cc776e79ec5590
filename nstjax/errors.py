"""The one exception type that the command line turns into a one-line error and exit code 2.

Library code raises :class:`UserError` (or a subclass) for anything the user can fix: a missing
image, an unknown layer, a bad weight, a corrupt weights file. The CLI catches exactly these and
prints ``nstjax: error: <message>``; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class WeightsError(UserError):
    """The VGG-19 weights could not be found, fetched, verified or read."""


class ImageError(UserError):
    """An image could not be read or is unusable."""


class ConfigError(UserError):
    """A config value is invalid."""
