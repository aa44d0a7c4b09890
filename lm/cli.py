"""What every command line shares: the packaged configs, and bad input as one line, not a traceback.

Each entry point defines its absl flags, calls `define_config` for a `--config` file with
`--config.x=y` overrides, and hands its body to `run`, which turns the errors a user can fix
(`ConfigError` and its `FileError`, an unknown config key, a path the OS refused) into one line,
`error: ...`, and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import configs
from lm.config import ConfigError

CONFIGS = Path(configs.__file__).parent


def config_file(name: str) -> str:
    """The packaged config `name` (e.g. "isoflop/tiny.py"), wherever lm is installed."""
    return str(CONFIGS / name)


def _unknown_key(e: Exception) -> str:
    """ml_collections' message for a missing key, with its did-you-mean, on one line."""
    text = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    key, _, hint = text.replace("\\'", "'").partition(" Did you mean")
    key = repr(key.strip().strip("'\""))
    return f"{key} (did you mean{hint[:-1]}?)" if hint else key


def define_config(default: str, help_text: str) -> None:
    """`--config` (a config file; default: the packaged `default`) and its overrides."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file("config", config_file(default), help_text)
    except (KeyError, AttributeError) as e:  # ml_collections parses overrides at definition
        sys.exit(f"error: unknown config key {_unknown_key(e)}")
    except (TypeError, ValueError) as e:
        sys.exit(f"error: a --config override does not fit its field: {e}")


def _parse(argv: list[str]) -> list[str]:
    """Parse `argv` into absl's flags once; a bad flag, a config file's `ConfigError` (e.g.
    configs/finetune.py:RUN_DIR naming no run) or a stray argument ends in one line."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        found, cause = e, e.__context__
        while cause is not None:  # ml_collections re-raises it with the traceback as its message
            found = cause if isinstance(cause, ConfigError) else found
            cause = cause.__context__
        sys.exit(f"error: {found}")
    except (KeyError, AttributeError) as e:
        sys.exit(f"error: unknown config key {_unknown_key(e)}")
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(rest[1:])!r} (every option is a --flag)")
    return rest


def run(body: Callable[[], None], argv: list[str]) -> None:
    """Parse `argv` with absl, then run `body`; a `ConfigError` (from the body or a config file),
    a bad flag or key, or a path the OS refused ends in one line."""
    from absl import app

    rest = _parse(argv)

    def main(_):
        try:
            body()
        except ConfigError as e:
            sys.exit(f"error: {e}")
        except OSError as e:  # a full disk, a read-only or missing folder: which path, and why
            if e.filename is None:
                raise
            sys.exit(f"error: {e.filename}: {e.strerror}")

    app.run(main, argv=argv, flags_parser=lambda _: rest)
