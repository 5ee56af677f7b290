"""Recipes, the stage cache, the initramfs archive and mirror derivation: pure parts of the image pipeline."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import pytest

from ai_sandbox.errors import NotFound, UsageError
from ai_sandbox.image import initramfs, pipeline, recipe, sources
from ai_sandbox.image.cache import Cache, digest

pytestmark = pytest.mark.unit


def test_builtin_recipes_parse():
    assert {"default", "minimal"} <= set(recipe.builtin_names())
    default, _ = recipe.load("default")
    bins = {b for t in default.tools for b in t.bins}
    assert {"claude", "opencode", "gemini", "codex", "chatgpt", "node"} <= bins
    assert [t.name for t in default.tools if t.optional] == ["chatgpt"]
    for pkg in ("git", "gh", "golang", "rustc", "cargo", "docker.io", "python3"):
        assert pkg in default.packages


def test_unknown_recipe_is_one_line():
    with pytest.raises(NotFound) as e:
        recipe.load("nope")
    assert "unknown recipe 'nope'" in e.value.line() and "\n" not in e.value.line()


def test_unknown_key_names_file_and_field(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\npackages = ["curl"]\ncolour = "blue"\n')
    with pytest.raises(UsageError, match=rf"{p}: field colour: unknown key"):
        recipe.load(str(p))


def test_bad_values_name_the_field(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\npackages = ["Not A Package"]\n')
    with pytest.raises(UsageError, match="field packages"):
        recipe.load(str(p))
    p.write_text('name = "x"\n[[tools]]\nname = "t"\nkind = "cargo"\npackages = ["a"]\n')
    with pytest.raises(UsageError, match=r"field tools\.0\.kind"):
        recipe.load(str(p))


def test_malformed_toml(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("name = \n")
    with pytest.raises(UsageError, match="malformed TOML"):
        recipe.load(str(p))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        recipe.load(str(tmp_path / "none.toml"))


def test_cache_failed_stage_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)
    inputs = {"a": 1}
    with pytest.raises(RuntimeError), cache.build("base", inputs) as work:
        (work / "half").write_text("made")
        raise RuntimeError("boom")
    assert cache.lookup("base", inputs) is None
    assert list((tmp_path / "stages").iterdir()) == []
    with cache.build("base", inputs) as work:
        (work / "whole").write_text("made")
    hit = cache.lookup("base", inputs)
    assert hit is not None and (hit / "whole").read_text() == "made"
    assert json.loads((hit / "manifest.json").read_text())["inputs"] == inputs
    assert cache.lookup("base", {"a": 2}) is None


def test_cache_why_names_changed_inputs(tmp_path):
    cache = Cache(tmp_path)
    assert cache.why("r", "guest", {"files": "x"}) == "never built"
    cache.record("r", "guest", {"files": "x", "tools": "t"})
    assert cache.why("r", "guest", {"files": "y", "tools": "t"}) == "changed: files"
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


def _parse_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, i = {}, 0
    while True:
        hdr = data[i:i + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * k: 14 + 8 * k], 16) for k in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[i + 110: i + 110 + namesize - 1].decode()
        i = (i + 110 + namesize + 3) & ~3
        body = data[i:i + size]
        i = (i + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_initramfs_contains_init_busybox_and_modules_in_dependency_order(tmp_path):
    mods = tmp_path / "mods"
    for rel in ("kernel/virtio.ko", "kernel/virtio_ring.ko", "kernel/virtio_mmio.ko", "kernel/virtio_blk.ko",
                "kernel/overlay.ko"):
        (mods / rel).parent.mkdir(parents=True, exist_ok=True)
        (mods / rel).write_bytes(rel.encode())
    (mods / "modules.dep").write_text(
        "kernel/virtio_mmio.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_ring.ko: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/overlay.ko:\n")
    init, bb = tmp_path / "init", tmp_path / "busybox"
    init.write_text("#!/bin/sh\n")
    bb.write_bytes(b"\x7fELFbusybox")
    out = initramfs.build(init, bb, mods, tmp_path / "initrd.img")
    entries = _parse_cpio(gzip.decompress(out.read_bytes()))
    assert entries["init"][1] == b"#!/bin/sh\n" and entries["init"][0] & 0o111
    assert entries["bin/busybox"][1] == b"\x7fELFbusybox"
    assert entries["dev/console"][0] & 0o170000 == 0o020000  # a character device, no mknod needed
    order = entries["etc/modules.order"][1].decode().split()
    assert order.index("virtio.ko") < order.index("virtio_ring.ko") < order.index("virtio_mmio.ko")
    assert set(order) == {"virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "virtio_blk.ko", "overlay.ko"}


def test_missing_module_is_an_error(tmp_path):
    (tmp_path / "modules.dep").write_text("kernel/virtio.ko:\n")
    with pytest.raises(FileNotFoundError, match="overlay"):
        initramfs.module_closure(tmp_path, ("overlay",))


def test_sources_are_derived_from_host_apt_config(tmp_path, monkeypatch):
    monkeypatch.delenv("AI_SANDBOX_MIRROR", raising=False)
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/x\nSuites: nodistro\nComponents: main\n")
    got = sources.sources_for("trixie", ["main"], tmp_path)
    assert got == ["deb http://mirror.example/debian trixie main", "deb http://mirror.example/debian trixie-updates main",
                   "deb http://sec.example/debian-security trixie-security main"]
    monkeypatch.setenv("AI_SANDBOX_MIRROR", "http://127.0.0.1:9/debian")
    assert sources.sources_for("bookworm", ["main"], tmp_path) == ["deb http://127.0.0.1:9/debian bookworm main"]


def test_no_host_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AI_SANDBOX_MIRROR", raising=False)
    with pytest.raises(UsageError, match="no Debian mirror"):
        sources.sources_for("bookworm", ["main"], tmp_path)


def _elf(interp: bool) -> bytes:
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x20, 64)
    struct.pack_into("<HH", hdr, 0x36, 56, 2)
    ph = bytearray(112)
    struct.pack_into("<I", ph, 0, 1)
    struct.pack_into("<I", ph, 56, 3 if interp else 1)
    return bytes(hdr + ph)


def test_static_busybox_check(tmp_path):
    (tmp_path / "s").write_bytes(_elf(False))
    (tmp_path / "d").write_bytes(_elf(True))
    assert pipeline.is_static(tmp_path / "s") and not pipeline.is_static(tmp_path / "d")


def test_unknown_verb(monkeypatch, tmp_path):
    monkeypatch.setenv("AI_SANDBOX_CACHE", str(tmp_path))
    with pytest.raises(UsageError, match="unknown build verb"):
        pipeline.Pipeline("minimal").run("sideways")


def test_artifacts_json_has_absolute_paths(tmp_path):
    a = pipeline.Artifacts(*(Path(n) for n in ("k", "v", "i", "r", "m")))
    assert all(Path(p).is_absolute() for p in a.as_dict().values())
    assert list(a.as_dict()) == ["kernel", "vmlinux", "initrd", "rootfs", "manifest"]


def _fake_package(root: Path) -> Path:
    pkg = root / "ai_sandbox"
    files = {
        "__init__.py": "",
        "image/__init__.py": "",
        "image/stage.py": "from ai_sandbox.image import helper\nfrom .. import util\nimport json\n",
        "image/helper.py": "from ai_sandbox.deep import thing\n",
        "deep.py": "thing = 1\n",
        "util.py": "",
        "unrelated.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_stage_code_key_covers_what_the_stage_imports(tmp_path, monkeypatch):
    from ai_sandbox.image import cache

    pkg = _fake_package(tmp_path)
    monkeypatch.setattr(cache, "_PACKAGE_DIR", pkg)
    assert set(cache.module_closure("ai_sandbox.image.stage")) == {
        "ai_sandbox", "ai_sandbox.image", "ai_sandbox.image.stage", "ai_sandbox.image.helper", "ai_sandbox.deep",
        "ai_sandbox.util"}
    key = cache.code_digest("ai_sandbox.image.stage")
    (pkg / "unrelated.py").write_text("x = 2\n")
    assert cache.code_digest("ai_sandbox.image.stage") == key
    (pkg / "deep.py").write_text("thing = 2\n")  # two imports away
    assert cache.code_digest("ai_sandbox.image.stage") != key


def test_real_stages_cover_the_runner_they_run_commands_with():
    from ai_sandbox.image import cache, tools

    closure = cache.module_closure("ai_sandbox.image.tools")
    assert {"ai_sandbox.runner", "ai_sandbox.image.rootfs", "ai_sandbox.errors"} <= set(closure)
    assert pipeline._code(tools) == cache.code_digest("ai_sandbox.image.tools")


def test_build_takes_v_after_the_command(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_")} | {"AI_SANDBOX_CACHE": str(tmp_path)}
    ai = str(Path(sys.executable).with_name("ai"))
    for args in (["build", "-v"], ["build", "--verbose"], ["-v", "build"]):
        res = subprocess.run([ai, *args, "--image", "no-such-recipe"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2, res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "no-such-recipe" in errors[0], res.stderr


def test_build_v_turns_on_verbose_logging(tmp_path, monkeypatch):
    import logging

    from typer.testing import CliRunner

    from ai_sandbox.cli import build as build_cmd
    from ai_sandbox.cli import main

    seen = []

    def fake_build(ref, verb="", *, skip_optional=False):
        seen.append(logging.getLogger("ai_sandbox").getEffectiveLevel())
        arts = pipeline.Artifacts(*(tmp_path / n for n in ("k", "v", "i", "r", "m")))
        return pipeline.BuildResult(arts)

    monkeypatch.setattr(build_cmd.pipeline, "build", fake_build)
    assert CliRunner().invoke(main.app, ["build", "--json"]).exit_code == 0
    assert CliRunner().invoke(main.app, ["build", "-v", "--json"]).exit_code == 0
    assert seen == [logging.WARNING, logging.INFO]


def test_npm_settings_reach_npm_explicitly_and_host_paths_stay_on_the_host():
    from ai_sandbox.image import tools

    cfg = {"registry": "https://npm.invalid/", "cafile": "/host/proxy-ca.pem", "globalconfig": "/usr/etc/npmrc",
           "https-proxy": "http://proxy.invalid:3128/"}
    host = tools.host_npm_env(cfg)
    assert host == {"npm_config_registry": "https://npm.invalid/", "npm_config_cafile": "/host/proxy-ca.pem",
                    "npm_config_globalconfig": "/usr/etc/npmrc", "npm_config_https_proxy": "http://proxy.invalid:3128/"}
    assert not any(k in host for k in ("NODE_EXTRA_CA_CERTS", "SSL_CERT_FILE", "PATH", "HOME"))
    inner = tools.tree_env(cfg, ca_in_tree=True)
    assert inner["npm_config_cafile"] == inner["NODE_EXTRA_CA_CERTS"] == tools._HOST_CA
    assert inner["npm_config_registry"] == "https://npm.invalid/" and "npm_config_globalconfig" not in inner
    assert "npm_config_cafile" not in tools.tree_env(cfg, ca_in_tree=False)
