"""The command line of every research script: absl flags and ``ml_collections.config_flags``.

Every script is launched the same way (the big_vision / Flax-examples convention):

    python -m research.<name> --config configs/<name>.py[:variant] --workdir DIR \
        [--config.KEY=VALUE ...]

and has a testable ``run(config, workdir)`` and a thin absl ``main(argv)``:

    def main(argv):
        cli.run_main(argv, run, "<name>")

    if __name__ == "__main__":
        cli.define_flags("<name>")
        app.run(main, flags_parser=cli.parse_flags)

On top of config_flags: a mistyped key (``--config.lerning_rate=0.1``) gets one line naming it
with the closest valid key, instead of a traceback; a comma list for a tuple of strings
(``--config.solvers=lbfgs,newton``) is split as a tuple literal would be; a missing config file
is one line. Every such mistake, and a value that fails the script's checks
(``check_config``), exits with status 2 before anything is written; a loss that becomes NaN
exits with status 1, keeping what was written.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from research.common.config import CONFIG_DIR, ConfigError, has_key, unknown_key_message
from research.common.guard import NonFiniteLossError

FLAGS = flags.FLAGS
# An override on the command line: -config.x, --config.x=1, --noconfig.flag.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def define_flags(name: str, *, workdir_help: str | None = None) -> None:
    """``--config`` (default ``configs/<name>.py``) and ``--workdir``."""
    config_flags.DEFINE_config_file(
        "config",
        str(CONFIG_DIR / f"{name}.py"),
        f"configs/{name}.py[:variant]; override a key with --config.KEY=VALUE",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        workdir_help or f"output folder (default runs/scripts/{name}-<timestamp>)",
    )


def default_workdir(name: str) -> Path:
    return Path("runs") / "scripts" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _config_spec(argv: Sequence[str]) -> str:
    """The ``--config`` value in ``argv``, else the flag's default."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            return arg.split("=", 1)[1]
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return FLAGS["config"].default_as_str.strip("'")


def _unknown_override(argv: Sequence[str]) -> str | None:
    """The message for the first ``--config.KEY`` of ``argv`` that the config lacks, if any."""
    keys = [m.group(1) for arg in argv[1:] if (m := _OVERRIDE.match(arg))]
    if not keys:
        return None
    try:
        config = FLAGS["config"].parser.parse(_config_spec(argv))
        missing = [key for key in keys if not has_key(config, key)]
    except Exception:  # the file itself does not load: not an unknown key
        return None
    return unknown_key_message(config, missing[0]) if missing else None


def _load_error(argv: Sequence[str], error: OSError) -> str:
    return f"--config {_config_spec(argv)!r}: {str(error).strip().splitlines()[-1].strip()}"


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _split_comma_lists() -> None:
    """``--config.solvers=lbfgs,newton`` arrives as ``("lbfgs,newton",)``: split it, as
    ``--config.solvers="('lbfgs', 'newton')"`` or repeated flags would give."""
    config = FLAGS.config
    for key, value in config_flags.get_override_values(FLAGS["config"]).items():
        if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str):
            parts = tuple(part.strip() for part in value[0].split(",") if part.strip())
            if len(parts) > 1:
                *parents, leaf = key.split(".")
                node = config
                for part in parents:
                    node = node[part]
                node[leaf] = parts


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (pass as ``app.run(main, flags_parser=parse_flags)``), every mistake
    reported in one line with exit status 2."""
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Error whilst parsing config file" in message:
            # config_flags wraps the config file's own error in its traceback: keep its last line.
            message = f"--config: {message.strip().splitlines()[-1].strip()}"
        _usage_error(message)
    except (KeyError, AttributeError, TypeError):
        message = _unknown_override(argv)
        if message is None:
            raise
        _usage_error(message)
    except OSError as error:  # a config file that does not load, seen by an override
        _usage_error(_load_error(argv, error))
    if not isinstance(FLAGS.config, ml_collections.ConfigDict):
        # config_flags defers a file that did not load until the config is first used.
        try:
            FLAGS.config.to_dict()
        except OSError as error:
            _usage_error(_load_error(argv, error))
        _usage_error(f"--config {_config_spec(argv)!r}: get_config() returned no ConfigDict")
    _split_comma_lists()
    return rest


def quiet_logs() -> None:
    """Warnings and errors only from absl logging (absl.app turns on INFO, where JAX reports
    each backend it could not start), unless ``--verbosity`` was given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_main(argv: Sequence[str], run: Callable[[Any, Path], Any], name: str) -> None:
    """The body of a script's absl ``main``: ``run(FLAGS.config, FLAGS.workdir)``."""
    if len(argv) > 1:
        _usage_error(f"unexpected arguments {list(argv[1:])}; flags are --config, --workdir")
    quiet_logs()
    workdir = Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(name)
    try:
        run(FLAGS.config, workdir)
    except ConfigError as error:
        _usage_error(str(error))
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{name}: results in {workdir}")
