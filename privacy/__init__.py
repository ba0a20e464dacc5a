"""Differential-privacy core of emofed: accountants, budgets, signed ledger, audit, guard."""

from privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    PrivacyEvent,
    calibrate_noise,
    compute_epsilon,
)
from privacy.audit import AuditReport, ScopeAudit  # audit(): privacy.audit.audit
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.errors import GuardViolation, LedgerTampered, PrivacyBudgetExceeded
from privacy.guard import (
    LEDGER_RECORD,
    OutgoingGuard,
    OutgoingGuardMod,
    ledger_record,
    read_ledger_record,
)
from privacy.keys import (
    fingerprint,
    generate_private_key,
    load_or_create_private_key,
    load_private_key,
    public_key_from_string,
    public_key_to_string,
    save_private_key,
)
from privacy.ledger import Ledger
from privacy.ledger_store import LedgerStore

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "LEDGER_RECORD",
    "AuditReport",
    "BudgetedAccountant",
    "GuardViolation",
    "Ledger",
    "LedgerStore",
    "LedgerTampered",
    "OutgoingGuard",
    "OutgoingGuardMod",
    "PrivacyBudget",
    "PrivacyBudgetExceeded",
    "PrivacyEvent",
    "ScopeAudit",
    "calibrate_noise",
    "compute_epsilon",
    "fingerprint",
    "generate_private_key",
    "ledger_record",
    "load_or_create_private_key",
    "load_private_key",
    "public_key_from_string",
    "public_key_to_string",
    "read_ledger_record",
    "save_private_key",
]
