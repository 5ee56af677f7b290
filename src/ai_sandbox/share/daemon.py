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
from pathlib import Path

import asyncssh

from ai_sandbox.session import ssh
from ai_sandbox.share.sftp import SftpShare

log = logging.getLogger("ai_sandbox.share.daemon")
READY = "ai-sandbox-share: ready"


async def serve(target: ssh.Target, workspace: Path, uid: int, gid: int, stop: asyncio.Event) -> None:
    share = SftpShare(workspace, uid=uid, gid=gid)
    conn: asyncssh.SSHClientConnection | None = None
    announced = False
    try:
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await ssh.connect(target)
                    conn.set_keepalive(interval=10, count_max=3)
                if await share.ensure(conn) or not announced:
                    print(READY if not announced else "ai-sandbox-share: re-mounted", flush=True)
                    announced = True
            except (TimeoutError, OSError, asyncssh.Error) as e:
                print(f"ai-sandbox-share: {type(e).__name__}: {e}; retrying", flush=True)
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

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(target(inst, spec), Path(spec.workspace), spec.uid, spec.gid, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
