"""Helper daemons of a sandbox: started with their sockets already bound, tracked by a pid file, stopped for sure.

    d = Daemon("the host agent", inst.path(Files.AGENT_PID), inst.path(Files.AGENT_LOG))
    socks = [listening_socket("tcp", gateway, 11434), listening_socket("udp", gateway, 53)]
    d.start(argv_naming_the_fds, sockets=socks)    # the parent binds: no start-up race, no polling for a port
    d.running()                                     # status is derived from the pid file, never stored
    d.stop()                                        # SIGTERM, then SIGKILL; idempotent; removes the pid file

The pid primitives are those of `vmm.process`; this adds what every helper repeated around them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ai_sandbox import runner
from ai_sandbox.errors import VMError
from ai_sandbox.vmm import process


def listening_socket(kind: str, host: str, port: int, backlog: int = 128) -> socket.socket:
    """A bound socket ("tcp": listening, "udp": bound) to hand to a daemon; the caller closes its copy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        if kind == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if kind == "tcp":
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Daemon:
    """One helper process of a sandbox, known by its pid file."""

    what: str  # for messages: "the host agent"
    pid_file: Path
    log_file: Path
    marker: Path | None = None  # a path in its argv (its config): a reused pid of another program is not it

    def _pid(self) -> int | None:
        pid = process.read_pid(self.pid_file)
        if pid is None or not (process.runs(pid, self.marker) if self.marker else process.alive(pid)):
            return None
        return pid

    def start(self, argv: Sequence[str], *, sockets: Sequence[socket.socket] = (),
              extra_env: Mapping[str, str] | None = None, settle: float = 0.2) -> int:
        """Spawn with `sockets` inherited (they are closed here afterwards); fails if it exits within `settle` s."""
        try:
            proc = runner.spawn(argv, log_file=self.log_file, extra_env=extra_env,
                                pass_fds=[s.fileno() for s in sockets])
        finally:
            for s in sockets:
                s.close()
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is not None:
            process.remove(self.pid_file)
            raise VMError(f"{self.what} exited at start", log=str(self.log_file))
        return proc.pid

    def running(self) -> bool:
        return self._pid() is not None

    def stop(self, timeout: float = 5) -> None:
        pid = self._pid()
        if pid is not None:
            process.kill(pid, timeout=timeout)
        process.remove(self.pid_file)
