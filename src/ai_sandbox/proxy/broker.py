"""Credential broker: the guest holds placeholders; requests to a credential's own hosts get the real value.

Replacement happens only on intercepted TLS requests (see server.py), to the credential's own hosts, and only in its
own field: one header whose whole value is the placeholder (`x-api-key`), `Authorization` as `Bearer`/`token`
PLACEHOLDER or Basic with the placeholder as user or password, or one query parameter (`?key=` of Gemini). A
placeholder anywhere else (the path, another parameter or header) stays as it is: an upstream that echoes what it got
(error messages, redirects) must not hand the real key back. Responses are masked as well (see scrub.py).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

from ai_sandbox.proxy.rules import first_match, ip_literal
from ai_sandbox.runner import Secret

log = logging.getLogger(__name__)

PREFIX = "ai-sandbox-placeholder-"
_BASIC = re.compile(r"^(\s*basic\s+)(\S+)\s*$", re.IGNORECASE)
# A value that could end a header or smuggle a new one is never put on the wire.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")

DEFAULT_CREDENTIALS: dict[str, list[str]] = {
    "ANTHROPIC_API_KEY": ["api.anthropic.com"],
    "OPENAI_API_KEY": ["api.openai.com", "chatgpt.com"],
    "GOOGLE_API_KEY": ["generativelanguage.googleapis.com"],
    "GEMINI_API_KEY": ["generativelanguage.googleapis.com"],
    "GITHUB_TOKEN": ["github.com", "api.github.com", "*.githubusercontent.com"],
}

# Where each credential goes: "header:NAME" or "query:NAME". Variables not listed use DEFAULT_FIELD.
DEFAULT_FIELDS: dict[str, list[str]] = {
    "ANTHROPIC_API_KEY": ["header:x-api-key"],
    "OPENAI_API_KEY": ["header:authorization"],
    "GOOGLE_API_KEY": ["header:x-goog-api-key", "query:key"],
    "GEMINI_API_KEY": ["header:x-goog-api-key", "query:key"],
    "GITHUB_TOKEN": ["header:authorization"],
}
DEFAULT_FIELD = ["header:authorization"]
_FIELD = re.compile(r"(header|query):([A-Za-z0-9_.~-]+)")
_SCHEME = re.compile(r"^(bearer|token)(\s+)(\S+)$", re.IGNORECASE)

Header = tuple[str, str]


def valid_field(spec: str) -> bool:
    return _FIELD.fullmatch(spec) is not None


def placeholder(var: str) -> str:
    """What the guest sees instead of the value of `var`."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
        raise ValueError(f"not an environment variable name: {var!r}")
    return PREFIX + var


def load_secrets(credentials: Mapping[str, Iterable[str]], environ: Mapping[str, str]) -> dict[str, Secret]:
    """The real values of the mapped variables that are set (and safe to put in a header)."""
    out: dict[str, Secret] = {}
    for var in credentials:
        value = environ.get(var, "")
        if not value:
            continue
        if _UNSAFE.search(value) or PREFIX in value:
            log.warning("ignoring %s: its value contains control characters", var)
            continue
        out[var] = Secret(value)
    return out


class Broker:
    """Which credentials belong to a host, and their substitution into a request."""

    def __init__(
        self, credentials: Mapping[str, Iterable[str]], secrets: Mapping[str, str],
        fields: Mapping[str, Iterable[str]] | None = None,
    ) -> None:  # fmt: skip
        self._hosts = {var: tuple(hosts) for var, hosts in credentials.items()}
        self._secrets = {var: Secret(v) for var, v in secrets.items() if var in self._hosts}
        fields = DEFAULT_FIELDS if fields is None else fields
        self._fields: dict[str, tuple[tuple[str, str], ...]] = {}
        for var in self._hosts:
            specs = [_FIELD.fullmatch(f) for f in fields.get(var, DEFAULT_FIELD)]
            self._fields[var] = tuple((m.group(1), m.group(2).lower()) for m in specs if m)

    def secrets(self) -> dict[str, str]:
        """Every real value (var -> value): what responses are masked for."""
        return {var: str(value) for var, value in self._secrets.items()}

    def values_for(self, host: str) -> dict[str, Secret]:
        """The credentials (var -> value) that may be sent to `host`; none for IP literals."""
        if ip_literal(host) is not None:
            return {}
        return {v: s for v, s in self._secrets.items() if first_match(self._hosts[v], host)}

    def intercepts(self, host: str) -> bool:
        """Is there any credential to put on requests to `host` (and so a reason to look inside its TLS)?"""
        return bool(self.values_for(host))

    def apply(self, headers: Iterable[Header], target: str, host: str) -> tuple[list[Header], str, list[str]]:
        """Headers and request target with this host's placeholders replaced in their own fields, and the variables
        that were used."""
        values = self.values_for(host)
        headers = list(headers)
        used: set[str] = set()
        for var, value in values.items():
            for kind, name in self._fields.get(var, ()):
                if kind == "header":
                    headers = [(k, _in_header(k, v, var, str(value), used)) if k.lower() == name else (k, v)
                               for k, v in headers]  # fmt: skip
                else:
                    target = _in_query(target, name, var, str(value), used)
        return headers, target, sorted(used)


def _in_header(name: str, value: str, var: str, secret: str, used: set[str]) -> str:
    mark = PREFIX + var
    if name.lower() != "authorization":
        if value.strip() == mark:
            used.add(var)
            return secret
        return value
    scheme = _SCHEME.match(value.strip())
    if scheme and scheme.group(3) == mark:
        used.add(var)
        return scheme.group(1) + scheme.group(2) + secret
    basic = _BASIC.match(value)
    if basic:
        try:
            decoded = base64.b64decode(basic.group(2), validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            return value
        user, sep, password = decoded.partition(":")
        if sep and mark in (user, password):
            used.add(var)
            user, password = (secret if user == mark else user), (secret if password == mark else password)
            return basic.group(1) + base64.b64encode(f"{user}:{password}".encode("latin-1", "replace")).decode()
    return value


def _in_query(target: str, name: str, var: str, secret: str, used: set[str]) -> str:
    path, sep, query = target.partition("?")
    if not sep or PREFIX not in query:
        return target
    params = query.split("&")
    for i, param in enumerate(params):
        key, eq, raw = param.partition("=")
        if eq and unquote(key).lower() == name and unquote(raw) == PREFIX + var:
            params[i] = f"{key}={quote(secret, safe='')}"
            used.add(var)
    return path + "?" + "&".join(params)
