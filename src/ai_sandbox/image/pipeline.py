"""`ai build`: recipe → stages (base, tools, guest, disk, kernel), each reused when its input manifest is unchanged."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai_sandbox import paths, progress
from ai_sandbox.errors import BuildError, SandboxError, UsageError
from ai_sandbox.guest import LABEL_BASE, files_dir
from ai_sandbox.image import disk, guest, initramfs, kernel, recipe, rootfs, sources
from ai_sandbox.image import tools as tools_stage
from ai_sandbox.image.cache import Cache, code_digest, file_digest, tree_digest

log = logging.getLogger(__name__)

STAGES = ("base", "tools", "guest", "disk", "kernel")
# The seed's verbs: which stages each one forces to run again ("clean" drops the whole cache first).
VERBS: dict[str, frozenset[str]] = {
    "": frozenset(),
    "clean": frozenset(STAGES),
    "inner-only": frozenset({"tools", "guest", "disk"}),
    "inject-only": frozenset({"guest", "disk"}),
    "host-only": frozenset({"kernel"}),
}
BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class Artifacts:
    kernel: Path
    vmlinux: Path
    initrd: Path
    rootfs: Path
    manifest: Path

    def as_dict(self) -> dict[str, str]:
        return {k: str(getattr(self, k).absolute()) for k in ("kernel", "vmlinux", "initrd", "rootfs", "manifest")}


@dataclass
class BuildResult:
    artifacts: Artifacts
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)


def _code(*modules: Any) -> str:
    """Stage code is an input too: changing how a stage builds, or any package code it imports, invalidates it."""
    return code_digest(*(m.__name__ for m in modules))


def is_static(binary: Path) -> bool:
    """True when the ELF has no program interpreter (it runs in an initramfs with no libc)."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def host_checks(npm: bool = True) -> None:
    """What a build needs on the host, each missing piece one line with its fix."""
    tools = ("mmdebstrap", "mkfs.ext4", "unshare", "chroot", "lz4", *(("npm",) if npm else ()))
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise UsageError(f"missing host tools: {', '.join(missing)}", hint="run ./ai doctor for the packages to install")
    if not BUSYBOX.exists() or not is_static(BUSYBOX):
        raise UsageError(f"{BUSYBOX} is not a static busybox", hint="install the busybox-static package")


def _failed_optional(tools_dir: Path) -> list[str]:
    try:
        return json.loads((tools_dir / tools_stage.MISSING).read_text())
    except (OSError, ValueError):
        return []


class Pipeline:
    def __init__(self, ref: str, *, skip_optional: bool = False, guest_files: Path | None = None,
                 cache: Cache | None = None) -> None:
        self.recipe, self.recipe_text = recipe.load(ref)
        self.skip_optional = skip_optional
        self.guest_files = guest_files or files_dir()
        self.cache = cache or Cache(paths.cache_dir())
        self.result_ran: list[str] = []
        self.result_reused: list[str] = []
        self._checked = False

    def _stage(self, name: str, inputs: dict[str, Any], force: bool, make) -> Path:
        """Reuse the stage's entry for these inputs, or build it (`make(workdir, log_file)`)."""
        name_r = self.recipe.name
        hit = None if force else self.cache.lookup(name, inputs)
        if hit is not None:
            log.debug("%s: reused %s", name, hit.name)
            self.result_reused.append(name)
            return hit
        if not self._checked:  # only building needs the build tools: a fully cached image starts anywhere
            host_checks(npm=any(t.kind == "npm" for t in self.recipe.tools))
            self._checked = True
        log.info("%s: building (%s)", name, "forced" if force else self.cache.why(name_r, name, inputs))
        log_file = self.cache.log_file(name_r, name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")
        try:
            with progress.step(f"{name_r}: {name}"), self.cache.build(name, inputs) as work:
                make(work, log_file)
        except SandboxError as e:
            raise BuildError(f"build step {name} failed: {e.message}", hint=e.hint, log=str(log_file)) from e
        except OSError as e:
            raise BuildError(f"build step {name} failed: {e}", log=str(log_file)) from e
        self.cache.record(name_r, name, inputs)
        self.result_ran.append(name)
        return self.cache.entry(name, inputs)

    def run(self, verb: str = "") -> BuildResult:
        if verb not in VERBS:
            raise UsageError(f"unknown build verb {verb!r}", hint=f"use one of {', '.join(v for v in VERBS if v)}")
        if verb == "clean":
            host_checks(npm=any(t.kind == "npm" for t in self.recipe.tools))  # before anything is wiped
            self._checked = True
            self.cache.clean()
        force = VERBS[verb]
        r = self.recipe
        tools = [t for t in r.tools if not (self.skip_optional and t.optional)]
        missing = [t.name for t in r.tools if t not in tools]
        base_in = {"suite": r.suite, "variant": r.variant, "components": r.components, "packages": rootfs.packages(r),
                   "sources": sources.sources_for(r.suite, r.components), "code": _code(rootfs)}
        base = self._stage("base", base_in, "base" in force,
                           lambda w, lf: rootfs.build_base(r, w, base_in["sources"], lf))
        tools_in = {"base": base.name, "tools": [t.model_dump() for t in tools], "code": _code(tools_stage)}
        tools_dir = self._stage("tools", tools_in, "tools" in force,
                                lambda w, lf: tools_stage.build_tools(base / "root", w, tools, lf))
        guest_in = {"tools": tools_dir.name, "files": tree_digest(self.guest_files), "code": _code(guest)}
        guest_dir = self._stage("guest", guest_in, "guest" in force,
                                lambda w, lf: guest.build_guest(tools_dir / "root", w, self.guest_files))
        disk_in = {"guest": guest_dir.name, "headroom": r.disk_headroom_mib, "label": LABEL_BASE, "code": _code(disk)}
        disk_dir = self._stage("disk", disk_in, "disk" in force,
                               lambda w, lf: disk.build_disk(guest_dir / "root", w, LABEL_BASE, r.disk_headroom_mib, lf))
        init = self.guest_files / "init"
        busybox = file_digest(BUSYBOX) if BUSYBOX.is_file() else "missing"  # missing: no entry matches, build says why
        kernel_in = {"base": base.name, "init": file_digest(init), "busybox": busybox,
                     "modules": list(initramfs.MODULES), "code": _code(kernel, initramfs)}
        kdir = self._stage("kernel", kernel_in, "kernel" in force,
                           lambda w, lf: kernel.build_kernel(base / "root", w, init, BUSYBOX))
        missing += _failed_optional(tools_dir)
        manifest = self._write_manifest(base, tools_dir, guest_dir, disk_dir, kdir, missing)
        arts = Artifacts(kdir / "vmlinuz", kdir / "vmlinux", kdir / "initrd.img", disk_dir / "rootfs.ext4", manifest)
        for p in (arts.kernel, arts.vmlinux, arts.initrd, arts.rootfs):
            if not p.is_file():
                raise BuildError(f"cache entry is incomplete: {p} is missing", hint="run: ai build clean")
        return BuildResult(arts, self.result_ran, self.result_reused, missing)

    def _write_manifest(self, *dirs_and_missing: Any) -> Path:
        *dirs, missing = dirs_and_missing
        path = self.cache.root / "images" / self.recipe.name / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "recipe": self.recipe.name,
            "suite": self.recipe.suite,
            "stages": {d.name.rsplit("-", 1)[0]: d.name for d in dirs},
            "tools": [t.name for t in self.recipe.tools if t.name not in missing],
            "missing_optional": missing,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
        return path


def build(ref: str, verb: str = "", *, skip_optional: bool = False, guest_files: Path | None = None) -> BuildResult:
    return Pipeline(ref, skip_optional=skip_optional, guest_files=guest_files).run(verb)

