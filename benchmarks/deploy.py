"""Wall time of a deployed 2-round run on loopback, with and without SecAgg+.

Builds one deployment (CA and SuperLink certificate, three enrolled devices holding
the smoke configuration's synthetic data) and serves the same run twice, same seed and
same devices, through the real commands: `emofed server start` (TLS and SuperNode
authentication) and three `emofed device start`, each a separate process group. The
first run is plain FedAvg with device- and user-level DP, the second adds SecAgg+.
Prints wall time (server start to run directory written) and per-round seconds.

    .venv/bin/python benchmarks/deploy.py                 # smoke config, 2 rounds
    .venv/bin/python benchmarks/deploy.py rounds=3        # extra overrides for both runs
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emofed.flower import free_port  # noqa: E402

SMOKE = ROOT / "configs" / "smoke.yaml"
EMOFED = [sys.executable, "-m", "cli"]
DEVICES = 3
MODES = {
    "DP, no SecAgg+": ["privacy.user.enabled=true", "privacy.secagg.enabled=false"],
    "DP + SecAgg+": ["privacy.user.enabled=true", "privacy.secagg.enabled=true"],
}


def _run(command: list[str]) -> None:
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)


def _setup(work: Path) -> list[Path]:
    _run([*EMOFED, "data", "synth", "--config", str(SMOKE), "--out", str(work / "fed")])
    _run([*EMOFED, "certs", "--out", str(work / "coord" / "certs")])
    for i in range(DEVICES):
        _run([*EMOFED, "device", "enroll", f"dev{i}", "--device-dir", str(work / "devices" / f"dev{i}"),
              "--coordinator", str(work / "coord")])
    meta = json.loads((work / "fed" / "federation.json").read_text())
    return [work / "fed" / d for d in meta["devices"]]


def _start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def serve(work: Path, data: list[Path], name: str, overrides: list[str]) -> dict[str, object]:
    """One deployed run; its wall time and per-round seconds."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        server = _start([
            *EMOFED, "server", "start", "--config", str(SMOKE), "--home", str(work / "coord"), "--host", "127.0.0.1",
            "--port", str(port), "--wait", "300", f"output.dir={work / 'runs'}", f"output.name={name}", *overrides,
        ], work / f"{name}.server.log")
        procs.append(server)
        for i, folder in enumerate(data):
            procs.append(_start([
                *EMOFED, "device", "start", "--data", str(folder), "--device-dir", str(work / "devices" / f"dev{i}"),
                "--superlink", f"127.0.0.1:{port}", "--ca", str(work / "coord" / "certs" / "ca.crt"),
            ], work / f"{name}.dev{i}.log"))
        code = server.wait(timeout=3600)
        wall = time.monotonic() - started
    finally:
        _stop(procs)
    if code != 0:
        raise SystemExit(f"{name}: server exited with {code}; see {work / f'{name}.server.log'}")
    run = work / "runs" / name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "wall": wall,
        "training": summary["training_seconds"],
        "rounds": [r["seconds"] for r in rows],
        "accuracy": summary["final"]["accuracy"],
        "epsilon_user": summary["privacy"]["user"]["epsilon"],
    }


def main(extra: list[str]) -> int:
    """Set up once, serve both modes, print the table."""
    work = Path(tempfile.mkdtemp(prefix="emofed-deploy-bench-"))
    print(f"working in {work}", flush=True)
    data = _setup(work)
    results = {}
    for index, (label, overrides) in enumerate(MODES.items()):
        print(f"serving: {label} ...", flush=True)
        results[label] = serve(work, data, f"run{index}", [*overrides, *extra])
    print()
    print(f"{'mode':<16} {'wall s':>7} {'training s':>10} {'round s':>15} {'accuracy':>8} {'ε user':>7}")
    for label, r in results.items():
        rounds = "/".join(f"{s:.1f}" for s in r["rounds"])  # type: ignore[attr-defined]
        print(f"{label:<16} {r['wall']:7.1f} {r['training']:10.1f} {rounds:>15} {r['accuracy']:8.3f} {r['epsilon_user']:7.3f}")
    base, secure = results["DP, no SecAgg+"], results["DP + SecAgg+"]
    per_round = (secure["training"] - base["training"]) / max(1, len(base["rounds"]))  # type: ignore[operator,arg-type]
    print(f"\nSecAgg+ adds {per_round:.1f} s per round ({secure['training'] / base['training']:.2f}x training time)")  # type: ignore[operator]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
