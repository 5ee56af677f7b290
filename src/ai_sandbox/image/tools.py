"""The `tools` stage: tools that are not Debian packages (npm packages, Go installs), inside the tree.

Install scripts run the tree's own programs in a chroot inside a private mount and pid namespace (its /proc
goes away with the namespace), not on the host. The host's resolver and TLS trust are lent for the build only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ai_sandbox import progress, runner
from ai_sandbox.errors import SandboxError
from ai_sandbox.image.recipe import Tool
from ai_sandbox.image.rootfs import copy_tree

TOOLS_PREFIX = "/opt/ai-tools"
_HOST_CA = "/tmp/.ai-sandbox-host-ca.crt"
MISSING = "missing-optional.json"  # optional tools that could not be installed, beside the stage's tree


def chroot_argv(root: Path, argv: list[str]) -> list[str]:
    """Run inside the tree, in a private mount and pid namespace with its own /proc."""
    return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root), *argv]


def _tool_env() -> dict[str, str]:
    # The registry the host's npm is configured with is the one the guest's npm uses too.
    path = f"{TOOLS_PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "NODE_EXTRA_CA_CERTS": _HOST_CA, "SSL_CERT_FILE": _HOST_CA}
    for key in ("npm_config_registry", "GOPROXY", "GOFLAGS", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        if key in os.environ:
            env[key] = os.environ[key]
    if "npm_config_registry" not in env and shutil.which("npm"):
        reg = runner.run(["npm", "config", "get", "registry"], check=False).stdout.strip()
        if reg.startswith("http"):
            env["npm_config_registry"] = reg
    return env


def host_ca_bundle() -> Path | None:
    """The CA bundle the host's own clients trust (npm's cafile, then the usual environment, then the system)."""
    candidates = [os.environ.get("NODE_EXTRA_CA_CERTS"), os.environ.get("SSL_CERT_FILE")]
    if shutil.which("npm"):
        candidates.append(runner.run(["npm", "config", "get", "cafile"], check=False).stdout.strip())
    candidates.append("/etc/ssl/certs/ca-certificates.crt")
    return next((Path(c) for c in candidates if c and c not in ("null", "undefined") and Path(c).is_file()), None)


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
        (out / MISSING).write_text("[]")
        return root
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    resolv.unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", resolv)  # name resolution while installing, restored after
    ca = host_ca_bundle()
    if ca is not None:
        shutil.copyfile(ca, root / _HOST_CA.lstrip("/"))
    env = _tool_env()
    try:
        failed = []
        for tool in tools:
            try:
                {"npm": _install_npm, "go": _install_go}[tool.kind](root, tool, env, log_file)
                _link_bins(root, tool)
            except (SandboxError, OSError) as e:
                if not tool.optional:
                    raise
                # An optional tool whose source cannot be reached is left out and recorded, not fatal.
                progress.info(f"optional tool {tool.name} left out: {e}")
                failed.append(tool.name)
        (out / MISSING).write_text(json.dumps(failed))
    finally:
        resolv.unlink(missing_ok=True)
        (root / _HOST_CA.lstrip("/")).unlink(missing_ok=True)
        if saved is not None:
            resolv.write_bytes(saved)
        shutil.rmtree(root / "root/.npm", ignore_errors=True)
        shutil.rmtree(root / "root/go/pkg", ignore_errors=True)
        shutil.rmtree(root / "root/.cache", ignore_errors=True)
    return root
