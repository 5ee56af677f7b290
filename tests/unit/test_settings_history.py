"""A `.env` the guest planted in its workspace stays unread after the sandbox is gone (`ai rm`)."""

from __future__ import annotations

import pytest

from ai_sandbox import sandbox, state

pytestmark = pytest.mark.unit


def test_a_former_workspace_keeps_its_dotenv_unread(tmp_path, monkeypatch):
    st, proj = tmp_path / "state", tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / ".env").write_text("EGRESS_ALLOW_IP=192.0.2.0/24\nAI_IMAGE=evil\n")
    monkeypatch.setenv("AI_SANDBOX_STATE", str(st))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.chdir(proj)
    # Never shared: the seed's layout, `ai start --workspace sub` from beside it reads ./.env.
    assert sandbox.settings_sources(proj / "sub").files == (proj / ".env",)
    state.remember_shared(proj, st)  # a sandbox once shared proj (then `ai rm`: no instance is left)
    assert state.instances(st) == []
    found = sandbox.settings_sources(proj / "sub")
    assert found.files == () and found.ignored == (proj / ".env",)
    assert "not reading" in (found.notice() or "")


def test_the_history_is_written_once_per_directory(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    for _ in range(3):
        state.remember_shared(ws, tmp_path / "st")
    assert state.shared_history(tmp_path / "st") == [ws.resolve()]
    assert state.shared_history(tmp_path / "nowhere") == []
