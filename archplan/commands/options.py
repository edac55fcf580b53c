"""Shared Annotated option aliases, so every command spells its options the same way."""

from __future__ import annotations

from enum import Enum
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


class KernelChoice(str, Enum):
    """The attention kernel a memory or step-time figure assumes: eager keeps the s×s scores
    (Korthikanti et al. 2022's 5·a·s² term), flash does not (Dao et al. 2022)."""

    eager = "eager"
    flash = "flash"
