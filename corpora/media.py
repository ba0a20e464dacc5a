"""Decode corpus media by content and write them in the federation folder's formats.

Audio of any rate, channel count and sample format that libsndfile reads becomes mono PCM
16-bit WAV at :data:`TARGET_RATE`; images of any size and colour become PNG; a video
contributes its middle frame as a PNG. Whatever cannot be used raises :class:`MediaSkip`
with a short reason for the import report, never anything else for a bad file.
"""

from __future__ import annotations

import functools
import io
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile

__all__ = [
    "MAX_IMAGE_SIDE",
    "TARGET_RATE",
    "MediaSkip",
    "read_limited",
    "resampling_rate",
    "write_image",
    "write_pixels",
    "write_video_frame",
    "write_voice",
]

# Rate of every written WAV; the voice preprocessor's default rate.
TARGET_RATE = 16_000
# Rates libsndfile reports for real recordings lie far inside this; outside it the header
# is corrupt (or the file is not audio) and resampling would blow up or be meaningless.
_MIN_RATE, _MAX_RATE = 1_000, 384_000
# Shorter clips carry no usable prosody and make an empty spectrogram.
MIN_AUDIO_SECONDS = 0.1
# Written images are downscaled to this longest side: the face preprocessor searches faces
# at 640 px at most (models.face.DETECT_MAX_SIDE), and a 720p video frame as PNG is ~1.5 MB.
MAX_IMAGE_SIDE = 640
# Smallest side kept; below it there is nothing to crop (models.face.MIN_IMAGE_SIDE).
MIN_IMAGE_SIDE = 8
# Largest resampling kernel (output phases x input taps) used as is; 11025 -> 16000 is
# 640 x 441.
_MAX_KERNEL_TAPS = 400_000
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
# Container libsndfile reports for each extension; a mismatch is counted, not an error.
_EXPECTED_FORMAT = {
    ".wav": ("WAV", "WAVEX", "RF64"),
    ".wave": ("WAV", "WAVEX", "RF64"),
    ".flac": ("FLAC",),
    ".ogg": ("OGG",),
    ".oga": ("OGG",),
    ".mp3": ("MP3",),
    ".aif": ("AIFF",),
    ".aiff": ("AIFF",),
}


class MediaSkip(Exception):
    """A media file cannot be used; ``reason`` is the short code counted in the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_limited(path: Path, max_bytes: int) -> bytes:
    """Read a whole file, refusing empty files and files over ``max_bytes``.

    Raises
    ------
    MediaSkip
        ``empty file``, ``file over size limit`` or ``unreadable file``.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            raise MediaSkip("empty file")
        if size > max_bytes:
            raise MediaSkip("file over size limit")
        return path.read_bytes()
    except OSError:
        raise MediaSkip("unreadable file") from None


@functools.cache
def _resample() -> Callable[..., Any]:
    """``torchaudio.functional.resample``, imported on first use.

    torchaudio pulls in torch (seconds); text and image corpora never need it.
    """
    import torchaudio.functional

    return torchaudio.functional.resample


def write_voice(path: Path, dest: Path, *, max_bytes: int, notes: Counter[str]) -> None:
    """Decode an audio file by content and write it as mono 16-bit WAV at 16 kHz.

    Raises
    ------
    MediaSkip
        If the file is empty, too large, undecodable, has an implausible rate, non-finite
        samples or is shorter than :data:`MIN_AUDIO_SECONDS`.
    """
    raw = read_limited(path, max_bytes)
    try:
        # From bytes, so libsndfile detects the container from the header, not the name.
        with soundfile.SoundFile(io.BytesIO(raw)) as handle:
            container, rate = handle.format, int(handle.samplerate)
            data = handle.read(dtype="float32", always_2d=True)  # (T, C)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError, EOFError, OSError, MemoryError):
        raise MediaSkip("undecodable audio") from None
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise MediaSkip("implausible sample rate")
    if data.shape[0] == 0:
        raise MediaSkip("no audio frames")
    expected = _EXPECTED_FORMAT.get(path.suffix.lower())
    if expected is not None and container not in expected:
        notes[f"voice: {path.suffix.lower()} file holding {container} data, decoded by content"] += 1
    if not np.isfinite(data).all():
        raise MediaSkip("non-finite audio samples")
    if data.shape[0] < MIN_AUDIO_SECONDS * rate:
        raise MediaSkip("audio shorter than 0.1 s")
    if data.shape[1] > 1:
        notes["voice: multichannel mixed to mono"] += 1
    mono = data.mean(axis=1)  # (T,)
    peak = float(np.abs(mono).max())
    if peak > 1.0:  # float WAV may exceed full scale; PCM 16 would clip it
        mono = mono / peak
        notes["voice: float audio above full scale normalised"] += 1
    if rate != TARGET_RATE:
        import torch

        notes[f"voice: resampled {rate} Hz -> {TARGET_RATE} Hz"] += 1
        source_rate = resampling_rate(rate)
        if source_rate != rate:
            notes[f"voice: {rate} Hz resampled as {source_rate} Hz (under 0.5 % pitch shift)"] += 1
        mono = _resample()(torch.from_numpy(np.ascontiguousarray(mono)), source_rate, TARGET_RATE).numpy()
        mono = np.clip(mono, -1.0, 1.0)  # band-limited resampling can overshoot a little
    soundfile.write(str(dest), mono, TARGET_RATE, subtype="PCM_16", format="WAV")


def resampling_rate(rate: int) -> int:
    """The rate to resample ``rate`` Hz audio from: ``rate`` itself, or a close round rate.

    torchaudio's sinc resampler builds a kernel of ``(new / g) x (orig / g)`` taps with
    ``g = gcd(orig, new)``: 22050 -> 16000 needs 320 x 441, but TESS's 24414 Hz needs
    8000 x 12207 (about 400 MB, seconds per file). Such rates are read as the nearest
    multiple of a round step that keeps the kernel small, within 0.5 % (under 9 cents of
    pitch, far below speaker variation).
    """
    if _kernel_taps(rate) <= _MAX_KERNEL_TAPS:
        return rate
    for step in (10, 20, 25, 50, 100, 200, 250, 500, 1000):
        candidate = round(rate / step) * step
        if candidate > 0 and abs(candidate - rate) <= 0.005 * rate and _kernel_taps(candidate) <= _MAX_KERNEL_TAPS:
            return candidate
    return rate


def _kernel_taps(rate: int) -> int:
    g = math.gcd(rate, TARGET_RATE)
    return (rate // g) * (TARGET_RATE // g)


def write_image(path: Path, dest: Path, *, max_bytes: int, notes: Counter[str]) -> None:
    """Decode an image file by content (any size, colour or grey) and write it as PNG.

    Raises
    ------
    MediaSkip
        If the file is empty, too large, undecodable or smaller than 8 px.
    """
    raw = read_limited(path, max_bytes)
    try:
        # imdecode on bytes: works for any path, and decides the format by content.
        image = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_ANYCOLOR)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise MediaSkip("undecodable image")
    _write_png(image, dest, notes)


def write_pixels(pixels: np.ndarray, dest: Path, *, notes: Counter[str]) -> None:
    """Write in-memory grey pixels (H, W) uint8 as PNG.

    Raises
    ------
    MediaSkip
        If the array is not a 2-D uint8 image of at least 8 px.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise MediaSkip("bad pixel array")
    _write_png(pixels, dest, notes)


def write_video_frame(path: Path, dest: Path, *, max_bytes: int, notes: Counter[str]) -> None:
    """Write the middle frame of a video file as PNG.

    Raises
    ------
    MediaSkip
        If the file is empty, too large, or OpenCV cannot decode a frame of it.
    """
    try:
        size = path.stat().st_size
    except OSError:
        raise MediaSkip("unreadable file") from None
    if size == 0:
        raise MediaSkip("empty file")
    if size > max_bytes:
        raise MediaSkip("file over size limit")
    if str(path).isascii():
        frame = _middle_frame(path)
    else:
        # VideoCapture takes a narrow-string path, which fails for non-ASCII names on
        # some platforms; a temporary ASCII-named copy always works.
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / f"clip{path.suffix.lower()}"
            shutil.copyfile(path, copy)
            frame = _middle_frame(copy)
    if frame is None:
        raise MediaSkip("undecodable video")
    _write_png(frame, dest, notes)


def _middle_frame(path: Path) -> np.ndarray | None:
    """The middle frame of a video, or None if none can be decoded."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if count > 0:
            capture.set(cv2.CAP_PROP_POS_FRAMES, count // 2)
            ok, frame = capture.read()
            if ok and frame is not None and frame.size:
                return frame
    finally:
        capture.release()
    # No frame count or the seek failed (some FLV and variable-rate files): count frames by
    # grabbing without decoding, then decode only the middle one.
    capture = cv2.VideoCapture(str(path))
    try:
        count = 0
        while capture.grab():
            count += 1
        if count == 0:
            return None
        capture.release()
        capture = cv2.VideoCapture(str(path))
        for _ in range(count // 2):
            capture.grab()
        ok, frame = capture.read()
        return frame if ok and frame is not None and frame.size else None
    finally:
        capture.release()


def _write_png(image: np.ndarray, dest: Path, notes: Counter[str]) -> None:
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise MediaSkip("image smaller than 8 px")
    if max(height, width) > MAX_IMAGE_SIDE:
        scale = MAX_IMAGE_SIDE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        notes[f"face: downscaled to at most {MAX_IMAGE_SIDE} px"] += 1
    ok, encoded = cv2.imencode(".png", image, _PNG_PARAMS)
    if not ok:
        raise MediaSkip("image not encodable as PNG")
    dest.write_bytes(encoded.tobytes())
