r"""A device's encrypted store: one owner-only directory, every object AES-GCM encrypted at rest.

Everything a device keeps between rounds goes through one :class:`EncryptedStore`:
its personal model layers (``client.personal``), its management policy's state
(``device.runtime``), its Ed25519 ledger-signing key (object ``ledger-key``) and its
signed privacy ledger, one hash chain per run (objects ``ledger.<run>.<device>``; the
device's accountant is rebuilt from it every round, so it is the accountant's state
too; ``client.dp``); every object's name, and the device folder around the store, are
defined in :mod:`device.layout`. Only two keys stay outside: the store's own key file and the
SuperNode's authentication key (``keys/device.key``, which Flower reads itself). The
store's key is derived from a passphrase with scrypt (Percival & Josefsson, RFC 7914)
or read from a 32-byte key file that only its owner may read (like ``ssh`` refuses a
private key readable by others). Primitives come from ``cryptography``; arrays and
tensors are serialised with ``safetensors`` (never pickle, so reading an object cannot
run code).

Layout of a store directory (0700; every file 0600)::

    <store>/
      store.json           plaintext header, the commit point of create and rekey
      .lock                advisory write lock (fcntl.flock), empty
      objects/             the live objects directory named by store.json
        <name>.bin         nonce (12 bytes) || AES-256-GCM ciphertext || tag (16 bytes)

``store.json`` holds no secret::

    {"format": "emofed-device-store", "version": 1,
     "store_id": "<32 hex digits, random>",
     "cipher": "AES-256-GCM",
     "kdf": {"name": "scrypt", "salt": "<base64 of 16 random bytes>",
             "n": 32768, "r": 8, "p": 1, "length": 32}      # or {"name": "key-file"}
     "objects": "objects",                                   # "objects.<8 hex>" after a rekey
     "key_check": "<base64 of nonce || AES-GCM(key, KEY_CHECK_PLAINTEXT)>"}

The key check lets a wrong passphrase or key be refused before any object is read or
written. Every encryption draws a fresh random 96-bit nonce. Each object's associated
data is ``b"emofed-device-store\0" + version + store_id + b"\0object\0" + name``, so an
object file modified, truncated, renamed over another object or copied in from another
store (even one under the same key file) fails authentication. The decrypted plaintext
is one kind byte (``B`` bytes, ``J`` JSON, ``A`` NumPy arrays, ``T`` torch tensors)
followed by the payload.

Writes go to a randomly named temporary sibling created 0600, are fsynced, replace the
object with ``os.replace`` and fsync the directory (``privacy._atomic``): a crash leaves
the old or the new version, never a mix; temporaries left by a crash (``.*.tmp``, which
:meth:`EncryptedStore.names` never lists) are swept on the next open. Writers
hold an exclusive ``flock`` on ``.lock``; :meth:`EncryptedStore.locked` holds it across
a read and the write it decides (a ledger append, a key created only once).
:meth:`EncryptedStore.rekey` re-encrypts every object into a new objects directory and
commits by replacing ``store.json``.

Not protected: an object's size, the object names, and rolling an object back to an
older version of itself or deleting it (no manifest). For the device's ledger the
server's copy covers this: a chain rolled back or restarted on the device forks from
the copy the server holds, and the server refuses the fork.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from privacy._atomic import atomic_write_bytes, fsync_dir

try:  # POSIX advisory locks; elsewhere writers must not overlap
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT = "emofed-device-store"
VERSION = 1
HEADER_FILE = "store.json"
LOCK_FILE = ".lock"
OBJECTS_DIR = "objects"
OBJECT_SUFFIX = ".bin"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
TAG_BYTES = 16
SALT_BYTES = 16
FILE_MODE = 0o600
DIR_MODE = 0o700
KEY_CHECK_PLAINTEXT = b"emofed device store key check v1"

MAX_NAME_LENGTH = 128  # of an object name
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME_LENGTH - 1}}}")
_OBJECTS_NAME = re.compile(r"objects(\.[0-9a-f]{8})?")
_KINDS = {b"B": "bytes", b"J": "json", b"A": "arrays", b"T": "state_dict"}
_MAX_SCRYPT_MEMORY = 1 << 30  # 128 * r * n bytes; a crafted header must not exhaust memory


class StoreError(Exception):
    """A device store cannot be used."""


class StoreNotFound(StoreError, FileNotFoundError):
    """There is no device store at the given path."""


class WrongStoreKey(StoreError):
    """The passphrase or key file does not open the store."""


class StoreTampered(StoreError):
    """A store file was modified, truncated, swapped or is malformed."""


@dataclass(frozen=True, kw_only=True)
class ScryptParams:
    """scrypt cost of deriving a store key from a passphrase (RFC 7914, §2).

    The default (N = 2**15, r = 8, p = 1: 32 MiB, about 0.1 s) follows the RFC's
    interactive-use recommendation raised to current hardware. Tests may go as low
    as N = 2**10.
    """

    n: int = 2**15
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        bounds = (("n", self.n, 2**10, 2**20), ("r", self.r, 1, 32), ("p", self.p, 1, 16))
        for field, value, low, high in bounds:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"scrypt '{field}' must be an int. Found {type(value).__name__}.")
            if not low <= value <= high:
                raise ValueError(f"scrypt '{field}' must be in [{low}, {high}]. Found {value}.")
        if self.n & (self.n - 1):
            raise ValueError(f"scrypt 'n' must be a power of two. Found {self.n}.")
        if 128 * self.r * self.n > _MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"scrypt memory 128*r*n must be at most {_MAX_SCRYPT_MEMORY} bytes. "
                f"Found {128 * self.r * self.n} (r={self.r}, n={self.n})."
            )


# -- files -------------------------------------------------------------------------


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)  # an existing directory, or a umask that left less


def generate_key_file(path: Path | str) -> Path:
    """Write a fresh random 32-byte store key to ``path``, readable by its owner only.

    The file is created with ``os.open(O_CREAT | O_EXCL, 0o600)`` under a temporary
    name, fsynced and published with ``os.link``: it is never readable by others, not
    even briefly, is never half-written, and never replaces an existing key. The key
    is neither logged nor returned.

    Parameters
    ----------
    path : Path or str
        Destination; must not exist. Missing parent directories are created 0700.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists.
    """
    path = Path(path)
    if not path.parent.exists():
        _make_private_dir(path.parent)
    atomic_write_bytes(path, secrets.token_bytes(KEY_BYTES), mode=FILE_MODE, overwrite=False)
    os.chmod(path, FILE_MODE)
    logger.debug("Generated store key file %s", path)
    return path


def _read_key_file(path: Path) -> bytes:
    """Read a 32-byte key from a regular file owned by us and accessible to us only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)  # of the file actually opened, not of a path swapped since
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"Store key file {path} must be a regular file.")
        if os.name == "posix":
            mode = stat.S_IMODE(info.st_mode)
            if mode & 0o077:
                raise PermissionError(
                    f"Store key file {path} must be accessible by its owner only (0o600). "
                    f"Found {oct(mode)}; run: chmod 600 {path}"
                )
            if info.st_uid != os.getuid():
                raise PermissionError(
                    f"Store key file {path} must be owned by the user running the device "
                    f"(uid {os.getuid()}). Found uid {info.st_uid}."
                )
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise ValueError(
            f"Store key file {path} must hold exactly {KEY_BYTES} bytes "
            f"(see generate_key_file). Found {len(key)}{'+' if len(key) > KEY_BYTES else ''}."
        )
    return key


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        # One passphrase typed on two keyboards may differ in Unicode composition only.
        passphrase = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    elif not isinstance(passphrase, bytes):
        raise TypeError(f"Passphrase must be str or bytes. Found {type(passphrase).__name__}.")
    if not passphrase:
        raise ValueError("Passphrase must not be empty.")
    return passphrase


def _one_key_source(passphrase: str | bytes | None, key_file: Path | str | None) -> None:
    if (passphrase is None) == (key_file is None):
        raise ValueError("Give exactly one of 'passphrase' and 'key_file'.")


def _derive(passphrase: bytes, salt: bytes, params: ScryptParams) -> bytes:
    kdf = Scrypt(salt=salt, length=KEY_BYTES, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase)


# -- names and serialisation -----------------------------------------------------------


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If ``name`` does not match ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`` or contains ``..``.
    """
    if not isinstance(name, str):
        raise TypeError(f"Object name must be a str. Found {type(name).__name__}.")
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"Object name must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}} without '..'. "
            f"Found {name!r}."
        )
    return name


def _order_metadata(keys: list[str]) -> dict[str, str]:
    return {"order": json.dumps(keys)}


def _read_order(payload: bytes) -> list[str]:
    """The key order recorded in a safetensors payload's metadata (which sorts tensors)."""
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    return json.loads(header["__metadata__"]["order"])


def _encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise TypeError(f"Array names must be str. Found {type(key).__name__}.")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"Array {key!r} must be a numpy.ndarray. Found {type(value).__name__}.")
        if value.dtype.hasobject:
            raise TypeError(f"Array {key!r} has dtype object, which only pickle could store.")
    # Not np.ascontiguousarray, which turns a 0-d array into shape (1,).
    contiguous = {key: np.require(value, requirements="C") for key, value in arrays.items()}
    return safetensors.numpy.save(contiguous, metadata=_order_metadata(list(arrays)))


def _decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    loaded = safetensors.numpy.load(payload)
    return {key: np.array(loaded[key]) for key in _read_order(payload)}  # writable copies


def _encode_state_dict(state: Mapping[str, torch.Tensor]) -> bytes:
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"State dict keys must be str. Found {type(key).__name__}.")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"State dict entry {key!r} must be a torch.Tensor. Found {type(value).__name__}."
            )
        # A copy of each: tied weights share storage, which safetensors refuses.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return safetensors.torch.save(tensors, metadata=_order_metadata(list(state)))


def _decode_state_dict(payload: bytes, device: str | torch.device) -> dict[str, torch.Tensor]:
    loaded = safetensors.torch.load(payload)
    return {key: loaded[key].to(device) for key in _read_order(payload)}


# -- the store ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _header_json(header: Mapping[str, Any]) -> bytes:
    return json.dumps(header, indent=2).encode("utf-8") + b"\n"


def _new_key(
    passphrase: str | bytes | None, key_file: Path | str | None, scrypt: ScryptParams
) -> tuple[bytes, dict[str, Any]]:
    """A store key and the header's ``kdf`` entry, from exactly one of the two sources."""
    _one_key_source(passphrase, key_file)
    if key_file is not None:
        return _read_key_file(Path(key_file)), {"name": "key-file"}
    salt = secrets.token_bytes(SALT_BYTES)
    key = _derive(_passphrase_bytes(passphrase), salt, scrypt)  # type: ignore[arg-type]
    kdf = {"name": "scrypt", "salt": _b64(salt), "length": KEY_BYTES}
    kdf.update(n=scrypt.n, r=scrypt.r, p=scrypt.p)
    return key, kdf


class EncryptedStore:
    """One device's encrypted object store. Build it with :meth:`create` or :meth:`open`.

    Objects are named blobs (bytes, JSON, NumPy arrays or a torch state dict), each
    encrypted and authenticated on its own; see the module docstring for the format.
    The instance holds the derived key in memory until :meth:`close` (or the end of a
    ``with`` block); it never logs, prints or shows it.
    """

    def __init__(self, path: Path, header: dict[str, Any], header_bytes: bytes, key: bytes) -> None:
        """Use :meth:`create` or :meth:`open`; this checks nothing."""
        self.path = path
        self._header = header
        self._header_bytes = header_bytes
        self._aead: AESGCM | None = AESGCM(key)
        self._mutex = threading.RLock()  # the instance's side of the write lock
        self._depth = 0  # how deep this instance holds it (see _lock)
        store_id = bytes.fromhex(header["store_id"])
        self._prefix = b"emofed-device-store\0" + bytes([VERSION]) + store_id

    # -- building ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        passphrase: str | bytes | None = None,
        key_file: Path | str | None = None,
        scrypt: ScryptParams = ScryptParams(),
    ) -> EncryptedStore:
        """Create an empty store at ``path`` (a new or empty-of-store directory).

        Parameters
        ----------
        path : Path or str
            The store directory; created 0700 (an existing one is tightened to 0700).
        passphrase : str, bytes or None
            Derive the key from this with scrypt.
        key_file : Path, str or None
            Read the key from this file (see :func:`generate_key_file`).
        scrypt : ScryptParams
            Cost of the passphrase derivation (ignored with ``key_file``).

        Raises
        ------
        ValueError
            Unless exactly one of ``passphrase`` and ``key_file`` is given.
        FileExistsError
            If ``path`` already holds a store.
        PermissionError
            If the key file is accessible by group or others.
        """
        path = Path(path)
        key, kdf = _new_key(passphrase, key_file, scrypt)
        store_id = secrets.token_bytes(16)
        if (path / HEADER_FILE).exists():
            raise FileExistsError(f"A device store already exists at {path}.")
        _make_private_dir(path)
        _make_private_dir(path / OBJECTS_DIR)
        os.close(os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE))
        header = {
            "format": FORMAT, "version": VERSION, "store_id": store_id.hex(),
            "cipher": "AES-256-GCM", "kdf": kdf, "objects": OBJECTS_DIR, "key_check": "",
        }
        store = cls(path, header, b"", key)
        header["key_check"] = _b64(store._encrypt(KEY_CHECK_PLAINTEXT, store._check_aad()))
        header_bytes = _header_json(header)
        # Under the write lock: an open() racing this create sweeps temporaries, ours too.
        with store._lock():
            atomic_write_bytes(path / HEADER_FILE, header_bytes, mode=FILE_MODE, overwrite=False)  # the commit point
        store._header_bytes = header_bytes
        logger.info("Created encrypted device store %s (%s)", path, kdf["name"])
        return store

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        passphrase: str | bytes | None = None,
        key_file: Path | str | None = None,
    ) -> EncryptedStore:
        """Open an existing store; the key is checked before any object is touched.

        Raises
        ------
        ValueError
            Unless exactly one of ``passphrase`` and ``key_file`` is given.
        StoreNotFound
            If ``path`` or its ``store.json`` does not exist.
        WrongStoreKey
            If the passphrase or key does not open the store.
        StoreTampered
            If ``store.json`` is malformed.
        PermissionError
            If the key file is accessible by group or others.
        """
        _one_key_source(passphrase, key_file)
        path = Path(path)
        header_bytes, header = cls._read_header(path)
        kdf = header["kdf"]
        if passphrase is not None:
            if kdf["name"] != "scrypt":
                raise WrongStoreKey(f"Store {path} is opened with a key file, not a passphrase.")
            salt, params = cls._salt(path, kdf), cls._scrypt(path, kdf)
            key = _derive(_passphrase_bytes(passphrase), salt, params)
        else:
            if kdf["name"] != "key-file":
                raise WrongStoreKey(f"Store {path} is opened with a passphrase, not a key file.")
            key = _read_key_file(Path(key_file))  # type: ignore[arg-type]
        store = cls(path, header, header_bytes, key)
        store._verify_key()
        if not store._objects_dir().is_dir():
            raise StoreTampered(f"Store {path}: its {header['objects']} directory is missing.")
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            logger.warning("Device store %s is accessible by group or others; chmod 700 it.", path)
        store._sweep()
        logger.debug("Opened encrypted device store %s", path)
        return store

    @staticmethod
    def _read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
        try:
            header_bytes = (path / HEADER_FILE).read_bytes()
        except FileNotFoundError:
            what = "directory" if not path.exists() else HEADER_FILE
            raise StoreNotFound(f"No device store at {path}: no {what}.") from None
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreTampered(f"Store {path}: {HEADER_FILE} is not valid JSON.") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise StoreTampered(f"Store {path}: {HEADER_FILE} is not a {FORMAT} header.")
        if header.get("version") != VERSION:
            raise StoreError(
                f"Store {path} has format version {header.get('version')!r}; "
                f"this build reads version {VERSION}."
            )
        kdf, objects, store_id = header.get("kdf"), header.get("objects"), header.get("store_id")
        malformed = (
            not isinstance(kdf, dict)
            or kdf.get("name") not in ("scrypt", "key-file")
            or not isinstance(objects, str)
            or not _OBJECTS_NAME.fullmatch(objects)  # never a path outside the store
            or not isinstance(store_id, str)
            or not re.fullmatch(r"[0-9a-f]{32}", store_id)
            or not isinstance(header.get("key_check"), str)
        )
        if malformed:
            raise StoreTampered(f"Store {path}: {HEADER_FILE} is malformed.")
        return header_bytes, header

    @staticmethod
    def _salt(path: Path, kdf: Mapping[str, Any]) -> bytes:
        try:
            salt = base64.b64decode(kdf["salt"], validate=True)
        except (KeyError, TypeError, binascii.Error, ValueError):
            raise StoreTampered(f"Store {path}: malformed scrypt salt in {HEADER_FILE}.") from None
        if len(salt) != SALT_BYTES:
            raise StoreTampered(f"Store {path}: the scrypt salt must be {SALT_BYTES} bytes.")
        return salt

    @staticmethod
    def _scrypt(path: Path, kdf: Mapping[str, Any]) -> ScryptParams:
        try:
            if kdf.get("length") != KEY_BYTES:
                raise ValueError(f"key length must be {KEY_BYTES}")
            return ScryptParams(n=kdf["n"], r=kdf["r"], p=kdf["p"])
        except (KeyError, TypeError, ValueError) as exc:
            problem = str(exc)  # raised below, outside the handler: one line, no chain
        raise StoreTampered(f"Store {path}: bad scrypt parameters in {HEADER_FILE}: {problem}")

    # -- keys and ciphers ----------------------------------------------------------------

    def _check_aad(self) -> bytes:
        return self._prefix + b"\0key-check"

    def _object_aad(self, name: str) -> bytes:
        return self._prefix + b"\0object\0" + name.encode("ascii")

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise ValueError(f"Store {self.path} is closed.")
        return self._aead

    def _encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._cipher().encrypt(nonce, plaintext, aad)

    def _decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """Raise ``InvalidTag`` if ``blob`` was not encrypted here under ``aad``."""
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise InvalidTag
        return self._cipher().decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)

    def _verify_key(self) -> None:
        try:
            blob = base64.b64decode(self._header["key_check"], validate=True)
            plaintext = self._decrypt(blob, self._check_aad())
        except (InvalidTag, binascii.Error, ValueError):
            self.close()
            raise WrongStoreKey(
                f"Wrong passphrase or key for device store {self.path} "
                f"(or its {HEADER_FILE} was altered)."
            ) from None
        if plaintext != KEY_CHECK_PLAINTEXT:  # pragma: no cover - needs the key to forge
            self.close()
            raise StoreTampered(f"Store {self.path}: key check value is wrong.")

    def _current(self) -> None:
        """Raise unless ``store.json`` is still the one this instance opened (no rekey since)."""
        try:
            now = (self.path / HEADER_FILE).read_bytes()
        except FileNotFoundError:
            raise StoreNotFound(f"Device store {self.path} has lost its {HEADER_FILE}.") from None
        if now != self._header_bytes:
            raise WrongStoreKey(
                f"Device store {self.path} was re-keyed since it was opened; open it again."
            )

    # -- locking and housekeeping -------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the store's exclusive write lock; yield False if non-blocking and busy.

        Re-entrant within this instance (a thread already holding it through
        :meth:`locked` may write); other instances and processes wait on the ``flock``.
        """
        if not self._mutex.acquire(blocking=blocking):
            yield False
            return
        try:
            if self._depth or fcntl is None:
                self._depth += 1
                try:
                    yield True
                finally:
                    self._depth -= 1
                return
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    yield False
                    return
                self._depth = 1
                try:
                    yield True
                finally:
                    self._depth = 0
            finally:
                os.close(fd)  # closing the descriptor releases the lock
        finally:
            self._mutex.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's writer lock across several reads and writes (read-modify-write).

        Writes through this instance inside the block do not wait on themselves; every
        other writer (another instance, another process, a rekey) waits until the block
        ends. Used where a read decides a write: an append to a hash chain, a key created
        only if there is none.

        Raises
        ------
        WrongStoreKey
            If the store was re-keyed since this instance opened it.
        """
        with self._lock():
            self._current()
            yield

    def _sweep(self) -> None:
        """Remove what a crashed writer left: temporaries and unreferenced objects directories."""
        with self._lock(blocking=False) as held:
            if not held:  # another process is writing: its temporaries are live
                return
            live = self._objects_dir()
            for entry in self.path.iterdir():
                stale = _OBJECTS_NAME.fullmatch(entry.name) and entry.name != live.name
                if stale and entry.is_dir():
                    shutil.rmtree(entry)  # an interrupted or finished rekey's other side
                    logger.info("Removed stale %s from device store %s", entry.name, self.path)
                elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink()
            for entry in live.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink()

    def _objects_dir(self) -> Path:
        return self.path / self._header["objects"]

    def _object_path(self, name: str) -> Path:
        return self._objects_dir() / f"{check_name(name)}{OBJECT_SUFFIX}"

    # -- objects -------------------------------------------------------------------------

    def _put(self, name: str, kind: bytes, payload: bytes) -> None:
        path = self._object_path(name)
        blob = self._encrypt(kind + payload, self._object_aad(name))
        with self._lock():
            self._current()
            atomic_write_bytes(path, blob, mode=FILE_MODE)

    def _read(self, name: str) -> bytes:
        """The decrypted plaintext (kind byte and payload) of object ``name``."""
        path = self._object_path(name)
        self._cipher()
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            self._current()
            raise KeyError(f"Device store {self.path} has no object {name!r}.") from None
        try:
            return self._decrypt(blob, self._object_aad(name))
        except InvalidTag:
            self._current()
            raise StoreTampered(
                f"Object {name!r} in device store {self.path} failed authentication: "
                "it was modified, truncated or swapped with another object."
            ) from None

    def _get(self, name: str, kind: bytes) -> bytes:
        plaintext = self._read(name)
        found = plaintext[:1]
        if found != kind:
            raise TypeError(
                f"Object {name!r} holds {_KINDS.get(found, 'unknown data')}, not {_KINDS[kind]}; "
                f"read it with get_{_KINDS.get(found, 'bytes')}."
            )
        return plaintext[1:]

    def put_bytes(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` as object ``name``, replacing any previous version atomically.

        Raises
        ------
        TypeError
            If ``data`` is not bytes-like.
        ValueError
            If ``name`` is not a valid object name (see :func:`check_name`).
        WrongStoreKey
            If the store was re-keyed since this instance opened it.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Object {name!r} must be bytes-like. Found {type(data).__name__}.")
        self._put(name, b"B", bytes(data))

    def get_bytes(self, name: str) -> bytes:
        """Return object ``name`` stored with :meth:`put_bytes`.

        Raises
        ------
        KeyError
            If there is no such object.
        StoreTampered
            If the object file was modified, truncated or swapped.
        TypeError
            If the object was stored as another kind.
        """
        return self._get(name, b"B")

    def put_json(self, name: str, value: Any) -> None:
        """Store a JSON-serialisable ``value`` (dicts, lists, str, numbers, bools, None).

        Dict order is kept; NaN and infinities round-trip as with :func:`json.dumps`.

        Raises
        ------
        TypeError
            If ``value`` is not JSON-serialisable.
        """
        try:
            text = json.dumps(value, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Object {name!r} is not JSON-serialisable: {exc}") from None
        self._put(name, b"J", text.encode("utf-8"))

    def get_json(self, name: str) -> Any:
        """Return object ``name`` stored with :meth:`put_json` (see :meth:`get_bytes`)."""
        return json.loads(self._get(name, b"J"))

    def put_arrays(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Store named NumPy arrays with their dtypes, shapes and order (safetensors).

        Raises
        ------
        TypeError
            If a value is not an ndarray or has dtype object (which would need pickle).
        """
        self._put(name, b"A", _encode_arrays(arrays))

    def get_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Return the arrays stored with :meth:`put_arrays`, in their order, writable."""
        return _decode_arrays(self._get(name, b"A"))

    def put_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Store a torch state dict (any dtype, bfloat16 included; tied tensors are copied).

        Raises
        ------
        TypeError
            If a value is not a tensor.
        """
        self._put(name, b"T", _encode_state_dict(state))

    def get_state_dict(
        self, name: str, *, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Return the state dict stored with :meth:`put_state_dict`, in its order, on ``device``."""
        return _decode_state_dict(self._get(name, b"T"), device)

    def names(self) -> list[str]:
        """The stored object names, sorted."""
        self._cipher()
        suffix = len(OBJECT_SUFFIX)
        return sorted(
            entry.name[:-suffix]
            for entry in self._objects_dir().iterdir()
            if entry.name.endswith(OBJECT_SUFFIX) and _NAME.fullmatch(entry.name[:-suffix])
        )

    def __contains__(self, name: object) -> bool:
        return self._object_path(name).exists()  # type: ignore[arg-type]

    def delete(self, name: str) -> None:
        """Remove object ``name``.

        Raises
        ------
        KeyError
            If there is no such object.
        """
        path = self._object_path(name)
        with self._lock():
            self._current()
            try:
                path.unlink()
            except FileNotFoundError:
                raise KeyError(f"Device store {self.path} has no object {name!r}.") from None
            fsync_dir(path.parent)

    # -- rekeying and closing -------------------------------------------------------------

    def rekey(
        self,
        *,
        passphrase: str | bytes | None = None,
        key_file: Path | str | None = None,
        scrypt: ScryptParams = ScryptParams(),
    ) -> None:
        """Re-encrypt every object under a new passphrase or key file, atomically.

        Every object is decrypted (and so verified) and re-encrypted into a new objects
        directory; replacing ``store.json`` is the commit point, after which the old
        directory is removed. A crash before it leaves the store under the old key, after
        it under the new one; the next :meth:`open` removes the leftovers. Other open
        instances must open the store again.

        Raises
        ------
        ValueError
            Unless exactly one of ``passphrase`` and ``key_file`` is given.
        StoreTampered
            If an object fails authentication (nothing is changed).
        """
        key, kdf = _new_key(passphrase, key_file, scrypt)
        with self._lock():
            self._current()
            old_dir = self._objects_dir()
            header = dict(self._header, kdf=kdf, objects=f"{OBJECTS_DIR}.{secrets.token_hex(4)}")
            new = EncryptedStore(self.path, header, b"", key)
            new_dir = new._objects_dir()
            _make_private_dir(new_dir)
            header["key_check"] = _b64(new._encrypt(KEY_CHECK_PLAINTEXT, new._check_aad()))
            header_bytes = _header_json(header)
            try:
                for name in self.names():
                    blob = new._encrypt(self._read(name), new._object_aad(name))
                    atomic_write_bytes(new._object_path(name), blob, mode=FILE_MODE, sync_dir=False)
                fsync_dir(new_dir)
                atomic_write_bytes(self.path / HEADER_FILE, header_bytes, mode=FILE_MODE)  # the commit point
            except BaseException:
                # Failed after the commit (a directory fsync): open() removes the old side.
                if (self.path / HEADER_FILE).read_bytes() != header_bytes:
                    shutil.rmtree(new_dir, ignore_errors=True)
                raise
            self._header, self._header_bytes, self._aead = header, header_bytes, new._aead
            shutil.rmtree(old_dir)
            fsync_dir(self.path)
        logger.info("Re-keyed device store %s (%s)", self.path, kdf["name"])

    def close(self) -> None:
        """Drop the key; later operations raise ``ValueError``."""
        self._aead = None

    def __enter__(self) -> EncryptedStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EncryptedStore({str(self.path)!r})"
