"""The device side: Flower ClientApp, local data reader, training, evaluation and privacy."""

import emofed.preload  # noqa: F401, I001  (first: see emofed/preload.py)

from client.data import (
    DeviceData,
    FederationFolderError,
    UnusableDeviceData,
    load_device_data,
    read_device_folder,
    read_federation,
)
from client.dp import (
    DevicePrivacy,
    DeviceStore,
    DPSGDPlan,
    DPSGDSettings,
    clip_update,
    plan_dp_sgd,
    private_training,
)
from client.train import evaluate_local, select_device, train_local

__all__ = [
    "DPSGDPlan",
    "DPSGDSettings",
    "DeviceData",
    "DevicePrivacy",
    "DeviceStore",
    "FederationFolderError",
    "UnusableDeviceData",
    "clip_update",
    "evaluate_local",
    "load_device_data",
    "plan_dp_sgd",
    "private_training",
    "read_device_folder",
    "read_federation",
    "select_device",
    "train_local",
]
