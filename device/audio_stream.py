"""Live audio for the device runtime: raw PCM from a named pipe, a device or a file.

``emofed device run --audio-stream PATH`` reads what ``arecord -f S16_LE -t raw`` or
``ffmpeg -f s16le`` write into a FIFO; :class:`AudioStream` answers the same ``read`` for
a window as ``device.capture.AudioSource`` does for a file, on the wall clock of a live
session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from device.capture import CaptureError

__all__ = ["DEFAULT_STREAM_BUFFER_S", "MAX_STREAM_CHANNELS", "STREAM_RATES", "AudioStream"]

logger = logging.getLogger(__name__)

STREAM_RATES = (8000, 192000)  # Hz: telephone speech to studio rates
MAX_STREAM_CHANNELS = 16  # as models.voice.MAX_CHANNELS
DEFAULT_STREAM_BUFFER_S = 10.0
_STREAM_GAP_S = 0.25  # audio arriving this much later than its sample count says: the writer paused
_STREAM_LEAD_S = 0.2  # a writer faster than real time (a raw file) is held this far ahead of the clock
_POLL_S = 0.2  # how often a waiting thread looks whether it should stop


class AudioStream:
    """The samples of each window from a live stream of raw PCM: a named pipe, a device or a file.

    Signed 16-bit little-endian samples, ``channels`` interleaved and downmixed to mono, as
    ``arecord -f S16_LE -t raw`` or ``ffmpeg -f s16le`` write them. A daemon thread opens the
    path when the session starts (:meth:`start_clock`; a pipe waits there for its writer) and
    lays the samples on the session's clock as they arrive, one per ``1 / sample_rate``
    seconds from the first: a pause of the writer leaves a gap, and a writer faster than real
    time is held back to the clock. :meth:`read` returns a window's samples once the clock has
    passed its end, as the camera does. At most ``buffer_s`` seconds of unread audio are kept:
    when the session falls further behind, the oldest are dropped (logged and counted in
    :attr:`dropped`). The stream is exhausted when its writer has closed it and every sample
    was read.

    Parameters
    ----------
    path : str or Path
        A named pipe (``mkfifo``), a character device or a raw PCM file; not stdin.
    sample_rate : int
        Samples per second and channel, in [8000, 192000].
    channels : int
        Interleaved channels, in [1, 16].
    buffer_s : float
        Seconds of unread audio kept before the oldest are dropped.

    Raises
    ------
    CaptureError
        If the path is stdin, missing, not readable or a directory, or the rate or channel
        count is out of range.
    ValueError
        If ``buffer_s`` is not positive.
    """

    live = True  # windows follow the wall clock

    def __init__(
        self, path: str | Path, *, sample_rate: int = 16000, channels: int = 1,
        buffer_s: float = DEFAULT_STREAM_BUFFER_S,
    ) -> None:
        self.name = f"audio stream {path}"
        if str(path) == "-":
            raise CaptureError(
                "audio stream: stdin carries text and feedback lines; give a named pipe (mkfifo) or a file"
            )
        low, high = STREAM_RATES
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not low <= sample_rate <= high:
            raise CaptureError(f"audio stream rate must be an integer in [{low}, {high}] Hz. Found {sample_rate}")
        if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_STREAM_CHANNELS:
            raise CaptureError(f"audio stream channels must be in [1, {MAX_STREAM_CHANNELS}]. Found {channels}")
        if not buffer_s > 0:
            raise ValueError(f"buffer_s must be > 0 seconds. Found {buffer_s}.")
        self.path = Path(path)
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            raise CaptureError(f"{self.name}: not found (create a named pipe with mkfifo)") from None
        except OSError as err:
            raise CaptureError(f"{self.name}: cannot be examined ({err.strerror or err})") from None
        if stat.S_ISDIR(mode):
            raise CaptureError(f"{self.name}: is a directory, not a named pipe or file")
        if not os.access(self.path, os.R_OK):
            raise CaptureError(f"{self.name}: not readable (permission denied)")
        self.sample_rate = sample_rate
        self.channels = channels
        self._fifo = stat.S_ISFIFO(mode)
        self._frame_bytes = 2 * channels  # one sample of every channel
        self._capacity = max(1, round(buffer_s * sample_rate))
        self._cond = threading.Condition()
        self._segments: deque[tuple[int, np.ndarray]] = deque()  # (index of first sample, (n,) float32)
        self._buffered = 0  # samples in _segments
        self._next = 0  # clock index after the newest sample
        self._read_to = 0  # clock index up to which windows were read
        self._zero: float | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._logged_drop = 0.0
        self.opened = False  # the thread has opened the path (a pipe: its writer came)
        self.closed = False  # the writer closed it, reading failed, or close() was called
        self.error: str | None = None
        self.received = 0  # samples
        self.dropped = 0  # samples dropped because the session fell behind
        self.trailing_bytes = 0  # bytes of an incomplete sample at the end

    def start_clock(self, zero: float | None = None) -> None:
        """Count window times from ``zero`` (``time.monotonic()``; default now) and start reading."""
        if self._thread is not None:
            return
        self._zero = time.monotonic() if zero is None else zero
        self._thread = threading.Thread(target=self._pump, name=self.name, daemon=True)
        self._thread.start()

    def _now(self) -> float:
        return time.monotonic() - self._zero  # type: ignore[operator]

    def _pump(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)  # a pipe: blocks until a writer opens it
        except OSError as err:
            self._finish(f"cannot be opened ({err.strerror or err})")
            return
        self.opened = True
        chunk = self._frame_bytes * max(1, self.sample_rate // 20)  # 50 ms
        partial, error = b"", None
        try:
            while not self._stop.is_set():
                # select, not a blocking read, so that close() can stop a silent writer's reader.
                if not select.select([fd], [], [], _POLL_S)[0]:
                    continue
                data = os.read(fd, chunk)
                if not data:
                    break
                data = partial + data
                whole = len(data) - len(data) % self._frame_bytes
                partial = data[whole:]  # the start of a sample split between writes
                if whole:
                    self._add(data[:whole])
        except OSError as err:
            error = f"reading failed after {self.received / self.sample_rate:.1f} s ({err.strerror or err})"
        finally:
            os.close(fd)
        self.trailing_bytes = len(partial)
        self._finish(error)

    def _add(self, data: bytes) -> None:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).mean(axis=1)  # (n,)
        n = len(samples)
        arrived = round(self._now() * self.sample_rate) - n  # where it began, had it come in real time
        with self._cond:
            # Samples follow each other on the clock, never into a window already read; a late
            # arrival (the writer paused, or started late) moves the clock up to the wall clock.
            at = max(self._next, self._read_to)
            if self.received == 0 or arrived > at + _STREAM_GAP_S * self.sample_rate:
                at = max(at, arrived)
            self._segments.append((at, samples))
            self._buffered += n
            self._next = at + n
            self.received += n
            over = self._buffered - self._capacity
            while over > 0:
                first, oldest = self._segments.popleft()
                cut = min(over, len(oldest))
                if cut < len(oldest):
                    self._segments.appendleft((first + cut, oldest[cut:]))
                self._buffered -= cut
                self.dropped += cut
                over -= cut
            dropped = self.dropped
            self._cond.notify_all()
        if dropped and time.monotonic() - self._logged_drop > 1.0:
            self._logged_drop = time.monotonic()
            logger.warning("%s: the session fell behind; %.1f s of the oldest audio dropped so far",
                           self.name, dropped / self.sample_rate)
        ahead = self._next / self.sample_rate - _STREAM_LEAD_S - self._now()
        if ahead > 0:
            self._stop.wait(ahead)  # the writer waits for the clock (a pipe's writer blocks)

    def _finish(self, error: str | None) -> None:
        with self._cond:
            self.error, self.closed = error, True
            self._cond.notify_all()
        logger.info("%s: closed after %.1f s of audio", self.name, self.received / self.sample_rate)

    def done_at(self, start: float) -> bool:
        """Whether the stream is closed and holds no sample at or after second ``start``."""
        index = round(start * self.sample_rate)
        with self._cond:
            return self.closed and not (self._segments and self._next > index)

    @property
    def exhausted(self) -> bool:
        """Whether the writer closed the stream and every sample was read."""
        with self._cond:
            return self.closed and not self._segments

    def read(self, start: float, end: float) -> np.ndarray | None:
        """float32 mono samples of ``[start, end)``, once the clock has passed ``end``; None if none.

        Samples before ``end`` that were not read by then are discarded.

        Raises
        ------
        CaptureError
            If the path could not be opened or reading it failed.
        """
        self.start_clock()
        first, last = round(start * self.sample_rate), round(end * self.sample_rate)
        pieces = []
        with self._cond:
            while not self.closed and self._now() < end:
                self._cond.wait(min(end - self._now(), _POLL_S))
            if self.error is not None:
                raise CaptureError(f"{self.name}: {self.error}")
            while self._segments and self._segments[0][0] < last:
                index, samples = self._segments.popleft()
                self._buffered -= len(samples)
                pieces.append(samples[max(first - index, 0) : max(last - index, 0)])
                if index + len(samples) > last:  # the rest belongs to later windows
                    self._segments.appendleft((last, samples[last - index :]))
                    self._buffered += index + len(samples) - last
            self._read_to = max(self._read_to, last)
        data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return data if data.size else None

    @property
    def warnings(self) -> list[str]:
        """One line for each thing about the stream a session's report should mention."""
        out = []
        if self.dropped:
            out.append(f"{self.name}: the session fell behind; {self.dropped / self.sample_rate:.1f} s "
                       "of the oldest audio were dropped")
        if self.trailing_bytes:
            out.append(f"{self.name}: ended inside a sample; its last {self.trailing_bytes} byte(s) were ignored")
        if self._thread is not None and not self.opened and self._fifo:
            out.append(f"{self.name}: no writer opened the pipe")
        elif self.closed and self.error is None and self.received == 0:
            out.append(f"{self.name}: closed without sending any audio")
        return out

    def close(self) -> None:
        """Stop reading; a pipe no writer opened yet is released by opening it for writing once."""
        self._stop.set()
        thread = self._thread
        deadline = time.monotonic() + 2.0
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            if not self.opened and self._fifo:
                with contextlib.suppress(OSError):  # ENXIO: the thread is not in open() yet
                    os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            thread.join(0.05)
        with self._cond:
            self.closed = True
            self._cond.notify_all()
