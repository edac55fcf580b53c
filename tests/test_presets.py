"""Every bundled preset loads, resolves, and its `reference:` totals equal the analytic count;
presets with an entry in fixtures/expected.json (transformers on meta) match it exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archplan.analytic import count_params
from archplan.loader import PRESETS_DIR, load_spec, preset_names
from archplan.resolve import resolve

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["models"]
# Preset name -> key in expected.json where the two differ (the HF repos carry a version suffix).
FIXTURE_KEY = {"mistral-7b": "mistral-7b-v0.1", "mixtral-8x7b": "mixtral-8x7b-v0.1"}
REQUIRED = {
    "7b", "70b", "frontier-1t-moe", "gpt2", "llama-2-7b", "llama-3-8b", "llama-3-70b",
    "llama-3.1-405b", "mistral-7b", "mixtral-8x7b", "deepseek-v3", "falcon-7b", "bloom-560m",
    "mamba-2.8b", "jamba-v0.1", "hybrid-ssm-moe", "gemma-2b", "qwen2.5-7b",
}
WITH_FIXTURE = sorted(n for n in preset_names() if FIXTURE_KEY.get(n, n) in EXPECTED)


def test_required_presets_exist() -> None:
    assert REQUIRED <= set(preset_names())


def test_every_fixture_model_has_a_preset() -> None:
    assert {FIXTURE_KEY.get(n, n) for n in WITH_FIXTURE} == set(EXPECTED)


@pytest.mark.parametrize("name", preset_names())
def test_preset_header_and_reference(name: str) -> None:
    path = PRESETS_DIR / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../spec.schema.json"
    spec = load_spec(name)
    assert spec.name == name
    ref = spec.reference
    assert ref is not None and ref.source
    params = count_params(resolve(spec))
    assert ref.total_params == params.total
    assert ref.active_params == params.active


@pytest.mark.parametrize("name", WITH_FIXTURE)
def test_preset_matches_transformers(name: str) -> None:
    expected = EXPECTED[FIXTURE_KEY.get(name, name)]
    params = count_params(resolve(load_spec(name)))
    assert params.total == expected["total_params"]
    assert params.active == expected["active_params"]
    assert params.embedding == expected["embedding_params"]
    assert params.position_embedding == expected["position_embedding_params"]
    assert params.non_embedding == expected["non_embedding_params"]
    head = expected["lm_head_params"]
    assert params.lm_head == (0 if expected["lm_head_tied_to_embedding"] else head)


@pytest.mark.parametrize("name", WITH_FIXTURE)
def test_block_sizes_match_transformers(name: str) -> None:
    """Each group of identical HF blocks has the same size here (norms + mixer + FFN/MoE)."""
    expected = EXPECTED[FIXTURE_KEY.get(name, name)]
    params = count_params(resolve(load_spec(name)))
    for block in expected["blocks"]:
        for index in _layer_indices(block["layers"]):
            prefix = f"layers.{index}."
            size = sum(v for k, v in params.by_component.items() if k.startswith(prefix))
            assert size == block["params_per_block"], (name, index)


def _layer_indices(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_llama_3_1_405b_by_arithmetic() -> None:
    """126·(2·16384² + 2·16384·1024 + 3·16384·53248 + 2·16384) + 2·128256·16384 + 16384."""
    d, layers, ff, vocab = 16384, 126, 53248, 128256
    layer = 2 * d * d + 2 * d * 8 * 128 + 3 * d * ff + 2 * d
    assert layer == 3_187_703_808
    total = layers * layer + 2 * vocab * d + d
    assert total == 405_853_388_800
    assert count_params(resolve(load_spec("llama-3.1-405b"))).total == total


def test_hybrid_example_by_arithmetic() -> None:
    """The hand count in presets/hybrid-ssm-moe.yaml, rebuilt from the module formulas of docs/formulas.md §1.9."""
    d, d_inner, n, heads = 2048, 4096, 128, 64
    conv_dim = d_inner + 2 * n
    mamba = d * (2 * d_inner + 2 * n + heads) + d_inner * d + conv_dim * 5 + 3 * heads + d_inner
    attention = 2 * d * 16 * 128 + 2 * d * 4 * 128
    dense = 3 * d * 5632
    expert = 3 * d * 1408
    moe = d * 16 + 16 * expert + expert + d
    moe_active = d * 16 + 2 * expert + expert + d
    # layers 5, 11, 17, 23 are attention (MMMMMA), odd layers MoE: 4 attn+MoE, 8 Mamba+MoE, 12 Mamba+dense
    body = 4 * attention + 20 * mamba + 12 * dense + 24 * 2 * d
    total = body + 12 * moe + 2 * 32000 * d + d
    active = body + 12 * moe_active + 2 * 32000 * d + d
    params = count_params(resolve(load_spec("hybrid-ssm-moe")))
    assert (params.total, params.active) == (total, active)


def test_presets_name_prints_and_writes_the_preset_to_start_from(tmp_path: Path) -> None:
    """`archplan presets NAME` prints the preset's YAML, comments and all, its modeline pointed at
    the installed schema; `-o` writes it (never over a file without --force), the modeline
    relative to where the copy goes, and the copy sizes as the preset does."""
    from typer.testing import CliRunner

    from archplan.cli import app
    from archplan.errors import ArchplanError
    from archplan.modeline import schema_file

    runner = CliRunner()
    shipped = (PRESETS_DIR / "deepseek-v3.yaml").read_text()
    printed = runner.invoke(app, ["presets", "deepseek-v3"])
    assert printed.exit_code == 0
    first, rest = printed.stdout.split("\n", 1)
    assert first == f"# yaml-language-server: $schema={schema_file()}" and rest == shipped.split("\n", 1)[1]
    copy = tmp_path / "specs" / "mine.yaml"
    copy.parent.mkdir()
    written = runner.invoke(app, ["presets", "deepseek-v3.yaml", "-o", str(copy)])
    assert written.exit_code == 0 and "wrote" in written.stderr and written.stdout == ""
    reference = copy.read_text().splitlines()[0].removeprefix("# yaml-language-server: $schema=")
    assert (copy.parent / reference).resolve() == schema_file().resolve()
    assert load_spec(str(copy)) == load_spec("deepseek-v3")
    again = runner.invoke(app, ["presets", "gpt2", "-o", str(copy)])
    assert isinstance(again.exception, ArchplanError) and "pass --force to overwrite" in str(again.exception)
    assert runner.invoke(app, ["presets", "gpt2", "-o", str(copy), "--force"]).exit_code == 0
    assert load_spec(str(copy)).name == "gpt2"
    listed = json.loads(runner.invoke(app, ["presets", "gpt2", "--json"]).stdout)
    assert listed[0]["name"] == "gpt2" and listed[0]["total"] == 124_439_808 and listed[0]["yaml"].startswith("#")


@pytest.mark.parametrize(("argv", "said"), [
    (["presets", "gpt3"], "gpt3: no such preset; did you mean preset 'gpt2'?"),
    (["presets", "-o", "x.yaml"], "-o writes one preset: give its NAME"),
    (["presets", "gpt2", "--force"], "--force overwrites the -o file"),
    (["presets", "gpt2", "-o", "x.json"], "-o/--output"),
])
def test_presets_name_refusals(argv: list[str], said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from archplan.cli import app
    from archplan.errors import ArchplanError

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, ArchplanError) and said in str(result.exception)
    assert not list(tmp_path.iterdir())
