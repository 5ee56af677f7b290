"""Use cases: up (create + start), attach, exec, stop, rm, ps. Subsystems meet here through small dataclasses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from ai_sandbox import config, hostagent_up, net, paths, progress, proxy_up
from ai_sandbox.config import Settings
from ai_sandbox.errors import NotFound, SandboxError, UsageError, VMError
from ai_sandbox.guest import LABEL_CONFIG, LABEL_DATA, LABEL_WORKSPACE
from ai_sandbox.image import pipeline
from ai_sandbox.image.disk import make_ext4
from ai_sandbox.net import policy
from ai_sandbox.session import ssh
from ai_sandbox.share import sharing, virtiofs
from ai_sandbox.state import Files, Instance, Spec, instances, name_for_workspace, remember_shared, shared_history
from ai_sandbox.vmm import drivers, process
from ai_sandbox.vmm.base import DirShare, Disk, MachineSpec, NetDevice, State, Status

BOOT_TIMEOUT = float(os.environ.get("AI_SANDBOX_BOOT_TIMEOUT", "300"))


@dataclass(frozen=True)
class Options:
    name: str | None
    workspace: Path
    settings: Settings
    skip_optional: bool = False
    given: frozenset[str] = frozenset()  # settings named on the command line: only these may change a sandbox


def guest_ids() -> tuple[int, int]:
    """The guest user's uid/gid: the invoking user's (the real one behind sudo); root maps to 1000."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        uid, gid = int(os.environ.get("SUDO_UID", 1000)), int(os.environ.get("SUDO_GID", 1000))
    return uid, gid


SEED_WORKSPACE = "workspace"


def default_workspace(cwd: Path | None = None) -> Path:
    """The workspace a command means when none is named: the current directory, except in a checkout of this
    project, where it is the checkout's `workspace/` as in the seed's layout (so the `.env` beside it, which holds
    the user's keys, stays out of the guest's reach)."""
    here = cwd or Path.cwd()
    if (here / "ai").is_file() and (here / "src" / "ai_sandbox").is_dir():
        return here / SEED_WORKSPACE
    return here


def resolve(name: str | None, workspace: Path | None = None) -> Instance:
    """The named sandbox, or the one of the workspace (default: `default_workspace()`)."""
    if name:
        return Instance(name)
    ws = (workspace or default_workspace()).resolve()
    return Instance(name_for_workspace(ws))


def existing(name: str | None) -> Instance:
    inst = resolve(name)
    if not inst.exists():
        what = f"no sandbox named {name!r}" if name else f"no sandbox for {default_workspace()}"
        raise NotFound(what, hint="see `ai ps`, or start one with `ai start`")
    return inst


def _share_mode(settings: Settings, driver) -> str:
    mode = settings.share
    if mode == "auto":
        return "virtiofs" if driver.capabilities.share_directory else "sftp"
    if mode == "virtiofs" and not driver.capabilities.share_directory:
        raise UsageError(f"--share virtiofs: the {driver.name} VMM cannot share a directory", hint="use sftp or copy")
    return mode


def create(opts: Options) -> tuple[Instance, Spec]:
    """Load the sandbox, or make its spec (nothing is written until it starts well)."""
    ws = opts.workspace.resolve()
    if not ws.is_dir():
        raise UsageError(f"workspace {opts.workspace} is not a directory")
    inst = Instance(opts.name) if opts.name else Instance(name_for_workspace(ws))
    s = opts.settings
    hostagent_up.check(s)  # bad input fails before anything is made or started
    if inst.exists():
        return inst, _reuse(inst.load(), s, opts.given)
    egress_policy(s.network, s)
    driver = drivers.choose(s.vmm)
    uid, gid = guest_ids()
    spec = Spec(name=inst.name, workspace=str(ws), image=s.image, vmm=driver.name, cpus=s.vcpus,
                memory_mib=s.memory_mib, share=_share_mode(s, driver), network=s.network, uid=uid, gid=gid,
                workspace_size_mib=s.workspace_size_mib)
    return inst, spec


_FIXED = {"share": "--share", "network": "--network", "image": "--image", "vmm": "--vmm"}


def _reuse(spec: Spec, s: Settings, given: frozenset[str]) -> Spec:
    """An existing sandbox: --cpus/--memory given now apply from this start on; what it was made with stays."""
    for field, flag in _FIXED.items():
        have, wanted = getattr(spec, field), getattr(s, field)
        if field in given and wanted not in ("auto", have):
            raise UsageError(f"sandbox {spec.name} was made with {flag} {have} and cannot change to {wanted}",
                             hint=f"remove it first (ai rm {spec.name}), then start it again with {flag} {wanted}")
    if "vcpus" in given:
        spec.cpus = s.vcpus
    if "memory_mib" in given:
        spec.memory_mib = s.memory_mib
    return spec


def settings_sources(workspace: Path | None = None) -> config.Sources:
    """The settings files a command may read (`workspace`: the one it is about to share): none inside that
    workspace or any existing sandbox's. AI_SANDBOX_CACHE/STATE/DATA set in them take effect at once."""
    shared = [workspace] if workspace else []
    first = config.find_sources(shared)
    # Existing sandboxes are found in the state directory the trusted files name, and in the one ./.env names.
    trusted = config.Sources(tuple(f for f in first.files if f != Path.cwd() / config.ENV_FILE))
    known: list[Path] = []
    for root in {paths.state_dir(s.path_values()) for s in (first, trusted)}:
        known += shared_history(root)  # removed sandboxes' workspaces too: what the guest planted there stays
        for other in instances(root):
            with contextlib.suppress(SandboxError, ValueError, OSError):
                known.append(Path(other.load().workspace))
    found = config.find_sources([*shared, *known])
    paths.use(found.path_values())
    return found


def egress_policy(mode: str, settings: Settings) -> policy.EgressPolicy:
    return policy.parse(mode, settings.egress_allow_ip, settings.egress_allow_tcp_ports)


# The guest writes the console log at will: any command that looks at the sandbox cuts it back past the limit.
CONSOLE_LIMIT, CONSOLE_KEEP, LOGS_TAIL = 4 << 20, 1 << 20, 256 << 10


def console_tail(inst: Instance) -> str:
    """The last LOGS_TAIL bytes of the guest console, raw (guest text: escape before printing)."""
    process.cap_log(inst.path(Files.CONSOLE), CONSOLE_LIMIT, CONSOLE_KEEP)
    data = process.read_tail(inst.path(Files.CONSOLE), LOGS_TAIL)
    if len(data) == LOGS_TAIL and b"\n" in data:
        data = data.split(b"\n", 1)[1]  # start at a whole line
    return data.decode(errors="replace")


def status(inst: Instance) -> Status:
    spec = inst.load()
    process.cap_log(inst.path(Files.CONSOLE), CONSOLE_LIMIT, CONSOLE_KEEP)
    st = drivers.get(spec.vmm).status(inst.vm_files())
    if st.state is State.RUNNING:
        helper = {"virtiofs": (Files.FS_PID, "virtiofsd"), "sftp": (Files.SHARE_PID, "the sftp share")}.get(spec.share)
        if helper and not process.alive_from(inst.path(helper[0])):
            return Status(State.BROKEN, f"{helper[1]} is gone: the workspace is not shared", st.pid)
        if spec.network == "proxy" and not proxy_up.running(inst):
            return Status(State.BROKEN, "the egress proxy is gone: the guest has no way out", st.pid)
        if hostagent_up.expected(inst) and not hostagent_up.running(inst):
            return Status(State.BROKEN, "the host agent is gone: no DNS and no Ollama for the guest", st.pid)
    return st


def target(inst: Instance, spec: Spec) -> ssh.Target:
    if not spec.subnet:
        raise VMError(f"sandbox {inst.name} has no network yet")
    cfg = net.NetConfig.from_dict(json.loads(spec.extra["net"]))
    return ssh.Target(f"ai-{inst.name}", str(cfg.guest_ip), inst.path(Files.KEY), inst.path(Files.KNOWN_HOSTS))


def _used_subnets(me: str) -> set[IPv4Network]:
    used = set()
    for other in instances():
        if other.name != me:
            with contextlib.suppress(SandboxError, ValueError):
                sp = other.load()
                if sp.subnet:
                    used.add(IPv4Network(sp.subnet))
    return used


def _config_drive(inst: Instance, spec: Spec, cfg: net.NetConfig, user_key: str, host_key: tuple[str, str],
                  settings: Settings) -> Path:
    mounts = []
    if spec.share == "virtiofs":
        mounts.append({"type": "virtiofs", "tag": virtiofs.TAG, "target": "/workspace"})
    elif spec.share == "copy":
        mounts.append({"type": "ext4", "label": LABEL_WORKSPACE, "target": "/workspace"})
    ports = policy.host_ports(egress_policy(spec.network, settings))
    data = {
        "hostname": inst.name,
        "user": {"name": "sandbox", "uid": spec.uid, "gid": spec.gid, "authorized_keys": [user_key]},
        "ssh_host_key": {"private": host_key[0], "public": host_key[1]},
        "network": {"address": f"{cfg.guest_ip}/{cfg.prefix}", "gateway": str(cfg.host_ip), "mac": cfg.mac,
                    "dns": hostagent_up.guest_dns(cfg, ports)},
        "environment": {"AI_SANDBOX": inst.name},
        "mounts": mounts,
    }
    if spec.network == "proxy":
        data["environment"] |= proxy_up.guest_environment(cfg, settings, proxy_up.honeytokens(inst))
        data["ca_certificates"] = [proxy_up.configure(inst, cfg, settings)]
        data["apt_proxy"] = proxy_up.apt_proxy(cfg)
        data["files"] = proxy_up.guest_files(inst, settings)  # decoy credentials the proxy watches for
    data["environment"] |= hostagent_up.guest_environment(cfg, ports, settings, data["environment"])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(data, indent=2))
        Path(tmp, "config.json").chmod(0o600)
        path = make_ext4(inst.path(Files.CONFIG), 8, LABEL_CONFIG, Path(tmp))
    path.chmod(0o600)
    return path


def _prepare(inst: Instance, spec: Spec) -> tuple[str, tuple[str, str]]:
    """Data disk and keys (made once; they survive stop/start)."""
    if not inst.path(Files.DATA).exists():
        make_ext4(inst.path(Files.DATA), spec.data_size_mib, LABEL_DATA)
    user_key = ssh.keygen(inst.path(Files.KEY), f"ai-sandbox {inst.name}")
    host_pub = ssh.keygen(inst.path(Files.HOST_KEY), f"ai-sandbox host {inst.name}")
    return user_key, (inst.path(Files.HOST_KEY).read_text(), host_pub)


def _network(inst: Instance, spec: Spec, settings: Settings) -> net.NetConfig:
    if "net" in spec.extra:
        return net.NetConfig.from_dict(json.loads(spec.extra["net"]))
    cfg = net.plan(inst.name, _used_subnets(inst.name), net.parse_pool(settings.net_pool))
    spec.subnet = str(cfg.subnet)
    spec.extra["net"] = json.dumps(cfg.to_dict())
    return cfg


def start(inst: Instance, spec: Spec, settings: Settings, skip_optional: bool = False) -> ssh.Target:
    """Start the sandbox (build if needed); on failure everything set up so far is torn down."""
    driver = drivers.get(spec.vmm)
    problem = driver.unavailable()
    if problem:
        raise UsageError(f"cannot use {driver.name}: {problem}")
    with inst.locked():
        if driver.status(inst.vm_files()).state is State.RUNNING:
            if spec != inst.load():  # new --cpus/--memory: kept for the next start
                inst.save(spec)
                progress.info(f"sandbox {inst.name} is running: the new --cpus/--memory apply at its next start")
            return target(inst, spec)
        arts = pipeline.build(spec.image, skip_optional=skip_optional).artifacts
        new = not inst.exists()
        with contextlib.ExitStack() as undo:
            if new:
                undo.callback(inst.remove)
            inst.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _stop_parts(inst, spec)  # leftovers of a crash (kill -9) go before we start again
            user_key, host_key = _prepare(inst, spec)
            cfg = _network(inst, spec, settings)
            inst.save(spec)
            remember_shared(Path(spec.workspace), inst.dir.parent)  # kept even if this start fails: it may have run
            t = target(inst, spec)
            ssh.write_known_hosts(t, host_key[1])
            inst.path(Files.SSH_CONFIG).write_text(ssh.render_config(t))
            egress = egress_policy(spec.network, settings)
            with progress.step(f"network ({egress.mode})"):
                uplink = net.up(inst.name, cfg, policy.host_ports(egress), egress=policy.egress_rules(egress),
                                gateway_icmp=policy.gateway_icmp(egress))
            undo.callback(net.down, inst.name)
            agent = hostagent_up.configure(inst, cfg, policy.host_ports(egress), settings)
            if uplink is None:
                progress.info("the host is offline (no IPv4 default route): the guest has no way out"
                              + ("; Ollama on the host still answers" if agent and agent.forwards else ""))
            hostagent_up.start(inst)  # sockets on the gateway, which net.up just made
            undo.callback(hostagent_up.stop, inst)
            if spec.network == "proxy":
                undo.callback(proxy_up.stop, inst)
            shares = ()
            disks = (Disk("base", arts.rootfs, read_only=True), Disk("data", inst.path(Files.DATA)),
                     Disk("config", _config_drive(inst, spec, cfg, user_key, host_key, settings), read_only=True))
            if spec.share == "virtiofs":
                virtiofs.start(Path(spec.workspace), inst.path(Files.FS_SOCK), inst.path(Files.FS_PID),
                               inst.path(Files.FS_LOG), (spec.uid, spec.gid))
                undo.callback(virtiofs.stop, inst.path(Files.FS_SOCK), inst.path(Files.FS_PID))
                shares = (DirShare(virtiofs.TAG, inst.path(Files.FS_SOCK)),)
            elif spec.share == "copy":
                disks += (Disk("workspace", sharing.copy_in(inst, spec)),)
                undo.callback(sharing.copy_discard, inst)
            mspec = MachineSpec(
                name=inst.name, vcpus=spec.cpus, memory_mib=spec.memory_mib, kernel=arts.kernel,
                vmlinux=arts.vmlinux, initrd=arts.initrd, cmdline="panic=-1 quiet loglevel=3",
                files=inst.vm_files(), disks=disks, net=NetDevice(cfg.tap, cfg.mac), shares=shares,
            )
            if spec.network == "proxy":
                proxy_up.start(inst, cfg, settings)  # after the config drive: that wrote its config and CA
            inst.path(Files.CONSOLE).write_text("")
            with progress.step(f"boot ({driver.name})"):
                driver.start(mspec)
                undo.callback(driver.stop, inst.vm_files(), 5)
                pid = driver.status(inst.vm_files()).pid
                asyncio.run(ssh.wait_ready(t, BOOT_TIMEOUT, lambda: pid is not None and process.alive(pid)))
            if spec.share == "sftp":
                with progress.step("workspace (sftp)"):
                    sharing.sftp_start(inst)
                undo.callback(sharing.sftp_stop, inst)
            undo.pop_all()
        net.reconcile(n.name for n in instances() if _is_up(n))
        return t


def _is_up(inst: Instance) -> bool:
    with contextlib.suppress(SandboxError, OSError):
        return drivers.get(inst.load().vmm).status(inst.vm_files()).state is not State.STOPPED
    return False


def _stop_parts(inst: Instance, spec: Spec, timeout: float = 30) -> None:
    """Stop the share, the VM, virtiofsd and the network; copy mode syncs back once the guest is off."""
    sharing.sftp_stop(inst)
    drivers.get(spec.vmm).stop(inst.vm_files(), timeout)
    proxy_up.stop(inst)
    hostagent_up.stop(inst)
    virtiofs.stop(inst.path(Files.FS_SOCK), inst.path(Files.FS_PID))
    try:
        if spec.share == "copy":
            report = sharing.copy_out(inst, spec)
            if report is not None:
                progress.info(f"workspace synced back: {report.summary()}")
                for path, kept in report.conflicts:
                    progress.info(f"conflict: {path} changed on both sides; the guest's version is {kept}")
    finally:  # a failed sync-back (it keeps the guest's image) never leaves the network behind
        net.down(inst.name)


def stop(inst: Instance, timeout: float = 30) -> None:
    spec = inst.load()
    with inst.locked():
        _stop_parts(inst, spec, timeout)
    net.reconcile(n.name for n in instances() if _is_up(n))


def remove(inst: Instance, force: bool = False) -> None:
    if status(inst).state is State.RUNNING and not force:
        raise UsageError(f"sandbox {inst.name} is running", hint="stop it first, or use --force")
    stop(inst, timeout=10 if force else 30)
    inst.remove()


def exec_in(inst: Instance, argv: list[str]) -> int:
    spec = inst.load()
    if status(inst).state is not State.RUNNING:
        raise UsageError(f"sandbox {inst.name} is not running", hint=f"start it: ai start --name {inst.name}")
    return asyncio.run(ssh.exec_command(target(inst, spec), argv))


def attach_argv(inst: Instance) -> list[str]:
    spec = inst.load()
    if status(inst).state is not State.RUNNING:
        raise UsageError(f"sandbox {inst.name} is not running", hint="run ./ai to start it")
    return ssh.attach_argv(inst.path(Files.SSH_CONFIG), target(inst, spec).alias)


@dataclass(frozen=True)
class Row:
    name: str
    status: str
    reason: str
    vmm: str
    workspace: str
    address: str
    alerts: int = 0  # honeytoken alerts (proxy mode)


def ps() -> list[Row]:
    rows = []
    for inst in instances():
        try:
            spec = inst.load()
            st = status(inst)
            addr = json.loads(spec.extra["net"])["guest_ip"] if "net" in spec.extra else ""
            count, paused = proxy_up.alerts(inst) if spec.network == "proxy" else (0, False)
            state, reason = st.state.value, st.reason
            if paused and state == "running":
                state, reason = "paused", "paused by a honeytoken alert (ai policy log shows it)"
            rows.append(Row(inst.name, state, reason, spec.vmm, spec.workspace, addr, count))
        except (SandboxError, OSError, ValueError, KeyError) as e:
            rows.append(Row(inst.name, "broken", str(e), "?", "?", ""))
    return rows
