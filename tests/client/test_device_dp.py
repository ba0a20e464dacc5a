"""Device-level DP-SGD, the device's cumulative accountant and ledger, update clipping, the guard."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

import client.app
import client.data
from client.app import DeviceGuardMod, app
from client.dp import (
    DevicePrivacy,
    DeviceStore,
    DPSGDSettings,
    plan_device_budget,
    plan_dp_sgd,
    private_training,
    release_privately,
)
from client.train import train_local
from device.layout import LEDGER_KEY_OBJECT
from emofed.config import EmofedConfig, load_config, to_json
from emofed.protocol import (
    CLIPPING_NORM_KEY,
    DEVICE_DIR_KEY,
    DEVICE_ID_KEY,
    DEVICE_ROOT_KEY,
    ERROR_BAD_REQUEST,
    ERROR_BUDGET_EXHAUSTED,
    ERROR_TRAINING_FAILED,
    TRAIN_METRICS,
    train_metric_keys,
)
from models import build_model, get_state, set_state, shared_state_keys
from policy.federated import policy_event
from privacy.accounting import PrivacyEvent, calibrate_noise, calibrate_noise_beside, compute_epsilon
from privacy.audit import audit
from privacy.errors import PrivacyBudgetExceeded
from privacy.guard import LEDGER_RECORD, OutgoingGuard, OutgoingGuardMod, read_ledger_record
from privacy.keys import (
    generate_private_key,
    private_key_to_bytes,
    public_key_to_string,
)
from privacy.ledger_store import LedgerStore

# A smoke-sized device: 12 training samples in batches of 4 → q = 1/3, 3 steps a round.
_BASE = [
    "devices=3",
    "rounds=2",
    "data.samples_per_device=16",
    "train.local_epochs=1",
    "train.batch_size=4",
]
_SIGMA = "privacy.device.noise_multiplier=3.0"
_EVENT = PrivacyEvent(noise_multiplier=3.0, sample_rate=1 / 3, steps=3)
_ARRAYS: dict[str, ArrayRecord] = {}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _make_config(*overrides: str) -> EmofedConfig:
    return load_config(None, [*_BASE, *overrides])


def _make_arrays(cfg: EmofedConfig) -> ArrayRecord:
    if "global" not in _ARRAYS:
        torch.manual_seed(0)
        model = build_model(cfg.model, device="cpu")
        state = get_state(model, shared_state_keys(model))
        _ARRAYS["global"] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in state.items()}
        )
    return _ARRAYS["global"]


def _make_message(cfg: EmofedConfig, server_round: int = 1, **config: object) -> Message:
    record = ConfigRecord({"emofed-config": to_json(cfg), "server-round": server_round, **config})
    return Message(
        RecordDict({"arrays": _make_arrays(cfg), "config": record}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


def _make_context(root: Path) -> Context:
    # Device 0 of a simulation whose device stores live under `root`.
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={DEVICE_ROOT_KEY: str(root)},
    )


def _train(cfg: EmofedConfig, root: Path, server_round: int = 1, **config: object) -> Message:
    return app(_make_message(cfg, server_round, **config), _make_context(root))


def _weights(reply: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def _device(root: Path) -> DeviceStore:
    return DeviceStore.from_context(_make_context(root))


def _ledger_bytes(root: Path) -> bytes:
    device = _device(root)
    with device.open_store(create=False) as store:
        return store.get_bytes(device.chain_object)


def _copy_device_key(source: Path, destination: Path) -> None:
    # The same device (ledger key) under another root: DP noise is seeded from the key.
    with _device(source).open_store(create=False) as store:
        key = store.get_bytes(LEDGER_KEY_OBJECT)
    with _device(destination).open_store() as store:
        store.put_bytes(LEDGER_KEY_OBJECT, key)


def test_dp_round_sends_epsilon_and_a_ledger_the_guard_and_audit_accept(tmp_path: Path) -> None:
    """A DP round: dp metrics with ε > 0, a signed chain the guard, server and audit accept."""
    cfg = _make_config(_SIGMA)
    reply = _train(cfg, tmp_path)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert set(metrics) == train_metric_keys(True, False)
    assert metrics["dp-sample-rate"] == 1 / 3 and metrics["dp-noise-multiplier"] == 3.0
    assert metrics["steps"] == 3
    epsilon = metrics["dp-epsilon"]
    assert epsilon == pytest.approx(compute_epsilon([_EVENT], delta=1e-5), rel=1e-12)
    # Checked two ways: RDP is an upper bound, within 25 % of dp-accounting's PLD.
    pld = compute_epsilon([_EVENT], delta=1e-5, accountant="dpa_pld")
    assert pld <= epsilon <= 1.25 * pld
    device_key = DeviceStore.from_context(_make_context(tmp_path)).public_key()
    guard = OutgoingGuard.from_array_record(
        _make_arrays(cfg),
        train_metric_keys(True, False),
        require_arrays=True,
        ledger_public_key=device_key,
    )
    guard.check(reply.content)
    lines, seal, key = read_ledger_record(reply.content[LEDGER_RECORD])
    assert key == public_key_to_string(device_key) and len(lines) == 1
    server = LedgerStore(tmp_path / "server-ledger")
    assert server.receive("device:0", lines, seal, public_key=key) == 1
    assert server.receive("device:0", lines, seal, public_key=key) == 0  # idempotent merge
    report = audit(tmp_path / "server-ledger")  # the server's copy is the audit material
    assert report.ok and [row.scope for row in report.scopes] == ["device:0"]


def test_cumulative_epsilon_composes_every_round_and_the_budget_is_a_hard_stop(
    tmp_path: Path,
) -> None:
    """ε after R rounds is one composition of R events; the round that would overspend is declined."""
    expected = [compute_epsilon([_EVENT] * rounds, delta=1e-5) for rounds in (1, 2, 3)]
    budget = (expected[1] + expected[2]) / 2  # affords two rounds, not three
    cfg = _make_config(_SIGMA, f"privacy.device.epsilon={budget}")
    spent = []
    for server_round in (1, 2):
        reply = _train(cfg, tmp_path, server_round)
        assert not reply.has_error(), reply.error
        spent.append(reply.content["metrics"]["dp-epsilon"])
    assert spent == pytest.approx(expected[:2], rel=1e-12)
    assert 0 < spent[0] < spent[1] <= budget
    before = _ledger_bytes(tmp_path)
    reply = _train(cfg, tmp_path, 3)
    assert reply.has_error() and reply.error.code == ERROR_BUDGET_EXHAUSTED
    assert reply.error.reason == (
        f"privacy budget exhausted: device 0 has spent epsilon {expected[1]:.3g} of {budget:g}; "
        f"this round would bring it to {expected[2]:.3g}"
    )
    assert _ledger_bytes(tmp_path) == before


def test_a_release_made_elsewhere_during_training_is_composed_before_spending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the chain grew while this round trained, spending re-checks it: decline, send nothing."""
    expected = [compute_epsilon([_EVENT] * rounds, delta=1e-5) for rounds in (2, 3)]
    cfg = _make_config(_SIGMA, f"privacy.device.epsilon={sum(expected) / 2}")
    assert not _train(cfg, tmp_path, 1).has_error()
    real_train_local = client.app.train_local

    def train_local_after_another_release(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(client.app, "train_local", real_train_local)
        assert not _train(cfg, tmp_path, 2).has_error()  # e.g. a second process of this device
        return real_train_local(*args, **kwargs)

    monkeypatch.setattr(client.app, "train_local", train_local_after_another_release)
    reply = _train(cfg, tmp_path, 2)
    assert reply.has_error() and reply.error.code == ERROR_BUDGET_EXHAUSTED
    assert f"this round would bring it to {expected[1]:.3g}" in reply.error.reason
    assert len(_ledger_bytes(tmp_path).splitlines()) == 3  # two entries and the seal


@pytest.mark.parametrize("policy", [False, True])
def test_device_budget_plan_leaves_room_for_the_policy_release(policy: bool) -> None:
    """One planner gives DP-SGD's σ (calibrated beside the policy release) and the release itself."""
    cfg = _make_config("rounds=3", "privacy.device.epsilon=2.0", f"policy.enabled={str(policy).lower()}")
    plan = plan_dp_sgd(12, batch_size=4, local_epochs=1)
    budget = plan_device_budget(cfg, plan)
    assert budget.policy_release == (policy_event(cfg) if policy else None)
    planned = [budget.policy_release] if policy else []
    expected = calibrate_noise_beside(
        target_epsilon=2.0, delta=1e-5, sample_rate=1 / 3, steps=9, planned=planned, accountant="opacus_rdp"
    )
    assert budget.dp_sgd is not None and budget.dp_sgd.noise_multiplier == expected
    assert budget.dp_sgd.event == PrivacyEvent(noise_multiplier=expected, sample_rate=1 / 3, steps=3)
    assert plan_device_budget(cfg).dp_sgd is None  # the policy handler plans the release alone
    assert plan_device_budget(cfg).policy_release == budget.policy_release


def test_device_budget_plan_is_empty_without_device_dp() -> None:
    """Without device-level DP nothing is planned: no DP-SGD and no policy release."""
    budget = plan_device_budget(_make_config("privacy.preset=off"), plan_dp_sgd(12, batch_size=4, local_epochs=1))
    assert budget.dp_sgd is None and budget.policy_release is None


def test_release_sequence_refuses_before_the_mechanism_runs(tmp_path: Path) -> None:
    """Over budget, the mechanism never runs and the ledger is unchanged; within it, the entry is signed."""
    cfg = _make_config(_SIGMA, "privacy.device.epsilon=3.0")
    privacy = DevicePrivacy.open(_device(tmp_path), cfg.privacy)
    ran: list[int] = []
    heavy = PrivacyEvent(noise_multiplier=0.3, sample_rate=1.0, steps=50)
    with pytest.raises(PrivacyBudgetExceeded):
        release_privately(privacy, heavy, server_round=1, mechanism=lambda: (ran.append(1), 1.0, {}))
    assert ran == [] and privacy.ledger.entries() == []
    released = release_privately(privacy, _EVENT, server_round=1, mechanism=lambda: ("value", 1.0, {"examples": 12}))
    assert released.value == "value"
    assert released.epsilon == pytest.approx(compute_epsilon([_EVENT], delta=1e-5))
    assert [e["round"] for e in privacy.ledger.entries()] == [1]
    assert len(read_ledger_record(released.ledger)[0]) == 1  # the one entry


@pytest.mark.parametrize("policy", [False, True])
def test_calibrated_noise_spends_the_budget_by_the_last_planned_round(tmp_path: Path, policy: bool) -> None:
    """With σ calibrated over cfg.rounds, the last planned round ends within [0.9, 1]·budget.

    With the policy release planned too, DP-SGD leaves exactly the room that release needs.
    """
    cfg = _make_config("rounds=3", "privacy.device.epsilon=2.0", f"policy.enabled={str(policy).lower()}")
    if policy:
        planned = policy_event(cfg)
        sigma = calibrate_noise_beside(
            target_epsilon=2.0, delta=1e-5, sample_rate=1 / 3, steps=9, planned=[planned], accountant="opacus_rdp"
        )
        sgd = PrivacyEvent(noise_multiplier=sigma, sample_rate=1 / 3, steps=9)
        assert 0.99 * 2.0 <= compute_epsilon([sgd, planned], delta=1e-5) <= 2.0
    else:
        sigma = calibrate_noise(
            target_epsilon=2.0, delta=1e-5, sample_rate=1 / 3, steps=9, accountant="opacus_rdp"
        )
    spent = []
    for server_round in (1, 2, 3):
        reply = _train(cfg, tmp_path, server_round)
        assert not reply.has_error(), reply.error
        assert reply.content["metrics"]["dp-noise-multiplier"] == sigma
        spent.append(reply.content["metrics"]["dp-epsilon"])
    assert (0.5 if policy else 0.9) * 2.0 <= spent[-1] <= 2.0
    assert spent == sorted(spent) and len(set(spent)) == 3
    if policy:  # the room left is the policy release's (a 4th DP-SGD round may take it instead)
        assert compute_epsilon([PrivacyEvent(noise_multiplier=sigma, sample_rate=1 / 3, steps=9), planned], delta=1e-5) <= 2.0
        return
    reply = _train(cfg, tmp_path, 4)  # beyond the plan: nothing left
    assert reply.has_error() and reply.error.code == ERROR_BUDGET_EXHAUSTED


def test_accountant_continues_from_the_ledger_after_a_restart(tmp_path: Path) -> None:
    """A fresh process (no module caches) on the same store continues ε where the chain ends."""
    cfg = _make_config(_SIGMA)
    first = _train(cfg, tmp_path, 1)
    client.app._MODELS.clear()
    client.data._CACHE.clear()
    second = _train(cfg, tmp_path, 2)
    assert not first.has_error() and not second.has_error()
    assert second.content["metrics"]["dp-epsilon"] == pytest.approx(
        compute_epsilon([_EVENT, _EVENT], delta=1e-5), rel=1e-12
    )
    lines, _, _ = read_ledger_record(second.content[LEDGER_RECORD])
    assert len(lines) == 2  # the whole chain, every reply


@pytest.mark.parametrize("device_dp", [False, True])
def test_user_level_clipping_bounds_the_update(tmp_path: Path, device_dp: bool) -> None:
    """The update sent is clipped to the message's norm; update-clipped says whether it was."""
    preset = [] if device_dp else ["privacy.preset=off"]
    cfg = _make_config(*preset, "privacy.user.enabled=true", _SIGMA)
    unclipped = _train(_make_config(*preset, _SIGMA), tmp_path / "plain")
    received = {k: a.numpy() for k, a in _make_arrays(cfg).items()}
    for norm, bit in ((1e-4, 1), (1e6, 0)):
        if device_dp:  # the same device key as the plain run
            _copy_device_key(tmp_path / "plain", tmp_path / str(norm))
        reply = _train(cfg, tmp_path / str(norm), **{CLIPPING_NORM_KEY: norm})
        assert not reply.has_error(), reply.error
        assert set(reply.content["metrics"]) == train_metric_keys(device_dp, True)
        assert reply.content["metrics"]["update-clipped"] == bit
        sent = _weights(reply)
        update = math.sqrt(
            sum(float(np.sum((sent[k] - received[k]).astype(np.float64) ** 2)) for k in received)
        )
        assert update <= norm + 1e-6
        if bit == 0:  # untouched but for float32 rounding of (new - old) + old (same seed)
            plain = _weights(unclipped)
            assert all(np.allclose(sent[k], plain[k], rtol=0, atol=1e-6) for k in received)
        else:
            assert update == pytest.approx(norm, rel=1e-3)


@pytest.mark.parametrize("norm", [None, -1.0, float("nan"), "1.0"])
def test_missing_or_invalid_clipping_norm_is_a_bad_request(tmp_path: Path, norm: object) -> None:
    """User-level DP without a usable clipping norm declines before training."""
    cfg = _make_config("privacy.preset=off", "privacy.user.enabled=true")
    extra = {} if norm is None else {CLIPPING_NORM_KEY: norm}
    reply = _train(cfg, tmp_path, **extra)
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
    assert CLIPPING_NORM_KEY in reply.error.reason


def _make_reply(msg: Message, **extra: object) -> Message:
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    arrays.update(extra.pop("arrays", {}))
    metrics = {"num-examples": 12, "train-loss": 1.0, "steps": 3, **extra.pop("metrics", {})}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
            **extra,
        }
    )
    return Message(content, reply_to=msg)


def test_guard_mod_is_installed_and_blocks_what_may_not_leave(tmp_path: Path) -> None:
    """The ClientApp's guard lets a protocol reply out and blocks extra arrays, metrics, foreign ledgers."""
    mods = [mod for mod in app._mods if isinstance(mod, OutgoingGuardMod)]
    assert len(mods) == 1 and isinstance(mods[0], DeviceGuardMod)
    mod, cfg = mods[0], _make_config("privacy.preset=off")
    msg, ctxt = _make_message(cfg), _make_context(tmp_path)
    assert not mod(msg, ctxt, lambda m, c: _make_reply(m)).has_error()
    blocked = {
        "extra array": _make_reply(msg, arrays={"face.raw": np.zeros((48, 48), np.float32)}),
        "metric": _make_reply(msg, metrics={"embedding-0": 0.5}),
        "metric value": _make_reply(msg, metrics={"confusion": [0.5] * 49}),
    }
    for kind, reply in blocked.items():
        out = mod(msg, ctxt, lambda m, c, r=reply: r)
        assert out.has_error() and out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
        assert kind in out.error.reason
    # A ledger signed by a key that is not this device's own does not leave either,
    # nor one whose key the device cannot read (none, or a store it cannot open).
    dp_reply = _train(_make_config(_SIGMA), tmp_path)
    assert not mod(msg, ctxt, lambda m, c: dp_reply).has_error()
    with _device(tmp_path).open_store(create=False) as store:
        own = store.get_bytes(LEDGER_KEY_OBJECT)
        store.put_bytes(LEDGER_KEY_OBJECT, private_key_to_bytes(generate_private_key()))
        out = mod(msg, ctxt, lambda m, c: dp_reply)
        assert out.has_error() and "ledger key" in out.error.reason
        store.delete(LEDGER_KEY_OBJECT)
        out = mod(msg, ctxt, lambda m, c: dp_reply)
        assert out.has_error() and "ledger key" in out.error.reason
        store.put_bytes(LEDGER_KEY_OBJECT, own)
    key_file = _device(tmp_path).store_key_path
    key_file.write_bytes(bytes(32))  # another store key
    out = mod(msg, ctxt, lambda m, c: dp_reply)
    assert out.has_error() and "ledger key" in out.error.reason


def test_secure_mode_is_unpredictable_and_plain_mode_reproducible(tmp_path: Path) -> None:
    """Same seed: plain DP-SGD repeats exactly; secure mode's noise and sampling do not."""
    for secure in (False, True):
        cfg = _make_config(_SIGMA, f"privacy.secure_mode={str(secure).lower()}")
        first = _train(cfg, tmp_path / f"{secure}-0")
        # The same device (key) again: plain-mode noise is seeded from the device's key.
        _copy_device_key(tmp_path / f"{secure}-0", tmp_path / f"{secure}-1")
        second = _train(cfg, tmp_path / f"{secure}-1")
        assert not first.has_error() and not second.has_error()
        a, b = _weights(first), _weights(second)
        assert all(np.isfinite(v).all() for v in a.values())
        same = all(np.array_equal(a[k], b[k]) for k in a)
        assert same is not secure
        if not secure:
            plain = a
    other = _weights(_train(_make_config(_SIGMA), tmp_path / "other-device"))
    assert not all(np.array_equal(other[k], plain[k]) for k in plain)  # another key, other noise


def test_too_large_delta_is_declined_before_anything_is_written(tmp_path: Path) -> None:
    """δ above 1/(10·records) is a bad request naming the limit; the store stays empty."""
    reply = _train(_make_config("privacy.delta=0.05"), tmp_path)
    assert reply.has_error() and reply.error.code == ERROR_BAD_REQUEST
    assert "'privacy.delta' must be well below 1/records: at most 0.00833" in reply.error.reason
    assert not (tmp_path / "0").exists()


def test_preset_off_sends_plain_metrics_and_writes_no_ledger(tmp_path: Path) -> None:
    """Without DP the reply is the plain protocol: no dp metrics, no ledger, no store."""
    reply = _train(_make_config("privacy.preset=off"), tmp_path)
    assert not reply.has_error()
    assert set(reply.content["metrics"]) == TRAIN_METRICS
    assert LEDGER_RECORD not in reply.content.config_records
    assert not (tmp_path / "0").exists()


def test_tampered_ledger_and_changed_terms_are_refused(tmp_path: Path) -> None:
    """A device whose chain fails to verify, or whose budget changed mid-run, does not train."""
    cfg = _make_config(_SIGMA)
    assert not _train(cfg, tmp_path, 1).has_error()
    reply = _train(_make_config(_SIGMA, "privacy.device.epsilon=8"), tmp_path, 2)
    assert (
        reply.has_error()
        and reply.error.code == ERROR_BAD_REQUEST
        and "epsilon 3" in reply.error.reason
    )
    reply = _train(cfg, tmp_path, 0)
    assert (
        reply.has_error()
        and reply.error.code == ERROR_BAD_REQUEST
        and "before round 1" in reply.error.reason
    )
    # Rewritten with the store's key (the chain breaks) or not (authentication fails).
    device = _device(tmp_path)
    with device.open_store(create=False) as store:
        honest = store.get_bytes(device.chain_object)
        store.put_bytes(device.chain_object, honest.replace(b'"steps":3', b'"steps":1'))
    reply = _train(cfg, tmp_path, 2)
    assert reply.has_error() and reply.error.code == ERROR_TRAINING_FAILED
    assert reply.error.reason.startswith("device ledger fails verification")
    assert "hash does not match" in reply.error.reason
    with device.open_store(create=False) as store:
        store.put_bytes(device.chain_object, honest)
    path = device.store_path / "objects" / f"{device.chain_object}.bin"
    blob = bytearray(path.read_bytes())
    blob[40] ^= 1
    path.write_bytes(bytes(blob))
    reply = _train(cfg, tmp_path, 2)
    assert reply.has_error() and reply.error.code == ERROR_TRAINING_FAILED
    assert reply.error.reason.startswith("device ledger fails verification")
    assert "failed authentication" in reply.error.reason
    device.store_key_path.chmod(0o644)
    reply = _train(cfg, tmp_path, 2)
    assert reply.has_error() and reply.error.code == ERROR_TRAINING_FAILED
    assert reply.error.reason.startswith("device store unusable") and "0o600" in reply.error.reason


def test_a_chain_already_over_budget_is_refused(tmp_path: Path) -> None:
    """A chain that already spends more than the budget (same terms) declines every round."""
    cfg = _make_config(_SIGMA)
    store = DeviceStore.from_context(_make_context(tmp_path))
    with pytest.raises(RuntimeError, match="empty"):
        DevicePrivacy.open(store, cfg.privacy).ledger_record()
    loud = PrivacyEvent(noise_multiplier=0.5, sample_rate=1.0, steps=10)
    privacy = DevicePrivacy.open(store, cfg.privacy)
    privacy.ledger.append(
        server_round=1,
        event=loud,
        clipping_norm=1.0,
        delta=1e-5,
        epsilon=99.0,
        accountant="opacus_rdp",
        budget_epsilon=3.0,
        private_key=privacy._key,
    )
    reply = _train(cfg, tmp_path, 2)
    assert reply.has_error() and reply.error.code == ERROR_BUDGET_EXHAUSTED
    assert (
        reply.error.reason
        == "privacy budget exhausted: device 0 has already spent more than epsilon 3"
    )


def _make_dataset(n: int, seed: int = 0) -> TensorDataset:
    cfg = _make_config()
    data = client.data.load_device_data(cfg, {"partition-id": 0}).train
    index = torch.randint(0, len(data), (n,), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(*(t[index] for t in data.tensors))


def _has_opacus_state(model: torch.nn.Module) -> bool:
    hooks = any(m._forward_hooks or m._backward_hooks for m in model.modules())
    attrs = any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    return hooks or attrs or any("activations" in m.__dict__ for m in model.modules())


def test_dp_training_leaves_the_cached_model_clean_even_when_it_fails() -> None:
    """Two DP rounds, a failing DP round and a plain round run on one model; no Opacus state stays."""
    cfg = _make_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    data = _make_dataset(12)
    plan = plan_dp_sgd(12, batch_size=4, local_epochs=1)
    settings = DPSGDSettings(plan=plan, noise_multiplier=1.0, max_grad_norm=1.0)
    kwargs = {"cfg": cfg.train, "device": torch.device("cpu"), "seed": 1}
    for _ in range(2):
        result = train_local(model, data, aux_weight=1.0, dp=settings, **kwargs)
        assert result.steps == 3 and not _has_opacus_state(model)
    with pytest.raises(ValueError, match="aux_weight"):  # raises after a forward pass
        train_local(model, data, aux_weight=-1.0, dp=settings, **kwargs)
    assert not _has_opacus_state(model)
    before = get_state(model)
    result = train_local(model, data, aux_weight=1.0, **kwargs)
    assert result.steps == 3 and math.isfinite(result.loss)
    assert any(not np.array_equal(before[k], v) for k, v in get_state(model).items())


def test_poisson_batches_may_be_empty_or_single() -> None:
    """At q = 1/12 over 12 samples, empty and one-sample batches occur and train without error."""
    cfg = _make_config("train.batch_size=1", "train.local_epochs=3")
    data = _make_dataset(12)
    plan = plan_dp_sgd(12, batch_size=1, local_epochs=3)
    settings = DPSGDSettings(plan=plan, noise_multiplier=1.0, max_grad_norm=1.0)
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    loader = DataLoader(data, batch_size=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with private_training(model, optimizer, loader, settings=settings, seed=5) as (
        _,
        _,
        private_loader,
    ):
        sizes = [len(batch[-1]) for _ in range(3) for batch in private_loader]
    assert 0 in sizes and 1 in sizes and len(sizes) == plan.steps == 36
    result = train_local(
        model, data, cfg=cfg.train, aux_weight=1.0, device=torch.device("cpu"), seed=5, dp=settings
    )
    assert result.steps == 36 and math.isfinite(result.loss)
    assert all(np.isfinite(v).all() for v in get_state(model).values())


def test_proximal_term_survives_privatisation() -> None:
    """Under DP, FedProx's mu pulls the weights toward the global model (same noise, same batches)."""
    cfg = _make_config("train.optimizer=sgd", "train.lr=0.5")
    data = _make_dataset(12)
    settings = DPSGDSettings(
        plan=plan_dp_sgd(12, batch_size=4, local_epochs=1), noise_multiplier=0.5, max_grad_norm=1.0
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    start = get_state(model)
    drift = {}
    for mu in (0.0, 1.0):
        set_state(model, start)
        train_local(
            model,
            data,
            cfg=cfg.train,
            aux_weight=1.0,
            device=torch.device("cpu"),
            seed=3,
            proximal_mu=mu,
            dp=settings,
        )
        end = get_state(model)
        drift[mu] = math.sqrt(sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start))
    assert 0 < drift[1.0] < drift[0.0]


@pytest.mark.parametrize(("n", "batch_size"), [(12, 4), (12, 16), (93, 1), (1000, 7)])
def test_plan_matches_opacus_sampling(n: int, batch_size: int) -> None:
    """q, batches per epoch and the mean denominator are exactly what Opacus's loader uses."""
    dataset = TensorDataset(torch.zeros(n, 1))
    private_loader = DPDataLoader.from_data_loader(DataLoader(dataset, batch_size=batch_size))
    plan = plan_dp_sgd(n, batch_size=batch_size, local_epochs=2)
    assert plan.sample_rate == private_loader.sample_rate
    assert plan.steps_per_epoch == len(private_loader) and plan.steps == 2 * len(private_loader)
    assert plan.expected_batch_size == max(1, int(n * private_loader.sample_rate))
    if n == 93:  # 1 / (1 / 93) rounds below 93: Opacus takes 92 steps, and so do we
        assert plan.steps_per_epoch == 92
    # A loader that would take other steps than the accounted plan is refused.
    other = dataclasses.replace(plan, steps_per_epoch=plan.steps_per_epoch + 1)
    model = torch.nn.Linear(1, 1)
    settings = DPSGDSettings(plan=other, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="accounted plan"):
        with private_training(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(dataset, batch_size=batch_size),
            settings=settings,
            seed=0,
        ):
            pass


def test_device_store_resolution(tmp_path: Path) -> None:
    """Deployment, simulation, run-dir and temp-folder stores; a bad device id is refused."""

    def store(node: dict, run: dict) -> DeviceStore:
        return DeviceStore.from_context(
            Context(run_id=7, node_id=99, node_config=node, state=RecordDict(), run_config=run)
        )

    deployed = store(
        {DEVICE_DIR_KEY: str(tmp_path), DEVICE_ID_KEY: "phone-1", "partition-id": 3}, {}
    )
    assert (deployed.device_id, deployed.folder, deployed.run_id) == ("phone-1", tmp_path, 7)
    assert (deployed.store_path, deployed.store_key_path, deployed.chain_object) == (
        tmp_path / "store",
        tmp_path / "keys" / "store.key",
        "ledger.7.phone-1",
    )
    assert (deployed.legacy_key_path, deployed.legacy_chain_path) == (
        tmp_path / "keys" / "ledger.key",
        tmp_path / "runs" / "7" / "ledger" / "devices" / "phone-1.jsonl",
    )
    simulated = store({"partition-id": 3}, {DEVICE_ROOT_KEY: str(tmp_path)})
    assert (simulated.folder, simulated.legacy_chain_path) == (
        tmp_path / "3",
        tmp_path / "3" / "ledger" / "devices" / "3.jsonl",
    )
    assert store({"partition-id": 3}, {"run-dir": str(tmp_path / "r")}).folder == (
        tmp_path / "r.incomplete" / "simulated-devices" / "3"
    )
    longest = store({DEVICE_ID_KEY: "d" * 128}, {DEVICE_ROOT_KEY: str(tmp_path)})
    assert longest.chain_object == "ledger.7." + hashlib.sha256(b"d" * 128).hexdigest()[:32]
    fallback = store({}, {DEVICE_ROOT_KEY: ""})
    assert fallback.device_id == "99" and fallback.folder.parts[-3:] == (
        "emofed-devices",
        "run-7",
        "99",
    )
    with pytest.raises(ValueError, match="device-id"):
        store({DEVICE_ID_KEY: "../etc"}, {})
