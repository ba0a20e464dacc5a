"""Run a federated simulation through Flower's own runtime, as `flwr run` does.

A private SuperLink in simulation mode is started on free loopback ports with a
throw-away FLWR_HOME, the app in this repository is submitted with `flwr run`, its log
stream is followed, and the SuperLink (with the simulation processes it spawned) is
stopped afterwards, whatever happened. Nothing is left running and nothing is written to
the user's ``~/.flwr``.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from emofed.config import EmofedConfig
from emofed.flower import (
    FlowerProcessError,
    flower_bin,
    flower_env,
    free_port,
    last_words,
    start_process,
    stop_group,
    stream_command,
    toml_string,
    wait_healthy,
)
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


@contextlib.contextmanager
def local_superlink(home: Path, *, startup_timeout: float) -> Iterator[int]:
    """Start a SuperLink in simulation mode and yield its HTTP port; stop it on exit.

    Raises
    ------
    SimulationError
        If the SuperLink exits or does not answer within ``startup_timeout`` seconds.
    """
    http_port, control_port, fleet_port = free_port(), free_port(), free_port()
    log_path = home / "superlink.log"
    command = [
        flower_bin("flower-superlink"),
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
    try:
        process = start_process(command, flower_env(home), log_path)
    except FlowerProcessError as err:
        raise SimulationError(str(err)) from None
    try:
        try:
            wait_healthy(process, http_port, log_path, timeout=startup_timeout)
        except FlowerProcessError as err:
            raise SimulationError(str(err)) from None
        yield http_port
    finally:
        stop_group(process)


def heldout_device_count(cfg: EmofedConfig) -> int:
    """Held-out (test-only) devices of a federation folder, started after the training ones.

    Raises
    ------
    corpora.folder.FederationFolderError
        If ``data.source=folder`` and the folder is missing or malformed.
    """
    if cfg.data.source != "folder":
        return 0
    from corpora.folder import heldout_devices, read_federation

    return len(heldout_devices(read_federation(cfg.data.path or "")))


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
                    f"config={toml_string(str(config_path))}",
                    f"overrides={toml_string(shlex.join(overrides))}",
                    f"run-dir={toml_string(str(run_dir))}",
                    f"device-root={toml_string(str(simulated_device_root(run_dir)))}",
                ]
            )
            federation = (
                f"num-supernodes={cfg.devices + heldout_device_count(cfg)} "
                f"client-resources-num-cpus={cfg.simulation.cpus_per_device} "
                f"client-resources-num-gpus={cfg.simulation.gpus_per_device}"
            )
            command = [
                flower_bin("flwr"), "run", str(APP_DIR), CONNECTION,
                "--run-config", run_config,
                "--federation-config", federation,
                "--stream",
            ]
            logger.debug("Running %s", shlex.join(command))
            returncode = stream_command(command, flower_env(home), log_path, on_line)
            if returncode != 0:
                raise SimulationError(
                    f"`flwr run` exited with code {returncode}: {last_words(log_path)} (log: {log_path})"
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
