"""`emofed device run`: on-device recognition and emotion management over a camera, a microphone stream or a clip."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import fail

if TYPE_CHECKING:  # the device's modules import torch: the command imports them once its arguments are good
    from device.runtime import RuntimeConfig, SessionReport
    from device.store import EncryptedStore

RUN_HELP = "recognise emotion per window, run the management policy, emit one JSON event per decision"


def add_run_parser(device_sub: argparse._SubParsersAction) -> None:
    """Add `run` to the `emofed device` sub-commands."""
    run = device_sub.add_parser(
        "run", help=RUN_HELP, description=RUN_HELP + "; per-stage latency goes to stderr at the end.",
    )
    run.add_argument("--device-dir", required=True, help="the device's folder: its encrypted store lives in DIR/store")
    run.add_argument(
        "--model", metavar="RUN_OR_FILE",
        help="a run directory of `emofed simulate` or its model.safetensors (default: DIR/model.safetensors, "
        "or the run holding DIR when DIR is RUN/simulated-devices/ID)",
    )
    video = run.add_mutually_exclusive_group()
    video.add_argument("--video", metavar="FILE", help="a video file (any format OpenCV decodes)")
    video.add_argument("--camera", metavar="N", type=int, help="a camera index (live; stop with Ctrl-C or --duration)")
    audio = run.add_mutually_exclusive_group()
    audio.add_argument("--audio", metavar="FILE", help="a WAV (or FLAC/OGG) file, aligned with the video's start")
    audio.add_argument(
        "--audio-stream", metavar="PATH",
        help="live raw PCM, signed 16-bit little-endian, from a named pipe (mkfifo) or file, e.g. fed by "
        "`arecord -q -f S16_LE -r 16000 -c 1 -t raw`; ends when its writer closes it (not with --video FILE)",
    )
    run.add_argument("--audio-rate", metavar="HZ", type=int, help="sample rate of --audio-stream (default 16000)")
    run.add_argument(
        "--audio-channels", metavar="N", type=int,
        help="interleaved channels of --audio-stream, mixed to mono (default 1)",
    )
    run.add_argument(
        "--text", metavar="FILE", help="text lines ('-': stdin); '[SECONDS] text' places a line in time, "
        "plain lines of a file fill windows in order",
    )
    run.add_argument("--window", type=float, default=2.0, help="seconds per decision window (default 2.0)")
    run.add_argument(
        "--feedback", metavar="FILE",
        help="feedback lines 'RESPONSE' (answers the next intervention) or 'DECISION_ID RESPONSE', "
        "RESPONSE one of helped, accepted, dismissed, none ('-': stdin)",
    )
    key = run.add_mutually_exclusive_group()
    key.add_argument("--passphrase-file", metavar="F", help="derive the store key from the first line of F (scrypt)")
    key.add_argument(
        "--key-file", metavar="F",
        help="32-byte store key file, owner-only (default: DIR/keys/store.key, created on first use)",
    )
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    run.add_argument(
        "--switch-off", action="append", default=[], metavar="ACTION", help="never suggest ACTION (kept in the store)",
    )
    run.add_argument("--switch-on", action="append", default=[], metavar="ACTION", help="allow ACTION again")
    run.add_argument(
        "--policy-config", metavar="DIR", help="folder with actions/messages/expressions.yaml (default configs/policy)",
    )
    run.add_argument("--latency-json", metavar="FILE", help="also write the session's counts and per-stage latency as JSON")
    run.add_argument(
        "--silence-db", type=float, default=-50.0, help="audio below this RMS level (dBFS) is no voice (default -50)",
    )
    run.set_defaults(func=cmd_device_run)


def _default_model(device_dir: Path) -> Path | None:
    """The run or folder whose model the device runs when ``--model`` is not given."""
    from device.layout import MODEL_FILE

    if (device_dir / MODEL_FILE).is_file():
        return device_dir
    # A simulated device: RUN/simulated-devices/ID.
    if device_dir.resolve().parent.name == "simulated-devices":
        return device_dir.resolve().parent.parent
    return None


def _passphrase(path: str) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"--passphrase-file {path}: file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"--passphrase-file {path}: not UTF-8 text") from None
    if not lines or not lines[0]:
        raise ValueError(f"--passphrase-file {path}: the first line is empty")
    return lines[0]


def _argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of arguments, before anything is opened."""
    if all(x is None for x in (args.video, args.camera, args.audio, args.audio_stream, args.text)):
        return "give at least one input: --video FILE or --camera N, --audio FILE or --audio-stream PATH, --text FILE"
    if args.audio_stream is None and (args.audio_rate is not None or args.audio_channels is not None):
        return "--audio-rate and --audio-channels describe --audio-stream; an audio file says its own"
    if args.audio_stream is not None and args.video is not None:
        return ("--audio-stream is timed by the wall clock and --video FILE by its frames; "
                "use --camera N with the stream, or --audio FILE with the video")
    if args.text == "-" and args.feedback == "-":
        return "--text and --feedback cannot both read stdin; give one of them a file"
    if args.threads < 1:
        return f"--threads must be >= 1. Found {args.threads}"
    return None


def _open_inputs(args: argparse.Namespace, config: RuntimeConfig, sources: list[Any]) -> tuple[Any, Any, Any]:
    """The video, audio and text sources the arguments name (None where absent).

    Every opened video and audio source is appended to ``sources`` at once, so the caller
    closes it even if a later one fails.
    """
    from device.audio_stream import DEFAULT_STREAM_BUFFER_S, AudioStream
    from device.capture import AudioSource, LiveLines, TextSource, VideoSource, read_lines

    video = None
    if args.video is not None or args.camera is not None:
        video = VideoSource(args.video if args.camera is None else args.camera, live=args.camera is not None)
        sources.append(video)
    audio: AudioSource | AudioStream | None = None
    if args.audio is not None:
        audio = AudioSource(args.audio)
    elif args.audio_stream is not None:
        # A window is read only once it has ended: room for one, and as much again of slack.
        audio = AudioStream(
            args.audio_stream, sample_rate=16000 if args.audio_rate is None else args.audio_rate,
            channels=1 if args.audio_channels is None else args.audio_channels,
            buffer_s=config.window_s + DEFAULT_STREAM_BUFFER_S,
        )
    if audio is not None:
        sources.append(audio)
    text = None
    if args.text is not None:
        if args.text == "-" and _live(args):
            text = TextSource([], window=config.window_s, live=LiveLines(sys.stdin))
        else:
            text = TextSource(read_lines(args.text, what="text"), window=config.window_s,
                              name="text on stdin" if args.text == "-" else f"text {args.text}")
    return video, audio, text


def _live(args: argparse.Namespace) -> bool:
    """Whether the session follows the wall clock (a camera or an audio stream)."""
    return args.camera is not None or args.audio_stream is not None


def _read_feedback(args: argparse.Namespace, responses: list[str]) -> tuple[list[Any], Any]:
    """Feedback lines from a file, or live feedback from stdin."""
    from device.capture import LiveLines, read_feedback, read_lines

    if args.feedback == "-" and _live(args):
        return [], LiveLines(sys.stdin)
    if args.feedback is not None:
        return read_feedback(read_lines(args.feedback, what="feedback"), responses), None
    return [], None


def _open_store(device_dir: Path, args: argparse.Namespace, passphrase: str | None) -> tuple[EncryptedStore, bool]:
    """Open (or create) the device's store; and whether it was created now.

    Raises
    ------
    device.runtime.DeviceRuntimeError
        If the key file is missing for an existing store, unreadable, accessible by others
        or not 32 bytes, or the passphrase is empty.
    """
    from device.layout import has_store, open_device_store, store_key_path
    from device.runtime import DeviceRuntimeError

    key_file = None if passphrase is not None else Path(args.key_file) if args.key_file else store_key_path(device_dir)
    new_key = key_file is not None and not key_file.exists()
    created = not has_store(device_dir)
    try:
        store = open_device_store(device_dir, passphrase=passphrase, key_file=key_file)
    except (PermissionError, FileNotFoundError, ValueError) as err:
        raise DeviceRuntimeError(str(err).splitlines()[0]) from None
    if new_key and key_file is not None and key_file.exists():
        print(f"emofed device: created store key file {key_file} (owner-only; the store cannot be opened without it)",
              file=sys.stderr, flush=True)
    return store, created


def _print_report(report: SessionReport, threads: int) -> None:
    """The session's warnings, counts and latency table, on stderr."""
    for warning in report.warnings:
        print(f"emofed device: warning: {warning}", file=sys.stderr)
    notes = ", ".join(f"{k} {v}" for k, v in sorted(report.notes.items()))
    print(
        f"emofed device: {report.decisions} decisions ({report.interventions} interventions, "
        f"{report.feedback} feedback applied) over {report.windows} windows"
        + (f", {report.skipped_windows} without a usable modality" if report.skipped_windows else "")
        + (f"; {notes}" if notes else ""),
        file=sys.stderr,
    )
    print(f"latency per window on {threads} thread(s):\n{report.table}", file=sys.stderr, flush=True)


def _write_latency_json(path: str, report: SessionReport, *, threads: int, window_s: float) -> int:
    """Write the session's counts and latency to ``path``; the exit code."""
    summary = {
        "windows": report.windows, "decisions": report.decisions, "interventions": report.interventions,
        "feedback": report.feedback, "skipped_windows": report.skipped_windows, "notes": report.notes,
        "threads": threads, "window_s": window_s, "latency": report.latency,
    }
    try:
        Path(path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        return fail(f"--latency-json {path}: {err.strerror or err}", code=1)
    return 0


def cmd_device_run(args: argparse.Namespace) -> int:
    """Run the device: capture, recognise, manage, express; feedback; latency at the end."""
    device_dir = Path(args.device_dir)
    problem = _argument_error(args)
    if problem is not None:
        return fail(problem)
    model_source = Path(args.model) if args.model else _default_model(device_dir)
    if model_source is None:
        return fail(f"give --model RUN_OR_FILE (no model.safetensors in {device_dir})")
    from device.runtime import RuntimeConfig

    try:
        config = RuntimeConfig(window_s=args.window, silence_db=args.silence_db, duration_s=args.duration)
        passphrase = _passphrase(args.passphrase_file) if args.passphrase_file else None
    except ValueError as err:
        return fail(str(err))

    # Heavy imports once the arguments are known to be good.
    import torch

    from device.audio_stream import AudioStream
    from device.capture import CaptureError
    from device.recognition import ModelLoadError, Recogniser, apply_personal_layers, load_global_model
    from device.runtime import DeviceRuntimeError, SessionLock, dumps, load_policy, run_session
    from device.store import StoreError, WrongStoreKey
    from emofed.config import ConfigError
    from policy.rules import load_policy_config

    torch.set_num_threads(args.threads)
    sources: list[Any] = []
    store = None
    try:
        # Inputs and the model first: a bad input never creates or touches the store.
        policy_config = load_policy_config(args.policy_config)
        for action in [*args.switch_off, *args.switch_on]:
            if action not in policy_config.action_names:
                raise ConfigError(f"unknown action {action!r}; known: {', '.join(policy_config.action_names)}")
        video, audio, text = _open_inputs(args, config, sources)
        feedback, live_feedback = _read_feedback(args, list(policy_config.feedback.rewards))
        loaded = load_global_model(model_source)
        recogniser = Recogniser(loaded.model, loaded.config.model, silence_db=config.silence_db)
        with SessionLock(device_dir):
            store, created = _open_store(device_dir, args, passphrase)
            apply_personal_layers(loaded, store)
            policy = load_policy(store, policy_config)
            for action in args.switch_off:
                policy.set_enabled(action, False)
            for action in args.switch_on:
                policy.set_enabled(action, True)
            personal = (f"personal layers {', '.join(sorted({k.split('.')[0] for k in loaded.personal}))}"
                        if loaded.personal else "no personal layers")
            print(
                f"emofed device: {'new' if created else 'opened'} store {store.path}; model {loaded.source} "
                f"({personal}); policy at decision {policy.state_dict()['step']}",
                file=sys.stderr, flush=True,
            )
            if isinstance(audio, AudioStream):
                print(f"emofed device: reading {audio.name} ({audio.sample_rate} Hz, {audio.channels} channel(s), "
                      "s16le); the session ends when its writer closes it, after --duration or on Ctrl-C",
                      file=sys.stderr, flush=True)
            report = run_session(
                recogniser=recogniser, policy=policy, store=store, config=config, video=video, audio=audio,
                text=text, feedback=feedback, live_feedback=live_feedback,
                emit=lambda event: print(dumps(event), flush=True),
            )
    except (CaptureError, ConfigError, DeviceRuntimeError, ModelLoadError, ValueError) as err:
        return fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except WrongStoreKey as err:
        return fail(str(err).splitlines()[0])
    except (StoreError, OSError) as err:
        return fail(str(err).splitlines()[0] if str(err) else type(err).__name__, code=1)
    except KeyboardInterrupt:
        return fail("interrupted before the session started", code=130)
    finally:
        for source in sources:
            source.close()
        if store is not None:
            store.close()
    _print_report(report, args.threads)
    if args.latency_json:
        return _write_latency_json(args.latency_json, report, threads=args.threads, window_s=config.window_s)
    return 0
