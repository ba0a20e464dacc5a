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
    print(f"emofed: error: {message}", file=sys.stderr)
    return code


def resolve_config(args: argparse.Namespace) -> tuple[EmofedConfig, Path]:
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    return load_config(path, args.overrides), path


def run_path(cfg: EmofedConfig) -> Path:
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
    raise KeyboardInterrupt(f"signal {signum}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help=f"YAML configuration (default: {DEFAULT_CONFIG.relative_to(APP_DIR)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. rounds=10 devices=50")
