"""The device runtime: capture → recognise → manage → express, one time window at a time.

For every window of ``window_s`` seconds the runtime takes the frame nearest the window's
middle, the window's audio and its text lines (``device.capture``), preprocesses them as in
training (``models``: OpenCV face crop, torchaudio log-mel, tokenizer), runs the device's
model on the modalities present (the fusion masks out the others), lets the management
policy (``policy.rules``) decide, and emits one JSON event per decision. Feedback lines
update the policy. What the device keeps (policy state, personal layers) lives in its
encrypted store (``device.store``) under ``<device-dir>/store``; the policy state is written
after every window, atomically, so a crash or an interrupt loses at most one window.

A session with a live source (a camera, an audio stream) is live: its windows follow the
wall clock from the session's start, each is read once the clock has passed its end, and its
decisions are stamped with the wall clock. It ends when every source is exhausted (the camera
stops delivering, the stream's writer closes it, stdin closes, a text file's lines are used),
after ``duration_s``, or on Ctrl-C.

A modality counts as present in a window only when it carries a signal: a frame in which
OpenCV detects a face (a camera pointed at a wall is not a face), audio louder than
``silence_db`` dBFS (RMS), a non-blank text. A window with none of them makes no decision.


The network's side (weights, personal layers, preprocessing) is ``device.recognition``.
Latency is measured per window and stage: ``capture`` (decode the frame, read the audio and
text), ``preprocess``, ``recognise`` (the network), ``policy`` (bandit and safety rules),
``express`` (message retrieval, avatar face and writing the event) and ``store`` (encrypt
and write the policy state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device.audio_stream import AudioStream
from device.capture import (
    AudioSource,
    CaptureError,
    FeedbackLine,
    LiveLines,
    TextSource,
    VideoSource,
    parse_feedback,
)
from device.layout import (
    MESSAGE_EMBEDDINGS_OBJECT,
    POLICY_PRIOR_OBJECT,
    POLICY_STATE_OBJECT,
    runtime_lock_path,
)
from device.recognition import Recogniser
from device.store import EncryptedStore
from models.labels import EMOTIONS
from policy.expression import MiniLMEncoder, TextEmbedder
from policy.rules import Decision, Policy, PolicyConfig
from policy.state import PolicyStatistics

try:  # POSIX advisory locks; elsewhere two sessions must not share a device folder
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EVENT_KEYS",
    "STAGES",
    "CachedEmbedder",
    "DeviceRuntimeError",
    "RuntimeConfig",
    "SessionLock",
    "SessionReport",
    "StageTimer",
    "dumps",
    "load_policy",
    "run_session",
]

logger = logging.getLogger(__name__)

_EMBEDDED: dict[tuple[str, str], np.ndarray] = {}  # (encoder, text) -> embedding, this process

STAGES = ("capture", "preprocess", "recognise", "policy", "express", "store")
EVENT_KEYS = (
    "type", "id", "window", "timestamp", "modalities", "emotion", "by_modality", "smoothed",
    "valence", "arousal", "action", "rule", "message", "message_id", "expression",
)


class DeviceRuntimeError(RuntimeError):
    """The device runtime cannot start or go on; the message is one line."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How a session cuts and reads its inputs."""

    window_s: float = 2.0  # one decision per window
    silence_db: float = -50.0  # audio quieter than this (RMS, dBFS) counts as no voice
    duration_s: float | None = None  # stop after this many seconds (live sessions)

    def __post_init__(self) -> None:
        """Check ranges once, at the edge."""
        if not 0.1 <= self.window_s <= 3600.0:
            raise ValueError(f"'window' must be in [0.1, 3600] seconds. Found {self.window_s}.")
        if not -120.0 <= self.silence_db <= 0.0:
            raise ValueError(f"'silence_db' must be in [-120, 0]. Found {self.silence_db}.")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"'duration' must be > 0 seconds. Found {self.duration_s}.")


# -- timing ---------------------------------------------------------------------------------


class StageTimer:
    """Wall-clock and CPU seconds per stage in each window; median and 95th percentile over windows.

    CPU time is the process's (``time.process_time``: every thread, OpenCV's included). On
    a core of its own a stage's wall time is its CPU time plus I/O waits (``store``'s
    fsync); on a shared machine the wall time also holds the time spent waiting for a core.
    """

    def __init__(self, stages: Sequence[str] = STAGES) -> None:
        self.stages = tuple(stages)
        self.samples: dict[str, list[tuple[float, float]]] = {s: [] for s in self.stages}
        self._current: dict[str, tuple[float, float]] = {}

    def add(self, stage: str, wall: float, cpu: float) -> None:
        """Add ``wall`` and ``cpu`` seconds to ``stage`` in the current window."""
        old_wall, old_cpu = self._current.get(stage, (0.0, 0.0))
        self._current[stage] = (old_wall + wall, old_cpu + cpu)

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Count the time of the ``with`` block towards ``stage``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - wall, time.process_time() - cpu)

    def discard_window(self) -> None:
        """Forget the current window (it made no decision)."""
        self._current = {}

    def end_window(self) -> None:
        """Close the current window: every stage gets a sample (0 where it did not run)."""
        for stage in self.stages:
            self.samples[stage].append(self._current.get(stage, (0.0, 0.0)))
        self._current = {}

    def summary(self) -> dict[str, dict[str, float]]:
        """``stage -> {"median_ms", "p95_ms", "cpu_median_ms", "cpu_p95_ms"}``, and ``total``.

        Percentiles interpolate linearly between windows (NumPy's default).
        """
        series = dict(self.samples)
        if any(series.values()):
            series["total"] = [
                (sum(w for w, _ in row), sum(c for _, c in row))
                for row in zip(*self.samples.values(), strict=True)
            ]
        out = {}
        for stage, values in series.items():
            if values:
                ms = np.asarray(values) * 1000.0  # (windows, 2)
                out[stage] = {
                    "median_ms": float(np.median(ms[:, 0])),
                    "p95_ms": float(np.percentile(ms[:, 0], 95)),
                    "cpu_median_ms": float(np.median(ms[:, 1])),
                    "cpu_p95_ms": float(np.percentile(ms[:, 1], 95)),
                }
        return out

    def format_table(self) -> str:
        """:meth:`summary` as a text table."""
        rows = [f"{'stage':<11}{'median ms':>11}{'p95 ms':>9}{'cpu median':>12}{'cpu p95':>9}"]
        for stage, f in self.summary().items():
            rows.append(
                f"{stage:<11}{f['median_ms']:>11.1f}{f['p95_ms']:>9.1f}{f['cpu_median_ms']:>12.1f}{f['cpu_p95_ms']:>9.1f}"
            )
        return "\n".join(rows)


class _Timed:
    """Wrap a callable so that its time counts towards one stage (and is remembered)."""

    def __init__(self, function: Callable[..., Any], timer: StageTimer, stage: str) -> None:
        self._function, self._timer, self._stage = function, timer, stage
        self.elapsed = (0.0, 0.0)  # wall, cpu

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self._function(*args, **kwargs)
        finally:
            spent = (time.perf_counter() - wall, time.process_time() - cpu)
            self.elapsed = (self.elapsed[0] + spent[0], self.elapsed[1] + spent[1])
            self._timer.add(self._stage, *spent)


# -- the session ------------------------------------------------------------------------------


@dataclass
class SessionReport:
    """What one session did."""

    windows: int = 0  # windows read
    decisions: int = 0
    interventions: int = 0
    feedback: int = 0  # feedback lines applied
    skipped_windows: int = 0  # windows with no usable modality
    notes: dict[str, int] = field(default_factory=dict)  # "face:not_detected" -> count
    warnings: list[str] = field(default_factory=list)
    first_decision: int | None = None
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    table: str = ""  # the latency as a text table


def _rounded(values: np.ndarray) -> dict[str, float]:
    return {e: round(float(v), 4) for e, v in zip(EMOTIONS, values, strict=True)}


def _event(decision: Decision, index: int, start: float, end: float, present: list[str],
           probabilities: np.ndarray, alone: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        "type": "decision",
        "id": decision.id,
        "window": {"index": index, "start_s": round(start, 3), "end_s": round(end, 3)},
        "timestamp": round(decision.timestamp, 3),
        "modalities": present,
        "emotion": {"label": EMOTIONS[int(np.argmax(probabilities))], "probabilities": _rounded(probabilities)},
        "by_modality": {m: EMOTIONS[int(np.argmax(p))] for m, p in alone.items()},
        "smoothed": {e: round(v, 4) for e, v in decision.probabilities.items()},
        "valence": round(decision.valence, 4),
        "arousal": round(decision.arousal, 4),
        "action": decision.action,
        "rule": decision.rule,
        "message": decision.message,
        "message_id": decision.message_id,
        "expression": {k: round(v, 4) for k, v in decision.expression.items()},
    }


class _Feedback:
    """Feedback lines matched to decisions, and applied to the policy."""

    def __init__(self, policy: Policy, lines: Sequence[FeedbackLine], live: LiveLines | None,
                 emit: Callable[[dict[str, Any]], None], report: SessionReport) -> None:
        self.policy, self.live, self.emit, self.report = policy, live, emit, report
        self.quiet = policy.config.safety.quiet_action
        self.by_id = {line.decision: line for line in lines if line.decision is not None}
        self.plain = [line for line in lines if line.decision is None]
        self.answered: set[int] = set()
        self.unanswered: list[int] = []  # interventions of this session awaiting feedback (live)

    def apply(self, decision_id: int, response: str, source: str) -> None:
        try:
            reward = self.policy.feedback(decision_id, response)
        except ValueError as err:
            self.report.warnings.append(f"{source}: {err}")
            return
        self.answered.add(decision_id)
        self.report.feedback += 1
        self.emit({"type": "feedback", "decision": decision_id, "response": response, "reward": round(reward, 4)})

    def earlier(self, first_id: int) -> None:
        """Feedback naming decisions of earlier sessions, kept pending in the policy state."""
        for decision_id in sorted(k for k in self.by_id if k < first_id):
            line = self.by_id.pop(decision_id)
            self.apply(decision_id, line.response, f"feedback line {line.line}")

    def after(self, decision: Decision) -> None:
        """Match file feedback to a decision just made (by id, else the next plain line)."""
        line = self.by_id.pop(decision.id, None)
        if line is None and decision.action != self.quiet and self.plain:
            line = self.plain.pop(0)
        if line is not None:
            self.apply(decision.id, line.response, f"feedback line {line.line}")
        elif decision.action != self.quiet:
            self.unanswered.append(decision.id)

    def poll(self) -> None:
        """Apply live feedback that arrived since the last window."""
        if self.live is None:
            return
        responses = list(self.policy.config.feedback.rewards)
        for text in self.live.drain():
            try:
                line = parse_feedback(text, 0, responses)
            except CaptureError as err:
                self.report.warnings.append(str(err).replace("line 0", "on stdin"))
                continue
            if line is None:
                continue
            if line.decision is not None:
                self.apply(line.decision, line.response, "feedback on stdin")
            else:
                waiting = [d for d in self.unanswered if d not in self.answered]
                if not waiting:
                    self.report.warnings.append(f"feedback {line.response!r} on stdin: no intervention to answer")
                    continue
                self.apply(waiting[-1], line.response, "feedback on stdin")

    def finish(self) -> None:
        """Warn about file feedback that matched nothing."""
        if self.plain:
            self.report.warnings.append(f"{len(self.plain)} feedback line(s) had no intervention to answer")
        for decision_id, line in self.by_id.items():
            self.report.warnings.append(f"feedback line {line.line}: no decision {decision_id} in this session")


def _inside(policy: Policy) -> tuple[float, float]:
    """Wall and CPU seconds spent so far in the timed message retrieval and avatar."""
    select, avatar = policy.bank.select, policy.avatar
    return (select.elapsed[0] + avatar.elapsed[0], select.elapsed[1] + avatar.elapsed[1])  # type: ignore[attr-defined]


def _check_inputs(video: VideoSource | None, audio: AudioSource | AudioStream | None, text: TextSource | None) -> None:
    """Refuse a session without input, or one that mixes wall-clock and file time."""
    if video is None and audio is None and text is None:
        raise ValueError("Give at least one input: video or camera, audio, text.")
    if audio is not None and audio.live and video is not None and not video.live:
        raise ValueError("an audio stream is timed by the wall clock and a video file by its frames; "
                         "give the stream with a camera, or the video with an audio file")


class _Session:
    """One session's windows: capture, recognise, decide, express, store.

    ``base`` is the Unix time the session's decisions count from: a recorded clip is
    replayed as if it started at ``base``; a live session stamps the wall clock, never
    before the last decision (a clock set back).
    """

    def __init__(self, *, recogniser: Recogniser, policy: Policy, store: EncryptedStore, config: RuntimeConfig,
                 video: VideoSource | None, audio: AudioSource | AudioStream | None, text: TextSource | None,
                 matcher: _Feedback, emit: Callable[[dict[str, Any]], None], clock: Callable[[], float],
                 base: float, timer: StageTimer, report: SessionReport) -> None:
        self.recogniser, self.policy, self.store, self.config = recogniser, policy, store, config
        self.video, self.audio, self.text = video, audio, text
        self.matcher, self.emit, self.clock, self.base = matcher, emit, clock, base
        self.timer, self.report = timer, report
        self.live_sources = [s for s in (video, audio) if s is not None and s.live]

    def start_clock(self) -> None:
        """Start the live sources on one clock, from now (not from when they were opened)."""
        zero = time.monotonic()
        for source in self.live_sources:
            source.start_clock(zero)

    def run(self) -> None:
        """Run windows until one ends the session."""
        index = 0
        while not self.window(index):
            index += 1

    def window(self, index: int) -> bool:
        """Run window ``index``; whether the session ends with it."""
        start, end = index * self.config.window_s, (index + 1) * self.config.window_s
        if self.config.duration_s is not None and start >= self.config.duration_s:
            return True
        with self.timer.measure("capture"):
            frame = self.video.read(start, end) if self.video is not None else None
            samples = self.audio.read(start, end) if self.audio is not None else None
            line = self.text.read(index) if self.text is not None else None
        self.matcher.poll()
        done = self._exhausted(index, end)
        if frame is None and samples is None and line is None:
            self.timer.discard_window()
            return done
        self.report.windows += 1
        with self.timer.measure("preprocess"):
            rate = self.audio.sample_rate if self.audio else None
            prepared = self.recogniser.prepare(frame, samples, rate, line)
        for note in prepared.notes:
            self.report.notes[note] = self.report.notes.get(note, 0) + 1
        if not prepared.present:
            self.report.skipped_windows += 1
            self.timer.discard_window()
            return done
        with self.timer.measure("recognise"):
            probabilities, alone = self.recogniser(prepared)
        decision = self._decide(probabilities, end)
        with self.timer.measure("express"):
            self.emit(_event(decision, index, start, end, prepared.present, probabilities, alone))
        self._count(decision)
        with self.timer.measure("store"):
            self.store.put_json(POLICY_STATE_OBJECT, self.policy.state_dict())
        self.timer.end_window()
        return done

    def _exhausted(self, index: int, end: float) -> bool:
        """Whether every source is used up once window ``index`` (ending at ``end``) is read."""
        video, audio, text = self.video, self.audio, self.text
        return (
            (video is None or video.exhausted)
            and (audio is None or audio.done_at(end))
            and (text is None or (index + 1 >= text.windows_needed and (not text.live or text.exhausted)))
        )

    def _decide(self, probabilities: np.ndarray, end: float) -> Decision:
        """The policy's decision on one window, its time split into "policy" and "express"."""
        if self.live_sources:
            timestamp = max(self.clock(), self.base)
            self.base = timestamp
        else:
            timestamp = self.base + end
        before = _inside(self.policy)
        wall, cpu = time.perf_counter(), time.process_time()
        decision = self.policy.decide(timestamp, probabilities)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = _inside(self.policy)
        self.timer.add("policy", wall - (after[0] - before[0]), cpu - (after[1] - before[1]))
        return decision

    def _count(self, decision: Decision) -> None:
        """Count a decision and match file feedback to it."""
        self.report.decisions += 1
        self.report.interventions += decision.action != self.matcher.quiet
        if self.report.first_decision is None:
            self.report.first_decision = decision.id
        self.matcher.after(decision)


def run_session(
    *,
    recogniser: Recogniser,
    policy: Policy,
    store: EncryptedStore,
    config: RuntimeConfig,
    video: VideoSource | None = None,
    audio: AudioSource | AudioStream | None = None,
    text: TextSource | None = None,
    feedback: Sequence[FeedbackLine] = (),
    live_feedback: LiveLines | None = None,
    emit: Callable[[dict[str, Any]], None],
    clock: Callable[[], float] = time.time,
) -> SessionReport:
    """Run windows until the inputs are exhausted (or ``duration_s``, or Ctrl-C).

    Parameters
    ----------
    recogniser, policy, store : Recogniser, Policy, EncryptedStore
        The device's network, its policy (already loaded from the store) and the store.
    config : RuntimeConfig
        Window length, silence level, duration.
    video, audio, text : sources, optional
        At least one is needed. A camera or an audio stream makes the session live; a live
        audio stream cannot go with a video file (file time against wall-clock time).
    feedback : sequence of FeedbackLine
        From a feedback file: by decision id, or plain (the next interventions, in order).
    live_feedback : LiveLines, optional
        Feedback typed while the session runs (plain lines answer the latest intervention).
    emit : callable
        Receives each event (a JSON-able dict).
    clock : callable
        Unix time; a recorded clip is replayed as if it started now (or right after the
        policy's last decision, if that is later).

    Returns
    -------
    SessionReport
        Counts, warnings and per-stage latency.

    Raises
    ------
    ValueError
        If no input is given, or an audio stream comes with a video file.
    CaptureError
        If an input turns out to be corrupt part-way (the state of every finished window
        is saved).
    """
    _check_inputs(video, audio, text)
    timer = StageTimer()
    report = SessionReport()
    # Message retrieval and the avatar's face run inside Policy.decide; timing them there
    # splits "policy" (bandit, rules) from "express".
    policy.bank.select = _Timed(policy.bank.select, timer, "express")  # type: ignore[method-assign]
    policy.avatar = _Timed(policy.avatar, timer, "express")  # type: ignore[method-assign]
    state = policy.state_dict()
    base = max(clock(), float(state["last_decision"] or 0.0))
    matcher = _Feedback(policy, feedback, live_feedback, emit, report)
    matcher.earlier(int(state["step"]))
    if report.feedback:
        store.put_json(POLICY_STATE_OBJECT, policy.state_dict())
    session = _Session(
        recogniser=recogniser, policy=policy, store=store, config=config, video=video, audio=audio, text=text,
        matcher=matcher, emit=emit, clock=clock, base=base, timer=timer, report=report,
    )
    session.start_clock()
    try:
        session.run()
    except KeyboardInterrupt:
        report.warnings.append("interrupted; the state of every finished window is saved")
    finally:
        matcher.poll()
        matcher.finish()
        if isinstance(audio, AudioStream):
            report.warnings.extend(audio.warnings)
        store.put_json(POLICY_STATE_OBJECT, policy.state_dict())
        report.latency = timer.summary()
        report.table = timer.format_table()
    return report


# -- one device session, from folders to events -------------------------------------------------


class SessionLock:
    """An exclusive lock on a device folder for one session (``fcntl.flock``)."""

    def __init__(self, device_dir: Path) -> None:
        self.path = runtime_lock_path(device_dir)
        self._fd: int | None = None

    def __enter__(self) -> SessionLock:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                raise DeviceRuntimeError(
                    f"another `emofed device run` is using {self.path.parent}; wait for it to end"
                ) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CachedEmbedder:
    """A text encoder that embeds each text once: per process, and across sessions in the store.

    Building the message bank embeds its ~100 fixed texts (messages and queries), seconds on
    a busy core at every start. Their vectors are kept in the device's store (object
    ``message_embeddings``, with the encoder's name) and reused while texts and encoder stay
    the same; changed texts are embedded afresh.

    Parameters
    ----------
    encoder : callable
        ``texts -> (N, E)``; its ``path`` attribute, if any, names it.
    store : EncryptedStore
        The device's store.
    """

    def __init__(self, encoder: TextEmbedder, store: EncryptedStore) -> None:
        self.encoder, self.store = encoder, store
        self.name = str(getattr(encoder, "path", type(encoder).__name__))
        self._known: dict[str, np.ndarray] = {}
        if MESSAGE_EMBEDDINGS_OBJECT in store:
            arrays = store.get_arrays(MESSAGE_EMBEDDINGS_OBJECT)
            meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
            if meta.get("encoder") == self.name and len(meta["texts"]) == len(arrays["vectors"]):
                self._known = dict(zip(meta["texts"], arrays["vectors"], strict=True))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings (N, E) of ``texts``, computing only the unknown ones."""
        if not texts:
            return self.encoder(texts)
        wanted = list(dict.fromkeys(texts))
        changed = False
        for text in wanted:
            if text not in self._known and (self.name, text) in _EMBEDDED:
                self._known[text], changed = _EMBEDDED[(self.name, text)], True
        missing = [t for t in wanted if t not in self._known]
        if missing:
            vectors = np.asarray(self.encoder(missing), dtype=np.float32)
            for text, vector in zip(missing, vectors, strict=True):
                self._known[text] = _EMBEDDED[(self.name, text)] = vector
            changed = True
        if changed:
            meta = json.dumps({"encoder": self.name, "texts": wanted}).encode("utf-8")
            self.store.put_arrays(MESSAGE_EMBEDDINGS_OBJECT, {
                "vectors": np.stack([self._known[t] for t in wanted]),  # (N, E)
                "meta": np.frombuffer(meta, dtype=np.uint8),
            })
        return np.stack([self._known[t] for t in texts]).astype(np.float64)


def load_policy(store: EncryptedStore, config: PolicyConfig, *, encoder: TextEmbedder | None = None) -> Policy:
    """Build the device's policy from the state in its store (or a fresh one).

    Parameters
    ----------
    store : EncryptedStore
        The device's store (policy state, cached message embeddings).
    config : PolicyConfig
        The action catalogue, rules, bandit and message bank.
    encoder : callable, optional
        Message encoder; default the packaged MiniLM (``policy.expression``).

    Raises
    ------
    DeviceRuntimeError
        If the stored state does not fit the policy configuration.
    device.store.StoreTampered
        If a stored object fails authentication.
    """
    state = store.get_json(POLICY_STATE_OBJECT) if POLICY_STATE_OBJECT in store else None
    embedder = CachedEmbedder(encoder if encoder is not None else MiniLMEncoder(), store)
    try:
        policy = Policy(config, encoder=embedder, state=state)
    except (ValueError, KeyError, TypeError) as err:
        raise DeviceRuntimeError(f"the policy state in the device store does not fit the policy: {err}") from None
    if POLICY_PRIOR_OBJECT in store:
        # The federation's latest prior (policy.federated); the device's own statistics stay.
        try:
            policy.set_prior(PolicyStatistics.from_dict(store.get_json(POLICY_PRIOR_OBJECT)))
        except (ValueError, KeyError, TypeError) as err:
            raise DeviceRuntimeError(f"the policy prior in the device store does not fit the policy: {err}") from None
    return policy


def dumps(event: Mapping[str, Any]) -> str:
    """One event as one JSON line."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
