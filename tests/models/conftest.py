"""Shared fixtures for the model package's tests."""

from __future__ import annotations

import collections.abc

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> collections.abc.Iterator[None]:
    """Run torch on one thread: CI has 2 shared cores and small tensors gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
