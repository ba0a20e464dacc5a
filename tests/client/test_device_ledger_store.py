"""The device's ledger key and ledger inside its encrypted store: never plaintext, migrated, safe."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, RecordDict

from client.dp import DevicePrivacy, DeviceStore
from device.layout import LEDGER_KEY_OBJECT
from device.store import StoreError, StoreTampered, WrongStoreKey
from emofed.config import PrivacyConfig, load_config
from emofed.protocol import DEVICE_DIR_KEY, DEVICE_ID_KEY, DEVICE_ROOT_KEY
from privacy.accounting import PrivacyEvent, compute_epsilon
from privacy.audit import audit
from privacy.errors import LedgerTampered, PrivacyBudgetExceeded
from privacy.guard import read_ledger_record
from privacy.keys import (
    fingerprint,
    generate_private_key,
    private_key_to_bytes,
    public_key_to_string,
    save_private_key,
)
from privacy.ledger_store import LedgerStore

_EVENT = PrivacyEvent(noise_multiplier=3.0, sample_rate=1 / 3, steps=3)


def _make_privacy(epsilon: float = 3.0) -> PrivacyConfig:
    overrides = ["privacy.device.noise_multiplier=3.0", f"privacy.device.epsilon={epsilon}"]
    return load_config(None, overrides).privacy


def _make_device(root: Path, *, deployed: bool = False) -> DeviceStore:
    # Device 0 of run 1: simulated under `root`, or deployed with `root` as its folder.
    node = {DEVICE_DIR_KEY: str(root), DEVICE_ID_KEY: "0"} if deployed else {"partition-id": 0}
    run = {} if deployed else {DEVICE_ROOT_KEY: str(root)}
    return DeviceStore.from_context(
        Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)
    )


def _record(privacy: DevicePrivacy, server_round: int) -> float:
    return privacy.record(_EVENT, server_round=server_round, clipping_norm=1.0, extra={"examples": 12})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _object_file(device: DeviceStore, name: str) -> Path:
    return device.store_path / "objects" / f"{name}.bin"


def _make_legacy_device(device: DeviceStore, rounds: int = 1) -> tuple[Ed25519PrivateKey, bytes]:
    """An older version's device folder: plaintext PEM key and this run's plaintext chain."""
    key = generate_private_key()
    save_private_key(key, device.legacy_key_path)
    ledgers = LedgerStore(device.legacy_root / "ledger")
    ledgers.enroll(device.scope, key)
    for server_round in range(1, rounds + 1):
        ledgers.ledger(device.scope).append(
            server_round=server_round, event=_EVENT, clipping_norm=1.0, delta=1e-5,
            epsilon=compute_epsilon([_EVENT] * server_round, delta=1e-5),
            accountant="opacus_rdp", budget_epsilon=3.0, private_key=key,
        )
    return key, device.legacy_chain_path.read_bytes()


def test_key_and_chain_are_never_on_disk_in_plaintext(tmp_path: Path) -> None:
    """After two releases no device file holds the PEM header, the raw key or a chain line."""
    device = _make_device(tmp_path)
    privacy = DevicePrivacy.open(device, _make_privacy())
    _record(privacy, 1)
    _record(privacy, 2)
    raw = private_key_to_bytes(privacy._key)
    line = privacy.ledger.lines()[0].encode("ascii")
    files = _files(device.folder)
    assert set(files) >= {"keys/store.key", "store/store.json", f"store/objects/{LEDGER_KEY_OBJECT}.bin"}
    assert f"store/objects/{device.chain_object}.bin" in files
    assert not any(name.startswith(("ledger", "runs")) or name == "keys/ledger.key" for name in files)
    needles = [b"-----BEGIN", b"PRIVATE KEY", raw, base64.b64encode(raw), line, device.scope.encode()]
    for name, data in files.items():
        assert not any(needle in data for needle in needles), name
    assert all((device.folder / name).stat().st_mode & 0o077 == 0 for name in files)


def test_chain_round_trips_and_survives_reopen(tmp_path: Path) -> None:
    """A reopened device continues ε and the chain; its shipped record verifies and audits."""
    device = _make_device(tmp_path)
    first = DevicePrivacy.open(device, _make_privacy())
    assert [_record(first, 1), _record(first, 2)] == pytest.approx(
        [compute_epsilon([_EVENT] * n, delta=1e-5) for n in (1, 2)], rel=1e-12
    )
    again = DevicePrivacy.open(device, _make_privacy())
    assert again.epsilon == pytest.approx(compute_epsilon([_EVENT] * 2, delta=1e-5), rel=1e-12)
    assert again.ledger.lines() == first.ledger.lines() and len(again.ledger) == 2
    assert again.noise_seed(1, 2) == first.noise_seed(1, 2)  # the same identity
    lines, seal, key = read_ledger_record(again.ledger_record())
    assert key == public_key_to_string(device.public_key()) == public_key_to_string(first._key)
    server = LedgerStore(tmp_path / "server-ledger")
    assert server.receive(device.scope, lines, seal, public_key=key) == 2
    report = audit(tmp_path / "server-ledger")
    assert report.ok and [row.scope for row in report.scopes] == [device.scope]


@pytest.mark.parametrize("deployed", [False, True])
def test_old_plaintext_key_and_chain_are_moved_into_the_store_once(
    tmp_path: Path, deployed: bool
) -> None:
    """The older version's key keeps the device's identity and its chain its ε; plaintext is removed."""
    device = _make_device(tmp_path / "device", deployed=deployed)
    key, legacy_chain = _make_legacy_device(device)
    legacy_key = fingerprint(key)
    privacy = DevicePrivacy.open(device, _make_privacy())
    assert fingerprint(privacy._key) == legacy_key == fingerprint(device.public_key())
    assert not device.legacy_key_path.exists() and not (device.legacy_root / "ledger").exists()
    assert privacy.ledger.io.read() == legacy_chain  # byte for byte: the server's copy matches
    assert privacy.epsilon == pytest.approx(compute_epsilon([_EVENT], delta=1e-5), rel=1e-12)
    _record(privacy, 2)
    reopened = DevicePrivacy.open(device, _make_privacy())
    assert len(reopened.ledger) == 2 and fingerprint(reopened._key) == legacy_key
    files = _files(device.folder)
    assert not any(b"-----BEGIN" in data for data in files.values())


def test_interrupted_key_migration_is_completed_and_a_second_key_refused(tmp_path: Path) -> None:
    """A plaintext copy of the stored key is removed; a different plaintext key stops the device."""
    device = _make_device(tmp_path)
    key = DevicePrivacy.open(device, _make_privacy())._key
    save_private_key(key, device.legacy_key_path)  # as if the migration crashed after its commit
    DevicePrivacy.open(device, _make_privacy())
    assert not device.legacy_key_path.exists()
    other = generate_private_key()
    save_private_key(other, device.legacy_key_path)
    with pytest.raises(StoreError, match="holds another ledger key than its store") as err:
        DevicePrivacy.open(device, _make_privacy())
    assert "\n" not in str(err.value)
    assert device.legacy_key_path.exists()  # neither key is discarded
    assert fingerprint(device.public_key()) == fingerprint(key)


def test_plaintext_key_readable_by_others_is_not_imported(tmp_path: Path) -> None:
    """A group- or world-readable old key is refused, left in place, and nothing is stored."""
    device = _make_device(tmp_path)
    _make_legacy_device(device)
    device.legacy_key_path.chmod(0o644)
    with pytest.raises(PermissionError, match="0o600"):
        DevicePrivacy.open(device, _make_privacy())
    assert device.legacy_key_path.exists() and device.legacy_chain_path.exists()
    with device.open_store(create=False) as store:
        assert store.names() == []


def test_tampered_plaintext_chain_is_not_imported(tmp_path: Path) -> None:
    """An old chain that does not verify stays where it is and nothing enters the store."""
    device = _make_device(tmp_path)
    _, chain = _make_legacy_device(device)
    device.legacy_chain_path.write_bytes(chain.replace(b'"steps":3', b'"steps":1'))
    with pytest.raises(LedgerTampered, match=r"^0\.jsonl: seq 0: hash does not match"):
        DevicePrivacy.open(device, _make_privacy())
    assert device.legacy_chain_path.exists()
    with device.open_store(create=False) as store:
        assert device.chain_object not in store


def _flip(device: DeviceStore, name: str) -> None:
    path = _object_file(device, name)
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0x40
    path.write_bytes(bytes(blob))


def _truncate(device: DeviceStore, name: str) -> None:
    path = _object_file(device, name)
    path.write_bytes(path.read_bytes()[:-1])


def _swap_in_key(device: DeviceStore, name: str) -> None:
    _object_file(device, name).write_bytes(_object_file(device, LEDGER_KEY_OBJECT).read_bytes())


@pytest.mark.parametrize("damage", [_flip, _truncate, _swap_in_key])
def test_damaged_chain_object_is_a_tampered_ledger(
    tmp_path: Path, damage: Callable[[DeviceStore, str], None]
) -> None:
    """A modified, truncated or swapped chain object fails authentication: LedgerTampered, one line."""
    device = _make_device(tmp_path)
    _record(DevicePrivacy.open(device, _make_privacy()), 1)
    damage(device, device.chain_object)
    with pytest.raises(LedgerTampered, match="failed authentication") as err:
        DevicePrivacy.open(device, _make_privacy())
    assert device.chain_object in str(err.value) and "\n" not in str(err.value)


def test_damaged_key_object_is_refused(tmp_path: Path) -> None:
    """A modified ledger-key object stops the device and fails the guard's key lookup closed."""
    device = _make_device(tmp_path)
    DevicePrivacy.open(device, _make_privacy())
    _flip(device, LEDGER_KEY_OBJECT)
    with pytest.raises(StoreTampered, match=f"Object '{LEDGER_KEY_OBJECT}' .* failed authentication"):
        DevicePrivacy.open(device, _make_privacy())
    with pytest.raises(ValueError, match="failed authentication"):
        device.public_key()


def test_wrong_or_missing_store_key_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    """Another store key: WrongStoreKey in one line; no key file: FileNotFoundError, never a new key."""
    device = _make_device(tmp_path)
    _record(DevicePrivacy.open(device, _make_privacy()), 1)
    own = device.store_key_path.read_bytes()
    device.store_key_path.write_bytes(bytes(32))
    before = _files(device.store_path)
    with pytest.raises(WrongStoreKey, match=r"^Wrong passphrase or key for device store .*store") as err:
        DevicePrivacy.open(device, _make_privacy())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="Wrong passphrase or key"):
        device.public_key()
    device.store_key_path.unlink()
    with pytest.raises(FileNotFoundError):
        DevicePrivacy.open(device, _make_privacy())
    assert not device.store_key_path.exists() and _files(device.store_path) == before
    device.store_key_path.write_bytes(own)
    device.store_key_path.chmod(0o600)
    assert len(DevicePrivacy.open(device, _make_privacy()).ledger) == 1


def test_concurrent_first_opens_create_one_identity(tmp_path: Path) -> None:
    """Processes of one device opening at once share one store, one key and one chain."""
    device = _make_device(tmp_path)
    barrier, keys, errors = threading.Barrier(6), [], []

    def open_device() -> None:
        barrier.wait()
        try:
            keys.append(fingerprint(DevicePrivacy.open(device, _make_privacy())._key))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=open_device) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(keys) == 6 and len(set(keys)) == 1
    assert keys[0] == fingerprint(device.public_key())


def test_concurrent_releases_never_fork_the_chain_or_overspend(tmp_path: Path) -> None:
    """Six instances racing to spend a budget of three releases: exactly three land, in one chain."""
    expected = [compute_epsilon([_EVENT] * n, delta=1e-5) for n in (3, 4)]
    config = _make_privacy(sum(expected) / 2)
    device = _make_device(tmp_path)
    instances = [DevicePrivacy.open(device, config) for _ in range(6)]  # one store instance each
    barrier, spent, refused = threading.Barrier(6), [], []

    def release(privacy: DevicePrivacy) -> None:
        barrier.wait()
        try:
            spent.append(_record(privacy, 1))
        except PrivacyBudgetExceeded as err:
            refused.append(err)

    threads = [threading.Thread(target=release, args=(p,)) for p in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(spent) == 3 and len(refused) == 3
    final = DevicePrivacy.open(device, config)
    assert [entry["seq"] for entry in final.ledger.entries()] == [0, 1, 2]
    assert sorted(spent) == pytest.approx(
        [compute_epsilon([_EVENT] * n, delta=1e-5) for n in (1, 2, 3)], rel=1e-12
    )
    assert final.epsilon == pytest.approx(expected[0], rel=1e-12)
