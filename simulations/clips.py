"""A recorded session of one synthetic person: a video, a WAV and a text file, for `emofed device run`.

The person goes through a schedule of emotions (``(emotion, seconds)`` segments). Each
video frame is a face from :mod:`simulations.faces` with that segment's expression,
upscaled into a larger camera frame; the audio strings utterances from
:mod:`simulations.voices` with pauses; the text holds one ``[SECONDS] message`` line per
few seconds from :mod:`simulations.texts`. The same seed gives the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile

from models.labels import EMOTIONS
from simulations.faces import face_cues, render_face
from simulations.identity import make_identity
from simulations.texts import render_text
from simulations.voices import render_voice, voice_cues

__all__ = ["DEFAULT_SCHEDULE", "Clip", "write_clip"]

DEFAULT_SCHEDULE: tuple[tuple[str, float], ...] = (
    ("neutral", 10.0), ("happy", 10.0), ("sad", 15.0), ("angry", 10.0), ("neutral", 15.0),
)


@dataclass(frozen=True)
class Clip:
    """Paths of a written clip and what it shows."""

    video: Path
    audio: Path
    text: Path
    seconds: float
    schedule: tuple[tuple[str, float], ...]


def _segments(schedule: Sequence[tuple[str, float]]) -> list[tuple[int, float, float]]:
    out, t = [], 0.0
    for emotion, seconds in schedule:
        if emotion not in EMOTIONS:
            raise ValueError(f"schedule emotions must be among {', '.join(EMOTIONS)}. Found {emotion!r}.")
        if not seconds > 0:
            raise ValueError(f"schedule durations must be > 0. Found {seconds} for {emotion!r}.")
        out.append((EMOTIONS.index(emotion), t, t + float(seconds)))
        t += float(seconds)
    if not out:
        raise ValueError("the schedule needs at least one segment")
    return out


def _label_at(segments: list[tuple[int, float, float]], t: float) -> int:
    for label, start, end in segments:
        if start <= t < end:
            return label
    return segments[-1][0]


def write_clip(
    out: str | Path,
    *,
    schedule: Sequence[tuple[str, float]] = DEFAULT_SCHEDULE,
    fps: float = 15.0,
    frame_size: tuple[int, int] = (320, 240),
    sample_rate: int = 16000,
    text_every_s: float = 4.0,
    seed: int = 0,
    user: int = 0,
) -> Clip:
    """Write ``clip.avi`` (MJPG), ``clip.wav`` (16-bit PCM) and ``clip.txt`` into ``out``.

    Parameters
    ----------
    out : str or Path
        Output folder (created if missing).
    schedule : sequence of (emotion, seconds)
        What the person feels, in order.
    fps : float
        Video frame rate.
    frame_size : (int, int)
        Camera frame width and height.
    sample_rate : int
        Audio rate in Hz.
    text_every_s : float
        One text line per this many seconds.
    seed, user : int
        The synthetic person and the randomness of the recording.

    Raises
    ------
    ValueError
        If the schedule names an unknown emotion or a non-positive duration.
    """
    segments = _segments(schedule)
    seconds = segments[-1][2]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = make_identity(seed, user)
    rng = np.random.default_rng(seed)
    width, height = frame_size
    side = int(min(width, height) * 0.8)

    video = out / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write MJPG video to {video}")
    background = np.full((height, width, 3), ident.background, dtype=np.uint8)
    try:
        for index in range(int(round(seconds * fps))):
            label = _label_at(segments, index / fps)
            face = render_face(ident, face_cues(ident, label, 1.0, rng), rng)
            frame = background.copy()
            x0, y0 = (width - side) // 2, (height - side) // 2
            frame[y0 : y0 + side, x0 : x0 + side] = cv2.resize(face, (side, side), interpolation=cv2.INTER_LINEAR)
            writer.write(frame)
    finally:
        writer.release()

    wave = np.zeros(int(round(seconds * sample_rate)), dtype=np.float32)
    t = 0.2
    while t < seconds - 0.5:
        label = _label_at(segments, t)
        utterance = render_voice(ident, voice_cues(ident, label, 1.0, rng), rng, sample_rate)
        start = int(t * sample_rate)
        piece = utterance[: len(wave) - start]
        wave[start : start + len(piece)] = piece
        t += len(utterance) / sample_rate + rng.uniform(0.3, 0.8)
    audio = out / "clip.wav"
    soundfile.write(str(audio), wave, sample_rate, subtype="PCM_16")

    lines = []
    t = 1.0
    while t < seconds:
        label = _label_at(segments, t)
        lines.append(f"[{t:.1f}] {render_text(ident, label, 1.0, rng)}")
        t += text_every_s
    text = out / "clip.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Clip(video=video, audio=audio, text=text, seconds=seconds, schedule=tuple(schedule))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.clips OUT [--seconds S]``: write a clip for `emofed device run`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulations.clips", description=main.__doc__)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seconds", type=float, default=60.0, help="length; five equal segments (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    segment = args.seconds / len(DEFAULT_SCHEDULE)
    schedule = [(emotion, segment) for emotion, _ in DEFAULT_SCHEDULE]
    clip = write_clip(args.out, schedule=schedule, seed=args.seed)
    print(f"wrote {clip.video}, {clip.audio}, {clip.text} ({clip.seconds:g} s: "
          + ", ".join(f"{e} {s:g} s" for e, s in clip.schedule) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
