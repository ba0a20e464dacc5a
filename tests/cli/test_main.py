"""The `emofed` command line: audit exit codes and output, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main

# The privacy tests' ledger builder writes an honest two-device, three-round run.
from tests.privacy.test_audit import _make_run


def test_audit_of_an_honest_run_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An untouched ledger prints a per-scope table, writes JSON and exits 0."""
    _make_run(tmp_path)
    report = tmp_path / "audit.json"
    assert main(["audit", str(tmp_path / "run"), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "device:1" in out and "audit: ok" in out
    assert json.loads(report.read_text())["ok"] is True


def test_audit_of_an_edited_ledger_exits_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hand-editing ε in a ledger line is detected and the exit code says so."""
    _make_run(tmp_path)
    ledger = tmp_path / "run" / "ledger" / "server.jsonl"
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["epsilon"] = entry["epsilon"] / 2
    lines[1] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    ledger.write_text("\n".join(lines) + "\n")
    assert main(["audit", str(tmp_path / "run")]) == 1
    assert "TAMPERED" in capsys.readouterr().out


def test_audit_of_a_folder_without_ledger_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path with no ledger is one error line and exit code 2."""
    assert main(["audit", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("emofed: error:")


def test_config_show_rejects_typos(capsys: pytest.CaptureFixture[str]) -> None:
    """`emofed config show` validates like `simulate`."""
    assert main(["config", "show", "train.lrr=1"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err


def test_simulate_with_a_broken_policy_catalogue_stops_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing policy catalogue is one error line and exit code 2; no run directory is made."""
    code = main(["simulate", f"output.dir={tmp_path}", f"policy.config_dir={tmp_path / 'missing'}"])
    assert code == 2
    assert "'policy.config_dir': config file not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
