"""Run a federated simulation through Flower's own runtime, as `flwr run` does.

A private SuperLink in simulation mode is started on free loopback ports with a
throw-away FLWR_HOME, the app in this repository is submitted with `flwr run`, its log
stream is followed, and the SuperLink (with the simulation processes it spawned) is
stopped afterwards, whatever happened. Nothing is left running and nothing is written to
the user's ``~/.flwr``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from emofed.config import EmofedConfig
from emofed.protocol import simulated_device_root

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "emofed-local"


class SimulationError(RuntimeError):
    """The simulation could not start or did not finish; the message says why."""


@dataclass(frozen=True)
class SimulationResult:
    """Where the run went and the Flower log of it."""

    run_dir: Path
    log_path: Path
    wall_seconds: float


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string; Flower's parser splits on spaces
    # outside quotes, so every value is quoted.
    return json.dumps(value)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SimulationError(f"'{name}' not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


@contextlib.contextmanager
def local_superlink(home: Path, *, startup_timeout: float) -> Iterator[int]:
    """Start a SuperLink in simulation mode and yield its HTTP port; stop it on exit.

    Raises
    ------
    SimulationError
        If the SuperLink exits or does not answer within ``startup_timeout`` seconds.
    """
    http_port, control_port, fleet_port = _free_port(), _free_port(), _free_port()
    env = _flower_env(home)
    log_path = home / "superlink.log"
    command = [
        _bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        # Dependencies are installed by the project; Flower must not `uv sync` its own.
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(http_port),
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--fleet-api-address", f"127.0.0.1:{fleet_port}",
        "--database", str(home / "state.db"),
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise SimulationError(
                    f"SuperLink exited with code {process.returncode}: {' | '.join(tail)}"
                )
            if _healthy(http_port):
                break
            if time.monotonic() > deadline:
                raise SimulationError(
                    f"SuperLink did not answer on 127.0.0.1:{http_port} within {startup_timeout:.0f} s "
                    f"(log: {log_path})"
                )
            time.sleep(0.2)
        yield http_port
    finally:
        _stop_group(process)


def _last_words(log_path: Path) -> str:
    """The most telling line at the end of a Flower log (its error box or last line)."""
    lines = [ln.strip(" │╭╮╰╯─\t") for ln in log_path.read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Error")]
    return lines[-1] if lines else "no output"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the SuperLink and everything it spawned (its own process group)."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children (flwr-simulation, Ray workers) may outlive the leader for a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _flower_env(home: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["FLWR_HOME"] = str(home)
    # The SuperLink starts `flower-superexec` and `flwr-simulation` by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Every simulated device imports torch and transformers; let Python cache bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_simulation(
    cfg: EmofedConfig,
    *,
    config_path: Path,
    overrides: Sequence[str],
    run_dir: Path,
    on_line: Callable[[str], None],
) -> SimulationResult:
    """Run the configured simulation with `flwr run` and return where it went.

    ``on_line`` receives every line of Flower's log stream as it arrives.

    Raises
    ------
    SimulationError
        If the SuperLink cannot start, `flwr run` fails, or the ServerApp did not
        finish the run directory.
    """
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="emofed-flwr-"))
    log_path = run_dir.with_name(run_dir.name + ".flower.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with local_superlink(home, startup_timeout=cfg.simulation.startup_timeout_s) as port:
            (home / "config.toml").write_text(
                "[superlink]\n"
                f'default = "{CONNECTION}"\n\n'
                f"[superlink.{CONNECTION}]\n"
                f'address = "127.0.0.1:{port}"\n'
                "insecure = true\n",
                encoding="utf-8",
            )
            run_config = " ".join(
                [
                    f"config={_toml_string(str(config_path))}",
                    f"overrides={_toml_string(shlex.join(overrides))}",
                    f"run-dir={_toml_string(str(run_dir))}",
                    f"device-root={_toml_string(str(simulated_device_root(run_dir)))}",
                ]
            )
            federation = (
                f"num-supernodes={cfg.devices} "
                f"client-resources-num-cpus={cfg.simulation.cpus_per_device} "
                f"client-resources-num-gpus={cfg.simulation.gpus_per_device}"
            )
            command = [
                _bin("flwr"), "run", str(APP_DIR), CONNECTION,
                "--run-config", run_config,
                "--federation-config", federation,
                "--stream",
            ]
            logger.debug("Running %s", shlex.join(command))
            with open(log_path, "w", encoding="utf-8") as log_file:
                process = subprocess.Popen(
                    command,
                    env=_flower_env(home),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    start_new_session=True,
                )
                try:
                    for line in process.stdout or ():
                        log_file.write(line)
                        log_file.flush()
                        on_line(line.rstrip("\n"))
                    process.wait()
                finally:
                    if process.poll() is None:
                        _stop_group(process)  # type: ignore[arg-type]
            if process.returncode != 0:
                raise SimulationError(
                    f"`flwr run` exited with code {process.returncode}: {_last_words(log_path)} (log: {log_path})"
                )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if not (run_dir / "summary.json").is_file():
        incomplete = run_dir.with_name(run_dir.name + ".incomplete")
        raise SimulationError(
            f"the run did not finish; partial output in {incomplete}, Flower log in {log_path}"
        )
    final_log = run_dir / "flower.log"
    shutil.move(str(log_path), final_log)
    return SimulationResult(run_dir, final_log, time.monotonic() - started)
