"""Tests of writing a synthetic federation to a federation folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from emofed.config import DataConfig
from models.labels import EMOTIONS
from simulations.export import FEDERATION_FORMAT, write_federation
from simulations.synthetic import FACE_SIZE, SyntheticFederation

RATE = 16000


def _make_federation(num_devices: int = 3, **overrides: object) -> SyntheticFederation:
    config = dataclasses.replace(
        DataConfig(samples_per_device=8, voice_sample_rate=RATE, p_no_camera=0.3), **overrides
    )
    return SyntheticFederation(config, num_devices=num_devices, seed=11)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_written_federation_round_trips(tmp_path):
    """Index, records, images and audio on disk match the federation in memory."""
    fed = _make_federation(num_devices=4)
    out = write_federation(fed, tmp_path / "fed")
    assert out == tmp_path / "fed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"], "no temporary folder left"

    index = json.loads((out / "federation.json").read_text(encoding="utf-8"))
    assert index["format"] == FEDERATION_FORMAT
    assert index["source"] == "synthetic"
    assert index["labels"] == list(EMOTIONS)
    assert index["devices"] == ["device-000", "device-001", "device-002", "device-003"]
    assert index["seed"] == 11
    assert index["config"] == dataclasses.asdict(fed.config)

    for d, name in enumerate(index["devices"]):
        records = _read_jsonl(out / name / "samples.jsonl")
        infos = fed.device_info(d)
        samples = fed.device(d)
        assert len(records) == len(infos) == len(samples)
        for record, info, sample in zip(records, infos, samples, strict=True):
            assert record["id"] == f"s{info.index:05d}"
            assert record["user"] == f"user-{info.user:03d}"
            assert record["split"] == info.split
            assert record["label"] == EMOTIONS[info.label]
            assert record["text"] == sample.text
            if sample.face is None:
                assert record["face"] is None
            else:
                image = cv2.imread(str(out / name / record["face"]), cv2.IMREAD_UNCHANGED)
                assert image.shape == (FACE_SIZE, FACE_SIZE, 3)
                np.testing.assert_array_equal(image, sample.face)  # PNG is lossless
            if sample.voice is None:
                assert record["voice"] is None
            else:
                wave, rate = soundfile.read(str(out / name / record["voice"]), dtype="float32")
                assert rate == RATE
                assert soundfile.info(str(out / name / record["voice"])).subtype == "PCM_16"
                np.testing.assert_allclose(wave, sample.voice, atol=1.5 / 2**15)


def test_training_records_carry_the_noisy_label(tmp_path):
    """A flipped training label is written as the device would see it."""
    fed = _make_federation(num_devices=2, label_noise=0.5)
    out = write_federation(fed, tmp_path / "fed")
    flipped = 0
    for d in range(2):
        records = _read_jsonl(out / f"device-00{d}" / "samples.jsonl")
        for record, info in zip(records, fed.device_info(d), strict=True):
            assert record["label"] == EMOTIONS[info.label]
            flipped += record["label"] != EMOTIONS[info.true_label]
            if record["split"] == "test":
                assert record["label"] == EMOTIONS[info.true_label]
    assert flipped > 0


def test_existing_non_empty_folder_is_left_alone(tmp_path):
    """Writing over a folder with content raises and changes nothing."""
    out = tmp_path / "fed"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_federation(_make_federation(num_devices=1), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]


def test_existing_empty_folder_is_filled(tmp_path):
    """An empty destination folder is acceptable."""
    out = tmp_path / "fed"
    out.mkdir()
    write_federation(_make_federation(num_devices=1), out)
    assert (out / "federation.json").is_file()
    assert (out / "device-000" / "samples.jsonl").is_file()


def test_device_reader_reads_the_written_federation(tmp_path):
    """The client's federation-folder reader gets back the same splits and labels."""
    data = pytest.importorskip("client.data")
    fed = _make_federation(num_devices=2, p_no_camera=0.5)
    out = write_federation(fed, tmp_path / "fed")
    meta = data.read_federation(out)
    for d, name in enumerate(meta["devices"]):
        train, test, skipped = data.read_device_folder(out / name)
        expected_train, expected_test = fed.device_split(d)
        assert not skipped
        assert [s.label for s in train] == [s.label for s in expected_train]
        assert [s.label for s in test] == [s.label for s in expected_test]
        assert [s.text for s in train + test] == [s.text for s in expected_train + expected_test]
        assert [s.face is None for s in train] == [s.face is None for s in expected_train]
        assert [s.voice_rate for s in train] == [s.voice_rate for s in expected_train]
