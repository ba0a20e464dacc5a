"""Synthetic federation: devices that render face images, voice waveforms and short texts.

Each synthetic user has an identity (face geometry and colouring, voice pitch and timbre,
writing style, how strongly they express emotion) and each sample carries one of the seven
emotions through cues in every modality. The cues are deliberately noisy and overlapping, so
the data makes a fair benchmark rather than a lookup table:

- face: mouth curvature, openness and width, eyebrow slope and height, eye openness and a
  nose wrinkle with a raised upper lip, scaled by a per-sample intensity (clear in about
  60% of samples, faint in the rest) plus noise and a per-user resting expression; fearful
  and surprised share wide eyes and an open mouth, angry and disgusted share lowered brows
  and narrowed eyes, and a faint sad face looks neutral;
- voice: pitch level, contour and variability, loudness, syllable rate, jitter, tremor,
  breathiness, spectral tilt and a formant shift, on top of each speaker's own pitch,
  vocal-tract length, rate and level; happy, angry, surprised and fearful are all
  high-arousal, sad and disgusted low;
- text: per-emotion lexicons and templates, words shared between emotions, negation, a share
  of sentences with no emotional cue at all, and per-user typos and fillers.

Because the noise is independent across modalities and each modality confuses different
class pairs, fused models beat every single modality. The samples are raw signals
(:class:`models.preprocess.RawSample`) that go through the same preprocessing as real data.

Only cheap metadata is built up front; a device's samples are rendered on demand, and a
sample's content depends only on the federation seed, its global index, its user and label.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from corpora.partition import PARTITIONERS, partition_dirichlet
from emofed.config import DataConfig
from models.labels import EMOTIONS
from models.preprocess import RawSample
from simulations.faces import FACE_SIZE, Colour, face_cues, render_face
from simulations.identity import (
    _FACE,
    _META,
    _TEXT,
    _VOICE,
    UserIdentity,
    _intensities,
    _rng,
    make_identity,
)
from simulations.texts import MAX_TEXT_WORDS, render_text
from simulations.voices import render_voice, voice_cues

# Names that lived here before the modalities moved to their own modules stay importable.
__all__ = [
    "FACE_SIZE",
    "MAX_TEXT_WORDS",
    "NUM_CLASSES",
    "Colour",
    "SampleInfo",
    "SyntheticFederation",
    "UserIdentity",
    "face_cues",
    "make_identity",
    "render_face",
    "render_text",
    "render_voice",
    "voice_cues",
]

logger = logging.getLogger(__name__)

NUM_CLASSES = len(EMOTIONS)


@dataclass(frozen=True)
class SampleInfo:
    """Metadata of one sample, known without rendering it."""

    index: int  # global sample index; with the seed it fixes the sample's content
    device: int
    user: int
    true_label: int
    label: int  # the label a device sees: noisy for training samples, true for test ones
    split: str  # "train" or "test"
    has_face: bool
    has_voice: bool
    has_text: bool


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"data.{name} must be in [0, 1]. Found {value}.")


class SyntheticFederation:
    """A deterministic synthetic federation of emotion-recognition devices.

    Metadata for every sample (user, label, split, modalities, label noise) is built at
    construction; :meth:`device` renders one device's samples on demand.

    With ``config.partition == "natural"`` device ``k`` is user ``k``, whose label mix is
    drawn from ``Dir(config.dirichlet_alpha)`` over the seven emotions. With ``"dirichlet"``,
    ``num_devices`` users each contribute ``samples_per_device`` uniformly labelled samples to
    a pool that :func:`~corpora.partition.partition_dirichlet` splits with label skew, so
    identities mix within devices and device sizes vary (at least 4 samples each).

    A share ``p_no_camera`` of devices has no face data and ``p_no_microphone`` no voice data;
    each sample independently lacks text with probability ``p_missing_text``, except that a
    sample with neither face nor voice always keeps its text. A share ``label_noise`` of
    training labels (exactly rounded) is replaced by a uniformly drawn other class; test
    labels stay clean so that evaluation measures the true emotion.

    Parameters
    ----------
    config : DataConfig
        Partition, sizes, missing-modality and label-noise rates, audio sample rate.
    num_devices : int
        Number of devices (and of users).
    seed : int
        Non-negative seed; equal seeds give byte-identical federations.

    Raises
    ------
    ValueError
        If ``num_devices < 1``, ``seed < 0``, the partition is unknown or a rate or size in
        ``config`` is out of range.
    """

    def __init__(self, config: DataConfig, *, num_devices: int, seed: int) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1. Found {num_devices}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0. Found {seed}.")
        if config.partition not in PARTITIONERS:
            raise ValueError(
                f"Unknown data.partition {config.partition!r}. Known: {sorted(PARTITIONERS)}."
            )
        if config.samples_per_device < 1:
            raise ValueError(
                f"data.samples_per_device must be >= 1. Found {config.samples_per_device}."
            )
        if not 0.0 <= config.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1). Found {config.test_fraction}.")
        if not (math.isfinite(config.dirichlet_alpha) and config.dirichlet_alpha > 0):
            raise ValueError(f"data.dirichlet_alpha must be > 0. Found {config.dirichlet_alpha}.")
        if config.voice_sample_rate < 8000:
            raise ValueError(
                f"data.voice_sample_rate must be >= 8000. Found {config.voice_sample_rate}."
            )
        for name in ("p_no_camera", "p_no_microphone", "p_missing_text", "label_noise"):
            _check_probability(name, getattr(config, name))
        self.config = config
        self.seed = int(seed)
        self._num_devices = int(num_devices)
        self._identities: dict[int, UserIdentity] = {}
        self._build(np.random.default_rng(np.random.SeedSequence([self.seed, _META])))

    # ------------------------------------------------------------------ metadata

    def _build(self, rng: np.random.Generator) -> None:
        cfg, k, per = self.config, self._num_devices, self.config.samples_per_device
        if cfg.partition == "natural":
            mixes = rng.dirichlet(np.full(NUM_CLASSES, cfg.dirichlet_alpha), size=k)  # (K, 7)
            labels = np.concatenate([rng.choice(NUM_CLASSES, size=per, p=m) for m in mixes])
            users = np.repeat(np.arange(k), per)
            parts = [np.arange(d * per, (d + 1) * per) for d in range(k)]
        else:
            labels = rng.integers(NUM_CLASSES, size=k * per)
            users = np.repeat(np.arange(k), per)
            # Four samples per device leave room for both a train and a test sample.
            parts = partition_dirichlet(labels, k, cfg.dirichlet_alpha, rng, min_size=min(4, per))
        n = labels.size
        device = np.empty(n, np.int64)
        for d, idx in enumerate(parts):
            device[idx] = d

        is_test = np.zeros(n, bool)
        for idx in parts:
            is_test[self._test_positions(idx, labels, rng)] = True

        camera = rng.random(k) >= cfg.p_no_camera
        microphone = rng.random(k) >= cfg.p_no_microphone
        has_face, has_voice = camera[device], microphone[device]
        # A sample with neither sensor keeps its text, so no sample is left empty.
        has_text = (rng.random(n) >= cfg.p_missing_text) | ~(has_face | has_voice)

        observed = labels.copy()
        train = np.flatnonzero(~is_test)
        flip = rng.choice(train, size=int(round(cfg.label_noise * train.size)), replace=False)
        observed[flip] = (labels[flip] + rng.integers(1, NUM_CLASSES, size=flip.size)) % NUM_CLASSES

        self._parts = [np.asarray(p, np.int64) for p in parts]
        self._labels, self._observed, self._users, self._device = labels, observed, users, device
        self._is_test, self._camera, self._microphone = is_test, camera, microphone
        self._has = np.stack([has_face, has_voice, has_text], axis=1)  # (N, 3)
        # DEBUG: every simulated device process builds the same metadata again.
        logger.debug(
            "Synthetic federation: %d devices, %d samples, partition=%s, seed=%d",
            k, n, cfg.partition, self.seed,
        )  # fmt: skip

    def _test_positions(
        self, idx: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Pick a device's test samples, loosely stratified by label.

        Systematic sampling over the device's samples ordered by label (random order within a
        label) takes close to ``test_fraction`` of every class.
        """
        n = idx.size
        n_test = int(round(self.config.test_fraction * n))
        if self.config.test_fraction > 0 and n >= 4:
            n_test = min(max(n_test, 1), n - 1)
        n_test = min(n_test, max(n - 1, 0))
        if n_test == 0:
            return np.empty(0, np.int64)
        shuffled = rng.permutation(idx)
        ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
        picks = np.floor((np.arange(n_test) + rng.random()) * n / n_test).astype(np.int64)
        return ordered[np.minimum(picks, n - 1)]

    # ------------------------------------------------------------------ queries

    @property
    def num_devices(self) -> int:
        """Number of devices."""
        return self._num_devices

    @property
    def num_samples(self) -> int:
        """Number of samples over all devices."""
        return int(self._labels.size)

    def _check_device(self, device_id: int) -> None:
        if not 0 <= device_id < self._num_devices:
            raise ValueError(
                f"device_id must be in [0, {self._num_devices - 1}]. Found {device_id}."
            )

    def device_indices(self, device_id: int) -> np.ndarray:
        """Global sample indices of a device, ascending.

        Raises
        ------
        ValueError
            If ``device_id`` is out of range.
        """
        self._check_device(device_id)
        return self._parts[device_id].copy()

    def has_camera(self, device_id: int) -> bool:
        """Whether the device has a camera (else all its samples lack a face)."""
        self._check_device(device_id)
        return bool(self._camera[device_id])

    def has_microphone(self, device_id: int) -> bool:
        """Whether the device has a microphone (else all its samples lack a voice)."""
        self._check_device(device_id)
        return bool(self._microphone[device_id])

    def info(self, index: int) -> SampleInfo:
        """Metadata of the sample with global ``index``.

        Raises
        ------
        ValueError
            If ``index`` is out of range.
        """
        if not 0 <= index < self.num_samples:
            raise ValueError(f"index must be in [0, {self.num_samples - 1}]. Found {index}.")
        face, voice, text = (bool(v) for v in self._has[index])
        return SampleInfo(
            index=int(index),
            device=int(self._device[index]),
            user=int(self._users[index]),
            true_label=int(self._labels[index]),
            label=int(self._observed[index]),
            split="test" if self._is_test[index] else "train",
            has_face=face,
            has_voice=voice,
            has_text=text,
        )

    def device_info(self, device_id: int) -> list[SampleInfo]:
        """Metadata of a device's samples, in the order of :meth:`device_indices`."""
        return [self.info(int(i)) for i in self.device_indices(device_id)]

    def identity(self, user: int) -> UserIdentity:
        """The identity of ``user`` (cached)."""
        if user not in self._identities:
            self._identities[user] = make_identity(self.seed, user)
        return self._identities[user]

    # ------------------------------------------------------------------ rendering

    def render(self, index: int) -> RawSample:
        """Render one sample; its content depends only on the seed and its metadata.

        Raises
        ------
        ValueError
            If ``index`` is out of range.
        """
        meta = self.info(index)
        ident = self.identity(meta.user)
        strength = _intensities(self.seed, index)
        face = voice = text = None
        if meta.has_face:
            r = _rng(self.seed, _FACE, index)
            face = render_face(ident, face_cues(ident, meta.true_label, strength[0], r), r)
        if meta.has_voice:
            r = _rng(self.seed, _VOICE, index)
            cues = voice_cues(ident, meta.true_label, strength[1], r)
            voice = render_voice(ident, cues, r, self.config.voice_sample_rate)
        if meta.has_text:
            text = render_text(ident, meta.true_label, strength[2], _rng(self.seed, _TEXT, index))
        return RawSample(
            label=meta.label,
            face=face,
            voice=voice,
            voice_rate=self.config.voice_sample_rate if voice is not None else None,
            text=text,
        )

    def device(self, device_id: int) -> list[RawSample]:
        """Render all samples of a device, in the order of :meth:`device_indices`.

        Raises
        ------
        ValueError
            If ``device_id`` is out of range.
        """
        return [self.render(int(i)) for i in self.device_indices(device_id)]

    def device_split(self, device_id: int) -> tuple[list[RawSample], list[RawSample]]:
        """Render a device's samples as ``(train, test)``.

        Training samples carry the (possibly noisy) observed label, test samples the true one.

        Raises
        ------
        ValueError
            If ``device_id`` is out of range.
        """
        idx = self.device_indices(device_id)
        train = [self.render(int(i)) for i in idx if not self._is_test[i]]
        test = [self.render(int(i)) for i in idx if self._is_test[i]]
        return train, test

    # ------------------------------------------------------------------ summary

    def describe(self) -> dict[str, Any]:
        """Counts that characterise the federation, JSON-serialisable.

        Returns
        -------
        dict
            Totals (samples, devices, users, modalities, noisy labels, true-label histogram)
            and, under ``"devices"``, per-device sizes, label histograms, sensors and users.
        """

        def hist(labels: np.ndarray) -> dict[str, int]:
            counts = np.bincount(labels, minlength=NUM_CLASSES)
            return {name: int(c) for name, c in zip(EMOTIONS, counts, strict=True)}

        noisy = self._labels != self._observed
        devices = []
        for d, idx in enumerate(self._parts):
            devices.append(
                {
                    "device": d,
                    "num_train": int((~self._is_test[idx]).sum()),
                    "num_test": int(self._is_test[idx].sum()),
                    "num_users": int(np.unique(self._users[idx]).size),
                    "camera": bool(self._camera[d]),
                    "microphone": bool(self._microphone[d]),
                    "num_face": int(self._has[idx, 0].sum()),
                    "num_voice": int(self._has[idx, 1].sum()),
                    "num_text": int(self._has[idx, 2].sum()),
                    "num_noisy_labels": int(noisy[idx].sum()),
                    "labels": hist(self._labels[idx]),
                }
            )
        train = ~self._is_test
        return {
            "num_devices": self._num_devices,
            "num_samples": self.num_samples,
            "num_users": int(np.unique(self._users).size),
            "num_train": int(train.sum()),
            "num_test": int(self._is_test.sum()),
            "partition": self.config.partition,
            "num_face": int(self._has[:, 0].sum()),
            "num_voice": int(self._has[:, 1].sum()),
            "num_text": int(self._has[:, 2].sum()),
            "devices_without_camera": int((~self._camera).sum()),
            "devices_without_microphone": int((~self._microphone).sum()),
            "train_label_noise": float(noisy[train].mean()) if train.any() else 0.0,
            "labels": hist(self._labels),
            "devices": devices,
        }
