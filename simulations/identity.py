"""Synthetic user identities and the seeded random streams every modality draws from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The face cues a person's resting face and an emotion move (simulations.faces draws them).
FACE_CUE_NAMES = ("curve", "open", "brow_slope", "brow_raise", "eye_open", "wrinkle", "width")


# Independent random streams, so that e.g. drawing a face never shifts the voice's noise.
_META, _USER, _SAMPLE, _FACE, _VOICE, _TEXT = range(6)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


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
        resting_face=tuple(float(v) for v in r.normal(0, 0.15, len(FACE_CUE_NAMES))),
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
