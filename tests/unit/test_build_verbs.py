"""The four build verbs run the real pipeline's bookkeeping over stand-in stage builders: which stages re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ai_sandbox.cli import main
from ai_sandbox.image import disk, guest, kernel, pipeline, rootfs
from ai_sandbox.image import tools as tools_stage

pytestmark = pytest.mark.unit
STAGES = ["base", "tools", "guest", "disk", "kernel"]


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Each builder writes what the next stage reads; a counter says which ones ran."""
    monkeypatch.setenv("AI_SANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "host_checks", lambda **kw: None)
    calls: list[str] = []

    def base(r, w, src, lf):
        calls.append("base")
        (w / "root").mkdir()

    def tools(root, w, tl, lf):
        calls.append("tools")
        (w / "root").mkdir()

    def guest_(root, w, files):
        calls.append("guest")
        (w / "root").mkdir()

    def disk_(root, w, label, headroom, lf):
        calls.append("disk")
        (w / "rootfs.ext4").write_bytes(b"x")

    def kernel_(root, w, init, bb):
        calls.append("kernel")
        for n in ("vmlinuz", "vmlinux", "initrd.img"):
            (w / n).write_bytes(b"k")

    monkeypatch.setattr(rootfs, "build_base", base)
    monkeypatch.setattr(tools_stage, "build_tools", tools)
    monkeypatch.setattr(guest, "build_guest", guest_)
    monkeypatch.setattr(disk, "build_disk", disk_)
    monkeypatch.setattr(kernel, "build_kernel", kernel_)
    monkeypatch.setattr(pipeline.sources, "sources_for", lambda suite, comps: ["deb http://mirror.invalid/ x main"])
    return calls


def _build(verb: str) -> dict:
    res = CliRunner().invoke(main.app, ["build", *([verb] if verb else []), "--image", "minimal", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize(("verb", "reran"), [
    ("clean", STAGES),
    ("inner-only", ["tools", "guest", "disk"]),
    ("inject-only", ["guest", "disk"]),
    ("host-only", ["kernel"]),
    ("", []),
])
def test_each_verb_reruns_exactly_its_stages(fake_stages, verb, reran):
    first = _build("")
    assert first["ran"] == STAGES and fake_stages == STAGES
    fake_stages.clear()
    out = _build(verb)
    assert out["ran"] == reran and fake_stages == reran
    assert sorted(out["reused"]) == sorted(set(STAGES) - set(reran))
    assert all(Path(out[k]).is_file() for k in ("kernel", "vmlinux", "initrd", "rootfs"))


def test_clean_wipes_the_cache_before_building(fake_stages, tmp_path):
    _build("")
    stray = tmp_path / "cache" / "stages" / "stray-entry"
    stray.mkdir(parents=True)
    _build("clean")
    assert not stray.exists()
