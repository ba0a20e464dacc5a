"""Tests of the live sources of the device runtime: a raw PCM audio stream from a named pipe, a camera."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_runtime import _check_decision, _make_run  # tests/device is on sys.path (pytest's rootdir-less import)

from cli.main import main
from device import capture
from device.audio_stream import AudioStream
from device.capture import CaptureError, VideoSource
from device.store import generate_key_file
from models.labels import EMOTIONS
from simulations.clips import write_clip
from simulations.identity import make_identity
from simulations.voices import render_voice, voice_cues

RATE = 16000


def _make_speech(seconds: float, *, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Babbled utterances back to back (no pauses), as int16 samples (T,)."""
    ident = make_identity(seed, 0)
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * rate:
        utterance = render_voice(ident, voice_cues(ident, EMOTIONS.index("happy"), 1.0, rng), rng, rate)
        parts.append(utterance)
        total += len(utterance)
    wave = np.concatenate(parts)[: round(seconds * rate)]
    return np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype("<i2")


def _make_fifo(tmp_path: Path, name: str = "mic.fifo") -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


def _pieces(data: bytes, size: int) -> list[bytes]:
    """``data`` cut every ``size`` bytes (an odd size splits samples between writes)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


class _Writer(threading.Thread):
    """Writes bytes into a pipe as arecord would (a float in ``parts`` pauses that long), then closes it."""

    def __init__(self, path: Path, parts: list[bytes | float]) -> None:
        super().__init__(daemon=True)
        self.path, self.parts = path, parts
        self.opened = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with open(self.path, "wb", buffering=0) as pipe:  # blocks until the reader opens it
                self.opened.set()
                for part in self.parts:
                    if isinstance(part, float):
                        time.sleep(part)
                    else:
                        pipe.write(part)
        except BrokenPipeError as err:  # the reader went away: expected only after stop()
            self.error = err

    def stop(self) -> None:
        """Release a writer still waiting for a reader, and wait for it to end."""
        if not self.opened.is_set():
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.join(0.5)
            os.close(fd)
        self.join(5.0)
        assert not self.is_alive()


def _read_all(stream: AudioStream, window: float, limit: int = 100) -> list[np.ndarray | None]:
    """Each window's samples until the stream is done (at most ``limit`` windows)."""
    out = []
    for index in range(limit):
        out.append(stream.read(index * window, (index + 1) * window))
        if stream.done_at((index + 1) * window):
            return out
    raise AssertionError(f"the stream was not done after {limit} windows")


def test_stream_delivers_every_sample_window_by_window_on_the_clock(tmp_path):
    """A pipe fed faster than real time: every sample arrives, in order, each window at its time."""
    fifo = _make_fifo(tmp_path)
    pcm = _make_speech(1.5)
    writer = _Writer(fifo, _pieces(pcm.tobytes(), 1001))  # odd pieces: samples split between writes
    writer.start()
    stream = AudioStream(fifo, sample_rate=RATE)
    zero = time.monotonic()
    stream.start_clock(zero)
    windows, times = [], []
    for index in range(100):
        windows.append(stream.read(index * 0.5, (index + 1) * 0.5))
        times.append(time.monotonic() - zero)
        if stream.done_at((index + 1) * 0.5):
            break
    writer.stop()
    stream.close()
    got = np.concatenate([w for w in windows if w is not None])
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768.0)
    assert all(w is None or len(w) <= 0.5 * RATE for w in windows)
    assert times[0] >= 0.5  # a window is read once the clock has passed its end
    assert len(windows[0]) == 0.5 * RATE  # held back to the clock, the writer was never behind it
    assert stream.exhausted and stream.dropped == 0 and stream.warnings == []


def test_stream_mixes_channels_and_ignores_a_torn_last_sample(tmp_path):
    """Stereo is the mean of its channels; an incomplete sample at the end is reported, not read."""
    fifo = _make_fifo(tmp_path)
    left = _make_speech(0.4, seed=1)
    right = (left // 2).astype("<i2")
    stereo = np.stack([left, right], axis=1).tobytes()  # (T, 2) interleaved
    writer = _Writer(fifo, [*_pieces(stereo, 7), b"\x01"])
    writer.start()
    stream = AudioStream(fifo, sample_rate=RATE, channels=2)
    got = np.concatenate([w for w in _read_all(stream, 0.25) if w is not None])
    writer.stop()
    stream.close()
    expected = (left.astype(np.float32) / 32768.0 + right.astype(np.float32) / 32768.0) / 2.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
    assert stream.trailing_bytes == 1
    assert stream.warnings == [f"audio stream {fifo}: ended inside a sample; its last 1 byte(s) were ignored"]


def test_a_writer_pause_leaves_a_gap_on_the_clock(tmp_path):
    """0.3 s at once, a 1.2 s pause, 0.3 s: the windows of the pause get no audio, the rest comes later."""
    fifo = _make_fifo(tmp_path)
    pcm = _make_speech(0.6)
    half = pcm.tobytes()[: len(pcm.tobytes()) // 2]
    writer = _Writer(fifo, [half, 1.2, pcm.tobytes()[len(half) :]])
    writer.start()
    stream = AudioStream(fifo, sample_rate=RATE)
    windows = _read_all(stream, 0.25)
    writer.stop()
    stream.close()
    assert sum(len(w) for w in windows if w is not None) == len(pcm)
    assert windows[2] is None and windows[3] is None  # 0.5 to 1.0 s: the writer was pausing
    later = [i for i, w in enumerate(windows) if w is not None and i >= 2]
    assert later and later[0] >= 4  # the second half is laid where it arrived, from ~1.15 s


def test_stream_drops_the_oldest_audio_when_the_reader_falls_behind(tmp_path, caplog):
    """With 0.25 s of buffer and nobody reading, only the newest 0.25 s is kept; the rest is counted."""
    fifo = _make_fifo(tmp_path)
    pcm = _make_speech(1.0)
    writer = _Writer(fifo, [pcm.tobytes()])
    writer.start()
    stream = AudioStream(fifo, sample_rate=RATE, buffer_s=0.25)
    with caplog.at_level(logging.WARNING, logger="device.capture"):
        stream.start_clock()
        writer.stop()
        deadline = time.monotonic() + 10.0
        while not stream.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        kept = stream.read(0.0, 100.0)
    stream.close()
    capacity = round(0.25 * RATE)
    assert stream.dropped == len(pcm) - capacity
    np.testing.assert_array_equal(kept, pcm[-capacity:].astype(np.float32) / 32768.0)
    assert any("fell behind" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    assert stream.warnings == [
        f"audio stream {fifo}: the session fell behind; 0.8 s of the oldest audio were dropped"
    ]
    assert stream.exhausted


def test_closing_a_stream_no_writer_opened_releases_its_reader(tmp_path):
    """No writer ever: windows pass without audio, the source is not done, and close() ends its thread."""
    fifo = _make_fifo(tmp_path)
    stream = AudioStream(fifo)
    stream.start_clock()
    assert stream.read(0.0, 0.2) is None
    assert not stream.done_at(0.2)
    assert stream.warnings == [f"audio stream {fifo}: no writer opened the pipe"]
    stream.close()
    assert not stream._thread.is_alive() and stream.closed


def test_a_raw_file_is_read_as_a_stream(tmp_path):
    """A raw PCM file (not a pipe) is replayed on the clock until its end."""
    path = tmp_path / "speech.raw"
    pcm = _make_speech(0.5)
    path.write_bytes(pcm.tobytes())
    stream = AudioStream(path, sample_rate=RATE)
    windows = _read_all(stream, 0.25)
    stream.close()
    assert [len(w) for w in windows if w is not None] == [4000, 4000]
    assert stream.exhausted


# -- the session, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run directory (untrained smoke-config weights)."""
    return _make_run(tmp_path_factory.mktemp("stream") / "run")


def _device_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, run: Path, *extra: str,
                device: str = "device") -> tuple[int, list[dict], str]:
    key = tmp_path / "keys" / "store.key"
    if not key.exists():
        generate_key_file(key)
    argv = ["device", "run", "--device-dir", str(tmp_path / device), "--model", str(run), "--key-file", str(key)]
    code = main([*argv, *extra])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_device_run_on_a_microphone_pipe_ends_when_the_writer_closes(tmp_path, run_dir, capsys):
    """`--audio-stream FIFO`: one voice decision per 1 s window, stamped by the wall clock, until EOF."""
    fifo = _make_fifo(tmp_path)
    pcm = _make_speech(3.0)
    writer = _Writer(fifo, _pieces(pcm.tobytes(), 3201))
    writer.start()
    before = time.time()
    started = time.monotonic()
    try:
        code, events, err = _device_run(
            capsys, tmp_path, run_dir, "--audio-stream", str(fifo), "--window", "1.0", "--duration", "60",
        )
    finally:
        writer.stop()
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 30.0  # ended by the writer closing the pipe, not by --duration
    assert "Traceback" not in err and f"reading audio stream {fifo} (16000 Hz, 1 channel(s)" in err
    decisions = [e for e in events if e["type"] == "decision"]
    assert 2 <= len(decisions) <= 4
    for event in decisions:
        _check_decision(event, window_s=1.0)
        assert event["modalities"] == ["voice"]
    stamps = [e["timestamp"] for e in decisions]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= time.time()
    assert f"emofed device: {len(decisions)} decisions" in err


def test_live_session_with_camera_and_stream_shares_one_clock(tmp_path, run_dir, monkeypatch):
    """A (fake) camera and an audio pipe in one live session: face and voice in the same windows."""
    from device.layout import open_device_store
    from device.recognition import Recogniser, load_global_model
    from device.runtime import RuntimeConfig, load_policy, run_session
    from policy.expression import HashingEncoder
    from policy.rules import load_policy_config

    clip = write_clip(tmp_path / "clip", schedule=(("happy", 1.0),), fps=10.0, seed=3)
    frames = _decode(clip.video)
    _FakeCamera.install(monkeypatch, frames, period=0.1)
    fifo = _make_fifo(tmp_path)
    pcm = _make_speech(1.5)
    writer = _Writer(fifo, [pcm.tobytes()])
    writer.start()
    loaded = load_global_model(run_dir)
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    policy = load_policy(store, load_policy_config(), encoder=HashingEncoder())
    video, audio = VideoSource(0, live=True), AudioStream(fifo)
    events: list[dict] = []
    try:
        report = run_session(
            recogniser=Recogniser(loaded.model, loaded.config.model, silence_db=-50.0),
            policy=policy, store=store, config=RuntimeConfig(window_s=0.5, duration_s=20.0),
            video=video, audio=audio, emit=events.append,
        )
    finally:
        writer.stop()
        video.close()
        audio.close()
        store.close()
    assert video.exhausted and audio.exhausted  # both ended: so did the session
    assert report.decisions == len(events) >= 2
    assert all(e["window"]["end_s"] <= 2.5 for e in events)
    assert {"face", "voice"} <= {m for e in events for m in e["modalities"]}
    assert any(set(e["modalities"]) == {"face", "voice"} for e in events)


def test_a_session_that_falls_behind_drops_audio_and_says_so(tmp_path, run_dir):
    """A recogniser slower than the windows: the stream drops its oldest audio and the report warns."""
    from device.layout import open_device_store
    from device.recognition import Prepared, Recogniser, load_global_model
    from device.runtime import RuntimeConfig, load_policy, run_session
    from policy.expression import HashingEncoder
    from policy.rules import load_policy_config

    class Slow(Recogniser):
        def prepare(self, *args: object, **kwargs: object) -> Prepared:
            time.sleep(0.6)  # a window takes longer than it lasts
            return super().prepare(*args, **kwargs)

    fifo = _make_fifo(tmp_path)
    writer = _Writer(fifo, _pieces(_make_speech(1.5).tobytes(), 1600))
    writer.start()
    loaded = load_global_model(run_dir)
    store = open_device_store(tmp_path / "device", key_file=tmp_path / "keys" / "store.key")
    policy = load_policy(store, load_policy_config(), encoder=HashingEncoder())
    audio = AudioStream(fifo, buffer_s=0.3)
    try:
        report = run_session(
            recogniser=Slow(loaded.model, loaded.config.model, silence_db=-50.0), policy=policy, store=store,
            config=RuntimeConfig(window_s=0.25, duration_s=20.0), audio=audio, emit=lambda event: None,
        )
    finally:
        writer.stop()
        audio.close()
        store.close()
    assert audio.dropped > 0 and audio.exhausted
    assert any("fell behind" in w and "dropped" in w for w in report.warnings)
    assert report.windows >= 2


def _write_bad_stream(tmp_path: Path, kind: str) -> list[str]:
    """The options of a session whose audio stream is wrong in the way ``kind`` says."""
    fifo = _make_fifo(tmp_path)
    if kind == "missing":
        return ["--audio-stream", str(tmp_path / "nowhere.fifo")]
    if kind == "directory":
        return ["--audio-stream", str(tmp_path)]
    if kind == "stdin":
        return ["--audio-stream", "-"]
    if kind == "unreadable":
        fifo.chmod(0o200)
        return ["--audio-stream", str(fifo)]
    if kind == "rate":
        return ["--audio-stream", str(fifo), "--audio-rate", "100"]
    if kind == "channels":
        return ["--audio-stream", str(fifo), "--audio-channels", "0"]
    if kind == "rate-without-stream":
        return ["--text", str(fifo), "--audio-rate", "44100"]
    if kind == "video-file":
        return ["--audio-stream", str(fifo), "--video", str(tmp_path / "clip.avi")]
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "nowhere.fifo: not found (create a named pipe with mkfifo)"),
        ("directory", ": is a directory, not a named pipe or file"),
        ("stdin", "audio stream: stdin carries text and feedback lines"),
        pytest.param("unreadable", ": not readable (permission denied)",
                     marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")),
        ("rate", "audio stream rate must be an integer in [8000, 192000] Hz. Found 100"),
        ("channels", "audio stream channels must be in [1, 16]. Found 0"),
        ("rate-without-stream", "--audio-rate and --audio-channels describe --audio-stream"),
        ("video-file", "--audio-stream is timed by the wall clock and --video FILE by its frames"),
    ],
)
def test_bad_streams_give_one_line_errors(tmp_path, run_dir, capsys, kind, message):
    """A stream that cannot be read, or options that do not fit it: exit 2, one line, no store created."""
    code, events, err = _device_run(capsys, tmp_path, run_dir, *_write_bad_stream(tmp_path, kind))
    assert code == 2 and events == []
    assert err.startswith("emofed: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "device" / "store").exists()


def test_audio_file_and_stream_are_exclusive(tmp_path, run_dir, capsys):
    """--audio and --audio-stream together are refused by the parser."""
    with pytest.raises(SystemExit) as exit_info:
        _device_run(capsys, tmp_path, run_dir, "--audio", "a.wav", "--audio-stream", "b.fifo")
    assert exit_info.value.code == 2
    assert "argument --audio-stream: not allowed with argument --audio" in capsys.readouterr().err


# -- the camera ------------------------------------------------------------------------------


def _decode(path: Path) -> list[np.ndarray]:
    capture_file = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture_file.read()
        if not ok:
            capture_file.release()
            return frames
        frames.append(frame)


class _FakeCamera:
    """Stands in for ``cv2.VideoCapture`` of a camera: one frame per ``period`` seconds, then none."""

    def __init__(self, frames: list[np.ndarray], period: float, opened: bool = True) -> None:
        self.frames, self.period, self.opened = frames, period, opened
        self.delivered = 0
        self.released = False

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, frames: list[np.ndarray], *, period: float,
                opened: bool = True) -> list[_FakeCamera]:
        made: list[_FakeCamera] = []

        def factory(source: object) -> _FakeCamera:
            made.append(cls(frames, period, opened))
            return made[-1]

        monkeypatch.setattr(capture.cv2, "VideoCapture", factory)
        return made

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self.opened

    def get(self, prop: int) -> float:
        return 0.0  # cameras often report no frame rate or count

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.delivered >= len(self.frames):
            return False, None
        time.sleep(self.period)
        self.delivered += 1
        return True, self.frames[self.delivered - 1]

    def release(self) -> None:
        self.released = True


def _ramp(count: int) -> list[np.ndarray]:
    """Frames whose brightness is their index."""
    return [np.full((8, 8, 3), index, dtype=np.uint8) for index in range(count)]


def test_camera_windows_get_the_newest_frame_when_the_clock_passes_their_end(monkeypatch):
    """A live camera: each window waits for the clock and keeps the last frame that arrived in it."""
    made = _FakeCamera.install(monkeypatch, _ramp(12), period=0.02)
    video = VideoSource(3, live=True)
    assert video.name == "camera 3" and made[0].delivered == 1  # the frame that checked the camera
    zero = time.monotonic()
    video.start_clock(zero)
    first = video.read(0.0, 0.1)
    assert time.monotonic() - zero >= 0.1
    assert int(first[0, 0, 0]) == made[0].delivered - 1 > 0  # the newest of the ~5 that came
    second = video.read(0.1, 0.2)
    assert int(second[0, 0, 0]) == made[0].delivered - 1 > int(first[0, 0, 0])
    windows = [video.read(k * 0.1, (k + 1) * 0.1) for k in range(2, 10)]
    assert video.exhausted and made[0].delivered == 12 and windows[-1] is None
    video.close()
    assert made[0].released


def test_a_camera_window_already_past_gets_no_frame_at_once(monkeypatch):
    """A window whose end the clock has passed (the session fell behind) returns None without waiting."""
    _FakeCamera.install(monkeypatch, _ramp(50), period=0.02)
    video = VideoSource(0, live=True)
    video.start_clock(time.monotonic() - 5.0)
    assert video.read(0.0, 1.0) is not None  # the frame read when the camera was opened
    started = time.monotonic()
    assert video.read(1.0, 2.0) is None
    assert time.monotonic() - started < 0.5 and not video.exhausted  # not the window's 1 s
    video.close()


@pytest.mark.parametrize(
    ("opened", "frames", "message"),
    [(False, 1, "camera 0: cannot be opened (no such camera, or it is busy)"),
     (True, 0, "camera 0: holds no decodable frame")],
)
def test_camera_that_cannot_deliver_is_a_capture_error(monkeypatch, opened, frames, message):
    """A camera OpenCV cannot open, or one that opens but gives no frame: a one-line CaptureError."""
    _FakeCamera.install(monkeypatch, _ramp(frames), period=0.0, opened=opened)
    with pytest.raises(CaptureError) as error:
        VideoSource(0, live=True)
    assert str(error.value) == message


def test_device_run_with_a_camera_that_does_not_exist(tmp_path, run_dir, capsys):
    """`--camera 99` (no such device here): one line naming the camera, exit 2, nothing created."""
    code, events, err = _device_run(capsys, tmp_path, run_dir, "--camera", "99")
    assert code == 2 and events == []
    assert err == "emofed: error: camera 99: cannot be opened (no such camera, or it is busy)\n"
    assert not (tmp_path / "device").exists()
