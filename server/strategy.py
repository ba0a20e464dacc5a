"""Strategy assembly: Flower's FedAvg / FedProx / FedAdam behind a reply screen.

Flower's strategies validate replies by raising, so one malformed update from one device
would end the whole run. The screen below drops such replies first, with a one-line
reason per device, and the round goes on with the rest. A device that declines because
its privacy budget cannot pay for the round (``ERROR_BUDGET_EXHAUSTED``) is counted as
declined, not failed.

Privacy (``emofed.protocol`` is the contract with devices):

* device-level DP: every training reply must carry the device's signed ledger chain
  (``privacy.guard.LEDGER_RECORD``); the screen verifies it and stores it under
  ``<run>/ledger/devices/`` before anything else, so the entries are kept even when the
  update itself is then dropped (the device spent its budget either way). A chain that
  fails verification drops the reply.
* user-level DP: the same screened strategy sends the clipping norm, and its aggregation
  is ``server.dp.UserLevelDP`` (clip, sum, divide by the devices sampled, add noise,
  account, sign) followed by the base strategy's server update. Flower's DP wrappers
  cannot wrap this strategy usefully; ``server.dp`` says why.

Held-out devices (imported corpora: people who never train) answer a training request
with ``ERROR_HELDOUT`` and flag their evaluation replies with ``heldout=1``; either way the
screen remembers the node and never samples it for training again (in round 1, before
any reply, it may be asked once). Their evaluations are aggregated apart, as the global
model's score on unseen people (``RoundLog.heldout_metrics``).

Secure aggregation (``privacy.secagg.enabled``): the strategy runs on a
``server.secagg.SecureAggregationGrid``, so a round's training replies carry only
metrics, the ledger and a masked vector; the screen checks those before unmasking, and
aggregation starts from the unmasked sum of updates instead of per-device arrays.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log as flwr_log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Result, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from emofed.config import EmofedConfig, SecAggConfig
from emofed.protocol import (
    ARRAYS_KEY,
    CLIPPING_NORM_KEY,
    CONFIG_KEY,
    DEVICE_EPSILON_KEY,
    ERROR_BUDGET_EXHAUSTED,
    ERROR_HELDOUT,
    EVAL_OPTIONAL_METRICS,
    METRICS_KEY,
    PERSONAL_ACCURACY_KEY,
    SKIPPED_METRICS,
    UPDATE_CLIPPED_KEY,
    WEIGHT_KEY,
    eval_metric_keys,
    train_metric_keys,
)
from models import MODALITIES, NUM_CLASSES
from privacy.errors import LedgerTampered
from privacy.guard import LEDGER_RECORD, read_ledger_record
from privacy.ledger_format import parse_line
from privacy.ledger_store import LedgerStore
from server.dp import PrivacyBudgetStop, UserLevelDP
from server.grids import DelegatingGrid
from server.report import gain_distribution
from server.secagg import SecureAggregationGrid

logger = logging.getLogger(__name__)

STRATEGIES: dict[str, type[FedAvg]] = {
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
    declined: list[str] = field(default_factory=list)  # devices whose budget is spent
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    user_epsilon: float | None = None  # federation's cumulative ε after this round
    clipping_norm: float | None = None  # C of this round's user-level release
    secure_sum: int | None = None  # secure aggregation: devices in the unmasked sum
    heldout_declined: int = 0  # held-out (test-only) devices that were asked to train and declined
    heldout_ok: int = 0  # held-out devices whose evaluation reply was aggregated
    heldout_metrics: dict[str, Any] = field(default_factory=dict)  # global model on held-out devices
    device_skips: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> skipped-* counts > 0


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def screen_train_reply(
    content: RecordDict,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    device_dp: bool = False,
    user_dp: bool = False,
) -> str | None:
    """Why a training reply cannot be aggregated, or None if it can.

    ``device_dp`` / ``user_dp`` are the run's privacy levels: they set the exact metric
    keys (``emofed.protocol.train_metric_keys``), and device-level DP requires the
    device's ledger record (checked for presence here; the strategy verifies and stores it).
    """
    arrays = content.array_records
    metrics = content.metric_records
    if list(arrays) != [ARRAYS_KEY]:
        return f"expected one ArrayRecord '{ARRAYS_KEY}', found {sorted(arrays)}"
    if list(metrics) != [METRICS_KEY]:
        return f"expected one MetricRecord '{METRICS_KEY}', found {sorted(metrics)}"
    configs = sorted(content.config_records)
    allowed = [LEDGER_RECORD] if device_dp else []
    if configs != allowed:
        if device_dp and LEDGER_RECORD not in configs:
            return f"the device's ledger record '{LEDGER_RECORD}' is missing (device-level DP is on)"
        return f"unexpected ConfigRecord(s) {[c for c in configs if c not in allowed]}"
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
    reason = _screen_metrics(metrics[METRICS_KEY], train_metric_keys(device_dp, user_dp))
    return reason or _screen_privacy_metrics(metrics[METRICS_KEY])


def screen_secure_train_reply(
    content: RecordDict,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    device_dp: bool = False,
    user_dp: bool = False,
) -> str | None:
    """Why a SecAgg+ training reply cannot be summed, or None if it can.

    Such a reply (``client.secagg``) carries no array, the legacy ``fitres.*`` records
    Flower's workflow reads, the metrics (without ``update-clipped``, which travels in
    the masked vector), the ledger under device-level DP, and a masked vector whose
    shapes must be ``[(1,)] + expected (+ [(1,)] under user-level DP)``: a malformed
    vector would otherwise break the sum for every device.
    """
    if any(len(record) for record in content.array_records.values()):
        return "a secure-aggregation reply must carry no unmasked arrays"
    if sorted(content.metric_records) != sorted([METRICS_KEY, "fitres.num_examples"]):
        return f"unexpected MetricRecords {sorted(content.metric_records)}"
    allowed = {"fitres.metrics", "fitres.status", RECORD_KEY_CONFIGS} | ({LEDGER_RECORD} if device_dp else set())
    configs = set(content.config_records)
    if configs != allowed:
        if device_dp and LEDGER_RECORD not in configs:
            return f"the device's ledger record '{LEDGER_RECORD}' is missing (device-level DP is on)"
        return f"unexpected or missing ConfigRecord(s): {sorted(configs ^ allowed)}"
    masked = content.config_records[RECORD_KEY_CONFIGS].get(SecAggKey.MASKED_PARAMETERS)
    want = [(1,)] + [shape for shape, _ in expected.values()] + ([(1,)] if user_dp else [])
    if not isinstance(masked, list) or len(masked) != len(want):
        return f"masked vector must hold {len(want)} arrays"
    try:
        shapes = [tuple(bytes_to_ndarray(b).shape) for b in masked]
    except Exception:  # noqa: BLE001 - any undecodable payload is refused the same way
        return "masked vector is not a list of arrays"
    if shapes != [tuple(s) for s in want]:
        return "masked vector shapes differ from the global model's"
    reason = _screen_metrics(content.metric_records[METRICS_KEY], train_metric_keys(device_dp, False))
    return reason or _screen_privacy_metrics(content.metric_records[METRICS_KEY])


def _screen_privacy_metrics(metrics: MetricRecord) -> str | None:
    # Values the server aggregates or counts: out of range would skew ε reports or the
    # adaptive clipping count, whose sensitivity assumes a 0/1 bit per device.
    if UPDATE_CLIPPED_KEY in metrics and metrics[UPDATE_CLIPPED_KEY] not in (0, 1):
        return f"'{UPDATE_CLIPPED_KEY}' must be 0 or 1, found {metrics[UPDATE_CLIPPED_KEY]!r}"
    if DEVICE_EPSILON_KEY in metrics and metrics[DEVICE_EPSILON_KEY] < 0:
        return f"'{DEVICE_EPSILON_KEY}' must be non-negative, found {metrics[DEVICE_EPSILON_KEY]!r}"
    if "dp-noise-multiplier" in metrics and metrics["dp-noise-multiplier"] <= 0:
        return f"'dp-noise-multiplier' must be positive, found {metrics['dp-noise-multiplier']!r}"
    if "dp-sample-rate" in metrics and not 0 < metrics["dp-sample-rate"] <= 1:
        return f"'dp-sample-rate' must be in (0, 1], found {metrics['dp-sample-rate']!r}"
    return None


def screen_eval_reply(content: RecordDict, *, personal: bool = False) -> str | None:
    """Why an evaluation reply cannot be aggregated, or None if it can.

    ``personal`` (``personal.enabled``): the reply must also carry the personalised
    model's accuracy (``emofed.protocol.eval_metric_keys``).
    """
    if content.array_records:
        return f"evaluation replies carry no arrays, found {sorted(content.array_records)}"
    if list(content.metric_records) != [METRICS_KEY]:
        return f"expected one MetricRecord '{METRICS_KEY}', found {sorted(content.metric_records)}"
    metrics = content.metric_records[METRICS_KEY]
    reason = _screen_metrics(metrics, eval_metric_keys(personal), optional=EVAL_OPTIONAL_METRICS)
    if reason:
        return reason
    if personal and not 0.0 <= metrics[PERSONAL_ACCURACY_KEY] <= 1.0:
        return f"'{PERSONAL_ACCURACY_KEY}' must be in [0, 1], found {metrics[PERSONAL_ACCURACY_KEY]!r}"
    if metrics.get("heldout", 0) not in (0, 1):
        return f"'heldout' must be 0 or 1, found {metrics['heldout']!r}"
    if any(not isinstance(metrics.get(k, 0), int) or metrics.get(k, 0) < 0 for k in SKIPPED_METRICS):
        return "'skipped-*' must be non-negative integer counts"
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


def _screen_metrics(
    metrics: MetricRecord, allowed: frozenset[str], optional: frozenset[str] = frozenset()
) -> str | None:
    if not allowed - optional <= set(metrics) <= allowed:
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
    """Example-weighted mean of training loss, total examples and devices.

    Under device-level DP also the largest and the mean cumulative ε of the devices
    aggregated (``dp-epsilon-max``, ``dp-epsilon-mean``).
    """
    total = sum(int(c[METRICS_KEY][weight_key]) for c in contents)
    loss = sum(float(c[METRICS_KEY]["train-loss"]) * int(c[METRICS_KEY][weight_key]) for c in contents)
    out: dict[str, Any] = {
        weight_key: total,
        "train-loss": loss / total if total else float("nan"),
        "devices": len(contents),
    }
    if contents and all(DEVICE_EPSILON_KEY in c[METRICS_KEY] for c in contents):
        epsilons = [float(c[METRICS_KEY][DEVICE_EPSILON_KEY]) for c in contents]
        out["dp-epsilon-max"] = max(epsilons)
        out["dp-epsilon-mean"] = sum(epsilons) / len(epsilons)
    return MetricRecord(out)


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


def unweighted_average_recall(confusion: np.ndarray) -> float:
    """Unweighted average recall (UAR): the mean recall of the classes present in the truth.

    The usual score of speech emotion recognition (e.g. Schuller et al., "The INTERSPEECH
    2009 Emotion Challenge", Sec. 2), insensitive to class imbalance; chance is 1/classes.
    """
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(confusion)[present] / support[present]).mean())


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
            "uar": unweighted_average_recall(confusion),
            "devices": len(contents),
            "confusion": confusion.reshape(-1).tolist(),
        }
    )
    for modality, (correct, count) in modality_counts.items():
        if count:
            out[f"acc-{modality}"] = correct / count
    if contents and all(PERSONAL_ACCURACY_KEY in c[METRICS_KEY] for c in contents):
        # Personal layers: each device's gain over the global model, as a distribution.
        out.update(
            gain_distribution(
                [float(c[METRICS_KEY]["accuracy"]) for c in contents],
                [float(c[METRICS_KEY][PERSONAL_ACCURACY_KEY]) for c in contents],
                [int(c[METRICS_KEY][weight_key]) for c in contents],
            )
        )
    return MetricRecord(out)


def _cast_to_spec(arrays: ArrayRecord, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    # Server optimizers (FedAdam) compute in float64; the model's dtypes do not change.
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(a.numpy().astype(spec[k][1], copy=False))) for k, a in arrays.items()}
    )


def _no_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    # The server-optimiser instance only moves weights; metrics come from real replies.
    return MetricRecord()


class ScreenedStrategy(Strategy):
    """A Flower strategy behind the reply screen: drops malformed replies, logs each round.

    The base strategy samples the devices and aggregates what the screen kept, as
    Flower's DP wrappers (``DifferentialPrivacyServerSideFixedClipping``) wrap theirs.
    With user-level DP the screen also commits each round's release before its messages
    go out (which raises ``server.dp.PrivacyBudgetStop`` when the budget cannot pay for
    it) and replaces the base aggregation with the private one.

    Parameters
    ----------
    strategy : FedAvg
        The base strategy (FedAvg or a subclass: FedProx, FedAdam). Its record keys must
        be the protocol's (``ARRAYS_KEY``, ``CONFIG_KEY``, ``WEIGHT_KEY``): the screen
        checks replies under those keys.
    device_dp : bool, default False
        Device-level DP: every training reply must carry the device's ledger chain.
    user_dp : UserLevelDP, optional
        User-level DP on the aggregate; None when off.
    ledger : LedgerStore, optional
        The run's ledger directory, where the devices' entries are stored; required
        with ``device_dp``.
    secagg : SecAggConfig, optional
        Secure aggregation (SecAgg+); None when off.
    server_optimizer : FedAvg, optional
        A second instance of the base strategy's class, which applies the base server
        update to the private or securely summed aggregate; required with ``user_dp``
        or ``secagg``.
    personal : bool, default False
        Devices keep personal layers and report their personalised accuracy.

    Raises
    ------
    TypeError
        If ``strategy`` is not a FedAvg, or ``server_optimizer`` is not of its class.
    ValueError
        If a record key differs from the protocol's, an object that the privacy settings
        need is missing, or a secure-aggregation bound is not positive.
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        device_dp: bool = False,
        user_dp: UserLevelDP | None = None,
        ledger: LedgerStore | None = None,
        secagg: SecAggConfig | None = None,
        server_optimizer: FedAvg | None = None,
        personal: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"strategy must be a FedAvg (or a subclass), found {type(strategy).__name__}")
        for name, found, wanted in (
            ("arrayrecord_key", strategy.arrayrecord_key, ARRAYS_KEY),
            ("configrecord_key", strategy.configrecord_key, CONFIG_KEY),
            ("weighted_by_key", strategy.weighted_by_key, WEIGHT_KEY),
        ):
            if found != wanted:
                raise ValueError(f"strategy.{name} must be the protocol's {wanted!r}, found {found!r}")
        if device_dp and ledger is None:
            raise ValueError("ledger must be a LedgerStore when device_dp=True (devices' entries are stored there), found None")
        if (user_dp is not None or secagg is not None) and server_optimizer is None:
            raise ValueError("server_optimizer must be given when user_dp or secagg is, found None")
        if server_optimizer is not None:
            if type(server_optimizer) is not type(strategy):
                raise TypeError(
                    f"server_optimizer must be a {type(strategy).__name__} like strategy, "
                    f"found {type(server_optimizer).__name__}"
                )
            if server_optimizer is strategy:
                raise ValueError("server_optimizer must be a separate instance from strategy, found the same object")
        if secagg is not None:
            if not secagg.enabled:
                raise ValueError("secagg must be None when secure aggregation is off, found enabled=False")
            for name, value in (("clipping_range", secagg.clipping_range), ("max_weight", secagg.max_weight)):
                if not value > 0:
                    raise ValueError(f"secagg.{name} must be positive, found {value!r}")
        self.strategy = strategy
        self.device_dp = device_dp
        self.user_dp = user_dp
        self.ledger = ledger
        self.secagg = secagg
        self.personal = personal
        self.round_logs: dict[int, RoundLog] = {}
        self.heldout_nodes: set[int] = set()  # nodes known to be held-out (test-only) devices
        self._server_optimizer = server_optimizer
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self._current: dict[str, np.ndarray] = {}
        self._node_scopes: dict[int, str] = {}
        self._round = 0
        self._secure_grid: SecureAggregationGrid | None = None

    def summary(self) -> None:
        """Log the screen's settings, then the base strategy's."""
        flwr_log(
            INFO,
            "\t├──> Reply screen over %s: device-level DP %s | user-level DP %s | secure aggregation %s",
            type(self.strategy).__name__,
            self.device_dp,
            self.user_dp is not None,
            self.secagg is not None,
        )
        self.strategy.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``); under secure aggregation on a SecAgg+ grid."""
        if self.secagg is not None:
            grid = self._secure_grid = SecureAggregationGrid(
                grid,
                self.secagg,
                screen=self._check_train_secure,
                on_refused=self._refused,
                clipping_range=self._secagg_range,
                max_weight=1.0 if self.user_dp is not None else self.secagg.max_weight,
            )
        return super().start(
            grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        )

    def _secagg_range(self, server_round: int) -> float:
        if self.user_dp is not None:
            # A clipped update has no coordinate above C; the tolerance covers float error.
            return float(self.user_dp.clipping_norm) * (1 + 1e-6)
        if self.secagg is None:  # start builds the secure grid only with secagg
            raise RuntimeError("secure-aggregation range without secure aggregation")
        return float(self.secagg.clipping_range)

    def _refused(self, reply: Message, reason: str) -> None:
        server_round = int(reply.metadata.group_id or 0) or self._round
        node = reply.metadata.src_node_id
        self._log(server_round).failures.append(f"train node {node}: {reason}")
        logger.warning("Round %d: train reply of node %d dropped before unmasking: %s", server_round, node, reason)

    def _check_train_secure(self, reply: Message) -> str | None:
        if self.device_dp and LEDGER_RECORD in reply.content.config_records:
            reason = self._store_ledger(reply.metadata.src_node_id, reply.content.config_records[LEDGER_RECORD])
            if reason is not None:
                return reason
        return screen_secure_train_reply(
            reply.content, self._expected, device_dp=self.device_dp, user_dp=self.user_dp is not None
        )

    def _log(self, server_round: int) -> RoundLog:
        return self.round_logs.setdefault(server_round, RoundLog())

    def _train_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        return self.strategy.train_metrics_aggr_fn(contents, self.strategy.weighted_by_key)

    def _eval_metrics(self, contents: list[RecordDict]) -> MetricRecord:
        return self.strategy.evaluate_metrics_aggr_fn(contents, self.strategy.weighted_by_key)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base strategy's training messages, with the round's privacy settings.

        Raises
        ------
        server.dp.PrivacyBudgetStop
            If every device sampled last round declined for its budget, or the user-level
            release of this round would exceed the federation's budget.
        """
        self._stop_if_every_device_declined(server_round)
        self._round = server_round
        if not self._expected:
            # The first global model fixes the protocol: every later round sends and
            # accepts exactly these keys, shapes and dtypes.
            self._expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
        if self.user_dp is not None:
            config[CLIPPING_NORM_KEY] = self.user_dp.clipping_norm
        if self.heldout_nodes:
            # Known held-out devices are never sampled for training.
            grid = _ExcludingGrid(grid, frozenset(self.heldout_nodes))
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.user_dp is not None and messages:
            # Messages are built but not sent yet: past the budget, nothing goes out.
            self.user_dp.begin_round(server_round, sampled=len(messages))
        if messages and (self.user_dp is not None or self.secagg is not None):
            self._current = {k: a.numpy() for k, a in arrays.items()}
        self._log(server_round).train_sent = len(messages)
        return messages

    def _stop_if_every_device_declined(self, server_round: int) -> None:
        # Devices' budgets are spent: further rounds would only repeat the declines (and,
        # with user-level DP, spend the federation's budget on noise).
        previous = self.round_logs.get(server_round - 1)
        if previous is None or not previous.train_sent:
            return
        declined = [d for d in previous.declined if d.startswith("train ")]
        if len(declined) >= previous.train_sent:
            raise PrivacyBudgetStop(
                f"every device sampled in round {server_round - 1} declined to train because its "
                f"privacy budget is spent ({declined[0].split(': ', 1)[-1]})"
            )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base strategy's evaluation messages, counted in the round's log."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self._log(server_round).eval_sent = len(messages)
        return messages

    def _screen(
        self, server_round: int, replies: Iterable[Message], check: Callable[[Message], str | None], stage: str
    ) -> list[Message]:
        kept: list[Message] = []
        log = self._log(server_round)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = (reply.error.reason or f"error code {reply.error.code}").strip()
                reason = reason.splitlines()[-1] if reason else reason
                if reply.error.code == ERROR_BUDGET_EXHAUSTED:
                    log.declined.append(f"{stage} node {node}: {reason}")
                    logger.info("Round %d: node %d declined (privacy budget): %s", server_round, node, reason)
                    continue
                if reply.error.code == ERROR_HELDOUT:
                    # A test-only device: remembered, and not sampled for training again.
                    self.heldout_nodes.add(node)
                    log.heldout_declined += 1
                    logger.info("Round %d: node %d is a held-out device; it will only evaluate", server_round, node)
                    continue
            else:
                reason = check(reply)
            if reason is None:
                kept.append(reply)
                continue
            log.failures.append(f"{stage} node {node}: {reason}")
            logger.warning("Round %d: %s reply of node %d dropped: %s", server_round, stage, node, reason)
        return kept

    def _check_train(self, reply: Message) -> str | None:
        if self.device_dp and LEDGER_RECORD in reply.content.config_records:
            reason = self._store_ledger(reply.metadata.src_node_id, reply.content.config_records[LEDGER_RECORD])
            if reason is not None:
                return reason
        return screen_train_reply(
            reply.content, self._expected, device_dp=self.device_dp, user_dp=self.user_dp is not None
        )

    def _store_ledger(self, node: int, record: ConfigRecord) -> str | None:
        """Verify and keep a device's ledger entries; the reason if they are refused."""
        if self.ledger is None:  # build_strategy requires one with device-level DP
            raise RuntimeError("device-level DP without a ledger directory")
        return store_device_ledger(self.ledger, node, record, self._node_scopes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the training replies, then aggregate the rest (privately, or from the secure sum)."""
        if self.secagg is not None:
            # Screened before unmasking (SecureAggregationGrid); errors are sorted here.
            kept = self._screen(server_round, replies, lambda _reply: None, "train")
            self._log(server_round).train_ok = len(kept)
            return self._aggregate_secure(server_round, kept)
        kept = self._screen(server_round, replies, self._check_train, "train")
        log = self._log(server_round)
        log.train_ok = len(kept)
        if self.user_dp is not None:
            return self._aggregate_private(server_round, kept)
        if not kept:
            logger.warning("Round %d: no usable training reply; the global model is unchanged", server_round)
            return None, None
        arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        if arrays is not None:
            arrays = _cast_to_spec(arrays, self._expected)
        if metrics is not None:
            log.train_metrics = dict(metrics)
        return arrays, metrics

    def _aggregate_private(
        self, server_round: int, kept: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.user_dp is None:
            raise RuntimeError("private aggregation without user-level DP")
        log = self._log(server_round)
        if log.train_sent == 0:  # nothing was sampled, so nothing is released
            return None, None
        if not kept:
            logger.warning("Round %d: no usable training reply; releasing noise only", server_round)
        contents = [reply.content for reply in kept]
        release = self.user_dp.release(
            server_round,
            self._current,
            [{k: a.numpy() for k, a in c[ARRAYS_KEY].items()} for c in contents],
            [bool(c[METRICS_KEY][UPDATE_CLIPPED_KEY]) for c in contents],
        )
        log.user_epsilon = release.epsilon
        log.clipping_norm = release.clipping_norm
        model = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in release.arrays.items()})
        arrays = _cast_to_spec(self._server_step(server_round, model), self._expected)
        metrics = None
        if contents:
            metrics = self._train_metrics(contents)
            log.train_metrics = dict(metrics)
        return arrays, metrics

    def _aggregate_secure(
        self, server_round: int, kept: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        log = self._log(server_round)
        outcome = self._secure_grid.sums.get(server_round) if self._secure_grid is not None else None
        contents = [reply.content for reply in kept]
        metrics = self._train_metrics(contents) if contents else None
        if metrics is not None:
            log.train_metrics = dict(metrics)
        if outcome is None or not outcome.ok or outcome.mean is None:
            if self.user_dp is not None:
                self.user_dp.abandon(server_round)  # nothing is released, nothing is spent
            where = outcome.halted_at if outcome is not None and outcome.halted_at else "unmask"
            log.failures.append(
                f"secure aggregation failed at the {where} stage: fewer devices than the "
                "reconstruction threshold; the global model is unchanged"
            )
            return None, metrics
        log.secure_sum = len(outcome.contributors)
        keys = list(self._expected)
        mean = outcome.mean
        if len(mean) != len(keys) + (1 if self.user_dp is not None else 0):
            raise RuntimeError(f"secure sum has {len(mean)} arrays for {len(keys)} model arrays")
        if self.user_dp is not None:
            # Weights are 1, so the weighted mean times the contributors is the sum.
            n = len(outcome.contributors)
            norm = self.user_dp.clipping_norm
            total = {k: np.asarray(v, dtype=np.float64) * n for k, v in zip(keys, mean, strict=False)}
            clipped = float(np.asarray(mean[-1]).reshape(-1)[0]) * n / norm
            release = self.user_dp.release_sum(
                server_round, self._current, total, aggregated=n, unclipped=n - clipped
            )
            log.user_epsilon = release.epsilon
            log.clipping_norm = release.clipping_norm
            new = release.arrays
        else:
            new = {
                k: self._current[k].astype(np.float64) + np.asarray(v, dtype=np.float64).reshape(self._current[k].shape)
                for k, v in zip(keys, mean, strict=True)
            }
        model = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()})
        return _cast_to_spec(self._server_step(server_round, model), self._expected), metrics

    def _server_step(self, server_round: int, model: ArrayRecord) -> ArrayRecord:
        """The base strategy's server update applied to the private aggregate.

        The private model ``w + Δ̄`` goes to a plain instance of the base strategy as the
        one reply of the round: FedAvg's mean of one reply is that reply, and FedAdam
        takes it as the clients' average and applies its server optimiser. Both are
        post-processing of the release, at no privacy cost.
        """
        optimizer = self._server_optimizer
        if optimizer is None:  # build_strategy makes one with user-level DP
            raise RuntimeError("no server optimiser for the private aggregate")
        if isinstance(optimizer, FedOpt):
            optimizer.current_arrays = dict(self._current)
        reply = Message(
            RecordDict({ARRAYS_KEY: model, METRICS_KEY: MetricRecord({WEIGHT_KEY: 1})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = optimizer.aggregate_train(server_round, [reply])
        if arrays is None:  # pragma: no cover - Flower aggregates any non-empty reply list
            raise RuntimeError("the server optimiser returned no model")
        return arrays

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Screen the evaluation replies; aggregate training devices' and held-out devices' apart."""
        kept = self._screen(
            server_round,
            replies,
            lambda reply: screen_eval_reply(reply.content, personal=self.personal),
            "evaluate",
        )
        log = self._log(server_round)
        # Held-out devices (test-only, identity-disjoint) are scored apart from the
        # training devices' own test splits: the two answer different questions.
        local: list[Message] = []
        heldout: list[Message] = []
        for reply in kept:
            node = reply.metadata.src_node_id
            metrics = reply.content[METRICS_KEY]
            skips = {k.removeprefix("skipped-"): int(metrics.get(k, 0)) for k in SKIPPED_METRICS}
            if any(skips.values()):
                log.device_skips[f"node {node}"] = {k: n for k, n in skips.items() if n}
            if metrics.get("heldout", 0) == 1:
                self.heldout_nodes.add(node)
                heldout.append(reply)
            else:
                local.append(reply)
        log.eval_ok = len(local)
        log.heldout_ok = len(heldout)
        if heldout:
            log.heldout_metrics = dict(self._eval_metrics([reply.content for reply in heldout]))
        if not local:
            return None
        # The screen has checked every reply; aggregate directly rather than let
        # Flower's own validation raise on what the screen already handled.
        metrics = self._eval_metrics([reply.content for reply in local])
        log.eval_metrics = dict(metrics)
        return metrics


def store_device_ledger(
    ledger: LedgerStore, node: int, record: ConfigRecord, node_scopes: dict[int, str]
) -> str | None:
    """Verify a device's shipped ledger chain and keep it in the run's ledger directory.

    ``node_scopes`` remembers each node's scope: a node may not switch identity mid-run.
    Returns the one-line reason the record is refused, or None when it was stored.
    """
    try:
        lines, seal, key = read_ledger_record(record)
        if not lines:
            raise ValueError("it holds no entries")
        scopes = {parse_line(line.rstrip("\n")).get("scope") for line in lines}
        if len(scopes) != 1:
            raise ValueError(f"entries of several scopes {sorted(map(str, scopes))}")
        scope = str(scopes.pop())
        known = node_scopes.get(node)
        if known is not None and known != scope:
            raise ValueError(f"scope {scope!r}, but this node sent {known!r} before")
        ledger.receive(scope, lines, seal, public_key=key)
    except (LedgerTampered, ValueError) as err:
        return f"ledger record rejected: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    node_scopes[node] = scope
    return None


def build_strategy(
    cfg: EmofedConfig,
    *,
    ledger: LedgerStore | None = None,
    user_dp: UserLevelDP | None = None,
) -> ScreenedStrategy:
    """Build the configured Flower strategy, wrapped in the reply screen.

    Parameters
    ----------
    cfg : EmofedConfig
        The run's configuration.
    ledger : LedgerStore, optional
        The run's ledger directory; required with device-level DP (devices' entries
        are stored there).
    user_dp : UserLevelDP, optional
        The federation's user-level DP; required exactly when ``privacy.user.enabled``.

    Raises
    ------
    ValueError
        If ``cfg.strategy.name`` is not a registered strategy, or the privacy objects
        do not match the configuration.
    """
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    if cfg.privacy.user.enabled != (user_dp is not None):
        raise ValueError(
            f"user_dp must be given exactly when privacy.user.enabled=true "
            f"(enabled: {cfg.privacy.user.enabled}, given: {user_dp is not None})"
        )
    base = STRATEGIES[name]
    kwargs = _base_arguments(cfg)
    secagg = cfg.privacy.secagg if cfg.privacy.secagg.enabled else None
    server_optimizer = (
        base(**{**kwargs, "train_metrics_aggr_fn": _no_train_metrics})
        if user_dp is not None or secagg is not None
        else None
    )
    return ScreenedStrategy(
        base(**kwargs),
        device_dp=cfg.privacy.device.enabled,
        user_dp=user_dp,
        ledger=ledger,
        secagg=secagg,
        server_optimizer=server_optimizer,
        personal=cfg.personal.enabled,
    )


def _base_arguments(cfg: EmofedConfig) -> dict[str, Any]:
    """The keyword arguments of the configured base strategy (``cfg.strategy.name``).

    Sampling from ``cfg.strategy``, the protocol's record keys, this module's metric
    aggregation, and the arguments only FedProx (``proximal_mu``) or FedAdam (server
    learning rate and moments) take.
    """
    s = cfg.strategy
    kwargs: dict[str, Any] = {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_devices,
        "min_evaluate_nodes": s.min_evaluate_devices,
        "min_available_nodes": max(s.min_train_devices, s.min_evaluate_devices, 1),
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
        "train_metrics_aggr_fn": aggregate_train_metrics,
        "evaluate_metrics_aggr_fn": aggregate_eval_metrics,
    }
    if s.name == "fedprox":
        kwargs["proximal_mu"] = s.proximal_mu
    if s.name == "fedadam":
        kwargs.update(eta=s.server_lr, eta_l=cfg.train.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    return kwargs


class _ExcludingGrid(DelegatingGrid):
    """The run's grid without the given nodes (used only to sample training devices)."""

    def __init__(self, grid: Grid, excluded: frozenset[int]) -> None:
        super().__init__(grid)
        self.excluded = excluded

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self._grid.get_node_ids() if node not in self.excluded]
