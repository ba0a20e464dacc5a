"""Shared pytest configuration for the privacy tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slow`` marker (the project's pyproject.toml defines it too)."""
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
