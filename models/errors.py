"""Errors raised by the model package's preprocessing."""

from __future__ import annotations

__all__ = ["UnusableInput"]


class UnusableInput(ValueError):
    """One modality of one sample cannot be used (empty, corrupt, wrong shape or type).

    Device data is messy: callers catch this per modality, mask the modality out and
    count ``reason`` in their report instead of failing the whole batch.

    Parameters
    ----------
    message : str
        One-line human-readable explanation.
    reason : str, optional
        Short stable code for counting (``"empty"``, ``"non_finite"``, ...); messages may
        carry sizes and values, so they are unsuitable as counter keys.
    """

    def __init__(self, message: str, *, reason: str = "unusable") -> None:
        super().__init__(message)
        self.reason = reason
