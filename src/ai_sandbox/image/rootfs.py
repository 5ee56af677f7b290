"""The `base` and `tools` stages: a Debian tree made by mmdebstrap, then tools that are not Debian packages.

No Docker, no loop mounts: mmdebstrap writes a directory; tools are installed by running the tree's own
programs in a chroot inside a private mount namespace (its /proc goes away with the namespace).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.image.recipe import Recipe, Tool

# What our guest integration needs in every image, whatever the recipe lists.
REQUIRED_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "openssh-server", "iproute2", "sudo", "python3", "kmod",
    "ca-certificates", "fuse3",
)
TOOLS_PREFIX = "/opt/ai-tools"
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


def chroot_argv(root: Path, argv: list[str]) -> list[str]:
    """Run inside the tree, in a private mount and pid namespace with its own /proc."""
    return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root), *argv]


def _tool_env() -> dict[str, str]:
    # The registry the host's npm is configured with is the one the guest's npm uses too.
    env = {"PATH": f"{TOOLS_PREFIX}/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    for key in ("npm_config_registry", "GOPROXY", "GOFLAGS", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        if key in os.environ:
            env[key] = os.environ[key]
    if "npm_config_registry" not in env and shutil.which("npm"):
        reg = runner.run(["npm", "config", "get", "registry"], check=False).stdout.strip()
        if reg.startswith("http"):
            env["npm_config_registry"] = reg
    return env


def _install_npm(root: Path, tool: Tool, env: dict[str, str], log_file: Path) -> None:
    npm_in_tree = root / TOOLS_PREFIX.lstrip("/") / "bin" / "npm"
    if npm_in_tree.exists():
        # Install scripts of these packages run inside the tree, not on the host.
        argv = chroot_argv(root, [f"{TOOLS_PREFIX}/bin/npm", "install", "-g", "--prefix", TOOLS_PREFIX,
                                  "--no-audit", "--no-fund", *tool.packages])
        runner.run(argv, env=env, log_file=log_file, timeout=3600)
        return
    # Bootstrapping Node itself: the host's npm unpacks it, with install scripts off.
    runner.run(["npm", "install", "-g", "--prefix", str(root / TOOLS_PREFIX.lstrip("/")), "--ignore-scripts",
                "--no-audit", "--no-fund", "--os=linux", "--cpu=x64", *tool.packages],
               extra_env={k: v for k, v in env.items() if k != "PATH"}, log_file=log_file, timeout=3600)


def _install_go(root: Path, tool: Tool, env: dict[str, str], log_file: Path) -> None:
    genv = {**env, "GOPATH": "/root/go", "GOBIN": f"{TOOLS_PREFIX}/bin"}
    for pkg in tool.packages:
        runner.run(chroot_argv(root, ["go", "install", pkg]), env=genv, log_file=log_file, timeout=3600)


def _link_bins(root: Path, tool: Tool) -> None:
    for name in tool.bins:
        target = root / TOOLS_PREFIX.lstrip("/") / "bin" / name
        if not target.exists() and not target.is_symlink():
            raise FileNotFoundError(f"tool {tool.name}: {name} was not installed")
        link = root / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to(f"{TOOLS_PREFIX}/bin/{name}")


def build_tools(base_root: Path, out: Path, tools: list[Tool], log_file: Path) -> Path:
    """Copy the base tree and install the recipe's tools into it; returns the new root."""
    root = out / "root"
    copy_tree(base_root, root)
    if not tools:
        return root
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)  # name resolution while installing, restored after
    env = _tool_env()
    try:
        for tool in tools:
            {"npm": _install_npm, "go": _install_go}[tool.kind](root, tool, env, log_file)
            _link_bins(root, tool)
    finally:
        resolv.unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
        shutil.rmtree(root / "root/.npm", ignore_errors=True)
        shutil.rmtree(root / "root/go/pkg", ignore_errors=True)
        shutil.rmtree(root / "root/.cache", ignore_errors=True)
    return root
