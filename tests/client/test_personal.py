"""Personal layers: fine-tuned on the device, kept encrypted, never in an outgoing message."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import TensorDataset

import client.personal
from client.app import ERROR_TRAINING_FAILED, app, evaluate
from client.data import DeviceData, load_device_data
from client.dp import DeviceStore
from client.personal import existing_device_store, fine_tune, load_personal, personal_keys, swapped
from client.train import evaluate_local, train_local
from device.layout import PERSONAL_OBJECT, STORE_DIR, STORE_KEY_FILE
from device.store import EncryptedStore, generate_key_file
from emofed.config import ConfigError, EmofedConfig, load_config, to_json
from emofed.protocol import DEVICE_ROOT_KEY, PERSONAL_ACCURACY_KEY, eval_metric_keys
from models import build_model, get_state, set_state, shared_state_keys
from server.report import gain_distribution

CPU = torch.device("cpu")
# The CNN network: these tests pin its personal-layer names (aux_heads, fusion gates).
OVERRIDES = ["devices=3", "data.samples_per_device=12", "train.local_epochs=1", "privacy.preset=off", "model.kind=cnn"]
CFG = load_config(None, OVERRIDES)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _make_arrays(cfg: EmofedConfig = CFG) -> ArrayRecord:
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu")
    state = get_state(model, shared_state_keys(model))
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _make_message(kind: str, arrays: ArrayRecord, cfg: EmofedConfig = CFG, server_round: int = 1) -> Message:
    record = ConfigRecord({"emofed-config": to_json(cfg), "server-round": server_round})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=1, message_type=kind)


def _make_context(partition: int, root: Path) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
        run_config={DEVICE_ROOT_KEY: str(root)},
    )


def _open_store(context: Context) -> EncryptedStore:
    return DeviceStore.from_context(context).open_store()


def _stored_personal(context: Context) -> dict[str, np.ndarray]:
    with _open_store(context) as store:
        model = build_model(CFG.model, device="cpu")
        stored = load_personal(store, personal_keys(model, CFG.personal.layers))
    assert stored is not None
    return stored


# -- configuration ---------------------------------------------------------------------


def test_personal_defaults_keep_the_classifier_head_personal() -> None:
    """On by default, with the fused classifier head as the personal layer."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml")
    assert cfg.personal.enabled and cfg.personal.layers == ["head"]
    assert load_config(None, ["model.kind=cnn", "personal.layers=[head,aux_heads]"]).personal.layers == ["head", "aux_heads"]
    with pytest.raises(ConfigError, match="may only hold 'head' with model.kind=features"):
        load_config(None, ["personal.layers=[head,aux_heads]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("personal.layers=[face]", "'personal.layers' items must be among head, aux_heads, fusion. Found 'face'."),
        ("personal.layers=[]", "'personal.layers' must name at least one layer"),
        ("personal.layers=[head,head]", "'personal.layers' must not repeat a layer"),
        ("personal.epochs=0", "'personal.epochs' must be in [1, 1000]. Found 0."),
        ("personal.lr=0", "'personal.lr' must be in [1e-07, 10.0]. Found 0.0."),
        ("personal.prox=-1", "'personal.prox' must be in [0.0, 100.0]. Found -1.0."),
        ("personal.enable=true", "unknown key 'personal.enable'"),
    ],
)
def test_bad_personal_config_is_one_line_naming_the_key(override: str, message: str) -> None:
    """Unknown names, empty or repeated layers and out-of-range numbers are refused."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fusion_without_weights_cannot_be_personal() -> None:
    """Mean fusion has no weights, so it cannot be a personal layer."""
    with pytest.raises(ConfigError, match="'personal.layers' may not hold 'fusion'"):
        load_config(None, ["model.kind=cnn", "model.fusion.kind=mean", "personal.layers=[fusion]"])
    assert load_config(None, ["model.fusion.kind=mean", "personal.enabled=false", "personal.layers=[fusion]"])


# -- fine-tuning -------------------------------------------------------------------------


def _make_dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    face = torch.randn(n, 1, 48, 48, generator=generator)
    voice = torch.randn(n, 1, 64, 101, generator=generator)
    ids = torch.randint(1, 1000, (n, 32), generator=generator)
    attn = torch.ones(n, 32, dtype=torch.long)
    mask = torch.ones(n, 3)
    label = torch.randint(0, 7, (n,), generator=generator)
    return TensorDataset(face, voice, ids, attn, mask, label)


def test_fine_tuning_changes_only_the_personal_copy() -> None:
    """The global weights come back unchanged and no shared weight gets a gradient."""
    torch.manual_seed(1)
    model = build_model(CFG.model, device="cpu")
    keys = personal_keys(model, ["head", "aux_heads"])
    assert keys == ["aux_heads.0.weight", "aux_heads.0.bias", "aux_heads.1.weight", "aux_heads.1.bias",
                    "aux_heads.2.weight", "aux_heads.2.bias", "head.weight", "head.bias"]
    before = get_state(model, shared_state_keys(model))
    start = get_state(model, keys)
    result = fine_tune(
        model, _make_dataset(20, 0), start, cfg=CFG.personal, batch_size=8, aux_weight=1.0, device=CPU, seed=3
    )
    after = get_state(model, shared_state_keys(model))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert result.steps == CFG.personal.epochs * 3
    assert set(result.arrays) == set(keys)
    assert all(not np.array_equal(result.arrays[k], start[k]) for k in keys)


def test_swapped_restores_the_global_weights_on_error() -> None:
    """A failure inside the block still puts the global weights back."""
    model = build_model(CFG.model, device="cpu")
    keys = personal_keys(model, ["head"])
    global_head = get_state(model, keys)
    with pytest.raises(RuntimeError, match="boom"), swapped(model, {k: v + 1 for k, v in global_head.items()}):
        assert not np.array_equal(get_state(model, keys)["head.weight"], global_head["head.weight"])
        raise RuntimeError("boom")
    assert all(np.array_equal(get_state(model, keys)[k], global_head[k]) for k in keys)


def test_gain_distribution_matches_a_hand_count() -> None:
    """Mean and worst gain and the share of devices that lose, from three devices."""
    out = gain_distribution([0.5, 0.6, 0.8], [0.7, 0.5, 0.8], [10, 20, 10])
    assert out["personal-gains"] == pytest.approx([-0.1, 0.0, 0.2])
    assert out["personal-gain-mean"] == pytest.approx(0.1 / 3)
    assert out["personal-gain-worst"] == pytest.approx(-0.1)
    assert out["personal-loss-share"] == pytest.approx(1 / 3)
    assert out["personal-accuracy"] == pytest.approx((7 + 10 + 8) / 40)
    with pytest.raises(ValueError, match="one global accuracy"):
        gain_distribution([0.5], [0.5, 0.6], [1, 1])


def _fedavg(model: torch.nn.Module, devices: list[DeviceData], cfg: EmofedConfig, rounds: int) -> None:
    """Plain in-process FedAvg of every trainable weight (what `emofed simulate` runs)."""
    keys = shared_state_keys(model)
    global_state = get_state(model, keys)
    for server_round in range(rounds):
        states, weights = [], []
        for index, device_data in enumerate(devices):
            set_state(model, global_state)
            train_local(
                model, device_data.train, cfg=cfg.train, aux_weight=cfg.model.fusion.aux_weight,
                device=CPU, seed=1000 * server_round + index,
            )
            states.append(get_state(model, keys))
            weights.append(len(device_data.train))
        global_state = {k: np.average([s[k] for s in states], axis=0, weights=weights) for k in keys}
        global_state = {k: v.astype(np.float32) for k, v in global_state.items()}
    set_state(model, global_state)


@pytest.mark.slow
def test_personalisation_improves_accuracy_where_identities_differ() -> None:
    """On the synthetic federation (one user per device), personal heads beat the global model."""
    cfg = load_config(None, ["devices=6", "data.samples_per_device=60", "privacy.preset=off", "seed=11"])
    devices = [load_device_data(cfg, {"partition-id": i}) for i in range(cfg.devices)]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, device="cpu")
    _fedavg(model, devices, cfg, rounds=3)
    keys = personal_keys(model, cfg.personal.layers)
    global_acc, personal_acc, sizes = [], [], []
    for index, device_data in enumerate(devices):
        global_acc.append(evaluate_local(model, device_data.test, batch_size=64, device=CPU).accuracy)
        result = fine_tune(
            model, device_data.train, get_state(model, keys), cfg=cfg.personal,
            batch_size=cfg.train.batch_size, aux_weight=cfg.model.fusion.aux_weight, device=CPU, seed=index,
        )
        with swapped(model, result.arrays):
            personal_acc.append(evaluate_local(model, device_data.test, batch_size=64, device=CPU).accuracy)
        sizes.append(len(device_data.test))
    gains = gain_distribution(global_acc, personal_acc, sizes)
    assert gains["personal-gain-mean"] > 0.03, gains
    assert gains["personal-loss-share"] < 0.5, gains
    assert gains["personal-accuracy"] > np.average(global_acc, weights=sizes) + 0.03, gains


# -- the ClientApp: store, evaluation and the outgoing guard -----------------------------------


def test_evaluation_reports_personal_accuracy_and_keeps_layers_encrypted(tmp_path: Path) -> None:
    """Evaluate fine-tunes, stores the layers encrypted (0600 key) and reports both accuracies."""
    context = _make_context(0, tmp_path)
    reply = app(_make_message(MessageType.EVALUATE, _make_arrays()), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert set(metrics) == eval_metric_keys(True)
    assert 0.0 <= metrics[PERSONAL_ACCURACY_KEY] <= 1.0
    key_file = tmp_path / "0" / "keys" / STORE_KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    personal = _stored_personal(context)
    assert set(personal) == {"head.weight", "head.bias"}
    # At rest the object is ciphertext: the head's bytes appear nowhere in the store.
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "0" / STORE_DIR).rglob("*") if p.is_file())
    assert personal["head.weight"].tobytes()[:64] not in blobs
    assert not np.array_equal(personal["head.weight"], _make_arrays()["head.weight"].numpy())


def test_personal_layers_persist_and_warm_start_across_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round's fine-tuning starts from the layers the previous round stored."""
    starts: list[dict[str, np.ndarray]] = []

    def spy(model, data, start, **kwargs):  # noqa: ANN001, ANN003, ANN202 - same call as fine_tune
        starts.append({k: np.array(v, copy=True) for k, v in start.items()})
        return fine_tune(model, data, start, **kwargs)

    monkeypatch.setattr(client.personal, "fine_tune", spy)
    context = _make_context(1, tmp_path)
    arrays = _make_arrays()
    assert not evaluate(_make_message(MessageType.EVALUATE, arrays, server_round=1), context).has_error()
    first = _stored_personal(context)
    assert not evaluate(_make_message(MessageType.EVALUATE, arrays, server_round=2), context).has_error()
    second = _stored_personal(context)
    assert len(starts) == 2
    assert np.array_equal(starts[0]["head.weight"], arrays["head.weight"].numpy())  # first: the global head
    assert all(np.array_equal(starts[1][k], first[k]) for k in first)  # then: what was stored
    assert not np.array_equal(first["head.weight"], second["head.weight"])


def test_wrong_store_key_is_a_clean_error(tmp_path: Path) -> None:
    """A key file that does not open the store declines the request, never overwrites the store."""
    context = _make_context(0, tmp_path)
    assert not evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), context).has_error()
    stored_blob = (tmp_path / "0" / STORE_DIR / "objects" / f"{PERSONAL_OBJECT}.bin").read_bytes()
    key_file = tmp_path / "0" / "keys" / STORE_KEY_FILE
    key_file.unlink()
    generate_key_file(key_file)
    reply = evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), context)
    assert reply.has_error() and reply.error.code == ERROR_TRAINING_FAILED
    assert "device store unusable" in (reply.error.reason or "")
    assert (tmp_path / "0" / STORE_DIR / "objects" / f"{PERSONAL_OBJECT}.bin").read_bytes() == stored_blob


def test_missing_store_key_file_is_never_replaced(tmp_path: Path) -> None:
    """An existing store whose key file is gone is an error; no fresh key file is made for it."""
    context = _make_context(0, tmp_path)
    assert not evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), context).has_error()
    key_file = tmp_path / "0" / "keys" / STORE_KEY_FILE
    key_file.unlink()
    with pytest.raises(FileNotFoundError):
        _open_store(context)
    with pytest.raises(FileNotFoundError):
        existing_device_store(context)
    reply = evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), context)
    assert reply.has_error() and reply.error.code == ERROR_TRAINING_FAILED
    assert "device store unusable" in (reply.error.reason or "")
    assert not key_file.exists()


def test_training_reply_never_carries_personal_layers(tmp_path: Path) -> None:
    """A device's shared update is bit-identical with or without personal layers, and holds none."""
    arrays = _make_arrays()
    plain = app(_make_message(MessageType.TRAIN, arrays), _make_context(0, tmp_path / "plain"))
    personalised_ctx = _make_context(0, tmp_path / "personal")
    assert not app(_make_message(MessageType.EVALUATE, arrays), personalised_ctx).has_error()
    personal = _stored_personal(personalised_ctx)
    reply = app(_make_message(MessageType.TRAIN, arrays), personalised_ctx)
    assert not plain.has_error() and not reply.has_error(), reply.error
    sent, baseline = reply.content["arrays"], plain.content["arrays"]
    assert list(sent.keys()) == list(arrays.keys())  # exactly what the server sent, nothing more
    assert all(np.array_equal(sent[k].numpy(), baseline[k].numpy()) for k in arrays)
    for key, value in personal.items():
        assert all(not np.array_equal(value, a.numpy()) for a in sent.values()), key


def _guarded_reply(context: Context, arrays: ArrayRecord, content: RecordDict) -> Message:
    msg = _make_message(MessageType.TRAIN, arrays)
    reply_to_send = Message(content, reply_to=msg)
    guard = app._mods[-1]  # DeviceGuardMod, innermost: it checks what the app answers
    return guard(msg, context, lambda _msg, _ctxt: reply_to_send)


def test_guard_blocks_a_reply_carrying_personal_layers(tmp_path: Path) -> None:
    """An update whose head is the device's personal head is refused; the global one passes."""
    context = _make_context(2, tmp_path)
    arrays = _make_arrays()
    assert not app(_make_message(MessageType.EVALUATE, arrays), context).has_error()
    personal = _stored_personal(context)
    metrics = MetricRecord({"num-examples": 9, "train-loss": 1.0, "steps": 1})
    leaked = ArrayRecord({k: Array(personal[k]) if k in personal else a for k, a in arrays.items()})
    blocked = _guarded_reply(context, arrays, RecordDict({"arrays": leaked, "metrics": metrics}))
    assert blocked.has_error() and "personal layer" in (blocked.error.reason or "")
    # The same reply with the global head (or any other update) goes out.
    allowed = _guarded_reply(context, arrays, RecordDict({"arrays": arrays, "metrics": metrics}))
    assert not allowed.has_error(), allowed.error
    # Under another name it is refused too (and would be as an extra array anyway).
    extra = ArrayRecord({**dict(arrays.items()), "personal.head.weight": Array(personal["head.weight"])})
    refused = _guarded_reply(context, arrays, RecordDict({"arrays": extra, "metrics": metrics}))
    assert refused.has_error() and "personal layer" in (refused.error.reason or "")


def _make_eval_content(accuracy: float, personal: float | None, n: int = 10) -> RecordDict:
    correct = round(accuracy * n)
    confusion = [0] * 49
    confusion[0], confusion[1] = correct, n - correct  # class 0: `correct` right, the rest wrong
    metrics = {
        "num-examples": n, "loss": 1.0, "accuracy": accuracy, "confusion": confusion,
        **{f"{m}-{k}": 0 for m in ("face", "voice", "text") for k in ("correct", "total")},
    }
    if personal is not None:
        metrics[PERSONAL_ACCURACY_KEY] = personal
    return RecordDict({"metrics": MetricRecord(metrics)})


def test_server_requires_and_aggregates_personal_accuracy() -> None:
    """With personal layers on, the screen demands personal-accuracy and the round reports the gains."""
    from server.strategy import aggregate_eval_metrics, screen_eval_reply

    assert screen_eval_reply(_make_eval_content(0.5, 0.7), personal=True) is None
    missing = screen_eval_reply(_make_eval_content(0.5, None), personal=True) or ""
    assert "missing [" in missing and "'personal-accuracy'" in missing.split("missing", 1)[1]
    assert "unexpected ['personal-accuracy']" in (screen_eval_reply(_make_eval_content(0.5, 0.7)) or "")
    assert "must be in [0, 1]" in (screen_eval_reply(_make_eval_content(0.5, 1.5), personal=True) or "")
    out = aggregate_eval_metrics([_make_eval_content(0.5, 0.7), _make_eval_content(0.8, 0.6)], "num-examples")
    assert out["personal-gains"] == pytest.approx([-0.2, 0.2])
    assert out["personal-gain-mean"] == pytest.approx(0.0) and out["personal-loss-share"] == 0.5
    assert out["personal-accuracy"] == pytest.approx(0.65) and out["accuracy"] == pytest.approx(0.65)


def test_deployed_device_keeps_layers_in_its_folder_across_runs(tmp_path: Path) -> None:
    """With a device-dir the store is <dir>/store (what `device run` reads), kept from run to run."""
    folder = tmp_path / "dev0"

    def context(run_id: int) -> Context:
        node = {"partition-id": 0, "device-dir": str(folder), "device-id": "dev0"}
        return Context(run_id=run_id, node_id=1, node_config=node, state=RecordDict(), run_config={})

    assert not evaluate(_make_message(MessageType.EVALUATE, _make_arrays()), context(1)).has_error()
    assert (folder / STORE_DIR / "store.json").is_file() and (folder / "keys" / STORE_KEY_FILE).is_file()
    first = _stored_personal(context(2))
    # A later run that personalises more layers starts them again from the global model.
    wider = load_config(None, [*OVERRIDES, "personal.layers=[head,aux_heads]"])
    assert not evaluate(_make_message(MessageType.EVALUATE, _make_arrays(wider), wider), context(2)).has_error()
    with _open_store(context(3)) as store:
        stored = store.get_arrays(PERSONAL_OBJECT)
    # Same seed and the same (global) starting point: the head is re-derived exactly, not
    # warm-started from the stored one (which would move it further).
    assert len(stored) == 8 and np.array_equal(stored["head.weight"], first["head.weight"])


def test_guard_passes_weights_returned_as_the_server_sent_them(tmp_path: Path) -> None:
    """Weights that got no gradient come back as sent; equal to a personal copy, they still go out."""
    context = _make_context(2, tmp_path)
    arrays = _make_arrays()
    assert not app(_make_message(MessageType.EVALUATE, arrays), context).has_error()
    personal = _stored_personal(context)
    metrics = MetricRecord({"num-examples": 9, "train-loss": 1.0, "steps": 1})
    # The server's global head equals the device's personal head (neither could move).
    sent = ArrayRecord({k: Array(personal[k]) if k in personal else a for k, a in arrays.items()})
    unchanged = _guarded_reply(context, sent, RecordDict({"arrays": sent, "metrics": metrics}))
    assert not unchanged.has_error(), unchanged.error
    # Sent anything else, the same values are still the personal head, and refused.
    blocked = _guarded_reply(context, arrays, RecordDict({"arrays": sent, "metrics": metrics}))
    assert blocked.has_error() and "personal layer" in (blocked.error.reason or "")
