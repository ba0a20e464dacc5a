"""Run directory: complete or clearly marked incomplete, never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from server.report import format_table, plot_curves
from server.rundir import RunDirectory, RunDirectoryError, rows_to_csv


def _make_rows(n: int = 3) -> list[dict[str, object]]:
    return [
        {"round": r, "train_loss": 2.0 / r, "eval_loss": 1.9 / r, "accuracy": 0.2 * r, "macro_f1": 0.15 * r,
         "acc_face": None, "train_devices": 3, "failed_devices": 0, "seconds": 1.5, "failures": []}
        for r in range(1, n + 1)
    ]


def test_lifecycle_incomplete_then_final(tmp_path: Path) -> None:
    """Work happens in <name>.incomplete and moves to <name> only on finalize."""
    run = RunDirectory(tmp_path / "run1")
    assert run.path.name == "run1.incomplete" and run.path.is_dir()
    run.write_config("rounds: 3\n")
    for row in _make_rows():
        run.append_round(row)
    run.save_model({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"format": "x"})
    assert not (tmp_path / "run1").exists()
    final = run.finalize({"status": "complete"})
    assert final == (tmp_path / "run1").resolve() and not run.path.exists()
    lines = (final / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert (final / "metrics.csv").read_text().splitlines()[0].startswith("round,train_loss")
    np.testing.assert_array_equal(load_file(final / "model.safetensors")["w"], np.arange(6).reshape(2, 3))
    assert json.loads((final / "summary.json").read_text())["status"] == "complete"


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    """A finished run with the same name is refused before any work."""
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunDirectoryError, match="already exists"):
        RunDirectory(tmp_path / "taken")


def test_failure_is_marked(tmp_path: Path) -> None:
    """A failed run keeps its partial output under .incomplete with a FAILED note."""
    run = RunDirectory(tmp_path / "r")
    run.append_round(_make_rows(1)[0])
    run.fail("RuntimeError: boom")
    assert (run.path / "FAILED").read_text().startswith("RuntimeError: boom")
    assert not (tmp_path / "r").exists()


def test_csv_skips_nested_values() -> None:
    """Lists (failures, confusion) stay in JSONL; the CSV keeps scalar columns."""
    csv_text = rows_to_csv(_make_rows(2))
    assert "failures" not in csv_text.splitlines()[0]
    assert len(csv_text.splitlines()) == 3


def test_table_and_plot(tmp_path: Path) -> None:
    """The per-round table lists every round; the plot is a PNG."""
    table = format_table(_make_rows())
    assert len(table.splitlines()) == 2 + 3 and "accuracy" in table.splitlines()[0]
    assert table.splitlines()[-1].split()[0] == "3"
    path = plot_curves(_make_rows(), tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_is_never_reused(tmp_path: Path) -> None:
    """A leftover .incomplete directory of the same name is refused, not overwritten."""
    RunDirectory(tmp_path / "r").fail("boom")
    with pytest.raises(RunDirectoryError, match="incomplete run already uses"):
        RunDirectory(tmp_path / "r")
    assert (tmp_path / "r.incomplete" / "FAILED").exists()
