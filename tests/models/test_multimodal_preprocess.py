"""Tests of multimodal preprocessing: tensors, masks, and the report of what failed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emofed.config import ModelConfig, TextModelConfig, VoiceModelConfig
from models.preprocess import MultimodalPreprocessor, RawSample

_LENGTH = 10


def _make_preprocessor() -> MultimodalPreprocessor:
    return MultimodalPreprocessor(
        ModelConfig(
            kind="cnn",
            voice=VoiceModelConfig(clip_seconds=0.5),
            text=TextModelConfig(max_length=_LENGTH),
        )
    )


def _make_image(seed: int = 0) -> np.ndarray:
    """A noise BGR frame: valid, but with no face in it."""
    return np.random.default_rng(seed).integers(0, 256, (60, 80, 3), np.uint8)


def _make_voice(rate: int = 22050, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(rate // 2)).astype(np.float32)


def _make_samples() -> list[RawSample]:
    """Eight samples, one per case the report must count."""
    return [
        # 0: everything present and usable
        RawSample(
            label=1, face=_make_image(), voice=_make_voice(), voice_rate=22050, text="so happy"
        ),
        # 1: no camera
        RawSample(label=2, voice=_make_voice(seed=1), voice_rate=22050, text="so sad"),
        # 2: empty audio (unusable) and an empty text (unusable), face still usable
        RawSample(
            label=3, face=_make_image(2), voice=np.zeros(0, np.float32), voice_rate=16000, text=""
        ),
        # 3: undecodable audio, read as NaN samples; text only remains
        RawSample(
            label=4, voice=np.full(8000, np.nan, np.float32), voice_rate=16000, text="scared"
        ),
        # 4: nothing usable at all: dropped
        RawSample(label=5, face=np.zeros((2, 2), np.uint8), text="   "),
        # 5: nothing given at all: dropped
        RawSample(label=6),
        # 6: voice without a rate (unusable) and a grey float face
        RawSample(label=0, face=np.full((50, 50), 0.5, np.float32), voice=_make_voice(), text=None),
        # 7: text only
        RawSample(label=6, text="what a surprise!"),
    ]


def test_dataset_tensors_shapes_and_masks() -> None:
    """Kept samples become tensors in model order with zeros and mask 0 where unusable."""
    dataset, _ = _make_preprocessor()(_make_samples())
    face, voice, ids, text_mask, modality_mask, labels = dataset.tensors
    assert len(dataset) == 6
    assert face.shape == (6, 1, 48, 48)
    assert voice.shape == (6, 1, 64, 51)
    assert ids.shape == text_mask.shape == (6, _LENGTH)
    assert ids.dtype == text_mask.dtype == labels.dtype == torch.int64
    assert modality_mask.dtype == torch.float32
    expected_mask = [[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]]
    assert modality_mask.tolist() == expected_mask
    assert labels.tolist() == [1, 2, 3, 4, 0, 6]
    absent = modality_mask == 0
    assert torch.count_nonzero(face[absent[:, 0]]) == 0
    assert torch.count_nonzero(voice[absent[:, 1]]) == 0
    assert torch.count_nonzero(ids[absent[:, 2]]) == 0
    assert torch.count_nonzero(text_mask[absent[:, 2]]) == 0
    assert bool((text_mask[~absent[:, 2]].sum(dim=1) > 0).all())


def test_report_counts() -> None:
    """The report counts present, missing and unusable modalities, fallbacks and drops."""
    _, report = _make_preprocessor()(_make_samples())
    assert (report.samples_in, report.samples_out, report.dropped) == (8, 6, 2)
    assert report.present == {"face": 3, "voice": 2, "text": 4}
    assert report.missing == {"face": 4, "voice": 3, "text": 2}
    assert report.unusable == {"face": 1, "voice": 3, "text": 2}
    assert report.faces_not_detected == 3
    assert report.reasons == {
        "face/too_small": 1,
        "sample/no_usable_modality": 2,
        "text/empty": 2,
        "voice/empty": 1,
        "voice/no_rate": 1,
        "voice/non_finite": 1,
    }
    metrics = report.metrics()
    assert metrics["preprocess/unusable/voice"] == 3
    assert all(isinstance(value, int) for value in metrics.values())


def test_no_usable_sample_gives_empty_dataset() -> None:
    """When everything is dropped the dataset is empty but correctly shaped."""
    dataset, report = _make_preprocessor()([RawSample(label=0), RawSample(label=1, text="")])
    assert len(dataset) == 0
    assert dataset.tensors[0].shape == (0, 1, 48, 48)
    assert dataset.tensors[2].shape == (0, _LENGTH)
    assert report.dropped == 2


@pytest.mark.parametrize("label", [-1, 7, 2.0, True])
def test_bad_label_raises(label: object) -> None:
    """A label that is not a class id is a bug upstream: ValueError."""
    with pytest.raises(ValueError, match="label"):
        _make_preprocessor()([RawSample(label=label, text="hello")])  # type: ignore[arg-type]


def test_text_is_tokenised_like_the_text_preprocessor() -> None:
    """Batched tokenisation gives each present text the ids it gets alone."""
    preprocessor = _make_preprocessor()
    dataset, _ = preprocessor(
        [RawSample(label=0, text="hi"), RawSample(label=1), RawSample(label=2, text="oh no")]
    )
    alone_ids, _ = preprocessor.text(["oh no"])
    assert torch.equal(dataset.tensors[2][1], alone_ids[0])
