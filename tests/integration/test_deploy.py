"""A real deployment on loopback: SuperLink + three SuperNodes, TLS, node authentication, SecAgg+.

Every process is a separate `emofed` (or `flower-supernode`) process in its own process
group, as an operator would start them, and every group is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emofed.flower import flower_bin, flower_env, free_port

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
EMOFED = [sys.executable, "-m", "cli"]
pytestmark = pytest.mark.integration


class _Procs:
    """Processes started by the test, each in its own session; all stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        out = open(self.root / f"{name}.out", "w", encoding="utf-8")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        out.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            # Children (SuperExec, ClientApp, ServerApp processes) share the group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _cli(*args: str) -> None:
    from cli.main import main

    assert main(list(args)) == 0, args


def _wait_for(procs: _Procs, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in procs.output(name):
        if procs.procs[name].poll() is not None:
            raise AssertionError(f"{name} exited early:\n{procs.output(name)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not print {text!r} within {timeout} s:\n{procs.output(name)[-3000:]}")
        time.sleep(0.5)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tls_authenticated_deployment_with_dp_and_secagg(tmp_path: Path) -> None:
    """3 enrolled devices train 2 rounds under DP + SecAgg+; an unenrolled and a CA-less node are refused."""
    from corpora.folder import read_federation
    from emofed.config import load_config
    from simulations.export import write_federation
    from simulations.synthetic import SyntheticFederation

    cfg = load_config(SMOKE, [])
    fed_dir = write_federation(SyntheticFederation(cfg.data, num_devices=3, seed=cfg.seed), tmp_path / "fed")
    data = [Path(fed_dir) / d for d in read_federation(fed_dir)["devices"]]
    home, devs = tmp_path / "coord", tmp_path / "devices"
    _cli("certs", "--out", str(home / "certs"), "--host", "localhost")
    _cli("certs", "--out", str(tmp_path / "other-ca"))  # another coordinator's CA
    for i in range(3):
        _cli("device", "enroll", f"dev{i}", "--device-dir", str(devs / f"dev{i}"), "--coordinator", str(home))
    _cli("device", "enroll", "stranger", "--device-dir", str(devs / "stranger"))  # keys, never enrolled
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    ca = str(home / "certs" / "ca.crt")
    procs = _Procs(tmp_path)
    try:
        procs.start("server", [
            *EMOFED, "server", "start", "--config", str(SMOKE), "--home", str(home), "--host", "127.0.0.1",
            "--port", str(port), "--wait", "120", "privacy.user.enabled=true", "privacy.secagg.enabled=true",
            f"output.dir={tmp_path / 'runs'}", "output.name=run",
        ])
        _wait_for(procs, "server", "waiting for 3 of them", timeout=90)
        # The refused ones try while the enrolled devices join and train: none may get in.
        procs.start("stranger", [
            *EMOFED, "device", "start", "--data", str(data[0]), "--device-dir", str(devs / "stranger"),
            "--superlink", superlink, "--ca", ca, "--max-wait", "20", "--refused-retry", "8",
        ])
        no_ca_home = tmp_path / "no-ca-home"
        no_ca_home.mkdir()
        procs.start("no-ca", [
            # An enrolled key, but the SuperNode does not trust our CA (system roots only).
            flower_bin("flower-supernode"), "--superlink", superlink,
            "--auth-supernode-private-key", str(devs / "dev0" / "keys" / "device.key"),
            "--node-config", f'data-path="{data[0]}"', "--max-wait-time", "5",
            "--port", str(free_port()),
        ], env=flower_env(no_ca_home))
        procs.start("wrong-ca", [
            *EMOFED, "device", "start", "--data", str(data[1]), "--device-dir", str(devs / "dev1"),
            "--superlink", superlink, "--ca", str(tmp_path / "other-ca" / "ca.crt"), "--max-wait", "5",
        ])
        for i in range(3):
            procs.start(f"dev{i}", [
                *EMOFED, "device", "start", "--data", str(data[i]), "--device-dir", str(devs / f"dev{i}"),
                "--superlink", superlink, "--ca", ca, "--max-wait", "30",
            ])
        assert procs.wait("stranger", timeout=120) == 1
        stranger = procs.output("stranger").strip().splitlines()
        assert stranger[-1].startswith("emofed: error: the coordinator at") and "key is not enrolled" in stranger[-1]
        assert not any("Exit Code" in line for line in stranger)
        assert any("the coordinator refused this device's key; retrying for 8 s" in line for line in stranger)
        assert procs.wait("no-ca", timeout=90) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in procs.output("no-ca")
        assert procs.wait("wrong-ca", timeout=90) == 1
        assert "not signed by the CA given with --ca" in procs.output("wrong-ca").strip().splitlines()[-1]
        assert procs.wait("server", timeout=420) == 0, procs.output("server")[-4000:]
        out = procs.output("server")
        assert "TLS, device authentication on" in out
        assert "devices online: 3/3 (dev0, dev1, dev2)" in out
        assert "stranger" not in out
        for r in (1, 2):
            assert f"Round {r} secure aggregation: sum of 3 of 3 sampled devices unmasked" in out
    finally:
        procs.stop_all()
    for name, proc in procs.procs.items():
        assert not _group_alive(proc.pid), f"{name}'s process group is still alive"

    run = tmp_path / "runs" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds_completed"] == 2
    assert summary["privacy"]["user"]["enabled"] and summary["privacy"]["device"]["enabled"]
    assert summary["privacy"]["user"]["releases"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["train_devices"] == 3 and r["failed_devices"] == 0 for r in rows)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "model.safetensors", "summary.json", "ledger"}

    from privacy.audit import audit

    report = audit(run, pinned_keys={"server": summary["privacy"]["server_key_fingerprint"]})
    assert report.ok, report.format_table()
    table = report.format_table()
    for scope in ("server", "device:dev0", "device:dev1", "device:dev2"):
        assert scope in table
    assert "stranger" not in table
    # The device keys never left their folders: the coordinator holds only public keys.
    assert sorted(p.name for p in (home / "enrolled").iterdir()) == ["dev0.pub", "dev1.pub", "dev2.pub"]
