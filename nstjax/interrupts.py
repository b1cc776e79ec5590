"""SIGINT and SIGTERM from the first instruction of the ``nstjax`` command to its last.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be: in
the middle of importing JAX (an ImportError, a traceback), inside a garbage-collection callback
(where it is printed as "Exception ignored" and swallowed, and the run goes on), or in an atexit
function while the process exits (another traceback). SIGTERM kills without a word. So the command
installs :func:`_handle` for both before it imports anything heavy (:func:`install`, called first
thing in ``nstjax.cli.entry``), and the handler ends the process itself, with ``os._exit``, one
line on stderr and the exit code ``128 + signum`` (130, 143). ``os._exit`` cannot be caught or
swallowed, and skips clean-up that nothing needs: every file nstjax writes is written atomically
or is safe to cut short (docs/robustness.md), as it must be against SIGKILL anyway.

What the line says depends on the phase the command is in:

- ``starting`` (argument parsing, imports, compile-cache set-up): nothing has been written;
- ``running`` (a run, replay or sweep): a run installs its own handlers
  (:class:`nstjax.run.StopSignals`, which stops at the next chunk with a checkpoint) and restores
  these when it ends, so here this handler sees the signals outside them and the second signal
  StopSignals passes on ("stop at once"); the line is the one given to :func:`running`;
- ``exiting`` (after ``main`` returned its exit code): the outcome is decided and reported, so a
  signal (a second Ctrl-C while the interpreter shuts down) ends the process at once with that
  code, quietly if it already said it was interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_phase = "starting"
_stop_message = ""
_exit_code: int | None = None

STOPPED_AT_ONCE = ("stopped at once by {name}; the last periodic checkpoint, if any, is kept "
                   "(run the same command again to resume)")


def install() -> None:
    """Makes SIGINT and SIGTERM end the process with one line (see the module docstring). Only in
    the main thread, the only one Python lets install handlers."""
    global _phase, _exit_code
    if threading.current_thread() is not threading.main_thread():
        return
    _phase, _exit_code = "starting", None
    for s in SIGNALS:
        signal.signal(s, _handle)


@contextlib.contextmanager
def running(message: str = STOPPED_AT_ONCE) -> Iterator[None]:
    """The phase in which the command's work may have written files: a signal that reaches
    :func:`_handle` ends the process with ``message`` (``{name}`` becomes SIGINT or SIGTERM)."""
    global _phase, _stop_message
    _phase, _stop_message = "running", message
    try:
        yield
    finally:
        # The work is over, whatever its outcome: no longer "nothing was written".
        _phase = "exiting"


def set_stop_message(message: str) -> None:
    """Replaces the line a signal ends the current ``running`` phase with (a replay names its
    temporary directory once it has one)."""
    global _stop_message
    _stop_message = message


def exiting(code: int) -> None:
    """The command has decided its exit code (and printed its last line): from here to the end of
    interpreter shutdown a signal ends the process at once with that code (or 128 + signum, with
    one line, when that code is 0)."""
    global _phase, _exit_code
    _phase, _exit_code = "exiting", code


def _say(line: str) -> None:
    # os.write, not print: the signal may have interrupted a print to stderr, and the buffered
    # stream refuses a reentrant write.
    with contextlib.suppress(OSError):
        os.write(2, f"nstjax: {line}\n".encode(errors="replace"))


def _handle(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    code = 128 + signum
    if _phase == "exiting":
        if _exit_code:  # its line is out (an error, an interruption): say nothing more
            os._exit(_exit_code)
        line = f"stopped by {name} while exiting, after its work was done"
    elif _phase == "running":
        line = " ".join(_stop_message.format(name=name).split())
    else:
        line = f"stopped by {name} before the run started; nothing was written"
    # what was printed to stdout so far (a reentrant flush fails)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    _say(line)
    os._exit(code)
