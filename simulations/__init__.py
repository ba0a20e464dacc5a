"""Synthetic federation, partitioners and federation-folder export for simulations."""

from simulations.export import write_federation
from simulations.partition import (
    PARTITIONERS,
    partition_by_name,
    partition_dirichlet,
    partition_natural,
)
from simulations.synthetic import SampleInfo, SyntheticFederation, UserIdentity

__all__ = [
    "PARTITIONERS",
    "SampleInfo",
    "SyntheticFederation",
    "UserIdentity",
    "partition_by_name",
    "partition_dirichlet",
    "partition_natural",
    "write_federation",
]
