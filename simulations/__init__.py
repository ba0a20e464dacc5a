"""Synthetic federation, partitioners and federation-folder export for simulations."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: the synthetic generator pulls in torch, and every `emofed`
# command imports `simulations.importers` to build its parser.
_LAZY = {
    "write_federation": "simulations.export",
    "PARTITIONERS": "simulations.partition",
    "partition_by_name": "simulations.partition",
    "partition_dirichlet": "simulations.partition",
    "partition_natural": "simulations.partition",
    "SampleInfo": "simulations.synthetic",
    "SyntheticFederation": "simulations.synthetic",
    "UserIdentity": "simulations.synthetic",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'simulations' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
