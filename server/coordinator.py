"""The coordinator of a real deployment: its folder, device enrolment, and one served run.

Layout of a coordinator folder (``emofed server start --home DIR``)::

    DIR/
      certs/ca.crt, ca.key          the private CA devices trust (``emofed certs``)
      certs/server.crt, server.key  the SuperLink's TLS certificate for its host names
      enrolled/<device>.pub         devices' public keys (``emofed device enroll``)
      superlink/                    the SuperLink's state and logs for the current start;
                                    recreated at every start (runs are written elsewhere)

``serve`` starts a SuperLink with TLS and SuperNode authentication, registers every
enrolled key through Flower's Control API, waits for the devices to come online, submits
the app with `flwr run` (the ServerApp then runs next to the SuperLink and writes the run
directory on this machine) and stops the SuperLink afterwards. The run only ever
addresses enrolled nodes (``server.grids.EnrolledGrid``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from emofed.config import EmofedConfig
from emofed.flower import (
    FlowerProcessError,
    flower_bin,
    flower_env,
    last_words,
    start_process,
    stop_group,
    stream_command,
    toml_string,
    wait_healthy,
)
from privacy.certs import CA_CERT, SERVER_CERT, SERVER_KEY, key_fingerprint, load_device_public_key
from server.grids import ENROLLED_NODES_KEY

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "emofed-coordinator"
DEFAULT_PORT = 9092
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class CoordinatorError(RuntimeError):
    """The coordinator cannot start or serve the run; the message says why."""


@dataclass(frozen=True)
class CoordinatorHome:
    """The paths of a coordinator folder."""

    root: Path

    @property
    def certs(self) -> Path:
        """The private CA and the SuperLink's TLS certificate and key."""
        return self.root / "certs"

    @property
    def enrolled(self) -> Path:
        """The enrolled devices' public-key files, one per device."""
        return self.root / "enrolled"

    @property
    def superlink(self) -> Path:
        """The SuperLink's state and logs for the current start."""
        return self.root / "superlink"

    def enrolled_keys(self) -> dict[str, Path]:
        """Enrolled device names and their public-key files, sorted by name."""
        if not self.enrolled.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.enrolled.glob("*.pub"))}


def check_device_name(name: str) -> str:
    """A device name fit for file names and ledgers.

    Raises
    ------
    ValueError
        If it does not match ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}``.
    """
    if not _NAME.match(name):
        raise ValueError(f"device name must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,63}}. Found {name!r}.")
    return name


def enroll(home: CoordinatorHome, name: str, public_key: Path) -> Path:
    """Enrol a device's public key with the coordinator; idempotent for the same key.

    Raises
    ------
    ValueError
        If the name or key is invalid, the name is taken by another key, or the key is
        already enrolled under another name.
    """
    check_device_name(name)
    key = load_device_public_key(public_key)
    fingerprint = key_fingerprint(key)
    for other, path in home.enrolled_keys().items():
        other_fp = key_fingerprint(load_device_public_key(path))
        if other == name:
            if other_fp == fingerprint:
                return path
            raise ValueError(f"device name {name!r} is already enrolled with another key ({path})")
        if other_fp == fingerprint:
            raise ValueError(f"this key is already enrolled as {other!r}")
    home.enrolled.mkdir(parents=True, exist_ok=True)
    target = home.enrolled / f"{name}.pub"
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(public_key, tmp)
    tmp.chmod(0o644)
    tmp.replace(target)
    return target


@dataclass(frozen=True)
class ServeResult:
    """What a served run produced."""

    run_dir: Path
    log_path: Path
    wall_seconds: float
    nodes: dict[str, int]


class Coordinator:
    """One start of the coordinator: a SuperLink, its registrations and the run it serves.

    Parameters
    ----------
    home : CoordinatorHome
        The coordinator folder.
    host, port : str, int
        Where the SuperLink listens for devices (all its APIs share this port).
    insecure : bool
        Plain-text HTTP instead of TLS. Flower allows SuperNode authentication only
        over TLS, so this also turns it off: any device that reaches the port can join.
    startup_timeout : float
        Seconds the SuperLink may take to answer.
    """

    def __init__(
        self,
        home: CoordinatorHome,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        insecure: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.insecure = insecure
        self.startup_timeout = startup_timeout
        self.flwr_home = home.superlink / "flwr-home"
        self.log_path = home.superlink / "superlink.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- checks -------------------------------------------------------------------
    def preflight(self) -> dict[str, Path]:
        """Check certificates and enrolments; the enrolled keys.

        Raises
        ------
        CoordinatorError
            If a certificate or key is missing, or no device is enrolled.
        """
        if not self.insecure:
            for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
                if not (self.home.certs / name).is_file():
                    raise CoordinatorError(
                        f"{self.home.certs / name} is missing; create certificates with "
                        f"`emofed certs --out {self.home.certs} --host <this machine's name or IP>`"
                    )
        keys = self.home.enrolled_keys()
        if not keys and not self.insecure:
            raise CoordinatorError(
                f"no device is enrolled in {self.home.enrolled}; enrol devices with "
                f"`emofed device enroll NAME --device-dir DIR --coordinator {self.home.root}`"
            )
        for name, path in keys.items():
            try:
                load_device_public_key(path)
            except ValueError as err:
                raise CoordinatorError(f"enrolled key of {name!r} is unusable: {err}") from None
        return keys

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "localhost") else self.host

    # -- the SuperLink ------------------------------------------------------------
    def start(self) -> None:
        """Start the SuperLink with TLS and SuperNode authentication; wait until it answers.

        Raises
        ------
        CoordinatorError
            If it does not start.
        """
        if self.home.superlink.exists():
            shutil.rmtree(self.home.superlink)
        self.flwr_home.mkdir(parents=True)
        command = [
            flower_bin("flower-superlink"),
            "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", self.host,
            "--port", str(self.port),
            "--database", str(self.home.superlink / "state.db"),
        ]
        certs = self.home.certs
        if self.insecure:
            # Flower refuses SuperNode authentication without TLS.
            command.append("--insecure")
        else:
            command += [
                "--enable-supernode-auth",
                "--ssl-ca-certfile", str(certs / CA_CERT),
                "--ssl-certfile", str(certs / SERVER_CERT),
                "--ssl-keyfile", str(certs / SERVER_KEY),
            ]
        connection = [f"[superlink]\ndefault = \"{CONNECTION}\"\n\n[superlink.{CONNECTION}]"]
        connection.append(f"address = {toml_string(f'{self._connect_host}:{self.port}')}")
        if self.insecure:
            connection.append("insecure = true")
        else:
            connection.append(f"root-certificates = {toml_string(str((certs / CA_CERT).resolve()))}")
        (self.flwr_home / "config.toml").write_text("\n".join(connection) + "\n", encoding="utf-8")
        try:
            self._process = start_process(command, flower_env(self.flwr_home), self.log_path)
            wait_healthy(
                self._process, self.port, self.log_path, timeout=self.startup_timeout,
                ca_file=None if self.insecure else certs / CA_CERT,
            )
        except FlowerProcessError as err:
            self.stop()
            raise CoordinatorError(str(err)) from None

    def stop(self) -> None:
        """Stop the SuperLink and every process it started."""
        if self._process is not None:
            stop_group(self._process)
            self._process = None

    def _flwr(self, *args: str, timeout: float = 60.0) -> str:
        proc = subprocess.run(
            [flower_bin("flwr"), *args],
            env=flower_env(self.flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            detail = (proc.stdout + proc.stderr).strip().splitlines()
            raise CoordinatorError(f"`flwr {args[0]} {args[1]}` failed: {detail[-1] if detail else proc.returncode}")
        return proc.stdout

    @staticmethod
    def _json(output: str) -> object:
        start = output.find("{")
        if start < 0:
            raise CoordinatorError(f"no JSON in Flower's answer: {output.strip()[:200]}")
        return json.loads(output[start:])

    def register(self, keys: dict[str, Path]) -> dict[str, int]:
        """Register every enrolled key with the SuperLink; device name -> node id.

        Raises
        ------
        CoordinatorError
            If Flower refuses a key.
        """
        nodes: dict[str, int] = {}
        for name, path in keys.items():
            answer = self._json(self._flwr("supernode", "register", str(path), CONNECTION, "--name", name, "--format", "json"))
            node_id = answer.get("node-id") if isinstance(answer, dict) else None
            if not isinstance(node_id, int):
                raise CoordinatorError(f"SuperLink did not register {name!r}: {answer}")
            nodes[name] = node_id
            logger.info("Registered device %s as node %d", name, node_id)
        (self.home.superlink / "nodes.json").write_text(json.dumps(nodes, indent=2) + "\n", encoding="utf-8")
        return nodes

    def online(self) -> set[int]:
        """Node ids the SuperLink sees online now."""
        answer = self._json(self._flwr("supernode", "list", CONNECTION, "--format", "json"))
        entries = answer.get("nodes", []) if isinstance(answer, dict) else []
        return {int(e["node-id"]) for e in entries if isinstance(e, dict) and e.get("status") == "online"}

    def wait_for_devices(
        self, nodes: dict[str, int], needed: int, *, timeout: float, progress: Callable[[str], None]
    ) -> None:
        """Wait until ``needed`` enrolled devices (any devices when ``nodes`` is empty) are online.

        Raises
        ------
        CoordinatorError
            If fewer are online after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        wanted = set(nodes.values())
        names = {v: k for k, v in nodes.items()}
        last: set[int] | None = None
        while True:
            online = self.online() & wanted if wanted else self.online()
            if online != last:
                joined = ", ".join(sorted(names.get(n, f"node {n}") for n in online)) or "none"
                progress(f"devices online: {len(online)}/{needed} ({joined})")
                last = online
            if len(online) >= needed:
                return
            if self._process is not None and self._process.poll() is not None:
                raise CoordinatorError(f"SuperLink exited: {last_words(self.log_path, lines=2)}")
            if time.monotonic() > deadline:
                raise CoordinatorError(
                    f"only {len(online)} of {needed} devices came online within {timeout:.0f} s; "
                    f"start them with `emofed device start` (SuperLink log: {self.log_path})"
                )
            time.sleep(2.0)

    def run(
        self,
        *,
        config_path: Path,
        overrides: Sequence[str],
        run_dir: Path,
        nodes: dict[str, int],
        on_line: Callable[[str], None],
    ) -> ServeResult:
        """Submit the app with `flwr run` and follow it to the end.

        Raises
        ------
        CoordinatorError
            If `flwr run` fails or the ServerApp did not finish the run directory.
        """
        started = time.monotonic()
        log_path = run_dir.with_name(run_dir.name + ".flower.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        entries = [
            f"config={toml_string(str(config_path))}",
            f"overrides={toml_string(shlex.join(overrides))}",
            f"run-dir={toml_string(str(run_dir))}",
        ]
        if nodes:
            entries.append(f"{ENROLLED_NODES_KEY}={toml_string(','.join(str(n) for n in nodes.values()))}")
        run_config = " ".join(entries)
        command = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", run_config, "--stream"]
        code = stream_command(command, flower_env(self.flwr_home), log_path, on_line)
        if code != 0:
            raise CoordinatorError(f"`flwr run` exited with code {code}: {last_words(log_path)} (log: {log_path})")
        if not (run_dir / "summary.json").is_file():
            incomplete = run_dir.with_name(run_dir.name + ".incomplete")
            raise CoordinatorError(f"the run did not finish; partial output in {incomplete}, Flower log in {log_path}")
        final_log = run_dir / "flower.log"
        shutil.move(str(log_path), final_log)
        return ServeResult(run_dir, final_log, time.monotonic() - started, nodes)


def deployment_overrides(cfg: EmofedConfig, overrides: Sequence[str], enrolled: int) -> list[str]:
    """The run's overrides: ``devices`` defaults to the number of enrolled devices (if any)."""
    given = {o.split("=", 1)[0].strip() for o in overrides}
    extra = [] if "devices" in given or enrolled == 0 else [f"devices={enrolled}"]
    return [*overrides, *extra]
