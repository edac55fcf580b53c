"""`archplan presets [NAME]`: the bundled presets with their description and parameter counts, or
one preset's YAML, to start a spec of one's own from."""

from __future__ import annotations

import sys
import textwrap
from typing import Annotated, Any

import typer

from archplan import jsonout
from archplan.commands.options import ForceOpt, JsonListOpt, complete_preset
from archplan.console import echo
from archplan.errors import ArchplanError, printable

DESCRIPTION_WIDTH = 90  # the table shows the start of each description; --json has it in full


def register(app: typer.Typer) -> None:
    @app.command(
        "presets",
        help=(
            "List the bundled presets (name, description, total and active parameters). Any name "
            "works wherever a spec path does. With a NAME, print that preset's YAML (its comments "
            "and sources included) to start a spec of your own from, or write it with -o.\n\n"
            "Examples:\n\n"
            "  archplan presets\n\n"
            "  archplan presets --json\n\n"
            "  archplan size llama-3-8b\n\n"
            "  archplan presets llama-3-8b -o my-model.yaml"
        ),
    )
    def presets(
        name: Annotated[str | None, typer.Argument(
            help="A bundled preset whose YAML to print (or write with -o).", show_default=False,
            metavar="NAME", autocompletion=complete_preset)] = None,
        output: Annotated[str | None, typer.Option(
            "-o", "--output", help="With NAME: write the preset's YAML here instead of printing it.",
            show_default=False)] = None,
        force: ForceOpt = False,
        as_json: JsonListOpt = False,
    ) -> None:
        from archplan.loader import preset_names

        if name is None:
            if output is not None or force:
                raise ArchplanError(f"{'-o' if output is not None else '--force'} writes one preset: "
                                    "give its NAME (`archplan presets llama-3-8b -o my-model.yaml`)")
            rows = [_row(preset) for preset in preset_names()]
            if as_json:
                echo(jsonout.dumps(rows, indent=2))
            else:
                _table(rows)
            return
        _show(name, output, force=force, as_json=as_json)


def _row(name: str) -> dict[str, Any]:
    from archplan.analytic import count_params
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    spec = load_spec(name)
    params = count_params(resolve(spec))
    return {"name": name, "description": spec.description, "total": params.total, "active": params.active}


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from archplan import units
    from archplan.render import report_console

    table = Table(title="Bundled presets", title_justify="left", show_edge=False, pad_edge=False,
                  caption="archplan size NAME | archplan compare NAME NAME | archplan presets NAME -o FILE",
                  caption_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("total", justify="right")
    table.add_column("active", justify="right")
    table.add_column("description")
    for row in rows:
        table.add_row(row["name"], units.count(row["total"]), units.count(row["active"]),
                      textwrap.shorten(row["description"] or "", DESCRIPTION_WIDTH, placeholder=" …"))
    report_console(table).print(table)


def _show(name: str, output: str | None, *, force: bool, as_json: bool) -> None:
    """The preset's text as shipped, its modeline pointed at the schema from where the copy goes."""
    from archplan.loader import PRESETS_DIR, preset_names, read_text, unknown_preset
    from archplan.modeline import PREFIX, modeline
    from archplan.outfile import SPEC_SUFFIXES, check_target, write_text

    bare = name.removesuffix(".yaml")
    if bare not in preset_names():
        raise unknown_preset(name, "no such preset")
    target = None if output is None else check_target(output, force=force, field="-o/--output",
                                                      suffixes=SPEC_SUFFIXES)
    if target is None and force:
        raise ArchplanError("--force overwrites the -o file; without -o the preset goes to stdout")
    first, rest = read_text(PRESETS_DIR / f"{bare}.yaml").split("\n", 1)
    text = (modeline(output) if first.startswith(PREFIX) else first) + "\n" + rest
    if target is not None:
        write_text(target, text)
    if as_json:
        echo(jsonout.dumps([{**_row(bare), "output": output, "yaml": text}], indent=2))
    elif target is None:
        echo(text, nl=False)
    else:
        shown = printable(str(target))
        typer.echo(f"wrote {shown} (preset {bare}; edit its name and sizes, then `archplan size {shown}`)",
                   file=sys.stderr)
