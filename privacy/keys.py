"""Ed25519 signing keys for ledger entries (``cryptography`` primitives only).

* A private key lives in a PKCS#8 PEM file created with owner-only permissions
  (0o600) from the first byte: it is written to a temporary file opened with mode
  0o600, fsynced, and published with ``os.link``, which never overwrites an existing
  key. Keys are never logged or printed.
* A private key kept in an encrypted store (a device's ``ledger-key`` object) is its
  32 raw bytes (:func:`private_key_to_bytes`); the store, not this module, protects them.
* A public key travels as a string: standard base64 of its 32 raw bytes
  (:func:`public_key_to_string`); PEM is accepted on input too.
* A key's fingerprint (the ledger's ``key_id``) is the lowercase hex SHA-256 of its
  32 raw public bytes.
* Signatures are standard base64 of the 64-byte Ed25519 signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from privacy._atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE = 0o600

PublicKeyLike = Ed25519PublicKey | Ed25519PrivateKey | str


def generate_private_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def save_private_key(
    key: Ed25519PrivateKey, path: Path | str, *, password: bytes | None = None
) -> None:
    """Write ``key`` as a PKCS#8 PEM file readable only by its owner.

    Parameters
    ----------
    key : Ed25519PrivateKey
        Key to store.
    path : Path or str
        Destination; must not exist.
    password : bytes or None
        Encrypt the PEM with this password (best available encryption).

    Raises
    ------
    FileExistsError
        If ``path`` exists: a signing key is never silently replaced.
    TypeError
        If ``key`` is not an Ed25519 private key.
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"Expected an Ed25519PrivateKey. Found {type(key).__name__}.")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, pem, mode=PRIVATE_KEY_MODE, overwrite=False)
    os.chmod(path, PRIVATE_KEY_MODE)  # in case a restrictive umask was not in force
    logger.debug("Saved signing key %s (fingerprint %s)", path, fingerprint(key))


def load_private_key(path: Path | str, *, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read a private key written by :func:`save_private_key`.

    Raises
    ------
    PermissionError
        If the file is readable or writable by group or others (POSIX).
    ValueError
        If the file does not hold an Ed25519 private key.
    """
    path = Path(path)
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"Private key {path} must be accessible by its owner only (0o600). "
                f"Found {oct(mode)}."
            )
    key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"Key file {path} must hold an Ed25519 key. Found {type(key).__name__}.")
    return key


def load_or_create_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Load the key at ``path``, creating and saving a new one if there is none."""
    path = Path(path)
    try:
        return load_private_key(path)
    except FileNotFoundError:
        key = generate_private_key()
        try:
            save_private_key(key, path)
        except FileExistsError:  # another process created it first: use theirs
            return load_private_key(path)
        return key


def private_key_to_bytes(key: Ed25519PrivateKey) -> bytes:
    """Return the 32 raw private bytes of ``key``, for a store that encrypts them.

    Raises
    ------
    TypeError
        If ``key`` is not an Ed25519 private key.
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"Expected an Ed25519PrivateKey. Found {type(key).__name__}.")
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_key_from_bytes(data: bytes) -> Ed25519PrivateKey:
    """Rebuild a key from the 32 raw bytes written by :func:`private_key_to_bytes`.

    Raises
    ------
    ValueError
        If ``data`` is not 32 bytes.
    """
    if len(data) != 32:
        raise ValueError(f"An Ed25519 private key must be 32 raw bytes. Found {len(data)}.")
    return Ed25519PrivateKey.from_private_bytes(bytes(data))


def _public(key: PublicKeyLike) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, str):
        return public_key_from_string(key)
    raise TypeError(f"Expected an Ed25519 key or key string. Found {type(key).__name__}.")


def public_key_to_string(key: PublicKeyLike) -> str:
    """Return the public key as base64 of its 32 raw bytes."""
    raw = _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def public_key_from_string(text: str) -> Ed25519PublicKey:
    """Parse a public key from base64 of its raw bytes or from PEM.

    Raises
    ------
    ValueError
        If ``text`` is neither a 32-byte base64 key nor an Ed25519 PEM public key.
    """
    if not isinstance(text, str):
        raise ValueError(f"Public key must be a string. Found {type(text).__name__}.")
    if text.lstrip().startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"PEM must hold an Ed25519 public key. Found {type(key).__name__}.")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Public key is neither PEM nor valid base64.") from None
    if len(raw) != 32:
        raise ValueError(f"Ed25519 public key must be 32 bytes. Found {len(raw)}.")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_to_pem(key: PublicKeyLike) -> str:
    """Return the public key as a SubjectPublicKeyInfo PEM string."""
    return (
        _public(key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def fingerprint(key: PublicKeyLike) -> str:
    """Return the hex SHA-256 of the key's 32 raw public bytes (the ledger ``key_id``)."""
    raw = _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def secret_seed(key: Ed25519PrivateKey, *parts: object) -> int:
    """A 63-bit seed that only the holder of ``key`` can compute, from ``parts``.

    DP noise seeded from a public value (the run's ``seed``, a round number) could be
    regenerated and subtracted by whoever knows that value. Seeding from the party's own
    signing key keeps a run reproducible for that party and unpredictable for anyone else.
    """
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    label = ":".join(str(part) for part in parts).encode()
    digest = hashlib.sha256(b"emofed-noise-seed/1\0" + raw + b"\0" + label).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Sign ``data`` and return the signature as base64."""
    return base64.b64encode(key.sign(data)).decode("ascii")


def verify_signature(key: PublicKeyLike, data: bytes, signature: str) -> bool:
    """Return whether ``signature`` (base64) is a valid signature of ``data`` by ``key``."""
    try:
        raw = base64.b64decode(signature, validate=True)
        _public(key).verify(raw, data)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True
