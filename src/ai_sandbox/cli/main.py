"""Entry point: the Typer app, global options, and the one place errors become exit codes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ai_sandbox import __version__
from ai_sandbox.cli import build as build_cmd
from ai_sandbox.cli import ui
from ai_sandbox.errors import SandboxError

app = typer.Typer(
    name="ai",
    help="AI coding agents in a microVM. Without a command: build if needed, start if needed, attach a shell.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show commands and why stages rebuild")] = False,
) -> None:
    ui.setup_logging(verbose)
    from ai_sandbox.cli import lifecycle

    if ctx.invoked_subcommand is None:
        lifecycle.default()
    elif ctx.invoked_subcommand != "start":  # start judges the settings files against the workspace it is given
        lifecycle.prepare_settings(None)


app.command("build")(build_cmd.build)


@app.command()
def version() -> None:
    """Print the version."""
    ui.out.print(f"ai-sandbox {__version__}")


def _register() -> None:
    # Commands that live in their own modules register themselves when present.
    import importlib

    for mod in ("lifecycle", "setup", "policy", "info"):
        try:
            m = importlib.import_module(f"ai_sandbox.cli.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"ai_sandbox.cli.{mod}":
                raise
            continue
        m.register(app) if hasattr(m, "register") else None


_register()


def run() -> None:
    try:
        app()
    except SandboxError as e:
        ui.err.print(f"[red]error:[/] {e.line()}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        ui.err.print("interrupted")
        sys.exit(130)
