"""What every `emofed` subcommand shares: failing with one line, the configuration, run names."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from emofed.config import ConfigError, EmofedConfig, load_config
from emofed.protocol import PROGRESS_PREFIX

__all__ = [
    "APP_DIR",
    "DEFAULT_CONFIG",
    "PROGRESS_PREFIX",
    "add_config_args",
    "fail",
    "raise_interrupt",
    "resolve_config",
    "run_path",
]

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = APP_DIR / "configs" / "default.yaml"


def fail(message: str, code: int = 2) -> int:
    """Print a one-line error for the command line and give the exit status.

    Parameters
    ----------
    message : str
        What went wrong, in one line; printed to stderr after ``emofed: error:``.
    code : int, default 2
        The exit status to return (2: bad usage or configuration, 1: a failed run).

    Returns
    -------
    int
        ``code``, for the subcommand to return as its exit status.
    """
    print(f"emofed: error: {message}", file=sys.stderr)
    return code


def resolve_config(args: argparse.Namespace) -> tuple[EmofedConfig, Path]:
    """Load the configuration named by ``--config`` with the command line's overrides.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments with ``config`` (a YAML path or None for ``configs/default.yaml``)
        and ``overrides`` (``key=value`` strings), as added by `add_config_args`.

    Returns
    -------
    tuple of (EmofedConfig, Path)
        The validated configuration and the absolute path of the YAML file read.

    Raises
    ------
    ConfigError
        On an unreadable file, an unknown key, a wrong type or a value out of range.
    """
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    return load_config(path, args.overrides), path


def run_path(cfg: EmofedConfig) -> Path:
    """Choose a new run directory under ``output.dir``.

    The name is ``output.name`` when set, else ``<UTC timestamp>-<strategy>`` with the first
    free ``-2``, ``-3``, ... suffix. A name is taken when the directory or its
    ``.incomplete`` twin exists. Nothing is created.

    Parameters
    ----------
    cfg : EmofedConfig
        The run's configuration (``output.dir``, ``output.name``, ``strategy.name``).

    Returns
    -------
    Path
        The absolute path of the run directory, which does not exist yet.

    Raises
    ------
    ConfigError
        When ``output.name`` is already taken, or no free name is left under ``output.dir``.
    """
    root = Path(cfg.output.dir).resolve()
    if cfg.output.name:
        path = root / cfg.output.name
        if path.exists() or path.with_name(path.name + ".incomplete").exists():
            raise ConfigError(f"'output.name': run directory {path} already exists; choose another name")
        return path
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{cfg.strategy.name}"
    for suffix in ["", *(f"-{i}" for i in range(2, 1000))]:
        path = root / f"{base}{suffix}"
        if not path.exists() and not path.with_name(path.name + ".incomplete").exists():
            return path
    raise ConfigError(f"'output.dir': no free run name under {root}")


def raise_interrupt(signum: int, frame: object) -> None:
    """Signal handler that turns a signal (SIGTERM) into ``KeyboardInterrupt``.

    So a terminated command unwinds through the same cleanup as Ctrl-C.

    Parameters
    ----------
    signum : int
        The signal received.
    frame : object
        The interrupted stack frame (unused).

    Raises
    ------
    KeyboardInterrupt
        Always, naming the signal.
    """
    raise KeyboardInterrupt(f"signal {signum}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and the positional ``key=value`` overrides to a subcommand.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser; `resolve_config` reads what these arguments parse to.
    """
    parser.add_argument("--config", "-c", help=f"YAML configuration (default: {DEFAULT_CONFIG.relative_to(APP_DIR)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. rounds=10 devices=50")
