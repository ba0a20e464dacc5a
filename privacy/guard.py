"""Outgoing-message guard: only shared weights, allowlisted metrics and ledger entries leave.

A device's reply may contain exactly:

* one ArrayRecord (default name ``"arrays"``) with the *same keys, shapes and dtypes*
  as the shared weights the server sent — checked on the declared metadata and on
  the decoded arrays, so a mislabelled payload cannot slip through;
* MetricRecords (default name ``"metrics"``) whose keys are in an allowlist and
  whose values are finite int/float scalars (lists could carry an embedding);
* optionally the ConfigRecord ``"privacy.ledger"`` carrying the device's signed
  ledger entries, their seal and its public key, each validated against the ledger
  schema (numeric ``extra`` only), so this one string channel cannot carry text.

Anything else — an image, a waveform, a text, an embedding, an extra or reshaped
array, any other ConfigRecord, a non-allowlisted metric — raises
:class:`~privacy.errors.GuardViolation` naming every blocked item. The
:class:`OutgoingGuardMod` applies the guard to every ClientApp reply; the error it
returns to the server names only the *kinds* of violation, so a blocked key that is
itself data is not sent either (the full message is logged on the device).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from privacy.errors import GuardViolation
from privacy.keys import (
    PublicKeyLike,
    public_key_from_string,
    public_key_to_string,
    verify_signature,
)
from privacy.ledger import Ledger
from privacy.ledger_format import content_hash, parse_line, validate_entry, validate_seal

logger = logging.getLogger(__name__)

LEDGER_RECORD = "privacy.ledger"
_LEDGER_KEYS = frozenset({"entries", "seal", "public_key"})
_NAME_LIMIT = 48


def _name(value: object) -> str:
    """Quote a blocked name, truncated: it may itself be data."""
    text = repr(value)
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 1] + "…'"


def _is_str_list(value: object) -> TypeGuard[list[str]]:
    """Whether a record value is a list of strings (as ledger entries must be)."""
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


@dataclass(frozen=True)
class Violation:
    """One blocked item: its kind (safe to report) and a detail naming it."""

    kind: str
    detail: str


def _raise(violations: list[Violation]) -> None:
    if violations:
        raise GuardViolation(
            "Outgoing message blocked: " + "; ".join(v.detail for v in violations) + ".",
            kinds=tuple(sorted({v.kind for v in violations})),
        )


class OutgoingGuard:
    """Checks that a reply carries only what the privacy model allows.

    Parameters
    ----------
    expected : Mapping[str, tuple[tuple[int, ...], str]]
        Array key → (shape, dtype) of the shared weights the server sent; empty if
        the reply must carry no arrays.
    metric_allowlist : Collection[str]
        Metric names that may be sent.
    array_record : str
        Name of the reply's ArrayRecord.
    metric_records : Collection[str]
        Allowed MetricRecord names.
    require_arrays : bool
        Whether the ArrayRecord must be present (train replies).
    allow_ledger : bool
        Whether the ``"privacy.ledger"`` ConfigRecord may be sent.
    ledger_public_key : Ed25519 key, key string or None
        If given, shipped ledger entries must be signed by this key.
    count_vectors : Mapping[str, int] or None
        Allowlisted metrics that may be a list: name → exact length; every item must be a
        non-negative int (e.g. a confusion matrix of counts). Any other list is refused.
    """

    def __init__(
        self,
        expected: Mapping[str, tuple[tuple[int, ...], str]],
        metric_allowlist: Collection[str],
        *,
        array_record: str = "arrays",
        metric_records: Collection[str] = ("metrics",),
        require_arrays: bool = False,
        allow_ledger: bool = True,
        ledger_public_key: PublicKeyLike | None = None,
        count_vectors: Mapping[str, int] | None = None,
    ) -> None:
        self.expected = {
            str(key): (tuple(int(d) for d in shape), str(dtype))
            for key, (shape, dtype) in expected.items()
        }
        self.metric_allowlist = frozenset(metric_allowlist)
        self.array_record = array_record
        self.metric_records = frozenset(metric_records)
        self.require_arrays = require_arrays
        self.allow_ledger = allow_ledger
        self.count_vectors = dict(count_vectors or {})
        self._ledger_key_text = (
            None if ledger_public_key is None else public_key_to_string(ledger_public_key)
        )

    @classmethod
    def from_array_record(
        cls,
        record: ArrayRecord,
        metric_allowlist: Collection[str],
        **kwargs: object,
    ) -> OutgoingGuard:
        """Build a guard expecting the arrays (keys, shapes, dtypes) the server sent."""
        expected = {key: (tuple(array.shape), array.dtype) for key, array in record.items()}
        return cls(expected, metric_allowlist, **kwargs)  # type: ignore[arg-type]

    def check(self, content: RecordDict) -> None:
        """Raise if ``content`` carries anything not allowed.

        Raises
        ------
        GuardViolation
            Naming every blocked record, key, shape, dtype or metric.
        TypeError
            If ``content`` is not a RecordDict.
        """
        if not isinstance(content, RecordDict):
            raise TypeError(f"Expected a RecordDict. Found {type(content).__name__}.")
        violations: list[Violation] = []
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                violations += self._check_arrays(name, record)
            elif isinstance(record, MetricRecord):
                violations += self._check_metrics(name, record)
            elif isinstance(record, ConfigRecord):
                if name == LEDGER_RECORD and self.allow_ledger:
                    violations += self._check_ledger(record)
                else:
                    violations.append(
                        Violation("config record", f"ConfigRecord {_name(name)} (may carry text)")
                    )
            else:  # pragma: no cover - RecordDict admits only the three types
                violations.append(Violation("record", f"record {_name(name)} of unknown type"))
        if self.require_arrays and self.expected and self.array_record not in content:
            violations.append(
                Violation("missing arrays", f"missing ArrayRecord {_name(self.array_record)}")
            )
        _raise(violations)

    def _check_arrays(self, name: str, record: ArrayRecord) -> list[Violation]:
        if name != self.array_record or not self.expected:
            return [Violation("array record", f"ArrayRecord {_name(name)} was not requested")]
        found: list[Violation] = []
        for key in record.keys() - self.expected.keys():
            found.append(Violation("extra array", f"extra array {_name(key)}"))
        for key in self.expected.keys() - record.keys():
            found.append(Violation("missing array", f"missing array {_name(key)}"))
        for key in record.keys() & self.expected.keys():
            array = record[key]
            shape, dtype = self.expected[key]
            declared = (tuple(array.shape), array.dtype)
            try:
                decoded = array.numpy()
                actual = (tuple(decoded.shape), str(decoded.dtype))
                # np.load ignores trailing bytes, which could smuggle data along.
                excess = len(array.data) - len(Array(decoded).data)
            except Exception:  # malformed bytes: whatever they are, they do not leave
                found.append(Violation("array payload", f"array {_name(key)} does not decode"))
                continue
            if excess:
                found.append(
                    Violation("array payload", f"array {_name(key)} carries {excess} extra bytes")
                )
            for what, got in (("declared", declared), ("decoded", actual)):
                if got[0] != shape:
                    found.append(
                        Violation("shape", f"array {_name(key)} {what} shape {got[0]} != {shape}")
                    )
                if got[1] != dtype:
                    found.append(
                        Violation("dtype", f"array {_name(key)} {what} dtype {got[1]} != {dtype}")
                    )
        return found

    def _check_metrics(self, name: str, record: MetricRecord) -> list[Violation]:
        if name not in self.metric_records:
            return [Violation("metric record", f"MetricRecord {_name(name)} not allowed")]
        found: list[Violation] = []
        for key, value in record.items():
            if key not in self.metric_allowlist:
                found.append(Violation("metric", f"metric {_name(key)} not in allowlist"))
            elif key in self.count_vectors and isinstance(value, list):
                length = self.count_vectors[key]
                if len(value) != length or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
                ):
                    found.append(
                        Violation("metric value", f"metric {_name(key)} is not {length} counts")
                    )
            elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                found.append(Violation("metric value", f"metric {_name(key)} is not a scalar"))
            elif not math.isfinite(value):
                found.append(Violation("metric value", f"metric {_name(key)} is not finite"))
        return found

    def _check_ledger(self, record: ConfigRecord) -> list[Violation]:
        found = [
            Violation("ledger record", f"ledger record key {_name(key)} not allowed")
            for key in record.keys() - _LEDGER_KEYS
        ]
        entries = record.get("entries", [])
        if not _is_str_list(entries):
            return [*found, Violation("ledger record", "ledger entries are not a list of strings")]
        for index, line in enumerate(entries):
            try:
                entry = parse_line(line)
                validate_entry(entry)
                if not entry["scope"].startswith("device:"):
                    raise ValueError("scope is not a device")
                if not all(
                    isinstance(v, (int, float)) for v in entry["extra"].values()
                ):
                    raise ValueError("extra holds non-numeric values")
                self._check_signed(entry)
            except ValueError as err:
                found.append(Violation("ledger entry", f"ledger entry {index} invalid: {err}"))
        if "seal" in record:
            try:
                seal = record["seal"]
                if not isinstance(seal, str):
                    raise ValueError("not a string")
                obj = parse_line(seal)
                validate_seal(obj)
                self._check_signed(obj)
            except ValueError as err:
                found.append(Violation("ledger seal", f"ledger seal invalid: {err}"))
        if "public_key" in record:
            key = record["public_key"]
            try:
                if not isinstance(key, str) or key.lstrip().startswith("-----"):
                    raise ValueError("not a base64 key")
                public_key_from_string(key)
            except ValueError:
                found.append(
                    Violation("ledger key", "ledger public_key is not a base64 Ed25519 key")
                )
        return found

    def _check_signed(self, obj: Mapping[str, object]) -> None:
        if content_hash(obj) != obj["hash"]:
            raise ValueError("hash does not match content")
        if self._ledger_key_text is not None and not verify_signature(
            self._ledger_key_text, bytes.fromhex(str(obj["hash"])), str(obj["signature"])
        ):
            raise ValueError("not signed by this device's key")


def ledger_record(
    ledger: Ledger, *, public_key: PublicKeyLike | None = None, since_seq: int = 0
) -> ConfigRecord | None:
    """Pack a device's ledger entries (from ``since_seq``) and seal for its reply.

    Returns None for an empty ledger. Attach the result as
    ``reply.content[LEDGER_RECORD]``; the server unpacks it with
    :func:`read_ledger_record` and stores it with ``LedgerStore.receive``.
    """
    seal = ledger.seal_line()
    if seal is None:
        return None
    record = ConfigRecord(
        {
            "entries": [line.rstrip("\n") for line in ledger.lines()[since_seq:]],
            "seal": seal.rstrip("\n"),
        }
    )
    if public_key is not None:
        record["public_key"] = public_key_to_string(public_key)
    return record


def read_ledger_record(record: ConfigRecord) -> tuple[list[str], str, str | None]:
    """Unpack a ``"privacy.ledger"`` record into (entry lines, seal line, public key).

    Raises
    ------
    ValueError
        If the record does not have the expected keys and types.
    """
    entries, seal, key = record.get("entries", []), record.get("seal"), record.get("public_key")
    if not _is_str_list(entries):
        raise ValueError("Ledger record 'entries' must be a list of strings.")
    if not isinstance(seal, str):
        raise ValueError(f"Ledger record 'seal' must be a string. Found {type(seal).__name__}.")
    if key is not None and not isinstance(key, str):
        raise ValueError(
            f"Ledger record 'public_key' must be a string. Found {type(key).__name__}."
        )
    return [line + "\n" for line in entries], seal + "\n", key


class OutgoingGuardMod:
    """Flower client mod applying :class:`OutgoingGuard` to every reply.

    The guard is built per message from the ArrayRecord the server sent (none for
    a message without arrays); train replies must return it. A blocked reply is
    replaced by an error reply whose reason lists only the kinds of violation.

    Parameters
    ----------
    metric_allowlist : Collection[str]
        Metric names that may be sent.
    **guard_kwargs
        Passed to :class:`OutgoingGuard` (``array_record``, ``metric_records``,
        ``allow_ledger``, ``ledger_public_key``).

    Examples
    --------
    ``ClientApp(mods=[OutgoingGuardMod({"loss", "accuracy", "num-examples"})])``
    """

    def __init__(self, metric_allowlist: Collection[str], **guard_kwargs: object) -> None:
        self.metric_allowlist = frozenset(metric_allowlist)
        self.guard_kwargs = guard_kwargs

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Run the ClientApp, then let its reply out only if the guard allows it."""
        sent = list(msg.content.array_records.values())
        if len(sent) > 1:
            return self._blocked(msg, "incoming message has several ArrayRecords")
        require = msg.metadata.message_type.split(".")[0] == "train"
        kwargs = {"require_arrays": require, **self.guard_kwargs}
        if sent:
            guard = OutgoingGuard.from_array_record(sent[0], self.metric_allowlist, **kwargs)
        else:
            guard = OutgoingGuard({}, self.metric_allowlist, **kwargs)  # type: ignore[arg-type]
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        try:
            guard.check(reply.content)
        except GuardViolation as err:
            logger.error("%s", err)
            return self._blocked(msg, "privacy guard blocked the reply: " + ", ".join(err.kinds))
        return reply

    @staticmethod
    def _blocked(msg: Message, reason: str) -> Message:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
