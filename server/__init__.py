"""The coordinator: Flower ServerApp, strategy assembly, user-level DP, run directory and reports."""

import emofed.preload  # noqa: F401, I001  (first: see emofed/preload.py)
from server.dp import PrivacyBudgetStop, UserLevelDP, UserRelease
from server.rundir import RunDirectory, RunDirectoryError
from server.strategy import STRATEGIES, build_strategy

__all__ = [
    "STRATEGIES",
    "PrivacyBudgetStop",
    "RunDirectory",
    "RunDirectoryError",
    "UserLevelDP",
    "UserRelease",
    "build_strategy",
]
