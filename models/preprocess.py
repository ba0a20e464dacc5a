"""Turn raw multimodal samples into the tensors the network takes, with a report of what failed."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import TensorDataset

from emofed.config import ModelConfig
from models.errors import UnusableInput
from models.face import FacePreprocessor
from models.features import FeatureExtractor
from models.fusion import MODALITIES
from models.labels import NUM_CLASSES
from models.text import TextPreprocessor, check_text
from models.voice import VoicePreprocessor

__all__ = ["MultimodalPreprocessor", "PreprocessReport", "RawSample"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawSample:
    """One labelled observation as a device records it; None marks a missing modality.

    Attributes
    ----------
    label : int
        Class id in :data:`models.labels.EMOTIONS`.
    face : np.ndarray or None
        Camera frame (see :class:`models.face.FacePreprocessor`).
    voice : np.ndarray or None
        Waveform (see :class:`models.voice.VoicePreprocessor`).
    voice_rate : int or None
        Sampling rate of ``voice`` in Hz.
    text : str or None
        Utterance or message text.
    """

    label: int
    face: np.ndarray | None = None
    voice: np.ndarray | None = None
    voice_rate: int | None = None
    text: str | None = None


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(MODALITIES, 0)


@dataclass
class PreprocessReport:
    """What preprocessing kept, masked and dropped; counts only, no data.

    Attributes
    ----------
    samples_in : int
        Samples given.
    samples_out : int
        Samples kept (at least one usable modality).
    dropped : int
        Samples dropped because no modality was usable.
    present : dict[str, int]
        Per modality, samples where it was given and usable (kept samples only).
    missing : dict[str, int]
        Per modality, samples where it was not given.
    unusable : dict[str, int]
        Per modality, samples where it was given but rejected.
    faces_not_detected : int
        Usable faces for which no face was detected and the centre crop was used.
    reasons : dict[str, int]
        ``"<modality>/<reason>"`` (and ``"sample/no_usable_modality"``) → count.
    """

    samples_in: int = 0
    samples_out: int = 0
    dropped: int = 0
    present: dict[str, int] = field(default_factory=_zero_counts)
    missing: dict[str, int] = field(default_factory=_zero_counts)
    unusable: dict[str, int] = field(default_factory=_zero_counts)
    faces_not_detected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def metrics(self, prefix: str = "preprocess") -> dict[str, int]:
        """Flatten the counts into ``{"<prefix>/<name>": count}`` for metric logging."""
        flat = {
            f"{prefix}/samples_in": self.samples_in,
            f"{prefix}/samples_out": self.samples_out,
            f"{prefix}/dropped": self.dropped,
            f"{prefix}/faces_not_detected": self.faces_not_detected,
        }
        for kind in ("present", "missing", "unusable"):
            for modality, count in getattr(self, kind).items():
                flat[f"{prefix}/{kind}/{modality}"] = count
        return flat


class MultimodalPreprocessor:
    """Preprocess raw samples of any modality mix into one TensorDataset.

    Parameters
    ----------
    config : ModelConfig
        The network's configuration (face, voice and text settings).

    Raises
    ------
    ValueError
        If a preprocessing setting is out of range.
    FileNotFoundError
        If the Haar cascade or the text encoder directory is missing.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.face = FacePreprocessor(config.face)
        self.voice = VoicePreprocessor(config.voice)
        self.text = TextPreprocessor(config.text)

    def __call__(self, samples: Sequence[RawSample]) -> tuple[TensorDataset, PreprocessReport]:
        """Preprocess ``samples``.

        A missing modality becomes zeros with mask 0; an unusable one (see
        :class:`models.errors.UnusableInput`) too, and it is counted; a sample with no
        usable modality is dropped and counted.

        Parameters
        ----------
        samples : Sequence[RawSample]
            The raw samples.

        Returns
        -------
        dataset : TensorDataset
            Tensors in the order the network and loss take them: face (N, 1, S, S),
            voice (N, 1, n_mels, frames), text_ids (N, L), text_mask (N, L),
            modality_mask (N, 3) float32 (face, voice, text), label (N,) int64.
        report : PreprocessReport
            Counts of what was kept, masked and dropped, and why.

        Raises
        ------
        ValueError
            If a label is not a class id in [0, NUM_CLASSES).
        """
        report = PreprocessReport(samples_in=len(samples))
        reasons: Counter[str] = Counter()
        faces: list[torch.Tensor] = []
        voices: list[torch.Tensor] = []
        texts: list[str | None] = []
        masks: list[list[float]] = []
        labels: list[int] = []
        face_zeros = torch.zeros(self.face.output_shape)
        voice_zeros = torch.zeros(self.voice.output_shape)

        def unusable(modality: str, error: UnusableInput) -> None:
            report.unusable[modality] += 1
            reasons[f"{modality}/{error.reason}"] += 1
            logger.debug("Unusable %s: %s", modality, error)

        for sample in samples:
            label = sample.label
            if isinstance(label, bool) or not isinstance(label, int | np.integer):
                raise ValueError(f"label must be an int class id, found {label!r}.")
            if not 0 <= label < NUM_CLASSES:
                raise ValueError(f"label must lie in [0, {NUM_CLASSES}), found {label}.")
            face, face_found, voice, text = None, True, None, None
            if sample.face is None:
                report.missing["face"] += 1
            else:
                try:
                    face, face_found = self.face(sample.face)
                except UnusableInput as error:
                    unusable("face", error)
            if sample.voice is None:
                report.missing["voice"] += 1
            else:
                try:
                    if sample.voice_rate is None:
                        raise UnusableInput("voice has no sample rate", reason="no_rate")
                    voice = self.voice(sample.voice, sample.voice_rate)
                except UnusableInput as error:
                    unusable("voice", error)
            if sample.text is None:
                report.missing["text"] += 1
            else:
                try:
                    text = check_text(sample.text)
                except UnusableInput as error:
                    unusable("text", error)
            mask = [float(face is not None), float(voice is not None), float(text is not None)]
            if not any(mask):
                report.dropped += 1
                reasons["sample/no_usable_modality"] += 1
                continue
            if face is not None and not face_found:
                report.faces_not_detected += 1
            faces.append(face_zeros if face is None else face)
            voices.append(voice_zeros if voice is None else voice)
            texts.append(text)
            masks.append(mask)
            labels.append(int(label))

        text_ids, text_mask = self._tokenize(texts)
        modality_mask = torch.tensor(masks, dtype=torch.float32).reshape(-1, len(MODALITIES))
        for index, modality in enumerate(MODALITIES):
            report.present[modality] = int(modality_mask[:, index].sum())
        report.samples_out = len(labels)
        report.reasons = dict(sorted(reasons.items()))
        dataset = TensorDataset(
            self._stack(faces, self.face.output_shape),  # (N, 1, S, S)
            self._stack(voices, self.voice.output_shape),  # (N, 1, n_mels, frames)
            text_ids,  # (N, L)
            text_mask,  # (N, L)
            modality_mask,  # (N, 3)
            torch.tensor(labels, dtype=torch.long),  # (N,)
        )
        if getattr(self.config, "kind", "cnn") == "features":
            key = (self.config.face, self.config.voice, self.config.text, self.config.features)
            dataset = _extractor(key, self.config)(dataset)  # fixed features, once per sample
        if report.dropped or any(report.unusable.values()):
            logger.info(
                "Preprocessed %d of %d samples (%d dropped); unusable per modality: %s",
                report.samples_out,
                report.samples_in,
                report.dropped,
                report.unusable,
            )
        return dataset, report

    def _tokenize(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise the present texts in one call; absent ones stay all-zero rows."""
        length = self.config.text.max_length
        ids = torch.zeros((len(texts), length), dtype=torch.long)  # (N, L)
        mask = torch.zeros((len(texts), length), dtype=torch.long)  # (N, L)
        rows = [index for index, text in enumerate(texts) if text is not None]
        if rows:
            present_ids, present_mask = self.text([texts[index] for index in rows])
            ids[rows] = present_ids
            mask[rows] = present_mask
        return ids, mask

    @staticmethod
    def _stack(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        if not tensors:
            return torch.zeros((0, *shape))
        return torch.stack(tensors)


_EXTRACTORS: dict[tuple[object, ...], FeatureExtractor] = {}


def _extractor(key: tuple[object, ...], config: ModelConfig) -> FeatureExtractor:
    """One extractor per feature settings and process (the text encoder loads once)."""
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(config)
    return _EXTRACTORS[key]
