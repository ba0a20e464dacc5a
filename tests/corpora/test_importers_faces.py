"""Tests of the face-image importers: FER2013 (csv and folders) and CK+."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from corpora import import_corpus
from corpora.folder import read_device_folder, read_federation
from models.labels import EMOTIONS


def _image(seed: int, shape: tuple[int, ...] = (48, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix, image)
    path.write_bytes(encoded.tobytes())
    return path


def _load(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    meta = read_federation(out)
    records = {
        device: [json.loads(line) for line in (out / device / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        for device in meta["devices"] + meta["heldout"]
    }
    return meta, records


# --- FER2013 csv ---------------------------------------------------------------------


def _make_fer_csv(root: Path, header: str) -> dict[int, np.ndarray]:
    """14 Training rows, 4 PublicTest, 3 PrivateTest and 4 broken rows; returns pixels by line."""
    columns = [c.strip() for c in header.split(",")]
    rows: list[dict[str, str]] = []
    for e in range(7):
        rows += [{"emotion": str(e), "Usage": "Training"}] * 2
    rows += [{"emotion": str(e), "Usage": "PublicTest"} for e in range(4)]
    rows += [{"emotion": str(e), "Usage": "PrivateTest"} for e in range(4, 7)]
    pixels: dict[int, np.ndarray] = {}
    lines = [header]
    for number, row in enumerate(rows, start=2):
        pixels[number] = _image(number)
        values = {**row, "pixels": " ".join(map(str, pixels[number].ravel()))}
        lines.append(",".join(values[c] for c in columns))
    good = " ".join(["7"] * 2304)
    broken = [
        {"emotion": "7", "Usage": "Training", "pixels": good},  # no such emotion id
        {"emotion": "3", "Usage": "Training", "pixels": " ".join(["7"] * 2303)},  # not square
        {"emotion": "3", "Usage": "Training", "pixels": " ".join(["300"] * 2304)},  # not 8-bit
    ]
    lines += [",".join(row[c] for c in columns) for row in broken]
    lines.append("3")  # a cut line
    root.mkdir(parents=True)
    (root / "fer2013.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pixels


@pytest.mark.parametrize("header", ["emotion,pixels,Usage", "emotion, Usage, pixels"])
def test_fer2013_csv_import(tmp_path, header):
    """Usage PublicTest/PrivateTest become held-out devices; pixels round-trip exactly."""
    pixels = _make_fer_csv(tmp_path / "fer", header)
    out = tmp_path / "fed"
    report = import_corpus("fer2013", tmp_path / "fer", out, devices=2, seed=0)
    meta, records = _load(out)
    assert report.samples == 21
    assert report.labels == dict.fromkeys(EMOTIONS, 3)
    assert report.skipped == {"unknown label": 1, "face: pixels not a square 8-bit image": 2, "malformed csv row": 1}
    assert report.partition == "dirichlet" and meta["identities"] == {}
    assert meta["devices"] == ["device-000", "device-001"] and meta["heldout"] == ["heldout-000"]
    held = records["heldout-000"]
    assert sorted(int(r["origin"].split(":")[1]) for r in held) == list(range(16, 23))
    assert {r["split"] for r in held} == {"test"}
    assert sum(len(records[d]) for d in meta["devices"]) == 14
    assert meta["import"]["heldout_source"] == "the corpus's official evaluation split"
    record = records["device-000"][0]
    written = cv2.imread(str(out / "device-000" / record["face"]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, pixels[int(record["origin"].split(":")[1])])
    train, test, skipped = read_device_folder(out / "device-000")
    assert len(train) + len(test) == len(records["device-000"]) and not skipped


# --- FER2013 folders -----------------------------------------------------------------


@pytest.mark.parametrize("eval_folder", ["validation", "test"])
def test_fer2013_folder_import(tmp_path, eval_folder):
    """train/ trains, validation/ or test/ is held out; broken images are skipped by reason."""
    root = tmp_path / "fer"
    names = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
    for e, name in enumerate(names):
        _save(root / "train" / name / f"{e}a.jpg", _image(e))
        _save(root / "train" / name / f"{e}b.png", _image(e + 10, (96, 96, 3)))
        _save(root / eval_folder / name / f"{e}.jpg", _image(e + 20))
    _save(root / "train" / "happy" / "Gesicht-ü.png", _image(99))
    (root / "train" / "angry" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    (root / "train" / "sad" / "empty.png").write_bytes(b"")
    _save(root / "train" / "contempt" / "x.png", _image(98))
    out = tmp_path / "fed"
    report = import_corpus("fer2013", root, out, devices=3, seed=1)
    meta, records = _load(out)
    assert report.samples == 22
    assert report.skipped == {"face: undecodable image": 1, "face: empty file": 1, "unknown label": 1}
    assert report.unknown_labels == {"contempt": 1}
    assert report.labels["happy"] == 4
    assert len(meta["devices"]) == 3
    held = [r for d in meta["heldout"] for r in records[d]]
    assert sorted(r["origin"] for r in held) == sorted(f"{eval_folder}/{n}/{e}.jpg" for e, n in enumerate(names))
    assert any(r["origin"] == "train/happy/Gesicht-ü.png" for d in meta["devices"] for r in records[d])
    shapes = set()
    for device in meta["devices"]:
        train, test, _ = read_device_folder(out / device)
        shapes |= {s.face.shape for s in train + test}
    assert shapes == {(48, 48), (96, 96, 3)}


# --- CK+ -----------------------------------------------------------------------------


def test_ckplus_import(tmp_path):
    """Contempt dropped, subjects are identities, subjects with one image share 'other'."""
    root = tmp_path / "CK+48"
    subjects = ("S005", "S010", "S011", "S014", "S022")
    for s, subject in enumerate(subjects):
        for e, emotion in enumerate(("anger", "happy", "surprise", "sadness", "contempt")):
            _save(root / emotion / f"{subject}_001_0000001{e}.png", _image(10 * s + e))
    _save(root / "fear" / "S098_002_00000020.png", _image(90))
    _save(root / "disgust" / "S099_003_00000015.png", _image(91))
    _save(root / "happy" / "img_001.png", _image(92))
    out = tmp_path / "fed"
    report = import_corpus("ckplus", root, out, seed=0)
    meta, records = _load(out)
    assert report.samples == 22
    assert report.dropped_labels == {"contempt": 5}
    assert report.labels == {"happy": 5, "sad": 5, "angry": 5, "fearful": 1, "disgusted": 1, "surprised": 5}
    assert report.skipped == {
        "label 'contempt' dropped (no shared emotion)": 5,
        "no subject (S###) in the file name": 1,
    }
    assert report.pooled_identities == ["S098", "S099"]
    assert len(meta["devices"]) + len(meta["heldout"]) == 6 and len(meta["heldout"]) == 1
    identities = meta["identities"]
    assert ["other", "S098", "S099"] in identities.values()
    train_ids = {i for d in meta["devices"] for i in identities[d]}
    held_ids = {i for d in meta["heldout"] for i in identities[d]}
    assert not train_ids & held_ids and train_ids | held_ids == {*subjects, "other", "S098", "S099"}
    for device, recs in records.items():
        assert {r["user"] for r in recs} <= set(identities[device])
