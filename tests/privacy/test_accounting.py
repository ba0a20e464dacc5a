"""Tests for privacy.accounting: events, the four accountants, calibration."""

from __future__ import annotations

import math
from collections.abc import Callable

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from privacy.accounting import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    RDP_AGREEMENT_RTOL,
    TIGHT_AGREEMENT_ATOL,
    PrivacyEvent,
    calibrate_noise,
    compute_epsilon,
)

DELTA = 1e-5

# (sigma, q, steps, delta): the regimes emofed runs in — DP-SGD on a device (small q,
# hundreds of steps) and user-level DP on the aggregate (large q, one step a round).
TABLE = [
    (1.1, 0.01, 1000, 1e-5),
    (1.0, 0.05, 200, 1e-5),
    (0.8, 0.02, 500, 1e-6),
    (2.0, 0.1, 1000, 1e-5),
    (1.0, 0.1, 100, 1e-5),
    (4.0, 0.5, 1000, 1e-5),
    (1.5, 1.0, 10, 1e-5),
]


def _make_event(
    sigma: float, q: float, steps: int, sampling: str | None = None
) -> PrivacyEvent:
    if sampling is None:
        sampling = "no-amplification" if q == 1 else "poisson"
    return PrivacyEvent(noise_multiplier=sigma, sample_rate=q, steps=steps, sampling=sampling)


def _dpa_epsilon(
    accountant: dp_accounting.PrivacyAccountant,
    parts: list[tuple[float, float, int]],
    delta: float,
) -> float:
    """Compose (sigma, q, steps) parts in dp-accounting directly, bypassing our code."""
    events = []
    for sigma, q, steps in parts:
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        sampled = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        events.append(dp_accounting.SelfComposedDpEvent(sampled, steps))
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    return accountant.get_epsilon(delta)


def test_pinned_epsilon_rdp() -> None:
    """σ=1.1, q=0.01, 1000 steps, δ=1e-5: Opacus RDP = dp-accounting RDP = 1.7118 (±1e-4)."""
    ours = compute_epsilon([_make_event(1.1, 0.01, 1000)], delta=DELTA)
    theirs = _dpa_epsilon(RdpAccountant(), [(1.1, 0.01, 1000)], DELTA)
    assert ours == pytest.approx(1.71177, abs=1e-4)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_pinned_epsilon_tight() -> None:
    """Same setting: PLD = 1.5162 and PRV = 1.5255 (upper end of its ±0.01 window)."""
    events = [_make_event(1.1, 0.01, 1000)]
    assert compute_epsilon(events, delta=DELTA, accountant="dpa_pld") == pytest.approx(
        1.5162, abs=1e-3
    )
    assert compute_epsilon(events, delta=DELTA, accountant="opacus_prv") == pytest.approx(
        1.5255, abs=1e-3
    )


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), TABLE)
def test_opacus_rdp_matches_dp_accounting_rdp(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    """Our default (Opacus RDP) equals dp-accounting's RDP within 1 % of ε."""
    ours = compute_epsilon([_make_event(sigma, q, steps)], delta=delta)
    theirs = _dpa_epsilon(RdpAccountant(), [(sigma, q, steps)], delta)
    assert ours == pytest.approx(theirs, rel=RDP_AGREEMENT_RTOL)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), TABLE)
def test_prv_matches_dp_accounting_pld(sigma: float, q: float, steps: int, delta: float) -> None:
    """Opacus PRV lies within [0, 0.02] above dp-accounting's PLD (computed directly)."""
    prv = compute_epsilon([_make_event(sigma, q, steps)], delta=delta, accountant="opacus_prv")
    pld = _dpa_epsilon(
        PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION), [(sigma, q, steps)], delta
    )
    assert 0 <= prv - pld <= TIGHT_AGREEMENT_ATOL


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), TABLE)
def test_tight_accountants_below_rdp(sigma: float, q: float, steps: int, delta: float) -> None:
    """PLD and PRV are never looser than RDP: RDP is the conservative default."""
    events = [_make_event(sigma, q, steps)]
    rdp = compute_epsilon(events, delta=delta, accountant="opacus_rdp")
    for name in ("dpa_pld", "opacus_prv"):
        assert compute_epsilon(events, delta=delta, accountant=name) <= rdp


def test_opacus_rdp_equals_opacus_accountant_history() -> None:
    """The cached RDP path equals Opacus's RDPAccountant fed the same history."""
    history = [(1.0, 0.05, 30), (1.3, 0.02, 50), (1.0, 0.05, 20)]
    reference = RDPAccountant()
    reference.history = list(history)
    ours = compute_epsilon([_make_event(*h) for h in history], delta=DELTA)
    assert ours == pytest.approx(reference.get_epsilon(DELTA), rel=1e-12)


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_cumulative_equals_one_composition(accountant: str) -> None:
    """ε after R rounds of composition equals one composition of all R rounds' steps."""
    rounds = [_make_event(1.0, 0.05, 20) for _ in range(5)]
    cumulative = compute_epsilon(rounds, delta=DELTA, accountant=accountant)
    single = compute_epsilon([_make_event(1.0, 0.05, 100)], delta=DELTA, accountant=accountant)
    assert cumulative == single


@pytest.mark.parametrize(
    ("accountant", "reference", "rel"),
    [
        ("dpa_rdp", RdpAccountant, 1e-9),
        ("opacus_rdp", RdpAccountant, RDP_AGREEMENT_RTOL),
        ("dpa_pld", lambda: PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION), 1e-9),
    ],
)
def test_heterogeneous_rounds_match_dp_accounting(
    accountant: str, reference: Callable[[], dp_accounting.PrivacyAccountant], rel: float
) -> None:
    """Rounds with different σ, q and steps compose as dp-accounting's ComposedDpEvent."""
    parts = [(1.0, 0.05, 20), (1.2, 0.04, 25), (0.9, 0.05, 10), (1.0, 0.05, 20)]
    ours = compute_epsilon([_make_event(*p) for p in parts], delta=DELTA, accountant=accountant)
    assert ours == pytest.approx(_dpa_epsilon(reference(), parts, DELTA), rel=rel)


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_no_amplification_is_plain_gaussian(accountant: str) -> None:
    """'no-amplification' is the unsampled Gaussian mechanism composed `steps` times."""
    ours = compute_epsilon([_make_event(2.0, 1.0, 10)], delta=DELTA, accountant=accountant)
    rdp = _dpa_epsilon(RdpAccountant(), [(2.0, 1.0, 10)], DELTA)
    pld = _dpa_epsilon(
        PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION), [(2.0, 1.0, 10)], DELTA
    )
    assert pld - 1e-9 <= ours <= rdp * (1 + 1e-9) + TIGHT_AGREEMENT_ATOL


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_zero_noise_is_infinite(accountant: str) -> None:
    """A release without noise has ε = ∞ under every accountant."""
    events = [_make_event(1.0, 0.1, 10), _make_event(0.0, 0.1, 1)]
    assert math.isinf(compute_epsilon(events, delta=DELTA, accountant=accountant))


@pytest.mark.parametrize("accountant", list(ACCOUNTANTS))
def test_no_steps_is_zero(accountant: str) -> None:
    """No steps (or no events) spends nothing."""
    assert compute_epsilon([], delta=DELTA, accountant=accountant) == 0.0
    assert compute_epsilon([_make_event(0.0, 0.1, 0)], delta=DELTA, accountant=accountant) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -0.1}, "Noise multiplier must be finite and non-negative"),
        ({"noise_multiplier": math.inf}, "Noise multiplier must be finite"),
        ({"sample_rate": 0.0}, r"Sample rate must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, r"Sample rate must be in \(0, 1\]"),
        ({"steps": -1}, "Steps cannot be negative"),
        ({"steps": 1.5}, "Steps must be an integer"),
        ({"sampling": "uniform"}, "Unknown sampling 'uniform'. Known: poisson, no-amplification"),
        ({"mechanism": "laplace"}, "Unknown mechanism 'laplace'"),
        ({"sampling": "no-amplification", "sample_rate": 0.2}, "sample_rate must be 1.0"),
    ],
)
def test_event_validation(kwargs: dict, message: str) -> None:
    """Out-of-range event fields raise a one-line ValueError naming the value."""
    params = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message) as info:
        PrivacyEvent(**params)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_delta_validation(delta: float) -> None:
    """δ must lie in (0, 1)."""
    with pytest.raises(ValueError, match=rf"Delta must be in \(0, 1\). Found {delta}"):
        compute_epsilon([_make_event(1.0, 0.1, 1)], delta=delta)


def test_unknown_accountant_lists_known() -> None:
    """An unknown accountant name raises ValueError listing the registered ones."""
    with pytest.raises(ValueError, match="opacus_rdp, opacus_prv, dpa_pld, dpa_rdp"):
        compute_epsilon([_make_event(1.0, 0.1, 1)], delta=DELTA, accountant="gdp")


def test_event_round_trip() -> None:
    """to_dict / from_dict round-trips and normalises ints to floats."""
    event = PrivacyEvent(noise_multiplier=1, sample_rate=1, steps=3, sampling="no-amplification")
    again = PrivacyEvent.from_dict(event.to_dict())
    assert again == event and isinstance(again.noise_multiplier, float)


@pytest.mark.parametrize(
    ("accountant", "target", "q", "steps"),
    [
        ("opacus_rdp", 3.0, 0.05, 300),
        ("opacus_rdp", 1.0, 0.01, 1000),
        ("dpa_rdp", 3.0, 0.05, 300),
        ("dpa_pld", 3.0, 0.05, 300),
        ("opacus_rdp", 8.0, 1.0, 20),
    ],
)
def test_calibrate_noise_meets_target(
    accountant: str, target: float, q: float, steps: int
) -> None:
    """Calibrated σ gives ε ≤ target, and within 0.05 of it (no wasted budget)."""
    sampling = "no-amplification" if q == 1 else "poisson"
    sigma = calibrate_noise(
        target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
        sampling=sampling, accountant=accountant,
    )
    epsilon = compute_epsilon([_make_event(sigma, q, steps)], delta=DELTA, accountant=accountant)
    assert target - 0.05 <= epsilon <= target


@pytest.mark.slow
def test_calibrate_noise_prv() -> None:
    """PRV calibration also meets its target from below."""
    sigma = calibrate_noise(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=300, accountant="opacus_prv"
    )
    epsilon = compute_epsilon(
        [_make_event(sigma, 0.05, 300)], delta=DELTA, accountant="opacus_prv"
    )
    assert 2.95 <= epsilon <= 3.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_epsilon": 0.0}, "Target epsilon must be positive and finite"),
        ({"steps": 0}, "Steps must be a positive integer"),
        ({"delta": 1.0}, r"Delta must be in \(0, 1\)"),
        ({"accountant": "nope"}, "Unknown accountant 'nope'"),
    ],
)
def test_calibrate_noise_validation(kwargs: dict, message: str) -> None:
    """Calibration rejects out-of-range inputs before searching."""
    params = {"target_epsilon": 1.0, "delta": DELTA, "sample_rate": 0.1, "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        calibrate_noise(**params)
