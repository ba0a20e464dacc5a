"""End to end: `emofed simulate` through `flwr run` on a real local SuperLink."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
EMOFED = [sys.executable, "-m", "cli"]
pytestmark = pytest.mark.integration


def _emofed(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*EMOFED, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_round_simulation_writes_a_sane_run_directory(tmp_path: Path) -> None:
    """3 devices, 2 rounds: progress per round, a table, and a complete run directory."""
    proc = _emofed("simulate", "--config", "configs/smoke.yaml", f"output.dir={tmp_path}", "output.name=run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "round 1/2" in proc.stdout and "round 2/2" in proc.stdout
    run = tmp_path / "run"
    assert f"run directory: {run}" in proc.stdout
    assert not (tmp_path / "run.incomplete").exists()
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "metrics.jsonl", "metrics.csv", "model.safetensors", "curves.png", "summary.json", "flower.log",
    }
    rows = _read_rows(run)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["eval_loss"])
        assert row["train_devices"] == 3 and row["eval_devices"] == 3 and row["failed_devices"] == 0
        assert sum(row["confusion"]) == row["eval_examples"]
    # The saved model holds exactly the shared (trainable) weights of the configured network.
    from emofed.config import load_config
    from models import build_model, shared_state_keys

    cfg = load_config(run / "config.yaml")
    assert cfg.devices == 3 and cfg.rounds == 2
    weights = load_file(run / "model.safetensors")
    assert sorted(weights) == sorted(shared_state_keys(build_model(cfg.model, device="cpu")))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    _check_personalisation(run, rows, summary, proc.stdout, weights)
    _check_policy(run, summary, proc.stdout)
    # No SuperLink is left behind: the runner removes its FLWR_HOME after stopping it, so
    # a SuperLink whose home is gone was abandoned (others may belong to concurrent runs).
    assert _abandoned_superlinks() == []


def _check_policy(run: Path, summary: dict, stdout: str) -> None:
    """The policy prior went through the ClientApps: statistics, prior, table, and the ledgers."""
    section = summary["policy"]
    assert section["status"] == "complete", section
    assert section["devices_shared"] == 3 and section["devices_scored"] == 3
    assert (run / "policy_prior.json").exists()
    assert "| federated prior + personalisation |" in stdout and "| local only |" in stdout
    # Each device's ledger holds its two DP-SGD rounds and the policy release, within budget.
    for chain in (run / "ledger" / "devices").glob("*.jsonl"):
        entries = [json.loads(line) for line in chain.read_text().splitlines() if '"seq"' in line and "entry_hash" not in line]
        assert [e["round"] for e in entries] == [1, 2, 3]
        assert entries[-1]["extra"].get("policy_statistics") == 1
        assert entries[-1]["epsilon"] <= entries[-1]["budget_epsilon"]


def _check_personalisation(run: Path, rows: list[dict], summary: dict, stdout: str, weights: dict) -> None:
    """Every round reports the gain distribution; each device's personal head stays in its store."""
    import numpy as np

    from device.layout import PERSONAL_OBJECT, STORE_DIR, STORE_KEY_FILE
    from device.store import EncryptedStore

    for row in rows:
        gains = row["personal_gains"]
        assert len(gains) == row["eval_devices"] == 3 and gains == sorted(gains)
        assert 0.0 <= row["personal_accuracy"] <= 1.0
        assert row["personal_gain_mean"] == pytest.approx(sum(gains) / 3)
        assert row["personal_gain_worst"] == gains[0]
        assert row["personal_loss_share"] == pytest.approx(sum(g < 0 for g in gains) / 3)
    section = summary["personalisation"]
    assert section["layers"] == ["head"] and section["round"] == 2 and section["devices"] == 3
    assert section["gain_mean"] == rows[-1]["personal_gain_mean"]
    assert section["global_accuracy"] == rows[-1]["accuracy"]
    assert f"gain per device: mean {section['gain_mean']:+.3f}" in stdout
    for device in ("0", "1", "2"):
        folder = run / "simulated-devices" / device
        key_file = folder / "keys" / STORE_KEY_FILE
        assert key_file.stat().st_mode & 0o077 == 0
        with EncryptedStore.open(folder / STORE_DIR, key_file=key_file) as store:
            personal = store.get_arrays(PERSONAL_OBJECT)
        # The device's head is its own: not the global head the server saved (and sent).
        assert sorted(personal) == ["head.bias", "head.weight"]
        assert not np.array_equal(personal["head.weight"], weights["head.weight"])


def _abandoned_superlinks() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "flower-superlink"], capture_output=True, text=True)
    abandoned = []
    for pid in map(int, found.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours
            continue
        homes = [v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"FLWR_HOME=")]
        if homes and "emofed-flwr" in homes[0] and not Path(homes[0]).exists():
            abandoned.append(pid)
    return abandoned


def test_folder_federation_with_broken_devices_completes(tmp_path: Path) -> None:
    """A device without camera data trains; a device with unusable data is skipped, not fatal."""
    fed = tmp_path / "fed"
    proc = _emofed("data", "synth", "--out", str(fed), "devices=3", "data.samples_per_device=12", "seed=3")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((fed / "federation.json").read_text())
    no_camera, broken = fed / meta["devices"][0], fed / meta["devices"][2]
    shutil.rmtree(no_camera / "face")
    (broken / "samples.jsonl").write_text("garbage\n")
    proc = _emofed(
        "simulate", "--config", "configs/smoke.yaml", "rounds=1", "data.source=folder",
        f"data.path={fed}", f"output.dir={tmp_path}", "output.name=run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = _read_rows(tmp_path / "run")
    assert row["train_devices"] == 2 and row["eval_devices"] == 2
    assert row["failed_devices"] == 2  # the broken device declined both requests
    assert all("unusable device data" in f and "malformed line" in f for f in row["failures"])
    assert "skipped:" in proc.stdout


def test_config_typo_stops_before_any_work(tmp_path: Path) -> None:
    """A typo is one line on stderr, exit code 2, and no run directory."""
    proc = _emofed("simulate", "data.dirichlet_alpa=0.3", f"output.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown key 'data.dirichlet_alpa'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_data_folder_is_named(tmp_path: Path) -> None:
    """A missing data folder is a clear error before the runtime starts."""
    proc = _emofed("simulate", "data.source=folder", f"data.path={tmp_path / 'nope'}", timeout=60)
    assert proc.returncode == 2
    assert f"data folder not found: {tmp_path / 'nope'}" in proc.stderr


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_train_every_round(tmp_path: Path, strategy: str) -> None:
    """FedProx and FedAdam run through Flower with no device reply dropped."""
    proc = _emofed(
        "simulate", "--config", "configs/smoke.yaml", f"strategy.name={strategy}",
        f"output.dir={tmp_path}", "output.name=run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _read_rows(tmp_path / "run")
    assert [r["train_devices"] for r in rows] == [3, 3]
    assert all(r["failed_devices"] == 0 for r in rows)
