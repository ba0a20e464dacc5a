"""Face cues and frontal cartoon faces drawn with OpenCV for the synthetic federation."""

from __future__ import annotations

import cv2
import numpy as np

from simulations.identity import FACE_CUE_NAMES, UserIdentity

FACE_SIZE = 96  # rendered face images are (96, 96, 3) uint8 BGR

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
    noise = rng.normal(0, _FACE_CUE_NOISE, len(FACE_CUE_NAMES))
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
