"""Everything that goes into the guest: initramfs init, config-drive unit, sshd and sudo settings."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

USER = "sandbox"
UID = 1000
LABEL_BASE = "aisbx-base"
LABEL_DATA = "aisbx-data"
LABEL_CONFIG = "aisbx-cfg"
LABEL_WORKSPACE = "aisbx-ws"


def files_dir() -> Path:
    """The package's guest files (a real directory: the package is installed unzipped)."""
    return Path(str(resources.files("ai_sandbox.guest") / "files"))
