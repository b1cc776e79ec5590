"""The ``nstjax`` command.

    nstjax --workdir=DIR [--config=configs/X.py] [--config.FIELD=VALUE ...] [--overwrite]
    nstjax --config=configs/ablation_style_layers.py [--workdir=DIR] --dry_run

A config whose ``sweep`` is not empty runs as a sweep (nstjax/sweep.py, docs/sweeps.md): every
point in DIR/points/, summary.csv, grid.png and loss_curves.png in DIR; started again on the same
DIR it runs only the points not yet done. ``--dry_run`` lists the points and their batches.

With no ``--config`` it runs the built-in default (``configs/default.py``'s settings) on the
built-in image pair. Anything the user got wrong ends with one line on stderr,
``nstjax: error: ...``, and exit code 2; never a traceback.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

import nstjax.config as _config_module
from nstjax.errors import UserError

EXIT_USER_ERROR = 2



def make_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh set of flags per invocation (config overrides become flags while parsing)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", os.path.abspath(_config_module.__file__),
        "Config file defining get_config() (default: the built-in default).", flag_values=fv,
        sys_argv=argv)
    flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Print a sweep's points and batches; compute nothing.",
                      flag_values=fv)
    return fv


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # one line, whatever the message held
    print(f"nstjax: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _parse(argv: list[str]):
    for a in argv[1:]:
        if not a.startswith("--config="):
            continue
        path = a.split("=", 1)[1]  # "file.py:variant" passes "variant" to get_config
        if not any(os.path.isfile(os.path.expanduser(f)) for f in (path, path.split(":", 1)[0])):
            return None, _fail(f"config file {path.split(':', 1)[0]} does not exist")
    try:
        fv = make_flags(argv)
        fv(argv)
        fv.config  # loads the file and applies the overrides
    except flags.Error as e:
        return None, _fail(e)
    except (AttributeError, KeyError) as e:
        return None, _fail(f"unknown config field {str(e).strip(chr(34))}")
    except (OSError, SyntaxError, TypeError, ValueError, ImportError) as e:
        return None, _fail(f"bad --config: {e}")
    if not fv.workdir and not fv.dry_run:
        return None, _fail("--workdir is required (the directory for the run's outputs)")
    return fv, 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        return 0
    fv, code = _parse(argv)
    if fv is None:
        return code
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nstjax.run import run  # imports jax: after argument checks, so errors come fast
    from nstjax import sweep

    if fv.dry_run or sweep.is_sweep(fv.config):
        try:
            return sweep.main(fv.config, fv.workdir, overwrite=fv.overwrite, dry_run=fv.dry_run)
        except UserError as e:
            return _fail(e)
        except KeyboardInterrupt:
            return _fail("interrupted; run the same command again to finish the points not yet done")
    try:
        summary = run(fv.config, fv.workdir, overwrite=fv.overwrite)
    except UserError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return _fail("interrupted")
    final = summary["final_terms"]
    print(f"nstjax: wrote {os.path.join(fv.workdir, 'final.png')}: {summary['steps_done']} steps, "
          f"loss {final['loss']:.4g}, {summary['wall_s']:.1f} s")
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
