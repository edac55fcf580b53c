"""`archplan size` and `archplan presets`: the --json contract (docs/json.md), docs/formulas.md test vectors
end to end, option handling and the human table."""

from __future__ import annotations

import builtins
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from archplan.analytic.memory import ATTENTION_KERNELS, RECOMPUTE_MODES
from archplan.analytic.scaling import LAW_SYNONYMS, LAWS
from archplan.cli import app
from archplan.commands.size import KVDTypeChoice, LawChoice, MemoryKernelChoice, RecomputeChoice, parse_amount
from archplan.dtypes import DType
from archplan.errors import ArchplanError
from archplan.loader import preset_names

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"

CONTRACT = [
    "params.total", "params.active", "params.embedding", "params.by_component",
    "flops.forward_per_token", "flops.training_per_token", "flops.attention",
    "kv_cache.bytes_per_token", "kv_cache.bytes", "memory.weights_bytes", "memory.training_bytes",
    "chinchilla.optimal_tokens", "chinchilla.training_flops",
]


def size_json(*argv: str) -> dict[str, Any]:
    result = runner.invoke(app, ["size", *argv, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def dig(obj: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part]
    return obj


def test_json_contract_keys_and_types() -> None:
    r = size_json("llama-3-8b")
    for key in CONTRACT:
        value = dig(r, key)
        assert value is not None, key
    assert r["flops"]["attention"] in ("full", "causal")
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in r["params"]["by_component"].items())
    assert isinstance(r["params"]["total"], int) and isinstance(r["kv_cache"]["bytes"], int)


def test_llama3_8b_matches_formulas_vectors() -> None:
    r = size_json("llama-3-8b", "--seq", "8192", "--context", "8192")
    expected = json.loads((FIXTURES / "expected.json").read_text())
    assert r["params"]["total"] == 8_030_261_248 == expected["models"]["llama-3-8b"]["total_params"]
    assert r["params"]["embedding"] == 128256 * 4096
    assert sum(r["params"]["by_component"].values()) == r["params"]["total"]
    assert sum(k["total"] for k in r["params"]["by_kind"].values()) == r["params"]["total"]
    # docs/formulas.md §7: recommended training FLOPs (6·P_matmul + 12LHQT) and decode at 8192 (§2.8)
    assert r["flops"]["training_per_token"] == 57_912_852_480
    assert r["flops"]["forward_per_token"] * 3 == r["flops"]["training_per_token"]
    assert r["flops"]["decode_per_token"] == 19_304_284_160
    assert r["flops"]["six_n_active"] == 48_181_567_488
    # docs/formulas.md §3 and §4.1
    assert r["kv_cache"]["bytes_per_token"] == 131_072
    assert r["kv_cache"]["bytes"] == 1 << 30
    assert r["memory"]["weights_bytes"] == 16_060_522_496
    assert r["memory"]["weights_by_dtype"] == {
        "fp32": 32_121_044_992, "bf16": 16_060_522_496, "fp8": 8_030_261_248, "int8": 8_030_261_248,
        "int4": 4_015_130_624, "int4-g128": 5_700_591_616}
    t = r["memory"]["training"]
    assert t["weights"] + t["grads"] + t["optimizer"] == 16 * r["params"]["total"]
    # the peak of the step (docs/figures.md §5.3): the loss backward at a 128K vocabulary
    assert t["peak_phase"] == "loss backward"
    assert t["phases"]["loss backward"] == t["activations"] + t["loss_backward"]
    assert t["loss_backward"] == 2 * 4 * t["micro_batch"] * t["seq_len"] * 128_256
    assert t["optimizer_step"] == 4 * r["params"]["total"] and t["tied_grad_sum"] == 0
    assert r["memory"]["training_bytes"] == 16 * r["params"]["total"] + max(t["phases"].values())


@pytest.mark.parametrize(("argv", "phase", "rows"), [
    (["llama-2-7b"], "attention backward",
     ["activations kept", "of which alive at the core's backward", "attention's s×s gradients (dP, dS)"]),
    (["llama-3-8b"], "loss backward", ["activations kept", "loss backward (2 fp32 n×V)"]),
    (["gpt2", "--recompute", "full", "--attention-kernel", "flash", "--seq", "64"], "optimizer step",
     ["activations kept (freed by then)"]),
])
def test_the_table_breaks_the_peak_phase_down(argv: list[str], phase: str, rows: list[str]) -> None:
    """Under the total, the peak phase's own parts: what is alive then and the transient that makes
    it the peak (they add up to the step peak row), with `attention_backward` in --json."""
    t = size_json(*argv)["memory"]["training"]
    assert t["peak_phase"] == phase
    if phase == "attention backward":
        # llama-2-7b at 4,096 tokens, eager: two 16-bit s×s gradients of 32 heads
        assert t["attention_backward"] == 2 * 2 * 32 * 4096**2
        assert t["attention_backward"] < t["phases"][phase] < t["activations"] + t["attention_backward"]
    text = runner.invoke(app, ["size", *argv], env={"COLUMNS": "200"}).output
    assert f"step peak: {phase}" in text
    for row in rows:
        assert f"  {row} " in text


def test_chinchilla_block() -> None:
    r = size_json("mixtral-8x7b")
    c = r["chinchilla"]
    total, active = 46_702_792_704, 12_879_925_248
    assert (r["params"]["total"], r["params"]["active"]) == (total, active)
    # N = the active count for routed experts, as plan and lint read it: C = 6·N·D is the run's compute
    assert c["n_params_kind"] == "active" and c["n_params"] == active
    assert (c["total_params"], c["active_params"]) == (total, active)
    assert c["optimal_tokens"] == 20 * active
    assert c["tokens"] == 20 * active
    assert c["training_flops"] == pytest.approx(6 * active * 20 * active)
    assert set(c["laws"]) == {"hoffmann2022", "besiroglu2024"}
    hoff = c["laws"]["hoffmann2022"]
    assert hoff["loss"] == pytest.approx(1.69 + 406.4 / active**0.34 + 410.7 / (20 * active) ** 0.28)
    assert 6 * hoff["optimal_params"] * hoff["optimal_tokens"] == pytest.approx(c["training_flops"])


def test_tokens_gpu_and_law_options() -> None:
    r = size_json("llama-3-8b", "--tokens", "15T", "--gpu", "h100", "--mfu", "0.5",
                  "--law", "besiroglu2024", "--law", "hoffmann2022-tex")
    c = r["chinchilla"]
    assert c["tokens"] == 15e12
    assert c["training_flops"] == pytest.approx(6 * r["params"]["total"] * 15e12)
    assert list(c["laws"]) == ["besiroglu2024", "hoffmann2022-tex"]
    g = c["gpu"]
    assert g["peak_flops_per_s"] == 989.4e12 and g["dtype"] == "bf16"
    assert g["training_flops"] == pytest.approx(r["flops"]["training_per_token"] * 15e12)
    assert g["gpu_hours"] == pytest.approx(g["training_flops"] / (989.4e12 * 0.5) / 3600)
    assert g["gpu_hours_6nd"] == pytest.approx(c["training_flops"] / (989.4e12 * 0.5) / 3600)
    assert g["gpu_hours_6nd_active"] == g["gpu_hours_6nd"]  # a dense model: every parameter is active


def test_an_moe_prices_6nd_at_its_active_parameters_too() -> None:
    """6·N_total·D overstates an MoE's compute by total / active (17.9× for DeepSeek-V3): the
    active figure is printed beside it, near the model-FLOPs GPU-hours."""
    r = size_json("deepseek-v3", "--tokens", "14.8T", "--gpu", "h100", "--mfu", "0.4")
    g, active = r["chinchilla"]["gpu"], r["params"]["active"]
    assert g["gpu_hours_6nd_active"] == pytest.approx(6 * active * 14.8e12 / (989.4e12 * 0.4) / 3600)
    assert g["gpu_hours_6nd"] / g["gpu_hours_6nd_active"] == pytest.approx(r["params"]["total"] / active)
    text = " ".join(CliRunner().invoke(app, ["size", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h100", "--mfu",
                                             "0.4"], env={"COLUMNS": "200"}).stdout.split())
    assert "GPU-hours for 6·N_active·D (the budget) │ 2,340,534" in text
    assert g["gpu_hours_6nd_active"] == pytest.approx(r["chinchilla"]["training_flops"] / (989.4e12 * 0.4) / 3600)


def test_attention_convention_and_recompute() -> None:
    full = size_json("llama-3-8b")
    causal = size_json("llama-3-8b", "--attention", "causal")
    assert causal["flops"]["attention"] == "causal"
    assert causal["flops"]["training_per_token"] == full["flops"]["training_per_token_causal"]
    assert causal["flops"]["training_per_token"] < full["flops"]["training_per_token"]
    acts = {m: size_json("llama-3-8b", "--recompute", m)["memory"]["training"]["activations"]
            for m in RECOMPUTE_MODES}
    assert acts["none"] > acts["selective"] > acts["full"]
    with_full = size_json("llama-3-8b", "--recompute", "full")["flops"]
    # integer FLOP counts: forward + the blocks' recomputed forward + backward (2 x forward),
    # exactly: the LM head (2·4096·128,256 a token) is not re-run
    head = 2 * 4096 * 128256
    assert with_full["training_per_token_with_recompute"] == 4 * with_full["forward_per_token"] - head


def test_kv_options() -> None:
    base = size_json("llama-3-8b", "--context", "4096")
    fp8 = size_json("llama-3-8b", "--context", "4096", "--batch", "4", "--kv-dtype", "fp8")
    assert fp8["kv_cache"]["dtype"] == "fp8"
    assert fp8["kv_cache"]["bytes_per_token"] * 2 == base["kv_cache"]["bytes_per_token"]
    assert fp8["kv_cache"]["bytes"] == 2 * base["kv_cache"]["bytes"]  # x4 batch, /2 bytes
    assert fp8["memory"]["inference_bytes_by_dtype"]["bf16"] == (
        fp8["memory"]["weights_bytes"] + fp8["kv_cache"]["bytes"])


def test_a_quantized_kv_cache_leaves_recurrent_states_in_16_bits() -> None:
    """--kv-dtype fp8/int4 halves/quarters Jamba's K and V, not its Mamba states (engines keep
    those in the model's dtype); fp32 widens both."""
    def kv(dtype: str) -> dict[str, int]:
        return size_json("jamba-v0.1", "--context", "4096", "--batch", "3", "--kv-dtype", dtype)["kv_cache"]

    bf16, fp8, int4, fp32 = kv("bf16"), kv("fp8"), kv("int4"), kv("fp32")
    assert fp8["ssm_state_bytes"] == int4["ssm_state_bytes"] == bf16["ssm_state_bytes"] > 0
    assert fp32["ssm_state_bytes"] == 2 * bf16["ssm_state_bytes"]
    attention = {k: v["bytes"] - v["ssm_state_bytes"] for k, v in (("bf16", bf16), ("fp8", fp8), ("int4", int4))}
    assert attention["bf16"] == 2 * attention["fp8"] == 4 * attention["int4"]


def test_a_context_past_a_rope_models_length_is_sized_with_a_note() -> None:
    """RoPE past max_seq_len is sized (a user may plan to scale it) but says it was not trained
    there, in --json, under size's KV table and in compare's notes; at or below the length, and on
    models whose positions are defined at every length (ALiBi, none), there is no note."""
    past = size_json("llama-2-7b", "--context", "65536")["kv_cache"]
    assert past["bytes"] == 65_536 * past["bytes_per_token"]
    assert "past llama-2-7b's max_seq_len (4,096)" in past["past_max_seq_len"]
    assert "(give position.scaling and the new max_seq_len" in past["past_max_seq_len"]
    # a model already scaled (DeepSeek-V3's YaRN, factor 40) is told to raise its factor instead
    scaled = size_json("deepseek-v3", "--context", "1M")["kv_cache"]["past_max_seq_len"]
    assert "(raise position.scaling.factor and max_seq_len" in scaled
    assert size_json("llama-2-7b", "--context", "4096")["kv_cache"]["past_max_seq_len"] is None
    assert size_json("mamba-2.8b", "--context", "1000000")["kv_cache"]["past_max_seq_len"] is None
    assert size_json("bloom-560m", "--context", "65536")["kv_cache"]["past_max_seq_len"] is None
    for command in (["size", "llama-2-7b"], ["compare", "mamba-2.8b", "llama-2-7b"]):
        text = runner.invoke(app, [*command, "--context", "65536"], env={"COLUMNS": "300"}).stdout
        assert "RoPE was not trained there" in text and "llama-2-7b's max_seq_len" in text
    # a training --seq past the length gets the same note, beside the FLOPs (and in compare)
    flops = size_json("llama-2-7b", "--seq", "16384")["flops"]
    assert flops["seq_len"] == 16384 and flops["past_max_seq_len"].startswith(
        "seq 16,384 is past llama-2-7b's max_seq_len (4,096)")
    assert size_json("llama-2-7b", "--seq", "4096")["flops"]["past_max_seq_len"] is None
    assert size_json("mamba-2.8b", "--seq", "65536")["flops"]["past_max_seq_len"] is None
    for command in (["size", "llama-2-7b"], ["compare", "mamba-2.8b", "llama-2-7b"]):
        text = runner.invoke(app, [*command, "--seq", "16384"], env={"COLUMNS": "300"}).stdout
        assert "seq 16,384 is past llama-2-7b's max_seq_len" in text


def test_a_seq_too_short_for_the_mtp_targets_is_sized_with_a_note() -> None:
    """verify and bench refuse a training sequence under depth + 2 tokens (no target for the
    multi-token-prediction modules); size sizes it as asked and says so, in size and compare."""
    short = size_json("deepseek-v3-mtp", "--seq", "2")["flops"]["short_for_mtp"]
    assert short.startswith("seq 2 is shorter than the 3 tokens a training sequence of deepseek-v3-mtp needs")
    assert size_json("deepseek-v3-mtp", "--seq", "3")["flops"]["short_for_mtp"] is None
    assert size_json("deepseek-v3", "--seq", "1")["flops"]["short_for_mtp"] is None  # no MTP modules
    for command in (["size", "deepseek-v3-mtp"], ["compare", "deepseek-v3", "deepseek-v3-mtp"]):
        text = runner.invoke(app, [*command, "--seq", "2"], env={"COLUMNS": "300"}).stdout
        assert "seq 2 is shorter than the 3 tokens" in " ".join(text.split())


def test_ssm_state_and_sliding_window() -> None:
    jamba = size_json("jamba-v0.1", "--context", "1024")
    assert jamba["kv_cache"]["bytes_per_token"] == 16_384  # docs/formulas.md §3: 4 attention layers
    assert jamba["kv_cache"]["ssm_state_bytes"] > 0
    assert jamba["params"]["by_kind"]["ssm"]["total"] > 0
    mistral = size_json("mistral-7b", "--context", "32768")
    assert mistral["kv_cache"]["bytes"] == 32 * 4096 * 2 * 8 * 128 * 2  # capped at the window


def test_path_and_preset_name_agree() -> None:
    preset = Path(__file__).resolve().parents[1] / "archplan" / "presets" / "gpt2.yaml"
    by_path = size_json(str(preset))
    by_name = size_json("gpt2")
    assert by_path["params"] == by_name["params"] and by_path["params"]["total"] == 124_439_808


def test_human_output_has_units_and_conventions() -> None:
    result = runner.invoke(app, ["size", "llama-3-8b", "--gpu", "h100"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "8.03 B" in out and "GiB" in out and "GFLOP" in out
    assert "2 FLOPs per multiply-add; embedding lookups not counted; LM head counted" in out
    assert "16 B/param" in out and "Korthikanti" in out
    assert "N = total parameters" in out and "Besiroglu" in out and "Hoffmann" in out
    assert "989 TFLOP/s" in out  # the dense bf16 peak used is printed
    for kind in ("embedding", "attention", "ffn", "norms", "lm_head"):
        assert kind in out


def test_the_convention_says_what_experts_and_mla_decode_count() -> None:
    """The router counts in the FLOPs (Megatron's formulas leave it out), and MLA's decode figure is
    the latent cache's: both said beside the numbers, only for the models that have them."""
    dense, moe, mla = (size_json(name)["flops"]["convention"] for name in ("llama-3-8b", "mixtral-8x7b",
                                                                             "deepseek-v3"))
    assert "router" not in dense and "MLA" not in dense
    assert "router" in moe and "MLA" not in moe
    assert "router" in mla and "MLA decode reads the absorbed latent cache" in mla
    result = runner.invoke(app, ["compare", "llama-3-8b", "deepseek-v3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    caption = " ".join(result.stdout.split())
    assert "deepseek-v3: MoE layers count the router" in caption
    assert "deepseek-v3: MLA decode reads the absorbed latent cache" in caption
    assert ".." not in caption and "more bytes." in caption
    text = " ".join(runner.invoke(app, ["size", "llama-3-8b"], env={"COLUMNS": "200"}).stdout.split())
    assert "embedding included" in text and "no activations, workspace or runtime overhead" in text


def test_moe_component_kinds_in_table() -> None:
    result = runner.invoke(app, ["size", "deepseek-v3"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for kind in ("moe router", "moe routed experts", "moe shared experts"):
        assert kind in result.stdout


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from archplan.plot import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the import now fails
    with pytest.raises(ArchplanError, match=r"pip install 'archplan\[plot\]'"):
        pyplot()


def test_plot_with_a_matplotlib_that_fails_to_import_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed but broken (matplotlib 3.7 beside NumPy 2 raises this): not "not installed"."""
    from archplan.plot import pyplot

    real_import = builtins.__import__

    def broken(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib":
            raise ImportError("numpy.core.multiarray failed to import")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ArchplanError, match=r"^--plot: matplotlib failed to import \(numpy\.core\.multiarray "
                                            r"failed to import\); pip install -U 'archplan\[plot\]'$"):
        pyplot()


def test_plot_rejects_unknown_suffix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["size", "gpt2", "--plot", str(tmp_path / "figure.txt")])
    assert isinstance(result.exception, ArchplanError) and "--plot" in str(result.exception)


def test_plot_writes_a_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    size_png, compare_svg = tmp_path / "size.png", tmp_path / "compare.svg"
    assert runner.invoke(app, ["size", "jamba-v0.1", "--plot", str(size_png)]).exit_code == 0
    assert size_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runner.invoke(app, ["compare", "gpt2", "bloom-560m", "--plot", str(compare_svg)]).exit_code == 0
    assert "<svg" in compare_svg.read_text()


@pytest.mark.parametrize("command", [["size", "gpt2"], ["compare", "gpt2", "bloom-560m"]])
def test_plot_keeps_an_existing_file_without_force(tmp_path: Path, command: list[str]) -> None:
    keep = tmp_path / "keep.png"
    keep.write_text("precious\n")
    result = runner.invoke(app, [*command, "--plot", str(keep)])
    assert isinstance(result.exception, ArchplanError)
    assert result.exception.render() == f"{keep}: --plot: file exists; pass --force to overwrite"
    assert keep.read_text() == "precious\n"
    pytest.importorskip("matplotlib")
    assert runner.invoke(app, [*command, "--plot", str(keep), "--force"]).exit_code == 0
    assert keep.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_into_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "figure.png").mkdir()
    result = runner.invoke(app, ["size", "gpt2", "--plot", str(tmp_path / "figure.png"), "--force"])
    assert isinstance(result.exception, ArchplanError) and "is a directory" in str(result.exception)


@pytest.mark.parametrize(("text", "value"), [("15T", 15e12), ("1.4e12", 1.4e12), ("300B", 3e11),
                                              ("2.5k", 2500.0), ("7", 7.0)])
def test_parse_amount(text: str, value: float) -> None:
    assert parse_amount(text, "--tokens") == value


@pytest.mark.parametrize("text", ["-1e24", "-5T", " -16Mi"])
def test_a_negative_amount_is_named_as_negative(text: str) -> None:
    """A number with a minus sign is a number: refused for its sign, not as unreadable."""
    with pytest.raises(ArchplanError, match="must be a positive number"):
        parse_amount(text, "--tokens")


def test_cli_choices_match_the_library() -> None:
    assert tuple(m.value for m in RecomputeChoice) == RECOMPUTE_MODES
    assert tuple(m.value for m in MemoryKernelChoice) == ATTENTION_KERNELS
    # every storage dtype but tf32, a matmul mode stored as fp32
    assert {m.value for m in KVDTypeChoice} == {d.value for d in DType} - {"tf32"}


def test_attention_kernel_and_activation_dtype() -> None:
    """gpt2 (12 heads), micro-batch 8 x 1024: the flash kernel drops the s x s probabilities
    (2·12·1024²·8 B per layer) and keeps the fp32 log-sum-exp (4·12·1024·8 B per layer)."""
    args = ("gpt2", "--seq", "1024", "--micro-batch", "8")
    eager = size_json(*args)["memory"]["training"]
    flash = size_json(*args, "--attention-kernel", "flash")["memory"]["training"]
    assert (flash["attention_kernel"], flash["activation_dtype"]) == ("flash", "bf16")
    assert eager["activations"] - flash["activations"] == 12 * (2 * 12 * 1024**2 * 8 - 4 * 12 * 1024 * 8)
    fp32 = size_json(*args, "--attention-kernel", "flash", "--activation-dtype", "fp32")["memory"]["training"]
    # the 16-bit tensors double; token ids (int64), log-sum-exps and log-probabilities (fp32) do not
    fixed = 8 * 8 * 1024 + 12 * 4 * 12 * 1024 * 8 + 4 * 8 * 1024 * 50257
    assert fp32["activations"] - fixed == 2 * (flash["activations"] - fixed)
    assert {m.value for m in LawChoice} == set(LAWS) | set(LAW_SYNONYMS)


def test_plans_law_names_are_sizes_too() -> None:
    """`plan --law chinchilla` and `size --law hoffmann2022` name one fit: each command refused the
    other's names. Both now take both, and a fit asked twice by its two names is shown once."""
    laws = size_json("gpt2", "--law", "chinchilla", "--law", "hoffmann2022", "--law", "epoch")["chinchilla"]["laws"]
    assert list(laws) == ["hoffmann2022", "besiroglu2024"]


def test_residual_dtype() -> None:
    """An fp32 residual stream: gpt2's 25 norm inputs (two per layer and the final norm) double, at
    micro-batch 2 × 256 (2 B more per element each); the table's caption names it; by default the
    residual stream takes the activation dtype."""
    args = ("gpt2", "--seq", "256", "--micro-batch", "2", "--attention-kernel", "flash")
    plain = size_json(*args)["memory"]["training"]
    fp32 = size_json(*args, "--residual-dtype", "fp32")["memory"]["training"]
    assert (plain["residual_dtype"], fp32["residual_dtype"]) == ("bf16", "fp32")
    assert fp32["activations"] - plain["activations"] == 25 * 2 * 2 * 256 * 768
    assert size_json(*args, "--activation-dtype", "fp32")["memory"]["training"]["residual_dtype"] == "fp32"
    table = runner.invoke(app, ["size", *args, "--residual-dtype", "fp32"], terminal_width=200)
    assert table.exit_code == 0 and "(residual stream fp32)" in " ".join(table.output.split())
    assert "residual stream" not in runner.invoke(app, ["size", *args], terminal_width=200).output
    # fp32 activations come from fp32 weights, whose residual adds are fp32
    narrower = runner.invoke(app, ["size", *args, "--activation-dtype", "fp32", "--residual-dtype", "bf16"])
    assert isinstance(narrower.exception, ArchplanError)
    assert "a bf16 residual stream beside fp32 activations does not occur" in narrower.exception.render()


def test_quantize_linear_leaves_the_embedding_head_and_norms_in_bf16() -> None:
    """fp8, int8 and int4 stored every parameter at that width, the tied 524M embedding of
    Gemma-2B included, where vLLM's fp8/int8 methods and GPTQ/AWQ quantise the layers' linear
    weights only. `--quantize linear` prices that; the default stays docs/formulas.md §4.1's worked
    figures, and the JSON and the caption say which. Counts by hand: Llama-3-8B's layers hold
    6,979,321,856 matmul weights; Gemma-2B's 18 layers 18·(2·2048² + 2·2048·256 + 3·2048·16,384)."""
    for name, linear, total in (("llama-3-8b", 6_979_321_856, 8_030_261_248),
                                ("gemma-2b", 18 * (2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 16384), 2_506_172_416)):
        rest = 2 * (total - linear)  # bf16
        default = size_json(name)["memory"]
        quantized = size_json(name, "--quantize", "linear")["memory"]
        assert (default["weights_quantized"], quantized["weights_quantized"]) == ("all", "linear")
        assert default["weights_by_dtype"]["fp8"] == total and default["weights_by_dtype"]["int4"] == total // 2
        weights = quantized["weights_by_dtype"]
        assert weights["fp8"] == weights["int8"] == linear + rest
        assert weights["int4"] == linear // 2 + rest
        for dtype in ("fp32", "bf16", "int4-g128"):
            assert weights[dtype] == default["weights_by_dtype"][dtype]
    assert weights["int4"] == 2_039_631_872  # Gemma-2B: 1.90 GiB, where every parameter in int4 is 1.17
    # Mixtral 8x7B: 32 layers of attention (2·4096² + 2·4096·1024) and 8 experts of 3·4096·14,336;
    # the routers (32 × 4096·8) stay bf16 with the embeddings and norms, as vLLM and AutoAWQ keep them
    linear = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336)
    mixtral = size_json("mixtral-8x7b", "--quantize", "linear")["memory"]["weights_by_dtype"]
    assert mixtral["fp8"] == linear + 2 * (46_702_792_704 - linear)
    table = runner.invoke(app, ["compare", "llama-3-8b", "gemma-2b", "--quantize", "linear"], terminal_width=200)
    assert table.exit_code == 0 and "weights int4 (linear)" in table.output
    assert "int4: the layers' matmul weights at that width" in " ".join(table.output.split())


def test_autocast() -> None:
    """--autocast: torch.autocast over fp32 weights. The residual stream is fp32 (as with
    --residual-dtype fp32), and each projection keeps its own 16-bit cast of the norm's output:
    gpt2's q, k and v two copies more per layer, 2 B × h per token each (its MLP has one input
    projection). It is what bench --train prices in bf16 (tiny-llama on a CPU, the same figure
    but for the rotary tables archplan's modules share, which only archplan's units hold); the
    caption names it; fp32 activations or a 16-bit residual stream beside it are refused."""
    from archplan.analytic import count_params
    from archplan.analytic.memory import training_memory
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    args = ("gpt2", "--seq", "256", "--micro-batch", "2", "--attention-kernel", "flash")
    fp32 = size_json(*args, "--residual-dtype", "fp32")["memory"]["training"]
    autocast = size_json(*args, "--autocast")["memory"]["training"]
    assert (autocast["autocast"], autocast["residual_dtype"], fp32["autocast"]) == (True, "fp32", False)
    assert autocast["activations"] - fp32["activations"] == 12 * 2 * 2 * 2 * 256 * 768
    table = runner.invoke(app, ["size", *args, "--autocast"], terminal_width=200)
    assert table.exit_code == 0 and "torch autocast (each projection keeps its own" in " ".join(table.output.split())
    tiny = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    sized = size_json(tiny, "--seq", "64", "--attention-kernel", "torch-cpu", "--autocast")["memory"]["training"]
    plan = resolve(load_spec(tiny))
    trained = training_memory(plan, count_params(plan), 1, 64, "none", activation_dtype="bf16",
                              attention_kernel="torch-cpu", residual_dtype="fp32", units="torch", autocast=True)
    tables = 2 * 2 * 64 * plan.layers[0].mixer.rotary_dim  # bf16 cos and sin
    assert trained.activations.by_component["rope"] == tables
    assert sized["activations"] == trained.activations.kept - tables
    for extra, message in ((("--activation-dtype", "fp32"), "autocast runs the matmuls in 16 bits"),
                           (("--residual-dtype", "bf16"), "autocast over fp32 weights keeps an fp32 residual stream")):
        refused = runner.invoke(app, ["size", *args, "--autocast", *extra])
        assert isinstance(refused.exception, ArchplanError) and message in refused.exception.render()


def test_presets_command_lists_every_preset() -> None:
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == preset_names()
    by_name = {r["name"]: r for r in rows}
    assert (by_name["mixtral-8x7b"]["total"], by_name["mixtral-8x7b"]["active"]) == (
        46_702_792_704, 12_879_925_248)
    assert all(r["description"] and r["active"] <= r["total"] for r in rows)
    table = runner.invoke(app, ["presets"], env={"COLUMNS": "160"})
    assert table.exit_code == 0 and "46.7 B" in table.stdout and "llama-3-8b" in table.stdout


def test_every_preset_sizes() -> None:
    for name in preset_names():
        r = size_json(name, "--seq", "512", "--context", "1024")
        assert r["params"]["total"] == sum(r["params"]["by_component"].values()), name
        assert r["memory"]["training_bytes"] > r["memory"]["weights_bytes"] > 0, name
        assert math.isfinite(r["chinchilla"]["laws"]["besiroglu2024"]["loss"]), name


def test_counted_nouns_agree_in_number() -> None:
    from archplan.units import things

    assert things(1, "micro-batch") == "1 micro-batch"
    assert things(16, "micro-batch") == "16 micro-batches"
    assert things(2, "batch") == "2 batches" and things(1_024, "rank") == "1,024 ranks"


def test_human_units_past_the_largest_group_their_digits() -> None:
    from archplan.units import flops, nbytes

    assert nbytes(14_495_514_624) == "13.5 GiB" and nbytes(3 * 2**70) == "3,072 EiB"
    assert flops(3e30) == "3,000,000 YFLOP"


@pytest.mark.parametrize(("share", "text"), [
    (0.0, "0.0%"), (0.00031, "0.031%"), (0.0005, "0.1%"), (0.4, "40.0%"), (15.232, "1523.2%"),
])
def test_a_share_too_small_for_one_decimal_keeps_its_digits(share: float, text: str) -> None:
    """A tiny model's CPU MFU printed "0.0%", as if nothing ran."""
    from archplan.units import percent

    assert percent(share) == text


@pytest.mark.parametrize(("n", "text"), [
    (1_023.9 * 2**20, "1.00 GiB"), (9.996 * 2**30, "10.0 GiB"), (99.97 * 2**30, "100 GiB"),
    (500, "500 B"), (1 << 30, "1.00 GiB"),
])
def test_bytes_just_below_a_unit_print_in_the_unit_they_round_to(n: float, text: str) -> None:
    from archplan.units import nbytes

    assert nbytes(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (99.97e9, "100 B"), (999.7e3, "1.00 M"), (999.7, "1.00 K"), (999.4, "999"), (7_241_732_096, "7.24 B"),
    (0.5, "0.5"),
])
def test_counts_just_below_a_unit_print_in_the_unit_they_round_to(n: float, text: str) -> None:
    from archplan.units import count

    assert count(n) == text


def test_flops_just_below_a_unit_print_in_the_unit_they_round_to() -> None:
    from archplan.units import flops

    assert flops(999.9e12) == "1.00 PFLOP" and flops(9.999e9, "FLOP/s") == "10.0 GFLOP/s"


def test_bandwidths_print_in_decimal_units_as_datasheets_quote_them() -> None:
    """bench printed an H100's HBM as 3.05 TiB/s beside plan's and the datasheet's GB/s and TB/s."""
    from archplan.units import bandwidth

    assert bandwidth(3.35e12) == "3.35 TB/s" and bandwidth(450e9) == "450 GB/s" and bandwidth(26.5e9) == "26.5 GB/s"
    assert bandwidth(500) == "500 B/s"


@pytest.mark.parametrize(("days", "text"), [
    (33.8, "33.8 d"), (1_234.56, "1,234.6 d"), (1.0, "1.0 d"), (0.25, "6.0 h"),
    (30 / 1440, "30.0 min"), (40 / 86400, "40.0 s"), (0.0012 / 86400, "0.0012 s"), (9_999.0, "9,999.0 d"),
    (1_583_635_270.8, "4.34 M years"),
])
def test_durations_never_print_as_zero_days(days: float, text: str) -> None:
    from archplan.units import duration

    assert duration(days) == text


@pytest.mark.parametrize(("x", "text"), [
    (0.0123, "0.0123"), (0.9996, "1.00"), (1.194, "1.19"), (99.96, "100"), (24_310.4, "24,310"), (0, "0.00"),
])
def test_amounts_keep_three_significant_digits(x: float, text: str) -> None:
    from archplan.units import amount

    assert amount(x) == text


@pytest.mark.parametrize(("text", "tokens"), [("4096", 4096), ("4_096", 4096), ("4k", 4096), ("4K", 4096),
                                             (" 1m ", 1 << 20), ("8Ki", 8192), ("1Mi", 1 << 20), ("4096.0", None),
                                             ("-5", None), ("4kk", None), ("4i", None)])
def test_every_seq_takes_the_same_lengths(text: str, tokens: int | None) -> None:
    """One parser for every --seq (size, compare, verify, plan, bench): k = 1024; a fraction is
    refused, as a spec's integer fields refuse one."""
    from archplan.units import parse_length

    if tokens is None:
        said = "a length must be positive" if text.startswith("-") else "expected a length such as 4096 or 4k"
        with pytest.raises(ValueError, match=said):
            parse_length(text)
        assert runner.invoke(app, ["size", "llama-3-8b", "--seq", text]).exit_code == 2
    else:
        assert parse_length(text) == tokens
        assert size_json("llama-3-8b", "--seq", text)["memory"]["training"]["seq_len"] == tokens


def test_a_small_runs_gpu_time_is_not_rounded_away() -> None:
    """gpt2 at 50% MFU on an H100: 1.19 GPU-hours and 0.0495 GPU-days, not "1" and "0.0"."""
    from archplan.units import amount

    hours = size_json("gpt2", "--gpu", "h100", "--mfu", "0.5")["chinchilla"]["gpu"]["gpu_hours"]
    shown = runner.invoke(app, ["size", "gpt2", "--gpu", "h100", "--mfu", "0.5"], env={"COLUMNS": "200"}).output
    rows = {line.split("│")[0].strip(): line.split("│")[1].strip() for line in shown.splitlines() if "│" in line}
    assert 1 < hours < 10 and rows["GPU-hours"] == amount(hours) and rows["GPU-days"] == amount(hours / 24)
    assert rows["GPU-days"].startswith("0.0") and len(rows["GPU-days"]) == 6


def test_plots_name_the_training_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The --plot figures of size and compare say which dtypes the training memory was counted in."""
    pytest.importorskip("matplotlib")
    import archplan.plot

    titles: list[str] = []
    monkeypatch.setattr(archplan.plot, "save", lambda fig, target: titles.extend(ax.get_title() for ax in fig.axes))
    args = ["--residual-dtype", "fp32", "--seq", "256"]
    for argv in (["size", "gpt2"], ["compare", "gpt2", "llama-3-8b"]):
        result = runner.invoke(app, [*argv, *args, "--plot", str(tmp_path / "f.png")])
        assert result.exit_code == 0, result.output
    assert sum("activations bf16, residual stream fp32" in t for t in titles) == 2, titles


def test_size_prices_the_specs_planned_tokens_as_plan_and_lint_do(tmp_path: Path) -> None:
    """A spec's training.tokens is the run's D, as plan prices it and lint's AP014 reads it: size
    used 20 tokens a parameter unless --tokens was given."""
    spec = tmp_path / "planned.yaml"
    spec.write_text("name: planned\nvocab_size: 32000\nd_model: 1024\nn_layers: 8\nmax_seq_len: 2048\n"
                    "attention: {kind: gqa, n_heads: 16, n_kv_heads: 4}\nffn: {kind: glu, d_ff: 4096}\n"
                    "training: {tokens: 3e10}\n")

    def chinchilla(*extra: str) -> dict[str, Any]:
        result = CliRunner().invoke(app, ["size", str(spec), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["chinchilla"]

    planned = chinchilla()
    assert planned["tokens"] == 3e10 and planned["tokens_source"] == "spec training.tokens"
    assert planned["training_flops"] == 6 * planned["n_params"] * 3e10
    given = chinchilla("--tokens", "1e9")
    assert given["tokens"] == 1e9 and given["tokens_source"] == "--tokens"
    spec.write_text(spec.read_text().replace("training: {tokens: 3e10}\n", ""))
    default = chinchilla()
    assert default["tokens"] == default["optimal_tokens"] and default["tokens_source"] == "20 tokens/param"


@pytest.mark.parametrize("preset", ["deepseek-v3", "llama-3-8b"])
def test_size_names_the_tokens_plan_would_price(preset: str) -> None:
    """size's default D is 20 tokens per total parameter; plan's layout search, given no tokens,
    prices the Epoch fit's D for the active N (713 B for DeepSeek-V3, against 13.4 T): size's
    --json carries plan's figure and its caption says so."""
    size = json.loads(CliRunner().invoke(app, ["size", preset, "--json"]).output)["chinchilla"]
    plan = json.loads(CliRunner().invoke(app, ["plan", preset, "--gpus", "256", "--top", "1", "--json"]).output)
    assert size["plan_tokens"] == plan["training_tokens"]
    assert size["plan_tokens_params"] == ("active" if preset == "deepseek-v3" else "total")
    text = " ".join(CliRunner().invoke(app, ["size", preset], env={"COLUMNS": "200"}).output.split())
    assert "`plan SPEC --gpus N` without --tokens or training.tokens prices" in text


@pytest.mark.parametrize(("text", "value"), [
    ("4M", 4e6), ("15T", 15e12), ("16Mi", 16 * 2**20), ("2ki", 2048), ("1.5Gi", 1.5 * 2**30), ("1e9", 1e9),
])
def test_amounts_take_si_and_binary_suffixes(text: str, value: float) -> None:
    """A batch quoted as "16M tokens" is 16·2²⁰ (2,048 × 8,192) in the papers that quote it: 16Mi
    says so, where 16M (SI, 16·10⁶) made 1,953 sequences of 8,192."""
    from archplan.commands.size import parse_amount

    assert parse_amount(text, "--tokens") == value


def test_a_loss_outside_the_fits_runs_is_marked_extrapolated() -> None:
    """A 214 K-parameter model on 1 token printed losses of 418.65 and 2,093.99 as any other:
    outside the 70 M–16 B parameters and 5 B–500 B tokens the Approach-3 fits were fitted on
    (Hoffmann et al. 2022 §3), `size` says they are extrapolated."""
    tiny = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    assert size_json(tiny, "--tokens", "1")["chinchilla"]["extrapolated"] is True
    assert size_json("llama-3-8b")["chinchilla"]["extrapolated"] is False  # 8.03 B on 161 B tokens
    assert size_json("llama-3-8b", "--tokens", "15T")["chinchilla"]["extrapolated"] is True
    result = CliRunner().invoke(app, ["size", tiny, "--tokens", "1"])
    assert result.exit_code == 0 and "its losses are extrapolated" in " ".join(result.output.split())


def test_the_per_token_cache_row_says_when_windows_cap_it() -> None:
    """Mistral at 32,768 tokens: 128 KiB a token beside 512 MiB, not 4 GiB, once its 4,096-token
    windows fill; the row said neither."""

    def row(*args: str) -> str:
        out = CliRunner().invoke(app, ["size", "mistral-7b", *args], env={"COLUMNS": "200"}).stdout
        return next(ln for ln in out.splitlines() if ln.startswith("per token (one sequence)"))

    assert row("--context", "32768").startswith("per token (one sequence), until windows fill")
    assert not row("--context", "2048").startswith("per token (one sequence), until")
