"""Tests of the simulated people behind the policy benchmark."""

from __future__ import annotations

import numpy as np
import pytest

from models.labels import EMOTIONS
from policy.expression import HashingEncoder
from policy.rules import Policy, load_policy_config
from simulations.users import (
    POPULATION_UTILITY,
    RESPONSES,
    SimulatedUser,
    make_population,
    run_policy,
    simulate_episode,
)

ACTIONS = (
    "no_action",
    "breathing_exercise",
    "suggest_break",
    "calming_music",
    "uplifting_content",
    "reach_out_friend",
    "support_resources",
)
REWARDS = {"helped": 1.0, "accepted": 0.5, "none": 0.0, "dismissed": -0.5}


def _make_user(seed: int = 0, **kwargs: float) -> SimulatedUser:
    return SimulatedUser(make_population(1, ACTIONS, seed=seed, **kwargs)[0], seed=seed)


def test_population_is_seeded_and_heterogeneous():
    """Same seed, same people; different people differ; the quiet action is worth 0 to all."""
    a = make_population(3, ACTIONS, seed=5)
    b = make_population(3, ACTIONS, seed=5)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.utility, y.utility)
        assert np.array_equal(x.base_rates, y.base_rates)
    assert not np.allclose(a[0].utility, a[1].utility)
    assert all(np.all(p.utility[:, 0] == 0.0) for p in a)
    later = make_population(2, ACTIONS, seed=5, first_id=1)
    assert np.array_equal(later[0].utility, a[1].utility)


def test_population_centres_on_the_mean_preferences():
    """Averaged over many people, utilities match POPULATION_UTILITY within sampling error."""
    people = make_population(400, ACTIONS, seed=1)
    mean = np.mean([p.utility for p in people], axis=0)  # (7, K)
    expected = np.array([POPULATION_UTILITY[a] for a in ACTIONS[1:]]).T
    # Per-cell sd is sqrt(0.4² + 0.3²) = 0.5, so the mean of 400 has sd 0.025.
    assert np.abs(mean[:, 1:] - expected).max() < 0.1
    spread = np.std([p.utility[:, 1:] for p in people], axis=0)
    assert spread.mean() == pytest.approx(0.5, rel=0.1)


def test_expected_reward_rises_with_utility_and_is_zero_for_doing_nothing():
    """Responses form a distribution, better liked actions earn more, doing nothing earns 'none'."""
    user = _make_user()
    rewards = []
    for u in np.linspace(-1.5, 1.5, 13):
        user.profile.utility[EMOTIONS.index("sad"), 1] = u
        probabilities = user.response_probabilities("breathing_exercise", EMOTIONS.index("sad"))
        assert probabilities.shape == (len(RESPONSES),)
        assert probabilities.sum() == pytest.approx(1.0)
        rewards.append(user.expected_reward("breathing_exercise", EMOTIONS.index("sad"), REWARDS))
    assert np.all(np.diff(rewards) > 0)
    assert abs(rewards[6]) < 0.05
    assert user.expected_reward("no_action", 0, REWARDS) == 0.0
    assert user.respond("no_action", 0) is None


def test_sampled_responses_match_their_probabilities():
    """Sampled responses follow response_probabilities (no response reported as None)."""
    user = _make_user(seed=2)
    emotion = EMOTIONS.index("fearful")
    counts = dict.fromkeys(RESPONSES, 0)
    for _ in range(4000):
        response = user.respond("calming_music", emotion)
        counts["none" if response is None else response] += 1
    observed = np.array([counts[r] for r in RESPONSES]) / 4000
    assert np.allclose(observed, user.response_probabilities("calming_music", emotion), atol=0.03)


def test_episode_is_seeded_and_well_formed():
    """Trajectories are reproducible, classifier outputs are distributions mostly peaked on the truth."""
    profile = make_population(1, ACTIONS, seed=3)[0]
    a = simulate_episode(profile, observations=600, seed=4)
    b = simulate_episode(profile, observations=600, seed=4)
    assert np.array_equal(a.observations, b.observations) and np.array_equal(a.emotions, b.emotions)
    assert a.observations.shape == (600, len(EMOTIONS))
    assert np.allclose(a.observations.sum(axis=1), 1.0)
    assert np.all(np.diff(a.timestamps) == 300.0)
    accuracy = np.mean(a.observations.argmax(axis=1) == a.emotions)
    assert 0.5 < accuracy < 0.95
    assert len(set(a.emotions.tolist())) >= 4


def test_distress_episodes_are_sustained():
    """A person prone to distress has long sad or fearful runs: what the distress rule watches for."""
    profile = make_population(1, ACTIONS, seed=6)[0]
    profile = type(profile)(**{**profile.__dict__, "distress_rate": 0.05})
    episode = simulate_episode(profile, observations=2000, seed=6)
    distress = np.isin(episode.emotions, [EMOTIONS.index("sad"), EMOTIONS.index("fearful")])
    longest = run = 0
    for flag in distress:
        run = run + 1 if flag else 0
        longest = max(longest, run)
    assert longest >= 12  # an hour of observations


def test_run_policy_scores_against_the_constrained_oracle():
    """Regret is never negative, the oracle respects the rules, and the run is reproducible."""
    config = load_policy_config()
    person = make_population(1, ACTIONS, seed=8)[0]
    outcomes = [
        run_policy(Policy(config, encoder=HashingEncoder()), person, decisions=150, seed=8)
        for _ in range(2)
    ]
    first, second = outcomes
    assert first.regret.shape == (150,) and np.all(first.regret >= -1e-12)
    assert np.array_equal(first.regret, second.regret) and first.actions == second.actions
    assert "sustained_distress" not in first.rules or "support_resources" in first.actions
    assert set(first.actions) <= set(ACTIONS)


def test_make_population_rejects_an_unknown_quiet_action():
    """The quiet action must be one of the actions."""
    with pytest.raises(ValueError, match="quiet_action"):
        make_population(2, ACTIONS[1:], seed=0)
