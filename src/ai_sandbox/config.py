"""Settings: one validated object from CLI flags, then the environment, then ./.env, then defaults.

The seed's variable names keep working (FC_VCPU, FC_MEM, FC_WORKSPACE_SIZE, the API keys, OLLAMA_HOST,
EGRESS_ALLOW_*). A bad value is one line naming the variable and where it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ai_sandbox.errors import UsageError

SECRET_NAMES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY", "GITHUB_TOKEN")


def _host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True, frozen=True)

    vcpus: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=1, validation_alias="FC_VCPU")
    memory_mib: int = Field(default_factory=lambda: min(8192, _host_memory_mib() // 2), ge=128,
                            validation_alias="FC_MEM")
    workspace_size_mib: int = Field(default=4096, ge=16, validation_alias="FC_WORKSPACE_SIZE")
    image: str = Field(default="default", validation_alias="AI_IMAGE")
    vmm: Literal["auto", "qemu", "firecracker"] = Field(default="auto", validation_alias="AI_VMM")
    share: Literal["auto", "virtiofs", "sftp", "copy"] = Field(default="auto", validation_alias="AI_SHARE")
    network: Literal["proxy", "open", "offline", "nat"] = Field(default="proxy", validation_alias="AI_NETWORK")
    net_pool: str = Field(default="10.213.0.0/16", validation_alias="AI_SANDBOX_NET_POOL")
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


def _origin(var: str, flags: dict[str, Any], env_file: Path) -> str:
    field = next((k for k, a in _ALIASES.items() if a == var), var)
    if field in flags:
        return "command line"
    if var in os.environ:
        return "environment"
    if env_file.is_file() and var in dotenv_values(env_file):
        return str(env_file)
    return "default"


def load(flags: dict[str, Any] | None = None, env_file: Path = Path(".env")) -> Settings:
    """Settings with CLI flags (None values dropped) over environment over .env over defaults."""
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    try:
        return Settings(_env_file=env_file if env_file.is_file() else None, **given)
    except ValidationError as e:
        err = e.errors()[0]
        loc = err["loc"][0] if err["loc"] else ""
        var = _ALIASES.get(str(loc), str(loc)) if loc else "FC_MEM"
        value = err.get("input")
        shown = "***" if var in SECRET_NAMES else value
        msg = err["msg"].removeprefix("Value error, ")
        where = _origin(var, given, env_file)
        raise UsageError(f"{var}={shown} (from {where}): {msg}") from None
