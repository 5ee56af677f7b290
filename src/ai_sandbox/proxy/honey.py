"""Honeytokens: decoy credentials that no legitimate tool uses, different in every sandbox.

The host makes them once per sandbox (kept in the instance directory, 0600); the guest finds them where an
exfiltrating agent would look (`~/.aws/credentials`, the environment); the proxy watches every request it sees for
them (see scrub.py), and a hit is refused, logged as an alert and, if configured, pauses the VM.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import string
from pathlib import Path

ENV_TOKEN = "PROD_DEPLOY_TOKEN"  # attractive to an agent that collects secrets; read by no tool
_BASE32 = string.ascii_uppercase + "234567"
_BASE64 = string.ascii_letters + string.digits + "+/"
_ALNUM = string.ascii_letters + string.digits
VMM_NAMES = ("qemu", "firecracker")


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def new_tokens() -> dict[str, str]:
    """A fresh set: an AWS key pair (as the AWS tools write them) and a deploy token."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + _random(_BASE32, 16),
        "AWS_SECRET_ACCESS_KEY": _random(_BASE64, 40),
        ENV_TOKEN: "dpt_" + _random(_ALNUM, 36),
    }


def ensure(path: Path) -> dict[str, str]:
    """The sandbox's honeytokens: read from `path`, or made and stored there (0600) the first time."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
            return data
        raise ValueError(f"{path}: not a honeytoken file") from None
    tokens = new_tokens()
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(tokens, indent=1) + "\n")
    return tokens


def aws_credentials(tokens: dict[str, str]) -> str:
    """The decoy ~/.aws/credentials."""
    return ("[default]\n"
            f"aws_access_key_id = {tokens['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {tokens['AWS_SECRET_ACCESS_KEY']}\n")  # fmt: skip


class Pauser:
    """Stops the VM (SIGSTOP of the VMM) on an alert, when the sandbox asked for it; the pid is checked first."""

    def __init__(self, pid_file: Path | None) -> None:
        self.pid_file = pid_file

    def pause(self) -> bool:
        if self.pid_file is None:
            return False
        try:
            pid = int(self.pid_file.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return False
        if pid <= 1 or not comm.startswith(VMM_NAMES):  # a reused pid is not ours to stop
            return False
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            return False
        return True
