"""Workspace mode `sftp`: the confined SFTP server, the guest command line and the reverse-sshfs wiring.

Everything talks over loopback: a real asyncssh SSH server on 127.0.0.1 stands in for the guest's sshd. Escape
attempts run twice, once over the ordinary SFTP subsystem and once through `SftpShare`'s reverse path, where a
fake guest "sshfs" is an asyncssh SFTP client on the remote process's stdin/stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from ai_sandbox.errors import CommandError, SandboxError
from ai_sandbox.share import sftp as share_sftp
from ai_sandbox.share.sftp import (
    MOUNTS_COMMAND,
    SftpShare,
    guest_command,
    is_mounted,
    make_sftp_handler,
    sshfs_argv,
    unmount_argv,
)
from ai_sandbox.share.sftp_server import ConfinedSFTPServer, confined_factory

SFTP_TIMEOUT = 20.0


# -- a workspace with an outside world next to it ------------------------------------------------------------


@dataclass
class Tree:
    base: Path
    ws: Path
    outside: Path


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "sub").mkdir(parents=True)
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("TOP SECRET\n")
    os.chmod(outside / "secret.txt", 0o600)
    (ws / "hello.txt").write_text("hello\n")
    (ws / "sub" / "inner.txt").write_text("inner\n")
    (ws / "ok_link").symlink_to("hello.txt")
    (ws / "link_out_file").symlink_to("../outside/secret.txt")
    (ws / "link_out_dir").symlink_to(outside)  # absolute target
    (ws / "link_out_etc").symlink_to("/etc/hostname")
    (ws / "dangling_out").symlink_to("../outside/created-through-link")
    (ws / "sub" / "deep_link").symlink_to("../../outside")
    (ws / "loop_a").symlink_to("loop_b")
    (ws / "loop_b").symlink_to("loop_a")
    return Tree(tmp_path, ws, outside)


def snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Everything observable about a tree, symlinks not followed."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if skip is not None and path == skip:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                detail = None
            found[str(path.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, detail)
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
    return found


# -- loopback SSH -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def ssh_pair(**server_options: object) -> AsyncIterator[asyncssh.SSHClientConnection]:
    """A real asyncssh server on 127.0.0.1 and a key-authenticated client connection to it as `sandbox`."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], authorized_client_keys=authorized, **server_options
    )
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            server.get_port(),
            username="sandbox",
            client_keys=[client_key],
            known_hosts=([host_key.convert_to_public()], [], []),
            config=None,
            agent_path=None,
        ) as conn:
            yield conn
    finally:
        server.close()
        await server.wait_closed()


class FakeGuest:
    """The guest side of reverse sshfs: answers our probe and mount checks; its "sshfs" is an SFTP client."""

    HELP = b"usage: sshfs ...\n    -o no_contain_symlinks  allow all symlink targets\n"

    def __init__(self, *, fail: tuple[int, bytes] | None = None, never_mounted: bool = False) -> None:
        self.commands: list[str] = []
        self.clients: asyncio.Queue[asyncssh.SFTPClient] = asyncio.Queue()
        self.mounted = False
        self.sshfs: asyncssh.SSHServerProcess | None = None
        self._fail = fail
        self._never_mounted = never_mounted

    async def __call__(self, process: asyncssh.SSHServerProcess) -> None:
        command = process.command or ""
        self.commands.append(command)
        if command.endswith(" -h"):
            process.stdout.write(self.HELP)
        elif command == MOUNTS_COMMAND:
            if self.mounted:
                process.stdout.write(b":/ /workspace fuse.sshfs rw,nosuid,nodev,user_id=1000 0 0\n")
        elif " exec " in command:
            await self._sshfs(process)
            return
        else:  # the unmount at stop
            self.mounted = False
        process.exit(0)

    async def _sshfs(self, process: asyncssh.SSHServerProcess) -> None:
        if self._fail is not None:
            process.stderr.write(self._fail[1])
            process.exit(self._fail[0])
            return
        conn = process.channel.get_connection()
        loop = asyncio.get_running_loop()
        # Test-only use of asyncssh internals: an SFTP client on a server-side process's streams.
        client = await asyncssh.sftp.start_sftp_client(
            conn, loop, "strict", process.stdin, process.stdout, "utf-8", "strict", 3
        )
        client._handler._nonstandard_symlink = True  # speak like sshfs (OpenSSH argument order)
        self.sshfs = process
        self.mounted = not self._never_mounted
        await self.clients.put(client)
        with contextlib.suppress(Exception):
            await client.wait_closed()
        self.mounted = False
        if not process.channel.is_closing():
            process.exit(0)

    def kill_sshfs(self) -> None:
        """What the host sees when the guest's sshfs dies."""
        assert self.sshfs is not None
        self.mounted = False
        self.sshfs.exit(1)


@contextlib.asynccontextmanager
async def subsystem_client(ws: Path) -> AsyncIterator[asyncssh.SFTPClient]:
    async with ssh_pair(sftp_factory=confined_factory(ws)) as conn:
        async with conn.start_sftp_client() as client:
            yield client


@contextlib.asynccontextmanager
async def reverse_client(ws: Path) -> AsyncIterator[asyncssh.SFTPClient]:
    guest = FakeGuest()
    async with ssh_pair(process_factory=guest, encoding=None) as conn:
        share = SftpShare(ws)
        await share.start(conn)
        try:
            yield await asyncio.wait_for(guest.clients.get(), SFTP_TIMEOUT)
        finally:
            await share.stop()


CLIENTS = {"subsystem": subsystem_client, "reverse": reverse_client}


def with_client(mode: str, ws: Path, body: Callable[[asyncssh.SFTPClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with CLIENTS[mode](ws) as client:
            await asyncio.wait_for(body(client), SFTP_TIMEOUT)

    asyncio.run(main())


# -- files round-trip ---------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_files_round_trip_both_ways(mode: str, tree: Tree) -> None:
    (tree.ws / "from_host.bin").write_bytes(bytes(range(256)) * 300)

    async def body(sftp: asyncssh.SFTPClient) -> None:
        async with sftp.open("from_host.bin", "rb") as fh:
            assert await fh.read() == bytes(range(256)) * 300
        await sftp.mkdir("new")
        async with sftp.open("new/from_guest.txt", "wb") as fh:
            await fh.write(b"written in the guest\n")
        await sftp.rename("new/from_guest.txt", "new/renamed.txt")
        async with sftp.open("sub/inner.txt", "wb") as fh:
            await fh.write(b"over")
        await sftp.posix_rename("sub/inner.txt", "hello.txt")
        assert sorted(await sftp.listdir("new")) == [".", "..", "renamed.txt"]
        assert await sftp.realpath("sub/../new/./renamed.txt") == "/new/renamed.txt"

    with_client(mode, tree.ws, body)
    assert (tree.ws / "new" / "renamed.txt").read_bytes() == b"written in the guest\n"
    assert (tree.ws / "new" / "renamed.txt").stat().st_uid == os.getuid()  # the host user running the server
    assert (tree.ws / "hello.txt").read_bytes() == b"over"
    assert not (tree.ws / "sub" / "inner.txt").exists()


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_links_inside_the_workspace_work(mode: str, tree: Tree) -> None:
    async def body(sftp: asyncssh.SFTPClient) -> None:
        async with sftp.open("ok_link", "rb") as fh:
            assert await fh.read() == b"hello\n"
        await sftp.symlink("../hello.txt", "sub/up_link")  # `..` that stays inside is fine (node_modules/.bin)
        assert await sftp.readlink("sub/up_link") == "../hello.txt"  # raw target, as the guest kernel needs
        async with sftp.open("sub/up_link", "rb") as fh:
            assert await fh.read() == b"hello\n"
        await sftp.link("hello.txt", "sub/hard.txt")
        assert (await sftp.lstat("link_out_file")).type == asyncssh.FILEXFER_TYPE_SYMLINK  # the link itself

    with_client(mode, tree.ws, body)
    assert os.readlink(tree.ws / "sub" / "up_link") == "../hello.txt"
    assert (tree.ws / "sub" / "hard.txt").stat().st_ino == (tree.ws / "hello.txt").stat().st_ino


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_ownership_and_setid_bits_are_not_taken_from_the_guest(mode: str, tree: Tree) -> None:
    async def body(sftp: asyncssh.SFTPClient) -> None:
        await sftp.setstat("hello.txt", asyncssh.SFTPAttrs(uid=12345, gid=12345, permissions=0o6755))
        await sftp.mkdir("d", asyncssh.SFTPAttrs(permissions=0o2775))

    with_client(mode, tree.ws, body)
    st = (tree.ws / "hello.txt").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_IMODE(st.st_mode) == 0o755
    assert not (tree.ws / "d").stat().st_mode & stat.S_ISGID


# -- escape attempts: each must fail, and nothing outside the root may change ----------------------------------

Escape = Callable[[asyncssh.SFTPClient, Tree], Awaitable[object]]
ESCAPES: dict[str, Escape] = {}
CHANGES_WS: set[str] = set()  # attempts whose legitimate first steps change the workspace


def escape(name: str, *, changes_ws: bool = False) -> Callable[[Escape], Escape]:
    def register(fn: Escape) -> Escape:
        ESCAPES[name] = fn
        if changes_ws:
            CHANGES_WS.add(name)
        return fn

    return register


async def read(sftp: asyncssh.SFTPClient, path: str) -> bytes:
    async with sftp.open(path, "rb") as fh:
        return await fh.read()


async def write(sftp: asyncssh.SFTPClient, path: str, mode: str = "wb") -> None:
    async with sftp.open(path, mode) as fh:
        await fh.write(b"pwned\n")


escape("read ../ traversal")(lambda s, t: read(s, "../outside/secret.txt"))
escape("read deep /../../ traversal")(lambda s, t: read(s, "/../../../outside/secret.txt"))
escape("read sub/../../ traversal")(lambda s, t: read(s, "sub/../../outside/secret.txt"))
escape("read host absolute path")(lambda s, t: read(s, str(t.outside / "secret.txt")))
escape("read /etc/passwd")(lambda s, t: read(s, "/etc/passwd"))
escape("read through file symlink out")(lambda s, t: read(s, "link_out_file"))
escape("read through absolute symlink out")(lambda s, t: read(s, "link_out_etc"))
escape("read through dir symlink out")(lambda s, t: read(s, "link_out_dir/secret.txt"))
escape("read through nested dir symlink out")(lambda s, t: read(s, "sub/deep_link/secret.txt"))
escape("write through file symlink out")(lambda s, t: write(s, "link_out_file"))
escape("append through file symlink out")(lambda s, t: write(s, "link_out_file", "ab"))
escape("create through dir symlink out")(lambda s, t: write(s, "link_out_dir/new.txt"))
escape("create through dangling symlink out")(lambda s, t: write(s, "dangling_out"))
escape("write ../ traversal creates nothing above root")(lambda s, t: write(s, "../outside/new.txt"))
escape("stat through symlink out")(lambda s, t: s.stat("link_out_file"))
escape("statvfs through symlink out")(lambda s, t: s.statvfs("link_out_dir"))
escape("setstat through symlink out")(lambda s, t: s.chmod("link_out_file", 0o777))
escape("truncate through symlink out")(lambda s, t: s.truncate("link_out_dir/secret.txt", 0))
escape("utime through symlink out")(lambda s, t: s.utime("link_out_dir/secret.txt", (0, 0)))
escape("lsetstat on a symlink out")(
    lambda s, t: s.setstat("link_out_file", asyncssh.SFTPAttrs(permissions=0o777), follow_symlinks=False)
)
escape("opendir through symlink out")(lambda s, t: s.listdir("link_out_dir"))
escape("realpath through symlink out")(lambda s, t: s.realpath("link_out_dir/secret.txt"))
escape("symlink with absolute target")(lambda s, t: s.symlink("/etc/passwd", "abs_link"))
escape("symlink with host absolute target")(lambda s, t: s.symlink(str(t.outside / "secret.txt"), "abs_link2"))
escape("symlink with escaping relative target")(lambda s, t: s.symlink("../outside/secret.txt", "rel_link"))
escape("symlink with escaping target from sub")(lambda s, t: s.symlink("../../outside", "sub/rel_link"))
escape("symlink target through a symlink out")(lambda s, t: s.symlink("link_out_dir/secret.txt", "via_link"))
escape("symlink created in a dir symlinked out")(lambda s, t: s.symlink("x", "link_out_dir/evil"))
escape("hardlink of an outside file by ../")(lambda s, t: s.link("../outside/secret.txt", "hl"))
escape("hardlink of an outside file via symlinked dir")(lambda s, t: s.link("link_out_dir/secret.txt", "hl"))
escape("hardlink into a dir symlinked out")(lambda s, t: s.link("hello.txt", "link_out_dir/hl"))
escape("rename from inside to outside")(lambda s, t: s.rename("hello.txt", "link_out_dir/stolen.txt"))
escape("rename from inside to ../")(lambda s, t: s.rename("hello.txt", "../outside/stolen.txt"))
escape("rename from outside to inside")(lambda s, t: s.rename("link_out_dir/secret.txt", "got.txt"))
escape("posix_rename over an outside file")(lambda s, t: s.posix_rename("hello.txt", "link_out_dir/secret.txt"))
escape("posix_rename from outside to inside")(lambda s, t: s.posix_rename("sub/deep_link/secret.txt", "got.txt"))
escape("remove through symlinked dir")(lambda s, t: s.remove("link_out_dir/secret.txt"))
escape("mkdir through symlinked dir")(lambda s, t: s.mkdir("link_out_dir/newdir"))
escape("rmdir through symlinked dir")(lambda s, t: s.rmdir("link_out_dir/dir"))
escape("rmdir the root")(lambda s, t: s.rmdir("/"))
escape("rename the root")(lambda s, t: s.rename("/", "moved"))
escape("rename over the root")(lambda s, t: s.posix_rename("sub", "/.."))
escape("NUL byte in a path")(lambda s, t: read(s, "hello.txt\0../../outside/secret.txt"))
escape("symlink loop")(lambda s, t: read(s, "loop_a"))


@escape("symlink moved until it would escape", changes_ws=True)
async def _moved_symlink(sftp: asyncssh.SFTPClient, t: Tree) -> object:
    await sftp.makedirs("a/b")
    await sftp.symlink("../../hello.txt", "a/b/l")  # inside where it is made ...
    return await sftp.rename("a/b/l", "l")  # ... but would point outside from the root


@escape("symlink hard-linked to where it would escape", changes_ws=True)
async def _linked_symlink(sftp: asyncssh.SFTPClient, t: Tree) -> object:
    await sftp.makedirs("a/b")
    await sftp.symlink("../../hello.txt", "a/b/l")
    return await sftp.link("a/b/l", "l")


@escape("directory moved until a link inside escapes, then followed", changes_ws=True)
async def _moved_dir(sftp: asyncssh.SFTPClient, t: Tree) -> object:
    await sftp.makedirs("a/b")
    await sftp.symlink("../../hello.txt", "a/b/l")
    await sftp.rename("a/b", "b")  # b/l now means ../../hello.txt from b/: outside, and must not be followed
    return await read(sftp, "b/l")


@escape("link aimed out later by swapping a directory on its way for a link", changes_ws=True)
async def _reaimed_link(sftp: asyncssh.SFTPClient, t: Tree) -> object:
    await sftp.makedirs("d/up")
    await sftp.symlink("up/../outside/secret.txt", "d/l")  # means d/outside/secret.txt while d/up is a directory
    await sftp.rmdir("d/up")
    await sftp.symlink("..", "d/up")  # now d/l means ../outside/secret.txt: beside the workspace, for host tools
    return await sftp.readlink("d/l")  # had the link been made, this succeeds and the attempt counts as done


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
@pytest.mark.parametrize("name", ESCAPES)
def test_escape_attempt_fails_and_changes_nothing_outside(mode: str, name: str, tree: Tree) -> None:
    outside_before = snapshot(tree.base, skip=tree.ws)
    ws_before = snapshot(tree.ws)

    async def body(sftp: asyncssh.SFTPClient) -> None:
        with pytest.raises(asyncssh.SFTPError):
            await ESCAPES[name](sftp, tree)

    with_client(mode, tree.ws, body)
    assert snapshot(tree.base, skip=tree.ws) == outside_before
    if name not in CHANGES_WS:
        assert snapshot(tree.ws) == ws_before


@pytest.mark.unit
def test_there_are_at_least_twenty_distinct_escape_attempts() -> None:
    assert len(ESCAPES) >= 20


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_dotdot_at_the_root_stays_at_the_root(mode: str, tree: Tree) -> None:
    async def body(sftp: asyncssh.SFTPClient) -> None:
        for path in ("..", "/..", "/../..", "sub/../../.."):
            assert await sftp.realpath(path) == "/"
        root_names = sorted(await sftp.listdir("/"))
        assert sorted(await sftp.listdir("/..")) == root_names
        assert "outside" not in root_names and "ws" not in root_names
        assert (await sftp.stat("/..")).size == (await sftp.stat("/")).size

    with_client(mode, tree.ws, body)


@pytest.mark.unit
def test_server_refuses_a_missing_or_slash_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ConfinedSFTPServer(None, tmp_path / "missing")
    with pytest.raises(ValueError):
        ConfinedSFTPServer(None, "/")


@pytest.mark.unit
def test_server_maps_paths_inside_its_root(tree: Tree) -> None:
    server = ConfinedSFTPServer(None, tree.ws)
    root = os.fsencode(os.path.realpath(tree.ws))
    assert server.map_path(b"/../../x") == root + b"/x"
    assert server.map_path(b"ok_link") == root + b"/hello.txt"
    assert server.reverse_map_path(root) == b"/"
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        server.map_path(b"link_out_file")
    with pytest.raises(asyncssh.SFTPPermissionDenied):
        server.reverse_map_path(os.path.dirname(root))


# -- the guest command line (pure) ------------------------------------------------------------------------------


@pytest.mark.unit
def test_sshfs_argv_defaults() -> None:
    assert sshfs_argv() == ["sshfs", "-o", "slave,idmap=user,dcache_timeout=1", ":/", "/workspace"]


@pytest.mark.unit
def test_sshfs_argv_with_all_options() -> None:
    argv = sshfs_argv("/w", uid=1000, gid=1001, allow_other=True, relative_symlinks=True, sshfs="/usr/bin/sshfs")
    assert argv == [
        "/usr/bin/sshfs",
        "-o",
        "slave,idmap=user,uid=1000,gid=1001,dcache_timeout=1,allow_other,no_contain_symlinks",
        ":/",
        "/w",
    ]


@pytest.mark.unit
def test_guest_command_clears_a_stale_mount_then_execs_sshfs() -> None:
    command = guest_command(sshfs_argv("/work space"), "/work space")
    assert command == (
        "fusermount3 -u -z '/work space' 2>/dev/null || fusermount -u -z '/work space' 2>/dev/null; "
        "exec sshfs -o slave,idmap=user,dcache_timeout=1 :/ '/work space'"
    )
    assert unmount_argv() == ["fusermount3", "-u", "-z", "/workspace"]


@pytest.mark.unit
def test_is_mounted_reads_proc_mounts() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        ":/ /workspace fuse.sshfs rw,nosuid,nodev,relatime,user_id=1000,group_id=1000 0 0\n"
        ":/ /my\\040ws fuse.sshfs rw 0 0\n"
        "tmpfs /other tmpfs rw 0 0\n"
    )
    assert is_mounted(mounts, "/workspace")
    assert is_mounted(mounts, "/my ws")
    assert not is_mounted(mounts, "/other")
    assert not is_mounted("", "/workspace")


# -- the reverse wiring ---------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_private_asyncssh_api_we_rely_on_is_unchanged() -> None:
    """If this fails, asyncssh changed the internals `make_sftp_handler` uses: adapt that one function."""
    from asyncssh.sftp import SFTPServerHandler

    params = list(inspect.signature(SFTPServerHandler.__init__).parameters)
    assert params == ["self", "server", "reader", "writer", "sftp_version"]
    assert "_nonstandard_symlink" in inspect.getsource(SFTPServerHandler._process_symlink)
    assert inspect.iscoroutinefunction(SFTPServerHandler.run)


@pytest.mark.unit
def test_make_sftp_handler_uses_the_openssh_symlink_order() -> None:
    class Stream:
        logger = asyncssh.logging.logger

    handler = make_sftp_handler(ConfinedSFTPServer.__new__(ConfinedSFTPServer), Stream(), Stream())
    assert handler._nonstandard_symlink is True


@pytest.mark.unit
def test_share_runs_the_guest_command_and_sshfs_symlink_order_lands_right(tree: Tree) -> None:
    async def main() -> None:
        guest = FakeGuest()
        async with ssh_pair(process_factory=guest, encoding=None) as conn:
            share = SftpShare(tree.ws, uid=1000, gid=1000)
            await share.start(conn)
            assert share.active
            sftp = await guest.clients.get()
            await sftp.symlink("hello.txt", "sshfs_link")  # sent in OpenSSH order, like sshfs does
            await share.stop()
            await share.stop()  # idempotent
            assert not share.active
        expected = guest_command(sshfs_argv(uid=1000, gid=1000, relative_symlinks=True))
        assert guest.commands[:3] == ["sshfs -h", expected, MOUNTS_COMMAND]
        assert guest.commands[-1].startswith("fusermount3 -u -z /workspace")  # the unmount at stop

    asyncio.run(main())
    assert os.readlink(tree.ws / "sshfs_link") == "hello.txt"


@pytest.mark.unit
def test_ensure_remounts_after_sshfs_died_or_a_new_connection(tree: Tree) -> None:
    async def main() -> None:
        guest = FakeGuest()
        share = SftpShare(tree.ws)
        async with ssh_pair(process_factory=guest, encoding=None) as conn:
            await share.start(conn)
            first = await guest.clients.get()
            assert await share.ensure(conn) is False  # healthy: nothing to do
            guest.kill_sshfs()
            with contextlib.suppress(Exception):
                await first.wait_closed()
            await _until(lambda: not share.active)
            assert await share.ensure(conn) is True
            second = await guest.clients.get()
            assert await read(second, "hello.txt") == b"hello\n"
        assert not share.active  # the connection went away
        async with ssh_pair(process_factory=guest, encoding=None) as conn2:
            assert await share.ensure(conn2) is True
            third = await guest.clients.get()
            assert await read(third, "hello.txt") == b"hello\n"
            await share.stop()

    asyncio.run(main())


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.unit
def test_start_reports_a_missing_sshfs(tree: Tree) -> None:
    async def main() -> None:
        guest = FakeGuest(fail=(127, b"sh: 1: exec: sshfs: not found\n"))
        async with ssh_pair(process_factory=guest, encoding=None) as conn:
            share = SftpShare(tree.ws)
            with pytest.raises(CommandError, match="sshfs is not installed in the guest"):
                await share.start(conn)
            assert not share.active

    asyncio.run(main())


@pytest.mark.unit
def test_start_reports_the_last_sshfs_error_line(tree: Tree) -> None:
    async def main() -> None:
        guest = FakeGuest(fail=(1, b"fuse: device not found, try 'modprobe fuse' first\n"))
        async with ssh_pair(process_factory=guest, encoding=None) as conn:
            with pytest.raises(CommandError, match="modprobe fuse"):
                await SftpShare(tree.ws).start(conn)

    asyncio.run(main())


@pytest.mark.unit
def test_start_gives_up_when_the_mount_never_appears(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(share_sftp, "_POLL_SECONDS", 0.01)

    async def main() -> None:
        guest = FakeGuest(never_mounted=True)
        async with ssh_pair(process_factory=guest, encoding=None) as conn:
            share = SftpShare(tree.ws, mount_timeout=0.3)
            with pytest.raises(SandboxError, match="did not appear"):
                await share.start(conn)
            assert not share.active

    asyncio.run(main())


@pytest.mark.unit
def test_start_refuses_a_missing_workspace(tmp_path: Path) -> None:
    async def main() -> None:
        async with ssh_pair(process_factory=FakeGuest(), encoding=None) as conn:
            with pytest.raises(SandboxError, match="not a directory"):
                await SftpShare(tmp_path / "nope").start(conn)

    asyncio.run(main())


# -- the real sshfs, in slave mode, on this machine -----------------------------------------------------------------


class LocalGuest:
    """A "guest" that runs each command with /bin/sh on this machine (so the real sshfs and FUSE are used)."""

    async def __call__(self, process: asyncssh.SSHServerProcess) -> None:
        child = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            process.command or "true",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await process.redirect(stdin=child.stdin, stdout=child.stdout, stderr=child.stderr)
        code = await child.wait()
        await asyncio.sleep(0.05)  # let the last output through the redirect
        process.exit(code)
        await process.wait_closed()  # runs asyncssh's redirect clean-up


def _real_sshfs_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount FUSE here"
    if not (shutil.which("sshfs") and shutil.which("fusermount3") and os.path.exists("/dev/fuse")):
        return "needs sshfs, fusermount3 and /dev/fuse"
    return None


@pytest.mark.integration
@pytest.mark.skipif(_real_sshfs_missing() is not None, reason=str(_real_sshfs_missing()))
def test_real_sshfs_in_slave_mode_mounts_the_confined_workspace(tree: Tree, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    outside_before = snapshot(tree.outside)

    def in_the_mount() -> None:
        assert (mnt / "hello.txt").read_text() == "hello\n"
        (mnt / "sub" / "from_guest.txt").write_text("guest\n")
        os.symlink("../hello.txt", mnt / "sub" / "rel")  # `..` inside: allowed (no_contain_symlinks probed)
        assert (mnt / "sub" / "rel").read_text() == "hello\n"
        # Symlinks are followed by the guest kernel, never by the server, so only creation reaches our checks here.
        with pytest.raises(PermissionError):
            os.symlink("../outside/secret.txt", mnt / "evil")
        with pytest.raises(PermissionError):
            os.symlink("/etc/passwd", mnt / "abs")
        os.chmod(mnt / "sub" / "from_guest.txt", 0o4755)

    async def main() -> None:
        async with ssh_pair(process_factory=LocalGuest(), encoding=None) as conn:
            share = SftpShare(tree.ws, mountpoint=str(mnt))
            await share.start(conn)
            try:
                await asyncio.to_thread(in_the_mount)
            finally:
                await share.stop()
            assert not is_mounted(Path("/proc/self/mounts").read_text(), str(mnt))

    asyncio.run(main())
    assert (tree.ws / "sub" / "from_guest.txt").read_text() == "guest\n"
    assert os.readlink(tree.ws / "sub" / "rel") == "../hello.txt"  # sshfs's SYMLINK argument order understood
    assert stat.S_IMODE((tree.ws / "sub" / "from_guest.txt").stat().st_mode) == 0o755
    assert snapshot(tree.outside) == outside_before


# -- links the guest could leave pointing out (issue 9, hole 7): the server never follows one --------------------


def _links_pointing_out(ws: Path) -> list[str]:
    """Relative symlinks under `ws` that the guest made and that resolve outside it (host-made ones excluded)."""
    host_made = {"link_out_file", "link_out_dir", "link_out_etc", "dangling_out", "sub/deep_link"}
    bad = []
    for path in ws.rglob("*"):
        rel = str(path.relative_to(ws))
        if path.is_symlink() and rel not in host_made:
            if not os.path.normpath(path.parent / os.readlink(path)).startswith(str(ws) + os.sep):
                bad.append(rel)
    return bad


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_directory_move_that_would_aim_a_link_inside_out_is_refused(mode: str, tree: Tree) -> None:
    async def body(sftp: asyncssh.SFTPClient) -> None:
        await sftp.makedirs("a/b/c")
        await sftp.symlink("../../hello.txt", "a/b/l")  # a/b/l -> hello.txt at the root: fine where it is
        await sftp.symlink("../../../hello.txt", "a/b/c/deep")
        for move in (sftp.rename, sftp.posix_rename):
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await move("a/b", "b")  # b/l would mean ../../hello.txt from b/: outside the workspace
        await sftp.rename("a/b", "a/b2")  # same depth: every link keeps pointing inside, so this is allowed
        assert await read(sftp, "a/b2/l") == b"hello\n"

    with_client(mode, tree.ws, body)
    assert _links_pointing_out(tree.ws) == []
    assert (tree.ws / "a/b2/c/deep").is_symlink() and not (tree.ws / "b").exists()


@pytest.mark.unit
@pytest.mark.parametrize("mode", CLIENTS)
def test_a_link_pointing_out_is_used_only_as_a_link(mode: str, tree: Tree) -> None:
    """A link aiming out (made on the host here, the worst case) through every path the guest has: each either
    acts on the link itself or is refused; the file it names outside is never read, changed or moved."""
    secret = tree.outside / "secret.txt"
    before = snapshot(tree.base, skip=tree.ws)

    async def body(sftp: asyncssh.SFTPClient) -> None:
        assert (await sftp.lstat("link_out_file")).type == asyncssh.FILEXFER_TYPE_SYMLINK
        for i, attempt in enumerate((
            lambda: read(sftp, "link_out_file"),
            lambda: write(sftp, "link_out_file", "r+b"),
            lambda: sftp.stat("link_out_file"),
            lambda: sftp.chmod("link_out_file", 0o666),
            lambda: sftp.utime("link_out_file", (1, 1)),
            lambda: sftp.rename("sub/deep_link", "moved"),  # a link out stays refused wherever it goes
            lambda: sftp.link("sub/deep_link", "hard"),
            lambda: sftp.rename("link_out_file", "renamed_link"),  # a link out is never moved, even beside itself
        )):
            with pytest.raises(asyncssh.SFTPError):
                await attempt()
                pytest.fail(f"attempt {i} succeeded")
        await sftp.remove("link_out_file")  # removes the link only

    with_client(mode, tree.ws, body)
    assert not os.path.lexists(tree.ws / "link_out_file") and not os.path.lexists(tree.ws / "moved")
    assert not os.path.lexists(tree.ws / "renamed_link") and not os.path.lexists(tree.ws / "hard")
    assert secret.read_text() == "TOP SECRET\n"
    assert snapshot(tree.base, skip=tree.ws) == before


@pytest.mark.unit
def test_share_daemon_survives_a_mount_the_guest_made_fail(monkeypatch, tmp_path, capsys) -> None:
    from ai_sandbox.errors import CommandError
    from ai_sandbox.share import daemon

    class Conn:
        def is_closed(self) -> bool:
            return False

        def set_keepalive(self, **kw: object) -> None:
            pass

        def close(self) -> None:
            pass

    class Share:
        calls = 0

        def __init__(self, *a: object, **kw: object) -> None:
            pass

        async def ensure(self, conn: object) -> bool:
            Share.calls += 1
            if Share.calls == 1:
                raise CommandError(["sshfs"], 1, "fuse: \x1b[31mbad mount\x1b[0m", "sshfs failed")
            stop.set()
            return True

        async def stop(self) -> None:
            pass

    async def connect() -> Conn:
        return Conn()

    monkeypatch.setattr(daemon, "SftpShare", Share)
    stop = asyncio.Event()
    asyncio.run(daemon.serve(connect, tmp_path, 0, 0, stop))
    out = capsys.readouterr().out
    assert "retrying" in out and daemon.READY in out and "\x1b" not in out
