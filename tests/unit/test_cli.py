"""The command line as a user meets it: exit codes and one-line errors, without root or VMs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ai_sandbox import doctor

pytestmark = pytest.mark.unit
AI = str(Path(sys.executable).with_name("ai"))


def ai(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("FC_", "AI_"))}
    return subprocess.run([AI, *args], cwd=cwd, env={**base, "AI_SANDBOX_STATE": str(cwd / "state"), **(env or {})},
                          capture_output=True, text=True, timeout=60)


def _one_error(res: subprocess.CompletedProcess[str]) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def test_bad_setting_from_dotenv(tmp_path):
    # The seed's layout: `.env` beside the workspace, not inside it.
    (tmp_path / ".env").write_text("FC_MEM=lots\n")
    (tmp_path / "ws").mkdir()
    res = ai("start", "--detach", "--workspace", "ws", cwd=tmp_path, env={"XDG_CONFIG_HOME": str(tmp_path / "x")})
    assert res.returncode == 2
    assert _one_error(res).startswith(f"error: FC_MEM=lots (from {tmp_path / '.env'})")
    assert not (tmp_path / "state").exists()


def test_a_dotenv_inside_the_workspace_is_not_read_and_named_once(tmp_path):
    # If it were read, FC_VCPU (checked first) would be the error; it is --memory's, and one note says why.
    (tmp_path / ".env").write_text("FC_VCPU=lots\nEGRESS_ALLOW_IP=0.0.0.0/0\n")
    res = ai("start", "--detach", "--memory", "1", cwd=tmp_path, env={"XDG_CONFIG_HOME": str(tmp_path / "x")})
    assert res.returncode == 2
    assert _one_error(res).startswith("error: FC_MEM=1 (from command line)")
    notes = [ln for ln in res.stderr.splitlines() if str(tmp_path / ".env") in ln]
    assert len(notes) == 1 and "config.env" in notes[0] and notes[0].startswith("note:"), res.stderr


def test_in_a_checkout_the_seed_layout_holds_workspace_beside_dotenv(tmp_path):
    # `./ai` run in this project's checkout: the workspace is ./workspace/, so the .env beside it is read.
    (tmp_path / "ai").write_text("#!/bin/sh\n")
    (tmp_path / "src" / "ai_sandbox").mkdir(parents=True)
    (tmp_path / ".env").write_text("FC_MEM=lots\n")
    res = ai("start", "--detach", cwd=tmp_path, env={"XDG_CONFIG_HOME": str(tmp_path / "x")})
    assert res.returncode == 2
    assert _one_error(res).startswith(f"error: FC_MEM=lots (from {tmp_path / '.env'})")
    assert not (tmp_path / "workspace").exists()  # nothing made for a start that failed


def test_secret_value_never_echoed(tmp_path):
    res = ai("start", "--detach", "--cpus", "100000", cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-xyz-secret"})
    assert res.returncode == 2 and "sk-ant-xyz-secret" not in res.stdout + res.stderr
    assert "FC_VCPU=100000 (from command line)" in _one_error(res)


def test_unknown_sandbox_and_recipe(tmp_path):
    res = ai("exec", "--name", "nope", "--", "true", cwd=tmp_path)
    assert res.returncode == 2 and "no sandbox named 'nope'" in _one_error(res)
    res = ai("build", "--image", "no-such-recipe", cwd=tmp_path)
    assert res.returncode == 2 and "unknown recipe" in _one_error(res)


def test_version_and_architecture(tmp_path):
    assert ai("version", cwd=tmp_path).stdout.startswith("ai-sandbox ")
    assert "Firecracker" in ai("architecture", cwd=tmp_path).stdout


def test_doctor_reports_missing_tools(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda cmd: None if cmd == "mmdebstrap" else f"/usr/bin/{cmd}")
    found = {c.name: c for c in doctor.checks()}
    assert not found["mmdebstrap"].ok and found["mmdebstrap"].fix == "apt-get install mmdebstrap"
    assert found["qemu-system-x86_64"].ok


def test_help_lists_the_commands(tmp_path):
    res = ai("help", cwd=tmp_path)
    assert res.returncode == 0
    for command in ("start", "shell", "exec", "ps", "stop", "rm", "logs", "ssh-config", "gh", "build", "doctor"):
        assert f" {command} " in res.stdout, command


def test_doctor_through_the_cli_exits_by_what_is_missing(tmp_path):
    res = ai("doctor", cwd=tmp_path)
    assert "CHECK" in res.stdout and "qemu-system-x86_64" in res.stdout
    missing = [ln for ln in res.stdout.splitlines() if " missing " in ln]
    assert res.returncode == (1 if missing else 0), res.stdout + res.stderr
    # With no tools on PATH every required check is missing: exit 1 and one line saying what to do.
    bare = ai("doctor", cwd=tmp_path, env={"PATH": str(tmp_path / "empty")})
    assert bare.returncode == 1 and "missing" in bare.stdout
    assert "some required pieces are missing" in bare.stderr


def test_start_refuses_to_change_a_sandbox_made_otherwise(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    spec = tmp_path / "state" / "made" / "sandbox.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"name": "made", "workspace": str(ws), "image": "minimal", "vmm": "qemu", "cpus": 1,
                                "memory_mib": 512, "share": "sftp", "network": "nat"}))
    before = spec.read_text()
    res = ai("start", "--name", "made", "--workspace", str(ws), "--network", "open", "--detach", cwd=tmp_path)
    assert res.returncode == 2
    assert "--network nat" in _one_error(res) and "ai rm made" in _one_error(res)
    assert spec.read_text() == before


def test_a_bad_ollama_host_is_one_line_before_anything_is_made(tmp_path):
    (tmp_path / "ws").mkdir()
    res = ai("start", "--detach", "--workspace", "ws", cwd=tmp_path,
             env={"XDG_CONFIG_HOME": str(tmp_path / "x"), "OLLAMA_HOST": "https://ollama.lan"})
    assert res.returncode == 2
    assert "OLLAMA_HOST" in _one_error(res) and "only plain http" in _one_error(res)
    assert not (tmp_path / "state").exists()
