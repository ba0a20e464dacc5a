"""Privacy–utility table: the default simulation at several ε, per DP level.

Runs `emofed simulate` (the default synthetic federation unless overrides are given)
once without privacy (ε = ∞) and once per (ε, level), where level is

* ``device``: sample-level DP-SGD on every device (Opacus), budget ε per device;
* ``user``: user-level DP on the aggregate (clipped updates + Gaussian noise), budget
  ε for the federation;
* ``both``: the two together, each with budget ε.

Noise is calibrated so the planned rounds spend the budget. Prints a Markdown table of
final accuracy, macro-F1, the ε actually spent and wall time; ``--readme`` writes it
into README.md between the ``privacy-utility`` markers. Every run is audited with
``emofed audit`` on its ledger, and a failed audit fails the benchmark.

    .venv/bin/python benchmarks/privacy_utility.py                     # 10 runs, ~1 h on 2 cores
    .venv/bin/python benchmarks/privacy_utility.py --epsilons 3 --levels device rounds=4
    .venv/bin/python benchmarks/privacy_utility.py --readme
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("device", "user", "both")
START, END = "<!-- privacy-utility:start -->", "<!-- privacy-utility:end -->"


def _privacy_overrides(epsilon: float, level: str) -> list[str]:
    if math.isinf(epsilon):
        return ["privacy.preset=off"]
    device, user = level in ("device", "both"), level in ("user", "both")
    return [
        "privacy.preset=balanced",
        f"privacy.device.enabled={str(device).lower()}",
        f"privacy.device.epsilon={epsilon}",
        f"privacy.user.enabled={str(user).lower()}",
        f"privacy.user.epsilon={epsilon}",
    ]


def _run(out: Path, name: str, overrides: list[str]) -> dict:
    command = [
        sys.executable, "-m", "cli", "simulate",
        f"output.dir={out}", f"output.name={name}", *overrides,
    ]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"run {name} failed (exit {done.returncode}):\n{tail}")
    summary = json.loads((out / name / "summary.json").read_text())
    audited = subprocess.run(
        [sys.executable, "-m", "cli", "audit", str(out / name)],
        cwd=ROOT, capture_output=True, text=True,
    )
    if (out / name / "ledger").exists() and audited.returncode != 0:
        raise SystemExit(f"run {name}: the ledger fails its audit:\n{audited.stdout}")
    summary["wall"] = wall
    return summary


def _spent(summary: dict, level: str) -> float | None:
    section = summary.get("privacy", {}).get(level, {})
    return section.get("epsilon") if section.get("enabled") else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    """Run the grid, print the table, optionally write it into the README."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="emofed-privacy-utility-"))
    cells = [(math.inf, "none")] + [(e, lvl) for e in sorted(args.epsilons) for lvl in args.levels]
    rows = []
    started = time.monotonic()
    for index, (epsilon, level) in enumerate(cells, 1):
        name = f"eps-{epsilon:g}-{level}"
        print(f"[{index}/{len(cells)}] ε={epsilon:g} level={level} ...", flush=True)
        summary = _run(out, name, _privacy_overrides(epsilon, level) + args.overrides)
        final = summary["final"]
        rows.append(
            (
                "∞" if math.isinf(epsilon) else f"{epsilon:g}",
                level,
                final["accuracy"],
                final["macro_f1"],
                _spent(summary, "device"),
                _spent(summary, "user"),
                summary.get("status", "complete"),
                summary["wall"],
            )
        )
        print(
            f"    accuracy {final['accuracy']:.3f}  macro-F1 {final['macro_f1']:.3f}  "
            f"({summary['wall']:.0f} s, {summary.get('status', 'complete')})",
            flush=True,
        )
    total = time.monotonic() - started
    command = "benchmarks/privacy_utility.py " + " ".join(argv)
    table = [
        "| ε | DP level | accuracy | macro-F1 | ε spent, device (max) | ε spent, user | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps, level, acc, f1, dev, user, status, wall in rows:
        note = "" if status == "complete" else f" ({status})"
        table.append(
            f"| {eps} | {level} | {acc:.3f} | {f1:.3f} | {_fmt(dev)} | {_fmt(user)} | {wall:.0f} s{note} |"
        )
    text = "\n".join(table)
    text += (
        f"\n\nδ = 1e-5 for every scope; chance accuracy {1 / 7:.3f}. Total wall time "
        f"{total / 60:.0f} min on this machine. Reproduce: `.venv/bin/python {command.strip()}`."
    )
    print()
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        body = readme.read_text(encoding="utf-8")
        if START not in body or END not in body:
            raise SystemExit(f"README.md has no {START} … {END} markers")
        body = re.sub(
            re.escape(START) + ".*?" + re.escape(END),
            lambda _: f"{START}\n{text}\n{END}",
            body,
            flags=re.S,
        )
        readme.write_text(body, encoding="utf-8")
        print("\nwritten into README.md")
    print(f"runs kept in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
