"""Simulations: the synthetic federation, simulated people and the simulation runner."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: the synthetic generator pulls in torch, and every `emofed`
# command imports this package's runner to build its parser.
_LAZY = {
    "write_federation": "simulations.export",
    "SampleInfo": "simulations.synthetic",
    "SyntheticFederation": "simulations.synthetic",
    "UserIdentity": "simulations.synthetic",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'simulations' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
