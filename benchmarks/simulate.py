"""Time a simulation end to end and measure the peak memory of everything it starts.

Runs `emofed simulate` (default configuration unless overrides are given) as a child
process and samples the resident memory of its whole process tree (CLI, SuperLink,
ServerApp, Ray workers) twice a second. Prints wall time, peak memory, and the final
federated accuracy and macro-F1 from the run directory.

    .venv/bin/python benchmarks/simulate.py                 # the default simulation
    .venv/bin/python benchmarks/simulate.py rounds=10 devices=50
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def _tree_rss(root: psutil.Process) -> int:
    # Ray and the SuperLink start their own sessions; the tree still hangs off the CLI.
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main(overrides: list[str]) -> int:
    """Run one simulation and print its figures; returns the simulation's exit code."""
    out = Path(tempfile.mkdtemp(prefix="emofed-bench-"))
    command = [sys.executable, "-m", "cli", "simulate", f"output.dir={out}", "output.name=run", *overrides]
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(root))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in child.stdout or ():
        print(line, end="", flush=True)
    child.wait()
    done.set()
    sampler.join()
    wall = time.monotonic() - started
    if child.returncode != 0:
        print(f"simulation failed with exit code {child.returncode}")
        return child.returncode
    summary = json.loads((out / "run" / "summary.json").read_text())
    final = summary["final"]
    print()
    print(f"command      : emofed simulate {' '.join(overrides) or '(default configuration)'}")
    print(f"wall time    : {wall:.1f} s (training rounds {summary['training_seconds']:.1f} s)")
    print(f"peak memory  : {peak / 2**30:.2f} GiB (resident, whole process tree)")
    print(f"accuracy     : {final['accuracy']:.3f}   macro-F1 {final['macro_f1']:.3f}   (chance {1 / 7:.3f})")
    print(
        "per modality : face {:.3f}  voice {:.3f}  text {:.3f}".format(
            *(final.get(k) or float("nan") for k in ("acc_face", "acc_voice", "acc_text"))
        )
    )
    print(f"run directory: {out / 'run'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
