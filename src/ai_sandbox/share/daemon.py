"""The sftp share's host side for a running sandbox: `python -m ai_sandbox.share.daemon INSTANCE_DIR`.

It holds an SSH connection to the guest, serves the workspace to the guest's sshfs (reverse sshfs), and
re-mounts after the connection drops. SIGTERM unmounts in the guest and exits. `ready` appears in the log
once the workspace is mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh

from ai_sandbox.errors import SandboxError
from ai_sandbox.session import ssh
from ai_sandbox.share import owner
from ai_sandbox.share.sftp import SftpShare

log = logging.getLogger("ai_sandbox.share.daemon")
READY = "ai-sandbox-share: ready"


Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]


def preloaded(t: ssh.Target) -> Connect:
    """Connect to the guest with key and known host read now: after `owner.drop_to` the instance directory (root's,
    0700) is no longer readable, and reconnects must still work."""
    key = asyncssh.read_private_key(str(t.key))
    known = asyncssh.import_known_hosts(t.known_hosts.read_text().replace(t.alias, t.address, 1))
    return lambda: asyncssh.connect(host=t.address, port=t.port, username=t.user, client_keys=[key],
                                    known_hosts=known, agent_path=None, password=None, connect_timeout=5,
                                    **ssh.NO_USER_FILES)


async def serve(connect: Connect, workspace: Path, uid: int, gid: int, stop: asyncio.Event) -> None:
    share = SftpShare(workspace, uid=uid, gid=gid)
    conn: asyncssh.SSHClientConnection | None = None
    announced = False
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await connect()
                    conn.set_keepalive(interval=10, count_max=3)
                if await share.ensure(conn) or not announced:
                    print(READY if not announced else "ai-sandbox-share: re-mounted", flush=True)
                    announced = True
            except (TimeoutError, OSError, asyncssh.Error, SandboxError) as e:
                # A failed mount in the guest (sshfs exits: the guest can make it fail) is retried, not fatal;
                # its words are the guest's: one line, printable characters only.
                said = "".join(c if c.isprintable() else "?" for c in str(e))[:500]
                print(f"ai-sandbox-share: {type(e).__name__}: {said}; retrying", flush=True)
                conn = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 2)
    finally:
        with contextlib.suppress(Exception):
            await share.stop()
        if conn is not None:
            conn.close()


def main(argv: list[str]) -> int:
    from ai_sandbox.sandbox import target
    from ai_sandbox.state import Instance

    inst_dir = Path(argv[0])
    inst = Instance(inst_dir.name, inst_dir.parent)
    spec = inst.load()

    workspace = Path(spec.workspace)
    connect = preloaded(target(inst, spec))
    # The SFTP server creates files as this process: as root (sudo ./ai) it must be the workspace's user first.
    owner.drop_to(owner.files_owner(workspace, (spec.uid, spec.gid)))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(connect, workspace, spec.uid, spec.gid, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
