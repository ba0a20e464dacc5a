"""The encrypted device store: round trips, keys, tampering, permissions, atomicity, locking."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import device.store
from device.store import (
    EncryptedStore,
    ScryptParams,
    StoreNotFound,
    StoreTampered,
    WrongStoreKey,
    generate_key_file,
)

FAST = ScryptParams(n=2**10, r=8, p=1)  # the lowest cost the store accepts
PASSPHRASE = "correct horse battery staple"
MARKER = "EMOFED-PLAINTEXT-MARKER-7f3a"


def _make_store(root: Path, name: str = "store") -> EncryptedStore:
    return EncryptedStore.create(root / name, passphrase=PASSPHRASE, scrypt=FAST)


def _make_key_file(root: Path, name: str = "store.key") -> Path:
    return generate_key_file(root / "keys" / name)


def _make_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(4, 3)
    # Tied weights share storage; bfloat16 has no NumPy dtype.
    bias = torch.zeros(4, dtype=torch.bfloat16)
    return {"head.weight": weight, "tied.weight": weight, "head.bias": bias}


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _object_file(store: EncryptedStore, name: str) -> Path:
    return store.path / "objects" / f"{name}.bin"


def test_round_trip_across_reopen(tmp_path: Path) -> None:
    """Bytes, JSON, arrays and a state dict read back identical after a simulated restart."""
    arrays = {
        "z": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
        "a": np.array(3.5),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), dtype=np.int64),
    }
    policy = {"arm": 2, "counts": [1, 0, 3], "mean": 0.25, "name": "ucb", "none": None}
    state = _make_state_dict()
    with _make_store(tmp_path) as store:
        store.put_bytes("raw", b"\x00\x01binary")
        store.put_json("policy", policy)
        store.put_arrays("layers", arrays)
        store.put_state_dict("personal", state)
    with EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE) as reopened:
        assert reopened.names() == ["layers", "personal", "policy", "raw"]
        assert reopened.get_bytes("raw") == b"\x00\x01binary"
        assert reopened.get_json("policy") == policy
        loaded = reopened.get_arrays("layers")
        assert list(loaded) == ["z", "a", "mask", "empty"]  # order kept
        for key, value in arrays.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
            np.testing.assert_array_equal(loaded[key], value)
        tensors = reopened.get_state_dict("personal")
        assert list(tensors) == list(state)
        assert tensors["head.bias"].dtype == torch.bfloat16
        for key, value in state.items():
            assert torch.equal(tensors[key], value)


def test_key_file_store_round_trip(tmp_path: Path) -> None:
    """A store keyed by a generated key file reopens with that file."""
    key_file = _make_key_file(tmp_path)
    assert key_file.stat().st_size == 32
    with EncryptedStore.create(tmp_path / "store", key_file=key_file) as store:
        store.put_json("accountant", {"epsilon": 1.5, "steps": 40})
    with EncryptedStore.open(tmp_path / "store", key_file=key_file) as reopened:
        assert reopened.get_json("accountant") == {"epsilon": 1.5, "steps": 40}


def test_wrong_passphrase_rejected_store_unchanged(tmp_path: Path) -> None:
    """A wrong passphrase raises WrongStoreKey and leaves every file as it was."""
    with _make_store(tmp_path) as store:
        store.put_json("policy", {"arm": 1})
    before = _snapshot(tmp_path)
    with pytest.raises(WrongStoreKey, match="Wrong passphrase or key"):
        EncryptedStore.open(tmp_path / "store", passphrase="Correct horse battery staple")
    assert _snapshot(tmp_path) == before


def test_wrong_key_file_rejected_store_unchanged(tmp_path: Path) -> None:
    """Another key file, or a passphrase for a key-file store, raises WrongStoreKey."""
    key_file = _make_key_file(tmp_path, "right.key")
    other = _make_key_file(tmp_path, "other.key")
    with EncryptedStore.create(tmp_path / "store", key_file=key_file) as store:
        store.put_bytes("blob", b"data")
    before = _snapshot(tmp_path / "store")
    with pytest.raises(WrongStoreKey, match="Wrong passphrase or key"):
        EncryptedStore.open(tmp_path / "store", key_file=other)
    with pytest.raises(WrongStoreKey, match="key file, not a passphrase"):
        EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    assert _snapshot(tmp_path / "store") == before


def test_altered_header_rejected(tmp_path: Path) -> None:
    """A changed store id or salt is a wrong key; an objects path outside the store is refused."""
    _make_store(tmp_path).close()
    header_path = tmp_path / "store" / "store.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps(dict(header, store_id="0" * 32)))
    with pytest.raises(WrongStoreKey):
        EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    header_path.write_text(json.dumps(dict(header, objects="../elsewhere")))
    with pytest.raises(StoreTampered, match="malformed"):
        EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:20] + bytes([data[20] ^ 0x01]) + data[21:], id="flip-byte"),
        pytest.param(lambda data: data[:-1], id="truncate-tag"),
        pytest.param(lambda data: data[:5], id="truncate-to-5"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_object_raises_store_tampered(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    """A modified or truncated object file raises StoreTampered naming the object."""
    store = _make_store(tmp_path)
    store.put_bytes("weights", b"w" * 64)
    path = _object_file(store, "weights")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoreTampered, match="'weights'"):
        store.get_bytes("weights")


def test_swapped_objects_raise_store_tampered(tmp_path: Path) -> None:
    """Two object files swapped on disk are each detected (the name is associated data)."""
    store = _make_store(tmp_path)
    store.put_json("budget", {"epsilon": 1.0})
    store.put_json("policy", {"epsilon": 9.0})
    first, second = _object_file(store, "budget"), _object_file(store, "policy")
    data_first, data_second = first.read_bytes(), second.read_bytes()
    first.write_bytes(data_second)
    second.write_bytes(data_first)
    with pytest.raises(StoreTampered, match="'budget'"):
        store.get_json("budget")
    with pytest.raises(StoreTampered, match="'policy'"):
        store.get_json("policy")


def test_object_copied_from_another_store_rejected(tmp_path: Path) -> None:
    """An object from another store under the same key file does not authenticate."""
    key_file = _make_key_file(tmp_path)
    one = EncryptedStore.create(tmp_path / "one", key_file=key_file)
    two = EncryptedStore.create(tmp_path / "two", key_file=key_file)
    one.put_json("budget", {"epsilon": 8.0})
    two.put_json("budget", {"epsilon": 1.0})
    _object_file(two, "budget").write_bytes(_object_file(one, "budget").read_bytes())
    with pytest.raises(StoreTampered, match="'budget'"):
        two.get_json("budget")


def test_no_plaintext_on_disk(tmp_path: Path) -> None:
    """No file of the store contains a marker written through any of the object kinds."""
    marker_array = np.frombuffer(MARKER.encode(), dtype=np.uint8)
    with _make_store(tmp_path) as store:
        store.put_bytes("raw", MARKER.encode())
        store.put_json("policy", {"note": MARKER})
        store.put_arrays("layers", {MARKER: marker_array})
        store.put_state_dict("personal", {MARKER: torch.from_numpy(marker_array.copy())})
        assert store.get_json("policy") == {"note": MARKER}
    files = [path for path in (tmp_path / "store").rglob("*") if path.is_file()]
    assert len(files) >= 6  # header, lock, four objects
    for path in files:
        assert MARKER.encode() not in path.read_bytes(), path


def test_permissions_owner_only(tmp_path: Path) -> None:
    """With umask 0, or in an existing 0755 folder, the store and its files are owner-only."""
    old_umask = os.umask(0)
    try:
        key_file = _make_key_file(tmp_path)
        with EncryptedStore.create(tmp_path / "store", key_file=key_file) as store:
            store.put_bytes("raw", b"x")
            store.put_json("policy", {})
    finally:
        os.umask(old_umask)
    store_files = (tmp_path / "store").rglob("*")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in store_files}
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
    assert modes == {
        "store.json": 0o600,
        ".lock": 0o600,
        "objects": 0o700,
        "raw.bin": 0o600,
        "policy.bin": 0o600,
    }
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    (tmp_path / "existing").mkdir(mode=0o755)
    os.chmod(tmp_path / "existing", 0o755)
    EncryptedStore.create(tmp_path / "existing", key_file=key_file).close()
    assert stat.S_IMODE((tmp_path / "existing").stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_accessible_by_others_refused(tmp_path: Path, mode: int) -> None:
    """A key file that group or others may access is refused, naming the fix."""
    key_file = _make_key_file(tmp_path)
    EncryptedStore.create(tmp_path / "store", key_file=key_file).close()
    os.chmod(key_file, mode)
    with pytest.raises(PermissionError, match="owner only.*chmod 600"):
        EncryptedStore.open(tmp_path / "store", key_file=key_file)
    with pytest.raises(PermissionError, match=oct(mode)):
        EncryptedStore.create(tmp_path / "other", key_file=key_file)
    assert not (tmp_path / "other").exists()


def test_generate_key_file_never_replaces_a_key(tmp_path: Path) -> None:
    """generate_key_file refuses an existing path and leaves that key as it was."""
    key_file = _make_key_file(tmp_path)
    key = key_file.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_file(key_file)
    assert key_file.read_bytes() == key
    assert _make_key_file(tmp_path, "second.key").read_bytes() != key
    assert sorted(path.name for path in key_file.parent.iterdir()) == ["second.key", "store.key"]


def test_failed_write_keeps_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails before its rename keeps the old value and leaves no temporary file."""
    store = _make_store(tmp_path)
    store.put_json("policy", {"version": 1})
    before = _object_file(store, "policy").read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        store.put_json("policy", {"version": 2})
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("new", b"never published")
    monkeypatch.undo()
    assert _object_file(store, "policy").read_bytes() == before
    assert store.get_json("policy") == {"version": 1}
    assert store.names() == ["policy"]
    assert sorted(path.name for path in (store.path / "objects").iterdir()) == ["policy.bin"]


def test_stale_temporary_swept_on_open(tmp_path: Path) -> None:
    """A temporary left by a crashed writer is removed when the store is next opened."""
    _make_store(tmp_path).close()
    stale = tmp_path / "store" / "objects" / ".policy.bin.0123456789abcdef.tmp"
    stale.write_bytes(b"half written")
    store = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    assert not stale.exists()
    assert store.names() == []


def test_fresh_nonce_per_write(tmp_path: Path) -> None:
    """Writing the same value twice gives different nonces and ciphertexts."""
    store = _make_store(tmp_path)
    store.put_bytes("raw", b"same")
    first = _object_file(store, "raw").read_bytes()
    store.put_bytes("raw", b"same")
    second = _object_file(store, "raw").read_bytes()
    assert len(first) == 12 + 1 + 4 + 16  # nonce, kind byte, payload, tag
    assert first[:12] != second[:12] and first[12:] != second[12:]


@pytest.mark.parametrize(
    "name",
    ["", "../escape", "a/b", "a\\b", ".hidden", "a..b", "..", "a b", "é", "x" * 129, "a\0b"],
)
def test_invalid_names_rejected(tmp_path: Path, name: str) -> None:
    """Names with separators, '..', a leading dot or other characters raise ValueError."""
    store = _make_store(tmp_path)
    with pytest.raises(ValueError, match="Object name must match"):
        store.put_bytes(name, b"x")
    with pytest.raises(ValueError, match="Object name must match"):
        store.get_bytes(name)
    assert list((tmp_path / "store" / "objects").iterdir()) == []


def test_non_string_name_and_values_rejected(tmp_path: Path) -> None:
    """Wrong types raise TypeError: a non-str name, object arrays, non-JSON values."""
    store = _make_store(tmp_path)
    with pytest.raises(TypeError, match="must be a str"):
        store.put_bytes(Path("raw"), b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype object"):
        store.put_arrays("layers", {"o": np.array([1, "a"], dtype=object)})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.put_json("policy", {"f": object()})
    with pytest.raises(TypeError, match="bytes-like"):
        store.put_bytes("raw", "text")  # type: ignore[arg-type]
    assert store.names() == []


def test_kind_mismatch_and_missing_and_delete(tmp_path: Path) -> None:
    """Reading as the wrong kind is a TypeError; a missing object a KeyError; delete removes."""
    store = _make_store(tmp_path)
    store.put_json("policy", {"arm": 0})
    with pytest.raises(TypeError, match="holds json, not arrays; read it with get_json"):
        store.get_arrays("policy")
    with pytest.raises(KeyError, match="no object 'absent'"):
        store.get_bytes("absent")
    assert "policy" in store and "absent" not in store
    store.delete("policy")
    assert "policy" not in store and store.names() == []
    with pytest.raises(KeyError):
        store.delete("policy")


def test_missing_store_raises_store_not_found(tmp_path: Path) -> None:
    """A missing directory or a directory without store.json is StoreNotFound."""
    with pytest.raises(StoreNotFound, match="no directory"):
        EncryptedStore.open(tmp_path / "absent", passphrase=PASSPHRASE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFound, match="no store.json"):
        EncryptedStore.open(tmp_path / "empty", passphrase=PASSPHRASE)
    assert isinstance(StoreNotFound("x"), FileNotFoundError)


def test_create_refuses_existing_store_and_bad_arguments(tmp_path: Path) -> None:
    """Create never overwrites a store; one key source and a sane scrypt cost are required."""
    with _make_store(tmp_path) as store:
        store.put_bytes("raw", b"kept")
    with pytest.raises(FileExistsError):
        _make_store(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        EncryptedStore.create(tmp_path / "new", passphrase=PASSPHRASE, key_file=tmp_path / "k")
    with pytest.raises(ValueError, match="exactly one"):
        EncryptedStore.open(tmp_path / "store")
    with pytest.raises(ValueError, match="power of two"):
        ScryptParams(n=3000)
    with pytest.raises(ValueError, match="'n' must be in"):
        ScryptParams(n=2**8)
    reopened = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    assert reopened.get_bytes("raw") == b"kept"


def test_closed_store_refuses_operations(tmp_path: Path) -> None:
    """After close the key is gone and operations raise ValueError; repr shows no secret."""
    store = _make_store(tmp_path)
    store.put_bytes("raw", b"x")
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.get_bytes("raw")
    with pytest.raises(ValueError, match="closed"):
        store.put_bytes("raw", b"y")
    assert repr(store) == f"EncryptedStore({str(tmp_path / 'store')!r})"


def test_writer_waits_for_lock(tmp_path: Path) -> None:
    """A write blocks while another holder has the store's lock, and completes after."""
    store = _make_store(tmp_path)
    done = threading.Event()
    fd = os.open(tmp_path / "store" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Thread(target=lambda: (store.put_bytes("raw", b"late"), done.set()))
    try:
        writer.start()
        assert not done.wait(0.3)
        assert "raw" not in store
    finally:
        os.close(fd)
    writer.join(5)
    assert done.is_set() and store.get_bytes("raw") == b"late"


def test_locked_spans_a_read_and_its_write_and_holds_off_other_writers(tmp_path: Path) -> None:
    """Inside locked() the holder reads and writes freely; other instances and rekey wait for it."""
    store = _make_store(tmp_path)
    store.put_bytes("counter", b"0")
    other = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    done = threading.Event()
    writer = threading.Thread(target=lambda: (other.put_bytes("counter", b"other"), done.set()))
    with store.locked():
        value = int(store.get_bytes("counter"))
        writer.start()
        with store.locked():  # re-entrant for its holder
            store.put_bytes("counter", str(value + 1).encode())
        assert not done.wait(0.3)
        assert store.get_bytes("counter") == b"1"
        with store._lock(blocking=False) as held:  # the sweep's probe, from the holder
            assert held
        with other._lock(blocking=False) as held:  # ... and from anyone else
            assert not held
    writer.join(5)
    assert done.is_set() and store.get_bytes("counter") == b"other"


def test_locked_refuses_a_store_re_keyed_since_it_opened(tmp_path: Path) -> None:
    """A read-modify-write on a stale instance fails with WrongStoreKey before it reads."""
    store = _make_store(tmp_path)
    stale = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    store.rekey(passphrase="another passphrase", scrypt=FAST)
    with pytest.raises(WrongStoreKey, match="re-keyed since it was opened"):
        with stale.locked():
            pass


def test_create_commits_its_header_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A racing open()'s sweep cannot take create's temporary header: create holds the lock."""
    held: list[bool] = []
    real_write = device.store.atomic_write_bytes

    def probe(path: Path, data: bytes, **kwargs: object) -> None:
        fd = os.open(path.parent / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except BlockingIOError:
            held.append(True)
        finally:
            os.close(fd)
        real_write(path, data, **kwargs)

    monkeypatch.setattr(device.store, "atomic_write_bytes", probe)
    _make_store(tmp_path)
    assert held == [True]


def test_concurrent_creates_and_opens_agree_on_one_store(tmp_path: Path) -> None:
    """Processes of one device creating or opening at once all end up with the same store."""
    key_file = _make_key_file(tmp_path)
    barrier, ids, errors = threading.Barrier(8), [], []

    def create_or_open() -> None:
        barrier.wait()
        try:
            try:
                store = EncryptedStore.create(tmp_path / "store", key_file=key_file)
            except FileExistsError:
                store = EncryptedStore.open(tmp_path / "store", key_file=key_file)
            ids.append(store._header["store_id"])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=create_or_open) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(ids) == 8 and len(set(ids)) == 1


def test_rekey_to_key_file(tmp_path: Path) -> None:
    """Rekey re-encrypts every object; the old passphrase stops working, values stay."""
    store = _make_store(tmp_path)
    store.put_json("policy", {"arm": 3})
    store.put_arrays("layers", {"w": np.ones(3, dtype=np.float32)})
    stale = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    key_file = _make_key_file(tmp_path)
    store.rekey(key_file=key_file)
    assert store.get_json("policy") == {"arm": 3}
    with pytest.raises(WrongStoreKey, match="re-keyed"):
        stale.get_json("policy")
    with pytest.raises(WrongStoreKey, match="re-keyed"):
        stale.put_json("policy", {"arm": 4})
    with pytest.raises(WrongStoreKey):
        EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    reopened = EncryptedStore.open(tmp_path / "store", key_file=key_file)
    np.testing.assert_array_equal(reopened.get_arrays("layers")["w"], np.ones(3, dtype=np.float32))
    dirs = [path.name for path in (tmp_path / "store").iterdir() if path.is_dir()]
    assert len(dirs) == 1 and dirs[0].startswith("objects.")


def test_rekey_failing_at_commit_keeps_old_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rekey that fails to replace store.json leaves the store whole under the old passphrase."""
    store = _make_store(tmp_path)
    store.put_json("policy", {"arm": 3})
    real_replace = os.replace

    def fail_on_header(src: object, dst: object) -> None:
        if Path(str(dst)).name == "store.json":
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_header)
    with pytest.raises(OSError, match="power cut"):
        store.rekey(passphrase="new passphrase", scrypt=FAST)
    monkeypatch.undo()
    assert store.get_json("policy") == {"arm": 3}
    reopened = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    assert reopened.get_json("policy") == {"arm": 3}
    left = sorted(path.name for path in (tmp_path / "store").iterdir())
    assert left == [".lock", "objects", "store.json"]


def test_interrupted_rekey_leftovers_swept_on_open(tmp_path: Path) -> None:
    """An objects directory a crashed rekey left is removed on open; other folders are kept."""
    with _make_store(tmp_path) as store:
        store.put_bytes("raw", b"kept")
    leftover = tmp_path / "store" / "objects.deadbeef"
    leftover.mkdir()
    (leftover / "raw.bin").write_bytes(b"half re-encrypted")
    (tmp_path / "store" / "objects-backup").mkdir()
    reopened = EncryptedStore.open(tmp_path / "store", passphrase=PASSPHRASE)
    assert not leftover.exists()
    assert (tmp_path / "store" / "objects-backup").is_dir()
    assert reopened.get_bytes("raw") == b"kept"


def test_passphrase_unicode_composition_ignored(tmp_path: Path) -> None:
    """A passphrase typed precomposed or decomposed (NFC vs NFD) opens the same store."""
    composed = "caf\u00e9 cr\u00e8me"
    EncryptedStore.create(tmp_path / "store", passphrase=composed, scrypt=FAST).close()
    with pytest.raises(WrongStoreKey):
        EncryptedStore.open(tmp_path / "store", passphrase="cafe creme")
    store = EncryptedStore.open(tmp_path / "store", passphrase="cafe\u0301 cre\u0300me")
    assert store.names() == []
