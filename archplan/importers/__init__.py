"""Importers: other tools' model descriptions -> archplan specs.

`hf.import_hf(path)` reads a Hugging Face config.json (or a model folder holding one); `hf.read_hf`
also returns the keys it ignored. Specs are
written with `archplan.planning.spec_yaml`/`write_spec`, the project's one spec writer, so an imported
spec reads like a preset and is checked to load back identical.
"""

from __future__ import annotations

from archplan.importers.hf import FAMILIES, Imported, convert_config, import_hf, read_hf, spec_from_config

__all__ = ["FAMILIES", "Imported", "convert_config", "import_hf", "read_hf", "spec_from_config"]
