"""The device folder layout and the store's object names: pinned, and one way to open the store."""

from __future__ import annotations

import hashlib
import stat
import threading
from pathlib import Path

import pytest

from device import layout
from device.layout import (
    device_key_paths,
    has_store,
    ledger_chain_object,
    open_device_store,
    store_key_path,
    store_path,
)
from device.store import EncryptedStore, ScryptParams, StoreNotFound, WrongStoreKey, generate_key_file

# Every name below is part of the on-disk format: existing stores and folders hold them.
OBJECT_NAMES = {
    "LEDGER_KEY_OBJECT": "ledger-key",
    "PERSONAL_OBJECT": "personal-layers",
    "POLICY_STATE_OBJECT": "policy_state",
    "POLICY_PRIOR_OBJECT": "policy_prior",
    "MESSAGE_EMBEDDINGS_OBJECT": "message_embeddings",
}
FOLDER_PATHS = {
    "store_path": "store",
    "store_key_path": "keys/store.key",
    "runtime_lock_path": "runtime.lock",
    "supernode_log_path": "supernode.log",
    "flower_home": "flwr",
    "legacy_key_path": "keys/ledger.key",
}


@pytest.mark.parametrize(("constant", "name"), sorted(OBJECT_NAMES.items()))
def test_store_object_names_are_pinned(constant: str, name: str) -> None:
    """Renaming a store object would orphan it in every existing store."""
    assert getattr(layout, constant) == name


@pytest.mark.parametrize(("function", "relative"), sorted(FOLDER_PATHS.items()))
def test_device_folder_paths_are_pinned(tmp_path: Path, function: str, relative: str) -> None:
    """Each path of the device folder, relative to it."""
    assert getattr(layout, function)(tmp_path) == tmp_path / relative


def test_folder_paths_of_keys_and_legacy_runs(tmp_path: Path) -> None:
    """The SuperNode's key pair and an older version's per-run ledger folder."""
    assert device_key_paths(tmp_path) == (tmp_path / "keys" / "device.key", tmp_path / "keys" / "device.pub")
    assert layout.legacy_run_root(tmp_path, 7) == tmp_path / "runs" / "7"


def test_ledger_chain_object_names_a_run_and_a_device() -> None:
    """``ledger.<run>.<device>``; a device id too long for an object name is hashed."""
    assert ledger_chain_object(3, "phone-1") == "ledger.3.phone-1"
    long_id = "d" * 128
    digest = hashlib.sha256(long_id.encode()).hexdigest()[:32]
    assert ledger_chain_object(3, long_id) == f"ledger.3.{digest}"


def test_open_device_store_creates_its_key_file_then_reopens(tmp_path: Path) -> None:
    """First open: a store and an owner-only key file in the folder; later opens find both."""
    assert not has_store(tmp_path)
    with open_device_store(tmp_path) as store:
        store.put_json("x", {"a": 1})
    assert has_store(tmp_path)
    assert stat.S_IMODE(store_key_path(tmp_path).stat().st_mode) == 0o600
    with open_device_store(tmp_path, create=False) as store:
        assert store.get_json("x") == {"a": 1}
    with EncryptedStore.open(store_path(tmp_path), key_file=store_key_path(tmp_path)) as store:
        assert store.names() == ["x"]


def test_open_device_store_never_replaces_a_missing_key_file(tmp_path: Path) -> None:
    """An existing store whose key file is gone is an error naming the file; nothing is created."""
    open_device_store(tmp_path).close()
    store_key_path(tmp_path).unlink()
    with pytest.raises(FileNotFoundError, match="needs the key it was created with"):
        open_device_store(tmp_path)
    assert not store_key_path(tmp_path).exists()


def test_open_device_store_without_create_needs_a_store(tmp_path: Path) -> None:
    """``create=False`` on a folder without a store creates nothing."""
    with pytest.raises(StoreNotFound):
        open_device_store(tmp_path, create=False)
    assert not store_path(tmp_path).exists() and not store_key_path(tmp_path).exists()


def test_open_device_store_with_a_passphrase_or_another_key_file(tmp_path: Path) -> None:
    """A passphrase store needs its passphrase; an explicit key file is used instead of keys/store.key."""
    EncryptedStore.create(store_path(tmp_path / "a"), passphrase="p", scrypt=ScryptParams(n=2**10)).close()
    open_device_store(tmp_path / "a", passphrase="p").close()
    with pytest.raises(WrongStoreKey):
        open_device_store(tmp_path / "a", passphrase="q")
    key_file = generate_key_file(tmp_path / "elsewhere.key")
    open_device_store(tmp_path / "b", key_file=key_file).close()
    assert not store_key_path(tmp_path / "b").exists()
    open_device_store(tmp_path / "b", key_file=key_file, create=False).close()


def test_concurrent_first_opens_share_one_store_and_key(tmp_path: Path) -> None:
    """Processes of one device opening it for the first time at once end up with one store."""
    barrier, ids, errors = threading.Barrier(6), [], []

    def first_open() -> None:
        barrier.wait()
        try:
            with open_device_store(tmp_path) as store:
                ids.append(store._header["store_id"])
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=first_open) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(ids) == 6 and len(set(ids)) == 1
