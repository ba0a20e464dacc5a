r"""The ledger's entry format: fields, canonical form, hashing and schema checks.

One file is one *chain*: every release of one scope (``"server"`` or
``"device:<id>"``), signed by that scope's key. Each line is one JSON object.

Entry (all fields required)::

    format           "emofed-ledger-entry/1"
    seq              0, 1, 2, ... (position in the chain)
    round            server round of the release (int ≥ 0, non-decreasing)
    scope            "server" | "device:<id>", id matching [A-Za-z0-9_][A-Za-z0-9_.-]*
    mechanism        "subsampled_gaussian"
    noise_multiplier σ (float)         sample_rate  q (float)
    sampling         "poisson" | "no-amplification"
    steps            compositions in this release (int)
    clipping_norm    C (float)          delta        δ (float)
    epsilon          cumulative ε of the scope *after* this release (float)
    accountant       accountant that computed epsilon (privacy.accounting.ACCOUNTANTS)
    budget_epsilon   the scope's ε budget (float)
    timestamp        UTC ISO 8601, e.g. "2026-01-02T03:04:05.678901+00:00"
    prev_hash        "hash" of seq - 1; 64 zeros for seq 0
    key_id           hex SHA-256 of the signer's 32 raw Ed25519 public-key bytes
    extra            object of additional facts (may be empty)
    hash             hex SHA-256 of the canonical form (below)
    signature        base64 Ed25519 signature of the 32 raw bytes of "hash"

Canonical form: the entry without ``hash`` and ``signature``, serialised as
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)`` and encoded as UTF-8. Float fields are always JSON floats (``1.0``,
never ``1``), written in Python's shortest round-trip repr. Every line in the file
is itself the canonical form of the *whole* object (``hash`` and ``signature``
included) followed by ``"\n"``, and verification rejects any line that is not, so
there is exactly one byte string per entry (no whitespace or duplicate-key games).

Seal: the last line of a non-empty chain is a signed seal naming the last entry::

    {"entry_hash": ..., "format": "emofed-ledger-seal/1", "hash": ..., "key_id": ...,
     "scope": ..., "seq": <last seq>, "signature": ..., "timestamp": ...}

hashed and signed like an entry. The hash chain detects modified, inserted,
deleted or reordered entries; the seal also detects deletion of the *last* entry
(an attacker cannot sign a new seal). What a chain cannot detect on its own is a
rollback to an older, complete copy (entries and seal); pin it with an external
copy (devices keep their own ledger, the server keeps copies of theirs).

An auditor's check of one chain, without this package::

    import base64, hashlib, json
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def canon(obj):
        return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode()

    def check_chain(lines, public_key_b64):
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        key_id = hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()
        objs = [json.loads(line) for line in lines]
        *entries, seal = objs
        prev = "0" * 64
        for seq, obj in enumerate(objs):
            assert canon(obj) + b"\n" == lines[seq].encode()
            body = {k: v for k, v in obj.items() if k not in ("hash", "signature")}
            digest = hashlib.sha256(canon(body)).hexdigest()
            assert obj["hash"] == digest and obj["key_id"] == key_id
            key.verify(base64.b64decode(obj["signature"]), bytes.fromhex(digest))
            if obj is not seal:
                assert obj["seq"] == seq and obj["prev_hash"] == prev
                prev = digest
        assert seal["seq"] == len(entries) - 1 and seal["entry_hash"] == prev
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from privacy.accounting import ACCOUNTANTS, PrivacyEvent, check_delta

ENTRY_FORMAT = "emofed-ledger-entry/1"
SEAL_FORMAT = "emofed-ledger-seal/1"
GENESIS_HASH = "0" * 64
SCOPE_PATTERN = re.compile(r"server|device:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

_FLOAT_FIELDS = (
    "noise_multiplier", "sample_rate", "clipping_norm", "delta", "epsilon", "budget_epsilon"
)
_INT_FIELDS = ("seq", "round", "steps")
_STR_FIELDS = (
    "format", "scope", "mechanism", "sampling", "accountant",
    "timestamp", "prev_hash", "key_id", "hash", "signature",
)
ENTRY_FIELDS = frozenset((*_FLOAT_FIELDS, *_INT_FIELDS, *_STR_FIELDS, "extra"))
SEAL_FIELDS = frozenset(
    ("format", "scope", "seq", "entry_hash", "key_id", "timestamp", "hash", "signature")
)


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """Serialise ``obj`` in the ledger's canonical JSON form (UTF-8 bytes)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("utf-8")


def content_hash(obj: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of ``obj``'s canonical form without hash and signature."""
    body = {k: v for k, v in obj.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def check_scope(scope: str) -> None:
    """Reject a scope that is not ``"server"`` or ``"device:<id>"``.

    Raises
    ------
    ValueError
        If the scope is malformed (this also keeps device ids safe as file names).
    """
    if not isinstance(scope, str) or not SCOPE_PATTERN.fullmatch(scope):
        raise ValueError(
            f"Scope must be 'server' or 'device:<id>' with id [A-Za-z0-9_.-]. Found {scope!r}."
        )


def parse_line(line: str) -> dict[str, Any]:
    """Parse one ledger line, requiring it to be exactly its own canonical form.

    Raises
    ------
    ValueError
        If the line is not a JSON object in canonical form.
    """
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError("line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    try:
        canonical = canonical_bytes(obj).decode("ascii")
    except ValueError:
        raise ValueError("line holds a non-finite number") from None
    if canonical != line:
        raise ValueError("line is not in canonical form")
    return obj


def _check_common(obj: Mapping[str, Any], fields: frozenset[str]) -> None:
    missing = sorted(fields - obj.keys())
    unknown = sorted(obj.keys() - fields)
    if missing or unknown:
        raise ValueError(f"fields missing {missing} or unknown {unknown}")
    check_scope(obj["scope"])
    for name in ("key_id", "hash"):
        if not isinstance(obj[name], str) or not _HEX64.fullmatch(obj[name]):
            raise ValueError(f"{name} is not 64 lowercase hex digits")
    try:
        signature = base64.b64decode(obj["signature"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("signature is not base64") from None
    if len(signature) != 64:
        raise ValueError("signature is not 64 bytes")
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool) or obj["seq"] < 0:
        raise ValueError("seq is not a non-negative integer")
    try:
        stamp = datetime.fromisoformat(obj["timestamp"])
    except (TypeError, ValueError):
        raise ValueError("timestamp is not ISO 8601") from None
    offset = stamp.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError("timestamp is not in UTC")


def validate_entry(entry: Mapping[str, Any]) -> None:
    """Check an entry's fields and types (not its hash, chain or signature).

    Raises
    ------
    ValueError
        Naming the first bad field.
    """
    _check_common(entry, ENTRY_FIELDS)
    if entry["format"] != ENTRY_FORMAT:
        raise ValueError(f"format is not {ENTRY_FORMAT!r}")
    for name in _FLOAT_FIELDS:
        value = entry[name]
        if not isinstance(value, float) or not math.isfinite(value):
            raise ValueError(f"{name} is not a finite float")
    for name in _INT_FIELDS:
        if not isinstance(entry[name], int) or isinstance(entry[name], bool) or entry[name] < 0:
            raise ValueError(f"{name} is not a non-negative integer")
    for name in _STR_FIELDS:
        if not isinstance(entry[name], str):
            raise ValueError(f"{name} is not a string")
    event_of(entry)
    if entry["clipping_norm"] <= 0:
        raise ValueError("clipping_norm is not positive")
    check_delta(entry["delta"])
    if entry["epsilon"] < 0 or entry["budget_epsilon"] <= 0:
        raise ValueError("epsilon is negative or budget_epsilon not positive")
    if entry["accountant"] not in ACCOUNTANTS:
        raise ValueError(f"accountant {entry['accountant']!r} is not registered")
    if not _HEX64.fullmatch(entry["prev_hash"]):
        raise ValueError("prev_hash is not 64 lowercase hex digits")
    if not isinstance(entry["extra"], dict):
        raise ValueError("extra is not an object")


def validate_seal(seal: Mapping[str, Any]) -> None:
    """Check a seal's fields and types (not its hash or signature).

    Raises
    ------
    ValueError
        Naming the first bad field.
    """
    _check_common(seal, SEAL_FIELDS)
    if seal["format"] != SEAL_FORMAT:
        raise ValueError(f"format is not {SEAL_FORMAT!r}")
    if not isinstance(seal["entry_hash"], str) or not _HEX64.fullmatch(seal["entry_hash"]):
        raise ValueError("entry_hash is not 64 lowercase hex digits")


def event_of(entry: Mapping[str, Any]) -> PrivacyEvent:
    """Return the :class:`PrivacyEvent` recorded in a ledger entry.

    Raises
    ------
    ValueError
        If the recorded event is invalid.
    """
    return PrivacyEvent.from_dict(entry)
