"""Memory figures against docs/formulas.md §4: weights per dtype, ZeRO Figure 1, Korthikanti Table 2,
and the per-tensor activation count reducing to Korthikanti's 34sbh + 5as²b for a GPT block."""

from __future__ import annotations

import math
from typing import Any

import pytest

from archplan.analytic.memory import (
    activation_memory,
    dtype_bytes,
    korthikanti_layer_bytes,
    training_memory,
    zero_model_states,
)
from archplan.resolve import ModelPlan, resolve
from archplan.spec import Spec


def plan_of(**fields: Any) -> ModelPlan:
    return resolve(Spec.model_validate({"name": "t", **fields}))


def gpt_block(h: int = 256, a: int = 8, layers: int = 2, vocab: int = 1000) -> ModelPlan:
    """Korthikanti's block: MHA, LayerNorm, 4h GeLU MLP, pre-norm."""
    return plan_of(vocab_size=vocab, d_model=h, n_layers=layers, position={"kind": "learned"},
                   norm={"kind": "layernorm"}, attention={"kind": "mha", "n_heads": a},
                   ffn={"kind": "mlp", "d_ff": 4 * h, "activation": "gelu", "bias": True})


def layer_sum(by_component: dict[str, int], index: int) -> int:
    prefix = f"layers.{index}"
    return sum(v for k, v in by_component.items() if k == prefix or k.startswith(prefix + "."))


LLAMA3_8B = dict(
    vocab_size=128256, d_model=4096, n_layers=32, max_seq_len=8192,
    position={"kind": "rope", "theta": 500000.0},
    attention={"kind": "gqa", "n_heads": 32, "n_kv_heads": 8},
    ffn={"kind": "glu", "d_ff": 14336},
)


# ----------------------------------------------------------------------------------- weights
def test_weight_bytes_per_dtype_llama3_8b() -> None:
    n = 8_030_261_248  # docs/formulas.md §4.1 worked example
    assert dtype_bytes(n, "fp32") == 32_121_044_992
    assert dtype_bytes(n, "bf16") == 16_060_522_496
    assert dtype_bytes(n, "fp8") == dtype_bytes(n, "int8") == 8_030_261_248
    assert dtype_bytes(n, "int4") == 4_015_130_624
    assert dtype_bytes(3, "int4") == 2  # two weights per byte, rounded up to whole bytes


def test_weights_and_int4_group_from_param_count() -> None:
    from archplan.analytic import count_params
    from archplan.analytic.memory import int4_grouped_bytes, weights_bytes

    params = count_params(plan_of(**LLAMA3_8B))
    assert params.total == 8_030_261_248
    assert weights_bytes(params, "bf16") == 16_060_522_496
    assert weights_bytes(params, "int4") == 4_015_130_624
    # docs/formulas.md §4.1: int4-g128 linear layers (6,979,321,856 weights) + bf16 embedding/head/norms
    assert int4_grouped_bytes(params, 128) == 5_700_591_616


# ------------------------------------------------------------------------------ model states
def test_zero_figure_1() -> None:
    # Rajbhandari et al. 2020, Figure 1: Ψ = 7.5B, K = 12, N_d = 64
    psi = 7_500_000_000
    got = [zero_model_states(psi, stage, dp=64).total for stage in range(4)]
    assert got == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]


def test_zero_llama3_8b_dp8() -> None:
    psi = 8_030_261_248  # docs/formulas.md §4.2: 128.484 / 44.166 / 30.113 / 16.061 GB
    got = [zero_model_states(psi, stage, dp=8).total for stage in range(4)]
    # 16Ψ; 2Ψ + 2Ψ + 12Ψ/8; 2Ψ + 14Ψ/8; 16Ψ/8 (Rajbhandari et al. 2020, Figure 1), to the byte
    assert got == [128_484_179_968, 44_166_436_864, 30_113_479_680, 16_060_522_496]


def test_zero_breakdown_is_16_bytes_per_param() -> None:
    states = zero_model_states(1000)
    assert (states.weights, states.grads, states.master_weights, states.adam_m, states.adam_v) == (
        2000, 2000, 4000, 4000, 4000)
    assert states.optimizer == 12_000 and states.total == 16_000


@pytest.mark.parametrize(("stage", "dp", "said"), [(4, 1, "ZeRO stage must be 0-3, got 4"),
                                                   (0, 0, "data-parallel size must be >= 1, got 0")])
def test_zero_rejects_bad_arguments(stage: int, dp: int, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        zero_model_states(10, stage, dp)


# ------------------------------------------------------------------------------- activations
@pytest.mark.parametrize(
    ("t", "sp", "recompute", "expected"),
    [
        (1, False, "none", 2_868_903_936),
        (8, False, "none", 578_813_952),
        (8, True, "none", 358_612_992),
        (8, False, "selective", 327_155_712),
        (8, True, "selective", 106_954_752),
        (8, False, "full", 50_331_648),
    ],
)
def test_korthikanti_table2_gpt3(t: int, sp: bool, recompute: Any, expected: int) -> None:
    # docs/formulas.md §4.3 worked GPT-3 175B per layer: s 2048, b 1, h 12288, a 96
    assert korthikanti_layer_bytes(2048, 1, 12288, 96, t, sp, recompute) == expected


@pytest.mark.parametrize(
    ("recompute", "expected"),
    [("none", 3_254_779_904), ("selective", 570_425_344), ("full", 33_554_432)],
)
def test_korthikanti_7b_class(recompute: Any, expected: int) -> None:
    assert korthikanti_layer_bytes(4096, 1, 4096, 32, 1, False, recompute) == expected


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_per_tensor_count_reduces_to_korthikanti_for_a_gpt_block(recompute: Any) -> None:
    s, b, h, a = 128, 3, 256, 8
    acts = activation_memory(gpt_block(h, a), micro_batch=b, seq_len=s, recompute=recompute,
                             dropout=True)
    expected = korthikanti_layer_bytes(s, b, h, a, 1, False, recompute)
    assert layer_sum(acts.by_component, 0) == layer_sum(acts.by_component, 1) == expected


def test_full_recompute_keeps_layer_inputs_plus_one_layer_working_set() -> None:
    s, b, h, a = 64, 2, 128, 4
    plan = gpt_block(h, a, layers=3)
    full = activation_memory(plan, b, s, "full", dropout=True)
    none = activation_memory(plan, b, s, "none", dropout=True)
    for i in range(3):
        assert full.by_component[f"layers.{i}"] == korthikanti_layer_bytes(s, b, h, a, 1, False, "full")
    assert full.working_set == layer_sum(none.by_component, 0)
    assert none.working_set == 0


def test_outside_layers_follow_megatron() -> None:
    # Megatron compute_activation_memory (p = 1): output layer + CE 4sbh(1 + V/h), embedding ids 8sb
    s, b, h, v = 32, 2, 64, 500
    acts = activation_memory(gpt_block(h, 4, vocab=v), b, s)
    kept = acts.by_component
    assert kept["final_norm"] + kept["lm_head"] + kept["loss"] == 4 * s * b * h + 4 * s * b * v
    assert kept["embed"] == 8 * s * b
    # archplan's own accounting of torch's cross-entropy backward: nll_loss's and log_softmax's
    # fp32 input gradients, two n x V tensors beside everything kept
    assert acts.loss_backward == 2 * 4 * s * b * v
    assert acts.peak == acts.kept + acts.loss_backward


def test_activation_dtype_and_flash_kernel() -> None:
    s, b, h, a, v = 64, 2, 128, 4, 500
    plan = gpt_block(h, a, vocab=v)
    eager = activation_memory(plan, b, s).by_component
    fp32 = activation_memory(plan, b, s, activation_dtype="fp32").by_component
    assert fp32["layers.0.mixer"] == 2 * eager["layers.0.mixer"]
    assert fp32["loss"] == eager["loss"] and fp32["embed"] == eager["embed"]  # fp32 and int64 either way
    flash = activation_memory(plan, b, s, attention_kernel="flash").by_component
    selective = activation_memory(plan, b, s, "selective").by_component
    # a fused kernel keeps no s x s probabilities, only the fp32 log-sum-exp per head and query
    assert flash["layers.0.mixer"] == selective["layers.0.mixer"] + 4 * a * s * b
    assert activation_memory(plan, b, s, "selective", attention_kernel="flash").by_component == selective


def test_full_recompute_peak_is_the_largest_of_loss_rerun_and_core_backward() -> None:
    b, h, a = 2, 128, 4
    # a small vocabulary peaks at the re-run layer, a large one at the loss, a long sequence at the
    # eager core's s×s gradients
    for s, v, phase in ((64, 50, "layer re-run"), (64, 50_000, "loss backward"), (512, 50, "attention backward")):
        full = activation_memory(gpt_block(h, a, layers=3, vocab=v), b, s, "full")
        ends = sum(full.by_component[k] for k in ("final_norm", "lm_head", "loss"))
        rerun = full.kept - ends + full.working_set
        # the last layer re-run up to its attention core (not its FFN and the norm before it), and
        # the eager core's two 16-bit s×s gradients
        last = activation_memory(gpt_block(h, a, layers=3, vocab=v), b, s).by_component
        up_to_core = sum(last[k] for k in ("layers.2.norm1", "layers.2.mixer"))
        core = full.kept - ends + up_to_core + 2 * 2 * a * s * s * b
        assert full.phases == {"loss backward": full.kept + full.loss_backward, "layer re-run": rerun,
                               "attention backward": core, "scan backward": 0, "long-conv backward": 0,
                               "kernel generation": 0}
        assert full.peak == full.phases[phase] == max(full.phases.values())
    # a fused kernel forms no s×s gradients
    assert activation_memory(gpt_block(h, a, layers=3, vocab=50), b, s, "full",
                             attention_kernel="flash").phases["attention backward"] == 0


def test_the_math_kernels_backward_holds_two_fp32_score_gradients() -> None:
    """MLA on a CPU runs torch's math kernel (`torch-cpu`): its backward forms the fp32 gradients
    of the probabilities and of the scores while the layers below keep theirs, and the last
    layer's FFN and the norm before it are freed. Measured by `bench --train` in
    tests/test_distributed.py."""
    s, b = 256, 2
    plan = plan_of(vocab_size=100, d_model=64, n_layers=2, ffn={"kind": "glu", "d_ff": 128},
                   attention={"kind": "mla", "n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                              "qk_rope_head_dim": 8, "v_head_dim": 16})
    acts = activation_memory(plan, b, s, attention_kernel="torch-cpu")
    kept = acts.by_component
    freed = sum(v for k, v in kept.items() if k.startswith(("layers.1.ffn", "layers.1.norm2")))
    ends = sum(kept[k] for k in ("final_norm", "lm_head", "loss"))
    assert acts.phases["attention backward"] == acts.kept - ends - freed + 2 * 4 * 4 * s * s * b
    assert acts.peak == acts.phases["attention backward"]


def test_an_eager_cores_backward_holds_two_score_gradients() -> None:
    """Independent check of the eager kernel's `attention backward` term: a causal attention core
    in plain bf16 autograd, whose new storages are traced through its backward (every op's outputs,
    freed by storage finalizers), peaks at two 16-bit s×s gradients per head (the probabilities'
    and then the scores', the mask's gradient replacing the first), beside dV, which the last
    matmul's backward made first."""
    torch = pytest.importorskip("torch")
    from live_bytes import LiveBytes

    from archplan.analytic.memory import _core_backward_bytes

    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    above = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    scores = torch.matmul(q * d**-0.5, k.transpose(-1, -2)).masked_fill(above, -torch.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    grad = torch.randn_like(out)
    tracer = LiveBytes()
    with tracer:
        out.backward(grad)
    assert tracer.peak == _core_backward_bytes("eager", h, s, b, 2) + 2 * b * h * s * d


@pytest.mark.parametrize(("shape", "autocast", "within"), [
    # (batch, seq, d_model, head_dim, d_state, n_groups, chunk): each autocast shape peaks at a
    # different one of the three moments (decay blocks, chunk-state recurrence, decayed C)
    ((1, 390, 96, 24, 20, 2, 48), True, (0.99, 1.02)),
    ((1, 128, 64, 32, 16, 2, 8), True, (0.99, 1.02)),
    ((1, 390, 96, 24, 160, 2, 16), True, (0.99, 1.02)),
    ((1, 100, 96, 24, 40, 2, 128), True, (0.99, 1.02)),  # one chunk, shorter than chunk_size
    ((1, 390, 96, 24, 20, 2, 48), False, (0.93, 1.02)),
    ((1, 390, 96, 24, 160, 2, 16), False, (0.93, 1.02)),
])
def test_the_ssd_units_backward_holds_what_ssd_backward_bytes_prices(
        shape: tuple[int, ...], autocast: bool, within: tuple[float, float]) -> None:
    """Independent check of the `scan backward` moment's transient: archplan's Mamba-2 mixer run
    forward (bf16 autocast or fp32) and backward under a live-bytes trace; the backward's peak
    beyond what was alive when it began, less the two parameter gradients formed before the SSD
    unit's backward (out_proj's and the gated norm's, model states), is `ssd_backward_bytes`
    within the spread the docstring states (the trace over 26 shapes)."""
    from archplan.analytic.mamba import ssd_backward_bytes

    mixer_plan, measured = _ssd_backward_held(shape, autocast=autocast, bf16_weights=False)
    assert within[0] < ssd_backward_bytes(mixer_plan, shape[0], shape[1], autocast) / measured < within[1]


@pytest.mark.parametrize("shape", [(1, 256, 64, 32, 16, 2, 8), (1, 256, 96, 24, 40, 2, 128),
                                   (2, 390, 96, 24, 20, 2, 48), (1, 512, 128, 64, 64, 1, 64),
                                   (1, 100, 96, 24, 40, 2, 128)])
def test_the_bf16_ssd_units_backward_is_priced_from_above(shape: tuple[int, ...]) -> None:
    """The torch engine's case (`planning.cluster._mixer_backward`): FSDP2 computes in bf16 weights
    without autocast, so the unit recomputes in fp32 from bf16 inputs, between the two traced forms.
    The autocast form prices it at +0.1% … +8.5% over these shapes (the first is tiny-mamba2's
    layer); the fp32 form would be up to 16% short."""
    from archplan.analytic.mamba import ssd_backward_bytes

    mixer_plan, measured = _ssd_backward_held(shape, autocast=False, bf16_weights=True)
    assert 1.0 < ssd_backward_bytes(mixer_plan, shape[0], shape[1], True) / measured < 1.09
    assert ssd_backward_bytes(mixer_plan, shape[0], shape[1], False) < measured


def _ssd_backward_held(shape: tuple[int, ...], *, autocast: bool, bf16_weights: bool) -> tuple[Any, int]:
    """archplan's Mamba-2 mixer of `shape` (batch, seq, d_model, head_dim, d_state, groups, chunk)
    run forward and backward under a live-bytes trace: its plan and the backward's peak beyond what
    was alive when it began, less the two parameter gradients formed before the SSD unit's
    backward (out_proj's and the gated norm's, model states)."""
    torch = pytest.importorskip("torch")
    from archplan.modules.mamba2 import Mamba2Mixer

    b, t, d, p, n, g, q = shape
    plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "M"},
                   ssm={"kind": "mamba2", "d_state": n, "expand": 2, "head_dim": p, "n_groups": g, "chunk_size": q})
    mixer_plan = plan.layers[0].mixer
    torch.manual_seed(0)
    dtype = torch.bfloat16 if bf16_weights else torch.float32
    mixer = Mamba2Mixer(mixer_plan, d).to(dtype)
    held = _backward_peak(mixer, torch.randn(b, t, d, dtype=dtype, requires_grad=True), autocast)
    states = sum(w.grad.untyped_storage().nbytes() for w in (mixer.out_proj.weight, mixer.norm.weight))
    return mixer_plan, held - states


@pytest.mark.parametrize("mode", ["bf16 weights", "autocast", "fp32"])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, d_state): the first three peak in the last channel block's backward
    # (the middle one with a padded last chunk), the next two in dC's pass over every channel, the
    # last in the last full block's, 72 channels in 14 blocks of 5 and one of 2
    (1, 256, 64, 16), (1, 390, 96, 8), (2, 500, 160, 16), (1, 100, 96, 32), (1, 64, 64, 16), (1, 200, 36, 16),
])
def test_the_mamba1_scans_backward_holds_what_mamba1_scan_backward_bytes_prices(
        shape: tuple[int, int, int, int], mode: str) -> None:
    """Independent check of Mamba-1's `scan backward` moment: archplan's Mamba-1 mixer run forward
    and backward under a live-bytes trace (bf16 weights without autocast, the torch engine's
    case; fp32 weights under bf16 autocast, bench --train's; fp32), the backward's peak beyond
    what was alive when it began, less out_proj's weight gradient (a model state), is
    `mamba1_scan_backward_bytes` within the spread its docstring states (17 shapes)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.mamba import mamba1_scan_backward_bytes
    from archplan.modules.mamba1 import Mamba1Mixer

    b, t, d, n = shape
    plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "M"},
                   ssm={"kind": "mamba1", "d_state": n, "expand": 2})
    mixer_plan = plan.layers[0].mixer
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16 weights" else torch.float32
    mixer = Mamba1Mixer(mixer_plan, d).to(dtype)
    held = _backward_peak(mixer, torch.randn(b, t, d, dtype=dtype, requires_grad=True), mode == "autocast")
    measured = held - mixer.out_proj.weight.grad.untyped_storage().nbytes()
    inputs = 4 if mode == "fp32" else 2
    priced = mamba1_scan_backward_bytes(mixer_plan, b, t, inputs, autocast=mode == "autocast")
    low, high = {"bf16 weights": (0.99, 1.01), "autocast": (1.0, 1.045), "fp32": (0.999, 1.02)}[mode]
    assert low < priced / measured < high


def _backward_peak(mixer: Any, x: Any, autocast: bool) -> int:
    """`mixer` run forward on `x` (under bf16 autocast or not) and backward under a live-bytes
    trace: the backward's peak beyond what was alive when it began."""
    torch = pytest.importorskip("torch")
    from live_bytes import LiveBytes

    tracer = LiveBytes()
    with tracer:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = mixer(x)
        grad = torch.randn_like(y)
        start = tracer.mark()
        y.backward(grad)
    return tracer.peak - start


def _mixer_backward_held(mixer: Any, shape: tuple[int, int, int], autocast: bool) -> int:
    """`mixer` (fp32 weights) on a (batch, seq, d_model) input: the backward's peak beyond what was
    alive when it began (`_backward_peak`), less its parameters' gradients (model states, which
    `bench --train` counts whole from the start: those not yet formed at the peak make the
    measured transient that much smaller)."""
    torch = pytest.importorskip("torch")

    held = _backward_peak(mixer, torch.randn(*shape, requires_grad=True), autocast)
    return held - sum(p.grad.untyped_storage().nbytes() for p in mixer.parameters() if p.grad is not None)


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, d_state): the first three, the partial chunk (300) and the short one
    # peak in the kernel unit's backward, the long and the batched ones in the FFT convolution's
    (1, 256, 512, 64), (1, 512, 256, 64), (1, 300, 256, 64), (1, 2048, 128, 32), (2, 512, 256, 64),
    (1, 1000, 128, 32), (2, 64, 64, 16),
])
def test_the_s4d_mixers_backward_holds_what_s4_backward_bytes_prices(shape: tuple[int, ...], autocast: bool,
                                                                     buffers: bool) -> None:
    """Independent check of the `long-conv backward` moment for S4D: archplan's S4D mixer run
    forward and backward under a live-bytes trace holds what `s4_backward_bytes` prices, within
    the spread its docstring states (7 of its 10 shapes, both dtypes, and `ssm_buffers`)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.s4 import s4_backward_bytes
    from archplan.modules.s4 import S4Mixer

    b, t, d, n = shape
    mixer_plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                         long_conv={"kind": "s4d", "d_state": n, "n_ssm": 1, "ssm_buffers": buffers}).layers[0].mixer
    torch.manual_seed(0)
    measured = _mixer_backward_held(S4Mixer(mixer_plan, d), (b, t, d), autocast)
    priced = s4_backward_bytes(mixer_plan, d, b, t, 2 if autocast else 4, autocast)
    assert 0.96 < priced / measured < (1.11 if buffers else 1.07)


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("length", [16, 64, 100, 256, 300, 512, 1000, 2048])
@pytest.mark.parametrize(("channels", "d_state"), [(256, 64), (128, 128), (512, 16)])
def test_the_s4d_kernels_backward_holds_what_s4d_kernel_backward_bytes_prices(
        channels: int, d_state: int, length: int, autocast: bool, buffers: bool) -> None:
    """S4D's kernel unit alone (`_S4DKernel`; every input needing a gradient, or only C as with
    `ssm_buffers`) under a live-bytes trace: its backward's peak beyond what was alive when it
    began, less the inputs' gradients, is `s4d_kernel_backward_bytes` within the spread its
    docstring states (24 of its shapes: whole chunks and `ssm_buffers` exactly)."""
    torch = pytest.importorskip("torch")
    from live_bytes import LiveBytes

    from archplan.analytic.s4 import s4d_basis_chunk, s4d_kernel_backward_bytes
    from archplan.modules.s4 import _S4DKernel
    from archplan.resolve import S4Plan

    h, m = channels, d_state // 2
    torch.manual_seed(0)
    shapes = ((h,), (h, m), (h, m), (h, m, 2), (h, m, 2))
    inputs = [torch.randn(*shape, requires_grad=not buffers or k == 4) for k, shape in enumerate(shapes)]
    tracer = LiveBytes()
    with tracer:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            kernel = _S4DKernel.apply(length, *inputs)
        grad = torch.randn_like(kernel)
        start = tracer.mark()
        kernel.backward(grad)
    measured = tracer.peak - start - sum(x.grad.untyped_storage().nbytes() for x in inputs if x.grad is not None)
    priced = s4d_kernel_backward_bytes(S4Plan(False, d_state, 1, buffers), h, length, autocast)
    if buffers or length % s4d_basis_chunk(length) == 0:
        assert priced == measured
    else:
        assert 0.98 < priced / measured < 1.04


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, poles, filter_groups): one filter a channel peaks in the modal filter's
    # backward, grouped filters in the FFT convolution's
    (1, 256, 32, 2, 1), (1, 1024, 64, 2, 1), (2, 512, 128, 4, 1), (1, 2048, 64, 8, 1), (1, 512, 128, 2, 4),
    (4, 256, 64, 2, 2), (1, 300, 96, 3, 1), (2, 1000, 64, 2, 8),
])
def test_the_striped_hyena_mixers_backward_holds_what_striped_backward_bytes_prices(
        shape: tuple[int, ...], autocast: bool) -> None:
    """Independent check of the `long-conv backward` moment for StripedHyena: archplan's mixer run
    forward and backward under a live-bytes trace holds what `striped_backward_bytes` prices,
    within the spread its docstring states (these 8 shapes, both dtypes)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.hyena import striped_backward_bytes
    from archplan.modules.stripedhyena import StripedHyenaMixer

    b, t, d, poles, groups = shape
    mixer_plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                         long_conv={"kind": "stripedhyena", "short_filter": 3, "short_filter_bias": True,
                                    "state_size": poles, "filter_groups": groups}).layers[0].mixer
    torch.manual_seed(0)
    measured = _mixer_backward_held(StripedHyenaMixer(mixer_plan, d), (b, t, d), autocast)
    priced = striped_backward_bytes(mixer_plan, d, b, t, 2 if autocast else 4, autocast)
    assert 0.97 < priced / measured < 1.06


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, order)
    (1, 512, 128, 2), (1, 2048, 128, 2), (2, 1024, 64, 2), (4, 256, 128, 2), (1, 1024, 96, 3), (1, 300, 128, 2),
    (2, 512, 256, 2), (1, 1024, 64, 4),
])
def test_the_hyena_mixers_backward_holds_what_hyena_backward_bytes_prices(shape: tuple[int, ...], autocast: bool) -> None:
    """Independent check of the `long-conv backward` moment for Hyena: archplan's mixer run forward
    and backward under a live-bytes trace holds what `hyena_backward_bytes` prices, within the
    spread its docstring states (these 8 shapes, both dtypes)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.hyena import hyena_backward_bytes
    from archplan.modules.hyena import HyenaMixer

    b, t, d, order = shape
    mixer_plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                         max_seq_len=4096, long_conv={"kind": "hyena", "order": order, "filter_order": 64,
                                                      "l_max": 4096}).layers[0].mixer
    torch.manual_seed(0)
    measured = _mixer_backward_held(HyenaMixer(mixer_plan, d), (b, t, d), autocast)
    assert 0.94 < hyena_backward_bytes(d, b, t) / measured < 1.17


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, d_state): whole and partial doublings (300, 200, 700), batches 1 to 4;
    # all peak in the doubling's backward but two in fp32 (1,024 and 128 tokens: the FFT's)
    (1, 256, 128, 32), (1, 300, 96, 32), (1, 1024, 64, 16), (1, 200, 64, 64), (2, 700, 32, 32), (4, 128, 128, 64),
    (1, 128, 256, 16),
])
def test_the_s4_mixers_backward_holds_what_s4_backward_bytes_prices(shape: tuple[int, ...], autocast: bool) -> None:
    """Independent check of the `long-conv backward` moment for S4 (DPLR), whose doubling is plain
    autograd (`s4_doubling_backward_bytes`): within the spread `s4_backward_bytes` states, 7 of its
    20 shapes, the one it prices 25% over (1 × 128 tokens at d_model 256, autocast) among them."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.s4 import s4_backward_bytes
    from archplan.modules.s4 import S4Mixer

    b, t, d, n = shape
    mixer_plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                         long_conv={"kind": "s4", "d_state": n, "n_ssm": 1}).layers[0].mixer
    torch.manual_seed(0)
    measured = _mixer_backward_held(S4Mixer(mixer_plan, d), (b, t, d), autocast)
    priced = s4_backward_bytes(mixer_plan, d, b, t, 2 if autocast else 4, autocast)
    assert 0.97 < priced / measured < (1.26 if shape == (1, 128, 256, 16) else 1.1)


@pytest.mark.parametrize("buffers", [False, True])
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("shape", [
    # (batch, seq, d_model, d_state): whole and partial doublings (300, 200, 257, 33), batches 1 to
    # 4, N from T / 64 to 128·T: the peak at the last step, an earlier one, a squaring or the block
    (1, 256, 128, 32), (1, 512, 64, 32), (2, 256, 128, 16), (1, 1024, 64, 16), (1, 300, 96, 32), (4, 128, 128, 64),
    (1, 128, 256, 16), (1, 200, 64, 64), (1, 128, 256, 64), (3, 128, 128, 16), (2, 200, 64, 64),
    (1, 1, 64, 64), (1, 2, 64, 256), (1, 5, 64, 128), (1, 16, 64, 256), (1, 33, 64, 16), (1, 257, 64, 32),
])
def test_s4s_kernel_generation_holds_what_s4_generation_transient_bytes_prices(
        shape: tuple[int, ...], autocast: bool, buffers: bool) -> None:
    """Independent check of the `kernel generation` moment: archplan's S4 (DPLR) mixer run forward
    under a live-bytes trace holds, at the generation's peak, beyond what was alive when the mixer
    began, the generation's kept tensors and what `s4_generation_transient_bytes` counts beside
    them, within the spread that docstring states (these 17 shapes). The input is fp32, which the
    mixer reads as it is (no copy). The peak is read within the generation: where tokens outweigh
    the kernel, the mixer's forward peaks later, in its convolution, which this moment does not
    price."""
    torch = pytest.importorskip("torch")
    from live_bytes import LiveBytes

    from archplan.analytic.s4 import s4_generation_transient_bytes, s4_kernel_activation_bytes
    from archplan.modules.s4 import S4Mixer

    b, t, d, n = shape
    mixer_plan = plan_of(vocab_size=64, d_model=d, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                         long_conv={"kind": "s4", "d_state": n, "n_ssm": 1, "ssm_buffers": buffers}).layers[0].mixer
    torch.manual_seed(0)
    mixer = S4Mixer(mixer_plan, d)
    x = torch.randn(b, t, d, requires_grad=True)
    tracer = LiveBytes()
    generation_peaks = []
    generate = mixer._dplr_basis

    def traced(length: int) -> object:
        tracer.mark()
        basis = generate(length)
        generation_peaks.append(tracer.peak)
        return basis

    mixer._dplr_basis = traced
    with tracer:
        start = tracer.mark()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            mixer(x)
    priced = s4_kernel_activation_bytes(mixer_plan, d, t, autocast) + s4_generation_transient_bytes(mixer_plan, d, t,
                                                                                                    autocast)
    assert 0.97 < priced / (generation_peaks[0] - start) < 1.01


def test_gqa_stores_smaller_k_and_v() -> None:
    s, b = 16, 1
    common = dict(vocab_size=100, d_model=256, n_layers=1, ffn={"kind": "glu", "d_ff": 512})
    mha = activation_memory(plan_of(**common, attention={"kind": "mha", "n_heads": 8}), b, s)
    gqa = activation_memory(
        plan_of(**common, attention={"kind": "gqa", "n_heads": 8, "n_kv_heads": 2}), b, s)
    # K and V shrink from 8 to 2 heads of 32: 2 tensors x 2 bytes x s·b x (256 - 64)
    assert mha.by_component["layers.0.mixer"] - gqa.by_component["layers.0.mixer"] == 2 * 2 * s * b * 192


def test_glu_saves_four_intermediates_mlp_two() -> None:
    s, b, f = 8, 1, 100
    common = dict(vocab_size=100, d_model=64, n_layers=1, attention={"kind": "mha", "n_heads": 4})
    glu = activation_memory(plan_of(**common, ffn={"kind": "glu", "d_ff": f}), b, s)
    mlp = activation_memory(plan_of(**common, ffn={"kind": "mlp", "d_ff": f}), b, s)
    assert glu.by_component["layers.0.ffn"] == 2 * s * b * 64 + 4 * 2 * s * b * f
    assert mlp.by_component["layers.0.ffn"] == 2 * s * b * 64 + 2 * 2 * s * b * f


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_ffn_count_is_what_autograd_saves(kind: Any, act: Any, bias: bool) -> None:
    """Independent check: the bytes of the non-parameter tensors autograd saves in archplan's torch
    FFN (saved-tensor hooks, bf16, CPU) equal the analytic per-tensor count."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.memory import _ffn_bytes
    from archplan.modules.ffn import build_ffn
    from archplan.resolve import FFNPlan

    plan, d_model, tokens = FFNPlan(kind, 48, act, bias), 32, 10
    module = build_ffn(plan, d_model).to(torch.bfloat16)
    x_BTD = torch.randn(2, tokens // 2, d_model, dtype=torch.bfloat16, requires_grad=True)
    expected = _ffn_bytes("ffn", plan, tokens, d_model, input_shared=False, dropout=False)["ffn"]
    assert saved_bytes(module, x_BTD) == expected


@pytest.mark.parametrize("kind", ["mlp", "glu"])
@pytest.mark.parametrize("input_shared", [False, True])
@pytest.mark.parametrize("wide", [True, False])
def test_ffn_count_under_autocast_is_what_autograd_saves(kind: Any, input_shared: bool, wide: bool) -> None:
    """Under torch autocast over fp32 weights the FFN reads the norm's fp32 output, and each of
    its projections casts it to bf16 on its own call (autocast's cast cache holds the weights
    only): a GLU's gate and up keep a copy each, where the per-tensor count has one
    (`input_copies`). The bytes autograd saves equal the count, also with the input shared
    with the mixer (one norm, parallel block), whose count holds the input the FFN's casts read
    from and none of the casts. A bf16 input (`wide` False: an MTP module's block, whose residual
    stream is its projection's bf16 output) is no cast's: the projections keep the one tensor."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.memory import _ffn_bytes
    from archplan.modules.ffn import build_ffn
    from archplan.resolve import FFNPlan

    plan, d_model, tokens = FFNPlan(kind, 48, "silu", False), 32, 10
    module = build_ffn(plan, d_model)
    # a norm's output, not a leaf: autocast caches the casts of leaves that require grad
    x_BTD = torch.randn(2, tokens // 2, d_model, dtype=torch.float32 if wide else torch.bfloat16,
                        requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_bytes(module, x_BTD) - autocast_weight_copies(module)
    counted = _ffn_bytes("ffn", plan, tokens, d_model, input_shared=input_shared, dropout=False,
                         autocast=True, wide=wide)["ffn"]
    # a shared bf16 input is the one the mixer's count holds
    assert saved == counted + (0 if wide or not input_shared else 2 * tokens * d_model)
    plain = _ffn_bytes("ffn", plan, tokens, d_model, input_shared=False, dropout=False)["ffn"]
    assert saved - plain == (2 * tokens * d_model if kind == "glu" and wide else 0)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("batch", "seq"), [(1, 256), (2, 100)])
def test_mamba1_unit_count_is_what_autograd_saves(autocast: bool, batch: int, seq: int) -> None:
    """archplan's torch Mamba-1 unit keeps mamba_ssm's tensors (`mamba1_activation_bytes`, size's
    figure) and its conv's output before the SiLU, and not the kernel's chunk states
    (`mamba1_unit_bytes`): the bytes autograd saves (bf16, or autocast over fp32 weights less the
    casts of its projections' weights) are the two terms' sum, at any batch (at batch 2 x_proj's
    matmul copied a transposed SiLU output once more) and under autocast (whose scan output the
    gate kept in the residual stream's fp32)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.mamba import mamba1_activation_bytes, mamba1_unit_bytes
    from archplan.modules.block import build_mixer

    plan = plan_of(vocab_size=64, d_model=64, n_layers=1, max_seq_len=512, position={"kind": "none"},
                   ssm={"kind": "mamba1", "d_state": 16}, layout={"mixers": "M"})
    m = plan.layers[0].mixer
    module = build_mixer(m, plan) if autocast else build_mixer(m, plan).to(torch.bfloat16)
    x = torch.randn(batch, seq, 64, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        saved = saved_bytes(module, x)
    if autocast:
        saved -= autocast_weight_copies(module)
    assert saved == mamba1_activation_bytes(m, 64, batch, seq, 2) + mamba1_unit_bytes(m, batch, seq, 2)


def autocast_weight_copies(module: Any) -> int:
    """Bytes of autocast's bf16 copies of `module`'s projection weights, which the projections
    save beside their inputs: model states' copies, not activations."""
    import torch

    return 2 * sum(sub.weight.numel() for sub in module.modules() if isinstance(sub, torch.nn.Linear))


def saved_bytes(module: Any, x: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward of `module`. The
    saved tensors and the output are held until they are counted, so no saved storage is freed
    and its address reused by a later one (a node whose outputs all go unused frees its saved
    tensors during the forward)."""
    from autograd_units import saved_during, storages

    params = storages(list(module.parameters()))
    out, kept = saved_during(lambda: module(x))
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    del out
    return sum(n for ptr, n in sizes.items() if ptr not in params)


def test_moe_experts_scale_with_top_k_and_selective_leaves_them() -> None:
    s, b = 16, 2

    def moe_plan(k: int) -> ModelPlan:
        return plan_of(vocab_size=100, d_model=64, n_layers=1, attention={"kind": "mha", "n_heads": 4},
                       moe={"n_experts": 8, "top_k": k, "expert": {"kind": "glu", "d_ff": 32},
                            "shared": {"n": 1, "d_ff": 32}})

    one = activation_memory(moe_plan(1), b, s).by_component
    two = activation_memory(moe_plan(2), b, s).by_component
    per_copy = 2 * s * b * 64 + 4 * 2 * s * b * 32 + 2 * s * b * 64  # input copy + GLU + output
    assert two["layers.0.ffn.experts"] - one["layers.0.ffn.experts"] == per_copy
    assert one["layers.0.ffn.shared"] == 4 * 2 * s * b * 32
    sel = activation_memory(moe_plan(2), b, s, "selective").by_component
    assert sel["layers.0.ffn.experts"] == two["layers.0.ffn.experts"]
    assert sel["layers.0.mixer"] < two["layers.0.mixer"]


def test_mamba_layers_have_no_quadratic_term() -> None:
    plan = plan_of(vocab_size=100, d_model=64, n_layers=2, ssm={"kind": "mamba1"},
                   layout={"mixers": "M"})
    mixer = {t: activation_memory(plan, 1, t, "none").by_component["layers.0.mixer"] for t in (64, 128, 192)}
    assert mixer[192] - mixer[128] == mixer[128] - mixer[64] > 0  # linear within a kernel chunk
    assert activation_memory(plan, 1, 64, "selective").by_component["layers.0.mixer"] == mixer[64]


def test_mamba1_keeps_the_kernels_chunk_states_and_a() -> None:
    """Beyond its per-token tensors, a Mamba-1 mixer keeps the selective-scan kernel's chunk
    states (B, d_inner, ⌈T/2048⌉, 2N) fp32 and A = −exp(A_log) with exp's output, (d_inner, N)
    fp32 each, once per forward."""
    from archplan.analytic.mamba import mamba1_activation_bytes

    plan = plan_of(vocab_size=100, d_model=64, n_layers=1, ssm={"kind": "mamba1", "d_state": 16},
                   layout={"mixers": "M"})
    m = plan.layers[0].mixer
    i, n = m.d_inner, m.d_state

    def extra(batch: int, seq: int) -> int:
        per_token = mamba1_activation_bytes(m, 64, batch, 2, 2) - mamba1_activation_bytes(m, 64, batch, 1, 2)
        return mamba1_activation_bytes(m, 64, batch, seq, 2) - per_token * seq

    assert extra(1, 2048) == 4 * i * 2 * n + 2 * 4 * i * n
    assert extra(1, 2049) == 4 * i * 2 * 2 * n + 2 * 4 * i * n
    assert extra(3, 100) == 3 * 4 * i * 2 * n + 2 * 4 * i * n


@pytest.mark.parametrize("residual", ["pre", "sandwich", "post"])
def test_residual_dtype_widens_what_the_residual_stream_feeds(residual: str) -> None:
    """An fp32 residual stream (autocast over fp32 weights, Megatron's --fp32-residual-connection)
    adds 2 B per element to each tensor read from it: the norms it feeds (not the sandwich's
    post-sublayer norms, which normalise a sublayer's 16-bit output), the final norm's input and,
    under full recompute, each layer's kept input. Nothing else moves."""
    s, b, h = 16, 2, 64
    plan = plan_of(vocab_size=100, d_model=h, n_layers=2, attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
                   ffn={"kind": "glu", "d_ff": 128}, residual={"kind": residual})
    bf16 = activation_memory(plan, b, s).by_component
    fp32 = activation_memory(plan, b, s, residual_dtype="fp32").by_component
    assert activation_memory(plan, b, s, residual_dtype="bf16").by_component == bf16
    widened = {k for k in bf16 if fp32[k] != bf16[k]}
    fed = {f"layers.{i}.{n}" for i in range(2) for n in plan.layers[i].norms if not n.startswith("post_")}
    assert widened == fed | {"final_norm"}
    assert all(fp32[k] == 2 * bf16[k] == 4 * s * b * h for k in widened)
    full16, full32 = (activation_memory(plan, b, s, "full", residual_dtype=d) for d in ("bf16", "fp32"))
    assert full32.by_component["layers.0"] == 2 * full16.by_component["layers.0"] == 4 * s * b * h
    rerun = 4 * s * b * h * sum(not n.startswith("post_") for n in plan.layers[0].norms) // 2
    assert full32.working_set - full16.working_set == rerun


def test_parallel_shared_norm_counts_the_block_input_once() -> None:
    common = dict(vocab_size=100, d_model=64, n_layers=1, attention={"kind": "mqa", "n_heads": 4},
                  ffn={"kind": "mlp", "d_ff": 256})
    seq = activation_memory(plan_of(**common), 1, 8).by_component
    par = activation_memory(plan_of(**common, residual={"kind": "parallel"}), 1, 8).by_component
    assert seq["layers.0.ffn"] - par["layers.0.ffn"] == 2 * 8 * 64


def test_training_memory_totals() -> None:
    from archplan.analytic import count_params

    plan = gpt_block()
    params = count_params(plan)
    mem = training_memory(plan, params, micro_batch=2, seq_len=64, recompute="selective")
    assert mem.states.total == 16 * params.total
    assert mem.activations == activation_memory(plan, 2, 64, "selective")
    assert mem.optimizer_step == 4 * params.total  # foreach AdamW's fp32 sqrt(v) temporary
    assert mem.tied_grad_sum == (2 * 4 * plan.vocab_size * plan.d_model if plan.tied else 0)
    assert mem.total == 16 * params.total + max(mem.activations.peak, mem.optimizer_step, mem.tied_grad_sum)
    sharded = training_memory(plan, params, micro_batch=2, seq_len=64, zero_stage=1, dp=4)
    assert sharded.optimizer_step == math.ceil(params.total / 4) * 4


def test_a_tied_embedding_adds_two_fp32_vocab_gradients() -> None:
    """gpt2 (tied): the embedding's and the head's V x D gradients, in fp32, both alive before they
    are summed: 2 · 4 · 50,257 · 768 = 308,779,008 B (an untied model has none; the test above
    runs an untied block)."""
    from archplan.analytic import count_params
    from archplan.loader import load_spec

    plan = resolve(load_spec("gpt2"))
    assert plan.tied
    mem = training_memory(plan, count_params(plan), micro_batch=1, seq_len=64)
    assert mem.tied_grad_sum == 308_779_008


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_math_kernel_count_is_what_autograd_saves(q_lora_rank: int | None) -> None:
    """Independent check of the "torch-cpu" kernel on MLA, whose unequal q and v head sizes leave a
    CPU only torch's math kernel: the bytes autograd saves in archplan's torch MLA (bf16, CPU,
    saved-tensor hooks) are the analytic count, fp32 q, k, v copies and fp32 probabilities
    included, plus what the count leaves out, named here: the kv latent norm keeps the whole
    [c_kv | k_pe] storage it is a view of (R more columns), RoPE's bf16 cos and sin, and each latent
    norm's fp32 statistics (its bf16 weight is kept as stored, a parameter, no fp32 copy)."""
    torch = pytest.importorskip("torch")
    from archplan.analytic.memory import _mixer_bytes
    from archplan.modules.block import build_mixer

    attention = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 32, "q_lora_rank": q_lora_rank,
                 "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    plan = plan_of(vocab_size=64, d_model=64, n_layers=1, max_seq_len=64,
                   position={"kind": "rope", "theta": 10000.0}, attention=attention,
                   ffn={"kind": "glu", "d_ff": 128})
    mixer_plan = plan.layers[0].mixer
    module = build_mixer(mixer_plan, plan).to(torch.bfloat16)
    b, s, rope = 2, 24, 8
    saved = saved_bytes(module, torch.randn(b, s, 64, dtype=torch.bfloat16, requires_grad=True))
    counted = _mixer_bytes(mixer_plan, s, b, 64, 2, "none", "torch-cpu", False)
    flash = _mixer_bytes(mixer_plan, s, b, 64, 2, "none", "flash", False)
    latent_norms = 1 if q_lora_rank is None else 2  # kv's, and q's under q-LoRA
    left_out = 2 * b * s * rope + 2 * 2 * s * rope + 4 * b * s * latent_norms
    assert saved == counted + left_out
    # the math kernel's fp32 operands and probabilities against the fused kernel's bf16 operands
    # and log-sum-exp, what CUDA runs
    heads, qk, v = 4, 24, 16
    operands = b * s * heads * (2 * qk + v)
    assert counted - flash == (4 - 2) * operands + 4 * heads * b * s * s - 4 * heads * b * s


def test_s4ds_chunk_is_the_modules_and_size_prices_archplans_kernel_unit() -> None:
    """The analytic side's chunk length is its own copy of the module's (the two never share
    code): they agree at every length to 2¹⁶. `size` prices S4D's kernel unit as `bench --train`
    does (its kept tensors are archplan's too), whatever `units` says of the scans and experts."""
    pytest.importorskip("torch")
    from archplan.analytic.s4 import s4_backward_bytes, s4d_basis_chunk
    from archplan.modules.s4 import basis_chunk

    assert all(s4d_basis_chunk(t) == basis_chunk(t) for t in range(1, 1 << 16))
    plan = plan_of(vocab_size=64, d_model=512, n_layers=1, position={"kind": "none"}, layout={"mixers": "H"},
                   long_conv={"kind": "s4d", "d_state": 64})
    kernels, torch_units = (activation_memory(plan, 1, 256, units=units, autocast=True) for units in ("kernels", "torch"))
    m = plan.layers[0].mixer
    assert kernels.conv_transient == torch_units.conv_transient == s4_backward_bytes(m, 512, 1, 256, 2, True)


def test_a_zero_shard_rounds_up_to_whole_bytes() -> None:
    """7 parameters over 4 ranks: stage 3 holds ⌈14/4⌉ = 4 B of bf16 weights and gradients and
    ⌈28/4⌉ = 7 B of each fp32 state; stage 1 shards the optimizer only."""
    three = zero_model_states(7, stage=3, dp=4)
    assert (three.weights, three.grads, three.master_weights, three.adam_m, three.adam_v) == (4, 4, 7, 7, 7)
    one = zero_model_states(7, stage=1, dp=4)
    assert (one.weights, one.grads, one.master_weights) == (14, 14, 7)
    assert zero_model_states(5, stage=3, dp=2).weights == 5


def test_the_scaling_laws_fit_data_edges() -> None:
    """Hoffmann et al. 2022 fitted on 70 M to 16 B parameters and 5 B to 500 B tokens: each edge is
    inside, a step past it outside."""
    from archplan.analytic.scaling import outside_fit_data

    for n, d in ((70e6, 100e9), (16e9, 100e9), (1e9, 5e9), (1e9, 500e9)):
        assert not outside_fit_data(n, d)
    for n, d in ((69e6, 100e9), (16.5e9, 100e9), (1e9, 4.9e9), (1e9, 510e9)):
        assert outside_fit_data(n, d)
