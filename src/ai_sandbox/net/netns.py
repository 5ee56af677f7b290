"""Network namespaces that stand in for the host, a guest and the internet: for the integration and VM tiers.

Nothing the sandbox does at run time uses this. It exists so that tests exercise the real TAPs and nftables
without a single packet touching the real host's namespace:

    [internet]  lo 203.0.113.10, 169.254.169.254 (a metadata service to be refused); wan0 198.51.100.1/24
        │ veth
    [host]      uplink0 198.51.100.2/24, default via 198.51.100.1  ← run net.up / the VMM here
        │ aisb-… TAP (10.213.x.1/30)
        │ a frame pump standing in for the VM (`guest_on_tap`)
    [guest]     eth0 10.213.x.2/30, default via 10.213.x.1

The internet namespace has no route back to the sandbox pool, so a reply arrives only if NAT rewrote the source.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path

from ai_sandbox.runner import Result, run, spawn

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def current_netns() -> int:
    """Inode of the calling thread's network namespace (compare with `Netns.inode`)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Netns:
    """A named network namespace (`ip netns`), the processes started in it, and a folder for their logs."""

    name: str
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, role: str) -> Netns:
        ns = cls(f"aisbt-{role}-{secrets.token_hex(3)}", Path(tempfile.mkdtemp(prefix=f"aisbt-{role}-")))
        run(["ip", "netns", "add", ns.name])
        ns.ip("link", "set", "lo", "up")
        return ns

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv that runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0) -> Result:
        return run(self.argv(argv), check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> Result:
        return run(["ip", "-n", self.name, *args], check=check)

    def spawn(self, argv: Sequence[str], log_name: str) -> subprocess.Popen[bytes]:
        """Start a long-lived process in here (a server, a VMM); it is killed by `delete`. Output: workdir/log_name."""
        proc = spawn(self.argv(argv), log_file=self.workdir / log_name)
        self.procs.append(proc)
        return proc

    def python(self, code: str, *args: str, log_name: str) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-c", code, *args], log_name)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace (children it starts follow), and back afterwards."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            # Refuse to go on unless we really are elsewhere: a silent failure would touch the real host.
            if current_netns() != os.fstat(target).st_ino:
                raise RuntimeError(f"setns into {self.name} did not take effect")
            yield
        finally:
            _setns(home)
            os.close(home)
            os.close(target)

    def delete(self) -> None:
        """Kill what we started in here, remove the namespace and the logs. Idempotent."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        if self.path.exists():
            run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class FakeInternet:
    """The sandbox host's namespace and the internet beyond its only uplink."""

    host: Netns
    internet: Netns
    uplink: str = "uplink0"
    uplink_ip: str = "198.51.100.2"
    router_ip: str = "198.51.100.1"
    internet_ip: str = "203.0.113.10"
    metadata_ip: str = "169.254.169.254"


@contextmanager
def fake_internet() -> Iterator[FakeInternet]:
    """Build the host + internet namespaces; everything is removed afterwards, also on failure."""
    with ExitStack() as stack:
        host = Netns.create("host")
        stack.callback(host.delete)
        inet = Netns.create("inet")
        stack.callback(inet.delete)
        topo = FakeInternet(host, inet)
        host.ip("link", "add", topo.uplink, "type", "veth", "peer", "name", "wan0", "netns", inet.name)
        host.ip("addr", "add", f"{topo.uplink_ip}/24", "dev", topo.uplink)
        host.ip("link", "set", topo.uplink, "up")
        host.ip("route", "add", "default", "via", topo.router_ip)
        inet.ip("addr", "add", f"{topo.router_ip}/24", "dev", "wan0")
        inet.ip("link", "set", "wan0", "up")
        for addr in (topo.internet_ip, topo.metadata_ip):
            inet.ip("addr", "add", f"{addr}/32", "dev", "lo")
        yield topo


# A user-space wire between two TAPs: the host's (opened like a VMM opens it) and a new one in the guest namespace.
_PUMP = r"""
import ctypes, fcntl, os, select, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def enter(ns):
    fd = os.open("/run/netns/" + ns, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        sys.exit("setns failed: " + os.strerror(ctypes.get_errno()))
    os.close(fd)
def attach(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", name.encode(), 0x0002 | 0x1000))  # TUNSETIFF, IFF_TAP|IFF_NO_PI
    return fd
host_ns, tap, guest_ns = sys.argv[1:4]
enter(host_ns); a = attach(tap)
enter(guest_ns); b = attach("eth0")
print("pumping", flush=True)
peer = {a: b, b: a}
while True:
    for fd in select.select([a, b], [], [])[0]:
        frame = os.read(fd, 65536)
        try:
            os.write(peer[fd], frame)
        except OSError:  # the other end not up yet: a dropped frame, as on a real wire
            pass
"""


@contextmanager
def guest_on_tap(
    host: Netns, tap: str, address: IPv4Interface, gateway: str, mac: str | None = None
) -> Iterator[Netns]:
    """A namespace wired to `tap` in `host` as a VM would be: eth0 with `address`, default route via `gateway`."""
    guest = Netns.create("guest")
    try:
        pump = host.python(_PUMP, host.name, tap, guest.name, log_name="pump.log")
        guest.procs.append(pump)  # dies with the guest
        host.procs.remove(pump)
        wait_for(lambda: guest.ip("link", "show", "eth0", check=False).returncode == 0, "the guest's eth0")
        if mac:
            guest.ip("link", "set", "eth0", "address", mac)
        guest.ip("addr", "add", str(address), "dev", "eth0")
        guest.ip("link", "set", "eth0", "up")
        guest.ip("route", "add", "default", "via", gateway)
        yield guest
    finally:
        guest.delete()


_WHOAMI_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    conn, peer = s.accept()
    with conn:
        conn.sendall(peer[0].encode() + b"\n")
"""

_WHOAMI_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as c:
        print(c.recv(64).decode().strip())
except OSError as e:
    sys.exit(f"connect failed: {e}")
"""


def whoami_server(ns: Netns, ip: str, port: int) -> subprocess.Popen[bytes]:
    """A TCP server in `ns` that answers each connection with the source address it saw; killed with `ns`."""
    log_name = f"whoami-{ip}-{port}.log"
    proc = ns.python(_WHOAMI_SERVER, ip, str(port), log_name=log_name)
    log = ns.workdir / log_name
    # A whole line: the log also holds the command line, and with it the code that prints the word.
    wait_for(lambda: proc.poll() is not None or "listening" in log.read_text().splitlines(), f"server {ip}:{port}")
    if proc.poll() is not None:
        raise RuntimeError(f"whoami server on {ip}:{port} exited: {log.read_text()[-500:]}")
    return proc


def whoami(ns: Netns, ip: str, port: int, timeout: float = 2.0) -> str | None:
    """From inside `ns`, connect to a whoami server: the address it saw us as, or None if we could not connect."""
    result = ns.run([sys.executable, "-c", _WHOAMI_CLIENT, ip, str(port), str(timeout)], check=False)
    return (result.stdout.strip() or None) if result.returncode == 0 else None
