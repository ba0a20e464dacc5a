"""Strategy assembly: reply screening and exact metric aggregation."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from emofed.config import SecAggConfig, load_config
from emofed.protocol import ERROR_BUDGET_EXHAUSTED, ERROR_TRAINING_FAILED
from privacy.accounting import PrivacyEvent
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.guard import LEDGER_RECORD, ledger_record
from privacy.keys import generate_private_key
from privacy.ledger import Ledger
from privacy.ledger_store import LedgerStore
from server.strategy import (
    ScreenedStrategy,
    aggregate_eval_metrics,
    aggregate_train_metrics,
    build_strategy,
    confusion_scores,
    screen_eval_reply,
    screen_train_reply,
)

EXPECTED = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}
DP_METRICS = {"dp-epsilon": 0.5, "dp-noise-multiplier": 1.1, "dp-sample-rate": 0.25}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _make_train_reply(**arrays: np.ndarray) -> RecordDict:
    arrays = arrays or {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "steps": 2}),
        }
    )


def _make_eval_reply(confusion: np.ndarray, loss: float = 1.0, **extra: int) -> RecordDict:
    counts = {f"{m}-{k}": 0 for m in ("face", "voice", "text") for k in ("correct", "total")}
    n = int(confusion.sum())
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "num-examples": n,
                    "loss": loss,
                    "accuracy": float(np.trace(confusion) / n),
                    "confusion": [int(c) for c in confusion.reshape(-1)],
                    **{**counts, **extra},
                }
            )
        }
    )


def test_well_formed_train_reply_passes() -> None:
    """A reply with exactly the global model's arrays is kept."""
    assert screen_train_reply(_make_train_reply(), EXPECTED) is None


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"w": np.ones((2, 3), np.float32)}, "missing ['b']"),
        ({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32), "x": np.zeros(1, np.float32)}, "extra ['x']"),
        ({"w": np.ones((3, 2), np.float32), "b": np.zeros(3, np.float32)}, "'w' is float32[3, 2]"),
        ({"w": np.ones((2, 3), np.float64), "b": np.zeros(3, np.float32)}, "'w' is float64"),
        ({"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}, "NaN"),
    ],
)
def test_malformed_train_replies_are_named(arrays: dict[str, np.ndarray], fragment: str) -> None:
    """Missing, extra, reshaped, retyped or non-finite arrays are rejected with a reason."""
    reason = screen_train_reply(_make_train_reply(**arrays), EXPECTED)
    assert reason is not None and fragment in reason


def test_train_reply_without_weight_is_rejected() -> None:
    """num-examples must be a positive integer."""
    reply = _make_train_reply()
    reply["metrics"]["num-examples"] = 0
    assert "num-examples" in (screen_train_reply(reply, EXPECTED) or "")


def test_eval_reply_confusion_must_match_count() -> None:
    """A confusion matrix that does not sum to num-examples is rejected."""
    confusion = np.eye(7, dtype=int)
    reply = _make_eval_reply(confusion)
    assert screen_eval_reply(reply) is None
    reply["metrics"]["num-examples"] = 99
    assert "sums to 7" in (screen_eval_reply(reply) or "")


def test_confusion_scores_match_manual_computation() -> None:
    """Accuracy and macro-F1 from a confusion matrix, checked against a direct count."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 500)
    pred = np.where(rng.random(500) < 0.6, truth, rng.integers(0, 7, 500))
    confusion = np.zeros((7, 7), int)
    np.add.at(confusion, (truth, pred), 1)
    accuracy, macro_f1 = confusion_scores(confusion)
    f1s = []
    for c in range(7):
        tp = np.sum((truth == c) & (pred == c))
        fp = np.sum((truth != c) & (pred == c))
        fn = np.sum((truth == c) & (pred != c))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert accuracy == pytest.approx(np.mean(truth == pred))
    assert macro_f1 == pytest.approx(np.mean(f1s))


def test_eval_aggregation_sums_devices_exactly() -> None:
    """Federation accuracy equals accuracy of the summed confusion, not a mean of means."""
    a = np.zeros((7, 7), int)
    a[0, 0] = 9
    a[1, 0] = 1  # device A: 9/10 correct
    b = np.zeros((7, 7), int)
    b[2, 2] = 1
    b[3, 2] = 29  # device B: 1/30 correct
    record = aggregate_eval_metrics(
        [_make_eval_reply(a, 0.5, **{"face-correct": 3, "face-total": 4}), _make_eval_reply(b, 2.0)],
        "num-examples",
    )
    assert record["accuracy"] == pytest.approx(10 / 40)
    assert record["loss"] == pytest.approx((0.5 * 10 + 2.0 * 30) / 40)
    assert record["acc-face"] == pytest.approx(0.75)
    assert "acc-voice" not in record
    assert record["num-examples"] == 40


def test_train_aggregation_is_example_weighted() -> None:
    """Training loss is the example-weighted mean over devices."""
    r1, r2 = _make_train_reply(), _make_train_reply()
    r2["metrics"]["num-examples"] = 30
    r2["metrics"]["train-loss"] = 3.0
    record = aggregate_train_metrics([r1, r2], "num-examples")
    assert record["train-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)


@pytest.mark.parametrize(("name", "base"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_build_strategy_by_name(name: str, base: type, tmp_path: Path) -> None:
    """Each registered strategy is built and screened."""
    strategy = build_strategy(load_config(None, [f"strategy.name={name}"]), ledger=LedgerStore(tmp_path))
    assert isinstance(strategy, ScreenedStrategy)
    assert type(strategy.strategy) is base
    assert strategy.strategy.fraction_train == 1.0
    if name == "fedprox":
        assert strategy.strategy.proximal_mu == pytest.approx(0.01)


def test_metric_keys_outside_the_protocol_are_rejected() -> None:
    """An extra metric (which could carry data) or a missing one is named and dropped."""
    reply = _make_eval_reply(np.eye(7, dtype=int))
    reply["metrics"]["embedding-norm"] = 3.0
    assert "unexpected ['embedding-norm']" in (screen_eval_reply(reply) or "")
    train = _make_train_reply()
    del train["metrics"]["steps"]
    assert "missing ['steps']" in (screen_train_reply(train, EXPECTED) or "")


def test_modality_counts_must_be_consistent() -> None:
    """More correct than total answers is a malformed reply."""
    reply = _make_eval_reply(np.eye(7, dtype=int), **{"face-correct": 5, "face-total": 2})
    assert "face-correct" in (screen_eval_reply(reply) or "")


def test_aggregates_keep_the_model_dtypes() -> None:
    """A float64 aggregate (FedAdam computes in float64) is cast back to the model's dtypes."""
    from server.strategy import _cast_to_spec

    record = ArrayRecord({"w": Array(np.ones((2, 3), np.float64)), "b": Array(np.zeros(3, np.float64))})
    cast = _cast_to_spec(record, EXPECTED)
    assert {k: a.dtype for k, a in cast.items()} == {"w": "float32", "b": "float32"}
    assert screen_train_reply(_make_train_reply(**{k: a.numpy() for k, a in cast.items()}), EXPECTED) is None


# -- privacy: the screen, device ledgers, declined devices ------------------------------


class _FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


def _make_device_ledger(root: Path, device: str, rounds: int) -> tuple[Ledger, object]:
    """A device's own signed chain with one DP-SGD release per round."""
    key = generate_private_key()
    ledger = Ledger(root / f"{device}.jsonl", scope=f"device:{device}")
    accountant = BudgetedAccountant(PrivacyBudget(epsilon=3.0, delta=1e-5))
    event = PrivacyEvent(noise_multiplier=2.0, sample_rate=0.1, steps=5)
    for server_round in range(1, rounds + 1):
        ledger.append(
            server_round=server_round, event=event, clipping_norm=1.0, delta=1e-5,
            epsilon=accountant.spend(event), accountant="opacus_rdp", budget_epsilon=3.0, private_key=key,
        )
    return ledger, key


def _make_dp_reply(ledger: Ledger | None, key: object, **metrics: float) -> RecordDict:
    reply = _make_train_reply()
    for name, value in {**DP_METRICS, **metrics}.items():
        reply["metrics"][name] = value
    if ledger is not None:
        reply[LEDGER_RECORD] = ledger_record(ledger, public_key=key)
    return reply


def _make_strategy(tmp_path: Path, *overrides: str):
    cfg = load_config(None, ["devices=3", *overrides])
    strategy = build_strategy(cfg, ledger=LedgerStore(tmp_path / "run-ledger"))
    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), _FakeGrid(3)))
    return strategy, messages


def _reply(sent: Message, content: RecordDict | Error) -> Message:
    return Message(content, reply_to=sent)


def test_screen_requires_the_ledger_record_under_device_dp(tmp_path: Path) -> None:
    """With device DP the DP metrics and the ledger record are required; other ConfigRecords are not allowed."""
    ledger, key = _make_device_ledger(tmp_path, "0", 1)
    reply = _make_dp_reply(ledger, key)
    assert screen_train_reply(reply, EXPECTED, device_dp=True) is None
    assert "unexpected ConfigRecord" in (screen_train_reply(reply, EXPECTED) or "")  # device DP off
    missing = _make_dp_reply(None, key)
    assert "ledger record 'privacy.ledger' is missing" in (screen_train_reply(missing, EXPECTED, device_dp=True) or "")
    plain = _make_train_reply()
    plain[LEDGER_RECORD] = ledger_record(ledger, public_key=key)
    assert "missing ['dp-epsilon'" in (screen_train_reply(plain, EXPECTED, device_dp=True) or "")
    smuggled = _make_dp_reply(ledger, key)
    smuggled["notes"] = ConfigRecord({"text": "I feel sad today"})
    assert "unexpected ConfigRecord(s) ['notes']" in (screen_train_reply(smuggled, EXPECTED, device_dp=True) or "")


@pytest.mark.parametrize(
    ("metric", "value", "fragment"),
    [
        ("update-clipped", 2, "must be 0 or 1"),
        ("update-clipped", 0.5, "must be 0 or 1"),
        ("dp-epsilon", -0.1, "non-negative"),
        ("dp-noise-multiplier", 0.0, "positive"),
        ("dp-sample-rate", 1.5, "(0, 1]"),
    ],
)
def test_privacy_metrics_out_of_range_are_rejected(metric: str, value: float, fragment: str, tmp_path: Path) -> None:
    """The update-clipped bit must be a bit and the device's DP parameters must be in range."""
    ledger, key = _make_device_ledger(tmp_path, "0", 1)
    reply = _make_dp_reply(ledger, key, **{"update-clipped": 1})
    assert screen_train_reply(reply, EXPECTED, device_dp=True, user_dp=True) is None
    reply["metrics"][metric] = value
    assert fragment in (screen_train_reply(reply, EXPECTED, device_dp=True, user_dp=True) or "")


def test_device_ledgers_are_stored_even_when_the_update_is_dropped(tmp_path: Path) -> None:
    """Entries of a verified chain are kept verbatim, also for a reply whose arrays the screen drops."""
    strategy, sent = _make_strategy(tmp_path)
    chains = [_make_device_ledger(tmp_path / "devices", str(i), 1) for i in range(3)]
    good = [_reply(sent[i], _make_dp_reply(*chains[i])) for i in range(2)]
    bad = _make_dp_reply(*chains[2])
    bad["arrays"] = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.zeros(3, np.float32))})
    arrays, metrics = strategy.aggregate_train(1, [*good, _reply(sent[2], bad)])
    assert arrays is not None and metrics["devices"] == 2
    log = strategy.round_logs[1]
    assert log.train_ok == 2 and len(log.failures) == 1 and "'w' is float32[3, 2]" in log.failures[0]
    store = LedgerStore(tmp_path / "run-ledger")
    assert store.scopes() == ["device:0", "device:1", "device:2"]
    for i, (ledger, _) in enumerate(chains):
        assert (tmp_path / "run-ledger" / "devices" / f"{i}.jsonl").read_bytes() == ledger.path.read_bytes()


def test_tampered_device_ledger_drops_the_reply(tmp_path: Path) -> None:
    """A chain whose entry was edited after signing fails verification: the reply is dropped with a reason."""
    strategy, sent = _make_strategy(tmp_path)
    ledger, key = _make_device_ledger(tmp_path, "0", 2)
    record = ledger_record(ledger, public_key=key)
    entry = json.loads(record["entries"][0])
    entry["noise_multiplier"] = 2.2  # claim more noise than was added
    record["entries"] = [json.dumps(entry, sort_keys=True, separators=(",", ":")), *record["entries"][1:]]
    reply = _make_dp_reply(None, key)
    reply[LEDGER_RECORD] = record
    arrays, _ = strategy.aggregate_train(1, [_reply(sent[0], reply)])
    assert arrays is None
    assert "ledger record rejected" in strategy.round_logs[1].failures[0]
    assert "hash does not match" in strategy.round_logs[1].failures[0]
    assert LedgerStore(tmp_path / "run-ledger").scopes() == []


def test_a_node_cannot_switch_ledger_scope(tmp_path: Path) -> None:
    """Once a node has sent device:0's chain, a chain of another scope from it is refused."""
    strategy, sent = _make_strategy(tmp_path)
    first = _make_device_ledger(tmp_path, "0", 1)
    other = _make_device_ledger(tmp_path, "9", 1)
    strategy.aggregate_train(1, [_reply(sent[0], _make_dp_reply(*first))])
    strategy.aggregate_train(2, [_reply(sent[0], _make_dp_reply(*other))])
    assert "scope 'device:9', but this node sent 'device:0' before" in strategy.round_logs[2].failures[0]


def test_budget_declines_are_counted_apart_from_failures(tmp_path: Path) -> None:
    """Error code 1004 (budget exhausted) is a decline, listed with its reason; other errors are failures."""
    strategy, sent = _make_strategy(tmp_path)
    ledger, key = _make_device_ledger(tmp_path, "0", 1)
    replies = [
        _reply(sent[0], _make_dp_reply(ledger, key)),
        _reply(sent[1], Error(code=ERROR_BUDGET_EXHAUSTED, reason="epsilon 2.9 of 3: the next round would need 3.2")),
        _reply(sent[2], Error(code=ERROR_TRAINING_FAILED, reason="out of memory")),
    ]
    strategy.aggregate_train(1, replies)
    log = strategy.round_logs[1]
    assert log.train_ok == 1
    node_2, node_3 = sent[1].metadata.dst_node_id, sent[2].metadata.dst_node_id
    assert log.declined == [f"train node {node_2}: epsilon 2.9 of 3: the next round would need 3.2"]
    assert log.failures == [f"train node {node_3}: out of memory"]


def test_device_epsilon_is_aggregated_per_round() -> None:
    """Train metrics carry the largest and the mean device ε of the accepted replies."""
    replies = [_make_train_reply() for _ in range(3)]
    for reply, epsilon in zip(replies, (0.5, 1.25, 0.75), strict=True):
        reply["metrics"]["dp-epsilon"] = epsilon
    record = aggregate_train_metrics(replies, "num-examples")
    assert record["dp-epsilon-max"] == 1.25
    assert record["dp-epsilon-mean"] == pytest.approx(2.5 / 3)
    assert "dp-epsilon-max" not in aggregate_train_metrics([_make_train_reply()], "num-examples")


def test_build_strategy_checks_the_privacy_objects(tmp_path: Path) -> None:
    """Device DP needs a ledger directory; user DP needs exactly its UserLevelDP."""
    with pytest.raises(ValueError, match="ledger must be a LedgerStore when device_dp=True"):
        build_strategy(load_config(None, []))
    with pytest.raises(ValueError, match="user_dp must be given"):
        build_strategy(load_config(None, ["privacy.user.enabled=true"]), ledger=LedgerStore(tmp_path))
    plain = build_strategy(load_config(None, ["privacy.preset=off"]))
    assert plain.user_dp is None and plain.device_dp is False


def test_without_user_dp_training_is_example_weighted_and_sends_no_norm(tmp_path: Path) -> None:
    """Without user-level DP the behaviour is unchanged: no clipping norm, FedAvg's weighted mean."""
    strategy = build_strategy(load_config(None, ["privacy.preset=off", "devices=3"]))
    arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _FakeGrid(3)))
    assert "clipping-norm" not in sent[0].content["config"]
    small = _make_train_reply(w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32))
    large = _make_train_reply(w=np.full((2, 3), 3.0, np.float32), b=np.zeros(3, np.float32))
    large["metrics"]["num-examples"] = 30
    new, _ = strategy.aggregate_train(1, [_reply(sent[0], small), _reply(sent[1], large)])
    np.testing.assert_allclose(new["w"].numpy(), (10 * 1.0 + 30 * 3.0) / 40)


def test_run_stops_when_every_sampled_device_declined_for_its_budget(tmp_path: Path) -> None:
    """A round in which every device declined (budget spent) ends the run before the next."""
    from server.dp import PrivacyBudgetStop
    from server.strategy import RoundLog

    strategy = build_strategy(load_config(None, []), ledger=LedgerStore(tmp_path))
    reason = "privacy budget exhausted: device 0 has spent epsilon 1.9 of 2"
    strategy.round_logs[1] = RoundLog(train_sent=2, declined=[f"train node 7: {reason}"] * 2)
    with pytest.raises(PrivacyBudgetStop, match="every device sampled in round 1 declined.*device 0 has spent"):
        strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid=None)  # type: ignore[arg-type]
    # One device declining is not a reason to stop: the others still train.
    strategy.round_logs[2] = RoundLog(train_sent=2, declined=[f"train node 7: {reason}"])
    strategy._stop_if_every_device_declined(3)


# -- the screened strategy's constructor ------------------------------------------------


def _make_base(
    arrayrecord_key: str = "arrays", configrecord_key: str = "config", weighted_by_key: str = "num-examples"
) -> FedAvg:
    return FedAvg(
        arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key, weighted_by_key=weighted_by_key
    )


def test_screened_strategy_wraps_a_base_strategy(tmp_path: Path) -> None:
    """A valid construction keeps the base and the privacy objects as given."""
    ledger = LedgerStore(tmp_path)
    base = _make_base()
    strategy = ScreenedStrategy(base, device_dp=True, ledger=ledger, personal=True)
    assert strategy.strategy is base and strategy.ledger is ledger
    assert strategy.device_dp and strategy.personal and strategy.user_dp is None and strategy.secagg is None
    assert strategy.round_logs == {} and strategy.heldout_nodes == set()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_dp": True}, r"^ledger must be a LedgerStore when device_dp=True .*found None$"),
        (
            {"secagg": SecAggConfig(enabled=False), "server_optimizer": _make_base()},
            r"^secagg must be None when secure aggregation is off, found enabled=False$",
        ),
        ({"secagg": SecAggConfig(enabled=True)}, r"^server_optimizer must be given when user_dp or secagg is, found None$"),
        (
            {"secagg": SecAggConfig(enabled=True, clipping_range=0.0), "server_optimizer": _make_base()},
            r"^secagg\.clipping_range must be positive, found 0\.0$",
        ),
        (
            {"secagg": SecAggConfig(enabled=True, max_weight=-1.0), "server_optimizer": _make_base()},
            r"^secagg\.max_weight must be positive, found -1\.0$",
        ),
    ],
)
def test_screened_strategy_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    """A missing privacy object or a bound out of range is a one-line ValueError naming the argument."""
    with pytest.raises(ValueError, match=message):
        ScreenedStrategy(_make_base(), **kwargs)


@pytest.mark.parametrize(
    ("key", "value"),
    [("arrayrecord_key", "weights"), ("configrecord_key", "cfg"), ("weighted_by_key", "examples")],
)
def test_screened_strategy_requires_the_protocol_record_keys(key: str, value: str) -> None:
    """A base strategy reading other record keys than the screen checks is refused, naming the key."""
    with pytest.raises(ValueError, match=rf"^strategy\.{key} must be the protocol's '.+', found '{value}'$"):
        ScreenedStrategy(_make_base(**{key: value}))


def test_screened_strategy_rejects_wrong_types() -> None:
    """A base that is no FedAvg, or a server optimiser of another class, is a TypeError."""
    with pytest.raises(TypeError, match="^strategy must be a FedAvg .*found str$"):
        ScreenedStrategy("fedavg")  # type: ignore[arg-type]
    secagg = SecAggConfig(enabled=True)
    with pytest.raises(TypeError, match="^server_optimizer must be a FedAvg like strategy, found FedProx$"):
        ScreenedStrategy(_make_base(), secagg=secagg, server_optimizer=FedProx())
    base = _make_base()
    with pytest.raises(ValueError, match="^server_optimizer must be a separate instance"):
        ScreenedStrategy(base, secagg=secagg, server_optimizer=base)
