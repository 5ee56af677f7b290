"""Credential broker: the guest holds placeholders; requests to a credential's own hosts get the real value.

Replacement happens only on intercepted TLS requests (see server.py), in header values (also inside
`Authorization: Basic` user:password) and in the request target (`?key=` of Gemini). Any other host keeps the
placeholder as it is, so a key cannot be sent anywhere but where it belongs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote

from ai_sandbox.proxy.rules import first_match, ip_literal
from ai_sandbox.runner import Secret

log = logging.getLogger(__name__)

PREFIX = "ai-sandbox-placeholder-"
_PLACEHOLDER = re.compile(re.escape(PREFIX) + r"([A-Za-z_][A-Za-z0-9_]*)")
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

Header = tuple[str, str]


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

    def __init__(self, credentials: Mapping[str, Iterable[str]], secrets: Mapping[str, str]) -> None:
        self._hosts = {var: tuple(hosts) for var, hosts in credentials.items()}
        self._secrets = {var: Secret(v) for var, v in secrets.items() if var in self._hosts}

    def values_for(self, host: str) -> dict[str, Secret]:
        """The credentials (var -> value) that may be sent to `host`; none for IP literals."""
        if ip_literal(host) is not None:
            return {}
        return {v: s for v, s in self._secrets.items() if first_match(self._hosts[v], host)}

    def intercepts(self, host: str) -> bool:
        """Is there any credential to put on requests to `host` (and so a reason to look inside its TLS)?"""
        return bool(self.values_for(host))

    def apply(self, headers: Iterable[Header], target: str, host: str) -> tuple[list[Header], str, list[str]]:
        """Headers and request target with this host's placeholders replaced, and the variables that were used."""
        values = self.values_for(host)
        headers = list(headers)
        if not values:
            return headers, target, []
        used: set[str] = set()
        new_headers = [(name, _in_header(value, values, used)) for name, value in headers]
        new_target = _replace(target, values, used, lambda s: quote(s, safe=""))
        return new_headers, new_target, sorted(used)


def _replace(text: str, values: Mapping[str, str], used: set[str], encode: Callable[[str], str] = str) -> str:
    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        if value is None:
            return m.group(0)
        used.add(m.group(1))
        return encode(str(value))

    return _PLACEHOLDER.sub(one, text) if PREFIX in text else text


def _in_header(value: str, values: Mapping[str, str], used: set[str]) -> str:
    basic = _BASIC.match(value)
    if basic:
        try:
            decoded = base64.b64decode(basic.group(2), validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            decoded = ""
        if PREFIX in decoded:
            replaced = _replace(decoded, values, used)
            if replaced != decoded:
                return basic.group(1) + base64.b64encode(replaced.encode("latin-1", "replace")).decode("ascii")
    return _replace(value, values, used)
