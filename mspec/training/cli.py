"""The entry points' error reporting: a config mistake or a run failure the user can act on is
one line (``error: ...``), not a traceback.

:func:`run` replaces ``absl.app.run``. Command-line mistakes (an unknown ``--config.`` key, a
missing config file, a bad value) and the errors listed in :data:`CLEAR_ERRORS` (config values,
a refused resume, a checkpoint that cannot be written or read, divergence, a dataset fault) print
``<program>: error: <message>`` and exit with status 1 (2 for command-line mistakes); a run
stopped by SIGINT/SIGTERM after saving a checkpoint exits with 128 + the signal number. Any other
exception keeps its full traceback (a bug). ``MSPEC_TRACEBACK=1`` shows the traceback of every
error.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags


def _clear_errors() -> tuple[type[BaseException], ...]:
    from mspec.data import datasets
    from mspec.training import checkpoint, metrics, restore, run_config

    return (
        run_config.ConfigError,
        checkpoint.CheckpointError,
        restore.RestoreError,
        datasets.DatasetError,
        metrics.MetricsFileError,
        FloatingPointError,
        FileNotFoundError,
    )


def _say(msg: str) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] != "-c" else "mspec"
    print(f"{prog}: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def _config_flag_message(e: BaseException, argv: list[str]) -> str:
    """One line for an exception raised while parsing ``--config`` and ``--config.*`` flags."""
    inner = e.args[0] if e.args else e
    if isinstance(inner, KeyError) and inner.args:  # ml_collections: "'lrr'\nDid you mean ...?"
        key, _, hint = str(inner.args[0]).partition("\n")
        key = key.strip("'\"")
        given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                 a.split("=", 1)[0].rsplit(".", 1)[-1] == key]
        where = given[0] if given else f"--config.*{key}"
        return f"{where}: the config has no key {key!r}. {hint}".strip()
    text = str(e)
    if "Failed loading config file" in text or "No such file" in text:
        paths = [a.split("=", 1)[1] if "=" in a else None for a in argv if a.startswith("--config=")]
        if not paths and "--config" in argv[:-1]:
            paths = [argv[argv.index("--config") + 1]]
        path = (paths[0] or "").split(":", 1)[0] if paths else ""
        if path and not os.path.isfile(path):
            return f"--config: config file {path!r} not found (run from the repository root, or give its path)"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"--config: {lines[-1] if lines else text}"
    return " ".join(text.split())


def _flags_error_message(e: Exception) -> str:
    # Config-file errors carry a traceback: keep the first line and the exception's line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if len(lines) > 1 and "Traceback" in str(e) else ""
    return f"{lines[0].rstrip(':')}: {last}" if last else lines[0] if lines else str(e)


def _raise_config_load_errors(flag_values: flags.FlagValues) -> None:
    for name in flag_values:
        value = flag_values[name].value
        if type(value).__name__ == "_ErrorConfig":  # a config file that failed to load
            raise OSError(str(object.__getattribute__(value, "_error")))


def load_config(config_args: list[str]):
    """The config an entry point would run with ``config_args`` (``--config=PATH[:variant]``
    and ``--config.KEY=VALUE`` overrides), parsed by the same ml_collections flag parser into a
    private flag registry, so a caller can run several configs in one process (the reproduction
    study's stages).

    Raises:
      ValueError: a missing or failing config file, an unknown key or a bad value (one line).
    """
    from ml_collections import config_flags

    registry = flags.FlagValues()
    argv = ["mspec", *config_args]
    # sys_argv: the override flags (--config.KEY) are declared from the command line it names.
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=registry,
                                    lock_config=True, sys_argv=argv)
    try:
        registry(argv)
        _raise_config_load_errors(registry)
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        if isinstance(e, flags.Error):
            message = _flags_error_message(e)
        else:
            message = _config_flag_message(e, argv)
        raise ValueError(" ".join(message.split())) from e
    return registry.config


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
        _raise_config_load_errors(flags.FLAGS)
        return rest
    except flags.Error as e:
        _say(_flags_error_message(e))
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        if os.environ.get("MSPEC_TRACEBACK"):
            raise
        _say(_config_flag_message(e, argv))
    sys.exit(2)


def is_clear_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure the user can act on from its message alone (a config value,
    a refused resume, a checkpoint or dataset fault, divergence): shown as one line, without
    traceback, unless ``MSPEC_TRACEBACK`` is set."""
    return isinstance(exc, _clear_errors()) and not os.environ.get("MSPEC_TRACEBACK")


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if is_clear_error(exc):
            _say(f"{exc}")
        else:
            previous(exc_type, exc, tb)

    return hook


def define_run_flags() -> None:
    """The training entry points' flags that are not part of the config: how a run resumes and
    how often it checkpoints by the clock (docs/reliability.md)."""
    flags.DEFINE_list(
        "allow_config_change", [],
        "Config keys (or prefixes, e.g. optim) that may differ from the config of the checkpoint "
        "being resumed; without it such a resume is refused (docs/reliability.md).",
    )
    flags.DEFINE_float(
        "checkpoint_every_minutes", 30.0,
        "Also save a checkpoint when this many minutes have passed since the last one (0 = only "
        "config.checkpoint_every steps).",
    )


def run_options() -> dict:
    """The keyword arguments of ``mspec.training.loop.train_and_evaluate`` from the flags
    of :func:`define_run_flags`."""
    return dict(
        allow_config_change=tuple(flags.FLAGS.allow_config_change),
        checkpoint_every_minutes=flags.FLAGS.checkpoint_every_minutes,
    )


def run(main) -> None:
    """``absl.app.run(main)`` with one-line errors (see the module docstring)."""
    from mspec.training import stopping

    def guarded(argv):
        # Installed before main: distributed.initialize() wraps this hook to tell the peers.
        sys.excepthook = _excepthook(sys.excepthook)
        try:
            return main(argv)
        except stopping.Stopped as e:
            print(str(e), file=sys.stderr, flush=True)
            sys.exit(e.exit_code)

    app.run(guarded, flags_parser=_parse)
