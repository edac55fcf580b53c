"""Shared Annotated option aliases, so every command spells its options the same way."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Annotated

import typer

from archplan.errors import ArchplanError
from archplan.units import parse_length


def _spec_files(incomplete: str) -> list[str]:
    """The spec files and folders starting with `incomplete` (a completion of our own replaces the
    shell's file names, so they are offered here)."""
    import glob
    import os

    from archplan.outfile import SPEC_SUFFIXES

    return [path + os.sep if os.path.isdir(path) else path for path in sorted(glob.glob(f"{incomplete}*"))
            if os.path.isdir(path) or path.lower().endswith(SPEC_SUFFIXES)]


def complete_preset(incomplete: str) -> list[str]:
    """Shell completion of `presets NAME`: the bundled presets' names."""
    from archplan.loader import preset_names

    return [name for name in preset_names() if name.startswith(incomplete)]


def complete_spec(incomplete: str) -> list[str]:
    """Shell completion of a SPEC (or lint's PATH): the bundled presets' names, then spec files."""
    return complete_preset(incomplete) + _spec_files(incomplete)


def complete_partial(incomplete: str) -> list[str]:
    """Shell completion of `plan --solve`: the bundled partial specs' names, then spec files."""
    from archplan.loader import partial_names

    return [name for name in partial_names() if name.startswith(incomplete)] + _spec_files(incomplete)


def complete_gpu(incomplete: str) -> list[str]:
    """Shell completion of `--gpu`: the hardware table's keys and aliases."""
    from archplan.hardware import ACCELERATORS

    names = [name for a in ACCELERATORS for name in (a.key, *a.aliases)]
    return [name for name in names if name.startswith(incomplete.lower())]


SpecArg = Annotated[
    str,
    typer.Argument(help="Spec YAML path, the name of a bundled preset (see `archplan presets`), or - to read "
                        "the spec from standard input.",
                   show_default=False, metavar="SPEC", autocompletion=complete_spec),
]
SpecsArg = Annotated[
    list[str],
    typer.Argument(help="Spec YAML paths or preset names (- reads one from standard input).", show_default=False,
                   metavar="SPEC", autocompletion=complete_spec),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object (machine-readable).", metavar="")]
# compare and presets print one object per spec: a JSON list
JsonListOpt = Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per spec (machine-readable).", metavar="")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.", metavar="")]


class KernelChoice(str, Enum):
    """The attention kernel a memory or step-time figure assumes: eager keeps the s×s scores
    (Korthikanti et al. 2022's 5·a·s² term), flash does not (Dao et al. 2022)."""

    eager = "eager"
    flash = "flash"


class MemoryKernelChoice(str, Enum):
    """KernelChoice for the activations of `size` and `compare`, with the kernels torch's SDPA
    runs on a CPU (what `bench --train` measures there)."""

    eager = "eager"
    flash = "flash"
    torch_cpu = "torch-cpu"


def given_by_user(ctx: typer.Context, name: str) -> bool:
    """Whether parameter `name` came from the command line or the environment, not its default."""
    # by name: typer may carry its own copy of click's ParameterSource
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def refuse_foreign_options(ctx: typer.Context, mode: str, modes: Mapping[str, frozenset[str]]) -> None:
    """Refuse, in one line, an option given on the command line (or in the environment) that the
    chosen `mode` does not read: `modes` maps each mode of a command to the parameters it reads or
    answers with its own message. Silently ignoring it would run something else than asked."""
    for param in ctx.command.params:
        if param.name is None or param.name in modes[mode] or not param.opts[0].startswith("-"):
            continue
        if given_by_user(ctx, param.name):
            owners = [m for m, names in modes.items() if param.name in names]
            # a --x/--no-x flag set false was given as --no-x: name the flag the user wrote
            secondary = getattr(param, "secondary_opts", None)
            flag = secondary[0] if secondary and ctx.params.get(param.name) is False else param.opts[0]
            if flag in modes:  # the option chooses a mode itself (bench --train with --layout)
                raise ArchplanError(f"{flag} and {mode} are two modes of this command; give one")
            read_by = ", ".join(owners[:-1]) + (" and " if len(owners) > 1 else "") + owners[-1]
            raise ArchplanError(f"{flag} does not apply to {mode} (it is read by {read_by}); drop it")


def refuse_force_without_plot(force: bool, plot: str | None) -> None:
    """`--force` with nothing to overwrite is a mistake to name, not to ignore (as `plan` does)."""
    if force and plot is None:
        raise ArchplanError("--force overwrites the --plot figure; without --plot nothing is written")


def length_option(text: str) -> int:
    """Typer's parser for --seq: '4096', '4_096' or '4k' (`units.parse_length`)."""
    try:
        return parse_length(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
