"""`ai policy show|allow HOST|deny HOST|log [NAME]`: the egress proxy's domain lists and its request log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ai_sandbox import proxy, proxy_up, sandbox
from ai_sandbox.cli import ui
from ai_sandbox.state import Files

policy_app = typer.Typer(help="Egress policy of a sandbox (proxy mode): allowed and denied hosts, request log.")
NameArg = Annotated[Optional[str], typer.Argument(help="sandbox name (default: the current directory's)")]  # noqa: UP045


@policy_app.command()
def show(name: NameArg = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The hosts the sandbox may reach through its proxy, and those it may not."""
    inst = sandbox.existing(name)
    allow, deny = proxy_up.lists(inst)
    if as_json:
        ui.out.print_json(json.dumps({"allow": allow, "deny": deny}))
        return
    spec = inst.load()
    ui.out.print(f"sandbox {inst.name}: network mode {spec.network}", highlight=False)
    ui.out.print("allow: " + ", ".join(allow), highlight=False)
    ui.out.print("deny:  " + (", ".join(deny) or "(none)"), highlight=False)


@policy_app.command()
def allow(host: Annotated[str, typer.Argument(help="host or *.domain")], name: NameArg = None) -> None:
    """Allow a host (takes effect at the proxy's next request)."""
    proxy_up.change(sandbox.existing(name), host, "allow")
    ui.err.print(f"allowed {host}", highlight=False)


@policy_app.command()
def deny(host: Annotated[str, typer.Argument(help="host or *.domain")], name: NameArg = None) -> None:
    """Deny a host (deny wins over allow)."""
    proxy_up.change(sandbox.existing(name), host, "deny")
    ui.err.print(f"denied {host}", highlight=False)


@policy_app.command()
def log(name: NameArg = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every request the proxy allowed or refused, and honeytoken alerts: time, host, verdict."""
    path = sandbox.existing(name).path(Files.PROXY_LOG)
    entries = proxy.read_log(Path(path))
    if as_json:
        ui.out.print_json(json.dumps(entries))
        return
    table = Table("TIME", "METHOD", "HOST", "PORT", "VERDICT", "REASON", box=None)
    colours = {"allow": "green", "deny": "red", "alert": "bold white on red"}
    for e in entries:
        verdict = ui.safe_text(str(e.get("verdict", "")), 16)
        colour = colours.get(str(e.get("verdict")), "red")
        # Host, method and reason come from what the guest sent: printed literally, never as markup.
        table.add_row(ui.safe_text(str(e.get("time", "")), 40), ui.safe_text(str(e.get("method", "")), 32),
                      ui.safe_text(str(e.get("host", "")), 255), ui.safe_text(str(e.get("port", "")), 8),
                      f"[{colour}]{verdict}[/]", ui.safe_text(str(e.get("reason", "")), 200))  # fmt: skip
    ui.out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
