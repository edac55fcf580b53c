"""Step time of a layout: the per-kernel-class compute model and the price of `cluster.py`'s
collectives, with the overlaps real runs have. docs/plan.md "Compute model" states each term.

Compute, per micro-batch on one rank (b·s/cp tokens):
- GEMMs (every linear of the rank's layers and the LM head; stacked experts per local expert, at
  the tokens routed to it, b·s·k·ep/E): 2·M·N·K FLOPs at `gemm` × x/(x + GEMM_HALF_DIM) of the
  peak, x the smallest of M, N, K, but never faster than the bf16 operands stream from HBM (a
  roofline: skinny per-GPU matmuls under TP or fine-grained experts run slower). The backward is
  2 GEMMs of the same shapes (input and weight gradients). `--precision fp8`: the GEMMs inside the
  blocks run at the fp8 peak, the router and the LM head stay bf16 (DeepSeek-AI 2024 §3.3.1; the
  head in MXFP8 where the run says so, `Settings.fp8_lm_head`), the
  routed experts' at the bf16 rate unless the run's grouped GEMMs gain (`Settings.fp8_experts`); the
  backward's at the family's split-accumulator cost (`tensor_gemm`), and the inputs no
  norm produces pay their cast to fp8 (`fp8_cast_bytes`, elementwise); under current scaling
  the norm-fed inputs pay theirs too, and every other cast an amax pass before it.
- attention core: flash (default) at FlashAttention-2's published throughput for the GPU family
  and head dim (the Triton FlashAttention, or cuDNN's fused attention that Transformer Engine runs
  on Hopper and newer, at its measured ratio to it, `FLASH_IMPL_SPEED`, when the run used that
  kernel), slower on short sequences as the kernels' own benchmark figures
  measure (`flash_length_factor`), causal pairs only, backward at 2.5 × the forward FLOPs
  (FlashAttention's own convention, it recomputes the scores); in MXFP8 at cuDNN's measured speed
  over its BF16 kernel where the run says so (`Settings.fp8_attention`); eager: two batched GEMMs over the
  full s×s square and the softmax's s×s traffic at HBM bandwidth.
- elementwise (norms, residual adds, rotary, activations, MoE permutations, cross-entropy, Mamba's
  scan, the long convolutions' FFTs, gates and filter generation: `_long_conv`) at `hbm` × the HBM
  bandwidth, 2 B per element read or written (fp32 for the FFTs); the backward moves twice the
  forward's bytes. Without sequence parallelism the norms and residual adds run on the whole
  sequence on every TP rank (Korthikanti et al. 2022 Table 4: SP saves their time). Hyena's
  implicit filter MLP is GEMMs on seq rows (once per position, not per token). Under the torch
  engine (eager autograd) the backward also sums every linear bias's output gradient in a pass of
  its own (`bias_grad_bytes`), and, where one linear projects q, k and v (`fused_qkv`),
  concatenates their gradients (`qkv_concat_bytes`); Transformer Engine fuses the first into the
  weight-gradient GEMM and splits without a copy. The loss at its implementation's bytes per logit
  (`CROSS_ENTROPY_BYTES`).
- recompute: full re-runs the forward, selective the eager attention core; the "mla_up_proj" module
  recompute (`Settings.recompute_modules`) MLA's up-projection GEMMs.
- `efficiency` (the user's measured figure) replaces the GEMM and attention rates by one
  fraction of the dense peak.
- the optimizer step: the states convention's `step_bytes` per parameter of the rank's optimizer
  shard (30 B with fp32 states: Adam reads fp32 master, m, v and the gradient and writes master,
  m, v and the bf16 weights; fewer with bf16 moments or the master as remainders) at HBM bandwidth.
- torch FSDP2's copies around its data-parallel collectives (`fsdp2_copy_bytes`), elementwise at
  HBM bandwidth on the compute stream: Megatron-style engines gather into and reduce out of their
  parameter and gradient buffers in place; FSDP2 copies every gathered parameter out of the
  all-gather buffer and every gradient into the reduce-scatter buffer. Where it accumulates
  unsharded gradients over the micro-batches (zero 0/1), the casts and adds of that accumulation
  too (`fsdp2_accumulation_bytes`); Megatron-LM fuses its accumulation into the GEMM.

Communication (records from `cluster.step_collectives`): ring time wire_bytes / (link × achieved
fraction) + a latency per call, in-node when the group's ranks share a node (ranks ordered tp, cp,
dp, pp, Megatron's default); the pipeline's receives run with its sends where its schedule pairs
them (`pp_exchange`). TP, CP, EP and PP transfers sit in each micro-batch's critical path
unless the run overlaps them ("tp", "ep", "dualpipe" in `overlap`: hidden behind that
micro-batch's GEMMs / compute, TP at the SMs its overlap kernels take, `tp_overlap_cost`, the
all-to-all in the share each schedule hides, `ep_exposed`; "pp": the interleaved
schedule's steady-state transfers, `pp_exposed`); the ring CP's K/V exchange always runs beside
the attention (`ring_cp_exposed`). Data-parallel traffic ("dp", on by default: Megatron's --overlap-grad-reduce /
--overlap-param-gather, FSDP's prefetch) hides behind the backward (gradients) and forward
(parameter gathers) of the micro-batches it runs beside, all but the last layer's bucket.

The search prices a layout only if its floor (`step_time_floor`: the compute and exposed MoE
all-to-all of those slots, and what of the layers' gradient reduction no backward can hide) can
rank it.

Pipeline: m micro-batch slots of the slowest pipeline rank plus the bubble, (p − 1)/v slots
(Narayanan et al. 2021 §2.2: (p − 1)/m of the ideal time, divided by v virtual stages) when
m ≥ p, p − m + (m − 1)/v slots with fewer micro-batches than stages (`bubble_slots`), whatever
the interleaved round N (`Layout.group`): Megatron-LM admits only rounds that leave no dependency
bubble (`layout.group_problem`), and a longer round changes the warm-up's memory, not the bubble.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Literal

from typing_extensions import assert_never

from archplan.analytic.attention import attended_pairs
from archplan.analytic.memory import FP32_BYTES
from archplan.analytic.s4 import log2_ceil
from archplan.hardware import (
    GEMM_HALF_DIM,
    Accelerator,
    FlashImpl,
    KernelEfficiency,
    RingNics,
    flash_head_dim,
    flash_length_factor,
    flash_speed,
    fp8_attention_speed,
)
from archplan.planning.cluster import (
    ACT_BYTES,
    FP8_BYTES,
    AttentionKernel,
    CPComm,
    CrossEntropyImpl,
    Dispatcher,
    FetchUse,
    ModelData,
    RecomputeModule,
    StatesConvention,
    UseKind,
    _collectives,
    _fsdp_accumulates,
    ep_records,
    fsdp2_accumulated_numel,
    fetch_trace,
    in_flight,
    rank_chunks,
    recompute_skips_last_gemm,
)
from archplan.planning.layout import Layout
from archplan.planning.records import DATA_PARALLEL_DIMS, Collective, MeshDim, RankMemory
from archplan.planning.shards import Tensor
from archplan.planning.zero3_fetch import Module, Op, step_seconds
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    HyenaPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
)

Precision = Literal["bf16", "fp8"]
# How fp8 scales are found (`Settings.fp8_scaling`, priced by `fp8_cast_bytes`): "delayed", one per
# tensor from an amax history, so the cast needs nothing before it and Transformer Engine fuses it
# into the norm; "current", one per tensor from the tensor itself (TE's Float8CurrentScaling,
# Megatron-Bridge's FP8-CS), so an amax pass first; "mxfp8", one per 32-element block, found inside
# the cast (TE's MXFP8BlockScaling, Blackwell only)
FP8Scaling = Literal["delayed", "current", "mxfp8"]
# The loss's HBM bytes per logit (per token and vocabulary entry), forward and backward together,
# by implementation (`--cross-entropy`), split 1:2 between the passes as every elementwise kernel
# here:
# - fp32-fused: a fused softmax-cross-entropy over fp32 logits (Megatron's vocab-parallel loss),
#   the logits written and read, 8 B, and the fp32 gradient written and read by the head's GEMMs,
#   16 B; the convention the family constants were calibrated with;
# - bf16-fused: flash-attention's cross-entropy kernel on the bf16 logits (llm-foundry's default
#   `loss_fn: fused_crossentropy`; the xentropy kernel of flash-attention 1.0.9, from Apex): its
#   forward reads each row twice (the max and sum, then the sum of exponentials), its backward
#   reads it once and writes the gradient, 4 + 2 + 2 B;
# - eager: `F.cross_entropy` on logits cast to fp32 (torchtitan's `self.output(h).float()`,
#   Hugging Face): the cast (2 + 4), the log-softmax (4 + 4), the loss gradient's dense write (4),
#   the log-softmax backward (4 + 4 + 4) and the cast back (4 + 2), 36 B (op by op in a real
#   backward: tests/test_plan.py).
CROSS_ENTROPY_BYTES: dict[CrossEntropyImpl, int] = {"fp32-fused": 24, "bf16-fused": 8, "eager": 36}
# FFT convolutions (S4, Hyena, StripedHyena) are not GEMMs: cuFFT runs on the CUDA cores and at
# these lengths is bound by memory traffic, not by its 2.5·n·log2 n FLOPs (Fu et al. 2023,
# FlashFFTConv §1-2: the FFT convolution is I/O-bound and uses no tensor cores). So they are
# priced at HBM bandwidth, in fp32 as the modules convolve: length n = 2T, T + 1 complex bins, per
# channel and sequence the rfft reads 4·2T and writes 8·T bytes, the spectrum product reads two
# spectra and writes one (24·T), the irfft reads 8·T and writes 4·2T: 56 bytes per position. Each
# distinct filter's rfft (4·2T + 8·T) runs once per micro-batch, whatever the batch. One pass over
# HBM per transform: a lower bound for cuFFT's multi-pass plans of the longest lengths.
FFT_CONV_BYTES = 56
FFT_FILTER_BYTES = 16
# casting one bf16 element to fp8 for a GEMM: read 2 B, write 1 B as is and 1 B transposed
# (Hopper's fp8 tensor cores take only the "TN" layout, so the backward's weight-gradient GEMM
# needs the transposed copy: Transformer Engine's fused cast-transpose)
FP8_CAST_BYTES = ACT_BYTES + 2 * FP8_BYTES
# current scaling's amax pass: Transformer Engine's `Float8CurrentScalingQuantizer::quantize_impl`
# reads the whole bf16 input once for its amax (`nvte_compute_amax`) before the cast reads it again
FP8_AMAX_BYTES = ACT_BYTES
# MXFP8 (OCP Microscaling Formats v1.0, §5.3): one 1-byte E8M0 scale per 32-element block, written
# beside each of the cast's two copies
MXFP8_BLOCK = 32
MXFP8_SCALE_COPIES = 2
# SMs each of Transformer Engine's SM-driven TP overlap kernels takes ("num_sm": 16 for its
# "pipeline" and "bulk" methods in `initialize_ub`'s defaults, with `set_sm_margin`)
UB_COMM_SMS = 16
FP8_SCALE_TILE = 128  # one fp32 scale per 1×128 activation tile (DeepSeek-V3 §3.3.2)


@dataclass(frozen=True)
class Network:
    """Per-GPU one-direction bandwidths (bytes/s), GPUs per node, and how many NICs a ring across
    nodes drives (`hardware.KernelEfficiency.ring_nics`, or the user's `--ring-nics`)."""

    intra_node: float
    inter_node: float
    gpus_per_node: int
    ring_nics: RingNics = "one"
    segment: int | None = None  # GPUs of a node a job over several gets, when not all (NVL72's 64)
    peer_link: float | None = None  # a pairwise-linked node's link to one peer (`parallel.Interconnect`)

    def intra(self, members: int) -> float:
        """In-node bandwidth of a rank whose group has `members` ranks on its node: the node's
        figure through a switch; on a pairwise mesh, one link to each other member (a pipeline send
        has one peer, TP2 one link, only a group of the whole node every link)."""
        if self.peer_link is None:
            return self.intra_node
        return min(self.intra_node, max(1, members - 1) * self.peer_link)

    def node(self, world: int) -> int:
        """The ranks that share one node's links in a job of `world` GPUs: whole nodes where the
        job fills them, else the `segment` of each where it fills those."""
        if self.segment is not None and world > self.gpus_per_node and world % self.gpus_per_node \
                and world % self.segment == 0:
            return self.segment
        return self.gpus_per_node


@dataclass(frozen=True)
class Rates:
    """What one GPU achieves, resolved once per evaluation."""

    peak: float  # bf16 dense FLOP/s
    fp8_peak: float
    eff: KernelEfficiency
    efficiency: float | None  # the user's override of GEMM + attention efficiency
    hbm: float  # achieved bytes/s
    precision: Precision
    flash: FlashImpl = "fa2"  # which FlashAttention implementation runs the flash attention core
    sms: int = 0  # the GPU's streaming multiprocessors (0: not on record)
    fp8_experts: bool = False  # routed experts' grouped GEMMs at the fp8 rate (`Settings.fp8_experts`)
    fp8_dispatch: bool = False  # the tokens sent to the experts travel in fp8 (`Settings.fp8_dispatch`)
    # the routed experts' activation and down-projection cast run in their GEMMs' epilogues
    # (`Settings.fused_grouped_mlp`)
    fused_grouped_mlp: bool = False
    # the GPU whose measured MXFP8 attention runs the flash core (`Settings.fp8_attention`); None: bf16
    fp8_attention: str | None = None
    fp8_lm_head: bool = False  # the LM head's GEMMs at the fp8 rate (`Settings.fp8_lm_head`)
    fp8_scaling: FP8Scaling = "delayed"  # how fp8 scales are found (`Settings.fp8_scaling`)
    cudnn_norm: bool = False  # cuDNN's norm kernels (`Settings.cudnn_norm`)
    # each CP rank expands every key of the sequence from the gathered MLA latent (torch's engine
    # under the all-gather, `modules.mla`): its kv_b_proj runs over all mb·T tokens, not T/cp
    mla_keys_whole: bool = False

    @property
    def sends_fp8(self) -> bool:
        """The MoE dispatch moves fp8 (`ep_all_to_all_time`): an fp8 run whose dispatcher quantizes."""
        return self.precision == "fp8" and self.fp8_dispatch


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on the slowest pipeline rank, and where they go."""

    gemm: float  # m micro-batches, forward + backward + recompute
    attention: float
    elementwise: float
    tp: float  # exposed communication, m micro-batches
    cp: float
    ep: float
    pp_p2p: float
    bubble: float
    dp: float  # exposed data-parallel traffic
    optimizer: float
    recompute: float  # the recomputed forward work, m micro-batches

    @property
    def compute(self) -> float:
        return self.gemm + self.attention + self.elementwise + self.recompute

    @property
    def exposed(self) -> float:
        """Communication left in the critical path and the pipeline bubble: what overlap and the
        layout decide, beside the compute and the optimizer step."""
        return self.tp + self.cp + self.ep + self.pp_p2p + self.bubble + self.dp

    @property
    def total(self) -> float:
        return (self.compute + self.tp + self.cp + self.ep + self.pp_p2p + self.bubble + self.dp
                + self.optimizer)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in (
            "gemm", "attention", "elementwise", "recompute", "compute", "tp", "cp", "ep", "pp_p2p", "bubble",
            "dp", "optimizer", "total")}


@dataclass(frozen=True)
class _MicroBatch:
    """Seconds of one micro-batch through some layers on one rank, by class and pass."""

    gemm_fwd: float = 0.0
    gemm_bwd: float = 0.0
    attn_fwd: float = 0.0
    attn_bwd: float = 0.0
    elem_fwd: float = 0.0
    recompute: float = 0.0  # extra forward work of the recompute mode
    # GEMM seconds (forward and backward) that run beside an SM-driven TP collective when TP
    # communication overlaps (`tp_overlap_cost`): the row-parallel forwards, the column-parallel
    # backwards
    gemm_beside_tp: float = 0.0
    # elementwise seconds of the backward beyond twice the forward's: eager autograd's bias
    # gradients and fused-QKV concatenation (`bias_grad_bytes`, `qkv_concat_bytes`)
    elem_bwd: float = 0.0

    def __add__(self, other: _MicroBatch) -> _MicroBatch:
        return _MicroBatch(self.gemm_fwd + other.gemm_fwd, self.gemm_bwd + other.gemm_bwd,
                           self.attn_fwd + other.attn_fwd,
                           self.attn_bwd + other.attn_bwd, self.elem_fwd + other.elem_fwd,
                           self.recompute + other.recompute, self.gemm_beside_tp + other.gemm_beside_tp,
                           self.elem_bwd + other.elem_bwd)

    @property
    def forward(self) -> float:
        return self.gemm_fwd + self.attn_fwd + self.elem_fwd

    @property
    def backward(self) -> float:
        return self.gemm_bwd + self.attn_bwd + 2 * self.elem_fwd + self.elem_bwd + self.recompute

    @property
    def total(self) -> float:
        return self.forward + self.backward


def gemm_time(m: int, n: int, k: int, rates: Rates, fp8: bool = False, count: int = 1) -> float:
    """One M×K by K×N matmul (count of them): FLOPs at the shape's efficiency, or HBM-bound."""
    if min(m, n, k) <= 0:
        return 0.0
    peak = rates.fp8_peak if fp8 and rates.precision == "fp8" else rates.peak
    x = min(m, n, k)
    eff = rates.efficiency if rates.efficiency is not None else rates.eff.gemm * x / (x + GEMM_HALF_DIM)
    flops = 2 * m * n * k * count
    operands = ACT_BYTES * (m * k + k * n + m * n) * count
    return max(flops / (peak * eff), operands / rates.hbm)


def _routing_tokens(data: ModelData, layout: Layout) -> int:
    """Tokens one rank routes to the experts per micro-batch: whole experts on every tp rank, each
    fed its own sequence shard under SP (shards.py)."""
    tokens = layout.mb * data.seq // layout.cp
    return tokens // layout.tp if layout.sequence_parallel else tokens


def _activation_passes(f: FFNPlan) -> int:
    """d_ff-wide tensors an FFN's activation reads and writes a token: a GLU reads [gate | up] and
    writes their product (3), a plain MLP reads its up projection and writes the activation (2)."""
    match f.kind:
        case "glu":
            return 3
        case "mlp":
            return 2
        case _:
            assert_never(f.kind)


def routed_copy_bytes(data: ModelData, moe: MoEPlan, layout: Layout, fused_grouped_mlp: bool) -> float:
    """HBM bytes, one micro-batch's forward on one rank, of an MoE layer's passes over its routed
    copies: the permutation's four passes over k·d_model a token, and the experts' activation
    (its [gate | up] read, the product written), which the fused grouped MLP computes in the
    GEMMs' epilogues instead, "avoiding memory round-trips" (NVIDIA, "Boosting MoE Training
    Throughput with Advanced Fusion Kernels", 2026). Over the tokens this rank routes to whole
    experts (`_routing_tokens`: its sequence shard under SP, every token without)."""
    activation = 0 if fused_grouped_mlp else ACT_BYTES * moe.expert.d_ff * _activation_passes(moe.expert)
    return _routing_tokens(data, layout) * moe.top_k * (activation + 4 * ACT_BYTES * data.plan.d_model)


def _gemm_shape(data: ModelData, layer: LayerPlan, t: Tensor, layout: Layout, mla_keys_whole: bool = False
                ) -> tuple[int, int, int, int, bool] | None:
    """(M, N, K, count, runs in fp8) of the matmul that weight `t` of `layer` takes part in on one
    rank, one micro-batch; None for norms, biases and other non-GEMM parameters. `mla_keys_whole`:
    MLA's kv_b_proj expands the whole sequence's keys (`Rates.mla_keys_whole`)."""
    tp, ep = layout.tp, layout.ep
    seq = data.seq
    tokens = layout.mb * seq // layout.cp
    if mla_keys_whole and t.name.endswith(".mixer.kv_b_proj.weight"):
        tokens = layout.mb * seq
    shape = t.local_shape(tp, ep)
    match t.role:
        case "experts":
            moe = layer.ffn
            assert isinstance(moe, MoEPlan)
            routed = math.ceil(_routing_tokens(data, layout) * moe.top_k * ep / moe.n_experts)
            return routed, shape[1], shape[2], shape[0], True
        case "router" | "gate":
            # small precision-sensitive GEMMs that fp8 recipes keep out of fp8, over the tokens this
            # rank routes (its sequence shard under SP); the shared-expert gate reads the layer's
            # input where the router does (its weight gradient summed over tp: `cluster._sp_summed`)
            return _routing_tokens(data, layout), shape[0], shape[1], 1, False
        case "linear" if t.per_position:
            # Hyena's filter MLP runs once per position of the whole sequence (every CP rank runs
            # its tensor-parallel shard of it over the full length), not per token, and in bf16
            # (like the router)
            return seq, shape[0], shape[1], 1, False
        case "linear":
            return tokens, shape[0], shape[1], 1, True
        case "expert_bias" | "other":
            return None
        case _:
            assert_never(t.role)


def tensor_gemm(data: ModelData, layer: LayerPlan, t: Tensor, layout: Layout,
                rates: Rates) -> tuple[float, float]:
    """Forward and backward seconds of the matmul that weight `t` of `layer` takes part in on one
    rank (0 for norms, biases and other non-GEMM parameters), one micro-batch. The backward is two
    GEMMs (dgrad, wgrad) of the forward's shape; in fp8 at the family's split-accumulator cost
    (`KernelEfficiency.fp8_split_acc`), unless the user gave their own `--efficiency`. A routed
    expert's GEMMs run at the bf16 rate unless the run's grouped GEMMs gain from fp8
    (`Settings.fp8_experts`)."""
    shape = _gemm_shape(data, layer, t, layout, rates.mla_keys_whole)
    if shape is None:
        return 0.0, 0.0
    m, n, k, count, fp8 = shape
    fp8 = fp8 and (rates.fp8_experts or not t.expert)
    forward = gemm_time(m, n, k, rates, fp8, count=count)
    slower = (rates.eff.fp8_split_acc if fp8 and rates.precision == "fp8" and rates.efficiency is None
              else 1.0)
    return forward, 2 * slower * forward


def fp8_cast_bytes(data: ModelData, i: int, layout: Layout, fp8_dispatch: bool = False,
                   fused_grouped_mlp: bool = False, scaling: FP8Scaling = "delayed",
                   cudnn_norm: bool = False) -> int:
    """HBM bytes, one micro-batch's forward, of casting layer `i`'s GEMM inputs to fp8 under
    `--precision fp8`: read in bf16, written in fp8 twice (as is, and transposed for the
    weight-gradient GEMM of the backward), 4 B per element. The inputs a norm does not produce pay
    it: the row-parallel projections' (attention output, FFN down, mixer out), the experts'
    down-projections' (per routed copy), and the tokens the experts receive: quantised once before
    an fp8 dispatch (DeepSeek-AI 2024 §3.3.2), else each routed copy by the experts' grouped linear
    after a bf16 one (`Settings.fp8_dispatch`). Under Transformer Engine's fused grouped MLP the
    up-projection's epilogue writes the down-projection's input already quantised
    (`Settings.fused_grouped_mlp`): that cast is not paid.

    The norm-fed inputs (`_norm_source`: once per input the projections share) depend on the
    recipe (`scaling`) and on the norm kernel (`cudnn_norm`, NVTE_NORM_FWD_USE_CUDNN=1), as TE's
    `extensions/normalization.cpp` chooses its path:
    - delayed: the norm writes fp8 itself (`FULLY_FUSED`, `LayerNormLinear`), nothing more;
    - current: TE's norm writes bf16 and its amax (`FUSED_NORM_AMAX_FP8`, TE 2.8 on), then a cast,
      4 B; cuDNN's norm writes bf16 alone (`UNFUSED`), then the quantizer's amax pass and cast, 6 B;
    - mxfp8: cuDNN's norm writes MXFP8 itself (`FULLY_FUSED`), nothing more; TE's writes bf16
      (`UNFUSED`), then a cast, 4 B.
    Under current scaling every other cast first reads its input for the amax
    (`Float8CurrentScalingQuantizer::quantize_impl`), `FP8_AMAX_BYTES` more; under MXFP8 every
    cast also writes its block scales (`MXFP8_SCALE_COPIES` bytes per `MXFP8_BLOCK` elements)."""
    layer = data.plan.layers[i]
    total = 0
    normed: set[str] = set()  # the norm-fed inputs already counted (`_norm_source`)
    norm_fed = 0
    dispatched = False
    for t in data.layer_tensors[i]:
        shape = _gemm_shape(data, layer, t, layout)
        if shape is None or not shape[4]:
            continue
        m, _, k, count, _ = shape
        match t.split:
            case "column" if t.name.endswith(UNNORMED_COLUMN_INPUTS):
                total += m * k * count
            case "column" | "replicated":
                source = _norm_source(t.name)
                if source not in normed:
                    normed.add(source)
                    norm_fed += m * k * count
            case "expert_row" if fused_grouped_mlp:
                pass
            case "row" | "expert_row":
                total += m * k * count
            case "expert_column" if not dispatched:
                # the gate and up projections read the same dispatched tokens
                dispatched = True
                total += _routing_tokens(data, layout) * k if fp8_dispatch else m * k * count
            case _:
                pass
    match scaling:
        case "delayed":
            return FP8_CAST_BYTES * total
        case "current":
            norm = FP8_CAST_BYTES + (FP8_AMAX_BYTES if cudnn_norm else 0)
            return (FP8_CAST_BYTES + FP8_AMAX_BYTES) * total + norm * norm_fed
        case "mxfp8":
            cast = total + (0 if cudnn_norm else norm_fed)
            return FP8_CAST_BYTES * cast + mxfp8_scale_bytes(cast)
        case _:
            assert_never(scaling)


def mxfp8_scale_bytes(elements: int) -> int:
    """The E8M0 block scales an MXFP8 cast of `elements` writes beside its two copies."""
    return MXFP8_SCALE_COPIES * math.ceil(elements / MXFP8_BLOCK)


# MLA's up-projections read the latents' own norms (q_a_norm, kv_a_norm), not the block's
MLA_LATENT_READERS = (".q_b_proj.weight", ".kv_b_proj.weight")
# column-parallel linears whose input no fused norm-linear writes: Mamba-1's dt_proj reads x_proj's
# Δ slice, or Jamba's dt_layernorm of it, which no stack fuses into a `LayerNormLinear`
UNNORMED_COLUMN_INPUTS = (".mixer.dt_proj.weight",)


def _norm_source(name: str) -> str:
    """The norm whose output a column-parallel or replicated GEMM weight reads: the block's norm
    before its module (q, k and v share one, as the gate and up projections do; so do MLA's two
    down-projections), or an MLA latent's own."""
    return name if name.endswith(MLA_LATENT_READERS) else name.rsplit(".", 2)[0]


def bias_grad_bytes(data: ModelData, i: int, layout: Layout) -> int:
    """HBM bytes, one micro-batch's backward, of layer `i`'s linear-bias gradients under eager
    autograd: PyTorch's derivative of `linear` / `addmm` with respect to the bias is the output
    gradient summed over the rows (`tools/autograd/derivatives.yaml`: `maybe_multiply(grad, beta)`
    reduced to the bias's size; on any device a `sum.dim_IntList` over the M×N output gradient),
    a pass of its own that reads the whole output gradient, 2 B per element. Per bias: the rows
    of its GEMM (`_gemm_shape`) times its local width, a row-parallel one's too: the torch engine
    adds it before the reduction (`RowwiseParallel`), whose backward gathers the output gradient
    whole. An expert bank's bias is gathered per routed copy (`b[e(r)]`), and its gradient is an
    index_put of the copies' output gradient. Transformer Engine computes it in
    the weight-gradient GEMM's epilogue (cuBLASLt's BGRADB), so the Megatron-style engines, priced
    as Megatron-Core with TE, pay none (Megatron-LM 2021 summed apart too; its rows are priced
    without it, 0.1-0.6 points: docs/validation.md, "The eager-autograd round"), nor do fp8
    runs, whose block linears are TE's."""
    layer = data.plan.layers[i]
    tensors = data.layer_tensors[i]
    weights = {t.name.rsplit(".", 1)[0]: t for t in tensors if t.name.endswith(".weight")}
    total = 0
    for t in tensors:
        if t.role == "expert_bias":
            # b[e(r)] added to each routed copy: its gradient accumulates (index_put) the M×O
            # output gradient of the rank's routed copies into the bank's rows
            bank = next(w for w in tensors if w.role == "experts")
            routed = _gemm_shape(data, layer, bank, layout)
            assert routed is not None
            total += ACT_BYTES * routed[0] * routed[3] * t.local_shape(layout.tp, layout.ep)[-1]
            continue
        module, _, kind = t.name.rpartition(".")
        weight = weights.get(module)
        shape = None if kind != "bias" or weight is None else _gemm_shape(data, layer, weight, layout)
        if shape is None:
            continue
        # every bias over its GEMM's rows: torch's RowwiseParallel adds a row-parallel linear's
        # bias inside addmm, before the reduce-scatter, and sums the gathered output gradient
        # (measured on a tp=2 SP stage); a router's rows are already the rank's shard
        rows, _, _, count, _ = shape
        total += ACT_BYTES * rows * t.local_shape(layout.tp, layout.ep)[0] * count
    return total


def qkv_concat_bytes(data: ModelData, i: int, layout: Layout) -> int:
    """HBM bytes, one micro-batch's backward, of concatenating layer `i`'s q, k and v gradients
    where one linear projects them and its output is split (llm-foundry's MPT: `Wqkv`, then
    `qkv.split([d_model, kv, kv], dim=2)`): the backward of `split` (and `chunk`) under eager
    autograd is a `cat` into a new buffer, the three gradients of the rank's columns read and the
    buffer written, 2 B each. Transformer Engine's `_SplitAlongDim` skips the copy when the
    gradients already lie in one buffer, so only eager stacks that fuse the projection pay it; 0
    for other mixers."""
    a = data.plan.layers[i].mixer
    if not isinstance(a, AttentionPlan):
        return 0
    tp = layout.tp
    # q splits by heads; K and V by rows, which is by heads unless fewer KV heads than tp ranks
    # cut across one (`shards._attention`)
    width = math.ceil(a.n_heads / tp) * a.head_dim + 2 * math.ceil(a.n_kv_heads * a.head_dim / tp)
    return 2 * ACT_BYTES * (layout.mb * data.seq // layout.cp) * width


def _layer_micro(data: ModelData, i: int, layout: Layout, rates: Rates, kernel: AttentionKernel,
                 recompute: str, early_stop: bool, bias_grads: bool = False,
                 qkv_concat: bool = False, modules: frozenset[RecomputeModule] = frozenset()) -> _MicroBatch:
    layer: LayerPlan = data.plan.layers[i]
    h, tp, cp, mb = data.plan.d_model, layout.tp, layout.cp, layout.mb
    seq = data.seq
    tokens = mb * seq // cp
    times = [(t.split, *tensor_gemm(data, layer, t, layout, rates)) for t in data.layer_tensors[i]]
    gemm = sum(fwd for _, fwd, _ in times)
    gemm_bwd = sum(bwd for _, _, bwd in times)
    beside = (sum(fwd for split, fwd, _ in times if split == "row")
              + sum(bwd for split, _, bwd in times if split == "column"))
    # bytes per micro-batch, whatever its tokens (long-conv filter generation, fp8 casts)
    elem_extra = (float(fp8_cast_bytes(data, i, layout, rates.fp8_dispatch, rates.fused_grouped_mlp,
                                       rates.fp8_scaling, rates.cudnn_norm))
                  if rates.precision == "fp8" else 0.0)
    # attention core
    attn_fwd = attn_bwd = 0.0
    core_recompute = 0.0
    elem = 0.0  # bytes per token
    heads = dqk = dv = 0
    window = None
    match layer.mixer:
        case AttentionPlan():
            a = layer.mixer
            heads, dqk, dv, window = math.ceil(a.n_heads / tp), a.head_dim, a.head_dim, a.window
            elem += 2 * ACT_BYTES * (a.n_heads + a.n_kv_heads) * a.head_dim / tp if a.rotary_dim else 0
        case MLAPlan():
            m = layer.mixer
            heads, dqk, dv, window = math.ceil(m.n_heads / tp), m.qk_head_dim, m.v_head_dim, m.window
        case Mamba1Plan() | Mamba2Plan():
            # the scan and the convolution stream the mixer's tensors: as many bytes as it keeps
            # (the mixer's alone: the FFN's and the norms' elementwise passes are priced below)
            elem += 2 * data.mixer_kept[i] / seq / tp
        case S4Plan() | HyenaPlan() | StripedHyenaPlan():
            per_token, per_micro, filter_gemm = _long_conv(layer.mixer, h, layout, seq, rates)
            elem += per_token
            elem_extra += per_micro
            gemm += filter_gemm
            gemm_bwd += 2 * filter_gemm
        case _:
            assert_never(layer.mixer)
    if heads:
        match kernel:
            case "flash":
                # the kernel computes on padded heads (`flash_head_dim`): MPT-30B's 112 as 128
                qk, v = flash_head_dim(dqk, rates.flash), flash_head_dim(dv, rates.flash)
                flops = 2 * mb * attended_pairs(seq, window) / cp * heads * (qk + v)
                if rates.efficiency is not None:
                    # the user's rate replaces the attention's: the kernel's and fp8's speeds too
                    fwd_rate = bwd_rate = rates.efficiency * rates.peak
                else:
                    share, fwd_speed, bwd_speed = flash_rate_factors(rates.eff, rates.flash, dqk, window, seq,
                                                                     rates.fp8_attention)
                    fwd_rate = rates.eff.attention_fwd * share * fwd_speed
                    bwd_rate = rates.eff.attention_bwd * share * bwd_speed
                attn_fwd = flops / fwd_rate
                attn_bwd = 2.5 * flops / bwd_rate
            case "eager":
                q = seq // cp
                count = mb * heads
                core = gemm_time(q, seq, dqk, rates, count=count) + gemm_time(q, dv, seq, rates, count=count)
                softmax = count * q * seq * ACT_BYTES / rates.hbm
                attn_fwd = core + 2 * softmax
                attn_bwd = 2 * core + 3 * softmax
                core_recompute = attn_fwd
            case _:
                assert_never(kernel)
    # elementwise bytes per token, forward
    sub_blocks = 1 + (layer.ffn is not None)
    sequence = ACT_BYTES * h * (2 * len(layer.norms) + 3 * sub_blocks)
    elem += sequence / tp if layout.sequence_parallel else sequence

    def act_bytes(f: FFNPlan) -> float:
        return ACT_BYTES * f.d_ff * _activation_passes(f) / tp

    match layer.ffn:
        case FFNPlan():
            elem += act_bytes(layer.ffn)
        case MoEPlan():
            moe = layer.ffn
            elem_extra += routed_copy_bytes(data, moe, layout, rates.fused_grouped_mlp)
            if moe.shared is not None:
                elem += act_bytes(moe.shared)
        case None:
            pass
        case _:
            assert_never(layer.ffn)
    elem_fwd = (elem * tokens + elem_extra) / rates.hbm
    # eager autograd's own passes of the backward (`Settings.bias_grad_pass`, `qkv_concat_pass`)
    elem_bwd = ((bias_grad_bytes(data, i, layout) if bias_grads else 0)
                + (qkv_concat_bytes(data, i, layout) if qkv_concat else 0)) / rates.hbm
    micro = _MicroBatch(gemm, gemm_bwd, attn_fwd, attn_bwd, elem_fwd, gemm_beside_tp=beside, elem_bwd=elem_bwd)
    match recompute:
        case "full" if early_stop and recompute_skips_last_gemm(layer, data.plan.residual):
            # the re-run ends once the last tensor the backward saved is rebuilt, before the
            # layer's last GEMM (`cluster.recompute_skips_last_gemm`); the elementwise ops after it
            # (bias, residual add) are left in, a few bytes per token
            extra = micro.forward - next(fwd for split, fwd, _ in reversed(times) if split == "row" and fwd)
        case "full":
            extra = micro.forward
        case "selective":
            extra = core_recompute
        case _:
            extra = 0.0
    if recompute != "full" and "mla_up_proj" in modules and isinstance(layer.mixer, MLAPlan):
        # the up-projections' forward GEMMs once more (their RoPE, a few bytes per token, left out)
        extra += sum(fwd for t, (_, fwd, _) in zip(data.layer_tensors[i], times) if is_up_projection(t.name))
    return _MicroBatch(gemm, gemm_bwd, attn_fwd, attn_bwd, elem_fwd, extra, beside, elem_bwd)


# the weights of an MLA layer's up-projections, which "mla_up_proj" re-runs (`cluster.RecomputeModule`):
# q_b, or q_proj where the query has no latent (Megatron-Core's `linear_q_proj`, inside the
# checkpointed `qkv_up_proj_and_rope_apply` too), and kv_b; other mixers' q_proj is not one
UP_PROJECTIONS = (".mixer.q_b_proj.weight", ".mixer.q_proj.weight", ".mixer.kv_b_proj.weight")


def is_up_projection(name: str) -> bool:
    return name.endswith(UP_PROJECTIONS)


def flash_fraction(head_dim: int, window: int | None, seq: int, impl: FlashImpl) -> float:
    """The fraction of the family's long-sequence FlashAttention rate a causal layer of kernel head
    dim `head_dim` reaches on `seq` tokens (`hardware.flash_length_factor`): a query reaches at most
    the window's keys, and every key of the sequence under CP."""
    return flash_length_factor(min(seq, window) if window else seq, impl, head_dim)


def flash_rate_factors(eff: KernelEfficiency, impl: FlashImpl, head_dim: int, window: int | None, seq: int,
                       fp8_attention: str | None) -> tuple[float, float, float]:
    """(share, forward speed, backward speed) of the family's long-sequence head-dim-128
    FlashAttention-2 rates a layer of Q·K head dim `head_dim` runs at over `seq` tokens: the share
    is a head-dim-64 layer's (`attention_share`) times the length law (`flash_fraction`), both at
    the head the kernel computes (`flash_head_dim`: MPT-30B's 112 as 128); the speeds are `impl`'s
    at that head dim (`flash_speed`), times cuDNN's measured MXFP8 speed over its BF16 one under
    `fp8_attention` (`hardware.FP8_ATTENTION_RATES`), at this head dim and length."""
    qk = flash_head_dim(head_dim, impl)
    share = eff.attention_share(qk) * flash_fraction(qk, window, seq, impl)
    fwd, bwd = flash_speed(impl, qk)
    if fp8_attention is not None:
        faster_fwd, faster_bwd = fp8_attention_speed(fp8_attention, head_dim, min(seq, window) if window else seq)
        fwd, bwd = fwd * faster_fwd, bwd * faster_bwd
    return share, fwd, bwd


def flash_fractions(plan: ModelPlan, seq: int, impl: FlashImpl, eff: KernelEfficiency,
                    fp8_attention: str | None = None) -> tuple[tuple[float, float], ...]:
    """The distinct (forward, backward) fractions of the long-sequence head-dim-128 FlashAttention
    rates of `impl` (what `plan` quotes) that the model's attention layers run at, as `_layer_micro`
    prices them (`flash_rate_factors`); smallest forward first (none without attention)."""
    quoted_fwd, quoted_bwd = flash_speed(impl, 128)
    found = set()
    for layer in plan.layers:
        match layer.mixer:
            case AttentionPlan(head_dim=dqk, window=window) | MLAPlan(qk_head_dim=dqk, window=window):
                share, fwd, bwd = flash_rate_factors(eff, impl, dqk, window, seq, fp8_attention)
                found.add((share * fwd / quoted_fwd, share * bwd / quoted_bwd))
            case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
                pass
            case _:
                assert_never(layer.mixer)
    return tuple(sorted(found))


def _long_conv(mixer: S4Plan | HyenaPlan | StripedHyenaPlan, h: int, layout: Layout, seq: int,
               rates: Rates) -> tuple[float, float, float]:
    """A long-conv mixer's work besides its token GEMMs, on one rank: (HBM bytes per token, HBM
    bytes per micro-batch, GEMM seconds per micro-batch). A rank convolves d/tp channels (d/(tp·cp)
    under CP, over whole sequences: `cluster.long_conv_exchange`), so per token the FFT traffic is
    FFT_CONV_BYTES per channel whatever cp. Pointwise work (gates, skips, activations; 2 B per
    element read or written, the elementwise convention) per token and channel: S4 the D skip (3)
    and GELU (2) on its channels and the GLU (2h read, h written) on whole rows unless SP; Hyena
    the short conv (2 per channel of the (N_o+1)·D), per order the gate and the bias skip (6), the
    final gate (3); StripedHyena the FIR (2 per channel of the 3D), x1·v (3), the D skip and x2
    gate (6). Filter generation per micro-batch, fp32: S4D contracts its N-row basis per position
    (4·N bytes read per channel and position); S4 (DPLR) builds the basis by doubling, N×N GEMMs
    (`archplan.modules.s4`); StripedHyena writes and reads its 2S-row modal basis (8·2S); Hyena's
    filter MLP GEMMs are priced with the other GEMMs (per position), its decay window writes and
    reads the filter (8 per value)."""
    tp, sp = layout.tp, layout.sequence_parallel
    ranks = tp * layout.cp  # the channel shards of the filters
    match mixer:
        case S4Plan():
            pointwise = ACT_BYTES * (5 * h / tp + 3 * h / (tp if sp else 1))
            convs, filters = h / tp, h / ranks
            n = mixer.d_state
            basis = FP32_BYTES * n * seq * filters
            doubling = 0.0
            if mixer.dplr:
                count = math.ceil(filters)
                doubling = (gemm_time(n, seq, n, rates, count=count)
                            + gemm_time(n, n, n, rates, count=count * max(log2_ceil(seq) - 1, 0)))
            return pointwise + FFT_CONV_BYTES * convs, basis + FFT_FILTER_BYTES * seq * filters, doubling
        case HyenaPlan():
            o = mixer.order
            pointwise = ACT_BYTES * h * (2 * (o + 1) + 6 * (o - 1) + 3) / tp
            channels = (o - 1) * h
            window = 2 * FP32_BYTES * seq * channels / ranks if mixer.modulation else 0.0
            per_micro = FFT_FILTER_BYTES * seq * channels / ranks + window
            return pointwise + FFT_CONV_BYTES * channels / tp, per_micro, 0.0
        case StripedHyenaPlan():
            pointwise = ACT_BYTES * h * (2 * 3 + 3 + 6) / tp
            filters = h / mixer.filter_groups / ranks
            basis = 2 * FP32_BYTES * 2 * mixer.state_size * seq * filters
            return pointwise + FFT_CONV_BYTES * h / tp, basis + FFT_FILTER_BYTES * seq * filters, 0.0
        case _:
            assert_never(mixer)


def _head_micro(data: ModelData, layout: Layout, rates: Rates, loss: CrossEntropyImpl) -> _MicroBatch:
    """The LM head GEMM and the vocab-parallel cross-entropy of the last chunk, at the loss
    implementation's bytes (`CROSS_ENTROPY_BYTES`). The GEMM runs in bf16, or under an fp8 run
    that says so (`Settings.fp8_lm_head`, Megatron-Core's MXFP8 output projection, a Transformer
    Engine linear) at the fp8 rate, its input cast to MXFP8 in a pass of its own (`FP8_CAST_BYTES`
    and the block scales)."""
    tokens = layout.mb * data.seq // layout.cp
    vocab = math.ceil(data.plan.vocab_size / layout.tp)
    d = data.plan.d_model
    fp8 = rates.fp8_lm_head and rates.precision == "fp8"
    # the head runs once more per multi-token-prediction module, after that module's 2·d → d
    # projection (DeepSeek-V3 §2.2; Megatron-Core's `eh_proj`, a column-parallel Transformer Engine
    # linear: fp8 in an fp8 run, as the layers' linears)
    passes = 1 + data.mtp_depth
    gemm = passes * gemm_time(tokens, vocab, d, rates, fp8=fp8) \
        + data.mtp_depth * gemm_time(tokens, math.ceil(d / layout.tp), 2 * d, rates, fp8=True)
    elements = tokens * d
    cast = elements * FP8_CAST_BYTES + mxfp8_scale_bytes(elements) if fp8 else 0
    return _MicroBatch(gemm, 2 * gemm, 0.0, 0.0,
                       passes * (tokens * vocab * CROSS_ENTROPY_BYTES[loss] / 3 + cast) / rates.hbm)


class Pricer:
    """Per-layer micro-batch times for one layout configuration, summed per pipeline rank."""

    def __init__(self, data: ModelData, rates: Rates, early_stop: bool = False, bias_grads: bool = False,
                 qkv_concat: bool = False, loss: CrossEntropyImpl = "fp32-fused",
                 dispatcher: Dispatcher = "auto", modules: frozenset[RecomputeModule] = frozenset()) -> None:
        self.data = data
        self.rates = rates
        self.early_stop = early_stop  # full recompute stops early (`cluster.uses_early_stop`)
        self.bias_grads = bias_grads  # the backward sums bias gradients apart (`bias_grad_bytes`)
        self.qkv_concat = qkv_concat  # and concatenates fused q, k, v gradients (`qkv_concat_bytes`)
        self.loss = loss  # the cross-entropy's implementation (`CROSS_ENTROPY_BYTES`)
        self.moe = uniform_moe(data.plan)  # the routing that prices the EP all-to-all
        self.dispatcher = dispatcher  # and how it crosses nodes (`ep_all_to_all_time`)
        self.modules = modules  # the modules re-run beside the layout's recompute (`cluster.RecomputeModule`)
        self._twins = _first_twins(data)
        self._layers: dict[tuple[object, ...], list[_MicroBatch]] = {}
        self._stages: dict[tuple[object, ...], _MicroBatch] = {}
        self._fetch_ops: dict[tuple[object, ...], list[Op]] = {}
        self._sums: dict[tuple[object, ...], tuple[list[float], list[float]]] = {}
        self._slots: dict[tuple[object, ...], tuple[tuple[int, float, float], ...]] = {}
        self._gradients: dict[tuple[object, ...], tuple[float, int]] = {}

    @staticmethod
    def _key(layout: Layout, kernel: AttentionKernel) -> tuple[object, ...]:
        """What a layer's micro-batch time depends on (the head's too)."""
        return (layout.tp, layout.ep, layout.cp, layout.mb, layout.sequence_parallel, kernel,
                layout.recompute)

    def layers(self, layout: Layout, kernel: AttentionKernel) -> list[_MicroBatch]:
        key = self._key(layout, kernel)
        if key not in self._layers:
            first: dict[int, _MicroBatch] = {}
            for i in sorted(set(self._twins)):
                first[i] = _layer_micro(self.data, i, layout, self.rates, kernel, layout.recompute,
                                        self.early_stop, self.bias_grads, self.qkv_concat, self.modules)
            self._layers[key] = [first[twin] for twin in self._twins]
        return self._layers[key]

    def fetch_ops(self, layout: Layout, stage: int, kernel: AttentionKernel) -> list[Op]:
        """`_fetch_ops`, once per split and compute configuration."""
        key = (*self._key(layout, kernel), layout.pp, layout.vpp, stage)
        if key not in self._fetch_ops:
            self._fetch_ops[key] = _fetch_ops(self.data, self, layout, stage, kernel)
        return self._fetch_ops[key]

    def stage(self, layout: Layout, stage: int, kernel: AttentionKernel) -> _MicroBatch:
        # many layouts (dp, zero, the pipeline's micro-batches) share a rank's compute
        key = (*self._key(layout, kernel), layout.pp, layout.vpp, stage)
        if key not in self._stages:
            per_layer = self.layers(layout, kernel)
            total = _MicroBatch()
            for chunk in rank_chunks(self.data.n_main, layout, stage, self.data.mtp_depth):
                for micro in per_layer[chunk.layers.start:chunk.layers.stop]:
                    total = total + micro
                if chunk.last:
                    total = total + _head_micro(self.data, layout, self.rates, self.loss)
            self._stages[key] = total
        return self._stages[key]

    def _cumulative(self, layout: Layout, kernel: AttentionKernel, net: Network) -> tuple[list[float], list[float]]:
        """Running sums over the layers of one micro-batch's compute seconds and MoE all-to-all
        seconds (each layer's records as `step_collectives` lists them; their time is linear in
        the calls), for the floor: a rank's share is a difference of two sums per model chunk.
        They add in another order than `stage`, so they may differ from it in the last bits,
        far inside the search's margin (`parallel.Evaluator.fastest`)."""
        key = (*self._key(layout, kernel), net)
        if key not in self._sums:
            data = self.data
            ep = [sum(ep_all_to_all_time(record, layout, net, self.rates.eff, self.moe, self.rates.sends_fp8,
                                         self.dispatcher)
                      for record in ep_records(data.plan, data.chunk_layers(range(i, i + 1)), layout, data.seq, 1,
                                               False, ""))
                  for i in range(len(data.plan.layers))]
            self._sums[key] = (list(accumulate((m.total for m in self.layers(layout, kernel)), initial=0.0)),
                               list(accumulate(ep, initial=0.0)))
        return self._sums[key]

    def floor_slots(self, layout: Layout, kernel: AttentionKernel, net: Network,
                    overlap: frozenset[str]) -> tuple[tuple[int, float, float], ...]:
        """Per representative rank, (stage, compute, compute + exposed MoE all-to-all) per
        micro-batch (`step_time_floor`), once per split and compute configuration."""
        key = (*self._key(layout, kernel), layout.pp, layout.vpp, net, overlap)
        if key not in self._slots:
            compute, a2a = self._cumulative(layout, kernel, net)
            head = _head_micro(self.data, layout, self.rates, self.loss).total
            slots = []
            for stage in self.data.representative_stages(layout.pp, layout.vpp):
                chunks = rank_chunks(self.data.n_main, layout, stage, self.data.mtp_depth)
                total = sum(compute[c.layers.stop] - compute[c.layers.start] + (head if c.last else 0.0)
                            for c in chunks)
                ep = sum(a2a[c.layers.stop] - a2a[c.layers.start] for c in chunks)
                slots.append((stage, total, total + ep_exposed(ep, total, overlap)))
            self._slots[key] = tuple(slots)
        return self._slots[key]

    def gradient_call(self, layout: Layout, stage: int, grad_reduce: int, net: Network) -> tuple[float, int]:
        """(seconds, layers): one call of rank `stage`'s layers' gradient reduction, all-reduced
        at ZeRO 0 and reduce-scattered above, dense over the data-parallel ranks and experts over
        their own, at the unpadded sizes, one call for all the rank's chunks and without the ends'
        tensors; and the rank's layers. A floor under the `grads` that `price` counts
        (`cluster._dp_records`: the same collectives per chunk, over the padded shards, the ends'
        too), once per split."""
        key = (layout.tp, layout.ep, layout.cp, layout.dp, layout.pp, layout.vpp, layout.zero, stage,
               grad_reduce, net)
        if key not in self._gradients:
            numel_d, numel_e = self.data.numel(layout.tp, layout.ep)
            layers = [i for c in rank_chunks(self.data.n_main, layout, stage, self.data.mtp_depth) for i in c.layers]
            kind = "all_reduce" if layout.zero == 0 else "reduce_scatter"
            groups = (("dp_cp" if layout.cp > 1 else "dp", layout.dp * layout.cp, sum(numel_d[i] for i in layers)),
                      ("expert_dp", layout.expert_dp, sum(numel_e[i] for i in layers)))
            seconds = sum(collective_time(Collective(kind, mesh, size, n * grad_reduce, 1, "gradients (floor)"),  # type: ignore[arg-type]
                                          layout, net, self.rates.eff)
                          for mesh, size, n in groups if n and size > 1)
            self._gradients[key] = (seconds, max(1, len(layers)))
        return self._gradients[key]


def _first_twins(data: ModelData) -> list[int]:
    """Per layer, the first layer `_layer_micro` cannot tell it from: the same mixer, FFN, norms,
    tensors (their names but for the layer's path) and kept activations. Llama 3.1 405B's 126
    layers are one, so a layout's per-layer times are computed once, not 126 times."""
    first: dict[tuple[object, ...], int] = {}
    twins = []
    for i, layer in enumerate(data.plan.layers):
        tensors = tuple(replace(t, name=t.name.removeprefix(layer.path)) for t in data.layer_tensors[i])
        key = (layer.mixer, layer.ffn, layer.norms, tensors, data.acts[i].kept["none"])
        twins.append(first.setdefault(key, i))
    return twins


def _group_shape(mesh: MeshDim, layout: Layout) -> tuple[int, int, int]:
    """One group of this mesh dimension as (stride, size, block): `size` ranks `stride` apart,
    one group starting at each of the first `stride` ranks of every `block` consecutive ranks.
    Ranks are ordered tp, cp, dp, pp; an EP group is ep consecutive ranks of a stage, the experts'
    replicas (`layout.Layout.expert_dp`) the ranks at one place of each, ep apart."""
    match mesh:  # a match, not a dict of every shape: called once per record of every layout
        case "tp":
            return 1, layout.tp, layout.tp
        case "cp":
            return layout.tp, layout.cp, layout.tp * layout.cp
        case "ep":
            return 1, layout.ep, layout.ep
        case "dp":
            return layout.tp * layout.cp, layout.dp, layout.stage_ranks
        case "dp_cp":
            return layout.tp, layout.dp * layout.cp, layout.stage_ranks
        case "expert_dp":
            return layout.ep, layout.expert_dp, layout.stage_ranks
        case "pp":
            return layout.stage_ranks, layout.pp, layout.world
        case _:
            assert_never(mesh)


def _aligned(block: int, world: int, gpus_per_node: int) -> bool:
    """Whether every node holds whole blocks or every block whole nodes: the groups of each block
    then meet the nodes alike, and a node is no group's edge."""
    return world % gpus_per_node == 0 and (block % gpus_per_node == 0 or gpus_per_node % block == 0) \
        or world <= gpus_per_node


@functools.lru_cache(maxsize=4096)
def _node_counts(stride: int, size: int, block: int, world: int, gpus_per_node: int) -> tuple[int, int]:
    """Over every group of this shape: the most nodes one touches, and the fewest of its members
    one of those nodes holds. Groups meet nodes alike when their first rank's place in its node
    is the same, except where the last node is partial (`world` not a multiple of the node)."""
    full = world // gpus_per_node * gpus_per_node
    seen: set[int] = set()
    most, fewest = 1, size
    for first in (b + r for b in range(0, world, block) for r in range(stride)):
        last = first + (size - 1) * stride
        key = first % gpus_per_node if last < full else first + world
        if key in seen:
            continue
        seen.add(key)
        counts: dict[int, int] = {}
        for rank in range(first, last + 1, stride):
            counts[rank // gpus_per_node] = counts.get(rank // gpus_per_node, 0) + 1
        most, fewest = max(most, len(counts)), min(fewest, min(counts.values()))
    return most, fewest


def spans_nodes(mesh: MeshDim, layout: Layout, gpus_per_node: int) -> bool:
    """Whether a group of this mesh dimension leaves its node: some group of it, where groups
    do not tile the nodes alike (EP16 on GB200's 72-GPU domains: the group of ranks 64-79 is 8 in
    each rack)."""
    stride, size, block = _group_shape(mesh, layout)
    if size <= 1:
        return False
    if _aligned(block, layout.world, gpus_per_node):
        return (size - 1) * stride + 1 > gpus_per_node
    return _node_counts(stride, size, block, layout.world, gpus_per_node)[0] > 1


def nodes_touched(mesh: MeshDim, layout: Layout, gpus_per_node: int) -> int:
    """The most nodes one group of this mesh dimension reaches (`spans_nodes`)."""
    stride, size, block = _group_shape(mesh, layout)
    if _aligned(block, layout.world, gpus_per_node):
        return max(1, math.ceil(((size - 1) * stride + 1) / gpus_per_node))
    return _node_counts(stride, size, block, layout.world, gpus_per_node)[0]


def members_per_node(mesh: MeshDim, layout: Layout, gpus_per_node: int) -> int:
    """How many ranks of one group of this mesh dimension share a node, for the groups whose rings
    can spread over several NICs (data and context parallelism; 1 for the others): where groups
    meet the nodes unalike (a partial node, blocks that straddle nodes), the fewest any group has
    on a node it reaches, as that node's NICs carry its whole share of the ring."""
    if mesh in ("tp", "ep", "pp"):
        return 1
    stride, size, block = _group_shape(mesh, layout)
    if _aligned(block, layout.world, gpus_per_node):
        return min(size, max(1, gpus_per_node // stride))
    return _node_counts(stride, size, block, layout.world, gpus_per_node)[1]


# NCCL's ring collectives, which it can split over one ring per NIC; an all-to-all cannot spread
# over several NICs (nccl-tests issue 267), nor can a point-to-point send
RING_KINDS = frozenset({"all_reduce", "all_gather", "reduce_scatter"})
POINT_TO_POINT = frozenset({"send", "recv"})


def collective_time(c: Collective, layout: Layout, net: Network, eff: KernelEfficiency) -> float:
    """Seconds for all `count` calls of one record. Across nodes a ring moves a rank's bytes over
    one NIC, or under `ring_nics == "members"` over as many as its group has members on a node
    (NCCL's rings, one per NIC), up to what NVLink carries inside the node."""
    if c.group_size <= 1:
        return 0.0
    node = net.node(layout.world)
    # a send or receive has one peer; a collective the group's members on the node
    peers = 2 if c.kind in POINT_TO_POINT else c.group_size
    if not spans_nodes(c.mesh_dim, layout, node):
        bandwidth = net.intra(peers) * eff.intra_link
    elif net.ring_nics == "members" and c.kind in RING_KINDS:
        nics = members_per_node(c.mesh_dim, layout, node)
        bandwidth = min(net.inter_node * eff.inter_link * nics, net.intra(nics) * eff.intra_link)
    else:
        bandwidth = net.inter_node * eff.inter_link
    return c.count * (c.wire_bytes / bandwidth + eff.latency)


def uniform_moe(plan: ModelPlan) -> MoEPlan | None:
    """The routing every MoE layer shares (None: no MoE layer, or layers that route differently)."""
    found = {layer.ffn for layer in plan.layers if isinstance(layer.ffn, MoEPlan)}
    return found.pop() if len(found) == 1 else None


def nodes_per_token(moe: MoEPlan, nodes: int) -> int | None:
    """At most how many nodes one token's routed copies reach under node-limited routing
    (DeepSeek-AI 2024, DeepSeek-V3 §2.1.2: each token to at most M = topk_group nodes, the expert
    groups laid out one or more whole groups per node), or None when the router does not bound it
    (no group limit, or groups that straddle nodes)."""
    if moe.n_group is None or moe.topk_group is None:
        return None
    if moe.n_group % nodes == 0:  # whole groups on each node: M groups reach ≤ M nodes
        return min(moe.topk_group, nodes, moe.top_k)
    if nodes % moe.n_group == 0:  # each group spans nodes/n_group whole nodes
        return min(moe.topk_group * nodes // moe.n_group, nodes, moe.top_k)
    return None


def nodes_reached(moe: MoEPlan, nodes: int) -> float:
    """How many of `nodes` nodes one token's k routed copies reach on average when the router picks
    alike among what it may pick (even routing). A group-limited router with whole groups on each
    node (DeepSeek-V3 §2.1.2: the best topk_group of n_group groups) misses a node with probability
    C(n_group − n_group/nodes, topk_group) / C(n_group, topk_group): DeepSeek-V3 over 8 nodes 4, its
    bound, over 4 nodes 3.14 of a bound of 4. A group that spans nodes gives the bound
    (`nodes_per_token`). Without a group limit a node holding E/nodes experts is missed with
    probability C(E − E/nodes, k) / C(E, k): Qwen3-30B-A3B over two nodes 1.99 (128 experts, top 8).
    k copies reach k nodes at most, which bounds a router picking more groups than copies
    (topk_group > k, which no published router does)."""
    if moe.n_group is not None and moe.topk_group is not None and moe.n_group % nodes == 0:
        units, picked = moe.n_group, moe.topk_group  # the groups, whole on each node
    elif (bound := nodes_per_token(moe, nodes)) is not None:
        return bound
    else:
        units, picked = moe.n_experts, moe.top_k
    return min(moe.top_k, nodes * (1 - math.comb(units - units // nodes, picked) / math.comb(units, picked)))


def ep_all_to_all_time(c: Collective, layout: Layout, net: Network, eff: KernelEfficiency,
                       moe: MoEPlan | None, fp8_dispatch: bool, dispatcher: Dispatcher = "auto") -> float:
    """Seconds for all calls of one MoE dispatch + combine record (half its calls each way).

    FP8 dispatch (DeepSeek-V3 §3.3.3, "Low-Precision Communication"; `Rates.sends_fp8`): the
    activations sent to the experts (the forward dispatch and the backward's gradient before the
    down-projections) travel in FP8 with one fp32 scale per 1×128 tile, as the expert GEMMs
    quantize them anyway; the combines stay bf16. Otherwise every call moves bf16.

    Node-limited routing (DeepSeek-V3 §2.1.2; its all-to-all kernels, §3.2.2): when the router
    bounds the nodes a token reaches (`nodes_per_token`) and the group spans nodes, a token
    crosses IB once per remote target node, to the GPU of the same in-node index, which forwards
    it over NVLink to the GPUs holding its experts; the IB and NVLink legs overlap (§3.2.2). Per
    token and direction, IB carries M·(nodes − 1)/nodes copies, M the nodes it reaches on average
    (`nodes_reached`; the token's own node is one of the `nodes` equally likely), NVLink the k
    copies that land on another GPU of their node, (g − 1)/g of them with g EP ranks per node. Without such a bound every copy is priced as a
    ring all-to-all over the slower link (`collective_time`): NCCL's all-to-all.

    The dispatcher (`cluster.Dispatcher`) says which: "auto" bounds a token's nodes where the router
    does and prices NCCL's ring otherwise; "nccl" always the ring; "hierarchical" (DeepEP's internode
    kernels, HybridEP) sends each token once to every remote node its experts live on, whatever
    the router."""
    if c.group_size <= 1:
        return 0.0
    to_experts = FP8_BYTES + FP32_BYTES / FP8_SCALE_TILE if fp8_dispatch else ACT_BYTES
    scale = (to_experts + ACT_BYTES) / (2 * ACT_BYTES)
    nodes = nodes_touched("ep", layout, net.node(layout.world))
    reach: float | None = None
    if moe is not None and nodes > 1:
        match dispatcher:
            case "auto":
                reach = nodes_reached(moe, nodes) if nodes_per_token(moe, nodes) is not None else None
            case "nccl":
                pass
            case "hierarchical":
                reach = nodes_reached(moe, nodes)
            case _:
                assert_never(dispatcher)
    if moe is None or reach is None:
        return scale * (collective_time(c, layout, net, eff) - c.count * eff.latency) + c.count * eff.latency
    per_rank_node = layout.ep / nodes
    ib = c.bytes / moe.top_k * reach * (nodes - 1) / nodes
    nvlink = c.bytes * (per_rank_node - 1) / per_rank_node
    seconds = max(ib / (net.inter_node * eff.inter_link), nvlink / (net.intra(round(per_rank_node)) * eff.intra_link))
    return c.count * (scale * seconds + eff.latency)


# The share of the MoE all-to-all that Megatron-Core's EP overlap (`overlap_moe_expert_parallel_comm`)
# hides. It runs one micro-batch's dispatch and combine beside another's attention and expert GEMMs,
# as far as its merged 1F1B schedule lets the two run together. Megatron-Bridge's Nsight trace of
# Qwen3-30B-A3B on 16 H100 (EP16 over both nodes, the HybridEP dispatcher; its skill
# `nemo-mbridge-perf-expert-parallel-overlap`, 2026-07-25) measured 36.55% of the communication
# time concurrent with GEMM and attention with the overlap on (3,959 ms), 0.11% with it off, though
# that run's compute outlasted its communication: the schedule, not the compute, bounds the share.
EP_OVERLAP_SHARE = 0.3655


def ep_exposed(seconds: float, compute: float, overlap: frozenset[str]) -> float:
    """The MoE all-to-all seconds left in the critical path (`price`, and the search's floor):
    all of them without an EP overlap; under "ep" (Megatron-Core's EP overlap) all but
    `EP_OVERLAP_SHARE` of them, at most the same micro-batches' compute; under "dualpipe"
    (DeepSeek's DualPipe, which pairs a forward and a backward chunk so that each one's all-to-all
    runs beside the other's compute, the all-to-all fully hidden by its report's account, DeepSeek-V3
    §3.2.1) what that compute does not hide."""
    if "dualpipe" in overlap:
        return max(0.0, seconds - compute)
    if "ep" in overlap:
        return seconds - min(EP_OVERLAP_SHARE * seconds, compute)
    return seconds


def ring_cp_exposed(seconds: float, attention: float) -> float:
    """The ring context parallelism's K/V exchange left in the critical path: what the attention
    beside it does not hide. Both ring implementations send the next K/V block before computing
    over the current one: Transformer Engine's `AttnFuncWithCP` ("Split attention compute into
    multiple steps, and overlap current-step compute with next-step communication", 1.8) and
    torch's `_templated_ring_attention` (`rotater.exchange_buffers` before the step's attention)."""
    return max(0.0, seconds - attention)


def tp_overlap_cost(micro: _MicroBatch, layout: Layout, rates: Rates) -> float:
    """Seconds one micro-batch's GEMMs lose to overlapped TP communication (`--overlap tp`).
    Transformer Engine's userbuffers overlap (`initialize_ub`'s defaults) drives the forward
    reduce-scatters of the row-parallel projections ("pipeline") and the backward's all-gathers and
    reduce-scatters beside the column-parallel projections' dgrad and wgrad ("bulk") with
    communication kernels of `UB_COMM_SMS` SMs, and runs those GEMMs beside them on the rest
    (`set_sm_margin`). Its ring-exchange overlaps (the column-parallel forwards, the row-parallel
    dgrads) move data with the copy engines and take no SMs."""
    if layout.tp <= 1 or rates.sms <= UB_COMM_SMS:
        return 0.0
    return micro.gemm_beside_tp * UB_COMM_SMS / (rates.sms - UB_COMM_SMS)


def pp_exposed(p2p: float, micro: _MicroBatch, layout: Layout, m: int, stage: int) -> float:
    """Seconds of a pipeline rank's sends and receives (`p2p`, all m micro-batches) left exposed
    under `--overlap pp`: Megatron-LM's interleaved schedule runs each chunk's transfers beside the
    next chunk's compute in the steady state (`overlap_p2p_comm`, on unless
    `--no-overlap-p2p-communication`), but blocks on those of the warm-up and the flush
    (`--overlap-p2p-communication-warmup-flush` is off): the rank's warm-up forwards
    (`cluster.in_flight`, less the first steady one) of its m·v, and as many backwards. `p2p` is
    the exchange as `pp_exchange` prices it, a paired send and receive taking a send's time."""
    share = min(1.0, (sum(in_flight(layout, m, stage)) - 1) / (m * layout.vpp))
    return share * p2p + max(0.0, (1 - share) * (p2p - m * micro.total))


def pp_exchange(sends: float, recvs: float, layout: Layout, m: int, stage: int) -> float:
    """Seconds a pipeline rank's sends and receives (all m micro-batches) take: Megatron-LM batches
    a send with a receive into one isend/irecv wherever its schedule can
    (`p2p_communication._communicate`), both directions of the link at once, so those receives
    take no time of their own; the receives it issues alone are priced in full
    (`lone_receive_share`)."""
    return sends + lone_receive_share(layout, m, stage) * recvs


def lone_receive_share(layout: Layout, m: int, stage: int) -> float:
    """The share of a pipeline rank's receives that Megatron-LM issues without a send beside them
    (its receives taken as alike in size: the activations a boundary passes each way).
    1F1B (`forward_backward_pipelining_without_interleaving`): the w = min(p − r − 1, m) warm-up
    forwards' `recv_forward`, the one before the steady state's first forward (stages after the
    first; none when every micro-batch is in the warm-up) and the cool-down's w `recv_backward`
    (stages before the last) come alone; the steady state pairs the rest
    (`send_forward_recv_backward`, `send_backward_recv_forward`). Interleaved
    (`forward_backward_pipelining_with_interleaving`): the first `recv_forward`, before the warm-up,
    comes alone; the warm-up pairs with `send_forward_recv_forward`, the steady state with
    `send_forward_backward_recv_forward_backward` (or, overlapped, `send_forward_recv_forward` and
    `send_backward_recv_backward`), the cool-down with `send_backward_recv_backward`. A
    simplification: overlapped, the end ranks receive m alone (a chunk-0 backward or last-chunk
    forward sends nothing beside its receive), which moves no published row by more than 0.35
    points (docs/validation.md, "The pipeline's paired sends and receives")."""
    p, v = layout.pp, layout.vpp
    if v > 1:
        return (1 if stage else 0) / (2 * m * v)
    warmup = min(p - stage - 1, m)
    forwards = min(warmup + 1, m) if stage else 0
    backwards = warmup if stage < p - 1 else 0
    received = (m if stage else 0) + (m if stage < p - 1 else 0)
    return (forwards + backwards) / received if received else 0.0


def fsdp2_copy_bytes(records: Iterable[Collective], states: StatesConvention, grad_reduce: int,
                     layout: Layout, microbatches: int) -> int:
    """HBM bytes torch FSDP2 moves around one step's data-parallel collectives, on the compute
    stream (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py): `foreach_all_gather_copy_out`
    waits for each all-gather and copies its output into every parameter's unsharded tensor
    (`split_with_sizes_copy`: the gathered bytes read and written), and `foreach_reduce` copies the
    unsharded gradients into the reduce-scatter input in the reduce dtype (`chunk_cat`: the
    gradients read as they are, the padded input written at `grad_reduce` bytes per element) before
    handing it to the reduce-scatter stream; its replicate mode (ZeRO-0) copies them in the same way
    before the all-reduce. The gradient read is bf16, or the reduce dtype where FSDP2 accumulated
    the unsharded gradients over the micro-batches (`cluster._fsdp_accumulates`). The division is
    NCCL's (ReduceOp.AVG), no pass of its own; the shard-sized copies (the all-gather input, the
    reduce-scatter output) are left out, and so is a gather FSDP2 drops unread. `verify --layout`
    counts the same bytes on torch's FSDP2 (`distributed.comms`), exactly. Nothing for the other
    states: their collectives work on the buffers in place."""
    if states.engine != "torch":
        return 0
    read = grad_reduce if _fsdp_accumulates(layout, microbatches) else ACT_BYTES
    moved = 0
    for r in records:
        if r.mesh_dim in DATA_PARALLEL_DIMS and r.group_size > 1:
            if r.kind == "all_gather" and not r.discarded:
                moved += r.count * 2 * r.bytes
            elif r.kind in ("reduce_scatter", "all_reduce"):
                moved += r.count * (r.unpadded * read + r.bytes)
    return moved


def fsdp2_accumulation_bytes(numel: int, grad_reduce: int, microbatches: int) -> int:
    """HBM bytes torch FSDP2 moves accumulating `numel` unsharded gradient elements over a step's
    micro-batches (zero 0/1: `set_requires_gradient_sync` off on all backwards but the last;
    `cluster.fsdp2_accumulated_numel`), elementwise on the compute stream in its post-backward
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py). Reducing in fp32, after the first
    backward `to_accumulated_grad_if_needed` casts the bf16 gradient to fp32 (2 B read, 4 B
    written), and after each later one `accumulate_unsharded_grad_if_needed` adds it in (4 + 2 B
    read, 4 B written). Reducing in the compute dtype, FSDP2 clamps its reduce dtype to None and
    autograd's AccumulateGrad adds each later bf16 gradient into `.grad` (2 + 2 B read, 2 B
    written). Megatron-LM fuses the accumulation into the weight-gradient GEMM
    (`--gradient-accumulation-fusion`): nothing apart. `verify --layout` counts the fp32 case on
    torch's FSDP2, exactly; `tests/test_distributed.py` the bf16 one."""
    later = microbatches - 1
    if grad_reduce == ACT_BYTES:
        return numel * 3 * ACT_BYTES * later
    return numel * (ACT_BYTES + grad_reduce + (2 * grad_reduce + ACT_BYTES) * later)


def price(data: ModelData, pricer: Pricer, layout: Layout, microbatches: int, net: Network,
          states: StatesConvention, kernel: AttentionKernel, grad_reduce: int, cp_comm: CPComm,
          overlap: frozenset[str], memory: Mapping[int, RankMemory]) -> tuple[StepTime, int]:
    """The step time and the pipeline rank that sets it. `memory`: each representative rank's
    (`cluster.rank_memory`), which the caller has already: the optimizer step's time needs the
    time-setting rank's."""
    m, p, v = microbatches, layout.pp, layout.vpp
    rates = pricer.rates
    best: tuple[float, int, _MicroBatch, dict[str, float], float, float, float] | None = None
    stages = data.representative_stages(p, v)
    for stage in stages:
        micro = pricer.stage(layout, stage, kernel)
        records = _collectives(data, layout, stage, m, states, grad_reduce, cp_comm, overlap,
                               pricer.early_stop, per_layer=False)
        comm: dict[str, float] = {"tp": 0.0, "cp": 0.0, "ep": 0.0, "pp": 0.0}
        grads = gathers = ring = pp_sends = pp_recvs = 0.0
        for record in records:
            if record.mesh_dim == "cp" and record.kind == "recv":
                # ring CP: a step's receive runs with its send (one batched isend/irecv), so the
                # sends alone take the link's time (`ring_cp_exposed`)
                continue
            t = (ep_all_to_all_time(record, layout, net, rates.eff, pricer.moe, rates.sends_fp8,
                                    pricer.dispatcher)
                 if record.mesh_dim == "ep" else collective_time(record, layout, net, rates.eff))
            match record.mesh_dim:
                case "cp" if record.kind == "send":
                    ring += t
                case "tp" | "cp" | "ep":
                    comm[record.mesh_dim] += t
                case "pp" if record.kind == "send":
                    pp_sends += t
                case "pp" if record.kind == "recv":
                    pp_recvs += t
                case "pp":
                    comm["pp"] += t
                case "dp" | "dp_cp" | "expert_dp":
                    if record.kind == "all_gather":
                        gathers += t
                    else:
                        grads += t
        # exposed per micro-batch
        if "tp" in overlap:
            comm["tp"] = (max(0.0, comm["tp"] - m * (micro.gemm_fwd + micro.gemm_bwd))
                          + m * tp_overlap_cost(micro, layout, rates))
        comm["ep"] = ep_exposed(comm["ep"], m * micro.total, overlap)
        comm["cp"] += ring_cp_exposed(ring, m * (micro.attn_fwd + micro.attn_bwd))
        comm["pp"] += pp_exchange(pp_sends, pp_recvs, layout, m, stage)
        if "pp" in overlap and v > 1:
            comm["pp"] = pp_exposed(comm["pp"], micro, layout, m, stage)
        copies = (fsdp2_copy_bytes(records, states, grad_reduce, layout, m) + fsdp2_accumulation_bytes(
            fsdp2_accumulated_numel(data, layout, stage, m, states), grad_reduce, m)) / rates.hbm
        per_slot = micro.total + (sum(comm.values()) + copies) / m
        if best is None or per_slot > best[0]:
            best = (per_slot, stage, micro, comm, grads, gathers, copies)
    assert best is not None
    per_slot, stage, micro, comm, grads, gathers, copies = best
    if layout.zero == 3 and states.module_fetch:
        dp = m * _module_fetch_exposed(data, pricer, layout, stage, kernel, net, grad_reduce)
    else:
        n_layers = max(1, sum(len(c.layers) for c in rank_chunks(data.n_main, layout, stage, data.mtp_depth)))
        dp = _dp_exposed(layout.zero, m, grads, gathers, micro, n_layers, "dp" in overlap)
    optimizer = memory[stage].optimizer / states.optimizer_bytes * states.step_bytes / rates.hbm
    time = StepTime(
        gemm=m * (micro.gemm_fwd + micro.gemm_bwd),
        attention=m * (micro.attn_fwd + micro.attn_bwd),
        elementwise=m * (3 * micro.elem_fwd + micro.elem_bwd) + copies,
        tp=comm["tp"], cp=comm["cp"], ep=comm["ep"], pp_p2p=comm["pp"],
        bubble=bubble_slots(m, p, v) * per_slot, dp=dp, optimizer=optimizer, recompute=m * micro.recompute,
    )
    return time, stage


def step_time_floor(pricer: Pricer, layout: Layout, microbatches: int, kernel: AttentionKernel,
                    net: Network, overlap: frozenset[str], states: StatesConvention, grad_reduce: int) -> float:
    """A floor under `price`'s step time, for the search to skip layouts that cannot rank: `price`
    charges (m + bubble slots) · the slowest rank's slot, a slot being a micro-batch's compute plus
    its exposed communication (no part of which is negative), and adds exposed data-parallel
    traffic and the optimizer step (neither negative). The floor's slot is the compute and the
    exposed MoE all-to-all alone, priced as `price` prices them (the all-to-all is most of what
    sets a fine-grained MoE layout apart); both scale with m, so the slot does not depend on it.
    To it the floor adds the least, over the representative ranks, of the data-parallel seconds
    `_dp_exposed` leaves exposed of the rank's layers' gradient reduction alone
    (`Pricer.gradient_call`), with the rank's whole micro-batch compute as the backward it hides
    behind: at short sequences that reduction outlasts the compute and is most of the step (two
    thirds on Qwen3-235B at 256 tokens over 16,384 GPUs). DeepSpeed's module fetches at ZeRO-3
    are priced otherwise (`_module_fetch_exposed`), and get no such term."""
    m = microbatches
    slots = pricer.floor_slots(layout, kernel, net, overlap)
    floor = (m + bubble_slots(m, layout.pp, layout.vpp)) * max(slot for _, _, slot in slots)
    if layout.zero == 3 and states.module_fetch:
        return floor
    calls = m if layout.zero >= 2 else 1
    exposed = []
    for stage, compute, _ in slots:
        call, layers = pricer.gradient_call(layout, stage, grad_reduce, net)
        window = _MicroBatch(gemm_bwd=compute)  # no backward outlasts the whole micro-batch
        exposed.append(_dp_exposed(layout.zero, m, calls * call, 0.0, window, layers, "dp" in overlap))
    return floor + min(exposed)


def _module_fetch_exposed(data: ModelData, pricer: Pricer, layout: Layout, stage: int,
                          kernel: AttentionKernel, net: Network, grad_reduce: int) -> float:
    """Seconds one micro-batch spends beyond its compute under ZeRO-3 fetched module by module
    (`zero3_fetch`): DeepSpeed's blocking fetches replayed over the rank's trace. The `dp` overlap
    setting does not apply: the fetch rules decide what hides."""
    ops = pricer.fetch_ops(layout, stage, kernel)
    eff = pricer.rates.eff
    dense = ("dp_cp" if layout.cp > 1 else "dp", layout.dp * layout.cp)
    experts = ("expert_dp", layout.expert_dp)

    def moved(kind: str, m: Module, elements: int, width: int) -> float:
        mesh, size = experts if m.expert else dense
        wire = math.ceil(elements / size) * size * width
        return collective_time(Collective(kind, mesh, size, wire, 1, m.name), layout, net, eff)  # type: ignore[arg-type]

    seconds = step_seconds(ops, lambda m: moved("all_gather", m, m.gathered, ACT_BYTES),
                           lambda m: moved("reduce_scatter", m, m.elements, grad_reduce))
    return max(0.0, seconds - sum(op.compute for op in ops))


def _fetch_ops(data: ModelData, pricer: Pricer, layout: Layout, stage: int,
               kernel: AttentionKernel) -> list[Op]:
    """`cluster.fetch_trace` with each use's compute: a module's GEMMs (`tensor_gemm`, forward and
    backward), and the rest of its layer's work (attention core, elementwise, convolutions;
    the recompute's extra under selective recompute) on the use before the mixer's output
    projection, while that projection's parameters are being gathered. Their sum is the rank's
    compute for one micro-batch."""
    per_layer = pricer.layers(layout, kernel)
    head = _head_micro(data, layout, pricer.rates, pricer.loss)
    trace = fetch_trace(data, layout, stage)[0]

    def gemms(tensors: tuple[Tensor, ...], layer: int) -> tuple[float, float]:
        """The module's GEMM seconds, forward and backward."""
        plan_layer = data.plan.layers[layer]
        times = [tensor_gemm(data, plan_layer, t, layout, pricer.rates) for t in tensors]
        return sum(fwd for fwd, _ in times), sum(bwd for _, bwd in times)

    forward: dict[int, list[FetchUse]] = {}
    for use in trace:
        if isinstance(use.layer, int) and use.kind == "forward":
            forward.setdefault(use.layer, []).append(use)
    # per layer: which use carries the non-GEMM work, and how much there is in each pass
    rest: dict[int, tuple[str, float, float]] = {}
    for i, uses in forward.items():
        mixer = [k for k, use in enumerate(uses) if ".mixer." in use.module.name + "."]
        carrier = uses[max(mixer[-1] - 1, 0) if mixer else 0].module.name
        micro = per_layer[i]
        module_gemms = [gemms(use.tensors, i) for use in uses]
        redo = micro.recompute if layout.recompute == "full" else 0.0
        rest[i] = (carrier, micro.forward - sum(fwd for fwd, _ in module_gemms),
                   micro.backward - redo - sum(bwd for _, bwd in module_gemms))
    # autograd sums a parameter's gradients over its uses: one reduction, after its last backward
    last_backward = {use.module.name: k for k, use in enumerate(trace) if use.kind == "backward"}
    ops: list[Op] = []
    head_carried: set[UseKind] = set()  # the head's work rides on its first use of each pass
    for k, use in enumerate(trace):
        reduces = last_backward.get(use.module.name) == k
        if not isinstance(use.layer, int):  # the embedding lookup is not priced; the head is
            compute = 0.0
            if use.layer == "head" and use.kind not in head_carried:
                head_carried.add(use.kind)
                compute = head.forward if use.kind == "forward" else head.backward
            ops.append(Op(use.module, compute, reduces))
            continue
        i = use.layer
        carrier, forward_rest, backward_rest = rest[i]
        own, own_backward = gemms(use.tensors, i)
        extra = use.module.name == carrier
        match use.kind:
            case "forward":
                compute = own + (forward_rest if extra else 0.0)
            case "recompute":
                micro = per_layer[i]
                scale = micro.recompute / micro.forward if micro.forward else 0.0
                compute = scale * (own + (forward_rest if extra else 0.0))
            case "backward":
                compute = own_backward + (backward_rest if extra else 0.0)
            case _:
                assert_never(use.kind)
        ops.append(Op(use.module, compute, reduces))
    return ops


def bubble_slots(m: int, p: int, v: int) -> float:
    """Idle micro-batch slots of a pipeline step beyond the m a rank works: (p − 1)/v with at least
    p micro-batches (Narayanan et al. 2021 §2.2). With fewer, a micro-batch's forward through all
    p·v chunks (each 1/v of a slot) is the critical path and no rank is ever busy when the next
    chunk arrives: the forwards end after p·v + m − 1 chunk times, the backwards likewise, so the
    step is p + (m − 1)/v slots (at v = 1 the usual m + p − 1; at m = p both forms agree). These are
    the dependency bubbles Megatron-LM refuses (a round shorter than pp) and Llama Team 2024 §3.3.2
    accepts to run fewer micro-batches than stages."""
    if m >= p:
        return (p - 1) / v
    return p - m + (m - 1) / v


def _dp_exposed(zero: int, m: int, grads: float, gathers: float, micro: _MicroBatch,
                n_layers: int, overlapped: bool) -> float:
    """Data-parallel seconds not hidden behind compute (see the module docstring)."""
    if not overlapped:
        return grads + gathers

    def hide(total: float, window: float) -> float:
        # everything but the last layer's bucket can overlap
        return max(total - window, total / n_layers)

    match zero:
        case 0 | 1:
            return hide(grads, micro.backward) + hide(gathers, micro.forward)
        case 2:
            return m * hide(grads / m, micro.backward) + hide(gathers, micro.forward)
        case 3:
            ag = gathers / (2 * m)
            return m * (hide(ag, micro.forward) + hide(ag + grads / m, micro.backward))
        case _:
            raise ValueError(f"ZeRO stage must be 0-3, got {zero}")


def rates_for(gpu: Accelerator, eff: KernelEfficiency, efficiency: float | None,
              precision: Precision, flash: FlashImpl = "fa2", fp8_experts: bool = False,
              fp8_dispatch: bool = False, fused_grouped_mlp: bool = False,
              fp8_attention: bool = False, fp8_lm_head: bool = False,
              fp8_scaling: FP8Scaling = "delayed", cudnn_norm: bool = False) -> Rates:
    fp8 = gpu.peak_flops.get("fp8", gpu.peak("bf16"))
    return Rates(gpu.peak("bf16"), fp8, eff, efficiency, gpu.hbm_bytes_per_s * eff.hbm, precision, flash,
                 gpu.sms, fp8_experts, fp8_dispatch, fused_grouped_mlp, gpu.key if fp8_attention else None,
                 fp8_lm_head, fp8_scaling, cudnn_norm)
