"""Privacy events, the four registered accountants, and noise calibration.

A :class:`PrivacyEvent` describes one private release as a *self-composed sampled
Gaussian mechanism*: ``steps`` applications of the Gaussian mechanism with noise
multiplier ``noise_multiplier`` (noise stddev / clipping norm), each on a sample
drawn with rate ``sample_rate``. It covers both levels of DP in emofed:

* sample-level DP-SGD on a device (Abadi et al. 2016, "Deep Learning with
  Differential Privacy", Alg. 1): ``steps`` optimiser steps with Poisson sampling at
  ``sample_rate = batch_size / n_samples``;
* user-level DP on the aggregate (McMahan et al. 2018, "Learning Differentially
  Private Recurrent Language Models", arXiv:1710.06963, Alg. 1 and §3): one step per
  round, update clipped to ``C`` and noise stddev ``noise_multiplier * C / m`` on
  the mean of ``m`` sampled devices. With adaptive clipping (Andrew et al. 2021,
  arXiv:1905.03871, Thm. 1) record the *effective* noise multiplier, the value
  Flower's adaptive-clipping strategy is configured with.

Sampling methods: ``"poisson"`` (amplification by Poisson subsampling) and
``"no-amplification"`` (no subsampling credit; accounted as ``sample_rate = 1``,
which the event enforces so that no reader can apply amplification by mistake).
Use ``"no-amplification"`` for a server that samples a *fixed number* of devices,
as Flower's strategies do: that is not Poisson sampling.

Accountants (``ACCOUNTANTS``, built by name):

``opacus_rdp``
    Opacus RDP (Mironov 2017; Mironov, Talwar & Zhang 2019, "Rényi DP of the
    Sampled Gaussian Mechanism") with the RDP-to-DP conversion of Balle et al.
    2020, Thm. 21. **Default for budget decisions**: an upper bound, fast (< 0.1 s)
    and stable across the whole parameter range.
``opacus_prv``
    Opacus PRV (Gopi, Lee & Wutschitz 2021, "Numerical Composition of Differential
    Privacy"), ``eps_error=0.01``; returns the upper end of its error window.
``dpa_pld``
    dp-accounting privacy-loss distributions (Doroshenko et al. 2022, "Connect the
    Dots"), pessimistic, ``value_discretization_interval=1e-3``.
``dpa_rdp``
    dp-accounting RDP, default orders (up to 1024).

Measured agreement (dp-accounting 0.6, Opacus 1.6; σ ∈ [0.6, 4], q ∈ [0.01, 1],
steps ∈ [1, 1000], δ = 1e-5; ``tests/privacy/test_accounting.py`` pins a table):

* ``opacus_prv − dpa_pld ∈ [0, 0.02]`` everywhere both are finite
  (:data:`TIGHT_AGREEMENT_ATOL`);
* ``dpa_pld ≤ opacus_rdp`` everywhere (RDP is looser, typically by 5–15 %);
* ``|opacus_rdp − dpa_rdp| ≤ 1 %`` of ε (:data:`RDP_AGREEMENT_RTOL`) for
  ε ∈ [0.2, 30]; outside it they differ by their order grids (Opacus stops at
  α = 63; dp-accounting drops fractional orders that fail to converge). Both
  remain valid upper bounds.

Identical events are merged by summing their steps before accounting: composition
is commutative, so the result is the same and the accountants run once per distinct
(σ, q) instead of once per round.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

logger = logging.getLogger(__name__)

MECHANISMS = ("subsampled_gaussian",)
SAMPLING_METHODS = ("poisson", "no-amplification")
DEFAULT_ACCOUNTANT = "opacus_rdp"
PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-3
TIGHT_AGREEMENT_ATOL = 0.02
RDP_AGREEMENT_RTOL = 0.01


def check_delta(delta: float) -> None:
    """Reject a δ outside (0, 1).

    Raises
    ------
    ValueError
        If ``delta`` is not a finite number strictly between 0 and 1.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise ValueError(f"Delta must be a number in (0, 1). Found {delta!r}.")
    if not 0 < delta < 1:
        raise ValueError(f"Delta must be in (0, 1). Found {delta}.")


def check_epsilon(epsilon: float, *, name: str = "Epsilon") -> None:
    """Reject an ε that is not a positive finite number.

    Raises
    ------
    ValueError
        If ``epsilon`` is not finite and > 0.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ValueError(f"{name} must be a positive number. Found {epsilon!r}.")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"{name} must be positive and finite. Found {epsilon}.")


@dataclass(frozen=True, kw_only=True)
class PrivacyEvent:
    """One private release: ``steps`` sampled Gaussian mechanisms.

    Parameters
    ----------
    noise_multiplier : float
        Noise stddev divided by the clipping norm (σ ≥ 0; σ = 0 means no noise and
        ε = ∞).
    sample_rate : float
        Sampling probability q ∈ (0, 1]; must be 1 with ``"no-amplification"``.
    steps : int
        Number of compositions (DP-SGD steps, or 1 per aggregate), ≥ 0.
    sampling : str
        ``"poisson"`` or ``"no-amplification"``.
    mechanism : str
        Only ``"subsampled_gaussian"``.

    Raises
    ------
    ValueError
        If a value is out of range or a name is unknown.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: str = "poisson"
    mechanism: str = "subsampled_gaussian"

    def __post_init__(self) -> None:
        """Validate every field once, at construction."""
        if self.mechanism not in MECHANISMS:
            raise ValueError(
                f"Unknown mechanism {self.mechanism!r}. Known: {', '.join(MECHANISMS)}."
            )
        if self.sampling not in SAMPLING_METHODS:
            raise ValueError(
                f"Unknown sampling {self.sampling!r}. "
                f"Known: {', '.join(SAMPLING_METHODS)}."
            )
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
            raise ValueError(f"Noise multiplier must be a number. Found {sigma!r}.")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(
                f"Noise multiplier must be finite and non-negative. Found {sigma}."
            )
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise ValueError(f"Sample rate must be a number. Found {q!r}.")
        if not 0 < q <= 1:
            raise ValueError(f"Sample rate must be in (0, 1]. Found {q}.")
        if self.sampling == "no-amplification" and q != 1:
            raise ValueError(
                "Sampling 'no-amplification' is accounted at sample rate 1; "
                f"sample_rate must be 1.0. Found {q}."
            )
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise ValueError(f"Steps must be an integer. Found {steps!r}.")
        if steps < 0:
            raise ValueError(f"Steps cannot be negative. Found {steps}.")
        # Normalise types so that equal events compare and serialise equally.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyEvent:
        """Build an event from :meth:`to_dict` output (or a ledger entry).

        Raises
        ------
        ValueError
            If a field is missing or invalid.
        """
        try:
            return cls(
                noise_multiplier=data["noise_multiplier"],
                sample_rate=data["sample_rate"],
                steps=data["steps"],
                sampling=data["sampling"],
                mechanism=data["mechanism"],
            )
        except KeyError as err:
            raise ValueError(f"Privacy event is missing field {err.args[0]!r}.") from None


def _merge(events: Sequence[PrivacyEvent]) -> list[tuple[float, float, int]]:
    """Sum the steps of events with equal (σ, q); drop steps = 0; keep first order."""
    merged: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps:
            key = (event.noise_multiplier, event.sample_rate)
            merged[key] = merged.get(key, 0) + event.steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


@functools.lru_cache(maxsize=4096)
def _opacus_rdp_curve(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one sampled Gaussian step at Opacus's default orders (cached)."""
    curve = opacus_rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def _opacus_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    # Same sum as RDPAccountant.get_privacy_spent (RDP composes additively,
    # Mironov 2017, Prop. 1), with the per-step curve cached across calls.
    rdp = sum(_opacus_rdp_curve(q, sigma) * steps for sigma, q, steps in history)
    eps, _ = opacus_rdp_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(eps)


def _opacus_prv(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = list(history)
    # log(1 - q) at q = 1 and far tails give harmless inf/nan inside Opacus.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def _dpa_event(history: list[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    parts: list[dp_accounting.DpEvent] = []
    for sigma, q, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        single = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        parts.append(dp_accounting.SelfComposedDpEvent(single, steps))
    return dp_accounting.ComposedDpEvent(parts)


def _dpa_rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(_dpa_event(history))
    return float(accountant.get_epsilon(delta))


def _dpa_pld(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(_dpa_event(history))
    return float(accountant.get_epsilon(delta))


ACCOUNTANTS: dict[str, Callable[[list[tuple[float, float, int]], float], float]] = {
    "opacus_rdp": _opacus_rdp,
    "opacus_prv": _opacus_prv,
    "dpa_pld": _dpa_pld,
    "dpa_rdp": _dpa_rdp,
}


def check_accountant(accountant: str) -> None:
    """Reject an accountant name that is not registered.

    Raises
    ------
    ValueError
        Listing the known names.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"Unknown accountant {accountant!r}. Known: {', '.join(ACCOUNTANTS)}."
        )


def compute_epsilon(
    events: Sequence[PrivacyEvent], *, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Return the ε of composing all ``events`` at ``delta``.

    Parameters
    ----------
    events : Sequence[PrivacyEvent]
        Every release of one scope so far (order does not matter).
    delta : float
        Target δ in (0, 1).
    accountant : str
        A name in ``ACCOUNTANTS``.

    Returns
    -------
    float
        ε ≥ 0; ``0.0`` for no steps, ``inf`` if any step had σ = 0.

    Raises
    ------
    ValueError
        If ``delta`` is out of range, the accountant is unknown, or an item is not a
        :class:`PrivacyEvent`.
    """
    check_delta(delta)
    check_accountant(accountant)
    for event in events:
        if not isinstance(event, PrivacyEvent):
            raise ValueError(f"Expected PrivacyEvent items. Found {type(event).__name__}.")
    history = _merge(events)
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    return ACCOUNTANTS[accountant](history, delta)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    sampling: str = "poisson",
    accountant: str = DEFAULT_ACCOUNTANT,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Return the smallest σ (within tolerance) whose ε after ``steps`` is ≤ target.

    Calibrate once, before training, over the *planned* total: for a device
    ``steps = rounds × steps_per_round``; for the aggregate ``steps = rounds``.
    Opacus accountants use :func:`opacus.accountants.utils.get_noise_multiplier`
    (doubling, then bisection on ε), dp-accounting ones
    :func:`dp_accounting.calibrate_dp_mechanism` (Brent's method); the result is
    re-checked with :func:`compute_epsilon`.

    Parameters
    ----------
    target_epsilon : float
        ε the whole plan may spend.
    delta : float
        Target δ.
    sample_rate : float
        Sampling rate of each step.
    steps : int
        Planned number of steps (≥ 1).
    sampling : str
        ``"poisson"`` or ``"no-amplification"``.
    accountant : str
        Name in ``ACCOUNTANTS``.
    epsilon_tolerance : float
        How far below the target the returned σ's ε may be (Opacus accountants).

    Returns
    -------
    float
        σ with ``compute_epsilon(...) ≤ target_epsilon``.

    Raises
    ------
    ValueError
        If a parameter is out of range or the target cannot be met.
    """
    check_epsilon(target_epsilon, name="Target epsilon")
    check_delta(delta)
    check_accountant(accountant)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Steps must be a positive integer. Found {steps!r}.")
    if not 0 < epsilon_tolerance < target_epsilon:
        raise ValueError(
            f"Epsilon tolerance must be in (0, target_epsilon). Found {epsilon_tolerance}."
        )
    PrivacyEvent(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps, sampling=sampling)
    # A search costs ~1 s; simulated devices often share (q, steps), so memoise.
    return _calibrate(
        float(target_epsilon),
        float(delta),
        float(sample_rate),
        int(steps),
        sampling,
        accountant,
        float(epsilon_tolerance),
    )


@functools.lru_cache(maxsize=1024)
def _calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    sampling: str,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    if accountant.startswith("opacus_"):
        kwargs = {"eps_error": PRV_EPS_ERROR} if accountant == "opacus_prv" else {}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant.removeprefix("opacus_"),
                epsilon_tolerance=epsilon_tolerance,
                **kwargs,
            )
    else:
        make = RdpAccountant if accountant == "dpa_rdp" else functools.partial(
            PLDAccountant, value_discretization_interval=PLD_DISCRETIZATION
        )
        sigma = mechanism_calibration.calibrate_dp_mechanism(
            make,
            lambda s: _dpa_event([(s, sample_rate, steps)]),
            target_epsilon,
            delta,
            mechanism_calibration.LowerEndpointAndGuess(0, 1),
            tol=1e-4,
        )
    sigma = float(sigma)

    def epsilon_at(s: float) -> float:
        event = PrivacyEvent(
            noise_multiplier=s, sample_rate=sample_rate, steps=steps, sampling=sampling
        )
        return compute_epsilon([event], delta=delta, accountant=accountant)

    # Both searches promise ε(σ) ≤ target; guard against numerical wobble anyway.
    for _ in range(20):
        if epsilon_at(sigma) <= target_epsilon:
            break
        sigma *= 1.001
    else:
        raise ValueError(
            f"Could not calibrate noise for target epsilon {target_epsilon} "
            f"with {accountant}."
        )
    logger.debug(
        "Calibrated noise multiplier %.4f for epsilon %.3f, delta %g, q %g, %d steps (%s)",
        sigma,
        target_epsilon,
        delta,
        sample_rate,
        steps,
        accountant,
    )
    return sigma


def calibrate_noise_beside(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    planned: Sequence[PrivacyEvent],
    accountant: str = DEFAULT_ACCOUNTANT,
    rel_tolerance: float = 1e-3,
) -> float:
    """Like :func:`calibrate_noise`, with other releases of the same scope already planned.

    Returns the smallest σ (within ``rel_tolerance``) such that ``steps`` sampled Gaussian
    steps at σ composed with every event of ``planned`` stay within ``target_epsilon``: a
    device that will also release its policy statistics calibrates its DP-SGD so that
    both together fit its budget. Bisection on σ over :func:`compute_epsilon`, starting
    from the σ that spends the whole target alone (a lower bound). Memoised.

    Raises
    ------
    ValueError
        If the planned events alone already spend the target, or a parameter is out of range.
    """
    planned = tuple(planned)
    if not planned:
        return calibrate_noise(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
    alone = compute_epsilon(planned, delta=delta, accountant=accountant)
    if not alone < target_epsilon:
        raise ValueError(
            f"The other planned releases already spend epsilon {alone:.3g} of the target {target_epsilon:g}."
        )
    return _calibrate_beside(
        float(target_epsilon), float(delta), float(sample_rate), int(steps), planned, accountant, float(rel_tolerance)
    )


@functools.lru_cache(maxsize=256)
def _calibrate_beside(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    planned: tuple[PrivacyEvent, ...],
    accountant: str,
    rel_tolerance: float,
) -> float:
    def fits(sigma: float) -> bool:
        event = PrivacyEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)
        return compute_epsilon([event, *planned], delta=delta, accountant=accountant) <= target_epsilon

    low = calibrate_noise(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )
    high = low * 2.0
    while not fits(high):
        low, high = high, high * 2.0
        if high > 1e6:
            raise ValueError(f"Could not calibrate noise beside the planned releases for epsilon {target_epsilon}.")
    while high - low > rel_tolerance * high:
        middle = 0.5 * (low + high)
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high
