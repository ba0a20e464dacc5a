"""A device's own data: read, preprocessed and split, never sent anywhere.

Two sources: the synthetic federation (simulation only; generated on the device from
the seed) and a federation folder, the on-disk layout below, which is also what a real
device keeps and what the corpus importers write::

    DIR/
      federation.json        {"format": "emofed-federation/1", "devices": [...],
                              "heldout": [...] (optional), ...}
      <device-id>/
        samples.jsonl        {"id", "label", "split": "train"|"test", "face", "voice", "text"}
        face/*.png           paths in samples.jsonl are relative to the device folder
        voice/*.wav

Devices listed under ``heldout`` (the importers' identity-disjoint test population) are
test-only: in simulation they follow the training devices in partition order, never
train, and evaluate the global model on every one of their samples.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import TensorDataset

from emofed.config import EmofedConfig, fingerprint
from models import EMOTIONS, MultimodalPreprocessor, RawSample, UnusableInput, load_audio

logger = logging.getLogger(__name__)

FEDERATION_FILE = "federation.json"
SAMPLES_FILE = "samples.jsonl"
FEDERATION_FORMAT = "emofed-federation/1"


class UnusableDeviceData(RuntimeError):
    """A device has no data it can train or evaluate on; the message says why."""


class FederationFolderError(ValueError):
    """A federation folder is missing or malformed; the message names what."""


@dataclass
class DeviceData:
    """One device's preprocessed train and test splits and what was skipped."""

    device_id: str
    train: TensorDataset
    test: TensorDataset
    skipped: Counter[str] = field(default_factory=Counter)
    face_fallbacks: int = 0
    heldout: bool = False  # a test-only device of the held-out population: never trains

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)


def read_federation(path: str | Path) -> dict[str, Any]:
    """Read and check ``federation.json`` of a federation folder.

    Raises
    ------
    FederationFolderError
        If the folder or its index is missing or malformed.
    """
    root = Path(path)
    if not root.is_dir():
        raise FederationFolderError(f"data folder not found: {root}")
    index = root / FEDERATION_FILE
    if not index.is_file():
        raise FederationFolderError(f"{root} is not a federation folder: {FEDERATION_FILE} is missing")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FederationFolderError(f"{index}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FEDERATION_FORMAT:
        raise FederationFolderError(f"{index}: 'format' must be {FEDERATION_FORMAT!r}")
    devices = meta.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        raise FederationFolderError(f"{index}: 'devices' must be a non-empty list of folder names")
    heldout = meta.get("heldout", [])
    if not isinstance(heldout, list) or not all(isinstance(d, str) for d in heldout):
        raise FederationFolderError(f"{index}: 'heldout' must be a list of folder names")
    if set(heldout) & set(devices):
        raise FederationFolderError(f"{index}: a device is listed under both 'devices' and 'heldout'")
    missing = [d for d in [*devices, *heldout] if not (root / d).is_dir()]
    if missing:
        raise FederationFolderError(f"{index}: device folders missing: {', '.join(missing[:5])}")
    return meta


def heldout_devices(meta: Mapping[str, Any]) -> list[str]:
    """The test-only devices of a checked federation index (empty when it has none)."""
    return list(meta.get("heldout", []))


def read_device_folder(folder: str | Path) -> tuple[list[RawSample], list[RawSample], Counter[str]]:
    """Read a device folder into raw train and test samples.

    Unreadable lines, unknown labels and undecodable or missing media are skipped
    (a missing medium only hides that modality) and counted by reason.

    Raises
    ------
    FederationFolderError
        If the folder or its ``samples.jsonl`` is missing.
    """
    root = Path(folder)
    index = root / SAMPLES_FILE
    if not index.is_file():
        raise FederationFolderError(f"device folder {root} has no {SAMPLES_FILE}")
    skipped: Counter[str] = Counter()
    train: list[RawSample] = []
    test: list[RawSample] = []
    with open(index, "rb") as handle:
        for raw_line in handle:
            if not raw_line.strip():
                continue
            try:
                record = json.loads(raw_line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (UnicodeDecodeError, ValueError):
                skipped["malformed line"] += 1
                continue
            label = record.get("label")
            if label not in EMOTIONS:
                skipped["unknown label"] += 1
                continue
            split = record.get("split", "train")
            if split not in ("train", "test"):
                skipped["unknown split"] += 1
                continue
            voice = _read_voice(root, record.get("voice"), skipped)
            sample = RawSample(
                label=EMOTIONS.index(label),
                face=_read_face(root, record.get("face"), skipped),
                voice=None if voice is None else voice[0],
                voice_rate=None if voice is None else voice[1],
                text=_read_text(record.get("text"), skipped),
            )
            if sample.face is None and sample.voice is None and sample.text is None:
                skipped["no usable modality"] += 1
                continue
            (train if split == "train" else test).append(sample)
    return train, test, skipped


def device_file(root: Path, rel: Any, skipped: Counter[str], kind: str) -> Path | None:
    """The file ``rel`` names inside the device folder ``root``, or None (counted in ``skipped``).

    A path that is not a non-empty string, leaves the folder or names no file is refused
    with a ``"<kind>: ..."`` reason; None (no such medium) is not counted.
    """
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel:
        skipped[f"{kind}: bad path"] += 1
        return None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        skipped[f"{kind}: path outside the device folder"] += 1
        return None
    if not path.is_file():
        skipped[f"{kind}: file missing"] += 1
        return None
    return path


def _read_face(root: Path, rel: Any, skipped: Counter[str]) -> np.ndarray | None:
    path = device_file(root, rel, skipped, "face")
    if path is None:
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        skipped["face: undecodable image"] += 1
        return None
    return image


def _read_voice(root: Path, rel: Any, skipped: Counter[str]) -> tuple[np.ndarray, int] | None:
    path = device_file(root, rel, skipped, "voice")
    if path is None:
        return None
    try:
        return load_audio(path)
    except UnusableInput:
        skipped["voice: undecodable audio"] += 1
        return None


def _read_text(text: Any, skipped: Counter[str]) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        skipped["text: empty or not a string"] += 1
        return None
    return text


_CACHE: dict[tuple[str, ...], DeviceData] = {}


def load_device_data(cfg: EmofedConfig, node_config: Mapping[str, Any]) -> DeviceData:
    """This device's preprocessed data, cached for the life of the process.

    In simulation the device is ``node_config["partition-id"]``; a deployed device
    names its own folder with ``node_config["data-path"]``.

    Raises
    ------
    UnusableDeviceData
        If the device has no usable training or test sample.
    FederationFolderError
        If the configured folder is missing or malformed.
    """
    data_path = node_config.get("data-path")
    if data_path:
        key: tuple[str, ...] = ("folder", str(Path(str(data_path)).resolve()))
    else:
        pid = node_config.get("partition-id")
        if pid is None:
            raise UnusableDeviceData("node config has neither 'data-path' nor 'partition-id'")
        key = (cfg.data.source, str(int(pid)), str(cfg.seed), str(cfg.devices), fingerprint(cfg.data))
    key += (fingerprint(cfg.model),)
    if key in _CACHE:
        return _CACHE[key]
    if data_path:
        folder = Path(str(data_path))
        train_raw, test_raw, skipped = read_device_folder(folder)
        device_id = folder.name
    elif cfg.data.source == "folder":
        meta = read_federation(cfg.data.path or "")
        pid = int(node_config["partition-id"])
        # Training devices first, then the held-out ones (emofed simulate starts both).
        names = [*meta["devices"], *heldout_devices(meta)]
        if pid >= len(names):
            raise UnusableDeviceData(f"partition {pid} has no device: the federation has {len(names)}")
        device_id = names[pid]
        train_raw, test_raw, skipped = read_device_folder(Path(cfg.data.path or "") / device_id)
        if pid >= len(meta["devices"]):
            # Every sample of a held-out device is for evaluation, whatever its split says.
            data = preprocess_device(cfg, device_id, [], train_raw + test_raw, skipped, heldout=True)
            _CACHE[key] = data
            return data
    else:
        # Imported lazily: the synthetic generator exists only in simulation.
        from simulations.synthetic import SyntheticFederation

        pid = int(node_config["partition-id"])
        if pid >= cfg.devices:
            raise UnusableDeviceData(f"partition {pid} has no device: devices={cfg.devices}")
        federation = SyntheticFederation(cfg.data, num_devices=cfg.devices, seed=cfg.seed)
        train_raw, test_raw = federation.device_split(pid)
        device_id, skipped = f"device-{pid:03d}", Counter()
    data = preprocess_device(cfg, device_id, train_raw, test_raw, skipped)
    _CACHE[key] = data
    return data


def preprocess_device(
    cfg: EmofedConfig,
    device_id: str,
    train_raw: list[RawSample],
    test_raw: list[RawSample],
    skipped: Counter[str] | None = None,
    *,
    heldout: bool = False,
) -> DeviceData:
    """Preprocess raw samples with the model's preprocessing (the same as for real data).

    A ``heldout`` device is test-only: it needs no training sample.

    Raises
    ------
    UnusableDeviceData
        If nothing usable is left in the test split, or (unless ``heldout``) in the
        train split.
    """
    skipped = Counter(skipped or {})
    preprocess = MultimodalPreprocessor(cfg.model)
    train, train_report = preprocess(train_raw)
    test, test_report = preprocess(test_raw)
    for report in (train_report, test_report):
        skipped.update(report.reasons)
    fallbacks = train_report.faces_not_detected + test_report.faces_not_detected
    if skipped:
        logger.info("%s: skipped %s", device_id, dict(skipped))
    if len(train) == 0 and not heldout:
        raise UnusableDeviceData(f"{device_id}: no usable training sample ({_reasons(skipped)})")
    if len(test) == 0:
        raise UnusableDeviceData(f"{device_id}: no usable test sample ({_reasons(skipped)})")
    return DeviceData(device_id, train, test, skipped, fallbacks, heldout)


def _reasons(skipped: Counter[str]) -> str:
    return ", ".join(f"{n} {r}" for r, n in skipped.most_common()) or "no samples at all"
