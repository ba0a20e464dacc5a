"""The `emofed` command: simulate, data, config (and the commands of later issues)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cli.common import (
    PROGRESS_PREFIX,
    add_config_args,
    fail,
    raise_interrupt,
    resolve_config,
    run_path,
)
from cli.output import make_line_printer, print_run_result
from emofed.config import ConfigError, to_yaml


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a federated simulation through Flower's simulation runtime."""
    try:
        cfg, config_path = resolve_config(args)
    except ConfigError as err:
        return fail(str(err))
    print(
        f"{PROGRESS_PREFIX} simulating {cfg.devices} devices x {cfg.rounds} rounds "
        f"({cfg.strategy.name}, data={cfg.data.source}) with Flower's simulation runtime",
        flush=True,
    )
    # Heavy imports only after the configuration is known to be good.
    from corpora.folder import FederationFolderError, read_federation
    from models.features import check_public_space
    from models.labels import EMOTIONS
    from policy.federated import check_catalogue
    from simulations.runner import SimulationError, run_simulation

    if cfg.policy.enabled:
        try:
            check_catalogue(cfg)
        except ConfigError as err:
            return fail(str(err))
    try:
        check_public_space(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return fail(str(err))

    try:
        overrides = list(args.overrides)
        if cfg.data.source == "folder":
            meta = read_federation(cfg.data.path or "")
            if cfg.devices != len(meta["devices"]):
                print(f"{PROGRESS_PREFIX} data folder holds {len(meta['devices'])} devices; using devices={len(meta['devices'])}")
                overrides.append(f"devices={len(meta['devices'])}")
                cfg = dataclasses.replace(cfg, devices=len(meta["devices"]))
            labels = meta.get("labels")
            if not (isinstance(labels, list) and all(label in EMOTIONS for label in labels)):
                raise ConfigError(f"{cfg.data.path}/federation.json: 'labels' must list emotions of {', '.join(EMOTIONS)}")
            if cfg.model.kind == "features" and cfg.model.labels is None and 2 <= len(labels) < len(EMOTIONS):
                print(f"{PROGRESS_PREFIX} the corpus's label set: {', '.join(labels)} (other logits off)")
                overrides.append(f"model.labels=[{','.join(labels)}]")
                cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, labels=list(labels)))
            if meta.get("heldout"):
                print(f"{PROGRESS_PREFIX} plus {len(meta['heldout'])} held-out devices: evaluated every round, never trained")
        run_dir = run_path(cfg)
    except (ConfigError, FederationFolderError) as err:
        return fail(str(err))

    print(f"{PROGRESS_PREFIX} starting a local SuperLink and Ray (takes ~20 s) ...", flush=True)
    on_line = make_line_printer(args.verbose)
    started = time.monotonic()
    # A terminated CLI must still stop the SuperLink and Ray it started: turn SIGTERM into
    # an exception so the runner's clean-up runs, as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        result = run_simulation(cfg, config_path=config_path, overrides=overrides, run_dir=run_dir, on_line=on_line)
    except SimulationError as err:
        return fail(str(err), code=1)
    except KeyboardInterrupt:
        return fail(f"interrupted; partial output (if any) in {run_dir}.incomplete", code=130)
    print_run_result(result.run_dir, started)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write the synthetic federation of a config to a federation folder."""
    from simulations.export import write_federation
    from simulations.synthetic import SyntheticFederation

    try:
        cfg, _ = resolve_config(args)
    except ConfigError as err:
        return fail(str(err))
    out = Path(args.out)
    fed = SyntheticFederation(cfg.data, num_devices=cfg.devices, seed=cfg.seed)
    try:
        path = write_federation(fed, out)
    except (FileExistsError, ValueError, OSError) as err:
        return fail(str(err), code=1)
    print(f"wrote {cfg.devices} synthetic devices to {path}")
    print(f"train on it with: emofed simulate data.source=folder data.path={path}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved configuration."""
    try:
        cfg, _ = resolve_config(args)
    except ConfigError as err:
        return fail(str(err))
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
            return fail(f"--pin {item!r} is not of the form SCOPE=FINGERPRINT")
        pinned[scope] = key
    try:
        report = audit(Path(args.path), pinned_keys=pinned or None)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    print(report.format_table())
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
        print(f"report written to {args.json}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `emofed` command."""
    parser = argparse.ArgumentParser(
        prog="emofed",
        description="Federated, differentially private multimodal emotion recognition.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    simulate = sub.add_parser("simulate", help="run a federated simulation (flwr run on a local SuperLink)")
    add_config_args(simulate)
    simulate.add_argument("--verbose", "-v", action="store_true", help="show Flower's full log stream")
    simulate.set_defaults(func=cmd_simulate)

    data = sub.add_parser("data", help="federation folders")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic federation to a folder")
    add_config_args(synth)
    synth.add_argument("--out", "-o", required=True, help="output folder (must not exist)")
    synth.set_defaults(func=cmd_data_synth)
    from cli.data import add_import_parser, add_pair_parser

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
    add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    from cli.pretrain import add_pretrain_parser

    add_pretrain_parser(sub)

    from cli.deploy import add_deploy_parsers

    add_deploy_parsers(sub, add_config_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `emofed` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
