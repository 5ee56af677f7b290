"""Informational commands: doctor, architecture, help."""

from __future__ import annotations

import typer
from rich.table import Table

from ai_sandbox import doctor as doctor_mod
from ai_sandbox.cli import ui

ARCHITECTURE = """\
Your machine (host)
  ├── ai (this tool)            settings, image cache, one state directory per sandbox
  ├── nftables table ai_sandbox per-sandbox TAP + /30, NAT, no sandbox-to-sandbox, policy on the host
  ├── virtiofsd / sftp server   the live workspace (/workspace)
  └── QEMU microvm | Firecracker   ← hardware-isolated guest (KVM), or emulated (TCG) where KVM is unusable
        └── guest Linux = the dev environment (no Docker layer in between)
              ├── systemd, OpenSSH (keys only, host key pinned by the host)
              ├── overlay root: read-only base image + per-sandbox data disk (survives stop/start)
              ├── Claude Code (claude), OpenCode (opencode), Gemini CLI (gemini), Codex (codex), ChatGPT CLI
              ├── gh, git, Go, Python 3, Rust, Node.js >= 22, Docker engine
              └── /workspace  ← your project
"""


def doctor() -> None:
    """Check the host: tools, KVM, virtiofsd, Firecracker; print what is missing and how to fix it."""
    table = Table("CHECK", "STATUS", "DETAIL", "FIX", box=None)
    bad = False
    for c in doctor_mod.checks():
        mark = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]note[/]")
        bad |= c.required and not c.ok
        table.add_row(c.name, mark, c.detail, "" if c.ok else c.fix)
    ui.out.print(table)
    if bad:
        ui.err.print("some required pieces are missing: run scripts/host-packages as root, or the fixes above")
        raise typer.Exit(1)


def architecture() -> None:
    """Show how the pieces fit together."""
    ui.out.print(ARCHITECTURE, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(architecture)

    @app.command("help")
    def help_(ctx: typer.Context) -> None:
        """Show the commands."""
        ui.out.print(ctx.parent.get_help() if ctx.parent else ctx.get_help(), highlight=False, markup=False)
