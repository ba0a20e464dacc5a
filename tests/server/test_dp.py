"""User-level DP on the aggregate: noise scale, clipping, accounting, budget stop, ledger."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyServerSideAdaptiveClipping
from flwr.supercore.task_identity import TaskIdentity

from emofed.config import EmofedConfig, PrivacyConfig, UserDPConfig, load_config
from emofed.protocol import CLIPPING_NORM_KEY, EVAL_METRICS
from privacy.accounting import PrivacyEvent, calibrate_noise, compute_epsilon
from privacy.audit import audit
from privacy.keys import fingerprint, generate_private_key
from privacy.ledger_store import LedgerStore
from server.dp import PrivacyBudgetStop, UserLevelDP, server_key_path
from server.strategy import build_strategy

DELTA = 1e-5
SHAPES = {"w": (64, 32), "b": (32,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


# The server's key seeds the noise (with seed and round). Fixed, so every noisy figure a test
# pins is the same draw in every session (a fresh key made the adaptive-norm test fail ~1 in 10).
_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _make_privacy(**user: object) -> PrivacyConfig:
    fields = {"enabled": True, "epsilon": 50.0, "noise_multiplier": 1.0, "clipping_norm": 1.0, **user}
    return PrivacyConfig(delta=DELTA, user=UserDPConfig(**fields))  # type: ignore[arg-type]


def _make_dp(
    tmp_path: Path,
    *,
    rounds: int = 5,
    seed: int = 0,
    secure: bool = False,
    key: Ed25519PrivateKey | None = None,
    **user: object,
) -> UserLevelDP:
    privacy = dataclasses.replace(_make_privacy(**user), secure_mode=secure)
    return UserLevelDP(
        privacy, rounds=rounds, seed=seed, ledger=LedgerStore(tmp_path / "ledger"), private_key=key or _KEY
    )


def _make_model(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(shape, value, np.float32) for k, shape in SHAPES.items()}


def _make_update(current: dict[str, np.ndarray], norm: float, seed: int) -> dict[str, np.ndarray]:
    """Current + a random direction of the given L2 norm (float32, as a device sends)."""
    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(size=v.shape) for k, v in current.items()}
    scale = norm / math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    return {k: (current[k] + delta[k] * scale).astype(np.float32) for k in current}


def _release(dp: UserLevelDP, server_round: int, sampled: int, updates: list[dict[str, np.ndarray]], current=None):
    current = _make_model() if current is None else current
    dp.begin_round(server_round, sampled=sampled)
    return dp.release(server_round, current, updates, [False] * len(updates))


def test_noise_std_is_sigma_c_over_sampled_whoever_replies(tmp_path: Path) -> None:
    """Noise std is σ·C/m for m sampled devices, the same with 10 or 3 replies (fixed denominator)."""
    sigma, norm, m = 2.0, 0.5, 10
    big = {"w": np.zeros((400, 500), np.float32)}
    stds = []
    for k in (10, 3, 0):
        dp = _make_dp(tmp_path / str(k), noise_multiplier=sigma, clipping_norm=norm, epsilon=50.0)
        release = _release(dp, 1, m, [dict(big) for _ in range(k)], current=big)
        assert release.noise_std == pytest.approx(sigma * norm / m)
        stds.append(float(release.arrays["w"].std()))
    assert stds == pytest.approx([sigma * norm / m] * 3, rel=0.01)


def test_aggregate_is_clipped_sum_over_sampled(tmp_path: Path) -> None:
    """Released − noise = Σ clip(Δ_i, C) / m (checked against NumPy); a device that did not clip is re-clipped."""
    current = _make_model(0.25)
    updates = [_make_update(current, norm, seed) for seed, norm in enumerate((0.3, 1.0, 5.0))]  # last: unclipped
    with_updates = _release(_make_dp(tmp_path / "a"), 1, 5, updates, current)
    noise_only = _release(_make_dp(tmp_path / "b"), 1, 5, [], current)  # same seed: same noise
    expected = {k: np.zeros(v.shape) for k, v in current.items()}
    for update in updates:
        delta = {k: update[k].astype(np.float64) - current[k] for k in current}
        length = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
        for k in current:
            expected[k] += delta[k] * min(1.0, 1.0 / length) / 5
    for k in current:
        np.testing.assert_allclose(with_updates.arrays[k] - noise_only.arrays[k], expected[k], atol=1e-12)
    moved = math.sqrt(sum(float(((with_updates.arrays[k] - noise_only.arrays[k]) ** 2).sum()) for k in current))
    assert moved <= 3 * 1.0 / 5 + 1e-9  # three updates, each of norm at most C, over m = 5
    assert with_updates.aggregated == 3 and noise_only.aggregated == 0


def test_noise_only_round_is_released_and_recorded(tmp_path: Path) -> None:
    """A round whose messages went out releases even with no usable reply, and the ledger says so."""
    dp = _make_dp(tmp_path)
    release = _release(dp, 1, 4, [])
    assert release.epsilon > 0 and dp.epsilon == release.epsilon
    entries = LedgerStore(tmp_path / "ledger").ledger("server").entries()
    assert len(entries) == 1
    assert entries[0]["extra"]["sampled_devices"] == 4 and entries[0]["extra"]["aggregated_devices"] == 0
    assert audit(tmp_path / "ledger").ok


def test_cumulative_epsilon_matches_independent_composition(tmp_path: Path) -> None:
    """After R releases the server's ε is compute_epsilon of R events, and the ledger audits ok."""
    dp = _make_dp(tmp_path, noise_multiplier=1.5, epsilon=20.0)
    current = _make_model()
    for server_round in range(1, 5):
        _release(dp, server_round, 3, [_make_update(current, 0.5, server_round)], current)
    event = PrivacyEvent(noise_multiplier=1.5, sample_rate=1.0, steps=1, sampling="no-amplification")
    assert dp.epsilon == pytest.approx(compute_epsilon([event] * 4, delta=DELTA), rel=1e-12)
    report = audit(tmp_path / "ledger", pinned_keys={"server": dp.key_fingerprint})
    assert report.ok, report.format_table()
    server = report.scopes[0]
    assert server.releases == 4 and server.recomputed["dpa_pld"] <= dp.epsilon + 0.02
    entries = LedgerStore(tmp_path / "ledger").ledger("server").entries()
    assert [e["round"] for e in entries] == [1, 2, 3, 4]
    assert all(e["clipping_norm"] == 1.0 and e["noise_multiplier"] == 1.5 for e in entries)


def test_calibrated_noise_spends_the_budget_over_planned_rounds_then_stops(tmp_path: Path) -> None:
    """σ calibrated for 3 rounds: three releases fit the budget, a fourth is refused before anything."""
    dp = _make_dp(tmp_path, rounds=3, noise_multiplier=None, epsilon=2.0)
    assert dp.noise_multiplier == pytest.approx(
        calibrate_noise(target_epsilon=2.0, delta=DELTA, sample_rate=1.0, steps=3, sampling="no-amplification")
    )
    for server_round in (1, 2, 3):
        _release(dp, server_round, 2, [])
    assert dp.epsilon <= 2.0
    with pytest.raises(PrivacyBudgetStop, match=r"privacy budget reached before round 4: epsilon .* of 2 spent"):
        dp.begin_round(4, sampled=2)
    with pytest.raises(RuntimeError, match="not begun"):  # nothing was committed for round 4
        dp.release(4, _make_model(), [], [])
    assert len(LedgerStore(tmp_path / "ledger").ledger("server").entries()) == 3
    assert audit(tmp_path / "ledger").ok


def test_one_release_in_flight(tmp_path: Path) -> None:
    """A round must be released before the next is begun; m must be positive."""
    dp = _make_dp(tmp_path)
    dp.begin_round(1, sampled=2)
    with pytest.raises(ValueError, match="Round 1's release is still pending"):
        dp.begin_round(2, sampled=2)
    other = _make_dp(tmp_path / "other")
    other.begin_round(1, sampled=1)
    with pytest.raises(ValueError, match="2 updates for 1 sampled"):
        other.release(1, _make_model(), [_make_model(), _make_model()], [False, False])
    with pytest.raises(ValueError, match="at least one sampled device"):
        _make_dp(tmp_path / "none").begin_round(1, sampled=0)


@pytest.mark.parametrize(("clipped", "grows"), [(True, True), (False, False)])
def test_adaptive_norm_follows_the_unclipped_share(tmp_path: Path, clipped: bool, grows: bool) -> None:
    """All updates clipped → C grows; none clipped → C shrinks (Andrew et al. 2021, Alg. 1)."""
    dp = _make_dp(tmp_path, clipping="adaptive", clipping_norm=1.0, clip_lr=0.2, target_quantile=0.5)
    current = {"w": np.zeros(4, np.float32)}
    m = 100
    norm = 3.0 if clipped else 0.5
    updates = [_make_update(current, norm, seed) for seed in range(m)]
    dp.begin_round(1, sampled=m)
    release = dp.release(1, current, updates, [clipped] * m)
    assert release.clipping_norm == 1.0 and dp.clipping_norm == release.next_clipping_norm
    # Noise on the count has std σ_b/m = 5/100 around b̄ = 0 or 1: well away from the target 0.5.
    expected = math.exp(0.2 * 0.5) if grows else math.exp(-0.2 * 0.5)
    assert dp.clipping_norm == pytest.approx(expected, rel=0.02)
    assert (dp.clipping_norm > 1.0) is grows


def test_adaptive_norm_counts_an_unreported_long_update_as_clipped(tmp_path: Path) -> None:
    """A device that says it did not clip but sent a long update counts as clipped."""
    dp = _make_dp(tmp_path, clipping="adaptive", clipped_count_stddev=1.0)
    current = {"w": np.zeros(4, np.float32)}
    updates = [_make_update(current, 4.0, seed) for seed in range(50)]
    dp.begin_round(1, sampled=50)
    dp.release(1, current, updates, [False] * 50)
    assert dp.clipping_norm > 1.0


def test_flower_adaptive_wrapper_moves_the_norm_the_wrong_way() -> None:
    """Flower 1.42's server-side adaptive clipping shrinks C when every update is clipped."""
    norm, m = 1.0, 4
    flower = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=m, initial_clipping_norm=norm  # σ_b = 0: exact count
    )
    current = {"w": np.zeros(8, np.float32)}
    flower.current_arrays = ArrayRecord({"w": Array(current["w"])})
    sent = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type=MessageType.TRAIN)
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in _make_update(current, 10.0, seed).items()}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=sent,
        )
        for seed in range(m)
    ]
    flower.aggregate_train(1, replies)
    assert flower.clipping_norm == pytest.approx(norm * math.exp(-0.2 * (1.0 - 0.5)))  # shrank
    assert flower.clipping_norm < norm


def test_update_noise_split_keeps_the_effective_sigma(tmp_path: Path) -> None:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm. 1); the ledger records σ, σ_Δ and σ_b."""
    dp = _make_dp(tmp_path, noise_multiplier=2.0, clipping="adaptive", clipped_count_stddev=3.0)
    update_sigma, count_stddev = dp.noise_split(10)
    assert count_stddev == 3.0
    assert update_sigma == pytest.approx((2.0**-2 - 6.0**-2) ** -0.5)
    assert update_sigma**-2 + (2 * count_stddev) ** -2 == pytest.approx(2.0**-2)
    default = _make_dp(tmp_path / "default", noise_multiplier=2.0, clipping="adaptive")
    assert default.noise_split(10)[1] == 2.0  # max(m/20, σ): m/20 = 0.5 would be infeasible
    assert default.noise_split(100)[1] == 5.0
    assert _make_dp(tmp_path / "fixed", noise_multiplier=2.0).noise_split(10) == (2.0, None)
    dp.begin_round(1, sampled=10)
    release = dp.release(1, {"w": np.zeros(3, np.float32)}, [], [])
    assert release.noise_std == pytest.approx(update_sigma * 1.0 / 10)
    entry = LedgerStore(tmp_path / "ledger").ledger("server").entries()[0]
    assert entry["noise_multiplier"] == 2.0
    assert entry["extra"]["update_noise_multiplier"] == pytest.approx(update_sigma)
    assert entry["extra"]["count_noise_stddev"] == 3.0
    with pytest.raises(ValueError, match="clipped_count_stddev' must be above"):
        _make_dp(tmp_path / "bad", noise_multiplier=2.0, clipping="adaptive", clipped_count_stddev=1.0)


@pytest.mark.parametrize(("secure", "same"), [(False, True), (True, False)])
def test_noise_is_reproducible_unless_secure_mode(tmp_path: Path, secure: bool, same: bool) -> None:
    """Default: the same seed and round give the same noise; secure_mode draws fresh noise."""
    first = _release(_make_dp(tmp_path / "a", secure=secure), 1, 3, [])
    second = _release(_make_dp(tmp_path / "b", secure=secure), 1, 3, [])
    assert np.array_equal(first.arrays["w"], second.arrays["w"]) is same
    # Devices know the seed but not the server's key: with another key the noise differs.
    other_key = _release(_make_dp(tmp_path / "k", key=generate_private_key()), 1, 3, [])
    assert not np.array_equal(first.arrays["w"], other_key.arrays["w"])
    other_round = _make_dp(tmp_path / "c")
    _release(other_round, 1, 3, [])
    assert not np.array_equal(_release(other_round, 2, 3, []).arrays["w"], first.arrays["w"])
    assert first.arrays["w"].std() == pytest.approx(1.0 / 3, rel=0.2)


def test_server_key_lives_outside_the_run_and_is_enrolled(tmp_path: Path) -> None:
    """from_config creates the key under <output.dir>/.keys (0600) and enrolls it as 'server'."""
    cfg = load_config(None, ["privacy.user.enabled=true", f"output.dir={tmp_path}", "devices=4"])
    assert server_key_path(cfg) == tmp_path / ".keys" / "server-ledger.key"
    store = LedgerStore(tmp_path / "run" / "ledger")
    dp = UserLevelDP.from_config(cfg, store)
    assert server_key_path(cfg).stat().st_mode & 0o777 == 0o600
    assert fingerprint(store.public_keys()["server"]) == dp.key_fingerprint
    again = UserLevelDP.from_config(cfg, LedgerStore(tmp_path / "run2" / "ledger"))
    assert again.key_fingerprint == dp.key_fingerprint  # the same key across runs: pin it once


# -- through the strategy -------------------------------------------------------------


class _FakeGrid:
    """Devices that answer every training message with global + a fixed update."""

    def __init__(self, nodes: int, *, norm: float = 0.5, user_dp: bool = True) -> None:
        self.nodes = list(range(1, nodes + 1))
        self.norm = norm
        self.user_dp = user_dp
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            arrays = msg.content["arrays"]
            if msg.metadata.message_type == MessageType.TRAIN:
                current = {k: a.numpy() for k, a in arrays.items()}
                update = _make_update(current, self.norm, msg.metadata.dst_node_id)
                metrics = {"num-examples": 10 * msg.metadata.dst_node_id, "train-loss": 1.0, "steps": 2}
                if self.user_dp:
                    assert msg.content["config"][CLIPPING_NORM_KEY] > 0
                    metrics["update-clipped"] = 0
                content = RecordDict(
                    {"arrays": ArrayRecord({k: Array(v) for k, v in update.items()}), "metrics": MetricRecord(metrics)}
                )
            else:
                confusion = [0] * 49
                confusion[0] = 4
                counts = {key: 0 for key in EVAL_METRICS if key.endswith(("-correct", "-total"))}
                content = RecordDict(
                    {
                        "metrics": MetricRecord(
                            {"num-examples": 4, "loss": 1.0, "accuracy": 1.0, "confusion": confusion, **counts}
                        )
                    }
                )
            replies.append(Message(content, reply_to=msg))
        return replies


def _make_cfg(tmp_path: Path, *overrides: str) -> EmofedConfig:
    return load_config(
        None,
        [
            "devices=3", "rounds=3", "privacy.preset=off", "privacy.user.enabled=true",
            f"output.dir={tmp_path}", "strategy.min_train_devices=1", "strategy.min_evaluate_devices=1",
            *overrides,
        ],
    )


def test_budget_stop_is_raised_before_the_round_is_sent(tmp_path: Path) -> None:
    """With a budget for one release, round 2's configure_train raises and no round-2 message goes out."""
    one = compute_epsilon(
        [PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1, sampling="no-amplification")], delta=DELTA
    )
    cfg = _make_cfg(tmp_path, "privacy.user.noise_multiplier=2.0", f"privacy.user.epsilon={one * 1.01}")
    store = LedgerStore(tmp_path / "ledger")
    strategy = build_strategy(cfg, ledger=store, user_dp=UserLevelDP.from_config(cfg, store))
    grid = _FakeGrid(3)
    initial = ArrayRecord({k: Array(v) for k, v in _make_model().items()})
    with pytest.raises(PrivacyBudgetStop, match="before round 2"):
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=3, train_config=ConfigRecord())
    train_sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_sent) == 3  # round 1 only
    assert strategy.round_logs[1].user_epsilon == pytest.approx(one)
    assert 2 not in strategy.round_logs or strategy.round_logs[2].train_sent == 0
    report = audit(tmp_path / "ledger")
    assert report.ok and report.scopes[0].releases == 1


def test_fedadam_applies_its_server_optimiser_to_the_private_aggregate(tmp_path: Path) -> None:
    """FedAdam + user DP: the new model is FedAdam's step on the noised mean update (checked in NumPy)."""
    cfg = _make_cfg(tmp_path, "strategy.name=fedadam", "privacy.user.noise_multiplier=1.0", "privacy.user.epsilon=50")
    store = LedgerStore(tmp_path / "ledger")
    user_dp = UserLevelDP.from_config(cfg, store)
    strategy = build_strategy(cfg, ledger=store, user_dp=user_dp)
    grid = _FakeGrid(3)
    start = _make_model(0.1)
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics is not None and metrics["devices"] == 3
    release = user_dp.last_release
    assert release is not None and user_dp.release_count == 1
    s = cfg.strategy
    eta_norm = s.server_lr * math.sqrt(1 - s.beta_2**2) / (1 - s.beta_1**2)
    for key, value in start.items():
        delta = release.arrays[key] - value.astype(np.float64)
        m_t, v_t = (1 - s.beta_1) * delta, (1 - s.beta_2) * delta**2
        expected = value + eta_norm * m_t / (np.sqrt(v_t) + s.tau)
        assert new[key].dtype == "float32"
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(new[key].numpy(), release.arrays[key], atol=1e-4)  # not plain DP-FedAvg


def test_fedavg_with_user_dp_releases_the_private_model_unweighted(tmp_path: Path) -> None:
    """FedAvg + user DP: the new global model is the release itself, not an example-weighted mean."""
    cfg = _make_cfg(tmp_path, "privacy.user.noise_multiplier=1.0", "privacy.user.epsilon=50")
    store = LedgerStore(tmp_path / "ledger")
    user_dp = UserLevelDP.from_config(cfg, store)
    strategy = build_strategy(cfg, ledger=store, user_dp=user_dp)
    grid = _FakeGrid(3)
    arrays = ArrayRecord({k: Array(v) for k, v in _make_model().items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert {m.content["config"][CLIPPING_NORM_KEY] for m in messages} == {1.0}
    replies = grid.send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies[:2])  # the third device dropped out
    release = user_dp.last_release
    assert release is not None and (release.sampled, release.aggregated) == (3, 2)
    for key in new:
        np.testing.assert_array_equal(new[key].numpy(), release.arrays[key].astype(np.float32))
    assert strategy.round_logs[1].clipping_norm == 1.0


# -- the ServerApp's stop path ------------------------------------------------------------


def test_run_stopped_by_the_budget_is_finalised_with_its_reason(tmp_path: Path) -> None:
    """`_run` with a budget for two of three rounds: a finished run dir, stopped status, verifying ledger."""
    from server.app import _run
    from server.rundir import RunDirectory

    two = compute_epsilon(
        [PrivacyEvent(noise_multiplier=2.0, sample_rate=1.0, steps=2, sampling="no-amplification")], delta=DELTA
    )
    cfg = _make_cfg(tmp_path, "privacy.user.noise_multiplier=2.0", f"privacy.user.epsilon={two + 0.1:.4f}")
    run_dir = RunDirectory(tmp_path / "run")
    _run(_FakeGrid(3, norm=0.05), cfg, run_dir)
    run = tmp_path / "run"
    assert run.is_dir() and not (tmp_path / "run.incomplete").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped-privacy-budget"
    assert "privacy budget reached before round 3" in summary["stop_reason"]
    assert summary["rounds_completed"] == 2
    privacy = summary["privacy"]
    assert privacy["user"]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert privacy["user"]["releases"] == 2 and privacy["device"]["enabled"] is False
    assert privacy["ledger"] == str(run / "ledger")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["epsilon_user"] == pytest.approx(two, rel=1e-9)
    assert rows[0]["clipping_norm"] == 1.0 and rows[0]["declined_devices"] == 0
    assert (run / "model.safetensors").is_file() and (run / "curves.png").is_file()
    report = audit(run, pinned_keys={"server": privacy["server_key_fingerprint"]})
    assert report.ok, report.format_table()
    assert [s.scope for s in report.scopes] == ["server"] and report.scopes[0].releases == 2
