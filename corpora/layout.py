"""Deal imported samples out to training and held-out devices, with local test splits.

Two layouts, chosen by the corpus:

- *identity*: one device per identity (speaker, actor, subject), as on real phones; a
  share of the identities is held out on test-only devices, so evaluation meets people
  the federation never trained on. Identities with too few samples are pooled into one
  ``other`` group. ``devices``, when given, groups several identities per device.
- *dirichlet*: for corpora without identities, the training pool is split with the
  Dirichlet label prior of :func:`corpora.partition.partition_dirichlet`; the held-out
  population is the corpus's official evaluation split, or else a stratified share of the
  samples, dealt onto held-out pseudo-devices of about the size of a training device.

Every training device holds a local test split stratified by label; every sample of a
held-out device is a test sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from corpora.base import CorpusImportError, natural_key
from corpora.partition import partition_dirichlet, partition_natural

__all__ = ["DEFAULT_DEVICES", "DevicePlan", "plan_dirichlet", "plan_identity", "stratified_mask"]

# Devices of a corpus without identities when the caller does not say.
DEFAULT_DEVICES = 10
# Name of the group that holds identities with too few samples of their own.
POOLED_IDENTITY = "other"


@dataclass
class DevicePlan:
    """One device folder to write.

    Attributes
    ----------
    name : str
        Folder name, ``device-007`` or ``heldout-002``.
    heldout : bool
        Test-only device, not listed under ``devices``.
    members : np.ndarray
        Indices of its samples, (n,) int64.
    test : np.ndarray
        Per member, whether it is in the test split, (n,) bool.
    identities : list[str]
        Identities on the device (empty for Dirichlet devices).
    """

    name: str
    heldout: bool
    members: np.ndarray
    test: np.ndarray
    identities: list[str] = field(default_factory=list)


def _round(x: float) -> int:
    """Round half up (Python's round() goes to even, which makes 2.5 -> 2)."""
    return math.floor(x + 0.5)


def stratified_mask(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Mark about ``share`` of the samples, the same share of every label where possible.

    With two or more samples and ``share > 0``, at least one sample is marked and at least
    one is not, so both sides of the split exist. Per label the quota is
    ``share * n_label``; the remainder after flooring goes to the labels with the largest
    fractional parts (ties broken at random).

    Parameters
    ----------
    labels : np.ndarray
        Class ids, (n,).
    share : float
        Fraction in [0, 1) to mark.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    np.ndarray
        (n,) bool, True for the marked samples.
    """
    labels = np.asarray(labels)
    n = labels.size
    mask = np.zeros(n, dtype=bool)
    if n < 2 or share <= 0:
        return mask
    total = min(n - 1, max(1, _round(share * n)))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (total / n)
    take = np.floor(quota).astype(int)
    remainder = total - int(take.sum())
    if remainder > 0:
        # Sort by fractional part, descending, random among equals.
        order = np.lexsort((rng.random(classes.size), -(quota - take)))
        take[order[:remainder]] += 1
    for cls, k in zip(classes, take, strict=True):
        if k:
            idx = np.flatnonzero(labels == cls)
            mask[rng.choice(idx, size=int(k), replace=False)] = True
    return mask


def plan_identity(
    identities: list[str],
    labels: np.ndarray,
    *,
    heldout_share: float,
    test_share: float,
    devices: int | None,
    min_identity_samples: int,
    rng: np.random.Generator,
) -> tuple[list[DevicePlan], list[str], np.ndarray]:
    """One device per identity (or per group of identities), some held out.

    Parameters
    ----------
    identities : list[str]
        Identity of each sample, (n,).
    labels : np.ndarray
        Class id of each sample, (n,).
    heldout_share : float
        Share of identity groups held out; at least one when there are three or more
        groups and the share is positive, and never all of them.
    test_share : float
        Local test share of each training device.
    devices : int or None
        Training devices wanted; None gives one per identity group.
    min_identity_samples : int
        Identities with fewer samples are pooled into one ``other`` group; a pool with
        fewer than two samples is dropped.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    plans : list[DevicePlan]
        Training devices first, then held-out ones.
    pooled : list[str]
        Identities pooled into ``other``.
    dropped : np.ndarray
        Indices of samples dropped (a pool of fewer than two samples).

    Raises
    ------
    CorpusImportError
        If ``devices`` exceeds the number of training identity groups.
    """
    ids = np.asarray(identities, dtype=object).astype(str)
    labels = np.asarray(labels)
    groups: list[tuple[list[str], np.ndarray]] = []
    pooled: list[str] = []
    pool_members: list[np.ndarray] = []
    for part in partition_natural(ids):
        name = str(ids[part[0]])
        if part.size >= min_identity_samples:
            groups.append(([name], part))
        else:
            pooled.append(name)
            pool_members.append(part)
    dropped = np.zeros(0, dtype=np.int64)
    if pool_members:
        members = np.sort(np.concatenate(pool_members))
        if members.size >= 2:
            groups.append(([POOLED_IDENTITY, *sorted(pooled, key=natural_key)], members))
        else:
            dropped = members
    groups.sort(key=lambda g: natural_key(g[0][0]) if g[0][0] != POOLED_IDENTITY else ((2, ""),))
    if not groups:
        return [], sorted(pooled, key=natural_key), dropped

    n = len(groups)
    n_held = _round(heldout_share * n)
    if heldout_share > 0 and n >= 3:
        n_held = max(n_held, 1)
    n_held = min(n_held, n - 1)
    held_set = set(rng.permutation(n)[:n_held].tolist())
    train_groups = [g for i, g in enumerate(groups) if i not in held_set]
    held_groups = [g for i, g in enumerate(groups) if i in held_set]

    if devices is not None:
        if devices > len(train_groups):
            raise CorpusImportError(
                f"devices={devices} but only {len(train_groups)} training identity groups; "
                "each identity stays on one device, so devices must not exceed them."
            )
        train_groups = _group(train_groups, devices)

    plans: list[DevicePlan] = []
    for d, (names, members) in enumerate(train_groups):
        test = stratified_mask(labels[members], test_share, rng)
        plans.append(DevicePlan(f"device-{d:03d}", False, members, test, names))
    for h, (names, members) in enumerate(held_groups):
        plans.append(
            DevicePlan(f"heldout-{h:03d}", True, members, np.ones(members.size, dtype=bool), names)
        )
    return plans, sorted(pooled, key=natural_key), dropped


def _group(
    groups: list[tuple[list[str], np.ndarray]], devices: int
) -> list[tuple[list[str], np.ndarray]]:
    """Deal identity groups onto ``devices`` devices, largest first onto the smallest device."""
    bins: list[tuple[list[str], list[np.ndarray]]] = [([], []) for _ in range(devices)]
    sizes = [0] * devices
    for names, members in sorted(groups, key=lambda g: (-g[1].size, natural_key(g[0][0]))):
        d = min(range(devices), key=lambda k: (sizes[k], k))
        bins[d][0].extend(names)
        bins[d][1].append(members)
        sizes[d] += members.size
    return [(names, np.sort(np.concatenate(parts))) for names, parts in bins]


def plan_dirichlet(
    labels: np.ndarray,
    official_heldout: np.ndarray,
    *,
    heldout_share: float,
    test_share: float,
    devices: int | None,
    alpha: float,
    rng: np.random.Generator,
) -> tuple[list[DevicePlan], str]:
    """Dirichlet label-skewed training devices and held-out pseudo-devices.

    Parameters
    ----------
    labels : np.ndarray
        Class id of each sample, (n,).
    official_heldout : np.ndarray
        Per sample, whether the corpus puts it in its evaluation split, (n,) bool.
    heldout_share : float
        Held-out share when the corpus has no evaluation split; 0 holds nothing out (an
        evaluation split is then merged into training).
    test_share : float
        Local test share of each training device.
    devices : int or None
        Training devices; None gives :data:`DEFAULT_DEVICES`.
    alpha : float
        Dirichlet concentration.
    rng : np.random.Generator
        Source of randomness.

    Returns
    -------
    plans : list[DevicePlan]
        Training devices first, then held-out ones.
    heldout_source : str
        How the held-out population was chosen, for the report.

    Raises
    ------
    CorpusImportError
        If there are too few training samples for the devices.
    """
    labels = np.asarray(labels)
    official_heldout = np.asarray(official_heldout, dtype=bool)
    if heldout_share <= 0:
        held = np.zeros(labels.size, dtype=bool)
        source = "none (heldout_share=0)"
    elif official_heldout.any() and not official_heldout.all():
        held = official_heldout
        source = "the corpus's official evaluation split"
    else:
        held = stratified_mask(labels, heldout_share, rng)
        source = f"a stratified {heldout_share:.0%} of the samples"
    train_idx = np.flatnonzero(~held)
    held_idx = np.flatnonzero(held)
    num = DEFAULT_DEVICES if devices is None else devices
    if train_idx.size < 2 * num:
        raise CorpusImportError(
            f"{train_idx.size} training samples are too few for {num} devices "
            "(each needs at least 2); lower --devices."
        )
    plans: list[DevicePlan] = []
    for d, part in enumerate(partition_dirichlet(labels[train_idx], num, alpha, rng, min_size=2)):
        members = train_idx[part]
        test = stratified_mask(labels[members], test_share, rng)
        plans.append(DevicePlan(f"device-{d:03d}", False, members, test))
    if held_idx.size:
        per_device = train_idx.size / num
        k = max(1, min(_round(held_idx.size / per_device), held_idx.size))
        for h, part in enumerate(partition_dirichlet(labels[held_idx], k, alpha, rng, min_size=1)):
            members = held_idx[part]
            plans.append(
                DevicePlan(f"heldout-{h:03d}", True, members, np.ones(members.size, dtype=bool))
            )
    return plans, source
