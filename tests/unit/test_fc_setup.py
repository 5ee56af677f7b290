"""`ai setup firecracker`: download from a local server, verify the pinned checksum, install atomically."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ai_sandbox.cli import setup as setup_cli
from ai_sandbox.errors import SandboxError, UsageError
from ai_sandbox.vmm import fc_setup

pytestmark = pytest.mark.unit

VERSION = "v1.2.3"
ARCH = "x86_64"
FC_BYTES = b"#!/bin/sh\necho Firecracker v1.2.3\n"
JAILER_BYTES = b"#!/bin/sh\necho Jailer v1.2.3\n"


def build_release(dest: Path, version: str = VERSION, arch: str = ARCH, with_jailer: bool = True) -> str:
    """Write <dest>/<version>/firecracker-<version>-<arch>.tgz laid out like upstream; return its SHA-256."""
    members = {f"firecracker-{version}-{arch}": FC_BYTES, "SHA256SUMS": b"irrelevant\n"}
    if with_jailer:
        members[f"jailer-{version}-{arch}"] = JAILER_BYTES
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"release-{version}-{arch}/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    out = dest / version / f"firecracker-{version}-{arch}.tgz"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


class Server:
    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server(tmp_path / "www")
    (tmp_path / "www").mkdir()
    monkeypatch.setenv("AI_SANDBOX_FC_RELEASE_URL", srv.url)
    monkeypatch.setenv("AI_SANDBOX_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("AI_SANDBOX_FIRECRACKER", raising=False)
    yield srv
    srv.close()


def www(tmp_path: Path) -> Path:
    return tmp_path / "www"


def test_good_checksum_installs_both_binaries(tmp_path: Path, server: Server) -> None:
    sha = build_release(www(tmp_path))
    seen: list[tuple[int, int | None]] = []
    bins = fc_setup.install(VERSION, arch=ARCH, pins={VERSION: {ARCH: sha}}, progress=lambda d, t: seen.append((d, t)))
    dest = tmp_path / "data" / "firecracker" / VERSION
    assert bins.firecracker == dest / "firecracker" and bins.jailer == dest / "jailer"
    assert bins.firecracker.read_bytes() == FC_BYTES and bins.jailer.read_bytes() == JAILER_BYTES
    assert os.access(bins.firecracker, os.X_OK) and os.access(bins.jailer, os.X_OK)
    assert sorted(p.name for p in dest.parent.iterdir()) == [VERSION]  # no temp dir left
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached the total
    assert fc_setup.find_binaries() == bins
    # Installed already: no second download.
    assert fc_setup.install(VERSION, arch=ARCH, pins={VERSION: {ARCH: sha}}) == bins
    assert len(server.requests) == 1


def test_wrong_checksum_installs_nothing(tmp_path: Path, server: Server) -> None:
    build_release(www(tmp_path))
    with pytest.raises(SandboxError) as err:
        fc_setup.install(VERSION, arch=ARCH, pins={VERSION: {ARCH: "0" * 64}})
    assert "checksum mismatch" in err.value.message and "\n" not in err.value.line()
    root = tmp_path / "data" / "firecracker"
    assert not (root / VERSION).exists()
    assert list(root.iterdir()) == []  # the temp download is gone too
    assert fc_setup.find_binaries() is None or fc_setup.find_binaries().version != VERSION


def test_unknown_version_is_refused_without_downloading(tmp_path: Path, server: Server) -> None:
    build_release(www(tmp_path), version="v9.9.9")
    with pytest.raises(UsageError) as err:
        fc_setup.install("9.9.9", arch=ARCH, pins={VERSION: {ARCH: "0" * 64}})
    assert err.value.message == "no pinned checksum for firecracker v9.9.9 on x86_64"
    assert server.requests == []
    assert not (tmp_path / "data" / "firecracker" / "v9.9.9").exists()


def test_malformed_version_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a firecracker version"):
        fc_setup.normalize_version("latest")
    assert fc_setup.normalize_version("1.16.1") == "v1.16.1"


def test_missing_release_is_a_one_line_error(tmp_path: Path, server: Server) -> None:
    with pytest.raises(SandboxError, match="HTTP 404") as err:
        fc_setup.install(VERSION, arch=ARCH, pins={VERSION: {ARCH: "0" * 64}})
    assert "\n" not in err.value.line()
    assert not (tmp_path / "data" / "firecracker" / VERSION).exists()


def test_archive_without_jailer_installs_nothing(tmp_path: Path, server: Server) -> None:
    sha = build_release(www(tmp_path), with_jailer=False)
    with pytest.raises(SandboxError, match=f"no jailer-{VERSION}-{ARCH}"):
        fc_setup.install(VERSION, arch=ARCH, pins={VERSION: {ARCH: sha}})
    assert list((tmp_path / "data" / "firecracker").iterdir()) == []


def test_pins_are_well_formed() -> None:
    for version, arches in fc_setup.PINNED_SHA256.items():
        assert fc_setup.normalize_version(version) == version
        for arch, sha in arches.items():
            assert arch in ("x86_64", "aarch64") and re.fullmatch(r"[0-9a-f]{64}", sha)
    assert set(fc_setup.PINNED_SHA256[fc_setup.DEFAULT_VERSION]) == {"x86_64", "aarch64"}


def test_release_url_follows_upstream_naming(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AI_SANDBOX_FC_RELEASE_URL", raising=False)
    assert fc_setup.release_url("v1.16.1", "aarch64") == (
        "https://github.com/firecracker-microvm/firecracker/releases/download/v1.16.1/firecracker-v1.16.1-aarch64.tgz"
    )


def test_environment_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fc = tmp_path / "my-firecracker"
    fc.write_bytes(FC_BYTES)
    monkeypatch.setenv("AI_SANDBOX_FIRECRACKER", str(fc))
    assert fc_setup.find_binaries() is None  # not executable yet
    fc.chmod(0o755)
    found = fc_setup.find_binaries()
    assert found is not None and found.firecracker == fc and found.jailer is None


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        pass

    setup_cli.register(app)
    return app


def test_cli_installs_and_refuses_unknown_versions(
    tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = fc_setup.host_arch()
    sha = build_release(www(tmp_path), arch=arch)
    monkeypatch.setitem(fc_setup.PINNED_SHA256, VERSION, {arch: sha})  # type: ignore[index]
    result = CliRunner().invoke(cli(), ["setup", "firecracker", "--version", VERSION])
    assert result.exit_code == 0, result.output
    assert f"firecracker {VERSION}:" in result.stdout
    result = CliRunner().invoke(cli(), ["setup", "firecracker", "--version", "v0.0.1"])
    assert isinstance(result.exception, UsageError)
    assert "no pinned checksum for firecracker v0.0.1" in result.exception.message
