"""The line that points an editor at the spec's JSON Schema, atop every spec archplan writes.

yaml-language-server (VS Code's YAML extension, Neovim, Helix) reads `# yaml-language-server:
$schema=PATH` and resolves a relative PATH from the file's own folder; the schema is package data
of `archplan`, beside presets/ (whose modelines read `../spec.schema.json`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SCHEMA_NAME = "spec.schema.json"
PREFIX = "# yaml-language-server: $schema="


def schema_file() -> Path:
    """The schema shipped in the package, on disk: in the checkout or in site-packages alike."""
    return Path(str(resources.files("archplan") / SCHEMA_NAME))


def schema_reference(out: str | Path | None) -> str:
    """The schema path as the YAML file will see it: relative to where the YAML is written (the
    path as given, links not followed: an editor resolves the reference from the file it opened);
    absolute on stdout, whose YAML may be saved anywhere (`> spec.yaml`, a pipe into another folder).
    A path with a space in it (`Program Files`, `/Users/Jane Doe`) is a file:// URI instead, its
    space escaped: yaml-language-server reads the reference up to the first blank."""
    schema = schema_file()
    try:
        reference = str(schema) if out is None else os.path.relpath(schema, Path(os.path.abspath(out)).parent)
    except ValueError:  # another drive (Windows): no relative path exists
        reference = str(schema)
    return schema.as_uri() if any(char.isspace() for char in reference) else reference


def modeline(out: str | Path | None) -> str:
    """The modeline for a spec written to `out` (None: stdout), without its line break."""
    return PREFIX + schema_reference(out)
