"""Settings: one validated object from CLI flags, then the environment, then settings files, then defaults.

The seed's variable names keep working (FC_VCPU, FC_MEM, FC_WORKSPACE_SIZE, the API keys, OLLAMA_HOST,
EGRESS_ALLOW_*). A bad value is one line naming the variable and where it came from.

Settings files are read only from places the guest cannot write, because they choose the image, the VMM and the
egress policy and hold the real keys:

    ./.env                                   the current directory's, when it is not a shared workspace (the seed's
                                             layout: `ai` and `.env` beside the workspace); beats the next one
    $XDG_CONFIG_HOME/ai-sandbox/config.env   the user's, when it does not lie inside a shared workspace

A `.env` inside a shared workspace (the one a command starts, or any existing sandbox's) is never read; `Sources`
names it so the CLI can say once where settings belong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ai_sandbox import paths
from ai_sandbox.errors import UsageError

SECRET_NAMES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY", "GITHUB_TOKEN")


def _host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Settings(BaseSettings):
    # No env_file here: `load` passes exactly the files `find_sources` judged safe.
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True, frozen=True)

    vcpus: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=1, validation_alias="FC_VCPU")
    memory_mib: int = Field(default_factory=lambda: min(8192, _host_memory_mib() // 2), ge=128,
                            validation_alias="FC_MEM")
    workspace_size_mib: int = Field(default=4096, ge=16, validation_alias="FC_WORKSPACE_SIZE")
    image: str = Field(default="default", validation_alias="AI_IMAGE")
    vmm: Literal["auto", "qemu", "firecracker"] = Field(default="auto", validation_alias="AI_VMM")
    share: Literal["auto", "virtiofs", "sftp", "copy"] = Field(default="auto", validation_alias="AI_SHARE")
    network: Literal["proxy", "open", "offline", "nat"] = Field(default="proxy", validation_alias="AI_NETWORK")
    net_pool: str = Field(default="10.213.0.0/16", validation_alias="AI_SANDBOX_NET_POOL")
    cache_dir: str = Field(default="", validation_alias=paths.CACHE_ENV)
    state_dir: str = Field(default="", validation_alias=paths.STATE_ENV)
    data_dir: str = Field(default="", validation_alias=paths.DATA_ENV)
    ollama_host: str = Field(default="", validation_alias="OLLAMA_HOST")
    egress_allow_ip: str = Field(default="", validation_alias="EGRESS_ALLOW_IP")
    egress_allow_tcp_ports: str = Field(default="", validation_alias="EGRESS_ALLOW_TCP_PORTS")
    anthropic_api_key: SecretStr | None = Field(default=None, validation_alias="ANTHROPIC_API_KEY")
    openai_api_key: SecretStr | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    google_api_key: SecretStr | None = Field(default=None, validation_alias="GOOGLE_API_KEY")
    gemini_api_key: SecretStr | None = Field(default=None, validation_alias="GEMINI_API_KEY")
    github_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices("GITHUB_TOKEN", "GH_TOKEN"))

    @field_validator("vcpus")
    @classmethod
    def _vcpus(cls, v: int) -> int:
        host = os.cpu_count() or 1
        if v > host:
            raise ValueError(f"{v} vCPUs asked, the host has {host}")
        return v

    @field_validator("egress_allow_tcp_ports")
    @classmethod
    def _ports(cls, v: str) -> str:
        for p in filter(None, (x.strip() for x in v.split(","))):
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise ValueError(f"{p!r} is not a TCP port")
        return v

    @model_validator(mode="after")
    def _memory(self) -> Settings:
        if self.memory_mib > _host_memory_mib():
            raise ValueError(f"FC_MEM: {self.memory_mib} MiB asked, the host has {_host_memory_mib()} MiB")
        return self

    def secrets(self) -> dict[str, str]:
        """The real credentials by their variable names (held on the host only)."""
        vals = {
            "ANTHROPIC_API_KEY": self.anthropic_api_key, "OPENAI_API_KEY": self.openai_api_key,
            "GOOGLE_API_KEY": self.google_api_key, "GEMINI_API_KEY": self.gemini_api_key,
            "GITHUB_TOKEN": self.github_token,
        }
        return {k: v.get_secret_value() for k, v in vals.items() if v is not None and v.get_secret_value()}


_ALIASES = {name: (f.validation_alias if isinstance(f.validation_alias, str) else name.upper())
            for name, f in Settings.model_fields.items()}
ENV_FILE = ".env"


@dataclass(frozen=True)
class Sources:
    """The settings files to read (lowest precedence first) and those found where the guest can write them."""

    files: tuple[Path, ...] = ()
    ignored: tuple[Path, ...] = ()

    def notice(self) -> str | None:
        """One line for people when a settings file was left unread, else None."""
        if not self.ignored:
            return None
        names = ", ".join(map(str, self.ignored))
        return (f"not reading {names}: the sandbox can write there; settings belong in {paths.config_file()}, "
                f"the environment, or a {ENV_FILE} beside (not inside) the workspace")

    def values(self) -> dict[str, str]:
        """Every variable the files set, later files winning."""
        out: dict[str, str] = {}
        for f in self.files:
            out |= {k: v for k, v in dotenv_values(f, interpolate=False).items() if v is not None}
        return out

    def path_values(self) -> dict[str, str]:
        """AI_SANDBOX_CACHE/STATE/DATA as the files set them (for `paths.use`)."""
        return {k: v for k, v in self.values().items() if k in paths.PATH_VARS}


def _inside(path: Path, dirs: Iterable[Path]) -> bool:
    real = path.resolve()  # follows links: a link out of a workspace is judged by where it points
    return any(real == d or real.is_relative_to(d) for d in dirs)


def find_sources(workspaces: Iterable[Path], cwd: Path | None = None) -> Sources:
    """The settings files that lie outside every directory in `workspaces` (the shared, guest-writable ones).

    ./.env counts only when the current directory is not a workspace nor inside one (and the file does not
    point into one); the user's config file only when it does not lie in a workspace (e.g. one sharing $HOME).
    """
    guest = [w.resolve() for w in workspaces]
    here = cwd or Path.cwd()
    files: list[Path] = []
    ignored: list[Path] = []
    user = paths.config_file()
    if user.is_file():
        (ignored if _inside(user, guest) else files).append(user)
    local = here / ENV_FILE
    if local.is_file():
        (ignored if _inside(here, guest) or _inside(local, guest) else files).append(local)
    for w in guest:
        inner = w / ENV_FILE
        if inner.is_file() and inner.resolve() not in {i.resolve() for i in ignored}:
            ignored.append(inner)
    return Sources(tuple(files), tuple(ignored))


def _origin(var: str, flags: dict[str, Any], files: tuple[Path, ...]) -> str:
    field = next((k for k, a in _ALIASES.items() if a == var), var)
    if field in flags:
        return "command line"
    if var in os.environ:
        return "environment"
    for f in reversed(files):
        if var in dotenv_values(f, interpolate=False):
            return str(f)
    return "default"


def load(flags: dict[str, Any] | None = None, sources: Sources | None = None) -> Settings:
    """Settings with CLI flags (None values dropped) over environment over settings files over defaults.

    `sources`: from `find_sources`; by default the current directory is taken as the shared workspace."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    files = (sources if sources is not None else find_sources([Path.cwd()])).files
    try:
        return Settings(_env_file=tuple(files) or None, **given)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"][0] if err["loc"] else ""
        var = _ALIASES.get(str(loc), str(loc)) if loc else "FC_MEM"
        value = err.get("input")
        shown = "***" if var in SECRET_NAMES else value
        msg = err["msg"].removeprefix("Value error, ")
        where = _origin(var, given, files)
        raise UsageError(f"{var}={shown} (from {where}): {msg}") from None
