"""Certificates and device keys: validity, SANs, the CA's signature, owner-only keys."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from privacy.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    check_host,
    create_certificates,
    create_device_keys,
    key_fingerprint,
    load_ca,
    load_device_public_key,
    write_private,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def test_server_certificate_names_given_hosts_and_loopback(tmp_path: Path) -> None:
    """The SAN lists every given DNS name and IP, plus localhost and 127.0.0.1."""
    made = create_certificates(tmp_path, ["coord.example.org", "10.0.0.5", "::1", "Edge-1"])
    dns, ips = _sans(_cert(made.server_cert))
    assert dns == {"localhost", "coord.example.org", "edge-1"}
    assert ips == {"127.0.0.1", "10.0.0.5", "::1"}
    assert made.hosts == ("localhost", "127.0.0.1", "coord.example.org", "10.0.0.5", "::1", "edge-1")


def test_server_certificate_is_signed_by_the_ca(tmp_path: Path) -> None:
    """The server certificate verifies against the CA and is a TLS server leaf, not a CA."""
    made = create_certificates(tmp_path, ["coord.local"])
    ca, server = _cert(made.ca_cert), _cert(made.server_cert)
    server.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_a_foreign_ca_does_not_verify_the_server_certificate(tmp_path: Path) -> None:
    """A certificate from one coordinator's CA fails verification against another CA."""
    ours = create_certificates(tmp_path / "a", [])
    theirs = create_certificates(tmp_path / "b", [])
    with pytest.raises((ValueError, InvalidSignature)):
        _cert(ours.server_cert).verify_directly_issued_by(_cert(theirs.ca_cert))


@pytest.mark.parametrize(("ca_days", "server_days", "expect_server"), [(3650, 397, 397), (30, 397, 30), (10, 5, 5)])
def test_validity_periods(tmp_path: Path, ca_days: int, server_days: int, expect_server: int) -> None:
    """The CA and server certificates last the given days; the server never outlives the CA."""
    before = dt.datetime.now(dt.UTC)
    made = create_certificates(tmp_path, [], ca_days=ca_days, server_days=server_days)
    ca, server = _cert(made.ca_cert), _cert(made.server_cert)
    for cert, days in ((ca, ca_days), (server, expect_server)):
        assert cert.not_valid_before_utc <= before
        expected_end = before + dt.timedelta(days=days)
        assert abs((cert.not_valid_after_utc - expected_end).total_seconds()) < 60
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


@pytest.mark.parametrize(("ca_days", "server_days"), [(0, 10), (10, 0), (-1, 10)])
def test_non_positive_validity_is_refused(tmp_path: Path, ca_days: int, server_days: int) -> None:
    """A validity of zero or fewer days is a one-line ValueError and writes nothing."""
    with pytest.raises(ValueError, match="validity must be positive days"):
        create_certificates(tmp_path / "c", [], ca_days=ca_days, server_days=server_days)
    assert not (tmp_path / "c").exists()


def test_private_keys_are_owner_only_and_match_their_certificates(tmp_path: Path) -> None:
    """ca.key and server.key are 0600 PEM keys whose public halves are in the certificates."""
    made = create_certificates(tmp_path, [])
    assert _mode(made.ca_key) == 0o600
    assert _mode(made.server_key) == 0o600
    assert _mode(made.ca_cert) == 0o644
    assert _mode(made.server_cert) == 0o644
    for key_path, cert_path in ((made.ca_key, made.ca_cert), (made.server_key, made.server_cert)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key().public_numbers() == _cert(cert_path).public_key().public_numbers()  # type: ignore[union-attr]


def test_existing_ca_is_reused_for_a_new_server_certificate(tmp_path: Path) -> None:
    """A second call with new hosts keeps the CA (devices keep trusting it) and issues a new leaf."""
    first = create_certificates(tmp_path, ["old.example"])
    ca_bytes = first.ca_cert.read_bytes()
    old_server = _cert(first.server_cert)
    first.server_cert.unlink()
    first.server_key.unlink()
    second = create_certificates(tmp_path, ["new.example"])
    assert second.created_ca is False and first.created_ca is True
    assert second.ca_cert.read_bytes() == ca_bytes
    new_server = _cert(second.server_cert)
    new_server.verify_directly_issued_by(_cert(second.ca_cert))
    assert new_server.serial_number != old_server.serial_number
    assert "new.example" in _sans(new_server)[0] and "old.example" not in _sans(new_server)[0]


def test_existing_server_certificate_is_never_overwritten(tmp_path: Path) -> None:
    """Issuing again while server.crt exists is refused and leaves the files untouched."""
    made = create_certificates(tmp_path, [])
    before = {p: p.read_bytes() for p in (made.server_cert, made.server_key)}
    with pytest.raises(FileExistsError, match="server.crt exists"):
        create_certificates(tmp_path, ["other.example"])
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("host", ["bad host", "-lead.example", "under_score.example", "a..b", "x" * 64 + ".example", ""])
def test_bad_host_names_are_refused(tmp_path: Path, host: str) -> None:
    """A host that is neither a DNS name nor an IP is refused before anything is written."""
    with pytest.raises(ValueError, match="not a host name or IP address"):
        create_certificates(tmp_path / "c", [host])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("host", "expected"),
    [("Coord.Example.ORG", "coord.example.org"), ("192.168.1.20", "192.168.1.20"), ("fe80::1", "fe80::1")],
)
def test_check_host_normalises(host: str, expected: str) -> None:
    """DNS names are lower-cased; IP addresses are kept as given."""
    assert check_host(host) == expected


def test_load_ca_refuses_a_key_from_another_ca(tmp_path: Path) -> None:
    """A CA key that does not belong to ca.crt is refused."""
    create_certificates(tmp_path / "a", [])
    create_certificates(tmp_path / "b", [])
    (tmp_path / "a" / CA_KEY).unlink()
    (tmp_path / "a" / CA_KEY).write_bytes((tmp_path / "b" / CA_KEY).read_bytes())
    with pytest.raises(ValueError, match="does not belong to"):
        load_ca(tmp_path / "a")


def test_device_keys_are_openssh_p384_and_owner_only(tmp_path: Path) -> None:
    """The device key is an OpenSSH ECDSA P-384 private key (0600); the .pub loads back."""
    private, public = create_device_keys(tmp_path / "keys", comment="phone-1")
    assert _mode(private) == 0o600
    assert _mode(tmp_path / "keys") == 0o700
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    loaded = load_device_public_key(public)
    assert loaded.public_numbers() == key.public_key().public_numbers()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().rstrip().endswith("phone-1")
    assert len(key_fingerprint(loaded)) == 64


def test_device_keys_are_never_replaced(tmp_path: Path) -> None:
    """Creating keys where a device key exists is refused and keeps the old key."""
    private, _ = create_device_keys(tmp_path)
    before = private.read_bytes()
    with pytest.raises(FileExistsError, match="never replaced"):
        create_device_keys(tmp_path)
    assert private.read_bytes() == before


def test_device_public_key_must_be_ecdsa_on_a_nist_curve(tmp_path: Path) -> None:
    """An Ed25519 or malformed public key is refused with a one-line ValueError."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    (tmp_path / "ed.pub").write_bytes(ed.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match="ECDSA on a NIST curve"):
        load_device_public_key(tmp_path / "ed.pub")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        load_device_public_key(tmp_path / "junk.pub")


def test_write_private_is_exclusive_and_owner_only(tmp_path: Path) -> None:
    """write_private creates 0600 files and refuses to overwrite an existing one."""
    path = tmp_path / "sub" / "secret"
    write_private(path, b"k")
    assert _mode(path) == 0o600 and path.read_bytes() == b"k"
    with pytest.raises(FileExistsError):
        write_private(path, b"other")
    assert path.read_bytes() == b"k"


def test_cli_certs_never_prints_private_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`emofed certs` names the key files but prints none of their contents."""
    from cli.main import main

    code = main(["certs", "--out", str(tmp_path / "certs"), "--host", "10.1.2.3", "--host", "coord.lan"])
    out = capsys.readouterr()
    assert code == 0
    text = out.out + out.err
    for name in (CA_KEY, SERVER_KEY):
        body = (tmp_path / "certs" / name).read_text()
        assert "PRIVATE KEY" in body
        assert "PRIVATE KEY" not in text
        assert body.splitlines()[1] not in text
    assert "10.1.2.3" in text and "coord.lan" in text
    assert (tmp_path / "certs" / CA_CERT).is_file() and (tmp_path / "certs" / SERVER_CERT).is_file()


def test_cli_certs_bad_host_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --host is a one-line error with exit code 2."""
    from cli.main import main

    code = main(["certs", "--out", str(tmp_path / "c"), "--host", "no spaces"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "emofed: error: not a host name or IP address: 'no spaces'"


def test_ip_sans_are_ip_entries_not_dns(tmp_path: Path) -> None:
    """IP addresses go into iPAddress SAN entries (TLS clients match IPs only there)."""
    made = create_certificates(tmp_path, ["172.16.0.9"])
    san = _cert(made.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("172.16.0.9") in san.get_values_for_type(x509.IPAddress)
    assert "172.16.0.9" not in san.get_values_for_type(x509.DNSName)
