"""benchmarks/seed_claims.py in --quick mode: every claim is computed and the page renders; the
figures that do not depend on timing are checked against independent arithmetic."""

from __future__ import annotations

import json

import pytest
import yaml
from benchmark_scripts import ROOT, load_benchmark

pytestmark = pytest.mark.xdist_group("test_seed_claims")

GiB = 1 << 30


seed_claims = load_benchmark("seed_claims")


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    doc = tmp_path_factory.mktemp("claims") / "seed-claims.md"
    result = seed_claims.run(quick=True, spec_dir=ROOT / "benchmarks" / "specs")
    json.dumps(result)  # what --json prints
    return result, seed_claims.render_doc(result, doc.parent / "sweep.png", doc)


def test_every_claim_has_a_figure_and_a_verdict(quick) -> None:
    result, _ = quick
    claims = result["claims"]
    assert len(claims) == 6
    for c in claims:
        assert c["figure"]
        assert c["verdict"] in ("holds", "holds partly", "does not hold", "not measured")
    assert result["machine"]["cores"] >= 1 and result["runtime_s"] > 0


def test_gqa_ratios_are_the_head_ratios_and_the_modules_agree(quick) -> None:
    gqa = quick[0]["claims"][1]["details"]
    assert gqa["modules_equal_analytic"]
    ratios = {n: r["ratio"] for n, r in gqa["recipes"].items()}
    assert ratios == {"7b": 4, "70b": 8, "frontier-1t-moe": 16}
    assert {n: r["context"] for n, r in gqa["recipes"].items()} == {"7b": 32768, "70b": 131072,
                                                                    "frontier-1t-moe": 1 << 20}


def test_frontier_kv_at_one_million_tokens_is_480_gib(quick) -> None:
    million = quick[0]["claims"][5]["details"]["frontier_1m"]
    # 120 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes x 2^20 tokens
    assert million["frontier-1t-moe"]["kv_bytes"] == 120 * 2 * 8 * 128 * 2 * (1 << 20) == 480 * GiB
    # 5 of 6 layers windowed at 4096: 20 global layers hold the full context
    swa = million["frontier-1m-swa"]["kv_bytes"]
    assert swa == 20 * 2 * 8 * 128 * 2 * (1 << 20) + 100 * 2 * 8 * 128 * 2 * 4096
    # MLA caches kv_lora_rank + qk_rope_head_dim = 576 elements per layer and token
    assert million["frontier-1m-mla"]["kv_bytes"] == 120 * 576 * 2 * (1 << 20)
    assert million["frontier-1m-mla"]["total_params"] < million["frontier-1t-moe"]["total_params"]
    assert million["frontier-1m-swa"]["total_params"] == million["frontier-1t-moe"]["total_params"]


def test_moe_and_tokens_figures(quick) -> None:
    claims = quick[0]["claims"]
    mixtral = claims[3]["details"]["models"]["mixtral-8x7b"]
    assert mixtral["total"] == 46702792704 and mixtral["active"] == 12879925248
    per_param = claims[4]["details"]["tokens_per_param"]
    assert 15 < per_param["besiroglu2024"]["1e+23"] < 25 < per_param["hoffmann2022"]["1e+23"]


def test_equal_parameter_family(quick) -> None:
    result, _ = quick
    params = [s["params"] for s in result["sweeps"]]
    ffn_column = 3 * result["scale"]["d_model"] * result["scale"]["n_layers"]
    assert max(params) - min(params) <= ffn_column
    for s in result["sweeps"]:
        assert set(s["exponent"]) >= {"time", "time_analytic", "memory", "memory_analytic"}


def test_page_renders_every_section(quick) -> None:
    _, page = quick
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "What makes 1M practical"):
        assert heading in page
    assert "480.0 GiB" in page and "![time and memory against length](sweep.png)" in page


def test_committed_specs_are_the_generated_ones(tmp_path) -> None:
    written = seed_claims.write_specs(tmp_path)
    committed = ROOT / "benchmarks" / "specs"
    # the committed files that say they are generated are exactly those write_specs writes: a spec
    # the script no longer generates (or one never committed) fails here, not only a changed one
    header = written[0].read_text().splitlines()[0]
    generated = {path.name for path in committed.glob("*.yaml") if path.read_text().startswith(header + "\n")}
    assert generated == {path.name for path in written} == {path.name for path in tmp_path.iterdir()}
    for path in written:
        assert yaml.safe_load(path.read_text()) == yaml.safe_load((committed / path.name).read_text()), path.name


def test_main_writes_the_specs(tmp_path, capsys) -> None:
    assert seed_claims.main(["--write-specs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("wrote") == len(list(tmp_path.iterdir())) == 9


def test_main_renders_the_page_from_an_earlier_json(quick, tmp_path, capsys) -> None:
    saved, doc = tmp_path / "claims.json", tmp_path / "page.md"
    saved.write_text(json.dumps(quick[0], default=str))
    assert seed_claims.main(["--from-json", str(saved), "--doc", str(doc)]) == 0
    assert doc.read_text().startswith("# The guide's claims")
    assert "holds" in capsys.readouterr().out
