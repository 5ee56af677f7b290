"""Where things live on the host: settings, cache, state and data directories.

The directories can be moved with AI_SANDBOX_CACHE, AI_SANDBOX_STATE and AI_SANDBOX_DATA, from the environment
or from a settings file (`config` reads those and hands their values to `use`, which exports them so the helper
processes we start see the same directories).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP = "ai-sandbox"
CACHE_ENV, STATE_ENV, DATA_ENV = "AI_SANDBOX_CACHE", "AI_SANDBOX_STATE", "AI_SANDBOX_DATA"
PATH_VARS = (CACHE_ENV, STATE_ENV, DATA_ENV)
CONFIG_FILE = "config.env"


def config_file() -> Path:
    """The user's settings file: $XDG_CONFIG_HOME/ai-sandbox/config.env (~/.config/ai-sandbox/config.env)."""
    return Path(platformdirs.user_config_dir(APP)) / CONFIG_FILE


def use(values: Mapping[str, str]) -> None:
    """Take AI_SANDBOX_CACHE/STATE/DATA from settings files; the environment (already in os.environ) wins."""
    for var in PATH_VARS:
        if values.get(var) and not os.environ.get(var):
            os.environ[var] = values[var]


def _chosen(var: str, values: Mapping[str, str] | None) -> str:
    return os.environ.get(var) or (values or {}).get(var, "")


def cache_dir(values: Mapping[str, str] | None = None) -> Path:
    """Image cache: $AI_SANDBOX_CACHE or the user cache directory."""
    env = _chosen(CACHE_ENV, values)
    return Path(env).absolute() if env else Path(platformdirs.user_cache_dir(APP))


def state_dir(values: Mapping[str, str] | None = None) -> Path:
    """Sandbox instances: $AI_SANDBOX_STATE or the user state directory (`values`: settings not yet in `use`)."""
    env = _chosen(STATE_ENV, values)
    return Path(env).absolute() if env else Path(platformdirs.user_state_dir(APP))


def data_dir(values: Mapping[str, str] | None = None) -> Path:
    """Installed helpers (Firecracker): $AI_SANDBOX_DATA or the user data directory."""
    env = _chosen(DATA_ENV, values)
    return Path(env).absolute() if env else Path(platformdirs.user_data_dir(APP))
