"""Sandbox commands: start, shell, exec, ps, stop, rm, logs, and the bare `ai`."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ai_sandbox import config, runner, sandbox
from ai_sandbox.cli import ui
from ai_sandbox.errors import UsageError
from ai_sandbox.state import Files

NameArg = Annotated[Optional[str], typer.Argument(help="sandbox name (default: the current directory's)")]  # noqa: UP045


_noticed: list[str] = []


def prepare_settings(workspace: Path | None) -> config.Sources:
    """Settings files for this command (none the guest can write); says once when one was left unread."""
    sources = sandbox.settings_sources(workspace)
    line = sources.notice()
    if line and line not in _noticed:
        _noticed.append(line)
        ui.err.print(f"[yellow]note:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return sources


def _start(name: str | None, workspace: Path | None, flags: dict, skip_optional: bool) -> sandbox.Instance:
    ws = workspace or sandbox.default_workspace()
    seed_layout = workspace is None and ws.name == sandbox.SEED_WORKSPACE and not ws.exists()
    if not seed_layout and not ws.is_dir():
        raise UsageError(f"workspace {ws} does not exist or is not a directory")
    settings = config.load(flags, prepare_settings(ws))
    if seed_layout:
        ws.mkdir(mode=0o755)  # the seed's ./workspace/ beside ./ai and ./.env, made once the settings are good
    given = frozenset(k for k, v in flags.items() if v is not None)
    inst, spec = sandbox.create(sandbox.Options(name, ws, settings, skip_optional, given))
    ui.show_progress()
    sandbox.start(inst, spec, settings, skip_optional)
    return inst


def start(
    name: Annotated[Optional[str], typer.Option("--name", help="sandbox name")] = None,  # noqa: UP045
    workspace: Annotated[Optional[Path], typer.Option("--workspace", help="directory shown at /workspace")] = None,  # noqa: UP045
    image: Annotated[Optional[str], typer.Option("--image", help="recipe name or .toml path")] = None,  # noqa: UP045
    vmm: Annotated[Optional[str], typer.Option("--vmm", help="auto | qemu | firecracker")] = None,  # noqa: UP045
    cpus: Annotated[Optional[int], typer.Option("--cpus", help="vCPUs (FC_VCPU)")] = None,  # noqa: UP045
    memory: Annotated[Optional[int], typer.Option("--memory", help="MiB (FC_MEM)")] = None,  # noqa: UP045
    share: Annotated[Optional[str], typer.Option("--share", help="virtiofs | sftp | copy")] = None,  # noqa: UP045
    network: Annotated[Optional[str], typer.Option("--network", help="nat | open | proxy | offline")] = None,  # noqa: UP045
    detach: Annotated[bool, typer.Option("--detach", "-d", help="start and return, no shell")] = False,
    skip_optional: Annotated[bool, typer.Option("--skip-optional", help="build without optional tools")] = False,
) -> None:
    """Start a sandbox (building its image if needed) and attach a shell unless --detach."""
    flags = {"image": image, "vmm": vmm, "vcpus": cpus, "memory_mib": memory, "share": share, "network": network}
    inst = _start(name, workspace, flags, skip_optional)
    if detach:
        ui.err.print(f"sandbox [bold]{inst.name}[/] is running; attach with: ai shell {inst.name}", highlight=False)
        return
    runner.exec_replace(sandbox.attach_argv(inst))


def default() -> None:
    """The bare `ai`: build if needed, start if needed, attach."""
    prepare_settings(sandbox.default_workspace())
    inst = sandbox.resolve(None)
    if not inst.exists() or sandbox.status(inst).state.value != "running":
        inst = _start(None, None, {}, False)
    runner.exec_replace(sandbox.attach_argv(inst))


def shell(name: NameArg = None) -> None:
    """Attach an interactive shell (as `sandbox`, in /workspace)."""
    runner.exec_replace(sandbox.attach_argv(sandbox.existing(name)))


def exec_(
    argv: Annotated[list[str], typer.Argument(help="command and arguments (after --)")],
    name: Annotated[Optional[str], typer.Option("--name", help="sandbox name")] = None,  # noqa: UP045
) -> None:
    """Run a command in the sandbox: its stdout, stderr and exit status are the command's."""
    sys.stdout.flush()
    raise typer.Exit(sandbox.exec_in(sandbox.existing(name), argv))


def ps(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List sandboxes: name, status, vmm, workspace, address."""
    rows = sandbox.ps()
    if as_json:
        ui.out.print_json(json.dumps([asdict(r) for r in rows]))
        return
    table = Table("NAME", "STATUS", "VMM", "WORKSPACE", "ADDRESS", "ALERTS", box=None)
    for r in rows:
        st = ui.safe_text(r.status + (f" ({r.reason})" if r.reason else ""))
        alerts = f"[bold red]{r.alerts} honeytoken[/]" if r.alerts else ""
        table.add_row(r.name, st, r.vmm, ui.safe_text(r.workspace), r.address, alerts)
    ui.out.print(table)


def stop(
    name: NameArg = None,
    all_: Annotated[bool, typer.Option("--all", help="stop every sandbox")] = False,
) -> None:
    """Stop a sandbox (its disk and state stay; `ai start` resumes it)."""
    targets = list(sandbox.instances()) if all_ else [sandbox.existing(name)]
    ui.show_progress()
    for inst in targets:
        sandbox.stop(inst)
        ui.err.print(f"stopped {inst.name}", highlight=False)


def rm(
    name: NameArg = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="stop it first if running")] = False,
) -> None:
    """Delete a sandbox and its disk (never the workspace)."""
    inst = sandbox.existing(name)
    ui.show_progress()
    sandbox.remove(inst, force)
    ui.err.print(f"removed {inst.name}", highlight=False)


def logs(name: NameArg = None) -> None:
    """Show the guest console log (its last 256 KiB; control characters and escape sequences removed)."""
    text = sandbox.console_tail(sandbox.existing(name))
    ui.out.print(ui.safe_text(text), end="", highlight=False, soft_wrap=True)


def ssh_config(name: NameArg = None) -> None:
    """Print the sandbox's ssh_config (for `ssh -F` and IDEs)."""
    sys.stdout.write(sandbox.existing(name).path(Files.SSH_CONFIG).read_text())


def gh(args: Annotated[Optional[list[str]], typer.Argument()] = None) -> None:  # noqa: UP045
    """Run the GitHub CLI inside the sandbox."""
    raise typer.Exit(sandbox.exec_in(sandbox.existing(None), ["gh", *(args or [])]))


def register(app: typer.Typer) -> None:
    app.command()(start)
    app.command()(shell)
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
    app.command()(ps)
    app.command()(stop)
    app.command()(rm)
    app.command()(logs)
    app.command("ssh-config")(ssh_config)
    app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})(gh)
