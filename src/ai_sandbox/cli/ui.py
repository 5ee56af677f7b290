"""Rendering shared by the commands: the console, step progress, errors."""

from __future__ import annotations

import logging
import re

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ai_sandbox import progress

out = Console()
err = Console(stderr=True)

# Terminal escape sequences (CSI, OSC/DCS/PM/APC strings, two-byte ESC forms, and their 8-bit C1 forms), then any
# other control character but newline and tab.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    r"|(?:\x1b[\]P^_X]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe_text(s: str, limit: int | None = None) -> str:
    """Guest-derived text made safe to print with rich: no control characters or escape sequences (newline and
    tab stay), rich markup escaped, at most `limit` characters of the original (then "…")."""
    text = _CONTROLS.sub("", _ESCAPES.sub("", str(s)))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return escape(text)


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("ai_sandbox").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        logging.getLogger("ai_sandbox.runner").setLevel(logging.DEBUG)
    for noisy in ("asyncssh", "httpx", "httpcore", "qemu", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StepPrinter:
    """Shows each long step with a spinner while it runs and its time when it ends."""

    def __init__(self) -> None:
        self._status = None

    def __call__(self, event: str, title: str, seconds: float) -> None:
        title = safe_text(title)  # the core's words are plain text and may quote guest names: never markup
        if event == "start":
            self._stop()
            self._status = err.status(f"{title} …")
            self._status.start()
        elif event == "info":
            err.print(f"[yellow]note:[/] {title}", highlight=False)
        else:
            self._stop()
            mark = "[green]✓[/]" if event == "done" else "[red]✗[/]"
            err.print(f"{mark} {title} ({seconds:.1f}s)", highlight=False)

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def show_progress() -> StepPrinter:
    printer = StepPrinter()
    progress.listen(printer)
    return printer
