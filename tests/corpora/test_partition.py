"""Tests of the natural and Dirichlet partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from corpora.partition import (
    PARTITIONERS,
    partition_by_name,
    partition_dirichlet,
    partition_natural,
)

NUM_CLASSES = 7


def _make_labels(n: int = 1400, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(NUM_CLASSES, size=n)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(merged), np.arange(n))
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices of a device must be sorted and unique"


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, seed: int) -> list[np.ndarray]:
    return partition_dirichlet(labels, num_devices, alpha, np.random.default_rng(seed))


def _mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    overall = np.bincount(labels, minlength=NUM_CLASSES) / labels.size
    tvs = [
        0.5 * np.abs(np.bincount(labels[p], minlength=NUM_CLASSES) / p.size - overall).sum()
        for p in parts
    ]
    return float(np.mean(tvs))


def test_natural_gives_one_device_per_user_in_user_order():
    """Each device holds exactly one user's samples, devices sorted by user id."""
    users = np.random.default_rng(1).permutation(np.repeat([7, 3, 11, 5], [4, 6, 2, 8]))
    parts = partition_natural(users)
    assert [int(users[p[0]]) for p in parts] == [3, 5, 7, 11]
    assert [p.size for p in parts] == [6, 8, 4, 2]
    for part in parts:
        assert np.unique(users[part]).size == 1
    _assert_exact_cover(parts, users.size)


def test_natural_accepts_string_user_ids():
    """String speaker ids partition like integers."""
    parts = partition_natural(np.array(["b", "a", "b", "c", "a"]))
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]


def test_natural_rejects_two_dimensional_ids():
    """A 2-D id array is a caller error."""
    with pytest.raises(ValueError, match="one-dimensional"):
        partition_natural(np.zeros((2, 3)))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("num_devices", [1, 5, 24])
def test_dirichlet_assigns_every_index_exactly_once(alpha, num_devices):
    """Every sample lands on exactly one device and every device gets min_size."""
    labels = _make_labels()
    parts = partition_dirichlet(labels, num_devices, alpha, np.random.default_rng(3), min_size=2)
    assert len(parts) == num_devices
    assert min(p.size for p in parts) >= 2
    _assert_exact_cover(parts, labels.size)


def test_dirichlet_skew_grows_as_alpha_falls():
    """Mean distance of device label mixes to the global mix rises as alpha falls."""
    labels = _make_labels(n=2400)
    skew = []
    for alpha in (100.0, 1.0, 0.1):
        runs = [
            _mean_tv_to_global(labels, _dirichlet(labels, 20, alpha, seed=s))
            for s in range(3)
        ]
        skew.append(np.mean(runs))
    assert skew[0] < 0.1, "alpha=100 should be close to IID"
    assert skew[0] < skew[1] < skew[2]
    assert skew[2] > 0.5, "alpha=0.1 should leave devices with few classes"


def test_dirichlet_is_a_function_of_the_generator_state():
    """Equal seeds give equal partitions, different seeds different ones."""
    labels = _make_labels()
    a = partition_dirichlet(labels, 10, 0.5, np.random.default_rng(7))
    b = partition_dirichlet(labels, 10, 0.5, np.random.default_rng(7))
    c = partition_dirichlet(labels, 10, 0.5, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_rebalances_when_redraws_keep_failing():
    """At tiny alpha with many devices the fallback still meets min_size."""
    labels = _make_labels(n=300)
    parts = partition_dirichlet(labels, 50, 0.001, np.random.default_rng(0), min_size=5)
    assert min(p.size for p in parts) >= 5
    _assert_exact_cover(parts, labels.size)


@pytest.mark.parametrize(
    ("labels", "num_devices", "alpha", "min_size", "match"),
    [
        (np.zeros((2, 5), int), 2, 1.0, 0, "one-dimensional"),
        (np.array([0, -1, 2]), 2, 1.0, 0, "non-negative integers"),
        (np.array([0.0, 1.0]), 2, 1.0, 0, "non-negative integers"),
        (np.arange(10), 0, 1.0, 0, "num_devices"),
        (np.arange(10), 2, 0.0, 0, "alpha"),
        (np.arange(10), 2, float("nan"), 0, "alpha"),
        (np.arange(10), 2, 1.0, -1, "min_size"),
        (np.arange(10), 4, 1.0, 3, "at least"),
    ],
)
def test_dirichlet_rejects_bad_arguments(labels, num_devices, alpha, min_size, match):
    """Bad arguments raise a one-line ValueError naming the problem."""
    with pytest.raises(ValueError, match=match):
        partition_dirichlet(labels, num_devices, alpha, np.random.default_rng(0), min_size)


def _by_name(name: str, labels: np.ndarray, users: np.ndarray, num_devices: int | None, seed: int):
    return partition_by_name(
        name,
        labels=labels,
        user_ids=users,
        num_devices=num_devices,
        alpha=0.5,
        rng=np.random.default_rng(seed),
    )


def test_registry_builds_by_name_and_lists_known_names():
    """partition_by_name() dispatches by name; an unknown name lists the registered ones."""
    labels, users = _make_labels(n=120), np.repeat(np.arange(6), 20)
    assert set(PARTITIONERS) == {"natural", "dirichlet"}
    natural = _by_name("natural", labels, users, None, 0)
    assert [p.tolist() for p in natural] == [p.tolist() for p in partition_natural(users)]
    direct = partition_dirichlet(labels, 4, 0.5, np.random.default_rng(2))
    named = _by_name("dirichlet", labels, users, 4, 2)
    assert all(np.array_equal(x, y) for x, y in zip(direct, named, strict=True))
    with pytest.raises(ValueError, match=r"Known: \['dirichlet', 'natural'\]"):
        _by_name("shards", labels, users, 4, 0)
    with pytest.raises(ValueError, match="one device per user"):
        _by_name("natural", labels, users, 4, 0)
