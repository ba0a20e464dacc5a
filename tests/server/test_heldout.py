"""Held-out devices on the coordinator: never sampled for training again, scored apart, UAR."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import balanced_accuracy_score, f1_score

from emofed.config import load_config
from emofed.protocol import ERROR_HELDOUT, SKIPPED_METRICS
from server.app import heldout_summary
from server.report import format_table
from server.strategy import (
    aggregate_eval_metrics,
    build_strategy,
    screen_eval_reply,
    unweighted_average_recall,
)

ARRAYS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class _FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)


def _make_confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    confusion = np.zeros((7, 7), np.int64)
    np.add.at(confusion, (truth, pred), 1)
    return confusion


def _make_eval_content(confusion: np.ndarray, *, heldout: int | None = None, **skipped: int) -> RecordDict:
    n = int(confusion.sum())
    metrics = {
        "num-examples": n,
        "loss": 1.0,
        "accuracy": float(np.trace(confusion) / n),
        "confusion": [int(c) for c in confusion.reshape(-1)],
        **{f"{m}-{k}": 0 for m in ("face", "voice", "text") for k in ("correct", "total")},
    }
    if heldout is not None:
        metrics["heldout"] = heldout
        metrics.update(dict.fromkeys(SKIPPED_METRICS, 0))
    metrics.update({f"skipped-{k}": v for k, v in skipped.items()})
    return RecordDict({"metrics": MetricRecord(metrics)})


def _make_train_content() -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v + 1) for k, v in ARRAYS.items()}),
            "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, "steps": 2}),
        }
    )


def _make_strategy():
    cfg = load_config(None, ["devices=3", "privacy.preset=off", "strategy.min_train_devices=1", "personal.enabled=false"])
    return build_strategy(cfg)


def _reply(sent: Message, content: RecordDict | Error) -> Message:
    """The reply of the node ``sent`` went to (Flower stamps the sender on the wire)."""
    reply = Message(content, reply_to=sent)
    reply.metadata.__dict__["_src_node_id"] = sent.metadata.dst_node_id
    return reply


def test_uar_matches_scikit_learn_balanced_accuracy() -> None:
    """UAR from a confusion matrix equals scikit-learn's balanced accuracy on the same labels."""
    rng = np.random.default_rng(3)
    truth = rng.choice(7, 400, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    pred = np.where(rng.random(400) < 0.5, truth, rng.integers(0, 7, 400))
    confusion = _make_confusion(truth, pred)
    assert unweighted_average_recall(confusion) == pytest.approx(balanced_accuracy_score(truth, pred))
    record = aggregate_eval_metrics([_make_eval_content(confusion)], "num-examples")
    assert record["uar"] == pytest.approx(balanced_accuracy_score(truth, pred))
    assert record["macro-f1"] == pytest.approx(f1_score(truth, pred, average="macro"))


def test_uar_ignores_classes_absent_from_the_truth() -> None:
    """A class nobody showed does not count as a recall of 0."""
    confusion = np.zeros((7, 7), np.int64)
    confusion[0, 0], confusion[1, 0] = 3, 1  # neutral all right, happy all wrong
    assert unweighted_average_recall(confusion) == pytest.approx(0.5)
    assert np.isnan(unweighted_average_recall(np.zeros((7, 7), np.int64)))


def test_eval_screen_accepts_the_new_keys_and_checks_them() -> None:
    """`heldout` and `skipped-*` may be missing; present, they must be a 0/1 flag and counts."""
    confusion = np.eye(7, dtype=np.int64)
    assert screen_eval_reply(_make_eval_content(confusion)) is None
    assert screen_eval_reply(_make_eval_content(confusion, heldout=1, voice=2)) is None
    assert "'heldout' must be 0 or 1" in (screen_eval_reply(_make_eval_content(confusion, heldout=2)) or "")
    assert "skipped" in (screen_eval_reply(_make_eval_content(confusion, heldout=0, face=-1)) or "")
    extra = _make_eval_content(confusion, heldout=0)
    extra["metrics"]["secret"] = 1
    assert "unexpected ['secret']" in (screen_eval_reply(extra) or "")


def test_heldout_device_declines_and_is_not_sampled_again() -> None:
    """A held-out decline is no failure; the node is left out of every later training round."""
    strategy = _make_strategy()
    arrays = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _FakeGrid(4)))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3, 4]
    replies = [
        _reply(m, Error(code=ERROR_HELDOUT, reason="heldout-000 is a held-out device"))
        if m.metadata.dst_node_id == 4
        else _reply(m, _make_train_content())
        for m in sent
    ]
    new, _ = strategy.aggregate_train(1, replies)
    log = strategy.round_logs[1]
    assert new is not None and log.train_ok == 3 and log.heldout_declined == 1 and log.failures == []
    assert strategy.heldout_nodes == {4}
    again = list(strategy.configure_train(2, new, ConfigRecord(), _FakeGrid(4)))
    assert sorted(m.metadata.dst_node_id for m in again) == [1, 2, 3]


def test_heldout_evaluations_are_scored_apart() -> None:
    """Held-out replies give the held-out metrics; the local metrics come from the others only."""
    strategy = _make_strategy()
    arrays = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    sent = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), _FakeGrid(3)))
    perfect = np.diag([2, 2, 2, 2, 2, 2, 2]).astype(np.int64)
    wrong = np.zeros((7, 7), np.int64)
    wrong[0, 1] = wrong[2, 3] = 5
    contents = {1: _make_eval_content(perfect, heldout=0), 2: _make_eval_content(perfect, heldout=0, voice=3),
                3: _make_eval_content(wrong, heldout=1, face=1, other=2)}
    replies = [_reply(msg, contents[msg.metadata.dst_node_id]) for msg in sent]
    local = strategy.aggregate_evaluate(1, replies)
    log = strategy.round_logs[1]
    assert local is not None and local["accuracy"] == 1.0 and local["num-examples"] == 28
    assert log.eval_ok == 2 and log.heldout_ok == 1
    assert log.heldout_metrics["accuracy"] == 0.0 and log.heldout_metrics["num-examples"] == 10
    assert log.heldout_metrics["uar"] == 0.0
    assert log.device_skips == {"node 2": {"voice": 3}, "node 3": {"face": 1, "other": 2}}
    assert strategy.heldout_nodes == {3}


def test_summary_and_table_show_heldout_scores() -> None:
    """summary.json's `heldout` takes the last scored round; the table gains held-out columns."""
    rows = [
        {"round": 1, "accuracy": 0.5, "macro_f1": 0.4, "uar": 0.45, "heldout_accuracy": 0.3,
         "heldout_macro_f1": 0.2, "heldout_uar": 0.25, "heldout_devices": 2, "heldout_examples": 40},
        {"round": 2, "accuracy": 0.6, "macro_f1": 0.5, "uar": 0.55, "heldout_accuracy": 0.35,
         "heldout_macro_f1": 0.3, "heldout_uar": 0.33, "heldout_devices": 2, "heldout_examples": 40},
    ]
    summary = heldout_summary(rows)
    assert summary is not None
    assert (summary["round"], summary["accuracy"], summary["uar"]) == (2, 0.35, 0.33)
    assert summary["local_test"] == {"accuracy": 0.6, "macro_f1": 0.5, "uar": 0.55}
    assert heldout_summary([{"round": 1, "accuracy": 0.5}]) is None
    table = format_table(rows)
    assert "held-out acc" in table and "held-out UAR" in table and "0.350" in table
    assert "held-out" not in format_table([{"round": 1, "accuracy": 0.5}])
