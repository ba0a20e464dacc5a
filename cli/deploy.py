"""Deployment commands: `emofed certs`, `emofed device enroll|start`, `emofed server start`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli.common import PROGRESS_PREFIX, fail, raise_interrupt, resolve_config, run_path
from cli.output import make_line_printer, print_run_result
from emofed.config import ConfigError

INSECURE_WARNING = (
    "WARNING: --insecure: plain-text connection without TLS. Model updates, metrics and "
    "ledgers cross the network unencrypted and the coordinator is not authenticated. "
    "Use this only on a trusted test network."
)
INSECURE_SERVER_WARNING = (
    "WARNING: --insecure also turns device authentication OFF (Flower allows it only over "
    "TLS): any device that reaches this port can join the run, enrolled or not."
)

# Flower's log lines about a failed connection, replaced by one line of ours.
_CONNECTION_NOISE = ("Exit Code: 305", "SSL/TLS handshake error")


def _warn_insecure(*extra: str) -> None:
    banner = "!" * 78
    print("\n".join([banner, INSECURE_WARNING, *extra, banner]), file=sys.stderr, flush=True)


def cmd_certs(args: argparse.Namespace) -> int:
    """Create the CA and the coordinator's TLS certificate."""
    from privacy.certs import create_certificates

    try:
        made = create_certificates(Path(args.out), args.host, ca_days=args.ca_days, server_days=args.days)
    except (ValueError, FileExistsError, OSError) as err:
        return fail(str(err))
    print(f"{'created' if made.created_ca else 'reused'} CA      {made.ca_cert} (key {made.ca_key}, owner-only)")
    print(f"created server  {made.server_cert} (key {made.server_key}, owner-only)")
    print(f"valid for       {', '.join(made.hosts)}")
    print(f"give devices    {made.ca_cert} (never the .key files)")
    return 0


def cmd_device_enroll(args: argparse.Namespace) -> int:
    """Create a device's key pair and/or enrol its public key with a coordinator."""
    from client.supernode import DeviceSetupError, ensure_device_keys
    from server.coordinator import CoordinatorHome, check_device_name, enroll

    try:
        check_device_name(args.name)
        if args.public_key:
            if not args.coordinator:
                return fail("--public-key enrols a key with a coordinator: give --coordinator DIR")
            public = Path(args.public_key)
            if not public.is_file():
                return fail(f"public key not found: {public}")
        else:
            if not args.device_dir:
                return fail("give --device-dir DIR (the device's own folder), or --public-key FILE on the coordinator")
            public, created = ensure_device_keys(Path(args.device_dir))
            print(f"{'created' if created else 'kept existing'} device key pair in {public.parent} (private key owner-only)")
        if args.coordinator:
            target = enroll(CoordinatorHome(Path(args.coordinator)), args.name, public)
            print(f"enrolled {args.name!r} with the coordinator: {target}")
            print("the coordinator registers it with its SuperLink at the next `emofed server start`")
        else:
            print(f"public key to enrol: {public}")
            print(
                "send it to the coordinator's operator, who runs:\n"
                f"  emofed device enroll {args.name} --public-key {public.name} --coordinator COORDINATOR_DIR"
            )
    except (ValueError, DeviceSetupError, FileExistsError, OSError) as err:
        return fail(str(err))
    return 0


def cmd_device_start(args: argparse.Namespace) -> int:
    """Check the device's data and keys, then run its SuperNode until the coordinator is done."""
    from client.supernode import (
        DeviceSetupError,
        check_ca,
        check_data_folder,
        check_private_key,
        key_refused,
        refusal_reason,
        run_supernode,
        supernode_command,
    )
    from device.layout import device_key_paths, supernode_log_path
    from server.coordinator import check_device_name

    device_dir = Path(args.device_dir)
    try:
        name = check_device_name(args.name or device_dir.resolve().name)
        if args.refused_retry < 0 or (args.max_wait is not None and args.max_wait <= 0):
            return fail(
                f"--refused-retry must be >= 0 and --max-wait > 0. Found {args.refused_retry:g} and {args.max_wait:g}."
            )
        if args.insecure:
            _warn_insecure("WARNING: --insecure: this device does not authenticate itself (Flower needs TLS for it).")
            ca = None
        else:
            check_private_key(device_key_paths(device_dir)[0])
            if not args.ca:
                return fail("give --ca FILE (the coordinator's ca.crt), or --insecure for a plain-text test setup")
            ca = Path(args.ca)
            check_ca(ca)
        data = Path(args.data)
        found = check_data_folder(data)
        command = supernode_command(
            superlink=args.superlink, device_dir=device_dir, data=data, device_id=name, ca=ca, max_wait=args.max_wait
        )
    except (ValueError, DeviceSetupError) as err:
        return fail(str(err))
    print(f"{PROGRESS_PREFIX} device {name}: {found.describe()}", flush=True)
    print(f"{PROGRESS_PREFIX} joining {args.superlink} ({'TLS' if ca else 'INSECURE'}; raw data stays in {data})", flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)
    on_line = make_line_printer(args.verbose)
    tail: list[str] = []

    def follow(line: str) -> None:
        tail.append(line)
        del tail[:-60]
        # A refused connection is summed up in one line below; Flower's own lines about
        # it would only repeat that (they stay in the log and in --verbose).
        if args.verbose or not any(part in line for part in _CONNECTION_NOISE):
            on_line(line)

    first_refusal: float | None = None
    try:
        while True:
            tail.clear()
            code = run_supernode(command, device_dir, follow)
            if not key_refused(tail):
                break
            # The coordinator registers enrolled keys just after its SuperLink starts: a
            # device that connects in between is refused once or twice, then let in.
            now = time.monotonic()
            if first_refusal is None:
                first_refusal = now
                print(
                    f"{PROGRESS_PREFIX} the coordinator refused this device's key; retrying for "
                    f"{args.refused_retry:g} s in case it is still registering enrolled keys",
                    flush=True,
                )
            if now - first_refusal >= args.refused_retry:
                break
            time.sleep(3.0)
    except KeyboardInterrupt:
        print(f"{PROGRESS_PREFIX} device {name} stopped", flush=True)
        return 0
    reason = refusal_reason(tail, superlink=args.superlink, max_wait=args.max_wait)
    if reason is not None:
        return fail(f"{reason} (log: {supernode_log_path(device_dir)})", code=1)
    if code != 0:
        return fail(f"SuperNode exited with code {code} (log: {supernode_log_path(device_dir)})", code=1)
    return 0


def cmd_server_start(args: argparse.Namespace) -> int:
    """Start the coordinator (SuperLink with TLS and device authentication) and serve one run."""
    try:
        cfg, config_path = resolve_config(args)
    except ConfigError as err:
        return fail(str(err))
    from server.coordinator import Coordinator, CoordinatorError, CoordinatorHome, deployment_overrides

    if args.insecure:
        _warn_insecure(INSECURE_SERVER_WARNING)
    coordinator = Coordinator(
        CoordinatorHome(Path(args.home)), host=args.host, port=args.port, insecure=args.insecure,
        startup_timeout=cfg.simulation.startup_timeout_s,
    )
    try:
        keys = coordinator.preflight()
        overrides = deployment_overrides(cfg, args.overrides, len(keys))
        cfg, _ = resolve_config(argparse.Namespace(config=args.config, overrides=overrides))
        run_dir = run_path(cfg)
    except (CoordinatorError, ConfigError) as err:
        return fail(str(err))
    started = time.monotonic()
    signal.signal(signal.SIGTERM, raise_interrupt)
    progress = _progress
    finished = False
    try:
        security = "INSECURE, device authentication OFF" if args.insecure else "TLS, device authentication on"
        progress(f"starting the SuperLink on {args.host}:{args.port} ({security})")
        coordinator.start()
        if args.insecure:
            nodes: dict[str, int] = {}
            progress(f"waiting for {cfg.devices} devices to connect (any device is accepted) ...")
        else:
            nodes = coordinator.register(keys)
            progress(f"{len(nodes)} enrolled devices registered; waiting for {cfg.devices} of them to connect ...")
        coordinator.wait_for_devices(nodes, cfg.devices, timeout=args.wait, progress=progress)
        progress(
            f"serving {cfg.rounds} rounds to {cfg.devices} devices ({cfg.strategy.name}; "
            f"secure aggregation {'on' if cfg.privacy.secagg.enabled else 'off'})"
        )
        result = coordinator.run(
            config_path=config_path, overrides=overrides, run_dir=run_dir, nodes=nodes,
            on_line=make_line_printer(args.verbose),
        )
        print_run_result(result.run_dir, started)
        finished = True
        if args.keep_running:
            progress("run done; the SuperLink keeps running (Ctrl-C to stop it)")
            while True:
                time.sleep(3600)
    except CoordinatorError as err:
        return fail(str(err), code=1)
    except KeyboardInterrupt:
        if finished:
            progress("SuperLink stopped")
            return 0
        return fail(f"interrupted; partial output (if any) in {run_dir}.incomplete", code=130)
    finally:
        coordinator.stop()
    return 0


def _progress(message: str) -> None:
    print(f"{PROGRESS_PREFIX} {message}", flush=True)


def add_deploy_parsers(
    sub: argparse._SubParsersAction, add_config_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add `certs`, `device` and `server` to the `emofed` command."""
    certs = sub.add_parser("certs", help="create the coordinator's CA and TLS certificate")
    certs.add_argument("--out", "-o", required=True, help="folder for ca.crt/ca.key/server.crt/server.key")
    certs.add_argument(
        "--host", action="append", default=[], metavar="NAME_OR_IP",
        help="a host name or IP devices use to reach the coordinator (repeatable; localhost and 127.0.0.1 always included)",
    )
    certs.add_argument("--days", type=int, default=397, help="validity of the server certificate (default 397)")
    certs.add_argument("--ca-days", type=int, default=3650, help="validity of a new CA (default 3650)")
    certs.set_defaults(func=cmd_certs)

    device = sub.add_parser("device", help="a participating device: enrol it, start it")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    enroll = device_sub.add_parser("enroll", help="create the device's key pair and enrol its public key")
    enroll.add_argument("name", help="the device's name (letters, digits, _ . -)")
    enroll.add_argument("--device-dir", help="the device's own folder (keys, ledger); created if missing")
    enroll.add_argument("--coordinator", help="the coordinator folder to enrol the key in (same machine, or on the coordinator)")
    enroll.add_argument("--public-key", help="on the coordinator: a device's device.pub received from it")
    enroll.set_defaults(func=cmd_device_enroll)

    start = device_sub.add_parser("start", help="join a coordinator (a Flower SuperNode with this device's key and data)")
    start.add_argument("--data", required=True, help="the device's data folder (samples.jsonl, face/, voice/)")
    start.add_argument("--device-dir", required=True, help="the device folder given to `emofed device enroll`")
    start.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's address")
    start.add_argument("--ca", help="the coordinator's CA certificate (ca.crt)")
    start.add_argument("--name", help="the device's name in ledgers (default: the device folder's name)")
    start.add_argument(
        "--max-wait", type=float, default=600.0, help="seconds to keep trying to reach the coordinator (default 600)"
    )
    start.add_argument(
        "--refused-retry", type=float, default=30.0, metavar="SECONDS",
        help="keep retrying this long when the coordinator refuses the device's key (default 30)",
    )
    start.add_argument("--insecure", action="store_true", help="plain text, no TLS (test networks only)")
    start.add_argument("--verbose", "-v", action="store_true", help="show Flower's full log")
    start.set_defaults(func=cmd_device_start)
    from cli.device import add_run_parser

    add_run_parser(device_sub)

    server = sub.add_parser("server", help="the coordinator")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    serve = server_sub.add_parser("start", help="start the SuperLink (TLS, device authentication) and run training")
    add_config_args(serve)
    serve.add_argument("--home", default="coordinator", help="the coordinator folder (certs/, enrolled/); default ./coordinator")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9092, help="port devices connect to (default 9092)")
    serve.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the devices to connect (default 600)")
    serve.add_argument("--keep-running", action="store_true", help="keep the SuperLink up after the run")
    serve.add_argument("--insecure", action="store_true", help="plain text, no TLS (test networks only)")
    serve.add_argument("--verbose", "-v", action="store_true", help="show Flower's full log stream")
    serve.set_defaults(func=cmd_server_start)
