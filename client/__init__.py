"""The device side: Flower ClientApp, local data reader, training and evaluation."""

from client.data import (
    DeviceData,
    FederationFolderError,
    UnusableDeviceData,
    load_device_data,
    read_device_folder,
    read_federation,
)
from client.train import evaluate_local, select_device, train_local

__all__ = [
    "DeviceData",
    "FederationFolderError",
    "UnusableDeviceData",
    "evaluate_local",
    "load_device_data",
    "read_device_folder",
    "read_federation",
    "select_device",
    "train_local",
]
