"""`archplan plan`: budgets to compute-optimal sizes (optimal), sizes to recipe specs (design),
partial specs to complete ones (solve), and specs to cluster layouts (parallel).

Also the one way plan writes a spec: only the fields that differ from the schema defaults (plus
every `kind`, which the discriminated unions need), read back with the loader before returning.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from archplan.errors import ArchplanError
from archplan.modeline import modeline
from archplan.outfile import SPEC_SUFFIXES, check_target, write_text
from archplan.spec import Spec


# Top-level blocks written even at their defaults: a reader of the file should see the conventions.
ALWAYS_WRITTEN = frozenset({"position", "norm", "residual"})


def spec_data(model: BaseModel, always: frozenset[str] = ALWAYS_WRITTEN) -> dict[str, Any]:
    """A spec (or sub-model) as plain data: `kind` first, then the non-default fields in schema order."""
    out: dict[str, Any] = {}
    fields = type(model).model_fields
    for name in sorted(fields, key=lambda n: n != "kind"):
        value = getattr(model, name)
        info = fields[name]
        if name != "kind" and name not in always and not info.is_required() and value == info.default:
            continue
        out[name] = (spec_data(value, frozenset()) if isinstance(value, BaseModel) else
                     _as_written(value))
    return out


def _as_written(value: Any) -> Any:
    """A whole number held as a float (a number field keeps `tokens: 2e11` as 200000000000.0) is
    written as the integer: `tokens: 184260640754`, not `184260640754.0`. Number fields take either."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Blocks of prose, written one field per line rather than as an inline mapping.
BLOCK_STYLE = frozenset({"reference"})


def spec_yaml(spec: Spec, header: str, *, allow_unicode: bool = True) -> str:
    """YAML in the presets' style: small sub-blocks inline, prose blocks one field per line.
    `allow_unicode=False` escapes non-ASCII characters (`"\\xE9"`), for a stream that cannot write them."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    body = "".join(
        yaml.safe_dump({key: value}, sort_keys=False, width=100, allow_unicode=allow_unicode,
                       default_flow_style=None if isinstance(value, dict) and key not in BLOCK_STYLE
                       else False)
        for key, value in spec_data(spec).items()
    )
    return comments + body


def spec_document(spec: Spec, out: str | None, header: str = "", *, allow_unicode: bool = True) -> str:
    """A spec as archplan writes it to `out` (None: stdout): the modeline that points an editor at
    the schema from there, then `header` as comments, then `spec_yaml`'s body."""
    return modeline(out) + "\n" + spec_yaml(spec, header, allow_unicode=allow_unicode)


def write_spec(spec: Spec, path: str, *, force: bool, header: str = "") -> None:
    """Write `spec_document` to `path` (refusing to overwrite without force); check it loads back
    equal."""
    from archplan.loader import load_spec

    target = check_target(path, force=force, field="-o/--output", suffixes=SPEC_SUFFIXES)
    write_text(target, spec_document(spec, path, header))
    if load_spec(target) != spec:
        raise ArchplanError("written spec does not load back identical (please report)", file=path)
