"""Settings, instance state, QEMU argv and ssh_config: the pure parts of the sandbox lifecycle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ai_sandbox import config, paths, runner, state
from ai_sandbox.errors import UsageError
from ai_sandbox.session import ssh
from ai_sandbox.vmm import qemu
from ai_sandbox.vmm.base import DirShare, Disk, MachineSpec, NetDevice, VMFiles

pytestmark = pytest.mark.unit


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ("FC_VCPU", "FC_MEM", "FC_WORKSPACE_SIZE", *config.SECRET_NAMES, "AI_VMM", "AI_IMAGE", "AI_NETWORK",
              "EGRESS_ALLOW_IP", "EGRESS_ALLOW_TCP_PORTS", "AI_SANDBOX_NET_POOL", *paths.PATH_VARS):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _beside(root: Path) -> config.Sources:
    """The seed's layout: `root` holds `.env`, the workspace is root/workspace."""
    (root / "workspace").mkdir(exist_ok=True)
    return config.find_sources([root / "workspace"], cwd=root)


def test_seed_names_and_precedence(clean_env, monkeypatch):
    (clean_env / ".env").write_text("FC_VCPU=1\nFC_MEM=512\nANTHROPIC_API_KEY=sk-ant-from-dotenv\n")
    s = config.load(sources=_beside(clean_env))
    assert (s.vcpus, s.memory_mib) == (1, 512)
    assert s.secrets()["ANTHROPIC_API_KEY"] == "sk-ant-from-dotenv"
    monkeypatch.setenv("FC_MEM", "768")
    assert config.load(sources=_beside(clean_env)).memory_mib == 768  # environment beats .env
    assert config.load({"memory_mib": 640}, _beside(clean_env)).memory_mib == 640  # flags beat the environment


def test_user_config_file_is_read_and_the_env_beside_the_workspace_beats_it(clean_env):
    user = paths.config_file()
    assert user == clean_env / "xdg" / "ai-sandbox" / "config.env"
    user.parent.mkdir(parents=True)
    user.write_text("FC_MEM=600\nFC_WORKSPACE_SIZE=64\n")
    assert config.load(sources=config.find_sources([clean_env / "elsewhere"])).memory_mib == 600
    (clean_env / ".env").write_text("FC_MEM=520\n")
    s = config.load(sources=_beside(clean_env))
    assert (s.memory_mib, s.workspace_size_mib) == (520, 64)


HOSTILE = "EGRESS_ALLOW_IP=0.0.0.0/0\nEGRESS_ALLOW_TCP_PORTS=1-65535\nAI_IMAGE=/workspace/evil.toml\nAI_NETWORK=nat\n" \
          "AI_VMM=qemu\nAI_SANDBOX_STATE=/tmp/elsewhere\nFC_MEM=lots\n"


def test_a_env_inside_the_workspace_is_never_read_and_named_once(clean_env):
    ws = clean_env / "proj"
    (ws / "sub").mkdir(parents=True)
    (ws / ".env").write_text(HOSTILE)
    (ws / "sub" / ".env").write_text(HOSTILE)
    for cwd in (ws, ws / "sub"):  # the workspace itself, or a directory inside it
        src = config.find_sources([ws], cwd=cwd)
        assert src.files == ()
        s = config.load(sources=src)  # the hostile values would not even validate
        assert (s.network, s.image, s.vmm, s.egress_allow_ip, s.state_dir) == ("proxy", "default", "auto", "", "")
        line = src.notice()
        assert line and "\n" not in line and str(ws / ".env") in line and str(paths.config_file()) in line
    assert config.find_sources([ws], cwd=clean_env).ignored == (ws / ".env",)  # named even from outside
    # Default of `load`: the current directory is the shared workspace.
    os.chdir(ws)
    assert config.load().network == "proxy"


def test_links_into_the_workspace_and_a_config_dir_inside_it_are_not_read(clean_env, monkeypatch):
    ws = clean_env / "proj"
    ws.mkdir()
    (ws / "planted").write_text(HOSTILE)
    (clean_env / ".env").symlink_to(ws / "planted")  # ./.env beside the workspace, but pointing into it
    assert config.find_sources([ws], cwd=clean_env).files == ()
    (clean_env / ".env").unlink()
    # A workspace that holds the user's config dir (e.g. one sharing $HOME): the guest could write that file too.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(ws / ".config"))
    paths.config_file().parent.mkdir(parents=True)
    paths.config_file().write_text(HOSTILE)
    src = config.find_sources([ws], cwd=clean_env)
    assert src.files == () and src.ignored == (paths.config_file(),)


def test_path_settings_come_from_the_same_files(clean_env, monkeypatch):
    (clean_env / ".env").write_text(f"AI_SANDBOX_STATE={clean_env}/st\nAI_SANDBOX_CACHE={clean_env}/ca\n"
                                    "AI_SANDBOX_NET_POOL=172.30.0.0/16\n")
    src = _beside(clean_env)
    assert config.load(sources=src).net_pool == "172.30.0.0/16"
    assert paths.state_dir(src.path_values()) == clean_env / "st"
    monkeypatch.setattr(os, "environ", os.environ.copy())  # `use` writes os.environ: keep other tests clean
    monkeypatch.setenv("AI_SANDBOX_CACHE", str(clean_env / "env-cache"))
    paths.use(src.path_values())  # exported for helper processes, the environment still wins
    assert (paths.state_dir(), paths.cache_dir()) == (clean_env / "st", clean_env / "env-cache")


def test_bad_value_names_variable_and_origin(clean_env, monkeypatch):
    (clean_env / ".env").write_text("FC_MEM=lots\n")
    with pytest.raises(UsageError) as e:
        config.load(sources=_beside(clean_env))
    assert e.value.exit_code == 2
    assert e.value.line().startswith(f"FC_MEM=lots (from {clean_env / '.env'})")
    monkeypatch.setenv("FC_VCPU", str((os.cpu_count() or 1) + 1))
    (clean_env / ".env").write_text("")
    with pytest.raises(UsageError, match=r"FC_VCPU=\d+ \(from environment\): .*the host has"):
        config.load(sources=_beside(clean_env))


def test_secrets_never_shown(clean_env, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value")
    s = config.load()
    assert "sk-very-secret-value" not in repr(s) and "sk-very-secret-value" not in str(s)
    assert runner.render(["curl", "-H", runner.Secret("sk-very-secret-value")]) == "curl -H '***'"


def test_names_and_state_files(tmp_path):
    with pytest.raises(UsageError):
        state.check_name("Bad Name!")
    n = state.name_for_workspace(Path("/home/me/My Project"))
    assert n.startswith("my-project-") and state.check_name(n)
    assert n != state.name_for_workspace(Path("/other/My Project"))
    inst = state.Instance("abc", tmp_path)
    assert not inst.exists()
    inst.save(state.Spec("abc", "/w", "minimal", "qemu", 1, 512))
    assert inst.exists() and inst.load().image == "minimal"
    assert [i.name for i in state.instances(tmp_path)] == ["abc"]
    # Unix socket paths must stay under 108 bytes even for the longest name.
    long = state.Instance("x" * 24, Path("/root/.local/state/ai-sandbox"))
    assert len(str(long.vm_files().api_socket)) < 108


def _spec(tmp_path, shares=()):
    files = VMFiles(*(tmp_path / n for n in ("pid", "api.sock", "console.log", "vmm.log", "v.sock")))
    return MachineSpec("sb", 2, 1024, tmp_path / "vmlinuz", tmp_path / "vmlinux", tmp_path / "initrd", "quiet", files,
                       disks=(Disk("base", tmp_path / "base.ext4", True), Disk("data", tmp_path / "data.ext4")),
                       net=NetDevice("aisb-0123456789", "02:00:00:00:00:01"), shares=shares)


def test_qemu_argv_microvm_tcg(tmp_path):
    argv = qemu.argv(_spec(tmp_path), "tcg")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-M microvm,acpi=on" in joined and "-accel tcg" in joined and "-cpu max" in joined
    assert f"file={tmp_path}/base.ext4,format=raw,if=none,cache=none,aio=threads,readonly=on" in joined
    assert "virtio-net-device,netdev=n0,mac=02:00:00:00:00:01" in joined
    assert "tap,id=n0,ifname=aisb-0123456789,script=no,downscript=no" in joined
    assert f"unix:{tmp_path}/api.sock,server=on,wait=off" in joined
    assert "tsc_early_khz=" in argv[argv.index("-append") + 1]
    assert "memory-backend" not in joined


def test_qemu_argv_virtiofs_needs_shared_memory(tmp_path):
    argv = qemu.argv(_spec(tmp_path, (DirShare("workspace", tmp_path / "fs.sock"),)), "kvm")
    joined = " ".join(argv)
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in joined
    assert "vhost-user-fs-device,chardev=fs0,tag=workspace" in joined
    assert "-cpu host" in joined and "tsc_early_khz" not in joined


def test_ssh_config_pins_host_key(tmp_path):
    t = ssh.Target("ai-sb", "10.213.0.2", tmp_path / "id", tmp_path / "known_hosts")
    text = ssh.render_config(t)
    assert "StrictHostKeyChecking yes" in text and "HostKeyAlias ai-sb" in text
    assert "PasswordAuthentication no" in text and f"UserKnownHostsFile {tmp_path}/known_hosts" in text
    ssh.write_known_hosts(t, "ssh-ed25519 AAAAC3Nza comment")
    assert (tmp_path / "known_hosts").read_text() == "ai-sb ssh-ed25519 AAAAC3Nza\n"
    assert ssh.remote_command(["echo", "a b"]) == "cd /workspace 2>/dev/null || cd; exec echo 'a b'"
