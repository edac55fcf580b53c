"""`archplan compare`: the same figures as `size`, side by side, ratios against the first column."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from typer.testing import CliRunner

from archplan.cli import app
from archplan.loader import load_spec
from archplan.render import compare_figures
from archplan.report import SizeOptions, size_report
from archplan.units import ratio, sci

runner = CliRunner()


def compare_rows(reports: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    """Each figure of `compare`'s table with its value in each report, unformatted."""
    return [(figure.name, [figure.get(r) for r in reports]) for figure in compare_figures(reports)]


def compare_json(*argv: str) -> list[dict[str, Any]]:
    result = runner.invoke(app, ["compare", *argv, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_is_a_list_of_size_objects() -> None:
    reports = compare_json("llama-3-8b", "mixtral-8x7b", "gpt2", "--context", "1024")
    assert [r["name"] for r in reports] == ["llama-3-8b", "mixtral-8x7b", "gpt2"]
    for r in reports:
        single = runner.invoke(app, ["size", r["source"], "--context", "1024", "--json"])
        assert json.loads(single.stdout) == r  # exactly what `size` prints for that spec


def test_options_apply_to_every_spec() -> None:
    reports = compare_json("llama-3-8b", "mistral-7b", "--context", "16384", "--batch", "2",
                           "--seq", "1024", "--tokens", "1T")
    for r in reports:
        assert (r["kv_cache"]["context"], r["kv_cache"]["batch"]) == (16384, 2)
        assert r["flops"]["seq_len"] == 1024
        assert r["chinchilla"]["tokens"] == 1e12
    # Mistral's sliding window caps its cache at 4096 of the 16384 positions
    assert reports[1]["kv_cache"]["bytes"] * 4 == reports[0]["kv_cache"]["bytes"]


def test_ratios_against_the_first_column() -> None:
    opts = SizeOptions(context=4096)
    reports = [size_report(load_spec(name), opts, source=name) for name in ("llama-3-8b", "mixtral-8x7b")]
    rows = dict(compare_rows(reports))
    assert rows["params total"] == [8_030_261_248, 46_702_792_704]
    assert rows["params active"] == [8_030_261_248, 12_879_925_248]
    result = runner.invoke(app, ["compare", "llama-3-8b", "mixtral-8x7b", "--context", "4096"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("params total"))
    assert "8.03 B" in line and "46.7 B (5.82×)" in line
    active = next(ln for ln in result.stdout.splitlines() if ln.startswith("params active"))
    assert f"({12_879_925_248 / 8_030_261_248:.2f}×)" in active
    assert "ratios (×) against llama-3-8b" in result.stdout
    assert "training activations bf16, eager attention, recompute none, micro-batch 1; int4: every parameter at that width" in " ".join(result.stdout.split())


def test_a_model_without_a_per_token_cache_shows_none_not_0_b() -> None:
    """Beside counts in B (billions), Mamba's "0 B" of KV cache per token read as a count."""
    result = runner.invoke(app, ["compare", "mamba-2.8b", "llama-2-7b"], env={"COLUMNS": "200"})
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("KV cache/token"))
    assert result.exit_code == 0 and "none" in line and "512 KiB" in line and "0 B" not in line


def test_the_cache_parts_not_per_token_are_rows_of_their_own() -> None:
    """hyena-153m's 30.4 KiB a token × 2,048 is 60.8 MiB of its 182 MiB cache: the rest, its fp32
    filters (shared by the batch) and the short convolutions' state, get rows as in `size`; a
    comparison of attention models alone has neither row."""
    result = runner.invoke(app, ["compare", "hyena-153m", "mamba-2.8b"], env={"COLUMNS": "200"})
    lines = result.stdout.splitlines()
    filters = next(ln for ln in lines if ln.startswith("  of which Hyena filters"))
    state = next(ln for ln in lines if ln.startswith("  of which constant state"))
    assert result.exit_code == 0 and "122 MiB" in filters and "12.5 MiB" in state
    plain = runner.invoke(app, ["compare", "llama-2-7b", "mistral-7b"], env={"COLUMNS": "200"}).stdout
    assert "of which" not in plain


def test_the_caption_names_a_residual_stream_wider_than_the_activations() -> None:
    result = runner.invoke(app, ["compare", "gpt2", "llama-3-8b", "--residual-dtype", "fp32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training activations bf16, residual stream fp32, eager attention" in " ".join(result.stdout.split())


def test_small_ratios_keep_their_digits_and_the_budget_row_reads_evenly() -> None:
    # a 0.0031 ratio printed as (0.00×); the budget row mixed 9.2e+20 with 7.74e+21
    result = runner.invoke(app, ["compare", "mamba-2.8b", "llama-3-8b", "hyena-153m", "s4d-lm"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    budget = next(ln for ln in result.stdout.splitlines() if ln.startswith("budget 6ND (FLOP)"))
    assert re.findall(r"\d\.\d\de\+\d\d", budget) == ["9.20e+20", "7.74e+21", "2.83e+18", "1.45e+18"]
    assert "(0.0031×)" in budget and "0.00×" not in result.stdout


@pytest.mark.parametrize(("value", "text"), [
    (5.8234, "5.82×"), (1.0, "1.00×"), (0.54, "0.54×"), (0.0564, "0.056×"), (0.0031, "0.0031×"),
    (0.0999, "0.10×"), (3e-5, "0.000030×"), (0.0, "0.00×"),
])
def test_ratio_has_two_significant_digits_below_one_tenth(value: float, text: str) -> None:
    assert ratio(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (1e24, "1e+24"), (5.76e23, "5.76e+23"), (9.996e23, "1.00e+24"), (2.5e19, "2.5e+19"), (2.5004e19, "2.50e+19"),
])
def test_sci_is_short_only_for_a_value_it_shows_exactly(value: float, text: str) -> None:
    # size's model-FLOPs row showed a computed 9.996e+23 as 1e+24, as if it were a round input
    assert sci(value) == text


def test_gpu_hours_row_when_asked() -> None:
    result = runner.invoke(app, ["compare", "gpt2", "bloom-560m", "--gpu", "a100", "--law", "besiroglu2024"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "GPU-hours" in result.stdout and "N_opt (besiroglu2024)" in result.stdout
    assert "hoffmann2022" not in result.stdout


def test_piped_output_cuts_no_figure() -> None:
    """Piped (CI logs, files) there is no terminal width to honour: the table takes its own width."""
    specs = ["llama-3-8b", "mixtral-8x7b", "deepseek-v3", "qwen3-235b-a22b", "frontier-1t-moe", "gpt2"]
    result = runner.invoke(app, ["compare", *specs])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    assert "163,840 (20.00×)" in result.stdout and "1.60 T (199.25×)" in result.stdout


@pytest.mark.parametrize("name", ["a[/]", "a[b]"])
def test_a_spec_name_is_printed_as_written_not_read_as_markup(name: str, tmp_path: Any) -> None:
    """rich reads `[...]` in a string as markup: `compare` crashed on a spec named "a[/]" and printed
    "a[b]" as "a"; plan's and verify's titles took the name the same way."""
    spec = tmp_path / "named.yaml"
    spec.write_text(f'name: "{name}"\nvocab_size: 1024\nd_model: 256\nn_layers: 2\n'
                    "attention: {kind: mha, n_heads: 4}\nffn: {kind: glu, d_ff: 512}\n")
    for args in (["compare", str(spec), "gpt2"], ["plan", str(spec), "--gpus", "8", "--tokens", "1B"],
                 ["verify", str(spec), "--no-cpu-check", "--no-backward"]):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and name in result.output, (args, result.output[-500:])


def test_the_tokens_the_budget_is_priced_at_are_shown() -> None:
    """With --tokens (or a spec's training.tokens) the budget and loss rows price that D: the table
    shows it beside the 20-per-parameter reference, which they do not use."""
    rows = dict(compare_rows([size_report(load_spec(name), SizeOptions(tokens=15e12))
                              for name in ("llama-3-8b", "llama-3-70b")]))
    assert rows["tokens D (--tokens)"] == [15e12, 15e12]
    assert rows["tokens 20/param"] == [20 * 8_030_261_248, 20 * 70_553_706_496]
    assert rows["budget 6ND (FLOP)"] == [6 * 8_030_261_248 * 15e12, 6 * 70_553_706_496 * 15e12]
    plain = dict(compare_rows([size_report(load_spec("gpt2"), SizeOptions())]))
    assert not any(name.startswith("tokens D") for name in plain)


def test_near_equal_figures_are_told_apart_and_losses_compared_by_difference() -> None:
    """"1.00×" stood beside 4.01 GiB against 4.00 GiB and beside losses 0.008 nat apart (a ratio of
    two losses near 2 is always about 1): a ratio two decimals round to 1 gets more, a loss its
    difference; and with an SSM model in the list the 51-character labels left an 80-column
    terminal 7 columns a value, folding every cell."""
    from archplan.units import ratio

    assert [ratio(x) for x in (1.0, 1.0035, 0.9965, 0.99999, 5.82)] == ["1.00×", "1.004×", "0.997×", "0.99999×", "5.82×"]
    out = runner.invoke(app, ["compare", "llama-3-8b", "qwen2.5-7b"], env={"COLUMNS": "200"}).stdout
    loss = next(ln for ln in out.splitlines() if ln.startswith("loss (hoffmann2022)"))
    assert "2.1711 (Δ +0.0076)" in loss and "×" not in loss
    narrow = runner.invoke(app, ["compare", "llama-3-8b", "mixtral-8x7b", "mamba-2.8b"], env={"COLUMNS": "80"}).stdout
    row = next(ln for ln in narrow.splitlines() if ln.startswith("params total"))
    assert row.split("│")[-1].strip() == "2.77 B (0.34×)"  # whole on one line
    size = runner.invoke(app, ["size", "mamba-2.8b"], env={"COLUMNS": "200"}).stdout
    assert next(ln for ln in size.splitlines() if ln.startswith("per token (one sequence)")).split("│")[-1].strip() == "none"


@pytest.mark.parametrize("order", [("deepseek-v3", "deepseek-v3-mtp"), ("deepseek-v3-mtp", "deepseek-v3")])
def test_the_mtp_caveats_follow_the_column_not_the_first_one(order: tuple[str, str]) -> None:
    """The caption took its FLOP convention from the first column: with deepseek-v3 first, the
    -mtp column's training FLOPs (more than 3 x forward) and its weights rows (which leave the
    multi-token-prediction modules out) stood under a caption that said neither."""
    out = " ".join(runner.invoke(app, ["compare", *order], env={"COLUMNS": "200"}).stdout.split())
    assert ("deepseek-v3-mtp: training also runs the multi-token-prediction modules, which inference does not, "
            "so training is more than 3 x forward; the weights and inference rows leave those modules out.") in out
    assert "deepseek-v3: training" not in out
    assert out.count("multi-token") == 1


def test_a_narrow_terminal_breaks_between_a_figure_and_its_ratio_never_inside_a_number() -> None:
    """Five specs on 80 columns gave each value 6 characters: "(246.59×)" printed as "(246.5" over
    "9×)", and a loss's "(Δ -0.3577)" broke at its space. Too narrow for one-line rows, each ratio
    goes below its figure, every value column as wide as its longest line, the names folded into
    what is left."""
    specs = ["mamba-2.8b", "llama-3-8b", "hyena-153m", "deepseek-v3-mtp", "s4d-lm"]
    narrow = runner.invoke(app, ["compare", *specs, "--context", "2048", "--seq", "1024"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0
    table = [ln for ln in narrow.stdout.splitlines() if "│" in ln]
    assert all(len(ln) <= 80 for ln in table)
    cells = [cell.strip() for ln in table for cell in ln.split("│")[1:]]
    assert "(246.59×)" in cells and "(Δ -0.3577)" in cells and "5.53 GFLOP" in cells
    assert all(cell.count("(") == cell.count(")") for cell in cells)
    assert all(not cell or re.fullmatch(r"[\d.,]+(e[+-]\d+)?( \w+)?|\(.+\)|none|—", cell) for cell in cells)
    wide = runner.invoke(app, ["compare", *specs, "--context", "2048", "--seq", "1024"], env={"COLUMNS": "100"})
    assert any(ln.startswith("forward/token (full)") for ln in wide.stdout.splitlines())  # names whole where they fit


@pytest.mark.parametrize("specs", [
    ("deepseek-v3", "qwen3-235b-a22b", "mixtral-8x7b", "llama-3.1-405b"),
    ("gpt2", "claude-3-opus-rumored", "deepseek-v3-mtp", "qwen3-235b-a22b", "hybrid-ssm-moe", "stripedhyena-7b",
     "frontier-1t-moe"),
])
def test_no_width_crops_a_figure(specs: tuple[str, ...]) -> None:
    """A header wider than its column's figures (llama-3.1-405b, claude-3-opus-rumored) held the
    stacked layout's columns wider than their share, and Rich cropped the last: "406 B" printed as
    "406" at 72 columns. Every figure and ratio the wide table prints is whole at every width that
    leaves the names their few columns."""
    from archplan.render import MIN_NAME_WIDTH

    wide = runner.invoke(app, ["compare", *specs, "--gpu", "h100"], env={"COLUMNS": "400"}).stdout
    rows = [[re.split(r" (?=\()", cell.strip()) for cell in ln.split("│")[1:]]
            for ln in wide.splitlines() if "│" in ln]
    figures = {part for row in rows for cell in row for part in cell if part}
    # the narrowest terminal the stacked layout holds: each value column its longest line
    least = sum(max(len(part) for row in rows for part in row[i]) for i in range(len(specs)))
    for columns in range(least + 3 * len(specs) + MIN_NAME_WIDTH, 200, 3):
        out = runner.invoke(app, ["compare", *specs, "--gpu", "h100"], env={"COLUMNS": str(columns)}).stdout
        table = [ln for ln in out.splitlines() if "│" in ln]
        assert all(len(ln) <= columns for ln in table), columns
        cells = {cell.strip() for ln in table for cell in ln.split("│")[1:]}
        parts = {part for cell in cells for part in re.split(r" (?=\()", cell) if part}
        assert figures <= parts, (columns, sorted(figures - parts)[:5])
