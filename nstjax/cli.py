"""The ``nstjax`` command.

    nstjax --workdir=DIR [--config=configs/X.py] [--config.FIELD=VALUE ...] [--overwrite]

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

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", os.path.abspath(_config_module.__file__),
    "Config file defining get_config() (default: the built-in default).", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Directory for the run's outputs.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.", flag_values=FLAGS)


def _fail(message: str) -> int:
    message = " ".join(str(message).split())  # one line, whatever the message held
    print(f"nstjax: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def _parse(argv: list[str]):
    try:
        FLAGS.unparse_flags()
        FLAGS(argv)
        cfg = FLAGS.config  # loads the file and applies overrides
    except flags.Error as e:
        return None, _fail(e)
    except (OSError, SyntaxError, AttributeError, KeyError, TypeError, ValueError) as e:
        return None, _fail(f"bad --config: {e}")
    if not FLAGS.workdir:
        return None, _fail("--workdir is required (the directory for the run's outputs)")
    return cfg, 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__)
        print(FLAGS.main_module_help() if hasattr(FLAGS, "main_module_help") else "")
        return 0
    cfg, code = _parse(argv)
    if cfg is None:
        return code
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nstjax.run import run  # imports jax: after argument checks, so errors come fast

    try:
        summary = run(cfg, FLAGS.workdir, overwrite=FLAGS.overwrite)
    except UserError as e:
        return _fail(e)
    except KeyboardInterrupt:
        return _fail("interrupted")
    final = summary["final_terms"]
    print(f"nstjax: wrote {os.path.join(FLAGS.workdir, 'final.png')}: {summary['steps_done']} steps, "
          f"loss {final['loss']:.4g}, {summary['wall_s']:.1f} s")
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
