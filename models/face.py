"""Face branch: OpenCV Haar-cascade crop to a grey square, and a small GroupNorm CNN."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from emofed.config import FaceModelConfig
from models.blocks import ConvEncoder
from models.errors import UnusableInput

__all__ = ["FaceCNN", "FacePreprocessor", "haar_cascade_path"]

logger = logging.getLogger(__name__)

# Smallest side accepted; below it there is nothing to crop or detect.
MIN_IMAGE_SIDE = 8
# Extra context around the detected box, per side, as a fraction of the box side: Haar
# boxes cut through the chin and brow, which carry expression.
FACE_MARGIN = 0.1
# Standard deviation floor (in [0, 1] grey units) for per-image standardisation, so a
# flat image gives zeros instead of amplified sensor noise or a division by zero.
STD_FLOOR = 0.02
# Haar detector settings: OpenCV's default pyramid step, and 5 neighbours (default 3),
# which trades a little recall for fewer false positives on cluttered frames.
_SCALE_FACTOR = 1.1
_MIN_NEIGHBORS = 5
# Frames are searched downscaled to at most this side: detection cost grows with the pixel
# count, and in a 1080p frame a face only needs ~3 × min_face_size pixels to be found.
DETECT_MAX_SIDE = 640


def haar_cascade_path() -> Path:
    """Return the path of OpenCV's bundled frontal-face Haar cascade."""
    return Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


@functools.lru_cache(maxsize=4)
def _load_cascade(path: str) -> cv2.CascadeClassifier:
    # Parsing the XML takes tens of milliseconds; every preprocessor shares one copy.
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Haar cascade {path} not found; opencv-python-headless 4.x ships it "
            "(OpenCV 5 dropped the bundled cascades)."
        )
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load the Haar cascade {path}.")
    return cascade


def _to_grey_uint8(image: object) -> np.ndarray:
    """Validate ``image`` and return it as a contiguous (H, W) uint8 grey array."""
    if not isinstance(image, np.ndarray):
        raise UnusableInput(
            f"face image must be a numpy array, got {type(image).__name__}", reason="not_array"
        )
    if image.size == 0:
        raise UnusableInput(f"face image is empty, shape {image.shape}", reason="empty")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise UnusableInput(
            f"face image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}",
            reason="bad_shape",
        )
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise UnusableInput(
            f"face image {image.shape[0]}x{image.shape[1]} is smaller than "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}",
            reason="too_small",
        )
    if image.dtype == np.uint8:
        pixels = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise UnusableInput("face image has NaN or infinite pixels", reason="non_finite")
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 1.0:
            raise UnusableInput(
                f"float face image must lie in [0, 1], found [{low:.3g}, {high:.3g}]",
                reason="out_of_range",
            )
        pixels = np.rint(image * 255.0).astype(np.uint8)
    else:
        raise UnusableInput(
            f"face image dtype must be uint8 or float in [0, 1], got {image.dtype}",
            reason="bad_dtype",
        )
    if pixels.ndim == 3:
        channels = pixels.shape[2]
        if channels == 1:
            pixels = pixels[:, :, 0]
        else:
            code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
            pixels = cv2.cvtColor(np.ascontiguousarray(pixels), code)
    return np.ascontiguousarray(pixels)


def _square_box(x: int, y: int, side: int, *, height: int, width: int) -> tuple[int, int, int, int]:
    """Clip a square (x, y, side) to the image, shifting before shrinking it."""
    side = min(side, height, width)
    x = min(max(x, 0), width - side)
    y = min(max(y, 0), height - side)
    return x, y, x + side, y + side


class FacePreprocessor:
    """Turn a camera frame into a standardised grey face crop.

    The largest face found by OpenCV's frontal-face Haar cascade is cropped with a small
    margin; when none is found the centre square is used instead, and the call says so,
    so that callers can count how often detection failed.

    Parameters
    ----------
    config : FaceModelConfig
        ``image_size`` (output side) and ``min_face_size`` (detector minimum, pixels).

    Raises
    ------
    ValueError
        If ``image_size`` or ``min_face_size`` is not positive.
    FileNotFoundError
        If OpenCV's bundled cascade file is missing.
    """

    def __init__(self, config: FaceModelConfig) -> None:
        if config.image_size < 1:
            raise ValueError(f"face.image_size must be >= 1, found {config.image_size}.")
        if config.min_face_size < 1:
            raise ValueError(f"face.min_face_size must be >= 1, found {config.min_face_size}.")
        self.config = config
        self._cascade = _load_cascade(str(haar_cascade_path()))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed face, (1, S, S)."""
        return (1, self.config.image_size, self.config.image_size)

    def detect(self, grey: np.ndarray) -> tuple[int, int, int, int] | None:
        """Return the largest face box (x, y, w, h) in a uint8 grey image, or None."""
        scale = min(1.0, DETECT_MAX_SIDE / max(grey.shape))
        small = grey
        if scale < 1.0:
            size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
            small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        min_side = max(1, round(self.config.min_face_size * scale))
        faces = self._cascade.detectMultiScale(
            small,
            scaleFactor=_SCALE_FACTOR,
            minNeighbors=_MIN_NEIGHBORS,
            minSize=(min_side, min_side),
        )
        if len(faces) == 0:
            # Histogram equalisation rescues badly exposed frames but hurts well-exposed
            # ones dominated by a flat background, so it is only the second attempt.
            faces = self._cascade.detectMultiScale(
                cv2.equalizeHist(small),
                scaleFactor=_SCALE_FACTOR,
                minNeighbors=_MIN_NEIGHBORS,
                minSize=(min_side, min_side),
            )
        if len(faces) == 0:
            return None
        largest = max(faces, key=lambda box: int(box[2]) * int(box[3]))
        x, y, w, h = (round(int(value) / scale) for value in largest)
        return x, y, w, h

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, bool]:
        """Crop, resize and standardise one image.

        Parameters
        ----------
        image : np.ndarray
            uint8 (or float in [0, 1]) grey (H, W) or (H, W, 1), BGR (H, W, 3) or BGRA
            (H, W, 4), as OpenCV reads frames.

        Returns
        -------
        face : torch.Tensor
            float32 (1, S, S), zero mean and unit variance per image (see ``STD_FLOOR``).
        found : bool
            True if a face was detected; False if the centre crop was used.

        Raises
        ------
        UnusableInput
            If the image is not an array, is empty, has the wrong shape or dtype, has
            non-finite or out-of-range values, or is smaller than ``MIN_IMAGE_SIDE``.
        """
        grey = _to_grey_uint8(image)  # (H, W)
        height, width = grey.shape
        box = self.detect(grey)
        if box is None:
            side = min(height, width)
            x0, y0, x1, y1 = _square_box(
                (width - side) // 2, (height - side) // 2, side, height=height, width=width
            )
        else:
            x, y, w, h = box
            side = round(max(w, h) * (1.0 + 2.0 * FACE_MARGIN))
            x0, y0, x1, y1 = _square_box(
                x + w // 2 - side // 2, y + h // 2 - side // 2, side, height=height, width=width
            )
        crop = grey[y0:y1, x0:x1]
        size = self.config.image_size
        # INTER_AREA averages when shrinking (no aliasing); it degrades to bilinear-like
        # behaviour when enlarging, which is fine for the rare tiny crop.
        resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        pixels = resized.astype(np.float32) / 255.0  # (S, S) in [0, 1]
        # Per-image standardisation: exposure and camera response differ from device to
        # device, while expression lives in the face's shape and contrast.
        pixels = (pixels - pixels.mean()) / max(float(pixels.std()), STD_FLOOR)
        return torch.from_numpy(pixels).unsqueeze(0), box is not None  # (1, S, S)


class FaceCNN(nn.Module):
    """Small GroupNorm CNN: (B, 1, S, S) face crops → (B, embed_dim) embeddings.

    Parameters
    ----------
    config : FaceModelConfig
        ``width`` is the channel count of the first of three blocks.
    embed_dim : int
        Size of the output embedding.
    dropout : float
        Dropout probability before the projection.

    Raises
    ------
    ValueError
        If a size is not positive or ``dropout`` is outside [0, 1).
    """

    def __init__(self, config: FaceModelConfig, embed_dim: int, dropout: float) -> None:
        super().__init__()
        # Three blocks take 48×48 to 6×6, pooled to a 3×3 grid (where a cue sits matters).
        self.body = ConvEncoder(width=config.width, blocks=3, embed_dim=embed_dim, dropout=dropout)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """Encode faces (B, 1, S, S) into (B, embed_dim)."""
        return self.body(face)  # (B, E)
