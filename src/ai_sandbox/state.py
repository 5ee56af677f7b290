"""Instance directories: one folder holds everything about one sandbox; every file name is defined here once.

Status is never stored: it is derived from pid files, processes and sockets (see sandbox.status).
Paths stay short because Unix socket paths are limited to 108 bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ai_sandbox import paths
from ai_sandbox.errors import NotFound, UsageError
from ai_sandbox.vmm.base import VMFiles


class Files:
    SPEC = "sandbox.json"  # what the user asked for (configuration, not status)
    LOCK = "lock"
    PID = "vmm.pid"
    API = "api.sock"  # QMP (QEMU) or the Firecracker API
    VSOCK = "v.sock"
    CONSOLE = "console.log"
    VMM_LOG = "vmm.log"
    DATA = "data.ext4"  # the overlay's upper layer: survives stop/start
    CONFIG = "config.ext4"  # the config drive, rewritten at each start
    WORKSPACE_IMG = "workspace.ext4"  # --share copy
    KEY = "id_ed25519"
    HOST_KEY = "host_ed25519"
    KNOWN_HOSTS = "known_hosts"
    SSH_CONFIG = "ssh_config"
    FS_SOCK = "fs.sock"
    FS_PID = "virtiofsd.pid"
    FS_LOG = "virtiofsd.log"
    SHARE_PID = "share.pid"
    SHARE_LOG = "share.log"
    COPY_MANIFEST = "copy-manifest.json"
    PROXY_CONFIG = "proxy.json"
    POLICY = "policy.json"  # beside PROXY_CONFIG: the proxy's default policy file
    PROXY_CA = "proxy-ca"
    PROXY_LOG = "proxy-requests.log"
    PROXY_DAEMON_LOG = "proxy.log"
    PROXY_PID = "proxy.pid"
    AGENT_CONFIG = "hostagent.json"  # the host agent: Ollama forward, DNS (see ai_sandbox.hostagent)
    AGENT_PID = "hostagent.pid"
    AGENT_LOG = "hostagent.log"
    DNS_LOG = "dns-queries.log"  # one JSON line per guest DNS query (open/nat modes)


_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"invalid sandbox name {name!r}", hint="use 1-24 lowercase letters, digits and -")
    return name


def name_for_workspace(workspace: Path) -> str:
    """The default name of a workspace's sandbox: its folder name and a short hash of its path."""
    base = re.sub(r"[^a-z0-9-]+", "-", workspace.name.lower()).strip("-")[:16] or "ws"
    return f"{base}-{hashlib.sha256(str(workspace).encode()).hexdigest()[:6]}"


@dataclass
class Spec:
    """A sandbox's configuration as created; the start command may change cpus/memory."""

    name: str
    workspace: str
    image: str
    vmm: str
    cpus: int
    memory_mib: int
    share: str = "virtiofs"
    network: str = "nat"
    uid: int = 1000
    gid: int = 1000
    subnet: str = ""
    data_size_mib: int = 16384
    workspace_size_mib: int = 4096
    extra: dict[str, str] = field(default_factory=dict)


class Instance:
    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = check_name(name)
        self.dir = (root or paths.state_dir()) / name

    def path(self, filename: str) -> Path:
        return self.dir / filename

    def exists(self) -> bool:
        return (self.dir / Files.SPEC).is_file()

    def vm_files(self) -> VMFiles:
        p = self.path
        return VMFiles(p(Files.PID), p(Files.API), p(Files.CONSOLE), p(Files.VMM_LOG), p(Files.VSOCK))

    def load(self) -> Spec:
        try:
            return Spec(**json.loads(self.path(Files.SPEC).read_text()))
        except FileNotFoundError:
            raise NotFound(f"no sandbox named {self.name!r}", hint="see `ai ps`") from None

    def save(self, spec: Spec) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path(Files.SPEC + ".tmp")
        tmp.write_text(json.dumps(asdict(spec), indent=2))
        tmp.replace(self.path(Files.SPEC))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One command at a time changes a sandbox."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self.path(Files.LOCK).open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def instances(root: Path | None = None) -> list[Instance]:
    base = root or paths.state_dir()
    if not base.is_dir():
        return []
    return [Instance(p.name, base) for p in sorted(base.iterdir()) if (p / Files.SPEC).is_file() and _NAME.match(p.name)]


HISTORY = "shared-workspaces"  # in the state directory: every directory a sandbox there ever shared


def remember_shared(workspace: Path, root: Path | None = None) -> None:
    """Note a workspace for good (it outlives `ai rm`): a .env the guest planted there stays untrusted."""
    base = root or paths.state_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    ws = workspace.resolve()
    if ws not in shared_history(base):
        with (base / HISTORY).open("a") as f:
            f.write(f"{ws}\n")


def shared_history(root: Path | None = None) -> list[Path]:
    """The directories ever shared by sandboxes of this state directory (see `remember_shared`)."""
    f = (root or paths.state_dir()) / HISTORY
    try:
        return [Path(ln) for ln in f.read_text().splitlines() if ln.startswith("/")]
    except (FileNotFoundError, NotADirectoryError):
        return []
