"""End to end with differential privacy: real `flwr run` simulations, their ledgers audited."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.accounting import PrivacyEvent, compute_epsilon
from privacy.audit import audit

ROOT = Path(__file__).resolve().parents[2]
EMOFED = [sys.executable, "-m", "cli"]
pytestmark = pytest.mark.integration
DELTA = 1e-5


def _emofed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*EMOFED, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_both_dp_levels_produce_a_ledger_that_passes_the_audit(tmp_path: Path) -> None:
    """Device-level and user-level DP both leave a signed ledger that passes the audit.

    3 devices x 2 rounds: every release is in the ledger, and the audit recomputes its ε
    with four accountants, within budget.
    """
    proc = _emofed(
        "simulate", "--config", "configs/smoke.yaml", "privacy.user.enabled=true",
        f"output.dir={tmp_path}", "output.name=run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    # Privacy spent is reported every round, and only grows.
    assert 0 < rows[0]["epsilon_user"] < rows[1]["epsilon_user"] <= 3.0
    assert 0 < rows[0]["epsilon_device_max"] < rows[1]["epsilon_device_max"] <= 3.0
    assert "ε" in proc.stdout.split("round 2/2", 1)[1].splitlines()[0]

    report = audit(run)
    assert report.ok, report.format_table()
    scopes = {row.scope: row for row in report.scopes}
    assert set(scopes) == {"server", "device:0", "device:1", "device:2"}
    # Two model rounds each; every device also released its policy statistics once, after training.
    assert scopes["server"].releases == 2
    assert all(scopes[f"device:{i}"].releases == 3 for i in range(3))
    assert json.loads((run / "summary.json").read_text())["policy"]["devices_shared"] == 3
    # The server's ε is one composition of its two releases, as an outside accountant says.
    server = scopes["server"]
    entries = [json.loads(line) for line in (run / "ledger" / "server.jsonl").read_text().splitlines()[:-1]]
    events = [
        PrivacyEvent(
            noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"],
            steps=e["steps"], sampling=e["sampling"],
        )
        for e in entries
    ]
    assert server.recorded_epsilon == pytest.approx(compute_epsilon(events, delta=DELTA), rel=1e-9)
    assert server.recomputed["dpa_pld"] <= server.recorded_epsilon + 0.02
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["privacy"]["user"]["epsilon"] == pytest.approx(server.recorded_epsilon)

    # The same audit from the command line, and a hand-edited ledger fails it.
    proc = _emofed("audit", str(run))
    assert proc.returncode == 0, proc.stdout
    chain = run / "ledger" / "devices" / "1.jsonl"
    doubled = re.sub(  # claim twice the noise that was added: a lower ε on paper
        r'"noise_multiplier":([0-9.e+-]+)',
        lambda m: f'"noise_multiplier":{2 * float(m.group(1))!r}',
        chain.read_text(),
        count=1,
    )
    chain.write_text(doubled)
    proc = _emofed("audit", str(run))
    assert proc.returncode == 1 and "TAMPERED" in proc.stdout


def test_a_budget_too_small_for_the_plan_stops_the_run_cleanly(tmp_path: Path) -> None:
    """A fixed σ whose third release would overspend stops the run cleanly after two rounds.

    The third round never starts, the run is finished (not failed) saying why, and the
    ledger still verifies.
    """
    two = compute_epsilon(
        [PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=2, sampling="no-amplification")],
        delta=DELTA,
    )
    proc = _emofed(
        "simulate", "--config", "configs/smoke.yaml", "rounds=3", "privacy.preset=off",
        "privacy.user.enabled=true", "privacy.user.noise_multiplier=2.0",
        f"privacy.user.epsilon={two + 0.1:.4f}", f"output.dir={tmp_path}", "output.name=run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert not (tmp_path / "run.incomplete").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped-privacy-budget"
    assert "budget" in summary["stop_reason"]
    assert "privacy budget" in proc.stdout
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["epsilon_user"] == pytest.approx(two, rel=1e-9)
    assert (run / "model.safetensors").is_file()
    report = audit(run)
    assert report.ok, report.format_table()
    assert [row.scope for row in report.scopes] == ["server"]
    assert math.isclose(report.scopes[0].recorded_epsilon, two, rel_tol=1e-9)


def test_devices_out_of_budget_decline_and_the_run_stops(tmp_path: Path) -> None:
    """A fixed σ that would overspend every device's budget in round 2 stops the run.

    Devices decline round 2 (counted, with their reason), the run stops before round 3,
    and the ledgers verify.
    """
    # configs/smoke.yaml: 12 training samples per device, batch 16, 1 epoch: q = 1, 1 step.
    one = compute_epsilon([PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1)], delta=DELTA)
    two = compute_epsilon([PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=2)], delta=DELTA)
    proc = _emofed(
        "simulate", "--config", "configs/smoke.yaml", "rounds=3", "privacy.device.noise_multiplier=2.0",
        f"privacy.device.epsilon={(one + two) / 2:.4f}", f"output.dir={tmp_path}", "output.name=run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped-privacy-budget"
    assert "every device sampled in round 2 declined" in summary["stop_reason"]
    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["declined_devices"] == 0 and rows[1]["declined_devices"] == 3
    assert rows[1]["train_devices"] == 0
    report = audit(run)
    assert report.ok, report.format_table()
    # One DP-SGD round each; after the stop the policy phase still ran, and the policy release
    # (a third of this small budget) fitted beside it: the second entry, within budget.
    assert all(row.releases == 2 for row in report.scopes)
    for chain in (run / "ledger" / "devices").glob("*.jsonl"):
        entries = [json.loads(line) for line in chain.read_text().splitlines()[:-1]]
        assert [e["extra"].get("policy_statistics") for e in entries] == [None, 1]
        assert entries[-1]["epsilon"] <= entries[-1]["budget_epsilon"]
