"""The tools stage's npm bootstrap against a local HTTPS npm registry whose CA the host's npm knows only through
its global npmrc (the TLS-inspecting company proxy case), with an empty npm cache.

The host npm's global config is put where npm finds it on a real machine: under its prefix (`etc/npmrc`), here a
temporary prefix given by `npm_config_prefix`. (`NPM_CONFIG_GLOBALCONFIG` would pin the file and hide the bug this
guards against: `npm install -g --prefix X` reading its global config from X/etc/npmrc.) Nothing here reads or
writes the machine's own npm configuration or cache; all traffic stays on loopback.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import io
import ipaddress
import json
import os
import shutil
import ssl
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ai_sandbox.errors import BuildError
from ai_sandbox.image import tools
from ai_sandbox.image.recipe import Tool

pytestmark = pytest.mark.integration

PKG = "fake-node-linux-x64"
BIN = "#!/bin/sh\necho fake node 1.0.0\n"


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, mode in (
            ("package/package.json", json.dumps({"name": PKG, "version": "1.0.0", "bin": {"fakenode": "bin/fakenode"}}),
             0o644),
            ("package/bin/fakenode", BIN, 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data.encode()), mode
            tar.addfile(info, io.BytesIO(data.encode()))
    return buf.getvalue()


def _certs(d: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, chain.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ai-sandbox test registry CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))  # as an inspecting proxy sends it
    (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "ca.pem", d / "chain.pem", d / "key.pem"


@dataclass
class Registry:
    url: str
    ca: Path
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A loopback HTTPS server speaking just enough of the npm registry protocol for one package."""
    ca, chain, key = _certs(tmp_path)
    tgz = _tarball()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            base = f"https://127.0.0.1:{self.server.server_address[1]}"
            if self.path.lstrip("/") == PKG:
                body = json.dumps({"name": PKG, "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": {
                    "name": PKG, "version": "1.0.0", "bin": {"fakenode": "bin/fakenode"},
                    "dist": {"tarball": f"{base}/{PKG}/-/{PKG}-1.0.0.tgz",
                             "shasum": hashlib.sha1(tgz).hexdigest(),  # noqa: S324 (the registry format's field)
                             "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tgz).digest()).decode()}}}}).encode()
                ctype = "application/json"
            elif self.path == f"/{PKG}/-/{PKG}-1.0.0.tgz":
                body, ctype = tgz, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Registry(f"https://127.0.0.1:{server.server_address[1]}/", ca, seen)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def host_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host npm whose global config lives under a temporary prefix; user config and cache empty.

    Returns the global npmrc (the test writes it)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed on this host (scripts/host-packages installs it)")
    for key in list(os.environ):
        if key.lower().startswith("npm_config_") or key in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE") or \
                key.lower() in ("https_proxy", "http_proxy", "all_proxy"):
            monkeypatch.delenv(key)
    prefix = tmp_path / "npm-prefix"
    (prefix / "etc").mkdir(parents=True)
    (tmp_path / "user-npmrc").write_text("")
    monkeypatch.setenv("npm_config_prefix", str(prefix))
    monkeypatch.setenv("npm_config_userconfig", str(tmp_path / "user-npmrc"))
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))  # empty: nothing is served from a cache
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return prefix / "etc" / "npmrc"


def _base_tree(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    for d in ("etc", "tmp", "usr/local/bin", "root"):
        (base / d).mkdir(parents=True)
    return base


TOOL = Tool(name="node", kind="npm", packages=[f"{PKG}@1"], bins=["fakenode"])


def test_bootstrap_trusts_the_ca_from_the_global_npmrc(tmp_path: Path, registry: Registry, host_npm: Path):
    host_npm.write_text(f"registry={registry.url}\ncafile={registry.ca}\nfetch-retries=0\n")
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "tools.log"
    root = tools.build_tools(_base_tree(tmp_path), out, [TOOL], log)
    installed = root / "opt/ai-tools/bin/fakenode"
    assert installed.resolve().read_text() == BIN
    assert os.readlink(root / "usr/local/bin/fakenode") == "/opt/ai-tools/bin/fakenode"
    assert f"/{PKG}/-/{PKG}-1.0.0.tgz" in registry.requests  # it came from this registry, not a cache
    # The host's Node is not pointed at a CA file that exists only inside the tree.
    assert "load failed" not in log.read_text()
    assert not (root / "tmp/.ai-sandbox-host-ca.crt").exists()


def test_bootstrap_without_the_ca_fails_in_one_line(tmp_path: Path, registry: Registry, host_npm: Path):
    host_npm.write_text(f"registry={registry.url}\nfetch-retries=0\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError) as info:
        tools.build_tools(_base_tree(tmp_path), out, [TOOL], tmp_path / "tools.log")
    line = info.value.line()
    assert "\n" not in line
    assert f"npm could not install {PKG}@1 from {registry.url}" in line
    assert "CERT" in info.value.message and "cafile" in line, line
    assert not any(r.endswith(".tgz") for r in registry.requests)
