"""Device runtime benchmark: per-stage latency of `emofed device run` on one CPU core.

Writes a synthetic recorded session (``simulations.clips``: a ``--seconds`` video of
``--frame-size`` frames at ``--fps``, a 16 kHz WAV and a text line every 4 s), then runs
``emofed device run`` on it as a device user would, as a separate process pinned to one CPU
core (``sched_setaffinity``) with one torch thread, and prints the median and 95th
percentile per window of each stage (capture, preprocess, recognise, policy, express, store),
in wall-clock time and in the process's CPU time (which a busy machine does not inflate), as
a Markdown table. The network's weights do not change its cost: without ``--model`` an
untrained network of ``--config`` is saved as a run directory and used.

    .venv/bin/python benchmarks/device_run.py                  # ~60 s clip, 30 windows
    .venv/bin/python benchmarks/device_run.py --model runs/NAME --clip-out /tmp/clip
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parents[1]
STAGES = ("capture", "preprocess", "recognise", "policy", "express", "store", "total")


def _untrained_run(config: Path, out: Path) -> Path:
    """A run directory holding an untrained network of ``config`` (same cost as a trained one)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from emofed.config import load_config, to_json, to_yaml
    from models import build_model, get_state, shared_state_keys

    torch.manual_seed(0)
    cfg = load_config(config)
    model = build_model(cfg.model, device="cpu")
    keys = shared_state_keys(model)
    arrays = {k: np.ascontiguousarray(v) for k, v in get_state(model, keys).items()}
    out.mkdir(parents=True)
    save_file(arrays, str(out / "model.safetensors"), metadata={"config": to_json(cfg), "keys": ",".join(keys)})
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def _emofed() -> list[str]:
    """The `emofed` console script next to this interpreter (else the module)."""
    script = Path(sys.executable).with_name("emofed")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())"]


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def main(argv: list[str]) -> int:
    """Run the benchmark; print the latency table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="clip length (default 60)")
    parser.add_argument("--window", type=float, default=2.0, help="decision window in seconds (default 2)")
    parser.add_argument("--fps", type=float, default=15.0, help="video frame rate (default 15)")
    parser.add_argument("--frame-size", default="640x480", help="video frame WxH (default 640x480)")
    parser.add_argument("--model", help="a run directory to use (default: an untrained network of --config)")
    parser.add_argument("--config", default=str(APP / "configs" / "default.yaml"), help="model config without --model")
    parser.add_argument("--core", type=int, default=0, help="the CPU core to pin the device process to (default 0)")
    parser.add_argument("--clip-out", help="keep the generated clip in this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))

    from simulations.clips import write_clip

    with tempfile.TemporaryDirectory(prefix="emofed-device-bench-") as tmp:
        work = Path(tmp)
        segment = args.seconds / 5
        schedule = [(e, segment) for e in ("neutral", "happy", "sad", "angry", "neutral")]
        started = time.perf_counter()
        clip = write_clip(
            Path(args.clip_out) if args.clip_out else work / "clip", schedule=schedule, fps=args.fps,
            frame_size=(width, height), seed=args.seed,
        )
        print(f"clip: {clip.seconds:.0f} s, {width}x{height} at {args.fps:g} fps, WAV 16 kHz, text every 4 s "
              f"(written in {time.perf_counter() - started:.1f} s)", flush=True)
        model = Path(args.model) if args.model else _untrained_run(Path(args.config), work / "run")
        summary_file = work / "latency.json"
        command = [
            *_emofed(), "device", "run", "--device-dir", str(work / "device"),
            "--model", str(model), "--video", str(clip.video), "--audio", str(clip.audio), "--text", str(clip.text),
            "--window", str(args.window), "--threads", "1", "--latency-json", str(summary_file),
        ]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=APP, capture_output=True, text=True, preexec_fn=lambda: _pin(args.core), check=False
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        summary = json.loads(summary_file.read_text())
        events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    decisions = [e for e in events if e["type"] == "decision"]
    modalities = {m: sum(m in e["modalities"] for e in decisions) for m in ("face", "voice", "text")}
    print(
        f"{summary['decisions']} decisions over {summary['windows']} windows of {args.window:g} s "
        f"({summary['interventions']} interventions); modality present in "
        + ", ".join(f"{m} {n}" for m, n in modalities.items())
        + f" windows; process wall time {wall:.1f} s (start-up included), one core, one torch thread"
    )
    print()
    print("| stage | median ms | p95 ms | CPU median ms | CPU p95 ms |")
    print("|---|---:|---:|---:|---:|")
    for stage in STAGES:
        f = summary["latency"].get(stage)
        if f:
            print(f"| {stage} | {f['median_ms']:.1f} | {f['p95_ms']:.1f} | {f['cpu_median_ms']:.1f} | {f['cpu_p95_ms']:.1f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n(wall: per window as measured; CPU: the process's CPU time; load average {load:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
