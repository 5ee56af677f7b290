"""What the outer test VM receives through its workspace share: the project, its Python dependencies, the
Firecracker binaries, the prebuilt inner image as a copy of its cache entries, and the in-guest setup script.

The outer guest has no route to Debian or PyPI, so everything is prepared here on the host:

    W/src/ai_sandbox     the package as installed on the host (byte-compiled: the guest cannot write here as root)
    W/py/                its dependencies, `pip install --target` for the same Python minor version
    W/bin/firecracker    (and jailer when given)
    W/img/               the inner image's kernel, vmlinux, initrd and rootfs
    W/cache/             the inner image's cache entries: every stage's manifest; big files are symlinks to W/img
    W/guest-setup.sh     run once as root in the outer guest
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import ai_sandbox

GUEST_WS = "/workspace"  # where the outer guest sees the payload
HERE = Path(__file__).resolve().parent
# Files of a stage entry the inner `ai` opens; the other stages (base, tools, guest) are only looked up.
STAGE_FILES = {"disk": ("rootfs.ext4",), "kernel": ("vmlinuz", "vmlinux", "initrd.img")}


def dependencies() -> list[str]:
    """The project's runtime requirements (no extras): from this checkout's pyproject.toml, else the metadata."""
    pyproject = HERE.parents[1] / "pyproject.toml"
    if pyproject.is_file():
        return sorted(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    reqs = importlib.metadata.requires("ai-sandbox") or []
    return sorted(r for r in reqs if "extra ==" not in r)


def python_site(cache: Path) -> Path:
    """The dependencies installed for this Python into a directory of their own, reused while they match."""
    reqs = dependencies()
    key = hashlib.sha256(json.dumps([sys.version_info[:2], reqs]).encode()).hexdigest()[:16]
    site = cache / f"py-{key}"
    if not (site / ".complete").exists():
        shutil.rmtree(site, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target",
                        str(site), *reqs], check=True, capture_output=True, text=True, timeout=900)
        (site / ".complete").write_text("ok\n")
    return site


def _copy_package(dest: Path) -> None:
    src = Path(ai_sandbox.__file__).resolve().parent
    # Same bytes and modes as the host's package: the inner image's cache keys include digests of them.
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    compileall.compile_dir(dest, quiet=1)


def inner_cache(manifest: Path, ws: Path) -> dict[str, str]:
    """Copy the inner image into W/img and its cache entries into W/cache; returns {stage: entry name}."""
    stages: dict[str, str] = json.loads(manifest.read_text())["stages"]
    cache_root = manifest.parents[2]  # <cache>/images/<recipe>/manifest.json
    img = ws / "img"
    img.mkdir()
    for stage, entry in stages.items():
        src = cache_root / "stages" / entry
        dst = ws / "cache" / "stages" / entry
        dst.mkdir(parents=True)
        shutil.copy2(src / "manifest.json", dst / "manifest.json")
        for name in STAGE_FILES.get(stage, ()):
            subprocess.run(["cp", "--sparse=always", str(src / name), str(img / name)], check=True)
            (dst / name).symlink_to(f"{GUEST_WS}/img/{name}")
    return stages


def build(ws: Path, *, inner_manifest: Path, firecracker: Path, jailer: Path | None, site: Path) -> None:
    """Fill the (empty) workspace directory `ws`."""
    _copy_package(ws / "src" / "ai_sandbox")
    shutil.copytree(site, ws / "py", symlinks=True)
    (ws / "bin").mkdir()
    shutil.copy2(firecracker, ws / "bin" / "firecracker")
    if jailer is not None:
        shutil.copy2(jailer, ws / "bin" / "jailer")
    inner_cache(inner_manifest, ws)
    shutil.copy2(HERE / "guest-setup.sh", ws / "guest-setup.sh")
    (ws / "guest-setup.sh").chmod(0o755)
