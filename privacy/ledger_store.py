"""A ledger directory: the chains of every scope of a run and the keys that sign them.

Layout of a run's ledger directory, ``<run>/ledger/`` on the server: the public
audit material, plaintext (a device keeps its own chain encrypted in its store
instead, one object per run, in the same chain format; ``client.dp``)::

    ledger/
      keys.json              {"format": "emofed-ledger-keys/1",
                              "keys": {"server": "<base64 raw Ed25519 key>",
                                       "device:<id>": "...", ...}}
      server.jsonl           the server's chain (user-level DP on the aggregate)
      devices/<id>.jsonl     one chain per device (sample-level DP-SGD); on the
                             server, verbatim copies of what each device signed

``keys.json`` maps each scope to its public key, recorded once, at enrolment or
first contact (trust on first use); a different key for an enrolled scope is
refused. Chains are verified against these keys by ``privacy.audit``. Whoever can
rewrite the whole directory can also rewrite ``keys.json``: pin the server's key
fingerprint out of band (``audit(..., pinned_keys=...)``) where that matters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from privacy._atomic import atomic_write_bytes, file_lock
from privacy.errors import LedgerTampered
from privacy.keys import PublicKeyLike, fingerprint, public_key_from_string, public_key_to_string
from privacy.ledger import Ledger
from privacy.ledger_format import check_scope

logger = logging.getLogger(__name__)

KEYS_FORMAT = "emofed-ledger-keys/1"
KEYS_FILE = "keys.json"
SERVER_FILE = "server.jsonl"
DEVICES_DIR = "devices"


def scope_path(root: Path, scope: str) -> Path:
    """Return the chain file of ``scope`` under the ledger directory ``root``.

    Raises
    ------
    ValueError
        If ``scope`` is malformed.
    """
    check_scope(scope)
    if scope == "server":
        return root / SERVER_FILE
    return root / DEVICES_DIR / f"{scope.removeprefix('device:')}.jsonl"


class LedgerStore:
    """The chains and public keys of one run (or one device).

    Parameters
    ----------
    root : Path or str
        The ledger directory (created on first write).
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LedgerStore({str(self.root)!r})"

    @property
    def keys_path(self) -> Path:
        """Path of ``keys.json``."""
        return self.root / KEYS_FILE

    def public_keys(self) -> dict[str, str]:
        """Return scope → base64 public key as recorded (empty if none).

        Raises
        ------
        LedgerTampered
            If ``keys.json`` is malformed.
        """
        try:
            data = json.loads(self.keys_path.read_text(encoding="ascii"))
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LedgerTampered(f"{self.keys_path}: not valid JSON.") from None
        if not isinstance(data, dict) or data.get("format") != KEYS_FORMAT:
            raise LedgerTampered(f"{self.keys_path}: format is not {KEYS_FORMAT!r}.")
        keys = data.get("keys")
        if not isinstance(keys, dict):
            raise LedgerTampered(f"{self.keys_path}: 'keys' is not an object.")
        for scope, key in keys.items():
            try:
                check_scope(scope)
                public_key_from_string(key)
            except ValueError as err:
                raise LedgerTampered(f"{self.keys_path}: scope {scope!r}: {err}") from None
        return dict(keys)

    def enroll(self, scope: str, public_key: PublicKeyLike) -> bool:
        """Record ``scope``'s public key once.

        Returns
        -------
        bool
            True if newly recorded, False if the same key was already recorded.

        Raises
        ------
        LedgerTampered
            If a different key is already recorded for ``scope``.
        ValueError
            If ``scope`` or the key is malformed.
        """
        check_scope(scope)
        text = public_key_to_string(public_key)
        with file_lock(self.keys_path):
            keys = self.public_keys()
            if scope in keys:
                if keys[scope] == text:
                    return False
                raise LedgerTampered(
                    f"Scope {scope!r} is enrolled with key {fingerprint(keys[scope])[:16]}…; "
                    f"refusing key {fingerprint(text)[:16]}…."
                )
            keys[scope] = text
            payload = {"format": KEYS_FORMAT, "keys": dict(sorted(keys.items()))}
            atomic_write_bytes(
                self.keys_path, (json.dumps(payload, indent=2) + "\n").encode("ascii")
            )
        logger.debug("Enrolled %s with key %s", scope, fingerprint(text))
        return True

    def ledger(self, scope: str) -> Ledger:
        """Return the chain of ``scope``."""
        return Ledger(scope_path(self.root, scope), scope=scope)

    def scopes(self) -> list[str]:
        """Return the scopes that have a chain file, server first."""
        found = ["server"] if (self.root / SERVER_FILE).exists() else []
        devices = self.root / DEVICES_DIR
        if devices.is_dir():
            stems = sorted(
                (path.stem for path in devices.glob("*.jsonl")),
                key=lambda stem: (0, int(stem), "") if stem.isdigit() else (1, 0, stem),
            )
            found += [f"device:{stem}" for stem in stems]
        return found

    def receive(
        self,
        scope: str,
        lines: Sequence[str],
        seal: str,
        *,
        public_key: PublicKeyLike | None = None,
    ) -> int:
        """Store a device's signed entries verbatim, after verifying them.

        The device's key is enrolled on first contact (``public_key``); later calls
        must present the same key or none.

        Returns
        -------
        int
            Number of new entries stored.

        Raises
        ------
        LedgerTampered
            If the entries fail verification, conflict with the held copy, or the
            scope presents a different key.
        ValueError
            If the scope is not a device scope or no key is known for it.
        """
        if not scope.startswith("device:"):
            raise ValueError(f"Only device scopes are received. Found {scope!r}.")
        if public_key is not None:
            self.enroll(scope, public_key)
        keys: Mapping[str, str] = self.public_keys()
        if scope not in keys:
            raise ValueError(f"No public key enrolled for {scope!r}.")
        return self.ledger(scope).extend_verbatim(lines, seal, public_key=keys[scope])
