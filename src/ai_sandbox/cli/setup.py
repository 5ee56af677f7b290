"""`ai setup …`: install host helpers the sandbox needs (today: Firecracker)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from ai_sandbox.cli import ui
from ai_sandbox.vmm import fc_setup
from ai_sandbox.vmm.kvm import kvm_unusable

setup_app = typer.Typer(help="Install host helpers the sandbox needs.", no_args_is_help=True)


@setup_app.callback()
def _group() -> None:
    """Install host helpers the sandbox needs."""  # a callback keeps `setup` a group even with one command


@setup_app.command("firecracker")
def firecracker(
    version: Annotated[
        str, typer.Option("--version", help="release to install (only versions with a pinned checksum)")
    ] = fc_setup.DEFAULT_VERSION,
) -> None:
    """Download the official Firecracker release, verify its pinned SHA-256, install firecracker + jailer."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=ui.err, transient=True) as bar:
        task = bar.add_task(f"firecracker {version}", total=None)
        bins = fc_setup.install(version, progress=lambda done, total: bar.update(task, completed=done, total=total))
    ui.out.print(f"firecracker {bins.version}: {bins.firecracker}", highlight=False)
    ui.out.print(f"jailer      {bins.version}: {bins.jailer}", highlight=False)
    if why := kvm_unusable():
        ui.err.print(f"[yellow]note:[/] firecracker cannot run on this host yet: {why}", highlight=False)


def register(app: typer.Typer) -> None:
    """Called by cli.main: mount the group as `ai setup`."""
    app.add_typer(setup_app, name="setup")
