"""Simulated people for the emotion-management policy: hidden preferences, moods, feedback.

Each :class:`UserProfile` holds a *hidden* utility ``U[e, a]`` of every action ``a`` while the
person truly feels emotion ``e``: the population mean :data:`POPULATION_UTILITY` plus
per-person Gaussian deviations in every cell and a per-person liking of each action, so a
federated prior (the population's average) helps and personalisation helps more. The quiet
action has utility 0 for everyone: doing nothing is the reference.

Emotions follow a per-person Markov chain (persistence plus the person's own base rates)
with occasional sustained sad or fearful episodes; the policy never sees the true emotion,
only noisy classifier probabilities ``softmax(strength * onehot(e) + noise)``.

Feedback to an action of utility ``u`` is one of :data:`RESPONSES` with probabilities
``softmax([k u - 0.5, k u / 2, 0, -k u + 0.7])`` (helped, accepted, no response, dismissed),
so the expected reward rises with ``u`` and is close to 0 (doing nothing) at ``u = 0``.
:func:`run_policy` plays a policy against one person and scores every decision against an
oracle that knows the true emotion and the hidden utilities. Everything is seeded.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from emofed.config import EmofedConfig
from models.labels import EMOTIONS, NUM_CLASSES
from policy.federated import FIRST_LAST_WINDOW, message_bank, policy_config, variants
from policy.rules import Policy
from policy.state import PolicyStatistics

__all__ = [
    "OBSERVATIONS_PER_DECISION",
    "POPULATION_BASE_RATES",
    "POPULATION_UTILITY",
    "RESPONSES",
    "Episode",
    "Outcome",
    "SimulatedUser",
    "UserProfile",
    "evaluate_policies",
    "history_statistics",
    "make_population",
    "run_policy",
    "simulate_episode",
    "simulated_person",
]

RESPONSES: tuple[str, ...] = ("helped", "accepted", "none", "dismissed")
_LOGIT_OFFSETS = np.array([-0.5, 0.0, 0.0, 0.7])  # (4,)
_LOGIT_SLOPES = np.array([1.0, 0.5, 0.0, -1.0])  # (4,), times k * u

# Mean utility of each action per true emotion, in the order of EMOTIONS (neutral, happy,
# sad, angry, fearful, disgusted, surprised). Actions not listed have mean 0.
POPULATION_UTILITY: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "breathing_exercise": (-0.4, -0.7, 0.1, 0.5, 0.7, 0.1, 0.2),
        "suggest_break": (-0.2, -0.6, 0.1, 0.5, 0.2, 0.4, -0.2),
        "calming_music": (0.0, -0.3, 0.3, 0.4, 0.5, 0.2, 0.1),
        "uplifting_content": (0.1, 0.2, 0.6, -0.3, -0.1, 0.2, 0.1),
        "reach_out_friend": (-0.3, 0.2, 0.5, -0.2, 0.3, -0.2, 0.0),
        "support_resources": (-0.8, -0.9, 0.3, -0.1, 0.3, -0.3, -0.5),
    }
)
POPULATION_BASE_RATES: tuple[float, ...] = (0.40, 0.22, 0.12, 0.08, 0.09, 0.04, 0.05)
_DISTRESS = (EMOTIONS.index("sad"), EMOTIONS.index("fearful"))


@dataclass(frozen=True, eq=False)
class UserProfile:
    """A simulated person's hidden traits."""

    user_id: int
    actions: tuple[str, ...]
    utility: np.ndarray  # (7, K): utility of each action in each true emotion
    base_rates: np.ndarray  # (7,): how often this person feels each emotion
    persistence: float  # chance the emotion carries over to the next observation
    distress_rate: float  # chance per observation that a sustained sad/fearful episode starts


def make_population(
    n_users: int,
    actions: Sequence[str],
    *,
    seed: int,
    quiet_action: str = "no_action",
    spread: float = 0.4,
    action_spread: float = 0.3,
    first_id: int = 0,
) -> list[UserProfile]:
    """Draw ``n_users`` heterogeneous people around the population means.

    Parameters
    ----------
    n_users : int
        How many people.
    actions : Sequence[str]
        The policy's action names, in its order.
    seed : int
        Seed; person ``i`` depends only on ``(seed, first_id + i)``.
    quiet_action : str
        The action whose utility is 0 for everyone.
    spread : float
        Standard deviation of each person's deviation in every (emotion, action) cell.
    action_spread : float
        Standard deviation of each person's overall liking of each action.
    first_id : int
        ``user_id`` of the first person (disjoint populations: disjoint id ranges).

    Raises
    ------
    ValueError
        If ``n_users`` is negative or the quiet action is not among ``actions``.
    """
    if n_users < 0:
        raise ValueError(f"n_users must be >= 0. Found {n_users}.")
    actions = tuple(actions)
    if quiet_action not in actions:
        raise ValueError(f"quiet_action {quiet_action!r} is not among the actions {actions}.")
    mean = np.array([POPULATION_UTILITY.get(a, (0.0,) * NUM_CLASSES) for a in actions]).T  # (7, K)
    quiet = actions.index(quiet_action)
    profiles = []
    for user_id in range(first_id, first_id + n_users):
        rng = np.random.default_rng([seed, user_id])
        utility = (
            mean + rng.normal(0.0, spread, mean.shape) + rng.normal(0.0, action_spread, len(actions))
        )
        utility[:, quiet] = 0.0
        profiles.append(
            UserProfile(
                user_id=user_id,
                actions=actions,
                utility=utility,
                base_rates=rng.dirichlet(20.0 * np.array(POPULATION_BASE_RATES)),
                persistence=float(rng.uniform(0.85, 0.95)),
                distress_rate=float(rng.uniform(0.001, 0.004)),
            )
        )
    return profiles


class SimulatedUser:
    """A person's feedback: sampled responses and their expected rewards."""

    def __init__(self, profile: UserProfile, *, seed: int, steepness: float = 2.0) -> None:
        self.profile = profile
        self.steepness = steepness
        self._index = {a: i for i, a in enumerate(profile.actions)}
        self._rng = np.random.default_rng([seed, profile.user_id, 1])

    def utility(self, action: str, emotion: int) -> float:
        """Hidden utility of ``action`` while truly feeling ``EMOTIONS[emotion]``."""
        return float(self.profile.utility[emotion, self._index[action]])

    def response_probabilities(self, action: str, emotion: int) -> np.ndarray:
        """Probabilities (4,) of :data:`RESPONSES`."""
        logits = _LOGIT_OFFSETS + _LOGIT_SLOPES * self.steepness * self.utility(action, emotion)
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    def expected_reward(
        self, action: str, emotion: int, rewards: Mapping[str, float], *, quiet_action: str = "no_action"
    ) -> float:
        """Expected reward of ``action`` under the reward mapping (the quiet action: ``rewards['none']``)."""
        if action == quiet_action:
            return float(rewards["none"])
        values = np.array([rewards[r] for r in RESPONSES])
        return float(self.response_probabilities(action, emotion) @ values)

    def respond(self, action: str, emotion: int, *, quiet_action: str = "no_action") -> str | None:
        """Sample this person's response; None (no response) to the quiet action."""
        if action == quiet_action:
            return None
        probabilities = self.response_probabilities(action, emotion)
        response = RESPONSES[int(self._rng.choice(len(RESPONSES), p=probabilities))]
        return None if response == "none" else response


@dataclass(frozen=True, eq=False)
class Episode:
    """A person's simulated days: true emotions and what the classifier reported."""

    timestamps: np.ndarray  # (N,) observation times, seconds
    emotions: np.ndarray  # (N,) true emotion index at each observation
    observations: np.ndarray  # (N, 7) classifier probabilities


def simulate_episode(
    profile: UserProfile,
    *,
    observations: int,
    seed: int,
    step_s: float = 300.0,
    start: float = 7 * 3600.0,
    strength: float = 2.5,
    noise: float = 0.8,
) -> Episode:
    """Generate a seeded emotion trajectory and its noisy classifier outputs.

    Parameters
    ----------
    profile : UserProfile
        Whose trajectory.
    observations : int
        Number of observations, ``step_s`` seconds apart from ``start``.
    seed : int
        Seed (combined with the person's id).
    step_s, start : float
        Spacing and time of the first observation (default 07:00 of day 0).
    strength, noise : float
        Classifier logits are ``strength * onehot(true emotion) + N(0, noise²)``.
    """
    rng = np.random.default_rng([seed, profile.user_id, 0])
    emotions = np.zeros(observations, dtype=int)
    current = int(rng.choice(NUM_CLASSES, p=profile.base_rates))
    in_episode = False
    for i in range(observations):
        if in_episode:
            in_episode = rng.random() < 0.98  # episodes last about 50 observations
        elif rng.random() < profile.distress_rate:
            in_episode, current = True, int(rng.choice(_DISTRESS))
        elif rng.random() > profile.persistence:
            current = int(rng.choice(NUM_CLASSES, p=profile.base_rates))
        emotions[i] = current
    logits = strength * np.eye(NUM_CLASSES)[emotions] + rng.normal(
        0.0, noise, (observations, NUM_CLASSES)
    )
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # (N, 7)
    timestamps = start + step_s * np.arange(observations, dtype=float)
    return Episode(timestamps=timestamps, emotions=emotions, observations=probabilities)


OBSERVATIONS_PER_DECISION = 3  # a decision every 15 min after three 5-min observations


@dataclass(frozen=True, eq=False)
class Outcome:
    """One policy played against one person."""

    rewards: np.ndarray  # (T,) expected reward of each decision
    regret: np.ndarray  # (T,) oracle's expected reward minus the policy's
    actions: tuple[str, ...]  # (T,) chosen actions
    rules: tuple[str | None, ...]  # (T,) rule that fired at each decision


def run_policy(policy: Policy, profile: UserProfile, *, decisions: int, seed: int) -> Outcome:
    """Play ``policy`` against one simulated person for ``decisions`` decisions.

    Before each decision the policy observes three noisy classifier outputs; the oracle picks
    the action of highest expected reward for the person's true emotion among those the
    policy's safety rules allow at that moment (only the safety action when the distress
    rule fires), so regret is what learning could still win, never what safety costs. The
    person's sampled response goes back to the policy as feedback. Rewards are expectations
    under the policy's ``feedback.rewards``, free of response-sampling noise.
    """
    config = policy.config
    quiet, rewards = config.safety.quiet_action, config.feedback.rewards
    episode = simulate_episode(profile, observations=decisions * OBSERVATIONS_PER_DECISION, seed=seed)
    user = SimulatedUser(profile, seed=seed)
    gained, regret = np.zeros(decisions), np.zeros(decisions)
    actions: list[str] = []
    rules: list[str | None] = []
    for k in range(decisions):
        last = (k + 1) * OBSERVATIONS_PER_DECISION - 1
        for j in range(k * OBSERVATIONS_PER_DECISION, last + 1):
            policy.observe(episode.observations[j], episode.timestamps[j])
        t, emotion = float(episode.timestamps[last]), int(episode.emotions[last])
        allowed = policy.constraints(t).allowed(policy.actions)
        best = max(user.expected_reward(a, emotion, rewards, quiet_action=quiet) for a in allowed)
        decision = policy.decide(t)
        gained[k] = user.expected_reward(decision.action, emotion, rewards, quiet_action=quiet)
        regret[k] = best - gained[k]
        actions.append(decision.action)
        rules.append(decision.rule)
        policy.feedback(decision.id, user.respond(decision.action, emotion, quiet_action=quiet))
    return Outcome(rewards=gained, regret=regret, actions=tuple(actions), rules=tuple(rules))


# The simulated devices' part in the policy phase (client.app, simulation only).

def person_index(device_id: str) -> int:
    """The simulated person of a device: its partition number, or a hash of its name."""
    return int(device_id) if device_id.isdigit() else zlib.crc32(device_id.encode())


def simulated_person(cfg: EmofedConfig, device_id: str) -> UserProfile:
    """The hidden preferences of the person a simulated device belongs to (seeded by the run)."""
    config = policy_config(cfg)
    return make_population(
        1, config.action_names, seed=cfg.seed, quiet_action=config.safety.quiet_action,
        first_id=person_index(device_id),
    )[0]


def history_statistics(cfg: EmofedConfig, person: UserProfile) -> PolicyStatistics:
    """The statistics a simulated device has gathered: ``policy.history`` decisions of local LinUCB."""
    config = policy_config(cfg)
    local = replace(config, bandit=replace(config.bandit, kind="linucb", learn=True))
    policy = Policy(local, bank=message_bank(cfg.policy.config_dir))
    run_policy(policy, person, decisions=cfg.policy.history, seed=cfg.seed)
    return policy.local_statistics()


def evaluate_policies(cfg: EmofedConfig, prior: PolicyStatistics, person: UserProfile) -> dict[str, float]:
    """Play the four policies against ``person`` on the same fresh days; their metrics.

    Keys ``policy-<variant>-<reward|regret|regret-first|regret-last|interventions>``:
    cumulative expected reward and regret over ``policy.decisions`` decisions, the regret
    of the first and last :data:`FIRST_LAST_WINDOW` of them, and the interventions made.
    Regret is against an oracle that knows the true emotion and the person's hidden
    preferences and picks among the actions the safety rules allow at that moment.
    """
    quiet = policy_config(cfg).safety.quiet_action
    bank = message_bank(cfg.policy.config_dir)
    window = min(FIRST_LAST_WINDOW, cfg.policy.decisions)
    metrics: dict[str, float] = {}
    for name, (config, variant_prior) in variants(policy_config(cfg), prior).items():
        outcome = run_policy(
            Policy(config, prior=variant_prior, bank=bank), person, decisions=cfg.policy.decisions,
            seed=cfg.seed + 1,  # days the history never saw
        )
        metrics[f"policy-{name}-reward"] = float(outcome.rewards.sum())
        metrics[f"policy-{name}-regret"] = float(outcome.regret.sum())
        metrics[f"policy-{name}-regret-first"] = float(outcome.regret[:window].sum())
        metrics[f"policy-{name}-regret-last"] = float(outcome.regret[-window:].sum())
        metrics[f"policy-{name}-interventions"] = float(sum(a != quiet for a in outcome.actions))
    return metrics
