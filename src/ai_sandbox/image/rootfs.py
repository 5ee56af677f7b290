"""The `base` stage: a Debian tree made by mmdebstrap (no Docker, no loop mounts: it writes a directory)."""

from __future__ import annotations

from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.image.recipe import Recipe

# What our guest integration needs in every image, whatever the recipe lists.
REQUIRED_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "openssh-server", "iproute2", "sudo", "python3", "kmod",
    "ca-certificates", "fuse3",
)
# Smaller images: documentation and translations are not needed in a sandbox.
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


def packages(recipe: Recipe) -> list[str]:
    return sorted({*REQUIRED_PACKAGES, recipe.kernel, *recipe.packages})


def mmdebstrap_argv(recipe: Recipe, target: Path, sources: list[str]) -> list[str]:
    argv = [
        "mmdebstrap",
        "--mode=root",
        f"--variant={recipe.variant}",
        f"--components={','.join(recipe.components)}",
        f"--include={','.join(packages(recipe))}",
        "--aptopt=Acquire::Retries 3",
    ]
    argv += [f"--dpkgopt={o}" for o in _DPKG_EXCLUDES]
    # The guest gets its hostname, machine id and SSH host key per sandbox, at boot.
    argv += [
        "--customize-hook=rm -f $1/etc/ssh/ssh_host_*",
        "--customize-hook=rm -f $1/etc/hostname; : > $1/etc/machine-id",
    ]
    return [*argv, recipe.suite, str(target), *sources]


def build_base(recipe: Recipe, out: Path, sources: list[str], log_file: Path) -> Path:
    root = out / "root"
    runner.run(mmdebstrap_argv(recipe, root, sources), log_file=log_file, timeout=3600)
    return root


def copy_tree(src: Path, dst: Path, hardlink: bool = False) -> None:
    """Copy a root tree keeping owners, modes, xattrs; hardlinks only when every later write replaces files."""
    runner.run(["cp", "-a", "-l" if hardlink else "--reflink=auto", str(src), str(dst)])
