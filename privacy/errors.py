"""Domain errors of the privacy package.

Every message is a single line that names what went wrong and the value found, in
the style of dp-accounting (``f"Delta cannot be negative. Found {delta}."``).
"""

from __future__ import annotations


class PrivacyBudgetExceeded(RuntimeError):
    """A release would push a scope's cumulative epsilon past its budget.

    Raised *before* the release is made or recorded: catching it means nothing was
    spent, so a device can decline to train and a server can stop the run.
    """


class LedgerTampered(RuntimeError):
    """A ledger failed verification.

    Covers a broken hash chain, a bad signature or key, a torn or non-canonical line,
    and a missing or stale seal. The message names the file, the first bad ``seq``
    and the reason.
    """


class GuardViolation(ValueError):
    """An outgoing message carries something the guard does not allow.

    The message names exactly what was blocked (record, key, shape, dtype or metric),
    never its content; ``kinds`` lists only the categories, safe to send off-device.
    """

    def __init__(self, message: str, *, kinds: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.kinds = kinds
