"""Memory: inference weights per dtype, training model states (ZeRO) and activations (Korthikanti).

Pure Python, exact integers. Every byte figure states its dtype; docs/figures.md derives each term.

Sources:
- weights: docs/formulas.md §4.1 (bytes = params x bytes(dtype); group-wise int4 adds one fp16 scale
  per group of g weights, GPTQ/AWQ style).
- model states: Rajbhandari et al. 2020 (ZeRO, arXiv:1910.02054) §3.1 and §5: mixed-precision Adam
  holds 2 (16-bit weights) + 2 (16-bit grads) + K=12 (fp32 master, momentum, variance) bytes/param.
- activations: Korthikanti et al. 2022 (arXiv:2205.05198) §4.1 / Table 2, generalised per saved
  tensor to GQA, MLA, gated FFNs, MoE and Mamba layers (see `_mixer_bytes`, `_ffn_bytes`).
- the peak of one step (`TrainingMemory.total`): archplan's own accounting, measured with
  `archplan bench --train` (docs/figures.md §5.3): the model states plus the largest of eight
  moments: the loss backward (everything the forward kept + the cross-entropy's two fp32 n×V
  gradients), the re-run of a layer under full recompute, the backward of an attention core that
  forms its s×s gradients, of archplan's scan units, of a long convolution's mixer, S4's kernel
  generation in a forward, a tied weight's gradient sum, and AdamW's step temporary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from typing_extensions import assert_never

from archplan.analytic.hyena import (
    hyena_activation_bytes,
    hyena_backward_bytes,
    striped_activation_bytes,
    striped_backward_bytes,
)
from archplan.analytic.mamba import (
    mamba1_activation_bytes,
    mamba1_scan_backward_bytes,
    mamba1_unit_bytes,
    ssd_backward_bytes,
    ssd_chunks,
)
from archplan.analytic.s4 import (
    s4_activation_bytes,
    s4_backward_bytes,
    s4_generation_transient_bytes,
    s4_kernel_activation_bytes,
)
from archplan.dtypes import BYTES, DType
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    HyenaPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    MixerPlan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
)

if TYPE_CHECKING:
    from archplan.analytic.model import ParamCount

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")
# "eager": the attention core in plain autograd keeps its s x s probabilities (Korthikanti's rows);
# "flash": a fused kernel (FlashAttention, torch SDPA) keeps the fp32 log-sum-exp instead;
# "torch-cpu": what torch's SDPA runs on a CPU, its flash kernel where q, k and v share one head
# size and its math kernel where they do not (MLA: `_scaled_dot_product_attention_math`, the CPU's
# only kernel for them), which `bench --train` measures there.
AttentionKernel = Literal["eager", "flash", "torch-cpu"]
ATTENTION_KERNELS: tuple[AttentionKernel, ...] = ("eager", "flash", "torch-cpu")
# The kernel that runs: "torch-cpu" resolved for one attention's head sizes.
CoreKernel = Literal["eager", "flash", "math"]
# Whose saved tensors the Mamba and MoE layers keep: fused kernels' (mamba_ssm's scan, a fused
# router), or archplan's torch units' (`modules.mamba2`, `modules.mamba1`, `modules.moe`):
# Mamba-2's keeps more so that its backward recomputes no contraction (`ssd_unit_bytes`), Mamba-1's
# its conv's output before the SiLU and not the kernel's chunk states (`mamba.mamba1_unit_bytes`),
# an MoE layer its routing metadata (`moe_routing_bytes`).
Units = Literal["kernels", "torch"]
Phase = Literal["loss backward", "layer re-run", "attention backward", "scan backward", "long-conv backward",
                "kernel generation", "tied gradient sum", "optimizer step"]

# Korthikanti et al. 2022 §4.1: activations are stored in 16-bit, dropout masks in one byte.
ACT_BYTES = 2
MASK_BYTES = 1
# The cross-entropy runs on fp32 logits (Megatron `compute_activation_memory`: 4·s·b·V for output +
# CE): torch's log_softmax keeps its fp32 output for the backward, and the loss backward then forms
# two more fp32 n×V tensors, nll_loss's gradient and log_softmax's input gradient (aten
# nll_loss_backward, _log_softmax_backward_data: archplan's own accounting, measured).
LOGITS_BYTES = 4
CE_BACKWARD_TENSORS = 2
LSE_BYTES = 4  # FlashAttention's fp32 log-sum-exp per head and query (Dao et al. 2022 §3.1)
FP32_BYTES = 4  # fp32 tensors: torch's math SDPA kernel's q, k, v copies and probabilities, routing scores
# Token ids kept for the embedding backward (int64; Megatron's "embedding input 8·s·b").
TOKEN_ID_BYTES = 8

# ZeRO §3.1: K = 12 bytes/param of fp32 optimizer state for mixed-precision Adam.
ADAM_MASTER_BYTES = 4
ADAM_MOMENTUM_BYTES = 4
ADAM_VARIANCE_BYTES = 4
ADAM_K = ADAM_MASTER_BYTES + ADAM_MOMENTUM_BYTES + ADAM_VARIANCE_BYTES
WEIGHT_BYTES = 2  # bf16 working weights
GRAD_BYTES = 2  # bf16 gradients
BYTES_PER_PARAM = WEIGHT_BYTES + GRAD_BYTES + ADAM_K  # 16, ZeRO's convention (Megatron uses 18)
# AdamW's step forms sqrt(v) for every parameter as one fp32 temporary (torch `_multi_tensor_adam`,
# the foreach implementation torch picks on GPUs) while the states and gradients are all alive.
ADAM_STEP_TEMP_BYTES = 4
# A weight used twice (tied embedding and LM head) receives two gradients, which autograd sums out
# of place: two extra V x D gradients, in fp32 as mixed precision accumulates them (torch AMP: the
# fp32 parameter's dtype; Megatron-LM: fp32 main_grad), alive at the end of the backward.
TIED_GRAD_COPIES = 2
TIED_GRAD_BYTES = 4

STATES_CONVENTION = (
    "mixed-precision Adam, ZeRO convention (Rajbhandari et al. 2020 §3.1): bf16 weights 2 B + "
    "bf16 grads 2 B + fp32 master 4 B + Adam m 4 B + Adam v 4 B = 16 B/param "
    "(Megatron's fp32-main-grad convention would be 18 B/param)"
)

INFERENCE_DTYPES: tuple[DType, ...] = (DType.fp32, DType.bf16, DType.fp8, DType.int8, DType.int4)


def _core_kernel(kernel: AttentionKernel, qk_dim: int, v_dim: int) -> CoreKernel:
    match kernel:
        case "eager" | "flash":
            return kernel
        case "torch-cpu":
            # torch sdp_utils_cpp `check_head_dim_size_cpp`: the CPU flash kernel needs one head size
            return "flash" if qk_dim == v_dim else "math"
        case _:
            assert_never(kernel)


def _core_operand_bytes(kernel: CoreKernel, recompute: Recompute, act: int, tokens: int, n_heads: int,
                        kv_heads: int, qk_dim: int, v_dim: int) -> int:
    """The query, key and value the attention core keeps. A fused kernel and eager autograd keep
    them as the projections made them (K and V for the kv heads only). torch's math kernel keeps
    its own fp32 copies instead (`_scaled_dot_product_attention_math` upcasts 16-bit inputs, scales
    q and k by √scale and repeats K and V to every query head under `enable_gqa`), where it runs
    the core without recompute; a selectively recomputed core keeps its inputs."""
    if kernel == "math" and recompute == "none":
        return FP32_BYTES * tokens * n_heads * (2 * qk_dim + v_dim)
    return act * tokens * (n_heads * qk_dim + kv_heads * (qk_dim + v_dim))


def shared_mask_bytes(plan: ModelPlan, seq_len: int, act: int) -> int:
    """The additive masks archplan's attention modules build once per forward and share over the
    layers, micro-batches and re-runs (`modules.attention.BiasCache`), which SDPA keeps for the
    backward: per distinct (ALiBi heads, window), one (H, T, T) ALiBi bias, or without ALiBi one
    (T, T) mask per sliding window, in the activation dtype (the queries'). Plain causal attention
    runs SDPA's `is_causal` and builds none; a fused kernel's ALiBi and windows are slopes and
    bounds, no tensor (`size`'s kernels)."""
    attention = [layer.mixer for layer in (*plan.layers, *plan.mtp) if isinstance(layer.mixer, AttentionPlan | MLAPlan)]
    if plan.position == "alibi":
        keys = {(mixer.n_heads, mixer.window) for mixer in attention}
    else:
        keys = {(1, mixer.window) for mixer in attention if mixer.window is not None}
    return sum(act * heads * seq_len * seq_len for heads, _ in keys)


def shared_rope_bytes(plan: ModelPlan, seq_len: int, act: int) -> int:
    """The rotary tables archplan's rotary layers build once per forward and share over the layers,
    micro-batches and re-runs (`modules.positions.RopeTables`), which the rotation's products keep
    for the backward: per distinct rotary width, one (T, R) cos and one sin in the dtype of the
    queries they rotate (the activation dtype). Fused kernels' engines build them per layer or in
    fp32 at 4·R bytes a position beside a layer's tens of thousands a token (`size`'s count keeps
    none)."""
    if plan.rope is None:
        return 0
    widths: set[int] = set()
    for layer in (*plan.layers, *plan.mtp):
        match layer.mixer:
            case AttentionPlan(rotary_dim=width) | MLAPlan(qk_rope_head_dim=width) if width:
                widths.add(width)
    return sum(2 * act * seq_len * width for width in widths)


def _attention_core_bytes(n_heads: int, s: int, b: int, h: int, act: int, recompute: Recompute,
                          kernel: CoreKernel, dropout: bool) -> int:
    """What the attention core keeps beyond its projections (Korthikanti et al. 2022 §4.1): eager,
    without recompute, the softmax output over the s x s scores per query head (2as²b), with
    dropout also its mask and output (as²b + 2as²b); selective recompute re-runs the core and keeps
    none of it (Korthikanti §5). A fused kernel keeps the fp32 log-sum-exp per head and query
    instead, 4as·b (Dao et al. 2022 §3.1), unless the core is re-run; torch's math kernel, its
    probabilities in fp32 (4as²b). The attention-output dropout mask (sbh) either way."""
    value = 0
    if recompute == "none":
        match kernel:
            case "eager":
                value += act * n_heads * s * s * b
                if dropout:
                    value += (MASK_BYTES + act) * n_heads * s * s * b
            case "flash":
                value += LSE_BYTES * n_heads * s * b
            case "math":
                value += FP32_BYTES * n_heads * s * s * b
            case _:
                assert_never(kernel)
    if dropout:
        value += MASK_BYTES * s * b * h
    return value


def _core_backward_bytes(kernel: CoreKernel, n_heads: int, s: int, b: int, act: int) -> int:
    """The s×s temporaries of a core's backward that materialises its probabilities: the
    probabilities' gradient (aten `mm` of dO·Vᵀ) and the scores' (`_softmax_backward_data`), alive
    together, in the kernel's dtype (fp32 for torch's math kernel, which upcasts; the activations'
    for eager). Dropout's backward, between them, frees its input before the softmax's runs. A fused
    kernel tiles them (Dao et al. 2022 §3.1, Algorithm 4): none."""
    match kernel:
        case "eager":
            return 2 * act * n_heads * s * s * b
        case "math":
            return 2 * FP32_BYTES * n_heads * s * s * b
        case "flash":
            return 0
        case _:
            assert_never(kernel)


def dtype_bytes(n_elements: int, dtype: DType | str) -> int:
    """Bytes of n elements in dtype; int4 packs two per byte (rounded up to whole bytes)."""
    return math.ceil(n_elements * Fraction(BYTES[DType(dtype)]))


def weights_bytes(params: ParamCount, dtype: DType | str) -> int:
    """All unique parameters stored in one dtype (docs/formulas.md §4.1; no quantisation metadata)."""
    return dtype_bytes(params.total, dtype)


# archplan's torch build keeps each MoE router (weight, bias) in fp32 whatever the model's dtype, as
# transformers' DeepSeek-V3 keeps `gate.weight`: bf16 logits turn near-ties into other experts
ROUTER_BYTES = 4


def _router_params(params: ParamCount, *, shared_gates: bool = False) -> int:
    """The MoE routers' parameters, with the shared experts' sigmoid gates (Qwen-MoE) if asked."""
    ends = (".ffn.router", ".ffn.shared_gate") if shared_gates else (".ffn.router",)
    return sum(n for path, n in params.by_component.items() if path.endswith(ends))


def built_weights_bytes(params: ParamCount, bytes_per_param: float) -> float:
    """The weights as archplan's torch build holds them in a model dtype of `bytes_per_param` bytes:
    every parameter at that width but the MoE routers', in fp32 (`ROUTER_BYTES`)."""
    routers = _router_params(params)
    return (params.total - routers) * bytes_per_param + routers * ROUTER_BYTES


# which weights a narrow inference dtype stores at its width: every parameter, or the layers'
# matmul weights only
Quantize = Literal["all", "linear"]


def _linear_weights(params: ParamCount) -> int:
    """The layers' matmul weights, the ones vLLM's fp8 and int8 methods (`LinearBase` and fused-MoE
    layers) and GPTQ/AWQ quantise in attention and MLP layers (a Mamba layer's projections count
    among them): P_matmul less the LM-head weight (V·D, tied or not) and the MoE routers and shared
    experts' gates, which vLLM's MoE models build unquantised (`ReplicatedLinear(...,
    quant_config=None)`) and AutoAWQ leaves out (`modules_to_not_convert = ["gate"]`)."""
    return params.matmul - params.embedding - _router_params(params, shared_gates=True)


def quantized_weights_bytes(params: ParamCount, dtype: DType | str, quantize: Quantize) -> int:
    """The weights in a narrow dtype (fp8, int8, int4), no quantisation metadata (docs/formulas.md
    §4.1): every parameter at that width (`all`), or the layers' matmul weights at it and the
    embedding, LM head, norms, biases and convolutions in bf16 (`linear`), as quantisers leave them."""
    if quantize == "all":
        return weights_bytes(params, dtype)
    quantised = _linear_weights(params)
    return dtype_bytes(quantised, dtype) + dtype_bytes(params.total - quantised, DType.bf16)


def int4_grouped_bytes(params: ParamCount, group: int = 128) -> int:
    """GPTQ/AWQ-style symmetric int4: matmul weights at 4 bits + one fp16 scale per `group` weights,
    no zero points (a packed 4-bit zero point, AWQ's default, adds 4/group bits); the embedding, LM
    head, MoE routers, norms, biases and convolutions stay bf16 (docs/formulas.md §4.1: Llama-3-8B g=128 ->
    5,700,591,616 B). The LM-head weight (V·D, also when tied) is part of P_matmul but is kept bf16.
    """
    quantised = _linear_weights(params)
    bits = Fraction(4) + Fraction(16, group)
    return math.ceil(quantised * bits / 8) + dtype_bytes(params.total - quantised, DType.bf16)


# ------------------------------------------------------------------------------ model states
@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of weights, gradients and Adam states under a ZeRO stage."""

    weights: int
    grads: int
    master_weights: int
    adam_m: int
    adam_v: int

    @property
    def optimizer(self) -> int:
        return self.master_weights + self.adam_m + self.adam_v

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def zero_model_states(n_params: int, stage: int = 0, dp: int = 1) -> ModelStates:
    """ZeRO §5 / Figure 1, per data-parallel rank (N_d = dp):
    stage 0 (2+2+K)Ψ; stage 1 (P_os) 2Ψ+2Ψ+KΨ/N_d; stage 2 (P_os+g) 2Ψ+(2+K)Ψ/N_d;
    stage 3 (P_os+g+p) (2+2+K)Ψ/N_d. A shard is rounded up to whole bytes.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if dp < 1:
        raise ValueError(f"data-parallel size must be >= 1, got {dp}")

    def shard(bytes_per_param: int, sharded: bool) -> int:
        return math.ceil(Fraction(n_params * bytes_per_param, dp if sharded else 1))

    return ModelStates(
        weights=shard(WEIGHT_BYTES, stage >= 3),
        grads=shard(GRAD_BYTES, stage >= 2),
        master_weights=shard(ADAM_MASTER_BYTES, stage >= 1),
        adam_m=shard(ADAM_MOMENTUM_BYTES, stage >= 1),
        adam_v=shard(ADAM_VARIANCE_BYTES, stage >= 1),
    )


# ------------------------------------------------------------------------------- activations
def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
    recompute: Recompute = "none",
) -> int:
    """Korthikanti et al. 2022, Table 2, for one GPT layer (LayerNorm, 4h GeLU MLP, dropout), in bytes.

    The rows, with t the tensor-parallel size:
      none:      sbh(10 + 24/t + 5as/(ht))        (t=1: sbh(34 + 5as/h))
      +SP:       sbh/t (34 + 5as/h)
      selective: sbh(10 + 24/t); with SP 34sbh/t
      full:      2sbh (only the layer input)
    """
    sbh = Fraction(s * b * h)
    match recompute:
        case "full":
            value = 2 * sbh
        case "selective":
            value = 34 * sbh / t if sequence_parallel else sbh * (10 + Fraction(24, t))
        case "none":
            core = Fraction(5 * a * s, h * t)
            value = sbh / t * (34 + Fraction(5 * a * s, h)) if sequence_parallel else sbh * (
                10 + Fraction(24, t) + core
            )
        case _:
            assert_never(recompute)
    return math.ceil(value)


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes held for the backward pass of one micro-batch (one replica, no TP/PP).

    `by_component`: module path -> bytes kept across the step (`layers.{i}` is the block input
    kept under full recompute). `working_set`: the largest layer's activations, re-materialised
    while that layer runs its backward under full recompute (0 otherwise). `core_backward`: the
    activations alive while an attention core that materialises its probabilities runs its
    backward, at the layer where that moment is largest (0 for fused kernels), and
    `core_gradients` the s×s gradients it forms then. `scan_backward` and `scan_transient`: the
    same for archplan's torch scan units (`units="torch"`), whose backward recomputes their operands
    (`mamba.ssd_backward_bytes`, `mamba.mamba1_scan_backward_bytes`; 0 with mamba_ssm's kernels).
    `conv_backward` and `conv_transient`: the same for a long convolution's mixer (S4, S4D, Hyena,
    StripedHyena), whose FFT convolution and filter units form their gradients there
    (`s4.s4_backward_bytes`, `hyena.hyena_backward_bytes`, `hyena.striped_backward_bytes`).
    `generation_forward` and `generation_transient`: a forward's moment, S4's (DPLR) kernel
    generation by archplan's doubling (`s4.s4_generation_transient_bytes`).
    """

    micro_batch: int
    seq_len: int
    recompute: Recompute
    by_component: dict[str, int]
    working_set: int
    loss_backward: int
    core_backward: int
    core_gradients: int
    scan_backward: int = 0
    scan_transient: int = 0
    conv_backward: int = 0
    conv_transient: int = 0
    generation_forward: int = 0
    generation_transient: int = 0

    @property
    def kept(self) -> int:
        """Everything the forward keeps for the backward: what is alive when the loss is computed."""
        return sum(self.by_component.values())

    @property
    def phases(self) -> dict[Phase, int]:
        """Activation bytes alive at the three candidate peaks of the backward: the loss backward
        (everything kept + the cross-entropy's two fp32 n×V gradients), under full recompute the
        re-run of the largest layer, when the loss and head tensors are already freed, and the
        backward of an attention core that forms its s×s gradients (`core_backward` +
        `core_gradients`), that of archplan's scan units (`scan_backward` + `scan_transient`),
        that of a long convolution's mixer (`conv_backward` + `conv_transient`), and in a forward
        S4's kernel generation (`generation_forward` + `generation_transient`)."""
        ends = sum(self.by_component.get(k, 0) for k in END_COMPONENTS)
        return {"loss backward": self.kept + self.loss_backward,
                "layer re-run": self.kept - ends + self.working_set if self.working_set else 0,
                "attention backward": self.core_backward + self.core_gradients,
                "scan backward": self.scan_backward + self.scan_transient,
                "long-conv backward": self.conv_backward + self.conv_transient,
                "kernel generation": self.generation_forward + self.generation_transient}

    @property
    def peak(self) -> int:
        return max(self.phases.values())


# The tensors the loss and the head keep, freed before full recompute re-runs the last layer.
END_COMPONENTS = ("final_norm", "lm_head", "loss")


def _ffn_inner_bytes(ffn: FFNPlan, tokens: int, act: int) -> int:
    """Tensors of width d_ff that eager autograd saves per token (checked with saved-tensor hooks
    on archplan's torch FFNs in tests/test_memory.py).

    mlp: the activation input (fc1 output) and its output (fc2 input): Korthikanti's 8sbh + 8sbh
    for d_ff = 4h. glu: the gate output (activation input), act(gate) and up (both saved by the
    product) and the product (down input). ReLU's backward reads its *output* (aten
    threshold_backward), the very tensor the next op saves, so it adds no tensor of its own;
    GELU and SiLU read their input, one extra tensor.
    """
    match ffn.activation:
        case "relu":
            activation_input = 0
        case "gelu" | "gelu_tanh" | "silu":
            activation_input = 1
        case _:
            assert_never(ffn.activation)
    match ffn.kind:
        case "mlp":
            n_tensors = 1 + activation_input
        case "glu":
            n_tensors = 3 + activation_input
        case _:
            assert_never(ffn.kind)
    return n_tensors * act * tokens * ffn.d_ff


def ssd_unit_bytes(m: Mamba2Plan, seq: int, act: int, contraction: int) -> int:
    """Bytes of one sequence archplan's torch SSD unit (`modules.mamba2`) keeps beyond mamba_ssm's
    kernels: the conv's output before SiLU (causal-conv1d fuses the SiLU and recomputes it), and
    `_ChunkedSSD`'s C·Bᵀ per chunk (G·q² a chunk) and chunk states but the last (d_inner·N a
    chunk), which `_mamba_chunk_scan_combined_bwd` recomputes and the unit keeps, so that no
    contraction is counted a fourth time. `contraction`: their dtype's bytes, the activations'
    under autocast, fp32 without it (the unit computes in fp32)."""
    q, chunks = ssd_chunks(m, seq)
    return act * seq * m.conv_dim + contraction * (m.n_groups * chunks * q * q + (chunks - 1) * m.d_inner * m.d_state)


def mla_view_widths(m: MLAPlan) -> tuple[int, int]:
    """Per token, the widths archplan's MLA (as torchtitan's DeepSeek-V3 `Attention.forward`)
    keeps alive through views, beyond what `_mixer_bytes` counts: the value is a `split` of the kv
    up-projection's output, so a saved value keeps the keys' no-RoPE half too, every head's
    qk_nope (Megatron-Core makes the value contiguous and frees it); the kv latent norm's saved
    input is a `split` of the kv down-projection's output, which keeps its RoPE key part."""
    return m.n_heads * m.qk_nope_head_dim, m.qk_rope_head_dim


def _mixer_bytes(mixer: MixerPlan, s: int, b: int, h: int, act: int, recompute: Recompute,
                 kernel: AttentionKernel, dropout: bool, units: Units = "kernels", autocast: bool = False) -> int:
    tokens = s * b
    match mixer:
        case AttentionPlan():
            q_width = mixer.n_heads * mixer.head_dim
            kv_width = mixer.n_kv_heads * mixer.head_dim
            core = _core_kernel(kernel, mixer.head_dim, mixer.head_dim)
            kept_kv_heads = mixer.n_kv_heads
            if units == "torch" and kernel == "flash" and recompute == "none":
                # archplan's attention on CUDA repeats K and V to every query head before SDPA (the
                # fused kernels refuse `enable_gqa`: `modules.attention.sdpa`), which keeps the copies;
                # a selectively recomputed core keeps its inputs, from before the repeat
                kept_kv_heads = mixer.n_heads
            # QKV input + output-projection input, and Q + K + V (Korthikanti: 2 + 2, and 4 + 2 for MHA)
            value = act * tokens * (h + q_width) + _core_operand_bytes(
                core, recompute, act, tokens, mixer.n_heads, kept_kv_heads, mixer.head_dim, mixer.head_dim)
            if mixer.qk_norm is not None:
                value += act * tokens * (q_width + kv_width)  # the norms' inputs
            return value + _attention_core_bytes(mixer.n_heads, s, b, h, act, recompute, core, dropout)
        case MLAPlan():
            qk, dv = mixer.qk_head_dim, mixer.v_head_dim
            core = _core_kernel(kernel, qk, dv)
            # q latent norm input + q_b input (without q_lora, q_proj reads the block input)
            q_latent = 2 * mixer.q_lora_rank if mixer.q_lora_rank is not None else 0
            # input, q latent, kv latent norm input + kv_b input, o_proj input, and Q, K, V
            value = act * tokens * (h + q_latent + 2 * mixer.kv_lora_rank + mixer.n_heads * dv)
            value += _core_operand_bytes(core, recompute, act, tokens, mixer.n_heads, mixer.n_heads, qk, dv)
            if units == "torch":
                # torch's math kernel without recompute saves its own fp32 copy of the value
                value_view, latent_view = mla_view_widths(mixer)
                value += act * tokens * (latent_view + (0 if core == "math" and recompute == "none" else value_view))
            return value + _attention_core_bytes(mixer.n_heads, s, b, h, act, recompute, core, dropout)
        case Mamba1Plan():
            unit = mamba1_unit_bytes(mixer, b, s, act) if units == "torch" else 0
            return mamba1_activation_bytes(mixer, h, b, s, act) + unit
        case Mamba2Plan():
            # mamba_ssm `mamba_split_conv1d_scan_combined` saves: in_proj input, zxbcdt, conv output,
            # dt and its cumulative sum (fp32), scan output, gated-norm output (out_proj input).
            zxbcdt = 2 * mixer.d_inner + 2 * mixer.n_groups * mixer.d_state + mixer.n_heads
            width = h + zxbcdt + mixer.conv_dim + mixer.d_inner + mixer.d_inner
            unit = b * ssd_unit_bytes(mixer, s, act, act) if units == "torch" else 0
            return act * tokens * width + 2 * 4 * tokens * mixer.n_heads + unit
        case S4Plan():
            return s4_activation_bytes(mixer, h, b, s, act, autocast)
        case HyenaPlan():
            return hyena_activation_bytes(mixer, h, b, s, act)
        case StripedHyenaPlan():
            return striped_activation_bytes(mixer, h, b, s, act)
        case _:
            assert_never(mixer)


def _input_readers(module: MixerPlan | FFNPlan) -> int:
    """How many of archplan's torch projections read a mixer's or an FFN's input, each through a
    16-bit cast of its own under torch autocast (`input_copies`): attention's q, k and v, MLA's
    query and latent down-projections, a GLU's gate and up; one for the other mixers' input
    projections and a plain MLP's; none for S4, whose convolution reads its fp32 input
    (`s4_activation_bytes` counts it)."""
    match module:
        case AttentionPlan():
            return 3
        case MLAPlan() | FFNPlan(kind="glu"):
            return 2
        case S4Plan():
            return 0
        case Mamba1Plan() | Mamba2Plan() | HyenaPlan() | StripedHyenaPlan() | FFNPlan():
            return 1
        case _:
            assert_never(module)


def input_copies(module: MixerPlan | FFNPlan | MoEPlan, counted: int, wide: bool = True) -> int:
    """The 16-bit copies of a mixer's or an FFN's input that archplan's torch projections keep
    beyond the `counted` (0 or 1) the per-tensor model counts (`_layer_bytes`). `wide`: the input
    is the norm's fp32 output (torch autocast over fp32 weights, an fp32 residual stream).
    Autocast casts a matmul's input on every call (its cast cache holds leaf tensors only, the
    weights), so each projection that reads it keeps a cast of its own. An MoE router keeps the
    fp32 input itself (`modules.moe.Router`: `x.float()` of an fp32 tensor is that tensor), two
    16-bit copies' worth, and its shared experts and their gate cast it once per projection. A
    16-bit input (16-bit weights, as `plan`'s torch engine runs them, or an MTP module's block
    under autocast, on its projection's output) is no cast's: the projections keep the one
    tensor, and an MoE router keeps its fp32 copy (two 16-bit widths) instead of it, beside the
    tensor itself where its shared experts read it."""
    match module:
        case MoEPlan() if wide:
            shared = _input_readers(module.shared) if module.shared is not None else 0
            return 2 - counted + shared + (1 if module.shared_gate else 0)
        case MoEPlan():
            return 2 - counted + (1 if module.shared is not None and counted else 0)
        case _ if wide:
            return max(_input_readers(module) - counted, 0)
        case _:
            return 0


INDEX_BYTES = 8  # int64 indices: top-k choices, sort orders


def moe_routing_bytes(moe: MoEPlan, act: int) -> tuple[int, int]:
    """Per token, (routing, expert order): the bytes of routing metadata archplan's torch MoE
    (`modules.moe`) keeps for its backward beyond the per-tensor model's k routing weights and E
    probabilities in the activation dtype (`act` bytes), and what expert parallelism adds
    (`distributed.expert`). Routing: the E scores in fp32, the k top-k indices (int64, which the
    weights' gather saves), the rows' gather index and its inverse (int64, 2k: the dispatch's and
    the combine's), with normalised top-k weights the k weights before the division and their sum
    (fp32), with a load-balancing loss each token's score sum (fp32, which its renormalisation
    saves). The selection itself keeps nothing (a group-limited router's group scores and mask
    included): its graph ends in the top-k's unused values, so autograd frees it in the forward.
    Expert order: the received rows' sort order and its inverse, 2k int64. Per layer, not per
    token and so left out: the E group ends and the loss's E expert fractions (4 B each)."""
    k, e = moe.top_k, moe.n_experts
    routing = (FP32_BYTES - act) * e + 3 * INDEX_BYTES * k
    if moe.normalize_top_k:
        routing += FP32_BYTES * (k + 1)
    if moe.aux_loss_coef > 0:
        routing += FP32_BYTES
    return routing, 2 * INDEX_BYTES * k


def _ffn_bytes(path: str, ffn: FFNPlan | MoEPlan, tokens: int, h: int, input_shared: bool,
               dropout: bool, act: int = ACT_BYTES, autocast: bool = False,
               units: Units = "kernels", wide: bool = True) -> dict[str, int]:
    """Per module path. `input_shared`: a parallel block with one norm feeds the mixer and the FFN
    the same tensor, already counted with the mixer. `autocast`: the copies of the input its
    projections cast (`input_copies`, `wide` as there), with the router's under MoE. `units`:
    "torch" adds an MoE layer's routing metadata to its router (`moe_routing_bytes`)."""
    x_bytes = 0 if input_shared else act * tokens * h
    if autocast:  # with the input shared with the mixer (one norm, parallel block) its count is the mixer's
        x_bytes += act * tokens * h * input_copies(ffn, counted=0 if input_shared else 1, wide=wide)
    mask = MASK_BYTES * tokens * h if dropout else 0
    match ffn:
        case FFNPlan():
            return {path: x_bytes + _ffn_inner_bytes(ffn, tokens, act) + mask}
        case MoEPlan():
            k = ffn.top_k
            out = {
                # router input (also the shared experts' input), softmax probabilities, top-k weights
                f"{path}.router": x_bytes + act * tokens * (ffn.n_experts + k) + mask
                + (tokens * moe_routing_bytes(ffn, act)[0] if units == "torch" else 0),
                # dispatched copies of the input, each copy's FFN intermediates, and the expert
                # outputs the weighted combine saves
                f"{path}.experts": act * tokens * k * h
                + k * _ffn_inner_bytes(ffn.expert, tokens, act) + act * tokens * k * h,
            }
            if ffn.shared is not None:
                out[f"{path}.shared"] = _ffn_inner_bytes(ffn.shared, tokens, act)
                if ffn.shared_gate:
                    # sigmoid gate output and the shared output it multiplies
                    out[f"{path}.shared_gate"] = act * tokens * (1 + h)
            return out
        case _:
            assert_never(ffn)


def _layer_bytes(layer: LayerPlan, plan: ModelPlan, s: int, b: int, act: int, recompute: Recompute,
                 kernel: AttentionKernel, dropout: bool, res: int, units: Units, autocast: bool) -> dict[str, int]:
    h = plan.d_model
    tokens = s * b
    # norm inputs: the residual stream, but for the post-sublayer norms (sandwich, reordered), which
    # normalise a sublayer's output
    out = {f"{layer.path}.{name}": (act if name.startswith("post_") else res) * tokens * h for name in layer.norms}
    out[f"{layer.path}.mixer"] = _mixer_bytes(layer.mixer, s, b, h, act, recompute, kernel, dropout, units, autocast)
    wide = res > act  # the norms' outputs, in the residual stream's dtype
    if autocast:
        out[f"{layer.path}.mixer"] += act * tokens * h * input_copies(layer.mixer, counted=1, wide=wide)
    if layer.ffn is not None:
        shared_input = plan.residual == "parallel" and len(layer.norms) == 1
        out |= _ffn_bytes(f"{layer.path}.ffn", layer.ffn, tokens, h, shared_input, dropout, act, autocast, units,
                          wide)
    return out


def _alive_at_mixer_backward(layer: LayerPlan, kept: dict[str, int], before: int, block_input: int) -> int:
    """Activations alive while `layer`'s mixer runs its backward: what the layers below keep, the
    layer input full recompute keeps, and the layer's own tensors (`kept`: without recompute,
    which a selective or full re-run restores first) but its FFN's and the norm before it, which
    have run their backward and are freed by then."""
    after = tuple(f"{layer.path}.{name}" for name in ("ffn", "norm2", "post_norm2"))
    return before + block_input + sum(v for k, v in kept.items() if not k.startswith(after))


def _attention_backward_bytes(layer: LayerPlan, kept: dict[str, int], before: int, block_input: int, s: int,
                              b: int, act: int, kernel: AttentionKernel) -> tuple[int, int]:
    """Activations alive while `layer`'s attention core runs its backward, and its s×s gradients
    (`_core_backward_bytes`; (0, 0) where the kernel forms none)."""
    match layer.mixer:
        case AttentionPlan(head_dim=qk_dim, n_heads=n_heads):
            v_dim = qk_dim
        case MLAPlan(qk_head_dim=qk_dim, v_head_dim=v_dim, n_heads=n_heads):
            pass
        case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return 0, 0
        case _:
            assert_never(layer.mixer)
    gradients = _core_backward_bytes(_core_kernel(kernel, qk_dim, v_dim), n_heads, s, b, act)
    if not gradients:
        return 0, 0
    return _alive_at_mixer_backward(layer, kept, before, block_input), gradients


def _scan_backward_bytes(layer: LayerPlan, kept: dict[str, int], before: int, block_input: int, s: int,
                         b: int, act: int, units: Units, autocast: bool) -> tuple[int, int]:
    """Activations alive while archplan's scan unit runs its backward in `layer`, and what that
    backward holds beyond them (`mamba.ssd_backward_bytes`, `mamba.mamba1_scan_backward_bytes`,
    whose inputs are in the activation dtype); (0, 0) for any other mixer and for mamba_ssm's
    kernels."""
    if units != "torch":
        return 0, 0
    match layer.mixer:
        case Mamba2Plan() as m:
            held = ssd_backward_bytes(m, b, s, autocast)
        case Mamba1Plan() as m:
            held = mamba1_scan_backward_bytes(m, b, s, act, autocast)
        case AttentionPlan() | MLAPlan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return 0, 0
        case _:
            assert_never(layer.mixer)
    return _alive_at_mixer_backward(layer, kept, before, block_input), held


def _long_conv_backward_bytes(layer: LayerPlan, kept: dict[str, int], before: int, block_input: int, s: int,
                              b: int, h: int, act: int, autocast: bool) -> tuple[int, int]:
    """Activations alive while a long convolution's mixer runs its backward in `layer`, and what
    that backward holds beyond them (`s4.s4_backward_bytes`, `hyena.striped_backward_bytes`,
    `hyena.hyena_backward_bytes`); (0, 0) for any other mixer. The kernel generations are
    archplan's, in `size` as in `bench --train`, as the kept tensors are (`s4.s4_activation_bytes`):
    unlike the scans (mamba_ssm's kernels), no fused alternative is modelled."""
    match layer.mixer:
        case S4Plan() as m:
            held = s4_backward_bytes(m, h, b, s, act, autocast)
        case StripedHyenaPlan() as m:
            held = striped_backward_bytes(m, h, b, s, act, autocast)
        case HyenaPlan():
            held = hyena_backward_bytes(h, b, s)
        case AttentionPlan() | MLAPlan() | Mamba1Plan() | Mamba2Plan():
            return 0, 0
        case _:
            assert_never(layer.mixer)
    return _alive_at_mixer_backward(layer, kept, before, block_input), held


def _generation_forward_bytes(layer: LayerPlan, kept: dict[str, int], below: int, s: int, b: int, h: int,
                              autocast: bool) -> tuple[int, int]:
    """Activations alive while S4's (DPLR) kernel generation runs in `layer`'s forward (or its
    re-run), and what it holds beyond them (`s4.s4_generation_transient_bytes`): what the layers
    below keep (`below`, with the layer's own input under full recompute), the norm before the
    mixer, the mixer's fp32 copy of its input and the generation's kept tensors
    (`s4.s4_kernel_activation_bytes`). (0, 0) for any other mixer."""
    match layer.mixer:
        case S4Plan(dplr=True) as m:
            alive = (below + kept.get(f"{layer.path}.norm1", 0) + FP32_BYTES * b * s * h
                     + s4_kernel_activation_bytes(m, h, s, autocast))
            return alive, s4_generation_transient_bytes(m, h, s, autocast)
        case (AttentionPlan() | MLAPlan() | Mamba1Plan()
              | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan()):
            return 0, 0
        case _:
            assert_never(layer.mixer)


def activation_memory(plan: ModelPlan, micro_batch: int, seq_len: int, recompute: Recompute = "none",
                      dropout: bool = False, activation_dtype: DType | str = DType.bf16,
                      attention_kernel: AttentionKernel = "eager",
                      residual_dtype: DType | str | None = None, units: Units = "kernels",
                      autocast: bool = False) -> ActivationMemory:
    """Activations of one micro-batch, per saved tensor (Korthikanti et al. 2022 §4.1 generalised).

    `dropout=True` adds Korthikanti's dropout masks and outputs; with it a GPT layer (MHA, LayerNorm,
    4h GeLU MLP) gives exactly 34sbh + 5as²b. Modern LLMs train without dropout, and the spec has
    no dropout field, so `size` uses dropout=False. `activation_dtype` is the dtype of the saved
    activations (Korthikanti: 16-bit); token ids, log-sum-exps and the loss stay int64 / fp32.
    `residual_dtype` (default: `activation_dtype`) is the residual stream's, which the tensors
    read from it keep: the norms fed by it, the layer inputs full recompute keeps, the embedding
    norm's and the final norm's inputs. It is fp32 under torch autocast with fp32 weights (the
    embedding's output is fp32 and so is every residual add; the matmuls' inputs are their own
    16-bit casts) and under Megatron-LM's `--fp32-residual-connection`. `units`: what the Mamba
    and MoE layers keep, fused kernels' tensors (`size`) or archplan's torch units' (`bench
    --train`): Mamba-2's `ssd_unit_bytes` (its contractions in the activation dtype as under
    autocast), Mamba-1's `mamba1_unit_bytes`, an MoE layer's `moe_routing_bytes`, the ALiBi
    biases and window masks the attention modules share (`shared_mask_bytes`) and their rotary
    tables (`shared_rope_bytes`).
    `autocast`: the step runs under torch.autocast (`bench --train` in bf16), whose matmuls keep
    their 16-bit casts where S4's kernel generation multiplies in fp32 otherwise
    (`s4_kernel_activation_bytes`), and which casts a matmul's fp32 input on every call, so each
    projection reading a norm's output keeps a copy of its own (`input_copies`: q, k and v, a
    GLU's gate and up); engines that cast the weights (Megatron, FSDP2) hand every projection
    one 16-bit tensor.
    """
    s, b, h = seq_len, micro_batch, plan.d_model
    act = int(BYTES[DType(activation_dtype)])
    res = int(BYTES[DType(residual_dtype)]) if residual_dtype is not None else act
    tokens = s * b
    out: dict[str, int] = {"embed": TOKEN_ID_BYTES * tokens}
    if dropout:
        out["embed"] += MASK_BYTES * tokens * h
    if plan.embed_norm:
        out["embed_norm"] = res * tokens * h
    if units == "torch" and (masks := shared_mask_bytes(plan, s, act)):
        out["masks"] = masks
    if units == "torch" and (tables := shared_rope_bytes(plan, s, act)):
        out["rope"] = tables
    working_set = 0
    core_backward = scan_backward = conv_backward = generation = (0, 0)
    below = sum(out.values())  # what the layers so far keep, summed as they are added

    def keep(layer: LayerPlan, around: int = 0, stream: int = res) -> None:
        """`around`: under full recompute, the bytes the checkpoint re-runs beside the block (an
        MTP module's own parts, which keep its inputs instead of the block's); `stream`: the
        bytes of the block's residual stream."""
        nonlocal working_set, core_backward, scan_backward, conv_backward, generation, below
        full = _layer_bytes(layer, plan, s, b, act, "none", attention_kernel, dropout, stream, units, autocast)
        block_input = res * tokens * h if recompute == "full" and not around else 0
        core_backward = max(core_backward, _attention_backward_bytes(
            layer, full, below, block_input, s, b, act, attention_kernel), key=sum)
        scan_backward = max(scan_backward, _scan_backward_bytes(
            layer, full, below, block_input, s, b, act, units, autocast), key=sum)
        conv_backward = max(conv_backward, _long_conv_backward_bytes(
            layer, full, below, block_input, s, b, h, act, autocast), key=sum)
        # under full recompute at the layer's re-run, beside the block inputs (a checkpointed
        # forward keeps nothing)
        generation = max(generation, _generation_forward_bytes(layer, full, below + block_input, s, b, h, autocast),
                         key=sum)
        match recompute:
            case "full":
                kept = {layer.path: block_input}  # only the block input is kept
                working_set = max(working_set, sum(full.values()) + around)
            case "selective":
                kept = _layer_bytes(layer, plan, s, b, act, "selective", attention_kernel, dropout, stream, units,
                                    autocast)
            case "none":
                kept = full
            case _:
                assert_never(recompute)
        out.update(kept)
        below += sum(kept.values())

    def head(prefix: str, final_norm_kept: bool = True, stream: int = res) -> None:
        nonlocal below
        # The LM-head input and the fp32 log-probabilities the cross-entropy keeps; with the final
        # norm's input this is Megatron's 4sbh(1 + V/h) (`theoretical_memory_usage.py`).
        part = {f"{prefix}final_norm": stream * tokens * h if final_norm_kept else 0} if plan.final_norm else {}
        part[f"{prefix}lm_head"] = act * tokens * h
        part[f"{prefix}loss"] = LOGITS_BYTES * tokens * plan.vocab_size
        out.update(part)
        below += sum(part.values())

    for layer in plan.layers:
        keep(layer)
    head("")
    # Under autocast a module's block runs on its projection's 16-bit output, so its residual
    # stream, its norms' inputs and its final norm's output are 16-bit (measured: `bench --train`)
    stream = act if autocast else res
    before = res  # the width of the hidden state the next module's hnorm reads
    for layer in plan.mtp:
        # DeepSeek-V3 §2.2: the rolled token ids and their embedding (enorm's input); the hidden
        # state hnorm reads is the tensor the head before it already keeps, unless it is wider
        # than that head's 16-bit input (the main model's under autocast); the projection's
        # input, the concatenation of both norms' outputs; then a block, its final norm, and a
        # head pass of its own. Full recompute checkpoints the whole module (Megatron-Core's MTP
        # layer under `recompute_granularity="full"`, as `bench --train` does): it keeps the two
        # inputs alone.
        whole = recompute == "full"
        ids = TOKEN_ID_BYTES * tokens
        proj = act * tokens * 2 * h
        final = stream * tokens * h if plan.final_norm else 0
        own = {f"{layer.path}.enorm": ids + res * tokens * h,
               f"{layer.path}.hnorm": 0 if before == act else before * tokens * h,
               f"{layer.path}.proj": 0 if whole else proj}
        out.update(own)
        below += sum(own.values())
        keep(layer, around=proj + final + res * tokens * h if whole else 0, stream=stream)
        head(f"{layer.path}.", final_norm_kept=not whole, stream=stream)
        before = stream
    loss_backward = CE_BACKWARD_TENSORS * LOGITS_BYTES * tokens * plan.vocab_size
    return ActivationMemory(b, s, recompute, out, working_set, loss_backward, *core_backward, *scan_backward,
                            *conv_backward, *generation)


# ---------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per replica (or per ZeRO rank) at the peak of one training step with AdamW.

    `total` = model states + the largest of: the activations' phases (`ActivationMemory.phases`),
    the tied weight's gradient sum and the optimizer step's temporary (both when no activation is
    alive).
    """

    n_params: int
    zero_stage: int
    dp: int
    states: ModelStates
    activations: ActivationMemory
    tied_grad_sum: int
    optimizer_step: int

    @property
    def weights(self) -> int:
        return self.states.weights

    @property
    def grads(self) -> int:
        return self.states.grads

    @property
    def optimizer(self) -> int:
        return self.states.optimizer

    @property
    def phases(self) -> dict[Phase, int]:
        """Bytes beyond the model states at each candidate peak of the step."""
        return {**self.activations.phases, "tied gradient sum": self.tied_grad_sum,
                "optimizer step": self.optimizer_step}

    @property
    def peak_phase(self) -> Phase:
        phases = self.phases
        return max(phases, key=lambda k: phases[k])

    @property
    def total(self) -> int:
        return self.states.total + max(self.phases.values())


def training_memory(plan: ModelPlan, params: ParamCount, micro_batch: int, seq_len: int,
                    recompute: Recompute = "none", zero_stage: int = 0, dp: int = 1,
                    activation_dtype: DType | str = DType.bf16,
                    attention_kernel: AttentionKernel = "eager",
                    residual_dtype: DType | str | None = None, units: Units = "kernels",
                    autocast: bool = False) -> TrainingMemory:
    """Model states over all unique parameters (every expert has weights, grads and Adam states)
    plus the peak of one micro-batch of `seq_len` tokens per sequence through the step. The step's
    temporary spans the parameters whose optimizer states this rank holds (ZeRO stage >= 1 shards
    them)."""
    states = zero_model_states(params.total, zero_stage, dp)
    return TrainingMemory(
        n_params=params.total,
        zero_stage=zero_stage,
        dp=dp,
        states=states,
        activations=activation_memory(plan, micro_batch, seq_len, recompute,
                                      activation_dtype=activation_dtype, attention_kernel=attention_kernel,
                                      residual_dtype=residual_dtype, units=units, autocast=autocast),
        tied_grad_sum=TIED_GRAD_COPIES * TIED_GRAD_BYTES * plan.vocab_size * plan.d_model if plan.tied else 0,
        optimizer_step=states.adam_v * ADAM_STEP_TEMP_BYTES // ADAM_VARIANCE_BYTES,
    )
