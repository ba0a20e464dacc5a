"""The personalised emotion-management policy of one device: state, bandit, safety rules.

A :class:`Policy` watches the fused emotion probabilities (:meth:`Policy.observe`), and on
:meth:`Policy.decide` lets a contextual bandit (``policy.state``) rank the actions of
``configs/policy/actions.yaml``, then applies rules that learning cannot override:

1. ``sustained_distress``: when the smoothed mass of the distress emotions has stayed at or
   above ``distress_threshold`` for ``distress_duration_s``, the safety action (support
   resources) is shown, at most once per ``distress_repeat_s``. This overrides the bandit,
   the rate limit, cool-downs and the person's switches. Switching support resources off is
   respected everywhere else, but not here: in sustained distress support information is the
   one thing neither learning nor a setting removes. The decision records the rule.
2. ``switched_off``: the person turned the action off.
3. ``rate_limit``: ``max_per_hour`` interventions in the last hour already.
4. ``min_gap``: the last intervention was less than ``min_gap_s`` ago.
5. ``cooldown``: this action was shown less than its ``cooldown_s`` ago.
6. ``not_meant_for``: the smoothed mass of the emotions the action is meant for is below
   ``min_emotion_fit`` (no breathing exercise for a happy person).

Rules 2-6 remove actions; the best-scoring action left is chosen (the quiet action,
``no_action``, is never removed and never counts as an intervention). ``Decision.rule`` is
the rule that fired: the distress rule, or the rule that removed the bandit's first choice;
None when the bandit's first choice stood. Each decision carries a message from the bank and
an avatar expression (``policy.expression``). Feedback (``helped``, ``accepted``,
``dismissed``, no response, or the change in valence afterwards) is mapped to a reward that
updates the bandit. The whole state round-trips through a JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from emofed.config import (
    ConfigError,
    check_subset,
    check_values,
    merge_layers,
    one_line_error,
    open_schema,
    read_layers,
)
from models.labels import EMOTIONS
from policy.expression import (
    AvatarExpressions,
    ExpressionConfig,
    MessageBank,
    MessageConfig,
    MiniLMEncoder,
    TextEmbedder,
    check_expression_config,
    check_message_config,
)
from policy.state import (
    BANDITS,
    BanditConfig,
    EmotionTracker,
    PolicyStatistics,
    StateConfig,
    affect,
    build_bandit,
    features,
)

__all__ = [
    "POLICY_CONFIG_DIR",
    "RULES",
    "ActionSpec",
    "Constraints",
    "Decision",
    "FeedbackConfig",
    "Policy",
    "PolicyConfig",
    "SafetyConfig",
    "load_policy_config",
]

logger = logging.getLogger(__name__)

POLICY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "policy"
POLICY_FILES = ("actions.yaml", "messages.yaml", "expressions.yaml")
RULES = ("sustained_distress", "switched_off", "rate_limit", "min_gap", "cooldown", "not_meant_for")
STATE_VERSION = 1


@dataclass(frozen=True)
class ActionSpec:
    """One action of the catalogue."""

    name: str = ""
    description: str = ""  # plain words, also the message query's action part
    emotions: tuple[str, ...] = ()  # the emotions it is meant for
    cooldown_s: float = 0.0  # not shown again within this many seconds

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "emotions", tuple(self.emotions))


@dataclass(frozen=True)
class SafetyConfig:
    """Rules applied after the bandit, which learning cannot override."""

    safety_action: str = "support_resources"
    quiet_action: str = "no_action"
    distress_emotions: tuple[str, ...] = ("sad", "fearful", "angry")
    distress_threshold: float = 0.6  # smoothed mass of distress_emotions
    distress_duration_s: float = 1800.0  # sustained this long before the rule fires
    distress_repeat_s: float = 7200.0  # the rule shows support at most once per this
    max_per_hour: int = 2  # interventions in any 3600 s
    min_gap_s: float = 900.0  # between two interventions
    min_emotion_fit: float = 0.2  # smoothed mass of an action's emotions needed to offer it

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "distress_emotions", tuple(self.distress_emotions))


@dataclass(frozen=True)
class FeedbackConfig:
    """How feedback becomes a reward."""

    rewards: dict[str, float] = field(default_factory=dict)  # response -> reward; "none": no response
    mood_weight: float = 1.0  # reward per unit of valence change after the decision
    reward_bound: float = 1.0  # rewards are clipped to [-bound, bound] (bounds the sensitivity)


@dataclass(frozen=True)
class PolicyConfig:
    """Everything in ``configs/policy/``: catalogue, state, safety, bandit, feedback, expression."""

    actions: tuple[ActionSpec, ...] = ()
    state: StateConfig = field(default_factory=StateConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    bandit: BanditConfig = field(default_factory=BanditConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    messages: MessageConfig = field(default_factory=MessageConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)

    def __post_init__(self) -> None:
        """Store lists read from YAML as tuples."""
        object.__setattr__(self, "actions", tuple(self.actions))

    @property
    def action_names(self) -> tuple[str, ...]:
        """Action names in catalogue order (the bandit's arm order)."""
        return tuple(a.name for a in self.actions)


# Allowed values, checked once at the edge by emofed.config's checks. Ranges are inclusive.
_CHOICES: dict[str, tuple[str, ...]] = {"bandit.kind": tuple(BANDITS)}
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "state.half_life_s": (1.0, 1e7),
    "state.utc_offset_s": (-86_400, 86_400),
    "state.recency_scale_s": (1.0, 1e7),
    "safety.distress_threshold": (0.0, 1.0),
    "safety.distress_duration_s": (0.0, 1e7),
    "safety.distress_repeat_s": (0.0, 1e8),
    "safety.max_per_hour": (1, 3600),
    "safety.min_gap_s": (0.0, 86_400.0),
    "safety.min_emotion_fit": (0.0, 1.0),
    "bandit.alpha": (0.0, 100.0),
    "bandit.ridge": (1e-6, 1e6),
    "bandit.prior_weight": (0.0, 1e6),
    "bandit.seed": (0, 2**32 - 1),
    "bandit.max_pending": (1, 100_000),
    "feedback.mood_weight": (0.0, 100.0),
    "feedback.reward_bound": (1e-6, 1e6),
    "messages.tag_weight": (0.0, 10.0),
    "messages.dismissed_penalty": (0.0, 10.0),
    "messages.recent_penalty": (0.0, 10.0),
    "messages.recent_window": (0, 1000),
    "expression.emotion_weight": (0.0, 10.0),
    "expression.action_weight": (0.0, 10.0),
}


def _check(cfg: PolicyConfig) -> None:
    """Cross-references that types and ranges alone cannot express."""
    names = cfg.action_names
    if not names or len(set(names)) != len(names) or not all(names):
        raise ConfigError(
            f"'actions' must be a non-empty list of uniquely named actions. Found {list(names)}."
        )
    for action in cfg.actions:
        check_subset(f"actions.{action.name}.emotions", action.emotions, EMOTIONS)
        if action.cooldown_s < 0:
            raise ConfigError(
                f"'actions.{action.name}.cooldown_s' must be >= 0. Found {action.cooldown_s}."
            )
    safety = cfg.safety
    check_subset("safety.quiet_action", [safety.quiet_action], names)
    check_subset("safety.safety_action", [safety.safety_action], names)
    if safety.quiet_action == safety.safety_action:
        raise ConfigError(
            f"'safety.safety_action' must differ from the quiet action. Found {safety.safety_action!r}."
        )
    if not safety.distress_emotions:
        raise ConfigError("'safety.distress_emotions' must name at least one emotion. Found [].")
    check_subset("safety.distress_emotions", safety.distress_emotions, EMOTIONS)
    bound, rewards = cfg.feedback.reward_bound, cfg.feedback.rewards
    if "none" not in rewards:
        raise ConfigError(
            f"'feedback.rewards' must give the reward of 'none' (no response). Found {dict(rewards)}."
        )
    for response, reward in rewards.items():
        if not -bound <= reward <= bound:
            raise ConfigError(
                f"'feedback.rewards.{response}' must be in [{-bound}, {bound}]. Found {reward}."
            )
    check_message_config(cfg.messages, names, quiet_action=safety.quiet_action)
    check_expression_config(cfg.expression, names)


def load_policy_config(
    directory: str | Path | None = None, overrides: Sequence[str] = ()
) -> PolicyConfig:
    """Read ``actions.yaml``, ``messages.yaml`` and ``expressions.yaml`` into a validated config.

    The same path as :func:`emofed.config.load_config`: YAML layers and ``key=value``
    overrides merged into the structured config, then choices and ranges, then the
    cross-references.

    Parameters
    ----------
    directory : str or Path, optional
        Folder holding the three files; None: ``configs/policy``.
    overrides : sequence of str
        Dotted ``key=value`` overrides applied last (``safety.max_per_hour=3``).

    Returns
    -------
    PolicyConfig
        The frozen, validated configuration.

    Raises
    ------
    ConfigError
        (a ``ValueError``) On a missing file, an unknown key, a wrong type or a value out
        of range; one line naming the key, what is allowed and the value found.
    """
    directory = Path(directory) if directory is not None else POLICY_CONFIG_DIR
    layers = read_layers([directory / name for name in POLICY_FILES], overrides)
    merged = merge_layers(open_schema(PolicyConfig), layers, PolicyConfig)
    check_values(merged, choices=_CHOICES, ranges=_RANGES)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise one_line_error(err, str(directory), PolicyConfig) from None
    if not isinstance(cfg, PolicyConfig):  # pragma: no cover - omegaconf contract
        raise ConfigError("policy configuration did not resolve to PolicyConfig")
    _check(cfg)
    return cfg


@dataclass(frozen=True)
class Decision:
    """One decision of the policy; JSON-serialisable through :meth:`to_dict`."""

    id: int
    action: str
    rule: str | None  # a name in RULES, or None when the bandit's first choice stood
    message: str | None  # None for the quiet action, which shows nothing
    message_id: str | None
    expression: dict[str, float]  # avatar blendshape -> weight in [0, 1]
    probabilities: dict[str, float]  # smoothed, emotion -> probability
    valence: float
    arousal: float
    timestamp: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Constraints:
    """What the safety rules allow at one moment."""

    forced: str | None  # the safety action, when the distress rule fires now
    blocked: dict[str, str]  # action -> the first rule that removes it now

    def allowed(self, actions: Sequence[str]) -> tuple[str, ...]:
        """The actions the bandit may choose from (only ``forced`` when set)."""
        if self.forced is not None:
            return (self.forced,)
        return tuple(a for a in actions if a not in self.blocked)


class Policy:
    """One device's emotion-management policy.

    Parameters
    ----------
    config : PolicyConfig
        From :func:`load_policy_config`.
    prior : PolicyStatistics, optional
        Federated prior (``policy.release.aggregate_priors``); None: learn from scratch.
    bank : MessageBank, optional
        A message bank already embedded (share one between policies); None builds one.
    encoder : callable, optional
        ``texts -> (N, E)`` embeddings for building the bank; None: the packaged MiniLM.
    state : Mapping, optional
        A :meth:`state_dict` to resume from.
    """

    def __init__(
        self,
        config: PolicyConfig,
        *,
        prior: PolicyStatistics | None = None,
        bank: MessageBank | None = None,
        encoder: TextEmbedder | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.actions = config.action_names
        self._index = {name: i for i, name in enumerate(self.actions)}
        self._specs = {a.name: a for a in config.actions}
        if bank is None:
            descriptions = {a.name: a.description for a in config.actions}
            bank = MessageBank(
                config.messages, descriptions, encoder if encoder is not None else MiniLMEncoder()
            )
        self.bank = bank
        self.avatar = AvatarExpressions(config.expression, self.actions)
        self._distress = np.array([e in config.safety.distress_emotions for e in EMOTIONS], dtype=float)
        self._fit = {
            a.name: np.array([e in a.emotions for e in EMOTIONS], dtype=float) for a in config.actions
        }
        self.tracker = EmotionTracker(config.state.half_life_s)
        # Doing nothing earns exactly the no-response reward: a known value, not an arm to learn.
        quiet = {config.safety.quiet_action: config.feedback.rewards["none"]}
        self.bandit = build_bandit(self.actions, config.bandit, prior, fixed=quiet)
        self._step = 0
        self._distress_since: float | None = None
        self._last_decision: float | None = None
        self._interventions: list[float] = []
        self._last_shown: dict[str, float] = {}
        self._last_intervention: float | None = None
        self._last_support: float | None = None
        self._pending: dict[int, dict[str, Any]] = {}
        self._dismissed: dict[str, int] = {}
        self._recent: list[str] = []
        self._off: set[str] = set()
        if state is not None:
            self.load_state_dict(state)

    # -- settings -------------------------------------------------------------------------

    @property
    def switched_off(self) -> tuple[str, ...]:
        """Actions the person switched off, in catalogue order."""
        return tuple(a for a in self.actions if a in self._off)

    def set_enabled(self, action: str, enabled: bool) -> None:
        """Switch an action on or off for this person.

        Raises
        ------
        ValueError
            If the action is unknown or is the quiet action (it cannot be switched off).
        """
        if action not in self._index:
            raise ValueError(f"Unknown action {action!r}; known: {', '.join(self.actions)}.")
        if action == self.config.safety.quiet_action and not enabled:
            raise ValueError(f"The quiet action {action!r} cannot be switched off.")
        (self._off.discard if enabled else self._off.add)(action)

    def set_prior(self, prior: PolicyStatistics | None) -> None:
        """Adopt a new federated prior; local statistics are kept."""
        self.bandit.set_prior(prior)

    def local_statistics(self) -> PolicyStatistics:
        """The device's sufficient statistics since the prior: what it may share, once privatised."""
        return self.bandit.statistics()

    # -- observing and deciding -----------------------------------------------------------

    def observe(self, probabilities: Sequence[float] | np.ndarray, timestamp: float) -> np.ndarray:
        """Fold fused emotion probabilities (7,) at ``timestamp`` into the trajectory.

        Returns the smoothed probabilities.

        Raises
        ------
        ValueError
            If the probabilities are not a distribution over EMOTIONS or time goes back.
        """
        smoothed = self.tracker.update(probabilities, timestamp)
        if float(smoothed @ self._distress) >= self.config.safety.distress_threshold:
            if self._distress_since is None:
                self._distress_since = float(timestamp)
        else:
            self._distress_since = None
        return smoothed

    def _smoothed(self) -> np.ndarray:
        p = self.tracker.probabilities
        if p is None:
            raise ValueError("The policy has no emotion observation yet; call observe() first.")
        return p

    def constraints(self, timestamp: float) -> Constraints:
        """Apply the safety rules to the current state at ``timestamp``."""
        safety = self.config.safety
        t = float(timestamp)
        p = self._smoothed()
        distressed = (
            self._distress_since is not None and t - self._distress_since >= safety.distress_duration_s
        )
        repeat_ok = self._last_support is None or t - self._last_support >= safety.distress_repeat_s
        if distressed and repeat_ok:
            return Constraints(forced=safety.safety_action, blocked={})
        in_last_hour = sum(1 for s in self._interventions if t - s < 3600.0)
        blocked: dict[str, str] = {}
        for name in self.actions:
            if name == safety.quiet_action:
                continue
            last = self._last_shown.get(name)
            if name in self._off:
                blocked[name] = "switched_off"
            elif in_last_hour >= safety.max_per_hour:
                blocked[name] = "rate_limit"
            elif self._last_intervention is not None and t - self._last_intervention < safety.min_gap_s:
                blocked[name] = "min_gap"
            elif last is not None and t - last < self._specs[name].cooldown_s:
                blocked[name] = "cooldown"
            elif float(p @ self._fit[name]) < safety.min_emotion_fit:
                blocked[name] = "not_meant_for"
        return Constraints(forced=None, blocked=blocked)

    def decide(
        self, timestamp: float, probabilities: Sequence[float] | np.ndarray | None = None
    ) -> Decision:
        """Choose what to do now: bandit first, then the safety rules.

        Parameters
        ----------
        timestamp : float
            Unix seconds; not earlier than the previous decision.
        probabilities : array-like, optional
            A fresh observation to fold in first.

        Raises
        ------
        ValueError
            If there is no observation yet or time goes back.
        """
        t = float(timestamp)
        if probabilities is not None:
            self.observe(probabilities, t)
        if self._last_decision is not None and t < self._last_decision:
            raise ValueError(f"Decisions must be in time order; {t} is before {self._last_decision}.")
        p = self._smoothed()
        safety = self.config.safety
        x = features(p, timestamp=t, last_intervention=self._last_intervention, config=self.config.state)
        scores = self.bandit.scores(x, step=self._step)  # (K,)
        constraints = self.constraints(t)
        if constraints.forced is not None:
            action, rule = constraints.forced, "sustained_distress"
        else:
            allowed = constraints.allowed(self.actions)
            action = max(allowed, key=lambda a: (scores[self._index[a]], -self._index[a]))
            first = self.actions[int(np.argmax(scores))]
            rule = constraints.blocked.get(first)
        message = None
        if action != safety.quiet_action:
            self._interventions = [s for s in self._interventions if t - s < 3600.0] + [t]
            self._last_shown[action] = t
            self._last_intervention = t
            if action == safety.safety_action:
                self._last_support = t
            weights = p * self._distress if rule == "sustained_distress" else p
            emotion = EMOTIONS[int(np.argmax(weights))]
            message = self.bank.select(emotion, action, dismissed=self._dismissed, recent=self._recent)
            if message is not None and self.config.messages.recent_window > 0:
                self._recent = [*self._recent, message.id][-self.config.messages.recent_window :]
        valence, arousal = affect(p)
        decision = Decision(
            id=self._step,
            action=action,
            rule=rule,
            message=None if message is None else message.text,
            message_id=None if message is None else message.id,
            expression=self.avatar(p, action),
            probabilities=dict(zip(EMOTIONS, p.tolist(), strict=True)),
            valence=valence,
            arousal=arousal,
            timestamp=t,
        )
        self._pending[self._step] = {
            "action": action,
            "features": x.tolist(),
            "valence": valence,
            "message_id": decision.message_id,
        }
        while len(self._pending) > self.config.bandit.max_pending:
            del self._pending[next(iter(self._pending))]
        self._step += 1
        self._last_decision = t
        if rule is not None:
            logger.debug("Decision %d: %s (rule %s)", decision.id, action, rule)
        return decision

    def feedback(
        self, decision_id: int, response: str | None = None, *, valence_after: float | None = None
    ) -> float:
        """Learn from what followed a decision; return the reward used.

        Parameters
        ----------
        decision_id : int
            ``Decision.id`` of a recent decision (the last ``bandit.max_pending`` are kept).
        response : str, optional
            A key of ``feedback.rewards`` (``helped``, ``accepted``, ``dismissed``, ...);
            None means no response (``"none"``).
        valence_after : float, optional
            Valence some time later; adds ``mood_weight * (valence_after - valence)``.

        Raises
        ------
        ValueError
            If the decision is unknown or expired, or the response is not in the mapping.
        """
        rewards = self.config.feedback.rewards
        key = "none" if response is None else response
        if key not in rewards:
            raise ValueError(f"Unknown response {response!r}; known: {', '.join(rewards)}.")
        pending = self._pending.pop(decision_id, None)
        if pending is None:
            raise ValueError(f"Decision {decision_id} is unknown or expired (no pending feedback).")
        reward = rewards[key]
        if valence_after is not None:
            reward += self.config.feedback.mood_weight * (float(valence_after) - pending["valence"])
        bound = self.config.feedback.reward_bound
        reward = float(np.clip(reward, -bound, bound))
        if key == "dismissed" and pending["message_id"] is not None:
            self._dismissed[pending["message_id"]] = self._dismissed.get(pending["message_id"], 0) + 1
        if self.config.bandit.learn:
            self.bandit.update(self._index[pending["action"]], np.asarray(pending["features"]), reward)
        return reward

    # -- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything this policy learnt and counted, as a plain JSON-able dict."""
        return {
            "version": STATE_VERSION,
            "actions": list(self.actions),
            "tracker": self.tracker.state_dict(),
            "bandit": self.bandit.state_dict(),
            "step": self._step,
            "distress_since": self._distress_since,
            "last_decision": self._last_decision,
            "interventions": list(self._interventions),
            "last_shown": dict(self._last_shown),
            "last_intervention": self._last_intervention,
            "last_support": self._last_support,
            "pending": [{"id": i, **entry} for i, entry in self._pending.items()],
            "dismissed": dict(self._dismissed),
            "recent_messages": list(self._recent),
            "switched_off": list(self.switched_off),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly.

        Raises
        ------
        ValueError
            If the state has another version or was saved for another action catalogue.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Policy state version must be {STATE_VERSION}. Found {state.get('version')!r}."
            )
        if tuple(state["actions"]) != self.actions:
            raise ValueError(
                f"Policy state was saved for actions {state['actions']}, not {list(self.actions)}."
            )
        self.tracker.load_state_dict(state["tracker"])
        self.bandit.load_state_dict(state["bandit"])
        self._step = int(state["step"])
        self._distress_since = state["distress_since"]
        self._last_decision = state["last_decision"]
        self._interventions = [float(s) for s in state["interventions"]]
        self._last_shown = {k: float(v) for k, v in state["last_shown"].items()}
        self._last_intervention = state["last_intervention"]
        self._last_support = state["last_support"]
        self._pending = {
            int(e["id"]): {k: e[k] for k in ("action", "features", "valence", "message_id")}
            for e in state["pending"]
        }
        self._dismissed = {k: int(v) for k, v in state["dismissed"].items()}
        self._recent = [str(m) for m in state["recent_messages"]]
        self._off = set(state["switched_off"])
