"""Human-readable results of a run: the per-round table and the curves plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Prefix of the project's progress lines in Flower's log stream (the CLI shows these).
PROGRESS_PREFIX = "emofed |"

# Columns of the per-round table: (metrics key, header, format).
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("round", "round", "{:>5d}"),
    ("train_loss", "train loss", "{:>10.4f}"),
    ("eval_loss", "eval loss", "{:>9.4f}"),
    ("accuracy", "accuracy", "{:>8.3f}"),
    ("macro_f1", "macro-F1", "{:>8.3f}"),
    ("acc_face", "face acc", "{:>8.3f}"),
    ("acc_voice", "voice acc", "{:>9.3f}"),
    ("acc_text", "text acc", "{:>8.3f}"),
    ("train_devices", "trained", "{:>7d}"),
    ("failed_devices", "failed", "{:>6d}"),
    ("seconds", "seconds", "{:>7.1f}"),
)


def _cell(value: Any, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value).rjust(width)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of per-round metrics (missing values shown as '-')."""
    headers = [h for _, h, _ in TABLE_COLUMNS]
    widths = [max(len(h), len(fmt.format(0) if "d" in fmt else fmt.format(0.0))) for _, h, fmt in TABLE_COLUMNS]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [
            _cell(row.get(key), fmt, w)
            for (key, _, fmt), w in zip(TABLE_COLUMNS, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str = "") -> Path:
    """Plot loss and accuracy per round into a PNG (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(rounds, series("train_loss"), marker="o", label="train (devices)")
    ax_loss.plot(rounds, series("eval_loss"), marker="s", label="test (devices)")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(rounds, series("accuracy"), marker="o", label="accuracy (fused)")
    ax_acc.plot(rounds, series("macro_f1"), marker="s", label="macro-F1 (fused)")
    for key, label in (("acc_face", "face only"), ("acc_voice", "voice only"), ("acc_text", "text only")):
        values = series(key)
        if any(not math.isnan(v) for v in values):
            ax_acc.plot(rounds, values, linestyle="--", alpha=0.7, label=label)
    ax_acc.axhline(1 / 7, color="grey", linestyle=":", label="chance (1/7)")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("round")
    ax_acc.set_title("federated evaluation on devices' test splits")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(rounds)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
