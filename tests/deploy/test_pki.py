"""`fedmae pki`: real certificates and keys, checked with a real TLS handshake on loopback."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmae.deploy import pki
from tests.command_line import fedmae


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def credentials(tmp_path):
    pki.create_ca(tmp_path / "ca")
    pki.issue_server_certificate(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1", "superlink.example.org"])
    pki.create_site_keys(tmp_path / "sites", "hospital-a")
    return tmp_path


def test_private_keys_are_owner_only_and_the_chain_verifies(credentials):
    for key in ("ca/ca.key", "server/server.key", "sites/hospital-a.key"):
        assert mode(credentials / key) == 0o600, key
    ca = x509.load_pem_x509_certificate((credentials / "ca/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((credentials / "server/server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    # The site key pair is what Flower's node authentication reads: OpenSSH, EC SECP384R1, a matching pair.
    private = serialization.load_ssh_private_key((credentials / "sites/hospital-a.key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((credentials / "sites/hospital-a.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key() == public


def handshake(credentials: Path, trusted_ca: Path, server_name: str) -> str:
    """Serve one TLS connection with the SuperLink's certificate; connect trusting ``trusted_ca``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(credentials / "server/server.pem", credentials / "server/server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(trusted_ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.recv(2).decode()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_site_that_trusts_the_ca_connects_and_one_that_does_not_is_refused(credentials, tmp_path):
    assert handshake(credentials, credentials / "ca/ca.crt", "localhost") == "ok"
    assert handshake(credentials, credentials / "ca/ca.crt", "127.0.0.1") == "ok"
    pki.create_ca(tmp_path / "other-ca", common_name="someone else")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(credentials, tmp_path / "other-ca/ca.crt", "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate was not issued for
        handshake(credentials, credentials / "ca/ca.crt", "elsewhere.example.org")


def test_existing_keys_are_never_overwritten_unless_asked(credentials):
    before = (credentials / "sites/hospital-a.key").read_bytes()
    with pytest.raises(pki.CredentialError, match="hospital-a.key exists; keep it, or pass --force"):
        pki.create_site_keys(credentials / "sites", "hospital-a")
    assert (credentials / "sites/hospital-a.key").read_bytes() == before
    pki.create_site_keys(credentials / "sites", "hospital-a", overwrite=True)
    assert (credentials / "sites/hospital-a.key").read_bytes() != before
    assert mode(credentials / "sites/hospital-a.key") == 0o600


def test_cli_prints_what_goes_where_and_mistakes_are_one_line(tmp_path):
    made = fedmae("pki", "ca", "--out", "ca", cwd=tmp_path)
    assert made.returncode == 0 and "ca.key (0600)" in made.stdout and "--root-certificates" in made.stdout
    made = fedmae("pki", "server", "--ca", "ca", "--out", "server", "--san", "10.0.0.5", cwd=tmp_path)
    assert made.returncode == 0 and "--ssl-certfile server/server.pem" in made.stdout
    made = fedmae("pki", "site", "hospital-b", "--out", "sites", cwd=tmp_path)
    assert made.returncode == 0 and "flwr supernode register sites/hospital-b.pub" in made.stdout
    for args, expected in (
        (("pki", "ca", "--out", "ca"), "ca/ca.key exists"),
        (("pki", "server", "--ca", "nowhere", "--out", "s2", "--san", "x"), "nowhere/ca.key: not found"),
        (("pki", "server", "--ca", "ca", "--out", "s3", "--san", "not a name!"), "--san 'not a name!': not a host name"),
        (("pki", "site", "../escape", "--out", "sites"), "site name '../escape'"),
    ):
        result = fedmae(*args, cwd=tmp_path)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
