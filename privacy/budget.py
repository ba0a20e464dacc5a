"""Privacy budgets as a hard stop: a scope's accountant refuses any over-budget release.

A *scope* is one party whose privacy is accounted: the federation (``"server"``,
user-level DP on the aggregate) or one device (``"device:<id>"``, sample-level
DP-SGD). Its :class:`BudgetedAccountant` keeps every event the scope ever released
and composes them all for each decision; nothing is reset between rounds, so the
reported ε is cumulative. The intended use, per round::

    event = PrivacyEvent(noise_multiplier=sigma, sample_rate=q, steps=planned_steps)
    try:
        accountant.check(event)          # would this release overspend?
    except PrivacyBudgetExceeded:
        ...                              # device declines to train; server stops
    ...                                  # train / aggregate with exactly `event`
    epsilon = accountant.spend(event)    # record it (re-checks, raises before recording)
    ledger.append(..., epsilon=epsilon)  # privacy.ledger

The state is a small JSON-serialisable dict, so a device persists it between rounds
(``state_dict`` / ``from_state_dict``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    PrivacyEvent,
    check_accountant,
    check_delta,
    check_epsilon,
    compute_epsilon,
)
from privacy.errors import PrivacyBudgetExceeded

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PrivacyBudget:
    """The (ε, δ) a scope may spend over the whole run.

    Raises
    ------
    ValueError
        If ε is not positive and finite or δ is not in (0, 1).
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        """Validate and normalise to floats."""
        check_epsilon(self.epsilon, name="Budget epsilon")
        check_delta(self.delta)
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "delta", float(self.delta))


class BudgetedAccountant:
    """Cumulative accountant of one scope that never lets ε exceed its budget.

    Parameters
    ----------
    budget : PrivacyBudget
        The scope's (ε, δ) budget.
    accountant : str
        Name in ``privacy.accounting.ACCOUNTANTS`` used for budget decisions
        (default ``"opacus_rdp"``: a fast upper bound).
    events : Iterable[PrivacyEvent]
        Releases already made (e.g. restored from disk).

    Raises
    ------
    ValueError
        If the accountant is unknown.
    PrivacyBudgetExceeded
        If the given ``events`` already exceed the budget.
    """

    def __init__(
        self,
        budget: PrivacyBudget,
        *,
        accountant: str = DEFAULT_ACCOUNTANT,
        events: Iterable[PrivacyEvent] = (),
    ) -> None:
        if not isinstance(budget, PrivacyBudget):
            raise TypeError(f"Expected a PrivacyBudget. Found {type(budget).__name__}.")
        check_accountant(accountant)
        self._budget = budget
        self._accountant = accountant
        self._events: list[PrivacyEvent] = list(events)
        self._epsilon = self._compose(self._events)
        if self._epsilon > budget.epsilon:
            raise PrivacyBudgetExceeded(
                f"Restored events already spend epsilon {self._epsilon:.6g} "
                f"> budget {budget.epsilon:.6g}."
            )

    @property
    def budget(self) -> PrivacyBudget:
        """The scope's budget."""
        return self._budget

    @property
    def accountant(self) -> str:
        """Name of the accountant used for every decision."""
        return self._accountant

    @property
    def delta(self) -> float:
        """δ at which ε is reported."""
        return self._budget.delta

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        """Every release recorded so far, in order."""
        return tuple(self._events)

    @property
    def epsilon(self) -> float:
        """Cumulative ε spent so far."""
        return self._epsilon

    @property
    def remaining(self) -> float:
        """Budget ε not yet spent (never negative)."""
        return max(0.0, self._budget.epsilon - self._epsilon)

    def _compose(self, events: list[PrivacyEvent]) -> float:
        return compute_epsilon(events, delta=self._budget.delta, accountant=self._accountant)

    def epsilon_if(self, event: PrivacyEvent) -> float:
        """Return the cumulative ε this scope would have after ``event``.

        Raises
        ------
        TypeError
            If ``event`` is not a :class:`PrivacyEvent`.
        """
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"Expected a PrivacyEvent. Found {type(event).__name__}.")
        return self._compose([*self._events, event])

    def would_exceed(self, event: PrivacyEvent) -> bool:
        """Whether releasing ``event`` would push ε past the budget."""
        return self.epsilon_if(event) > self._budget.epsilon

    def check(self, event: PrivacyEvent) -> float:
        """Return the would-be cumulative ε, raising if it exceeds the budget.

        Raises
        ------
        PrivacyBudgetExceeded
            If the release would overspend; nothing is recorded.
        """
        epsilon = self.epsilon_if(event)
        if not epsilon <= self._budget.epsilon:  # also refuses ε = inf / nan
            raise PrivacyBudgetExceeded(
                f"Release would raise epsilon from {self._epsilon:.6g} to {epsilon:.6g}, "
                f"over the budget {self._budget.epsilon:.6g} at delta {self._budget.delta:g}."
            )
        return epsilon

    def spend(self, event: PrivacyEvent) -> float:
        """Record ``event`` and return the new cumulative ε.

        Raises
        ------
        PrivacyBudgetExceeded
            If the release would overspend; the event is *not* recorded.
        """
        epsilon = self.check(event)
        self._events.append(event)
        self._epsilon = epsilon
        logger.debug(
            "Spent sigma=%.4f q=%.4g steps=%d (%s): epsilon %.4f of %.4f at delta %g",
            event.noise_multiplier,
            event.sample_rate,
            event.steps,
            event.sampling,
            epsilon,
            self._budget.epsilon,
            self._budget.delta,
        )
        return epsilon

    def max_repeats(self, event: PrivacyEvent, *, limit: int = 10_000) -> int:
        """How many more times ``event`` could be released within budget (≤ ``limit``).

        Useful to plan: a device that cannot afford one more round declines to train.
        """
        if self.would_exceed(event):
            return 0
        low, high = 1, 2
        while high <= limit and not self._exceeds_with(event, high):
            low, high = high, high * 2
        high = min(high, limit + 1)
        while high - low > 1:  # invariant: low affordable, high not (or > limit)
            mid = (low + high) // 2
            if self._exceeds_with(event, mid):
                high = mid
            else:
                low = mid
        return low

    def _exceeds_with(self, event: PrivacyEvent, repeats: int) -> bool:
        bulk = PrivacyEvent(
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            steps=event.steps * repeats,
            sampling=event.sampling,
            mechanism=event.mechanism,
        )
        return self.epsilon_if(bulk) > self._budget.epsilon

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable snapshot of the budget, accountant and events."""
        return {
            "version": STATE_VERSION,
            "budget": {"epsilon": self._budget.epsilon, "delta": self._budget.delta},
            "accountant": self._accountant,
            "events": [event.to_dict() for event in self._events],
            "epsilon": self._epsilon,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> BudgetedAccountant:
        """Rebuild an accountant from :meth:`state_dict` output.

        ε is recomputed from the events; the stored value is only cross-checked.

        Raises
        ------
        ValueError
            If the state is malformed or its stored ε disagrees with its events.
        """
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Accountant state must have version {STATE_VERSION}. "
                f"Found {state.get('version') if isinstance(state, Mapping) else state!r}."
            )
        try:
            budget = PrivacyBudget(**state["budget"])
            events = [PrivacyEvent.from_dict(item) for item in state["events"]]
            accountant = state["accountant"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"Malformed accountant state: {err}.") from None
        restored = cls(budget, accountant=accountant, events=events)
        stored = state.get("epsilon")
        if stored is not None and not math.isclose(
            stored, restored.epsilon, rel_tol=1e-9, abs_tol=1e-12
        ):
            raise ValueError(
                f"Stored epsilon {stored} does not match its events ({restored.epsilon})."
            )
        return restored

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this accountant's events with those of ``state``.

        The budget and accountant name must match this instance: a budget cannot be
        changed mid-run by restoring a different state.

        Raises
        ------
        ValueError
            If the state is malformed or its budget/accountant differ.
        """
        restored = self.from_state_dict(state)
        if restored.budget != self._budget or restored.accountant != self._accountant:
            raise ValueError(
                f"State budget {restored.budget} with {restored.accountant} does not match "
                f"{self._budget} with {self._accountant}."
            )
        self._events = list(restored.events)
        self._epsilon = restored.epsilon
