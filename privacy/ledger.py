"""Append-only, hash-chained, Ed25519-signed JSONL ledger of private releases.

One file is one *chain*: every release of one scope (``"server"`` or
``"device:<id>"``), signed by that scope's key, one canonical JSON object per
line, ended by a signed seal. The entry fields, the canonical form that is hashed
and signed, and a 20-line stand-alone verifier are documented in
``privacy.ledger_format``.

Atomic writes: each append rewrites the file (old lines verbatim + new entry + new
seal) into a temporary file, fsyncs it and renames it over the ledger. A crash at
any point leaves either the old or the new file, never a torn line; the cost is
O(size) per append, small for one line per round. Appends first verify the existing
chain with the writer's own key, so a tampered chain is never extended. A file
lock serialises writers of the same file.

Where the chain's bytes live is a :class:`LedgerIO`: a plain file by default
(:class:`FileLedgerIO`; the server's ledgers, the public audit material), or any
backend that reads the whole text, replaces it atomically and holds a writer lock
across read, verify and write (a device keeps its chain in its encrypted store,
``client.dp``). The chain format and every check are the same whatever the backend.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from privacy._atomic import atomic_write_bytes, file_lock
from privacy.accounting import PrivacyEvent
from privacy.errors import LedgerTampered
from privacy.keys import (
    PublicKeyLike,
    fingerprint,
    public_key_from_string,
    sign,
    verify_signature,
)
from privacy.ledger_format import (
    ENTRY_FORMAT,
    GENESIS_HASH,
    SEAL_FORMAT,
    canonical_bytes,
    check_scope,
    content_hash,
    event_of,
    parse_line,
    validate_entry,
    validate_seal,
)

logger = logging.getLogger(__name__)


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _signed(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    digest = content_hash(body)
    return {**body, "hash": digest, "signature": sign(key, bytes.fromhex(digest))}


def _public(key: PublicKeyLike) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    return public_key_from_string(key) if isinstance(key, str) else key


def _line(obj: Mapping[str, Any]) -> str:
    return canonical_bytes(obj).decode("ascii") + "\n"


@runtime_checkable
class LedgerIO(Protocol):
    """Where one chain's text lives: read whole, replaced whole, under a writer lock.

    ``name`` names the chain in error messages (a file name, an object name).
    ``read`` returns the chain's bytes, or None if there is no chain yet. ``write``
    replaces them so that a crash leaves the old or the new chain, never a mix.
    ``lock`` holds an exclusive writer lock; :class:`Ledger` reads, verifies and
    writes inside it, and ``write`` must work while the lock is held.
    """

    name: str

    def read(self) -> bytes | None:
        """The chain's bytes, or None if there is none yet."""
        ...

    def write(self, data: bytes) -> None:
        """Replace the chain's bytes atomically."""
        ...

    def lock(self) -> AbstractContextManager[object]:
        """Hold the chain's exclusive writer lock."""
        ...


class FileLedgerIO:
    """A chain in a plain ``.jsonl`` file: atomic rename, a ``.<name>.lock`` sibling lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.name = self.path.name

    def __repr__(self) -> str:
        return f"FileLedgerIO({str(self.path)!r})"

    def read(self) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        """Replace the file (temporary sibling, fsync, rename)."""
        atomic_write_bytes(self.path, data)

    def lock(self) -> AbstractContextManager[object]:
        """Hold the file's writer lock (not re-entrant)."""
        return file_lock(self.path)


class Ledger:
    """One scope's chain of signed releases, JSON lines in a file or another :class:`LedgerIO`.

    Parameters
    ----------
    path : Path, str or LedgerIO
        The ``.jsonl`` file (created on first append), or where else the chain lives.
    scope : str
        ``"server"`` or ``"device:<id>"``; every entry must carry it.

    Attributes
    ----------
    path : Path or None
        The chain's file, or None when it is not kept in a file.
    io : LedgerIO
        Where the chain's bytes are read and written.

    Raises
    ------
    ValueError
        If ``scope`` is malformed.
    """

    def __init__(self, path: Path | str | LedgerIO, *, scope: str) -> None:
        check_scope(scope)
        if isinstance(path, (str, os.PathLike)):
            path = FileLedgerIO(path)
        elif not isinstance(path, LedgerIO):
            raise TypeError(
                f"A ledger lives in a path or a LedgerIO. Found {type(path).__name__}."
            )
        self.io: LedgerIO = path
        self.path: Path | None = path.path if isinstance(path, FileLedgerIO) else None
        self.scope = scope

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else self.io.name
        return f"Ledger({where!r}, scope={self.scope!r})"

    @property
    def name(self) -> str:
        """How messages name the chain (its file or object name)."""
        return self.io.name

    # -- reading --------------------------------------------------------------

    def _read_text(self) -> str:
        data = self.io.read()
        if not data:
            return ""
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise LedgerTampered(f"{self.name}: file is not ASCII JSON lines.") from None
        if not text.endswith("\n"):
            raise LedgerTampered(f"{self.name}: torn last line (no trailing newline).")
        return text

    def _check_text(
        self, text: str, public_key: Ed25519PublicKey | None
    ) -> tuple[list[str], list[dict[str, Any]], dict[str, Any] | None]:
        """Split ``text`` into entry lines, entries and seal, verifying them.

        Without ``public_key`` the structure, hashes and chain are checked; with it,
        key ids and signatures too.
        """
        name = self.name
        if not text:
            return [], [], None
        # Split on "\n" only: str.splitlines would also split on \r, \x1c, ...
        lines = [line + "\n" for line in text[:-1].split("\n")]
        signer = (public_key, fingerprint(public_key)) if public_key is not None else None
        entries: list[dict[str, Any]] = []
        prev_hash, prev_round = GENESIS_HASH, 0
        for index, raw in enumerate(lines[:-1]):
            where = f"{name}: seq {index}"
            try:
                entry = parse_line(raw[:-1])
                validate_entry(entry)
            except ValueError as err:
                raise LedgerTampered(f"{where}: {err}.") from None
            if entry["seq"] != index:
                raise LedgerTampered(f"{where}: recorded seq is {entry['seq']} (out of order).")
            if entry["scope"] != self.scope:
                raise LedgerTampered(
                    f"{where}: scope {entry['scope']!r} in a {self.scope!r} chain."
                )
            if entry["prev_hash"] != prev_hash:
                raise LedgerTampered(f"{where}: prev_hash does not match the previous entry.")
            if entry["round"] < prev_round:
                raise LedgerTampered(
                    f"{where}: round {entry['round']} goes back from {prev_round}."
                )
            self._check_signed(entry, where, signer)
            entries.append(entry)
            prev_hash, prev_round = entry["hash"], entry["round"]
        where = f"{name}: seal"
        try:
            seal = parse_line(lines[-1][:-1])
        except ValueError as err:
            raise LedgerTampered(f"{where}: {err}.") from None
        if seal.get("format") != SEAL_FORMAT:
            raise LedgerTampered(f"{name}: last line is not a seal (entry deleted or torn chain).")
        try:
            validate_seal(seal)
        except ValueError as err:
            raise LedgerTampered(f"{where}: {err}.") from None
        if not entries:
            raise LedgerTampered(f"{where}: seal without entries.")
        if seal["scope"] != self.scope or seal["seq"] != entries[-1]["seq"]:
            raise LedgerTampered(
                f"{where}: seals seq {seal['seq']} of {seal['scope']!r} but the chain ends "
                f"at seq {entries[-1]['seq']} (entries deleted or appended)."
            )
        if seal["entry_hash"] != prev_hash:
            raise LedgerTampered(f"{where}: entry_hash does not match the last entry.")
        self._check_signed(seal, where, signer)
        return lines[:-1], entries, seal

    @staticmethod
    def _check_signed(
        obj: Mapping[str, Any], where: str, signer: tuple[Ed25519PublicKey, str] | None
    ) -> None:
        # signer: the chain's public key and its key id (fingerprint), computed once per chain.
        if content_hash(obj) != obj["hash"]:
            raise LedgerTampered(f"{where}: hash does not match the content (entry modified).")
        if signer is None:
            return
        public_key, key_id = signer
        if obj["key_id"] != key_id:
            raise LedgerTampered(
                f"{where}: signed by key {obj['key_id'][:16]}…, "
                f"not the recorded key {key_id[:16]}…."
            )
        if not verify_signature(public_key, bytes.fromhex(obj["hash"]), obj["signature"]):
            raise LedgerTampered(f"{where}: invalid signature.")

    def entries(self) -> list[dict[str, Any]]:
        """Return the entries (without the seal) after checking hashes and chain.

        Raises
        ------
        LedgerTampered
            If the file is torn, non-canonical or its chain is broken.
        """
        return self._check_text(self._read_text(), None)[1]

    def events(self) -> list[PrivacyEvent]:
        """Return the privacy event of every entry, in order."""
        return [event_of(entry) for entry in self.entries()]

    def lines(self) -> list[str]:
        """Return the raw entry lines (with newline), e.g. to ship a copy to the server."""
        return self._check_text(self._read_text(), None)[0]

    def seal_line(self) -> str | None:
        """Return the raw seal line, or None for an empty ledger."""
        text = self._read_text()
        return text[text.rfind("\n", 0, -1) + 1 :] if text else None

    def __len__(self) -> int:
        return len(self.entries())

    def verify(self, public_key: PublicKeyLike | Mapping[str, PublicKeyLike]) -> None:
        """Verify structure, hash chain, seal, key id and every signature.

        Parameters
        ----------
        public_key : key, key string, or Mapping[str, key]
            The key recorded for this scope, or the run's scope → key mapping.

        Raises
        ------
        LedgerTampered
            Naming the file, the first bad seq (or the seal) and why, or if the
            mapping has no key for this scope.
        """
        if isinstance(public_key, Mapping):
            if self.scope not in public_key:
                raise LedgerTampered(
                    f"{self.name}: no public key recorded for {self.scope!r}."
                )
            public_key = public_key[self.scope]
        self._check_text(self._read_text(), _public(public_key))

    # -- writing --------------------------------------------------------------

    def _seal(self, entry: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
        body = {
            "format": SEAL_FORMAT,
            "scope": self.scope,
            "seq": entry["seq"],
            "entry_hash": entry["hash"],
            "key_id": entry["key_id"],
            "timestamp": _utc_now(),
        }
        return _signed(body, key)

    def append(
        self,
        *,
        server_round: int,
        event: PrivacyEvent,
        clipping_norm: float,
        delta: float,
        epsilon: float,
        accountant: str,
        budget_epsilon: float,
        private_key: Ed25519PrivateKey,
        extra: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
    ) -> dict[str, Any]:
        """Sign and append one release, then re-seal the chain, atomically.

        Parameters
        ----------
        server_round : int
            Round of the release.
        event : PrivacyEvent
            What was released (σ, q, sampling, steps).
        clipping_norm : float
            Clipping norm C of the release.
        delta : float
            δ at which ``epsilon`` is stated.
        epsilon : float
            Cumulative ε of this scope after the release (from
            ``BudgetedAccountant.spend``).
        accountant : str
            Accountant that computed ``epsilon``.
        budget_epsilon : float
            The scope's ε budget.
        private_key : Ed25519PrivateKey
            The releasing party's key; must be the key of earlier entries.
        extra : Mapping or None
            Additional JSON facts (e.g. number of sampled devices).
        timestamp : datetime or None
            Time of release (timezone-aware); default now in UTC.

        Returns
        -------
        dict
            The entry as written.

        Raises
        ------
        LedgerTampered
            If the existing chain does not verify with ``private_key``.
        ValueError
            If a field is invalid (e.g. non-finite ε, unknown accountant).
        """
        if timestamp is None:
            stamp = _utc_now()
        elif timestamp.tzinfo is None:
            raise ValueError(f"Timestamp must be timezone-aware. Found {timestamp}.")
        else:
            stamp = timestamp.astimezone(UTC).isoformat(timespec="microseconds")
        with self.io.lock():
            text = self._read_text()
            lines, entries, _ = self._check_text(text, private_key.public_key())
            body = {
                "format": ENTRY_FORMAT,
                "seq": len(entries),
                "round": int(server_round),
                "scope": self.scope,
                "mechanism": event.mechanism,
                "noise_multiplier": float(event.noise_multiplier),
                "sample_rate": float(event.sample_rate),
                "sampling": event.sampling,
                "steps": int(event.steps),
                "clipping_norm": float(clipping_norm),
                "delta": float(delta),
                "epsilon": float(epsilon),
                "accountant": accountant,
                "budget_epsilon": float(budget_epsilon),
                "timestamp": stamp,
                "prev_hash": entries[-1]["hash"] if entries else GENESIS_HASH,
                "key_id": fingerprint(private_key),
                "extra": dict(extra or {}),
            }
            if entries and body["round"] < entries[-1]["round"]:
                raise ValueError(
                    f"Round must not go back. Found {body['round']} after {entries[-1]['round']}."
                )
            entry = _signed(body, private_key)
            try:
                validate_entry(json.loads(_line(entry)))
            except ValueError as err:
                raise ValueError(f"Invalid ledger entry: {err}.") from None
            new_text = "".join(lines) + _line(entry) + _line(self._seal(entry, private_key))
            self.io.write(new_text.encode("ascii"))
        logger.debug(
            "Ledger %s seq %d round %d: epsilon %.4f of %.4f (%s)",
            self.scope, entry["seq"], entry["round"], epsilon, budget_epsilon, accountant,
        )
        return entry

    def extend_verbatim(
        self, lines: Sequence[str], seal: str, *, public_key: PublicKeyLike
    ) -> int:
        """Merge a copy of another party's chain, byte for byte, after verifying it.

        Used by the server to keep the entries a device sent. ``lines`` may repeat
        entries already held (they must be identical, else the device forked its
        chain) and must continue the chain without gaps; ``seal`` must seal the new
        last entry. Idempotent: resending the same lines adds nothing.

        Parameters
        ----------
        lines : Sequence[str]
            Raw entry lines, in order, as produced by :meth:`lines` on the device.
        seal : str
            The device's raw seal line.
        public_key : Ed25519PublicKey or str
            The key recorded for this scope.

        Returns
        -------
        int
            Number of new entries stored.

        Raises
        ------
        LedgerTampered
            If the held copy or the new lines fail verification, conflict or leave gaps.
        """
        key = _public(public_key)
        incoming = [line if line.endswith("\n") else line + "\n" for line in lines]
        seal = seal if seal.endswith("\n") else seal + "\n"
        with self.io.lock():
            held, _, held_seal = self._check_text(self._read_text(), key)
            merged = list(held)
            for raw in incoming:
                try:
                    seq = parse_line(raw[:-1]).get("seq")
                except ValueError as err:
                    raise LedgerTampered(f"{self.name}: incoming line: {err}.") from None
                if not isinstance(seq, int) or seq < 0:
                    raise LedgerTampered(f"{self.name}: incoming line has no valid seq.")
                if seq < len(merged):
                    if merged[seq] != raw:
                        raise LedgerTampered(
                            f"{self.name}: seq {seq}: incoming entry differs from the held "
                            "copy (forked chain)."
                        )
                elif seq == len(merged):
                    merged.append(raw)
                else:
                    raise LedgerTampered(
                        f"{self.name}: incoming seq {seq} leaves a gap after seq "
                        f"{len(merged) - 1}."
                    )
            added = len(merged) - len(held)
            if added == 0 and held_seal is not None:
                return 0
            new_text = "".join(merged) + seal
            self._check_text(new_text, key)
            self.io.write(new_text.encode("ascii"))
        logger.debug("Ledger %s: stored %d new entries", self.scope, added)
        return added
