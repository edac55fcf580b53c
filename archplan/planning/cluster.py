"""The layout model: what one rank holds and which collectives it calls, as data.

Public API (stable; `distributed/` cross-checks against it):

    most_loaded_stage(plan, layout, seq, *, microbatches, states=MEGATRON,
                      attention_kernel="flash") -> int
    rank_memory(plan, layout, seq, *, microbatches, stage=None, states=MEGATRON,
                attention_kernel="flash") -> RankMemory
    step_collectives(plan, layout, seq, *, microbatches, stage=None, states=MEGATRON,
                     grad_reduce=None, cp_comm="all_gather", overlap=frozenset({"dp"}),
                     attention_kernel="flash", early_stop=None) -> tuple[Collective, ...]
    StatesConvention, ZERO (16 B/param), MEGATRON (18 B/param), FSDP2 (16 B/param + bf16 copies),
    DEEPSPEED (ZERO's bytes, ZeRO-3 fetched per module),
    STATES = {"zero": ZERO, "megatron": MEGATRON, "fsdp2": FSDP2, "deepspeed": DEEPSPEED}

`stage` is a pipeline rank (0 … pp−1); None = the most loaded one. Everything is for rank 0 of
that pipeline rank's tensor/context/data-parallel groups (rank 0 holds the largest shard of an
uneven split: torch.chunk and FSDP2 put the remainder last).

**Parameters of a rank** (`planning/shards.py`, tensor by tensor): the layers of the rank's model
chunks (`layout.pipeline_chunks`), plus the embedding (+ learned positions, embedding norm) on the
first chunk and the final norm + LM head on the last. A tied head is counted once when one rank
holds both ends (pp = 1); with pp > 1 the last stage holds a copy (Megatron's shared embedding).
Tensor parallelism splits each tensor as `shards.Tensor.local_shape` says; experts are split over
ep consecutive ranks of the stage (`layout.Layout.expert_dp`: Megatron-Core's parallel folding).
Expert tensors replicate over the expert data-parallel group (tp·cp·dp/ep ranks; experts are whole
on every rank holding them; FSDP2 shards their dim 1 when a rank has fewer
experts than that group has ranks and dim 1 splits evenly, torchtitan's placement), everything else
over the dp·cp ranks (context-parallel ranks hold the same weights: Megatron reduces gradients over
the data × context group).

**Model states** (`StatesConvention`): per parameter, `param_bytes` at rest, `grad_bytes`,
`optimizer_bytes` (the master copy's `master_bytes` + Adam's m and v, `moment_bytes` each: fp32,
or narrower under `with_optimizer`: bf16 moments, the master as 16-bit remainders); ZeRO (Rajbhandari et al. 2020 §5) shards the optimizer states at zero ≥ 1, the
gradients at ≥ 2 and the parameters at 3 over the data-parallel group. ZERO and MEGATRON shard one
flat buffer per group, ceil(N/d) elements per rank (DeepSpeed's and Megatron's distributed
optimizer's contiguous buffers); FSDP2 shards every tensor on dim 0 into ceil(dim0/d)-row chunks
and allocates that padded chunk on every rank (torch `FSDPParam._init_sharded_param`).
- ZERO, 16 B/param: bf16 weights 2 + bf16 grads 2 + fp32 master, m, v 12 (ZeRO §3.1).
- MEGATRON, 18 B/param: bf16 weights 2 + fp32 main grads 4 + 12 (Megatron-LM forces fp32 main-grad
  accumulation with bf16, `accumulate_allreduce_grads_in_fp32`). Its gradient buffer takes the
  reduction's dtype (Megatron-Core `DistributedDataParallel`: `grad_dtype = torch.float if
  ddp_config.grad_reduce_in_fp32 else param.dtype`), so a run that reduces in bf16
  (Megatron-LM's `--grad-reduce-in-bf16`, NeMo's and Megatron-Bridge's `grad_reduce_in_fp32=False`)
  keeps bf16 main grads, 16 B/param (`StatesConvention.reducing_in`).
- FSDP2 (torch `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), 16 B/param: fp32
  sharded parameters 4 (they are the master weights) + fp32 sharded grads 4 + Adam m, v 8; the
  bf16 unsharded compute copies are `temporary`: the whole stage's at zero = 0 to 2
  (reshard_after_forward=False keeps them from the forward to the backward; `replicate` has no
  reshard after the forward either), two layers' at zero = 3 (the one computing and the
  prefetched next); beside them, at the end of a layer's backward, its bf16 weight gradient
  before its unit reduces it (`_layer_gradient`). FSDP2 shards its parameters at every
  zero ≥ 1 (`distributed/shard.py`): zero = 1 keeps the bf16 copies as zero = 2 does and
  accumulates fp32 *unsharded* gradients over the micro-batches, reduce-scattered after the last
  backward, so the gradients are whole with m > 1 micro-batches and sharded with one (its only
  backward reduce-scatters each unit's gradient as it is produced); zero = 0 is FSDP2's
  replicate mode: whole fp32 parameters, gradients and optimizer states. The gradient copies
  FSDP2 makes as it casts or reduces a unit's gradient are `temporary` where verify --layout
  measured them exact: the embedding's (zero 0-3), after the first stage's last backward, when its
  activations are freed (`_embedding_gradient_transient`: the stage's peak is the larger moment),
  and an LM head's (zero 1-2), beside the last stage's activations (`_head_reduction_transient`).
- DEEPSPEED: ZERO's bytes; its ZeRO-3 gathers module by module as DeepSpeed does (`zero3_fetch`):
  a module whose recompute and backward uses lie more than `stage3_max_reuse_distance` elements
  apart is gathered a third time, and pricing replays DeepSpeed's blocking fetches instead of
  hiding whole layers.
ZeRO-3 under ZERO/MEGATRON also holds two layers' gathered bf16 weights (`temporary`); under
DEEPSPEED the most its fetch rules hold at once (`zero3_fetch.peak_gathered`).

**Activations** of one micro-batch per layer: `analytic.memory.activation_memory` (Korthikanti et
al. 2022 §4, per saved tensor) at the rank's tokens, mb·seq/cp (context parallelism splits the
sequence; with its load balancing every rank holds 2 of the 2·cp chunks). Under tensor parallelism
everything is split over tp except, without sequence parallelism, the norm inputs and the inputs
of the column-parallel projections (Korthikanti Table 2: sbh(10 + 24/t) vs 34·sbh/t, dropout aside;
S4 keeps its 2h GLU input whole instead, `_mixer_whole`);
with sequence parallelism the column input is kept sequence-sharded and re-gathered in the backward
(Megatron-LM's choice). attention_kernel "flash" (the default) keeps no s×s probabilities, only the
fp32 log-sum-exp per head and query (Dao et al. 2022 §3.1), and a fused SwiGLU that keeps [gate |
up] and recomputes act(gate) (Megatron-LM `bias_swiglu_impl`), and memory-efficient norms that keep
their output (already kept as the next projection's input) instead of their input (Apex
`FusedRMSNorm(memory_efficient=True)`, Megatron-LM `--memory-efficient-layer-norm`), and, under the
megatron engine, MoE experts that weight each routed copy inside their activation, keeping its fp32
routing probability instead of its output (Megatron-Core since 0.13, `_weighting_delta`); "eager" keeps
what plain torch autograd keeps (the s×s probabilities unless recompute is selective, act(gate),
each norm's input). Megatron-Core's "mla_up_proj" module recompute (`RecomputeModule`) drops MLA's Q, K
and V under none or selective. Full recompute keeps the block inputs, plus one layer's whole activations while it is
re-run; an MoE layer adds two transient copies of its routed rows at its combine, beyond what it
saves (`COMBINE_COPIES`; in the rank's last forward too, without full recompute). In-flight
micro-batches per pipeline rank r of p: min(p − r, m) under 1F1B (Narayanan et al. 2021 §2.2); with v virtual stages the warm-up runs 2(p − r − 1) + (v − 1)·N + 1 chunk forwards,
N = p unless the layout's `group` sets it (Megatron's interleaved schedule), so at N = p rank 0 holds p·(1 + (p − 1)/(p·v)) micro-batches' worth
(Korthikanti §4.2.3); which chunks they belong to changes from round to round, so every mix held
before a backward is priced (`pipeline_moments`). The first chunk adds the int64 token ids, the last the final-norm input, the
LM-head input and the fp32 logits (vocab-parallel cross-entropy: V/tp per token); under full
recompute those are freed before the layers are re-run, so the larger of them and the re-run
layer counts, not both; except in the torch engine with multi-token prediction, whose MTP modules
are re-run while the main pass's head tensors are still alive (`_rank_activations`). A rank whose
first backward is not the loss's receives its output's gradient from the next stage into a new
tensor first, so that backward starts with one more sequence's hidden states beside the held
activations (`_received_gradient`).

**Engines** (`StatesConvention.engine`): "megatron" (ZERO, MEGATRON: `plan`'s default) is what
is described here; "torch" (FSDP2: DTensor parallel styles, FSDP2, non-reentrant checkpointing,
what `verify --layout` runs and measures) differs in these places: under SP the column input is
saved gathered (whole b·s·h per sub-block kept, one all-gather fewer per sub-block), the LM
head's gathered input is kept, each SP norm weight's gradient is all-reduced in bf16 per
micro-batch (Megatron: all of them once per step, fp32), full recompute stops early by default
(`uses_early_stop`), tied ends at pp = 1 are one FSDP unit, each non-last model chunk's output is
kept until its backward (`_held_output`), MLA's latents are kept whole on every tp rank
(`_latent_bytes`), a model chunk's rotary layers share one set of bf16 cos and sin tables
(`_rope_tables`); and its "flash" kernel is SDPA in plain autograd (act(gate) kept, an MoE
router's fp32 input copy, what the Mamba units keep beyond mamba_ssm: `_ssd_kept`,
`_mamba1_kept`; Mamba-1's x_proj output whole on every rank, `_x_proj_bytes`), a layer's re-run
does not count its block's input twice (`_rerun_saves_kept_input`), and its ALiBi is one shared
bias per model chunk, a sliding window one shared mask (`_shared_bias`). Its DP records are
FSDP2's units (`_fsdp_end_units`: the embedding alone, the rest of the ends in the stage's root
unit), its tied-embedding all-reduce across stages is of the rank's FSDP2 shard,
without SP its pipeline sends carry the whole hidden states (no scatter over tp), and its
all-gather CP keeps the gathered K/V (no re-gather in the backward) and, per model chunk, the
positions and one T/cp × T mask per window (`_cp_kept`, `_cp_shared`). Its temporary memory
holds FSDP2's transients as `verify --layout` measures them: the bf16 compute copies, a layer's
bf16 weight gradient before its unit's reduction (`_layer_gradient`) and that reduction's
buffers (`_unit_reduction`), the end units' gradient casts and reductions (the embedding's also
after each backward of a pipeline's first stage, the other micro-batches' activations still
held: `_embedding_between_backwards`), the eager loss's backward gradients (any engine under
`--cross-entropy eager`: `_loss_backward_transient`), the reduce-scatter input FSDP2 keeps
from one micro-batch into the next at zero 2 and 3 (`_held_reduce_scatter`), the bf16 gradients
its head's backward holds, multi-token prediction's passes before the main one's
(`_head_gradients`), the Mamba and long-conv mixers' backward (`_mixer_backward`), S4's kernel
generation in a forward or a re-run (`_kernel_generation`), and at the end of the backward the
root unit's reduction
(`_root_reduction_at_end`) and the embedding lookup's gradient beside the head's
(`_lookup_gradient_at_end`).

**Collectives** (byte convention in `records.py`), per optimizer step, m micro-batches:
- TP, per sub-block (mixer, FFN) and micro-batch: without SP an all-reduce of the b·s·h output in
  the forward and of the input gradient in the backward (Shoeybi et al. 2019 §3); with SP an
  all-gather + reduce-scatter in the forward and a reduce-scatter + all-gather + the re-gather of
  the column input in the backward (Korthikanti §4.2.2); full recompute repeats the forward ones,
  but for each layer's last reduction when the recompute stops early (PyTorch's non-reentrant
  checkpoint from 2.1 on, `recompute_skips_last_gemm`).
  Under SP the norm weights' gradients are summed over tp (one all-reduce per step), and so
  are an MoE layer's router and shared gate's, which see only the rank's sequence shard; MLA's
  latent down-projections and their norms run replicated on every rank's gathered input and feed
  only its heads, so theirs are summed over tp with or without SP (torchtitan's DeepSeek-V3 plan).
  MoE layers run with expert tensor parallelism 1 (Megatron-Core's MoE with SP): each tp rank
  routes its own sequence shard to whole experts (no TP collective), only shared experts are a
  tensor-parallel sub-block; expert gradients reduce over expert_dp.
  The embedding output (all-reduce, or reduce-scatter under SP) and the LM head (all-gather of its
  input under SP) add one each way. Learned positions under SP: Megatron-LM all-reduces the
  embedding output, adds the positions whole and scatters (`LanguageModelEmbedding`); the torch
  engine reduce-scatters it, each rank adds its shard's rows and DTensor all-gathers their (s, h)
  gradient. qk-norm: one shared by the heads (scope `head`) and MQA's k-norm have their gradients
  summed over tp; one over n_heads·head_dim (OLMo-2) all-reduces each token's fp32 statistics per
  norm, forward (again under full recompute) and backward (`width_sharded_stats`). Hyena and StripedHyena follow that pattern (column-parallel
  projections in, row-parallel out, depthwise convolutions local to a rank's channels, see
  `shards.py`); S4 has no input projection: without SP an all-reduce of its row-parallel
  output_linear's 2·d_model partial sums forward and an all-gather of the input gradient's channel
  slices backward; with SP an all-to-all from sequence to channel shards each way, a
  reduce-scatter of the 2·d_model sums forward and its all-gather backward. Mamba-1's x_proj
  contracts the rank's d_inner channels: its dt_rank + 2·d_state partial sums per token are
  all-reduced in the forward (again under full recompute) and their gradient in the backward
  (Megatron's reduce / copy pair; `distributed.plans.mamba1_plan`). Weights run whole on every
  rank and feeding only its heads or channels have their gradients summed over tp with the SP
  norms': MLA's latents, MQA's k-norm, Jamba's dt/B/C norms, Hyena's filter trunk, S4's single
  SSM copy. With fewer KV heads than tp ranks (MQA among them) the K and V weights split by rows
  over tp, so a rank's rows cut across a head, and each attention layer all-gathers the
  projection's output and keeps the rank's head, reduce-scattering its gradient: Megatron-Core
  the whole fused QKV output, the torch engine K and V apart (`_qkv_gathered`).
- CP, per long-conv layer and micro-batch (`long_conv_exchange`): an all-to-all from sequence to
  channel shards before the convolutions and one back after, in the forward and the backward.
- CP, per Mamba layer and micro-batch (`mamba_exchange`, Megatron-Core's `MambaContextParallel`):
  the same pair around the conv1d and the selective scan (in_proj's output to whole sequences of
  the rank's channels or heads, the scan's output back); Mamba-1's x_proj partial sums over the
  rank's channels all-reduced over cp too, for the whole sequence, forward and backward.
- CP, per attention layer and micro-batch: "all_gather" (Llama 3 §3.3.2): an all-gather of K and V
  in the forward, again in the backward, and a reduce-scatter of their gradients (MLA under the
  torch engine: of its latent [c_kv | k_pe], `_kv_bytes`); "ring"
  (Megatron-Core): cp − 1 K/V sends and receives in the forward, twice that in the backward.
- PP: per chunk boundary and micro-batch, the activation (forward) and its gradient (backward),
  1/tp of it per rank (Narayanan et al. 2021 §4.1: scattered over the TP ranks before the send,
  all-gathered over NVLink after; sequence-sharded already under SP).
- EP, per MoE layer and micro-batch: a dispatch and a combine all-to-all of the k routed copies of
  the rank's tokens (its sequence shard under SP) in the forward and the backward (Lepikhin et al.
  2020), + 2 under full recompute. With a load-balancing loss, an all-reduce of its fp32
  routed-pair counts (E per micro-batch, or per sequence) over tp under SP and over cp, per
  forward: the loss is the micro-batch's, not the rank's shard's (Megatron-Core's router sums
  `tokens_per_expert` over its tp_cp_group).
- DP over dp·cp (experts over tp·cp·dp/ep), one record per pipeline chunk's layers + one for the
  ends: zero 0 an all-reduce of the gradients per step; 1 a reduce-scatter per step and an
  all-gather of the updated bf16 parameters (Megatron's distributed optimizer); 2 a reduce-scatter
  per micro-batch and the all-gather per step; 3 an all-gather in the forward and the backward and
  a reduce-scatter per micro-batch (ZeRO §7.2.2). Gradients reduce in `grad_reduce` bytes (default
  the convention's gradient dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal, NamedTuple, TypeVar

from typing_extensions import assert_never

from archplan.analytic.hyena import (
    hyena_backward_bytes,
    hyena_filter_activation_bytes,
    striped_backward_bytes,
    striped_filter_once_bytes,
)
from archplan.analytic.mamba import (
    mamba1_a_bytes,
    mamba1_scan_backward_bytes,
    mamba1_unit_bytes,
    ssd_backward_bytes,
    ssd_chunks,
)
from archplan.analytic.memory import (
    ACT_BYTES,
    FP32_BYTES,
    LSE_BYTES,
    TOKEN_ID_BYTES,
    RECOMPUTE_MODES,
    Recompute,
    activation_memory,
    input_copies,
    mla_view_widths,
    moe_routing_bytes,
    ssd_unit_bytes,
)
from archplan.analytic.mtp import mtp_norm_names
from archplan.analytic.s4 import (
    s4_backward_bytes,
    s4_generation_transient_bytes,
    s4_kernel_activation_bytes,
    s4_kernel_once_bytes,
)
from archplan.errors import ArchplanError
from archplan.hardware import FP8_TN_ONLY, Accelerator
from archplan.planning.layout import Layout, pipeline_chunks, round_size
from archplan.planning.records import Collective, RankMemory
from archplan.planning.shards import Tensor, first_tensors, fp8_weight, last_tensors, layer_tensors
from archplan.planning.zero3_fetch import Module, fetch_counts, modules, peak_gathered
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

# "flash": the fused kernels of Megatron-LM-class runs (FlashAttention, fused SwiGLU, memory-
# efficient norms); "eager": what plain torch autograd keeps (s×s probabilities, every GLU
# intermediate, each norm's input beside its output).
AttentionKernel = Literal["flash", "eager"]
ATTENTION_KERNELS: tuple[AttentionKernel, ...] = ("flash", "eager")
CPComm = Literal["all_gather", "ring"]
CP_COMMS: tuple[CPComm, ...] = ("all_gather", "ring")
# How the MoE dispatch and combine cross nodes (`pricing.ep_all_to_all_time`): "nccl", NCCL's
# all-to-all (every remote copy over the NIC); "hierarchical", DeepEP's internode kernels and
# HybridEP (a token crosses to each remote node once, then NVLink forwards it); "auto", hierarchical
# where the router bounds the nodes a token reaches (DeepSeek-V3's node-limited routing, designed for
# such kernels) and NCCL's otherwise.
Dispatcher = Literal["auto", "nccl", "hierarchical"]
# Whose tensor / sequence parallelism: "megatron" (Megatron-LM's hand-written layers) or "torch"
# (DTensor parallel styles + FSDP2 + non-reentrant checkpointing, what `verify --layout` runs);
# where they differ is listed in the module docstring.
Engine = Literal["megatron", "torch"]
# Megatron-Core's module-level recompute (`recompute_granularity="selective"` with
# `recompute_modules`), beside the layout's none / selective / full: the modules a run re-runs in the
# backward instead of keeping what they saved. "mla_up_proj": MLA's up-projections and RoPE
# (Megatron-Core `MLASelfAttention`: `CheckpointWithoutOutput` around `qkv_up_proj_and_rope_apply`,
# its output discarded once the core attention has read it, `discard_output_and_register_recompute`),
# so the layer keeps the latents and drops Q, K and V, and the backward re-runs q_b and kv_b.
RecomputeModule = Literal["mla_up_proj"]
RECOMPUTE_MODULES: tuple[RecomputeModule, ...] = ("mla_up_proj",)
Overlap = Literal["dp", "tp", "pp", "ep", "dualpipe"]
OVERLAPS: tuple[Overlap, ...] = ("dp", "tp", "pp", "ep", "dualpipe")
# the two ways a run hides the MoE all-to-all behind compute (`pricing.ep_exposed` prices each)
EP_OVERLAPS: frozenset[Overlap] = frozenset({"ep", "dualpipe"})
FP8_BYTES = 1
# how a convention's description states its fp8 weights, by their bytes at rest
FP8_WEIGHTS_STATED: dict[int, str] = {1: "; GEMM weights in fp8 (1 B)",
                                      2: "; GEMM weights in fp8 (1 B + its 1 B transpose)"}
PROB_BYTES = 4  # an MoE router's routing probabilities, fp32 (Megatron-Core's `moe_router_dtype`)
LOGIT_BYTES = 4
# How the run computes its loss (`pricing.CROSS_ENTROPY_BYTES` holds each one's HBM traffic).
CrossEntropyImpl = Literal["fp32-fused", "bf16-fused", "eager"]
# What the loss's backward holds beyond the log-probabilities it keeps (LOGIT_BYTES), per logit of
# the rank, measured by verify --layout (the tracker's Temp at the step's peak, exact on tiny-llama
# with a 16K vocabulary over zero 0-3, tp 1-4, cp 2, pp 2, 1-2 micro-batches): eager
# `F.cross_entropy` on fp32 logits forms nll_loss's dense gradient and log_softmax's input
# gradient, two fp32 n×V tensors (aten `_log_softmax_backward_data`; `size`'s "loss backward"),
# 8 B; with the vocabulary split over tp, torch's `loss_parallel` handlers form a third, 12 B. The
# fused kernels write their gradient into the buffer they keep: none priced (Megatron's
# vocab-parallel loss then casts it to bf16 for the head's backward, 2 B a logit, which no
# measurement here checks).
LOSS_BACKWARD_BYTES: dict[CrossEntropyImpl, tuple[int, int]] = {  # (tp = 1, tp > 1)
    "fp32-fused": (0, 0), "bf16-fused": (0, 0), "eager": (8, 12)}
STAT_BYTES = 4  # fp32 norm statistics
COUNT_BYTES = 4  # fp32 routed-pair counts of a load-balancing loss, per expert
# a 16- or 32-bit float state's bytes per element -> dtype (gradients on the wire, Adam's moments)
STATE_DTYPES: dict[int, str] = {2: "bf16", 4: "fp32"}
REMAINDER_BYTES = 2  # the 16 bits of an fp32 master weight that its bf16 copy lacks
# The Adam step per parameter of the optimizer's shard: the fp32 master, m and v each read and
# written (24 B), the fp32 gradient read (4) and the bf16 weight written (2)
ADAM_STEP_BYTES = 30
FSDP_PREFETCH_LAYERS = 2  # the layer computing and the prefetched next one, gathered in bf16
# FSDP2's `replicate` (zero 0) as it all-reduces the embedding's gradient: bytes per element of the
# rank's vocabulary rows beside the whole bf16 gradient, measured by verify --layout (Llama 3 8B,
# TP2 and TP8; docs/distributed.md "temporary")
ZERO0_REDUCE_ROW_BYTES = 6
T = TypeVar("T")


@dataclass(frozen=True)
class StatesConvention:
    """Bytes per parameter of the model states and how they shard (see the module docstring)."""

    key: str
    param_bytes: int  # at rest
    grad_bytes: int
    master_bytes: int  # the optimizer's fp32 master copy (0 where the parameters at rest are it)
    moment_bytes: int  # each of Adam's two moments, m and v
    per_tensor: bool  # FSDP2's dim-0 chunks of every tensor, else one flat buffer
    params_always_sharded: bool  # FSDP2: the parameters at rest are the sharded master copy (zero ≥ 1)
    compute_copy_bytes: int  # FSDP2's unsharded bf16 copies (temporary); 0 otherwise
    engine: Engine  # whose tensor / sequence parallelism runs beside these states
    description: str
    module_fetch: bool = False  # ZeRO-3 fetches module by module, DeepSpeed's way (`zero3_fetch`)
    grads_in_reduce_dtype: bool = False  # the gradient buffer is kept in the reduction's dtype
    # what its optimizer can keep narrower (`with_optimizer`): Adam's moments in bf16, the fp32
    # master as the 16 bits its bf16 weight lacks
    narrow_moments: bool = False
    master_remainders: bool = False
    # HBM bytes the Adam step reads and writes per parameter it holds (`pricing.price`)
    step_bytes: int = ADAM_STEP_BYTES
    # the GEMM weights kept and gathered in fp8 (`with_fp8_weights`: Megatron-Core's FP8 primary
    # weights); only the conventions whose engine offers it may
    fp8_weights: bool = False
    fp8_weights_offered: bool = False
    # bytes at rest of a weight kept in fp8: 1, or 2 where the GPU's fp8 GEMMs take only the "TN"
    # layout and Transformer Engine keeps each weight's transpose beside it (`on_gpu`)
    fp8_weight_bytes: int = FP8_BYTES

    @property
    def optimizer_bytes(self) -> int:
        return self.master_bytes + 2 * self.moment_bytes

    @property
    def bytes_per_param(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def reducing_in(self, grad_reduce: int | None) -> StatesConvention:
        """The convention as run with gradients reduced in `grad_reduce` bytes (None: its own):
        itself, unless its gradient buffer takes the reduction's dtype (Megatron-Core's)."""
        if not self.grads_in_reduce_dtype or grad_reduce is None or grad_reduce == self.grad_bytes:
            return self
        return replace(self, grad_bytes=grad_reduce).described()

    def with_optimizer(self, moment_bytes: int, remainders: bool) -> StatesConvention:
        """The convention with Adam's moments kept in `moment_bytes` each (2: bf16, 4: fp32) and,
        with `remainders`, the fp32 master kept as the 16 bits its bf16 weight lacks.
        - bf16 moments: DeepSeek-V3 (DeepSeek-AI 2024 §3.3.1, "BF16 ... to track the first and
          second moments in the AdamW optimizer", master weights and gradients in fp32) and
          Megatron-Core's precision-aware optimizer (`--use-precision-aware-optimizer
          --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16`, Transformer Engine's FusedAdam).
        - remainders: that optimizer's `store_param_remainders` (Megatron-Core `OptimizerConfig`,
          on by default whenever the precision-aware optimizer is, with bf16 weights and an fp32
          master).
        The Adam step reads and writes each narrower state (`step_bytes`); remainders also read
        the bf16 weight they complete."""
        if moment_bytes not in STATE_DTYPES:
            raise ArchplanError(f"Adam's moments take 2 (bf16) or 4 (fp32) bytes each, got {moment_bytes}")
        if moment_bytes != self.moment_bytes and not self.narrow_moments:
            raise ArchplanError(
                f"--optimizer-moments bf16 is not a choice under --states {self.key}: its optimizer keeps "
                "Adam's moments in fp32 (torch's AdamW in the fp32 sharded parameters' dtype under fsdp2; "
                "DeepSpeed's fused Adam under deepspeed); megatron and zero offer it")
        if remainders and not self.master_remainders:
            raise ArchplanError(
                f"--master-weights remainders is not a choice under --states {self.key}: it is Megatron-Core's "
                "precision-aware optimizer (store_param_remainders), --states megatron")
        master = REMAINDER_BYTES if remainders else self.master_bytes
        if (moment_bytes, master) == (self.moment_bytes, self.master_bytes):
            return self
        narrower = 4 * (self.moment_bytes - moment_bytes) + 2 * (self.master_bytes - master)
        return replace(self, master_bytes=master, moment_bytes=moment_bytes,
                       step_bytes=self.step_bytes - narrower + (ACT_BYTES if remainders else 0)).described()

    def with_fp8_weights(self) -> StatesConvention:
        """The convention with the GEMM weights kept in fp8, one byte each, and gathered so:
        Megatron-Core's FP8 primary weights (`--fp8-param-gather`; Megatron-Core's MoE guide: "Casts
        FP32 master weights directly to FP8, eliminating BF16 intermediate copy", and the parameter
        all-gather halves). The weights of Transformer Engine's linears become fp8 tensors; the
        embedding, the LM head, norms, biases and routers stay bf16 (`shards.fp8_weight`). The
        fp32 master, the gradients and Adam's moments do not change."""
        if self.fp8_weights:  # already so (`dataclasses.replace` re-runs `Settings.__post_init__`)
            return self
        if not self.fp8_weights_offered:
            raise ArchplanError(
                f"--fp8-params is not a choice under --states {self.key}: it is Megatron-Core's FP8 primary "
                "weights (--fp8-param-gather), --states megatron")
        if self.master_bytes == REMAINDER_BYTES:
            raise ArchplanError("--fp8-params and --master-weights remainders do not go together: the "
                                "remainders complete a bf16 weight, and fp8 primary weights keep none")
        return replace(self, fp8_weights=True,
                       description=self.description + FP8_WEIGHTS_STATED[self.fp8_weight_bytes])

    def on_gpu(self, gpu: Accelerator) -> StatesConvention:
        """The convention as `gpu` keeps it. Where its fp8 GEMMs take only the "TN" layout
        (`hardware.FP8_TN_ONLY`: Hopper, Ada), Transformer Engine keeps each fp8 weight's transpose
        beside it for the backward's GEMMs (`Float8TensorStorage.update_usage`: the transpose is
        needed unless `is_non_tn_fp8_gemm_supported()`, true from sm100), so a weight kept in fp8
        takes 2 bytes at rest, as in bf16; it is still gathered in one (the transpose is made after
        the gather)."""
        if not (self.fp8_weights and gpu.key in FP8_TN_ONLY):
            return self
        transposed = 2 * FP8_BYTES
        return replace(self, fp8_weight_bytes=transposed, description=self.description.removesuffix(
            FP8_WEIGHTS_STATED[self.fp8_weight_bytes]) + FP8_WEIGHTS_STATED[transposed])

    def described(self) -> StatesConvention:
        """The convention with its description restated from its bytes (after `reducing_in` or
        `with_optimizer` changed them); the base conventions keep their own words."""
        grads = f"{STATE_DTYPES[self.grad_bytes]} {'main grads' if self.grads_in_reduce_dtype else 'grads'}"
        if self.master_bytes == self.moment_bytes == 4:
            optimizer = "fp32 master, m, v"
        else:
            master = "fp32 master as 16-bit remainders" if self.master_bytes == 2 else "fp32 master"
            optimizer = f"{master} + {STATE_DTYPES[self.moment_bytes]} m, v"
        who = "Megatron-Core" if self.key == "megatron" else "ZeRO"
        fp8 = FP8_WEIGHTS_STATED[self.fp8_weight_bytes] if self.fp8_weights else ""
        return replace(self, description=f"bf16 weights + {grads} + {optimizer} = "
                                         f"{self.bytes_per_param} B/param ({who}){fp8}")


ZERO = StatesConvention("zero", 2, 2, 4, 4, False, False, 0, "megatron",
                        "bf16 weights + bf16 grads + fp32 master, m, v = 16 B/param (ZeRO §3.1)",
                        narrow_moments=True)
MEGATRON = StatesConvention("megatron", 2, 4, 4, 4, False, False, 0, "megatron",
                            "bf16 weights + fp32 main grads + fp32 master, m, v = 18 B/param "
                            "(Megatron-LM)", grads_in_reduce_dtype=True, narrow_moments=True,
                            master_remainders=True, fp8_weights_offered=True)
FSDP2 = StatesConvention("fsdp2", 4, 4, 0, 4, True, True, 2, "torch",
                         "fp32 sharded params + fp32 grads + Adam m, v = 16 B/param, bf16 "
                         "unsharded compute copies and the end stages' gradient copies as temporary "
                         "(torch FSDP2 mixed precision, fused AdamW)")
DEEPSPEED = StatesConvention("deepspeed", 2, 2, 4, 4, False, False, 0, "megatron",
                             "bf16 weights + bf16 grads + fp32 master, m, v = 16 B/param; ZeRO-3 "
                             "fetched module by module with DeepSpeed's defaults", module_fetch=True)
STATES: dict[str, StatesConvention] = {c.key: c for c in (ZERO, MEGATRON, FSDP2, DEEPSPEED)}


def _fsdp_accumulates(layout: Layout, microbatches: int) -> bool:
    """FSDP2 under zero 0/1 skips the gradient reduction on every backward but the last
    (`set_requires_gradient_sync`), so with several micro-batches it accumulates the unreduced
    gradients in fp32 (`FSDPParam.unsharded_accumulated_grad`)."""
    return layout.zero <= 1 and microbatches > 1


def _fsdp_end_units(data: ModelData, first: bool, last: bool, pp: int) -> tuple[tuple[tuple[Tensor, ...], str], ...]:
    """The FSDP2 units of a stage's ends (`distributed.shard._fsdp`): the embedding module is its
    own unit unless the stage's head reads its weight (tied, both ends on one stage); everything
    else (learned positions, the embedding norm, final norm, head) is in the stage's root unit.
    FSDP2 gathers and reduces one flat buffer per unit (`FSDPParamGroup`), so one record each."""
    # the MTP modules' input parts are in their modules' units (`ModelData.mtp_own`)
    ends = tuple(t for t in data.ends(first, last, pp) if not t.name.startswith("mtp."))
    if data.plan.tied and first and last:
        return ((ends, "embedding + final norm + LM head (root unit)"),)
    embed = tuple(t for t in ends if t.name.startswith("embed.")) if first else ()
    return ((embed, "embedding"), (tuple(t for t in ends if t not in embed), "stage root unit"))


# ----------------------------------------------------------------------------- per-layer data
@dataclass(frozen=True)
class OncePerForward:
    """What one forward of a long-convolution or Mamba-1 layer keeps of its filters (Mamba-1: of A),
    whatever the micro-batch (they depend on the parameters and the length alone), by how a rank's
    share of it is cut."""

    channels: float  # per channel of the first convolution: split over tp and over cp
    tp_channels: float  # per channel, but made whole on every cp rank: split over tp only
    whole: float  # replicated over tp and cp

    @property
    def total(self) -> float:
        return self.channels + self.tp_channels + self.whole


def _once_per_forward(mixer: MixerPlan, h: int, seq: int) -> OncePerForward:
    """A Hyena layer's filters: the spectra of the rank's channels (split over tp by
    `distributed.plans.hyena_plan`, over cp by the channel exchange of `distributed.context`), the
    decay window of its tp channels (the filter runs whole on every cp rank), the filter MLP's
    trunk (replicated over tp). S4's kernel, spectrum and generation, per channel of the rank's
    tp·cp share (`distributed.plans.s4_plan`, `distributed.context.long_conv_context`); in fp32,
    as FSDP2 hands the module fp32 SSM tensors. StripedHyena's modal filters' spectra, per filter
    (the filters split with the channels over tp and cp). Mamba-1's two fp32 copies of A, per
    channel of d_inner, which splits over tp and cp (`distributed.plans.mamba1_plan`,
    `distributed.context`). Measured by verify --layout at mb = 1 and 4."""
    match mixer:
        case HyenaPlan():
            f = hyena_filter_activation_bytes(mixer, h, seq, ACT_BYTES)
            return OncePerForward(f.spectra, f.window, f.trunk)
        case S4Plan():
            return OncePerForward(s4_kernel_once_bytes(mixer, h, seq, autocast=False), 0, 0)
        case Mamba1Plan():
            return OncePerForward(mamba1_a_bytes(mixer), 0, 0)
        case StripedHyenaPlan():
            return OncePerForward(striped_filter_once_bytes(mixer, h, seq), 0, 0)
        case AttentionPlan() | MLAPlan() | Mamba2Plan():
            return OncePerForward(0, 0, 0)
        case _:
            assert_never(mixer)


@dataclass(frozen=True)
class LayerActs:
    """Activation bytes of one sequence of `seq` tokens through one layer, unsharded."""

    kept: dict[str, int]  # recompute mode -> bytes kept (eager attention)
    replicated: int  # kept bytes not split over tp without SP (norm + column inputs)
    reduced: int  # of which a row-parallel output's, sequence-split under SP (S4's GLU input, `_mixer_whole`)
    core: int  # eager attention's s×s tensors (dropped by flash and by selective recompute)
    lse: int  # flash attention's log-sum-exp (kept instead of `core`)
    block_input: int  # what full recompute keeps
    glu_extra: int  # the activation's output eager GLUs keep and fused ones recompute
    norm_inputs: int  # the block norms' inputs, which memory-efficient fused norms do not keep
    fp32_inputs: int  # inputs the torch modules keep as fp32 copies (`_fp32_cast_width`), counted at 16 bits
    routing: int  # an MoE layer's routing metadata in the torch modules (`_routing_bytes`)
    expert_order: int  # and what expert parallelism adds to it
    combine: int  # an MoE layer's routed rows live at its combine beside the saved tensors (`_combine_rows`)
    weighting: int  # Megatron-Core's MoE layer keeps this beyond archplan's torch MoE (`_weighting_delta`)
    up_proj: int  # MLA's Q, K and V, which the "mla_up_proj" module recompute drops (`RecomputeModule`)
    latent: int  # MLA's latent tensors (`_latent_bytes`), whole on every tp rank of the torch engine
    viewed: int  # what the torch modules keep through views beyond the per-tensor model (`_viewed_bytes`)
    viewed_latent: int  # of which whole on every tp rank, with the latents
    ssd_kept: int  # what a Mamba-2 layer's torch modules keep beyond mamba_ssm's kernels (`_ssd_kept`)
    mamba1_kept: int  # and a Mamba-1 layer's, negative where it keeps less (`_mamba1_kept`)
    x_proj_whole: int  # Mamba-1's x_proj output and inner norms' outputs, whole on every tp rank (`_x_proj_bytes`)
    kv_heads: int  # an attention mixer's K/V heads (0 for other mixers and for MLA, whose heads are all K/V)
    kv_head_kept: int  # what one of those heads keeps: its K and V, and K's qk-norm input (`_kv_head_kept`)
    once: OncePerForward  # a long convolution's filters or Mamba-1's A, once per forward whatever the mb


@dataclass(frozen=True)
class ChunkLayers:
    """What `_collectives` counts over a model chunk's layers, whatever the layout: a search
    prices the same few layer ranges for hundreds of layouts. Each `(key, layers)` tuple lists
    the distinct keys in the order the layers first show them (the order of the records built
    from them), with how many layers have each."""

    s4: int  # S4 mixers (no column-parallel input)
    sub_blocks: int  # tensor-parallel sub-blocks (mixer + dense or shared FFN), S4 aside
    ends_tp: int  # layers whose last GEMM an early-stopping recompute skips (`recompute_skips_last_gemm`)
    x_proj: tuple[tuple[int, int], ...]  # Mamba-1 x_proj width per token, dt_rank + 2·d_state
    stats: tuple[tuple[int, int], ...]  # width-sharded qk-norm statistics, sorted
    kv: tuple[tuple[LayerPlan, int], ...]  # one layer per distinct attention mixer (`_kv_bytes`)
    conv: tuple[tuple[int, int], ...]  # long-conv channels exchanged under CP, in and out
    scan: tuple[tuple[tuple[LayerPlan, int], int], ...]  # (a layer per distinct Mamba mixer, direction)
    top_k: tuple[tuple[int, int], ...]  # MoE layers' routed copies per token
    aux: tuple[tuple[tuple[int, bool], int], ...]  # load-balancing losses: (experts, per sequence)
    sp_norms: tuple[tuple[int, int], ...]  # elements of the tensors summed over tp under SP
    tp_summed: tuple[tuple[int, int], ...]  # elements of the tensors summed over tp at any tp


def _first_seen(keys: Iterable[T]) -> tuple[tuple[T, int], ...]:
    """(key, occurrences) per distinct key, in the order the keys first occur."""
    counts: dict[T, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return tuple(counts.items())


# a pipeline rank's parameter elements: whole, its data-parallel shard, the biggest layer's, and
# each of its chunks' (whole, shard) in model order
StageParams = tuple[int, int, int, tuple[tuple[int, int], ...]]
End = Literal["first", "last", "last_tied_copy"]  # the ModelData attributes holding the ends' tensors


class ModelData:
    """What the layout model needs from a plan at one sequence length, computed once."""

    def __init__(self, plan: ModelPlan, seq: int) -> None:
        # A training step runs the multi-token-prediction modules' blocks after the main layers, on
        # the last pipeline stage (Megatron-Core's MTP block): here they are the last layers, and
        # each module's own parts and head pass are the last chunk's (`mtp_depth`).
        self.mtp_depth = len(plan.mtp)
        self.n_main = len(plan.layers)  # the main model's layers; the MTP blocks follow them
        self.last_tied_copy = tuple(last_tensors(plan, tied_copy=True))
        self.last = tuple(last_tensors(plan, tied_copy=False))
        plan = replace(plan, layers=plan.trained_layers, mtp=())
        self.plan = plan
        self.seq = seq
        h = plan.d_model
        self.layer_tensors: tuple[tuple[Tensor, ...], ...] = tuple(
            tuple(layer_tensors(layer, plan)) for layer in plan.layers)
        self.first = tuple(first_tensors(plan))
        acts = {mode: activation_memory(plan, 1, seq, mode).by_component for mode in RECOMPUTE_MODES}
        self.acts: list[LayerActs] = []
        per_layer = {mode: _by_layer(acts[mode], [layer.path for layer in plan.layers])
                     for mode in ("none", "selective")}
        after_mixer = [f"{layer.path}.{name}" for layer in plan.layers for name in ("ffn", "norm2")]
        per_after = {mode: _by_layer(acts[mode], after_mixer, inclusive=True) for mode in ("none", "selective")}
        mixers = _by_layer(acts["none"], [f"{layer.path}.mixer" for layer in plan.layers], inclusive=True)
        # what each layer's mixer alone keeps of one sequence (no recompute, its once-per-forward
        # tensors apart): the bytes a scan and its convolution stream (`pricing._layer_micro`)
        self.mixer_kept: list[int] = []
        # and each layer's as its mixer's backward finds it: in a pre-norm block the FFN and the
        # norm before it have run their backward and freed what they kept (`_mixer_backward`)
        self.acts_to_mixer: list[LayerActs] = []
        for layer in plan.layers:
            once = _once_per_forward(layer.mixer, h, seq)
            kept = {mode: per_layer[mode][layer.path] - once.total for mode in ("none", "selective")}
            kept["full"] = acts["full"][layer.path]
            self.acts.append(_layer_acts(plan, layer, kept, once, seq))
            self.mixer_kept.append(mixers[f"{layer.path}.mixer"] - once.total)
            before = _before_ffn(plan, layer)
            if before is None:
                self.acts_to_mixer.append(self.acts[-1])
                continue
            freed = {mode: per_after[mode][f"{layer.path}.ffn"] + per_after[mode][f"{layer.path}.norm2"]
                     for mode in ("none", "selective")}
            self.acts_to_mixer.append(_layer_acts(plan, before, {"full": kept["full"]} | {
                mode: kept[mode] - freed[mode] for mode in ("none", "selective")}, once, seq))
        # elements of each replicated tensor whose gradient is summed over tp: under SP those that
        # see a rank's sequence shard (block norms, the ends' norms, an MoE layer's router and
        # shared gate, `_sp_summed`); with any tp > 1 MLA's latent down-projections and their
        # norms, which feed every rank's heads (`_tp_summed`)
        self.sp_norms: list[list[int]] = [[t.numel for t in tensors if _sp_summed(layer, t.name)]
                                          for layer, tensors in zip(plan.layers, self.layer_tensors)]
        self.tp_summed: list[list[int]] = [[t.numel for t in tensors if _tp_summed(layer, t)]
                                           for layer, tensors in zip(plan.layers, self.layer_tensors)]
        self.sp_norms_first = [t.numel for t in self.first if t.name.startswith("embed_norm.")]
        self.sp_norms_last = [t.numel for t in self.last if t.name.startswith("final_norm.")
                              or t.name.split(".")[0] == "mtp" and t.name.split(".")[2] in mtp_norm_names(plan)]
        self.first_act = acts["none"]["embed"] + acts["none"].get("embed_norm", 0)
        # the head's tensors, once per head pass: the main one and one per MTP module, each of which
        # also keeps its rolled token ids, their embedding and the projection's 2·d input
        passes = 1 + self.mtp_depth
        self.final_norm_act = passes * acts["none"].get("final_norm", 0)
        self.head_input_act = passes * ACT_BYTES * seq * h
        self.logits_act = passes * LOGIT_BYTES * seq * plan.vocab_size
        self.mtp_ids_act = self.mtp_depth * TOKEN_ID_BYTES * seq
        self.mtp_embed_act = self.mtp_depth * ACT_BYTES * seq * h
        self.mtp_proj_act = self.mtp_depth * ACT_BYTES * seq * 2 * h  # not kept under full recompute
        self.n_experts = max((l.ffn.n_experts for l in plan.layers if isinstance(l.ffn, MoEPlan)),
                             default=0)
        self._numel: dict[tuple[int, int, bool], tuple[list[int], list[int]]] = {}
        self._fsdp: dict[tuple[int, int, int, int], tuple[list[int], list[int]]] = {}
        self._acts: dict[tuple[object, ...], list[float]] = {}
        self._activations: dict[tuple[object, ...], Any] = {}
        self._chunks: dict[tuple[int, int], ChunkLayers] = {}
        # equal numbers for equal blocks (DeepSeek-V3's first three dense, the rest MoE; Jamba's
        # periods): which pipeline ranks are alike (`representative_stages`)
        kinds: dict[tuple[object, ...], int] = {}
        self.layer_kinds = tuple(kinds.setdefault((layer.mixer, layer.ffn, layer.norms, layer.where), len(kinds))
                                 for layer in plan.layers)
        self._stages: dict[tuple[int, int], tuple[int, ...]] = {}
        self._stage_params: dict[tuple[int | bool, ...], StageParams] = {}
        self._stage_fp8: dict[tuple[int, ...], tuple[int, int]] = {}
        self._fetch: dict[tuple[object, ...], tuple[tuple[FetchUse, ...], dict[str, int], int]] = {}
        self._modules: dict[tuple[int | End, int, int], list[tuple[Module, tuple[Tensor, ...]]]] = {}

    def representative_stages(self, pp: int, vpp: int) -> tuple[int, ...]:
        """`representative_stages` of this model's blocks, once per split."""
        if (pp, vpp) not in self._stages:
            self._stages[pp, vpp] = representative_stages(self.n_main, pp, vpp, self.mtp_depth, self.layer_kinds)
        return self._stages[pp, vpp]

    def chunk_layers(self, layers: range) -> ChunkLayers:
        key = (layers.start, layers.stop)
        if key not in self._chunks:
            self._chunks[key] = _chunk_layers(self, layers)
        return self._chunks[key]


    def numel(self, tp: int, ep: int, fp8_only: bool = False) -> tuple[list[int], list[int]]:
        """Per layer, (dense, expert) parameter elements on tp/ep rank 0; with `fp8_only`, of the
        weights FP8 primary weights keep in fp8 (`shards.fp8_weight`)."""
        key = (tp, ep, fp8_only)
        if key not in self._numel:
            count = _local_fp8_numel if fp8_only else _local_numel
            pairs = [count(t, tp, ep) for t in self.layer_tensors]
            self._numel[key] = ([d for d, _ in pairs], [e for _, e in pairs])
        return self._numel[key]

    def stage_fp8(self, layout: Layout, stage: int) -> tuple[int, int]:
        """`_stage_fp8`, once per split."""
        key = (layout.tp, layout.ep, layout.dp * layout.cp, layout.pp, layout.vpp, stage)
        if key not in self._stage_fp8:
            self._stage_fp8[key] = _stage_fp8(self, layout, stage)
        return self._stage_fp8[key]

    def fsdp(self, tp: int, ep: int, dp: int, edp: int) -> tuple[list[int], list[int]]:
        """Per layer, (dense, expert) elements of FSDP2's padded dim-0 shards on rank 0."""
        key = (tp, ep, dp, edp)
        if key not in self._fsdp:
            pairs = [_fsdp_numel(t, tp, ep, dp, edp) for t in self.layer_tensors]
            self._fsdp[key] = ([d for d, _ in pairs], [e for _, e in pairs])
        return self._fsdp[key]

    def stage_params(self, layout: Layout, stage: int, per_tensor: bool) -> StageParams:
        """`_stage_params`, once per split: layouts that differ in zero, recompute or micro-batches
        hold the same parameters."""
        key = (layout.tp, layout.ep, layout.dp * layout.cp, layout.pp, layout.vpp, stage, per_tensor)
        if key not in self._stage_params:
            self._stage_params[key] = _stage_params(self, layout, stage, per_tensor)
        return self._stage_params[key]

    def modules(self, part: int | End, tp: int, ep: int) -> list[tuple[Module, tuple[Tensor, ...]]]:
        """`zero3_fetch.modules` of layer `part` or of the "first" / "last" / "last_tied_copy" ends."""
        key = (part, tp, ep)
        if key not in self._modules:
            tensors = self.layer_tensors[part] if isinstance(part, int) else getattr(self, part)
            self._modules[key] = modules(tensors, tp, ep)
        return self._modules[key]

    def mtp_own(self, layer: int) -> tuple[Tensor, ...]:
        """The input parts (norms, projection) of the MTP module whose block is layer `layer` of
        `plan.layers`, which the last stage's ends hold (`last_tensors`); () for a main layer."""
        if layer < self.n_main:
            return ()
        return tuple(t for t in self.last if t.name.startswith(f"mtp.{layer - self.n_main}."))

    def ends(self, first: bool, last: bool, pp: int) -> tuple[Tensor, ...]:
        """The embedding / head tensors a chunk holds besides its layers."""
        out: tuple[Tensor, ...] = self.first if first else ()
        if last:
            out += self.last_tied_copy if pp > 1 else self.last
        return out

    def rank_activations(self, layout: Layout, stage: int, microbatches: int, kernel: AttentionKernel,
                         engine: Engine, modules: frozenset[RecomputeModule] = frozenset(),
                         cp_comm: CPComm = "all_gather") -> int:
        """`_rank_activations`, once per what it depends on (`_per_activation_layout`)."""
        return self._per_activation_layout(_rank_activations, layout, stage, microbatches, kernel, engine, modules,
                                           cp_comm)

    def mixer_backward(self, layout: Layout, stage: int, microbatches: int, kernel: AttentionKernel,
                       engine: Engine, modules: frozenset[RecomputeModule], cp_comm: CPComm) -> dict[int, int]:
        """`_mixer_backward`, once per what it depends on (`_per_activation_layout`)."""
        return self._per_activation_layout(_mixer_backward, layout, stage, microbatches, kernel, engine, modules,
                                           cp_comm)

    def kernel_generation(self, layout: Layout, stage: int, microbatches: int, kernel: AttentionKernel,
                          engine: Engine, modules: frozenset[RecomputeModule],
                          cp_comm: CPComm) -> tuple[dict[int, int], dict[int, int]]:
        """`_kernel_generation`, once per what it depends on (`_per_activation_layout`)."""
        return self._per_activation_layout(_kernel_generation, layout, stage, microbatches, kernel, engine, modules,
                                           cp_comm)

    def _per_activation_layout(self, compute: Callable[..., T], layout: Layout, stage: int, microbatches: int,
                               kernel: AttentionKernel, engine: Engine, modules: frozenset[RecomputeModule],
                               cp_comm: CPComm) -> T:
        """`compute`'s figure once per split, activation layout and micro-batch count: the ZeRO
        stage and dp do not change it, ep only by whether it routes across ranks (`layer_acts`)."""
        key = (compute.__name__, layout.tp, layout.sequence_parallel, layout.cp, layout.mb, layout.recompute,
               layout.pp, layout.vpp, layout.group, layout.ep > 1, stage, microbatches, kernel, engine, modules,
               cp_comm)
        if key not in self._activations:
            self._activations[key] = compute(self, layout, stage, microbatches, kernel, engine, modules, cp_comm)
        return self._activations[key]

    def layer_acts(self, layout: Layout, recompute: Recompute, kernel: AttentionKernel,
                   engine: Engine, modules: frozenset[RecomputeModule] = frozenset(),
                   to_mixer: bool = False) -> list[float]:
        """Per layer, bytes one sequence keeps on one rank (before the cp split); with `to_mixer`,
        as the layer's mixer's backward finds them (`acts_to_mixer`). ep > 1 is in the
        key: the torch engine's MoE keeps its expert order for the all-to-all's return (`_layer_act`);
        without it, the first ep a search priced set every other's (86,070,329,344 B for mixtral's
        ep=8 under fsdp2, where its own layout gives 86,078,717,952)."""
        key = (layout.tp, layout.sequence_parallel, layout.ep > 1, recompute, kernel, engine, modules, to_mixer)
        if key not in self._acts:
            self._acts[key] = [_layer_act(a, layout, recompute, kernel, engine, modules)
                               for a in (self.acts_to_mixer if to_mixer else self.acts)]
        return self._acts[key]


def _chunk_layers(data: ModelData, layers: range) -> ChunkLayers:
    chosen = [data.plan.layers[i] for i in layers]
    first_with = {layer.mixer: layer for layer in reversed(chosen)}  # the first layer of each mixer
    stats = [n for layer in chosen for n in width_sharded_stats(layer)]
    s4 = sum(isinstance(layer.mixer, S4Plan) for layer in chosen)
    return ChunkLayers(
        s4=s4,
        sub_blocks=sum(1 + _tp_ffn(layer) for layer in chosen) - s4,
        # an MTP module with a final norm ends in it, whose backward saves the block's reduced
        # output: the module's re-run (checkpointed whole, `shard_stage`) cannot stop before it
        ends_tp=sum(recompute_skips_last_gemm(layer, data.plan.residual) for layer in chosen
                    if not (layer.where == "mtp" and data.plan.final_norm)),
        x_proj=_first_seen(layer.mixer.dt_rank + 2 * layer.mixer.d_state for layer in chosen
                           if isinstance(layer.mixer, Mamba1Plan)),
        stats=tuple((n, stats.count(n)) for n in sorted(set(stats))),
        kv=tuple((first_with[mixer], n) for mixer, n in _first_seen(
            layer.mixer for layer in chosen if isinstance(layer.mixer, AttentionPlan | MLAPlan))),
        conv=_first_seen(c for layer in chosen for c in long_conv_exchange(layer, data.plan.d_model) if c),
        scan=_first_seen((first_with[layer.mixer], way) for layer in chosen
                         if isinstance(layer.mixer, Mamba1Plan | Mamba2Plan) for way in (0, 1)),
        top_k=_first_seen(layer.ffn.top_k for layer in chosen if isinstance(layer.ffn, MoEPlan)),
        aux=_first_seen((layer.ffn.n_experts, layer.ffn.aux_loss_scope == "sequence") for layer in chosen
                        if isinstance(layer.ffn, MoEPlan) and layer.ffn.aux_loss_coef > 0),
        sp_norms=_first_seen(n for i in layers for n in data.sp_norms[i]),
        tp_summed=_first_seen(n for i in layers for n in data.tp_summed[i]),
    )


def _layer_acts(plan: ModelPlan, layer: LayerPlan, kept: dict[str, int], once: OncePerForward, seq: int) -> LayerActs:
    """`LayerActs` of one sequence through `layer`, which keeps `kept` bytes per recompute mode."""
    h = plan.d_model
    shared_input = plan.residual == "parallel" and len(layer.norms) == 1
    ffn_column = _tp_ffn(layer) and not shared_input
    gathered, reduced = _mixer_whole(layer, h)
    replicated = ACT_BYTES * seq * (h * (len(layer.norms) + ffn_column) + gathered + reduced)
    return LayerActs(kept, replicated, ACT_BYTES * seq * reduced, kept["none"] - kept["selective"],
                     LSE_BYTES * _heads(layer) * seq, ACT_BYTES * seq * h,
                     ACT_BYTES * seq * _glu_width(layer),
                     ACT_BYTES * seq * h * len(layer.norms),
                     ACT_BYTES * seq * _fp32_cast_width(layer, h),
                     *(seq * b for b in _routing_bytes(layer)),
                     _combine_rows(layer, seq, h),
                     seq * _weighting_delta(layer, h), _up_proj_bytes(layer, seq),
                     _latent_bytes(layer, seq), *_viewed_bytes(layer, seq),
                     _ssd_kept(layer, seq), _mamba1_kept(layer, seq),
                     _x_proj_bytes(layer, seq), *_kv_head_kept(layer, seq), once)


def _kv_head_kept(layer: LayerPlan, seq: int) -> tuple[int, int]:
    """(K/V heads, bytes one of them keeps for one sequence) of an attention mixer: its K and V
    (`analytic.memory._core_operand_bytes`) and K's qk-norm input. With fewer K/V heads than tp
    ranks each rank keeps a whole head (`_layer_act`); (0, 0) for other mixers."""
    a = layer.mixer
    if not isinstance(a, AttentionPlan):
        return 0, 0
    return a.n_kv_heads, ACT_BYTES * seq * a.head_dim * (2 + (a.qk_norm is not None))


def _before_ffn(plan: ModelPlan, layer: LayerPlan) -> LayerPlan | None:
    """A pre-norm layer with an FFN as its mixer's backward finds it, its FFN and the norm before
    that gone (their backward ran first); None where the mixer's backward is not after the FFN's
    alone (no FFN; post-norm and parallel blocks, whose norms and branches run otherwise)."""
    if plan.residual != "pre" or layer.ffn is None or layer.norms != ("norm1", "norm2"):
        return None
    return replace(layer, ffn=None, norms=layer.norms[:1])


def _held_above(per_layer: Sequence[float], layers: Sequence[int]) -> list[tuple[int, float]]:
    """Each layer of a chunk with the sum of `per_layer` over the chunk's layers after it, as a
    running sum from the top: linear in the layers, where a sum per layer was quadratic."""
    out: list[tuple[int, float]] = []
    above = 0.0
    for i in sorted(layers, reverse=True):
        out.append((i, above))
        above += per_layer[i]
    return out


def _by_layer(components: dict[str, int], paths: list[str], *, inclusive: bool = False) -> dict[str, int]:
    """Per layer path, the sum of the components inside it (`path.…`; `inclusive`: the one named
    `path` too), in one pass over the components (a scan of them per layer is quadratic in the
    layers: 126 for Llama 3.1 405B, and a 5,000-layer spec took minutes)."""
    out = dict.fromkeys(paths, 0)
    for key, value in components.items():
        parts = key.split(".")
        for end in range(1, len(parts) + inclusive):
            prefix = ".".join(parts[:end])
            if prefix in out:
                out[prefix] += value
    return out


def _tp_ffn(layer: LayerPlan) -> bool:
    """Whether the FFN is a tensor-parallel sub-block (gathered input, row-parallel output): a dense
    FFN, or an MoE layer's shared experts. Routed experts are whole on every tp rank (expert tensor
    parallelism 1), fed by each rank's own sequence shard: no TP collective of their own."""
    match layer.ffn:
        case FFNPlan():
            return True
        case MoEPlan():
            return layer.ffn.shared is not None
        case _:
            return False


def uses_early_stop(states: StatesConvention, early_stop: bool | None) -> bool:
    """Whether full recompute stops early: as given, else the engine's (torch's non-reentrant
    checkpoint stops early from PyTorch 2.1 on; Megatron-LM re-runs the whole layer)."""
    return states.engine == "torch" if early_stop is None else early_stop


# Residuals that normalize each sub-block's reduced output (`modules.block.Block.forward`)
NORM_AFTER_OUTPUT: frozenset[str] = frozenset({"post", "deepnorm", "sandwich", "reordered"})
# Residuals whose block starts with a norm of its input (`modules.block.Block.forward`)
NORM_ON_INPUT: frozenset[str] = frozenset({"pre", "parallel", "sandwich"})


def recompute_skips_last_gemm(layer: LayerPlan, residual: str) -> bool:
    """Whether an early-stopping recompute (torch.utils.checkpoint, non-reentrant, PyTorch >= 2.1:
    it stops once every tensor the backward saved is rebuilt) skips the layer's last row-parallel
    GEMM and its reduction: whether nothing is saved for the backward after them
    (`modules.moe.MoEFFN.forward`): a routed-only MoE layer ends in the experts' combine, whose
    inputs are saved, and a training load-balancing loss is computed after the shared experts; an
    S4 mixer with no FFN after it ends in its GLU, whose input is output_linear's reduced output
    (`_s4`), and its reductions are counted apart from the sub-blocks' anyway. A residual that
    normalizes the reduced output (post, DeepNorm, sandwich, reordered: `modules.block.Block`) ends
    every layer in a norm, whose backward saves that output, so nothing is skipped."""
    if residual in NORM_AFTER_OUTPUT:
        return False
    match layer.ffn:
        case MoEPlan():
            return layer.ffn.shared is not None and layer.ffn.aux_loss_coef == 0
        case None:
            return not isinstance(layer.mixer, S4Plan)
        case _:
            return True


def _sp_summed(layer: LayerPlan, name: str) -> bool:
    """A tensor that sees only a rank's sequence shard under SP: a block norm, or an MoE layer's
    router and shared gate (Megatron-Core marks them `sequence_parallel`; `distributed.plans`)."""
    if any(name.startswith(f"{layer.path}.{n}.") for n in layer.norms):
        return True
    return isinstance(layer.ffn, MoEPlan) and name.startswith(
        (f"{layer.path}.ffn.router.", f"{layer.path}.ffn.shared_gate."))


def _tp_summed(layer: LayerPlan, tensor: Tensor) -> bool:
    """Tensors run whole on every tp rank and read by the rank's heads only, so their gradients are
    partial sums over tp: MLA's latent down-projections and norms (torchtitan's DeepSeek-V3 plan),
    MQA's k-norm on its one KV head (k_proj and v_proj split by rows: `_qkv_gathered`), a
    qk-norm shared by the heads (`distributed.plans.qk_norm_styles`), Jamba's dt/B/C norms inside
    Mamba-1 (on x_proj's reduced output, read by every channel), Hyena's implicit filter trunk (run
    whole on every rank, feeding only its channels' filters) and S4's one SSM copy (read by every
    channel)."""
    mixer = f"{layer.path}.mixer."
    match layer.mixer:
        case MLAPlan():
            return tensor.split == "replicated" and tensor.name.startswith(mixer)
        case Mamba1Plan() | HyenaPlan():
            # the row-parallel out_proj's bias is replicated too, but added after the reduction
            return tensor.split == "replicated" and tensor.name.startswith(mixer) and ".out_proj." not in tensor.name
        case S4Plan():
            # S4's one SSM copy of (A, B, P), read by every rank's channels (`shards._s4`)
            return layer.mixer.n_ssm == 1 and tensor.units == 1 and tensor.name.startswith(mixer)
        case AttentionPlan():
            if layer.mixer.n_kv_heads == 1 and tensor.name.startswith(f"{mixer}k_norm."):
                return True
            # a qk-norm shared by the heads (scope `head`) runs replicated on each rank's heads
            return tensor.split == "replicated" and tensor.name.startswith((f"{mixer}q_norm.", f"{mixer}k_norm."))
        case Mamba2Plan() | StripedHyenaPlan():
            return False
        case _:
            assert_never(layer.mixer)


def width_sharded_stats(layer: LayerPlan) -> list[int]:
    """Per qk-norm normalising across the tp ranks' heads (scope `full`, OLMo-2: over
    n_heads·head_dim), the fp32 statistics per token it sums over tp
    (`distributed.plans.width_sharded_norm`): RMSNorm the sum of squares, LayerNorm the sum too.
    One KV head is whole on every rank: its k-norm needs none."""
    match layer.mixer:
        case AttentionPlan(qk_norm=qk) if qk is not None and qk.scope == "full":
            stats = 1 if qk.norm.kind == "rmsnorm" else 2
            return [stats] * (1 if layer.mixer.n_kv_heads == 1 else 2)
        case (AttentionPlan() | MLAPlan() | Mamba1Plan()
              | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan()):
            return []
        case _:
            assert_never(layer.mixer)


# Copies of an MoE layer's routed rows (k per token, d_model wide) alive at its combine beyond the
# tensors the layer saves for its backward (measured by verify --layout, DeepSeek-V3: the re-run
# layer's activations peak there): the experts' output, held by the caller while it is put back in
# token order (the un-sorted copy is saved by the weighted sum: counted), and the weighted product
# before the sum over k. Under EP the combine all-to-all holds as many beyond what is saved by
# then (the dispatch's gathered rows, the rows back in rank order and the all-to-all's output,
# the un-sorted copy not yet made). Real implementations hold two as well: torchtitan's
# `MoE.forward` keeps `routed_output` while it fills `routed_output_unsorted`, then makes the fp32
# copy `bmm` reads; Megatron-Core's `MoELayer.routed_experts_compute` keeps `expert_output` while
# `combine_preprocess` puts it back in rank order, and `token_combine`'s input lives while the
# all-to-all fills its output.
COMBINE_COPIES = 2


def _combine_rows(layer: LayerPlan, seq: int, h: int) -> int:
    """Bytes of one sequence's `COMBINE_COPIES` transient routed copies through an MoE layer."""
    if not isinstance(layer.ffn, MoEPlan):
        return 0
    return COMBINE_COPIES * ACT_BYTES * seq * layer.ffn.top_k * h


def _weighting_delta(layer: LayerPlan, h: int) -> int:
    """Per token, the bytes Megatron-Core's MoE layer keeps beyond archplan's torch MoE (negative:
    fewer) to weight each routed copy by its routing probability. The torch MoE weights the
    experts' outputs in the combine (`modules.moe`), whose weighted sum keeps the k outputs, d_model
    wide. Megatron-Core weights each copy inside the expert's activation instead, before the down
    projection, and un-permutes without probabilities (Megatron-LM MR 2668, "Memory efficient token
    permutation", April 2025: `TEGroupedMLP`'s `weighted_bias_swiglu_impl`): the activation keeps
    the k fp32 probabilities and no output. Activations without its fused weighted kernel (all but
    SwiGLU) multiply the activation's output by the probabilities, which keeps that output, d_ff
    wide, per copy."""
    if not isinstance(layer.ffn, MoEPlan):
        return 0
    moe, expert = layer.ffn, layer.ffn.expert
    fused = expert.kind == "glu" and expert.activation == "silu"
    product = 0 if fused else ACT_BYTES * expert.d_ff
    return moe.top_k * (PROB_BYTES + product - ACT_BYTES * h)


def _up_proj_bytes(layer: LayerPlan, seq: int) -> int:
    """Bytes of one sequence's MLA Q, K and V through a layer (`analytic.memory._mixer_bytes` counts
    them among what the layer keeps: every head's qk-wide query and key, v-wide value), which
    Megatron-Core's "mla_up_proj" recompute discards and rebuilds (`RecomputeModule`); 0 elsewhere."""
    if not isinstance(layer.mixer, MLAPlan):
        return 0
    m = layer.mixer
    return ACT_BYTES * seq * m.n_heads * (2 * m.qk_head_dim + m.v_head_dim)


def _latent_bytes(layer: LayerPlan, seq: int) -> int:
    """Bytes of one sequence's MLA latents through a layer, as `analytic.memory._mixer_bytes` counts
    them (the q and kv latent norms' inputs and the up-projections' inputs); 0 elsewhere. The
    torch engine replicates the down-projections and their norms over tp
    (`distributed.plans.mla_plan`: they run on every rank's gathered input), so every rank keeps
    them whole, where the rest of the layer splits by heads."""
    if not isinstance(layer.mixer, MLAPlan):
        return 0
    m = layer.mixer
    return ACT_BYTES * seq * 2 * ((m.q_lora_rank or 0) + m.kv_lora_rank)


def _viewed_bytes(layer: LayerPlan, seq: int) -> tuple[int, int]:
    """Bytes of one sequence through an MLA layer that the torch modules keep because a saved
    tensor is a view of a larger one (`analytic.memory.mla_view_widths`), and the part of them
    whole on every tp rank; (0, 0) elsewhere. The value's view keeps the keys' no-RoPE half, split
    over tp by heads; the kv latent norm's input keeps the RoPE key part, whole with the latents."""
    if not isinstance(layer.mixer, MLAPlan):
        return 0, 0
    value_view, latent_view = mla_view_widths(layer.mixer)
    rope = ACT_BYTES * seq * latent_view
    return ACT_BYTES * seq * value_view + rope, rope


def _ssd_kept(layer: LayerPlan, seq: int) -> int:
    """Bytes of one sequence a Mamba-2 layer's torch modules keep beyond what mamba_ssm's kernels
    keep (`analytic.memory.ssd_unit_bytes`, its contractions in fp32: without autocast the unit
    computes in fp32); 0 elsewhere."""
    if not isinstance(layer.mixer, Mamba2Plan):
        return 0
    return ssd_unit_bytes(layer.mixer, seq, ACT_BYTES, FP32_BYTES)


def _mamba1_kept(layer: LayerPlan, seq: int) -> int:
    """Bytes of one sequence a Mamba-1 layer's torch modules keep beyond what mamba_ssm's kernels
    keep (`analytic.mamba.mamba1_unit_bytes`: the conv's output before its SiLU, and not the
    selective-scan kernel's fp32 chunk states); 0 elsewhere."""
    if not isinstance(layer.mixer, Mamba1Plan):
        return 0
    return mamba1_unit_bytes(layer.mixer, 1, seq, ACT_BYTES)


def _x_proj_bytes(layer: LayerPlan, seq: int) -> int:
    """Bytes of one sequence a Mamba-1 layer keeps of x_proj's output [dt | B | C] (dt_rank +
    2·d_state per token; `analytic.mamba.mamba1_activation_bytes` counts it) and of Jamba's dt/B/C
    norms' outputs: x_proj contracts a rank's channels, and its partial sums are all-reduced over
    tp (and over cp, on whole sequences: `distributed.plans.mamba1_plan`, `distributed.context`),
    so every rank keeps the whole sum and the norms run on it whole, where the rest of the mixer
    splits by channels. 0 elsewhere."""
    if not isinstance(layer.mixer, Mamba1Plan):
        return 0
    m = layer.mixer
    width = m.dt_rank + 2 * m.d_state
    return ACT_BYTES * seq * width * (2 if m.inner_norms else 1)


def _combine_working_set(acts: LayerActs, layout: Layout) -> float:
    """`LayerActs.combine` on one rank: each tp rank routes its own sequence shard under SP
    (expert tensor parallelism 1) and every token without it, as the EP all-to-all's payload."""
    return acts.combine / (layout.tp if layout.sequence_parallel else 1)


def _fp32_cast_width(layer: LayerPlan, h: int) -> int:
    """Per token, the 16-bit elements the torch modules keep of a layer's inputs beyond the one
    copy the per-tensor model counts, for the fp32 copies they make of a 16-bit input
    (`analytic.memory.input_copies`): an MoE router's fp32 copy, the one kept for its weight's
    gradient, beside the 16-bit input its shared experts read. The norms compute on fp32 copies
    too but keep their inputs in their own dtype (`modules.norms`' units), as fused norms do."""
    if not isinstance(layer.ffn, MoEPlan):
        return 0
    return h * input_copies(layer.ffn, counted=1, wide=False)


def _routing_bytes(layer: LayerPlan) -> tuple[int, int]:
    """Per token, an MoE layer's (routing, expert order) metadata in the torch modules, beyond the
    per-tensor model's 16-bit probabilities and weights (`memory.moe_routing_bytes`); (0, 0)
    elsewhere."""
    if not isinstance(layer.ffn, MoEPlan):
        return 0, 0
    return moe_routing_bytes(layer.ffn, ACT_BYTES)


def _glu_width(layer: LayerPlan) -> int:
    """Per token, the widths of gated FFNs whose activation reads its input (SiLU, GELU): eager
    autograd keeps act(gate) beside gate, up and their product; a fused SwiGLU (Megatron-LM's
    `bias_swiglu_impl`) keeps only [gate | up] and the product and recomputes act(gate)."""
    def width(f: FFNPlan | None) -> int:
        return f.d_ff if f is not None and f.kind == "glu" and f.activation != "relu" else 0

    match layer.ffn:
        case FFNPlan():
            return width(layer.ffn)
        case MoEPlan():
            return layer.ffn.top_k * width(layer.ffn.expert) + width(layer.ffn.shared)
        case _:
            return 0


def _mixer_whole(layer: LayerPlan, h: int) -> tuple[int, int]:
    """Per token, what the mixer keeps whole on every tp rank without SP, as (gathered, reduced):
    the input of its column-parallel projection (h), which DTensor's matmul also saves gathered
    under SP; S4 has none (it convolves its rank's slice of the input channels, `shards._s4`) but
    keeps the 2h input of the GLU that follows its row-parallel output_linear, reduced whole on
    every rank, and reduce-scattered into sequence shards under SP
    (`distributed.plans.s4_plan`)."""
    match layer.mixer:
        case S4Plan():
            return 0, 2 * h
        case AttentionPlan() | MLAPlan() | Mamba1Plan() | Mamba2Plan() | HyenaPlan() | StripedHyenaPlan():
            return h, 0
        case _:
            assert_never(layer.mixer)


def long_conv_exchange(layer: LayerPlan, h: int) -> tuple[int, int]:
    """Per token, (in, out) channels a long-conv mixer moves between sequence and channel shards
    under context parallelism (0, 0 for other mixers). A causal long convolution needs every
    earlier position, so its CP ranks trade sequence shards for channel shards by an all-to-all,
    run every depthwise operation (short conv, gates, FFT convolutions) on whole sequences of
    their channels, and trade back (the head-sharding all-to-all of DeepSpeed-Ulysses, Jacobs
    et al. 2023, applied to channels): in, what the mixer's first convolution reads (S4 its input,
    Hyena the (N_o+1)·D short-conv channels, StripedHyena the 3D FIR channels); out, D."""
    match layer.mixer:
        case S4Plan():
            return h, h
        case HyenaPlan():
            return (layer.mixer.order + 1) * h, h
        case StripedHyenaPlan():
            return 3 * h, h
        case AttentionPlan() | MLAPlan() | Mamba1Plan() | Mamba2Plan():
            return 0, 0
        case _:
            assert_never(layer.mixer)


def _group_spread(m: Mamba2Plan, tp: int, cp: int) -> tuple[int, int]:
    """(g, r): the groups a tp rank holds (at least one: fewer groups than tp ranks replicate
    them), and how many cp ranks each of them goes to whole (`mamba_exchange`)."""
    g = max(m.n_groups // tp, 1)
    return g, max(cp // g, 1)


def mamba_exchange(layer: LayerPlan, tp: int, cp: int, engine: Engine) -> tuple[int, ...]:
    """Per token, the channels of each all-to-all a Mamba mixer's tp rank sends each way under
    context parallelism (() for other mixers): in_proj's output to channel shards, the scan's
    output back (Megatron-Core `MambaContextParallel.pre_conv_ssm` / `post_conv_ssm`; the
    DeepSpeed-Ulysses exchange of Jacobs et al. 2023 over channels). Mamba-1 sends [x | z] (2I)
    and gets y (I) back. Mamba-2 sends [z | x | B | C | dt], 2I + 2·G·N + Hs, where a tp rank with
    fewer groups g = G/tp than cp repeats each group's B and C for its cp/g ranks (r = cp/g), and
    gets y back; the torch engine's gated RMSNorm (one module) then takes the gate z back with y
    (2I) when groups span ranks, where Megatron gates inside its fused scan kernel."""
    mixer = layer.mixer
    match mixer:
        case Mamba1Plan():
            return 2 * mixer.d_inner // tp, mixer.d_inner // tp
        case Mamba2Plan():
            i, (g, r) = mixer.d_inner // tp, _group_spread(mixer, tp, cp)
            back = 2 * i if r > 1 and engine == "torch" else i
            return 2 * i + 2 * g * r * mixer.d_state + mixer.n_heads // tp, back
        case AttentionPlan() | MLAPlan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return ()
        case _:
            assert_never(mixer)


def _heads(layer: LayerPlan) -> int:
    match layer.mixer:
        case AttentionPlan() | MLAPlan():
            return layer.mixer.n_heads
        case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return 0
        case _:
            assert_never(layer.mixer)


@lru_cache(maxsize=32)
def model_data(plan: ModelPlan, seq: int) -> ModelData:
    return ModelData(plan, seq)


def _own_unit(t: Tensor, tp: int, ep: int) -> bool:
    """Whether an expert tensor is sharded and reduced apart from the dense weights: only when
    other ranks hold it than hold them (ep splits the experts; under tp every tp rank holds them
    whole). At ep = tp = 1 the same dp·cp ranks hold both, so they share the block's FSDP unit
    (`distributed.shard`) and its records."""
    return t.expert and (ep > 1 or tp > 1)


@lru_cache(maxsize=65536)
def _local_numel(tensors: tuple[Tensor, ...], tp: int, ep: int) -> tuple[int, int]:
    """(dense, expert) elements of these tensors on tp/ep rank 0."""
    dense = expert = 0
    for t in tensors:
        n = t.local_numel(tp, ep)
        if _own_unit(t, tp, ep):
            expert += n
        else:
            dense += n
    return dense, expert


@lru_cache(maxsize=65536)
def _local_fp8_numel(tensors: tuple[Tensor, ...], tp: int, ep: int) -> tuple[int, int]:
    """`_local_numel` of the weights FP8 primary weights keep in fp8 (`shards.fp8_weight`)."""
    return _local_numel(tuple(t for t in tensors if fp8_weight(t)), tp, ep)


@lru_cache(maxsize=65536)
def _fsdp_numel(tensors: tuple[Tensor, ...], tp: int, ep: int, dp: int, edp: int) -> tuple[int, int]:
    """(dense, expert) elements of FSDP2's padded dim-0 shards of these tensors (rank 0)."""
    dense = expert = 0
    for t in tensors:
        shape = t.local_shape(tp, ep)
        rest = math.prod(shape[1:])
        own = _own_unit(t, tp, ep)
        if own and shape[0] < edp and shape[1] % edp == 0:
            # fewer local experts than shards: FSDP2 shards dim 1 instead where it splits evenly
            # (`distributed.shard`, torchtitan's `_experts_shard_placement_fn`); otherwise dim 0, padded
            expert += shape[0] * (shape[1] // edp) * math.prod(shape[2:])
        elif own:
            expert += math.ceil(shape[0] / edp) * rest
        else:
            dense += math.ceil(shape[0] / dp) * rest
    return dense, expert


# ----------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class Chunk:
    """One model chunk (virtual stage) of a pipeline rank."""

    index: int  # in model order, 0 … pp·vpp − 1
    layers: range
    first: bool
    last: bool


def rank_chunks(n_layers: int, layout: Layout, stage: int, tail: int = 0) -> tuple[Chunk, ...]:
    """Pipeline rank `stage`'s chunks (`pipeline_chunks`; `tail`: the MTP blocks after n_layers)."""
    return _rank_chunks(n_layers, layout.pp, layout.vpp, stage, tail)


UseKind = Literal["forward", "recompute", "backward"]


@dataclass(frozen=True)
class FetchUse:
    """One use of a module in a rank's micro-batch (`fetch_trace`): `layer` its layer's index, or
    "embedding" / "head" for the ends."""

    module: Module
    tensors: tuple[Tensor, ...]
    layer: int | Literal["embedding", "head"]
    kind: UseKind


def _uses(found: list[tuple[Module, tuple[Tensor, ...]]], name: str,
          layer: int | Literal["embedding", "head"], kind: UseKind) -> list[FetchUse]:
    """A block's module uses; a block with nothing to fetch still carries its compute (one use of
    an empty module)."""
    return ([FetchUse(m, ts, layer, kind) for m, ts in found] if found
            else [FetchUse(Module(name, 0, 0, False), (), layer, kind)])


def fetch_trace(data: ModelData, layout: Layout, stage: int) -> tuple[tuple[FetchUse, ...], dict[str, int], int]:
    """`_fetch_trace` with its `zero3_fetch.fetch_counts` and `peak_gathered`, once per split:
    many layouts share them."""
    key = (layout.tp, layout.ep, layout.pp, layout.vpp, stage, layout.recompute)
    if key not in data._fetch:
        trace = _fetch_trace(data, layout, stage)
        modules_used = [use.module for use in trace]
        data._fetch[key] = (trace, fetch_counts(modules_used), peak_gathered(modules_used))
    return data._fetch[key]


def _fetch_trace(data: ModelData, layout: Layout, stage: int) -> tuple[FetchUse, ...]:
    """The modules one micro-batch uses on a pipeline rank, in order: its chunks' forward (the
    embedding first, the head last), then the backward in reverse, each layer re-run forward
    before its backward under full recompute (one checkpoint per layer). A tied head at pp = 1 is
    the embedding itself. Several chunks per rank would run back to back, but DeepSpeed does not
    combine ZeRO-3 with pipeline parallelism (`parallel.states_problem`): one chunk per rank."""
    tp, ep = layout.tp, layout.ep
    forward: list[FetchUse] = []
    backward: list[FetchUse] = []
    for chunk in rank_chunks(data.n_main, layout, stage, data.mtp_depth):
        blocks: list[list[FetchUse]] = []
        first = data.modules("first", tp, ep) if chunk.first else []
        if chunk.first:
            forward += _uses(first, "embed", "embedding", "forward")
            blocks.append(_uses(first, "embed", "embedding", "backward"))
        for i in chunk.layers:
            found = data.modules(i, tp, ep)
            path = data.plan.layers[i].path
            forward += _uses(found, path, i, "forward")
            redo = _uses(found, path, i, "recompute") if layout.recompute == "full" else []
            blocks.append(redo + _uses(found, path, i, "backward")[::-1])
        if chunk.last:
            head = list(data.modules("last_tied_copy" if layout.pp > 1 else "last", tp, ep))
            if data.plan.tied and layout.pp == 1:
                head += [(m, ts) for m, ts in data.modules("first", tp, ep) if m.name == "embed"]
            forward += _uses(head, "lm_head", "head", "forward")
            blocks.append(_uses(head, "lm_head", "head", "backward"))
        backward = [use for block in reversed(blocks) for use in block] + backward
    return tuple(forward + backward)


@lru_cache(maxsize=16384)  # the search prices each (pp, vpp) split's stages for many layouts
def _rank_chunks(n_layers: int, pp: int, vpp: int, stage: int, tail: int = 0) -> tuple[Chunk, ...]:
    chunks = pipeline_chunks(n_layers, pp, vpp, tail)[stage]
    total = pp * vpp
    return tuple(Chunk(stage + v * pp, layers, stage + v * pp == 0, stage + v * pp == total - 1)
                 for v, layers in enumerate(chunks))


def representative_stages(n_layers: int, pp: int, vpp: int, tail: int, kinds: Sequence[int]) -> tuple[int, ...]:
    """One pipeline rank per distinct set of chunks and ends: the lowest, which holds the most
    in-flight micro-batches of its group, so it is the group's most loaded rank (memory) and every
    rank of the group takes the same time. Chunks are alike when their blocks are, in order
    (`kinds`: equal numbers for equal blocks, `ModelData.layer_kinds`, which caches the groups per
    split). Chunk sizes alone made DeepSeek-V3's stage 1 at PP32 (two of its three dense layers)
    stand for the MoE stages after it: 40 GiB printed where they need 98 to 430 GiB."""
    seen: dict[tuple[object, ...], int] = {}
    for stage, ranges in enumerate(pipeline_chunks(n_layers, pp, vpp, tail)):
        chunks = tuple(tuple(kinds[r.start:r.stop]) for r in ranges)
        seen.setdefault((chunks, stage == 0, stage == pp - 1), stage)
    return tuple(sorted(seen.values()))


def in_flight(layout: Layout, microbatches: int, stage: int) -> tuple[int, ...]:
    """Micro-batches whose activations each of the rank's chunks holds at the schedule's peak.
    Interleaved: the warm-up of Megatron-LM's `get_pp_rank_microbatches`, 2(p − r − 1) + (v − 1)·N
    chunk forwards, + the first steady-state forward, at most m·v; the forwards run in rounds of N
    micro-batches through chunk 0, then 1, …, the last round taking every remaining micro-batch
    (`get_schedule_table`)."""
    p, v, m, n = layout.pp, layout.vpp, microbatches, round_size(layout, microbatches)
    if v == 1:
        return (min(p - stage, m),)
    forwards = min(m * v, 2 * (p - stage - 1) + (v - 1) * n + 1)
    counts = [0] * v
    for size in _round_sizes(m, n):
        if not forwards:
            break
        for chunk in range(v):
            take = min(size, forwards)
            counts[chunk] += take
            forwards -= take
    return tuple(counts)


def _round_sizes(m: int, n: int) -> Iterator[int]:
    """The interleaved schedule's rounds over m micro-batches: n each, the last the rest."""
    return (min(n, m - start) for start in range(0, m, n))


class PipelineMoment(NamedTuple):
    """A moment of the schedule on one pipeline rank, before a backward: the micro-batches each
    chunk holds, the chunk that just ran forward (None where a backward ran last: the cool-down)
    and the one whose backward comes next."""
    counts: tuple[int, ...]
    forward: int | None
    backward: int


def pipeline_moments(layout: Layout, microbatches: int, stage: int) -> tuple[PipelineMoment, ...]:
    """Every distinct moment before a backward, `in_flight`'s mix among them. With one chunk
    there is one (the cool-down's hold less of the same chunk). With several the total held stays
    warm-up + 1, but later rounds hold more of the early chunks: a rank whose last chunk is light
    (the head's chunk of an uneven split) peaks there, at two rounds or more (measured by verify
    --layout: tiny-mamba, PP2×v2, m = 4, stage 1); and the cool-down's backwards re-run their
    chunks' layers under full recompute (`_interleaved_moments`)."""
    if layout.vpp == 1:
        return (PipelineMoment(in_flight(layout, microbatches, stage), 0, 0),)
    return _interleaved_moments(layout.pp, layout.vpp, microbatches, round_size(layout, microbatches), stage)


def _steady_microbatches(p: int, v: int, m: int, n: int) -> int:
    """The fewest micro-batches, congruent to m modulo the round size n, whose interleaved schedule
    (`_interleaved_segments`) runs every phase that m's does: its warm-up (at most 2·(p − 1) +
    (v − 1)·n forwards), rounds of the steady state, the last round's rest and the cool-down. Past
    a few rounds the steady state repeats one round's events exactly, each chunk's held count
    included, so the moments before backwards and each chunk's last prefetch are those of m (tested
    against the whole schedule): a search at a short sequence and a large batch, 10⁵ micro-batches
    a step, need not replay them all."""
    rounds = -(-(2 * (p - 1) + (v - 1) * n) // (v * n)) + 4
    if m <= (rounds + 1) * n:
        return m
    return m - n * ((m - rounds * n) // n)


class _Segment(NamedTuple):
    """`count` steps of the interleaved schedule that repeat one pattern: a forward of chunk
    `forward`, then a backward of chunk `backward` (None: that half is absent, the warm-up's
    forwards or the cool-down's backwards)."""
    forward: int | None
    backward: int | None
    count: int


def _interleaved_segments(p: int, v: int, m: int, n: int, stage: int) -> list[_Segment]:
    """The interleaved schedule on rank `stage`, in runs: forwards in rounds of n micro-batches
    through chunk 0, then 1, … (the last round takes the rest, as `in_flight`'s), backwards in the
    same rounds with the chunks reversed (Megatron-LM `get_schedule_table`, `get_model_chunk_id`);
    the warm-up forwards, then one forward and one backward alternately, then the remaining
    backwards. Runs, not events: a round of 10⁵ micro-batches is a few segments."""
    sizes = list(_round_sizes(m, n))
    forward = [[c, size] for size in sizes for c in range(v)]
    backward = [[c, size] for size in sizes for c in reversed(range(v))]

    def take(runs: list[list[int]], most: int) -> tuple[int, int]:
        """(chunk, count) of the next run's first `most` steps or fewer, consumed."""
        chunk, left = runs[0]
        count = min(left, most)
        if count == left:
            runs.pop(0)
        else:
            runs[0][1] -= count
        return chunk, count

    segments = []
    warmup = min(m * v, 2 * (p - stage - 1) + (v - 1) * n)
    while warmup:
        chunk, count = take(forward, warmup)
        segments.append(_Segment(chunk, None, count))
        warmup -= count
    while forward:
        a, b = forward[0][0], backward[0][0]
        count = min(forward[0][1], backward[0][1])
        take(forward, count)
        take(backward, count)
        segments.append(_Segment(a, b, count))
    segments += [_Segment(None, chunk, count) for chunk, count in backward]
    return segments


@lru_cache(maxsize=4096)
def _interleaved_moments(p: int, v: int, m: int, n: int, stage: int) -> tuple[PipelineMoment, ...]:
    """`pipeline_moments` of the interleaved schedule (`_interleaved_segments`): the held mix before
    each backward, after the forward or the backward before it. Those after a backward hold less,
    but under full recompute the backward's chunk re-runs its layers there: a rank whose layers
    all sit in its first chunk re-runs them only in the cool-down (measured by verify --layout:
    tiny-mamba, PP2×v2, two micro-batches, stage 1, 1.51 times the activations priced without it).
    Within a segment the held counts step by the same vector and the two chunks stay, so anything
    linear in the counts, as a rank's activations are, peaks at the segment's first or last
    moment: those two are kept (tested against the whole schedule)."""
    counts = [0] * v
    moments = set()
    last_forward: int | None = None
    for a, b, count in _interleaved_segments(p, v, _steady_microbatches(p, v, m, n), n, stage):
        if b is None:  # warm-up forwards: no backward follows within the segment
            counts[a] += count
            last_forward = a
            continue
        steps = (0, count - 1) if count > 1 else (0,)
        for k in steps:
            held = list(counts)
            if a is None:  # cool-down: after the previous backward, or the warm-up's last forward
                held[b] -= k
                forward = last_forward if k == 0 else None
            else:  # after k + 1 forwards of chunk a and k backwards of chunk b
                held[a] += k + 1
                held[b] -= k
                forward = a
            moments.add(PipelineMoment(tuple(held), forward, b))
        if a is not None:
            counts[a] += count
        counts[b] -= count
        last_forward = None
    # a moment after a backward adds nothing beside its held mix but its backward's own terms, so
    # one holding no more of any chunk than another before the same chunk's backward cannot peak
    kept = [moment for moment in moments if moment.forward is not None or not any(
        other != moment and other.backward == moment.backward
        and all(a <= b for a, b in zip(moment.counts, other.counts)) for other in moments)]
    return tuple(sorted(kept, key=lambda moment: (moment.counts, moment.forward is None, moment.forward or 0,
                                                  moment.backward)))


def fsdp2_stale_prefetch(layout: Layout, microbatches: int, stage: int) -> tuple[bool, ...]:
    """For each of the rank's chunks, whether FSDP2's implicit backward prefetch gathers a unit
    in vain in the chunk's last backward of the step. Each unit records an index per forward and
    pops the latest in each backward; the chunk's first unit prefetches the unit recorded just
    before its popped index, the previous forward's last one. Popped in the last backward, that
    index is the chunk's first forward's (0: no prefetch) unless the chunk ran every backward of
    its earlier forwards first, as the interleaved schedule's later rounds do; the unit then
    prefetched was resharded by its own last backward, and `finalize_backward` drops the gather
    (measured by verify --layout: one extra all-gather of the chunk's last layer a step)."""
    if layout.vpp == 1:
        return (False,)
    return _stale_prefetch(layout.pp, layout.vpp, microbatches, round_size(layout, microbatches), stage)


@lru_cache(maxsize=4096)
def _stale_prefetch(p: int, v: int, m: int, n: int, stage: int) -> tuple[bool, ...]:
    # each chunk's stack of recorded forward indices, as runs [first, last + 1)
    stacks: list[list[list[int]]] = [[] for _ in range(v)]
    recorded = [0] * v
    popped = [0] * v

    def push(c: int, count: int) -> None:
        stacks[c].append([recorded[c], recorded[c] + count])
        recorded[c] += count

    def pop(c: int, count: int) -> None:
        while count:
            top = stacks[c][-1]
            out = min(count, top[1] - top[0])
            top[1] -= out
            popped[c] = top[1]
            if top[0] == top[1]:
                stacks[c].pop()
            count -= out

    for a, b, count in _interleaved_segments(p, v, _steady_microbatches(p, v, m, n), n, stage):
        if a is not None and a == b:  # each backward pops the index its forward just pushed
            recorded[a] += count
            popped[a] = recorded[a] - 1
            continue
        if a is not None:
            push(a, count)
        if b is not None:
            pop(b, count)
    return tuple(last != 0 for last in popped)


def _layer_act(acts: LayerActs, layout: Layout, recompute: Recompute, kernel: AttentionKernel,
               engine: Engine, modules: frozenset[RecomputeModule] = frozenset()) -> float:
    """Kept bytes of one sequence through one layer on one rank (before the cp split)."""
    tp, sp = layout.tp, layout.sequence_parallel
    if recompute == "full":
        return acts.block_input / (tp if sp else 1)
    # with fewer K/V heads than tp ranks a rank keeps the whole head its query heads read, where
    # splitting `kept` over tp leaves it n_kv/tp of one (Megatron-Core's `num_query_groups <
    # world_size` branch, `distributed.plans.KVHeads`; `_qkv_gathered`)
    shared_head = acts.kv_head_kept * (1 - acts.kv_heads / tp) if 0 < acts.kv_heads < tp else 0
    return shared_head + _split_kept(acts, layout, recompute, kernel, engine, modules)


def _split_kept(acts: LayerActs, layout: Layout, recompute: Recompute, kernel: AttentionKernel,
                engine: Engine, modules: frozenset[RecomputeModule]) -> float:
    """`_layer_act` short of full recompute, the kept bytes split over tp as the heads and
    channels split."""
    tp, sp = layout.tp, layout.sequence_parallel
    # what a module recompute drops: MLA's Q, K and V, split over the heads (so over tp) as the
    # rest of `kept`
    dropped = acts.up_proj if "mla_up_proj" in modules else 0
    kept, replicated = acts.kept[recompute] - dropped, acts.replicated
    column = replicated - acts.norm_inputs - acts.reduced  # the column-parallel projections' inputs
    match kernel:
        case "flash" if engine == "torch":
            # a fused SDPA kernel inside plain autograd: act(gate) is kept, an MoE router's fp32
            # input copy (`_fp32_cast_width`) and routing metadata (`_routing_bytes`), and what
            # the Mamba units keep beyond mamba_ssm (`_ssd_kept`, `_mamba1_kept`); selective
            # recompute checkpoints the kernel alone, which then keeps no log-sum-exp
            lse = acts.lse if recompute == "none" else 0
            routing = acts.routing + (acts.expert_order if layout.ep > 1 else 0)
            kept = (acts.kept["selective"] - dropped + lse + acts.fp32_inputs + routing + acts.ssd_kept
                    + acts.mamba1_kept)
        case "flash":
            # Megatron-Core with Transformer Engine's fusions: a fused SwiGLU, memory-efficient
            # norms, and routed copies weighted inside the experts (`_weighting_delta`)
            kept = (acts.kept["selective"] - dropped + acts.lse - acts.glu_extra - acts.norm_inputs
                    + acts.weighting)
            replicated -= acts.norm_inputs
        case "eager":
            pass
        case _:
            assert_never(kernel)
    whole = 0
    if engine == "torch":  # `_latent_bytes`, `_viewed_bytes`, `_x_proj_bytes`
        kept += acts.viewed
        whole = acts.latent + acts.viewed_latent + acts.x_proj_whole
    if sp:
        match engine:
            case "megatron":  # the column input kept sequence-sharded, re-gathered in the backward
                return kept / tp
            case "torch":  # DTensor's matmul saves its gathered (Replicate) input
                return column + whole + (kept - column - whole) / tp
            case _:
                assert_never(engine)
    return replicated + whole + (kept - replicated - whole) / tp


def _once_kept(acts: LayerActs, layout: Layout) -> float:
    """Bytes one micro-batch's forward keeps of a long convolution's filters or Mamba-1's A on one
    rank (`OncePerForward`)."""
    f = acts.once
    return f.channels / (layout.tp * layout.cp) + f.tp_channels / layout.tp + f.whole


def _cp_keeps_gathered(layout: Layout, engine: Engine) -> bool:
    """Whether context parallelism keeps anything beyond the per-token model (`_cp_kept`,
    `_cp_shared`): only the torch engine's, and only with cp > 1."""
    return layout.cp > 1 and engine != "megatron"


def _attention_gathers(cp_comm: CPComm) -> bool:
    """Whether the torch engine's attention keeps the gathered K/V and the masks: under its
    all-gather (`distributed/context.py`), not under ring attention, which keeps only the rank's
    own K/V and re-rotates the others' in the backward with causal blocks and no mask (torch's
    `context_parallel` ring attention, as Transformer Engine's ring). A Mamba-2 or long-conv layer's
    exchange is the same under either."""
    return cp_comm == "all_gather"


def _cp_kept(data: ModelData, layout: Layout, layer: int, engine: Engine,
             cp_comm: CPComm = "all_gather") -> float:
    """Bytes one micro-batch keeps through one attention layer beyond the per-token model under
    the torch engine's context parallelism (`distributed/context.py`, measured by verify
    --layout): SDPA saves the all-gathered K and V of the whole sequence, where the per-token
    model counts the rank's own; MLA keeps, for the keys of the other ranks, the gathered latent
    [c_kv | k_pe] (kv_b_proj's input, `_kv_bytes`), kv_b_proj's output [K_nope | V] (Dn + Dv per
    head, V a view of it) and SDPA's K (Dn + R per head). Megatron's
    all-gather CP (Transformer Engine) re-gathers them in the backward instead. A Mamba-2 layer
    whose groups span cp ranks keeps their repeated B and C (`_group_repeat_bytes`), a Mamba-1
    layer x_proj's output, all-reduced over cp on whole sequences (`_x_proj_bytes`)."""
    if not _cp_keeps_gathered(layout, engine):
        return 0.0
    plan, cp, tp = data.plan, layout.cp, layout.tp
    mixer = plan.layers[layer].mixer
    if isinstance(mixer, AttentionPlan | MLAPlan) and not _attention_gathers(cp_comm):
        return 0.0
    match mixer:
        case AttentionPlan():
            per_sequence = _kv_bytes(plan.layers[layer], data.seq, tp, engine)
        case MLAPlan():
            heads = math.ceil(mixer.n_heads / tp)
            per_sequence = _kv_bytes(plan.layers[layer], data.seq, tp, engine) + ACT_BYTES * data.seq * heads * (
                mixer.qk_head_dim + mixer.qk_nope_head_dim + mixer.v_head_dim)
        case Mamba2Plan():
            return layout.mb * _group_repeat_bytes(mixer, data.seq, tp, cp)
        case Mamba1Plan():
            # x_proj's output, all-reduced over cp on whole sequences, and its norms' (`_x_proj_bytes`)
            per_sequence = data.acts[layer].x_proj_whole
        case S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return 0.0
        case _:
            assert_never(mixer)
    return layout.mb * per_sequence * (cp - 1) / cp


def _group_repeat_bytes(m: Mamba2Plan, seq: int, tp: int, cp: int) -> float:
    """Bytes one sequence keeps through a Mamba-2 layer on one rank beyond the per-token model
    when a tp rank holds fewer groups than there are cp ranks (`mamba_exchange`'s r = cp/g > 1):
    - each cp rank holds its group's B and C whole, g·r/cp groups where the per-token model
      splits G over tp·cp: in in_proj's exchanged output, the conv's output and its SiLU
      (2·N channels a group, per token of the whole sequence), and C·Bᵀ (fp32, n_c·q² a group);
    - the gated RMSNorm runs after the exchange back (`distributed.context`), and keeps the
      [y | z] it receives (2·I/tp per token of the rank's T/cp), where the scan's output and z
      were kept already.
    Measured by verify --layout (tiny Mamba-2, tp 2, cp 2, full recompute)."""
    g, r = _group_spread(m, tp, cp)
    if r == 1:
        return 0.0
    groups = (g * r - m.n_groups / tp) / cp
    q, chunks = ssd_chunks(m, seq)
    repeated = 3 * ACT_BYTES * seq * 2 * m.d_state * groups + FP32_BYTES * chunks * q * q * groups
    return repeated + ACT_BYTES * seq / cp * 2 * m.d_inner / tp


def _cp_shared(data: ModelData, layout: Layout, layers: range, engine: Engine,
               cp_comm: CPComm = "all_gather") -> int:
    """Bytes a model chunk holds once under the torch engine's context parallelism: the global
    positions of the rank's tokens and of the gathered keys (int64) and, per distinct window,
    the additive mask of its queries against every key in the compute dtype (T/cp × T, × the
    rank's heads with ALiBi), shared by the layers and micro-batches and kept by SDPA for the
    backward; with long convolutions, the gathered keys' positions and their sequence order
    (`distributed.context.ContextShard.to_channels`). FlashAttention with bottom-right causal
    alignment (Transformer Engine) needs none."""
    if not _cp_keeps_gathered(layout, engine):
        return 0
    plan, cp, seq = data.plan, layout.cp, data.seq
    mixers = [plan.layers[i].mixer for i in layers]
    attention = [m for m in mixers if isinstance(m, AttentionPlan | MLAPlan) and _attention_gathers(cp_comm)]
    long_conv = any(long_conv_exchange(plan.layers[i], 1)[0] or mamba_exchange(plan.layers[i], 1, cp, engine)
                    for i in layers)
    if not (attention or long_conv):
        return 0
    ids = (seq // cp if attention else 0) + seq + (seq if long_conv else 0)
    if not attention:
        return TOKEN_ID_BYTES * ids
    return TOKEN_ID_BYTES * ids + _shared_masks(data, layout, attention)


def _shared_masks(data: ModelData, layout: Layout, attention: list[AttentionPlan | MLAPlan]) -> int:
    """Bytes of the additive masks a model chunk's attention layers share, one per distinct
    window, in the compute dtype: the rank's T/cp queries against every key, × the rank's heads
    with ALiBi."""
    heads = math.ceil(attention[0].n_heads / layout.tp) if data.plan.position == "alibi" else 1
    windows = {m.window for m in attention}
    return len(windows) * ACT_BYTES * heads * (data.seq // layout.cp) * data.seq


def _shared_bias(data: ModelData, layout: Layout, layers: range, engine: Engine) -> int:
    """Bytes of the ALiBi biases and sliding-window masks a model chunk holds on a rank of the
    torch engine outside context parallelism: per distinct window, one (H/tp, T, T) additive
    ALiBi bias, or without ALiBi one (T, T) additive mask per sliding window, in the compute dtype,
    built once and shared by the chunk's layers, micro-batches and re-runs
    (`modules.attention.BiasCache`), and kept by SDPA for the backward. Under context parallelism
    the shard's masks are `_cp_shared`'s; FlashAttention's own ALiBi and windows (slopes and
    bounds, no tensor) and Megatron-Core keep none."""
    plan = data.plan
    if engine != "torch" or layout.cp > 1:
        return 0
    attention = [plan.layers[i].mixer for i in layers if isinstance(plan.layers[i].mixer, AttentionPlan | MLAPlan)]
    if plan.position != "alibi":  # full causal attention runs SDPA's is_causal, with no mask
        attention = [m for m in attention if m.window is not None]
    return _shared_masks(data, layout, attention) if attention else 0


def _rope_tables(data: ModelData, layout: Layout, layers: range, engine: Engine) -> int:
    """Bytes of the rotary tables a model chunk holds on a rank of the torch engine: per rotary
    width and position set, one (T, R) cos and one sin in the compute dtype, built once and shared
    by the chunk's layers, micro-batches and re-runs (`modules.positions.RopeTables`), and kept by
    the rotation's products for the backward. They are whole on every tp rank (R is every head's
    rotary width), at the rank's T/cp positions; MLA under context parallelism rotates its
    gathered keys at the whole sequence's as well (`modules.mla.MLA._context_parallel`).
    Megatron-Core's GPTModel builds one fp32 table for every layer, 4·R bytes a position beside a
    layer's tens of thousands a token, which the megatron engine leaves out."""
    plan, cp, seq = data.plan, layout.cp, data.seq
    if engine != "torch" or plan.rope is None:
        return 0
    tables: set[tuple[int, int]] = set()  # (positions, width)
    for i in layers:
        match plan.layers[i].mixer:
            case AttentionPlan(rotary_dim=width) if width:
                tables.add((seq // cp, width))
            case MLAPlan(qk_rope_head_dim=width):
                tables.add((seq // cp, width))
                if cp > 1:
                    tables.add((seq, width))
    return sum(2 * ACT_BYTES * positions * width for positions, width in tables)


def _held_output(data: ModelData, layout: Layout, chunk: Chunk, engine: Engine) -> float:
    """Bytes of one sequence's chunk output kept until that chunk's backward (the last chunk's is
    the loss). torch's pipelining keeps each stage output for its backward
    (`PipelineStage.forward_one_chunk`'s `fwd_cache`), and so does the torch engine's `step`;
    Megatron-LM frees its data once sent and keeps only its autograd node
    (`deallocate_output_tensor`, on with `deallocate_pipeline_outputs`, which megatron.training
    sets), so under full recompute a Megatron chunk keeps its layers' inputs alone."""
    if chunk.last or engine == "megatron":
        return 0.0
    return _sequence_hidden_bytes(data, layout)


def _sequence_hidden_bytes(data: ModelData, layout: Layout) -> float:
    """One sequence's hidden states between stages on a rank: sequence-sharded under SP."""
    return ACT_BYTES * data.seq * data.plan.d_model / (layout.tp if layout.sequence_parallel else 1)


def _received_gradient(data: ModelData, layout: Layout, chunk: Chunk) -> float:
    """Bytes of one sequence's output gradient that a rank whose last chunk is not the model's
    receives from the next stage before that chunk's backward, its first: alive beside every
    held activation as the backward starts (torch's `PipelineStage` and the torch engine's `step`
    receive into a new tensor, as Megatron-LM's `recv_backward` does; measured by verify
    --layout: an embedding-only first stage of PP4 holds m + 1 outputs' worth, not m)."""
    return 0.0 if chunk.last else _sequence_hidden_bytes(data, layout)


def _chunk_numel(data: ModelData, layout: Layout, chunk: Chunk, fp8_only: bool = False) -> tuple[int, int]:
    """(dense, expert) elements of one chunk of layers and the ends it holds, on tp/ep rank 0; with
    `fp8_only`, of the weights FP8 primary weights keep in fp8."""
    tp, ep = layout.tp, layout.ep
    count = _local_fp8_numel if fp8_only else _local_numel
    d, e = count(data.ends(chunk.first, chunk.last, layout.pp), tp, ep)
    numel_d, numel_e = data.numel(tp, ep, fp8_only)
    return (d + sum(numel_d[chunk.layers.start:chunk.layers.stop]),
            e + sum(numel_e[chunk.layers.start:chunk.layers.stop]))


def _stage_params(data: ModelData, layout: Layout, stage: int, per_tensor: bool) -> StageParams:
    """Parameter elements of rank 0 of pipeline rank `stage`: (whole, its data-parallel shard, the
    biggest layer's, each chunk's (whole, shard) in model order), sharded as `per_tensor` says
    (FSDP2's dim-0 chunks, else flat buffers)."""
    tp, ep = layout.tp, layout.ep
    dp = layout.dp * layout.cp
    edp = layout.expert_dp
    dense = expert = 0
    shard_dense = shard_expert = 0
    biggest_layer = 0
    per_chunk: list[tuple[int, int]] = []
    numel_d, numel_e = data.numel(tp, ep)
    fsdp_d, fsdp_e = data.fsdp(tp, ep, dp, edp) if per_tensor else ([], [])
    for chunk in rank_chunks(data.n_main, layout, stage, data.mtp_depth):
        lo, hi = chunk.layers.start, chunk.layers.stop
        d, e = _chunk_numel(data, layout, chunk)
        dense += d
        expert += e
        if per_tensor:
            sd, se = _fsdp_numel(data.ends(chunk.first, chunk.last, layout.pp), tp, ep, dp, edp)
            sd += sum(fsdp_d[lo:hi])
            se += sum(fsdp_e[lo:hi])
        else:
            sd, se = math.ceil(d / dp), math.ceil(e / edp)
        shard_dense += sd
        shard_expert += se
        per_chunk.append((d + e, sd + se))
        if hi > lo:
            biggest_layer = max(biggest_layer, max(a + b for a, b in zip(numel_d[lo:hi], numel_e[lo:hi])))
    return dense + expert, shard_dense + shard_expert, biggest_layer, tuple(per_chunk)


def _stage_fp8(data: ModelData, layout: Layout, stage: int) -> tuple[int, int]:
    """Elements of rank 0 of pipeline rank `stage` that FP8 primary weights keep in fp8: (whole, its
    data-parallel shard of the flat buffers), as `_stage_params` counts them."""
    dp, edp = layout.dp * layout.cp, layout.expert_dp
    whole = shard = 0
    for chunk in rank_chunks(data.n_main, layout, stage, data.mtp_depth):
        d, e = _chunk_numel(data, layout, chunk, fp8_only=True)
        whole += d + e
        shard += math.ceil(d / dp) + math.ceil(e / edp)
    return whole, shard


def _accumulated_embedding_extras(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                                  states: StatesConvention) -> tuple[int, int]:
    """Elements FSDP2 accumulates of the embedding's gradient beyond the rank's vocabulary rows:
    on the rank's first chunk, which may hold the embedding, and on its last, which may hold the
    copy the MTP modules read (`_mtp_copy_extra`).

    DTensor's embedding backward gives the vocabulary-parallel weight's gradient Replicate (whole
    vocabulary on every tp rank); FSDP2 accumulates it so until the reduction. A tied head's
    Shard(0) gradient of the same weight comes first (the head runs backward before the
    embedding), and DTensor's sum of Shard(0) and Replicate is Shard(0): only the rank's rows are
    accumulated then (measured by verify --layout)."""
    if states.engine != "torch" or not _fsdp_accumulates(layout, microbatches):
        return 0, 0
    whole, rows = _embedding_alone(data, layout, chunks)
    return whole - rows, _mtp_copy_extra(data, layout, chunks)


def _mtp_copy_extra(data: ModelData, layout: Layout, chunks: Sequence[Chunk]) -> int:
    """The last stage's untied copy of the embedding that the MTP modules read (pp > 1): only the
    embedding's backward reaches it, so FSDP2 accumulates its gradient whole, as the first stage's."""
    if not (chunks[-1].last and layout.pp > 1 and data.mtp_depth and not data.plan.tied):
        return 0
    copy = next(t for t in data.last_tied_copy if t.name == "mtp_embed.weight")
    return copy.numel - _local_numel((copy,), layout.tp, layout.ep)[0]


def _embedding_alone(data: ModelData, layout: Layout, chunks: Sequence[Chunk]) -> tuple[int, int]:
    """The embedding's elements, whole and the rank's vocabulary rows, on a rank holding it as an
    FSDP2 unit whose gradient DTensor's backward makes Replicate; (0, 0) elsewhere, and where a tied
    head on the same rank (pp = 1) reads its weight and gives the gradient Shard(0) first."""
    if not chunks[0].first or (data.plan.tied and chunks[-1].last):
        return 0, 0
    return data.first[0].numel, _local_numel(data.first[:1], layout.tp, layout.ep)[0]


def fsdp2_accumulated_numel(data: ModelData, layout: Layout, stage: int, microbatches: int,
                            states: StatesConvention) -> int:
    """Elements of the unsharded gradients torch's FSDP2 accumulates over a step's micro-batches on
    a rank of `stage` (`_fsdp_accumulates`: zero 0/1 over several), 0 where it reduces every
    backward's: the stage's local parameters, and the embedding's Replicate gradient whole."""
    if states.engine != "torch" or not _fsdp_accumulates(layout, microbatches):
        return 0
    chunks = rank_chunks(data.n_main, layout, stage, data.mtp_depth)
    full = data.stage_params(layout, stage, states.per_tensor)[0]
    return full + sum(_accumulated_embedding_extras(data, layout, chunks, microbatches, states))


def _memory(data: ModelData, layout: Layout, stage: int, microbatches: int,
            states: StatesConvention, kernel: AttentionKernel,
            modules: frozenset[RecomputeModule] = frozenset(), cp_comm: CPComm = "all_gather",
            loss: CrossEntropyImpl = "fp32-fused") -> RankMemory:
    zero = layout.zero
    chunks = rank_chunks(data.n_main, layout, stage, data.mtp_depth)
    full, shard, biggest_layer, per_chunk = data.stage_params(layout, stage, states.per_tensor)
    params_sharded = zero >= 3 or (states.params_always_sharded and zero >= 1)
    # FSDP2's ZeRO-1 accumulates unsharded gradients over the micro-batches; with one, its only
    # backward reduce-scatters each unit's gradient as it is produced (the module docstring)
    grads_sharded = zero >= 2 or (zero == 1 and states.params_always_sharded and microbatches == 1)
    parameters = states.param_bytes * (shard if params_sharded else full)
    if states.fp8_weights:  # one byte for each weight kept in fp8 (`StatesConvention.with_fp8_weights`)
        fp8_full, fp8_shard = data.stage_fp8(layout, stage)
        parameters -= (states.param_bytes - states.fp8_weight_bytes) * (fp8_shard if params_sharded else fp8_full)
    first_extra, last_extra = _accumulated_embedding_extras(data, layout, chunks, microbatches, states)
    if (zero <= 1 and states.params_always_sharded and layout.vpp > 1
            and 1 < microbatches <= round_size(layout, microbatches)):
        # one round of the interleaved schedule: a chunk runs all its backwards before the next
        # (chunks in reverse), so each accumulates its unsharded gradients only while the chunks
        # after it hold their reduced ones (dp shards at zero 1, whole at zero 0, the embedding's
        # Replicate extras back to the rank's rows at both) and those before it none yet
        # (measured by verify --layout)
        last = len(per_chunk) - 1
        fulls = [f + (first_extra if c == 0 else 0) + (last_extra if c == last else 0)
                 for c, (f, _) in enumerate(per_chunk)]
        reduced = [sh if zero == 1 else f for f, sh in per_chunk]
        gradients = states.grad_bytes * max(fulls[c] + sum(reduced[c + 1:]) for c in range(len(per_chunk)))
    else:
        gradients = states.grad_bytes * ((shard if grads_sharded else full) + first_extra + last_extra)
    optimizer = states.optimizer_bytes * (shard if zero >= 1 else full)
    temporary = held = copies_at_backward = 0
    if states.compute_copy_bytes:
        # reshard_after_forward=False (zero 1 and 2; `replicate`, zero 0, has no reshard after the
        # forward either): the stage's bf16 copies are held from the forward into the backward
        stage_copies = states.compute_copy_bytes * full
        two_layers = states.compute_copy_bytes * FSDP_PREFETCH_LAYERS * biggest_layer
        temporary = copies_at_backward = stage_copies if zero <= 2 else two_layers
        # still held when the last backward ends, unless that backward reshards (zero 1, one
        # micro-batch; zero 3); zero 0 reshards each unit after its backward and holds two
        # layers' copies there
        held = (two_layers if zero == 0
                else stage_copies if zero == 2 or (zero == 1 and microbatches > 1) else 0)
    elif zero >= 3 and states.module_fetch:
        # DeepSpeed holds the modules its rules keep gathered and the next one arriving
        temporary = ACT_BYTES * fetch_trace(data, layout, stage)[2]
    elif zero >= 3 and shard < full:  # one data-parallel rank shards nothing, so gathers nothing
        # the layer running and the next one prefetched; at the lookup and at the head the gathered
        # embedding or head takes the running layer's place
        temporary = ACT_BYTES * (biggest_layer + max(biggest_layer, _gathered_end(data, layout, chunks)))
    activations = data.rank_activations(layout, stage, microbatches, kernel, states.engine, modules, cp_comm)
    temporary += _cp_gathered_transient(data, layout, chunks, states.engine, cp_comm)
    held_reduce = _held_reduce_scatter(data, layout, chunks, microbatches, states)
    torch_engine = states.engine == "torch"
    layer_gradient = _layer_gradient(data, layout, chunks) if torch_engine else 0
    # a layer unit's reduction releases the reduce-scatter input held before it
    reduction = _unit_reduction(data, layout, chunks, microbatches, states) if torch_engine else 0
    temporary += max(held_reduce + max(_head_reduction_transient(data, layout, chunks, states), layer_gradient),
                     reduction)
    if torch_engine:
        # a moment inside a layer: its chunk's root copy beside the layer's at zero 3, less the
        # gradients not formed yet
        in_forward, unformed = _unformed_gradients(data, layout, stage, microbatches, states)
        roots = _root_copies(data, layout, chunks, states)
        reducing = _reducing_above(data, layout, chunks, states, held_reduce)

        def in_backward(i: int, held: int) -> int:
            return held + roots.get(i, 0) + reducing[i] - unformed.get(i, 0)

        mixer = data.mixer_backward(layout, stage, microbatches, kernel, states.engine, modules, cp_comm)
        if mixer:
            alive = max(in_backward(i, held) for i, held in mixer.items())
            temporary = max(temporary, copies_at_backward + alive - activations)
        # the forward's moment (or a re-run's) has the same copies beside it, and the reduce-scatter
        # input held into the next micro-batch's forward
        forward, rerun = data.kernel_generation(layout, stage, microbatches, kernel, states.engine, modules, cp_comm)
        if forward:
            alive = max([held + roots.get(i, 0) + held_reduce - in_forward for i, held in forward.items()]
                        + [in_backward(i, held) for i, held in rerun.items()])
            temporary = max(temporary, copies_at_backward + alive - activations)
    loss_backward = _loss_backward_transient(data, layout, chunks, loss)
    head_gradients = _head_gradients(data, layout, chunks, loss_backward) if torch_engine else 0
    if loss_backward or head_gradients > 0:
        # the head's backward starts with every bf16 copy FSDP2 has not resharded: all of the
        # stage's below zero 3 (`replicate` too); at zero 3 the root's, which its pre-backward hook
        # gathers again once the backward reaches the root's output: after the loss's backward, or
        # before it where the loss is computed inside the root, as the torch engine's multi-token
        # prediction does (`distributed.stage.Stage`; measured by verify --layout)
        if zero <= 2:
            after_loss = states.compute_copy_bytes * full
        elif states.compute_copy_bytes:
            after_loss = states.compute_copy_bytes * _root_numel(data, layout, chunks[-1])
        else:
            after_loss = 0
        at_loss = after_loss if zero <= 2 or (torch_engine and data.mtp_depth) else 0
        if loss_backward:
            temporary = max(temporary, at_loss + loss_backward + held_reduce)
        if head_gradients > 0:
            temporary = max(temporary, after_loss + head_gradients + held_reduce)
    # the embedding's last backward comes after every other unit's, its activations freed: the
    # stage's peak is the larger of the two moments, and the categories add up to it; under the
    # torch engine also the root's reduction and the lookup's gradient beside the head's at the end
    end = held + _embedding_gradient_transient(data, layout, chunks, microbatches, states, full, shard)
    if torch_engine:
        end = max(end, _root_reduction_at_end(data, layout, chunks, microbatches, states),
                  _lookup_gradient_at_end(data, layout, chunks, states, held))
    temporary = max(temporary, end - activations)
    if torch_engine:
        between = _embedding_between_backwards(data, layout, chunks, microbatches, states, held, biggest_layer)
        if between:
            share = math.ceil(activations / sum(in_flight(layout, microbatches, stage)))
            temporary = max(temporary, between - share)
    return RankMemory(parameters, gradients, optimizer, activations, temporary)


def _gathered_end(data: ModelData, layout: Layout, chunks: Sequence[Chunk]) -> int:
    """The elements ZeRO-3 gathers on this rank for the embedding's lookup or the head's GEMM, the
    larger where it holds both (a tied head at pp = 1 gathers the embedding again); 0 on a stage
    with neither."""
    first = _local_numel(data.first, layout.tp, layout.ep)[0] if chunks[0].first else 0
    last = (_local_numel(data.ends(False, True, layout.pp), layout.tp, layout.ep)[0]
            if chunks[-1].last else 0)
    return max(first, last)


def _embedding_between_backwards(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                                 states: StatesConvention, held: int, biggest_layer: int) -> int:
    """Bytes the torch engine holds beyond the model states and the activations still in flight
    when the first stage of a pipeline (one chunk a rank) ends a backward that is not the step's
    last: FSDP2 reduces the embedding's unit, reached by token ids only, in the root's final
    callback after each backward at zero 2 and 3 (every micro-batch's gradients reduced), and casts
    its bf16 gradient into the fp32 accumulated one at zero 0 and 1; the other in-flight
    micro-batches' activations are still held, the last one's freed (the caller takes them off:
    one in-flight micro-batch's share of the rank's activations). Beside it the bf16 copies still
    held when a backward ends (`held`; at zero 3 none, but the all-gather buffer of a layer FSDP2
    gathers for the next pass) and the reduce-scatter inputs the rank's other chunks, FSDP2 roots
    of their own, hold. 0 where no backward but the last ends with the embedding's (pp = 1: no
    other micro-batch in flight then). Measured by verify --layout on Llama 3 8B's first stage
    (TP2 PP4 DP2, 8 micro-batches, and interleaved)."""
    whole = _embedding_alone(data, layout, chunks)[0]
    if not whole or layout.pp == 1 or microbatches == 1:
        return 0
    gathered = states.compute_copy_bytes * biggest_layer if layout.zero >= 3 else held
    beside = gathered + _held_reduce_scatter(data, layout, chunks[1:], microbatches, states)
    if _fsdp_accumulates(layout, microbatches):
        return beside + states.compute_copy_bytes * whole
    # zero 2 and 3 reduce as the last backward does (the accumulating branch is not taken: 0, 0)
    return beside + _embedding_gradient_transient(data, layout, chunks, microbatches, states, 0, 0)


def _embedding_gradient_transient(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                                  states: StatesConvention, full: int, shard: int) -> int:
    """Bytes torch's FSDP2 allocates beyond the model states while it casts or reduces the
    embedding's gradient, the first stage's last unit in its last backward (measured by verify
    --layout on Llama 3 8B at tp 1, 2, 8 and dp 2-8, exact; docs/distributed.md "temporary"):
    DTensor's embedding backward makes the whole vocabulary's bf16 gradient (Replicate) however
    the weight is sharded; FSDP2 then casts it to its fp32 accumulated gradient (zero 1 over several
    micro-batches; the fp32 tensor is a gradient), or reduce-scatters it: its rank's rows copied out
    of the Replicate gradient (bf16, under TP), the fp32 reduce-scatter input and output; zero 0
    (`replicate`) holds 6 B per row beside the bf16 gradient as it reduces (measured at tp 2 and
    8; at tp 1 a little more is held, not priced). Accumulating at zero 1 under TP, the final
    reduction can outgrow the first cast: autograd still holds the last micro-batch's bf16
    gradient while FSDP2 copies the rank's rows out of the whole fp32 one, and by then the stage's
    other units hold reduced shards, less than the gradients row's whole (`full`, `shard`: the
    stage's local elements, whole and sharded). A head on the same rank: `_lookup_gradient_at_end`
    (a tied one makes one unit with it) and `_root_reduction_at_end`."""
    whole, rows = _embedding_alone(data, layout, chunks)
    if states.engine != "torch" or not whole:
        return 0
    bf16 = states.compute_copy_bytes
    dp = layout.dp * layout.cp
    if layout.zero == 0:
        return bf16 * whole + ZERO0_REDUCE_ROW_BYTES * rows
    if _fsdp_accumulates(layout, microbatches):
        if layout.tp == 1 or layout.vpp > 1:
            return bf16 * whole
        rest, rest_shard = full - rows, shard - math.ceil(rows / dp)
        return bf16 * whole + max(0, states.grad_bytes * (rows - (rest - rest_shard)))
    to_shard = bf16 * rows if layout.tp > 1 else 0
    return bf16 * whole + to_shard + _reduce_scatter_buffers(states, layout, rows)


def _reduce_scatter_buffers(states: StatesConvention, layout: Layout, numel: int) -> int:
    """Bytes of FSDP2's reduce-scatter of a unit's `numel` local elements: the input, whole, and
    the rank's output, a dp·cp-th of it, both in the reduce dtype (the states' gradient bytes)."""
    reduce_in = states.grad_bytes * numel
    return reduce_in + math.ceil(reduce_in / (layout.dp * layout.cp))


def _root_reduction_at_end(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                           states: StatesConvention) -> int:
    """Bytes the torch engine's FSDP2 holds at the end of the backward of a rank holding the head, where it
    reduce-scatters the root unit's gradient (final norm, head): the root's bf16 gradients, the
    fp32 reduce-scatter input and output. On a rank that holds the embedding's unit too (pp = 1,
    untied) that unit waits for its own reduction, after the root's, with its bf16 gradient
    (DTensor's Replicate, the whole vocabulary) and its unsharded copy. Measured by verify
    --layout on tiny-llama with a 16K vocabulary at 16 tokens (pp 1: tp 1-2, dp 4, zero 1 over
    one micro-batch, 2 and 3; pp 2's last stage at zero 3), exact; with few tokens beside the
    vocabulary's rows it is the step's peak. Accumulating (`_fsdp_accumulates`) and `replicate`
    (zero 0) reduce otherwise: not priced here."""
    if not chunks[-1].last or layout.zero == 0 or _fsdp_accumulates(layout, microbatches):
        return 0
    root = _root_numel(data, layout, chunks[-1])
    whole, rows = _embedding_alone(data, layout, chunks)
    return (ACT_BYTES * (root + whole) + states.compute_copy_bytes * rows
            + _reduce_scatter_buffers(states, layout, root))


def _head_weight(data: ModelData, layout: Layout) -> tuple[int, int]:
    """The LM head weight's elements (a tied one's copy alike): whole, and the rank's vocabulary rows."""
    head = next(t for t in data.last_tied_copy if t.name == "lm_head.weight")
    return head.numel, _local_numel((head,), layout.tp, layout.ep)[0]


def _rank_logits(data: ModelData, layout: Layout) -> int:
    """Logits of a micro-batch on a rank holding the head: its mb·T/cp tokens × V/tp."""
    return layout.mb * (data.seq // layout.cp) * math.ceil(data.plan.vocab_size / layout.tp)


def _tied_gradient_sum(data: ModelData, layout: Layout) -> int:
    """Elements autograd holds while it adds a tied embedding's lookup gradient (DTensor's
    Replicate, the whole vocabulary) to the head's (the rank's rows): the whole, the head's, under
    TP the rank's rows copied out of the whole, and the sum (measured by verify --layout)."""
    whole, rows = _head_weight(data, layout)
    return whole + rows * (3 if layout.tp > 1 else 2)


def _lookup_gradient_at_end(data: ModelData, layout: Layout, chunks: Sequence[Chunk], states: StatesConvention,
                            held: int) -> int:
    """Bytes the torch engine holds when the embedding lookup's backward, the step's last, gives its
    gradient (DTensor's Replicate, the whole vocabulary) on a rank holding the head too (pp = 1),
    beside the head's bf16 gradient, which waits for the root unit's post-backward. Tied, the two
    are one unit and the lookup's gradient is added to the head's (`_tied_gradient_sum`); untied,
    with multi-token prediction, it is added to the one the MTP passes' lookups left, making a
    third whole. Beside them the units' unsharded copies: the root's and the embedding's (FSDP2
    reshards neither root after its forward nor, before its own backward, the embedding;
    `replicate` neither), or every copy the stage holds (`held`, zero 1-2). Measured by verify
    --layout on tiny-llama and tiny-mtp with a 16K vocabulary at 16-32 tokens (tp 1-2, zero 0-3,
    1-3 micro-batches, tied and untied)."""
    if not (chunks[0].first and chunks[-1].last):
        return 0
    root = _root_numel(data, layout, chunks[-1])
    if data.plan.tied:
        gradients, copies = _tied_gradient_sum(data, layout), root
    else:
        whole, rows = _embedding_alone(data, layout, chunks)
        gradients = _head_weight(data, layout)[1] + whole * (3 if data.mtp_depth else 1)
        copies = root + rows
    return ACT_BYTES * gradients + max(held, states.compute_copy_bytes * copies)


def _held_reduce_scatter(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                         states: StatesConvention) -> int:
    """Bytes torch's FSDP2 keeps of a backward's last gradient reduce-scatter into the next
    micro-batch: at zero 2 and 3 it reduces every micro-batch's gradients, and only the step's
    last backward waits on and releases the last unit's reduce-scatter input
    (`FSDPCommContext.reduce_scatter_states`, torch 2.13's `_root_post_backward_final_callback`).
    So the input of the unit each chunk reduces last (`_reduced_last`) stays allocated through
    the next micro-batch's forward and into its backward, beside its loss on the last stage
    (measured by verify --layout on every stage). The input is in FSDP2's reduce dtype, fp32
    here, the states' gradient bytes."""
    if states.engine != "torch" or layout.zero < 2 or microbatches < 2:
        return 0
    dp = layout.dp * layout.cp
    held = sum(dp * _fsdp_numel(_reduced_last(data, layout, chunk), layout.tp, layout.ep, dp, layout.expert_dp)[0]
               for chunk in chunks)
    return states.grad_bytes * held


def _reduced_last(data: ModelData, layout: Layout, chunk: Chunk) -> tuple[Tensor, ...]:
    """The tensors of the FSDP2 unit a chunk's backward reduces last (`_fsdp_end_units`). A unit
    reduces once the gradient reaches its forward's inputs, or, where none needs one, in the
    root's final callback, in module order (torch 2.13's `_root_post_backward_final_callback`):
    - the first chunk's own embedding unit, read by token ids, after the root (also reduced in
      that callback there);
    - otherwise the root, where it holds the final norm and head, reduced once the gradient
      reaches the stage's input;
    - otherwise, with an empty root, the chunk's first layer's unit, its experts' own unit
      reduced before it, inside the layer.
    (measured by verify --layout: tiny-llama's first, middle and last stages at zero 2 and 3)"""
    embedding = next((tensors for tensors, what in _fsdp_end_units(data, chunk.first, chunk.last, layout.pp)
                      if what == "embedding"), ())
    if embedding:
        return embedding
    root = _root_tensors(data, layout, chunk)
    if root or not chunk.layers:
        return root
    return tuple(t for t in data.layer_tensors[chunk.layers.start] if not _own_unit(t, layout.tp, layout.ep))


def _mixer_backward(data: ModelData, layout: Layout, stage: int, microbatches: int, kernel: AttentionKernel,
                    engine: Engine, modules: frozenset[RecomputeModule], cp_comm: CPComm) -> dict[int, int]:
    """Bytes alive while archplan's scan unit runs its backward in each of the rank's Mamba layers,
    or a long convolution's FFT or filter unit in an S4, Hyena or StripedHyena layer, by layer
    (none without one): what the schedule's moment before that chunk's backward holds
    (`_rank_activations`), less what the layers above it keep for the micro-batch whose backward
    runs (freed before it, with the head's tensors), plus the layer's re-run under full recompute
    and what the unit holds beyond its layer's kept tensors (`_mixer_transient`), and in the chunk
    holding the head the head's gradients (`_head_chunk_gradients`). A Mamba block of a
    multi-token prediction module is priced the same way. Under full recompute the main pass's
    head tensors, which wait beside the module's re-run (`_rank_activations`), are not held at its
    scan: on tiny-mamba with one module at ZeRO-3, plan's total with them beside the scan was
    1.089 times the step's measured one-moment peak (verify --layout), without them 1.027. Without
    recompute they are, the module's backward running before the main loss's (below)."""
    chunks = rank_chunks(data.n_main, layout, stage, data.mtp_depth)
    h = data.plan.d_model
    units = {i: _mixer_transient(data.plan.layers[i].mixer, h, layout.tp, layout.cp, layout.mb, data.seq)
             for chunk in chunks for i in chunk.layers}
    if not any(units.values()):
        return {}
    held = _held_by_chunk(data, layout, chunks, kernel, engine, modules, cp_comm)
    reruns = _reruns(data, layout, chunks, kernel, engine, cp_comm, to_mixer=True)
    # what the layer's FFN kept, freed by its backward (`ModelData.acts_to_mixer`)
    whole = data.layer_acts(layout, layout.recompute, kernel, engine, modules)
    to_mixer = data.layer_acts(layout, layout.recompute, kernel, engine, modules, to_mixer=True)
    grads = _head_chunk_gradients(data, layout, chunks[-1])
    # the gradient of the mixer's output (the block's, in a pre-norm block after its FFN's
    # backward), on the rank's tokens, sequence-split under SP, and beside it the output gradient
    # a chunk that does not end the model received, which its runner holds through the backward
    incoming = ACT_BYTES * layout.mb * (data.seq // layout.cp) * h / (layout.tp if layout.sequence_parallel else 1)
    received = {i: _received_gradient(data, layout, chunk) * layout.mb / layout.cp
                for chunk in chunks for i in chunk.layers}
    # an MTP module's block runs its backward before the main pass's loss does: without full
    # recompute the main pass's head tensors wait beside it (on a Mamba-2 model with one module,
    # plan's total read 0.956 of the step's peak without them, 0.991 … 0.997 with them)
    main_head = (_head_tensors(data, layout, engine, kernel)[0] / (1 + data.mtp_depth) * layout.mb / layout.cp
                 if data.mtp_depth and layout.recompute != "full" else 0.0)
    # the layer's own kept tensors (but its FFN's, freed by its backward), with its re-run's, and
    # the bf16 gradients of the parameters whose backward ran before the unit's
    beside = {i: held.per_layer[i] - (whole[i] - to_mixer[i]) * layout.mb / layout.cp + reruns.get(i, 0.0) + unit
              + incoming + received[i] + grads.get(i, 0)
              + ACT_BYTES * _before_unit_numel(data, layout, i) + (main_head if i >= data.n_main else 0.0)
              for i, unit in units.items() if unit}
    return _alive_at_layer(held, chunks, pipeline_moments(layout, microbatches, stage),
                           lambda moment, k: moment.backward == k, beside)


# The parameters of each scan or long-convolution mixer whose backward runs before its unit's: the
# projection its output passes through (and Mamba-2's gated norm before it); `_before_unit_numel`
MIXER_OUTPUT_PARAMS: dict[type, tuple[str, ...]] = {
    Mamba1Plan: ("out_proj.",), Mamba2Plan: ("out_proj.", "norm."), S4Plan: ("output_linear.",),
    HyenaPlan: ("out_proj.",), StripedHyenaPlan: ("out_filter_dense.",),
}


def _before_unit_numel(data: ModelData, layout: Layout, i: int) -> int:
    """Elements of layer i's parameters on the rank whose bf16 gradient autograd has written when
    its mixer's unit runs its backward, which FSDP2 holds until the layer's post-backward: the
    mixer's output side (`MIXER_OUTPUT_PARAMS`) and, in a pre-norm block (`_before_ffn`), its FFN
    and the norm before it. Routed experts of their own unit are reduced by then
    (`_reducing_above`)."""
    layer = data.plan.layers[i]
    prefix = f"{layer.path}."
    parts = tuple(f"mixer.{name}" for name in MIXER_OUTPUT_PARAMS.get(type(layer.mixer), ()))
    if _before_ffn(data.plan, layer) is not None:
        parts += ("ffn.", "norm2.")
    tensors = tuple(t for t in data.layer_tensors[i] if t.name.removeprefix(prefix).startswith(parts))
    return _local_numel(tensors, layout.tp, layout.ep)[0]


def _head_chunk_gradients(data: ModelData, layout: Layout, chunk: Chunk) -> dict[int, int]:
    """Bytes of bf16 gradient autograd holds through each layer's backward in the chunk holding
    the head (none in any other chunk), by layer: the head's backward wrote the head weight's (the
    rank's vocabulary rows) and the final norm's, and FSDP2 reduces or accumulates them only in
    the root unit's post-backward, which runs once the chunk's input has its gradient, at the
    chunk's end (`_head_gradients`). A multi-token prediction module's layers run their backward
    first, beside the gradient their own pass gave the head; the main layers, after every pass,
    also beside the embedding lookup's whole-vocabulary gradient of the modules' shifted tokens
    where the head is not tied to it. Measured by verify --layout: on PP2's last stage the head's
    gradient is alive at the mixer's backward, where plan's total read 0.93 … 0.95 of the step's
    peak (tiny-s4d at 64 tokens; tiny-mamba2 0.95 … 0.99), 1.00 … 1.04 with it and the moment's
    other terms (docs/distributed.md, "The mixer's backward as the step finds it")."""
    if not chunk.last:
        return {}
    whole, rows = _head_weight(data, layout)
    norm = _local_numel(tuple(t for t in _root_tensors(data, layout, chunk) if t.name.startswith("final_norm.")),
                        layout.tp, layout.ep)[0]
    main = rows + norm + (whole if data.mtp_depth and not data.plan.tied else 0)
    return {i: ACT_BYTES * (main if i < data.n_main else rows) for i in chunk.layers}


def _kernel_generation(data: ModelData, layout: Layout, stage: int, microbatches: int, kernel: AttentionKernel,
                       engine: Engine, modules: frozenset[RecomputeModule],
                       cp_comm: CPComm) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes alive while S4's (DPLR) kernel generation runs in each of the rank's layers, by layer
    (none without one), in the forward of a micro-batch through the layer and in its re-run in the
    backward under full recompute (with the head's gradients in the chunk holding the head,
    `_head_chunk_gradients`), where the schedule's moment holds that micro-batch's chunk
    through the layers below it only, and the layer has made its norm's output and its mixer's
    input copies, kept the generation's tensors and holds its transients (`_generation_unit`).
    The forward's moments are the schedule's after a forward of the chunk (`pipeline_moments`),
    the re-run's those before its backward. Measured by verify --layout: an S4 layer with
    `ssm_buffers` at d_model 256, 64 states, 128 tokens, where the generation's fp32 bases and
    Ā's (H, N, N) forms outweigh the tokens' tensors, plan's total read 0.66 of the step's peak
    without this moment, 1.01 with it (docs/distributed.md)."""
    chunks = rank_chunks(data.n_main, layout, stage, data.mtp_depth)
    units = {i: _generation_unit(data.plan.layers[i].mixer, data.plan.d_model, layout.tp, layout.cp, layout.mb,
                                 data.seq, layout.sequence_parallel)
             for chunk in chunks for i in chunk.layers}
    if not any(units.values()):
        return {}, {}
    held = _held_by_chunk(data, layout, chunks, kernel, engine, modules, cp_comm)
    moments = pipeline_moments(layout, microbatches, stage)
    generating = {i: unit for i, unit in units.items() if unit}
    forward = _alive_at_layer(held, chunks, moments, lambda moment, k: moment.forward == k, generating)
    if layout.recompute != "full":
        return forward, {}
    # a re-run is part of the layer's backward: after the head's, in the chunk holding it
    grads = _head_chunk_gradients(data, layout, chunks[-1])
    return forward, _alive_at_layer(held, chunks, moments, lambda moment, k: moment.backward == k,
                                    {i: unit + grads.get(i, 0) for i, unit in generating.items()})


def _alive_at_layer(held: _HeldByChunk, chunks: Sequence[Chunk], moments: Sequence[PipelineMoment],
                    at: Callable[[PipelineMoment, int], bool], beside: dict[int, float]) -> dict[int, int]:
    """The most bytes alive at a moment inside each of the rank's layers `beside` names: the most
    the schedule holds at the moments `at` picks for the layer's chunk (by its index), less what
    that chunk's layers from this one up keep for the micro-batch the moment is about (not made
    yet in a forward, freed by their backward), plus what the layer holds then (`beside`).
    `_mixer_backward` and `_kernel_generation` price their moments so."""
    alive: dict[int, int] = {}
    for k, chunk in enumerate(chunks):
        before = max((sum(map(math.prod, zip(moment.counts, held.per_count))) for moment in moments if at(moment, k)),
                     default=0.0)
        for i in chunk.layers:
            if i in beside:
                from_here = sum(held.per_layer[j] for j in chunk.layers if j >= i)
                alive[i] = math.ceil(held.shared + before - from_here + beside[i])
    return alive


def _root_copies(data: ModelData, layout: Layout, chunks: Sequence[Chunk], states: StatesConvention) -> dict[int, int]:
    """At zero 3, the bytes of each chunk's root unit's bf16 copy, by layer of the chunk: FSDP2 does
    not reshard the root after its forward, so the copy stays from the chunk's forward to its
    root's post-backward at the chunk's end, beside the layers' two (`copies_at_backward`). Below
    zero 3 the stage's copies count it already. Measured by verify --layout: tiny-mamba2 at DP2
    ZeRO-3 holds its head's copy while its top layer's scan unit runs its backward."""
    if layout.zero < 3 or not states.compute_copy_bytes:
        return {}
    return {i: states.compute_copy_bytes * _root_numel(data, layout, chunk) for chunk in chunks for i in chunk.layers}


def _reducing_above(data: ModelData, layout: Layout, chunks: Sequence[Chunk], states: StatesConvention,
                    held_reduce: int) -> dict[int, int]:
    """By layer of the rank, the bytes of a gradient reduce-scatter input FSDP2 holds while the
    layer runs its backward: a unit's post-backward issues its reduce-scatter and the next one waits
    on it and releases its input (`FSDPCommContext.reduce_scatter_states`), so below its chunk's
    top layer, the input of the layer above's unit (the whole padded unit in the reduce dtype,
    fp32 here: the states' gradient bytes; its dense unit, reduced after the experts' own), in the
    backwards that reduce (every one from zero 2 on, the step's last at zero 1); at the top layer,
    what the previous micro-batch's last reduction left (`held_reduce`, `_held_reduce_scatter`).
    A layer whose routed experts are a unit of their own (`_own_unit`) holds theirs instead, reduced
    once their backward is done, before the mixer's.
    `replicate` (zero 0) all-reduces instead, not measured here: only `held_reduce`. Measured by
    verify --layout: tiny-mamba2 at DP2 ZeRO-3 with one micro-batch holds its top layer's
    reduce-scatter input while its lower layer's scan unit runs its backward."""
    reducing = {i: held_reduce for chunk in chunks for i in chunk.layers}
    if layout.zero == 0:
        return reducing
    dp, edp = layout.dp * layout.cp, layout.expert_dp
    dense, expert = data.fsdp(layout.tp, layout.ep, dp, edp)
    for chunk in chunks:
        for i in chunk.layers[:-1]:
            reducing[i] = states.grad_bytes * dp * dense[i + 1]
        for i in chunk.layers:
            if expert[i]:  # the layer's own routed experts, reduced after their backward
                reducing[i] = states.grad_bytes * edp * expert[i]
    return reducing


def _unformed_gradients(data: ModelData, layout: Layout, stage: int, microbatches: int,
                        states: StatesConvention) -> tuple[int, dict[int, int]]:
    """With one micro-batch, the bytes of the `gradients` row not formed yet: in the forward, all of
    them; while layer i runs its backward, its own dense unit's (its routed experts' own unit
    reduces first), those of the units below it in its chunk, the chunk's ends' (the root unit's
    post-backward runs at the chunk's end, the embedding's backward last) and every lower chunk's
    (their backward comes after). FSDP2 writes a unit's gradient (the rank's shard from zero 1
    on, whole under `replicate`) in the unit's post-backward. `plan`'s total prices the row whole,
    beside every moment; a moment inside a layer (`_mixer_backward`, `_kernel_generation`) is the
    step's own peak, and so is priced without what does not exist yet. With several micro-batches
    every unit holds its gradient once the first backward is done, accumulated or reduced, and a
    steady-state backward holds as many micro-batches in flight as the first: nothing (an
    over-count where a rank has no more micro-batches than stages, and so no steady state: its
    first backward has none yet of the units below the layer, and at ZeRO 0/1 its last, the one
    that reduces, has freed the accumulations above it). Not priced with multi-token prediction,
    whose modules run their backward before the layers below them: nothing."""
    if microbatches > 1 or data.mtp_depth or states.engine != "torch":
        return 0, {}
    zero = layout.zero
    sharded = zero >= 2 or (zero == 1 and states.params_always_sharded)  # `_memory`'s grads_sharded
    _, _, _, per_chunk = data.stage_params(layout, stage, states.per_tensor)
    dense, expert = (data.fsdp(layout.tp, layout.ep, layout.dp * layout.cp, layout.expert_dp) if sharded
                     else data.numel(layout.tp, layout.ep))
    unit = [states.grad_bytes * (d + e) for d, e in zip(dense, expert)]
    unformed: dict[int, int] = {}
    below = 0
    for chunk, (whole, shard) in zip(rank_chunks(data.n_main, layout, stage, data.mtp_depth), per_chunk):
        in_chunk = states.grad_bytes * (shard if sharded else whole)
        ends = in_chunk - sum(unit[i] for i in chunk.layers)
        for i in chunk.layers:
            # a layer's own routed experts' unit has reduced its gradient before the mixer's backward
            unformed[i] = below + ends + sum(unit[j] for j in chunk.layers if j < i) + states.grad_bytes * dense[i]
        below += in_chunk
    return below, unformed


@lru_cache(maxsize=4096)
def _generation_unit(mixer: MixerPlan, d_model: int, tp: int, cp: int, mb: int, seq: int, sp: bool) -> int:
    """Bytes an S4 (DPLR) layer holds for one micro-batch of mb sequences at its kernel
    generation's peak, on the rank's share (0 for any other mixer): the first norm's input (bf16,
    each rank's tokens, sequence-split under SP), the mixer's input copies (`_s4_input_copies`)
    and its fp32 copy on the rank's channels (after cp's channel exchange whole sequences of
    d_model / (tp·cp) channels), and the generation on those channels in fp32, as
    FSDP2 hands the module its SSM tensors: its kept tensors (`analytic.s4.s4_kernel_activation_bytes`)
    and its transients (`analytic.s4.s4_generation_transient_bytes`)."""
    match mixer:
        case S4Plan(dplr=True) as m:
            channels = d_model // (tp * cp)
            tokens = mb * seq // cp
            norm_input = ACT_BYTES * tokens * d_model // (tp if sp else 1)
            copies = math.ceil(_s4_input_copies(d_model, seq, tp, cp, sp) * mb / cp)
            return (norm_input + copies + FP32_BYTES * tokens * d_model // tp
                    + s4_kernel_activation_bytes(m, channels, seq, False)
                    + s4_generation_transient_bytes(m, channels, seq, False))
        case (AttentionPlan() | MLAPlan() | Mamba1Plan()
              | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan()):
            return 0
        case _:
            assert_never(mixer)


@lru_cache(maxsize=4096)
def _mixer_transient(mixer: MixerPlan, d_model: int, tp: int, cp: int, mb: int, seq: int) -> int:
    """Bytes archplan's scan unit, or a long convolution's FFT and filter units, hold in the
    mixer's backward beyond what a layer of `mixer` kept, for the rank's share of it: its heads and
    channels split over tp (and over cp, whose exchange hands each rank whole sequences of its
    heads or channels: `mamba_exchange`, `long_conv_exchange`), each micro-batch of mb sequences
    of seq tokens; 0 for any other mixer. The two scan units recompute in fp32 from the bf16
    inputs FSDP2 computes in. Mamba-2's SSD unit (`analytic.mamba.ssd_backward_bytes`, its groups
    as `_group_spread` places them) is priced by the autocast form (bf16 casts beside the fp32
    recomputation), which a live-bytes trace of the bf16 mixer's backward puts at +0.1% … +8.5%
    of what it holds over five shapes, where the fp32 form is 2% … 16% short; Mamba-1's chunked
    scan (`analytic.mamba.mamba1_scan_backward_bytes`) has a bf16-weights form of its own, −0.8% …
    +0.9% of the trace (tests/test_memory.py). mamba_ssm's kernels, Megatron's engine, hold none
    of it. S4, S4D, Hyena and StripedHyena (`analytic.s4.s4_backward_bytes`,
    `analytic.hyena.hyena_backward_bytes`, `analytic.hyena.striped_backward_bytes`) on the rank's
    channels, the bf16 weights' form: no autocast (the units compute in fp32 from fp32 casts),
    16-bit tensors around them."""
    channels = d_model // (tp * cp)  # a long convolution's, after the cp channel exchange
    match mixer:
        case Mamba1Plan() as m:
            return mamba1_scan_backward_bytes(replace(m, d_inner=m.d_inner // (tp * cp)), mb, seq, ACT_BYTES,
                                              autocast=False)
        case Mamba2Plan() as m:
            g, r = _group_spread(m, tp, cp)
            share = replace(m, d_inner=m.d_inner // (tp * cp), n_heads=m.n_heads // (tp * cp),
                            n_groups=max(g * r // cp, 1))
            return ssd_backward_bytes(share, mb, seq, autocast=True)
        case S4Plan() as m:
            return s4_backward_bytes(m, channels, mb, seq, ACT_BYTES, autocast=False)
        case StripedHyenaPlan() as m:
            return striped_backward_bytes(m, channels, mb, seq, ACT_BYTES, autocast=False)
        case HyenaPlan():
            return hyena_backward_bytes(channels, mb, seq)
        case AttentionPlan() | MLAPlan():
            return 0
        case _:
            assert_never(mixer)


def _layer_gradient(data: ModelData, layout: Layout, chunks: Sequence[Chunk]) -> int:
    """Bytes of the bf16 gradient autograd gives a layer's FSDP2 unit before the unit's
    post-backward reduces (or accumulates) it, beside the kept activations, the bf16 copies and
    the held reduce-scatter input: the rank's largest layer unit, its dense part or its experts'
    own unit (those reduce inside the layer, before the rest is complete). Measured by verify
    --layout: on Llama 3 8B's middle stages the peak falls at the end of a layer's backward, its
    weight gradients complete (docs/distributed.md)."""
    dense, expert = data.numel(layout.tp, layout.ep)
    return ACT_BYTES * max((max(dense[i], expert[i]) for chunk in chunks for i in chunk.layers), default=0)


def _unit_reduction(data: ModelData, layout: Layout, chunks: Sequence[Chunk], microbatches: int,
                    states: StatesConvention) -> int:
    """Bytes FSDP2's reduction of a layer unit's gradient holds beside the kept activations and
    the copies where each backward reduces (`foreach_reduce`; not when it accumulates over the
    micro-batches): the reduce-scatter input in the reduce dtype over the unit's padded elements,
    beside the unit's bf16 gradient while it is copied in, then beside the output (a 1/n-th of
    it over n ranks; over one rank a whole copy, and a divided temporary where a divide factor is
    set, as it is for the experts: `distributed.shard`). The rank's largest such moment, its
    layers' dense units over dp·cp and their experts' units over expert_dp. Measured by verify
    --layout: Qwen3-30B-A3B's middle stage (PP4 DP4 EP4) peaks in its experts' reduction over one
    rank, 12 B an element. `replicate` (zero 0) all-reduces instead, not measured here: 0."""
    if layout.zero == 0 or _fsdp_accumulates(layout, microbatches):
        return 0
    tp, ep, dp, edp = layout.tp, layout.ep, layout.dp * layout.cp, layout.expert_dp
    dense_local, expert_local = data.numel(tp, ep)
    dense_shard, expert_shard = data.fsdp(tp, ep, dp, edp)

    def moment(local: int, shard: int, ranks: int, divided: bool) -> int:
        reduce_in = states.grad_bytes * shard * ranks
        out = reduce_in * (1 + divided) if ranks == 1 else math.ceil(reduce_in / ranks)
        return reduce_in + max(ACT_BYTES * local, out)

    return max((max(moment(dense_local[i], dense_shard[i], dp, False),
                    moment(expert_local[i], expert_shard[i], edp, True) if expert_local[i] else 0)
                for chunk in chunks for i in chunk.layers), default=0)


def _root_tensors(data: ModelData, layout: Layout, chunk: Chunk) -> tuple[Tensor, ...]:
    """The tensors of a model chunk's FSDP2 root unit (`_fsdp_end_units`): its ends but the
    embedding's own unit."""
    return tuple(t for tensors, what in _fsdp_end_units(data, chunk.first, chunk.last, layout.pp)
                 if what != "embedding" for t in tensors)


def _root_numel(data: ModelData, layout: Layout, chunk: Chunk) -> int:
    """The elements of a chunk's root unit on this rank, unsharded (what FSDP2 gathers)."""
    return _local_numel(_root_tensors(data, layout, chunk), layout.tp, layout.ep)[0]


def _loss_backward_transient(data: ModelData, layout: Layout, chunks: Sequence[Chunk],
                             loss: CrossEntropyImpl) -> int:
    """Bytes the loss's backward holds beyond what the forward kept, on the rank holding the
    head (`LOSS_BACKWARD_BYTES`): one head pass at a time (multi-token prediction's losses run
    their backwards one after another), over the rank's mb·T/cp tokens and V/tp logits each."""
    if not chunks[-1].last:
        return 0
    return LOSS_BACKWARD_BYTES[loss][layout.tp > 1] * _rank_logits(data, layout)


def _head_gradients(data: ModelData, layout: Layout, chunks: Sequence[Chunk], loss_backward: int) -> int:
    """Bytes the torch engine's head backward holds after a loss's backward, beyond the head's
    activations and net of what that backward freed; 0 off the last stage. (Megatron's head
    accumulates its weight gradient into an fp32 main grad, a gradient: none there.)

    The head's weight-gradient GEMM reads the logits' bf16 gradient and writes the weight's bf16
    gradient (the rank's vocabulary rows), which autograd keeps until FSDP2's post-backward of the
    root unit at the stage's end; the pass's log-probabilities are freed by then.

    With multi-token prediction the engine's loss adds the main pass's loss first, so autograd runs
    the MTP passes' backward first, down to the embedding lookup of their shifted tokens. What
    they give the head's weight and that embedding (DTensor's Replicate gradient, the whole
    vocabulary) stays in bf16 until the stage's end; a tied weight has one gradient, the lookup's
    added to the head's (`_tied_gradient_sum`). Net of the MTP passes' freed head tensors and the
    modules' kept inputs (`_head_tensors`), three more moments:
    - the main pass's loss backward, beside those gradients;
    - the main pass's weight gradient: beside the held ones, the new one and the logits' bf16
      gradient its GEMM reads, then its sum with the held one;
    - tied, the lookup's gradient added to the head's.
    Measured by verify --layout on tiny-llama and tiny-mtp with a 16K vocabulary (tp 1-2, cp 1-2,
    pp 1-2, zero 1 and 3, tied and untied)."""
    if not chunks[-1].last:
        return 0
    whole, rows = _head_weight(data, layout)
    logits = _rank_logits(data, layout)
    if not data.mtp_depth:
        return ACT_BYTES * (rows + logits) - LOGIT_BYTES * logits
    tied = data.plan.tied
    held = ACT_BYTES * (rows if tied else rows + whole)
    weight_gradient = held + ACT_BYTES * (rows + max(rows, logits)) - LOGIT_BYTES * logits
    moments = [loss_backward + held, weight_gradient]
    if tied:
        moments.append(ACT_BYTES * _tied_gradient_sum(data, layout))
    passes, mtp = _head_tensors(data, layout, "torch", "flash")
    freed = (passes * data.mtp_depth / (1 + data.mtp_depth) + mtp) * layout.mb / layout.cp
    return math.ceil(max(moments) - freed)


def _head_reduction_transient(data: ModelData, layout: Layout, chunks: Sequence[Chunk],
                              states: StatesConvention) -> int:
    """Bytes torch's FSDP2 at zero 1 or 2 holds beside the last stage's activations while it reduces
    an LM head of its own (pp > 1): (4 + 2 under TP) B per element of the rank's rows, measured by
    verify --layout on Llama 3 8B at tp 1, 2, 8 (docs/distributed.md "temporary"; zero 0 and 3,
    not priced, hold other amounts)."""
    if states.engine != "torch" or layout.zero not in (1, 2) or layout.pp == 1 or not chunks[-1].last:
        return 0
    head = tuple(t for t in data.last_tied_copy if t.name.startswith("lm_head."))
    rows = _local_numel(head, layout.tp, layout.ep)[0]
    return (states.grad_bytes + (states.compute_copy_bytes if layout.tp > 1 else 0)) * rows


def _cp_gathered_transient(data: ModelData, layout: Layout, chunks: Sequence[Chunk], engine: Engine,
                           cp_comm: CPComm) -> int:
    """Bytes Megatron's all-gather context parallelism holds for one attention layer at a time:
    Transformer Engine's `AttnFuncWithCPAndKVAllGather` gathers the whole sequence's K and V for
    the layer's attention, and in the backward gathers them again beside their whole-sequence
    gradients before the reduce-scatter: 2 × the gathered K/V of the rank's largest attention
    layer, per micro-batch. The torch engine keeps its gathered K/V as activations (`_cp_kept`);
    a ring holds two blocks of T/cp, within the per-token model's slack."""
    if layout.cp == 1 or cp_comm != "all_gather" or engine != "megatron":
        return 0
    layers = data.plan.layers
    widest = max((_kv_bytes(layers[i], data.seq, layout.tp, engine) for chunk in chunks for i in chunk.layers),
                 default=0)
    return 2 * layout.mb * widest


def _head_tensors(data: ModelData, layout: Layout, engine: Engine, kernel: AttentionKernel) -> tuple[float, float]:
    """Bytes the head's passes keep for one sequence on the last stage: the final norm's input (but
    where Megatron's fused kernels keep a memory-efficient norm's output, the head's input, as
    `_layer_act` does for the block norms), the head's inputs and the fp32 logits of every pass
    (the main one and one per MTP module); and the MTP modules' kept inputs."""
    tp = layout.tp
    sp_split = tp if layout.sequence_parallel else 1
    # a column-parallel GEMM's input (the LM head's, an MTP module's projection's): sequence-sharded
    # under Megatron's SP, gathered and saved whole by DTensor (`shard._mtp_parallel` for the MTP's)
    column_split = sp_split if engine == "megatron" else 1
    norm_input = 0 if kernel == "flash" and engine == "megatron" else data.final_norm_act / sp_split
    ends = norm_input + data.head_input_act / column_split
    # an MTP module's embedding, sequence-sharded under SP, and its projection's input; full
    # recompute checkpoints the whole module, which keeps its inputs (its block's counted as the
    # layer's) and re-runs the projection (Megatron-Core's MTP layer)
    proj = data.mtp_proj_act if layout.recompute != "full" else 0
    mtp = data.mtp_ids_act + data.mtp_embed_act / sp_split + proj / column_split
    return ends + data.logits_act / tp, mtp


class _HeldByChunk(NamedTuple):
    """What the chunks of a pipeline rank hold besides what a schedule's moment adds: the bytes
    every chunk shares (cp's, ALiBi's and rotary's tables), each chunk's bytes per micro-batch it
    holds, and each layer's share of its chunk's (`_held_by_chunk`)."""
    shared: float
    per_count: list[float]
    per_layer: dict[int, float]


def _held_by_chunk(data: ModelData, layout: Layout, chunks: Sequence[Chunk], kernel: AttentionKernel,
                   engine: Engine, modules: frozenset[RecomputeModule], cp_comm: CPComm) -> _HeldByChunk:
    """The rank's chunks' activations per micro-batch they hold, as `_rank_activations` sums them
    over a schedule's moments, with each layer's share."""
    scale = layout.mb / layout.cp  # sequences per micro-batch, split over the context-parallel ranks
    per_layer = data.layer_acts(layout, layout.recompute, kernel, engine, modules)
    shared = 0.0
    per_count = []
    by_layer: dict[int, float] = {}
    for chunk in chunks:
        per_mb = sum(per_layer[chunk.layers.start:chunk.layers.stop])
        if chunk.first:
            per_mb += data.first_act  # token ids (int64), whole on every tp rank
        per_mb += _held_output(data, layout, chunk, engine)
        per_mb *= scale
        shared += (_cp_shared(data, layout, chunk.layers, engine, cp_comm)
                   + _shared_bias(data, layout, chunk.layers, engine) + _rope_tables(data, layout, chunk.layers, engine))
        # what a layer keeps beside its activations (full recompute keeps only its input)
        kept = {i: _once_kept(data.acts[i], layout) + _cp_kept(data, layout, i, engine, cp_comm)
                if layout.recompute != "full" else 0.0 for i in chunk.layers}
        per_count.append(per_mb + sum(kept.values()))
        by_layer.update({i: per_layer[i] * scale + kept[i] for i in chunk.layers})
    return _HeldByChunk(shared, per_count, by_layer)


def _reruns(data: ModelData, layout: Layout, chunks: Sequence[Chunk], kernel: AttentionKernel, engine: Engine,
            cp_comm: CPComm, to_mixer: bool = False) -> dict[int, float]:
    """Under full recompute, each layer's bytes while it re-runs in the backward: the whole
    layer's activations, a combine's working set, cp's and a filter's kept tensors; with
    `to_mixer`, what is left of them once the layer's FFN has run its backward
    (`ModelData.acts_to_mixer`: its combine's working set went with it)."""
    if layout.recompute != "full":
        return {}
    scale = layout.mb / layout.cp
    whole = data.layer_acts(layout, "none", kernel, engine, to_mixer=to_mixer)
    # the block input the checkpoint keeps, which a pre-norm block's first norm saves again as
    # the same tensor in the torch engine (its norms keep their inputs; `whole` counts it)
    block_input = data.layer_acts(layout, "full", kernel, engine)
    return {i: (whole[i] - (block_input[i] if _rerun_saves_kept_input(data, i, layout, engine) else 0.0)
                + _combine_working_set((data.acts_to_mixer if to_mixer else data.acts)[i], layout)
                + (_mtp_rerun_input(data, layout, engine) if i >= data.n_main else 0.0)) * scale
            + _cp_kept(data, layout, i, engine, cp_comm) + _once_kept(data.acts[i], layout)
            for chunk in chunks for i in chunk.layers}


def _rerun_frame(plan: ModelPlan, layer: LayerPlan, seq: int, layout: Layout, engine: Engine) -> float:
    """Bytes of one sequence a pre-norm layer's re-run holds beyond its saved tensors, in the
    torch engine: the non-reentrant checkpoint stops the re-run once the layer's last sub-block
    (its FFN, or its mixer without one) has recomputed the last tensor the backward needs, and
    the exception that stops it keeps that sub-block's frame alive with its input, the norm's
    output, which autograd does not save where the sub-block reads it through a copy: under SP
    a column-parallel projection saves the gathered input (DTensor), so the rank's shard of the
    norm's output (s·h/tp) is held beside it; an S4 mixer reads its input through bf16 channel
    shards and an fp32 copy (`_s4_input_copies`), with SP or without. Elsewhere the input is
    itself saved: without SP the projections', an MoE layer's router's. A parallel block stops in
    its FFN with the mixer's partial sum and the norm's output in the block's frame: three shards
    under SP, and without SP the norm's output where the mixer does not save it (S4); measured,
    not traced to each tensor. A block ending in a norm (post, DeepNorm, sandwich, reordered)
    stops in that norm, its sub-blocks' frames returned; an MTP module, checkpointed whole, is
    priced as it was (not measured for this). The frame is released once the re-run returns,
    before the layer's backward. The S4 and Hyena mixers hand their output projection a
    contiguous input: from batch 2 on a transposed one was copied by the projection, and the
    stopped frame held both (`modules.s4`, `modules.hyena`).
    Measured by verify --layout at full recompute: one S4D layer without an FFN at d_model 256,
    256 tokens, the re-run's end held beyond the priced activations 134,156 B at TP1 (the norm's
    131,072 B output), 135,180 at TP2 SP and 69,132 at TP4 SP (two tensors of s·h/tp), and with
    the copies priced 1.001 … 1.006 of them from TP1 to TP4, with SP or without, at CP2 and at
    TP2 × CP2; the tiny fixtures at TP2 SP, 64 tokens, two micro-batches, measured / analytic
    activations before → after: S4D with its FFN 1.071 → 1.030, Mamba-2 (no FFN) 1.055 → 1.017,
    Mamba-1 1.058 → 1.025, MLA 1.069 → 1.027, StripedHyena 1.059 → 1.024, Hyena 1.041 → 1.019;
    parallel blocks at 256 tokens, S4D at TP1 / TP2 / TP2 SP 1.051 / 1.090 / 1.151 → 1.004 /
    1.011 / 1.009, Hyena at TP2 SP 1.074 → 1.006, Mamba-2 with an FFN 1.089 → 1.004, Llama on
    the first of PP2 and PP4 1.143 / 1.129 → 1.002 / 1.002."""
    if engine != "torch" or plan.residual not in ("pre", "parallel") or isinstance(layer.ffn, MoEPlan) \
            or layer.where == "mtp":
        return 0.0
    sp, shard = layout.sequence_parallel, ACT_BYTES * seq * plan.d_model / layout.tp
    if plan.residual == "parallel" and layer.ffn is not None:
        # measured, not traced to each tensor: under SP three shards (the norm's output, the
        # mixer's partial sum and the FFN's input among them); without SP the norm's output where
        # the mixer does not save it (S4)
        return 3 * shard if sp else ACT_BYTES * seq * plan.d_model if isinstance(layer.mixer, S4Plan) else 0.0
    if isinstance(layer.mixer, S4Plan) and layer.ffn is None:
        return _s4_input_copies(plan.d_model, seq, layout.tp, layout.cp, sp)
    return shard if sp else 0.0


def _s4_input_copies(h: int, seq: int, tp: int, cp: int, sp: bool) -> float:
    """Bytes of one sequence (before the cp split) an S4 mixer's input takes in the torch engine
    besides its fp32 copy, bf16: the first norm's output (sequence-split under SP) and the
    rank's channel shards, each the size of its share of the input: one under tp alone (the
    all-to-all's output under SP, DTensor's contiguous slice of the replicated input without it:
    `distributed.plans.ChannelShardedInput`), two under cp, with or without tp (the exchange's
    contiguous send buffer and the whole sequences of the rank's channels it receives,
    `distributed.context.long_conv_context`). Counted from verify --layout's re-run ends (one
    S4D layer at d_model 256, 256 tokens: TP2 and TP4 with SP and without, CP2, CP4, TP2 × CP2
    with SP and without, TP4 × CP2 and TP2 × CP4, all within 4.6 KB)."""
    norm_output = ACT_BYTES * seq * h / (tp if sp else 1)
    shards = 2 if cp > 1 else 1 if tp > 1 else 0
    return norm_output + shards * ACT_BYTES * seq * h / tp


def _mtp_rerun_input(data: ModelData, layout: Layout, engine: Engine) -> float:
    """What an MTP module's re-run makes before its block, for one sequence: the normed pair
    [enorm(emb) | hnorm(h)] (2·d a token, sequence-sharded under SP), alive through the block's
    re-run as the module's local, and its projection's saved input, the pair itself but under the
    torch engine's SP, where DTensor saves the gathered whole (`shard._mtp_parallel`). Measured
    by verify --layout on a 2-layer model with one and two modules at 64 tokens under full
    recompute: at tp = 1 the re-run's end held 10,512 B the re-run term did not count, 8,192 of
    them the pair."""
    pair = data.mtp_proj_act / data.mtp_depth
    sp = layout.sequence_parallel
    return pair / (layout.tp if sp else 1) + (pair if engine == "torch" and sp else 0.0)


def _rerun_saves_kept_input(data: ModelData, i: int, layout: Layout, engine: Engine) -> bool:
    """Whether layer i's re-run saves the block input full recompute keeps as one of its own
    tensors, the same storage, which `whole` counts a second time: in the torch engine, a main
    layer whose block starts with a norm of its input (pre, parallel, sandwich: the norm saves
    it), or whose mixer reads it first (post, DeepNorm, reordered) through projections that save
    it as it is, without SP (under SP DTensor's matmul saves the gathered input, a new tensor).
    S4's mixer reads it through an fp32 copy (`modules.s4`), which is new storage. Megatron's
    fused norms keep no input (`_layer_act`); an MTP module is checkpointed whole and its re-run
    makes its block's input again. Measured by verify --layout on tiny-mamba with each
    residual at 256 tokens, full recompute, measured / analytic activations: TP1 ZeRO-3 and TP2
    without SP 0.962 … 1.000 before, 1.005 … 1.018 after (docs/distributed.md)."""
    if engine != "torch" or i >= data.n_main:
        return False
    if data.plan.residual in NORM_ON_INPUT:
        return True
    return not layout.sequence_parallel and not isinstance(data.plan.layers[i].mixer, S4Plan)


def _rank_activations(data: ModelData, layout: Layout, stage: int, microbatches: int,
                      kernel: AttentionKernel, engine: Engine,
                      modules: frozenset[RecomputeModule] = frozenset(), cp_comm: CPComm = "all_gather") -> int:
    """Activation bytes of pipeline rank `stage` at the schedule's peak (the module docstring)."""
    scale = layout.mb / layout.cp
    mode = layout.recompute
    chunks = rank_chunks(data.n_main, layout, stage, data.mtp_depth)
    held = _held_by_chunk(data, layout, chunks, kernel, engine, modules, cp_comm)
    head = main_pass = mtp_pass = 0.0
    if chunks[-1].last:
        passes, mtp = _head_tensors(data, layout, engine, kernel)
        head = (passes + mtp) * scale
        # the main pass's share of the head's tensors, and the MTP modules' kept inputs
        main_pass = (passes / (1 + data.mtp_depth) + mtp) * scale
        # an MTP pass's: the head's input and the logits (its final norm is inside the module,
        # which full recompute checkpoints whole)
        mtp_pass = (data.head_input_act + data.logits_act / layout.tp) / (1 + data.mtp_depth) * scale
    # a layer is re-run in the backward after the loss's and the head's backward freed the
    # logits and the head's inputs: the two peaks do not coexist (measured by verify --layout)
    reruns = _reruns(data, layout, chunks, kernel, engine, cp_comm)
    combines = [max((_combine_working_set(data.acts[i], layout) * scale for i in chunk.layers), default=0.0)
                for chunk in chunks]
    last = len(chunks) - 1 if chunks[-1].last else None  # the model's last chunk, where the rank holds it
    # per chunk, its largest layer re-run: the layers above a re-run one have run their backward,
    # which freed the inputs their checkpoints kept for this micro-batch (`_mixer_backward` takes
    # them off alike); at a re-run's end its stopped frame holds more (`_rerun_frame`), released
    # before the layer's backward, which `_mixer_backward` prices without it
    rerun_most = [max((reruns[i] + _rerun_frame(data.plan, data.plan.layers[i], data.seq, layout, engine) * scale
                       - above for i, above in _held_above(held.per_layer, chunk.layers)),
                      default=0.0) for chunk in chunks] if mode == "full" else []

    def beside(moment: PipelineMoment) -> float:
        """What the moment holds beyond the chunks' kept activations: the head's tensors after the
        last chunk's forward, the output gradient received for the next backward of any other
        chunk (`_received_gradient`), and, under full recompute, the re-run of that backward's
        layers; without it, the combine's transient rows of the forward just run."""
        head_now = head if moment.forward == last else 0.0
        received = _received_gradient(data, layout, chunks[moment.backward]) * scale
        if mode != "full":
            return max(head_now, combines[moment.forward] if moment.forward is not None else 0.0, received)
        # the received output gradient waits beside the chunk's first re-run
        moments = [head_now, received + rerun_most[moment.backward]]
        if engine == "torch" and data.mtp_depth and moment.backward == last:
            # except the MTP modules' re-run: the torch engine's loss adds the main pass's first
            # (`distributed.stage.Stage`), so autograd runs the modules' backward, the deepest
            # first, and module k's re-run while the head tensors of the main pass and of the
            # modules before k still wait for theirs (Megatron-Core computes the main loss last:
            # its backward frees them first)
            moments.append(main_pass + max(k * mtp_pass + reruns[data.n_main + k] for k in range(data.mtp_depth)))
        return max(moments)

    return math.ceil(held.shared + max(sum(map(math.prod, zip(moment.counts, held.per_count))) + beside(moment)
                                       for moment in pipeline_moments(layout, microbatches, stage)))


def _check(plan: ModelPlan, layout: Layout, seq: int, microbatches: int, stage: int | None,
           kernel: str) -> None:
    if microbatches < 1:
        raise ArchplanError(f"microbatches must be positive, got {microbatches}")
    if stage is not None and not 0 <= stage < layout.pp:
        raise ArchplanError(f"stage {stage} is not a pipeline rank of pp={layout.pp}")
    if kernel not in ATTENTION_KERNELS:
        raise ArchplanError(f"attention kernel '{kernel}' is not one of {', '.join(ATTENTION_KERNELS)}")
    if seq % layout.cp:
        raise ArchplanError(f"--seq {seq} does not split over cp={layout.cp} ranks")


def most_loaded_stage(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int,
                      states: StatesConvention = MEGATRON,
                      attention_kernel: AttentionKernel = "flash", loss: CrossEntropyImpl = "fp32-fused") -> int:
    """The pipeline rank whose rank needs the most memory (ties: the first)."""
    _check(plan, layout, seq, microbatches, None, attention_kernel)
    data = model_data(plan, seq)
    stages = data.representative_stages(layout.pp, layout.vpp)
    totals = [_memory(data, layout, s, microbatches, states, attention_kernel, loss=loss).total for s in stages]
    return stages[totals.index(max(totals))]


def rank_memory(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int,
                stage: int | None = None, states: StatesConvention = MEGATRON,
                attention_kernel: AttentionKernel = "flash", loss: CrossEntropyImpl = "fp32-fused") -> RankMemory:
    """Peak bytes by category on rank 0 of pipeline rank `stage` (None: the most loaded), the
    loss computed by `loss`."""
    if stage is None:
        stage = most_loaded_stage(plan, layout, seq, microbatches=microbatches, states=states,
                                  attention_kernel=attention_kernel, loss=loss)
    _check(plan, layout, seq, microbatches, stage, attention_kernel)
    return _memory(model_data(plan, seq), layout, stage, microbatches, states, attention_kernel, loss=loss)


# ------------------------------------------------------------------------------ collectives
def _kv_bytes(layer: LayerPlan, tokens: int, tp: int, engine: Engine) -> int:
    """What context parallelism exchanges per attention layer over `tokens`, bf16: K and V of the
    rank's heads; for MLA, Megatron-Core (Transformer Engine's CP) the expanded K and V of its
    heads, the torch engine the latent [c_kv | k_pe] of the decode cache (C + R per token, the same
    on every tp rank; `modules.mla.MLA._context_parallel`), each rank then expanding every key."""
    match layer.mixer:
        case AttentionPlan():
            a = layer.mixer
            return 2 * ACT_BYTES * tokens * math.ceil(a.n_kv_heads / tp) * a.head_dim
        case MLAPlan():
            m = layer.mixer
            match engine:
                case "megatron":
                    return ACT_BYTES * tokens * math.ceil(m.n_heads / tp) * (m.qk_head_dim + m.v_head_dim)
                case "torch":
                    return ACT_BYTES * tokens * (m.kv_lora_rank + m.qk_rope_head_dim)
                case _:
                    assert_never(engine)
        case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
            return 0
        case _:
            assert_never(layer.mixer)


def _qkv_gathered(layer: LayerPlan, tokens: int, tp: int, engine: Engine) -> tuple[int, int]:
    """(bytes, calls) of the all-gathers over tp per forward of an attention layer with fewer KV
    heads than tp ranks, whose K and V weights split by rows so that a rank's rows cut across a
    head: Megatron-Core (`Attention`'s `num_query_groups < world_size` branch) gathers the whole
    fused QKV output of its `tokens` (the column input, gathered under SP) and keeps its group's
    heads; the torch engine gathers K and V apart and keeps the rank's head
    (`distributed.plans.KVHeads`). Each gather's backward reduce-scatters its gradient. (0, 0)
    where the KV heads split whole over tp, and for MLA."""
    a = layer.mixer
    if not isinstance(a, AttentionPlan) or a.n_kv_heads >= tp:
        return 0, 0
    match engine:
        case "megatron":
            return ACT_BYTES * tokens * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, 1
        case "torch":
            return ACT_BYTES * tokens * a.n_kv_heads * a.head_dim, 2
        case _:
            assert_never(engine)


def _dp_records(local: tuple[int, int], fsdp: tuple[int, int], what: str, layout: Layout, m: int,
               states: StatesConvention, grad_reduce: int, overlappable: bool,
               fetches: dict[int, tuple[int, int]] | None = None,
               fp8: tuple[int, int] = (0, 0), forward_calls: int = 1) -> list[Collective]:
    """Gradient reduction and parameter gathers of `local` (dense, expert) elements whose FSDP2
    shards are `fsdp`. `fetches` (ZeRO-3 fetched per module): gathers per micro-batch -> the
    (dense, expert) elements gathered that many times, instead of every element twice. `fp8`: of
    `local`, the elements FP8 primary weights gather in one byte (`StatesConvention.fp8_weights`).
    `forward_calls`: the unit's calls per forward, each gathering it again at ZeRO-3 (which
    reshards it after each)."""
    groups = (("dp_cp" if layout.cp > 1 else "dp", layout.dp * layout.cp, False),
              ("expert_dp", layout.expert_dp, True))
    zero = layout.zero
    out: list[Collective] = []
    for (mesh, size, expert), n, shard, in_fp8 in zip(groups, local, fsdp, fp8):
        if n == 0 or size == 1:
            continue
        padded = (shard if states.per_tensor else math.ceil(n / size)) * size
        label = f"{what}{' experts' if expert else ''}"
        grads = ("all_reduce", n * grad_reduce) if zero == 0 else ("reduce_scatter", padded * grad_reduce)
        grad_calls = m if zero >= 2 else 1
        out.append(Collective(grads[0], mesh, size, grads[1], grad_calls,  # type: ignore[arg-type]
                              f"{label} gradients (DP)", overlappable, unpadded=n))
        if zero == 3 and fetches is not None:
            for times, elements in sorted(fetches.items()):
                gathered = elements[expert]
                if times and gathered:
                    out.append(Collective("all_gather", mesh, size, math.ceil(gathered / size) * size * ACT_BYTES,
                                          times * m, f"{label} bf16 parameters (DP, {times} fetches per micro-batch)",
                                          overlappable))
        elif zero >= 1:
            gathers = (forward_calls + 1) * m if zero == 3 else 1
            # bf16, but one byte for each weight kept in fp8
            fp8_padded = math.ceil(in_fp8 / size) * size if states.fp8_weights else 0
            dtype = "bf16 + fp8" if fp8_padded else "bf16"
            gathered = padded * ACT_BYTES - (ACT_BYTES - FP8_BYTES) * fp8_padded
            out.append(Collective("all_gather", mesh, size, gathered, gathers,
                                  f"{label} {dtype} parameters (DP)", overlappable))
    return out


def _fetch_classes(counts: dict[str, int], found: Iterable[tuple[Module, tuple[Tensor, ...]]]) -> dict[int, tuple[int, int]]:
    """Gathers per micro-batch -> (dense, expert) elements of the modules `found`."""
    out: dict[int, tuple[int, int]] = {}
    for m, _ in found:
        fetches = counts.get(m.name, 0)
        dense, expert = out.get(fetches, (0, 0))
        out[fetches] = (dense + (0 if m.expert else m.gathered), expert + (m.gathered if m.expert else 0))
    return out


class _Calls(list[Collective]):
    """The collectives one rank calls, in the order they are found; `add` drops the ones a degree
    of 1 or a count of 0 makes vanish."""

    def add(self, kind: str, mesh: str, size: int, nbytes: int, count: int, what: str,
            overlappable: bool = False) -> None:
        if size > 1 and count:
            self.append(Collective(kind, mesh, size, nbytes, count, what, overlappable))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _ChunkScope:
    """What every record of one model chunk of the rank reads."""

    data: ModelData
    layout: Layout
    chunk: Chunk
    counted: ChunkLayers
    m: int  # micro-batches
    engine: Engine
    tp_over: bool  # TP communication hides behind compute ("tp" in the overlaps)

    @property
    def span(self) -> str:
        return _span(self.chunk.layers)

    @property
    def tokens(self) -> int:
        return self.layout.mb * self.data.seq // self.layout.cp

    @property
    def act(self) -> int:
        """One micro-batch's bf16 residual stream on the rank's sequence shard of CP."""
        return ACT_BYTES * self.tokens * self.data.plan.d_model

    @property
    def fwd(self) -> int:
        return forward_passes(self.layout)


def _collectives(data: ModelData, layout: Layout, stage: int, m: int, states: StatesConvention,
                 grad_reduce: int, cp_comm: CPComm, overlap: frozenset[str], early_stop: bool,
                 per_layer: bool = True) -> list[Collective]:
    tp_over, ep_over = "tp" in overlap, bool(EP_OVERLAPS & overlap)
    pp_over = "pp" in overlap and layout.vpp > 1  # only the interleaved schedule overlaps (pricing.pp_exposed)
    calls = _Calls()
    norm_grads: dict[int, int] = {}  # elements -> tensors: replicated weights summed over tp
    counts = fetch_trace(data, layout, stage)[1] if states.module_fetch and layout.zero == 3 else None
    stale = (fsdp2_stale_prefetch(layout, m, stage) if states.engine == "torch" and layout.zero >= 1
             else (False,) * layout.vpp)
    for chunk, in_vain in zip(rank_chunks(data.n_main, layout, stage, data.mtp_depth), stale):
        scope = _ChunkScope(data, layout, chunk, data.chunk_layers(chunk.layers), m, states.engine, tp_over)
        _tp_layer_calls(calls, scope, early_stop)
        _tp_end_calls(calls, scope)
        _count_replicated_grads(norm_grads, scope)
        _qk_norm_stat_calls(calls, scope)
        _cp_calls(calls, scope, cp_comm)
        calls += ep_records(data.plan, scope.counted, layout, data.seq, m, ep_over, scope.span)
        _aux_loss_calls(calls, scope)
        _pp_calls(calls, scope, pp_over)
        _dp_chunk_calls(calls, scope, states, grad_reduce, "dp" in overlap, counts, in_vain, per_layer)
    _replicated_grad_calls(calls, norm_grads, layout, m, states, grad_reduce)
    return calls


def _tp_layer_calls(calls: _Calls, s: _ChunkScope, early_stop: bool) -> None:
    """The layers' tensor-parallel traffic: each sub-block's output (and input under SP), S4's
    channel exchange and Mamba-1's x_proj partial sums."""
    layout, counted, m, fwd, act, span = s.layout, s.counted, s.m, s.fwd, s.act, s.span
    tp, cp, sp, tp_over = layout.tp, layout.cp, layout.sequence_parallel, s.tp_over
    # an early-stopping checkpoint ends the re-run once the last saved tensor is rebuilt,
    # before each layer's last row-parallel reduction (`recompute_skips_last_gemm`)
    skipped = counted.ends_tp if fwd == 2 and early_stop else 0
    outputs = m * (counted.sub_blocks * (fwd + 1) - skipped)
    if sp:
        # Megatron re-gathers the column input in the backward; DTensor saved it gathered
        regather = 1 if s.engine == "megatron" else 0
        calls.add("all_gather", "tp", tp, act, m * counted.sub_blocks * (fwd + 1 + regather),
                  f"{span} SP inputs", tp_over)
        calls.add("reduce_scatter", "tp", tp, act, outputs, f"{span} SP outputs", tp_over)
    else:
        calls.add("all_reduce", "tp", tp, act, outputs, f"{span} TP outputs", tp_over)
    # S4 (shards._s4): no column projection; its channel slice of the input comes from the
    # sequence shards by an all-to-all under SP (a free slice without), and the row-parallel
    # output_linear reduces 2·d_model partial sums before the GLU
    s4 = counted.s4
    if sp:
        calls.add("all_to_all", "tp", tp, act // tp, m * s4 * (fwd + 1),
                  f"{span} S4 input to channel shards (SP)", tp_over)
        calls.add("reduce_scatter", "tp", tp, 2 * act, m * s4 * fwd,
                  f"{span} S4 output_linear, 2·d_model (SP)", tp_over)
        calls.add("all_gather", "tp", tp, 2 * act, m * s4, f"{span} S4 output_linear gradient (SP)", tp_over)
    else:
        calls.add("all_reduce", "tp", tp, 2 * act, m * s4 * fwd, f"{span} S4 output_linear, 2·d_model (TP)",
                  tp_over)
        calls.add("all_gather", "tp", tp, act, m * s4, f"{span} S4 input-gradient channel slices (TP)", tp_over)
    # Mamba-1 (`distributed.plans.mamba1_plan`): x_proj contracts the rank's d_inner channels;
    # its dt_rank + 2·d_state partial sums are all-reduced in the forward (again under full
    # recompute), and their gradient, returned in parts by each rank's channels, in the backward;
    # under CP for the whole sequence of the rank's channels, over tp and then over cp
    for width, n in _merged(counted.x_proj, lambda per_token: ACT_BYTES * s.tokens * cp * per_token):
        calls.add("all_reduce", "tp", tp, width, m * n * (fwd + 1), f"{span} Mamba x_proj partial sums (TP)",
                  tp_over)
        calls.add("all_reduce", "cp", cp, width, m * n * (fwd + 1), f"{span} Mamba x_proj partial sums (CP)")


def _tp_end_calls(calls: _Calls, s: _ChunkScope) -> None:
    """The tensor-parallel traffic of the embedding (first chunk), the LM head, its loss and the
    multi-token-prediction modules (last chunk)."""
    data, layout, m, fwd, act = s.data, s.layout, s.m, s.fwd, s.act
    tp, sp, plan = layout.tp, layout.sequence_parallel, data.plan
    if s.chunk.first:
        # Megatron-LM adds learned positions to the whole embedding output, all-reduced, and
        # scatters the sum over the sequence (`LanguageModelEmbedding`: no reduce-scatter then)
        scattered = sp and not (s.engine == "megatron" and plan.position == "learned")
        calls.add("reduce_scatter" if scattered else "all_reduce", "tp", tp, act, m, "embedding output (TP)")
        if sp:
            calls.add("all_gather", "tp", tp, act, m, "embedding output gradient (SP)")
        if sp and s.engine == "torch" and plan.position == "learned":
            # each rank adds its shard's rows of the replicated table; DTensor all-gathers their
            # gradient (`distributed.plans.SequenceShardedPositions`), summed over the batch
            calls.add("all_gather", "tp", tp, ACT_BYTES * (data.seq // layout.cp) * plan.d_model, m,
                      "learned positions gradient (SP)")
    if not s.chunk.last:
        return
    passes = m * (1 + data.mtp_depth)  # the head runs once more per MTP module
    calls.add("all_gather" if sp else "all_reduce", "tp", tp, act, passes, "LM-head input (TP)")
    if sp:
        calls.add("reduce_scatter", "tp", tp, act, passes, "LM-head input gradient (SP)")
    calls.add("all_reduce", "tp", tp, LOGIT_BYTES * s.tokens, 3 * passes,
              "vocab-parallel cross-entropy max, sum-exp, target logit")
    # each MTP module embeds the shifted tokens through the stage's vocabulary-parallel copy,
    # then its column-parallel eh_proj reads the 2·d concatenation (gathered over the
    # sequence under SP) and its output is gathered over the last dim and scattered back
    # over the sequence (Megatron-Core's `MultiTokenPredictionLayer._concat_embeddings`)
    # Full recompute re-runs each module with its projection, the embedding outside it
    # (Megatron-Core checkpoints `_proj_and_transformer_layer`; archplan's torch engine the
    # module: measured by verify --layout); Megatron's eh_proj re-gathers its input in the
    # backward as every column-parallel GEMM under SP does, DTensor saved it gathered
    mtp = m * data.mtp_depth
    regather = 1 if s.engine == "megatron" else 0
    calls.add("reduce_scatter" if sp else "all_reduce", "tp", tp, act, mtp, "MTP embedding output (TP)")
    if sp:
        calls.add("all_gather", "tp", tp, act, mtp, "MTP embedding output gradient (SP)")
        calls.add("all_gather", "tp", tp, 2 * act, mtp * (fwd + regather), "MTP projection input, 2·d (SP)")
        calls.add("reduce_scatter", "tp", tp, 2 * act, mtp, "MTP projection input gradient, 2·d (SP)")
        calls.add("all_gather", "tp", tp, act, mtp, "MTP projection output gradient (SP)")
    else:
        calls.add("all_reduce", "tp", tp, 2 * act, mtp, "MTP projection input gradient, 2·d (TP)")
    calls.add("all_gather", "tp", tp, act, mtp * fwd, "MTP projection output, over the last dim (TP)")


def _count_replicated_grads(norm_grads: dict[int, int], s: _ChunkScope) -> None:
    """The chunk's replicated weights whose gradients are summed over tp (`_replicated_grad_calls`)."""
    tp, chunk = s.layout.tp, s.chunk
    if s.layout.sequence_parallel and tp > 1:
        _count_into(norm_grads, s.counted.sp_norms)
        for flag, norms in ((chunk.first, s.data.sp_norms_first), (chunk.last, s.data.sp_norms_last)):
            _count_into(norm_grads, ((n, 1) for n in norms) if flag else ())
    if tp > 1:
        _count_into(norm_grads, s.counted.tp_summed)


def _qk_norm_stat_calls(calls: _Calls, s: _ChunkScope) -> None:
    """A qk-norm over the heads' whole width sums its statistics over tp, in the forward (again
    under full recompute) and the backward."""
    if s.layout.tp > 1:
        for n, count in s.counted.stats:
            calls.add("all_reduce", "tp", s.layout.tp, STAT_BYTES * n * s.tokens, s.m * count * (s.fwd + 1),
                      f"{s.span} qk-norm statistics over the heads' width (TP)", s.tp_over)


def _cp_calls(calls: _Calls, s: _ChunkScope, cp_comm: CPComm) -> None:
    """Attention's K/V over cp (and over tp where there are fewer KV heads than tp ranks), and the
    long convolutions' and Mamba scans' sequence <-> channel exchanges over cp."""
    layout, counted, m, fwd, span, engine = s.layout, s.counted, s.m, s.fwd, s.span, s.engine
    tp, cp, tokens = layout.tp, layout.cp, s.tokens
    for kv, n in _merged(counted.kv, lambda layer: _kv_bytes(layer, tokens * cp, tp, engine)):
        match cp_comm:
            case "all_gather":
                # Megatron (Transformer Engine) re-gathers K/V in the backward; torch's
                # autograd all-gather saved them gathered (`distributed/context.py`)
                regather = 1 if engine == "megatron" else 0
                calls.add("all_gather", "cp", cp, kv, m * n * (fwd + regather), f"{span} K/V (CP)")
                calls.add("reduce_scatter", "cp", cp, kv, m * n, f"{span} K/V gradients (CP)")
            case "ring":
                steps = m * n * (cp - 1) * (fwd + 2)
                calls.add("send", "cp", cp, kv // cp, steps, f"{span} K/V ring (CP)")
                calls.add("recv", "cp", cp, kv // cp, steps, f"{span} K/V ring (CP)")
            case _:
                assert_never(cp_comm)
    # fewer KV heads than tp ranks: each layer gathers its K/V projection's output
    what = "fused QKV output" if engine == "megatron" else "K and V outputs"
    for layer, n in counted.kv:
        gathered, per_layer = _qkv_gathered(layer, tokens, tp, engine)
        calls.add("all_gather", "tp", tp, gathered, m * n * per_layer * fwd,
                  f"{span} {what}, fewer KV heads than tp", s.tp_over)
        calls.add("reduce_scatter", "tp", tp, gathered, m * n * per_layer,
                  f"{span} {what} gradient, fewer KV heads than tp", s.tp_over)
    for sent, n in _merged(counted.conv, lambda channels: ACT_BYTES * tokens * channels // tp):
        # forward (again under full recompute) and backward
        calls.add("all_to_all", "cp", cp, sent, m * n * (fwd + 1),
                  f"{span} long-conv sequence <-> channel shards (CP)")
    for sent, n in _merged(counted.scan,
                           lambda key: ACT_BYTES * tokens * mamba_exchange(key[0], tp, cp, engine)[key[1]]):
        calls.add("all_to_all", "cp", cp, sent, m * n * (fwd + 1), f"{span} Mamba sequence <-> head shards (CP)")


def _aux_loss_calls(calls: _Calls, s: _ChunkScope) -> None:
    """A load-balancing loss sums its routed-pair counts (fp32, one row of E per sequence or per
    micro-batch) over the ranks splitting the micro-batch's tokens, tp under SP, then cp, in each
    forward (Megatron-Core's router, over its tp_cp_group; `modules.moe.TokenShards`)."""
    layout = s.layout
    for (experts, per_sequence), n in s.counted.aux:
        summed = COUNT_BYTES * experts * (layout.mb if per_sequence else 1)
        if layout.sequence_parallel:
            calls.add("all_reduce", "tp", layout.tp, summed, s.m * n * s.fwd,
                      f"{s.span} MoE load-balancing counts (SP)")
        calls.add("all_reduce", "cp", layout.cp, summed, s.m * n * s.fwd, f"{s.span} MoE load-balancing counts (CP)")


def _pp_calls(calls: _Calls, s: _ChunkScope, pp_over: bool) -> None:
    """The chunk's activations and their gradients to and from its neighbours. Narayanan et al.
    2021 §4.1: scattered over the TP ranks, gathered on NVLink (Megatron); the torch engine sends
    what the stage holds: the sequence shard under SP, else the whole."""
    layout, chunk, m = s.layout, s.chunk, s.m
    p2p = s.act // layout.tp if layout.sequence_parallel or s.engine == "megatron" else s.act
    if not chunk.first:
        calls.add("recv", "pp", layout.pp, p2p, m, f"chunk {chunk.index} input (PP)", pp_over)
        calls.add("send", "pp", layout.pp, p2p, m, f"chunk {chunk.index} input gradient (PP)", pp_over)
    if not chunk.last:
        calls.add("send", "pp", layout.pp, p2p, m, f"chunk {chunk.index} output (PP)", pp_over)
        calls.add("recv", "pp", layout.pp, p2p, m, f"chunk {chunk.index} output gradient (PP)", pp_over)


def _dp_chunk_calls(calls: _Calls, s: _ChunkScope, states: StatesConvention, grad_reduce: int, dp_over: bool,
                    counts: dict[str, int] | None, in_vain: bool, per_layer: bool) -> None:
    """Data parallelism: one record per layer (FSDP2 / torchtitan wrap each block) and the ends,
    or, per_layer=False, one per chunk with the bytes summed (what pricing needs); the tied
    embedding's gradient between the end stages."""
    data, layout, chunk, m, engine = s.data, s.layout, s.chunk, s.m, s.engine
    tp, ep = layout.tp, layout.ep
    dp, edp = layout.dp * layout.cp, layout.expert_dp
    numel_d, numel_e = data.numel(tp, ep)
    fsdp_d, fsdp_e = data.fsdp(tp, ep, dp, edp) if states.per_tensor else (numel_d, numel_e)
    fp8_d, fp8_e = data.numel(tp, ep, fp8_only=True)
    lo, hi = chunk.layers.start, chunk.layers.stop

    def fetched(*parts: int | End) -> dict[int, tuple[int, int]] | None:
        if counts is None:
            return None
        return _fetch_classes(counts, (found for part in parts for found in data.modules(part, tp, ep)))

    if per_layer:
        for i in chunk.layers:
            # the torch engine's MTP module is one FSDP2 unit, its input parts with its block
            own = data.mtp_own(i) if engine == "torch" else ()
            (od, oe), (sd, se), (fd, fe) = (_local_numel(own, tp, ep), _fsdp_numel(own, tp, ep, dp, edp),
                                            _local_fp8_numel(own, tp, ep))
            calls += _dp_records((numel_d[i] + od, numel_e[i] + oe), (fsdp_d[i] + sd, fsdp_e[i] + se),
                                 f"layers.{i}", layout, m, states, grad_reduce, dp_over, fetched(i),
                                 (fp8_d[i] + fd, fp8_e[i] + fe))
    elif hi > lo:
        calls += _dp_records((sum(numel_d[lo:hi]), sum(numel_e[lo:hi])),
                             (sum(fsdp_d[lo:hi]), sum(fsdp_e[lo:hi])), s.span, layout, m, states,
                             grad_reduce, dp_over, fetched(*chunk.layers),
                             (sum(fp8_d[lo:hi]), sum(fp8_e[lo:hi])))
    end_units = _fsdp_end_units(data, chunk.first, chunk.last, layout.pp) if engine == "torch" else ()
    root_params = any(tensors for tensors, what in end_units if what != "embedding")
    if in_vain and not root_params and len(chunk.layers) > 1:
        # the chunk's last layer, gathered in vain (`fsdp2_stale_prefetch`); a stage root
        # unit with parameters is recorded last instead, and is still gathered then
        i = chunk.layers.stop - 1
        calls += [replace(r, count=1, discarded=True,
                          what=f"{r.what}, gathered in vain by FSDP2's backward prefetch")
                  for r in _dp_records((numel_d[i], 0), (fsdp_d[i], 0), f"layers.{i}", layout, 1, states,
                                       grad_reduce, dp_over, None, (fp8_d[i], 0))
                  if r.kind == "all_gather"]
    last: End = "last_tied_copy" if layout.pp > 1 else "last"
    match engine:
        case "megatron":
            ends = ((data.first if chunk.first else (), "embedding", ("first",)),
                    (data.ends(False, chunk.last, layout.pp), "final norm + LM head",
                     (last,) if chunk.last else ()))
        case "torch":
            ends = tuple((tensors, what, ()) for tensors, what in end_units)
        case _:
            assert_never(engine)
    for tensors, what, parts in ends:
        if tensors:
            # the torch engine's embedding unit on a stage that also runs the MTP modules
            # embeds their tokens once more per depth (`distributed.stage.Stage`)
            forward_calls = 1 + data.mtp_depth if engine == "torch" and what == "embedding" and chunk.last else 1
            calls += _dp_records(_local_numel(tensors, tp, ep), _fsdp_numel(tensors, tp, ep, dp, edp),
                                 what, layout, m, states, grad_reduce, dp_over, fetched(*parts),
                                 _local_fp8_numel(tensors, tp, ep), forward_calls)
    if (data.plan.tied or data.mtp_depth) and layout.pp > 1 and (chunk.first or chunk.last):
        # Megatron all-reduces the whole main grad; FSDP2 (zero ≥ 1) the rank's dim-0 shard,
        # split alike on both end stages (`distributed.step.StageRunner.sync_tied_gradient`)
        sharded = engine == "torch" and layout.zero >= 1
        embed = (_fsdp_numel((data.first[0],), tp, ep, dp, edp) if sharded
                 else _local_numel((data.first[0],), tp, ep))[0]
        calls.add("all_reduce", "pp", 2, embed * grad_reduce, 1, "tied embedding gradient (first + last stage)")


def _replicated_grad_calls(calls: _Calls, norm_grads: dict[int, int], layout: Layout, m: int,
                           states: StatesConvention, grad_reduce: int) -> None:
    """Sequence-parallel norm weights see a rank's tokens only: their gradients are summed over tp
    (Korthikanti et al. 2022 §4.2.2); DTensor all-reduces each one's Partial bf16 gradient per
    micro-batch, Megatron-LM all its main grads at once per step (`_allreduce_layernorm_grads`)."""
    what = "replicated weight gradients summed over tp (SP norms, routers, MLA latents)"
    tp = layout.tp
    match states.engine:
        case "torch" if _fsdp_accumulates(layout, m):
            # the Partial gradients accumulate unreduced in fp32 (FSDP2's `unsharded_accumulated_grad`)
            # and are all-reduced once, at the last backward's gradient reduction
            for n, count in norm_grads.items():
                calls.add("all_reduce", "tp", tp, n * grad_reduce, count, what)
        case "torch":
            for n, count in norm_grads.items():
                calls.add("all_reduce", "tp", tp, n * ACT_BYTES, m * count, what)
        case "megatron":
            total = sum(n * count for n, count in norm_grads.items())
            calls.add("all_reduce", "tp", tp, total * states.grad_bytes, 1 if total else 0, what)
        case _:
            assert_never(states.engine)


def _count_into(counts: dict[int, int], more: Iterable[tuple[int, int]]) -> None:
    for key, n in more:
        counts[key] = counts.get(key, 0) + n


def forward_passes(layout: Layout) -> int:
    """Forward passes per micro-batch: the recomputed one again under full recompute."""
    return 2 if layout.recompute == "full" else 1


def ep_records(plan: ModelPlan, counted: ChunkLayers, layout: Layout, seq: int, m: int, overlappable: bool,
               span: str) -> list[Collective]:
    """One model chunk's MoE dispatch + combine all-to-alls over ep, forward (again under full
    recompute) and backward: each rank sends the routed copies of its tokens (its sequence shard
    under SP). `pricing.Pricer` also reads them a layer at a time, for the search's floor."""
    if layout.ep <= 1:
        return []
    tokens = layout.mb * seq // layout.cp
    sent = tokens // layout.tp if layout.sequence_parallel else tokens
    return [Collective("all_to_all", "ep", layout.ep, routed, m * n * 2 * (forward_passes(layout) + 1),
                       f"{span} MoE dispatch + combine (EP)", overlappable)
            for routed, n in _merged(counted.top_k, lambda top_k: ACT_BYTES * sent * top_k * plan.d_model)]


def _span(layers: range) -> str:
    return f"layers {layers.start}-{layers.stop - 1}" if layers else "no layers"


def _merged(counted: tuple[tuple[T, int], ...], value: Callable[[T], int]) -> list[tuple[int, int]]:
    """(value, layers) per distinct value of the counted keys, in first-seen order: the layers a
    record of that many bytes stands for (distinct keys may give equal bytes)."""
    merged: dict[int, int] = {}
    _count_into(merged, ((value(key), n) for key, n in counted))
    return list(merged.items())


def step_collectives(plan: ModelPlan, layout: Layout, seq: int, *, microbatches: int,
                     stage: int | None = None, states: StatesConvention = MEGATRON,
                     grad_reduce: int | None = None, cp_comm: CPComm = "all_gather",
                     overlap: frozenset[str] = frozenset({"dp"}),
                     attention_kernel: AttentionKernel = "flash",
                     early_stop: bool | None = None) -> tuple[Collective, ...]:
    """Every collective rank 0 of pipeline rank `stage` calls in one optimizer step.

    grad_reduce: bytes per gradient element on the wire (2 bf16, 4 fp32; default the convention's
    gradient bytes). overlap: which communication may hide behind compute ("dp": the gradient
    reduce and parameter gathers, as Megatron's --overlap-grad-reduce/--overlap-param-gather and
    FSDP's prefetch do; "tp": TP communication, when the run overlaps it; "pp": the interleaved
    schedule's sends and receives; "ep", "dualpipe": the MoE all-to-all, in part or all of it,
    `pricing.ep_exposed`). early_stop: whether full recompute stops early (`uses_early_stop`;
    default the engine's).
    """
    if stage is None:
        stage = most_loaded_stage(plan, layout, seq, microbatches=microbatches, states=states,
                                  attention_kernel=attention_kernel)
    _check(plan, layout, seq, microbatches, stage, attention_kernel)
    if cp_comm not in CP_COMMS:
        raise ArchplanError(f"CP communication '{cp_comm}' is not one of {', '.join(CP_COMMS)}")
    unknown = set(overlap) - set(OVERLAPS)
    if unknown:
        raise ArchplanError(f"--overlap: unknown {', '.join(sorted(unknown))} (expected {', '.join(OVERLAPS)})")
    reduce_bytes = states.grad_bytes if grad_reduce is None else grad_reduce
    return tuple(_collectives(model_data(plan, seq), layout, stage, microbatches, states,
                              reduce_bytes, cp_comm, frozenset(overlap), uses_early_stop(states, early_stop)))
