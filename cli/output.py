"""What `emofed simulate` and `emofed server start` print: Flower's filtered log, a run's result."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from cli.common import PROGRESS_PREFIX

__all__ = ["make_line_printer", "print_run_result"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_line_printer(verbose: bool) -> Callable[[str], None]:
    """Print the progress lines (or, verbose, every line) of a Flower log stream."""

    def on_line(line: str) -> None:
        clean = _ANSI.sub("", line)
        if verbose:
            print(clean, flush=True)
        elif clean.startswith(PROGRESS_PREFIX) or "ERROR" in clean or clean.startswith(("Traceback", "  File")):
            print(clean, flush=True)

    return on_line


def print_run_result(run_dir: Path, started: float) -> None:
    """The per-round table, final figures, privacy spent and where the run went."""
    from server.policy import format_policy_table
    from server.report import format_personalisation, format_table

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    print()
    print(format_table(rows))
    print()
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    print(
        f"final accuracy {_num(final.get('accuracy'))}, macro-F1 "
        f"{_num(final.get('macro_f1'))} on the devices' test splits "
        f"(chance {1 / 7:.3f}); wall time {time.monotonic() - started:.0f} s"
    )
    heldout = summary.get("heldout")
    if heldout:
        print(
            f"held-out devices ({heldout.get('devices')} never trained, {heldout.get('examples')} samples): "
            f"accuracy {_num(heldout.get('accuracy'))}, macro-F1 {_num(heldout.get('macro_f1'))}, "
            f"UAR {_num(heldout.get('uar'))}"
        )
    personal_line = format_personalisation(summary.get("personalisation"))
    if personal_line:
        print(personal_line)
    policy_lines = format_policy_table(summary.get("policy"))
    if policy_lines:
        print()
        print("\n".join(policy_lines))
        print()
    elif (summary.get("policy") or {}).get("status") not in (None, "complete"):
        print(f"policy prior: {summary['policy']['status']} {summary['policy'].get('error', '')}".rstrip())
    privacy = summary.get("privacy") or {}
    for level, scope in (("device", "per device, largest"), ("user", "federation")):
        section = privacy.get(level) or {}
        if section.get("enabled"):
            print(
                f"privacy, {level} level: epsilon {_num(section.get('epsilon'))} spent of "
                f"{_num(section.get('budget_epsilon'), '.3g')} ({scope}), delta {privacy.get('delta'):g}"
            )
    if summary.get("status") != "complete":
        print(f"stopped after {summary.get('rounds_completed')} of {summary.get('rounds')} rounds: {summary.get('stop_reason')}")
    print(f"run directory: {run_dir}")
    if privacy.get("ledger"):
        print(f"audit it with: emofed audit {run_dir}")


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
