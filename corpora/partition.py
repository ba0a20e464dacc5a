"""Partitioners: split a labelled sample pool into per-device index sets.

Two ways of making a federation from a pool of samples:

- ``natural``: one device per user (speaker, writer, synthetic person), which keeps each
  person's identity on one device, as on real phones.
- ``dirichlet``: label skew drawn from a Dirichlet prior with concentration ``alpha``, the
  standard non-IID benchmark of Hsu et al. (2019); small ``alpha`` gives devices that hold
  few classes, large ``alpha`` approaches an IID split.

Every partitioner assigns each index exactly once and returns one sorted ``int64`` index
array per device. :data:`PARTITIONERS` holds them under a common keyword signature so that
corpus importers can pick one by name with :func:`partition_by_name`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

# Redraws before falling back to moving samples from the largest devices; with the
# capacity cap below a redraw is rarely needed unless alpha is tiny and devices many.
_MAX_DIRICHLET_DRAWS = 100


def partition_natural(user_ids: np.ndarray) -> list[np.ndarray]:
    """Put each user's samples on a device of their own.

    Parameters
    ----------
    user_ids : np.ndarray
        One user id per sample, shape ``(N,)``; any sortable dtype (ints or strings).

    Returns
    -------
    list[np.ndarray]
        One sorted ``int64`` index array per distinct user, in ascending user-id order.

    Raises
    ------
    ValueError
        If ``user_ids`` is not one-dimensional.
    """
    user_ids = np.asarray(user_ids)
    if user_ids.ndim != 1:
        raise ValueError(f"user_ids must be one-dimensional. Found shape {user_ids.shape}.")
    if user_ids.size == 0:
        return []
    # A stable sort keeps each user's indices ascending without a second sort.
    order = np.argsort(user_ids, kind="stable")
    _, starts = np.unique(user_ids[order], return_index=True)
    return [part.astype(np.int64) for part in np.split(order, starts[1:])]


def partition_dirichlet(
    labels: np.ndarray,
    num_devices: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Split samples across devices with Dirichlet label skew.

    For each class ``c``, proportions ``q_c ~ Dir(alpha * 1_K)`` over the ``K = num_devices``
    devices decide how that class's samples are dealt out. This is the per-class form of the
    Dirichlet label prior of Hsu, Qi & Brown (2019), "Measuring the Effects of Non-Identical
    Data Distribution for Federated Visual Classification", arXiv:1909.06335, Sec. 3, as
    implemented by Yurochkin et al. (2019) and NIID-Bench (Li et al., 2022): a device that
    already holds its fair share ``N / K`` receives no more of the later classes, and the
    draw is repeated until every device holds at least ``min_size`` samples. If that fails
    ``100`` times (tiny ``alpha``, many devices), samples are moved from the largest devices
    to the short ones, which keeps every index assigned exactly once.

    Parameters
    ----------
    labels : np.ndarray
        Integer class labels, shape ``(N,)``.
    num_devices : int
        Number of devices ``K``.
    alpha : float
        Dirichlet concentration; smaller means more skew.
    rng : np.random.Generator
        Source of randomness; the result is a function of its state.
    min_size : int, default 2
        Fewest samples any device may receive.

    Returns
    -------
    list[np.ndarray]
        ``K`` sorted ``int64`` index arrays that together cover ``range(N)`` exactly once.

    Raises
    ------
    ValueError
        If ``labels`` is not a one-dimensional array of non-negative integers, if
        ``num_devices < 1``, ``alpha`` is not a positive finite number, ``min_size < 0``,
        or there are fewer than ``num_devices * min_size`` samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional. Found shape {labels.shape}.")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError("labels must be non-negative integers.")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1. Found {num_devices}.")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number. Found {alpha}.")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0. Found {min_size}.")
    n = labels.size
    if n < num_devices * min_size:
        raise ValueError(
            f"Need at least num_devices * min_size = {num_devices * min_size} samples. Found {n}."
        )

    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    fair_share = n / num_devices
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = _deal_by_class(by_class, num_devices, alpha, fair_share, rng)
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        logger.info(
            "Dirichlet partition (alpha=%s, %d devices) kept missing min_size=%d; rebalancing",
            alpha,
            num_devices,
            min_size,
        )
        parts = _rebalance(parts, min_size, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _deal_by_class(
    by_class: list[np.ndarray],
    num_devices: int,
    alpha: float,
    fair_share: float,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Deal each class's shuffled indices out by fresh Dirichlet proportions."""
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for idx in by_class:
        idx = rng.permutation(idx)
        q = rng.dirichlet(np.full(num_devices, alpha))
        # Full devices get nothing more; without this cap a few devices soak up most data.
        q = q * np.array([len(p) < fair_share for p in parts])
        total = q.sum()
        if total <= 0:  # every device full or all mass underflowed at tiny alpha
            q = np.full(num_devices, 1.0 / num_devices)
        else:
            q = q / total
        cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(chunk.tolist())
    return parts


def _rebalance(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Move random samples from the largest devices until every device has min_size."""
    parts = [list(p) for p in parts]
    for short in range(len(parts)):
        while len(parts[short]) < min_size:
            donor = max(range(len(parts)), key=lambda k: len(parts[k]))
            parts[short].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return parts


Partitioner = Callable[..., list[np.ndarray]]


def _natural(
    *,
    labels: np.ndarray,
    user_ids: np.ndarray,
    num_devices: int | None,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Registry adapter: one device per user; ``num_devices``, if given, must match."""
    del labels, alpha, rng, min_size  # the natural split depends on users alone
    parts = partition_natural(user_ids)
    if num_devices is not None and num_devices != len(parts):
        raise ValueError(
            f"natural partition gives one device per user: {len(parts)} users, "
            f"but num_devices={num_devices}."
        )
    return parts


def _dirichlet(
    *,
    labels: np.ndarray,
    user_ids: np.ndarray,
    num_devices: int | None,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Registry adapter: Dirichlet label skew; users mix within devices."""
    del user_ids
    if num_devices is None:
        raise ValueError("dirichlet partition needs num_devices.")
    return partition_dirichlet(labels, num_devices, alpha, rng, min_size)


PARTITIONERS: dict[str, Partitioner] = {"natural": _natural, "dirichlet": _dirichlet}


def partition_by_name(
    name: str,
    *,
    labels: np.ndarray,
    user_ids: np.ndarray,
    num_devices: int | None,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Partition a pool by the registered partitioner ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`PARTITIONERS`.
    labels, user_ids : np.ndarray
        Per-sample class label and user id, shape ``(N,)`` each.
    num_devices : int | None
        Devices wanted; ``None`` lets ``natural`` use one device per user.
    alpha : float
        Dirichlet concentration (``dirichlet`` only).
    rng : np.random.Generator
        Source of randomness.
    min_size : int, default 2
        Fewest samples per device (``dirichlet`` only).

    Returns
    -------
    list[np.ndarray]
        One sorted index array per device.

    Raises
    ------
    ValueError
        If ``name`` is not registered, or the chosen partitioner rejects its arguments.
    """
    if name not in PARTITIONERS:
        raise ValueError(f"Unknown partitioner {name!r}. Known: {sorted(PARTITIONERS)}.")
    return PARTITIONERS[name](
        labels=labels,
        user_ids=user_ids,
        num_devices=num_devices,
        alpha=alpha,
        rng=rng,
        min_size=min_size,
    )
