"""Strategy assembly: reply screening and exact metric aggregation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from emofed.config import load_config
from server.strategy import (
    aggregate_eval_metrics,
    aggregate_train_metrics,
    build_strategy,
    confusion_scores,
    screen_eval_reply,
    screen_train_reply,
)

EXPECTED = {"w": ((2, 3), "float32"), "b": ((3,), "float32")}


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
def test_build_strategy_by_name(name: str, base: type) -> None:
    """Each registered strategy is built and screened."""
    strategy = build_strategy(load_config(None, [f"strategy.name={name}"]))
    assert isinstance(strategy, base)
    assert strategy.fraction_train == 1.0
    if name == "fedprox":
        assert strategy.proximal_mu == pytest.approx(0.01)


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
