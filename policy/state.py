"""What the emotion-management policy remembers: smoothed affect, features, bandit statistics.

The state of one device's policy has three parts, all exportable to plain JSON-able dicts:

* :class:`EmotionTracker`: an exponential moving average of the fused 7-class emotion
  probabilities with a half-life in seconds, so irregularly spaced observations are
  weighted by how long ago they were made;
* :func:`features`: the bandit's context vector built from that trajectory, the
  circumplex affect derived from it, the time since the last intervention and the
  time of day;
* :class:`LinUCB` (and :class:`RandomBandit`, the benchmark's floor): one ridge-regression
  model per action over those features, started from a federated prior.

Federated prior. A device shares only its *local* sufficient statistics (its deltas since
the prior), :class:`PolicyStatistics` ``xx[a] = Σ x xᵀ`` and ``rx[a] = Σ r x`` per action;
how they are privatised and turned into a prior is ``policy.release``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from models.labels import EMOTIONS, NUM_CLASSES

__all__ = [
    "BANDITS",
    "CIRCUMPLEX",
    "FEATURE_NAMES",
    "FEATURE_NORM_BOUND",
    "NUM_FEATURES",
    "TIME_BUCKETS",
    "WARRINER_NORMS",
    "BanditConfig",
    "EmotionTracker",
    "LinUCB",
    "PolicyStatistics",
    "RandomBandit",
    "SHARED_FEATURES",
    "StateConfig",
    "affect",
    "build_bandit",
    "features",
    "time_bucket",
]

# Mean valence and arousal ratings (1-9 scale) of each label word in Warriner, Kuperman &
# Brysbaert (2013), "Norms of valence, arousal, and dominance for 13,915 English lemmas",
# Behavior Research Methods 45, 1191-1207 (columns V.Mean.Sum, A.Mean.Sum). Word-level norms
# place the seven labels on Russell's (1980) circumplex from data rather than by hand.
WARRINER_NORMS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "neutral": (5.50, 3.45),
        "happy": (8.47, 6.05),
        "sad": (2.10, 3.49),
        "angry": (2.53, 6.20),
        "fearful": (2.66, 5.45),
        "disgusted": (2.68, 4.89),
        "surprised": (6.57, 5.95),
    }
)
# (valence, arousal) in [-1, 1]: the 1-9 ratings centred on the scale midpoint 5, over 4.
CIRCUMPLEX: Mapping[str, tuple[float, float]] = MappingProxyType(
    {name: ((v - 5.0) / 4.0, (a - 5.0) / 4.0) for name, (v, a) in WARRINER_NORMS.items()}
)
_AFFECT = np.array([CIRCUMPLEX[name] for name in EMOTIONS])  # (7, 2)

TIME_BUCKETS: tuple[str, ...] = ("night", "morning", "afternoon", "evening")  # 6-hour blocks
FEATURE_NAMES: tuple[str, ...] = (
    *(f"p_{name}" for name in EMOTIONS),
    "valence",
    "arousal",
    "recency",
    *(f"tod_{name}" for name in TIME_BUCKETS),
)
NUM_FEATURES: int = len(FEATURE_NAMES)
SHARED_FEATURES: int = NUM_CLASSES  # the emotion probabilities: the block shared for the prior
FEATURE_NORM_BOUND: float = math.sqrt(5.0)


@dataclass(frozen=True)
class StateConfig:
    """How the emotion trajectory is smoothed and turned into features."""

    half_life_s: float = 600.0  # weight of an observation halves every half_life_s seconds
    utc_offset_s: int = 0  # device's offset from UTC, for the time-of-day bucket
    recency_scale_s: float = 3600.0  # recency feature = 1 - exp(-seconds since / scale)


@dataclass(frozen=True)
class BanditConfig:
    """The contextual bandit that learns which action helps this person."""

    kind: str = "linucb"  # a key of BANDITS
    alpha: float = 0.3  # width of the LinUCB confidence bonus
    ridge: float = 1.0  # lambda: the ridge (identity) added to every action's xx
    learn: bool = True  # false: use the prior as is (feedback still updates message history)
    prior_weight: float = 1.0  # the federated prior counts as this many average devices
    seed: int = 0  # RandomBandit's draws
    max_pending: int = 64  # decisions kept awaiting feedback; older ones expire


def _check_probabilities(probabilities: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (NUM_CLASSES,):
        raise ValueError(
            f"Emotion probabilities must have shape ({NUM_CLASSES},) in the order of "
            f"models.labels.EMOTIONS. Found shape {p.shape}."
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or abs(p.sum() - 1.0) > 1e-3:
        raise ValueError(f"Emotion probabilities must be non-negative and sum to 1. Found {p.tolist()}.")
    return p / p.sum()


def affect(probabilities: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Return the expected (valence, arousal) in [-1, 1] of a distribution over EMOTIONS.

    Raises
    ------
    ValueError
        If ``probabilities`` is not a distribution over the seven shared emotions.
    """
    valence, arousal = _check_probabilities(probabilities) @ _AFFECT  # (2,)
    return float(valence), float(arousal)


def time_bucket(timestamp: float, utc_offset_s: int = 0) -> int:
    """Index in :data:`TIME_BUCKETS` of the local time of day of a Unix timestamp."""
    hour = ((timestamp + utc_offset_s) % 86_400.0) // 3600.0
    return int(hour // 6)


def features(
    probabilities: np.ndarray,
    *,
    timestamp: float,
    last_intervention: float | None,
    config: StateConfig,
) -> np.ndarray:
    """Build the bandit's context vector (:data:`FEATURE_NAMES`), of norm at most √5.

    Parameters
    ----------
    probabilities : np.ndarray
        Smoothed probabilities (7,) in the order of ``EMOTIONS``.
    timestamp : float
        Decision time, Unix seconds.
    last_intervention : float or None
        Time of the last intervention; None if there was none (recency 1).
    config : StateConfig
        ``recency_scale_s`` and ``utc_offset_s``.
    """
    valence, arousal = probabilities @ _AFFECT
    if last_intervention is None:
        recency = 1.0
    else:
        recency = 1.0 - math.exp(-max(0.0, timestamp - last_intervention) / config.recency_scale_s)
    tod = np.zeros(len(TIME_BUCKETS))
    tod[time_bucket(timestamp, config.utc_offset_s)] = 1.0
    return np.concatenate([probabilities, [valence, arousal, recency], tod])  # (14,)


class EmotionTracker:
    """Exponential moving average of emotion probabilities with a half-life in seconds.

    An observation ``dt`` seconds after the previous one gets weight
    ``1 - 2 ** (-dt / half_life_s)``, so the average forgets at the same rate whatever the
    observations' spacing.
    """

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive. Found {half_life_s}.")
        self.half_life_s = float(half_life_s)
        self._probabilities: np.ndarray | None = None
        self._last: float | None = None

    @property
    def probabilities(self) -> np.ndarray | None:
        """Smoothed probabilities (7,), or None before the first observation."""
        return None if self._probabilities is None else self._probabilities.copy()

    @property
    def last_timestamp(self) -> float | None:
        """Time of the latest observation."""
        return self._last

    def update(self, probabilities: Sequence[float] | np.ndarray, timestamp: float) -> np.ndarray:
        """Fold one observation in and return the smoothed probabilities.

        Raises
        ------
        ValueError
            If the probabilities are not a distribution over EMOTIONS, or ``timestamp``
            is earlier than the previous observation.
        """
        p = _check_probabilities(probabilities)
        if self._probabilities is None or self._last is None:
            self._probabilities = p
        else:
            dt = float(timestamp) - self._last
            if dt < 0:
                raise ValueError(
                    f"Observations must arrive in time order; {timestamp} is before {self._last}."
                )
            weight = 1.0 - 0.5 ** (dt / self.half_life_s)
            self._probabilities = (1.0 - weight) * self._probabilities + weight * p
        self._last = float(timestamp)
        return self._probabilities.copy()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state."""
        return {
            "probabilities": None if self._probabilities is None else self._probabilities.tolist(),
            "last_timestamp": self._last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly."""
        p = state["probabilities"]
        self._probabilities = None if p is None else np.asarray(p, dtype=np.float64)
        self._last = None if state["last_timestamp"] is None else float(state["last_timestamp"])


@dataclass(frozen=True, eq=False)
class PolicyStatistics:
    """Per-action sufficient statistics of the linear reward models.

    ``xx`` (K, d, d) holds ``Σ x xᵀ`` and ``rx`` (K, d) holds ``Σ r x`` over the decisions on
    each of the K actions; no ridge term and no counts.
    """

    actions: tuple[str, ...]
    xx: np.ndarray
    rx: np.ndarray

    def __post_init__(self) -> None:
        """Check shapes and store float64 copies."""
        xx = np.array(self.xx, dtype=np.float64)
        rx = np.array(self.rx, dtype=np.float64)
        k = len(self.actions)
        if xx.ndim != 3 or xx.shape[0] != k or xx.shape[1] != xx.shape[2] or rx.shape != xx.shape[:2]:
            raise ValueError(
                f"Statistics for {k} actions need xx of shape (K, d, d) and rx of shape (K, d). "
                f"Found {xx.shape} and {rx.shape}."
            )
        object.__setattr__(self, "actions", tuple(self.actions))
        object.__setattr__(self, "xx", xx)
        object.__setattr__(self, "rx", rx)

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return int(self.rx.shape[1])

    @classmethod
    def zeros(cls, actions: Sequence[str], dim: int = NUM_FEATURES) -> PolicyStatistics:
        """Empty statistics."""
        return cls(tuple(actions), np.zeros((len(actions), dim, dim)), np.zeros((len(actions), dim)))

    def to_vector(self) -> np.ndarray:
        """The released coordinates: each upper triangle of ``xx`` (diagonal included), then ``rx``."""
        rows, cols = np.triu_indices(self.dim)
        return np.concatenate([self.xx[:, rows, cols].ravel(), self.rx.ravel()])

    @classmethod
    def from_vector(cls, vector: np.ndarray, actions: Sequence[str], dim: int) -> PolicyStatistics:
        """Inverse of :meth:`to_vector`; ``xx`` is mirrored from its upper triangle."""
        k = len(actions)
        rows, cols = np.triu_indices(dim)
        n_tri = rows.size
        if vector.shape != (k * n_tri + k * dim,):
            raise ValueError(f"Vector of {vector.size} values does not fit {k} actions of dim {dim}.")
        upper = np.zeros((k, dim, dim))
        upper[:, rows, cols] = vector[: k * n_tri].reshape(k, n_tri)
        xx = upper + np.transpose(np.triu(upper, 1), (0, 2, 1))
        return cls(tuple(actions), xx, vector[k * n_tri :].reshape(k, dim))

    def norm(self) -> float:
        """L2 norm of :meth:`to_vector`: the quantity :func:`clip_statistics` bounds."""
        return float(np.linalg.norm(self.to_vector()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"actions": list(self.actions), "xx": self.xx.tolist(), "rx": self.rx.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyStatistics:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            If a field is missing or the shapes do not fit.
        """
        try:
            return cls(tuple(data["actions"]), np.asarray(data["xx"]), np.asarray(data["rx"]))
        except KeyError as err:
            raise ValueError(f"Policy statistics are missing field {err.args[0]!r}.") from None


class LinUCB:
    """Disjoint LinUCB: one ridge regression per action, started from a prior.

    Li, Chu, Langford & Schapire (2010), "A Contextual-Bandit Approach to Personalized News
    Article Recommendation", WWW, Alg. 1. Action ``a`` scores
    ``θₐᵀx + α √(xᵀ Aₐ⁻¹ x)`` with ``Aₐ = λI + w·xx_priorₐ + xx_localₐ``,
    ``θₐ = Aₐ⁻¹ (w·rx_priorₐ + rx_localₐ)``, ``w`` the prior weight. Actions in ``fixed``
    have a known reward: they score it and are never updated (their statistics stay 0).
    """

    def __init__(
        self,
        actions: Sequence[str],
        config: BanditConfig,
        prior: PolicyStatistics | None = None,
        *,
        fixed: Mapping[str, float] | None = None,
    ) -> None:
        self.actions = tuple(actions)
        self.config = config
        self.dim = NUM_FEATURES
        fixed = dict(fixed or {})
        unknown = [a for a in fixed if a not in self.actions]
        if unknown:
            raise ValueError(f"Fixed-reward action {unknown[0]!r} is not among {self.actions}.")
        self._fixed_index = np.array([self.actions.index(a) for a in fixed], dtype=int)
        self._fixed_value = np.array(list(fixed.values()), dtype=np.float64)
        self._local = PolicyStatistics.zeros(self.actions, self.dim)
        self._prior = PolicyStatistics.zeros(self.actions, self.dim)
        self.set_prior(prior)

    @property
    def prior(self) -> PolicyStatistics:
        """The prior statistics (zeros if none was set)."""
        return self._prior

    def statistics(self) -> PolicyStatistics:
        """The device's local statistics: its deltas since the prior."""
        return PolicyStatistics(self.actions, self._local.xx, self._local.rx)

    def set_prior(self, prior: PolicyStatistics | None) -> None:
        """Start from ``prior`` (None: no prior); local statistics are kept.

        Raises
        ------
        ValueError
            If the prior's actions or dimension differ from this bandit's.
        """
        if prior is None:
            prior = PolicyStatistics.zeros(self.actions, self.dim)
        if prior.actions != self.actions or prior.dim != self.dim:
            raise ValueError(
                f"Prior for actions {prior.actions} (d={prior.dim}) does not fit "
                f"{self.actions} (d={self.dim})."
            )
        self._prior = prior
        self._inverse = np.zeros((len(self.actions), self.dim, self.dim))
        self._theta = np.zeros((len(self.actions), self.dim))
        for index in range(len(self.actions)):
            self._refresh(index)

    def _refresh(self, index: int) -> None:
        w = self.config.prior_weight
        design = (
            self.config.ridge * np.eye(self.dim) + w * self._prior.xx[index] + self._local.xx[index]
        )  # (d, d)
        self._inverse[index] = np.linalg.inv(design)
        self._theta[index] = self._inverse[index] @ (w * self._prior.rx[index] + self._local.rx[index])

    def scores(self, x: np.ndarray, *, step: int) -> np.ndarray:
        """Upper confidence bounds (K,) of every action's reward in context ``x`` (d,)."""
        mean = self._theta @ x  # (K,)
        width = np.einsum("kij,i,j->k", self._inverse, x, x)  # (K,)
        scores = mean + self.config.alpha * np.sqrt(np.clip(width, 0.0, None))
        scores[self._fixed_index] = self._fixed_value
        return scores

    def estimates(self, x: np.ndarray) -> np.ndarray:
        """Point estimates (K,) of every action's reward in context ``x``."""
        estimates = self._theta @ x
        estimates[self._fixed_index] = self._fixed_value
        return estimates

    def update(self, index: int, x: np.ndarray, reward: float) -> None:
        """Add one observed reward of action ``index`` in context ``x`` (fixed actions: ignored)."""
        if index in self._fixed_index:
            return
        self._local.xx[index] += np.outer(x, x)
        self._local.rx[index] += reward * x
        self._refresh(index)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: prior and local statistics (the rest is derived from them)."""
        return {"prior": self._prior.to_dict(), "local": self._local.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly.

        Raises
        ------
        ValueError
            If the statistics do not fit this bandit's actions.
        """
        local = PolicyStatistics.from_dict(state["local"])
        if local.actions != self.actions or local.dim != self.dim:
            raise ValueError(f"Saved statistics for {local.actions} do not fit {self.actions}.")
        self._local = local
        self.set_prior(PolicyStatistics.from_dict(state["prior"]))


class RandomBandit(LinUCB):
    """Uniformly random scores (reproducible from ``seed`` and the step); still collects statistics."""

    def scores(self, x: np.ndarray, *, step: int) -> np.ndarray:
        """Random scores (K,), the same for the same seed and step."""
        return np.random.default_rng([self.config.seed, step]).random(len(self.actions))


BANDITS: dict[str, type[LinUCB]] = {"linucb": LinUCB, "random": RandomBandit}


def build_bandit(
    actions: Sequence[str],
    config: BanditConfig,
    prior: PolicyStatistics | None = None,
    *,
    fixed: Mapping[str, float] | None = None,
) -> LinUCB:
    """Build the bandit ``config.kind`` names.

    Raises
    ------
    ValueError
        If the kind is unknown (the message lists the known ones).
    """
    if config.kind not in BANDITS:
        raise ValueError(f"Unknown bandit.kind {config.kind!r}; known: {', '.join(BANDITS)}.")
    return BANDITS[config.kind](actions, config, prior, fixed=fixed)
