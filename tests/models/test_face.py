"""Tests of the face branch: OpenCV crop and standardisation, and the CNN."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from emofed.config import FaceModelConfig
from models.errors import UnusableInput
from models.face import FaceCNN, FacePreprocessor, haar_cascade_path

_BACKGROUND = 90


def _make_face(size: int = 160) -> np.ndarray:
    """Draw a frontal cartoon face (uint8 grey) that the Haar cascade detects."""
    image = np.full((size, size), _BACKGROUND, np.uint8)
    c = size // 2
    cv2.ellipse(image, (c, c), (int(size * 0.3), int(size * 0.4)), 0, 0, 360, 200, -1)
    eye_dx, eye_y = int(size * 0.12), int(size * 0.42)
    brow = int(size * 0.07)
    for side in (-1, 1):
        x = c + side * eye_dx
        cv2.ellipse(image, (x, eye_y), (int(size * 0.06), int(size * 0.03)), 0, 0, 360, 40, -1)
        cv2.line(image, (x - brow, eye_y - brow), (x + brow, eye_y - brow), 60, size // 50)
    cv2.line(image, (c, int(size * 0.45)), (c, int(size * 0.58)), 150, size // 60)
    cv2.ellipse(
        image, (c, int(size * 0.68)), (int(size * 0.1), int(size * 0.03)), 0, 0, 360, 70, -1
    )
    return cv2.GaussianBlur(image, (5, 5), 0)


def _make_scene() -> np.ndarray:
    """Place the face off-centre (top right) on a larger plain background."""
    scene = np.full((400, 480), _BACKGROUND, np.uint8)
    scene[20:180, 300:460] = _make_face(160)
    return scene


def _make_preprocessor(image_size: int = 48) -> FacePreprocessor:
    return FacePreprocessor(FaceModelConfig(image_size=image_size))


def test_cascade_file_is_bundled() -> None:
    """OpenCV ships the frontal-face cascade that the preprocessor loads."""
    assert haar_cascade_path().is_file()


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda g: g, id="grey"),
        pytest.param(lambda g: g[:, :, None], id="grey-channel"),
        pytest.param(lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2BGR), id="bgr"),
        pytest.param(lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2BGRA), id="bgra"),
        pytest.param(lambda g: g.astype(np.float32) / 255.0, id="float"),
    ],
)
def test_detected_face_gives_standardised_crop(convert) -> None:
    """Every accepted layout yields a found face, (1, 48, 48) float32, mean 0 and std 1."""
    face, found = _make_preprocessor()(convert(_make_scene()))
    assert found
    assert face.shape == (1, 48, 48)
    assert face.dtype == torch.float32
    assert abs(float(face.mean())) < 1e-4
    assert float(face.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_crop_follows_the_face() -> None:
    """The off-centre face is cropped like the face alone, not like the centre square."""
    preprocess = _make_preprocessor()
    in_scene, _ = preprocess(_make_scene())
    alone, _ = preprocess(_make_face(160))
    centre = cv2.resize(_make_scene()[:, 40:440], (48, 48), interpolation=cv2.INTER_AREA)

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])

    assert correlation(in_scene, alone) > 0.8
    assert correlation(in_scene, centre) < 0.5


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.full((100, 100), 128, np.uint8), id="blank"),
        pytest.param(np.random.default_rng(0).integers(0, 256, (90, 150), np.uint8), id="noise"),
    ],
)
def test_no_face_falls_back_to_centre_crop(image: np.ndarray) -> None:
    """Without a face the centre square is used, found=False, and the output is finite."""
    face, found = _make_preprocessor(32)(image)
    assert not found
    assert face.shape == (1, 32, 32)
    assert torch.isfinite(face).all()


def test_flat_image_standardises_to_zeros() -> None:
    """A constant image gives zeros rather than a division by zero."""
    face, _ = _make_preprocessor()(np.full((64, 64), 200, np.uint8))
    assert torch.count_nonzero(face) == 0


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.zeros((0, 0), np.uint8), id="empty"),
        pytest.param(np.zeros(100, np.uint8), id="1d"),
        pytest.param(np.zeros((64, 64, 2), np.uint8), id="two-channels"),
        pytest.param(np.zeros((2, 64, 64, 3), np.uint8), id="4d"),
        pytest.param(np.full((64, 64), np.nan, np.float32), id="nan"),
        pytest.param(np.full((64, 64), 2.0, np.float32), id="float-out-of-range"),
        pytest.param(np.zeros((64, 64), np.int16), id="int16"),
        pytest.param(np.zeros((4, 64), np.uint8), id="too-small"),
        pytest.param([[0] * 64] * 64, id="list"),
    ],
)
def test_invalid_images_raise_unusable_input(image: object) -> None:
    """Unusable images raise UnusableInput (a ValueError) with a stable reason code."""
    with pytest.raises(UnusableInput) as caught:
        _make_preprocessor()(image)
    assert isinstance(caught.value, ValueError)
    assert caught.value.reason != "unusable"


def test_face_cnn_shape_and_no_batchnorm() -> None:
    """FaceCNN maps (B, 1, 48, 48) to (B, E) and uses no BatchNorm."""
    torch.manual_seed(0)
    cnn = FaceCNN(FaceModelConfig(), embed_dim=32, dropout=0.1)
    out = cnn(torch.randn(3, 1, 48, 48))
    assert out.shape == (3, 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in cnn.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in cnn.modules())


def test_face_in_hd_frame_is_found_and_cropped() -> None:
    """A face in a 1080p BGR frame is found (detection runs downscaled) and cropped on it."""
    frame = np.full((1080, 1920), _BACKGROUND, np.uint8)
    frame[100:500, 1300:1700] = _make_face(400)
    face, found = _make_preprocessor()(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    alone, _ = _make_preprocessor()(_make_face(400))
    assert found
    assert float(np.corrcoef(np.ravel(face), np.ravel(alone))[0, 1]) > 0.8
