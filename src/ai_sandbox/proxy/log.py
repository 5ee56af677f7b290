"""The proxy's request log: one JSON object per line for every request, allowed or refused (`ai policy log`).

Fields: time (UTC, ISO 8601), sandbox, method, host, port, verdict ("allow" | "deny" | "alert"), reason, status (the
HTTP status the guest got; 0 when the connection ended before one was sent). Nothing secret is ever logged: entries
are written from what the guest sent, before any credential is put in, and name a honeytoken, never its value.

The guest decides how many entries there are, so the log is capped: past `max_bytes` it moves to `<log>.1`
(replacing the one before) and a new file begins; `read_log` reads both. Alerts (a honeytoken seen) also go to a
small file of their own, which `ai ps` counts.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

ALLOW = "allow"
DENY = "deny"
ALERT = "alert"
MAX_BYTES = 5 * 1024 * 1024
MAX_ALERTS_BYTES = 256 * 1024
MAX_READ = 2 * MAX_BYTES + 65536


def _open(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class RequestLog:
    """Appends entries to `path` (0600), flushed at once so `ai policy log` sees them live."""

    def __init__(self, path: Path, sandbox: str, max_bytes: int = MAX_BYTES, alerts: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.sandbox, self.max_bytes, self.alerts = path, sandbox, max_bytes, alerts
        self._fh = _open(path)
        self._size = os.fstat(self._fh.fileno()).st_size

    def _entry(self, method: str, host: str, port: int, verdict: str, reason: str, status: int) -> dict[str, Any]:
        return {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "sandbox": self.sandbox,
            "method": method[:32],
            "host": host[:255],
            "port": port,
            "verdict": verdict,
            "reason": reason[:200],
            "status": status,
        }

    def record(self, method: str, host: str, port: int, verdict: str, reason: str, status: int) -> None:
        self._write(self._entry(method, host, port, verdict, reason, status))

    def alert(self, method: str, host: str, port: int, reason: str, paused: bool) -> None:
        """A honeytoken was seen: into the request log and the alerts file."""
        entry = self._entry(method, host, port, ALERT, reason, 403)
        self._write(entry)
        if self.alerts is None:
            return
        line = json.dumps(entry | {"paused": paused}, ensure_ascii=True).encode() + b"\n"
        with _open(self.alerts) as fh:
            if os.fstat(fh.fileno()).st_size + len(line) <= MAX_ALERTS_BYTES:
                fh.write(line)

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=True).encode() + b"\n"
        if self._size + len(line) > self.max_bytes and self._size > 0:
            self._fh.close()
            os.replace(self.path, rotated(self.path))
            self._fh = _open(self.path)
            self._size = 0
        self._fh.write(line)
        self._size += len(line)

    def close(self) -> None:
        self._fh.close()


def _lines(path: Path, limit: int) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return []
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            fh.seek(size - limit)
            fh.readline()  # a torn first line
        return fh.read(limit).decode(errors="replace").splitlines()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every entry of a log (its rotated part first), oldest first; missing files are empty, torn lines skipped."""
    entries: list[dict[str, Any]] = []
    for part in (rotated(path), path):
        for line in _lines(part, MAX_READ):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries
