"""ClientApp handlers: replies follow the protocol the server screens, errors are clean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import ERROR_BAD_REQUEST, ERROR_UNUSABLE_DATA, evaluate, train
from emofed.config import load_config, to_json
from models import build_model, get_state, shared_state_keys
from server.strategy import screen_eval_reply, screen_train_reply

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


def _make_context(partition: int) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def test_train_and_evaluate_replies_pass_the_server_screen() -> None:
    """A device's replies carry exactly the sent arrays (updated) and protocol metrics."""
    arrays = _make_arrays()
    reply = train(_make_message(MessageType.TRAIN, arrays), _make_context(0))
    assert not reply.has_error()
    expected = {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()}
    assert screen_train_reply(reply.content, expected) is None
    before, after = arrays, reply.content["arrays"]
    assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    reply = evaluate(_make_message(MessageType.EVALUATE, arrays), _make_context(1))
    assert not reply.has_error() and screen_eval_reply(reply.content) is None


def test_unusable_device_declines_with_a_reason() -> None:
    """A device with no data answers with an error reply, not an exception."""
    reply = evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), _make_context(7))
    assert reply.has_error() and reply.error.code == ERROR_UNUSABLE_DATA
    assert "partition 7 has no device" in (reply.error.reason or "")


def test_malformed_request_is_declined() -> None:
    """A bad configuration or mismatched arrays from the coordinator are named."""
    reply = train(_make_message(MessageType.TRAIN, _make_arrays(), config='{"rounds": -3}'), _make_context(0))
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST and "rounds" in (reply.error.reason or "")
    wrong = ArrayRecord({"not.a.weight": Array(np.zeros(3, np.float32))})
    reply = train(_make_message(MessageType.TRAIN, wrong), _make_context(0))
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
