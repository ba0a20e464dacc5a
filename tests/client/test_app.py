"""ClientApp handlers: replies follow the protocol the server screens, errors are clean."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import ERROR_BAD_REQUEST, ERROR_UNUSABLE_DATA, app, evaluate, train
from emofed.config import load_config, to_json
from emofed.protocol import DEVICE_ROOT_KEY, eval_metric_keys, train_metric_keys
from models import NUM_CLASSES, build_model, get_state, shared_state_keys
from privacy.guard import LEDGER_RECORD

CFG = load_config(None, ["devices=3", "data.samples_per_device=12", "train.local_epochs=1"])


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _make_arrays() -> ArrayRecord:
    model = build_model(CFG.model, device="cpu")
    state = get_state(model, shared_state_keys(model))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _make_message(kind: str, arrays: ArrayRecord, config: str | None = None) -> Message:
    record = ConfigRecord({"emofed-config": config if config is not None else to_json(CFG), "server-round": 1})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=1, message_type=kind)


def _make_context(partition: int, root: Path) -> Context:
    # Each test keeps the device stores (ledgers) in its own folder.
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={DEVICE_ROOT_KEY: str(root)},
    )


def _finite(value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("preset", ["balanced", "off"])
def test_train_and_evaluate_replies_follow_the_protocol(tmp_path: Path, preset: str) -> None:
    """Through the guard, a device replies with the sent arrays (updated) and the protocol's metrics."""
    cfg = load_config(
        None, ["devices=3", "data.samples_per_device=12", "train.local_epochs=1", f"privacy.preset={preset}"]
    )
    arrays, device_dp = _make_arrays(), preset != "off"
    reply = app(_make_message(MessageType.TRAIN, arrays, to_json(cfg)), _make_context(0, tmp_path))
    assert not reply.has_error(), reply.error
    assert list(reply.content.array_records) == ["arrays"]
    assert list(reply.content.metric_records) == ["metrics"]
    sent = reply.content["arrays"]
    assert {k: (tuple(a.shape), a.dtype) for k, a in sent.items()} == {
        k: (tuple(a.shape), a.dtype) for k, a in arrays.items()
    }
    assert any(not np.array_equal(arrays[k].numpy(), sent[k].numpy()) for k in arrays)
    metrics = reply.content["metrics"]
    assert set(metrics) == train_metric_keys(device_dp, False)
    assert all(_finite(v) for v in metrics.values()) and metrics["num-examples"] == 9
    assert (LEDGER_RECORD in reply.content.config_records) is device_dp
    if device_dp:
        assert 0 < metrics["dp-epsilon"] <= cfg.privacy.device.epsilon

    reply = app(_make_message(MessageType.EVALUATE, arrays, to_json(cfg)), _make_context(1, tmp_path))
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content["metrics"]
    assert set(metrics) == eval_metric_keys(cfg.personal.enabled) and all(_finite(v) for v in metrics.values())
    confusion = metrics["confusion"]
    assert len(confusion) == NUM_CLASSES * NUM_CLASSES and sum(confusion) == metrics["num-examples"]


def test_unusable_device_declines_with_a_reason(tmp_path: Path) -> None:
    """A device with no data answers with an error reply, not an exception."""
    reply = evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), _make_context(7, tmp_path))
    assert reply.has_error() and reply.error.code == ERROR_UNUSABLE_DATA
    assert "partition 7 has no device" in (reply.error.reason or "")


def test_malformed_request_is_declined(tmp_path: Path) -> None:
    """A bad configuration or mismatched arrays from the coordinator are named."""
    context = _make_context(0, tmp_path)
    reply = train(_make_message(MessageType.TRAIN, _make_arrays(), config='{"rounds": -3}'), context)
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST and "rounds" in (reply.error.reason or "")
    wrong = ArrayRecord({"not.a.weight": Array(np.zeros(3, np.float32))})
    reply = train(_make_message(MessageType.TRAIN, wrong), context)
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
    assert not (tmp_path / "0").exists()  # declined before the device store was touched
