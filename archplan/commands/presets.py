"""`archplan presets`: the bundled presets with their description and parameter counts."""

from __future__ import annotations

import textwrap

import typer

from archplan import jsonout
from archplan.commands.options import JsonListOpt
from archplan.console import echo

DESCRIPTION_WIDTH = 90  # the table shows the start of each description; --json has it in full


def register(app: typer.Typer) -> None:
    @app.command(
        "presets",
        help=(
            "List the bundled presets (name, description, total and active parameters). Any name "
            "works wherever a spec path does.\n\n"
            "Examples:\n\n"
            "  archplan presets\n\n"
            "  archplan presets --json\n\n"
            "  archplan size llama-3-8b"
        ),
    )
    def presets(as_json: JsonListOpt = False) -> None:
        from archplan.analytic import count_params
        from archplan.loader import load_spec, preset_names
        from archplan.resolve import resolve

        rows = []
        for name in preset_names():
            spec = load_spec(name)
            params = count_params(resolve(spec))
            rows.append({"name": name, "description": spec.description, "total": params.total,
                         "active": params.active})
        if as_json:
            echo(jsonout.dumps(rows, indent=2))
            return

        from rich.table import Table

        from archplan import units
        from archplan.render import report_console

        table = Table(title="Bundled presets", title_justify="left", show_edge=False, pad_edge=False,
                      caption="archplan size NAME | archplan compare NAME NAME", caption_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("total", justify="right")
        table.add_column("active", justify="right")
        table.add_column("description")
        for row in rows:
            table.add_row(row["name"], units.count(row["total"]), units.count(row["active"]),
                          textwrap.shorten(row["description"] or "", DESCRIPTION_WIDTH, placeholder=" …"))
        report_console(table).print(table)
