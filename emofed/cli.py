"""The `emofed` command: simulate, data, config (and the commands of later issues)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from emofed.config import ConfigError, EmofedConfig, load_config, to_yaml

APP_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = APP_DIR / "configs" / "default.yaml"
# Same as server.report.PROGRESS_PREFIX; not imported so that a typo in the
# configuration is reported before torch and Flower load.
PROGRESS_PREFIX = "emofed |"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fail(message: str, code: int = 2) -> int:
    print(f"emofed: error: {message}", file=sys.stderr)
    return code


def _resolve(args: argparse.Namespace) -> tuple[EmofedConfig, Path]:
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    return load_config(path, args.overrides), path


def _run_name(cfg: EmofedConfig) -> Path:
    root = Path(cfg.output.dir).resolve()
    if cfg.output.name:
        path = root / cfg.output.name
        if path.exists() or path.with_name(path.name + ".incomplete").exists():
            raise ConfigError(f"'output.name': run directory {path} already exists; choose another name")
        return path
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{cfg.strategy.name}"
    for suffix in ["", *(f"-{i}" for i in range(2, 1000))]:
        path = root / f"{base}{suffix}"
        if not path.exists() and not path.with_name(path.name + ".incomplete").exists():
            return path
    raise ConfigError(f"'output.dir': no free run name under {root}")


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a federated simulation through Flower's simulation runtime."""
    try:
        cfg, config_path = _resolve(args)
    except ConfigError as err:
        return _fail(str(err))
    print(
        f"{PROGRESS_PREFIX} simulating {cfg.devices} devices x {cfg.rounds} rounds "
        f"({cfg.strategy.name}, data={cfg.data.source}) with Flower's simulation runtime",
        flush=True,
    )
    # Heavy imports only after the configuration is known to be good.
    from client.data import FederationFolderError, read_federation
    from client.policy_fed import check_catalogue
    from simulations.runner import SimulationError, run_simulation

    if cfg.policy.enabled:
        try:
            check_catalogue(cfg)
        except ConfigError as err:
            return _fail(str(err))

    try:
        overrides = list(args.overrides)
        if cfg.data.source == "folder":
            meta = read_federation(cfg.data.path or "")
            if cfg.devices != len(meta["devices"]):
                print(f"{PROGRESS_PREFIX} data folder holds {len(meta['devices'])} devices; using devices={len(meta['devices'])}")
                overrides.append(f"devices={len(meta['devices'])}")
                cfg = dataclasses.replace(cfg, devices=len(meta["devices"]))
            if meta.get("heldout"):
                print(f"{PROGRESS_PREFIX} plus {len(meta['heldout'])} held-out devices: evaluated every round, never trained")
        run_dir = _run_name(cfg)
    except (ConfigError, FederationFolderError) as err:
        return _fail(str(err))

    print(f"{PROGRESS_PREFIX} starting a local SuperLink and Ray (takes ~20 s) ...", flush=True)
    on_line = make_line_printer(args.verbose)
    started = time.monotonic()
    # A terminated CLI must still stop the SuperLink and Ray it started: turn SIGTERM into
    # an exception so the runner's clean-up runs, as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = run_simulation(cfg, config_path=config_path, overrides=overrides, run_dir=run_dir, on_line=on_line)
    except SimulationError as err:
        return _fail(str(err), code=1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; partial output (if any) in {run_dir}.incomplete", code=130)
    print_run_result(result.run_dir, started)
    return 0


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


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write the synthetic federation of a config to a federation folder."""
    from simulations.export import write_federation
    from simulations.synthetic import SyntheticFederation

    try:
        cfg, _ = _resolve(args)
    except ConfigError as err:
        return _fail(str(err))
    out = Path(args.out)
    fed = SyntheticFederation(cfg.data, num_devices=cfg.devices, seed=cfg.seed)
    try:
        path = write_federation(fed, out)
    except (FileExistsError, ValueError, OSError) as err:
        return _fail(str(err), code=1)
    print(f"wrote {cfg.devices} synthetic devices to {path}")
    print(f"train on it with: emofed simulate data.source=folder data.path={path}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved configuration."""
    try:
        cfg, _ = _resolve(args)
    except ConfigError as err:
        return _fail(str(err))
    print(to_yaml(cfg), end="")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Verify a run's privacy ledger and recompute its ε with independent accountants."""
    from privacy.audit import audit

    # dp-accounting's RDP logs each fractional order it drops (its documented behaviour;
    # the bound stays valid), one line per order: noise in an audit report.
    logging.getLogger("absl").setLevel(logging.ERROR)
    pinned: dict[str, str] = {}
    for item in args.pin or ():
        scope, sep, key = item.partition("=")
        if not sep or not scope or not key:
            return _fail(f"--pin {item!r} is not of the form SCOPE=FINGERPRINT")
        pinned[scope] = key
    try:
        report = audit(Path(args.path), pinned_keys=pinned or None)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    print(report.format_table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
        print(f"report written to {args.json}")
    return 0 if report.ok else 1


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help=f"YAML configuration (default: {DEFAULT_CONFIG.relative_to(APP_DIR)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. rounds=10 devices=50")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `emofed` command."""
    parser = argparse.ArgumentParser(
        prog="emofed",
        description="Federated, differentially private multimodal emotion recognition.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="run a federated simulation (flwr run on a local SuperLink)")
    _add_config_args(simulate)
    simulate.add_argument("--verbose", "-v", action="store_true", help="show Flower's full log stream")
    simulate.set_defaults(func=cmd_simulate)

    data = sub.add_parser("data", help="federation folders")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic federation to a folder")
    _add_config_args(synth)
    synth.add_argument("--out", "-o", required=True, help="output folder (must not exist)")
    synth.set_defaults(func=cmd_data_synth)
    from simulations.importers.cli import add_import_parser, add_pair_parser

    add_import_parser(data_sub)
    add_pair_parser(data_sub)

    audit = sub.add_parser(
        "audit",
        help="verify a privacy ledger (hash chains, signatures, budgets) and recompute ε",
    )
    audit.add_argument("path", help="a run directory holding ledger/, or a ledger directory")
    audit.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    audit.add_argument(
        "--pin", action="append", metavar="SCOPE=FINGERPRINT",
        help="expected key fingerprint of a scope, obtained out of band (repeatable)",
    )
    audit.set_defaults(func=cmd_audit)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved configuration")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    from emofed.cli_deploy import add_deploy_parsers

    add_deploy_parsers(sub, _add_config_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `emofed` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
