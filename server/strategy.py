"""Strategy assembly: Flower's FedAvg / FedProx / FedAdam behind a reply screen.

Flower's strategies validate replies by raising, so one malformed update from one device
would end the whole run. The screen below drops such replies first, with a one-line
reason per device, and the round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from emofed.config import EmofedConfig
from models import MODALITIES, NUM_CLASSES

logger = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"

# Exactly these metrics are accepted from devices; Flower's aggregation also demands
# the same keys from every reply.
TRAIN_METRIC_KEYS = frozenset({WEIGHT_KEY, "train-loss", "steps"})
EVAL_METRIC_KEYS = frozenset(
    {WEIGHT_KEY, "loss", "accuracy", "confusion"}
    | {f"{m}-{kind}" for m in MODALITIES for kind in ("correct", "total")}
)

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
}


@dataclass
class RoundLog:
    """What happened to the messages of one round (filled by the screen)."""

    train_sent: int = 0
    train_ok: int = 0
    eval_sent: int = 0
    eval_ok: int = 0
    failures: list[str] = field(default_factory=list)
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def screen_train_reply(
    content: RecordDict, expected: Mapping[str, tuple[tuple[int, ...], str]]
) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can."""
    arrays = content.array_records
    metrics = content.metric_records
    if list(arrays) != [ARRAYS_KEY]:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', found {sorted(arrays)}"
    if list(metrics) != [METRICS_KEY]:
        return f"expected one MetricRecord '{METRICS_KEY}', found {sorted(metrics)}"
    record = arrays[ARRAYS_KEY]
    missing = sorted(set(expected) - set(record))
    extra = sorted(set(record) - set(expected))
    if missing or extra:
        return f"array keys differ from the global model (missing {missing[:3]}, extra {extra[:3]})"
    for key, (shape, dtype) in expected.items():
        array = record[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return (
                f"array '{key}' is {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        if not np.all(np.isfinite(array.numpy())):
            return f"array '{key}' holds NaN or infinity"
    return _screen_metrics(metrics[METRICS_KEY], TRAIN_METRIC_KEYS)


def screen_eval_reply(content: RecordDict) -> str | None:
    """Why an evaluation reply cannot be aggregated, or None if it can."""
    if content.array_records:
        return f"evaluation replies carry no arrays, found {sorted(content.array_records)}"
    if list(content.metric_records) != [METRICS_KEY]:
        return f"expected one MetricRecord '{METRICS_KEY}', found {sorted(content.metric_records)}"
    metrics = content.metric_records[METRICS_KEY]
    reason = _screen_metrics(metrics, EVAL_METRIC_KEYS)
    if reason:
        return reason
    confusion = metrics.get("confusion")
    if not isinstance(confusion, list) or len(confusion) != NUM_CLASSES * NUM_CLASSES:
        return f"'confusion' must be a list of {NUM_CLASSES * NUM_CLASSES} counts"
    if any((not isinstance(c, int)) or c < 0 for c in confusion):
        return "'confusion' must hold non-negative integer counts"
    if sum(confusion) != metrics[WEIGHT_KEY]:
        return f"'confusion' sums to {sum(confusion)}, not {WEIGHT_KEY}={metrics[WEIGHT_KEY]}"
    for modality in MODALITIES:
        correct, total = metrics[f"{modality}-correct"], metrics[f"{modality}-total"]
        if not (isinstance(correct, int) and isinstance(total, int) and 0 <= correct <= total):
            return f"'{modality}-correct' and '{modality}-total' must be counts with correct <= total"
    return None


def _screen_metrics(metrics: MetricRecord, allowed: frozenset[str]) -> str | None:
    if set(metrics) != allowed:
        unexpected = sorted(set(metrics) - allowed)
        missing = sorted(allowed - set(metrics))
        return f"metric keys differ from the protocol (unexpected {unexpected[:3]}, missing {missing[:3]})"
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, int) or isinstance(weight, bool) or weight <= 0:
        return f"'{WEIGHT_KEY}' must be a positive integer, found {weight!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_finite_number(v) for v in values):
            return f"metric '{key}' is not finite"
    return None


def aggregate_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of training loss, and total examples and devices."""
    total = sum(int(c[METRICS_KEY][weight_key]) for c in contents)
    loss = sum(float(c[METRICS_KEY]["train-loss"]) * int(c[METRICS_KEY][weight_key]) for c in contents)
    return MetricRecord(
        {
            weight_key: total,
            "train-loss": loss / total if total else float("nan"),
            "devices": len(contents),
        }
    )


def confusion_scores(confusion: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 from a (C, C) confusion matrix (rows: truth).

    Macro-F1 averages F1 over the classes that occur in the truth or the predictions,
    as scikit-learn does with its default labels.
    """
    total = confusion.sum()
    if total == 0:
        return float("nan"), float("nan")
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    return float(tp.sum() / total), float(f1[present].mean())


def aggregate_eval_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Exact federation-wide metrics: summed confusion matrices and modality counts.

    Averaging per-device macro-F1 would not give the federation's macro-F1; summing the
    devices' confusion counts does.
    """
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    total = 0
    loss = 0.0
    out: dict[str, Any] = {}
    modality_counts = {m: [0, 0] for m in MODALITIES}
    for content in contents:
        metrics = content[METRICS_KEY]
        n = int(metrics[weight_key])
        total += n
        loss += float(metrics["loss"]) * n
        confusion += np.asarray(metrics["confusion"], dtype=np.int64).reshape(NUM_CLASSES, NUM_CLASSES)
        for modality in MODALITIES:
            modality_counts[modality][0] += int(metrics.get(f"{modality}-correct", 0))
            modality_counts[modality][1] += int(metrics.get(f"{modality}-total", 0))
    accuracy, macro_f1 = confusion_scores(confusion)
    out.update(
        {
            weight_key: total,
            "loss": loss / total if total else float("nan"),
            "accuracy": accuracy,
            "macro-f1": macro_f1,
            "devices": len(contents),
            "confusion": confusion.reshape(-1).tolist(),
        }
    )
    for modality, (correct, count) in modality_counts.items():
        if count:
            out[f"acc-{modality}"] = correct / count
    return MetricRecord(out)


def _cast_to_spec(arrays: ArrayRecord, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    # Server optimizers (FedAdam) compute in float64; the model's dtypes do not change.
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a.numpy().astype(spec[k][1], copy=False))) for k, a in arrays.items()}
    )


class ScreenedStrategy:
    """Mixin placed before a Flower strategy: screens replies and logs each round."""

    round_logs: dict[int, RoundLog]
    _expected: dict[str, tuple[tuple[int, ...], str]]

    def _log(self, server_round: int) -> RoundLog:
        return self.round_logs.setdefault(server_round, RoundLog())

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._expected:
            # The first global model fixes the protocol: every later round sends and
            # accepts exactly these keys, shapes and dtypes.
            self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._log(server_round).train_sent = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self._log(server_round).eval_sent = len(messages)
        return messages

    def _screen(
        self, server_round: int, replies: Iterable[Message], check: Callable[[RecordDict], str | None], stage: str
    ) -> list[Message]:
        kept: list[Message] = []
        log = self._log(server_round)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = (reply.error.reason or f"error code {reply.error.code}").strip()
                reason = reason.splitlines()[-1] if reason else reason
            else:
                reason = check(reply.content)
            if reason is None:
                kept.append(reply)
                continue
            log.failures.append(f"{stage} node {node}: {reason}")
            logger.warning("Round %d: %s reply of node %d dropped: %s", server_round, stage, node, reason)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = self._screen(
            server_round, replies, lambda c: screen_train_reply(c, self._expected), "train"
        )
        log = self._log(server_round)
        log.train_ok = len(kept)
        if not kept:
            logger.warning("Round %d: no usable training reply; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is not None:
            arrays = _cast_to_spec(arrays, self._expected)
        if metrics is not None:
            log.train_metrics = dict(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        kept = self._screen(server_round, replies, screen_eval_reply, "evaluate")
        log = self._log(server_round)
        log.eval_ok = len(kept)
        if not kept:
            return None
        # The screen has checked every reply; aggregate directly rather than let
        # Flower's own validation raise on what the screen already handled.
        metrics = self.evaluate_metrics_aggr_fn(  # type: ignore[attr-defined]
            [reply.content for reply in kept], self.weighted_by_key  # type: ignore[attr-defined]
        )
        log.eval_metrics = dict(metrics)
        return metrics


def build_strategy(cfg: EmofedConfig) -> Strategy:
    """Build the configured Flower strategy, wrapped in the reply screen.

    Raises
    ------
    ValueError
        If ``cfg.strategy.name`` is not a registered strategy.
    """
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    base = STRATEGIES[name]
    s = cfg.strategy
    min_available = max(s.min_train_devices, s.min_evaluate_devices, 1)
    kwargs: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_devices,
        "min_evaluate_nodes": s.min_evaluate_devices,
        "min_available_nodes": min_available,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "train_metrics_aggr_fn": aggregate_train_metrics,
        "evaluate_metrics_aggr_fn": aggregate_eval_metrics,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = s.proximal_mu
    if name == "fedadam":
        kwargs.update(eta=s.server_lr, eta_l=cfg.train.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    cls = type(f"Screened{base.__name__}", (ScreenedStrategy, base), {})
    strategy = cls(**kwargs)
    strategy.round_logs = {}
    strategy._expected = {}
    return strategy
