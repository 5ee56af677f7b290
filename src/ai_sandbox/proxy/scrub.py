"""Finding secrets in bytes that pass the proxy, whole or streamed: the real keys on the way back to the guest
(masked), the sandbox's honeytokens on the way out (a hit stops the request).

A secret is looked for in the forms a server or a client would write it in: raw, URL-encoded (upper and lower case
hex, `+` for space), every byte percent-encoded, hex, JSON-escaped (also every character as `\\uXXXX`), and
base64 / base64url at each of the three byte alignments. The base64 forms are the characters that depend on the
secret alone, so they are found inside any larger encoding, such as `Authorization: Basic base64(user:key)`
whatever the user name is.

Masking (the real keys, in what comes back) replaces these forms exactly. Watching (honeytokens, in what goes out)
also normalises first: percent-decoded up to twice and case-folded, so `%2541KIA…` or `akia…` are found too. It is
a tripwire, not a guarantee: a token split in two, encrypted or compressed passes unseen.

Streams keep back the end of each piece that could be the start of a form (at most `longest form - 1` bytes) until
the next piece arrives, so a form split across chunk boundaries is still found while anything else passes at once
(an interactive stream is not delayed); masking keeps every length (Content-Length, chunk sizes stay true).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, unquote_to_bytes

MIN_CORE = 8  # shorter base64 cores of a short secret would match by chance
DECODE_ROUNDS = 2  # a honeytoken is also found percent-encoded once or twice more than its forms


class Hit(Exception):
    """A watched secret was found; `name` says which (never the value)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"found {name}")
        self.name = name
        self.answered = False  # a response had been sent already when it was found


def _base64_cores(raw: bytes) -> set[bytes]:
    cores: set[bytes] = set()
    for offset in range(3):
        enc = base64.b64encode(b"\0" * offset + raw)
        core = enc[(8 * offset + 5) // 6 : (8 * (offset + len(raw))) // 6]
        if len(core) >= MIN_CORE:
            cores |= {core, core.translate(bytes.maketrans(b"+/", b"-_"))}
    return cores


def forms(secret: str) -> set[bytes]:
    """Every form of `secret` that is looked for."""
    raw = secret.encode()
    quoted = quote(secret, safe="")
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quoted)
    found = {raw, quoted.encode(), lower_hex.encode(), quote_plus(secret).encode()}
    escaped = json.dumps(secret)[1:-1]
    found |= {escaped.encode(), escaped.replace("/", "\\/").encode()}
    hexed = binascii.hexlify(raw)
    every = b"".join(b"%%%02x" % b for b in raw)
    found |= {hexed, hexed.upper(), every, every.upper()}
    if secret.isascii():
        unicode = b"".join(b"\\u%04x" % b for b in raw)
        found |= {unicode, unicode.upper().replace(b"\\U", b"\\u")}
    return {f for f in found | _base64_cores(raw) if f}


class Scanner:
    """One compiled search for the forms of several named secrets."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self._names: dict[bytes, str] = {}
        for name, value in secrets.items():
            for form in forms(value):
                self._names.setdefault(form, name)
        # The longest of overlapping forms first. One bytes.replace / `in` per form runs at memory speed, several
        # times faster than one regex alternation over all forms.
        self._ordered = sorted(self._names, key=len, reverse=True)
        self._masks = [b"*" * len(f) for f in self._ordered]
        ordered = self._ordered
        self.longest = len(ordered[0]) if ordered else 0
        self._folded: dict[bytes, str] = {}
        for form in ordered:
            self._folded.setdefault(form.lower(), self._names[form])
        self.window = self.longest * 5  # the longest form percent-encoded twice: each byte became %25XX
        self._prefixes: list[set[bytes]] = [set() for _ in range(self.longest)]  # [k]: every form's first k bytes
        for form in ordered:
            for k in range(1, len(form)):
                self._prefixes[k].add(form[:k])

    def held(self, buf: bytes) -> int:
        """How many bytes at the end of `buf` could begin a form that continues in the next piece."""
        for k in range(min(self.longest - 1, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes[k]:
                return k
        return 0

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def find(self, data: bytes) -> str | None:
        """The name of a secret found in `data`, or None."""
        for form in self._ordered:
            if form in data:
                return self._names[form]
        return None

    def mask(self, data: bytes) -> bytes:
        for form, stars in zip(self._ordered, self._masks, strict=True):
            if form in data:
                data = data.replace(form, stars)
        return data

    def detect(self, data: bytes) -> str | None:
        """The name of a secret found in `data` as it is or percent-decoded (up to DECODE_ROUNDS times), in any
        letter case; or None. For watching, where nothing is changed, only refused."""
        for _ in range(DECODE_ROUNDS + 1):
            folded = data.lower()
            for form, name in self._folded.items():
                if form in folded:
                    return name
            if b"%" not in data:
                break
            data = unquote_to_bytes(data)
        return None

    def find_text(self, text: str) -> str | None:
        return self.find(text.encode("latin-1", "replace"))

    def detect_text(self, text: str) -> str | None:
        return self.detect(text.encode("latin-1", "replace"))

    def mask_text(self, text: str) -> str:
        if not self._ordered:
            return text
        return self.mask(text.encode("latin-1", "replace")).decode("latin-1")

    def masker(self) -> Stream:
        return Stream(self, watch=False)

    def watcher(self) -> Stream:
        return Stream(self, watch=True)


class Stream:
    """Bytes of one body or tunnel direction, piece by piece: masked (the real keys) or watched (raises Hit)."""

    def __init__(self, scanner: Scanner, watch: bool) -> None:
        self.scanner, self.watch = scanner, watch
        self._tail = b""
        self._seen = b""  # watching: the end of what passed, so that an encoded form split across pieces is found

    def feed(self, data: bytes) -> bytes:
        """What may be passed on now; the end that could begin a form stays behind until the next piece or flush()."""
        buf = self._tail + data if self._tail else data
        if self.watch:
            name = self.scanner.detect(self._seen + buf)
            if name:
                raise Hit(name)
        else:
            buf = self.scanner.mask(buf)
        cut = len(buf) - self.scanner.held(buf)
        self._tail = buf[cut:]
        if self.watch:
            self._seen = (self._seen + buf[:cut])[-self.scanner.window :] if self.scanner.window else b""
        return buf[:cut]

    def flush(self) -> bytes:
        """The bytes held back (at the end of the body or stream)."""
        out, self._tail = self._tail, b""
        return out

    def text(self, value: str) -> str:
        """A header or trailer value, whole."""
        if self.watch:
            name = self.scanner.detect_text(value)
            if name:
                raise Hit(name)
            return value
        return self.scanner.mask_text(value)


def scanner_of(secrets: Iterable[tuple[str, str]]) -> Scanner:
    return Scanner({name: value for name, value in secrets if value})
