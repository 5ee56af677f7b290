"""The credential broker as pure functions: placeholders, which host gets which key, and the substitution."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_sandbox.proxy.broker import DEFAULT_CREDENTIALS, DEFAULT_FIELDS, PREFIX, Broker, load_secrets, placeholder

pytestmark = pytest.mark.unit

SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-REAL", "OPENAI_API_KEY": "sk-oai-REAL", "GEMINI_API_KEY": "AIza+REAL/=",
           "GITHUB_TOKEN": "ghp_REAL"}  # fmt: skip
B = Broker(DEFAULT_CREDENTIALS, SECRETS)


def P(var: str) -> str:  # noqa: N802
    return placeholder(var)


def test_placeholder_form():
    assert P("ANTHROPIC_API_KEY") == "ai-sandbox-placeholder-ANTHROPIC_API_KEY"
    with pytest.raises(ValueError):
        placeholder("NOT A NAME")


@pytest.mark.parametrize(
    ("host", "vars_"),
    [
        ("api.anthropic.com", {"ANTHROPIC_API_KEY"}),
        ("api.openai.com", {"OPENAI_API_KEY"}),
        ("chatgpt.com", {"OPENAI_API_KEY"}),
        ("generativelanguage.googleapis.com", {"GEMINI_API_KEY"}),  # GOOGLE_API_KEY is not set
        ("github.com", {"GITHUB_TOKEN"}),
        ("raw.githubusercontent.com", {"GITHUB_TOKEN"}),
        ("statsig.anthropic.com", set()),
        ("evil.example", set()),
        ("140.82.112.3", set()),
    ],
)
def test_which_credentials_a_host_gets(host, vars_):
    assert set(B.values_for(host)) == vars_
    assert B.intercepts(host) is bool(vars_)


def test_headers_get_the_real_value_for_their_own_host_only():
    headers = [("x-api-key", P("ANTHROPIC_API_KEY")), ("Authorization", f"Bearer {P('OPENAI_API_KEY')}"),
               ("User-Agent", "claude-cli")]  # fmt: skip
    out, target, used = B.apply(headers, "/v1/messages", "api.anthropic.com")
    assert out == [("x-api-key", "sk-ant-REAL"), ("Authorization", f"Bearer {P('OPENAI_API_KEY')}"),
                   ("User-Agent", "claude-cli")]  # fmt: skip
    assert (target, used) == ("/v1/messages", ["ANTHROPIC_API_KEY"])
    assert B.apply(headers, "/", "evil.example") == (headers, "/", [])


def test_query_key_is_percent_encoded():
    _, target, used = B.apply([], f"/v1beta/models?key={P('GEMINI_API_KEY')}&x=1", "generativelanguage.googleapis.com")
    assert target == "/v1beta/models?key=AIza%2BREAL%2F%3D&x=1"
    assert used == ["GEMINI_API_KEY"]


@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC"])
def test_basic_auth_password_and_user(scheme):
    for userpass, expected in [(f"x-access-token:{P('GITHUB_TOKEN')}", "x-access-token:ghp_REAL"),
                               (f"{P('GITHUB_TOKEN')}:x-oauth-basic", "ghp_REAL:x-oauth-basic")]:  # fmt: skip
        value = f"{scheme} " + base64.b64encode(userpass.encode()).decode()
        (out,), _, used = B.apply([("Authorization", value)], "/", "github.com")
        name, encoded = out[1].split(" ", 1)
        assert name == scheme and base64.b64decode(encoded).decode() == expected
        assert used == ["GITHUB_TOKEN"]


def test_basic_auth_for_another_host_or_without_placeholder_is_untouched():
    value = "Basic " + base64.b64encode(f"u:{P('GITHUB_TOKEN')}".encode()).decode()
    assert B.apply([("Authorization", value)], "/", "api.anthropic.com")[0] == [("Authorization", value)]
    plain = "Basic " + base64.b64encode(b"user:pass").decode()
    assert B.apply([("Authorization", plain)], "/", "github.com")[0] == [("Authorization", plain)]
    broken = [("Authorization", "Basic !!notbase64")]
    assert B.apply(broken, "/", "github.com")[0] == broken


def test_a_longer_variable_name_is_not_mistaken_for_a_shorter_one():
    broker = Broker({"KEY": ["h.example"], "KEY_2": ["other.example"]}, {"KEY": "one", "KEY_2": "two"})
    out, _, _ = broker.apply([("Authorization", f"Bearer {P('KEY_2')}")], "/", "h.example")
    assert out == [("Authorization", f"Bearer {P('KEY_2')}")]
    out, _, _ = broker.apply([("Authorization", f"Bearer {P('KEY')}")], "/", "h.example")
    assert out == [("Authorization", "Bearer one")]


@pytest.mark.parametrize(
    ("headers", "target", "host"),
    [
        # the echo attacks of hole 2: the placeholder anywhere but the credential's own field
        ([("anthropic-beta", P("ANTHROPIC_API_KEY"))], "/v1/messages", "api.anthropic.com"),
        ([("x-api-key", f"{P('ANTHROPIC_API_KEY')}-x")], "/", "api.anthropic.com"),
        ([("Authorization", f"Bearer {P('ANTHROPIC_API_KEY')}")], "/", "api.anthropic.com"),
        ([], f"/v1/{P('ANTHROPIC_API_KEY')}/x", "api.anthropic.com"),
        ([], f"/v1?return_to={P('ANTHROPIC_API_KEY')}", "api.anthropic.com"),
        ([("x-api-key", P("OPENAI_API_KEY"))], "/", "api.openai.com"),
        ([("OpenAI-Organization", P("OPENAI_API_KEY"))], f"/v1/{P('OPENAI_API_KEY')}", "api.openai.com"),
        ([("Authorization", f"Bearer x {P('OPENAI_API_KEY')}")], "/", "api.openai.com"),
        ([], f"/v1beta/models?alt={P('GEMINI_API_KEY')}", "generativelanguage.googleapis.com"),
        ([], f"/v1beta/{P('GEMINI_API_KEY')}?key=1", "generativelanguage.googleapis.com"),
        ([("x-goog-user-project", P("GEMINI_API_KEY"))], "/", "generativelanguage.googleapis.com"),
        ([("X-GitHub-Api-Version", P("GITHUB_TOKEN"))], f"/repos?q={P('GITHUB_TOKEN')}", "api.github.com"),
        ([("Cookie", f"t={P('GITHUB_TOKEN')}")], "/", "github.com"),
    ],
)
def test_the_placeholder_outside_its_own_field_stays_a_placeholder(headers, target, host):
    out, new_target, used = B.apply(headers, target, host)
    assert (out, new_target, used) == (headers, target, [])


def test_each_provider_field_is_substituted():
    cases = [
        ("api.anthropic.com", [("X-Api-Key", P("ANTHROPIC_API_KEY"))], "/", "sk-ant-REAL"),
        ("api.openai.com", [("authorization", f"Bearer {P('OPENAI_API_KEY')}")], "/", "Bearer sk-oai-REAL"),
        ("generativelanguage.googleapis.com", [("x-goog-api-key", P("GEMINI_API_KEY"))], "/", "AIza+REAL/="),
        ("api.github.com", [("Authorization", f"token {P('GITHUB_TOKEN')}")], "/", "token ghp_REAL"),
        ("api.github.com", [("Authorization", f"Bearer {P('GITHUB_TOKEN')}")], "/", "Bearer ghp_REAL"),
    ]
    for host, headers, target, expected in cases:
        out, _, used = B.apply(headers, target, host)
        assert out[0][1] == expected and len(used) == 1, host


_NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(_NAMES, _TEXT, _TEXT, st.sampled_from(sorted(SECRETS)))
def test_no_real_value_outside_its_field(name, before, after, var):
    """Whatever header (but the field) or path position carries the placeholder, no real value comes out."""
    host = DEFAULT_CREDENTIALS[var][0]
    own = {f.split(":", 1)[1] for f in DEFAULT_FIELDS[var] if f.startswith("header:")}
    headers = [(name, before + P(var) + after)] if name not in own else []
    out, target, _ = B.apply(headers, f"/{before}{P(var)}?q={P(var)}{after}", host)
    assert all(SECRETS[var] not in v for _, v in out) and SECRETS[var] not in target


def test_unset_or_unsafe_secrets_are_not_loaded():
    env = {"ANTHROPIC_API_KEY": "ok", "OPENAI_API_KEY": "bad\r\nX-Injected: 1", "GITHUB_TOKEN": "", "OTHER": "x"}
    secrets = load_secrets(DEFAULT_CREDENTIALS, env)
    assert set(secrets) == {"ANTHROPIC_API_KEY"}
    assert repr(secrets["ANTHROPIC_API_KEY"]) == "'***'"
    assert load_secrets({"K": ["h"]}, {"K": PREFIX + "K"}) == {}  # a placeholder as its own value


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_text_without_a_placeholder_is_never_changed(text):
    headers = [("X", text)]
    if PREFIX not in text:
        assert B.apply(headers, "/" + text, "api.anthropic.com")[:2] == (headers, "/" + text)
