"""The ``nstjax`` command.

    nstjax --workdir=DIR [--config=configs/X.py] [--config.FIELD=VALUE ...] [--overwrite]
           [--output=FILE] [--print_every=N]
    nstjax --replay=DIR [--workdir=NEWDIR]
    nstjax --config=configs/ablation_style_layers.py [--workdir=DIR] --dry_run
    nstjax --config=SWEEP.py --workdir=DIR --coordinator=HOST:PORT --num_processes=N --process_id=I

A config whose ``sweep`` is not empty runs as a sweep (nstjax/sweep.py, docs/sweeps.md): every
point in DIR/points/, summary.csv, grid.png and loss_curves.png in DIR; started again on the same
DIR it runs only the points not yet done. ``--dry_run`` lists the points and their batches.
A sweep spans several processes (hosts) when each is started with ``--coordinator``,
``--num_processes`` and ``--process_id`` (or with ``--config.sweep.distributed=True`` under SLURM,
Open MPI, Cloud TPU or Kubernetes, which JAX detects): docs/multihost.md.

With no ``--config`` it runs the built-in default (``configs/default.py``'s settings) on the
built-in image pair. Running again with the same --workdir resumes an unfinished run of the same
config from its last checkpoint; --overwrite starts over. --replay re-runs a finished run from its
manifest and reports whether the result is bit-identical. --output=FILE also writes the final image
to FILE, in the format its extension names (.png, .jpg/.jpeg, .webp, .tif/.tiff; nstjax/output.py).

Exit codes: 0 done (replay: IDENTICAL); 1 replay: DIFFERENT; 2 bad input or a refused workdir,
reported as one line ``nstjax: error: ...``, never a traceback (an error in a --config file:
``nstjax: error: FILE: Type: message (line N)``); 130 / 143 stopped by SIGINT /
SIGTERM, in one line from the first instruction to the last (nstjax/interrupts.py): before a run
starts, with nothing written; during one, after saving a checkpoint (run the same command again to
resume); a second signal stops at once, keeping the last periodic checkpoint; 141 (128 + SIGPIPE)
stdout closed early (``nstjax --dry_run ... | head``), quietly, as if killed by SIGPIPE.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import signal
import sys
import traceback

# Only the standard library and nstjax's light modules here: entry() installs the signal handlers
# first, and everything imported before that (ml_collections, absl, JAX through nstjax.config) is
# time in which a Ctrl-C would be a traceback. The heavy imports are in the functions using them.
from nstjax import interrupts
from nstjax.errors import RunInterrupted, UserError, why_missing

EXIT_USER_ERROR = 2
EXIT_REPLAY_DIFFERENT = 1
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: what a shell reports for a program killed by SIGPIPE
SWEEP_STOPPED = ("stopped by {name}; finished points are kept: run the same command again to "
                 "finish the points not yet done")


class ConfigFileError(UserError):
    """An error in a --config file or its get_config(): ``<file>: <Type>: <message> (line N)``."""


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def describe_config_error(path: str, e: BaseException) -> str:
    """``<path>: <Type>: <message> (line N)``, N the line of ``path`` it happened on (of a
    SyntaxError in it, else the last frame of the traceback in it), left out when none is."""
    line, message = None, str(e)
    if isinstance(e, SyntaxError) and e.filename and _same_file(e.filename, path):
        line, message = e.lineno, e.msg
    else:
        for frame in traceback.extract_tb(e.__traceback__):
            if _same_file(frame.filename, path):
                line = frame.lineno
    return (f"{path}: {type(e).__name__}" + (f": {message}" if message else "")
            + (f" (line {line})" if line else ""))


@functools.cache
def _config_file_parser() -> type:
    """The parser class for ``--config=FILE``, made on first use (it subclasses absl's)."""
    import ml_collections
    from absl import flags

    class _ConfigFileParser(flags.ArgumentParser):
        """Does what ml_collections' parser of ``--config=FILE[:ARG]`` does (load FILE, call
        ``get_config(ARG)``, lock the result), except that any error in FILE or its get_config() is
        raised as a :class:`ConfigFileError` naming the file and line. (ml_collections turns a
        TypeError or ValueError into a flag error whose message is the whole traceback, keeps an
        OSError for the first use of the config, where it surfaces as a traceback, and lets the
        others through without saying where; absl wraps only TypeError and ValueError, so this one
        passes.)"""

        def __init__(self, name: str, original: flags.ArgumentParser):
            self.module_name = f"{name}_config"  # the module name ml_collections gives the file
            self._original = original

        def flag_type(self) -> str:
            return self._original.flag_type()

        def parse(self, path):
            file, *arg = path.split(":", 1)  # as ml_collections splits it
            try:
                loader = importlib.machinery.SourceFileLoader(self.module_name,
                                                              os.path.expanduser(file))
                module = importlib.util.module_from_spec(
                    importlib.util.spec_from_loader(self.module_name, loader))
                # as load_module() did: dataclasses, pickle look there
                sys.modules[self.module_name] = module
                try:
                    loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(self.module_name, None)
                    raise
                get_config = getattr(module, "get_config", None)
                if not callable(get_config):
                    raise ConfigFileError(f"{file}: defines no get_config() function")
                config = get_config(*arg)
            except ConfigFileError:
                raise
            except Exception as e:  # noqa: BLE001 - the config file is user code:
                # any error in it is the user's to fix
                raise ConfigFileError(describe_config_error(file, e)) from None
            if not isinstance(config, ml_collections.ConfigDict):
                missing = " (is its return missing?)" if config is None else ""
                raise ConfigFileError(f"{file}: get_config() returned {type(config).__name__}, not "
                                      f"an ml_collections.ConfigDict{missing}")
            config.lock()
            return config

    return _ConfigFileParser


def make_flags(argv: list[str]):
    """A fresh set of flags per invocation (config overrides become flags while parsing): an
    ``absl.flags.FlagValues``."""
    from absl import flags
    from ml_collections import config_flags

    import nstjax.config as _config_module

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", os.path.abspath(_config_module.__file__),
        "Config file defining get_config() (default: the built-in default).", flag_values=fv,
        sys_argv=argv)
    flag = fv["config"]
    # For --config=FILE (the default, ours, is parsed already). Keyword arguments, so that absl
    # makes a new parser rather than caching one per original parser for ever.
    flag.parser = _config_file_parser()(name="config", original=flag.parser)
    flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False,
                      "Replace a run in --workdir instead of refusing (or resuming).",
                      flag_values=fv)
    flags.DEFINE_string("replay", None, "Re-run the finished run in this workdir from its manifest "
                        "and compare the results.", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Print a sweep's points and batches; compute nothing.",
                      flag_values=fv)
    flags.DEFINE_integer("print_every", None, "Print the loss and every weighted term every N "
                         "steps on stdout; sets config.print_every.", flag_values=fv)
    flags.DEFINE_string("output", None, "Also write the final image to this file, in the format of "
                        "its extension (.png, .jpg, .webp, .tif); sets config.output.",
                        flag_values=fv)
    # A multi-process sweep without cluster auto-detection (nstjax/hosts.py, docs/multihost.md)
    flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0, where every process of a "
                        "multi-process sweep meets.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "How many processes run the sweep.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's id, 0 to num_processes - 1 (0 writes "
                         "the files).", flag_values=fv)
    flags.DEFINE_integer("init_timeout", 120, "Seconds for every process of a multi-process sweep "
                         "to reach the coordinator and each other.", lower_bound=1, flag_values=fv)
    return fv


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # one line, whatever the message held
    print(f"nstjax: error: {message}", file=sys.stderr)
    _hosts().note_error(message)  # a multi-process sweep's other processes are told it
    return EXIT_USER_ERROR


def _hosts():
    from nstjax import hosts  # light: the standard library only

    return hosts


def _config_file_problem(path: str) -> str | None:
    """Why ``path`` (``file.py`` or ``file.py:variant``) cannot be a --config file, if it cannot."""
    candidates = [os.path.expanduser(f) for f in (path, path.split(":", 1)[0])]
    if any(os.path.isfile(f) for f in candidates):
        return None
    file = candidates[-1]
    if not os.path.exists(file):
        why = why_missing(file)
        if why == "no such file":
            return f"config file {file} does not exist"
        return (f"config file {file} {why}" if why.startswith("cannot")
                else f"config file {file} is {why}")
    if os.path.isdir(file):
        return f"config file {file} is a directory, not a Python file defining get_config()"
    return f"config file {file} is not a regular file"


def _unknown_field(e: BaseException, argv: list[str]) -> str:
    """``unknown config field 'optimizer.nmae' (did you mean "name"?)`` from ml_collections'
    KeyError, whose message is a repr of several lines (the name quoted, then a suggestion)."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
        e = e.args[0]
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    first, *rest = [line.strip() for line in text.strip().strip("\"'").splitlines() if line.strip()]
    name = first.strip("\"'")
    for a in argv[1:]:  # the whole dotted name the user typed, when one override ends with it
        field = a[len("--config."):].split("=", 1)[0] if a.startswith("--config.") else ""
        if field == name or field.endswith("." + name):
            name = field
            break
    hint = " ".join(rest).strip().rstrip(".?")
    if hint.startswith("Did you mean"):
        hint = hint.split(" instead of ")[0].replace("Did you mean", "did you mean", 1) + "?"
        if "." in name:  # the suggestion is a name within the same group
            hint = hint.replace('"', f'"{name.rsplit(".", 1)[0]}.', 1)
    return f"unknown config field '{name}'" + (f" ({hint})" if hint else "")


def _parse(argv: list[str]):
    from absl import flags

    for a in argv[1:]:
        if not a.startswith("--config="):
            continue
        problem = _config_file_problem(a.split("=", 1)[1])  # "file.py:variant": "variant" goes
        if problem:  # to get_config
            return None, _fail(problem)
    try:
        fv = make_flags(argv)
        fv(argv)
        fv.config  # noqa: B018 - the access loads the file and applies the overrides
    except ConfigFileError as e:
        return None, _fail(e)
    except flags.Error as e:
        return None, _fail(e)
    except (AttributeError, KeyError) as e:
        return None, _fail(_unknown_field(e, argv))
    except Exception as e:  # noqa: BLE001 - an override that does not fit the config, say
        return None, _fail(f"bad --config: {type(e).__name__}: {e}")
    if not fv.workdir and not fv.replay and not fv.dry_run:
        return None, _fail("--workdir is required (the directory for the run's outputs)")
    if fv.print_every is not None:
        fv.config.print_every = fv.print_every  # validated with the rest of the config
    if fv.output is not None:
        # a replay checks final.png; it must not overwrite the original's --output file
        if fv.replay:
            return None, _fail("--output cannot be used with --replay")
        fv.config.output = fv.output  # validated with the rest of the config, before any work
    try:
        _hosts().parse_launch(fv.coordinator, fv.num_processes, fv.process_id)
    except UserError as e:
        return None, _fail(e)
    return fv, 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs through absl
    logging.getLogger("absl").setLevel(logging.ERROR)


def _resource_message(e: BaseException) -> str | None:
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        return ("ran out of memory; use a smaller --config.size or --config.chunk "
                f"({type(e).__name__}: {text[:160]})")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        return 0
    fv, code = _parse(argv)
    if fv is None:
        return code
    _quiet_libraries()
    from nstjax import hosts, sweep

    # checked in _parse
    launch = hosts.parse_launch(fv.coordinator, fv.num_processes, fv.process_id)
    if launch is not None or (sweep.is_sweep(fv.config) and fv.config.sweep.distributed):
        if fv.replay or not sweep.is_sweep(fv.config):
            return _fail("--coordinator, --num_processes and --process_id (or sweep.distributed) "
                         "run a sweep over several processes; this is not a sweep (set sweep.axes "
                         "or sweep.points)")
        try:  # first of all: before anything starts a JAX backend
            hosts.start(launch, fv.init_timeout)
        except UserError as e:
            return _fail(e)
    from nstjax import compile_cache

    if not fv.replay:  # a replay compiles afresh: it checks compilation's determinism too
        compile_cache.enable()  # before anything compiles (imports jax: after argument checks)
    from nstjax.run import run, sweep_main

    if fv.dry_run or sweep.is_sweep(fv.config):
        try:
            with interrupts.running(SWEEP_STOPPED):
                return sweep_main(fv.config, fv.workdir, overwrite=fv.overwrite, dry_run=fv.dry_run)
        except UserError as e:
            return _fail(e)
        except RunInterrupted as e:
            print(f"nstjax: {' '.join(str(e).split())}", file=sys.stderr)
            hosts.note_error(" ".join(str(e).split()))
            return e.exit_code
        except KeyboardInterrupt:
            print(f"nstjax: {SWEEP_STOPPED.format(name='SIGINT')}", file=sys.stderr)
            return 130
        except BrokenPipeError:  # stdout's reader went away: not an error to report (see entry)
            raise
        except OSError as e:  # a full disk: one line, as for a single run
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return _fail(f"{e.strerror or e}{where}")
        except Exception:
            # Of several processes: a collective fails the moment a peer dies, just before the
            # lifeline hears of it and ends this process with one line; give it that moment.
            hosts.wait_for_peers()
            raise
    try:
        with interrupts.running():  # a signal StopSignals does not handle: stop at once
            if fv.replay:
                from nstjax.replay import replay

                result = replay(fv.replay, fv.workdir, overwrite=fv.overwrite)
                return 0 if result["identical"] else EXIT_REPLAY_DIFFERENT
            summary = run(fv.config, fv.workdir, overwrite=fv.overwrite)
    except UserError as e:
        return _fail(e)
    except RunInterrupted as e:
        print(f"nstjax: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nstjax: interrupted at once by a second Ctrl-C; the last periodic checkpoint is "
              "kept (run the same command again to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader went away: not an error to report (see entry)
        raise
    except OSError as e:  # a full disk, a file vanishing under us: still one line, not a traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _fail(f"{e.strerror or e}{where}")
    except Exception as e:
        message = _resource_message(e)
        if message is None:
            raise  # a bug: keep the traceback
        return _fail(message)
    final = summary["final_terms"]
    resumed = (f", resumed from step {summary['resumed_from']}"
               if summary.get("resumed_from") is not None else "")
    print(f"nstjax: wrote {os.path.join(fv.workdir, 'final.png')}: {summary['steps_done']} steps, "
          f"loss {final['loss']:.4g}, {summary['wall_s']:.1f} s{resumed}")
    return 0


def entry() -> None:
    """The ``nstjax`` command: :func:`main` with SIGINT and SIGTERM handled from first to last
    (nstjax/interrupts.py) and stdout closed early ending quietly."""
    interrupts.install()  # first of all: before this, a Ctrl-C is a traceback
    try:
        code = main()
        # so a reader that went away shows here, not in the interpreter's last flush
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout stopped reading (``| head -1``). Python ignores SIGPIPE, so the write
        # raised instead of ending the process: end quietly, with the exit code of a SIGPIPE death.
        # Point stdout at /dev/null first, or the interpreter's final flush of what is still
        # buffered fails again and prints "Exception ignored ... BrokenPipeError" to stderr.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    except Exception:
        if _hosts().active():  # a bug in one process of several: its traceback, then end now, as
            traceback.print_exc()  # JAX's exit handler would wait for the others in a barrier
            _hosts().finish(1)
        raise
    _hosts().finish(code)  # a multi-process sweep: tell the others; a failure ends here (os._exit)
    interrupts.exiting(code)  # a Ctrl-C during shutdown (atexit) ends it with this code, quietly
    sys.exit(code)


if __name__ == "__main__":
    entry()
