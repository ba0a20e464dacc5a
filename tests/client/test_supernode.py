"""The device side of a deployment: keys, the data-folder check, the SuperNode command."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from client.supernode import (
    DeviceSetupError,
    check_ca,
    check_data_folder,
    check_private_key,
    ensure_device_keys,
    flower_exit_code,
    key_refused,
    refusal_reason,
    supernode_command,
)
from device.layout import device_key_paths
from emofed.config import load_config
from privacy.certs import create_certificates

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"

# The ends of real SuperNode logs (Flower 1.42) for the three ways a connection fails.
LOG_UNENROLLED = [
    "INFO :      Starting Flower SuperNode",
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    "[code: 2004] Failed to activate SuperNode.",
    "The SuperNode could not establish a connection to the SuperLink.",
]
LOG_WRONG_CA = [
    "WARNING :   Connection attempt failed, retrying in 1.82 seconds",
    "ERROR :     SSL/TLS handshake error detected.",
    "ERROR :     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)",
]
LOG_UNREACHABLE = [
    "WARNING :   Connection attempt failed, retrying in 12.47 seconds",
    "ERROR :     Exit Code: 305",
    "Failed to initialize the connection to the SuperLink.",
    "The SuperNode could not establish a connection to the SuperLink.",
]


def _make_device_folder(root: Path, *, samples: int = 16) -> Path:
    from simulations.export import write_federation
    from simulations.synthetic import SyntheticFederation

    cfg = load_config(SMOKE, [f"data.samples_per_device={samples}"])
    fed = SyntheticFederation(cfg.data, num_devices=1, seed=cfg.seed)
    path = write_federation(fed, root / "fed")
    return next(p for p in Path(path).iterdir() if p.is_dir())


def test_ensure_device_keys_creates_once_then_keeps(tmp_path: Path) -> None:
    """The first call creates an owner-only key pair; the second keeps it unchanged."""
    public, created = ensure_device_keys(tmp_path / "dev")
    private, _ = device_key_paths(tmp_path / "dev")
    assert created is True and public.is_file()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "dev").stat().st_mode) == 0o700
    before = private.read_bytes()
    again, created_again = ensure_device_keys(tmp_path / "dev")
    assert created_again is False and again == public and private.read_bytes() == before


def test_half_a_key_pair_is_refused(tmp_path: Path) -> None:
    """A device folder holding only the public key is refused instead of re-keyed."""
    ensure_device_keys(tmp_path / "dev")
    private, _ = device_key_paths(tmp_path / "dev")
    private.unlink()
    with pytest.raises(DeviceSetupError, match="half a key pair"):
        ensure_device_keys(tmp_path / "dev")


def test_check_private_key_missing_and_readable_by_others(tmp_path: Path) -> None:
    """A missing key says how to enrol; a key others can read is refused (as ssh does)."""
    private, _ = device_key_paths(tmp_path / "dev")
    with pytest.raises(DeviceSetupError, match="not enrolled; run `emofed device enroll"):
        check_private_key(private)
    ensure_device_keys(tmp_path / "dev")
    check_private_key(private)
    private.chmod(0o644)
    with pytest.raises(DeviceSetupError, match=r"accessible by others \(mode 644\)"):
        check_private_key(private)


def test_check_ca_accepts_a_ca_and_refuses_the_rest(tmp_path: Path) -> None:
    """ca.crt is accepted; a missing file, the server's leaf certificate and junk are refused."""
    made = create_certificates(tmp_path / "certs", [])
    check_ca(made.ca_cert)
    with pytest.raises(DeviceSetupError, match="CA certificate not found"):
        check_ca(tmp_path / "nope.crt")
    with pytest.raises(DeviceSetupError, match="is not a CA certificate"):
        check_ca(made.server_cert)
    (tmp_path / "junk.crt").write_text("hello\n")
    with pytest.raises(DeviceSetupError, match="not a PEM CA certificate"):
        check_ca(tmp_path / "junk.crt")


def test_check_data_folder_counts_a_synthetic_device(tmp_path: Path) -> None:
    """A synthetic device folder is read as training will read it, split and per modality."""
    folder = _make_device_folder(tmp_path)
    found = check_data_folder(folder)
    lines = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines() if x.strip()]
    assert found.train == sum(r["split"] == "train" for r in lines)
    assert found.test == sum(r["split"] == "test" for r in lines)
    assert found.train + found.test == 16
    assert found.modalities["face"] == sum(r.get("face") is not None for r in lines)
    assert f"{found.train} training and {found.test} test samples" in found.describe()


def test_check_data_folder_refusals(tmp_path: Path) -> None:
    """Missing folder, missing samples.jsonl and a folder with no test sample are refused."""
    with pytest.raises(DeviceSetupError, match="data folder not found"):
        check_data_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeviceSetupError, match="no samples.jsonl .*expected layout"):
        check_data_folder(tmp_path / "empty")
    folder = _make_device_folder(tmp_path)
    index = folder / "samples.jsonl"
    kept = [x for x in index.read_text().splitlines() if x.strip() and json.loads(x)["split"] == "train"]
    index.write_text("\n".join(kept) + "\nnot json\n")
    with pytest.raises(DeviceSetupError, match="no usable test sample.*skipped 1 malformed line"):
        check_data_folder(folder)


def test_supernode_command_tls_key_and_node_config(tmp_path: Path) -> None:
    """TLS with the CA and the device key; Flower parses the node config back to our paths."""
    device_dir, data = tmp_path / "my dev", tmp_path / "data dir"
    ca = tmp_path / "ca.crt"
    cmd = supernode_command(
        superlink="coord.lan:9092", device_dir=device_dir, data=data, device_id="dev-1", ca=ca, max_wait=30.0
    )
    assert cmd[cmd.index("--superlink") + 1] == "coord.lan:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(device_dir / "keys" / "device.key")
    assert cmd[cmd.index("--max-wait-time") + 1] == "30.0"
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert parsed == {
        "data-path": str(data.resolve()),
        "device-dir": str(device_dir.resolve()),
        "device-id": "dev-1",
    }


def test_supernode_command_insecure_has_no_ca(tmp_path: Path) -> None:
    """Without a CA the SuperNode runs --insecure, with no root certificates and no key."""
    cmd = supernode_command(
        superlink="127.0.0.1:9092", device_dir=tmp_path, data=tmp_path, device_id="d", ca=None, max_wait=None
    )
    assert "--insecure" in cmd and "--root-certificates" not in cmd and "--max-wait-time" not in cmd
    # Flower refuses a SuperNode key without TLS (exit code 303).
    assert "--auth-supernode-private-key" not in cmd


def test_supernode_command_refuses_quotes_in_paths(tmp_path: Path) -> None:
    """A double quote in a path cannot travel in Flower's node config and is refused."""
    with pytest.raises(DeviceSetupError, match="double quote"):
        supernode_command(
            superlink="h:1", device_dir=tmp_path, data=tmp_path / 'a"b', device_id="d", ca=None, max_wait=None
        )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (LOG_UNENROLLED, "refused this device: its key is not enrolled"),
        (LOG_WRONG_CA, "not signed by the CA given with --ca"),
        (LOG_UNREACHABLE, "could not reach the coordinator at h:9092 within 20 s"),
    ],
)
def test_refusal_reason_from_flower_logs(lines: list[str], expected: str) -> None:
    """Each way Flower reports a failed connection becomes one line naming the cause."""
    assert flower_exit_code(lines) == 305
    reason = refusal_reason(lines, superlink="h:9092", max_wait=20.0)
    assert reason is not None and expected in reason and "\n" not in reason


def test_refusal_reason_hostname_mismatch_names_the_host() -> None:
    """A certificate that does not name the host tells which --host to add."""
    mismatch = (
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
        "Hostname mismatch, certificate is not valid for 'coord.lan'."
    )
    lines = [*LOG_WRONG_CA[:3], mismatch]
    reason = refusal_reason(lines, superlink="coord.lan:9092", max_wait=None)
    assert reason is not None and "emofed certs --host coord.lan" in reason


def test_refusal_reason_none_for_other_exits() -> None:
    """A log without Flower's connection exit code is not a refusal."""
    assert refusal_reason(["INFO : done"], superlink="h:1", max_wait=None) is None
    assert flower_exit_code(["INFO : done"]) is None


def test_key_refused_only_for_an_activation_refusal() -> None:
    """Only Flower's "Failed to activate SuperNode" is a refused key (retried for a while)."""
    assert key_refused(LOG_UNENROLLED)
    assert not key_refused(LOG_WRONG_CA)
    assert not key_refused(LOG_UNREACHABLE)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from cli.main import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_cli_enroll_on_one_machine_and_from_a_sent_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`device enroll` makes keys and enrols them; a key sent by a device is enrolled with --public-key."""
    code, out, _ = _run_cli(
        ["device", "enroll", "d0", "--device-dir", str(tmp_path / "d0"), "--coordinator", str(tmp_path / "c")], capsys
    )
    assert code == 0 and "enrolled 'd0'" in out
    assert (tmp_path / "c" / "enrolled" / "d0.pub").read_bytes() == (tmp_path / "d0" / "keys" / "device.pub").read_bytes()
    code, out, _ = _run_cli(["device", "enroll", "d1", "--device-dir", str(tmp_path / "d1")], capsys)
    assert code == 0 and "--public-key device.pub --coordinator" in out
    assert "PRIVATE KEY" not in out
    code, _, _ = _run_cli(
        [
            "device", "enroll", "d1",
            "--public-key", str(tmp_path / "d1" / "keys" / "device.pub"),
            "--coordinator", str(tmp_path / "c"),
        ],
        capsys,
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "c" / "enrolled").iterdir()) == ["d0.pub", "d1.pub"]


def test_cli_device_start_refusals_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No key, no --ca, or a server certificate as --ca: one-line errors, no SuperNode started."""
    base = ["device", "start", "--data", str(tmp_path), "--superlink", "127.0.0.1:1"]
    code, _, err = _run_cli([*base, "--device-dir", str(tmp_path / "new"), "--ca", "x"], capsys)
    assert code == 2 and "this device is not enrolled" in err and "\n" not in err
    ensure_device_keys(tmp_path / "dev")
    code, _, err = _run_cli([*base, "--device-dir", str(tmp_path / "dev")], capsys)
    expected = "emofed: error: give --ca FILE (the coordinator's ca.crt), or --insecure for a plain-text test setup"
    assert code == 2 and err == expected
    made = create_certificates(tmp_path / "certs", [])
    code, _, err = _run_cli([*base, "--device-dir", str(tmp_path / "dev"), "--ca", str(made.server_cert)], capsys)
    assert code == 2 and "is not a CA certificate" in err
    code, _, err = _run_cli([*base, "--device-dir", str(tmp_path / "dev"), "--ca", str(made.ca_cert)], capsys)
    assert code == 2 and "no samples.jsonl" in err
