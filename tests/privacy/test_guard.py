"""Tests for privacy.guard: only shared weights, allowlisted metrics and ledger entries leave."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message

from privacy.accounting import PrivacyEvent
from privacy.errors import GuardViolation
from privacy.guard import LEDGER_RECORD, OutgoingGuard, OutgoingGuardMod, ledger_record
from privacy.ledger import Ledger

ALLOWLIST = {"loss", "accuracy", "num-examples", "epsilon"}
KEY = Ed25519PrivateKey.from_private_bytes(bytes([5] * 32))
RNG = np.random.default_rng(0)


def _make_weights() -> ArrayRecord:
    """The shared weights a server sends: two float32 tensors."""
    return ArrayRecord(
        {
            "fc.weight": Array(RNG.standard_normal((7, 16)).astype(np.float32)),
            "fc.bias": Array(np.zeros(7, np.float32)),
        }
    )


def _make_reply(**records: object) -> RecordDict:
    """A correct train reply, with records added or replaced."""
    content = {
        "arrays": _make_weights(),
        "metrics": MetricRecord({"loss": 0.7, "accuracy": 0.5, "num-examples": 40}),
    }
    content.update(records)
    return RecordDict({k: v for k, v in content.items() if v is not None})


def _make_guard(**kwargs: object) -> OutgoingGuard:
    return OutgoingGuard.from_array_record(_make_weights(), ALLOWLIST, **kwargs)


def _with_array(key: str, value: np.ndarray) -> ArrayRecord:
    record = _make_weights()
    record[key] = Array(value)
    return record


def _mislabelled_weights() -> ArrayRecord:
    """An image's bytes behind a weight's declared shape and dtype."""
    image = Array(RNG.integers(0, 255, (48, 48), dtype=np.uint8))
    record = _make_weights()
    record["fc.weight"] = Array(
        dtype="float32", shape=(7, 16), stype=image.stype, data=image.data
    )
    return record


def _padded_weights() -> ArrayRecord:
    """Correct weights with an image's raw bytes appended (np.load would ignore them)."""
    record = _make_weights()
    bias = record["fc.bias"]
    image = RNG.integers(0, 255, (48, 48), dtype=np.uint8).tobytes()
    record["fc.bias"] = Array(
        dtype=bias.dtype, shape=tuple(bias.shape), stype=bias.stype, data=bias.data + image
    )
    return record


def _make_ledger_record(tmp_path: Path, extra: dict | None = None) -> ConfigRecord:
    ledger = Ledger(tmp_path / "3.jsonl", scope="device:3")
    ledger.append(
        server_round=1, event=PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=20),
        clipping_norm=1.0, delta=1e-5, epsilon=1.2, accountant="opacus_rdp",
        budget_epsilon=6.0, private_key=KEY, extra=extra or {"num_examples": 40},
    )
    return ledger_record(ledger, public_key=KEY)


def test_correct_reply_passes(tmp_path: Path) -> None:
    """Same arrays, allowlisted metrics and the device's ledger entries are allowed."""
    guard = _make_guard(ledger_public_key=KEY, require_arrays=True)
    guard.check(_make_reply(**{LEDGER_RECORD: _make_ledger_record(tmp_path)}))
    _make_guard().check(_make_reply(arrays=None))  # an evaluate-style reply without arrays


BLOCKED: dict[str, tuple[Callable[[], RecordDict], str]] = {
    "uint8 image": (
        lambda: _make_reply(
            arrays=_with_array("image", RNG.integers(0, 255, (48, 48), dtype=np.uint8))
        ),
        "extra array 'image'",
    ),
    "float waveform": (
        lambda: _make_reply(
            arrays=_with_array("waveform", RNG.standard_normal(16000).astype(np.float32))
        ),
        "extra array 'waveform'",
    ),
    "text in a ConfigRecord": (
        lambda: _make_reply(config=ConfigRecord({"text": "I feel sad today"})),
        r"ConfigRecord 'config' \(may carry text\)",
    ),
    "embedding under an extra key": (
        lambda: _make_reply(
            arrays=_with_array("embedding", RNG.standard_normal(64).astype(np.float32))
        ),
        "extra array 'embedding'",
    ),
    "embedding in a second ArrayRecord": (
        lambda: _make_reply(features=ArrayRecord({"x": Array(np.ones(64, np.float32))})),
        "ArrayRecord 'features' was not requested",
    ),
    "metric not in allowlist": (
        lambda: _make_reply(metrics=MetricRecord({"loss": 0.1, "embedding_norm": 3.2})),
        "metric 'embedding_norm' not in allowlist",
    ),
    "metric list": (
        lambda: _make_reply(metrics=MetricRecord({"loss": [0.1, 0.2, 0.3]})),
        "metric 'loss' is not a scalar",
    ),
    "non-finite metric": (
        lambda: _make_reply(metrics=MetricRecord({"loss": float("nan")})),
        "metric 'loss' is not finite",
    ),
    "other MetricRecord": (
        lambda: _make_reply(debug=MetricRecord({"loss": 0.1})),
        "MetricRecord 'debug' not allowed",
    ),
    "shape change": (
        lambda: _make_reply(arrays=_with_array("fc.bias", np.zeros(8, np.float32))),
        r"array 'fc.bias' declared shape \(8,\) != \(7,\)",
    ),
    "dtype change": (
        lambda: _make_reply(arrays=_with_array("fc.weight", np.zeros((7, 16), np.float64))),
        "array 'fc.weight' declared dtype float64 != float32",
    ),
    "missing key": (
        lambda: _make_reply(
            arrays=ArrayRecord({"fc.weight": Array(np.zeros((7, 16), np.float32))})
        ),
        "missing array 'fc.bias'",
    ),
    "bytes appended to a weight": (
        lambda: _make_reply(arrays=_padded_weights()),
        "array 'fc.bias' carries 2304 extra bytes",
    ),
    "image mislabelled as a weight": (
        lambda: _make_reply(arrays=_mislabelled_weights()),
        r"array 'fc.weight' decoded shape \(48, 48\) != \(7, 16\)",
    ),
}


@pytest.mark.parametrize("case", list(BLOCKED))
def test_guard_blocks(case: str) -> None:
    """Raw data, extra arrays, changed arrays and non-allowlisted metrics are blocked by name."""
    make, message = BLOCKED[case]
    with pytest.raises(GuardViolation, match=message) as info:
        _make_guard().check(make())
    assert "\n" not in str(info.value)
    assert "I feel sad" not in str(info.value)  # names what was blocked, never its content


def test_guard_lists_every_violation() -> None:
    """One error names all blocked items at once."""
    reply = _make_reply(
        arrays=_with_array("image", np.zeros((4, 4), np.uint8)),
        metrics=MetricRecord({"embedding_norm": 1.0}),
        config=ConfigRecord({"text": "hi"}),
    )
    with pytest.raises(GuardViolation) as info:
        _make_guard().check(reply)
    assert info.value.kinds == ("config record", "extra array", "metric")


def test_missing_arrays_blocked_for_train() -> None:
    """A train reply must return the shared weights."""
    with pytest.raises(GuardViolation, match="missing ArrayRecord 'arrays'"):
        _make_guard(require_arrays=True).check(_make_reply(arrays=None))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.__setitem__("note", "hello"), "ledger record key 'note' not allowed"),
        (lambda r: r.__setitem__("entries", ["I feel sad today"]), "ledger entry 0 invalid"),
        (lambda r: r.__setitem__("seal", '{"text":"hi"}'), "ledger seal invalid"),
        (lambda r: r.__setitem__("public_key", "a text, not a key"), "not a base64 Ed25519 key"),
    ],
)
def test_ledger_record_cannot_carry_text(
    tmp_path: Path, mutate: Callable[[ConfigRecord], None], message: str
) -> None:
    """The one string channel accepts only schema-valid, signed ledger entries."""
    record = _make_ledger_record(tmp_path)
    mutate(record)
    with pytest.raises(GuardViolation, match=message):
        _make_guard(ledger_public_key=KEY).check(_make_reply(**{LEDGER_RECORD: record}))


def test_ledger_extra_must_be_numeric(tmp_path: Path) -> None:
    """A device entry with a string in `extra` is blocked (it could carry text)."""
    record = _make_ledger_record(tmp_path, extra={"note": "I feel sad today"})
    with pytest.raises(GuardViolation, match="extra holds non-numeric values"):
        _make_guard().check(_make_reply(**{LEDGER_RECORD: record}))


def test_ledger_entries_signed_by_another_key_blocked(tmp_path: Path) -> None:
    """With the device key configured, entries signed by another key are blocked."""
    record = _make_ledger_record(tmp_path)
    other = Ed25519PrivateKey.from_private_bytes(bytes([6] * 32))
    with pytest.raises(GuardViolation, match="not signed by this device's key"):
        _make_guard(ledger_public_key=other).check(_make_reply(**{LEDGER_RECORD: record}))


def _make_message(message_type: str = "train") -> Message:
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=3, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600, message_type=message_type,
    )
    return make_message(
        metadata, RecordDict({"arrays": _make_weights(), "config": ConfigRecord({"lr": 0.1})})
    )


def _context() -> Context:
    return Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})


def test_mod_passes_correct_reply() -> None:
    """The client mod lets a correct reply through unchanged."""
    msg = _make_message()
    reply = Message(_make_reply(), reply_to=msg)
    out = OutgoingGuardMod(ALLOWLIST)(msg, _context(), lambda m, c: reply)
    assert out is reply and not out.has_error()


def test_mod_replaces_blocked_reply_with_error() -> None:
    """A blocked reply becomes an error reply naming only the kinds of violation."""
    msg = _make_message()
    leaky_metrics = MetricRecord({"loss": 0.1, "sad_today": 1.0})
    leaky = Message(_make_reply(metrics=leaky_metrics), reply_to=msg)
    out = OutgoingGuardMod(ALLOWLIST)(msg, _context(), lambda m, c: leaky)
    assert out.has_error()
    assert out.error.reason == "privacy guard blocked the reply: metric"
    assert "sad_today" not in out.error.reason


def test_mod_requires_weights_only_for_train() -> None:
    """Evaluate replies may omit the arrays; train replies may not."""
    for message_type, blocked in (("evaluate", False), ("train", True)):
        msg = _make_message(message_type)
        reply = Message(_make_reply(arrays=None), reply_to=msg)
        out = OutgoingGuardMod(ALLOWLIST)(msg, _context(), lambda m, c, r=reply: r)
        assert out.has_error() is blocked


def test_count_vectors_pass_only_as_exact_length_non_negative_ints() -> None:
    """A declared count vector (a confusion matrix) may be a list; nothing else may."""
    from flwr.app import MetricRecord, RecordDict

    from privacy.errors import GuardViolation
    from privacy.guard import OutgoingGuard

    guard = OutgoingGuard({}, {"confusion", "loss"}, count_vectors={"confusion": 4})
    guard.check(RecordDict({"metrics": MetricRecord({"confusion": [1, 0, 2, 3], "loss": 0.5})}))
    for bad in ([1, 0, 2], [1, 0, 2, -1], [0.5, 0.1, 0.2, 0.2]):
        with pytest.raises(GuardViolation, match="not 4 counts"):
            guard.check(RecordDict({"metrics": MetricRecord({"confusion": bad})}))
    with pytest.raises(GuardViolation, match="not a scalar"):
        guard.check(RecordDict({"metrics": MetricRecord({"loss": [0.1, 0.2]})}))
