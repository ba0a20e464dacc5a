"""What a device releases of its policy statistics, and how the federation's prior is built.

A device shares only its *local* sufficient statistics (its deltas since
the prior), :class:`PolicyStatistics` ``xx[a] = Σ x xᵀ`` and ``rx[a] = Σ r x`` per action.
:func:`privatise_statistics` clips them to an L2 norm and adds Gaussian noise;
:func:`aggregate_priors` averages what devices sent into the next prior.

Sensitivity. Every feature vector has ``‖x‖₂ ≤ √5`` (:data:`FEATURE_NORM_BOUND`: the
probabilities lie on the simplex, so ``‖p‖₂ ≤ 1``; valence, arousal and recency lie in
[-1, 1]; the time-of-day one-hot has norm 1) and every reward ``|r| ≤ R`` (the configured
``feedback.reward_bound``), so one decision moves the released vector by at most
``√(‖x xᵀ‖_F² + r²‖x‖²) ≤ √(25 + 5 R²)`` (:func:`event_sensitivity`; the two parts are
disjoint coordinates). :func:`privatise_events` uses that record-level bound on a device's
own release (one feedback event is one record, as one sample is for DP-SGD), on the block
a device shares (:func:`shared_block`: the emotion probabilities, ``‖p‖ ≤ 1``, so
``Δ = √(1 + R²)``). For
user-level adjacency a device's whole contribution is bounded by clipping instead: after
:func:`clip_statistics` the released vector has norm at most ``clip``, which is the L2
sensitivity of the sum over devices when one device is added or removed (McMahan et al.
2018, arXiv:1710.06963, §3).

:func:`shrinkage_prior` turns averaged statistics into what a device starts from: each
action's ridge estimate, worth a fixed number of pseudo-observations, so that the prior
moves the estimates without silencing exploration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from policy.state import FEATURE_NORM_BOUND, NUM_FEATURES, SHARED_FEATURES, PolicyStatistics

__all__ = [
    "SHARED_NORM_BOUND",
    "aggregate_priors",
    "clip_statistics",
    "event_sensitivity",
    "privatise_events",
    "privatise_statistics",
    "shared_block",
    "shrinkage_prior",
]

logger = logging.getLogger(__name__)

# ‖p‖₂ of the block shared_block releases: emotion probabilities lie on the simplex.
SHARED_NORM_BOUND: float = 1.0


def clip_statistics(stats: PolicyStatistics, clip: float) -> PolicyStatistics:
    """Scale ``stats`` down so that :meth:`PolicyStatistics.norm` is at most ``clip``.

    Scaling ``xx`` and ``rx`` together keeps each action's ridge-free solution
    ``xx⁻¹ rx``: clipping makes a heavy user's evidence count less, not point elsewhere.
    """
    norm = stats.norm()
    if norm <= clip:
        return stats
    scale = clip / norm
    return PolicyStatistics(stats.actions, stats.xx * scale, stats.rx * scale)


def privatise_statistics(
    stats: PolicyStatistics,
    *,
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator,
    shares: int = 1,
) -> tuple[PolicyStatistics, dict[str, Any]]:
    """Clip a device's statistics and add Gaussian noise: the Gaussian mechanism.

    The released vector (:meth:`PolicyStatistics.to_vector`: upper triangles of ``xx`` and
    ``rx``) is clipped to L2 norm ``clip`` and every coordinate gets independent Gaussian
    noise (Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy",
    Thm. A.1; accounted with RDP, Mironov 2017, Prop. 3). ``xx`` is rebuilt from the noised
    upper triangle, so its noise is symmetric (as in Analyze Gauss, Dwork et al. 2014, STOC,
    Alg. 1). Adding or removing one device changes a sum over devices by at most ``clip``;
    replacing one device's statistics by another's, by at most ``2 * clip``.

    With ``shares = 1`` (local DP) the device adds standard deviation
    ``noise_multiplier * clip`` and its release is private on its own. With ``shares = n``
    (distributed DP, for a sum of ``n`` devices under secure aggregation, which emofed runs
    with Flower's SecAgg+) each device adds ``noise_multiplier * clip / √n``: only the sum,
    whose noise then has standard deviation ``noise_multiplier * clip``, is private, and only
    if at least ``n`` devices' noise reaches it (Kairouz et al. 2021, "The Distributed Discrete
    Gaussian Mechanism for Federated Learning with Secure Aggregation", §3, in its continuous
    form).

    Parameters
    ----------
    stats : PolicyStatistics
        One device's local statistics (its deltas since the prior).
    clip : float
        L2 bound on the released vector, > 0.
    noise_multiplier : float
        Noise standard deviation of the protected release over ``clip``, ≥ 0 (0: clipping
        only, no privacy).
    rng : np.random.Generator
        Source of the noise.
    shares : int
        Devices the noise is split across (1: local DP).

    Returns
    -------
    PolicyStatistics
        The noised statistics (``xx`` symmetric, not necessarily positive semi-definite).
    dict
        Data-independent mechanism parameters for a ledger entry: the fields of
        ``privacy.accounting.PrivacyEvent`` (one Gaussian release, no subsampling) plus
        ``clip``, ``sensitivity``, ``replace_sensitivity``, ``noise_stddev`` (of the protected
        release), ``device_noise_stddev`` (what this device added), ``shares``,
        ``dimension`` and ``adjacency``.

    Raises
    ------
    TypeError
        If ``stats`` is not PolicyStatistics or ``rng`` is not a numpy Generator.
    ValueError
        If ``clip`` is not positive and finite, ``noise_multiplier`` is negative or
        ``shares`` is below 1.
    """
    if not isinstance(stats, PolicyStatistics):
        raise TypeError(f"Expected PolicyStatistics. Found {type(stats).__name__}.")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator. Found {type(rng).__name__}.")
    if (
        isinstance(clip, bool)
        or not isinstance(clip, (int, float))
        or not (math.isfinite(clip) and clip > 0)
    ):
        raise ValueError(f"clip must be positive and finite. Found {clip!r}.")
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
    ):
        raise ValueError(
            f"noise_multiplier must be finite and non-negative. Found {noise_multiplier!r}."
        )
    if isinstance(shares, bool) or not isinstance(shares, (int, np.integer)) or shares < 1:
        raise ValueError(f"shares must be an integer >= 1. Found {shares!r}.")
    vector = clip_statistics(stats, clip).to_vector()
    stddev = float(noise_multiplier) * float(clip)
    device_stddev = stddev / math.sqrt(shares)
    noised = vector + rng.normal(0.0, device_stddev, size=vector.shape) if stddev > 0 else vector
    params: dict[str, Any] = {
        "mechanism": "subsampled_gaussian",
        "sampling": "no-amplification",
        "sample_rate": 1.0,
        "steps": 1,
        "noise_multiplier": float(noise_multiplier),
        "clip": float(clip),
        "sensitivity": float(clip),
        "replace_sensitivity": 2.0 * float(clip),
        "noise_stddev": stddev,
        "device_noise_stddev": device_stddev,
        "shares": int(shares),
        "dimension": int(vector.size),
        "adjacency": "add or remove one device's statistics",
    }
    logger.info(
        "Policy statistics privatised: clip=%g noise_multiplier=%g noise_stddev=%g shares=%d dimension=%d",
        clip,
        noise_multiplier,
        stddev,
        shares,
        vector.size,
    )
    return PolicyStatistics.from_vector(noised, stats.actions, stats.dim), params


def event_sensitivity(reward_bound: float, feature_bound: float = FEATURE_NORM_BOUND) -> float:
    """L2 change of :meth:`PolicyStatistics.to_vector` when one feedback event is added or removed.

    One event adds ``x xᵀ`` to one action's ``xx`` (its upper triangle has norm at most
    ``‖x‖² ≤ B²``) and ``r x`` to its ``rx`` (norm at most ``R B``). For the shared block
    (:func:`shared_block`, the emotion probabilities) ``B = 1``.
    """
    return math.sqrt(feature_bound**4 + (reward_bound * feature_bound) ** 2)


def shared_block(stats: PolicyStatistics) -> PolicyStatistics:
    """The part of a device's statistics it shares for the prior: the emotion-probability block.

    The first :data:`SHARED_FEATURES` features are the smoothed emotion probabilities; how much
    an action helps in each emotion is what transfers between people. Valence and arousal
    are linear in them, and the time-of-day and recency habits stay personal. On the
    simplex ``‖p‖₂ ≤ 1``, so one event moves this block by at most ``√(1 + R²)``.
    """
    k = SHARED_FEATURES
    return PolicyStatistics(stats.actions, stats.xx[:, :k, :k], stats.rx[:, :k])


def privatise_events(
    stats: PolicyStatistics,
    *,
    noise_multiplier: float,
    reward_bound: float,
    rng: np.random.Generator,
    feature_bound: float = FEATURE_NORM_BOUND,
) -> tuple[PolicyStatistics, dict[str, Any]]:
    """Record-level Gaussian mechanism on a device's own statistics (local DP per feedback event).

    No clipping is needed: every event's contribution is bounded by the feature and reward
    bounds (:func:`event_sensitivity`; ``feature_bound`` bounds ``‖x‖`` of the block
    released, 1 for :func:`shared_block`), so noise of standard deviation
    ``noise_multiplier · Δ`` on every released coordinate makes the release
    ``(ε, δ)``-DP for adding or removing any one feedback event, however many the device
    holds (Dwork & Roth 2014, Thm. A.1, accounted with RDP). ``xx`` is rebuilt symmetric
    from its noised upper triangle.

    Returns
    -------
    PolicyStatistics
        The noised statistics.
    dict
        Data-independent mechanism parameters: ``noise_multiplier``, ``sensitivity``,
        ``noise_stddev``, ``dimension``, ``adjacency``.

    Raises
    ------
    TypeError
        If ``stats`` is not PolicyStatistics or ``rng`` is not a numpy Generator.
    ValueError
        If ``noise_multiplier`` is not positive or ``reward_bound`` is not positive.
    """
    if not isinstance(stats, PolicyStatistics):
        raise TypeError(f"Expected PolicyStatistics. Found {type(stats).__name__}.")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator. Found {type(rng).__name__}.")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite. Found {noise_multiplier!r}.")
    if not (math.isfinite(reward_bound) and reward_bound > 0):
        raise ValueError(f"reward_bound must be positive and finite. Found {reward_bound!r}.")
    sensitivity = event_sensitivity(reward_bound, feature_bound)
    stddev = float(noise_multiplier) * sensitivity
    vector = stats.to_vector()
    noised = vector + rng.normal(0.0, stddev, size=vector.shape)
    params = {
        "noise_multiplier": float(noise_multiplier),
        "sensitivity": sensitivity,
        "noise_stddev": stddev,
        "dimension": int(vector.size),
        "adjacency": "add or remove one feedback event",
    }
    return PolicyStatistics.from_vector(noised, stats.actions, stats.dim), params


def shrinkage_prior(
    stats: PolicyStatistics, *, strength: float, ridge: float, dim: int = NUM_FEATURES
) -> PolicyStatistics:
    """A prior that holds each action's estimate from ``stats``, worth ``strength`` observations.

    ``θ₀ₐ = (xxₐ + ridge·I)⁻¹ rxₐ`` is the ridge estimate of action ``a``'s reward model from
    the (averaged, privatised) statistics, on their features (the first ``stats.dim`` of
    ``dim``; 0 on the others). The returned prior has ``xx = strength·I`` and
    ``rx = strength·θ₀``, so :class:`LinUCB` starts at ``θ₀`` shrunk by ``strength``
    against its own ``ridge``, and local evidence outweighs it after a few decisions.
    Handing the averaged statistics themselves over instead would also hand over their
    confidence, inflated by the noise-calibrated ridge, and silence exploration. This is
    a Gaussian prior ``N(θ₀, I/strength)`` on each action's weights (Bayesian linear
    regression); post-processing, it costs no privacy.

    Raises
    ------
    ValueError
        If ``strength`` is negative, ``ridge`` is not positive or ``dim < stats.dim``.
    """
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0. Found {strength}.")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0. Found {ridge}.")
    if dim < stats.dim:
        raise ValueError(f"dim must be at least the statistics' {stats.dim}. Found {dim}.")
    k = len(stats.actions)
    eye = np.eye(stats.dim)
    theta = np.zeros((k, dim))
    theta[:, : stats.dim] = [np.linalg.solve(xx + ridge * eye, rx) for xx, rx in zip(stats.xx, stats.rx, strict=True)]
    return PolicyStatistics(stats.actions, np.broadcast_to(strength * np.eye(dim), (k, dim, dim)), strength * theta)


def aggregate_priors(
    stats: Sequence[PolicyStatistics], *, device_noise_stddev: float = 0.0
) -> PolicyStatistics:
    """Average devices' (privatised) statistics into a prior, as valid statistics.

    The noise on the average of ``n`` releases has standard deviation
    ``s = device_noise_stddev / √n`` per coordinate, so the noise on each averaged ``xx`` is a
    symmetric Gaussian matrix of spectral norm about ``2√d·s`` (Wigner's semicircle law).
    That much ridge is added to every ``xx`` before its remaining negative eigenvalues are
    set to 0: the prior's Gram matrices then dominate the noise-free ones, and in directions
    the devices rarely saw the noise in ``rx`` is shrunk instead of trusted. This is the
    noise-calibrated ridge of AdaSSP (Wang 2018, "Revisiting differentially private linear
    regression", UAI, Alg. 2). All of it is post-processing and costs no privacy.

    Parameters
    ----------
    stats : Sequence[PolicyStatistics]
        What the devices sent (``privatise_statistics`` output).
    device_noise_stddev : float
        Noise standard deviation each device added per coordinate (the mechanism's
        ``device_noise_stddev``); 0 for noise-free statistics.

    Raises
    ------
    ValueError
        If ``stats`` is empty, the devices disagree on actions or dimension, or the noise
        level is negative.
    """
    if not device_noise_stddev >= 0:
        raise ValueError(f"device_noise_stddev must be >= 0. Found {device_noise_stddev}.")
    stats = list(stats)
    if not stats:
        raise ValueError("aggregate_priors needs statistics from at least one device.")
    first = stats[0]
    for other in stats[1:]:
        if other.actions != first.actions or other.dim != first.dim:
            raise ValueError(
                f"Devices disagree on the statistics' layout: {other.actions} (d={other.dim}) "
                f"vs {first.actions} (d={first.dim})."
            )
    xx = np.mean([s.xx for s in stats], axis=0)  # (K, d, d)
    rx = np.mean([s.rx for s in stats], axis=0)  # (K, d)
    ridge = 2.0 * math.sqrt(first.dim) * device_noise_stddev / math.sqrt(len(stats))
    xx = 0.5 * (xx + np.transpose(xx, (0, 2, 1))) + ridge * np.eye(first.dim)
    values, vectors = np.linalg.eigh(xx)  # (K, d), (K, d, d)
    xx = np.einsum("kij,kj,klj->kil", vectors, np.clip(values, 0.0, None), vectors)
    return PolicyStatistics(first.actions, xx, rx)
