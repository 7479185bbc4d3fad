"""Credentials for a fedmae deployment, made with the `cryptography` package.

- a certificate authority (``ca.key``, ``ca.crt``) that every site trusts;
- the SuperLink's TLS certificate (``server.key``, ``server.pem``), signed by that CA, whose
  subject alternative names list every host name and IP address the sites dial;
- each site's authentication key pair in the form Flower's node authentication expects: EC
  SECP384R1, the private key in OpenSSH format (``<site>.key``), the public key in OpenSSH format
  (``<site>.pub``), registered at the SuperLink with ``flwr supernode register``.

Private keys are created with mode 0600 and never overwrite an existing file unless asked
(``overwrite=True``, then replaced atomically).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.pem"
_CURVE = ec.SECP384R1  # what Flower's SuperNode authentication accepts; also a sound TLS curve
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CredentialError(ValueError):
    """A credential that cannot be made as asked; the message says what to change."""


def create_ca(folder: str | Path, common_name: str = "fedmae federation CA", days: int = 3650,
              overwrite: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate authority; returns (key, certificate) paths."""
    folder = Path(folder)
    _check_days(days)
    refuse_existing([folder / CA_KEY, folder / CA_CERT], overwrite)
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_path = write_private(folder / CA_KEY, _pem_private(key), overwrite)
    return key_path, write_public(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite)


def issue_server_certificate(ca_folder: str | Path, folder: str | Path, names: list[str], days: int = 825,
                             overwrite: bool = False) -> tuple[Path, Path]:
    """The SuperLink's TLS key and certificate, valid for ``names`` (DNS names or IP addresses)."""
    if not names:
        raise CredentialError("name at least one host name or IP address the sites dial (--san)")
    _check_days(days)
    ca_key, ca_cert = load_ca(ca_folder)
    folder = Path(folder)
    refuse_existing([folder / SERVER_KEY, folder / SERVER_CERT], overwrite)
    key = ec.generate_private_key(_CURVE())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key_path = write_private(folder / SERVER_KEY, _pem_private(key), overwrite)
    return key_path, write_public(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite)


def create_site_keys(folder: str | Path, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A site's authentication key pair (OpenSSH EC SECP384R1): (private key, public key)."""
    if not _SITE_NAME.match(site):
        raise CredentialError(f"site name {site!r}: use letters, digits, '.', '_' and '-' (it names the key files)")
    folder = Path(folder)
    refuse_existing([folder / f"{site}.key", folder / f"{site}.pub"], overwrite)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path = write_private(folder / f"{site}.key", private, overwrite)
    return private_path, write_public(folder / f"{site}.pub", public + f" {site}\n".encode(), overwrite)


def load_ca(folder: str | Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    folder = Path(folder)
    for name in (CA_KEY, CA_CERT):
        if not (folder / name).is_file():
            raise CredentialError(f"{folder / name}: not found; create the CA first (fedmae pki ca --out {folder})")
    try:
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    except ValueError as err:
        raise CredentialError(f"{folder}: the CA files cannot be read ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CredentialError(f"{folder}: {CA_KEY} is not the key of {CA_CERT}")
    return key, cert


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Check every output before writing any, so a refusal leaves nothing half-made."""
    for path in paths:
        if path.exists() and not overwrite:
            raise CredentialError(f"{path} exists; keep it, or pass --force to replace it "
                                  "(then update everything that uses it)")


def write_private(path: Path, data: bytes, overwrite: bool) -> Path:
    """Create a file readable by its owner only (0600) from the first byte; refuse to replace one
    that exists unless ``overwrite`` (then the new file replaces it atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing([path], overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_public(path: Path, data: bytes, overwrite: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_existing([path], overwrite)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path


def _check_days(days: int) -> None:
    if days < 1:
        raise CredentialError(f"--days {days}: a certificate must be valid for at least one day")


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$", name):
            raise CredentialError(f"--san {name!r}: not a host name or an IP address") from None
        return x509.DNSName(name)
