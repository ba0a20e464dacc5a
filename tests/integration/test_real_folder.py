"""End to end on an imported corpus: held-out devices never train and are scored every round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "corpora"))
from test_importers import _make_emodb  # noqa: E402  (the importer tests' fixture corpus)

pytestmark = pytest.mark.integration


def test_simulate_on_an_imported_corpus_scores_heldout_people(tmp_path: Path, capsys) -> None:
    """4 speakers -> 3 training devices + 1 held out; 2 rounds; held-out metrics in every output."""
    src = _make_emodb(tmp_path / "emodb", speakers=("03", "08", "09", "10"))
    fed = tmp_path / "fed"
    assert main(["data", "import", "emodb", str(src), "--out", str(fed), "--heldout-share", "0.25", "-q"]) == 0
    capsys.readouterr()
    meta = json.loads((fed / "federation.json").read_text(encoding="utf-8"))
    assert len(meta["devices"]) == 3 and len(meta["heldout"]) == 1
    # One file of a training device is damaged after the import: skipped and counted.
    records = [json.loads(line) for line in (fed / "device-000" / "samples.jsonl").read_text().splitlines()]
    damaged = next(r["voice"] for r in records if r["split"] == "train")
    (fed / "device-000" / damaged).write_bytes(b"not audio")
    train_total = sum(d["train"] for d in meta["report"]["devices"].values()) - 1
    heldout_total = sum(meta["report"]["heldout"].values())

    proc = subprocess.run(
        [sys.executable, "-m", "cli", "simulate", "--config", "configs/smoke.yaml",
         "data.source=folder", f"data.path={fed}", "privacy.preset=off",
         f"output.dir={tmp_path / 'runs'}", "output.name=run"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out devices (1 never trained" in proc.stdout and "held-out UAR" in proc.stdout
    run = tmp_path / "runs" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        # Only the training devices' training samples were trained on.
        assert row["train_devices"] == 3 and row["train_examples"] == train_total
        assert row["heldout_devices"] == 1 and row["heldout_examples"] == heldout_total
        assert sum(row["heldout_confusion"]) == heldout_total
        assert 0 <= row["heldout_accuracy"] <= 1 and 0 <= row["heldout_uar"] <= 1
        assert row["eval_devices"] == 3 and row["failed_devices"] == 0
        assert list(row["device_skips"].values()) == [{"voice": 1, "other": 1}]
    # Round 1 asked every node; the held-out one declined and was never asked again.
    assert (rows[0]["train_sampled"], rows[0]["heldout_declined"]) == (4, 1)
    assert (rows[1]["train_sampled"], rows[1]["heldout_declined"]) == (3, 0)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout"]["accuracy"] == rows[-1]["heldout_accuracy"]
    assert summary["heldout"]["local_test"]["accuracy"] == rows[-1]["accuracy"]
