"""Debian mirrors for image builds, derived from the host's own apt configuration (never written in the code).

`AI_SANDBOX_MIRROR` overrides it (one URI, e.g. a local mirror; tests point it at a dead port).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ai_sandbox.errors import UsageError

APT_DIR = Path("/etc/apt")


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str  # as the host names it, e.g. "bookworm-security"
    components: tuple[str, ...]


def _deb822(text: str) -> list[Source]:
    out: list[Source] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        comps = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            out.extend(Source(uri, s, comps) for s in fields.get("suites", "").split())
    return out


def _one_line(text: str) -> list[Source]:
    out: list[Source] = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            out.append(Source(words[1], words[2], tuple(words[3:])))
    return out


def host_sources(apt_dir: Path = APT_DIR) -> list[Source]:
    """Every enabled `deb` source of the host."""
    found: list[Source] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        found += _one_line(main.read_text())
    d = apt_dir / "sources.list.d"
    for f in sorted(d.glob("*.list")) if d.is_dir() else []:
        found += _one_line(f.read_text())
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        found += _deb822(f.read_text())
    return found


_DEBIAN_SUITES = {"buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable"}


def sources_for(suite: str, components: list[str], apt_dir: Path = APT_DIR) -> list[str]:
    """One-line apt sources for `suite`, mapped from the host's Debian sources (suite-updates, -security too)."""
    override = os.environ.get("AI_SANDBOX_MIRROR")
    comps = " ".join(components)
    if override:
        return [f"deb {override} {suite} {comps}"]
    lines: list[str] = []
    for src in host_sources(apt_dir):
        base, _, pocket = src.suite.partition("-")
        if base not in _DEBIAN_SUITES or "main" not in src.components:
            continue
        line = f"deb {src.uri} {suite}{'-' + pocket if pocket else ''} {comps}"
        if line not in lines:
            lines.append(line)
    if not any(f" {suite} " in ln for ln in lines):
        raise UsageError(
            "no Debian mirror found in the host's apt configuration",
            hint="set AI_SANDBOX_MIRROR to a Debian mirror URI",
        )
    return lines
