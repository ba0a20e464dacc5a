"""Human-readable results of a run: the per-round table and the curves plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Prefix of the project's progress lines in Flower's log stream (the CLI shows these).

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
    ("uar", "UAR", "{:>5.3f}"),
    # the global model on held-out devices (people it never trained on)
    ("heldout_accuracy", "held-out acc", "{:>12.3f}"),
    ("heldout_macro_f1", "held-out F1", "{:>11.3f}"),
    ("heldout_uar", "held-out UAR", "{:>12.3f}"),
    ("train_devices", "trained", "{:>7d}"),
    ("declined_devices", "declined", "{:>8d}"),
    ("failed_devices", "failed", "{:>6d}"),
    ("personal_accuracy", "personal acc", "{:>12.3f}"),
    ("personal_gain_mean", "gain mean", "{:>+9.3f}"),
    ("personal_gain_worst", "gain worst", "{:>+10.3f}"),
    ("epsilon_device_max", "ε device", "{:>8.3f}"),  # the largest of the round
    ("epsilon_user", "ε user", "{:>6.3f}"),
    ("seconds", "seconds", "{:>7.1f}"),
)
# Privacy columns, shown only when some row has a value: a run without DP keeps the
# plain table. Devices decline only under device-level DP, so "declined" goes with it.
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "declined_devices": ("epsilon_device_max", "declined_devices"),
    "epsilon_device_max": ("epsilon_device_max",),
    "epsilon_user": ("epsilon_user",),
    # personal layers (personal.enabled): the personalised model and its gain per device
    "personal_accuracy": ("personal_accuracy",),
    "personal_gain_mean": ("personal_accuracy",),
    "personal_gain_worst": ("personal_accuracy",),
    "uar": ("uar",),
    "heldout_accuracy": ("heldout_accuracy",),
    "heldout_macro_f1": ("heldout_accuracy",),
    "heldout_uar": ("heldout_accuracy",),
}


def _cell(value: Any, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value).rjust(width)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    def shown(key: str) -> bool:
        if key not in OPTIONAL_COLUMNS:
            return True
        return any(row.get(k) not in (None, 0) for row in rows for k in OPTIONAL_COLUMNS[key])

    return [column for column in TABLE_COLUMNS if shown(column[0])]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Fixed-width table of per-round metrics (missing values shown as '-').

    Privacy columns (device ε, user ε, declined devices) appear when a row has them.
    """
    columns = _columns(rows)
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), len(fmt.format(0) if "d" in fmt else fmt.format(0.0))) for _, h, fmt in columns]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [_cell(row.get(key), fmt, w) for (key, _, fmt), w in zip(columns, widths, strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def gain_distribution(
    global_accuracy: Sequence[float], personal_accuracy: Sequence[float], weights: Sequence[int]
) -> dict[str, Any]:
    """How much personal layers gain over the global model, device by device.

    Parameters
    ----------
    global_accuracy, personal_accuracy : Sequence[float]
        Each device's accuracy on its own test split with the global model and with its
        personalised model.
    weights : Sequence[int]
        Each device's number of test examples.

    Returns
    -------
    dict
        ``personal-accuracy`` (example-weighted, comparable with the federation's
        ``accuracy``), ``personal-gain-mean`` (mean over devices of personalised minus
        global accuracy), ``personal-gain-worst`` (the smallest device gain),
        ``personal-loss-share`` (share of devices whose accuracy drops) and
        ``personal-gains`` (every device's gain, ascending). Empty for no device.

    Raises
    ------
    ValueError
        If the sequences differ in length or a weight is negative.
    """
    if not len(global_accuracy) == len(personal_accuracy) == len(weights):
        raise ValueError(
            f"one global accuracy, personal accuracy and weight per device expected, found "
            f"{len(global_accuracy)}, {len(personal_accuracy)} and {len(weights)}"
        )
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative counts, found {list(weights)}")
    if not weights:
        return {}
    gains = sorted(float(p) - float(g) for g, p in zip(global_accuracy, personal_accuracy, strict=True))
    total = sum(weights)
    weighted = sum(float(p) * w for p, w in zip(personal_accuracy, weights, strict=True))
    return {
        "personal-accuracy": weighted / total if total else float("nan"),
        "personal-gain-mean": sum(gains) / len(gains),
        "personal-gain-worst": gains[0],
        "personal-loss-share": sum(g < 0 for g in gains) / len(gains),
        "personal-gains": gains,
    }


def format_personalisation(section: Mapping[str, Any] | None) -> str | None:
    """The final CLI line of a run's ``personalisation`` summary, None when it has none."""
    if not section or section.get("gain_mean") is None:
        return None
    return (
        f"personalised accuracy {section['accuracy']:.3f} (global {section['global_accuracy']:.3f}); "
        f"gain per device: mean {section['gain_mean']:+.3f}, worst {section['gain_worst']:+.3f}, "
        f"{section['loss_share']:.0%} of {section['devices']} devices lose accuracy"
    )


# Series of the privacy panel: budget name -> (metrics key, label).
PRIVACY_SERIES: dict[str, tuple[str, str]] = {
    "device": ("epsilon_device_max", "device ε (largest)"),
    "user": ("epsilon_user", "user-level ε (federation)"),
}


def curves_figure(
    rows: Sequence[Mapping[str, Any]], *, title: str = "", budgets: Mapping[str, float] | None = None
) -> Any:
    """The matplotlib Figure of :func:`plot_curves` (headless backend).

    Raises
    ------
    ValueError
        If a budget names a level other than ``device`` or ``user``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = dict(budgets or {})
    unknown = sorted(set(budgets) - set(PRIVACY_SERIES))
    if unknown:
        raise ValueError(f"unknown privacy level(s) {unknown}; known: {', '.join(PRIVACY_SERIES)}")
    rounds = [r["round"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    panels = 3 if budgets else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    ax_loss, ax_acc = axes[0], axes[1]
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
    if budgets:
        ax_eps = axes[2]
        for level, budget in budgets.items():
            key, label = PRIVACY_SERIES[level]
            (line,) = ax_eps.plot(rounds, series(key), marker="o", label=label)
            ax_eps.axhline(budget, color=line.get_color(), linestyle="--", label=f"{level} budget ε={budget:g}")
        ax_eps.set_ylim(bottom=0)
        ax_eps.set_xlabel("round")
        ax_eps.set_ylabel("cumulative ε")
        ax_eps.set_title("privacy spent")
        ax_eps.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    for ax in axes:
        ax.set_xticks(rounds)
    return fig


def plot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    title: str = "",
    budgets: Mapping[str, float] | None = None,
) -> Path:
    """Plot loss and accuracy per round into a PNG (headless).

    With ``budgets`` (ε budget per enabled DP level, ``device`` and/or ``user``) a third
    panel shows the cumulative ε per round, budgets as dashed lines.
    """
    fig = curves_figure(rows, title=title, budgets=budgets)
    import matplotlib.pyplot as plt  # after curves_figure has chosen the headless backend

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
