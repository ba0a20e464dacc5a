"""Independent audit of a run's ledger: integrity, recomputed ε, budgets.

``audit(path)`` takes a run directory (``<run>/ledger/``) or a ledger directory
(see ``privacy.ledger_store``) and, for every chain:

1. **Integrity** — verifies canonical form, hash chain, seal, key id and every
   Ed25519 signature against the public key recorded for the scope in
   ``keys.json`` (and against ``pinned_keys`` if given). Failure: ``TAMPERED``.
2. **Same-accountant recomputation** — for *every* entry, recomputes the scope's
   cumulative ε over entries ``0..seq`` with the accountant the entry names, and
   requires ``|recomputed − recorded| ≤ SAME_RTOL · recomputed + SAME_ATOL``.
   The recorder ran the same deterministic code, so only library-version noise is
   tolerated. Failure: ``MISMATCH``. The scope's δ, budget and accountant must not
   change along the chain (``MISMATCH``).
3. **Independent cross-check** — recomputes the final cumulative ε with all four
   accountants (Opacus RDP and PRV, dp-accounting PLD and RDP). All are upper
   bounds on the true ε; PLD/PRV are the tightest and agree within
   ``TIGHT_AGREEMENT_ATOL`` (see ``privacy.accounting``). The sound check is that
   the recorded ε never *under*-reports: it must be at least
   ``min(PRV, PLD) − TIGHT_AGREEMENT_ATOL − UNDER_REPORT_RTOL · min(PRV, PLD)``
   (the accountants' own numerical error). Over-reporting (e.g. RDP recorded, 5–15 %
   above PLD) is conservative and passes. Failure: ``MISMATCH``. PRV and PLD are
   skipped above ``TIGHT_MAX_EPSILON`` (meaningless privacy, slow FFTs), with a note.
4. **Budget** — every entry's recorded ε and same-accountant recomputed ε must be
   within the entry's ``budget_epsilon``. Failure: ``OVERSPENT``.

Timing (2 CPU cores): about 0.1–0.5 s per scope, dominated by PRV; recomputations
are memoised across scopes with identical histories.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.accounting import (
    ACCOUNTANTS,
    TIGHT_AGREEMENT_ATOL,
    PrivacyEvent,
    compute_epsilon,
)
from privacy.errors import LedgerTampered
from privacy.keys import fingerprint
from privacy.ledger_format import event_of
from privacy.ledger_store import DEVICES_DIR, KEYS_FILE, SERVER_FILE, LedgerStore

logger = logging.getLogger(__name__)

SAME_RTOL = 1e-3
SAME_ATOL = 1e-6
UNDER_REPORT_RTOL = 5e-3
TIGHT_ACCOUNTANTS = ("opacus_prv", "dpa_pld")
TIGHT_MAX_EPSILON = 100.0
STATUSES = ("ok", "MISMATCH", "OVERSPENT", "TAMPERED")  # increasing severity


@dataclass(frozen=True)
class ScopeAudit:
    """Audit result of one scope's chain."""

    scope: str
    status: str
    releases: int = 0
    budget_epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    recorded_epsilon: float | None = None
    recomputed: Mapping[str, float | None] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (non-finite numbers become None)."""
        return {
            "scope": self.scope,
            "status": self.status,
            "releases": self.releases,
            "budget_epsilon": _finite(self.budget_epsilon),
            "delta": self.delta,
            "accountant": self.accountant,
            "recorded_epsilon": _finite(self.recorded_epsilon),
            "recomputed_epsilon": {k: _finite(v) for k, v in self.recomputed.items()},
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class AuditReport:
    """Audit result of a whole ledger directory."""

    path: str
    scopes: tuple[ScopeAudit, ...]
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no scope is tampered, mismatched or overspent."""
        return not self.problems and all(row.status == "ok" for row in self.scopes)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-serialisable dict."""
        return {
            "path": self.path,
            "ok": self.ok,
            "tolerances": {
                "same_accountant_rtol": SAME_RTOL,
                "same_accountant_atol": SAME_ATOL,
                "under_report_atol": TIGHT_AGREEMENT_ATOL,
                "under_report_rtol": UNDER_REPORT_RTOL,
            },
            "problems": list(self.problems),
            "scopes": [row.to_dict() for row in self.scopes],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """Return the report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def format_table(self) -> str:
        """Return a plain-text per-scope table followed by every problem."""
        names = list(ACCOUNTANTS)
        header = ["scope", "budget ε", "δ", "releases", "recorded ε", *names, "status"]
        rows = [header]
        for row in self.scopes:
            rows.append(
                [
                    row.scope,
                    _fmt(row.budget_epsilon),
                    "-" if row.delta is None else f"{row.delta:g}",
                    str(row.releases),
                    _fmt(row.recorded_epsilon),
                    *(_fmt(row.recomputed.get(name)) for name in names),
                    row.status,
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for problem in self.problems:
            lines.append(f"! {problem}")
        for row in self.scopes:
            lines.extend(f"! {row.scope}: {problem}" for problem in row.problems)
            lines.extend(f"  {row.scope}: note: {note}" for note in row.notes)
        lines.append("audit: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.4f}"


def _worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=STATUSES.index, default="ok")


@functools.lru_cache(maxsize=4096)
def _epsilon(events: tuple[PrivacyEvent, ...], delta: float, accountant: str) -> float:
    return compute_epsilon(events, delta=delta, accountant=accountant)


def _ledger_root(path: Path) -> Path:
    for root in (path / "ledger", path):
        if (root / KEYS_FILE).exists() or (root / SERVER_FILE).exists() or (
            root / DEVICES_DIR
        ).is_dir():
            return root
    raise FileNotFoundError(f"No ledger under {path}: expected ledger/{KEYS_FILE} or {KEYS_FILE}.")


def audit(
    path: Path | str,
    *,
    pinned_keys: Mapping[str, str] | None = None,
    accountants: Sequence[str] = tuple(ACCOUNTANTS),
) -> AuditReport:
    """Audit every chain under a run or ledger directory.

    Parameters
    ----------
    path : Path or str
        A run directory containing ``ledger/``, or a ledger directory.
    pinned_keys : Mapping[str, str] or None
        Scope → expected key fingerprint (hex) or base64 key, obtained out of band;
        a recorded key that differs makes the scope ``TAMPERED``.
    accountants : Sequence[str]
        Accountants for the cross-check (default: all four).

    Returns
    -------
    AuditReport
        Per-scope rows; ``report.ok`` is False on any tampering, mismatch or overspend.

    Raises
    ------
    FileNotFoundError
        If ``path`` holds no ledger.
    ValueError
        If an accountant name is unknown.
    """
    for name in accountants:
        if name not in ACCOUNTANTS:
            raise ValueError(f"Unknown accountant {name!r}. Known: {', '.join(ACCOUNTANTS)}.")
    root = _ledger_root(Path(path))
    store = LedgerStore(root)
    problems: list[str] = []
    try:
        keys = store.public_keys()
    except LedgerTampered as err:
        problems.append(str(err))
        keys = {}
    if not keys:
        problems.append(f"No public keys recorded in {root / KEYS_FILE}.")
    for scope in pinned_keys or {}:
        if scope not in keys:
            problems.append(f"Pinned scope {scope!r} has no recorded key.")
    rows = []
    for scope in store.scopes():
        rows.append(_audit_scope(store, scope, keys, pinned_keys or {}, accountants))
        logger.info("Audited %s: %s", scope, rows[-1].status)
    return AuditReport(path=str(root), scopes=tuple(rows), problems=tuple(problems))


def _audit_scope(
    store: LedgerStore,
    scope: str,
    keys: Mapping[str, str],
    pinned: Mapping[str, str],
    accountants: Sequence[str],
) -> ScopeAudit:
    if scope not in keys:
        return ScopeAudit(scope, "TAMPERED", problems=("no public key recorded for this scope",))
    if scope in pinned:
        expected = pinned[scope]
        expected_id = expected if len(expected) == 64 else fingerprint(expected)
        if fingerprint(keys[scope]) != expected_id.lower():
            return ScopeAudit(
                scope, "TAMPERED", problems=("recorded key differs from pinned key",)
            )
    ledger = store.ledger(scope)
    try:
        ledger.verify(keys[scope])
        entries = ledger.entries()
    except LedgerTampered as err:
        return ScopeAudit(scope, "TAMPERED", problems=(str(err),))
    if not entries:
        return ScopeAudit(scope, "ok", notes=("empty chain",))
    return _check_numbers(scope, entries, accountants)


def _check_numbers(
    scope: str, entries: list[dict[str, Any]], accountants: Sequence[str]
) -> ScopeAudit:
    problems: list[tuple[str, str]] = []  # (status, message)
    notes: list[str] = []
    first = entries[0]
    for name in ("delta", "budget_epsilon", "accountant"):
        for entry in entries[1:]:
            if entry[name] != first[name]:
                problems.append(
                    ("MISMATCH", f"seq {entry['seq']}: {name} changed from {first[name]} "
                     f"to {entry[name]}")
                )
                break
    events: list[PrivacyEvent] = []
    for entry in entries:
        events.append(event_of(entry))
        seq, recorded, budget = entry["seq"], entry["epsilon"], entry["budget_epsilon"]
        same = _epsilon(tuple(events), entry["delta"], entry["accountant"])
        if not abs(same - recorded) <= SAME_RTOL * same + SAME_ATOL:
            problems.append(
                ("MISMATCH", f"seq {seq}: recorded epsilon {recorded:.6g} but "
                 f"{entry['accountant']} gives {same:.6g}")
            )
        if recorded > budget or not same <= budget * (1 + SAME_RTOL) + SAME_ATOL:
            problems.append(
                ("OVERSPENT", f"seq {seq}: epsilon {max(recorded, same):.6g} exceeds "
                 f"budget {budget:.6g}")
            )
    last = entries[-1]
    delta, recorded = last["delta"], last["epsilon"]
    recomputed: dict[str, float | None] = {}
    for name in ACCOUNTANTS:
        if name not in accountants:
            continue
        if name in TIGHT_ACCOUNTANTS and name != last["accountant"]:
            rdp = _epsilon(tuple(events), delta, "opacus_rdp")
            if rdp > TIGHT_MAX_EPSILON:
                recomputed[name] = None
                notes.append(f"{name} skipped: epsilon above {TIGHT_MAX_EPSILON:g}")
                continue
        try:
            recomputed[name] = _epsilon(tuple(events), delta, name)
        except Exception as err:  # an accountant's numerical failure is not the ledger's
            recomputed[name] = None
            notes.append(f"{name} failed: {type(err).__name__}: {err}".splitlines()[0])
    tight = [v for k, v in recomputed.items() if k in TIGHT_ACCOUNTANTS and v is not None]
    if tight and math.isfinite(min(tight)):
        floor = min(tight) - TIGHT_AGREEMENT_ATOL - UNDER_REPORT_RTOL * min(tight)
        if recorded < floor:
            problems.append(
                ("MISMATCH", f"recorded epsilon {recorded:.6g} under-reports: the tightest "
                 f"accountant gives {min(tight):.6g}")
            )
    return ScopeAudit(
        scope=scope,
        status=_worst([status for status, _ in problems]),
        releases=len(entries),
        budget_epsilon=last["budget_epsilon"],
        delta=delta,
        accountant=last["accountant"],
        recorded_epsilon=recorded,
        recomputed=recomputed,
        problems=tuple(message for _, message in problems),
        notes=tuple(notes),
    )
