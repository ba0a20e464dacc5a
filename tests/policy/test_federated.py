"""The policy's federated prior on the device: its release, its accounting, and what it is worth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import ERROR_BAD_REQUEST, app
from client.dp import DeviceStore
from device.layout import POLICY_PRIOR_OBJECT, POLICY_STATE_OBJECT
from emofed.config import ConfigError, load_config, to_json
from emofed.protocol import DEVICE_ROOT_KEY, POLICY_EVAL_METRICS, POLICY_PRIOR_KEY, POLICY_STATISTICS_KEY
from policy.federated import (
    check_catalogue,
    policy_config,
    policy_epsilon,
    policy_event,
    prior_size,
    statistics_size,
)
from policy.release import (
    aggregate_priors,
    event_sensitivity,
    privatise_events,
    shared_block,
    shrinkage_prior,
)
from policy.state import FEATURE_NORM_BOUND, NUM_FEATURES, PolicyStatistics
from privacy.accounting import PrivacyEvent, calibrate_noise, calibrate_noise_beside, compute_epsilon
from privacy.guard import LEDGER_RECORD, read_ledger_record
from privacy.ledger_format import parse_line
from simulations.users import evaluate_policies, history_statistics, simulated_person

SMALL = ["devices=3", "data.samples_per_device=12", "train.local_epochs=1", "policy.history=60", "policy.decisions=20"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _context(partition: int, root: Path) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
        run_config={DEVICE_ROOT_KEY: str(root)},
    )


def _message(cfg, kind: str, key: str, vector: np.ndarray, server_round: int = 3) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({key: Array(np.ascontiguousarray(vector))}),
            "config": ConfigRecord({"emofed-config": to_json(cfg), "server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)


# -- the mechanism ------------------------------------------------------------------------


def test_one_event_moves_the_release_by_at_most_the_sensitivity() -> None:
    """Adding one feedback event of extreme features and reward changes the vector by at most Δ."""
    rng = np.random.default_rng(0)
    actions = ("a", "b")
    base = PolicyStatistics.zeros(actions)
    for _ in range(200):
        x = rng.dirichlet(np.ones(NUM_FEATURES)) * rng.uniform(0, 1)
        x *= FEATURE_NORM_BOUND / max(np.linalg.norm(x), 1e-12)  # at the bound
        r = rng.choice([-1.0, 1.0])
        xx, rx = base.xx.copy(), base.rx.copy()
        xx[1] += np.outer(x, x)
        rx[1] += r * x
        moved = np.linalg.norm(PolicyStatistics(actions, xx, rx).to_vector() - base.to_vector())
        assert moved <= event_sensitivity(1.0) + 1e-9
    assert event_sensitivity(1.0) == pytest.approx(math.sqrt(30.0))


def test_the_shared_block_moves_by_at_most_root_two_per_event() -> None:
    """Emotion probabilities lie on the simplex: one event moves the shared block by at most √(1 + R²)."""
    rng = np.random.default_rng(3)
    actions = ("a",)
    for _ in range(200):
        p = rng.dirichlet(np.full(7, rng.uniform(0.01, 5.0)))
        x = np.concatenate([p, rng.uniform(-1, 1, 3), np.eye(4)[rng.integers(4)]])
        stats = PolicyStatistics(actions, np.outer(x, x)[None], (-1.0 * x)[None])
        assert np.linalg.norm(shared_block(stats).to_vector()) <= event_sensitivity(1.0, 1.0) + 1e-9
    assert shared_block(PolicyStatistics.zeros(actions)).dim == 7


def test_privatise_events_adds_the_promised_noise() -> None:
    stats = PolicyStatistics.zeros(("a", "b", "c"))
    noised, params = privatise_events(stats, noise_multiplier=2.0, reward_bound=1.0, rng=np.random.default_rng(1))
    vector = noised.to_vector()
    assert params["noise_stddev"] == pytest.approx(2.0 * math.sqrt(30.0))
    assert params["dimension"] == vector.size
    assert np.std(vector) == pytest.approx(params["noise_stddev"], rel=0.15)
    assert np.allclose(noised.xx, np.transpose(noised.xx, (0, 2, 1)))  # symmetric
    with pytest.raises(ValueError, match="noise_multiplier"):
        privatise_events(stats, noise_multiplier=0.0, reward_bound=1.0, rng=np.random.default_rng(1))


def test_shrinkage_prior_holds_the_ridge_estimate() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, NUM_FEATURES))
    theta = rng.normal(size=NUM_FEATURES)
    xx, rx = x.T @ x, x.T @ (x @ theta)
    stats = PolicyStatistics(("a",), xx[None], rx[None])
    prior = shrinkage_prior(stats, strength=3.0, ridge=1e-6)
    assert np.allclose(prior.xx[0], 3.0 * np.eye(NUM_FEATURES))
    assert np.allclose(prior.rx[0] / 3.0, theta, atol=1e-5)
    with pytest.raises(ValueError, match="strength"):
        shrinkage_prior(stats, strength=-1.0, ridge=1.0)
    # A block's estimate is embedded in the first features of a full-size prior.
    block = shrinkage_prior(shared_block(stats), strength=2.0, ridge=1.0)
    assert block.dim == NUM_FEATURES and np.allclose(block.rx[0, 7:], 0.0)
    assert np.allclose(block.xx[0], 2.0 * np.eye(NUM_FEATURES))


def test_dp_sgd_is_calibrated_to_leave_room_for_the_policy_release() -> None:
    policy = PrivacyEvent(noise_multiplier=4.0, sample_rate=1.0, steps=1, sampling="no-amplification")
    alone = calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=40)
    sigma = calibrate_noise_beside(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=40, planned=[policy])
    assert sigma > alone
    sgd = PrivacyEvent(noise_multiplier=sigma, sample_rate=0.25, steps=40)
    assert compute_epsilon([sgd, policy], delta=1e-5) <= 3.0
    assert compute_epsilon([PrivacyEvent(noise_multiplier=sigma * 0.99, sample_rate=0.25, steps=40), policy], delta=1e-5) > 2.95
    with pytest.raises(ValueError, match="already spend"):
        calibrate_noise_beside(target_epsilon=0.5, delta=1e-5, sample_rate=0.25, steps=40, planned=[policy])


def test_policy_event_follows_the_config() -> None:
    cfg = load_config(None, SMALL)
    event = policy_event(cfg)
    assert event is not None and event.sampling == "no-amplification"
    assert compute_epsilon([event], delta=cfg.privacy.delta) == pytest.approx(policy_epsilon(cfg), abs=0.02)
    assert policy_epsilon(load_config(None, [*SMALL, "privacy.preset=strict"])) == pytest.approx(1 / 3)
    assert policy_epsilon(load_config(None, [*SMALL, "policy.epsilon=0.5"])) == 0.5
    assert policy_event(load_config(None, [*SMALL, "privacy.preset=off"])) is None
    assert policy_event(load_config(None, [*SMALL, "policy.enabled=false"])) is None
    with pytest.raises(ConfigError, match="policy.epsilon"):
        load_config(None, [*SMALL, "policy.epsilon=3"])
    with pytest.raises(ConfigError, match="policy.history"):
        load_config(None, [*SMALL, "policy.history=0"])
    with pytest.raises(ConfigError, match="'policy.config_dir': config file not found"):
        check_catalogue(load_config(None, [*SMALL, "policy.config_dir=/nonexistent/policy"]))


# -- the ClientApp ------------------------------------------------------------------------


def test_train_policy_releases_noised_statistics_recorded_in_the_ledger(tmp_path: Path) -> None:
    """Through the guard: exactly the sent array, noised; the release is the ledger's last entry."""
    cfg = load_config(None, SMALL)
    size = statistics_size(cfg)
    reply = app(_message(cfg, "train.policy", POLICY_STATISTICS_KEY, np.zeros(size)), _context(0, tmp_path))
    assert not reply.has_error(), reply.error
    vector = reply.content["arrays"][POLICY_STATISTICS_KEY].numpy()
    assert vector.shape == (size,) and np.isfinite(vector).all()
    clean = shared_block(history_statistics(cfg, simulated_person(cfg, "0"))).to_vector()
    assert not np.allclose(vector, clean)  # noise was added
    assert np.std(vector - clean) == pytest.approx(policy_event(cfg).noise_multiplier * math.sqrt(2.0), rel=0.25)
    assert set(reply.content["metrics"]) == {"dp-epsilon"}
    assert reply.content["metrics"]["dp-epsilon"] == pytest.approx(policy_epsilon(cfg), abs=0.02)
    lines, _, _ = read_ledger_record(reply.content.config_records[LEDGER_RECORD])
    last = parse_line(lines[-1].rstrip("\n"))
    assert last["round"] == 3 and last["sampling"] == "no-amplification"
    assert last["extra"]["policy_statistics"] == 1
    assert last["clipping_norm"] == pytest.approx(math.sqrt(2.0))


def test_train_policy_without_dp_sends_the_statistics_and_no_ledger(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "privacy.preset=off"])
    reply = app(_message(cfg, "train.policy", POLICY_STATISTICS_KEY, np.zeros(statistics_size(cfg))), _context(1, tmp_path))
    assert not reply.has_error(), reply.error
    clean = shared_block(history_statistics(cfg, simulated_person(cfg, "1"))).to_vector()
    assert np.allclose(reply.content["arrays"][POLICY_STATISTICS_KEY].numpy(), clean)
    assert LEDGER_RECORD not in reply.content.config_records


def test_policy_messages_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL)
    reply = app(_message(cfg, "train.policy", POLICY_STATISTICS_KEY, np.zeros(7)), _context(0, tmp_path))
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
    assert "policy-statistics" in reply.error.reason
    bad = np.full(prior_size(cfg), np.nan)
    reply = app(_message(cfg, "evaluate.policy", POLICY_PRIOR_KEY, bad), _context(0, tmp_path))
    assert reply.has_error() and "not finite" in reply.error.reason


def test_evaluate_policy_stores_the_prior_and_scores_four_policies(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "privacy.preset=off"])
    prior = shrinkage_prior(
        shared_block(history_statistics(cfg, simulated_person(cfg, "7"))), strength=2.0, ridge=1.0
    )
    context = _context(0, tmp_path)
    reply = app(_message(cfg, "evaluate.policy", POLICY_PRIOR_KEY, prior.to_vector()), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert set(metrics) == POLICY_EVAL_METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(metrics[f"policy-{v}-regret"] >= -1e-9 for v in ("random", "prior", "local", "federated"))
    with DeviceStore.from_context(context).open_store() as store:
        kept = PolicyStatistics.from_dict(store.get_json(POLICY_PRIOR_OBJECT))
    assert np.allclose(kept.rx, prior.rx)


# -- what the prior is worth --------------------------------------------------------------


def test_federated_prior_with_personalisation_beats_local_learning() -> None:
    """Under device-level DP on 16 simulated people, the leave-one-out prior beats local learning alone.

    Prior plus local learning has less regret than learning alone, and random > prior only holds too.
    """
    cfg = load_config(None, ["devices=16", "policy.history=600", "policy.decisions=200"])
    config = policy_config(cfg)
    event = policy_event(cfg)
    rng = np.random.default_rng(0)
    people = [simulated_person(cfg, str(i)) for i in range(16)]
    shared = [
        privatise_events(
            shared_block(history_statistics(cfg, p)), noise_multiplier=event.noise_multiplier,
            reward_bound=1.0, rng=rng, feature_bound=1.0,
        )[0]
        for p in people
    ]
    stddev = event.noise_multiplier * event_sensitivity(1.0, 1.0)
    regret = {v: [] for v in ("random", "prior", "local", "federated")}
    for i, person in enumerate(people):
        mean = aggregate_priors(shared[:i] + shared[i + 1:], device_noise_stddev=stddev)
        prior = shrinkage_prior(mean, strength=cfg.policy.prior_strength, ridge=config.bandit.ridge)
        metrics = evaluate_policies(cfg, prior, person)
        for v in regret:
            regret[v].append(metrics[f"policy-{v}-regret"])
    mean = {v: float(np.mean(r)) for v, r in regret.items()}
    assert mean["federated"] < mean["local"] < mean["random"], mean
    assert mean["prior"] < mean["random"], mean


def test_a_deployed_device_shares_the_feedback_its_runtime_recorded(tmp_path: Path) -> None:
    """A deployed device shares the policy state `emofed device run` keeps in its store.

    A device without feedback declines with a reason.
    """
    from client.app import ERROR_UNUSABLE_DATA
    from policy.expression import HashingEncoder
    from policy.rules import Policy
    from simulations.users import run_policy

    cfg = load_config(None, [*SMALL, "privacy.preset=off"])
    folder = tmp_path / "dev0"
    context = Context(
        run_id=1, node_id=5, node_config={"device-dir": str(folder), "device-id": "dev0"}, state=RecordDict(),
        run_config={},
    )
    message = _message(cfg, "train.policy", POLICY_STATISTICS_KEY, np.zeros(statistics_size(cfg)))
    reply = app(message, context)
    assert reply.has_error() and reply.error.code == ERROR_UNUSABLE_DATA
    assert "no policy feedback recorded" in reply.error.reason

    policy = Policy(policy_config(cfg), encoder=HashingEncoder())
    run_policy(policy, simulated_person(cfg, "3"), decisions=40, seed=0)
    with DeviceStore.from_context(context).open_store() as store:
        store.put_json(POLICY_STATE_OBJECT, policy.state_dict())
    reply = app(message, context)
    assert not reply.has_error(), reply.error
    sent = reply.content["arrays"][POLICY_STATISTICS_KEY].numpy()
    assert np.allclose(sent, shared_block(policy.local_statistics()).to_vector())
