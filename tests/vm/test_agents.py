"""Issue: every agent works through the broker out of the box. Each CLI of the default image answers a one-shot
prompt from a fake provider in the test's fake internet, reached through the sandbox's real proxy and broker: the
answer is printed in the guest, the provider saw the real key in its own credential field, and the guest holds
only placeholders. The sandbox is `default_box` (conftest.py), shared with test_default_image.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import fake_providers as fp
import pytest

PLACEHOLDER = "ai-sandbox-placeholder-"


def _header(req: dict, name: str) -> str | None:
    return next((v for k, v in req["headers"].items() if k.lower() == name.lower()), None)


def _gemini_key(req: dict) -> str | None:
    return _header(req, "x-goog-api-key") or (parse_qs(urlsplit(req["path"]).query).get("key") or [None])[0]


@dataclass(frozen=True)
class Agent:
    command: str  # run in /workspace, as the sandbox user, in a login shell
    host: str  # the provider it must reach
    path: str  # a fragment of the provider endpoint the answer comes from
    credential: Callable[[dict], str | None]  # the key as the provider reads it from a request
    var: str


AGENTS = {
    "claude": Agent("claude -p 'Reply with the magic word.'", "api.anthropic.com", "/v1/messages",
                    lambda r: _header(r, "x-api-key"), "ANTHROPIC_API_KEY"),
    # Outside a git repository codex exec asks for the flag whatever the trust setting says.
    "codex": Agent("codex exec --skip-git-repo-check 'Reply with the magic word.' </dev/null", "api.openai.com",
                   "/responses",
                   lambda r: (_header(r, "authorization") or "").removeprefix("Bearer ") or None, "OPENAI_API_KEY"),
    "gemini": Agent("gemini -p 'Reply with the magic word.'", "generativelanguage.googleapis.com", "GenerateContent",
                    _gemini_key, "GEMINI_API_KEY"),
    "opencode": Agent("opencode run -m anthropic/claude-sonnet-4-5 'Reply with the magic word.'", "api.anthropic.com",
                      "/v1/messages", lambda r: _header(r, "x-api-key"), "ANTHROPIC_API_KEY"),
}


def sh(box, cmd: str, timeout: float = 600):
    return box.ai("exec", "--name", box.name, "--", "bash", "-lc", "cd /workspace && " + cmd, check=False,
                  timeout=timeout)


@pytest.mark.parametrize("name", list(AGENTS))
def test_agent_answers_through_the_broker_with_the_real_key(default_box, name):
    agent = AGENTS[name]
    before = len(fp.requests(default_box.provider_log))
    res = sh(default_box, agent.command)
    got = fp.requests(default_box.provider_log)[before:]
    seen = [r for r in got if (_header(r, "host") or "").split(":")[0] == agent.host and agent.path in r["path"]]
    assert res.returncode == 0 and fp.ANSWER in res.stdout, (
        f"exit {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}\n"
        f"requests: {[(_header(r, 'host'), r['method'], r['path']) for r in got]}")
    assert seen, "the answer did not come from the provider endpoint"
    assert {agent.credential(r) for r in seen} == {fp.REAL[agent.var]}
    # The proxy's experimental-agent warning is not shown to the user.
    assert "UNDICI-EHPA" not in res.stdout + res.stderr


def test_guest_holds_only_placeholders(default_box):
    env = sh(default_box, "echo $ANTHROPIC_API_KEY $OPENAI_API_KEY $GEMINI_API_KEY; cat ~/.codex/auth.json").stdout
    for var in fp.REAL:
        assert f"{PLACEHOLDER}{var}" in env
    # The marker is assembled in the shell so that the command line itself does not contain it.
    found = sh(default_box, 'P=REAL; P="${P}KEY"; sudo grep -rl -a -e "$P" /proc/[0-9]*/environ /etc /home /root /run '
                            '/tmp /workspace 2>/dev/null | grep -v "^/proc/self/"; env | grep -c "$P"', timeout=300)
    assert found.stdout.strip() == "0", found.stdout
