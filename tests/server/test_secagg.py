"""SecAgg+ end to end in one process: Flower's workflow stages against Flower's client mod."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity

from client.secagg import secure_aggregation_mod
from emofed.config import SecAggConfig
from emofed.protocol import CLIPPING_NORM_KEY, UPDATE_CLIPPED_KEY
from server.secagg import SecureAggregationGrid
from server.strategy import screen_secure_train_reply

SHAPES = {"a": (3, 4), "b": (5,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _make_global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _make_deltas(nodes: list[int], scale: float = 0.05) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {n: {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()} for n in nodes}


class _Federation:
    """Devices answering through ``secure_aggregation_mod``; a grid that can lose replies."""

    def __init__(
        self,
        deltas: dict[int, dict[str, np.ndarray]],
        examples: dict[int, int],
        *,
        clipped: dict[int, int] | None = None,
        decline: set[int] | None = None,
    ) -> None:
        self.deltas = deltas
        self.examples = examples
        self.clipped = clipped or {}
        self.decline = decline or set()
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in deltas
        }
        self.lose: set[tuple[int, str]] = set()  # (node, stage) whose reply never arrives
        self.app_calls: list[int] = []

    def app(self, node: int) -> Callable[[Message, Context], Message]:
        def answer(msg: Message, ctxt: Context) -> Message:
            self.app_calls.append(node)
            if node in self.decline:
                return Message(Error(code=1004, reason="privacy budget spent"), reply_to=msg)
            sent = msg.content["arrays"]
            arrays = ArrayRecord(
                {k: Array(sent[k].numpy() + self.deltas[node][k]) for k in sent}
            )
            metrics = {"num-examples": self.examples[node], "train-loss": 1.0, "steps": 3}
            if CLIPPING_NORM_KEY in msg.content["config"]:
                metrics[UPDATE_CLIPPED_KEY] = self.clipped.get(node, 0)
            return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

        return answer

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for sent in messages:
            msg = copy.deepcopy(sent)  # as if serialised: the workflow shares one content
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            reply = secure_aggregation_mod(msg, self.contexts[node], self.app(node))
            if (node, stage) not in self.lose:
                replies.append(reply)
        return replies

    def get_node_ids(self) -> list[int]:
        return list(self.deltas)


def _make_batch(
    global_arrays: dict[str, np.ndarray], nodes: list[int], server_round: int = 1, clipping_norm: float | None = None
) -> list[Message]:
    config = {"server-round": server_round}
    if clipping_norm is not None:
        config[CLIPPING_NORM_KEY] = clipping_norm
    batch = []
    for node in nodes:
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
                "config": ConfigRecord(config),
            }
        )
        batch.append(
            Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
        )
    return batch


def _make_grid(
    fed: _Federation,
    settings: SecAggConfig,
    *,
    screen: Callable[[Message], str | None] | None = None,
    clipping_range: float = 1.0,
    max_weight: float = 1000.0,
) -> tuple[SecureAggregationGrid, list[tuple[int, str]]]:
    refused: list[tuple[int, str]] = []
    grid = SecureAggregationGrid(
        fed,  # type: ignore[arg-type]
        settings,
        screen=screen or (lambda _reply: None),
        on_refused=lambda reply, reason: refused.append((reply.metadata.src_node_id, reason)),
        clipping_range=lambda _round: clipping_range,
        max_weight=max_weight,
    )
    return grid, refused


def _weighted_mean(deltas: dict[int, dict[str, np.ndarray]], weights: dict[int, int], nodes: list[int]) -> dict[str, np.ndarray]:
    total = sum(weights[n] for n in nodes)
    return {k: sum(weights[n] * deltas[n][k].astype(np.float64) for n in nodes) / total for k in SHAPES}


def test_secure_sum_equals_plain_weighted_mean() -> None:
    """The unmasked aggregate is the example-weighted mean of the updates, to quantisation error."""
    nodes = [11, 12, 13, 14, 15]
    deltas, examples = _make_deltas(nodes), {n: 20 + 7 * i for i, n in enumerate(nodes)}
    fed = _Federation(deltas, examples)
    grid, refused = _make_grid(fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.6))
    replies = grid.send_and_receive(_make_batch(_make_global(), nodes))
    outcome = grid.sums[1]
    assert outcome.ok and outcome.contributors == nodes and not refused
    expected = _weighted_mean(deltas, examples, nodes)
    for got, key in zip(outcome.mean or [], SHAPES, strict=True):
        np.testing.assert_allclose(got.reshape(SHAPES[key]), expected[key], atol=1e-4)
    for reply in replies:
        # Nothing in the clear but metrics: every array record was emptied by the mod.
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        assert not reply.has_error()


def test_secure_sum_survives_dropout_after_sharing_keys() -> None:
    """A device lost after the key-sharing stage is left out and the others' sum is exact."""
    nodes = [1, 2, 3, 4, 5]
    deltas, examples = _make_deltas(nodes), dict.fromkeys(nodes, 10)
    fed = _Federation(deltas, examples)
    fed.lose = {(3, "collect_masked_vectors")}
    grid, _ = _make_grid(fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.6))
    grid.send_and_receive(_make_batch(_make_global(), nodes))
    outcome = grid.sums[1]
    assert outcome.ok
    assert outcome.contributors == [1, 2, 4, 5] and outcome.dropped == [3]
    expected = _weighted_mean(deltas, examples, [1, 2, 4, 5])
    np.testing.assert_allclose(outcome.mean[0].reshape(SHAPES["a"]), expected["a"], atol=1e-4)  # type: ignore[index]


def test_secure_sum_fails_cleanly_below_threshold() -> None:
    """With fewer devices left than the threshold, nothing is unmasked."""
    nodes = [1, 2, 3, 4, 5]
    fed = _Federation(_make_deltas(nodes), dict.fromkeys(nodes, 10))
    fed.lose = {(2, "collect_masked_vectors"), (3, "collect_masked_vectors"), (4, "collect_masked_vectors")}
    grid, _ = _make_grid(fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.6))
    replies = grid.send_and_receive(_make_batch(_make_global(), nodes))
    outcome = grid.sums[1]
    assert not outcome.ok and outcome.mean is None
    assert outcome.halted_at == "collect masked vectors"
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 5]


def test_refused_reply_never_enters_the_sum() -> None:
    """A reply the screen refuses counts as dropped: the sum is the other devices'."""
    nodes = [1, 2, 3, 4]
    deltas, examples = _make_deltas(nodes), dict.fromkeys(nodes, 10)
    fed = _Federation(deltas, examples)
    grid, refused = _make_grid(
        fed,
        SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.5),
        screen=lambda reply: "bad ledger" if reply.metadata.src_node_id == 2 else None,
    )
    grid.send_and_receive(_make_batch(_make_global(), nodes))
    outcome = grid.sums[1]
    assert refused == [(2, "bad ledger")]
    assert outcome.ok and outcome.contributors == [1, 3, 4]
    expected = _weighted_mean(deltas, examples, [1, 3, 4])
    np.testing.assert_allclose(outcome.mean[1], expected["b"], atol=1e-4)  # type: ignore[index]


def test_declined_device_is_returned_as_error_and_masks_removed() -> None:
    """A device declining (error reply) is passed on as an error; the rest still aggregate."""
    nodes = [1, 2, 3, 4]
    deltas, examples = _make_deltas(nodes), dict.fromkeys(nodes, 10)
    fed = _Federation(deltas, examples, decline={4})
    grid, _ = _make_grid(fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.5))
    replies = grid.send_and_receive(_make_batch(_make_global(), nodes))
    errors = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in errors] == [4] and errors[0].error.code == 1004
    outcome = grid.sums[1]
    assert outcome.ok and outcome.contributors == [1, 2, 3]
    expected = _weighted_mean(deltas, examples, [1, 2, 3])
    np.testing.assert_allclose(outcome.mean[0].reshape(SHAPES["a"]), expected["a"], atol=1e-4)  # type: ignore[index]


def test_user_dp_mode_sums_updates_and_clipped_bits() -> None:
    """Under user-level DP weights are 1 and the clipped count arrives only as a sum."""
    nodes = [1, 2, 3, 4]
    norm = 0.5
    deltas = _make_deltas(nodes, scale=0.02)
    fed = _Federation(deltas, dict.fromkeys(nodes, 30), clipped={1: 1, 3: 1})
    grid, _ = _make_grid(
        fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.5), clipping_range=norm, max_weight=1.0
    )
    replies = grid.send_and_receive(_make_batch(_make_global(), nodes, clipping_norm=norm))
    outcome = grid.sums[1]
    assert outcome.ok and outcome.mean is not None
    n = len(outcome.contributors)
    total_a = outcome.mean[0].reshape(SHAPES["a"]) * n
    np.testing.assert_allclose(total_a, sum(deltas[i]["a"].astype(np.float64) for i in nodes), atol=1e-5)
    assert outcome.mean[-1][0] * n / norm == pytest.approx(2.0, abs=1e-4)
    for reply in replies:
        assert UPDATE_CLIPPED_KEY not in reply.content["metrics"]


def test_screen_accepts_real_reply_and_rejects_malformed_vector() -> None:
    """The server's screen passes a real masked reply and refuses a wrong-shaped vector."""
    nodes = [1, 2, 3]
    fed = _Federation(_make_deltas(nodes), dict.fromkeys(nodes, 10))
    expected = {k: (s, "float32") for k, s in SHAPES.items()}
    seen: list[str | None] = []

    def screen(reply: Message) -> str | None:
        reason = screen_secure_train_reply(reply.content, expected)
        seen.append(reason)
        return reason

    grid, _ = _make_grid(fed, SecAggConfig(enabled=True, num_shares=1.0, reconstruction_threshold=0.6), screen=screen)
    replies = grid.send_and_receive(_make_batch(_make_global(), nodes))
    assert seen == [None, None, None]
    content = replies[0].content
    masked = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = masked[:-1]
    assert "must hold" in (screen_secure_train_reply(content, expected) or "")
    content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = masked
    content["arrays"] = ArrayRecord({"a": Array(np.zeros(SHAPES["a"], np.float32))})
    assert "no unmasked arrays" in (screen_secure_train_reply(content, expected) or "")


def test_evaluation_messages_pass_through() -> None:
    """Only training goes through SecAgg+; evaluation reaches the grid unchanged."""
    seen: list[str] = []

    class _Grid:
        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
            seen.extend(m.metadata.message_type for m in messages)
            return []

    grid = SecureAggregationGrid(
        _Grid(),  # type: ignore[arg-type]
        SecAggConfig(enabled=True),
        screen=lambda _r: None,
        on_refused=lambda _r, _s: None,
        clipping_range=lambda _r: 1.0,
        max_weight=1.0,
    )
    msg = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE, group_id="1")
    assert list(grid.send_and_receive([msg])) == []
    assert seen == [MessageType.EVALUATE]
