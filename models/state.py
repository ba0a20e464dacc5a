"""Named NumPy views of a model's trainable weights, for shipping and loading them."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["get_state", "set_state", "shared_state_keys"]


def _matches(name: str, prefixes: Collection[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def shared_state_keys(model: nn.Module, *, exclude: Collection[str] = ()) -> list[str]:
    """Names of the parameters that train, in registration order.

    Frozen weights (a frozen text encoder, the base weights under LoRA adapters) are
    identical everywhere, so they never need to travel.

    Parameters
    ----------
    model : nn.Module
        The network (unwrapped: an Opacus ``GradSampleModule`` prefixes names with
        ``_module.``; pass its ``_module``).
    exclude : Collection[str], optional
        Submodule names to leave out with everything under them, e.g. ``("head",)`` for
        a personal classifier head that stays on the device.

    Returns
    -------
    list[str]
        Parameter names with ``requires_grad=True``, minus ``exclude``.
    """
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not _matches(name, exclude)
    ]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def get_state(model: nn.Module, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Copy named weights out of ``model`` as NumPy arrays.

    Parameters
    ----------
    model : nn.Module
        The network.
    keys : Sequence[str], optional
        Parameter or buffer names; default :func:`shared_state_keys`.

    Returns
    -------
    dict[str, np.ndarray]
        Independent CPU copies, in the order of ``keys``.

    Raises
    ------
    ValueError
        If a key names no parameter or buffer of ``model``.
    """
    tensors = _tensors(model)
    keys = shared_state_keys(model) if keys is None else list(keys)
    for key in keys:
        if key not in tensors:
            raise ValueError(f"Unknown state key {key!r}: the model has no such weight.")
    return {key: tensors[key].detach().cpu().numpy().copy() for key in keys}


def set_state(
    model: nn.Module,
    arrays: Mapping[str, np.ndarray],
    *,
    keys: Collection[str] | None = None,
) -> None:
    """Load named arrays into ``model`` in place, all or nothing.

    Every array is checked before any weight changes, so a bad message leaves the model
    as it was. Parameters keep their identity, so optimisers holding them stay valid.

    Parameters
    ----------
    model : nn.Module
        The network.
    arrays : Mapping[str, np.ndarray]
        Name → array, e.g. from :func:`get_state` or from the server.
    keys : Collection[str], optional
        The names ``arrays`` must hold, no more and no fewer; default
        :func:`shared_state_keys` of ``model``.

    Raises
    ------
    ValueError
        If a key is missing or unknown, or an array has the wrong shape, a non-numeric
        dtype or non-finite values; the message names the key.
    """
    tensors = _tensors(model)
    expected = shared_state_keys(model) if keys is None else list(keys)
    expected_set = set(expected)
    for key in expected:
        if key not in tensors:
            raise ValueError(f"Unknown state key {key!r}: the model has no such weight.")
        if key not in arrays:
            raise ValueError(f"Missing state key {key!r}.")
    for key in arrays:
        if key not in expected_set:
            raise ValueError(f"Unexpected state key {key!r}: not among the expected weights.")
    converted: dict[str, torch.Tensor] = {}
    for key in expected:
        array = np.asarray(arrays[key])
        target = tensors[key]
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(
                f"State key {key!r} has shape {tuple(array.shape)}, expected {tuple(target.shape)}."
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ValueError(f"State key {key!r} has non-numeric dtype {array.dtype}.")
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            raise ValueError(f"State key {key!r} has NaN or infinite values.")
        converted[key] = torch.from_numpy(np.array(array, copy=True))
    with torch.no_grad():
        for key, value in converted.items():
            tensors[key].copy_(value)
