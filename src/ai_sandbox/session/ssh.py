"""SSH to the guest: keys made on the host, the guest's host key pinned (no trust on first use, no passwords).

SSH options live in one list, rendered as an ssh_config file (used by `ssh -F`, and by IDEs through
`ai ssh-config`) and as asyncssh arguments for programmatic exec.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ai_sandbox import runner
from ai_sandbox.errors import VMError
from ai_sandbox.guest import USER


@dataclass(frozen=True)
class Target:
    alias: str  # host name in ssh_config and in known_hosts (HostKeyAlias): independent of the address
    address: str
    key: Path
    known_hosts: Path
    user: str = USER
    port: int = 22


def keygen(path: Path, comment: str) -> str:
    """An ed25519 key pair at `path` (+ .pub); returns the public key line."""
    if not path.exists():
        runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


def options(t: Target) -> list[tuple[str, str]]:
    return [
        ("HostName", t.address),
        ("Port", str(t.port)),
        ("User", t.user),
        ("IdentityFile", str(t.key)),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", str(t.known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("HostKeyAlias", t.alias),
        ("StrictHostKeyChecking", "yes"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("ConnectTimeout", "10"),
        ("ServerAliveInterval", "30"),
        ("LogLevel", "ERROR"),
        ("SendEnv", "LANG LC_* COLORTERM"),
    ]


def render_config(t: Target) -> str:
    return f"Host {t.alias}\n" + "".join(f"  {k} {v}\n" for k, v in options(t))


def write_known_hosts(t: Target, host_public_key: str) -> None:
    kind, b64 = host_public_key.split()[:2]
    t.known_hosts.write_text(f"{t.alias} {kind} {b64}\n")


def attach_argv(config: Path, alias: str, command: str | None = None) -> list[str]:
    """The system ssh client with a real PTY, landing in /workspace."""
    remote = command or "cd /workspace 2>/dev/null || cd; exec \"${SHELL:-/bin/bash}\" -l"
    return ["ssh", "-F", str(config), "-t", alias, remote]


# asyncssh would read the user's ~/.ssh (config, X.509 trust) for every connection: the guest is ours alone, and
# after a privilege drop that directory may not even be readable.
NO_USER_FILES = {"config": [], "x509_trusted_certs": None, "x509_trusted_cert_paths": None}


def _connect_kwargs(t: Target, timeout: float) -> dict:
    return {
        **NO_USER_FILES,
        "host": t.address,
        "port": t.port,
        "username": t.user,
        "client_keys": [str(t.key)],
        "known_hosts": asyncssh.import_known_hosts(t.known_hosts.read_text().replace(t.alias, t.address, 1)),
        "agent_path": None,
        "password": None,
        "connect_timeout": timeout,
    }


# A TCG guest on a busy host can take many seconds for the key exchange; boot polling uses short tries.
CONNECT_TIMEOUT = float(os.environ.get("AI_SANDBOX_SSH_TIMEOUT", "60"))


async def connect(t: Target, timeout: float = CONNECT_TIMEOUT) -> asyncssh.SSHClientConnection:
    """An SSH connection to the guest; failures become one VMError line (the host key stays pinned)."""
    try:
        return await asyncssh.connect(**_connect_kwargs(t, timeout))
    except asyncssh.HostKeyNotVerifiable as e:
        raise VMError(f"guest host key does not match the pinned key: {e}") from e
    except (TimeoutError, OSError, asyncssh.Error) as e:
        raise VMError(f"cannot reach {t.alias} over SSH at {t.address}: {str(e) or type(e).__name__}",
                      hint="see `ai ps` and `ai logs`") from e


async def wait_ready(t: Target, timeout: float, alive=lambda: True) -> float:
    """Wait until sshd answers with the pinned host key and accepts our key; returns seconds waited."""
    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < timeout:
        if not alive():
            raise VMError("the VM stopped while booting")
        try:
            async with await asyncssh.connect(**_connect_kwargs(t, 10)) as conn:
                await conn.run("true", check=True, timeout=10)
                return time.monotonic() - t0
        except asyncssh.HostKeyNotVerifiable as e:
            raise VMError(f"guest host key does not match the pinned key: {e}") from e
        except (TimeoutError, OSError, asyncssh.Error) as e:
            last = str(e) or type(e).__name__
        await asyncio.sleep(0.5)
    raise VMError(f"SSH did not answer within {timeout:.0f}s ({last})")


def remote_command(argv: list[str], cwd: str = "/workspace") -> str:
    return f"cd {shlex.quote(cwd)} 2>/dev/null || cd; exec {shlex.join(argv)}"


def _streamable(f) -> bool:
    """Pipes, sockets and files can feed the remote stdin; a terminal or /dev/null gives it nothing."""
    try:
        mode = os.fstat(f.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


async def exec_command(t: Target, argv: list[str]) -> int:
    """Run argv in the guest; stdin, stdout, stderr and the exit status are the command's."""
    async with await connect(t) as conn:
        stdin = sys.stdin.buffer if _streamable(sys.stdin) else asyncssh.DEVNULL
        proc = await conn.create_process(remote_command(argv), stdin=stdin, stdout=sys.stdout.buffer,
                                         stderr=sys.stderr.buffer, encoding=None)
        await proc.wait_closed()
        status = proc.exit_status
        if status is None:
            return 128 + 9 if proc.exit_signal else 255
        return status


async def run_capture(t: Target, command: str, timeout: float = 60) -> asyncssh.SSHCompletedProcess:
    async with await connect(t) as conn:
        return await conn.run(command, check=False, timeout=timeout)
