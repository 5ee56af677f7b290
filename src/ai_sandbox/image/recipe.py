"""Declarative TOML recipes, validated: an unknown key or a bad value is one line naming the file and field."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ai_sandbox.errors import NotFound, UsageError

_PKG = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$")
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tool(_Strict):
    """A tool installed after the Debian packages, inside the image (npm, go, or a command)."""

    name: str
    kind: Literal["npm", "go"]
    packages: list[str] = Field(min_length=1)
    bins: list[str] = Field(default_factory=list)
    optional: bool = False  # its source lives outside the Debian and npm registries

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a tool name (lowercase letters, digits, - and _)")
        return v


class Recipe(_Strict):
    name: str
    description: str = ""
    suite: Literal["bookworm", "trixie"] = "trixie"
    variant: Literal["minbase", "essential", "apt", "required", "important", "standard"] = "minbase"
    kernel: str = "linux-image-cloud-amd64"
    packages: list[str] = Field(default_factory=list)
    components: list[str] = Field(default_factory=lambda: ["main"])
    tools: list[Tool] = Field(default_factory=list)
    disk_headroom_mib: int = Field(default=256, ge=16, le=65536)

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _PKG.match(p):
                raise ValueError(f"{p!r} is not a Debian package name")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a recipe name")
        return v


def builtin_names() -> list[str]:
    root = resources.files("ai_sandbox.image") / "builtin"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def _where(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "(top)"


def parse(text: str, origin: str) -> Recipe:
    """Parse and validate recipe text; `origin` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{origin}: malformed TOML: {e}") from e
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise UsageError(f"{origin}: field {_where(err['loc'])}: {what}") from e


def load(ref: str) -> tuple[Recipe, str]:
    """A recipe by builtin name or by path; returns it with the text it came from (for the cache manifest)."""
    path = Path(ref)
    if ref.endswith(".toml") or "/" in ref:
        if not path.is_file():
            raise NotFound(f"recipe file {ref} does not exist")
        text = path.read_text()
        return parse(text, str(path)), text
    if ref not in builtin_names():
        raise NotFound(f"unknown recipe {ref!r}", hint=f"choose one of {', '.join(builtin_names())} or give a .toml path")
    res = resources.files("ai_sandbox.image") / "builtin" / f"{ref}.toml"
    text = res.read_text()
    return parse(text, f"builtin recipe {ref}"), text
