"""Tests of the voice branch: audio loading, log-mel preprocessing, and the CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from emofed.config import VoiceModelConfig
from models.errors import UnusableInput
from models.voice import DB_OFFSET, DB_SCALE, POWER_FLOOR, VoiceCNN, VoicePreprocessor, load_audio


def _make_tone(
    rate: int,
    *,
    seconds: float = 1.0,
    frequency: float = 440.0,
    amplitude: float = 0.3,
    channels: int = 0,
    dtype: type = np.float32,
    seed: int = 0,
) -> np.ndarray:
    """A sine plus faint noise; (T,) if channels == 0 else (T, channels); float or int."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    wave = amplitude * np.sin(2 * np.pi * frequency * t) + 1e-3 * rng.standard_normal(t.size)
    if channels:
        wave = np.repeat(wave[:, None], channels, axis=1)
    if np.issubdtype(dtype, np.integer):
        return np.round(wave * np.iinfo(dtype).max).astype(dtype)
    return wave.astype(dtype)


def _make_preprocessor(**overrides: object) -> VoicePreprocessor:
    return VoicePreprocessor(VoiceModelConfig(**overrides))


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 48000])
@pytest.mark.parametrize("channels", [0, 2])
def test_output_shape_for_rates_and_layouts(rate: int, channels: int) -> None:
    """Mono or stereo int16 at any rate gives (1, 64, 101) finite float32 for 1 s at 16 kHz."""
    mel = _make_preprocessor()(_make_tone(rate, channels=channels, dtype=np.int16), rate)
    assert mel.shape == (1, 64, 101)
    assert mel.dtype == torch.float32
    assert torch.isfinite(mel).all()


def test_int_and_float_inputs_agree() -> None:
    """int16, int32 and float versions of one signal give (nearly) one spectrogram."""
    preprocess = _make_preprocessor()
    reference = preprocess(_make_tone(16000), 16000)
    for dtype in (np.int16, np.int32, np.float64):
        mel = preprocess(_make_tone(16000, dtype=dtype), 16000)
        # int16 quantisation noise sits ~96 dB down; compare where the signal is.
        loud = reference > 0
        assert torch.allclose(mel[loud], reference[loud], atol=0.02), dtype


def test_louder_input_has_larger_mean_log_mel() -> None:
    """Loudness survives preprocessing: 10x the amplitude adds 20 dB to every mel bin."""
    preprocess = _make_preprocessor()
    wave = _make_tone(16000, amplitude=0.3)
    loud = preprocess(wave, 16000)
    quiet = preprocess(wave * np.float32(0.1), 16000)
    assert float(loud.mean()) > float(quiet.mean())
    gain_db = (loud - quiet) * DB_SCALE
    assert torch.allclose(gain_db, torch.full_like(gain_db, 20.0), atol=0.05)


def test_silence_is_valid_and_maps_to_the_floor() -> None:
    """All-zero audio is allowed and gives the fixed floor value everywhere."""
    mel = _make_preprocessor()(np.zeros(16000, np.float32), 16000)
    floor = (10 * np.log10(POWER_FLOOR) - DB_OFFSET) / DB_SCALE
    assert torch.allclose(mel, torch.full_like(mel, floor))


@pytest.mark.parametrize("rate", [8000, 22050, 48000])
def test_resampling_keeps_the_pitch(rate: int) -> None:
    """A 1 kHz tone peaks in the same mel band whatever its original rate."""
    preprocess = _make_preprocessor()
    reference = preprocess(_make_tone(16000, frequency=1000.0), 16000)
    mel = preprocess(_make_tone(rate, frequency=1000.0), rate)
    assert int(mel[0].mean(dim=1).argmax()) == int(reference[0].mean(dim=1).argmax())


def test_long_audio_is_centre_cropped() -> None:
    """Of silence-tone-silence (3 s), the 1 s centre crop keeps the tone."""
    tone = _make_tone(16000, seconds=1.0)
    wave = np.concatenate([np.zeros(16000, np.float32), tone, np.zeros(16000, np.float32)])
    preprocess = _make_preprocessor()
    cropped = preprocess(wave, 16000)
    reference = preprocess(tone, 16000)
    # Only the STFT frames at the clip edges may differ.
    assert torch.allclose(cropped[..., 2:-2], reference[..., 2:-2], atol=1e-3)


def test_short_audio_is_zero_padded() -> None:
    """Half a second is padded symmetrically: edge frames sit at the silence floor."""
    mel = _make_preprocessor()(_make_tone(16000, seconds=0.5), 16000)
    floor = (10 * np.log10(POWER_FLOOR) - DB_OFFSET) / DB_SCALE
    assert mel.shape == (1, 64, 101)
    assert torch.allclose(mel[..., :10], torch.full_like(mel[..., :10], floor))
    assert float(mel[..., 45:55].mean()) > floor + 1.0


@pytest.mark.parametrize(
    ("waveform", "rate", "reason"),
    [
        pytest.param(np.zeros(0, np.float32), 16000, "empty", id="empty"),
        pytest.param(np.full(16000, np.nan, np.float32), 16000, "non_finite", id="nan"),
        pytest.param(np.full(16000, np.inf, np.float32), 16000, "non_finite", id="inf"),
        pytest.param(np.zeros(100, np.float32), 16000, "too_short", id="too-short"),
        pytest.param(np.zeros(16000, np.uint8), 16000, "bad_dtype", id="uint8"),
        pytest.param(np.zeros((16000, 2, 1), np.float32), 16000, "bad_shape", id="3d"),
        pytest.param(np.zeros((2, 16000), np.float32), 16000, "bad_shape", id="channels-first"),
        pytest.param(np.zeros(16000, np.float32), 0, "bad_rate", id="zero-rate"),
        pytest.param(np.zeros(16000, np.float32), 16000.0, "bad_rate", id="float-rate"),
        pytest.param([0.0] * 16000, 16000, "not_array", id="list"),
    ],
)
def test_unusable_audio_raises(waveform: object, rate: object, reason: str) -> None:
    """Empty, non-finite, too-short or malformed audio raises UnusableInput with its reason."""
    with pytest.raises(UnusableInput) as caught:
        _make_preprocessor()(waveform, rate)
    assert caught.value.reason == reason


def test_load_audio_round_trip(tmp_path: Path) -> None:
    """A stereo 16-bit WAV written with soundfile reads back as float32 (T, 2) and its rate."""
    wave = _make_tone(22050, seconds=0.25, channels=2, dtype=np.int16)
    path = tmp_path / "clip.wav"
    soundfile.write(path, wave, 22050, subtype="PCM_16")
    loaded, rate = load_audio(path)
    assert rate == 22050
    assert loaded.shape == wave.shape
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, wave / 32768.0, atol=1e-6)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00not really a wave file" * 10])
def test_load_audio_undecodable_raises(tmp_path: Path, content: bytes) -> None:
    """Empty or corrupt files raise UnusableInput."""
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(UnusableInput):
        load_audio(path)


def test_load_audio_missing_file_raises(tmp_path: Path) -> None:
    """A missing file is a FileNotFoundError, not unusable data."""
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "absent.wav")


def test_voice_cnn_shape() -> None:
    """VoiceCNN maps (B, 1, 64, 101) to (B, E)."""
    torch.manual_seed(0)
    cnn = VoiceCNN(VoiceModelConfig(), embed_dim=24, dropout=0.0)
    assert cnn(torch.randn(2, 1, 64, 101)).shape == (2, 24)
