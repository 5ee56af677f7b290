"""`ai build`: build or reuse the guest image."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ai_sandbox.cli import ui
from ai_sandbox.image import pipeline


def build(
    verb: Annotated[str, typer.Argument(help="clean | inner-only | inject-only | host-only", show_default=False)] = "",
    image: Annotated[str, typer.Option("--image", help="recipe name or path to a .toml")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="artifact paths and stages run/reused, as JSON")] = False,
    skip_optional: Annotated[bool, typer.Option("--skip-optional", help="leave out tools marked optional")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="show commands and why stages rebuild")] = False,
) -> None:
    """Build the guest image (kernel, initramfs, root filesystem), reusing every stage that did not change."""
    if verbose:  # also accepted before the command (`ai -v build`), as everywhere
        ui.setup_logging(True)
    ui.show_progress()
    result = pipeline.build(image, verb, skip_optional=skip_optional)
    if as_json:
        ui.out.print_json(json.dumps(result.artifacts.as_dict() | {"ran": result.ran, "reused": result.reused}))
        return
    ran = ", ".join(result.ran) or "nothing (all reused)"
    ui.err.print(f"image [bold]{image}[/]: rebuilt {ran}", highlight=False)
    if result.missing_optional:
        ui.err.print(f"left out (optional): {', '.join(result.missing_optional)}", highlight=False)
    for k, v in result.artifacts.as_dict().items():
        ui.out.print(f"{k:9} {v}", highlight=False)
