"""Voice cues and source-filter speech synthesis for the synthetic federation."""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter

from simulations.identity import UserIdentity

_VOICE_CUE_NAMES = (
    "f0_shift_st", "f0_var_st", "f0_slope_st", "loud_db", "rate_hz",
    "jitter", "tremor", "harsh", "breath", "formant",
)  # fmt: skip
# Rows follow EMOTIONS. formant: relative formant shift (smiling shortens the vocal tract).
_VOICE_CUES = np.array(
    [
        [0.0, 1.0, -1.0, 0.0, 3.6, 0.004, 0.0, 0.0, 0.0, 0.0],  # neutral
        [4.0, 3.0, -0.5, 3.0, 4.4, 0.004, 0.0, 0.4, 0.0, 0.06],  # happy
        [-3.0, 0.3, -2.0, -9.0, 2.4, 0.006, 0.2, -1.0, 0.6, -0.02],  # sad
        [2.0, 2.8, -2.0, 9.0, 5.0, 0.010, 0.0, 1.5, 0.0, 0.0],  # angry
        [5.0, 1.5, 0.5, -2.0, 5.6, 0.030, 1.0, 0.0, 0.8, 0.02],  # fearful
        [-2.0, 1.8, -3.0, -1.0, 2.9, 0.010, 0.0, 0.6, 0.4, -0.04],  # disgusted
        [5.5, 2.0, 6.0, 4.0, 3.8, 0.004, 0.0, 0.3, 0.1, 0.04],  # surprised
    ]
)
_VOICE_CUE_NOISE = np.array([1.5, 0.6, 1.5, 2.5, 0.6, 0.004, 0.2, 0.3, 0.15, 0.02])
# F1-F3 (Hz) of the vowels in "father, beet, boot, bet, bought, bat": men's averages of
# Peterson & Barney (1952), "Control methods used in a study of the vowels", JASA 24(2).
_VOWELS = np.array(
    [
        [730, 1090, 2440],
        [270, 2290, 3010],
        [300, 870, 2240],
        [530, 1840, 2480],
        [570, 840, 2410],
        [660, 1720, 2410],
    ],
    dtype=np.float64,
)
_FORMANT_BW = np.array([90.0, 110.0, 170.0])


def voice_cues(
    ident: UserIdentity, label: int, intensity: float, rng: np.random.Generator
) -> np.ndarray:
    """Prosody parameters of one utterance, shape ``(10,)`` in the order of the cue names."""
    strength = intensity * ident.expressiveness
    base = _VOICE_CUES[0]
    cues = base + strength * (_VOICE_CUES[label] - base) + rng.normal(0, _VOICE_CUE_NOISE)
    cues[5:7] = np.maximum(cues[5:7], 0.0)  # jitter, tremor
    cues[8] = max(cues[8], 0.0)  # breath
    return cues


def _klatt_cascade(formants: np.ndarray, bandwidths: np.ndarray, sr: int) -> np.ndarray:
    """Denominator of cascaded unit-DC-gain formant resonators.

    Klatt (1980), "Software for a cascade/parallel formant synthesizer", JASA 67(3): each
    resonator is ``y[n] = A x[n] + B y[n-1] + C y[n-2]`` with ``C = -exp(-2 pi BW / fs)``,
    ``B = 2 exp(-pi BW / fs) cos(2 pi F / fs)`` and ``A = 1 - B - C``.
    """
    den = np.array([1.0])
    for f, b in zip(formants, bandwidths, strict=True):
        r = math.exp(-math.pi * b / sr)
        den = np.convolve(den, [1.0, -2 * r * math.cos(2 * math.pi * f / sr), r * r])
    return den


def render_voice(
    ident: UserIdentity, cues: np.ndarray, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """Synthesise a 1.0-1.3 s babbled utterance with a source-filter model.

    A glottal pulse train at the prosodic pitch contour, low-passed for spectral tilt and mixed
    with breath noise, is shaped into syllables and filtered by per-syllable vowel formants
    scaled to the speaker's vocal tract; background noise and a random gain follow.

    Parameters
    ----------
    ident : UserIdentity
        Who speaks (base pitch, formant scale, tilt, breathiness, rate, level).
    cues : np.ndarray
        Prosody from :func:`voice_cues`, shape ``(10,)``.
    rng : np.random.Generator
        Source of the utterance's randomness.
    sample_rate : int
        Output rate in Hz.

    Returns
    -------
    np.ndarray
        float32 mono waveform in ``[-1, 1]``.
    """
    shift, var, slope, loud, rate, jitter, tremor, harsh, breath, formant = (float(c) for c in cues)
    sr = sample_rate
    dur = rng.uniform(1.0, 1.3)
    n = int(dur * sr)
    t = np.arange(n) / sr

    # Syllable slots: onset, voiced length and a stress accent each.
    rate = max(rate * ident.rate, 1.5)
    bounds = [rng.uniform(0.02, 0.15)]
    while bounds[-1] < dur:
        bounds.append(bounds[-1] + rng.uniform(0.7, 1.3) / rate)
    env = np.zeros(n)
    segments = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        i0, i1 = int(a * sr), min(int(b * sr), n)
        voiced = int((i1 - i0) * rng.uniform(0.55, 0.8))
        if voiced < 8:
            continue
        win = np.sin(np.linspace(0, np.pi, voiced)) ** 0.6
        env[i0 : i0 + voiced] = win * rng.uniform(0.6, 1.0)
        segments.append((i0, i1))

    # Pitch contour in semitones around the speaker's base pitch.
    centres = np.asarray(bounds)
    accents = rng.normal(0, max(var, 0.05), len(centres))
    contour = shift + slope * (t / dur - 0.5) + np.interp(t, centres, accents)
    contour += 0.8 * tremor * np.sin(2 * np.pi * rng.uniform(5, 8) * t + rng.uniform(0, 2 * np.pi))
    f0 = ident.f0 * 2.0 ** (contour / 12)
    block = max(1, int(0.004 * sr))  # jitter: period-to-period pitch perturbation
    f0 *= 1 + jitter * np.repeat(rng.normal(size=n // block + 1), block)[:n]
    f0 = np.clip(f0, 50, 0.2 * sr)
    phase = np.cumsum(f0) / sr
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    a = float(np.clip(ident.tilt - 0.12 * harsh, 0.6, 0.985))
    source = lfilter([1 - a], [1, -a], source)
    # Lip radiation: a first difference (+6 dB/octave), as in Klatt's (1980) synthesizer.
    source = lfilter([1.0, -0.9], [1.0], source)
    source = source / (np.std(source) + 1e-9)
    source += (ident.breath + 0.15 * breath) * 3 * rng.normal(size=n)
    source *= env

    speech = np.zeros(n)
    nyquist_cap = 0.45 * sr
    for i0, i1 in segments:
        vowel = _VOWELS[rng.integers(len(_VOWELS))]
        scale = ident.tract * (1 + formant) * rng.uniform(0.96, 1.04)
        formants = np.minimum(vowel * scale, nyquist_cap)
        den = _klatt_cascade(formants, _FORMANT_BW, sr)
        speech[i0:i1] = lfilter([den.sum()], den, source[i0:i1])
    speech /= np.sqrt(np.mean(speech**2)) + 1e-9

    # Levels in dB re full scale; background noise is set against a fixed reference, so louder
    # speech also reads as a higher signal-to-noise ratio.
    level = -27.0 + loud + ident.loudness_db
    snr = rng.uniform(15, 40)
    noise = rng.normal(size=n)
    c = rng.uniform(0.0, 0.95)
    noise = lfilter([1 - c], [1, -c], noise)
    noise /= np.std(noise) + 1e-9
    wave = speech * 10 ** (level / 20) + noise * 10 ** ((-27.0 - snr) / 20)
    wave *= 10 ** (rng.uniform(-4, 4) / 20)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
