"""The sandbox CA and its leaf certificates: files and modes, and a chain that verifies like a client would."""

from __future__ import annotations

import datetime as dt
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ai_sandbox.proxy import ca_cert_pem
from ai_sandbox.proxy.ca import CA_CERT, CA_KEY, LeafCache, issue_leaf, load_or_create, new_authority

pytestmark = pytest.mark.unit


def _verify(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> None:
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(name))
    verifier.verify(leaf, [])


def test_the_ca_is_made_once_with_private_files(tmp_path):
    ca_dir = tmp_path / "ca"
    pem = ca_cert_pem(ca_dir)
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert stat.S_IMODE((ca_dir / CA_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert "PRIVATE KEY" not in pem
    assert ca_cert_pem(ca_dir) == pem  # the same CA on every call and every restart
    assert (ca_dir / CA_CERT).read_text() == pem


def test_the_ca_is_a_constrained_ca(tmp_path):
    cert = load_or_create(tmp_path).cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * 5)


def test_a_leaf_verifies_for_its_host_only(tmp_path):
    authority = load_or_create(tmp_path)
    key = new_authority("k").key
    leaf = issue_leaf(authority, "api.anthropic.com", key)
    _verify(authority.cert, leaf, "api.anthropic.com")
    with pytest.raises(VerificationError):
        _verify(authority.cert, leaf, "api.openai.com")
    other = new_authority("someone else")
    with pytest.raises(VerificationError):
        _verify(other.cert, leaf, "api.anthropic.com")
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=398)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_leaf_contexts_are_cached_and_offer_http1_only(tmp_path):
    cache = LeafCache(load_or_create(tmp_path))
    ctx = cache.context("api.example.com")
    assert cache.context("api.example.com") is ctx
    assert cache.context("other.example.com") is not ctx
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_python_client_trusting_the_ca_accepts_the_leaf(tmp_path):
    """A real TLS handshake in memory: the client's default verification, as the guest's clients do it."""
    authority = load_or_create(tmp_path)
    server_ctx = LeafCache(authority).context("api.example.com")
    client_ctx = ssl.create_default_context(cadata=authority.cert_pem())
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # the default of newer Pythons
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="api.example.com")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
    assert client.selected_alpn_protocol() == "http/1.1"  # never h2: the proxy reads HTTP/1.1
    assert client.getpeercert()["subjectAltName"] == (("DNS", "api.example.com"),)
