"""Voice branch: mono log-mel spectrogram (torchaudio) of a fixed-length clip, and a small CNN."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from torch import nn

from emofed.config import VoiceModelConfig
from models.blocks import ConvEncoder
from models.errors import UnusableInput

__all__ = ["VoiceCNN", "VoicePreprocessor", "load_audio"]

logger = logging.getLogger(__name__)

# Power floor of the log-mel, 1e-10 → -100 dB: digital silence maps to a fixed value
# rather than -inf, and nothing quieter than real recordings' noise floor is resolved.
POWER_FLOOR = 1e-10
# Fixed affine map of decibels to a roughly unit range: (dB - DB_OFFSET) / DB_SCALE takes
# [-100, +40] dB onto [-2, +2]. With n_fft=400 a full-scale sine peaks near +40 dB in its
# mel band, noise at -40 dBFS averages about -15 dB and the power floor is -100 dB. No
# per-utterance normalisation: loudness is evidence (anger is loud, sadness quiet) and
# must survive preprocessing.
DB_OFFSET = -30.0
DB_SCALE = 35.0
# At most this many channels are accepted in (frames, channels) input; a larger second
# axis almost always means a (channels, frames) array passed by mistake.
MAX_CHANNELS = 16
_INT_SCALES: dict[np.dtype, float] = {
    np.dtype(np.int16): 2.0**15,
    np.dtype(np.int32): 2.0**31,
}


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile.

    torchaudio 2.9+ decodes only through FFmpeg (torchcodec), which devices may lack;
    libsndfile (WAV, FLAC, OGG, MP3 in recent builds) ships inside the soundfile wheel.

    Parameters
    ----------
    path : str or Path
        Audio file to read.

    Returns
    -------
    waveform : np.ndarray
        float32 samples, (T,) for mono or (T, C) for multichannel files.
    sample_rate : int
        Sampling rate in Hz.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    UnusableInput
        If libsndfile cannot decode the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Audio file {path} not found.")
    try:
        waveform, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as error:
        raise UnusableInput(
            f"cannot decode audio file {path.name}: {error}", reason="undecodable"
        ) from error
    return waveform, int(sample_rate)


def _to_mono_float(waveform: object) -> np.ndarray:
    """Validate ``waveform`` and return it as a float32 mono (T,) array."""
    if not isinstance(waveform, np.ndarray):
        raise UnusableInput(
            f"waveform must be a numpy array, got {type(waveform).__name__}", reason="not_array"
        )
    if waveform.size == 0:
        raise UnusableInput(f"waveform is empty, shape {waveform.shape}", reason="empty")
    if waveform.ndim not in (1, 2) or (waveform.ndim == 2 and waveform.shape[1] > MAX_CHANNELS):
        raise UnusableInput(
            f"waveform must be (frames,) or (frames, channels<={MAX_CHANNELS}), "
            f"got {waveform.shape}",
            reason="bad_shape",
        )
    if waveform.dtype in _INT_SCALES:
        samples = waveform.astype(np.float32) / _INT_SCALES[waveform.dtype]
    elif np.issubdtype(waveform.dtype, np.floating):
        if not np.isfinite(waveform).all():
            raise UnusableInput("waveform has NaN or infinite samples", reason="non_finite")
        samples = waveform.astype(np.float32, copy=False)
    else:
        raise UnusableInput(
            f"waveform dtype must be float, int16 or int32, got {waveform.dtype}",
            reason="bad_dtype",
        )
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # (T,)
    return samples


class VoicePreprocessor:
    """Turn a waveform into a scaled log-mel spectrogram of a fixed-length clip.

    Mono mix, resampling to ``config.sample_rate``, a centre crop or zero padding to
    ``config.clip_seconds``, a torchaudio mel spectrogram in decibels, then the fixed
    affine map ``(dB - DB_OFFSET) / DB_SCALE``. Loudness is kept on purpose.

    Parameters
    ----------
    config : VoiceModelConfig
        Target rate, clip length and spectrogram settings.

    Raises
    ------
    ValueError
        If a rate, length or spectrogram size is not positive.
    """

    def __init__(self, config: VoiceModelConfig) -> None:
        for name in ("sample_rate", "clip_seconds", "n_mels", "n_fft", "hop_length"):
            value = getattr(config, name)
            if value <= 0:
                raise ValueError(f"voice.{name} must be > 0, found {value}.")
        self.config = config
        self.clip_samples = max(1, round(config.clip_seconds * config.sample_rate))
        # Shorter than one analysis window there is no spectral frame of real signal.
        self.min_samples = config.n_fft
        self._resamplers: dict[tuple[int, torch.dtype], torchaudio.transforms.Resample] = {}
        self._melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            power=2.0,
        )
        # top_db=None: a ceiling relative to each clip's maximum would be per-utterance
        # normalisation by another name.
        self._to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)
        self._to_db.amin = POWER_FLOOR

    @property
    def num_frames(self) -> int:
        """Number of spectrogram frames of one clip (centred STFT)."""
        return 1 + self.clip_samples // self.config.hop_length

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed clip, (1, n_mels, frames)."""
        return (1, self.config.n_mels, self.num_frames)

    def __call__(self, waveform: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Preprocess one recording.

        Parameters
        ----------
        waveform : np.ndarray
            float (nominally in [-1, 1]), int16 or int32 samples; mono (T,) or
            multichannel (T, C) as soundfile returns them.
        sample_rate : int
            Sampling rate of ``waveform`` in Hz.

        Returns
        -------
        torch.Tensor
            float32 (1, n_mels, frames). All-zero input is valid and gives the floor value
            ``(-100 - DB_OFFSET) / DB_SCALE`` everywhere.

        Raises
        ------
        UnusableInput
            If the waveform is not an array, is empty, has a bad shape or dtype or
            non-finite samples, the rate is not a positive integer, or the clip is shorter
            than one analysis window (``n_fft`` samples at the target rate).
        """
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
            raise UnusableInput(
                f"sample rate must be an integer, got {sample_rate!r}", reason="bad_rate"
            )
        if sample_rate <= 0:
            raise UnusableInput(f"sample rate must be > 0, got {sample_rate}", reason="bad_rate")
        samples = _to_mono_float(waveform)  # (T,)
        target_rate = self.config.sample_rate
        if len(samples) * target_rate < self.min_samples * sample_rate:
            raise UnusableInput(
                f"audio is {len(samples) / sample_rate * 1000:.1f} ms long, shorter than one "
                f"{self.min_samples / target_rate * 1000:.0f} ms analysis window",
                reason="too_short",
            )
        # Crop before resampling so that hour-long recordings cost a clip's worth of work;
        # one extra millisecond each side keeps the resampler's edges out of the clip.
        keep = math.ceil((self.config.clip_seconds + 0.002) * sample_rate)
        if len(samples) > keep:
            start = (len(samples) - keep) // 2
            samples = samples[start : start + keep]
        wave = torch.from_numpy(np.ascontiguousarray(samples))  # (T,)
        if sample_rate != target_rate:
            wave = self._resampler(int(sample_rate), wave.dtype)(wave)
        wave = self._fit_length(wave)  # (clip_samples,)
        with torch.no_grad():
            power = self._melspec(wave)  # (n_mels, frames)
            decibels = self._to_db(power)
        scaled = (decibels - DB_OFFSET) / DB_SCALE
        return scaled.unsqueeze(0).to(torch.float32)  # (1, n_mels, frames)

    def _resampler(self, rate: int, dtype: torch.dtype) -> torchaudio.transforms.Resample:
        # The windowed-sinc kernel depends only on the two rates; building it is most of a
        # resample's cost (hundreds of MB for awkward rates), so a device streaming windows
        # from one microphone builds it once.
        key = (rate, dtype)
        if key not in self._resamplers:
            self._resamplers[key] = torchaudio.transforms.Resample(rate, self.config.sample_rate, dtype=dtype)
        return self._resamplers[key]

    def _fit_length(self, wave: torch.Tensor) -> torch.Tensor:
        """Centre-crop or symmetrically zero-pad ``wave`` (T,) to ``clip_samples``."""
        excess = wave.shape[0] - self.clip_samples
        if excess > 0:
            start = excess // 2
            return wave[start : start + self.clip_samples]
        if excess < 0:
            left = -excess // 2
            return nn.functional.pad(wave, (left, -excess - left))
        return wave


class VoiceCNN(nn.Module):
    """Small GroupNorm CNN: (B, 1, n_mels, frames) log-mels → (B, embed_dim) embeddings.

    Parameters
    ----------
    config : VoiceModelConfig
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

    def __init__(self, config: VoiceModelConfig, embed_dim: int, dropout: float) -> None:
        super().__init__()
        # A stride-2 stem and three blocks take 64 mels × 101 frames to 4 × 7 (a quarter
        # of the cost of a full-resolution first block), pooled to a 3×3 grid that keeps
        # coarse frequency and time position (pitch band, syllable rhythm).
        self.body = ConvEncoder(
            width=config.width, blocks=3, embed_dim=embed_dim, dropout=dropout, stem_stride=2
        )

    def forward(self, voice: torch.Tensor) -> torch.Tensor:
        """Encode log-mels (B, 1, n_mels, frames) into (B, embed_dim)."""
        return self.body(voice)  # (B, E)
