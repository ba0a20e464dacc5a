"""What the device runtime reads, one time window at a time: camera frames, audio, text, feedback.

Every source answers :meth:`read` for a window ``[start, end)`` in seconds from the start
of the session and says when it is exhausted, so the runtime can stop when all are.

* :class:`VideoSource`: frames from a video file or a camera index (OpenCV). Of the frames
  in a window only the one nearest the window's middle is decoded; the others are only
  grabbed (``cv2.VideoCapture.grab``), which skips the colour conversion.
* :class:`AudioSource`: the window's samples of a WAV (or any libsndfile) file, read with
  ``soundfile`` by seeking, so a long recording is never held in memory.
* ``device.audio_stream.AudioStream``: raw 16-bit PCM from a named pipe (``arecord``,
  ``ffmpeg``), read live by a daemon thread into a bounded buffer.
* :class:`TextSource`: text lines from a file or stdin. A line ``[12.5] text`` belongs to the
  window holding second 12.5; in a file, plain lines fill the windows in order (line k goes
  to window k), and from a live stdin a plain line belongs to the window it arrived in.
* :func:`read_feedback`: feedback lines ``RESPONSE`` or ``DECISION_ID RESPONSE``.

A file that cannot be opened, decoded or holds no data raises :class:`CaptureError` with a
one-line message before the session starts. Live sources (a camera, an audio stream) count
window times on the wall clock from :meth:`start_clock`, which the runtime calls for all of
them at once when the session starts.
"""

from __future__ import annotations

import logging
import math
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np
import soundfile

__all__ = [
    "AudioSource",
    "CaptureError",
    "FeedbackLine",
    "LiveLines",
    "TextSource",
    "VideoSource",
    "parse_feedback",
    "read_feedback",
    "read_lines",
]

logger = logging.getLogger(__name__)

DEFAULT_FPS = 25.0  # when a file does not say its frame rate
_STAMPED = re.compile(r"\[\s*(\d+(?:\.\d*)?)\s*\]\s*(.*)")


class CaptureError(ValueError):
    """An input of the device runtime cannot be opened, decoded or holds no data."""


# -- video --------------------------------------------------------------------------------


class VideoSource:
    """Frames of a video file or a camera, one per window.

    Parameters
    ----------
    source : str or int
        A video file path, or a camera index.
    live : bool
        True for a camera: frames are timed by the wall clock, not by the frame rate.

    Raises
    ------
    CaptureError
        If the file or camera cannot be opened or yields no frame.
    """

    def __init__(self, source: str | int, *, live: bool = False) -> None:
        self.name = f"camera {source}" if live else f"video {source}"
        if not live and not Path(str(source)).is_file():
            raise CaptureError(f"{self.name}: file not found")
        # OpenCV logs each backend it tries; the one-line error below says what matters.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        self._cap = cv2.VideoCapture(source)
        if not self._cap.isOpened():
            why = "no such camera, or it is busy" if live else "not a video OpenCV can decode"
            raise CaptureError(f"{self.name}: cannot be opened ({why})")
        self.live = live
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
        ok, first = self._cap.read()
        if not ok or first is None or first.size == 0:
            self._cap.release()
            raise CaptureError(f"{self.name}: holds no decodable frame")
        count = float(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        # Known for most files: the last window of a clip then gets its last frame.
        self._last = int(count) - 1 if not live and math.isfinite(count) and count > 0 else None
        self._pending: np.ndarray | None = first  # the frame read to check the source
        self._index = 0  # index of the next frame to grab (file mode)
        self._started = time.monotonic()
        self.exhausted = False
        self.frames = 0

    def start_clock(self, zero: float | None = None) -> None:
        """Count a camera's window times from ``zero`` (``time.monotonic()``; default now)."""
        self._started = time.monotonic() if zero is None else zero

    def read(self, start: float, end: float) -> np.ndarray | None:
        """The BGR frame nearest the middle of ``[start, end)``, or None if there is none."""
        if self.exhausted:
            return None
        return self._read_live(end) if self.live else self._read_file(start, end)

    def _read_file(self, start: float, end: float) -> np.ndarray | None:
        target = max(math.ceil(start * self.fps - 1e-9), round((start + end) / 2 * self.fps))
        if self._last is not None:
            target = min(target, self._last)
        chosen = None
        while self._index < end * self.fps - 1e-9:
            if self._pending is not None:
                frame, self._pending = self._pending, None
            elif not self._cap.grab():
                self.exhausted = True
                break
            else:
                frame = None
            if self._index == target or (chosen is None and self._index > target):
                if frame is None:
                    ok, frame = self._cap.retrieve()
                    frame = frame if ok else None
                chosen = frame
            self._index += 1
            self.frames += 1
        return chosen

    def _read_live(self, end: float) -> np.ndarray | None:
        # A camera delivers frames at its own pace; keep the newest until the window ends.
        latest = self._pending
        self._pending = None
        while time.monotonic() - self._started < end:
            ok, frame = self._cap.read()
            if not ok:
                self.exhausted = True
                break
            latest = frame
            self.frames += 1
        return latest

    def close(self) -> None:
        """Release the file or camera."""
        self._cap.release()


# -- audio --------------------------------------------------------------------------------


class AudioSource:
    """The samples of each window from an audio file.

    Parameters
    ----------
    path : str or Path
        WAV (or FLAC, OGG: whatever libsndfile decodes).

    Raises
    ------
    CaptureError
        If the file is missing, cannot be decoded or holds no samples.
    """

    live = False  # windows follow the file's samples, not the wall clock

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CaptureError(f"audio {self.path}: file not found")
        try:
            self._file = soundfile.SoundFile(str(self.path))
        except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CaptureError(f"audio {self.path}: cannot be decoded ({detail})") from None
        self.sample_rate = int(self._file.samplerate)
        self.frames = int(self._file.frames)
        if self.frames <= 0 or self.sample_rate <= 0:
            self._file.close()
            raise CaptureError(f"audio {self.path}: holds no samples")
        self.duration = self.frames / self.sample_rate

    def done_at(self, start: float) -> bool:
        """Whether a window starting at ``start`` lies past the end of the file."""
        return start * self.sample_rate >= self.frames

    def read(self, start: float, end: float) -> np.ndarray | None:
        """float32 samples of ``[start, end)``, (T,) or (T, C); None past the end.

        Raises
        ------
        CaptureError
            If the file turns out to be corrupt part-way.
        """
        first = int(round(start * self.sample_rate))
        last = min(int(round(end * self.sample_rate)), self.frames)
        if first >= last:
            return None
        try:
            self._file.seek(first)
            data = self._file.read(last - first, dtype="float32", always_2d=False)
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as err:
            raise CaptureError(f"audio {self.path}: cannot be read at {start:.1f} s ({err})") from None
        return data if data.size else None

    def close(self) -> None:
        """Close the file."""
        self._file.close()


# -- text ---------------------------------------------------------------------------------


def read_lines(path: str, *, what: str, stdin: TextIO | None = None) -> list[str]:
    """All lines of a UTF-8 file, or of stdin for ``-``; trailing newlines removed.

    Raises
    ------
    CaptureError
        If the file is missing or not UTF-8 text.
    """
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        try:
            return stream.read().splitlines()
        except UnicodeDecodeError:
            raise CaptureError(f"{what} on stdin: not UTF-8 text") from None
    file = Path(path)
    if not file.is_file():
        raise CaptureError(f"{what} {file}: file not found")
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CaptureError(f"{what} {file}: not UTF-8 text") from None


class LiveLines:
    """Lines of a live stream (stdin), read by a daemon thread and collected as they arrive."""

    def __init__(self, stream: TextIO) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: TextIO) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\r\n"))
        except (UnicodeDecodeError, OSError, ValueError) as err:
            logger.warning("Stopped reading stdin: %s", err)
        self.closed = True

    def drain(self) -> list[str]:
        """The lines that arrived since the last call."""
        lines = []
        while True:
            try:
                lines.append(self._queue.get_nowait())
            except queue.Empty:
                return lines


class TextSource:
    """Text lines assigned to windows.

    Parameters
    ----------
    lines : sequence of str
        The lines of a file (live stdin: use ``live``); blank lines are skipped.
    window : float
        Window length in seconds.
    live : LiveLines, optional
        A live stream: plain lines belong to the window during which they arrived.
    name : str
        How errors name the source.

    Raises
    ------
    CaptureError
        If a file holds no text at all.
    """

    def __init__(
        self, lines: Sequence[str], *, window: float, live: LiveLines | None = None, name: str = "text"
    ) -> None:
        self.window = window
        self._live = live
        self._by_window: dict[int, list[str]] = {}
        self._plain: list[str] = []
        for line in lines:
            self._add(line, default=None)
        if live is None and not self._by_window and not self._plain:
            raise CaptureError(f"{name}: holds no text")
        self._needed = max(len(self._plain), max(self._by_window, default=-1) + 1)

    def _add(self, line: str, *, default: int | None) -> None:
        line = line.strip()
        if not line:
            return
        stamped = _STAMPED.fullmatch(line)
        if stamped and stamped.group(2).strip():
            index = int(float(stamped.group(1)) // self.window)
            self._by_window.setdefault(index, []).append(stamped.group(2).strip())
        elif default is not None:
            self._by_window.setdefault(default, []).append(line)
        else:
            self._plain.append(line)

    @property
    def live(self) -> bool:
        """Whether the lines come from a live stream (stdin) rather than a file."""
        return self._live is not None

    @property
    def windows_needed(self) -> int:
        """How many windows it takes to use every line of a file."""
        return self._needed

    @property
    def exhausted(self) -> bool:
        """Whether a live stream was closed (a file is never exhausted by itself)."""
        return self._live is not None and self._live.closed and self._live._queue.empty()

    def read(self, index: int) -> str | None:
        """The text of window ``index`` (several lines joined by spaces), or None."""
        if self._live is not None:
            for line in self._live.drain():
                self._add(line, default=index)
        parts = self._by_window.pop(index, [])
        if self._live is None and index < len(self._plain):
            parts = [self._plain[index], *parts]
        return " ".join(parts) if parts else None


# -- feedback -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackLine:
    """One feedback line: a response, for a decision id or for the next intervention."""

    response: str
    decision: int | None  # None: the next intervention (file) or the latest one (live)
    line: int  # 1-based line number, for messages


def parse_feedback(line: str, number: int, responses: Iterable[str]) -> FeedbackLine | None:
    """Parse ``RESPONSE`` or ``DECISION_ID RESPONSE``; None for a blank or ``#`` line.

    Raises
    ------
    CaptureError
        If the line is malformed or the response is not one of ``responses``.
    """
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    known = list(responses)
    decision: int | None = None
    if len(parts) == 2 and parts[0].isdigit():
        decision, response = int(parts[0]), parts[1]
    elif len(parts) == 1:
        response = parts[0]
    else:
        raise CaptureError(
            f"feedback line {number}: expected 'RESPONSE' or 'DECISION_ID RESPONSE'. Found {text!r}"
        )
    response = response.lower()
    if response not in known:
        raise CaptureError(
            f"feedback line {number}: response must be one of {', '.join(known)}. Found {response!r}"
        )
    return FeedbackLine(response=response, decision=decision, line=number)


def read_feedback(lines: Sequence[str], responses: Iterable[str]) -> list[FeedbackLine]:
    """Parse every line of a feedback file (see :func:`parse_feedback`).

    Raises
    ------
    CaptureError
        On the first malformed line.
    """
    known = list(responses)
    parsed = (parse_feedback(line, number, known) for number, line in enumerate(lines, start=1))
    return [item for item in parsed if item is not None]
