"""Tests for privacy.budget: hard-stop budgets and persistent cumulative accounting."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accounting import PrivacyEvent, compute_epsilon
from privacy.budget import BudgetedAccountant, PrivacyBudget
from privacy.errors import PrivacyBudgetExceeded

DELTA = 1e-5


def _make_event(sigma: float = 1.0, q: float = 0.05, steps: int = 50) -> PrivacyEvent:
    return PrivacyEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)


def _make_accountant(epsilon: float = 5.0, **kwargs: object) -> BudgetedAccountant:
    return BudgetedAccountant(PrivacyBudget(epsilon=epsilon, delta=DELTA), **kwargs)


def test_spend_accumulates_across_rounds() -> None:
    """Each spend returns the cumulative ε of all rounds so far, never a per-round reset."""
    accountant = _make_accountant(epsilon=10.0)
    event = _make_event()
    spent = [accountant.spend(event) for _ in range(4)]
    assert spent == sorted(spent) and spent[0] < spent[-1]
    assert spent[-1] == compute_epsilon([_make_event(steps=200)], delta=DELTA)
    assert accountant.remaining == pytest.approx(10.0 - spent[-1])


def test_refuses_overspend_and_records_nothing() -> None:
    """The release that would exceed the budget raises and leaves the state unchanged."""
    accountant = _make_accountant(epsilon=6.0)
    event = _make_event()
    while not accountant.would_exceed(event):
        accountant.spend(event)
    before = (accountant.events, accountant.epsilon)
    assert len(before[0]) >= 2 and accountant.epsilon_if(event) > 6.0
    with pytest.raises(PrivacyBudgetExceeded, match="over the budget 6 at delta 1e-05"):
        accountant.spend(event)
    assert (accountant.events, accountant.epsilon) == before
    assert accountant.epsilon <= 6.0


def test_zero_noise_release_is_refused() -> None:
    """A release without noise (ε = ∞) is never allowed."""
    accountant = _make_accountant()
    with pytest.raises(PrivacyBudgetExceeded):
        accountant.spend(_make_event(sigma=0.0))
    assert accountant.events == ()


def test_max_repeats_is_exact() -> None:
    """max_repeats(event) rounds fit in the budget and one more does not."""
    accountant = _make_accountant(epsilon=6.0)
    event = _make_event(steps=40)
    n = accountant.max_repeats(event)
    assert n >= 1
    for _ in range(n):
        accountant.spend(event)
    assert accountant.would_exceed(event)
    assert accountant.max_repeats(event) == 0


def test_state_dict_round_trip_preserves_cumulative_epsilon() -> None:
    """A device persists its accountant as JSON between rounds; ε continues from there."""
    accountant = _make_accountant(epsilon=8.0)
    accountant.spend(_make_event())
    accountant.spend(_make_event(sigma=1.2, q=0.04, steps=30))
    restored = BudgetedAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.epsilon == accountant.epsilon
    assert restored.events == accountant.events
    assert restored.spend(_make_event()) == accountant.spend(_make_event())


def test_load_state_dict_into_fresh_accountant() -> None:
    """load_state_dict restores the events into an accountant with the same budget."""
    accountant = _make_accountant()
    accountant.spend(_make_event())
    fresh = _make_accountant()
    fresh.load_state_dict(accountant.state_dict())
    assert fresh.epsilon == accountant.epsilon > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budget": {"epsilon": 99.0, "delta": DELTA}}, "does not match"),
        ({"accountant": "dpa_rdp"}, "does not match"),
        ({"epsilon": 0.01}, "Stored epsilon 0.01 does not match its events"),
        ({"version": 7}, "must have version 1"),
    ],
)
def test_load_state_dict_rejects_inconsistent_state(change: dict, message: str) -> None:
    """A state with another budget or accountant, or a doctored ε, is refused."""
    accountant = _make_accountant()
    accountant.spend(_make_event())
    state = {**accountant.state_dict(), **change}
    with pytest.raises(ValueError, match=message):
        _make_accountant().load_state_dict(state)


def test_restoring_overspent_history_raises() -> None:
    """Events that already exceed the budget cannot be restored."""
    with pytest.raises(PrivacyBudgetExceeded, match="already spend"):
        _make_accountant(epsilon=0.5, events=[_make_event(steps=500)])


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (0.0, DELTA, "Budget epsilon must be positive and finite. Found 0.0"),
        (float("inf"), DELTA, "Budget epsilon must be positive and finite"),
        (1.0, 0.0, r"Delta must be in \(0, 1\). Found 0.0"),
    ],
)
def test_budget_validation(epsilon: float, delta: float, message: str) -> None:
    """Budgets must have a positive finite ε and δ in (0, 1)."""
    with pytest.raises(ValueError, match=message):
        PrivacyBudget(epsilon=epsilon, delta=delta)


_events = st.builds(
    PrivacyEvent,
    noise_multiplier=st.floats(0.0, 5.0).map(lambda s: round(s, 2)),
    sample_rate=st.sampled_from([0.01, 0.05, 0.1, 0.3]),
    steps=st.integers(0, 200),
)


@pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    budget=st.floats(0.1, 20.0),
    delta=st.sampled_from([1e-6, 1e-5, 1e-3]),
    rounds=st.lists(_events, min_size=1, max_size=12),
)
def test_no_sequence_of_rounds_exceeds_budget(
    budget: float, delta: float, rounds: list[PrivacyEvent]
) -> None:
    """Whatever rounds are attempted, the accepted ones never compose past the budget."""
    accountant = BudgetedAccountant(PrivacyBudget(epsilon=budget, delta=delta))
    for event in rounds:
        before = accountant.events
        would = accountant.epsilon_if(event)
        try:
            spent = accountant.spend(event)
        except PrivacyBudgetExceeded:
            assert not would <= budget
            assert accountant.events == before
        else:
            assert spent == would <= budget
        recomputed = compute_epsilon(accountant.events, delta=delta)
        assert recomputed == accountant.epsilon <= budget
