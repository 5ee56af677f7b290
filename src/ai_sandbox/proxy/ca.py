"""The per-sandbox certificate authority the guest trusts, and the leaf certificates the proxy shows it.

The CA lives in its own directory as `ca.pem` and `ca.key` (0600). Leaf certificates are made on demand for the
hosts whose TLS the proxy terminates, and kept in memory only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_YEARS = 10
LEAF_DAYS = 397  # the longest lifetime clients accept for a server certificate
_CLOCK_SKEW = dt.timedelta(days=1)


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def new_authority(common_name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def issue_leaf(ca: Authority, host: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A server certificate for `host` (a name or an IP address), signed by `ca`."""
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=LEAF_DAYS), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def load_or_create(ca_dir: Path, common_name: str = "ai-sandbox egress proxy") -> Authority:
    """The CA of `ca_dir`, made on first use (the key 0600, the directory 0700)."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(ca_dir):
        cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
        if cert_path.is_file() and key_path.is_file():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC private key")
            return Authority(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)
        ca = new_authority(common_name)
        _write_private(key_path, _key_pem(ca.key))
        _write_private(cert_path, ca.cert_pem().encode())
        return ca


def ca_cert_pem(ca_dir: Path) -> str:
    """The CA certificate the guest must trust (made if missing)."""
    return load_or_create(ca_dir).cert_pem()


class LeafCache:
    """TLS server contexts for intercepted hosts, one per host, made on first use and kept in memory."""

    def __init__(self, ca: Authority) -> None:
        self._ca = ca
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, host: str) -> ssl.SSLContext:
        ctx = self._contexts.get(host)
        if ctx is None:
            ctx = self._contexts[host] = self._make(host)
        return ctx

    def _make(self, host: str) -> ssl.SSLContext:
        cert = issue_leaf(self._ca, host, self._key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # no HTTP/2: we read HTTP/1.1 inside the tunnel
        ctx.sni_callback = _remember_sni
        # ssl loads a chain from files only; the file lives for the duration of this call.
        with tempfile.NamedTemporaryFile(prefix="ai-sandbox-leaf-", suffix=".pem") as fh:
            fh.write(_key_pem(self._key) + cert.public_bytes(serialization.Encoding.PEM))
            fh.flush()
            ctx.load_cert_chain(fh.name)
        return ctx


def _remember_sni(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
    """Keep the client's SNI on its SSL object, so the server can compare it with the CONNECT target."""
    sslobj.ai_sandbox_sni = server_name  # type: ignore[union-attr]
    return None


def sni_of(sslobj: object) -> str | None:
    return getattr(sslobj, "ai_sandbox_sni", None)
