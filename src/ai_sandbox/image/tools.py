"""The `tools` stage: tools that are not Debian packages (npm packages, Go installs), inside the tree.

Install scripts run the tree's own programs in a chroot inside a private mount and pid namespace (its /proc
goes away with the namespace), not on the host. The host's resolver and TLS trust are lent for the build only.

npm's settings (registry, the CA it trusts, proxies) are the host npm's own: read once with `npm config get`,
which sees npm's builtin, global, user and environment configuration, and handed to every npm call as
`npm_config_*` variables. Nothing is passed in a way that moves it: `npm install -g --prefix X` alone would read
its global config from X/etc/npmrc and lose a `cafile` set there (the TLS-inspecting proxy case).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ai_sandbox import progress, runner
from ai_sandbox.errors import BuildError, CommandError, SandboxError
from ai_sandbox.image.recipe import Tool
from ai_sandbox.image.rootfs import copy_tree

TOOLS_PREFIX = "/opt/ai-tools"
_HOST_CA = "/tmp/.ai-sandbox-host-ca.crt"  # inside the tree only, while the stage runs
MISSING = "missing-optional.json"  # optional tools that could not be installed, beside the stage's tree
# npm settings that decide where packages come from and whom npm trusts; passed on as npm_config_<key>.
NPM_KEYS = ("registry", "cafile", "strict-ssl", "proxy", "https-proxy", "noproxy", "globalconfig")
_TLS_CODES = ("CERT", "SELF_SIGNED", "UNABLE_TO_VERIFY", "UNABLE_TO_GET_ISSUER", "ERR_TLS")


def chroot_argv(root: Path, argv: list[str]) -> list[str]:
    """Run inside the tree, in a private mount and pid namespace with its own /proc."""
    return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root), *argv]


def npm_host_config() -> dict[str, str]:
    """The host npm's effective settings among NPM_KEYS (unset ones left out); empty without npm."""
    if not shutil.which("npm"):
        return {}
    out = runner.run(["npm", "config", "get", *NPM_KEYS], check=False).stdout
    cfg = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in NPM_KEYS and value.strip() not in ("", "null", "undefined"):
            cfg[key] = value.strip()
    return cfg


def _npm_env(cfg: dict[str, str]) -> dict[str, str]:
    return {f"npm_config_{k.replace('-', '_')}": v for k, v in cfg.items()}


def host_npm_env(cfg: dict[str, str]) -> dict[str, str]:
    """Extra environment for the host's npm: its own settings, stated explicitly so --prefix cannot move them."""
    return _npm_env(cfg)


def tree_env(cfg: dict[str, str], ca_in_tree: bool) -> dict[str, str]:
    """The whole environment of programs run inside the tree (chroot): the host's npm settings, the lent CA."""
    path = f"{TOOLS_PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}
    inner = {k: v for k, v in cfg.items() if k not in ("cafile", "globalconfig")}  # host paths mean nothing there
    if ca_in_tree:
        env.update(NODE_EXTRA_CA_CERTS=_HOST_CA, SSL_CERT_FILE=_HOST_CA)
        inner["cafile"] = _HOST_CA
    env.update(_npm_env(inner))
    for key in ("GOPROXY", "GOFLAGS", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def host_ca_bundle(cfg: dict[str, str] | None = None) -> Path | None:
    """The CA bundle the host's own clients trust (npm's cafile, then the usual environment, then the system)."""
    cfg = npm_host_config() if cfg is None else cfg
    candidates = [cfg.get("cafile"), os.environ.get("NODE_EXTRA_CA_CERTS"), os.environ.get("SSL_CERT_FILE"),
                  "/etc/ssl/certs/ca-certificates.crt"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def npm_failure(e: CommandError, tool: Tool, cfg: dict[str, str]) -> BuildError:
    """One line out of npm's log: its error code, and for a TLS failure where npm's trust is configured."""
    codes = re.findall(r"^npm (?:error|ERR!) code (\S+)", e.stderr, re.M)
    code = codes[-1] if codes else e.message
    what = f"npm could not install {' '.join(tool.packages)} from {cfg.get('registry', 'its registry')}: {code}"
    if any(t in code for t in _TLS_CODES):
        return BuildError(what, hint=f"npm does not trust the registry's certificate (npm's cafile: "
                                     f"{cfg.get('cafile', 'none')}); give it the CA with: npm config set -g cafile FILE")
    return BuildError(what)


def _install_npm(root: Path, tool: Tool, env: dict[str, str], log_file: Path, cfg: dict[str, str]) -> None:
    npm_in_tree = root / TOOLS_PREFIX.lstrip("/") / "bin" / "npm"
    if npm_in_tree.exists():
        # Install scripts of these packages run inside the tree, not on the host.
        argv = chroot_argv(root, [f"{TOOLS_PREFIX}/bin/npm", "install", "-g", "--prefix", TOOLS_PREFIX,
                                  "--no-audit", "--no-fund", *tool.packages])
        kwargs = {"env": env}
    else:
        # Bootstrapping Node itself: the host's npm unpacks it, with install scripts off, in the host's own
        # environment (its HOME, cache and trust), plus its settings made explicit.
        argv = ["npm", "install", "-g", "--prefix", str(root / TOOLS_PREFIX.lstrip("/")), "--ignore-scripts",
                "--no-audit", "--no-fund", "--os=linux", "--cpu=x64", *tool.packages]
        kwargs = {"extra_env": host_npm_env(cfg)}
    try:
        runner.run(argv, log_file=log_file, timeout=3600, **kwargs)
    except CommandError as e:
        raise npm_failure(e, tool, cfg) from e


def _install_go(root: Path, tool: Tool, env: dict[str, str], log_file: Path, cfg: dict[str, str]) -> None:
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
    cfg = npm_host_config()
    ca = host_ca_bundle(cfg)
    if ca is not None:
        shutil.copyfile(ca, root / _HOST_CA.lstrip("/"))
    env = tree_env(cfg, ca is not None)
    try:
        failed = []
        for tool in tools:
            try:
                {"npm": _install_npm, "go": _install_go}[tool.kind](root, tool, env, log_file, cfg)
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
