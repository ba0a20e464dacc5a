"""Flower's processes, started and stopped the same way by every emofed command.

A SuperLink or SuperNode runs in its own process group (so whatever it spawns, the
ServerApp/ClientApp processes and Ray workers, goes with it), with ``FLWR_HOME`` and the
project's virtual environment on ``PATH``; `flwr` CLI calls share the same environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


class FlowerProcessError(RuntimeError):
    """A Flower process could not start or ended badly; the message says why."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flower_bin(name: str) -> str:
    """A Flower executable of this environment (next to the Python running emofed).

    Raises
    ------
    FlowerProcessError
        If it is not installed.
    """
    candidate = Path(sys.executable).with_name(name)
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(f"'{name}' not found next to {sys.executable} or on PATH; is flwr installed?")
    return found


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: its own FLWR_HOME, offline, unbuffered."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(home)
    # Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Every device process imports torch and transformers; let Python cache bytecode.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Dependencies are installed by the project; Flower must not `uv sync` its own.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def healthy(port: int, *, ca_file: Path | None = None, host: str = "127.0.0.1") -> bool:
    """Whether a SuperLink answers its health check on ``host:port`` (HTTPS with ``ca_file``)."""
    scheme = "https" if ca_file is not None else "http"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=0.5, context=context) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def start_process(command: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a Flower process in its own process group, its output going to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(command), env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(
    process: subprocess.Popen[bytes],
    port: int,
    log_path: Path,
    *,
    timeout: float,
    ca_file: Path | None = None,
) -> None:
    """Wait until the SuperLink in ``process`` answers on ``port``.

    Raises
    ------
    FlowerProcessError
        If it exits first or does not answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not healthy(port, ca_file=ca_file):
        if process.poll() is not None:
            raise FlowerProcessError(
                f"SuperLink exited with code {process.returncode}: {last_words(log_path, lines=3)}"
            )
        if time.monotonic() > deadline:
            raise FlowerProcessError(
                f"SuperLink did not answer on port {port} within {timeout:.0f} s (log: {log_path})"
            )
        time.sleep(0.2)


def stop_group(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Stop a process started in its own session and everything it spawned (its group)."""
    # Started with start_new_session: the group id is the leader's pid, still valid for
    # its children after the leader itself has exited and been reaped.
    pgid = process.pid
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children (flwr-simulation, Ray workers, app processes) may outlive the leader.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def last_words(log_path: Path, *, lines: int = 1) -> str:
    """The most telling line(s) at the end of a Flower log (its error box or last line)."""
    if not log_path.is_file():
        return "no output"
    text = [ln.strip(" │╭╮╰╯─\t") for ln in log_path.read_text(errors="replace").splitlines()]
    text = [ln for ln in text if ln and not ln.startswith("Error")]
    return " | ".join(text[-lines:]) if text else "no output"


def stream_command(
    command: Sequence[str], env: dict[str, str], log_path: Path, on_line: Callable[[str], None]
) -> int:
    """Run ``command`` (e.g. ``flwr run --stream``), copying each line to ``log_path`` and ``on_line``."""
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            list(command),
            env=env,
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
                stop_group(process)
    return int(process.returncode)


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (JSON's escaping is valid TOML)."""
    return json.dumps(value)
