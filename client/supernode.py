"""A participating device: its authentication keys, its checks before joining, and its SuperNode.

The device folder (``emofed device enroll NAME --device-dir DIR``) is laid out as
:mod:`device.layout` defines: ``keys/device.key`` and ``keys/device.pub`` (created here),
the encrypted store, Flower's own state in ``flwr/`` and the SuperNode's log.

The device's data stays in its own folder (``--data``), the layout of one device of a
federation folder (``client.data``): ``samples.jsonl`` plus ``face/`` and ``voice/``.
``emofed device start`` reads it fully before joining, so a device that has nothing
usable says so at once instead of failing its first round.
"""

from __future__ import annotations

import re
import stat
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from device.layout import device_key_paths, flower_home, supernode_log_path
from emofed.flower import flower_bin, flower_env, free_port, stop_group, toml_string
from privacy.certs import create_device_keys

# Flower's exit code when the SuperNode cannot connect or is refused (TLS or authentication).
# The process itself exits with 1; Flower writes the code to its log ("Exit Code: 305").
EXIT_CONNECTION_FAILED = 305
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class DeviceSetupError(RuntimeError):
    """The device cannot join; the message says why and what to do."""


@dataclass(frozen=True)
class DataCheck:
    """What ``check_data_folder`` found."""

    train: int
    test: int
    modalities: dict[str, int]
    skipped: Counter[str]

    def describe(self) -> str:
        """The counts in one line, as ``emofed device start`` prints them."""
        mods = ", ".join(f"{m} {n}" for m, n in self.modalities.items())
        text = f"{self.train} training and {self.test} test samples ({mods})"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return text


def ensure_device_keys(device_dir: Path) -> tuple[Path, bool]:
    """The device's public key, creating the key pair on first use; and whether it was new."""
    private, public = device_key_paths(device_dir)
    if private.exists() and public.exists():
        return public, False
    if private.exists() != public.exists():
        raise DeviceSetupError(f"{private.parent} holds only half a key pair; restore the other file")
    device_dir.mkdir(parents=True, exist_ok=True)
    device_dir.chmod(0o700)
    _, public = create_device_keys(private.parent)
    return public, True


def check_private_key(path: Path) -> None:
    """Refuse a missing key or one others can read (as ssh does).

    Raises
    ------
    DeviceSetupError
        If the key is missing or group/other can access it.
    """
    if not path.is_file():
        raise DeviceSetupError(
            f"{path} is missing: this device is not enrolled; run `emofed device enroll NAME --device-dir {path.parents[1]}`"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DeviceSetupError(f"{path} is accessible by others (mode {mode:o}); run `chmod 600 {path}`")


def check_data_folder(folder: Path) -> DataCheck:
    """Read the device's data folder as training will, and say what is usable.

    Raises
    ------
    DeviceSetupError
        If the folder is missing or malformed, or has no usable training or test sample.
    """
    from corpora.folder import FederationFolderError, read_device_folder

    if not folder.is_dir():
        raise DeviceSetupError(f"data folder not found: {folder}")
    try:
        train, test, skipped = read_device_folder(folder)
    except FederationFolderError as err:
        raise DeviceSetupError(f"{err} (expected layout: samples.jsonl, face/, voice/; see the README)") from None
    modalities = {
        "face": sum(s.face is not None for s in train + test),
        "voice": sum(s.voice is not None for s in train + test),
        "text": sum(s.text is not None for s in train + test),
    }
    check = DataCheck(len(train), len(test), modalities, skipped)
    if not train or not test:
        missing = "training" if not train else "test"
        raise DeviceSetupError(f"{folder} has no usable {missing} sample: {check.describe()}")
    return check


def check_ca(path: Path) -> None:
    """Refuse a CA file that is missing or not a CA certificate.

    Raises
    ------
    DeviceSetupError
        If it is missing or unusable.
    """
    from cryptography import x509

    if not path.is_file():
        raise DeviceSetupError(f"CA certificate not found: {path} (copy ca.crt from the coordinator)")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound) as err:
        raise DeviceSetupError(f"{path} is not a PEM CA certificate ({err})") from None
    if not is_ca:
        raise DeviceSetupError(f"{path} is not a CA certificate")


def supernode_command(
    *,
    superlink: str,
    device_dir: Path,
    data: Path,
    device_id: str,
    ca: Path | None,
    max_wait: float | None,
) -> list[str]:
    """The `flower-supernode` command line of this device (``ca=None``: plain text, no key).

    Raises
    ------
    DeviceSetupError
        If a path holds a double quote, which Flower's ``--node-config`` cannot carry.
    """
    private, _ = device_key_paths(device_dir)
    for path in (data, device_dir):
        if '"' in str(path.resolve()):
            raise DeviceSetupError(f"{path}: a path with a double quote cannot be passed to Flower; rename it")
    node_config = " ".join(
        [
            f"data-path={toml_string(str(data.resolve()))}",
            f"device-dir={toml_string(str(device_dir.resolve()))}",
            f"device-id={toml_string(device_id)}",
        ]
    )
    command = [
        flower_bin("flower-supernode"),
        "--superlink", superlink,
        "--node-config", node_config,
        "--isolation", "subprocess",
        # Several devices may share one machine: each gets its own ClientApp port.
        "--host", "127.0.0.1",
        "--port", str(free_port()),
    ]
    # Flower authenticates SuperNodes only over TLS (it refuses a key without it).
    if ca is None:
        command += ["--insecure"]
    else:
        command += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(private)]
    if max_wait is not None:
        command += ["--max-wait-time", str(max_wait)]
    return command


def flower_exit_code(lines: list[str]) -> int | None:
    """The Flower exit code a SuperNode wrote to its log (``Exit Code: 305``), if any."""
    for line in reversed(lines):
        found = _EXIT_CODE.search(_ANSI.sub("", line))
        if found:
            return int(found.group(1))
    return None


def key_refused(lines: list[str]) -> bool:
    """Whether the SuperLink refused this SuperNode's key (Flower's "Failed to activate").

    Flower cannot tell "never enrolled" from "not registered yet": the coordinator
    registers enrolled keys a few seconds after its SuperLink starts.
    """
    if flower_exit_code(lines) != EXIT_CONNECTION_FAILED:
        return False
    text = _ANSI.sub("", "\n".join(lines))
    return "Failed to activate SuperNode" in text or "code: 2004" in text


def refusal_reason(lines: list[str], *, superlink: str, max_wait: float | None) -> str | None:
    """Why the coordinator refused this SuperNode, in one line, from the end of its log.

    Returns None when the log does not show a refused or failed connection.
    """
    if flower_exit_code(lines) != EXIT_CONNECTION_FAILED:
        return None
    text = _ANSI.sub("", "\n".join(lines))
    host = superlink.rsplit(":", 1)[0].strip("[]")
    if key_refused(lines):
        return (
            f"the coordinator at {superlink} refused this device: its key is not enrolled there "
            "(send keys/device.pub to the coordinator's operator, who runs `emofed device enroll NAME "
            "--public-key device.pub --coordinator DIR` and restarts `emofed server start`)"
        )
    if "mismatch" in text.lower() or "not valid for" in text:
        return (
            f"the coordinator's TLS certificate does not name {host!r}; connect with a name or IP "
            f"the certificate lists, or re-issue it with `emofed certs --host {host}`"
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL/TLS handshake" in text or "WRONG_VERSION_NUMBER" in text:
        return (
            f"TLS with the coordinator at {superlink} failed: its certificate is not signed by the CA "
            "given with --ca (use the coordinator's own ca.crt), or one side runs --insecure"
        )
    waited = f" within {max_wait:g} s" if max_wait is not None else ""
    return f"could not reach the coordinator at {superlink}{waited} (is `emofed server start` running, and the port open?)"


def run_supernode(command: list[str], device_dir: Path, on_line: Callable[[str], None]) -> int:
    """Run the SuperNode in the foreground until it exits or is interrupted.

    The SuperNode's own children (SuperExec, ClientApp processes) share its output pipe
    and may outlive it, so the output is read in a thread and the whole process group is
    stopped once the SuperNode itself has exited.
    """
    home = flower_home(device_dir)
    home.mkdir(parents=True, exist_ok=True)
    log_path = supernode_log_path(device_dir)
    process = subprocess.Popen(
        command, env=flower_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", start_new_session=True,
    )

    def pump() -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            for line in process.stdout or ():
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait()
    finally:
        stop_group(process)
        reader.join(timeout=5)
    return code
