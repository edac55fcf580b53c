"""`archplan schema`: the committed archplan/spec.schema.json is what the code generates, and it
validates every preset (the presets point editors at it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

from archplan.cli import main
from archplan.commands.schema import render_schema
from archplan.errors import ArchplanError
from archplan.loader import PRESETS_DIR, LoadedYaml, parse_yaml, spec_from_data

pytestmark = pytest.mark.xdist_group("test_schema")

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "archplan" / "spec.schema.json"
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=../spec.schema.json"


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["archplan", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_committed_schema_is_up_to_date() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render_schema(), (
        "archplan/spec.schema.json is stale: run `archplan schema --output archplan/spec.schema.json --force`"
    )


def test_schema_uses_draft_2020_12(validator) -> None:
    assert validator.schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert validator.schema["title"] == "Spec"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_schema_validates_preset(preset: Path, validator) -> None:
    text = preset.read_text(encoding="utf-8")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(parse_yaml(text, preset.name).data)]
    assert errors == []


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_points_editors_at_the_schema(preset: Path) -> None:
    assert preset.read_text(encoding="utf-8").splitlines()[0] == MODELINE


def test_schema_rejects_what_the_spec_rejects(validator) -> None:
    clean = ROOT / "tests" / "lint_fixtures" / "AP003_pass.yaml"
    good = parse_yaml(clean.read_text(encoding="utf-8"), clean.name).data
    assert validator.is_valid(good)
    assert not validator.is_valid({**good, "n_layer": 4})  # unknown field (extra="forbid")
    assert not validator.is_valid({**good, "d_model": 0})  # out of range
    assert not validator.is_valid({**good, "position": {"kind": "rotary"}})  # unknown kind
    # a tagged union's tag is required, as the loader's discriminated union requires it
    assert not validator.is_valid({**good, "position": {"theta": 5e5}})
    assert not validator.is_valid({**good, "attention": {"n_heads": 4}})
    # control characters: none in a name, prose keeps its line breaks and tabs, as the loader rules
    assert not validator.is_valid({**good, "name": "a\x1b[31mb"})
    assert not validator.is_valid({**good, "description": "x\x07"})
    assert validator.is_valid({**good, "description": "two\nlines\tand a tab"})


@pytest.mark.parametrize(("block", "field", "value", "said"), [
    ("long_conv", "emb_dim", 1, "must be odd and >= 3"),
    ("long_conv", "emb_dim", 4, "must be odd and >= 3"),
    ("long_conv", "d_state", 63, "is odd"),
    ("attention", "qk_rope_head_dim", 7, "must be even"),
])
def test_the_schema_refuses_the_one_field_rules_the_loader_does(validator, block: str, field: str, value: int,
                                                                said: str) -> None:
    """An editor took an even Hyena emb_dim, an odd S4 d_state and an odd MLA rope head size that
    `size` then refused: rules of one field each, which JSON Schema can state."""
    base = {"long_conv": {"emb_dim": "hyena-153m", "d_state": "s4d-lm"},
            "attention": {"qk_rope_head_dim": "deepseek-v3"}}[block][field]
    data = parse_yaml((PRESETS_DIR / f"{base}.yaml").read_text(encoding="utf-8"), base).data
    assert validator.is_valid(data)
    broken = {**data, block: {**data[block], field: value}}
    assert not validator.is_valid(broken)
    with pytest.raises(ArchplanError, match=said):
        spec_from_data(LoadedYaml(broken, {}), base)


def test_schema_command_prints_and_writes(tmp_path, monkeypatch, capsys) -> None:
    assert run_cli(monkeypatch, "schema") == 0
    assert capsys.readouterr().out == render_schema()
    target = tmp_path / "spec.schema.json"
    assert run_cli(monkeypatch, "schema", "--output", str(target)) == 0
    assert target.read_text(encoding="utf-8") == render_schema()
    target.write_text("old", encoding="utf-8")
    assert run_cli(monkeypatch, "schema", "--output", str(target)) == 2
    assert "--force" in capsys.readouterr().err
    assert target.read_text(encoding="utf-8") == "old"
    assert run_cli(monkeypatch, "schema", "-o", str(target), "--force") == 0
    assert target.read_text(encoding="utf-8") == render_schema()


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_the_schema_survives_a_stream_without_its_characters(encoding: str) -> None:
    """The descriptions' `Σ` and `→` came out as `?` on cp1252 (a Windows redirect) and as raw UTF-8
    on ASCII: the document printed was not the schema. JSON's own escapes keep it whole."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "schema"],
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert proc.returncode == 0 and proc.stdout.isascii()
    assert json.loads(proc.stdout) == json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_schema_names_a_force_or_folder_that_cannot_work(tmp_path, monkeypatch, capsys) -> None:
    """--force with nothing to overwrite, and a folder that is not there, worded as plan's -o."""
    assert run_cli(monkeypatch, "schema", "--force") == 2
    assert "without it the schema goes to stdout" in capsys.readouterr().err
    assert run_cli(monkeypatch, "schema", "-o", str(tmp_path / "no" / "spec.schema.json")) == 2
    assert "-o/--output: directory does not exist" in capsys.readouterr().err


def test_a_modeline_to_a_schema_under_a_path_with_a_space_is_a_uri(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """yaml-language-server reads `$schema=` up to the first blank: an install under "Program
    Files" or "/Users/Jane Doe" pointed editors at `.../Jane`. Such a path is a file:// URI."""
    from archplan import modeline

    schema = tmp_path / "with space" / "spec.schema.json"
    schema.parent.mkdir()
    schema.write_text("{}")
    monkeypatch.setattr(modeline, "schema_file", lambda: schema)
    for out in (None, str(tmp_path / "spec.yaml"), str(tmp_path / "with space" / "spec.yaml")):
        line = modeline.modeline(out)
        reference = line.removeprefix("# yaml-language-server: $schema=")
        assert " " not in reference
        if reference.startswith("file:"):
            assert reference == schema.as_uri()
        else:  # beside it: no space in the relative path
            assert (Path(out or "").parent / reference).resolve() == schema.resolve()
