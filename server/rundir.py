"""A run directory that is either complete or clearly marked as not.

Everything is written into ``<name>.incomplete/`` and renamed to ``<name>/`` only when
the run finishes, so a crash never leaves a directory that looks like a finished run.
Files inside are replaced atomically (write to a temporary file, fsync, rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privacy._atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

INCOMPLETE_SUFFIX = ".incomplete"
CONFIG_FILE = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
MODEL_FILE = "model.safetensors"
PLOT_FILE = "curves.png"
SUMMARY_FILE = "summary.json"
FAILED_FILE = "FAILED"




class RunDirectoryError(RuntimeError):
    """The run directory cannot be created or finalised."""


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with UTF-8 ``text`` atomically (``privacy._atomic``), readable by others."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o666)


class RunDirectory:
    """The files of one run: config, per-round metrics, model, plot and summary.

    Parameters
    ----------
    final_path : Path
        Where the finished run will live. Work happens in ``final_path.incomplete``.

    Raises
    ------
    RunDirectoryError
        If ``final_path`` already exists (runs are never overwritten).
    """

    def __init__(self, final_path: Path) -> None:
        self.final_path = Path(final_path).resolve()
        self.path = self.final_path.with_name(self.final_path.name + INCOMPLETE_SUFFIX)
        if self.final_path.exists():
            raise RunDirectoryError(f"run directory already exists: {self.final_path}")
        if self.path.exists():
            # Left by a failed run under the same name: kept for diagnosis, never reused.
            raise RunDirectoryError(f"an incomplete run already uses {self.path}; choose another name")
        self.path.mkdir(parents=True)
        self._rows: list[dict[str, Any]] = []

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Metrics rows written so far, one per round."""
        return list(self._rows)

    def write_config(self, yaml_text: str) -> None:
        """Write the resolved configuration."""
        atomic_write_text(self.path / CONFIG_FILE, yaml_text)

    def append_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics to the JSONL log and rewrite the CSV table."""
        self._rows.append(dict(row))
        line = json.dumps(row, sort_keys=True, allow_nan=True) + "\n"
        with open(self.path / METRICS_JSONL, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write_text(self.path / METRICS_CSV, rows_to_csv(self._rows))

    def save_model(self, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
        """Save the global shared weights as safetensors (atomically)."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        atomic_write_bytes(self.path / MODEL_FILE, save(tensors, metadata=dict(metadata)), mode=0o666)
        return self.final_path / MODEL_FILE

    def write_json(self, name: str, payload: Any) -> None:
        """Write a JSON file into the run directory (atomically)."""
        atomic_write_text(self.path / name, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def finalize(self, summary: Mapping[str, Any]) -> Path:
        """Write the summary and move the directory to its final name.

        Raises
        ------
        RunDirectoryError
            If the final name was taken while the run was going on.
        """
        self.write_json(SUMMARY_FILE, dict(summary))
        if self.final_path.exists():
            raise RunDirectoryError(
                f"cannot finalise: {self.final_path} appeared while the run was going on; "
                f"results left in {self.path}"
            )
        os.replace(self.path, self.final_path)
        logger.info("Run directory: %s", self.final_path)
        return self.final_path

    def fail(self, reason: str) -> None:
        """Mark the staging directory as failed, keeping what was written for diagnosis."""
        try:
            atomic_write_text(self.path / FAILED_FILE, reason.rstrip() + "\n")
        except OSError:  # the disk may be the reason; the suffix already marks it
            logger.exception("could not write %s", self.path / FAILED_FILE)


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of metric rows; columns are the union of keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns and not isinstance(row[k], (list, dict)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return buffer.getvalue()
