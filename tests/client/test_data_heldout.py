"""Held-out devices of an imported federation on the device side: evaluate only, counted skips."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app
from client.data import load_device_data
from corpora import import_corpus
from corpora.folder import FederationFolderError, read_federation
from emofed.config import load_config, to_json
from emofed.protocol import DEVICE_ROOT_KEY, ERROR_HELDOUT, EVAL_METRICS
from models import build_model, get_state, shared_state_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpora"))
from test_importers import _make_emodb  # noqa: E402  (the importer tests' fixture corpus)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages are stamped with the running task's identity; outside Flower, set one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EmoDB fixture (5 speakers) imported: 4 training devices, 1 held-out; one file broken after import."""
    root = tmp_path_factory.mktemp("heldout")
    out = root / "fed"
    import_corpus("emodb", _make_emodb(root / "emodb"), out, heldout_share=0.2, seed=1)
    first = sorted((out / "device-000" / "voice").iterdir())[0]
    first.write_bytes(b"not audio")  # damaged on the device after the import
    return out


def _make_cfg(folder: Path, *overrides: str):
    return load_config(
        None, ["data.source=folder", f"data.path={folder}", "devices=4", "privacy.preset=off", *overrides]
    )


def _make_context(partition: int, root: Path) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(),
        run_config={DEVICE_ROOT_KEY: str(root)},
    )


def _make_message(kind: str, cfg) -> Message:
    model = build_model(cfg.model, device="cpu")
    state = get_state(model, shared_state_keys(model))
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})
    record = ConfigRecord({"emofed-config": to_json(cfg), "server-round": 1})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=1, message_type=kind)


def test_heldout_partitions_follow_the_training_devices(federation: Path) -> None:
    """Partitions 0-3 are the training devices; partition 4 is the held-out device, test only."""
    meta = read_federation(federation)
    assert len(meta["devices"]) == 4 and meta["heldout"] == ["heldout-000"]
    cfg = _make_cfg(federation)
    train = load_device_data(cfg, {"partition-id": 0})
    heldout = load_device_data(cfg, {"partition-id": 4})
    assert not train.heldout and train.num_train > 0 and train.num_test > 0
    assert heldout.heldout and heldout.device_id == "heldout-000"
    lines = (federation / "heldout-000" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert heldout.num_train == 0 and heldout.num_test == len(lines) == 6
    assert train.skipped == {"voice: undecodable audio": 1, "no usable modality": 1}


def test_heldout_device_declines_training(federation: Path, tmp_path: Path) -> None:
    """Asked to train, a held-out device answers ERROR_HELDOUT and sends no weights."""
    cfg = _make_cfg(federation)
    reply = app(_make_message(MessageType.TRAIN, cfg), _make_context(4, tmp_path))
    assert reply.has_error() and reply.error.code == ERROR_HELDOUT
    assert "held-out" in reply.error.reason


def test_evaluation_reports_the_heldout_flag_and_skips(federation: Path, tmp_path: Path) -> None:
    """Evaluation replies carry `heldout` and per-modality skip counts, within the protocol."""
    cfg = _make_cfg(federation, "personal.enabled=false")
    held = app(_make_message(MessageType.EVALUATE, cfg), _make_context(4, tmp_path))
    own = app(_make_message(MessageType.EVALUATE, cfg), _make_context(0, tmp_path))
    assert not held.has_error() and not own.has_error()
    held_metrics, own_metrics = held.content["metrics"], own.content["metrics"]
    assert set(held_metrics) == set(own_metrics) == EVAL_METRICS
    assert held_metrics["heldout"] == 1 and held_metrics["num-examples"] == 6
    assert own_metrics["heldout"] == 0
    assert (own_metrics["skipped-voice"], own_metrics["skipped-other"]) == (1, 1)
    assert held_metrics["skipped-voice"] == 0


def test_device_with_nothing_usable_says_why(federation: Path, tmp_path: Path) -> None:
    """A training device whose every file is broken declines with the counted reasons."""
    broken = tmp_path / "fed"
    shutil.copytree(federation, broken)
    for wav in (broken / "device-001" / "voice").iterdir():
        wav.write_bytes(b"x")
    cfg = _make_cfg(broken)
    reply = app(_make_message(MessageType.TRAIN, cfg), _make_context(1, tmp_path / "stores"))
    assert reply.has_error()
    assert "device-001: no usable training sample" in reply.error.reason
    assert "voice: undecodable audio" in reply.error.reason


def test_a_device_listed_twice_is_refused(federation: Path, tmp_path: Path) -> None:
    """A folder listed under both 'devices' and 'heldout' is a malformed federation."""
    bad = tmp_path / "fed"
    shutil.copytree(federation, bad)
    meta = json.loads((bad / "federation.json").read_text(encoding="utf-8"))
    meta["heldout"].append("device-000")
    (bad / "federation.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(FederationFolderError, match="both 'devices' and 'heldout'"):
        read_federation(bad)
