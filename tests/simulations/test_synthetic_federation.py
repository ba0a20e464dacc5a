"""Tests of the synthetic federation: determinism, splits, sensors, label noise, signals."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from emofed.config import DataConfig
from models.labels import EMOTIONS
from simulations.synthetic import FACE_SIZE, MAX_TEXT_WORDS, SyntheticFederation


def _make_config(**overrides: object) -> DataConfig:
    return dataclasses.replace(DataConfig(samples_per_device=24), **overrides)


def _make_federation(
    num_devices: int = 6, seed: int = 0, **overrides: object
) -> SyntheticFederation:
    return SyntheticFederation(_make_config(**overrides), num_devices=num_devices, seed=seed)


def _fingerprint(samples: list) -> list[tuple]:
    return [
        (
            s.label,
            None if s.face is None else s.face.tobytes(),
            None if s.voice is None else s.voice.tobytes(),
            s.voice_rate,
            s.text,
        )
        for s in samples
    ]


def test_same_seed_renders_byte_identical_devices_in_any_order():
    """A device's samples depend only on the seed, not on what was rendered before."""
    first = _make_federation(seed=5)
    a2 = _fingerprint(first.device(2))
    assert a2 == _fingerprint(first.device(2))
    second = _make_federation(seed=5)
    b3 = _fingerprint(second.device(3))
    b2 = _fingerprint(second.device(2))
    assert a2 == b2
    assert b3 == _fingerprint(first.device(3))


def test_different_seed_renders_different_devices():
    """Changing the seed changes labels, images, audio and text."""
    a = _make_federation(seed=0, p_no_camera=0.0, p_no_microphone=0.0, p_missing_text=0.0).device(0)
    b = _make_federation(seed=1, p_no_camera=0.0, p_no_microphone=0.0, p_missing_text=0.0).device(0)
    assert not np.array_equal(a[0].face, b[0].face)
    assert not np.array_equal(a[0].voice[:1000], b[0].voice[:1000])
    assert [s.text for s in a] != [s.text for s in b]
    assert [s.label for s in a] != [s.label for s in b]


def test_device_split_matches_metadata_and_device():
    """device_split partitions device() by the metadata's split, keeping order."""
    fed = _make_federation(num_devices=3, samples_per_device=12)
    for d in range(fed.num_devices):
        train, test = fed.device_split(d)
        infos = fed.device_info(d)
        everything = _fingerprint(fed.device(d))
        expected_train = [f for f, i in zip(everything, infos, strict=True) if i.split == "train"]
        expected_test = [f for f, i in zip(everything, infos, strict=True) if i.split == "test"]
        assert _fingerprint(train) == expected_train
        assert _fingerprint(test) == expected_test


@pytest.mark.parametrize("partition", ["natural", "dirichlet"])
def test_every_sample_belongs_to_exactly_one_device(partition):
    """Devices cover the sample pool exactly once, in both partitions."""
    fed = _make_federation(num_devices=10, partition=partition, dirichlet_alpha=0.3)
    merged = np.concatenate([fed.device_indices(d) for d in range(fed.num_devices)])
    np.testing.assert_array_equal(np.sort(merged), np.arange(fed.num_samples))
    assert fed.num_samples == 10 * 24
    for d in range(fed.num_devices):
        assert all(info.device == d for info in fed.device_info(d))


def test_natural_devices_are_single_users_and_dirichlet_devices_mix_users():
    """Natural: device k is user k; dirichlet: identities mix within devices."""
    natural = _make_federation(num_devices=8)
    assert [natural.describe()["devices"][d]["num_users"] for d in range(8)] == [1] * 8
    assert all(i.user == 3 for i in natural.device_info(3))
    mixed = _make_federation(num_devices=8, partition="dirichlet", dirichlet_alpha=1.0)
    assert np.mean([d["num_users"] for d in mixed.describe()["devices"]]) > 2


@pytest.mark.parametrize("partition", ["natural", "dirichlet"])
def test_label_mixes_grow_more_skewed_as_alpha_falls(partition):
    """Per-device label entropy falls with alpha: the federation is non-IID."""

    def mean_entropy(alpha: float) -> float:
        fed = _make_federation(
            num_devices=30, partition=partition, dirichlet_alpha=alpha, samples_per_device=60
        )
        entropies = []
        for device in fed.describe()["devices"]:
            p = np.array(list(device["labels"].values()), float)
            p = p[p > 0] / p.sum()
            entropies.append(-(p * np.log(p)).sum())
        return float(np.mean(entropies))

    high, mid, low = (mean_entropy(a) for a in (100.0, 1.0, 0.1))
    assert high > mid > low
    assert high > 0.9 * np.log(len(EMOTIONS))


@pytest.mark.parametrize("test_fraction", [0.1, 0.25, 0.5])
def test_each_device_keeps_train_and_test_samples(test_fraction):
    """Every device of >= 4 samples gets >= 1 test and >= 1 train sample near test_fraction."""
    fed = _make_federation(num_devices=12, test_fraction=test_fraction, samples_per_device=10)
    described = fed.describe()
    for device in described["devices"]:
        assert device["num_test"] >= 1 and device["num_train"] >= 1
        assert abs(device["num_test"] - test_fraction * 10) <= 1
    assert described["num_test"] + described["num_train"] == fed.num_samples


def test_test_split_is_stratified_by_label():
    """A class with many samples on a device sends about test_fraction of them to test."""
    fed = _make_federation(num_devices=4, samples_per_device=80, dirichlet_alpha=100.0)
    for d in range(fed.num_devices):
        infos = fed.device_info(d)
        for label in range(len(EMOTIONS)):
            of_label = [i for i in infos if i.true_label == label]
            n_test = sum(i.split == "test" for i in of_label)
            assert abs(n_test - 0.25 * len(of_label)) <= 1.5


def test_devices_without_camera_or_microphone_lack_that_modality_everywhere():
    """Sensors are per device: no camera means no face in any of its samples."""
    fed = _make_federation(
        num_devices=20, p_no_camera=0.4, p_no_microphone=0.4, samples_per_device=5
    )
    cams = [fed.has_camera(d) for d in range(fed.num_devices)]
    mics = [fed.has_microphone(d) for d in range(fed.num_devices)]
    assert 0 < sum(cams) < 20 and 0 < sum(mics) < 20
    for d in range(fed.num_devices):
        samples = fed.device(d)
        assert all((s.face is not None) == cams[d] for s in samples)
        assert all((s.voice is not None) == mics[d] for s in samples)
        assert all((s.voice_rate is not None) == mics[d] for s in samples)


def test_every_sample_keeps_at_least_one_modality():
    """With every sensor and text likely missing, text survives where nothing else does."""
    fed = _make_federation(
        num_devices=12,
        p_no_camera=0.7,
        p_no_microphone=0.7,
        p_missing_text=0.9,
        samples_per_device=8,
    )
    counted = 0
    for d in range(fed.num_devices):
        for s in fed.device(d):
            assert s.face is not None or s.voice is not None or s.text is not None
            counted += s.face is None and s.voice is None
    assert counted > 0, "the configuration should produce text-only samples"
    texts = fed.describe()["num_text"]
    assert texts < fed.num_samples


@pytest.mark.parametrize("label_noise", [0.0, 0.05, 0.3])
def test_label_noise_hits_training_labels_only(label_noise):
    """The configured share of training labels is flipped; test labels stay true."""
    fed = _make_federation(num_devices=10, label_noise=label_noise, samples_per_device=40)
    infos = [fed.info(i) for i in range(fed.num_samples)]
    train = [i for i in infos if i.split == "train"]
    test = [i for i in infos if i.split == "test"]
    flipped = sum(i.label != i.true_label for i in train)
    assert flipped == round(label_noise * len(train))
    assert all(i.label == i.true_label for i in test)
    assert fed.describe()["train_label_noise"] == pytest.approx(flipped / len(train))
    # A device reports the noisy label for training samples, the true one for test samples.
    for d in range(3):
        train_raw, test_raw = fed.device_split(d)
        device_infos = fed.device_info(d)
        assert [s.label for s in train_raw] == [i.label for i in device_infos if i.split == "train"]
        truth = [i.true_label for i in device_infos if i.split == "test"]
        assert [s.label for s in test_raw] == truth


def test_rendered_signals_have_the_documented_shapes():
    """Faces are uint8 BGR squares, voices float32 1.0-1.3 s clips, texts short ASCII."""
    rate = 16000
    fed = _make_federation(
        num_devices=3,
        p_no_camera=0.0,
        p_no_microphone=0.0,
        p_missing_text=0.0,
        voice_sample_rate=rate,
    )
    for s in fed.device(1):
        assert s.face.shape == (FACE_SIZE, FACE_SIZE, 3) and s.face.dtype == np.uint8
        assert s.voice.dtype == np.float32 and s.voice.ndim == 1
        assert 1.0 * rate <= s.voice.size <= 1.3 * rate
        assert np.abs(s.voice).max() <= 1.0 and np.abs(s.voice).max() > 0.01
        assert s.voice_rate == rate
        assert s.text.isascii() and 3 <= len(s.text.split()) <= MAX_TEXT_WORDS
        assert 0 <= s.label < len(EMOTIONS)


def test_haar_cascade_finds_most_faces():
    """OpenCV's frontal-face cascade, with the preprocessing settings, finds most faces."""
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    fed = _make_federation(num_devices=4, p_no_camera=0.0, p_no_microphone=1.0, p_missing_text=1.0)
    found = total = 0
    for d in range(fed.num_devices):
        for s in fed.device(d):
            grey = cv2.equalizeHist(cv2.cvtColor(s.face, cv2.COLOR_BGR2GRAY))
            boxes = cascade.detectMultiScale(
                grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24)
            )
            found += len(boxes) > 0
            total += 1
    assert found / total > 0.6


def test_describe_counts_agree_with_the_samples():
    """describe() totals match the per-device entries and the rendered data."""
    fed = _make_federation(num_devices=5)
    described = fed.describe()
    devices = described["devices"]
    assert described["num_devices"] == len(devices) == 5
    assert sum(sum(d["labels"].values()) for d in devices) == described["num_samples"]
    assert sum(described["labels"].values()) == fed.num_samples
    assert list(described["labels"]) == list(EMOTIONS)
    samples = fed.device(4)
    assert devices[4]["num_face"] == sum(s.face is not None for s in samples)
    assert devices[4]["num_voice"] == sum(s.voice is not None for s in samples)
    assert devices[4]["num_text"] == sum(s.text is not None for s in samples)


def test_identity_is_shared_by_a_users_samples_and_differs_between_users():
    """A user's identity is fixed; two users differ in face, voice and style."""
    fed = _make_federation()
    a, b = fed.identity(0), fed.identity(1)
    assert a == _make_federation().identity(0)
    assert (a.face_w, a.f0, a.fillers) != (b.face_w, b.f0, b.fillers)


@pytest.mark.parametrize(
    ("overrides", "kwargs", "match"),
    [
        ({}, {"num_devices": 0, "seed": 0}, "num_devices"),
        ({}, {"num_devices": 2, "seed": -1}, "seed"),
        ({"partition": "shards"}, {"num_devices": 2, "seed": 0}, r"Known: \[.dirichlet"),
        ({"samples_per_device": 0}, {"num_devices": 2, "seed": 0}, "samples_per_device"),
        ({"test_fraction": 1.0}, {"num_devices": 2, "seed": 0}, "test_fraction"),
        ({"dirichlet_alpha": 0.0}, {"num_devices": 2, "seed": 0}, "dirichlet_alpha"),
        ({"p_no_camera": 1.5}, {"num_devices": 2, "seed": 0}, "p_no_camera"),
        ({"label_noise": -0.1}, {"num_devices": 2, "seed": 0}, "label_noise"),
        ({"voice_sample_rate": 4000}, {"num_devices": 2, "seed": 0}, "voice_sample_rate"),
    ],
)
def test_bad_configuration_is_rejected(overrides, kwargs, match):
    """Out-of-range settings raise a ValueError naming the key."""
    with pytest.raises(ValueError, match=match):
        SyntheticFederation(_make_config(**overrides), **kwargs)


def test_out_of_range_device_is_rejected():
    """Asking for a device that does not exist raises ValueError."""
    fed = _make_federation(num_devices=3)
    with pytest.raises(ValueError, match="device_id"):
        fed.device(3)
