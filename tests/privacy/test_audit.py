"""Tests for privacy.audit: a run's ledger checked end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import privacy.accounting
import privacy.audit
from privacy.accounting import PrivacyEvent, compute_epsilon
from privacy.audit import audit
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.guard import ledger_record, read_ledger_record
from privacy.keys import fingerprint, public_key_to_string
from privacy.ledger import Ledger
from privacy.ledger_store import LedgerStore

DELTA = 1e-5
SERVER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([1] * 32))
DEVICE_KEYS = {d: Ed25519PrivateKey.from_private_bytes(bytes([10 + d] * 32)) for d in range(3)}
OTHER = Ed25519PrivateKey.from_private_bytes(bytes([99] * 32))


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    """Audit memoises recomputations; tests that patch accountants need a clean slate."""
    privacy.audit._epsilon.cache_clear()
    yield
    privacy.audit._epsilon.cache_clear()


def _make_run(tmp_path: Path, *, devices: int = 2, rounds: int = 3) -> LedgerStore:
    """A run directory built as client and server will: device chains shipped via the guard."""
    store = LedgerStore(tmp_path / "run" / "ledger")
    store.enroll("server", SERVER_KEY)
    server = BudgetedAccountant(PrivacyBudget(epsilon=10.0, delta=DELTA))
    accountants = {
        d: BudgetedAccountant(PrivacyBudget(epsilon=6.0, delta=DELTA)) for d in range(devices)
    }
    for server_round in range(1, rounds + 1):
        for d, accountant in accountants.items():
            scope = f"device:{d}"
            ledger = Ledger(tmp_path / f"device{d}" / "devices" / f"{d}.jsonl", scope=scope)
            event = PrivacyEvent(noise_multiplier=1.0 + d / 10, sample_rate=0.05, steps=20)
            ledger.append(
                server_round=server_round, event=event, clipping_norm=1.0, delta=DELTA,
                epsilon=accountant.spend(event), accountant=accountant.accountant,
                budget_epsilon=6.0, private_key=DEVICE_KEYS[d], extra={"num_examples": 40},
            )
            lines, seal, key = read_ledger_record(ledger_record(ledger, public_key=DEVICE_KEYS[d]))
            store.receive(scope, lines, seal, public_key=key)
        event = PrivacyEvent(
            noise_multiplier=2.0, sample_rate=1.0, steps=1, sampling="no-amplification"
        )
        store.ledger("server").append(
            server_round=server_round, event=event, clipping_norm=0.5, delta=DELTA,
            epsilon=server.spend(event), accountant=server.accountant, budget_epsilon=10.0,
            private_key=SERVER_KEY, extra={"sampled_devices": devices},
        )
    return store


def _append(
    store: LedgerStore, scope: str, key: Ed25519PrivateKey, *, steps: int = 20, **overrides: object
) -> None:
    """Append one honestly *signed* entry whose numbers may be dishonest."""
    ledger = store.ledger(scope)
    events = [*ledger.events(), PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=steps)]
    fields = {
        "server_round": 9, "event": events[-1], "clipping_norm": 1.0, "delta": DELTA,
        "epsilon": compute_epsilon(events, delta=DELTA), "accountant": "opacus_rdp",
        "budget_epsilon": 6.0, "private_key": key, **overrides,
    }
    ledger.append(**fields)


def test_honest_run_passes(tmp_path: Path) -> None:
    """An honest run is ok; every accountant recomputes ε and RDP matches the record."""
    _make_run(tmp_path)
    report = audit(tmp_path / "run")
    assert report.ok, report.format_table()
    assert [row.scope for row in report.scopes] == ["server", "device:0", "device:1"]
    for row in report.scopes:
        assert row.releases == 3 and row.status == "ok"
        assert set(row.recomputed) == set(privacy.accounting.ACCOUNTANTS)
        assert row.recomputed["opacus_rdp"] == pytest.approx(row.recorded_epsilon, rel=1e-9)
        assert row.recomputed["dpa_pld"] <= row.recorded_epsilon <= row.budget_epsilon
    table = report.format_table()
    assert "device:1" in table and table.rstrip().endswith("audit: ok")
    data = json.loads(report.to_json())
    assert data["ok"] is True and len(data["scopes"]) == 3
    assert set(data["scopes"][0]["recomputed_epsilon"]) == set(privacy.accounting.ACCOUNTANTS)


def test_signed_underreport_is_mismatch(tmp_path: Path) -> None:
    """A validly signed entry whose ε is lower than its events give is a MISMATCH."""
    store = _make_run(tmp_path)
    _append(store, "device:0", DEVICE_KEYS[0], epsilon=0.5)
    report = audit(tmp_path / "run")
    row = {r.scope: r for r in report.scopes}["device:0"]
    assert not report.ok and row.status == "MISMATCH"
    assert any("seq 3: recorded epsilon 0.5" in p for p in row.problems)


def test_broken_shared_accountant_is_caught_by_independent_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the recorder's and auditor's RDP both under-report, PRV/PLD still catch it."""
    real = privacy.accounting.ACCOUNTANTS["opacus_rdp"]
    monkeypatch.setitem(
        privacy.accounting.ACCOUNTANTS,
        "opacus_rdp",
        lambda history, delta: real(history, delta) / 2,
    )
    privacy.accounting._opacus_rdp_curve.cache_clear()
    _make_run(tmp_path, devices=1, rounds=2)
    report = audit(tmp_path / "run")
    assert not report.ok
    for row in report.scopes:
        assert row.status == "MISMATCH"
        assert any("under-reports" in p for p in row.problems)


def test_overspent_entry_is_flagged(tmp_path: Path) -> None:
    """An entry whose (correct) ε exceeds its budget is OVERSPENT."""
    store = _make_run(tmp_path)
    _append(store, "device:1", DEVICE_KEYS[1], steps=1000)  # bypasses the BudgetedAccountant
    report = audit(tmp_path / "run")
    row = {r.scope: r for r in report.scopes}["device:1"]
    assert row.status == "OVERSPENT" and row.recorded_epsilon > 6.0
    assert any("exceeds budget 6" in p for p in row.problems)
    assert "OVERSPENT" in report.format_table()


def test_budget_change_is_mismatch(tmp_path: Path) -> None:
    """A scope may not raise its own budget mid-run."""
    store = _make_run(tmp_path)
    _append(store, "server", SERVER_KEY, budget_epsilon=50.0)
    row = audit(tmp_path / "run").scopes[0]
    assert row.status == "MISMATCH"
    assert any("budget_epsilon changed from 10.0 to 50.0" in p for p in row.problems)


def test_tampered_device_copy_only_fails_that_scope(tmp_path: Path) -> None:
    """Editing one device's copy on the server marks that scope TAMPERED, the rest ok."""
    store = _make_run(tmp_path)
    path = store.ledger("device:1").path
    path.write_text(path.read_text().replace('"num_examples":40', '"num_examples":41', 1))
    statuses = {r.scope: r.status for r in audit(tmp_path / "run").scopes}
    assert statuses == {"server": "ok", "device:0": "ok", "device:1": "TAMPERED"}


def test_swapped_key_in_keys_json_is_detected(tmp_path: Path) -> None:
    """Replacing a recorded public key makes that scope's signatures fail."""
    store = _make_run(tmp_path)
    data = json.loads(store.keys_path.read_text())
    data["keys"]["device:0"] = public_key_to_string(OTHER)
    store.keys_path.write_text(json.dumps(data))
    statuses = {r.scope: r.status for r in audit(tmp_path / "run").scopes}
    assert statuses["device:0"] == "TAMPERED" and statuses["server"] == "ok"


def test_pinned_server_key_defeats_full_rewrite(tmp_path: Path) -> None:
    """A pinned fingerprint catches a directory re-signed and re-keyed by someone else."""
    _make_run(tmp_path, devices=1, rounds=1)
    assert audit(tmp_path / "run", pinned_keys={"server": fingerprint(SERVER_KEY)}).ok
    report = audit(tmp_path / "run", pinned_keys={"server": fingerprint(OTHER)})
    assert report.scopes[0].status == "TAMPERED"
    assert "pinned" in report.scopes[0].problems[0]


def test_chain_without_key_is_tampered(tmp_path: Path) -> None:
    """A chain whose scope has no recorded key cannot be trusted."""
    store = _make_run(tmp_path, devices=1, rounds=1)
    extra = LedgerStore(store.root).ledger("device:9")
    extra.append(
        server_round=1, event=PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, steps=1),
        clipping_norm=1.0, delta=DELTA, epsilon=0.1, accountant="opacus_rdp",
        budget_epsilon=1.0, private_key=OTHER,
    )
    row = {r.scope: r for r in audit(tmp_path / "run").scopes}["device:9"]
    assert row.status == "TAMPERED" and "no public key" in row.problems[0]


def test_missing_ledger_raises(tmp_path: Path) -> None:
    """Auditing a directory without a ledger is an error, not an empty pass."""
    with pytest.raises(FileNotFoundError, match="No ledger under"):
        audit(tmp_path)
