"""Device data: the federation folder reader and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from client.data import UnusableDeviceData, load_device_data, preprocess_device
from corpora.folder import FederationFolderError, read_device_folder, read_federation
from emofed.config import load_config
from models import EMOTIONS


def _make_face(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((96, 96, 3), 200, np.uint8)
    cv2.ellipse(image, (48, 50), (30, 38), 0, 0, 360, (150, 170, 210), -1)
    return np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def _make_device(root: Path, name: str, n: int = 6) -> Path:
    folder = root / name
    (folder / "face").mkdir(parents=True)
    (folder / "voice").mkdir()
    lines = []
    for i in range(n):
        cv2.imwrite(str(folder / "face" / f"{i}.png"), _make_face(i))
        wave = 0.3 * np.sin(2 * np.pi * (150 + 20 * i) * np.arange(22050) / 22050)
        sf.write(folder / "voice" / f"{i}.wav", wave.astype(np.float32), 22050, subtype="PCM_16")
        lines.append(
            {
                "id": f"s{i}",
                "label": EMOTIONS[i % 7],
                "split": "test" if i % 3 == 0 else "train",
                "face": f"face/{i}.png",
                "voice": f"voice/{i}.wav",
                "text": f"sample number {i} feels like {EMOTIONS[i % 7]}",
            }
        )
    (folder / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder


def _make_federation(root: Path, devices: int = 2) -> Path:
    names = [f"device-{i:03d}" for i in range(devices)]
    for name in names:
        _make_device(root, name)
    (root / "federation.json").write_text(
        json.dumps({"format": "emofed-federation/1", "devices": names, "labels": list(EMOTIONS)})
    )
    return root


def test_reads_a_clean_device(tmp_path: Path) -> None:
    """Every sample of a clean folder is read, split as declared."""
    train, test, skipped = read_device_folder(_make_device(tmp_path, "d"))
    assert (len(train), len(test), sum(skipped.values())) == (4, 2, 0)
    assert train[0].face is not None and train[0].voice_rate == 22050


def test_bad_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """Corrupt audio, a missing image, a garbage line and an unknown label never crash."""
    folder = _make_device(tmp_path, "d")
    (folder / "voice" / "1.wav").write_bytes(b"RIFF\x00\x00garbage")
    (folder / "face" / "2.png").unlink()
    with open(folder / "samples.jsonl", "ab") as handle:
        handle.write(b"{not json\n\xff\xfe\n")
        handle.write(json.dumps({"label": "bored", "text": "meh"}).encode() + b"\n")
        handle.write(json.dumps({"label": "happy", "text": "   ", "face": "../../etc/passwd"}).encode() + b"\n")
    train, test, skipped = read_device_folder(folder)
    assert skipped["voice: undecodable audio"] == 1
    assert skipped["face: file missing"] == 1
    assert skipped["malformed line"] == 2
    assert skipped["unknown label"] == 1
    assert skipped["face: path outside the device folder"] == 1
    assert skipped["no usable modality"] == 1
    assert len(train) + len(test) == 6  # media problems hide a modality, not the sample


def test_camera_removed_device_still_trains(tmp_path: Path) -> None:
    """A device whose face images were deleted trains on voice and text."""
    folder = _make_device(tmp_path, "d")
    for path in (folder / "face").iterdir():
        path.unlink()
    cfg = load_config(None, ["devices=2"])
    train, test, skipped = read_device_folder(folder)
    data = preprocess_device(cfg, "d", train, test, skipped)
    mask = data.train.tensors[4]
    assert mask[:, 0].sum() == 0 and mask[:, 1].all()
    assert skipped["face: file missing"] == 6


def test_device_without_usable_data_is_a_clear_error(tmp_path: Path) -> None:
    """A device with nothing usable raises UnusableDeviceData naming why."""
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "samples.jsonl").write_text('{"label": "nope"}\n')
    cfg = load_config(None, ["devices=2"])
    train, test, skipped = read_device_folder(folder)
    with pytest.raises(UnusableDeviceData, match="no usable training sample.*unknown label"):
        preprocess_device(cfg, "empty", train, test, skipped)


def test_federation_index_errors(tmp_path: Path) -> None:
    """A missing folder, a missing index or a missing device folder is named."""
    with pytest.raises(FederationFolderError, match="data folder not found"):
        read_federation(tmp_path / "nowhere")
    tmp_path.joinpath("fed").mkdir()
    with pytest.raises(FederationFolderError, match="federation.json is missing"):
        read_federation(tmp_path / "fed")
    (tmp_path / "fed" / "federation.json").write_text(
        json.dumps({"format": "emofed-federation/1", "devices": ["a"]})
    )
    with pytest.raises(FederationFolderError, match="device folders missing: a"):
        read_federation(tmp_path / "fed")


def test_load_device_data_from_folder_by_partition(tmp_path: Path) -> None:
    """In simulation a folder federation is split by partition id."""
    root = _make_federation(tmp_path / "fed")
    cfg = load_config(None, ["devices=2", "data.source=folder", f"data.path={root}"])
    data = load_device_data(cfg, {"partition-id": 1})
    assert data.device_id == "device-001" and (data.num_train, data.num_test) == (4, 2)
    with pytest.raises(UnusableDeviceData, match="partition 5 has no device"):
        load_device_data(cfg, {"partition-id": 5})


def test_local_training_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    """Two trainings from the same weights and seed give identical weights, whatever ran before."""
    import torch

    from client.train import train_local
    from models import build_model, get_state, set_state

    cfg = load_config(None, ["devices=2", "train.local_epochs=1"])
    train, test, skipped = read_device_folder(_make_device(tmp_path, "d"))
    data = preprocess_device(cfg, "d", train, test, skipped)
    model = build_model(cfg.model, device="cpu")
    start = get_state(model)
    results = []
    for burn in (0, 5):
        torch.rand(burn)  # disturb the global RNG as another device's work would
        set_state(model, start)
        train_local(model, data.train, cfg=cfg.train, aux_weight=1.0, device=torch.device("cpu"), seed=11)
        results.append(get_state(model))
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key])
