"""`archplan import hf CONFIG [-o spec.yaml] [--force]`: a Hugging Face config.json becomes a spec.

The conversion lives in `archplan.importers.hf`; this module only reads arguments, writes the YAML
and reports. No torch: the importer and the spec are pure Python.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from archplan import jsonout
from archplan.commands.options import ForceOpt, JsonOpt
from archplan.console import echo, stdout_takes_unicode
from archplan.errors import ArchplanError, printable
from archplan.outfile import SPEC_SUFFIXES, check_target

import_app = typer.Typer(
    name="import",
    help="Turn another tool's model description into an archplan spec.",
    no_args_is_help=True,
)


@import_app.command("hf")
def hf(
    config: Annotated[str, typer.Argument(help="A Hugging Face config.json, or the model folder holding one.",
                                          show_default=False, metavar="CONFIG")],
    # str, not Path: typer makes Path("") of an empty argument, the current folder
    output: Annotated[str | None, typer.Option("-o", "--output", help="Write the spec here (default: stdout).",
                                                show_default=False)] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse (exit 2) a key the importer does not "
                                                           "account for, instead of reporting it.", metavar="")] = False,
    mtp: Annotated[bool, typer.Option("--mtp", help="Also build the multi-token-prediction modules the config "
                                                    "declares (DeepSeek-V3's num_nextn_predict_layers), as trained; "
                                                    "transformers builds none, so the count is then archplan's.",
                                      metavar="")] = False,
) -> None:
    """Convert a Hugging Face config.json into an archplan spec (YAML), exact to transformers' count.

    Keys that change size or compute are read; keys every PretrainedConfig carries, keys a family derives from others (checked for consistency) and aliases are accepted; any other key is reported on stderr as ignored (--strict: exit 2). A value the spec cannot express stops the import (exit 2) and is named. With --json, stdout is one JSON object (the spec's fields, the ignored keys, and where the YAML went).

    Examples:

      archplan import hf ~/models/Meta-Llama-3-8B -o llama-3-8b.yaml

      archplan import hf config.json > spec.yaml && archplan size spec.yaml

      archplan import hf config.json --strict -o spec.yaml

      archplan import hf ~/models/DeepSeek-V3 --mtp -o deepseek-v3-mtp.yaml
    """
    from archplan.importers.hf import read_hf
    from archplan.planning import spec_data, spec_document, write_spec

    if output is not None:
        check_target(output, force=force, field="-o/--output", suffixes=SPEC_SUFFIXES)
    elif force:
        raise ArchplanError("--force overwrites the -o spec; without -o the spec goes to stdout")
    imported = read_hf(config, strict=strict, mtp=mtp)
    spec = imported.spec
    shown = printable(config)  # a name an ASCII locale could not decode, shown as text
    if imported.ignored:
        # one line, so scripts can grep it; the keys also go into the spec's reference.notes
        typer.echo(f"{shown}: ignored keys (not read by the importer; --strict refuses them): "
                   f"{', '.join(imported.ignored)}", file=sys.stderr)
    for note in imported.said:
        typer.echo(f"{shown}: {note}", file=sys.stderr)
    if "max_seq_len" not in spec.model_fields_set:
        # size's and verify's default sequence is the spec's max_seq_len: a silent default moves them
        typer.echo(f"{shown}: the config states no context length; max_seq_len is the spec's default, "
                   f"{spec.max_seq_len:,}: set it to the length the model was trained at", file=sys.stderr)
    if output is not None:
        write_spec(spec, output, force=force)
    if as_json:
        echo(jsonout.dumps({"output": output, "ignored": list(imported.ignored), "said": list(imported.said),
                            "spec": spec_data(spec)}))
    elif output is None:
        echo(spec_document(spec, None, allow_unicode=stdout_takes_unicode()), nl=False)
    else:
        typer.echo(f"wrote {printable(output)} ({spec.name}: {spec.n_layers} layers, d_model {spec.d_model})",
                   file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.add_typer(import_app, name="import")
