"""The Flower ServerApp: one emofed run, from configuration to run directory."""

from __future__ import annotations

# isort: off
import emofed.preload  # noqa: F401  (first: see emofed/preload.py)
# isort: on
import hashlib
import json
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
from emofed.protocol import PROGRESS_PREFIX
from models import build_model, get_state, shared_state_keys
from policy.federated import check_catalogue
from privacy.ledger_store import LedgerStore
from server.dp import PrivacyBudgetStop, UserLevelDP
from server.grids import ENROLLED_NODES_KEY, EnrolledGrid, parse_enrolled
from server.policy import policy_phase_blocker, run_policy_phase
from server.report import plot_curves
from server.rundir import PLOT_FILE, RunDirectory
from server.strategy import RoundLog, ScreenedStrategy, build_strategy

logger = logging.getLogger(__name__)

LEDGER_DIR = "ledger"
STOPPED_STATUS = "stopped-privacy-budget"
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


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def privacy_progress(cfg: EmofedConfig, row: dict[str, Any]) -> str:
    """The privacy part of a round's progress line, e.g. ``ε device ≤ 1.23/3 user 0.91/3``.

    Device ε is the largest cumulative ε among the devices aggregated this round, so
    every device is at or below it; empty when no DP level is on.
    """
    parts = []
    if cfg.privacy.device.enabled:
        parts.append(f"device ≤ {_fmt(row['epsilon_device_max'], '.2f')}/{cfg.privacy.device.epsilon:g}")
    if cfg.privacy.user.enabled:
        parts.append(f"user {_fmt(row['epsilon_user'], '.2f')}/{cfg.privacy.user.epsilon:g}")
    text = f"  ε {' '.join(parts)}" if parts else ""
    if row["declined_devices"]:
        text += f"  declined {row['declined_devices']}"
    return text


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
        row = round_row(server_round, log)
        row["seconds"] = round(now - self.last, 2)
        row["elapsed"] = round(now - self.started, 2)
        self.last = now
        self.run_dir.append_round(row)
        self._log_progress(server_round, log, row)
        return None

    def _log_progress(self, server_round: int, log: RoundLog, row: dict[str, Any]) -> None:
        """The round's progress line, then one line per notable device (skips, declines, failures)."""
        logger.info(
            "round %d/%d  train loss %s  eval loss %s  accuracy %s  macro-F1 %s  "
            "devices trained %d/%d evaluated %d/%d%s%s  (%.1f s)",
            server_round,
            self.cfg.rounds,
            _fmt(row["train_loss"]),
            _fmt(row["eval_loss"]),
            _fmt(row["accuracy"]),
            _fmt(row["macro_f1"]),
            log.train_ok,
            log.train_sent,
            log.eval_ok,
            log.eval_sent,
            f"  failed {len(log.failures)}" if log.failures else "",
            privacy_progress(self.cfg, row),
            row["seconds"],
        )
        if row["personal_gain_mean"] is not None:
            logger.info(
                "  personalised accuracy %s  gain per device: mean %+.3f  worst %+.3f  %.0f%% of devices lose",
                _fmt(row["personal_accuracy"]), row["personal_gain_mean"], row["personal_gain_worst"],
                100 * row["personal_loss_share"],
            )
        if log.heldout_ok:
            logger.info(
                "  held-out devices (never trained): accuracy %s  macro-F1 %s  UAR %s on %d devices",
                _fmt(row["heldout_accuracy"]), _fmt(row["heldout_macro_f1"]), _fmt(row["heldout_uar"]), log.heldout_ok,
            )
        for node, skips in log.device_skips.items():
            logger.info("  %s skipped samples: %s", node, ", ".join(f"{n} {k}" for k, n in skips.items()))
        for declined in log.declined:
            logger.info("  declined: %s", declined)
        for failure in log.failures:
            logger.info("  skipped: %s", failure)


def round_row(server_round: int, log: RoundLog) -> dict[str, Any]:
    """A round's row of ``metrics.jsonl`` from its screen log, without the timings.

    The caller adds ``seconds`` and ``elapsed``; every other column is here.
    """
    train, ev, heldout = log.train_metrics, log.eval_metrics, log.heldout_metrics
    return {
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
        "epsilon_user": log.user_epsilon,
        "epsilon_device_max": train.get("dp-epsilon-max"),
        "epsilon_device_mean": train.get("dp-epsilon-mean"),
        "clipping_norm": log.clipping_norm,
        "declined_devices": len(log.declined),
        "declined": log.declined,
        "failed_devices": len(log.failures),
        "failures": log.failures,
        "confusion": ev.get("confusion"),
        "uar": ev.get("uar"),
        # the global model on the held-out (test-only, unseen) devices
        "heldout_loss": heldout.get("loss"),
        "heldout_accuracy": heldout.get("accuracy"),
        "heldout_macro_f1": heldout.get("macro-f1"),
        "heldout_uar": heldout.get("uar"),
        "heldout_examples": heldout.get("num-examples"),
        "heldout_devices": log.heldout_ok,
        "heldout_declined": log.heldout_declined,
        "heldout_confusion": heldout.get("confusion"),
        "device_skips": log.device_skips,
        # personal layers: the personalised model, and its gain over the global one per device
        "personal_accuracy": ev.get("personal-accuracy"),
        "personal_gain_mean": ev.get("personal-gain-mean"),
        "personal_gain_worst": ev.get("personal-gain-worst"),
        "personal_loss_share": ev.get("personal-loss-share"),
        "personal_gains": ev.get("personal-gains"),
    }


def heldout_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``heldout`` section of ``summary.json``; None when the run had no held-out device.

    The last round's global-model scores on the held-out devices (identity-disjoint test
    population), and the local-test scores beside them.
    """
    scored = [r for r in rows if r.get("heldout_accuracy") is not None]
    if not scored:
        return None
    last = scored[-1]
    return {
        "round": last["round"],
        "devices": last.get("heldout_devices"),
        "examples": last.get("heldout_examples"),
        "accuracy": last.get("heldout_accuracy"),
        "macro_f1": last.get("heldout_macro_f1"),
        "uar": last.get("heldout_uar"),
        "loss": last.get("heldout_loss"),
        "local_test": {k: last.get(k) for k in ("accuracy", "macro_f1", "uar")},
    }


def personalisation_summary(cfg: EmofedConfig, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``personalisation`` section of ``summary.json``; None when personal layers are off.

    The last evaluated round's distribution of the personalised model's gain over the
    global model, per device.
    """
    if not cfg.personal.enabled:
        return None
    scored = [r for r in rows if r.get("personal_gain_mean") is not None]
    section: dict[str, Any] = {"layers": list(cfg.personal.layers), "round": None}
    if scored:
        last = scored[-1]
        gains = last.get("personal_gains") or []
        section.update(
            {
                "round": last["round"],
                "devices": len(gains),
                "global_accuracy": last.get("accuracy"),
                "accuracy": last.get("personal_accuracy"),
                "gain_mean": last.get("personal_gain_mean"),
                "gain_worst": last.get("personal_gain_worst"),
                "loss_share": last.get("personal_loss_share"),
                "gains": gains,
            }
        )
    return section


def privacy_summary(
    cfg: EmofedConfig,
    rows: list[dict[str, Any]],
    user_dp: UserLevelDP | None,
    ledger_dir: Path | None,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``privacy`` section of ``summary.json``: settings and the ε spent per level.

    A device's ε includes its policy release (``policy``'s section) when it made one.
    """
    p = cfg.privacy
    device_epsilons = [r["epsilon_device_max"] for r in rows if r.get("epsilon_device_max") is not None]
    released = ((policy or {}).get("privacy") or {}).get("device_epsilon_max")
    if released is not None:
        device_epsilons.append(released)
    return {
        "preset": p.preset,
        "delta": p.delta,
        "accountant": p.accountant,
        "secure_mode": p.secure_mode,
        "device": {
            "enabled": p.device.enabled,
            "budget_epsilon": p.device.epsilon if p.device.enabled else None,
            # None: calibrated on each device to spend its budget over the planned rounds
            "noise_multiplier": p.device.noise_multiplier if p.device.enabled else None,
            "max_grad_norm": p.device.max_grad_norm if p.device.enabled else None,
            # the largest cumulative ε any aggregated device reported
            "epsilon": max(device_epsilons) if device_epsilons else None,
        },
        "user": {
            "enabled": user_dp is not None,
            "budget_epsilon": user_dp.budget_epsilon if user_dp else None,
            "noise_multiplier": user_dp.noise_multiplier if user_dp else None,
            "clipping": p.user.clipping if user_dp else None,
            "clipping_norm": user_dp.clipping_norm if user_dp else None,
            "releases": user_dp.release_count if user_dp else None,
            "epsilon": user_dp.epsilon if user_dp else None,
        },
        "ledger": str(ledger_dir) if ledger_dir is not None else None,
        "server_key_fingerprint": user_dp.key_fingerprint if user_dp else None,
    }


def _heldout_count(cfg: EmofedConfig) -> int:
    """Held-out (test-only) devices of the run's federation folder; 0 for synthetic data."""
    if cfg.data.source != "folder" or not cfg.data.path:
        return 0
    try:
        index = json.loads((Path(cfg.data.path) / "federation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0  # the devices report a broken folder themselves
    heldout = index.get("heldout", []) if isinstance(index, dict) else []
    return len(heldout) if isinstance(heldout, list) else 0


def _policy_phase(grid: Grid, cfg: EmofedConfig, run_dir: RunDirectory, ledger: LedgerStore | None) -> dict[str, Any]:
    """The policy prior phase (``server.policy``); a failure there keeps the trained model."""
    blocker = policy_phase_blocker(cfg)
    if blocker is not None:
        logger.warning("Policy prior skipped: %s", blocker)
        return {"status": "skipped", "error": blocker}
    started = time.monotonic()
    try:
        section = run_policy_phase(grid, cfg, run_dir, ledger)
    except Exception as err:  # the model's rounds are done and saved: report, do not lose them
        reason = "".join(traceback.format_exception_only(type(err), err)).strip()
        logger.error("Policy prior failed: %s", reason)
        section = {"status": "failed", "error": reason}
    section["seconds"] = round(time.monotonic() - started, 2)
    return section


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training as configured and write the run directory."""
    setup_logging()
    cfg, final_path = resolve_run_config(dict(context.run_config))
    run_dir = RunDirectory(final_path)
    logger.info("Run directory (while running): %s", run_dir.path)
    try:
        if context.run_config.get(ENROLLED_NODES_KEY):
            enrolled = parse_enrolled(context.run_config[ENROLLED_NODES_KEY])
            logger.info("Deployment: %d enrolled devices; any other node is ignored", len(enrolled))
            grid = EnrolledGrid(grid, enrolled)
        _run(grid, cfg, run_dir)
    except BaseException as err:
        reason = "".join(traceback.format_exception_only(type(err), err)).strip()
        run_dir.fail(f"{reason}\n\n{traceback.format_exc()}")
        logger.error("Run failed: %s (partial output kept in %s)", reason, run_dir.path)
        raise


def _run(grid: Grid, cfg: EmofedConfig, run_dir: RunDirectory) -> None:
    """One run: the model's rounds, the policy phase, then the run directory's results."""
    if cfg.policy.enabled:
        check_catalogue(cfg)  # a broken policy catalogue fails the run before any training
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    run_dir.write_config(to_yaml(cfg))
    initial, keys = initial_model(cfg)
    _warn_if_devices_missing(grid, cfg)
    ledger = _open_ledger(cfg, run_dir)
    user_dp = UserLevelDP.from_config(cfg, ledger) if ledger is not None and cfg.privacy.user.enabled else None
    strategy = build_strategy(cfg, ledger=ledger, user_dp=user_dp)
    started = time.monotonic()
    final, stop_reason = _train(grid, cfg, run_dir, strategy, initial)
    wall = time.monotonic() - started
    run_dir.save_model(
        {k: a.numpy() for k, a in final.items()},
        {"format": "emofed-shared-weights/1", "config": to_json(cfg), "keys": ",".join(keys)},
    )
    policy = _policy_phase(grid, cfg, run_dir, ledger) if cfg.policy.enabled else None
    rows = run_dir.rows
    _plot(cfg, rows, run_dir.path / PLOT_FILE)
    summary = run_summary(
        cfg,
        rows,
        stop_reason=stop_reason,
        policy=policy,
        user_dp=user_dp,
        ledger_dir=run_dir.final_path / LEDGER_DIR if ledger is not None else None,
        training_seconds=wall,
    )
    path = run_dir.finalize(summary)
    logger.info("Run %s: %s", "complete" if stop_reason is None else "stopped (privacy budget)", path)


def initial_model(cfg: EmofedConfig) -> tuple[ArrayRecord, list[str]]:
    """The configured model's shared weights as the first global model, and their keys.

    Call after seeding torch: the weights are the model's seeded initialisation.
    """
    model = build_model(cfg.model, device="cpu")
    keys = shared_state_keys(model)
    state = get_state(model, keys)
    initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    n_params = sum(int(v.size) for v in state.values())
    logger.info(
        "%d devices, %d rounds, strategy %s, %d shared parameters in %d arrays (%.2f MB per update)",
        cfg.devices, cfg.rounds, cfg.strategy.name, n_params, len(state), n_params * 4 / 1e6,
    )
    return initial, keys


def _warn_if_devices_missing(grid: Grid, cfg: EmofedConfig) -> None:
    """Warn when the connected devices are not the configured ones plus the held-out ones."""
    connected = len(list(grid.get_node_ids()))
    heldout = _heldout_count(cfg)
    if connected != cfg.devices + heldout:
        logger.warning(
            "%d devices connected, configuration says devices=%d (+%d held out)", connected, cfg.devices, heldout
        )


def _open_ledger(cfg: EmofedConfig, run_dir: RunDirectory) -> LedgerStore | None:
    """The run's ledger directory, created; None when no DP level is on."""
    if not (cfg.privacy.device.enabled or cfg.privacy.user.enabled):
        return None
    ledger = LedgerStore(run_dir.path / LEDGER_DIR)
    ledger.root.mkdir(parents=True, exist_ok=True)
    return ledger


def _train(
    grid: Grid, cfg: EmofedConfig, run_dir: RunDirectory, strategy: ScreenedStrategy, initial: ArrayRecord
) -> tuple[ArrayRecord, str | None]:
    """The model's rounds; the final global model and why the privacy budget stopped them (or None)."""
    reporter = RoundReporter(cfg, run_dir, strategy.round_logs)
    payload = to_json(cfg)  # devices rebuild and re-validate the same config
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.rounds,
            timeout=cfg.strategy.round_timeout_s,
            train_config=ConfigRecord({MESSAGE_CONFIG_KEY: payload}),
            evaluate_config=ConfigRecord({MESSAGE_CONFIG_KEY: payload}),
            evaluate_fn=reporter,
        )
    except PrivacyBudgetStop as stop:
        # Raised before the round's messages went out: the last release stands.
        logger.warning(
            "Run stopped by the privacy budget after %d of %d rounds: %s", len(run_dir.rows), cfg.rounds, stop
        )
        return (reporter.final_arrays if reporter.final_arrays is not None else initial), str(stop)
    return (result.arrays if len(result.arrays) else initial), None


def _plot(cfg: EmofedConfig, rows: list[dict[str, Any]], path: Path) -> None:
    """The run's curves, with the ε budget of each DP level that is on."""
    budgets: dict[str, float] = {}
    if cfg.privacy.device.enabled:
        budgets["device"] = cfg.privacy.device.epsilon
    if cfg.privacy.user.enabled:
        budgets["user"] = cfg.privacy.user.epsilon
    plot_curves(rows, path, title=f"emofed: {cfg.devices} devices, {cfg.strategy.name}", budgets=budgets)


def model_summary(cfg: EmofedConfig) -> dict[str, Any]:
    """The ``model`` section of ``summary.json``: the kind and, for features, the public space used.

    The space is identified by its file's SHA-256 and carries its own provenance (what
    public data ``emofed pretrain`` fitted it on), so a reader can tell which public data
    and weights shaped the run.
    """
    section: dict[str, Any] = {"kind": cfg.model.kind, "labels": cfg.model.labels}
    if cfg.model.kind == "features":
        from models.features import load_public_space, public_space_path

        path = public_space_path(cfg.model.features)
        space = load_public_space(str(path))
        section["public_features"] = {
            "path": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "extractors": dict(space.extractors),
            "dims": {m: space.dim(m) for m in space.modalities},
            "provenance": dict(space.provenance),
        }
    return section


def run_summary(
    cfg: EmofedConfig,
    rows: list[dict[str, Any]],
    *,
    stop_reason: str | None,
    policy: dict[str, Any] | None,
    user_dp: UserLevelDP | None,
    ledger_dir: Path | None,
    training_seconds: float,
) -> dict[str, Any]:
    """The content of ``summary.json``: status, final scores and each section of the run."""
    last = rows[-1] if rows else {}
    final_keys = ("accuracy", "macro_f1", "eval_loss", "train_loss", "acc_face", "acc_voice", "acc_text")
    return {
        "status": "complete" if stop_reason is None else STOPPED_STATUS,
        "stop_reason": stop_reason,
        "rounds": cfg.rounds,
        "rounds_completed": len(rows),
        "devices": cfg.devices,
        "strategy": cfg.strategy.name,
        "final": {k: last.get(k) for k in final_keys},
        "heldout": heldout_summary(rows),
        "personalisation": personalisation_summary(cfg, rows),
        "policy": policy,
        "model": model_summary(cfg),
        "failed_device_replies": sum(r.get("failed_devices", 0) for r in rows),
        "declined_device_replies": sum(r.get("declined_devices", 0) for r in rows),
        "privacy": privacy_summary(cfg, rows, user_dp, ledger_dir, policy),
        "training_seconds": round(training_seconds, 2),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
