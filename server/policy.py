"""The emotion-management policy's federated prior: one more phase after the model's rounds.

1. ``train.policy`` to every device: each answers with the emotion-probability block of its
   bandit statistics, privatised on the device under device-level DP
   (``policy.federated``), and its ledger. Replies are
   screened like model updates (shape, dtype, finite values, metric allowlist, ledger
   verified and stored in ``<run>/ledger``).
2. The statistics are averaged (``aggregate_priors``: a noise-calibrated ridge keeps the
   average a valid Gram matrix) and turned into a prior mean per action worth
   ``policy.prior_strength`` observations (``shrinkage_prior``), saved as
   ``policy_prior.json``.
3. ``evaluate.policy`` to every device with the prior built from the *other* devices'
   statistics (its own are already in its local statistics). Simulated devices play four
   policies against their simulated person and report reward and regret; the run
   prints the table and keeps it in ``summary.json`` (``policy``).

Everything here is post-processing of what the devices released: it costs no privacy
beyond the devices' own recorded releases.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from emofed.config import MESSAGE_CONFIG_KEY, EmofedConfig, to_json
from emofed.protocol import (
    POLICY_EVAL_METRICS,
    POLICY_PRIOR_KEY,
    POLICY_SCORES,
    POLICY_STATISTICS_KEY,
    POLICY_TRAIN_METRICS,
    POLICY_VARIANT_LABELS,
    POLICY_VARIANTS,
    SERVER_ROUND_KEY,
)
from policy.federated import FIRST_LAST_WINDOW, policy_config, policy_epsilon, policy_event, statistics_size
from policy.release import SHARED_NORM_BOUND, aggregate_priors, event_sensitivity, shrinkage_prior
from policy.rules import PolicyConfig
from policy.state import SHARED_FEATURES, PolicyStatistics
from privacy.guard import LEDGER_RECORD
from privacy.ledger_store import LedgerStore
from server.rundir import RunDirectory
from server.strategy import store_device_ledger

__all__ = ["PRIOR_FILE", "format_policy_table", "policy_phase_blocker", "run_policy_phase"]

logger = logging.getLogger(__name__)

PRIOR_FILE = "policy_prior.json"


def policy_phase_blocker(cfg: EmofedConfig) -> str | None:
    """Why this run must not build the policy prior; None when it may.

    The statistics are privatised on the device (device-level DP) or not at all: they are
    neither masked by secure aggregation nor noised by the server. A run that protects its
    model updates only with user-level DP or secure aggregation would release them with
    less protection than the model, so it skips the phase.
    """
    p = cfg.privacy
    if (p.user.enabled or p.secagg.enabled) and not p.device.enabled:
        what = "user-level DP" if p.user.enabled else "secure aggregation"
        return (
            f"the policy statistics are privatised on the device only, and this run protects updates with "
            f"{what} without device-level DP (set privacy.device.enabled=true to build the prior)"
        )
    return None


def _screen_statistics(reply: Message, size: int, device_dp: bool) -> np.ndarray | str:
    """The reply's statistics vector, or why it is refused."""
    content = reply.content
    arrays = content.array_records.get("arrays")
    if arrays is None or set(arrays.keys()) != {POLICY_STATISTICS_KEY}:
        return f"reply must carry exactly the array '{POLICY_STATISTICS_KEY}'"
    try:
        vector = arrays[POLICY_STATISTICS_KEY].numpy()
    except Exception:  # malformed bytes
        return f"array '{POLICY_STATISTICS_KEY}' does not decode"
    if vector.shape != (size,) or vector.dtype != np.float64:
        return f"array '{POLICY_STATISTICS_KEY}' is {vector.dtype} {vector.shape}, expected float64 ({size},)"
    if not np.isfinite(vector).all():
        return f"array '{POLICY_STATISTICS_KEY}' holds values that are not finite"
    metrics = content.metric_records.get("metrics")
    keys = set(metrics.keys()) if metrics is not None else set()
    if not keys <= POLICY_TRAIN_METRICS:
        return f"unexpected metrics {sorted(keys - POLICY_TRAIN_METRICS)}"
    if device_dp and LEDGER_RECORD not in content.config_records:
        return f"the device's ledger record '{LEDGER_RECORD}' is missing (device-level DP is on)"
    return vector


def _message(config: ConfigRecord, node: int, key: str, vector: np.ndarray, message_type: str) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(np.ascontiguousarray(vector, dtype=np.float64))}),
            "config": config,
        }
    )
    return Message(content=content, dst_node_id=node, message_type=message_type)


def _reason(reply: Message) -> str:
    return f"device {reply.metadata.src_node_id}: {reply.error.reason}"


def run_policy_phase(
    grid: Grid, cfg: EmofedConfig, run_dir: RunDirectory, ledger: LedgerStore | None
) -> dict[str, Any]:
    """Build the federated policy prior and score the policies; the ``policy`` summary section.

    Raises
    ------
    RuntimeError
        If device-level DP is on but the run has no ledger directory.
    """
    device_dp = cfg.privacy.device.enabled
    if device_dp and ledger is None:
        raise RuntimeError("device-level DP without a ledger directory")
    config = policy_config(cfg)
    nodes = sorted(grid.get_node_ids())
    # The round after the model's last: devices record the release under it.
    request = ConfigRecord({MESSAGE_CONFIG_KEY: to_json(cfg), SERVER_ROUND_KEY: cfg.rounds + 1})
    shared, refused, epsilons = _collect_statistics(
        grid, cfg, config, nodes, request, ledger if device_dp else None
    )
    section: dict[str, Any] = {
        "devices_asked": len(nodes),
        "devices_shared": len(shared),
        "refused": refused,  # evaluation refusals are added below
        "history": cfg.policy.history,
        "decisions": cfg.policy.decisions,
        "prior_strength": cfg.policy.prior_strength,
    }
    section["privacy"], stddev = _privacy_section(cfg, config, epsilons)
    if not shared:
        logger.warning("Policy prior: no device shared its statistics; no prior was built")
        section["status"] = "no statistics"
        return section

    def prior_of(members: list[PolicyStatistics]) -> PolicyStatistics:
        mean = aggregate_priors(members, device_noise_stddev=stddev)
        return shrinkage_prior(mean, strength=cfg.policy.prior_strength, ridge=config.bandit.ridge)

    prior = prior_of(list(shared.values()))
    run_dir.write_json(
        PRIOR_FILE,
        {"format": "emofed-policy-prior/1", "devices": len(shared), "noise_stddev": stddev,
         "strength": cfg.policy.prior_strength, **prior.to_dict()},
    )
    logger.info("Policy prior built from %d devices; scoring four policies on every device", len(shared))
    # Each device gets the prior of the *other* devices: its own statistics are already local.
    priors: dict[int, PolicyStatistics] = {}
    for node in nodes:
        others = [s for n, s in shared.items() if n != node]
        priors[node] = prior_of(others) if others else prior
    scores = _score_policies(grid, cfg, request, priors, refused)
    section["devices_scored"] = len(scores)
    section["table"] = policy_table(scores) if scores else None
    section["prior_gain"] = paired_gain(scores) if scores else None
    section["status"] = "complete"
    if scores:
        table = section["table"]
        logger.info(
            "Policy on %d devices x %d decisions: cumulative regret random %.1f, global prior only %.1f, "
            "local only %.1f, federated prior + personalisation %.1f",
            len(scores), cfg.policy.decisions, *(table[v]["regret"] for v in POLICY_VARIANTS),
        )
    return section


def _collect_statistics(
    grid: Grid,
    cfg: EmofedConfig,
    config: PolicyConfig,
    nodes: list[int],
    request: ConfigRecord,
    ledger: LedgerStore | None,
) -> tuple[dict[int, PolicyStatistics], list[str], list[float]]:
    """Step 1: ask every device for its statistics and screen the replies.

    ``ledger`` is given exactly under device-level DP: each reply's ledger is then
    verified and stored there. Returns the statistics shared per node, the one-line
    reasons of the refused replies, and the devices' reported ε.
    """
    device_dp = ledger is not None
    size = statistics_size(cfg)
    logger.info(
        "Policy prior: asking %d devices for their emotion-block statistics (%d values each%s)",
        len(nodes), size, ", record-level DP on the device" if device_dp else ", no DP",
    )
    replies = grid.send_and_receive(
        [_message(request, n, POLICY_STATISTICS_KEY, np.zeros(size), "train.policy") for n in nodes],
        timeout=cfg.strategy.round_timeout_s,
    )
    shared: dict[int, PolicyStatistics] = {}
    refused: list[str] = []
    epsilons: list[float] = []
    scopes: dict[int, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            refused.append(_reason(reply))
            continue
        screened = _screen_statistics(reply, size, device_dp)
        if isinstance(screened, str):
            refused.append(f"device {node}: {screened}")
            continue
        if ledger is not None:
            reason = store_device_ledger(ledger, node, reply.content.config_records[LEDGER_RECORD], scopes)
            if reason is not None:
                refused.append(f"device {node}: {reason}")
                continue
            epsilon = reply.content["metrics"].get("dp-epsilon")
            if isinstance(epsilon, (int, float)):
                epsilons.append(float(epsilon))
        shared[node] = PolicyStatistics.from_vector(screened, config.action_names, SHARED_FEATURES)
    for reason in refused:
        logger.info("  policy statistics skipped: %s", reason)
    return shared, refused, epsilons


def _privacy_section(
    cfg: EmofedConfig, config: PolicyConfig, epsilons: list[float]
) -> tuple[dict[str, Any], float]:
    """The section's ``privacy`` part, and the standard deviation of the devices' noise (0 without DP)."""
    event = policy_event(cfg)
    if event is None:
        return {"level": "none"}, 0.0
    sensitivity = event_sensitivity(config.feedback.reward_bound, SHARED_NORM_BOUND)
    privacy = {
        "level": "device (record-level: one feedback event)",
        "epsilon_alone": policy_epsilon(cfg) if cfg.policy.noise_multiplier is None else None,
        "noise_multiplier": event.noise_multiplier,
        "sensitivity": sensitivity,
        "device_epsilon_max": max(epsilons) if epsilons else None,
    }
    return privacy, event.noise_multiplier * sensitivity


def _score_policies(
    grid: Grid,
    cfg: EmofedConfig,
    request: ConfigRecord,
    priors: dict[int, PolicyStatistics],
    refused: list[str],
) -> list[dict[str, float]]:
    """Step 3: send each device its prior and keep the scores of the well-formed replies.

    A device's error is appended to ``refused``.
    """
    messages = [
        _message(request, node, POLICY_PRIOR_KEY, prior.to_vector(), "evaluate.policy") for node, prior in priors.items()
    ]
    scores: list[dict[str, float]] = []
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout_s):
        if reply.has_error():
            refused.append(_reason(reply))
            logger.info("  policy evaluation skipped: %s", _reason(reply))
            continue
        metrics = reply.content.metric_records.get("metrics")
        values = dict(metrics.items()) if metrics is not None else {}
        if set(values) == POLICY_EVAL_METRICS and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()
        ):
            scores.append({k: float(v) for k, v in values.items()})
        elif values:
            logger.info("  policy evaluation skipped: device %d sent unexpected metrics", reply.metadata.src_node_id)
    return scores


def policy_table(scores: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean of every score over devices, per policy, and the standard error of the regret."""
    table: dict[str, dict[str, float]] = {}
    for variant in POLICY_VARIANTS:
        row = {s: float(np.mean([d[f"policy-{variant}-{s}"] for d in scores])) for s in POLICY_SCORES}
        regrets = np.array([d[f"policy-{variant}-regret"] for d in scores])
        row["regret_sem"] = float(regrets.std(ddof=1) / math.sqrt(len(regrets))) if len(regrets) > 1 else 0.0
        table[variant] = row
    return table


def paired_gain(scores: list[dict[str, float]]) -> dict[str, float]:
    """Regret that the federated prior saves over local learning, per device (same person, same days).

    ``mean`` and ``sem`` of local-only minus federated regret, and the share of devices
    where the prior helped.
    """
    gains = np.array([d["policy-local-regret"] - d["policy-federated-regret"] for d in scores])
    sem = float(gains.std(ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return {"mean": float(gains.mean()), "sem": sem, "share_helped": float((gains > 0).mean())}


def format_policy_table(section: dict[str, Any] | None) -> list[str]:
    """The ``policy`` summary section as Markdown lines (the README's format); [] without a table."""
    if not section or not section.get("table"):
        return []
    table = section["table"]
    window = min(FIRST_LAST_WINDOW, int(section["decisions"]))
    lines = [
        f"| policy | cumulative reward | cumulative regret | regret, first {window} | regret, last {window} | interventions |",
        "|---|---|---|---|---|---|",
    ]
    for variant in POLICY_VARIANTS:
        row = table[variant]
        lines.append(
            f"| {POLICY_VARIANT_LABELS[variant]} | {row['reward']:.1f} | {row['regret']:.1f} ± {row['regret_sem']:.1f} | "
            f"{row['regret-first']:.1f} | {row['regret-last']:.1f} | {row['interventions']:.0f} |"
        )
    privacy = section.get("privacy") or {}
    dp = (
        f"statistics privatised on each device (record-level, noise multiplier {privacy['noise_multiplier']:.3g})"
        if privacy.get("noise_multiplier") else "statistics shared without DP"
    )
    gain = section.get("prior_gain")
    if gain:
        lines.append(
            f"federated prior vs local only: {gain['mean']:+.1f} ± {gain['sem']:.1f} regret saved per device "
            f"(paired), lower regret on {gain['share_helped']:.0%} of devices"
        )
    lines.append(
        f"policy: mean per device over {section['devices_scored']} devices x {section['decisions']} decisions "
        f"(regret ± standard error, against an oracle); prior from {section['devices_shared']} devices' "
        f"{section['history']} decisions each, {dp}"
    )
    return lines
