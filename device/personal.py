"""The personal layers a device keeps in its encrypted store: which weights they are, load and save.

Used by the ClientApp (``client.personal`` fine-tunes them every evaluation) and by the
device runtime (``device.recognition`` applies them); neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from torch import nn

from device.layout import PERSONAL_OBJECT
from device.store import EncryptedStore
from models import shared_state_keys

__all__ = ["load_personal", "personal_keys", "save_personal"]


def personal_keys(model: nn.Module, layers: Collection[str]) -> list[str]:
    """Names of the trainable weights under the modules ``layers``, in registration order.

    Raises
    ------
    ValueError
        If ``layers`` names no trainable weight of ``model``.
    """
    shared = set(shared_state_keys(model, exclude=layers))
    keys = [k for k in shared_state_keys(model) if k not in shared]
    if not keys:
        raise ValueError(f"personal layers {sorted(layers)} hold no trainable weight of the model")
    return keys


def load_personal(store: EncryptedStore, keys: Collection[str]) -> dict[str, np.ndarray] | None:
    """The stored personal layers, or None if the device has none yet.

    Raises
    ------
    ValueError
        If the stored layers are not exactly ``keys`` (the configuration changed).
    device.store.StoreTampered
        If the stored object fails authentication.
    """
    if PERSONAL_OBJECT not in store:
        return None
    arrays = store.get_arrays(PERSONAL_OBJECT)
    if set(arrays) != set(keys):
        raise ValueError(
            f"stored personal layers hold {sorted(arrays)[:4]}, expected {sorted(keys)[:4]}; "
            "personal.layers changed since they were saved"
        )
    return arrays


def save_personal(store: EncryptedStore, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the personal layers into the store (encrypted, atomically)."""
    store.put_arrays(PERSONAL_OBJECT, {k: np.ascontiguousarray(v) for k, v in arrays.items()})
