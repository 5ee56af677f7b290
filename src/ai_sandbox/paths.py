"""Where things live on the host: cache, state and data directories (overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "ai-sandbox"


def cache_dir() -> Path:
    """Image cache: $AI_SANDBOX_CACHE or the user cache directory."""
    env = os.environ.get("AI_SANDBOX_CACHE")
    return Path(env).absolute() if env else Path(platformdirs.user_cache_dir(APP))


def state_dir() -> Path:
    """Sandbox instances: $AI_SANDBOX_STATE or the user state directory."""
    env = os.environ.get("AI_SANDBOX_STATE")
    return Path(env).absolute() if env else Path(platformdirs.user_state_dir(APP))


def data_dir() -> Path:
    """Installed helpers (Firecracker): $AI_SANDBOX_DATA or the user data directory."""
    env = os.environ.get("AI_SANDBOX_DATA")
    return Path(env).absolute() if env else Path(platformdirs.user_data_dir(APP))
