"""Per-round rows, progress lines, table, plot and summary with the privacy spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ArrayRecord

from emofed.config import load_config
from server.app import RoundReporter, privacy_progress, privacy_summary
from server.report import curves_figure, format_table, plot_curves
from server.rundir import RunDirectory
from server.strategy import RoundLog


def _make_rows(n: int = 3, *, dp: bool = True) -> list[dict[str, object]]:
    rows = []
    for r in range(1, n + 1):
        row: dict[str, object] = {
            "round": r, "train_loss": 2.0 / r, "eval_loss": 1.9 / r, "accuracy": 0.2 * r, "macro_f1": 0.15 * r,
            "train_devices": 3, "failed_devices": 0, "seconds": 1.5,
        }
        if dp:
            row.update(epsilon_user=0.9 * r, epsilon_device_max=1.1 * r, epsilon_device_mean=r, declined_devices=r - 1)
        rows.append(row)
    return rows


def test_table_shows_privacy_columns_only_with_dp() -> None:
    """ε device, ε user and declined appear (with values) when rows carry them, and not otherwise."""
    table = format_table(_make_rows())
    header, _, first, _, third = table.splitlines()
    assert header.split()[-7:] == ["declined", "failed", "ε", "device", "ε", "user", "seconds"]
    assert first.split()[-4:] == ["0", "1.100", "0.900", "1.5"]
    assert third.split()[-4:] == ["0", "3.300", "2.700", "1.5"]
    assert third.split()[-5] == "2"  # declined in round 3
    plain = format_table(_make_rows(dp=False))
    assert "ε" not in plain and "declined" not in plain


def test_privacy_panel_plots_epsilon_against_dashed_budgets(tmp_path: Path) -> None:
    """With budgets a third panel shows ε per round per level and each budget as a dashed line."""
    import matplotlib.pyplot as plt

    rows = _make_rows()
    fig = curves_figure(rows, budgets={"device": 3.0, "user": 2.5})
    assert len(fig.axes) == 3
    panel = fig.axes[2]
    assert panel.get_title() == "privacy spent"
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert list(lines["user-level ε (federation)"].get_ydata()) == pytest.approx([0.9, 1.8, 2.7])
    assert list(lines["device ε (largest)"].get_ydata()) == pytest.approx([1.1, 2.2, 3.3])
    for label, budget in (("device budget ε=3", 3.0), ("user budget ε=2.5", 2.5)):
        assert lines[label].get_linestyle() == "--" and set(lines[label].get_ydata()) == {budget}
    plt.close(fig)
    plain = curves_figure(_make_rows(dp=False))
    assert len(plain.axes) == 2
    plt.close(plain)
    with pytest.raises(ValueError, match="unknown privacy level"):
        curves_figure(rows, budgets={"sample": 1.0})
    assert plot_curves(rows, tmp_path / "c.png", budgets={"user": 2.5}).stat().st_size > 10_000


def test_empty_run_still_plots(tmp_path: Path) -> None:
    """A run stopped before its first release has no rows; the plot is still written."""
    assert plot_curves([], tmp_path / "c.png", budgets={"user": 1.0}).is_file()


@pytest.mark.parametrize(
    ("overrides", "row", "expected"),
    [
        ([], {"epsilon_device_max": 1.234, "epsilon_user": None, "declined_devices": 0}, "  ε device ≤ 1.23/3"),
        (
            ["privacy.user.enabled=true"],
            {"epsilon_device_max": 1.234, "epsilon_user": 0.91, "declined_devices": 2},
            "  ε device ≤ 1.23/3 user 0.91/3  declined 2",
        ),
        (["privacy.preset=off"], {"epsilon_device_max": None, "epsilon_user": None, "declined_devices": 0}, ""),
    ],
)
def test_progress_line_shows_privacy_spent(overrides: list[str], row: dict, expected: str) -> None:
    """The progress line carries ε per enabled level against its budget, and declined devices."""
    assert privacy_progress(load_config(None, overrides), row) == expected


def test_reporter_row_carries_privacy_fields(tmp_path: Path) -> None:
    """Each metrics row has ε (user, device max and mean), the clipping norm and declined devices."""
    cfg = load_config(None, ["privacy.user.enabled=true"])
    run = RunDirectory(tmp_path / "run")
    log = RoundLog(
        train_sent=3, train_ok=2, user_epsilon=0.7, clipping_norm=1.5, declined=["train node 4: budget"],
        train_metrics={"train-loss": 1.0, "num-examples": 20, "dp-epsilon-max": 1.2, "dp-epsilon-mean": 1.0},
    )
    reporter = RoundReporter(cfg, run, {1: log})
    reporter(0, ArrayRecord())
    reporter(1, ArrayRecord())
    row = json.loads((run.path / "metrics.jsonl").read_text())
    assert {k: row[k] for k in ("epsilon_user", "epsilon_device_max", "epsilon_device_mean", "clipping_norm")} == {
        "epsilon_user": 0.7, "epsilon_device_max": 1.2, "epsilon_device_mean": 1.0, "clipping_norm": 1.5,
    }
    assert row["declined_devices"] == 1 and row["declined"] == ["train node 4: budget"] and row["failed_devices"] == 0
    header = (run.path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epsilon_user", "epsilon_device_max", "declined_devices", "clipping_norm"} <= set(header)


def test_privacy_summary_without_user_dp(tmp_path: Path) -> None:
    """Device DP only: budget and the largest device ε from the rows; the user level is off."""
    cfg = load_config(None, [])
    summary = privacy_summary(cfg, _make_rows(), None, tmp_path / "run" / "ledger")
    assert summary["preset"] == "balanced" and summary["delta"] == 1e-5 and summary["accountant"] == "opacus_rdp"
    assert summary["device"] == {
        "enabled": True, "budget_epsilon": 3.0, "noise_multiplier": None, "max_grad_norm": 1.0,
        "epsilon": pytest.approx(3.3),
    }
    assert summary["user"]["enabled"] is False and summary["user"]["epsilon"] is None
    assert summary["ledger"] == str(tmp_path / "run" / "ledger") and summary["server_key_fingerprint"] is None
    json.dumps(summary)  # summary.json must be able to hold it
