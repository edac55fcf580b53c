"""`archplan schema`: the JSON Schema of the spec, for editors (yaml-language-server) and CI."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from archplan.commands.options import ForceOpt
from archplan.console import echo, stdout_takes_unicode
from archplan.errors import ArchplanError, printable
from archplan.outfile import SCHEMA_SUFFIXES, check_target, write_text

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"  # what Pydantic 2 generates


def render_schema(ensure_ascii: bool = False) -> str:
    """The text of the shipped `archplan/spec.schema.json`; stable, so a test compares it byte for
    byte. `ensure_ascii`: JSON's own escapes for a stream that cannot write the descriptions' `Σ`
    and `→`, the same document, where the stream's spelling would change them."""
    from archplan.spec import Spec

    schema = {"$schema": SCHEMA_DIALECT, **Spec.model_json_schema()}
    _require_tags(schema, schema["$defs"])
    return json.dumps(schema, indent=2, ensure_ascii=ensure_ascii) + "\n"


def _require_tags(node: object, defs: dict[str, dict]) -> None:
    """Make each tagged union's tag required in its members, as the loader does. Pydantic leaves it
    out of `required` because every member declares its tag with a default (`kind: Literal["rope"] =
    "rope"`, so a member can be built in code without it), and a validator then passes
    `position: {theta: 5e5}`, which the loader's discriminated union refuses: `kind` is missing."""
    if isinstance(node, dict):
        tag = node.get("discriminator")
        if tag is not None:
            for ref in tag["mapping"].values():
                member = defs[ref.removeprefix("#/$defs/")]
                required = member.setdefault("required", [])
                if tag["propertyName"] not in required:
                    required.insert(0, tag["propertyName"])
        for value in node.values():
            _require_tags(value, defs)
    elif isinstance(node, list):
        for value in node:
            _require_tags(value, defs)


def register(app: typer.Typer) -> None:
    # help= as one string per paragraph: in rich markup mode a docstring's line breaks are printed
    @app.command(help=(
        "Print the JSON Schema of a spec (Pydantic), for editor completion and validation.\n\n"
        "Put `# yaml-language-server: $schema=<path>/spec.schema.json` at the top of a spec to get "
        "completion and checking in editors that use yaml-language-server (VS Code YAML, Neovim). "
        "The package ships it too (`archplan/spec.schema.json`, which every spec archplan writes "
        "points at: `import hf`, `presets NAME`, `plan -o`). The rules across fields (GQA groups, layout letters "
        "against the blocks, budgets) are checked by `archplan lint`, not by the schema.\n\n"
        "Examples:\n\n"
        "  archplan schema > spec.schema.json\n\n"
        "  archplan schema -o configs/spec.schema.json --force"
    ))
    def schema(
        output: Annotated[str | None, typer.Option(
            "--output", "-o", help="Write to this file instead of stdout.", show_default=False,
        )] = None,
        force: ForceOpt = False,
    ) -> None:
        if output is None:
            if force:
                raise ArchplanError("--force overwrites the --output file; without it the schema goes to stdout")
            echo(render_schema(ensure_ascii=not stdout_takes_unicode()), nl=False)
            return
        write_text(check_target(output, force=force, field="-o/--output", suffixes=SCHEMA_SUFFIXES), render_schema())
        typer.echo(f"wrote {printable(output)}", file=sys.stderr)
