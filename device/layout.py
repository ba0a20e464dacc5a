"""The device folder and its encrypted store's object names: their one definition.

A device folder (``--device-dir`` of ``emofed device enroll|start|run``; a simulated device's
``<run>.incomplete/simulated-devices/<id>``)::

    <device-dir>/              0700
      keys/device.key          the SuperNode's authentication key (ECDSA P-384, OpenSSH, 0600);
                               plaintext, because Flower's SuperNode reads it itself
      keys/device.pub          what the coordinator enrols
      keys/store.key           the 32-byte key of the encrypted store (0600), unless the store
                               is opened with a passphrase (``emofed device run``)
      store/                   the encrypted store (``device.store``), objects below
      model.safetensors        optional: the model ``emofed device run`` loads by default
      runtime.lock             one ``emofed device run`` session at a time (``flock``)
      supernode.log            the SuperNode's output (``emofed device start``)
      flwr/                    Flower's own state (installed app bundles)

    Left by older versions, imported into the store once, then removed (``client.dp``):
      keys/ledger.key          the ledger-signing key in plaintext (PEM)
      runs/<run-id>/ledger/    a run's plaintext chain (deployed devices; simulated devices
                               kept ``ledger/`` in the device folder itself)

The objects of the store (one name each; ``device.store.check_name``)::

    ledger-key                 the Ed25519 ledger-signing key, 32 raw bytes (``client.dp``)
    ledger.<run>.<device>      the device's signed privacy ledger of one run (``client.dp``)
    personal-layers            its personal layers, arrays (``client.personal``)
    policy_state               its management policy's state, JSON (``device.runtime``)
    policy_prior               the federation's policy prior it adopted, JSON (``client.app``)
    message_embeddings         the message bank's embeddings, arrays (``device.runtime``)

Changing a name here changes what existing stores hold: every one is part of the on-disk
format.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from device.store import (
    HEADER_FILE,
    MAX_NAME_LENGTH,
    EncryptedStore,
    check_name,
    generate_key_file,
)
from privacy.certs import DEVICE_KEY, DEVICE_PUB

__all__ = [
    "FLOWER_HOME_DIR",
    "KEYS_DIR",
    "LEDGER_CHAIN_PREFIX",
    "LEDGER_KEY_OBJECT",
    "LEGACY_KEY_FILE",
    "LEGACY_LEDGER_DIR",
    "LEGACY_RUNS_DIR",
    "MESSAGE_EMBEDDINGS_OBJECT",
    "MODEL_FILE",
    "PERSONAL_OBJECT",
    "POLICY_PRIOR_OBJECT",
    "POLICY_STATE_OBJECT",
    "RUNTIME_LOCK_FILE",
    "STORE_DIR",
    "STORE_KEY_FILE",
    "SUPERNODE_LOG_FILE",
    "device_key_paths",
    "flower_home",
    "has_store",
    "ledger_chain_object",
    "legacy_key_path",
    "legacy_run_root",
    "open_device_store",
    "runtime_lock_path",
    "store_key_path",
    "store_path",
    "supernode_log_path",
]

logger = logging.getLogger(__name__)

# -- the device folder ---------------------------------------------------------------------

KEYS_DIR = "keys"
STORE_DIR = "store"
STORE_KEY_FILE = "store.key"  # in KEYS_DIR
MODEL_FILE = "model.safetensors"  # the same name as a run directory's (server.rundir.MODEL_FILE)
RUNTIME_LOCK_FILE = "runtime.lock"
SUPERNODE_LOG_FILE = "supernode.log"
FLOWER_HOME_DIR = "flwr"
LEGACY_KEY_FILE = Path(KEYS_DIR) / "ledger.key"
LEGACY_RUNS_DIR = "runs"
LEGACY_LEDGER_DIR = "ledger"

# -- the store's objects ---------------------------------------------------------------------

LEDGER_KEY_OBJECT = "ledger-key"
LEDGER_CHAIN_PREFIX = "ledger"  # ledger.<run_id>.<device_id>
PERSONAL_OBJECT = "personal-layers"
POLICY_STATE_OBJECT = "policy_state"
POLICY_PRIOR_OBJECT = "policy_prior"
MESSAGE_EMBEDDINGS_OBJECT = "message_embeddings"


def store_path(folder: Path) -> Path:
    """The device's encrypted store, ``<folder>/store``."""
    return Path(folder) / STORE_DIR


def store_key_path(folder: Path) -> Path:
    """The store's key file, ``<folder>/keys/store.key``."""
    return Path(folder) / KEYS_DIR / STORE_KEY_FILE


def device_key_paths(folder: Path) -> tuple[Path, Path]:
    """The SuperNode's authentication key pair, ``keys/device.key`` and ``keys/device.pub``."""
    keys = Path(folder) / KEYS_DIR
    return keys / DEVICE_KEY, keys / DEVICE_PUB


def runtime_lock_path(folder: Path) -> Path:
    """The lock file that keeps ``emofed device run`` to one session per device."""
    return Path(folder) / RUNTIME_LOCK_FILE


def supernode_log_path(folder: Path) -> Path:
    """Where ``emofed device start`` appends the SuperNode's output."""
    return Path(folder) / SUPERNODE_LOG_FILE


def flower_home(folder: Path) -> Path:
    """Flower's own state folder (``FLWR_HOME``) of the device's SuperNode."""
    return Path(folder) / FLOWER_HOME_DIR


def legacy_key_path(folder: Path) -> Path:
    """Where older versions kept the ledger-signing key in plaintext."""
    return Path(folder) / LEGACY_KEY_FILE


def legacy_run_root(folder: Path, run_id: int) -> Path:
    """Where older versions of a deployed device kept one run's plaintext ``ledger/``."""
    return Path(folder) / LEGACY_RUNS_DIR / str(run_id)


def ledger_chain_object(run_id: int, device_id: str) -> str:
    """The store object holding the device's chain of one run: ``ledger.<run_id>.<device_id>``.

    A device id too long for an object name (near its own 128-character limit) is replaced
    by the first 32 hex digits of its SHA-256.

    Raises
    ------
    ValueError
        If the name is not a valid object name (see :func:`device.store.check_name`).
    """
    name = f"{LEDGER_CHAIN_PREFIX}.{run_id}.{device_id}"
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256(device_id.encode()).hexdigest()[:32]
        name = f"{LEDGER_CHAIN_PREFIX}.{run_id}.{digest}"
    return check_name(name)


def has_store(folder: Path) -> bool:
    """Whether the device folder holds an encrypted store (its header was committed)."""
    return (store_path(folder) / HEADER_FILE).exists()


def open_device_store(
    folder: Path,
    *,
    passphrase: str | None = None,
    key_file: Path | None = None,
    create: bool = True,
) -> EncryptedStore:
    """Open the encrypted store of a device folder, by default creating it the first time.

    Without ``passphrase`` or ``key_file`` the key is the folder's ``keys/store.key``. A new
    store under a key file that does not exist yet gets a fresh key file (0600); an existing
    store is only ever opened with the key it was created with: a missing key file is an
    error, never replaced. Safe against other processes of the same device creating the store
    at the same time (both end up with the same store).

    Parameters
    ----------
    folder : Path
        The device folder.
    passphrase : str, optional
        Derive the store key from this with scrypt instead of reading a key file.
    key_file : Path, optional
        The store's key file; default :func:`store_key_path` (ignored with ``passphrase``).
    create : bool
        Create the store (and its key file) if there is none.

    Returns
    -------
    EncryptedStore
        The open store; close it (or use it in a ``with`` block) to drop the key.

    Raises
    ------
    device.store.StoreNotFound
        If there is no store and ``create`` is False.
    FileNotFoundError
        If the store exists but its key file does not.
    device.store.WrongStoreKey, device.store.StoreTampered
        If the key does not open the store, or its header was modified.
    PermissionError
        If the key file is accessible by group or others.
    ValueError
        If the key file does not hold exactly 32 bytes, or the passphrase is empty.
    """
    path = store_path(folder)
    if passphrase is None and key_file is None:
        key_file = store_key_path(folder)
    key_file = None if key_file is None else Path(key_file)
    if create and not has_store(folder):
        if key_file is not None and not key_file.exists():
            try:
                generate_key_file(key_file)
                logger.info("Created store key file %s", key_file)
            except FileExistsError:  # another process of the same device was quicker
                pass
        try:
            return EncryptedStore.create(path, passphrase=passphrase, key_file=key_file)
        except FileExistsError:  # the same race, over the store itself
            pass
    if key_file is not None and has_store(folder) and not key_file.exists():
        raise FileNotFoundError(
            f"store key file {key_file} not found; the store {path} needs the key it was created with"
        )
    return EncryptedStore.open(path, passphrase=passphrase, key_file=key_file)
