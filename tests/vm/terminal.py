"""A real terminal for interactive tests: a tmux session running a command, whose screen a test can read."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


class Terminal:
    """`with Terminal(cmd, cwd) as t:` runs `cmd` (a shell command line for tmux) on a 120x30 screen."""

    def __init__(self, command: str, cwd: Path | None = None) -> None:
        self.session = f"ai-{os.getpid()}-{time.monotonic_ns()}"
        self.command, self.cwd = command, cwd

    def __enter__(self) -> Terminal:
        where = ["-c", str(self.cwd)] if self.cwd else []
        subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "30", *where,
                        self.command], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True,
                              text=True).stdout

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.session, line, "Enter"], check=True)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and text not in self.screen():
            time.sleep(0.5)
        return self.screen()


def ai_command(state: Path, netns: str, *args: str) -> str:
    """The command line that runs `ai` as a user would, in the test's sandbox-host namespace."""
    ai = Path(os.sys.executable).with_name("ai")
    return " ".join(["env", f"AI_SANDBOX_STATE={state}", "ip", "netns", "exec", netns, str(ai), *args])
