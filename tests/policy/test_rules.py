"""Tests of the emotion-management policy: config, safety rules, learning, DP statistics, expression."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from emofed.config import ConfigError
from models.labels import EMOTIONS
from policy.expression import (
    AvatarExpressions,
    HashingEncoder,
    MessageBank,
    MessageConfig,
    MessageSpec,
    MiniLMEncoder,
)
from policy.release import aggregate_priors, clip_statistics, privatise_statistics
from policy.rules import POLICY_CONFIG_DIR, Decision, Policy, PolicyConfig, load_policy_config
from policy.state import (
    CIRCUMPLEX,
    FEATURE_NAMES,
    FEATURE_NORM_BOUND,
    EmotionTracker,
    PolicyStatistics,
    affect,
    features,
)
from privacy.accounting import PrivacyEvent, compute_epsilon
from simulations.users import make_population, run_policy

ACTIONS = (
    "no_action",
    "breathing_exercise",
    "suggest_break",
    "calming_music",
    "uplifting_content",
    "reach_out_friend",
    "support_resources",
)
HOUR = 3600.0


def _make_config(*overrides: str) -> PolicyConfig:
    return load_policy_config(overrides=list(overrides))


def _make_policy(config: PolicyConfig | None = None, **kwargs: object) -> Policy:
    config = config or _make_config()
    return Policy(config, encoder=HashingEncoder(), **kwargs)


def _probs(**mass: float) -> np.ndarray:
    """A distribution over EMOTIONS: the given masses, the rest spread evenly."""
    p = np.zeros(len(EMOTIONS))
    for name, value in mass.items():
        p[EMOTIONS.index(name)] = value
    rest = [i for i, name in enumerate(EMOTIONS) if name not in mass]
    p[rest] = (1.0 - p.sum()) / len(rest)
    return p


def _make_stats(seed: int, dim: int = len(FEATURE_NAMES), n: int = 40) -> PolicyStatistics:
    rng = np.random.default_rng(seed)
    stats = PolicyStatistics.zeros(ACTIONS, dim)
    for _ in range(n):
        a = int(rng.integers(len(ACTIONS)))
        x = rng.random(dim)
        stats.xx[a] += np.outer(x, x)
        stats.rx[a] += rng.uniform(-1, 1) * x
    return stats


def _train(policy: Policy, x: np.ndarray, reward_of: dict[str, float], times: int = 200) -> None:
    for _ in range(times):
        for name, reward in reward_of.items():
            policy.bandit.update(policy.actions.index(name), x, reward)


def _context(policy: Policy, p: np.ndarray, t: float) -> np.ndarray:
    return features(p, timestamp=t, last_intervention=None, config=policy.config.state)


# -- configuration ------------------------------------------------------------------------


def test_default_config_loads_the_catalogue():
    """The shipped configs load into the seven actions with messages for every non-quiet one."""
    config = _make_config()
    assert config.action_names == ACTIONS
    assert config.safety.safety_action == "support_resources"
    counts = {a: sum(m.action == a for m in config.messages.bank) for a in ACTIONS[1:]}
    assert min(counts.values()) >= 5
    assert config.feedback.rewards == {"helped": 1.0, "accepted": 0.5, "none": 0.0, "dismissed": -0.5}
    assert set(config.expression.emotions) == set(EMOTIONS)


@pytest.mark.parametrize(
    ("override", "error", "named"),
    [
        ("safety.max_per_hourr=3", ValueError, "max_per_hourr"),
        ("bandit.alpha=wide", ConfigError, "bandit.alpha"),
        ("safety.max_per_hour=many", ConfigError, "safety.max_per_hour"),
        ("safety.distress_threshold=1.5", ValueError, "safety.distress_threshold"),
        ("bandit.kind=ucb2", ValueError, "bandit.kind"),
        ("safety.safety_action=hug", ValueError, "safety.safety_action"),
        ("feedback.rewards.helped=3", ValueError, "feedback.rewards.helped"),
        ("messages.tag_weight=11", ConfigError, "'messages.tag_weight' must be in [0.0, 10.0]. Found 11"),
        ("expression.action_weight=-1", ConfigError, "'expression.action_weight' must be in [0.0, 10.0]"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(override, error, named):
    """Unknown keys, wrong types and out-of-range values raise one line naming the key."""
    with pytest.raises(error) as info:
        _make_config(override)
    message = str(info.value)
    assert named in message
    assert "\n" not in message


def test_policy_errors_read_like_the_main_loader():
    """The catalogue goes through emofed.config's path: same ConfigError wording as load_config."""
    with pytest.raises(ConfigError, match=r"^override 'bandit.alpha=wide': bad value for 'bandit.alpha': "):
        _make_config("bandit.alpha=wide")
    with pytest.raises(ConfigError) as info:
        _make_config("safety.max_per_hourr=3")
    assert str(info.value).startswith("override 'safety.max_per_hourr=3': unknown key 'safety.max_per_hourr' ")
    assert "(known keys under 'safety': " in str(info.value) and "max_per_hour," in str(info.value)
    with pytest.raises(ConfigError, match=r"^'bandit.kind' must be one of linucb, random. Found 'ucb2'.$"):
        _make_config("bandit.kind=ucb2")


def test_unknown_key_in_an_action_of_the_yaml(tmp_path: Path):
    """A misspelt key inside the action list of actions.yaml is named, with the known keys."""
    for path in POLICY_CONFIG_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    actions = tmp_path / "actions.yaml"
    actions.write_text(actions.read_text().replace("    cooldown_s: 1800", "    cooldown: 1800", 1))
    with pytest.raises(ConfigError, match="unknown key 'cooldown'.*ActionSpec.*cooldown_s"):
        load_policy_config(tmp_path)


def test_unknown_emotion_in_an_action_is_rejected(tmp_path: Path):
    """An action meant for an emotion outside the shared label set is a ValueError naming it."""
    for path in POLICY_CONFIG_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    actions = tmp_path / "actions.yaml"
    actions.write_text(
        actions.read_text().replace("emotions: [fearful, angry, surprised]", "emotions: [bored]")
    )
    with pytest.raises(ValueError, match="actions.breathing_exercise.emotions.*'bored'"):
        load_policy_config(tmp_path)


# -- safety rules -------------------------------------------------------------------------


def test_distress_surfaces_support_against_a_bandit_trained_the_other_way():
    """Trained to do nothing under distress, the policy still shows support once distress is sustained."""
    policy = _make_policy()
    distress = _probs(sad=0.5, fearful=0.3, angry=0.1)
    x = _context(policy, distress, 0.0)
    _train(policy, x, dict.fromkeys(ACTIONS[1:], -1.0))
    assert policy.actions[int(np.argmax(policy.bandit.scores(x, step=0)))] == "no_action"
    t, first = 0.0, None
    for _ in range(12):  # 1 h of observations every 5 min
        policy.observe(distress, t)
        decision = policy.decide(t)
        if decision.rule == "sustained_distress":
            first = first if first is not None else decision
        t += 300.0
    assert first is not None and first.action == "support_resources"
    assert first.timestamp >= policy.config.safety.distress_duration_s
    assert first.message_id is not None and first.message_id.startswith("support-")


def test_distress_needs_the_configured_duration():
    """Below the duration the distress rule does not fire and the trained bandit's choice stands."""
    policy = _make_policy()
    distress = _probs(sad=0.5, fearful=0.3, angry=0.1)
    _train(policy, _context(policy, distress, 0.0), dict.fromkeys(ACTIONS[1:], -1.0))
    for t in np.arange(0.0, 1500.0, 300.0):
        decision = policy.decide(float(t), distress)
        assert decision.action == "no_action"
        assert decision.rule is None


def test_distress_shows_support_even_when_switched_off():
    """Switching support resources off stops the bandit, not the distress rule (documented choice)."""
    policy = _make_policy()
    policy.set_enabled("support_resources", False)
    distress = _probs(sad=0.6, fearful=0.3)
    actions = [policy.decide(t, distress).action for t in np.arange(0.0, 2 * HOUR, 300.0)]
    assert "support_resources" in actions
    calm = _probs(neutral=0.9)
    _train(policy, _context(policy, calm, 5 * HOUR), {"support_resources": 1.0})
    later = [policy.decide(t, calm).action for t in np.arange(5 * HOUR, 10 * HOUR, 900.0)]
    assert "support_resources" not in later


@pytest.mark.parametrize("action", ["breathing_exercise", "calming_music", "support_resources"])
def test_switched_off_action_is_never_chosen(action):
    """An action the person switched off is never chosen, however much the bandit likes it."""
    policy = _make_policy()
    fearful = _probs(fearful=0.45, neutral=0.35)  # fits every tested action, below distress
    _train(policy, _context(policy, fearful, 0.0), {action: 1.0})
    policy.set_enabled(action, False)
    decisions = [policy.decide(t, fearful) for t in np.arange(0.0, 12 * HOUR, 900.0)]
    assert all(d.action != action for d in decisions)
    assert any(d.rule == "switched_off" for d in decisions)
    assert any(d.action != "no_action" for d in decisions)


def test_rate_limit_min_gap_and_cooldowns_hold():
    """However eager the bandit, interventions respect max per hour, the minimum gap and cool-downs."""
    policy = _make_policy()
    config = policy.config
    rng = np.random.default_rng(0)
    shown: list[tuple[float, str]] = []
    rules = set()
    for t in np.arange(0.0, 24 * HOUR, 120.0):
        p = rng.dirichlet(np.ones(len(EMOTIONS)))
        x = _context(policy, p, float(t))
        _train(policy, x, dict.fromkeys(ACTIONS[1:], 1.0), times=1)
        decision = policy.decide(float(t), p)
        rules.add(decision.rule)
        if decision.action != "no_action":
            shown.append((decision.timestamp, decision.action))
    times = np.array([s for s, _ in shown])
    assert len(times) > 10
    assert np.all(np.diff(times) >= config.safety.min_gap_s)
    for s in times:
        assert np.sum((times > s - HOUR) & (times <= s)) <= config.safety.max_per_hour
    cooldown = {a.name: a.cooldown_s for a in config.actions}
    for i, (s, a) in enumerate(shown):
        earlier = [u for u, b in shown[:i] if b == a]
        assert not earlier or s - earlier[-1] >= cooldown[a] or a == "support_resources"
    assert {"rate_limit", "min_gap"} <= rules


def test_quiet_action_cannot_be_switched_off():
    """Doing nothing must always stay possible."""
    with pytest.raises(ValueError, match="cannot be switched off"):
        _make_policy().set_enabled("no_action", False)


# -- learning -----------------------------------------------------------------------------


def test_regret_falls_with_feedback():
    """Learning from feedback: regret over the last 100 decisions is below that of the first 100."""
    config = _make_config()
    people = make_population(4, config.action_names, seed=7)
    bank = MessageBank(
        config.messages, {a.name: a.description for a in config.actions}, HashingEncoder()
    )
    outcomes = [
        run_policy(Policy(config, bank=bank), person, decisions=500, seed=7) for person in people
    ]
    first = np.mean([o.regret[:100].sum() for o in outcomes])
    last = np.mean([o.regret[-100:].sum() for o in outcomes])
    assert last < 0.8 * first
    assert all(np.all(o.regret >= -1e-12) for o in outcomes)


def test_feedback_rewards_follow_the_mapping():
    """Responses map to the configured rewards, mood change adds, and the sum is clipped."""
    policy = _make_policy()
    p = _probs(fearful=0.4, neutral=0.4)
    ids = [policy.decide(t, p).id for t in (0.0, 10.0, 20.0)]
    assert policy.feedback(ids[0], "accepted") == 0.5
    valence = affect(policy.tracker.probabilities)[0]
    assert policy.feedback(ids[1], "dismissed", valence_after=valence + 0.25) == pytest.approx(-0.25)
    assert policy.feedback(ids[2], "helped", valence_after=valence + 2.0) == 1.0
    with pytest.raises(ValueError, match="unknown or expired"):
        policy.feedback(ids[0], "helped")
    with pytest.raises(ValueError, match="Unknown response"):
        policy.feedback(policy.decide(30.0).id, "loved it")


# -- persistence --------------------------------------------------------------------------


def test_state_round_trips_exactly_through_json():
    """Export, JSON, import: the same state, and the same next decisions."""
    config = _make_config()
    people = make_population(1, config.action_names, seed=3)
    policy = _make_policy(config)
    run_policy(policy, people[0], decisions=60, seed=3)
    policy.set_enabled("calming_music", False)
    t = policy.state_dict()["last_decision"]
    for _ in range(10):  # sustained distress, answered with support, some decisions left pending
        t += 300.0
        policy.decide(t, _probs(sad=0.7, fearful=0.2))
    state = policy.state_dict()
    restored = _make_policy(config, state=json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    assert state["dismissed"] and state["switched_off"] == ["calming_music"]
    assert state["last_support"] is not None and state["distress_since"] is not None
    assert len(state["pending"]) == 10
    rng = np.random.default_rng(1)
    for _ in range(30):
        t += 600.0
        p = rng.dirichlet(np.ones(len(EMOTIONS)))
        a, b = policy.decide(t, p), restored.decide(t, p)
        assert a.to_dict() == b.to_dict()
        policy.feedback(a.id, "dismissed")
        restored.feedback(b.id, "dismissed")
    assert restored.state_dict() == policy.state_dict()


def test_decision_is_json_serialisable():
    """A decision survives JSON and carries valence, arousal and probabilities of the state."""
    decision = _make_policy().decide(0.0, _probs(happy=1.0))
    again = Decision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision
    assert decision.valence == pytest.approx(CIRCUMPLEX["happy"][0])
    assert decision.arousal == pytest.approx(CIRCUMPLEX["happy"][1])
    assert list(decision.probabilities) == list(EMOTIONS)


# -- state features -----------------------------------------------------------------------


def test_circumplex_matches_warriner_norms():
    """Valence and arousal are Warriner et al.'s 1-9 means, centred on 5 and scaled by 4."""
    assert affect(_probs(happy=1.0)) == pytest.approx(((8.47 - 5) / 4, (6.05 - 5) / 4))
    assert affect(_probs(sad=1.0)) == pytest.approx(((2.10 - 5) / 4, (3.49 - 5) / 4))
    mixed = affect(_probs(happy=0.5, angry=0.5))
    assert mixed == pytest.approx((((8.47 + 2.53) / 2 - 5) / 4, ((6.05 + 6.20) / 2 - 5) / 4))


def test_tracker_halves_weight_every_half_life():
    """After one half-life the old and the new observation weigh the same."""
    tracker = EmotionTracker(half_life_s=600.0)
    tracker.update(_probs(happy=1.0), 0.0)
    smoothed = tracker.update(_probs(sad=1.0), 600.0)
    assert smoothed == pytest.approx(0.5 * _probs(happy=1.0) + 0.5 * _probs(sad=1.0))
    with pytest.raises(ValueError, match="time order"):
        tracker.update(_probs(sad=1.0), 10.0)


def test_features_are_bounded():
    """Every feature vector has norm at most √5, the bound the sensitivity argument uses."""
    rng = np.random.default_rng(0)
    config = _make_config().state
    for _ in range(200):
        p = rng.dirichlet(np.full(len(EMOTIONS), 0.3))
        t = float(rng.uniform(0, 10 * 86_400))
        x = features(p, timestamp=t, last_intervention=t - rng.uniform(0, 7200), config=config)
        assert x.shape == (len(FEATURE_NAMES),)
        assert np.linalg.norm(x) <= FEATURE_NORM_BOUND + 1e-12
    worst = features(_probs(happy=1.0), timestamp=0.0, last_intervention=None, config=config)
    assert np.linalg.norm(worst) == pytest.approx(math.sqrt(1 + 0.8675**2 + 0.2625**2 + 1 + 1))


# -- differentially private statistics ----------------------------------------------------


@pytest.mark.parametrize("shares", [1, 4])
def test_privatise_adds_noise_of_the_right_scale(shares):
    """Empirical noise std over many draws is noise_multiplier * clip / √shares, and xx stays symmetric."""
    stats = clip_statistics(_make_stats(0), 1.0)
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(200):
        noised, params = privatise_statistics(
            stats, clip=2.0, noise_multiplier=1.5, rng=rng, shares=shares
        )
        assert np.array_equal(noised.xx, np.transpose(noised.xx, (0, 2, 1)))
        draws.append(noised.to_vector() - stats.to_vector())
    noise = np.array(draws)  # (200, D)
    expected = 1.5 * 2.0 / math.sqrt(shares)
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean()) < 0.01 * expected
    assert params["noise_stddev"] == 3.0
    assert params["device_noise_stddev"] == pytest.approx(expected)


def test_privatise_clips_to_the_norm_and_keeps_the_direction():
    """Statistics far above the clip come out at norm clip, same direction (no noise)."""
    stats = _make_stats(2)
    assert stats.norm() > 10.0
    clipped, _ = privatise_statistics(
        stats, clip=1.5, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    assert clipped.norm() == pytest.approx(1.5)
    cosine = clipped.to_vector() @ stats.to_vector() / (1.5 * stats.norm())
    assert cosine == pytest.approx(1.0)
    small = clip_statistics(stats, 10 * stats.norm())
    assert np.array_equal(small.to_vector(), stats.to_vector())


def test_mechanism_parameters_are_data_independent_and_accountable():
    """The ledger parameters do not depend on the data and make a valid PrivacyEvent."""
    rng = np.random.default_rng(0)
    _, a = privatise_statistics(_make_stats(3), clip=5.0, noise_multiplier=1.1, rng=rng)
    _, b = privatise_statistics(PolicyStatistics.zeros(ACTIONS), clip=5.0, noise_multiplier=1.1, rng=rng)
    assert a == b
    assert a["sensitivity"] == 5.0 and a["noise_multiplier"] == 1.1
    assert a["dimension"] == len(ACTIONS) * (14 * 15 // 2 + 14)
    epsilon = compute_epsilon([PrivacyEvent.from_dict(a)], delta=1e-5, accountant="dpa_pld")
    assert 2.0 < epsilon < 6.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"clip": 0.0, "noise_multiplier": 1.0}, ValueError),
        ({"clip": 1.0, "noise_multiplier": -1.0}, ValueError),
        ({"clip": 1.0, "noise_multiplier": 1.0, "shares": 0}, ValueError),
        ({"clip": 1.0, "noise_multiplier": 1.0, "rng": 3}, TypeError),
    ],
)
def test_privatise_rejects_bad_parameters(kwargs, error):
    """Bad privacy parameters are refused before any release."""
    kwargs = {"rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(error):
        privatise_statistics(_make_stats(0), **kwargs)


def test_aggregate_priors_averages_and_stays_psd():
    """Noise-free statistics average to the plain mean; noisy ones come out positive semi-definite."""
    a, b = _make_stats(4), _make_stats(5)
    prior = aggregate_priors([a, b])
    assert np.allclose(prior.xx, (a.xx + b.xx) / 2)
    assert np.allclose(prior.rx, (a.rx + b.rx) / 2)
    rng = np.random.default_rng(0)
    noisy = [privatise_statistics(s, clip=5.0, noise_multiplier=3.0, rng=rng)[0] for s in (a, b)]
    assert np.linalg.eigvalsh(noisy[0].xx).min() < 0
    prior = aggregate_priors(noisy, device_noise_stddev=15.0)
    assert np.linalg.eigvalsh(prior.xx).min() >= -1e-9
    with pytest.raises(ValueError, match="at least one device"):
        aggregate_priors([])
    with pytest.raises(ValueError, match="disagree"):
        aggregate_priors([a, PolicyStatistics.zeros(ACTIONS[:3])])


def test_prior_starts_the_bandit_where_the_population_is():
    """A device starting from a prior scores actions as the prior's data says, before any feedback."""
    config = _make_config()
    teacher = _make_policy(config)
    calm, sad = _probs(neutral=0.8), _probs(sad=0.7)
    _train(
        teacher, _context(teacher, sad, 0.0), {"uplifting_content": 1.0, "breathing_exercise": -0.5}, 50
    )
    prior = aggregate_priors([teacher.local_statistics()])
    student = _make_policy(config, prior=prior)
    scores = student.bandit.estimates(_context(student, sad, 0.0))
    assert scores[ACTIONS.index("uplifting_content")] > 0.5
    assert scores[ACTIONS.index("breathing_exercise")] < -0.2
    assert not np.any(student.local_statistics().xx)
    assert _make_policy(config).bandit.estimates(_context(student, calm, 0.0)).tolist() == [0.0] * 7


# -- expression ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("emotion", "action", "expected"),
    [
        ("sad", "reach_out_friend", "friend-lonely"),
        ("fearful", "breathing_exercise", "breathe-worry"),
        ("angry", "calming_music", "music-slow-down"),
        ("happy", "uplifting_content", "uplift-keep-it-going"),
        ("neutral", "suggest_break", "break-water"),
    ],
)
def test_message_fits_emotion_and_action(emotion, action, expected):
    """With the stand-in encoder the bank's best message is the one written for the emotion."""
    config = _make_config()
    bank = MessageBank(
        config.messages, {a.name: a.description for a in config.actions}, HashingEncoder()
    )
    assert bank.select(emotion, action).id == expected
    candidates = [bank[m] for m, _ in bank.ranking(emotion, action)]
    assert all(m.action == action and (not m.emotions or emotion in m.emotions) for m in candidates)
    assert len(candidates) >= 2


def test_cosine_similarity_alone_prefers_the_matching_message():
    """Without tags, the embedding similarity itself ranks the emotion's message first."""
    messages = MessageConfig(
        emotion_phrases={"sad": "I feel sad and lonely.", "angry": "I feel angry and frustrated."},
        tag_weight=0.0,
        bank=(
            MessageSpec(id="for-angry", action="talk", text="Frustrated and angry? Let it out."),
            MessageSpec(id="for-sad", action="talk", text="Sad and lonely? A friend could help."),
        ),
    )
    bank = MessageBank(messages, {"talk": "Talking to a friend."}, HashingEncoder())
    assert bank.select("sad", "talk").id == "for-sad"
    assert bank.select("angry", "talk").id == "for-angry"


def test_dismissed_and_recent_messages_are_avoided():
    """A dismissed message sinks by the penalty and is not chosen again; a recent one is skipped."""
    config = _make_config()
    bank = MessageBank(
        config.messages, {a.name: a.description for a in config.actions}, HashingEncoder()
    )
    ranking = dict(bank.ranking("sad", "reach_out_friend"))
    after = dict(bank.ranking("sad", "reach_out_friend", dismissed={"friend-lonely": 2}))
    penalty = config.messages.dismissed_penalty
    assert after["friend-lonely"] == pytest.approx(ranking["friend-lonely"] - 2 * penalty)
    assert bank.select("sad", "reach_out_friend", dismissed={"friend-lonely": 1}).id != "friend-lonely"
    assert bank.select("sad", "reach_out_friend", recent=["friend-lonely"]).id != "friend-lonely"
    policy = _make_policy(config)
    low = _probs(sad=0.45, neutral=0.35)
    _train(policy, _context(policy, low, 0.0), {"reach_out_friend": 1.0}, 20)
    first = policy.decide(0.0, low)
    assert (first.action, first.message_id) == ("reach_out_friend", "friend-lonely")
    policy.feedback(first.id, "dismissed")
    t = 5 * HOUR
    second = policy.decide(t, low)
    while second.action != "reach_out_friend":
        t += 900.0
        second = policy.decide(t, low)
    assert second.message_id not in (None, "friend-lonely")


def test_avatar_expression_is_in_unit_range_and_pinned():
    """Blendshape weights lie in [0, 1]; a happy person offered uplifting content smiles 0.6·0.9 + 0.4·0.8."""
    config = _make_config()
    avatar = AvatarExpressions(config.expression, config.action_names)
    face = avatar(_probs(happy=1.0), "uplifting_content")
    assert list(face) == list(config.expression.blendshapes)
    assert face["mouthSmile"] == pytest.approx(0.86)
    assert face["browDown"] == 0.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        face = avatar(rng.dirichlet(np.ones(len(EMOTIONS))), str(rng.choice(ACTIONS)))
        assert all(0.0 <= v <= 1.0 for v in face.values())
    assert (
        avatar(_probs(sad=1.0), "no_action")["browInnerUp"]
        > avatar(_probs(happy=1.0), "no_action")["browInnerUp"]
    )


def test_default_encoder_is_the_packaged_minilm():
    """Without an encoder the policy embeds its bank with the packaged all-MiniLM-L6-v2 (384-d, unit rows)."""
    encoder = MiniLMEncoder()
    vectors = encoder(
        ["I feel sad and lonely.", "Feeling low can be lonely.", "Here is some calm music."]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    policy = Policy(_make_config())
    assert policy.bank.select("sad", "reach_out_friend").id == "friend-lonely"
