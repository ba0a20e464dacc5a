"""Tests for privacy.keys: Ed25519 key files, strings, fingerprints, signatures."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import (
    fingerprint,
    generate_private_key,
    load_or_create_private_key,
    load_private_key,
    public_key_from_string,
    public_key_to_pem,
    public_key_to_string,
    save_private_key,
    sign,
    verify_signature,
)

SEED = bytes(range(32))


def _make_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(SEED)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_key_is_owner_only(tmp_path: Path) -> None:
    """The key file is created with mode 0600 even under a permissive umask."""
    old = os.umask(0)
    try:
        save_private_key(_make_key(), tmp_path / "keys" / "device.pem")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "keys" / "device.pem").stat().st_mode)
    assert mode == 0o600
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")]


def test_save_never_overwrites(tmp_path: Path) -> None:
    """An existing key is never replaced."""
    path = tmp_path / "k.pem"
    save_private_key(_make_key(), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_private_key(generate_private_key(), path)
    assert path.read_bytes() == before


def test_load_round_trip(tmp_path: Path) -> None:
    """A saved key loads back to the same key; encrypted keys need their password."""
    key = _make_key()
    save_private_key(key, tmp_path / "plain.pem")
    save_private_key(key, tmp_path / "enc.pem", password=b"hunter2")
    assert fingerprint(load_private_key(tmp_path / "plain.pem")) == fingerprint(key)
    encrypted = load_private_key(tmp_path / "enc.pem", password=b"hunter2")
    assert fingerprint(encrypted) == fingerprint(key)
    assert b"ENCRYPTED" in (tmp_path / "enc.pem").read_bytes()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_load_refuses_group_readable_key(tmp_path: Path) -> None:
    """A key file others can read is refused, like ssh does."""
    path = tmp_path / "k.pem"
    save_private_key(_make_key(), path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="0o644"):
        load_private_key(path)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    """The first call creates the key, later calls return the same key."""
    first = load_or_create_private_key(tmp_path / "k.pem")
    assert fingerprint(load_or_create_private_key(tmp_path / "k.pem")) == fingerprint(first)


def test_fingerprint_is_sha256_of_raw_public_key() -> None:
    """key_id = hex SHA-256 of the 32 raw public bytes (pinned for a fixed seed)."""
    key = _make_key()
    raw = key.public_key().public_bytes_raw()
    assert fingerprint(key) == hashlib.sha256(raw).hexdigest()
    assert public_key_to_string(key) == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def test_public_key_string_and_pem_round_trip() -> None:
    """Public keys parse back from base64 and from PEM."""
    key = _make_key()
    for text in (public_key_to_string(key), public_key_to_pem(key)):
        assert fingerprint(public_key_from_string(text)) == fingerprint(key)


@pytest.mark.parametrize(
    ("text", "message"),
    [("not base64!", "neither PEM nor valid base64"), ("AAAA", "must be 32 bytes. Found 3")],
)
def test_public_key_from_bad_string(text: str, message: str) -> None:
    """Malformed public keys raise a one-line ValueError."""
    with pytest.raises(ValueError, match=message):
        public_key_from_string(text)


def test_signatures_verify_only_with_the_right_key() -> None:
    """A signature verifies with its key and fails with another key or other data."""
    key, other = _make_key(), generate_private_key()
    signature = sign(key, b"data")
    assert verify_signature(key.public_key(), b"data", signature)
    assert not verify_signature(other.public_key(), b"data", signature)
    assert not verify_signature(key.public_key(), b"datA", signature)
    assert not verify_signature(key.public_key(), b"data", "%%%")
