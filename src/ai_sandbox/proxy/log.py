"""The proxy's request log: one JSON object per line for every request, allowed or refused (`ai policy log`).

Fields: time (UTC, ISO 8601), sandbox, method, host, port, verdict ("allow" | "deny"), reason, status (the HTTP
status the guest got; 0 when the connection ended before one was sent). Nothing secret is ever logged: entries are
written from what the guest sent, before any credential is put in.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

ALLOW = "allow"
DENY = "deny"


class RequestLog:
    """Appends entries to `path` (0600), flushed at once so `ai policy log` sees them live."""

    def __init__(self, path: Path, sandbox: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fh: BinaryIO = os.fdopen(fd, "ab", buffering=0)
        self.sandbox = sandbox

    def record(self, method: str, host: str, port: int, verdict: str, reason: str, status: int) -> None:
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "sandbox": self.sandbox,
            "method": method[:32],
            "host": host[:255],
            "port": port,
            "verdict": verdict,
            "reason": reason[:200],
            "status": status,
        }
        self._fh.write(json.dumps(entry, ensure_ascii=True).encode() + b"\n")

    def close(self) -> None:
        self._fh.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every entry of a log file, oldest first; a missing file is an empty log, a torn last line is skipped."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    entries: list[dict[str, Any]] = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
