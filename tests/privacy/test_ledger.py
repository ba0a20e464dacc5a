"""Tests for privacy.ledger and privacy.ledger_store: canonical form, chain, seal, atomicity."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import privacy._atomic
from privacy import ledger_format
from privacy.accounting import PrivacyEvent
from privacy.audit import audit
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.errors import LedgerTampered
from privacy.keys import fingerprint, public_key_to_string, sign
from privacy.ledger import FileLedgerIO, Ledger
from privacy.ledger_format import canonical_bytes, check_scope, content_hash
from privacy.ledger_store import LedgerStore

DELTA = 1e-5
SCOPE = "device:7"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
STAMP = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _make_store(tmp_path: Path, rounds: int = 4) -> LedgerStore:
    """A device ledger directory with `rounds` honest, budgeted releases."""
    store = LedgerStore(tmp_path / "ledger")
    store.enroll(SCOPE, KEY)
    accountant = BudgetedAccountant(PrivacyBudget(epsilon=8.0, delta=DELTA))
    ledger = store.ledger(SCOPE)
    for server_round in range(1, rounds + 1):
        event = PrivacyEvent(noise_multiplier=1.1, sample_rate=0.05, steps=20 + server_round)
        ledger.append(
            server_round=server_round, event=event, clipping_norm=1.0, delta=DELTA,
            epsilon=accountant.spend(event), accountant=accountant.accountant,
            budget_epsilon=8.0, private_key=KEY, extra={"num_examples": 64},
        )
    return store


def _lines(store: LedgerStore) -> list[str]:
    return store.ledger(SCOPE).path.read_text().splitlines(keepends=True)


def _write(store: LedgerStore, lines: list[str]) -> None:
    store.ledger(SCOPE).path.write_text("".join(lines))


def _resigned(obj: dict, key: Ed25519PrivateKey, *, keep_key_id: bool = False) -> dict:
    body = {k: v for k, v in obj.items() if k not in ("hash", "signature")}
    if not keep_key_id:
        body["key_id"] = fingerprint(key)
    digest = content_hash(body)
    return {**body, "hash": digest, "signature": sign(key, bytes.fromhex(digest))}


def _line(obj: dict) -> str:
    return canonical_bytes(obj).decode() + "\n"


def _modify(lines: list[str]) -> list[str]:
    entry = json.loads(lines[1])
    entry["epsilon"] = entry["epsilon"] / 2
    return [*lines[:1], _line(entry), *lines[2:]]


def _modify_rehash(lines: list[str]) -> list[str]:
    entry = json.loads(lines[1])
    entry["noise_multiplier"] = 5.0
    entry["hash"] = content_hash(entry)
    return [*lines[:1], _line(entry), *lines[2:]]


def _resign_chain(key: Ed25519PrivateKey, keep_key_id: bool) -> Callable[[list[str]], list[str]]:
    def tamper(lines: list[str]) -> list[str]:
        out, prev = [], "0" * 64
        *entries, seal = [json.loads(line) for line in lines]
        for entry in entries:
            entry["epsilon"] = entry["epsilon"] / 2  # the point of re-signing: under-report
            entry["prev_hash"] = prev
            entry = _resigned(entry, key, keep_key_id=keep_key_id)
            prev = entry["hash"]
            out.append(_line(entry))
        seal["entry_hash"] = prev
        return [*out, _line(_resigned(seal, key, keep_key_id=keep_key_id))]

    return tamper


def _forge_insert(lines: list[str]) -> list[str]:
    forged = _resigned({**json.loads(lines[1]), "round": 2}, OTHER)
    return [*lines[:2], _line(forged), *lines[2:]]


TAMPERINGS: dict[str, Callable[[list[str]], list[str]]] = {
    "modify": _modify,
    "modify_and_rehash": _modify_rehash,
    "delete_first": lambda lines: lines[1:],
    "delete_middle": lambda lines: [*lines[:1], *lines[2:]],
    "delete_last_entry": lambda lines: [*lines[:-2], lines[-1]],
    "delete_last_entry_and_seal": lambda lines: lines[:-2],
    "delete_seal": lambda lines: lines[:-1],
    "insert_duplicate": lambda lines: [*lines[:2], lines[1], *lines[2:]],
    "insert_forged": _forge_insert,
    "reorder": lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    "resign_with_other_key": _resign_chain(OTHER, keep_key_id=False),
    "resign_keeping_key_id": _resign_chain(OTHER, keep_key_id=True),
    "torn_last_line": lambda lines: [*lines[:-1], lines[-1][:-20]],
    "non_canonical_whitespace": lambda lines: [lines[0].replace(",", ", ", 1), *lines[1:]],
}


def test_honest_chain_verifies(tmp_path: Path) -> None:
    """An honest chain verifies, seals its last entry and links every prev_hash."""
    store = _make_store(tmp_path)
    ledger = store.ledger(SCOPE)
    ledger.verify(public_key_to_string(KEY))
    ledger.verify(store.public_keys())  # the run's scope → key mapping works too
    with pytest.raises(LedgerTampered, match="no public key recorded for 'device:7'"):
        ledger.verify({"server": KEY})
    entries = ledger.entries()
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert json.loads(ledger.seal_line())["entry_hash"] == entries[-1]["hash"]
    assert [e["epsilon"] for e in entries] == sorted(e["epsilon"] for e in entries)
    assert audit(tmp_path).ok


def test_pinned_entry_hash(tmp_path: Path) -> None:
    """The canonical form is stable: a fixed entry has a fixed hash and signature."""
    ledger = Ledger(tmp_path / "server.jsonl", scope="server")
    entry = ledger.append(
        server_round=1,
        event=PrivacyEvent(
            noise_multiplier=1.0, sample_rate=1.0, steps=1, sampling="no-amplification"
        ),
        clipping_norm=0.5, delta=1e-5, epsilon=4.7285, accountant="opacus_rdp",
        budget_epsilon=10.0, private_key=KEY, timestamp=STAMP,
    )
    expected_body = (
        '{"accountant":"opacus_rdp","budget_epsilon":10.0,"clipping_norm":0.5,"delta":1e-05,'
        '"epsilon":4.7285,"extra":{},"format":"emofed-ledger-entry/1","key_id":"'
        + fingerprint(KEY)
        + '","mechanism":"subsampled_gaussian","noise_multiplier":1.0,'
        '"prev_hash":"' + "0" * 64 + '","round":1,"sample_rate":1.0,'
        '"sampling":"no-amplification","scope":"server","seq":0,"steps":1,'
        '"timestamp":"2026-01-02T03:04:05.000000+00:00"}'
    )
    assert canonical_bytes({k: v for k, v in entry.items() if k not in ("hash", "signature")}) == (
        expected_body.encode()
    )
    assert hashlib.sha256(expected_body.encode()).hexdigest() == entry["hash"] == PINNED_HASH
    KEY.public_key().verify(base64.b64decode(entry["signature"]), bytes.fromhex(PINNED_HASH))


PINNED_HASH = "a58aab40921a633774fb27afdef2a154590fb14b298df9d2cdf6bc0bb7fa77dd"


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_detected(tmp_path: Path, name: str) -> None:
    """Every modification, deletion, insertion, reordering or re-signing fails verify and audit."""
    store = _make_store(tmp_path)
    _write(store, TAMPERINGS[name](_lines(store)))
    with pytest.raises(LedgerTampered) as info:
        store.ledger(SCOPE).verify(public_key_to_string(KEY))
    assert "\n" not in str(info.value) and "7.jsonl" in str(info.value)
    report = audit(tmp_path)
    assert not report.ok
    assert report.scopes[0].status == "TAMPERED"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("modify", "seq 1: hash does not match"),
        ("delete_middle", "seq 1: recorded seq is 2"),
        ("delete_last_entry", "seal: seals seq 3"),
        ("resign_with_other_key", "seq 0: signed by key"),
        ("resign_keeping_key_id", "seq 0: invalid signature"),
        ("torn_last_line", "torn last line"),
    ],
)
def test_tamper_message_names_first_bad_seq(tmp_path: Path, name: str, reason: str) -> None:
    """The error names the first bad seq (or the seal) and why."""
    store = _make_store(tmp_path)
    _write(store, TAMPERINGS[name](_lines(store)))
    with pytest.raises(LedgerTampered, match=reason):
        store.ledger(SCOPE).verify(KEY.public_key())


def test_append_refuses_to_extend_tampered_chain(tmp_path: Path) -> None:
    """A writer verifies its chain first and never extends a tampered one."""
    store = _make_store(tmp_path)
    _write(store, _modify(_lines(store)))
    with pytest.raises(LedgerTampered):
        _make_store_append(store)


def _make_store_append(store: LedgerStore) -> None:
    store.ledger(SCOPE).append(
        server_round=9, event=PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1),
        clipping_norm=1.0, delta=DELTA, epsilon=1.0, accountant="opacus_rdp",
        budget_epsilon=8.0, private_key=KEY,
    )


def test_crash_mid_write_leaves_old_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the process dies before the rename, the old ledger is intact and no temp file stays."""
    store = _make_store(tmp_path)
    before = store.ledger(SCOPE).path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(privacy._atomic.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _make_store_append(store)
    monkeypatch.undo()
    assert store.ledger(SCOPE).path.read_bytes() == before
    store.ledger(SCOPE).verify(KEY)
    assert not [p.name for p in store.ledger(SCOPE).path.parent.iterdir() if p.suffix == ".tmp"]


def test_round_cannot_go_back(tmp_path: Path) -> None:
    """Rounds are non-decreasing along a chain."""
    store = _make_store(tmp_path, rounds=2)
    with pytest.raises(ValueError, match="Round must not go back"):
        store.ledger(SCOPE).append(
            server_round=1, event=PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1),
            clipping_norm=1.0, delta=DELTA, epsilon=9.0, accountant="opacus_rdp",
            budget_epsilon=8.0, private_key=KEY,
        )


def _docstring_auditor() -> Callable[[list[str], str], None]:
    """Execute the 20-line auditor printed in privacy.ledger_format's docstring."""
    doc = ledger_format.__doc__
    start = doc.index("    import base64, hashlib, json")
    namespace: dict = {}
    exec(textwrap.dedent(doc[start:]), namespace)  # noqa: S102 - our own docstring
    return namespace["check_chain"]


def test_docstring_auditor_agrees(tmp_path: Path) -> None:
    """The documented stand-alone auditor accepts an honest chain and rejects a tampered one."""
    check_chain = _docstring_auditor()
    store = _make_store(tmp_path)
    check_chain(_lines(store), public_key_to_string(KEY))
    with pytest.raises(Exception):  # noqa: B017 - AssertionError or InvalidSignature
        check_chain(_modify_rehash(_lines(store)), public_key_to_string(KEY))


def test_receive_copies_device_entries_verbatim(tmp_path: Path) -> None:
    """The server stores a device's lines byte for byte; resending is idempotent."""
    device = _make_store(tmp_path / "device", rounds=3)
    lines, seal = device.ledger(SCOPE).lines(), device.ledger(SCOPE).seal_line()
    server = LedgerStore(tmp_path / "run" / "ledger")
    key = public_key_to_string(KEY)
    assert server.receive(SCOPE, lines[:2], _seal_for(lines[:2]), public_key=key) == 2
    assert server.receive(SCOPE, lines, seal) == 1
    assert server.receive(SCOPE, lines, seal) == 0
    copy = server.ledger(SCOPE).path.read_bytes()
    assert copy == device.ledger(SCOPE).path.read_bytes()
    assert audit(tmp_path / "run").ok


def _seal_for(lines: list[str]) -> str:
    last = json.loads(lines[-1])
    body = {
        "format": "emofed-ledger-seal/1", "scope": SCOPE, "seq": last["seq"],
        "entry_hash": last["hash"], "key_id": last["key_id"], "timestamp": STAMP.isoformat(),
    }
    return _line(_resigned(body, KEY))


@pytest.mark.parametrize(
    ("held", "make", "message"),
    [
        (2, lambda lines: [lines[0], _modify_rehash(lines)[1]], "seq 1: incoming entry differs"),
        (1, lambda lines: [lines[0], _modify_rehash(lines)[1]], "seq 1: invalid signature"),
        (1, lambda lines: [lines[2]], "incoming seq 2 leaves a gap after seq 0"),
    ],
)
def test_receive_rejects_forks_and_gaps(
    tmp_path: Path, held: int, make: Callable[[list[str]], list[str]], message: str
) -> None:
    """Incoming entries must continue the held chain exactly; nothing is stored otherwise."""
    device = _make_store(tmp_path / "device", rounds=3)
    lines = device.ledger(SCOPE).lines()
    server = LedgerStore(tmp_path / "run" / "ledger")
    server.receive(SCOPE, lines[:held], _seal_for(lines[:held]), public_key=KEY)
    with pytest.raises(LedgerTampered, match=message):
        server.receive(SCOPE, make(lines), device.ledger(SCOPE).seal_line())
    assert server.ledger(SCOPE).lines() == lines[:held]


def test_enrolment_refuses_a_second_key(tmp_path: Path) -> None:
    """A scope's key is recorded once; another key for it is refused."""
    store = LedgerStore(tmp_path)
    assert store.enroll(SCOPE, KEY) is True
    assert store.enroll(SCOPE, KEY.public_key()) is False
    with pytest.raises(LedgerTampered, match="refusing key"):
        store.enroll(SCOPE, OTHER)
    assert store.public_keys() == {SCOPE: public_key_to_string(KEY)}


@pytest.mark.parametrize(
    "scope", ["device:../etc", "device:", "client:1", "device:a/b", "server "]
)
def test_malformed_scopes_are_refused(scope: str) -> None:
    """Scopes double as file names, so anything but [A-Za-z0-9_.-] ids is refused."""
    with pytest.raises(ValueError, match="Scope must be"):
        check_scope(scope)


class _MemoryIO:
    """A LedgerIO kept in memory that records whether each write ran under its lock."""

    name = "chain-7"

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.held = False
        self.writes_under_lock: list[bool] = []

    def read(self) -> bytes | None:
        return self.data

    def write(self, data: bytes) -> None:
        self.writes_under_lock.append(self.held)
        self.data = data

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.held = True
        try:
            yield
        finally:
            self.held = False


def test_a_chain_in_another_backend_is_the_same_chain(tmp_path: Path) -> None:
    """Through a LedgerIO the entry lines are those a file gets; writes run locked; tamper is caught."""
    io = _MemoryIO()
    memory, file = Ledger(io, scope=SCOPE), Ledger(tmp_path / "7.jsonl", scope=SCOPE)
    assert memory.path is None and memory.name == "chain-7" and isinstance(file.io, FileLedgerIO)
    for ledger in (memory, file):
        for server_round in (1, 2):
            ledger.append(
                server_round=server_round, event=PrivacyEvent(noise_multiplier=1.1, sample_rate=0.05, steps=20),
                clipping_norm=1.0, delta=DELTA, epsilon=0.5 * server_round, accountant="opacus_rdp",
                budget_epsilon=8.0, private_key=KEY, timestamp=STAMP,
            )
    assert memory.lines() == file.lines() and len(memory) == 2
    assert io.writes_under_lock == [True, True]
    memory.verify(KEY)
    store = LedgerStore(tmp_path / "server")
    assert store.receive(SCOPE, memory.lines(), memory.seal_line(), public_key=KEY) == 2
    io.data = io.data.replace(b'"steps":20', b'"steps":2', 1)
    with pytest.raises(LedgerTampered, match=r"^chain-7: seq 0: hash does not match"):
        memory.verify(KEY)
    with pytest.raises(TypeError, match="path or a LedgerIO"):
        Ledger(42, scope=SCOPE)  # type: ignore[arg-type]
