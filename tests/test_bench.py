"""`archplan bench` end to end on CPU with tiny specs: structure and sanity, never speed."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from archplan.analytic import decode_flops, decode_flops_per_token, forward_flops
from archplan.bench.roofline import DecodeRates, OpCount, predict_decode_step, predict_prefill, with_host_floor
from archplan.bench import runner
from archplan.bench.fit import truncate
from archplan.bench.runner import (
    TORCH_DTYPES,
    BenchConfig,
    available_backends,
    check_positions,
    estimate_bytes,
    kinds,
    run_bench,
)
from archplan.bench.sweep import compare_backends
from archplan.cli import app
from archplan.dtypes import DType
from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.resolve import FFNPlan, resolve
from archplan.spec import Spec
from test_bad_input import assert_one_line_error, run_main

TINY = dict(
    name="tiny", vocab_size=256, d_model=64, n_layers=4, max_seq_len=128,
    attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
    ffn={"kind": "glu", "d_ff": 128},
)
TINY_HYBRID = dict(
    name="tiny-hybrid", vocab_size=256, d_model=64, n_layers=4, max_seq_len=128,
    position={"kind": "none"},
    attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
    ssm={"kind": "mamba1", "d_state": 8},
    ffn={"kind": "glu", "d_ff": 128},
    moe={"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 64}},
    layout={"mixers": "MA", "moe_every": 2, "moe_offset": 1},
)
FAST = BenchConfig(device="cpu", dtype=DType.fp32, batch=2, seq=16, decode_tokens=3, warmup=1, iters=3)


def plan_of(raw: dict) -> object:
    return resolve(Spec.model_validate(raw))


@pytest.mark.parametrize("spec", ["gpt2", "hyena-153m", "tests/fixtures/distributed/tiny-mqa-alibi.yaml"])
def test_the_peak_memory_row_is_one_prefill_beside_its_prediction(spec: str) -> None:
    """bench's peak memory was the process's peak RSS (the torch runtime and the peak calibration's
    buffers, about half of it) beside "weights + cache": 526 MiB against 178 for gpt2 at 64 tokens,
    two figures no one could compare. Both are one prefill's now, measured as the --seq sweep
    measures it and predicted as it predicts (`growth.prefill_peak_bytes`)."""
    path = str(Path(__file__).parents[1] / spec) if spec.endswith(".yaml") else spec
    cfg = BenchConfig(device="cpu", dtype=DType.fp32, batch=1, seq=128, decode_tokens=2, layers=1, warmup=1, iters=1)
    result = run_bench(resolve(load_spec(path)), cfg)
    assert "torch.profiler" in result.peak_memory_method
    assert 0.95 < result.peak_memory_bytes / result.analytic_memory_bytes < 1.1


def test_run_bench_structure_and_sanity() -> None:
    result = run_bench(plan_of(TINY), FAST)
    out = result.to_json()
    assert out["prefill"]["median_s"] > 0
    assert out["prefill"]["p10_s"] <= out["prefill"]["median_s"] <= out["prefill"]["p90_s"]
    assert out["prefill"]["tokens_per_s"] == pytest.approx(2 * 16 / out["prefill"]["median_s"])
    assert 0 < out["prefill"]["mfu"] <= 1
    assert out["prefill"]["achieved_flops_per_s"] == pytest.approx(out["prefill"]["mfu"] * out["peak"]["flops_per_s"])
    # a decode step is one new token for each of the batch's 2 sequences
    decode = out["decode"]
    assert decode["ms_per_step"] > 0 and decode["steps"] == 3
    assert decode["ms_per_token"] == pytest.approx(decode["ms_per_step"] / 2)
    assert decode["tokens_per_s"] == pytest.approx(1e3 / decode["ms_per_token"])
    assert decode["predicted_ms_per_token"] == pytest.approx(decode["predicted_ms_per_step"] / 2)
    assert decode["p10_s"] <= decode["p90_s"] and ("noise" in decode)
    assert out["peak_memory_bytes"] > 0
    assert out["predicted"]["prefill_s"] > 0
    assert out["extrapolated"] is False
    assert "calibrated" in out["peak"]["source"]
    assert out["prefill"]["peak_note"] is None
    # a calibration slower than the model itself (fp16 on a CPU without fp16 arithmetic printed
    # MFU 230% and nothing else) is named
    slow = replace(result, peak=replace(result.peak, peak_flops=result.achieved_flops_per_s / 2.3))
    assert slow.peak_note() is not None and slow.peak_note().startswith("MFU 230%: the model's forward ran faster")
    # a CPU run's prefill is the roofline's alone: no host floor
    assert out["predicted"]["host_issue_s"] is None
    assert out["predicted"]["roofline_s"] == pytest.approx(out["predicted"]["prefill_s"])


def test_a_host_floored_prefill_says_what_bounds_it(capsys: pytest.CaptureFixture[str]) -> None:
    """As a CUDA run prints it: the prediction is the larger of the roofline's sum and the host's
    issue, and both are in the table and the JSON."""
    from archplan.commands.bench import _render

    result = run_bench(plan_of(TINY), FAST)
    floored = with_host_floor(result.predicted_prefill, replace(RATES, overlap=True, matmul_seconds=1e-5), OPS,
                              {"gqa+dense": OpCount(7, 1, 40), "embed+head": OpCount(1, 0, 5)})
    cuda = replace(result, predicted_prefill=floored)
    out = cuda.to_json()["predicted"]
    assert out["host_issue_s"] == pytest.approx(sum(r.overhead for r in floored.rows))
    assert out["prefill_s"] == pytest.approx(max(out["roofline_s"], out["host_issue_s"]))
    _render(cuda, "tiny")
    text = " ".join(capsys.readouterr().out.split())
    assert f"the host's issue of {4 * 48 + 6} calls" in text.replace("│ ", "").replace(" │", "")


def test_truncate_keeps_k_layers_of_each_kind() -> None:
    plan = plan_of(TINY_HYBRID)
    assert kinds(plan) == {"mamba1+dense": 2, "gqa+moe": 2}
    cut = truncate(plan, 1)
    assert kinds(cut) == {"mamba1+dense": 1, "gqa+moe": 1}
    assert [layer.index for layer in cut.layers] == [0, 1]
    assert estimate_bytes(cut, FAST) < estimate_bytes(plan, FAST)


def test_extrapolation_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_of(TINY_HYBRID)
    passes: list[int] = []
    extrapolate = runner._extrapolate
    monkeypatch.setattr(runner, "_extrapolate", lambda full, built, split, median: passes.append(len(split))
                        or extrapolate(full, built, split, median))
    result = run_bench(plan, BenchConfig(**{**FAST.__dict__, "layers": 1}))
    ext = result.extrapolation
    assert ext is not None
    # the prefill's split from --iters instrumented passes; then each of the 3 decode steps its own
    assert passes == [FAST.iters, 1, 1, 1]
    assert ext.built_layers == {"mamba1+dense": 1, "gqa+moe": 1}
    assert ext.full_layers == {"mamba1+dense": 2, "gqa+moe": 2}
    expected = ext.rest_seconds + sum(ext.full_layers[k] * ext.block_seconds[k] for k in ext.full_layers)
    assert result.prefill_seconds == pytest.approx(expected)
    # Full depth costs more than what was built, and each block took some time.
    assert result.prefill_seconds > ext.rest_seconds
    assert all(v > 0 for v in ext.block_seconds.values())
    assert result.to_json()["extrapolated"] is True


def test_extrapolation_takes_each_kind_s_median_share_over_the_passes() -> None:
    """One instrumented pass on a loaded machine (a block taking 0.46 s of a 0.55 s pass, not
    0.02 s of 0.1 s) does not set the figure: each kind's block time is its median share of the
    passes times the timed median, and the rest what the built blocks leave of that median."""
    plan = plan_of(TINY_HYBRID)
    quiet = ({"mamba1+dense": [0.02], "gqa+moe": [0.03]}, 0.1)
    loaded = ({"mamba1+dense": [0.46], "gqa+moe": [0.03]}, 0.55)
    ext = runner._extrapolate(plan, truncate(plan, 1), [quiet, loaded, quiet], 0.1)
    assert ext.block_seconds == pytest.approx({"mamba1+dense": 0.02, "gqa+moe": 0.03})
    assert ext.rest_seconds == pytest.approx(0.05)
    assert ext.scale() == pytest.approx(0.05 + 2 * 0.02 + 2 * 0.03)


def test_timings_that_spread_like_a_loaded_host_s_are_named() -> None:
    """p90 past 1.5× p10 gets a line (text mode's note, --json's prefill.noise); a steady run, or
    one too short to have a spread, gets none."""
    from archplan.bench.timing import Timing

    assert Timing((0.10, 0.101, 0.102, 0.099, 0.1)).noise_note("prefill") is None
    assert Timing((0.1, 0.4)).noise_note("prefill") is None
    note = Timing((0.10, 0.11, 0.10, 0.25, 0.31)).noise_note("prefill")
    assert note is not None and note.startswith("prefill timings spread 3.10× from p10 to p90 (past 1.5×")
    assert "rerun on an idle machine or with more --iters" in note and "{" not in note


def test_roofline_is_max_of_compute_and_memory() -> None:
    plan = plan_of(TINY)
    roof = predict_prefill(plan, 1, 32, 2, peak=1e12, bandwidth=1e11)
    for row in roof.rows:
        # Each kind sums max(compute, memory) over its components: between the max and the sum.
        compute, memory = row.flops / 1e12, row.bytes / 1e11
        assert max(compute, memory) * (1 - 1e-9) <= row.seconds <= (compute + memory) * (1 + 1e-9)
    assert roof.seconds == pytest.approx(sum(r.seconds for r in roof.rows))
    # Decode at batch 1 moves every weight once per token: memory-bound without per-op costs.
    free = {"gqa+dense": 0.0, "embed+head": 0.0}
    rates = DecodeRates({"gqa+dense": 1e9, "embed+head": 1e9}, 0.0, free, free, overlap=False)
    step = predict_decode_step(plan, 1, 64, 2, rates, {})
    assert all(r.bound == "memory" for r in step.rows)


def test_prefill_roofline_counts_each_layer_s_own_attended_pairs() -> None:
    """A sliding-window layer beside a full one: each kind's causal FLOPs are its own (they were the
    two layers' mean, 25.7 MFLOP for both at 256 tokens), and their sum is size's causal forward."""
    plan = plan_of(TINY | {"n_layers": 2, "attention": {"kind": "mha", "n_heads": 4, "sliding_window": 16},
                           "layout": {"mixers": "SA"}})
    rows = {r.kind: r.flops for r in predict_prefill(plan, 1, 256, 2, peak=1e12, bandwidth=1e11).rows}
    assert rows["mha+dense"] > rows["mha/window 16+dense"]
    counted = forward_flops(plan, 256, 1)
    # integer counts carried in floats (far below 2**53, so every sum is exact): no tolerance
    assert sum(rows.values()) == counted.counted - counted.attention_full + counted.attention_causal


def test_prefill_reads_the_embedding_rows_it_looks_up() -> None:
    """As decode does: 32 tokens read 32 rows of the table, not the table (BLOOM-560m's 514 MB read
    in full made 23 ms of its 128-token prefill's embed+head row on CPU). The final norm and the
    head read their weights, and the head writes the logits."""
    plan = plan_of(TINY)
    head = next(r for r in predict_prefill(plan, 1, 32, 2, peak=1e12, bandwidth=1e11).rows if r.kind == "embed+head")
    assert head.bytes == 2 * (32 * 64 + 64 + 64 * 256 + 32 * 256)
    tied = plan_of(TINY | {"embedding": {"tied": True}})
    head = next(r for r in predict_prefill(tied, 1, 32, 2, peak=1e12, bandwidth=1e11).rows if r.kind == "embed+head")
    assert head.bytes == 2 * (32 * 64 + 64 + 256 * 64 + 32 * 256)


def test_inference_rooflines_leave_the_mtp_modules_out() -> None:
    """Inference does not run the multi-token-prediction modules: prefill and decode read none of
    their weights. An MoE module behind a dense first layer had its experts looked up on layer 0,
    an AssertionError on every `bench` of such a spec (tests/fixtures/distributed/tiny-mtp.yaml)."""
    spec = Path(__file__).parent / "fixtures" / "distributed" / "tiny-mtp.yaml"
    plan = resolve(load_spec(spec))
    without = resolve(load_spec(spec).model_copy(update={"mtp": None}))
    free = {kind: 0.0 for kind in {r.kind for r in predict_prefill(plan, 1, 8, 2, 1e12, 1e11).rows}}
    rates = DecodeRates(dict.fromkeys(free, 1e9), 0.0, free, free, overlap=False)
    for model in (plan, without):
        assert isinstance(model.layers[0].ffn, FFNPlan)
    assert predict_prefill(plan, 1, 8, 2, 1e12, 1e11) == predict_prefill(without, 1, 8, 2, 1e12, 1e11)
    assert predict_decode_step(plan, 1, 8, 2, rates, {}) == predict_decode_step(without, 1, 8, 2, rates, {})


def test_the_cpu_peak_is_calibrated_in_both_layouts_a_model_s_matmuls_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 on a CPU without fp16 arithmetic ran a·b at 1.0 GFLOP/s and a·bᵀ (F.linear's layout, what
    the model runs) at 21: calibrated on a·b alone, gpt2's MFU read 1,523%. Both are timed, the
    faster kept."""
    import torch

    from archplan.bench import device as bench_device

    layouts = set()
    real_mm = torch.mm

    def recording(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        layouts.add(b.is_contiguous())
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", recording)
    assert bench_device.calibrate_matmul(torch.device("cpu"), torch.float32, size=64, seconds=0.01) > 0
    assert layouts == {True, False}


RATES = DecodeRates(gemv_bandwidth={"gqa+dense": 1e9, "embed+head": 2e9}, matmul_seconds=0.0,
                    attention_seconds={"gqa+dense": 5e-5, "embed+head": 0.0},
                    op_seconds={"gqa+dense": 1e-4, "embed+head": 1e-5}, overlap=False)
OPS = {"gqa+dense": OpCount(matmuls=7, attention=1, others=50), "embed+head": OpCount(matmuls=1, attention=0, others=6)}


def test_decode_model_structure() -> None:
    """Weights at each kind's GEMV bandwidth plus each kind's replayed ops, per layer × layers."""
    plan = plan_of(TINY)
    step = predict_decode_step(plan, 2, 32, 4, RATES, OPS)
    layers = next(r for r in step.rows if r.kind == "gqa+dense")
    assert layers.ops == 4 * 58
    assert layers.work == pytest.approx(layers.bytes / 1e9)
    assert layers.overhead == pytest.approx(4 * (5e-5 + 1e-4))
    assert layers.seconds == pytest.approx(layers.work + layers.overhead)
    assert step.seconds == pytest.approx(sum(r.seconds for r in step.rows))
    # FLOPs are the analytic decode step's, component for component
    assert sum(r.flops for r in step.rows) == decode_flops(plan, 32, 2).counted
    # the embedding reads the looked-up rows only; the final norm and the head their weights, at the
    # head's own bandwidth
    head = next(r for r in step.rows if r.kind == "embed+head")
    assert head.bytes == 4 * (2 * 64 + 64 + 64 * 256)
    assert head.work == pytest.approx(head.bytes / 2e9)
    # the cache is read by the replayed ops, whose time is measured at the run's context: it is not
    # priced again as bytes, so only the reported FLOPs grow with the context
    longer = predict_decode_step(plan, 2, 128, 4, RATES, OPS)
    assert longer.seconds == pytest.approx(step.seconds)
    assert sum(r.flops for r in longer.rows) > sum(r.flops for r in step.rows)
    # the effective bandwidth reported is all weight bytes over all weight seconds
    assert step.bandwidth == pytest.approx(sum(r.bytes for r in step.rows) / sum(r.work for r in step.rows))
    # CUDA: the host issues ahead of the device, the step is the larger of the two, and the weight
    # matmuls' host cost joins the overhead
    cuda = predict_decode_step(plan, 2, 32, 4, replace(RATES, overlap=True, matmul_seconds=1e-5), OPS)
    assert cuda.seconds == pytest.approx(max(sum(r.work for r in cuda.rows), sum(r.overhead for r in cuda.rows)))
    cuda_layers = next(r for r in cuda.rows if r.kind == "gqa+dense")
    assert cuda_layers.overhead == pytest.approx(4 * (7 * 1e-5 + 5e-5 + 1e-4))


def test_cuda_prefill_cannot_end_before_the_host_has_issued_its_calls() -> None:
    """CUDA's prefill: the larger of the roofline's sum and the host's issue of the pass's calls, each
    call at its group's per-call cost in the decode calibration (7 matmuls at 10 µs, one SDPA at
    50 µs, 50 others at 2 µs per layer in the step; a prefill of 7, 1 and 40 per layer)."""
    plan = plan_of(TINY)
    roof = predict_prefill(plan, 1, 32, 2, peak=1e12, bandwidth=1e11)
    rates = replace(RATES, overlap=True, matmul_seconds=1e-5)
    prefill_ops = {"gqa+dense": OpCount(7, 1, 40), "embed+head": OpCount(1, 0, 5)}
    floored = with_host_floor(roof, rates, OPS, prefill_ops)
    layers = next(r for r in floored.rows if r.kind == "gqa+dense")
    assert layers.overhead == pytest.approx(4 * (7 * 1e-5 + 5e-5 + 40 * 1e-4 / 50))
    assert layers.ops == 4 * 48 and layers.bound == "overhead"
    head = next(r for r in floored.rows if r.kind == "embed+head")
    assert head.overhead == pytest.approx(1e-5 + 5 * 1e-5 / 6)
    assert [r.work for r in floored.rows] == [r.work for r in roof.rows]
    assert floored.seconds == pytest.approx(sum(r.overhead for r in floored.rows))
    assert floored.seconds > roof.seconds
    # a pass whose kernels outlast their issue keeps the roofline's sum
    slow = predict_prefill(plan, 1, 32, 2, peak=1e6, bandwidth=1e5)
    assert with_host_floor(slow, rates, OPS, prefill_ops).seconds == pytest.approx(slow.seconds)


MLA_TINY = dict(
    name="tiny-mla", vocab_size=256, d_model=64, n_layers=2, max_seq_len=128,
    attention={"kind": "mla", "n_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 32, "qk_nope_head_dim": 8,
               "qk_rope_head_dim": 8, "v_head_dim": 8},
    ffn={"kind": "glu", "d_ff": 128},
)


def test_bench_mla_decode_flops_equal_size() -> None:
    """bench's counted decode FLOPs (meta, the absorbed step) equal `size`'s decode FLOPs × batch."""
    plan = plan_of(MLA_TINY)
    out = run_bench(plan, FAST).to_json()["decode"]
    # the untimed first step attends 17 keys, the timed ones 18, 19, 20: the median is recorded and priced
    assert out["context"] == 16 + 3
    assert out["flops_counted"] == out["flops"] == FAST.batch * decode_flops_per_token(plan, out["context"])
    for key in ("gemv_bandwidth", "op_seconds"):
        assert set(out["rates"][key]) == {"mla+dense", "embed+head"}
        assert all(v > 0 for v in out["rates"][key].values())
    assert out["rates"]["attention_seconds"]["mla+dense"] > 0
    assert out["rates"]["matmul_seconds"] == 0  # CPU: inside the bandwidth
    ops = out["ops_per_layer"]["mla+dense"]
    assert ops["matmuls"] > 0 and ops["attention"] == 1 and out["predicted_ms_per_token"] > 0


def test_cli_json_contract() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "gpt2", "--device", "cpu", "--dtype", "fp32", "--layers", "1",
                                 "--seq", "8", "--decode-tokens", "2", "--warmup", "0", "--iters", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("device", "dtype", "peak_memory_bytes", "extrapolated"):
        assert key in out
    assert out["extrapolated"] is True
    assert out["name"] == "gpt2" and out["run"] == {"layers": 1, "warmup": 0, "iters": 1, "compile": False,
                                                   "attn_backend": "auto", "decode_tokens": 2}
    for key in ("median_s", "tokens_per_s", "achieved_flops_per_s", "mfu"):
        assert out["prefill"][key] > 0
    assert out["decode"]["ms_per_token"] > 0
    assert out["predicted"]["prefill_s"] > 0
    # under --layers the step is the full depth's; the spread goes with the built layers' median,
    # as prefill's with measured_median_s (a median 7x above its own p90 before)
    decode = out["decode"]
    assert decode["p10_s"] <= decode["measured_ms_per_step"] / 1e3 <= decode["p90_s"]
    assert decode["ms_per_step"] > decode["measured_ms_per_step"]


def test_cli_text_names_the_extrapolated_depths() -> None:
    """The depths per layer kind as words (gpt2: one mha+dense layer built for 12), not a dict."""
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "gpt2", "--device", "cpu", "--dtype", "fp32", "--layers", "1",
                                 "--seq", "8", "--decode-tokens", "2", "--warmup", "0", "--iters", "1"],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "extrapolated from the layers built to the full depth (mha+dense 1 → 12)" in result.output
    # the median shown is the full depth's; the spread beside it, what the built layer measured
    text = " ".join(result.output.split())
    # one timed pass (--iters 1) and two decode steps: too few for a spread
    assert re.search(r"full depth, extrapolated; the built layers measured [\d.]+ ms, 1 timed pass: spread not judged "
                     r"\(--iters 3 or more\)", text)
    assert re.search(r"full depth, extrapolated; the built layers measured [\d.]+ ms/step, 2 timed passes: spread not "
                     r"judged \(--decode-tokens 3 or more\)", text)
    assert "{'" not in result.output


def test_piped_bench_is_as_wide_as_the_other_commands() -> None:
    """Piped with no COLUMNS, bench printed at rich's 80 columns (its notes wrapped to a column of
    words) where size, plan and compare print at `render.PIPED_WIDTH`."""
    from archplan.render import PIPED_WIDTH

    result = CliRunner().invoke(app, ["bench", "gpt2", "--device", "cpu", "--dtype", "fp32", "--layers", "1",
                                      "--seq", "8", "--decode-tokens", "2", "--warmup", "0", "--iters", "1"])
    assert result.exit_code == 0, result.output
    widest = max(len(line) for line in result.stdout.splitlines())
    assert 80 < widest <= PIPED_WIDTH


@pytest.mark.parametrize("argv", [["--seq", "8", "--decode-tokens", "0"], ["--seq", "8,16"],
                                  ["--seq", "8", "--decode-tokens", "0", "--compare-backends"]])
def test_a_run_off_a_terminal_writes_nothing_to_stderr(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress bars show on a terminal only: elsewhere rich left an empty line per bar."""
    proc = run_main(["bench", "gpt2", "--device", "cpu", "--dtype", "fp32", "--layers", "1", "--warmup", "0",
                     "--iters", "1", *argv], capsys, monkeypatch)
    assert proc.code == 0 and proc.stderr == ""


@pytest.mark.parametrize("mode", [[], ["--train"]])
def test_a_run_past_max_seq_len_or_beyond_every_layer_says_so(mode: list[str], capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As `size` does, a note past a RoPE model's max_seq_len (tiny-llama: 256); and `--layers 9` on
    its 4 layers builds them all. The run goes ahead (exit 0), the notes on stderr, after it."""
    spec = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    extra = [] if mode else ["--decode-tokens", "0", "--warmup", "0"]
    proc = run_main(["bench", spec, "--device", "cpu", "--seq", "300", "--layers", "9", "--iters", "1", *mode, *extra],
                    capsys, monkeypatch)
    assert proc.code == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "note: seq 300 is past tiny-llama's max_seq_len (256): timed as asked" in said
    assert "note: --layers 9 builds all 4 layers of tiny-llama (no layer kind has more)" in said
    if not mode:  # nothing extrapolated: the median's spread is what was measured
        assert "full depth, extrapolated" not in proc.stdout
    # a torchrun worker of another rank runs the same command: rank 0 alone says it
    monkeypatch.setenv("RANK", "1")
    proc = run_main(["bench", spec, "--device", "cpu", "--seq", "300", "--iters", "1", *mode, *extra],
                    capsys, monkeypatch)
    assert proc.code == 0 and "past tiny-llama's max_seq_len" not in proc.stderr


def test_a_decode_past_max_seq_len_says_so(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode cache holds the prompt and 1 + --decode-tokens more positions: a 250-token prompt
    with 8 decode steps runs to 259 on tiny-llama's 256 and gets the note; 240 with 8 does not."""
    spec = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    common = ["bench", spec, "--device", "cpu", "--layers", "1", "--warmup", "0", "--iters", "1",
              "--decode-tokens", "8"]
    proc = run_main([*common, "--seq", "250"], capsys, monkeypatch)
    assert proc.code == 0, proc.stderr
    assert ("note: seq 250 + 9 decode positions = 259 is past tiny-llama's max_seq_len (256): timed as asked"
            in " ".join(proc.stderr.split()))
    proc = run_main([*common, "--seq", "240"], capsys, monkeypatch)
    assert proc.code == 0 and "max_seq_len" not in proc.stderr


def test_a_layout_run_past_max_seq_len_says_so(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench --layout` said nothing of it, where every other mode and `verify --layout` did."""
    monkeypatch.setattr("archplan.distributed.bench.bench_layout", lambda *args, **kwargs: True)
    spec = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    proc = run_main(["bench", spec, "--seq", "300", "--layout", "tp=1,cp=1,pp=1,dp=1,zero=0,recompute=none,mb=1"],
                    capsys, monkeypatch)
    assert proc.code == 0, proc.stderr
    assert "note: seq 300 is past tiny-llama's max_seq_len (256): timed as asked" in " ".join(proc.stderr.split())


def test_cuda_without_cuda_is_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # a machine without CUDA, on every machine: `modules.model.resolve_device` asks torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = run_main(["bench", "llama-2-7b", "--device", "cuda"], capsys, monkeypatch)
    assert proc.code == 2
    assert "CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_big_model_is_exit_2_with_suggestion(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    proc = run_main(["bench", "llama-3-70b", "--device", "cpu", "--seq", "64"], capsys, monkeypatch)
    assert proc.code == 2
    assert "will not fit" in proc.stderr and "try --layers" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("argv", "fix"), [
    (["gpt2", "--batch", "64", "--seq", "1024", "--decode-tokens", "0"], "try --batch "),
    (["gpt2", "--seq", "64,1024", "--batch", "64"], "try --batch "),
])
def test_prefill_and_sweep_past_the_device_are_refused_as_train_is(
        argv: list[str], fix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bench mode is refused through one check (`bench.fit`): the same wording as --train's,
    and the options that fit, not only --layers (gpt2's weights alone fit 1 GiB; 64 × 1,024
    tokens of logits do not)."""
    monkeypatch.setattr(runner, "free_memory", lambda device: 1 << 30)
    proc = run_main(["bench", *argv, "--device", "cpu"], capsys, monkeypatch)
    assert proc.code == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "will not fit" in proc.stderr and "85% of it usable" in proc.stderr and fix in proc.stderr


@pytest.mark.parametrize(("argv", "needles"), [
    (["gpt2", "--seq", "1024", "--decode-tokens", "4"],
     ["1029 positions", "the learned position table (max_seq_len 1024)", "--seq 1019 or less", "--decode-tokens 0"]),
    (["gpt2", "--seq", "1020", "--decode-tokens", "8"], ["--seq 1015 or less", "--decode-tokens 3 or fewer"]),
    (["hyena-153m", "--seq", "2048"], ["2065 positions", "(l_max 2048)", "--seq 2031 or less"]),
])
def test_a_decode_beyond_the_positions_is_refused_before_timing(
        argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode cache holds seq + decode-tokens + 1 positions: more than a learned table or a
    Hyena filter has is a one-line error before anything is built or timed (it once came after
    the prefill had been timed)."""
    monkeypatch.setattr(runner, "build_model", lambda *a, **k: pytest.fail("built before the check"))
    assert_one_line_error(run_main(["bench", *argv, "--device", "cpu", "--layers", "1"], capsys, monkeypatch),
                          *needles)


def test_the_default_seq_fits_the_spec(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --seq, 512 or the most the spec takes, said in a note: a 256-position learned table
    leaves 239 prompt tokens beside the 17 decode positions; --train needs only max_seq_len (the
    default once failed on any spec shorter than 512 + 17)."""
    tiny = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-gpt.yaml")
    fast = ["--device", "cpu", "--warmup", "0", "--iters", "1"]
    decode = run_main(["bench", tiny, *fast, "--json"], capsys, monkeypatch)
    assert decode.code == 0 and json.loads(decode.stdout)["seq"] == 239
    noted = run_main(["bench", tiny, *fast, "--decode-tokens", "0"], capsys, monkeypatch)
    assert noted.code == 0 and "note: --seq 256, not 512: the max_seq_len of tiny-gpt" in " ".join(noted.stderr.split())
    # RoPE runs on past max_seq_len, but the default stays within it (it noted its own overrun)
    rope = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    said = run_main(["bench", rope, *fast, "--layers", "1"], capsys, monkeypatch)
    flat = " ".join(said.stderr.split())
    assert said.code == 0 and "past tiny-llama's max_seq_len" not in flat
    assert "note: --seq 239, not 512: the max_seq_len of tiny-llama less the decode cache's 17 positions" in flat
    # the note follows a run: a refusal stays one line
    assert_one_line_error(run_main(["bench", tiny, *fast, "--recompute", "full"], capsys, monkeypatch), "--recompute")
    # (its activations, a 2-layer model's at 256 tokens, are judged outside ±25%: exit 1, not 2)
    train = run_main(["bench", tiny, "--device", "cpu", "--iters", "1", "--train", "--json"], capsys, monkeypatch)
    assert train.code in (0, 1) and json.loads(train.stdout)["seq"] == 256


def test_several_specs_without_seq_sweep_the_default(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Several specs make a sweep, which needs two lengths: without --seq, a quarter, half and all
    of the default one (tiny-gpt's 256 caps it), said in a note (it once asked for --seq)."""
    distributed = Path(__file__).parent / "fixtures" / "distributed"
    specs = [str(distributed / "tiny-gpt.yaml"), str(distributed / "tiny-llama.yaml")]
    fast = ["--device", "cpu", "--warmup", "0", "--iters", "1", "--layers", "1"]
    noted = run_main(["bench", *specs, *fast], capsys, monkeypatch)
    assert noted.code == 0 and noted.stdout.count("│ exponent k") == 2
    assert [re.findall(r"^│ +(\d+) │", table, re.M) for table in noted.stdout.split("exponent k")[:2]] == [
        ["64", "128", "256"]] * 2
    assert ("note: --seq 64,128,256, up to 256 (the max_seq_len of tiny-gpt): the default sweep"
            in " ".join(noted.stderr.split()))


def test_check_positions_boundary() -> None:
    """Exactly as many positions as the table passes; one more does not; rotary positions have none."""
    learned = plan_of({**TINY, "position": {"kind": "learned"}})
    check_positions(learned, replace(FAST, seq=123, decode_tokens=4))
    check_positions(learned, replace(FAST, seq=128, decode_tokens=0))
    with pytest.raises(ArchplanError, match="129 positions"):
        check_positions(learned, replace(FAST, seq=124, decode_tokens=4))
    check_positions(plan_of(TINY), replace(FAST, seq=4096))
    # a prompt past the table with more steps than the table holds: neither fix alone suffices
    # (the message ended at "use ")
    with pytest.raises(ArchplanError, match=r"use --seq 128 or less with --decode-tokens 0 \(prefill only\)$"):
        check_positions(learned, replace(FAST, seq=256, decode_tokens=200))


def test_compare_backends_runs_each_available_backend() -> None:
    found = available_backends(torch.device("cpu"), torch.float32)
    assert "math" in found
    rows = compare_backends(plan_of(TINY), FAST)
    assert [r["backend"] for r in rows] == found
    assert all(float(r["median_s"]) > 0 and int(r["peak_memory_bytes"]) > 0 for r in rows)
    # the allocator's peak of one forward, weights included: not a process high-water mark, which
    # holds the torch runtime (hundreds of MiB) and could not tell the backends apart
    assert all("torch.profiler" in str(r["peak_memory_method"]) for r in rows)
    assert all(int(r["peak_memory_bytes"]) < 64 * 2**20 for r in rows)
    # each backend's timing is judged for noise as the main prefill's is
    assert all("noise" in r for r in rows)


def test_a_backend_that_would_not_fit_is_refused_before_anything_is_timed(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--compare-backends at 32k timed the main prefill, then refused "bench" for the math
    backend's scores: the refusal now comes first and names the backend."""
    from archplan.bench import sweep

    def fits(plan: object, cfg: BenchConfig, device: object, run: str = "bench") -> None:
        if cfg.attn_backend == "math":
            raise ArchplanError(f"{run} will not fit")

    def timed(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a run was timed before the refusal")

    monkeypatch.setattr(sweep, "check_fits", fits)
    monkeypatch.setattr(runner, "run_bench", timed)
    tiny = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml")
    outcome = run_main(["bench", tiny, "--device", "cpu", "--seq", "32", "--compare-backends"], capsys, monkeypatch)
    assert outcome.code == 2 and "--compare-backends' math backend will not fit" in outcome.stderr


def test_the_profiled_forward_writes_nothing_to_stderr() -> None:
    """c10's allocator warns on fd 2 when the profiled run frees a block allocated before the
    profile began ("Memory block of unknown size ..."): a remark about the profiler, not the run.
    A two-spec sweep at three lengths printed it."""
    fixtures = Path(__file__).parent / "fixtures" / "distributed"
    proc = subprocess.run([sys.executable, "-m", "archplan", "bench", str(fixtures / "tiny-llama.yaml"),
                           str(fixtures / "tiny-mamba.yaml"), "--device", "cpu", "--seq", "32,64,128"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "CPUAllocator" not in proc.stderr and "Memory block" not in proc.stderr


def test_unavailable_backend_is_a_clear_error() -> None:
    if "efficient" in available_backends(torch.device("cpu"), torch.float32):
        pytest.skip("efficient attention runs on this CPU build")
    with pytest.raises(ArchplanError, match="not available"):
        run_bench(plan_of(TINY), BenchConfig(**{**FAST.__dict__, "attn_backend": "efficient"}))


def test_backends_are_probed_with_the_model_s_mask(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ALiBi's additive bias goes to SDPA as attn_mask, and the probe asks with that kind of mask, so
    --compare-backends lists the backends the model can run (once a 3-D bias, which CPU's flash kernel
    refused: flash was listed and died in the model's forward with torch's "No available kernel").
    The bias is 4-D now, which CPU's flash kernel takes: --attn-backend flash runs the model."""
    alibi = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-mqa-alibi.yaml")
    plan = resolve(load_spec(alibi))
    assert runner.attention_mask_kind(plan) == "alibi" and runner.attention_mask_kind(plan_of(TINY)) is None
    cpu = torch.device("cpu")
    assert set(available_backends(cpu, torch.bfloat16, "alibi")) <= set(available_backends(cpu, torch.bfloat16))
    assert "flash" in available_backends(cpu, torch.bfloat16, "alibi")
    fast = ["--device", "cpu", "--warmup", "0", "--iters", "1", "--seq", "32"]
    assert run_main(["bench", alibi, *fast, "--attn-backend", "flash"], capsys, monkeypatch).code == 0
    rows = compare_backends(plan, replace(FAST, seq=32))
    assert [r["backend"] for r in rows] == available_backends(cpu, TORCH_DTYPES[FAST.dtype], "alibi")


def test_compare_backends_names_the_backends_it_could_not_time(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLA model on a CPU compared one backend, math, and said nothing of the three left out."""
    mla = str(Path(__file__).parent / "fixtures" / "distributed" / "tiny-mla.yaml")
    outcome = run_main(["bench", mla, "--device", "cpu", "--warmup", "1", "--iters", "1", "--seq", "16",
                        "--decode-tokens", "0", "--compare-backends"], capsys, monkeypatch)
    text = " ".join(outcome.stdout.split())
    assert outcome.code == 0 and "not available here, so not timed: flash, efficient, cudnn" in text


def test_no_prompt_fits_offers_the_decode_tokens_that_fit(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt2's 1,024 learned positions take a 1-token prompt and 1,022 decode steps (the cache holds
    one more, the untimed first step): the refusal offered only --decode-tokens 0."""
    outcome = run_main(["bench", "gpt2", "--device", "cpu", "--decode-tokens", "1023"], capsys, monkeypatch)
    assert outcome.code == 2 and "give --decode-tokens 1022 or fewer, or --decode-tokens 0" in outcome.stderr


def test_backends_are_probed_with_the_model_s_head_sizes(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """MLA's q·k heads are wider than its v heads, which CPU's flash kernel refuses: the probe asks
    with the model's own calls, so --compare-backends lists only what runs and --attn-backend flash
    is refused in one line (it died in the forward with torch's "No available kernel", exit 1), in
    prefill and in a --seq sweep alike; a model without attention has no call to choose a kernel for."""
    fixtures = Path(__file__).parent / "fixtures" / "distributed"
    mla = str(fixtures / "tiny-mla.yaml")
    plan = resolve(load_spec(mla))
    calls = runner.attention_calls(plan)
    assert calls and all(qk > v and not gqa for qk, v, gqa in calls)
    cpu = torch.device("cpu")
    found = available_backends(cpu, torch.float32, None, calls)
    assert "math" in found and "flash" not in found
    assert [r["backend"] for r in compare_backends(plan, replace(FAST, seq=32))] == found
    fast = ["--device", "cpu", "--warmup", "0", "--iters", "1", "--dtype", "fp32"]
    for seq in ("32", "16,32"):
        result = run_main(["bench", mla, *fast, "--seq", seq, "--attn-backend", "flash"], capsys, monkeypatch)
        assert result.code == 2 and "MLA's unequal q and v head sizes (available: math" in result.stderr
    hyena = str(fixtures / "tiny-hyena.yaml")
    result = run_main(["bench", hyena, *fast, "--seq", "32", "--attn-backend", "math"], capsys, monkeypatch)
    assert result.code == 2 and "tiny-hyena has no attention layer" in result.stderr
    result = run_main(["bench", hyena, *fast, "--seq", "32", "--compare-backends"], capsys, monkeypatch)
    assert result.code == 2 and "--compare-backends: tiny-hyena has no attention layer" in result.stderr


LAYOUT = "tp=2,cp=1,pp=1,dp=1,ep=1,zero=1,recompute=none,mb=1"


@pytest.mark.parametrize(("args", "message"), [
    (["--layout", LAYOUT, "--batch", "4"], "--batch does not apply to --layout"),
    (["--layout", LAYOUT, "--train"], "--train and --layout are two modes of this command; give one"),
    (["--train", "--compile"], "--compile does not apply to --train"),
    (["--nproc", "2"], "--nproc does not apply to prefill and decode (it is read by --layout)"),
    (["--seq", "64,128", "--decode-tokens", "3"], "--decode-tokens does not apply to a --seq sweep"),
    # --force belongs to --plot in every mode (it read "read by a --seq sweep" in prefill mode)
    (["--force"], "--force overwrites the --plot figure; without --plot nothing is written"),
    (["--train", "--force"], "--force overwrites the --plot figure; without --plot nothing is written"),
])
def test_an_option_its_mode_ignores_is_refused(args: list[str], message: str) -> None:
    """Each bench mode reads some options; one given that the mode would ignore is an error, not
    silence (--layout once ignored --device)."""
    result = CliRunner().invoke(app, ["bench", "gpt2", *args])
    assert isinstance(result.exception, ArchplanError), result.output
    assert message in result.exception.render()


@pytest.mark.parametrize(("free", "args", "fix"), [
    # gpt2 at batch 32 × seq 64: 3.72 GiB against 85% of 4 GiB; the largest batch that fits
    (4 << 30, ("--batch", "32", "--seq", "64"), "try --batch 2"),
    (4 << 30, ("--layers", "1", "--batch", "1000", "--seq", "64"), "try --batch "),
    # 20 B/param: 2.5 GB, 1.9 GB at --layers 8, 1.3 GB at 4, against 85% of 2 GiB
    (2 << 30, ("--seq", "64"), "try --layers 4"),
    # batch 1 is already the least: a shorter sequence
    (int(1.3 * (1 << 30)), ("--layers", "1", "--seq", "1024"), "try --seq "),
])
def test_train_past_the_device_memory_is_refused_with_what_fits(
        free: int, args: tuple[str, ...], fix: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that does not fit is refused before anything is built, in one line that states the
    usable share of the free memory and the options that fit, changing as little as possible; the
    options it names do fit, by size's figure (and one more sequence or token would not)."""
    from archplan.analytic import count_params
    from archplan.analytic.memory import training_memory
    from archplan.bench.fit import FIT_FRACTION, truncate
    from archplan.distributed import train
    from archplan.loader import load_spec
    from archplan.resolve import resolve

    monkeypatch.setattr(train, "free_memory", lambda device: free)
    proc = run_main(["bench", "gpt2", "--train", *args], capsys, monkeypatch)
    assert_one_line_error(proc, "--train will not fit", "85% of it usable", fix)
    given = dict(zip(args[::2], args[1::2]))
    options = dict(zip(*[iter(proc.stderr.split("; try ")[1].split())] * 2))
    chosen = {**given, **options}
    plan = resolve(load_spec("gpt2"))
    if "--layers" in chosen:
        plan = truncate(plan, int(chosen["--layers"]))

    def step(batch: int, seq: int) -> int:
        return training_memory(plan, count_params(plan), batch, seq, "none", activation_dtype="bf16",
                               attention_kernel="torch-cpu", residual_dtype="fp32", units="torch", autocast=True).total

    batch, seq = int(chosen.get("--batch", 1)), int(chosen["--seq"])
    assert step(batch, seq) <= FIT_FRACTION * free
    grown = (batch + 1, seq) if "--batch" in options else (batch, seq + 1)
    if "--batch" in options or "--seq" in options:
        assert step(*grown) > FIT_FRACTION * free


def test_train_that_fits_nowhere_says_so(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from archplan.distributed import train

    monkeypatch.setattr(train, "free_memory", lambda device: 1 << 20)
    proc = run_main(["bench", "gpt2", "--train", "--seq", "64"], capsys, monkeypatch)
    assert_one_line_error(proc, "even at one layer of each kind, batch 1 × seq 1",
                          "use a device with more memory, or a smaller spec")


@pytest.mark.parametrize(("args", "said"), [
    (("gpt2", "gpt2", "--seq", "32"), "--train runs one spec, got 2: gpt2, gpt2"),
    (("gpt2", "--seq", "32,64"), "--train runs one length, got --seq 32,64"),
])
def test_train_runs_one_spec_at_one_length(args: tuple[str, ...], said: str, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_line_error(run_main(["bench", *args, "--train"], capsys, monkeypatch), said)


def test_the_spinner_of_a_long_step_prints_nothing_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """verify --layout, bench --layout and --train show it on a terminal only: piped output stays the table."""
    from archplan.render import busy

    with busy("one rank's training step"):
        pass
    assert capsys.readouterr() == ("", "")


def test_the_math_kernel_s_scores_are_in_the_fit_estimate() -> None:
    """SDPA's math kernel builds one layer's T × T scores and their softmax whole, per head, in
    fp32 whatever the inputs' dtype (it upcasts bf16: a bf16 sweep measured twice its 2-byte price)."""
    plan = resolve(load_spec("gpt2"))
    for dtype in (DType.fp32, DType.bf16):
        fused = runner.BenchConfig(seq=1024, batch=2, dtype=dtype)
        math_kernel = replace(fused, attn_backend="math")
        extra = runner.estimate_bytes(plan, math_kernel) - runner.estimate_bytes(plan, fused)
        assert extra == 2 * 2 * 12 * 1024 * 1024 * 4


def test_the_layout_table_prints_the_median_its_rates_come_from(capsys: pytest.CaptureFixture[str]) -> None:
    """With an even number of timed steps the median is the mean of the middle two (as the tokens/s
    and MFU rows compute it), and FLOP figures are in human units."""
    from archplan.distributed.bench import render
    from archplan.distributed.workers import DistBench

    states = {"parameters": 1 << 18, "gradients": 1 << 18, "optimizer": 1 << 19}
    render(DistBench("tiny", "tp=2,cp=1,pp=1,dp=1,ep=1,zero=3,recompute=none,mb=1", 2, "gloo", "cpu", 64, 1, 2,
                     [0.1, 0.2], [0.05, 0.05], 64, 64 / 0.15, 64 / 0.05, 755_000_000, 1.78e11, "calibrated", 0.1,
                     [1 << 20, 1 << 20], "VmHWM", None, "—",
                     [{"rank": r, "stage": 0, "measured": states, "plan": states, "ok": True} for r in (0, 1)], True))
    out = " ".join(capsys.readouterr().out.split())  # the table wraps its long cells
    assert "150.0 ms" in out and "427" in out
    assert "1.00 MiB / 1.00 MiB" in out and "✓ plan's FSDP2 figures" in out
    assert "755 MFLOP/token" in out and "178 GFLOP/s" in out and "model FLOPs: training" in out


def test_no_layout_names_only_what_the_user_fixed(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A dense model's ep=1 is the model's, not a choice: the reason names no `with ep=1`."""
    proc = run_main(["plan", "llama-3.1-405b", "--gpus", "1000000000", "--gpu", "h100"], capsys, monkeypatch)
    assert proc.code == 2 and "no layout: 1,000,000,000 GPUs admit no" in proc.stderr and "with ep" not in proc.stderr


def test_compile_warnings_become_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torch.compile warns while the warm-up compiles (inductor: "no code generation for
    complex operators" on S4's and Hyena's FFTs) is the result's `compile_warnings`, each once,
    printed as notes under the table rather than as raw warnings with torch's file paths. A
    stand-in for torch.compile that warns on its first two calls (it compiles on the first) keeps
    this test free of inductor's minutes of compiling."""
    import warnings

    def compile_warning(model: torch.nn.Module) -> object:
        calls = []

        def run(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if len(calls) <= 2:
                warnings.warn("no code generation for complex operators", UserWarning, stacklevel=2)
            return model(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", compile_warning)
    result = run_bench(plan_of(TINY), BenchConfig(**{**FAST.__dict__, "compile": True, "warmup": 2}))
    assert result.compile_warnings == ("no code generation for complex operators",)
    assert result.to_json()["compile_warnings"] == ["no code generation for complex operators"]
    assert run_bench(plan_of(TINY), FAST).compile_warnings == ()


def test_compile_without_a_warm_up_is_refused(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call compiles: under --warmup 0 it was timed as the prefill (18.6 s for gpt2's
    20 ms, scaled up again by --layers' extrapolation), with no word of it."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    assert_one_line_error(run_main(["bench", "gpt2", "--layers", "1", "--seq", "16", "--warmup", "0", "--compile"],
                                   capsys, monkeypatch), "--compile needs --warmup 1 or more")


@pytest.mark.parametrize(("mixer", "width", "seq", "phase"), [
    ("{kind: s4d, d_state: 64}", 512, 256, "long-conv backward"),
    ("{kind: stripedhyena, short_filter: 3, short_filter_bias: true, state_size: 8, filter_groups: 1}", 64, 512,
     "long-conv backward"),
    ("{kind: hyena, order: 2, filter_order: 64, l_max: 4096}", 128, 512, "long-conv backward"),
    ("{kind: s4, d_state: 32}", 128, 256, "kernel generation"),
], ids=["s4d", "stripedhyena", "hyena", "s4"])
def test_train_prices_a_long_convolutions_peak(mixer: str, width: int, seq: int, phase: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose long convolution dominates (one layer, no FFN, a 64-token vocabulary) peaks in
    the mixer's backward: the FFT convolution's inverse FFTs, and S4D's kernel unit or the modal
    filter recomputing its basis with its gradients. S4D at d_model 512 and 64 states held
    temporaries of 34 MiB in a 50.5 MiB step, which the other moments left out. Measured / analytic
    total before the `long-conv backward` moment: 2.87, 6.62 and 1.47 (✗); 1.00, 1.01 and 1.05 with it.
    S4 (DPLR) peaks in its forward, where the doubling concatenates its fp32 basis: 1.50 before
    either moment, 1.17 (✗) with the backward's alone, 0.99 with the `kernel generation` moment."""
    spec = tmp_path / "long-conv.yaml"
    spec.write_text(f"name: long-conv\nvocab_size: 64\nd_model: {width}\nn_layers: 1\nmax_seq_len: 4096\n"
                    f"norm: {{kind: rmsnorm}}\nposition: {{kind: none}}\nlong_conv: {mixer}\nlayout: {{mixers: H}}\n")
    run = run_main(["bench", str(spec), "--device", "cpu", "--iters", "1", "--train", "--seq", str(seq), "--json"],
                   capsys, monkeypatch)
    out = json.loads(run.stdout)
    assert out["analytic_peak_phase"] == phase
    assert out["total_ok"] and 0.9 < out["measured"]["Total"] / out["analytic_total"] < 1.1


@pytest.mark.parametrize(("position", "window", "dtype"), [("alibi", None, torch.float32), ("alibi", None, torch.bfloat16),
                                                          ("alibi", 64, torch.float32), ("rope", 64, torch.bfloat16),
                                                          ("rope", None, torch.float32)])
def test_the_fit_estimate_holds_the_attention_mask_a_prompt_builds(position: str, window: int | None,
                                                                   dtype: torch.dtype) -> None:
    """An ALiBi bias is H·T·S: 16 heads at 8k tokens took 8.9 GiB of a run the estimate put at
    19 MiB. `mask_bytes` against a live-bytes trace of the mask's build at 256 tokens: never less,
    at most a third more (its T·S index tensors are not all alive at once)."""
    from live_bytes import LiveBytes

    from archplan.modules.attention import additive_mask
    from archplan.modules.positions import Alibi

    heads, seq = 16, 256
    attention = {"kind": "mha", "n_heads": heads, **({"sliding_window": window} if window else {})}
    plan = resolve(Spec.model_validate({"name": "masked", "vocab_size": 64, "d_model": 64, "n_layers": 1,
                                        "max_seq_len": seq, "attention": attention, "position": {"kind": position},
                                        "ffn": {"kind": "glu", "d_ff": 128},
                                        **({"layout": {"mixers": "S"}} if window else {})}))
    estimated = runner.mask_bytes(plan, seq, torch.finfo(dtype).bits // 8)
    positions = torch.arange(seq)
    with LiveBytes() as trace:
        mask = additive_mask(positions, positions, window, Alibi(heads) if position == "alibi" else None, dtype)
    if position == "rope" and window is None:
        assert estimated == 0  # SDPA's is_causal: no mask is built
        return
    assert mask.numel() * mask.element_size() <= trace.peak <= estimated <= 4 / 3 * trace.peak


def test_the_cpu_peak_memory_says_it_is_the_whole_process() -> None:
    """On CPU the peak is the process's resident high-water mark: torch's runtime (a few hundred
    MiB) is in it, which a tiny model's row printed beside its analytic kilobytes without a word."""
    from archplan.bench.device import peak_memory, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    peak, method = peak_memory(cpu)
    assert peak > 0 and method.startswith("process peak RSS") and "torch's runtime included" in method


def test_json_says_when_a_run_is_past_the_trained_length(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Text mode notes a RoPE run past max_seq_len on stderr; --json said nothing of it in any
    mode, where verify --json carries it as `past_max_seq_len`. A sweep's noisy lengths are
    said too (its exponents are fitted on those times): in text on stderr, in JSON per point."""
    tiny = Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml"
    short = tmp_path / "short.yaml"
    short.write_text(tiny.read_text().replace("max_seq_len: 256", "max_seq_len: 16"))
    fast = ["--device", "cpu", "--warmup", "0", "--iters", "1"]
    out = run_main(["bench", str(short), *fast, "--seq", "32", "--decode-tokens", "2", "--json"], capsys, monkeypatch)
    assert out.code == 0 and "past short" not in out.stderr
    assert "32 + 3 decode positions = 35 is past" in json.loads(out.stdout)["past_max_seq_len"]
    out = run_main(["bench", str(short), str(tiny), *fast, "--seq", "8,32", "--json"], capsys, monkeypatch)
    first, second = json.loads(out.stdout)
    assert "seq 32 is past" in first["past_max_seq_len"] and second["past_max_seq_len"] is None
    assert all("noise" in point for point in first["points"])
    out = run_main(["bench", str(tiny), "--device", "cpu", "--warmup", "0", "--iters", "1", "--seq", "32",
                    "--decode-tokens", "2", "--json"], capsys, monkeypatch)
    assert json.loads(out.stdout)["past_max_seq_len"] is None


def test_a_sweep_says_which_lengths_timed_noisily() -> None:
    from archplan.bench.sweep import SweepPoint

    steady = SweepPoint(64, (1.0, 1.01, 1.02), 0, 1.0, 0, 0)
    noisy = SweepPoint(128, (1.0, 2.0, 3.0), 0, 1.0, 0, 0)
    assert steady.noise_note("m") is None
    note = noisy.noise_note("m")
    assert note is not None and note.startswith("m at seq 128 timings spread 3.00×") and "the fastest pass" in note


def test_train_prices_the_kv_copies_archplan_makes_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA archplan's attention repeats K and V to every query head before SDPA (`repeats_kv`:
    the fused kernels refuse `enable_gqa`), and SDPA keeps the copies; the flash kernel's count
    under archplan's units prices them. Run here with that branch forced, against the CPU's own
    path: the kept activations grow by exactly what the count grows by, two bf16 copies of
    n·(H − Hkv)·Dh a layer (1 of 4 heads shared in tiny-llama). Without recompute only: a
    checkpoint keeps the core's inputs, from before the repeat."""
    from archplan.distributed import train
    from archplan.modules import attention

    plan = resolve(load_spec(Path(__file__).parent / "fixtures" / "distributed" / "tiny-llama.yaml"))
    mixer = plan.layers[0].mixer
    seq = 128

    def bench(recompute: str) -> tuple[int, int]:
        run = train.train_bench(plan, device="cpu", dtype="bf16", batch=1, seq=seq, recompute=recompute, iters=1)
        return run.measured_activations, run.analytic_activations

    cpu = {mode: bench(mode) for mode in ("none", "selective")}
    monkeypatch.setattr(attention, "repeats_kv", lambda q: True)
    monkeypatch.setattr(train, "attention_kernel", lambda dev: "flash")
    cuda = {mode: bench(mode) for mode in ("none", "selective")}
    copies = 2 * 2 * seq * (mixer.n_heads - mixer.n_kv_heads) * mixer.head_dim * len(plan.layers)
    assert copies > 0
    assert [c - p for c, p in zip(cuda["none"], cpu["none"])] == [copies, copies]
    assert cuda["selective"] == cpu["selective"]


@pytest.mark.parametrize(("fixture", "dtype", "recompute"), [
    ("tiny-llama", "fp32", "full"), ("tiny-gpt", "bf16", "full"), ("tiny-moe", "bf16", "full")])
def test_train_measures_the_step_with_its_gradients_held(fixture: str, dtype: str, recompute: str) -> None:
    """torch freed the gradients between steps (`set_to_none`), so at the loss backward it held
    4 B/param fewer than size's convention prices: 0.85 of size's peak, ✗, where no autocast weight
    copies made up for it (fp32, or a checkpoint freeing them). The step keeps them, as ZeRO's and
    Megatron's buffers do: within 2% (bf16 holds autocast's copies above it)."""
    from archplan.distributed.train import train_bench

    plan = resolve(load_spec(Path(__file__).parent / "fixtures" / "distributed" / f"{fixture}.yaml"))
    run = train_bench(plan, device="cpu", dtype=dtype, batch=2, seq=128, recompute=recompute, iters=1)
    assert run.total_ok and run.states_ok
    assert 1.0 <= run.measured["Total"] / run.analytic_total < 1.02


@pytest.mark.parametrize(("position", "window", "heads", "seq"), [("alibi", None, 4, 256), ("rope", 64, 4, 256),
                                                                  ("alibi", None, 8, 1024)],
                         ids=["alibi", "window", "alibi-1k"])
def test_train_prices_and_measures_the_shared_mask(position: str, window: int | None, heads: int, seq: int) -> None:
    """An ALiBi bias (H, T, T) or a window's (T, T) mask is built once a forward and kept by SDPA:
    built in the warm-up, before the tracker, it fell in no category (tiny-mqa-alibi at 1 × 256:
    524,288 B unseen, the true activations 1.34× size's), and size's count did not price it. The
    measured step finds it built, as a run's later steps do, and hands it to the tracker: its
    fp32 build-up is no part of the step (rebuilt inside it, an 8-head bias at 1,024 tokens put
    the peak at 2.8× size's)."""
    from archplan.analytic.memory import activation_memory
    from archplan.distributed.train import train_bench

    attention = {"kind": "mqa", "n_heads": heads, **({"sliding_window": window} if window else {})}
    plan = resolve(Spec.model_validate({
        "name": "masked", "vocab_size": 512, "d_model": 64, "n_layers": 2, "max_seq_len": seq,
        "attention": attention, "position": {"kind": position}, "ffn": {"kind": "mlp", "d_ff": 128},
        **({"layout": {"mixers": "S"}} if window else {})}))
    mask = 2 * (heads if position == "alibi" else 1) * seq * seq
    priced = activation_memory(plan, 1, seq, activation_dtype="bf16", attention_kernel="torch-cpu", units="torch")
    assert priced.by_component["masks"] == mask
    assert "masks" not in activation_memory(plan, 1, seq, attention_kernel="flash").by_component
    run = train_bench(plan, device="cpu", dtype="bf16", batch=1, seq=seq, recompute="none", iters=1)
    assert run.measured_activations > mask
    assert abs(run.measured_activations / run.analytic_activations - 1) < 0.02
    assert run.total_ok and abs(run.measured["Total"] / run.analytic_total - 1) < 0.05


@pytest.mark.parametrize(("fixture", "dtype"), [("tiny-llama", "bf16"), ("tiny-mla", "fp32"), ("tiny-mtp", "bf16")])
def test_train_prices_and_measures_the_shared_rope_tables(fixture: str, dtype: str) -> None:
    """The rotary layers' cos and sin tables are built once a forward and shared (`RopeTables`);
    built in the warm-up, before the tracker, MemTracker counted them in no category and size's
    count under archplan's units did not price them. Now the tables the model holds after a step,
    handed to the tracker, are the bytes `shared_rope_bytes` prices: one (T, R) cos and sin per
    rotary width in the queries' dtype, here with partial rotary and MLA's rope head."""
    from archplan.analytic.memory import activation_memory, shared_rope_bytes
    from archplan.distributed.train import shared_tables
    from archplan.modules.model import build_model

    base = load_spec(Path(__file__).parent / "fixtures" / "distributed" / f"{fixture}.yaml")
    rope = base.position.model_copy(update={"fraction": 0.5}) if fixture == "tiny-llama" else base.position
    plan = resolve(base.model_copy(update={"position": rope}))
    seq, act = 96, 2 if dtype == "bf16" else 4
    torch.manual_seed(0)
    model = build_model(plan, torch.device("cpu"), torch.float32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with autocast:
        model(torch.randint(0, plan.vocab_size, (2, seq))).float().sum().backward()
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in shared_tables(model)}.values())
    priced = shared_rope_bytes(plan, seq, act)
    assert held == priced > 0
    assert activation_memory(plan, 2, seq, activation_dtype=dtype, attention_kernel="torch-cpu",
                             units="torch").by_component["rope"] == priced
    assert "rope" not in activation_memory(plan, 2, seq, attention_kernel="flash").by_component


def test_bench_flop_conventions_state_the_fft_count() -> None:
    """A long convolution's prefill and training FLOPs counted FFTs at 2.5·n·⌈log2 n⌉ and its filters
    once for the batch, as size's and verify's conventions print, but bench's strings said neither."""
    from archplan.bench.runner import LAYOUT_FLOPS_CONVENTION, PREFILL_FLOPS_CONVENTION, TRAINING_FLOPS_CONVENTION

    for convention in (PREFILL_FLOPS_CONVENTION, TRAINING_FLOPS_CONVENTION, LAYOUT_FLOPS_CONVENTION):
        assert "2.5·n·⌈log2 n⌉ per real transform of length n = 2T" in convention
        assert "filters made once for the batch" in convention
    assert "an FFT convolution's irfft backward 1 ×" in TRAINING_FLOPS_CONVENTION


def test_one_or_two_timed_passes_say_their_spread_is_not_judged() -> None:
    """`--iters 1` printed `p10 111.37 / p90 111.37 ms measured`, a spread of none where none was
    judged; the decode row's passes are `--decode-tokens`' steps, not `--iters`'."""
    from archplan.bench.timing import Timing
    from archplan.commands.bench import _measured

    assert _measured(Timing((0.1, 0.2)), "ms/step", False, "--decode-tokens") == (
        "2 timed passes: spread not judged (--decode-tokens 3 or more)")
    assert _measured(Timing((0.1,)), "ms", True, "--iters").endswith(
        "ms, 1 timed pass: spread not judged (--iters 3 or more)")
    assert _measured(Timing((0.1, 0.1, 0.1)), "ms", False, "--iters") == "p10 100.00 / p90 100.00 ms measured"
    noisy = Timing((0.1, 0.1, 0.1, 0.3, 0.3)).noise_note("decode step", samples_flag="--decode-tokens")
    assert noisy is not None and noisy.endswith("with more --decode-tokens before trusting it")
