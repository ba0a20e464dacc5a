"""A device's own data: read, preprocessed and split, never sent anywhere.

Two sources: the synthetic federation (simulation only; generated on the device from
the seed) and a federation folder (:mod:`corpora.folder` defines the layout), which is also
what a real device keeps and what the corpus importers write. Devices listed under
``heldout`` are test-only: in simulation they follow the training devices in partition
order, never train, and evaluate the global model on every one of their samples.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import TensorDataset

from corpora.folder import (
    heldout_devices,
    read_device_folder,
    read_federation,
)
from emofed.config import EmofedConfig, fingerprint
from models import MultimodalPreprocessor, RawSample

logger = logging.getLogger(__name__)

class UnusableDeviceData(RuntimeError):
    """A device has no data it can train or evaluate on; the message says why."""


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
        """Training samples."""
        return len(self.train)

    @property
    def num_test(self) -> int:
        """Test samples."""
        return len(self.test)


_CACHE: dict[tuple[str, ...], DeviceData] = {}


def load_device_data(cfg: EmofedConfig, node_config: Mapping[str, Any]) -> DeviceData:
    """The device's preprocessed data, cached for the life of the process.

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
