"""Shared Annotated option aliases, so every command spells its options the same way."""

from __future__ import annotations

from typing import Annotated

import typer

SpecArg = Annotated[
    str,
    typer.Argument(help="Spec YAML path, or the name of a bundled preset (see `archplan presets`).",
                   show_default=False),
]
SpecsArg = Annotated[
    list[str],
    typer.Argument(help="Spec YAML paths or preset names.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (machine-readable).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
