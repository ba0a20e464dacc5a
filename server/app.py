"""The Flower ServerApp: one emofed run, from configuration to run directory."""

from __future__ import annotations

import logging
import shlex
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from emofed.config import MESSAGE_CONFIG_KEY, EmofedConfig, load_config, to_json, to_yaml
from models import build_model, get_state, shared_state_keys
from server.report import PROGRESS_PREFIX, plot_curves
from server.rundir import PLOT_FILE, RunDirectory
from server.strategy import RoundLog, build_strategy

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
_LOGGERS = ("emofed", "server", "client", "models", "privacy", "simulations")

app = ServerApp()


def setup_logging(level: int = logging.INFO) -> None:
    """Send the project's log records to stdout, which Flower streams to `flwr run`."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{PROGRESS_PREFIX} %(message)s"))
    for name in _LOGGERS:
        log = logging.getLogger(name)
        log.handlers = [handler]
        log.setLevel(level)
        log.propagate = False


def resolve_run_config(run_config: dict[str, Any]) -> tuple[EmofedConfig, Path]:
    """Turn Flower's run config (config path, overrides, run dir) into ours.

    Raises
    ------
    emofed.config.ConfigError
        If the configuration is invalid.
    """
    config_path = Path(str(run_config.get("config", "") or "configs/default.yaml"))
    if not config_path.is_absolute():
        config_path = APP_DIR / config_path
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    cfg = load_config(config_path, overrides)
    run_dir = str(run_config.get("run-dir", "") or "")
    if run_dir:
        path = Path(run_dir)
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output.dir) / (cfg.output.name or f"{stamp}-{cfg.strategy.name}")
    return cfg, path.resolve()


class RoundReporter:
    """Turns each round's screen log into a metrics row, a progress line and files."""

    def __init__(self, cfg: EmofedConfig, run_dir: RunDirectory, round_logs: dict[int, RoundLog]) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.round_logs = round_logs
        self.started = time.monotonic()
        self.last = self.started
        self.final_arrays: ArrayRecord | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Flower after every round (and once before the first)."""
        self.final_arrays = arrays
        if server_round == 0:
            self.last = time.monotonic()
            return None
        now = time.monotonic()
        log = self.round_logs.get(server_round, RoundLog())
        train, ev = log.train_metrics, log.eval_metrics
        row: dict[str, Any] = {
            "round": server_round,
            "train_loss": train.get("train-loss"),
            "train_examples": train.get("num-examples"),
            "train_devices": log.train_ok,
            "train_sampled": log.train_sent,
            "eval_loss": ev.get("loss"),
            "accuracy": ev.get("accuracy"),
            "macro_f1": ev.get("macro-f1"),
            "acc_face": ev.get("acc-face"),
            "acc_voice": ev.get("acc-voice"),
            "acc_text": ev.get("acc-text"),
            "eval_examples": ev.get("num-examples"),
            "eval_devices": log.eval_ok,
            "eval_sampled": log.eval_sent,
            "failed_devices": len(log.failures),
            "failures": log.failures,
            "confusion": ev.get("confusion"),
            "seconds": round(now - self.last, 2),
            "elapsed": round(now - self.started, 2),
        }
        self.last = now
        self.run_dir.append_round(row)

        def fmt(value: Any, spec: str = ".3f") -> str:
            return "-" if value is None else format(value, spec)

        logger.info(
            "round %d/%d  train loss %s  eval loss %s  accuracy %s  macro-F1 %s  "
            "devices trained %d/%d evaluated %d/%d%s  (%.1f s)",
            server_round,
            self.cfg.rounds,
            fmt(row["train_loss"]),
            fmt(row["eval_loss"]),
            fmt(row["accuracy"]),
            fmt(row["macro_f1"]),
            log.train_ok,
            log.train_sent,
            log.eval_ok,
            log.eval_sent,
            f"  failed {len(log.failures)}" if log.failures else "",
            row["seconds"],
        )
        for failure in log.failures:
            logger.info("  skipped: %s", failure)
        return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training as configured and write the run directory."""
    setup_logging()
    cfg, final_path = resolve_run_config(dict(context.run_config))
    run_dir = RunDirectory(final_path)
    logger.info("Run directory (while running): %s", run_dir.path)
    try:
        _run(grid, cfg, run_dir)
    except BaseException as err:
        reason = "".join(traceback.format_exception_only(type(err), err)).strip()
        run_dir.fail(f"{reason}\n\n{traceback.format_exc()}")
        logger.error("Run failed: %s (partial output kept in %s)", reason, run_dir.path)
        raise


def _run(grid: Grid, cfg: EmofedConfig, run_dir: RunDirectory) -> None:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    run_dir.write_config(to_yaml(cfg))
    model = build_model(cfg.model, device="cpu")
    keys = shared_state_keys(model)
    state = get_state(model, keys)
    initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    n_params = sum(int(v.size) for v in state.values())
    logger.info(
        "%d devices, %d rounds, strategy %s, %d shared parameters in %d arrays (%.2f MB per update)",
        cfg.devices, cfg.rounds, cfg.strategy.name, n_params, len(state), n_params * 4 / 1e6,
    )
    connected = len(list(grid.get_node_ids()))
    if connected != cfg.devices:
        logger.warning("%d devices connected, configuration says devices=%d", connected, cfg.devices)

    strategy = build_strategy(cfg)
    reporter = RoundReporter(cfg, run_dir, strategy.round_logs)  # type: ignore[attr-defined]
    payload = to_json(cfg)  # devices rebuild and re-validate the same config
    started = time.monotonic()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.rounds,
        timeout=cfg.strategy.round_timeout_s,
        train_config=ConfigRecord({MESSAGE_CONFIG_KEY: payload}),
        evaluate_config=ConfigRecord({MESSAGE_CONFIG_KEY: payload}),
        evaluate_fn=reporter,
    )
    wall = time.monotonic() - started
    final = result.arrays if len(result.arrays) else initial
    arrays = {k: a.numpy() for k, a in final.items()}
    run_dir.save_model(
        arrays,
        {"format": "emofed-shared-weights/1", "config": to_json(cfg), "keys": ",".join(keys)},
    )
    rows = run_dir.rows
    plot_curves(rows, run_dir.path / PLOT_FILE, title=f"emofed: {cfg.devices} devices, {cfg.strategy.name}")
    last = rows[-1] if rows else {}
    summary = {
        "status": "complete",
        "rounds": cfg.rounds,
        "devices": cfg.devices,
        "strategy": cfg.strategy.name,
        "final": {k: last.get(k) for k in ("accuracy", "macro_f1", "eval_loss", "train_loss", "acc_face", "acc_voice", "acc_text")},
        "failed_device_replies": sum(r.get("failed_devices", 0) for r in rows),
        "training_seconds": round(wall, 2),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = run_dir.finalize(summary)
    logger.info("Run complete: %s", path)
