"""The coordinator's folder, device enrolment, preflight checks and the enrolled-only grid."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from client.supernode import ensure_device_keys
from emofed.config import load_config
from privacy.certs import create_certificates
from server.coordinator import (
    Coordinator,
    CoordinatorError,
    CoordinatorHome,
    check_device_name,
    deployment_overrides,
    enroll,
)
from server.grids import EnrolledGrid, parse_enrolled

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _make_key(root: Path, name: str) -> Path:
    public, _ = ensure_device_keys(root / name)
    return public


def _make_home(tmp_path: Path, devices: Iterable[str] = ("a", "b")) -> CoordinatorHome:
    home = CoordinatorHome(tmp_path / "coord")
    create_certificates(home.certs, [])
    for name in devices:
        enroll(home, name, _make_key(tmp_path / "devices", name))
    return home


@pytest.mark.parametrize("name", ["phone-1", "dev_0", "A.b-c", "x" * 64])
def test_good_device_names(name: str) -> None:
    """Letters, digits, _ . - up to 64 characters are accepted unchanged."""
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a/b", "a b", "x" * 65, "é"])
def test_bad_device_names(name: str) -> None:
    """Names unfit for file names and ledgers are a one-line ValueError."""
    with pytest.raises(ValueError, match=r"device name must match"):
        check_device_name(name)


def test_enroll_copies_the_key_and_is_idempotent(tmp_path: Path) -> None:
    """Enrolling writes enrolled/<name>.pub; enrolling the same key again changes nothing."""
    home = CoordinatorHome(tmp_path / "coord")
    public = _make_key(tmp_path, "dev0")
    target = enroll(home, "dev0", public)
    assert target == home.enrolled / "dev0.pub"
    assert target.read_bytes() == public.read_bytes()
    assert enroll(home, "dev0", public) == target
    assert list(home.enrolled_keys()) == ["dev0"]


def test_enroll_refuses_a_taken_name_or_a_key_enrolled_twice(tmp_path: Path) -> None:
    """A name bound to another key, or a key already under another name, is refused."""
    home = CoordinatorHome(tmp_path / "coord")
    first, second = _make_key(tmp_path, "one"), _make_key(tmp_path, "two")
    enroll(home, "one", first)
    with pytest.raises(ValueError, match="already enrolled with another key"):
        enroll(home, "one", second)
    with pytest.raises(ValueError, match="already enrolled as 'one'"):
        enroll(home, "other", first)
    assert list(home.enrolled_keys()) == ["one"]


def test_enroll_refuses_a_key_that_is_no_device_key(tmp_path: Path) -> None:
    """A file that is not an OpenSSH ECDSA key is refused and nothing is enrolled."""
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAA nope\n")
    home = CoordinatorHome(tmp_path / "coord")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        enroll(home, "dev", tmp_path / "bad.pub")
    assert home.enrolled_keys() == {}


def test_preflight_returns_enrolled_keys(tmp_path: Path) -> None:
    """With certificates and enrolled devices, preflight returns name -> key file, sorted."""
    home = _make_home(tmp_path, ("b", "a"))
    keys = Coordinator(home).preflight()
    assert list(keys) == ["a", "b"]
    assert keys["a"] == home.enrolled / "a.pub"


@pytest.mark.parametrize("missing", ["ca.crt", "server.crt", "server.key"])
def test_preflight_needs_certificates_unless_insecure(tmp_path: Path, missing: str) -> None:
    """A missing certificate file names the `emofed certs` command; --insecure does not need them."""
    home = _make_home(tmp_path)
    (home.certs / missing).unlink()
    with pytest.raises(CoordinatorError, match=rf"{missing} is missing; create certificates with `emofed certs"):
        Coordinator(home).preflight()
    assert list(Coordinator(home, insecure=True).preflight()) == ["a", "b"]


def test_preflight_needs_an_enrolled_device(tmp_path: Path) -> None:
    """A coordinator with nobody enrolled says how to enrol."""
    home = _make_home(tmp_path, ())
    with pytest.raises(CoordinatorError, match="no device is enrolled.*emofed device enroll"):
        Coordinator(home).preflight()


def test_preflight_refuses_a_damaged_enrolled_key(tmp_path: Path) -> None:
    """An enrolled key file that no longer parses stops the start, naming the device."""
    home = _make_home(tmp_path)
    (home.enrolled / "b.pub").write_text("garbage\n")
    with pytest.raises(CoordinatorError, match="enrolled key of 'b' is unusable"):
        Coordinator(home).preflight()


def test_deployment_overrides_default_devices_to_enrolled() -> None:
    """`devices` follows the number of enrolled devices unless the operator set it."""
    cfg = load_config(SMOKE, [])
    assert deployment_overrides(cfg, ["rounds=2"], 4) == ["rounds=2", "devices=4"]
    assert deployment_overrides(cfg, ["devices = 2"], 4) == ["devices = 2"]
    assert deployment_overrides(cfg, ["rounds=2"], 0) == ["rounds=2"]


def test_insecure_coordinator_needs_no_enrolment(tmp_path: Path) -> None:
    """Without TLS Flower cannot authenticate devices, so nobody needs to be enrolled."""
    home = CoordinatorHome(tmp_path / "coord")
    assert Coordinator(home, insecure=True).preflight() == {}


class _FakeMsg:
    def __init__(self, dst: int) -> None:
        self.metadata = type("M", (), {"dst_node_id": dst})()


class _FakeGrid:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.sent: list[Any] = []

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        batch = list(messages)
        self.sent += batch
        return [str(i) for i in range(len(batch))]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        self.sent += list(messages)
        return []


def test_enrolled_grid_hides_strangers_and_refuses_to_send_to_them() -> None:
    """Only enrolled node ids are visible; a message to any other node is refused before sending."""
    inner = _FakeGrid([11, 22, 33])
    grid = EnrolledGrid(inner, frozenset({11, 33}))  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [11, 33]
    grid.send_and_receive([_FakeMsg(11)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="refusing to send to node 22: not enrolled"):
        grid.push_messages([_FakeMsg(33), _FakeMsg(22)])  # type: ignore[list-item]
    assert [m.metadata.dst_node_id for m in inner.sent] == [11]


@pytest.mark.parametrize(("value", "expected"), [("1,2,3", {1, 2, 3}), (" 5 , 7,", {5, 7}), (42, {42})])
def test_parse_enrolled(value: object, expected: set[int]) -> None:
    """The run-config list of node ids parses to a set of ints."""
    assert parse_enrolled(value) == frozenset(expected)


@pytest.mark.parametrize("value", ["", "a,b", "1;2"])
def test_parse_enrolled_refuses_bad_values(value: str) -> None:
    """Anything but comma-separated node ids is a one-line ValueError."""
    with pytest.raises(ValueError, match="enrolled-nodes"):
        parse_enrolled(value)
