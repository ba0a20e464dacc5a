"""The device/server protocol names agree with the code that produces them."""

from __future__ import annotations

from pathlib import Path

from emofed.protocol import EVAL_METRICS, TRAIN_METRICS, simulated_device_root, train_metric_keys
from models import MODALITIES
from server.rundir import RunDirectory


def test_eval_metrics_cover_every_modality() -> None:
    """Each modality the model knows has its correct/total counts in the protocol."""
    for modality in MODALITIES:
        assert {f"{modality}-correct", f"{modality}-total"} <= EVAL_METRICS


def test_train_metric_keys_grow_with_privacy() -> None:
    """DP adds its metrics to the exact key set; without DP the base set is sent."""
    assert train_metric_keys(False, False) == TRAIN_METRICS
    assert "dp-epsilon" in train_metric_keys(True, False) - TRAIN_METRICS
    assert train_metric_keys(False, True) - TRAIN_METRICS == {"update-clipped"}


def test_simulated_device_root_lies_inside_the_working_run_directory(tmp_path: Path) -> None:
    """Simulated device stores are written where the ServerApp is writing the run."""
    run = RunDirectory(tmp_path / "run")
    assert simulated_device_root(run.final_path).parent == run.path
