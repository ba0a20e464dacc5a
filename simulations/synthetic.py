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

import cv2
import numpy as np
from scipy.signal import lfilter

from emofed.config import DataConfig
from models.labels import EMOTIONS
from models.preprocess import RawSample
from simulations.partition import PARTITIONERS, partition_dirichlet

logger = logging.getLogger(__name__)

FACE_SIZE = 96  # rendered face images are (96, 96, 3) uint8 BGR
NUM_CLASSES = len(EMOTIONS)

# Independent random streams, so that e.g. drawing a face never shifts the voice's noise.
_META, _USER, _SAMPLE, _FACE, _VOICE, _TEXT = range(6)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class UserIdentity:
    """What makes one synthetic person recognisable across their samples."""

    user: int
    expressiveness: float  # multiplies every emotion cue; personalisation can learn it
    # face (pixel units at FACE_SIZE)
    face_w: float
    face_h: float
    eye_dx: float
    eye_w: float
    eye_h: float
    nose_len: float
    mouth_w: float
    brow_thick: int
    head_dx: float
    head_dy: float
    head_scale: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: int  # 0 short, 1 long, 2 none
    background: tuple[float, float, float]
    resting_face: tuple[float, ...]  # a resting expression added to every face cue vector
    # voice
    f0: float  # Hz
    tract: float  # formant scale; shorter vocal tracts (children) have higher formants
    tilt: float  # one-pole glottal low-pass coefficient; higher is darker
    breath: float
    rate: float  # syllable-rate factor
    loudness_db: float
    # text
    lowercase: bool
    formal: bool
    exclaim: float
    ellipsis: float
    filler_rate: float
    fillers: tuple[str, ...]
    typo_rate: float
    verbosity: float


# Share of clear (rather than faint) expressions in each modality.
_P_CLEAR = 0.6

_FILLERS = ("honestly", "lol", "tbh", "like", "ngl", "idk", "omg", "literally", "haha", "so yeah")


def make_identity(seed: int, user: int) -> UserIdentity:
    """Draw the identity of ``user`` in the federation with ``seed``.

    Parameters
    ----------
    seed : int
        Federation seed.
    user : int
        User id.

    Returns
    -------
    UserIdentity
        Deterministic in ``(seed, user)``.
    """
    r = _rng(seed, _USER, user)
    tone = r.uniform(0.3, 0.95)
    hair = r.uniform(15, 110) * np.array([0.8, 0.9, 1.0]) * r.uniform(0.8, 1.2, 3)
    kind = r.choice(3, p=[0.45, 0.45, 0.10])  # male, female, child voice
    f0 = (r.uniform(90, 145), r.uniform(165, 245), r.uniform(240, 320))[kind]
    tract = (r.uniform(0.88, 1.0), r.uniform(1.04, 1.15), r.uniform(1.18, 1.32))[kind]
    style_k = int(r.integers(2, 5))
    return UserIdentity(
        user=int(user),
        expressiveness=float(r.uniform(0.7, 1.3)),
        face_w=float(r.uniform(24, 31)),
        face_h=float(r.uniform(32, 39)),
        eye_dx=float(r.uniform(9.5, 12.5)),
        eye_w=float(r.uniform(4.3, 5.6)),
        eye_h=float(r.uniform(2.2, 3.0)),
        nose_len=float(r.uniform(9, 14)),
        mouth_w=float(r.uniform(7, 10.5)),
        brow_thick=int(r.integers(2, 4)),
        head_dx=float(r.uniform(-4, 4)),
        head_dy=float(r.uniform(-3, 4)),
        head_scale=float(r.uniform(0.88, 1.06)),
        skin=tuple(float(v) for v in np.array([150, 175, 215]) * tone + [20, 25, 30]),
        hair=tuple(float(v) for v in hair),
        hair_style=int(r.choice(3, p=[0.5, 0.35, 0.15])),
        background=tuple(float(v) for v in r.uniform(30, 230, 3)),
        resting_face=tuple(float(v) for v in r.normal(0, 0.15, len(_FACE_CUE_NAMES))),
        f0=float(f0),
        tract=float(tract),
        tilt=float(r.uniform(0.88, 0.95)),
        breath=float(r.uniform(0.01, 0.06)),
        rate=float(r.uniform(0.85, 1.15)),
        loudness_db=float(r.uniform(-3, 3)),
        lowercase=bool(r.random() < 0.5),
        formal=bool(r.random() < 0.25),
        exclaim=float(r.uniform(0.0, 0.6)),
        ellipsis=float(r.uniform(0.0, 0.25)),
        filler_rate=float(r.uniform(0.0, 0.5)),
        fillers=tuple(str(f) for f in r.choice(_FILLERS, size=style_k, replace=False)),
        typo_rate=float(r.uniform(0.0, 0.06)),
        verbosity=float(r.uniform(0.15, 0.75)),
    )


def _intensities(seed: int, index: int) -> np.ndarray:
    """Per-modality expression strength of one sample: (face, voice, text), each in [0.02, 1].

    Most expressions are clear (0.65-1) and the rest faint (0-0.35), as in a mix of posed
    and spontaneous data: clear samples teach the cues, faint ones keep the task hard. Each
    modality draws its own strength, so one modality is often clear where another is faint,
    which is what lets fusion help; a small shared part correlates them as in real life.
    """
    r = _rng(seed, _SAMPLE, index)
    shared = r.uniform(0.0, 1.0)
    clear = r.random(3) < _P_CLEAR
    own = np.where(clear, r.uniform(0.65, 1.0, 3), r.uniform(0.0, 0.35, 3))
    return np.clip(0.15 * shared + 0.85 * own, 0.02, 1.0)


# --------------------------------------------------------------------------- face

_FACE_CUE_NAMES = ("curve", "open", "brow_slope", "brow_raise", "eye_open", "wrinkle", "width")
# Rows follow EMOTIONS; brow_slope > 0 lowers the inner ends (anger), < 0 raises them.
_FACE_CUES = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # neutral
        [1.0, 0.35, 0.0, 0.1, -0.25, 0.0, 0.5],  # happy
        [-0.7, -0.1, -0.7, 0.1, -0.3, 0.0, -0.2],  # sad
        [-0.35, -0.45, 1.0, -0.6, -0.35, 0.25, -0.3],  # angry
        [-0.35, 0.65, -0.7, 0.6, 0.85, 0.0, 0.35],  # fearful
        [-0.55, 0.15, 0.55, -0.35, -0.55, 1.0, -0.1],  # disgusted
        [0.05, 1.0, -0.1, 1.0, 1.0, 0.0, -0.1],  # surprised
    ]
)
_FACE_CUE_NOISE = 0.3
_SUB = 4  # cv2 fixed-point shift: coordinates in 1/16 pixel for smooth sub-pixel drawing


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * 16)), int(round(y * 16))


Colour = np.ndarray | tuple[float, float, float]


def _ellipse(
    img: np.ndarray, x: float, y: float, a: float, b: float, colour: Colour, half: bool = False
) -> None:
    """Filled anti-aliased ellipse at sub-pixel precision; ``half`` draws the lower half."""
    axes = (max(1, int(round(a * 16))), max(1, int(round(b * 16))))
    end = 180 if half else 360
    cv2.ellipse(img, _pt(x, y), axes, 0, 0, end, tuple(colour), -1, cv2.LINE_AA, _SUB)


def _line(
    img: np.ndarray, p: tuple[float, float], q: tuple[float, float], colour: Colour, width: int
) -> None:
    cv2.line(img, _pt(*p), _pt(*q), tuple(colour), width, cv2.LINE_AA, _SUB)


def _polygon(img: np.ndarray, points: np.ndarray, colour: Colour) -> None:
    cv2.fillPoly(img, [np.round(points * 16).astype(np.int32)], tuple(colour), cv2.LINE_AA, _SUB)


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 10) -> np.ndarray:
    """Quadratic Bezier from p0 to p2 that passes through p1 at its midpoint, (n, 2)."""
    ctrl = 2 * p1 - (p0 + p2) / 2
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p2


def face_cues(
    ident: UserIdentity, label: int, intensity: float, rng: np.random.Generator
) -> np.ndarray:
    """Expression parameters of one face, shape ``(7,)`` in the order of the cue names."""
    strength = intensity * ident.expressiveness
    noise = rng.normal(0, _FACE_CUE_NOISE, len(_FACE_CUE_NAMES))
    return np.asarray(ident.resting_face) + strength * _FACE_CUES[label] + noise


def render_face(ident: UserIdentity, cues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw a frontal cartoon face with the given expression and random nuisances.

    The shading (dark eye sockets and brows over a lighter face, a bright nose bridge) is
    what OpenCV's Haar frontal-face cascade keys on, so most renders are detected.

    Parameters
    ----------
    ident : UserIdentity
        Who is drawn.
    cues : np.ndarray
        Expression parameters from :func:`face_cues`, shape ``(7,)``.
    rng : np.random.Generator
        Source of the nuisances (pose, light, blur, noise).

    Returns
    -------
    np.ndarray
        ``(FACE_SIZE, FACE_SIZE, 3)`` uint8 BGR image.
    """
    curve, open_, slope, raise_, eye_open, wrinkle, width = (float(c) for c in cues)
    s = FACE_SIZE
    img = np.empty((s, s, 3), np.float32)  # (S, S, 3) BGR, drawn in float, quantised last
    img[:] = np.clip(np.asarray(ident.background) + rng.normal(0, 12, 3), 0, 255)
    sc = ident.head_scale * rng.uniform(0.96, 1.04)
    cx, cy = s / 2 + ident.head_dx, s / 2 + ident.head_dy
    fw, fh = ident.face_w * sc, ident.face_h * sc
    skin = np.asarray(ident.skin) * rng.uniform(0.95, 1.05)
    hair = np.asarray(ident.hair)

    if ident.hair_style == 1:  # long hair frames the face from behind
        _ellipse(img, cx, cy + 4, fw * 1.22, fh * 1.12, hair)
    if ident.hair_style != 2:
        _ellipse(img, cx, cy - 6 * sc, fw * 1.08, fh * 1.04, hair)
    _ellipse(img, cx, cy + 2 * sc, fw, fh, skin)

    # Eyes, sockets and brows.
    ey = cy - fh * 0.18
    ew = ident.eye_w * sc
    eh = float(np.clip(ident.eye_h * sc * (1 + 0.7 * eye_open), 0.5, 5.5))
    brow = 0.55 * hair if ident.hair_style != 2 else 0.35 * skin
    for side in (-1, 1):
        ex = cx + side * ident.eye_dx * sc
        _ellipse(img, ex, ey, ew + 2, eh + 1.8, skin * 0.62)
        _ellipse(img, ex, ey, ew, eh, (235, 235, 235))
        iris = min(2.3 * sc, ew * 0.5)
        _ellipse(img, ex, ey, iris, min(iris, eh), (35, 30, 30))
        base = ey - ident.eye_h * sc - 4.5 * sc - 4.5 * raise_
        inner = (ex - side * ew * 0.8, base + 4.0 * slope)
        outer = (ex + side * ew * 1.2, base - 1.5 * slope - 0.6)
        _line(img, inner, outer, brow, ident.brow_thick)

    # Nose, with a wrinkle across the bridge and flared nostrils for disgust.
    nose_top, nose_tip = ey + 2, ey + ident.nose_len * sc
    _line(img, (cx + 1.5, nose_top), (cx + 2.5, nose_tip), skin * 0.72, 2)
    _ellipse(img, cx, nose_tip + 1, 3.8 + 1.2 * max(wrinkle, 0.0), 2, skin * 0.55, half=True)
    if wrinkle > 0.2:
        shade = skin * (1 - 0.3 * min(wrinkle, 1.5))
        for k in range(3):
            y = nose_top + 1.5 + 1.6 * k
            _line(img, (cx - 3, y), (cx + 3, y + 0.3), shade, 1)

    # Mouth: upper and lower lip curves through the corners.
    my = cy + 2 * sc + fh * 0.5
    mw = ident.mouth_w * sc * (1 + 0.18 * width)
    lift = 5.0 * curve
    left, right = np.array([cx - mw, my - lift]), np.array([cx + mw, my - lift])
    gap = max(open_, 0.0) * 8.0
    lip = 1.6 if open_ > -0.3 else 0.7  # tight lips look thin
    up_mid = np.array([cx, my - 0.8 - 1.8 * max(wrinkle, 0.0) - lip * 0.5])
    lo_mid = np.array([cx, my + 0.8 + gap + 1.5 * max(curve, 0.0) + lip * 0.5])
    lips = np.vstack([_bezier(left, up_mid, right), _bezier(right, lo_mid, left)])
    _polygon(img, lips, (50, 40, 150))
    if gap > 1.2:
        inner_up = _bezier(left, up_mid + [0, lip], right)
        inner_lo = _bezier(right, lo_mid - [0, lip], left)
        _polygon(img, np.vstack([inner_up, inner_lo]), (30, 22, 40))

    # Nuisances: pose, lighting gradient, blur, sensor noise.
    angle = rng.normal(0, 4)
    shift = rng.normal(0, 1.5, 2)
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    m[:, 2] += shift
    img = cv2.warpAffine(img, m, (s, s), borderMode=cv2.BORDER_REPLICATE)
    theta = rng.uniform(0, 2 * np.pi)
    xs = (np.arange(s, dtype=np.float32) - s / 2) / s
    ramp = np.cos(theta) * xs[None, :] + np.sin(theta) * xs[:, None]  # (S, S)
    img *= (rng.uniform(0.8, 1.15) + rng.uniform(0, 0.6) * ramp)[..., None]
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.2))
    img += rng.normal(0, rng.uniform(2, 8), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- voice

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


# --------------------------------------------------------------------------- text

_ADJECTIVES = {
    "neutral": ("fine", "okay", "alright", "calm", "normal", "meh"),
    "happy": (
        "happy", "glad", "thrilled", "delighted", "cheerful", "excited", "grateful", "stoked",
    ),  # fmt: skip
    "sad": ("sad", "down", "miserable", "heartbroken", "lonely", "gloomy", "hopeless", "low"),
    "angry": ("angry", "furious", "mad", "annoyed", "livid", "irritated", "fed up", "enraged"),
    "fearful": (
        "scared", "afraid", "terrified", "nervous", "anxious", "worried", "panicked", "uneasy",
    ),  # fmt: skip
    "disgusted": ("disgusted", "grossed out", "sickened", "repulsed", "nauseous", "revolted"),
    "surprised": ("surprised", "shocked", "amazed", "stunned", "speechless", "astonished"),
}
_ADJ_TEMPLATES = (
    "i feel {a}", "i'm so {a}", "feeling {a} today", "kind of {a} right now",
    "really {a} about it", "i am {a}", "pretty {a} tbh", "still {a}",
)  # fmt: skip
_PHRASES = {
    "neutral": ("i'm fine i guess", "nothing much going on", "same as usual", "no big deal"),
    "happy": (
        "this made my day", "best news i've had all week", "we won the game", "can't stop smiling",
        "everything worked out perfectly", "i got the job", "what a lovely evening",
        "love spending time with them", "finally on vacation", "the party was amazing",
    ),
    "sad": (
        "i miss her so much", "nobody showed up", "i lost my dog today", "cried all night",
        "everything feels empty", "we broke up", "i wish things were different",
        "i feel like giving up", "the house is so quiet now",
    ),
    "angry": (
        "they lied to me again", "stop wasting my time", "this is completely unacceptable",
        "i'm sick of being ignored", "how dare they", "he cut me off in traffic",
        "they cancelled without telling me", "so done with this nonsense",
        "nobody ever listens to me",
    ),
    "fearful": (
        "i heard a noise downstairs", "what if something goes wrong", "my hands are shaking",
        "i don't want to go alone", "the test results come tomorrow", "someone is following me",
        "i can't breathe properly", "please let everyone be safe",
    ),
    "disgusted": (
        "that smell is horrible", "there was hair in my soup", "the bathroom was filthy",
        "that is so gross", "i almost threw up", "how can people eat that",
        "the fridge smells rotten", "what they did was vile",
    ),
    "surprised": (
        "i did not see that coming", "wait what just happened", "no way that's real",
        "they threw me a surprise party", "out of nowhere he proposed", "i never expected that",
        "who would have guessed", "the package arrived already",
    ),
}
# Negated cues read as the opposite emotion, which defeats bag-of-words shortcuts.
_NEGATIONS = {
    "neutral": ("not much to say", "nothing special"),
    "happy": ("not worried anymore", "no complaints at all", "couldn't be better"),
    "sad": ("not happy at all", "i'm not okay", "not feeling great", "nothing is going right"),
    "angry": ("not okay with this", "i won't accept this", "not putting up with this"),
    "fearful": ("i don't feel safe", "not sure i'll be okay"),
    "disgusted": ("not touching that", "can't stand the sight of it"),
    "surprised": ("never thought this would happen", "not what i expected at all"),
}
# Cues that several emotions share; each only narrows the candidates down.
_SHARED = (
    ("i can't believe it", ("surprised", "angry", "happy")),
    ("oh no", ("fearful", "sad", "surprised")),
    ("ugh", ("disgusted", "angry")),
    ("wow", ("surprised", "happy")),
    ("my heart is racing", ("fearful", "surprised", "happy")),
    ("i need a minute", ("angry", "sad", "fearful")),
    ("seriously", ("angry", "surprised", "disgusted")),
    ("what a day", ("happy", "sad", "angry", "neutral")),
    ("i didn't expect that", ("surprised", "fearful", "disgusted")),
    ("this is too much", ("angry", "fearful", "sad", "happy")),
    ("i can't stop thinking about it", ("fearful", "sad", "happy")),
    ("can't even look at it", ("disgusted", "fearful", "sad")),
)
# Sentences without any emotional cue; every class can produce them.
_NO_CUE = (
    "just got home from work", "had pasta for dinner", "the meeting is at three",
    "going to the store later", "watching a show tonight", "need to do laundry",
    "the bus was on time", "reading a book", "it is raining outside", "working from home today",
    "picked up groceries", "called my mom", "cleaning the kitchen", "going to bed soon",
)  # fmt: skip
_PLACES = (
    "at work", "after the call", "with my sister", "at school", "on the way home",
    "at the store", "with my friends",
)  # fmt: skip
_TIMES = ("this morning", "last night", "after dinner", "today", "again")
# A message that already says when gets a place, not a second time.
_TIME_WORDS = frozenset(("today", "tonight", "tomorrow", "later", "soon", "now", "again",
                         "three", "morning", "night", "week", "already", "finally"))  # fmt: skip
# Text-specific confusions (different from the face's and the voice's).
_TEXT_NEIGHBOURS = {
    "neutral": ("sad", "happy"),
    "happy": ("surprised",),
    "sad": ("fearful", "neutral"),
    "angry": ("disgusted", "sad"),
    "fearful": ("sad", "surprised"),
    "disgusted": ("angry",),
    "surprised": ("happy", "fearful"),
}
_EXPANSIONS = {
    "i'm": "i am", "can't": "cannot", "don't": "do not", "won't": "will not",
    "didn't": "did not", "couldn't": "could not", "that's": "that is", "i've": "i have",
    "i'll": "i will",
}  # fmt: skip
_HIGH_AROUSAL = {"happy", "angry", "surprised", "fearful"}
MAX_TEXT_WORDS = 15


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _typo(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(1, len(word) - 1))
    kind = rng.integers(3)
    if kind == 0:  # swap two neighbours
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double a letter


def render_text(
    ident: UserIdentity, label: int, intensity: float, rng: np.random.Generator
) -> str:
    """Write a short message (3-15 words) that hints at ``label`` in the user's style.

    A weakly felt emotion more often yields a message with no cue at all; a share of messages
    use a neighbouring emotion's wording, shared wording, or negation.

    Parameters
    ----------
    ident : UserIdentity
        Whose writing style is used.
    label : int
        True emotion (index into ``EMOTIONS``).
    intensity : float
        Strength of expression in ``[0, 1]``.
    rng : np.random.Generator
        Source of the message's randomness.

    Returns
    -------
    str
        ASCII text.
    """
    emotion = EMOTIONS[label]
    if rng.random() < 0.12 + 0.3 * (1 - intensity):
        core, cue = _pick(rng, _NO_CUE), "neutral"
    else:
        cue = emotion
        if rng.random() < 0.12:
            cue = _pick(rng, _TEXT_NEIGHBOURS[emotion])
        kind = rng.random()
        shared = tuple(text for text, owners in _SHARED if cue in owners)
        if kind < 0.2 and shared:
            core = _pick(rng, shared)
        elif kind < 0.3:
            core = _pick(rng, _NEGATIONS[cue])
        elif kind < 0.65:
            core = _pick(rng, _ADJ_TEMPLATES).format(a=_pick(rng, _ADJECTIVES[cue]))
        else:
            core = _pick(rng, _PHRASES[cue])

    words = core.split()
    contexts = _PLACES if _TIME_WORDS.intersection(words) else _PLACES + _TIMES
    if rng.random() < ident.verbosity:
        words += _pick(rng, contexts).split()
    if rng.random() < ident.filler_rate:
        filler = _pick(rng, ident.fillers).split()
        words = filler + words if rng.random() < 0.5 else words + filler
    while len(words) < 3:
        words += _pick(rng, _PLACES).split()
    words = words[:MAX_TEXT_WORDS]
    if ident.formal:
        words = [w2 for w in words for w2 in _EXPANSIONS.get(w, w).split()][:MAX_TEXT_WORDS]
    words = [_typo(w, rng) if len(w) >= 4 and rng.random() < ident.typo_rate else w for w in words]
    text = " ".join(words)
    if not ident.lowercase:
        text = " ".join("I" + w[1:] if w == "i" or w.startswith("i'") else w for w in text.split())
        text = text[0].upper() + text[1:]
    bang = ident.exclaim * (1.4 if cue in _HIGH_AROUSAL else 0.6)
    u = rng.random()
    if u < bang:
        text += "!" * int(rng.integers(1, 4))
    elif u < bang + ident.ellipsis:
        text += "..."
    elif ident.formal or not ident.lowercase:
        text += "."
    return text


# --------------------------------------------------------------------------- federation


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
    a pool that :func:`~simulations.partition.partition_dirichlet` splits with label skew, so
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
