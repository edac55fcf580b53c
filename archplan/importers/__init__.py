"""Importers: other tools' model descriptions -> archplan specs, and the spec -> YAML writer they share.

`hf.import_hf(path)` reads a Hugging Face config.json. `spec_yaml(spec, schema)` renders any spec as
the YAML `archplan size` reads back: only the fields the importer set (so defaults stay implicit),
`kind` on every variant, flow style for small mappings like the bundled presets.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from archplan.spec import Spec


LINE_WIDTH = 100  # a mapping whose flow form fits on one line is written as {a: 1, b: 2}


def explicit_fields(model: BaseModel) -> dict[str, Any]:
    """The fields a model was built with (model_fields_set), recursively; `kind` always, and first."""
    out: dict[str, Any] = {}
    if "kind" in type(model).model_fields:
        out["kind"] = getattr(model, "kind")
    for name in type(model).model_fields:
        if name in model.model_fields_set and name != "kind":
            out[name] = _plain(getattr(model, name))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return explicit_fields(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flow(value: Any) -> str:
    """One value in YAML flow syntax, quoted where YAML needs it (via a one-item flow list)."""
    text = yaml.safe_dump([value], default_flow_style=True, width=1 << 30, allow_unicode=True,
                          sort_keys=False).strip()
    return text[1:-1]


def _block(data: dict[str, Any], indent: int = 0) -> list[str]:
    lines = []
    pad = " " * indent
    for key, value in data.items():
        if isinstance(value, dict) and value:
            line = f"{pad}{key}: {_flow(value)}"
            if len(line) <= LINE_WIDTH:
                lines.append(line)
            else:
                lines.append(f"{pad}{key}:")
                lines.extend(_block(value, indent + 2))
        else:
            lines.append(f"{pad}{key}: {_flow(value)}")
    return lines


def spec_yaml(spec: Spec, schema: str | None = None) -> str:
    """YAML text that loads back into an equal Spec; first line points editors at the JSON schema."""
    head = [f"# yaml-language-server: $schema={schema}"] if schema else []
    return "\n".join(head + _block(explicit_fields(spec))) + "\n"
