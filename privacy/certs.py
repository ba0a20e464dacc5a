"""TLS certificates for the coordinator and authentication keys for devices (``cryptography``).

* A private certificate authority (``ca.crt``, ``ca.key``) signs the coordinator's TLS
  certificate (``server.crt``, ``server.key``) for the host names and IP addresses devices
  use to reach it. Devices trust only this CA (``flower-supernode --root-certificates``).
  The SuperLink also connects to itself (its ServerApp process talks to its Runtime API),
  so ``localhost`` and ``127.0.0.1`` are always in the certificate.
* A device key pair is an ECDSA P-384 key in OpenSSH format, the form Flower's SuperNode
  authentication reads (``--auth-supernode-private-key``; the coordinator registers the
  ``.pub`` file).

Private keys are created owner-only (``0600``) in one ``open(O_CREAT | O_EXCL)``, so they
are never readable by anyone else, not even for a moment; nothing here prints them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy._atomic import atomic_write_bytes

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEVICE_KEY = "device.key"
DEVICE_PUB = "device.pub"
ALWAYS_HOSTS = ("localhost", "127.0.0.1")
# A DNS name of at most 253 characters, optionally a leading "*." wildcard, labels of 1-63
# letters, digits and inner hyphens (RFC 1123 section 2.1).
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?({_LABEL}\.)*{_LABEL}$")


@dataclass(frozen=True)
class CertificateSet:
    """Where ``create_certificates`` put the CA and the coordinator's certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    created_ca: bool


def write_private(path: Path, data: bytes) -> None:
    """Write a secret to a new file that only its owner can read, atomically.

    Raises
    ------
    FileExistsError
        If ``path`` exists: a key is never overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o600, overwrite=False)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, mode=0o644, overwrite=False)


def check_host(host: str) -> str:
    """A host name or IP address fit for a certificate's SAN.

    Raises
    ------
    ValueError
        If ``host`` is neither an IP address nor a valid DNS name.
    """
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return host.lower()


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _create_ca(directory: Path, *, days: int, name: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(directory / CA_KEY, _pem_key(key))
    _write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key in ``directory``.

    Raises
    ------
    FileNotFoundError
        If either file is missing.
    ValueError
        If they cannot be parsed, do not belong together or the certificate is no CA.
    """
    cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY}: not an EC private key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ValueError(f"{directory / CA_KEY} does not belong to {directory / CA_CERT}")
    if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
        raise ValueError(f"{directory / CA_CERT} is not a CA certificate")
    return cert, key


def create_certificates(
    directory: str | Path,
    hosts: list[str] | tuple[str, ...],
    *,
    ca_days: int = 3650,
    server_days: int = 397,
    ca_name: str = "emofed coordinator CA",
) -> CertificateSet:
    """Create (or reuse) the CA in ``directory`` and a coordinator certificate for ``hosts``.

    An existing CA is reused, so certificates for new host names keep working with
    devices that already trust it; an existing server certificate is never overwritten.

    Raises
    ------
    ValueError
        If a host is invalid or a validity period is not positive.
    FileExistsError
        If ``server.crt`` or ``server.key`` already exist.
    """
    if ca_days <= 0 or server_days <= 0:
        raise ValueError(f"validity must be positive days. Found ca_days={ca_days}, server_days={server_days}.")
    directory = Path(directory)
    names = tuple(dict.fromkeys([*ALWAYS_HOSTS, *(check_host(h) for h in hosts)]))
    for existing in (SERVER_CERT, SERVER_KEY):
        if (directory / existing).exists():
            raise FileExistsError(f"{directory / existing} exists; remove it to issue a new server certificate")
    directory.mkdir(parents=True, exist_ok=True)
    created = not (directory / CA_CERT).exists()
    if created:
        _create_ca(directory, days=ca_days, name=ca_name)
    ca_cert, ca_key = load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=server_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(directory / SERVER_KEY, _pem_key(key))
    _write_public(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return CertificateSet(
        directory / CA_CERT, directory / CA_KEY, directory / SERVER_CERT, directory / SERVER_KEY, names, created
    )


def create_device_keys(directory: str | Path, *, comment: str = "emofed-device") -> tuple[Path, Path]:
    """Create a device's authentication key pair (ECDSA P-384, OpenSSH format).

    Returns
    -------
    tuple[Path, Path]
        The private key (``0600``) and the public key to enrol with the coordinator.

    Raises
    ------
    FileExistsError
        If the device already has a key: enrolling twice must not silently replace it.
    """
    directory = Path(directory)
    private, public = directory / DEVICE_KEY, directory / DEVICE_PUB
    if private.exists() or public.exists():
        raise FileExistsError(f"{directory} already holds a device key ({private.name}); it is never replaced")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public, line + f" {comment}\n".encode())
    return private, public


def load_device_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A device's public key as the coordinator enrols it.

    Raises
    ------
    ValueError
        If the file is not an OpenSSH ECDSA public key on a NIST curve.
    """
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ValueError(f"{path}: device keys must be ECDSA on a NIST curve (P-256/P-384/P-521)")
    return key


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the key's OpenSSH encoding, hex: how devices are named in logs."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return digest.finalize().hex()
