"""The coordinator: Flower ServerApp, strategy assembly, run directory and reports."""

from server.rundir import RunDirectory, RunDirectoryError
from server.strategy import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "RunDirectory", "RunDirectoryError", "build_strategy"]
