"""Cluster layout search and evaluation: tensor, context, pipeline (with virtual stages), data and
expert parallel degrees, ZeRO stage, recompute mode and micro-batch size, each priced by the
layout model: `cluster.py` lists what a rank holds and every collective it calls, `pricing.py`
prices them with the per-kernel-class compute model. A layout fits if the most loaded pipeline
rank's memory is at most (1 − headroom) × the GPU memory. docs/plan.md §4 states every term.

`evaluate` prices one layout (`--layout` with every field given); `search` enumerates the layouts
a partial `--layout` admits and ranks the fitting ones by time per token.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from typing_extensions import assert_never

from archplan.analytic import count_params
from archplan.analytic.flops import training_flops_per_token
from archplan.errors import ArchplanError
from archplan.hardware import (
    MIN_FRACTION_OF_PEAK,
    MIN_LINK_GBS,
    SM100_GPUS,
    Accelerator,
    FlashImpl,
    KernelEfficiency,
    RingNics,
    fp8_attention_gpus,
    kernel_efficiency,
)
from archplan.planning.cluster import (
    MEGATRON,
    AttentionKernel,
    CPComm,
    EP_OVERLAPS,
    Dispatcher,
    ModelData,
    RecomputeModule,
    StatesConvention,
    _memory,
    model_data,
    uses_early_stop,
)
from archplan.planning.layout import (Layout, PartialLayout, check_layout, check_partial, group_problem,
                                     layout_problem)
from archplan.planning.pricing import (
    CrossEntropyImpl,
    FP8Scaling,
    Network,
    Precision,
    Pricer,
    StepTime,
    flash_fractions,
    price,
    members_per_node,
    step_time_floor,
    rates_for,
    spans_nodes,
)
from archplan.planning.records import MeshDim, RankMemory
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    HyenaPlan,
    Mamba1Plan,
    Mamba2Plan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
)
from archplan.units import nbytes, overshoot, things

GB = 1e9
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
MICRO_BATCHES: tuple[int, ...] = (1, 2, 4, 8)
TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8, 16)
CP_DEGREES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
MAX_VPP = 8
# Context parallelism is searched only where each rank keeps at least this many tokens of a
# sequence. This is practice, not this model's pricing: Llama 3 used CP only at 128K (Llama Team
# 2024 §3.3.2), while the model already prices CP2 at 8K a few percent faster; a floor of 4,096
# agreed with fewer published searches (docs/validation.md, "The search's CP floor at 4,096").
CP_MIN_TOKENS = 8192


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU, one-direction bandwidths in bytes/s, and GPUs per node (NVLink/xGMI domain)."""

    intra_node: float
    inter_node: float
    gpus_per_node: int
    source: str
    # GPUs of one domain a job larger than the domain gets (`pricing.Network.node`); None: all
    segment: int | None = None
    # a node whose GPUs are linked pairwise, not through a switch (MI300X's Infinity Fabric: 7
    # links of 64 GB/s a GPU): one peer's link, one way; a group of g reaches (g − 1) of them
    peer_link: float | None = None

    def node(self, world: int) -> int:
        """The GPUs that share a node's links in a job of `world` (`pricing.Network.node`), the
        node the collectives are priced over."""
        return network(self, "one").node(world)

    def tp_node(self, world: int) -> int:
        """What a TP group must divide: the job's node, or the whole job where it fits in one (64
        GPUs of a 72-GPU NVL72 domain take TP16)."""
        return min(self.node(world), world)


NVL72_SEGMENT = 64


# Datasheet figures (per GPU, one direction = half the bidirectional figure NVIDIA prints) and the
# usual scale-out NIC of that generation's reference systems (DGX/HGX: one NIC per GPU).
INTERCONNECTS: dict[str, Interconnect] = {
    "a100-40gb": Interconnect(300 * GB, 25 * GB, 8, "NVLink 3 600 GB/s bidir.; HDR IB 200 Gb/s"),
    "a100-80gb": Interconnect(300 * GB, 25 * GB, 8, "NVLink 3 600 GB/s bidir.; HDR IB 200 Gb/s"),
    # priced without NVLink bridges, which join PCIe A100s in pairs only: every group crosses PCIe
    "a100-pcie-40gb": Interconnect(32 * GB, 25 * GB, 8, "PCIe 4 x16 32 GB/s; HDR IB 200 Gb/s"),
    "a100-pcie-80gb": Interconnect(32 * GB, 25 * GB, 8, "PCIe 4 x16 32 GB/s; HDR IB 200 Gb/s"),
    "h100-sxm": Interconnect(450 * GB, 50 * GB, 8, "NVLink 4 900 GB/s bidir.; NDR IB 400 Gb/s"),
    "h100-pcie": Interconnect(64 * GB, 50 * GB, 8, "PCIe 5 x16 64 GB/s; NDR IB 400 Gb/s"),
    "h800": Interconnect(200 * GB, 50 * GB, 8, "NVLink 400 GB/s bidir. (DeepSeek-AI 2024 §3.1 measures "
                         "~160 GB/s); IB 400 Gb/s"),
    "h200": Interconnect(450 * GB, 50 * GB, 8, "NVLink 4 900 GB/s bidir.; NDR IB 400 Gb/s"),
    "b200": Interconnect(900 * GB, 50 * GB, 8, "NVLink 5 1.8 TB/s bidir.; ConnectX-7 400 Gb/s"),
    # NVL72: one NVLink domain of 72 GPUs (NVLink switches in the rack), so "node" is the rack here.
    # A job of several racks that does not fill them runs on 64 GPUs of each, 16 of its 18 four-GPU
    # trays: NVIDIA's Slurm guidance for jobs of 128 GPUs and more is `--segment 16` (NVIDIA
    # technical blog, "Unlock exascale performance on GB200 NVL72 with Slurm topology-aware job
    # scheduling", 2025), so 256 GPUs are four racks of 64 and groups of 2^k ranks stay in a rack
    "gb200": Interconnect(900 * GB, 50 * GB, 72, "NVLink 5 1.8 TB/s bidir. across the 72-GPU NVL72 "
                          "domain; ConnectX-7 400 Gb/s per GPU", NVL72_SEGMENT),
    # DGX B300 and GB300 NVL72: one ConnectX-8 SuperNIC of 800 Gb/s a GPU (their datasheets)
    "b300": Interconnect(900 * GB, 100 * GB, 8, "NVLink 5 1.8 TB/s bidir.; ConnectX-8 800 Gb/s"),
    "gb300": Interconnect(900 * GB, 100 * GB, 72, "NVLink 5 1.8 TB/s bidir. across the 72-GPU NVL72 "
                          "domain; ConnectX-8 800 Gb/s per GPU", NVL72_SEGMENT),
    "l4": Interconnect(32 * GB, 12.5 * GB, 8, "PCIe 4 x16 32 GB/s; 100 Gb/s Ethernet"),
    "l40s": Interconnect(32 * GB, 25 * GB, 8, "PCIe 4 x16 32 GB/s; 200 Gb/s"),
    "rtx4090": Interconnect(32 * GB, 12.5 * GB, 8, "PCIe 4 x16 32 GB/s; 100 Gb/s Ethernet"),
    # a fully connected mesh of 8 (AMD's "Understanding RCCL Bandwidth and xGMI Performance on AMD
    # Instinct MI300X", 2025): a pair of GPUs has one 64 GB/s link, only all 8 reach 448 GB/s
    "mi300x": Interconnect(448 * GB, 50 * GB, 8, "Infinity Fabric mesh, 7 × 64 GB/s a GPU, 64 to each "
                           "peer; 400 Gb/s NIC", peer_link=64 * GB),
    "v100": Interconnect(150 * GB, 12.5 * GB, 8, "NVLink 2 300 GB/s bidir.; EDR IB 100 Gb/s"),
}


def network(net: Interconnect, ring_nics: RingNics) -> Network:
    """What the pricing reads of an interconnect, with the rings' convention across nodes."""
    return Network(net.intra_node, net.inter_node, net.gpus_per_node, ring_nics, net.segment, net.peer_link)


def interconnect(gpu: Accelerator, *, intra_gbs: float | None = None, inter_gbs: float | None = None,
                 gpus_per_node: int | None = None) -> Interconnect:
    """The GPU's table entry, with any of its figures overridden (GB/s = 1e9 bytes/s, one way)."""
    for name, value in (("--nvlink-gbs", intra_gbs), ("--ib-gbs", inter_gbs)):
        if value is not None and not (math.isfinite(value) and value >= MIN_LINK_GBS):
            raise ArchplanError(f"{name} must be a number of GB/s of at least {MIN_LINK_GBS}, got {value}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ArchplanError(f"--gpus-per-node must be positive, got {gpus_per_node}")
    base = INTERCONNECTS.get(gpu.key)
    if base is None:
        if intra_gbs is None or inter_gbs is None:
            raise ArchplanError(f"no interconnect figures on record for {gpu.name}; "
                                "pass --nvlink-gbs and --ib-gbs")
        base = Interconnect(intra_gbs * GB, inter_gbs * GB, 8, "user-given")
    source = base.source if intra_gbs is None and inter_gbs is None else "user-given"
    if gpus_per_node is not None and gpus_per_node != base.gpus_per_node:
        source += f"; nodes of {gpus_per_node} GPUs (--gpus-per-node)"
    segment = base.segment if gpus_per_node is None else None  # the user's node size is the node
    if segment is not None:
        source += (f"; a job over several domains that it does not fill runs on {segment} GPUs of each "
                   "(Slurm's --segment 16)")
    return Interconnect(
        intra_gbs * GB if intra_gbs is not None else base.intra_node,
        inter_gbs * GB if inter_gbs is not None else base.inter_node,
        gpus_per_node or base.gpus_per_node,
        source,
        segment,
        # the user's in-node figure is every group's, as through a switch
        base.peer_link if intra_gbs is None else None,
    )




@dataclass(frozen=True)
class Settings:
    """How the run is carried out, beside its layout (the CLI's options)."""

    states: StatesConvention = MEGATRON
    attention_kernel: AttentionKernel = "flash"
    grad_reduce: int | None = None  # bytes per gradient element on the wire; None = the states'
    cp_comm: CPComm = "all_gather"
    overlap: frozenset[str] = frozenset({"dp"})
    precision: Precision = "bf16"
    efficiency: float | None = None  # the user's measured GEMM + attention efficiency
    flash_impl: FlashImpl = "fa2"  # the FlashAttention implementation (hardware.FLASH_IMPL_SPEED)
    early_stop: bool | None = None  # full recompute stops early; None = the states' engine's
    # q, k and v projected by one linear and split (llm-foundry's Wqkv): under eager autograd the
    # split's backward concatenates their gradients (`pricing.qkv_concat_bytes`)
    fused_qkv: bool = False
    cross_entropy: CrossEntropyImpl = "fp32-fused"  # the loss's implementation (`pricing.CROSS_ENTROPY_BYTES`)
    # NICs a data-parallel ring across nodes drives; None = the GPU family's (`KernelEfficiency.ring_nics`)
    ring_nics: RingNics | None = None
    moments: int | None = None  # bytes of each Adam moment; None = the states' (fp32)
    master_remainders: bool = False  # the fp32 master kept as 16-bit remainders (Megatron-Core)
    dispatcher: Dispatcher = "auto"  # how the MoE all-to-all crosses nodes (`cluster.Dispatcher`)
    # Whether the routed experts' grouped GEMMs run at the fp8 rate under `--precision fp8`, as the
    # block's other GEMMs do. Off: Transformer Engine's grouped GEMMs (Megatron-Core) gain nothing
    # from fp8, their casts still paid. Megatron-Bridge 25.11 ran DeepSeek-V3 on DGX-GB300 at one
    # layout at 3,848 tokens/s per GPU in BF16 and 4,357 in MXFP8 (1.13×; priced, with its bf16
    # dispatch, 1.31× with fp8 experts, 1.08× without), and NVIDIA's Megatron-Bridge issue 2842 finds
    # fp8 Qwen3-30B-A3B and Qwen3-235B-A22B slower than BF16 on H100 as on Blackwell, their expert
    # GEMMs and casts unfused (issue 2885). On: DeepGEMM's grouped fp8 GEMMs (DeepSeek-V3's own
    # kernels), which its README measures at 1,093-1,297 TFLOP/s on H800 for DeepSeek-V3's expert
    # shapes, above the bf16 peak (docs/validation.md, "Routed experts' fp8 GEMMs, by kernel").
    fp8_experts: bool = False
    # Whether the tokens sent to the experts travel in fp8 under `--precision fp8` (one fp32 scale
    # per 1×128 tile), quantized once before the dispatch, as DeepSeek-V3's run did (§3.3.2-3.3.3).
    # Off: they travel in bf16 and each routed copy is quantized by the experts' grouped linear, as
    # in Megatron-Core, whose dispatchers send bf16 until 2026-08 (HybridEP: "does not support fp8
    # dispatch now"; its DeepEP path passes bf16 tokens; MXFP8 dispatch over NCCL EP came on
    # 2026-08-20) (docs/validation.md, "The MoE dispatch's dtype, by framework").
    fp8_dispatch: bool = False
    # Whether the GEMM weights are kept and gathered in fp8 under `--precision fp8`: Megatron-Core's
    # FP8 primary weights (`--fp8-param-gather`), which Megatron-Bridge's fp8 precision presets turn
    # on (`cluster.StatesConvention.with_fp8_weights`; docs/validation.md, "FP8 primary weights").
    fp8_params: bool = False
    # Megatron-Core's module-level recompute beside the layout's mode (`cluster.RecomputeModule`):
    # the modules re-run in the backward under recompute none or selective (a full recompute
    # re-runs them anyway)
    recompute_modules: frozenset[RecomputeModule] = frozenset()
    # Whether the routed experts run Transformer Engine's fused grouped MLP (Megatron-Core's
    # `use_transformer_engine_op_fuser` with NVTE_CUTEDSL_FUSED_GROUPED_MLP=1, on in Megatron-Bridge's
    # MXFP8 MoE recipes of Blackwell from 26.06 on): the up-projection's epilogue applies the
    # activation and the routing weights and writes the down-projection's input quantized, and the
    # down-projection's data-gradient epilogue does the activation's backward
    # (`ops/fused/grouped_mlp.py`), so neither the activation nor that cast makes a pass of its own
    # (`pricing._layer_micro`, `pricing.fp8_cast_bytes`). TE runs it under an MXFP8 or NVFP4 recipe only
    # (`fuse_grouped_mlp_ops`), on compute capability 10 (`hardware.SM100_GPUS`).
    fused_grouped_mlp: bool = False
    # Whether the flash attention core runs in fp8: Transformer Engine's fp8 dot-product attention
    # (`fp8_dot_product_attention`, on in Megatron-Bridge's Qwen3 MXFP8 recipes for Blackwell and
    # DeepSeek-V3's on GB300, from 26.06 on), cuDNN's fused attention in MXFP8 under an MXFP8 recipe,
    # priced at its measured speed over the BF16 kernel (`hardware.FP8_ATTENTION_RATES`: GB200 and
    # GB300 only; faster forward, and at short sequences a slower backward)
    fp8_attention: bool = False
    # Whether the LM head runs in fp8: Megatron-Core's `fp8_output_proj` (a Transformer Engine
    # linear under the MXFP8 autocast, `TELMHeadColumnParallelLinear`; MXFP8 recipes only, so
    # compute capability 10), on in Megatron-Bridge's DeepSeek-V3 MXFP8 recipes for GB200 and GB300
    # from 26.06 on (`pricing._head_micro`). Off: the head stays bf16, as DeepSeek-V3's report keeps it
    fp8_lm_head: bool = False
    # How fp8 scales are found under `--precision fp8` (`pricing.FP8Scaling`, priced by
    # `pricing.fp8_cast_bytes`): "delayed", per tensor from an amax history, the cast fused into the
    # norm (also how DeepSeek-V3's tile scales are priced: they come out of the cast itself);
    # "current", per tensor from the tensor itself, an amax pass before each cast and the norm-fed
    # inputs cast apart (Transformer Engine's Float8CurrentScaling: Megatron-Bridge's FP8-CS
    # recipes); "mxfp8", per 32-element block inside the cast (TE's MXFP8BlockScaling: compute
    # capability 10 only), the norm-fed inputs cast apart unless cuDNN's norm writes them
    fp8_scaling: FP8Scaling = "delayed"
    # Whether Transformer Engine's norms run cuDNN's kernels (NVTE_NORM_FWD_USE_CUDNN=1, which
    # Megatron-Bridge's scripts keep for a few recipes): under MXFP8 they write the quantized output
    # themselves, under current scaling they leave the quantizer its own amax pass
    # (`pricing.fp8_cast_bytes`)
    cudnn_norm: bool = False

    def __post_init__(self) -> None:
        # the states as run: Megatron-Core keeps its gradient buffer in the reduction's dtype
        # (`cluster.StatesConvention.reducing_in`), and the optimizer's states as asked
        # (`with_optimizer`); a frozen field set once, here, so every reader of `states` sees the
        # same convention
        states = self.states.reducing_in(self.grad_reduce)
        states = states.with_optimizer(self.moments or states.moment_bytes, self.master_remainders)
        if self.fp8_params:
            if self.precision != "fp8":
                raise ArchplanError("--fp8-params keeps the GEMM weights in fp8, which needs --precision fp8")
            if self.fp8_scaling == "mxfp8":
                # docs/plan.md, "fp8 primary weights": the recipe keeps both layouts and their scales
                raise ArchplanError("--fp8-params: under --fp8-scaling mxfp8 a weight keeps both layouts plus "
                                    "their block scales and is gathered in bf16, so it has no fp8 primary copy "
                                    "to price; drop it")
            states = states.with_fp8_weights()
        if self.recompute_modules and states.engine != "megatron":
            raise ArchplanError("--recompute-modules is Megatron-Core's module recompute, which needs --states "
                                "megatron, zero or deepspeed (a Megatron-style engine)")
        if self.flash_impl != "fa2" and self.attention_kernel != "flash":
            raise ArchplanError(f"--flash-impl {self.flash_impl} picks a FlashAttention implementation, which "
                                "--attention-kernel eager does not run")
        if self.fp8_attention and (self.precision != "fp8" or self.attention_kernel != "flash"
                                   or self.flash_impl != "cudnn"):
            raise ArchplanError("--fp8-attention is cuDNN's fp8 attention (Transformer Engine's "
                                "fp8_dot_product_attention), which runs under --precision fp8 with "
                                "--flash-impl cudnn")
        if self.fp8_scaling != "delayed" and self.precision != "fp8":
            raise ArchplanError(f"--fp8-scaling {self.fp8_scaling} says how fp8 scales are found, which needs "
                                "--precision fp8")
        if self.cudnn_norm and self.fp8_scaling == "delayed":
            raise ArchplanError("--cudnn-norm says how a norm's output is quantized under --fp8-scaling current "
                                "or mxfp8; delayed scaling fuses the cast into the norm either way")
        block_scaled = self.mxfp8_features + (("--fp8-attention is cuDNN's MXFP8 attention",)
                                               if self.fp8_attention else ())
        if block_scaled and self.fp8_scaling != "mxfp8":
            raise ArchplanError(f"{block_scaled[0]}, which runs under an MXFP8 recipe: give --fp8-scaling mxfp8")
        if self.mxfp8_features and states.engine != "megatron":
            raise ArchplanError(f"{self.mxfp8_features[0]}, which runs under a Megatron-style --states "
                                "(megatron, zero or deepspeed)")
        object.__setattr__(self, "states", states)

    @property
    def mxfp8_features(self) -> tuple[str, ...]:
        """The Megatron-Core features asked for that run only under Transformer Engine's MXFP8 recipe,
        so only under `--fp8-scaling mxfp8` (fp8 on a compute capability 10 GPU) and a Megatron-style
        engine, each as the errors name it."""
        return tuple(feature for asked, feature in (
            (self.fused_grouped_mlp, "--fused-grouped-mlp is Transformer Engine's fused expert MLP"),
            (self.fp8_lm_head, "--fp8-lm-head is Megatron-Core's MXFP8 output projection (fp8_output_proj)"),
        ) if asked)

    @property
    def reduce_bytes(self) -> int:
        return self.states.grad_bytes if self.grad_reduce is None else self.grad_reduce

    @property
    def eager(self) -> bool:
        """Whether the states' engine runs eager PyTorch autograd (the torch engine), whose own
        backward passes `pricing` charges (`bias_grad_pass`, `qkv_concat_pass`)."""
        return self.states.engine == "torch"

    @property
    def bias_grad_pass(self) -> bool:
        """Whether the backward sums each linear bias's gradient in a pass of its own
        (`pricing.bias_grad_bytes`): under eager autograd, but not for fp8 runs, whose block
        linears are Transformer Engine's (as `pricing.fp8_cast_bytes` prices their casts) and
        compute it in the weight-gradient GEMM."""
        return self.eager and self.precision != "fp8"

    @property
    def qkv_concat_pass(self) -> bool:
        """Whether the backward concatenates a fused QKV projection's three gradients
        (`pricing.qkv_concat_bytes`): under eager autograd, where one linear projects them."""
        return self.eager and self.fused_qkv

    def rings(self, kernels: KernelEfficiency) -> RingNics:
        """The ring convention across nodes a layout is priced under: the user's, else the family's."""
        return self.ring_nics or kernels.ring_nics

    @property
    def stops_early(self) -> bool:
        return uses_early_stop(self.states, self.early_stop)


@dataclass(frozen=True)
class Evaluated:
    layout: Layout
    microbatches: int  # m, per pipeline per step
    stage: int  # the most loaded pipeline rank (memory)
    memory: RankMemory
    time_stage: int  # the pipeline rank that sets the step time
    time: StepTime
    global_batch_tokens: int  # as run: m · dp · mb · seq
    mfu: float  # model FLOPs (causal, no recompute) / (step time · GPUs · bf16 peak)
    fits: bool
    # training FLOPs per token (causal, no recompute) of a micro-batch of mb sequences, which share
    # a long convolution's filters (`analytic.training_flops_per_token`); MFU's numerator
    model_flops_per_token: int

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.global_batch_tokens / self.time.total / self.layout.world


@dataclass(frozen=True)
class SearchResult:
    gpu: Accelerator
    gpus: int
    net: Interconnect
    seq: int
    settings: Settings
    kernels: KernelEfficiency
    calibrated: bool  # the GPU's family has calibrated constants
    headroom: float
    usable_bytes: int
    model_flops_per_token: int
    ranked: tuple[Evaluated, ...]  # every fitting layout (or the `top` fastest: `search`), least time per token first
    considered: int  # layouts evaluated
    fitting: int  # of which fit
    reasons: tuple[str, ...] = field(default=())  # why nothing fits, when `ranked` is empty
    tightest: Evaluated | None = None  # the least memory any layout needs
    fixed: PartialLayout = field(default_factory=PartialLayout)
    routed: bool = False  # some layer routes tokens to experts (`plan` quotes the MoE runs' accuracy)
    top: int | None = None  # the fastest layouts asked for (`search`); None: every fitting one
    # the (forward, backward) fractions of the long-sequence FlashAttention rates the attention
    # layers are priced at on `seq` tokens (`pricing.flash_fractions`); empty under eager attention, under the user's own
    # `--efficiency` (no length law applies to it) or without attention layers
    flash_fractions: tuple[tuple[float, float], ...] = ()
    asked_batch_tokens: float = 0.0  # --global-batch-tokens as given; each layout runs whole micro-batches
    batch_default: bool = False  # --global-batch-tokens left at its default, which the notes then say

    @property
    def shown(self) -> tuple[Evaluated, ...]:
        """The layouts asked for: the `top` fastest, or every one ranked."""
        return self.ranked[:self.top] if self.top is not None else self.ranked

    @property
    def feasible(self) -> bool:
        return any(e.fits for e in self.ranked)

    @property
    def ring_nics(self) -> RingNics:
        """The ring convention the layouts were priced under (`Settings.rings`)."""
        return self.settings.rings(self.kernels)


def tp_problem(plan: ModelPlan, tp: int) -> str | None:
    """Why TP degree tp cannot split this model (Megatron splits heads and FFN columns)."""
    if tp > 1 and plan.tied and plan.lm_head_bias:
        # the vocabulary-parallel head would split a bias its tied weight's embedding has no
        # counterpart of (`distributed.plans.model_refusal`; Megatron's GPT head has no bias)
        return f"a tied head with a bias does not split {tp} ways"
    for layer in plan.layers:
        mixer = layer.mixer
        match mixer:
            case AttentionPlan():
                if not mixer.splits_over(tp):
                    return (f"{mixer.n_heads} query / {mixer.n_kv_heads} KV "
                            f"{'head does' if mixer.n_kv_heads == 1 else 'heads do'} not split {tp} ways")
                scope = mixer.qk_norm.scope if mixer.qk_norm is not None else None
                if 1 < mixer.n_kv_heads < tp and scope in ("per_head", "full"):
                    # the k-norm's weights are per KV head: a rank would need its group's rows of
                    # them (`distributed.plans.refusal` builds none)
                    return f"a {scope} k-norm over {mixer.n_kv_heads} KV heads does not split {tp} ways"
            case MLAPlan():
                if mixer.n_heads % tp:
                    return f"{things(mixer.n_heads, 'head')} do{'es' if mixer.n_heads == 1 else ''} not split {tp} ways"
            case Mamba1Plan():
                if mixer.d_inner % tp:
                    return f"d_inner {mixer.d_inner} does not split {tp} ways"
            case Mamba2Plan():
                # Megatron-Core's MambaMixer asserts ngroups % tp == 0: a rank holds whole B/C groups
                if mixer.n_heads % tp or mixer.n_groups % tp:
                    return f"{mixer.n_heads} SSM heads / {mixer.n_groups} groups do not split {tp} ways"
            case S4Plan() | HyenaPlan() | StripedHyenaPlan() if plan.d_model % tp:
                # long convolutions are per channel: TP splits the d_model channels
                return f"d_model {plan.d_model} does not split {tp} ways"
            case StripedHyenaPlan(filter_groups=g) if (plan.d_model // g) % tp:
                # a rank holds whole modal filters, as cp_problem asks of tp·cp
                n = plan.d_model // g
                return f"{things(n, 'modal filter')} do{'es' if n == 1 else ''} not split {tp} ways"
            case S4Plan(n_ssm=n) if n != 1 and n % tp:
                # one SSM copy is replicated on every rank, more are split with their channels
                return f"{n} S4 SSM copies do not split {tp} ways"
            case (AttentionPlan() | MLAPlan() | Mamba1Plan() | Mamba2Plan()
                  | S4Plan() | HyenaPlan() | StripedHyenaPlan()):
                pass
            case _:
                assert_never(mixer)
        widths: list[int] = []
        match layer.ffn:
            case FFNPlan():
                widths = [layer.ffn.d_ff]
            case MoEPlan():
                # routed experts are whole on every tp rank (expert tensor parallelism 1:
                # `shards._moe`); the shared experts split as a dense FFN does
                widths = [layer.ffn.shared.d_ff] if layer.ffn.shared else []
            case None:
                pass
        for width in widths:
            if width % tp:
                return f"FFN width {width} does not split {tp} ways"
    return None


def states_problem(pp: int, zero: int, states: StatesConvention) -> str | None:
    """Why these model states cannot run a layout: DeepSpeed's pipeline engine refuses ZeRO-2 and
    ZeRO-3 (`PipelineEngine.__init__` asserts "ZeRO-2 and ZeRO-3 are incompatible with pipeline
    parallelism")."""
    if states.module_fetch and pp > 1 and zero >= 2:
        return f"--states {states.key}: DeepSpeed runs pipeline parallelism with ZeRO 0-1 only (pp={pp}, zero={zero})"
    return None


def schedule_problem(overlap: frozenset[str], pp: int | None, vpp: int | None) -> str | None:
    """Why a pipeline cannot run the schedule an overlap names (None: unknown degrees pass): DualPipe
    feeds micro-batches from both ends of the pipeline, so it needs stages to pair, an even pp of
    at least 2, and runs its own schedule, not the interleaved one (DeepSeek-V3 §3.2.1, Figure 5;
    DualPipe's reference implementation pairs rank i with rank pp − 1 − i)."""
    if "dualpipe" not in overlap:
        return None
    if pp is not None and (pp < 2 or pp % 2):
        return (f"--overlap dualpipe: DeepSeek's DualPipe feeds micro-batches from both ends of a "
                f"pipeline of an even number of stages, and pp={pp}")
    if vpp is not None and vpp > 1:
        return f"--overlap dualpipe: DualPipe runs its own schedule, not the interleaved one (vpp={vpp})"
    return None


def expert_sp_problem(engine: str, experts: bool, tp: int | None, ep: int | None, sp: bool | None) -> str | None:
    """Why the engine cannot run a model with routed experts (`experts`) at these degrees (None:
    unknown ones pass). Megatron-Core: with experts split over ep > 1 ranks and attention over
    tp > 1, its token dispatcher needs the sequence-parallel layout (`TransformerConfig.__post_init__`
    raises "When using expert parallelism and tensor parallelism, sequence parallelism must be
    used"), and at ep = 1 its MoE layer refuses to train under tp > 1 without it (`MoELayer.forward`
    raises "During training, performance may degrade if MoE and tensor parallelism are enabled
    without also enabling sequence parallelism"). torch's engine (`--states fsdp2`, what `verify --layout` runs) routes tokens only from
    their sequence-parallel shards at any ep: without them every tp rank would route the same
    tokens (`distributed.plans.model_refusal`)."""
    if not experts or tp is None or tp == 1 or sp is not False:
        return None
    if engine == "torch":
        return (f"torch's engine, whose states --states fsdp2 prices and `verify --layout` runs, routes an "
                f"MoE layer's tokens under tensor parallelism (tp={tp}) only from sequence-parallel shards: "
                "sp=on")
    if ep is not None and ep > 1:
        return (f"Megatron-Core, whose engine the Megatron-style --states price, runs expert parallelism "
                f"(ep={ep}) beside tensor parallelism (tp={tp}) only with sequence parallelism: sp=on")
    return (f"Megatron-Core, whose engine the Megatron-style --states price, trains an MoE layer under "
            f"tensor parallelism (tp={tp}) only with sequence parallelism (its MoELayer refuses it "
            "without): sp=on")


def cp_problem(plan: ModelPlan, tp: int, cp: int) -> str | None:
    """Why CP degree cp cannot split this model. Long convolutions trade sequence shards for
    channel shards (`cluster.long_conv_exchange`): d_model over tp·cp ranks, and what groups of
    channels share (StripedHyena's modal filters, S4's SSM copies beyond one) with them
    (`distributed.context.long_conv_context`). Mamba layers do the same around their conv1d and
    selective scan (`cluster.mamba_exchange`) under Megatron-Core's `MambaContextParallel` rules:
    Mamba-1's d_inner and Mamba-2's heads split over tp·cp, and a tp rank's Mamba-2 groups either
    split over cp or each go whole to cp/groups ranks."""
    if cp == 1:
        return None
    shards = tp * cp
    for layer in plan.layers:
        match layer.mixer:
            case Mamba1Plan(d_inner=i) if i % shards:
                return f"Mamba d_inner {i} does not split over tp·cp = {shards} channel shards"
            case Mamba2Plan(n_heads=h, n_groups=g) if h % shards or g // tp % cp and cp % max(g // tp, 1):
                return (f"{h} Mamba-2 heads / {g} groups over tp·cp = {shards}: heads split over tp·cp, a tp "
                        f"rank's groups split over cp or divide it (Megatron-Core)")
            case S4Plan() | HyenaPlan() | StripedHyenaPlan() if plan.d_model % shards:
                return f"long convolutions split d_model {plan.d_model} over tp·cp = {shards} channel shards"
            case StripedHyenaPlan(filter_groups=g) if (plan.d_model // g) % shards:
                n = plan.d_model // g
                return (f"{things(n, 'modal filter')} do{'es' if n == 1 else ''} not split over tp·cp = {shards} "
                        "channel shards")
            case S4Plan(n_ssm=n) if n != 1 and n != tp and n % shards:
                return f"{n} S4 SSM copies do not split over tp·cp = {shards} channel shards"
    return None


@dataclass(frozen=True)
class StageMemory:
    """Memory of each representative pipeline rank of one layout (`representative_stages`)."""

    by_stage: dict[int, RankMemory]

    @property
    def worst(self) -> tuple[int, RankMemory]:
        """The most loaded rank (ties: the first) and its memory."""
        stage = max(self.by_stage, key=lambda s: self.by_stage[s].total)
        return stage, self.by_stage[stage]


def _concern(options: list[str], what: str) -> str:
    """The one line refusing options that concern what a model lacks."""
    return f"{', '.join(options)}: {'these concern' if len(options) > 1 else 'this concerns'} {what}"


class Evaluator:
    """Prices layouts of one model on one cluster; the per-layer work is computed once."""

    def __init__(self, plan: ModelPlan, gpu: Accelerator, net: Interconnect, seq: int,
                 settings: Settings, usable: int) -> None:
        self.plan = plan
        self.gpu = gpu
        self.net = net
        self.seq = seq
        self.settings = settings
        self.usable = usable
        self.data: ModelData = model_data(plan, seq)
        if "mla_up_proj" in settings.recompute_modules and not any(isinstance(layer.mixer, MLAPlan)
                                                                   for layer in plan.layers):
            raise ArchplanError(f"--recompute-modules mla_up_proj recomputes MLA's up-projections, and "
                                f"{plan.name} has no MLA layer")
        moe_only = [name for name, given in (
            ("--fused-grouped-mlp", settings.fused_grouped_mlp),
            ("--fp8-experts", settings.fp8_experts), ("--fp8-dispatch", settings.fp8_dispatch),
            (f"--dispatcher {settings.dispatcher}", settings.dispatcher != "auto"),
            *((f"--overlap {schedule}", schedule in settings.overlap) for schedule in sorted(EP_OVERLAPS)),
        ) if given]
        if moe_only and not plan.routed:
            raise ArchplanError(_concern(moe_only, f"the routed experts' tokens or GEMMs, and {plan.name} routes to "
                                                   "no experts"))
        attention_only = [name for name, given in (
            (f"--flash-impl {settings.flash_impl}", settings.flash_impl != "fa2"),
            (f"--cp-comm {settings.cp_comm}", settings.cp_comm != "all_gather"),
            ("--fused-qkv", settings.fused_qkv), ("--fp8-attention", settings.fp8_attention),
        ) if given]
        if attention_only and not plan.has_attention:
            raise ArchplanError(_concern(attention_only, f"attention layers, and {plan.name} has none"))
        if settings.fp8_scaling == "mxfp8" and gpu.key not in SM100_GPUS:
            raise ArchplanError(f"--fp8-scaling mxfp8 is Blackwell's block-scaled fp8, on compute capability 10 "
                                f"GPUs only ({', '.join(sorted(SM100_GPUS))}), not on {gpu.name}")
        if settings.fp8_attention and gpu.key not in fp8_attention_gpus():
            raise ArchplanError(f"--fp8-attention: no measured fp8 attention rate for {gpu.name} (cuDNN's "
                                f"MXFP8 attention is measured on {', '.join(fp8_attention_gpus())})")
        # the states as this GPU keeps them (fp8 weights take their transpose on TN-only GPUs)
        self.states = settings.states.on_gpu(gpu)
        self.kernels, self.calibrated = kernel_efficiency(gpu)
        rates = rates_for(gpu, self.kernels, settings.efficiency, settings.precision, settings.flash_impl,
                          settings.fp8_experts, settings.fp8_dispatch, settings.fused_grouped_mlp,
                          settings.fp8_attention, settings.fp8_lm_head, settings.fp8_scaling, settings.cudnn_norm)
        keys_whole = settings.states.engine == "torch" and settings.cp_comm == "all_gather"
        self.pricer = Pricer(self.data, replace(rates, mla_keys_whole=keys_whole),
                             settings.stops_early, bias_grads=settings.bias_grad_pass,
                             qkv_concat=settings.qkv_concat_pass, loss=settings.cross_entropy,
                             dispatcher=settings.dispatcher, modules=settings.recompute_modules)
        self.network = network(net, settings.rings(self.kernels))
        self.model_flops = training_flops_per_token(plan, seq, "causal", "none")
        self._model_flops_at: dict[int, int] = {1: self.model_flops}

    def model_flops_at(self, mb: int) -> int:
        """Training FLOPs per token (causal, no recompute) at a micro-batch of mb sequences: a long
        convolution makes its filters once per micro-batch, as the step time prices them
        (`pricing`'s filter generation), so MFU counts them once too."""
        if mb not in self._model_flops_at:
            self._model_flops_at[mb] = training_flops_per_token(self.plan, self.seq, "causal", "none", mb)
        return self._model_flops_at[mb]

    def memory(self, layout: Layout, m: int) -> StageMemory:
        s = self.settings
        return StageMemory({stage: _memory(self.data, layout, stage, m, self.states, s.attention_kernel,
                                           s.recompute_modules, s.cp_comm, s.cross_entropy)
                            for stage in self.data.representative_stages(layout.pp, layout.vpp)})

    def evaluate(self, layout: Layout, m: int, memory: StageMemory | None = None) -> Evaluated:
        s = self.settings
        memory = memory or self.memory(layout, m)
        stage, mem = memory.worst
        # the rank that sets the step time is one of those whose memory is already known
        time, time_stage = price(self.data, self.pricer, layout, m, self.network, self.states,
                                 s.attention_kernel, s.reduce_bytes, s.cp_comm, s.overlap, memory.by_stage)
        tokens = self.tokens(layout, m)
        flops = self.model_flops_at(layout.mb)
        mfu = flops * tokens / (time.total * layout.world * self.gpu.peak("bf16"))
        return Evaluated(layout, m, stage, mem, time_stage, time, tokens, mfu, mem.total <= self.usable, flops)

    def tokens(self, layout: Layout, m: int) -> int:
        """The global batch as run: m · dp · mb · seq."""
        return m * layout.dp * layout.mb * self.seq

    def fastest(self, fitting: list[tuple[Layout, int, StageMemory]], top: int) -> list[Evaluated]:
        """The `top` fitting layouts of least time per token, priced exactly, and whatever else was
        priced on the way: layouts are priced in order of their compute floor
        (`pricing.step_time_floor`) per token, until that floor passes the `top`-th best time
        priced (a relative 1e-9 beyond it, so that floating-point rounding never drops a tie)."""
        s = self.settings
        floors = sorted(((step_time_floor(self.pricer, layout, m, s.attention_kernel, self.network, s.overlap,
                                          self.states, s.reduce_bytes)
                          / self.tokens(layout, m), i) for i, (layout, m, _) in enumerate(fitting)))
        priced: list[tuple[int, Evaluated]] = []
        best: list[float] = []  # the `top` least times per token so far, negated (a max-heap)
        for floor, i in floors:
            if len(best) == top and floor > -best[0] * (1 + 1e-9):
                break
            e = self.evaluate(*fitting[i])
            priced.append((i, e))
            per_token = e.time.total / e.global_batch_tokens
            if len(best) < top:
                heapq.heappush(best, -per_token)
            elif per_token < -best[0]:
                heapq.heapreplace(best, -per_token)
        return [e for _, e in sorted(priced, key=lambda pair: pair[0])]


# far beyond any cluster built; bounds the trial division of `_divisors` (√10⁹ ≈ 31,623 steps)
MAX_GPUS = 10**9


def _divisors(n: int) -> list[int]:
    """The divisors of n in order, by trial division up to √n (--gpus may be large)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _check_inputs(plan: ModelPlan, gpus: int, seq: int, global_batch_tokens: float, headroom: float,
                  settings: Settings) -> int:
    if not 1 <= gpus <= MAX_GPUS:
        raise ArchplanError(f"--gpus must be between 1 and {MAX_GPUS:,}, got {gpus:,}")
    if settings.efficiency is not None and not MIN_FRACTION_OF_PEAK <= settings.efficiency <= 1:
        raise ArchplanError(f"--efficiency must be in [{MIN_FRACTION_OF_PEAK}, 1], got {settings.efficiency}")
    if not 0 <= headroom < 1:
        raise ArchplanError(f"--headroom must be in [0, 1), got {headroom}")
    if seq < 1:
        raise ArchplanError(f"--seq must be positive, got {seq}")
    plan.check_length(seq, "--seq")  # past max_seq_len a long-context stage is priced as asked
    if settings.grad_reduce not in (None, 2, 4):
        raise ArchplanError(f"gradient reduction must be 2 (bf16) or 4 (fp32) bytes, got {settings.grad_reduce}")
    sequences = _nearest(global_batch_tokens / seq)  # as `_microbatches` rounds
    if sequences < 1:
        raise ArchplanError(
            f"--global-batch-tokens {global_batch_tokens:,.10g} is under half a sequence of {seq:,} tokens: a step "
            "runs a whole number of sequences, the nearest to --global-batch-tokens / --seq, here 0")
    return sequences


def batch_problem(layout: Layout, sequences: int) -> str | None:
    """Why the layout cannot run the batch: one micro-batch on every data-parallel rank takes more
    sequences than a step holds (the batch as run would grow to dp·mb, not the one asked for)."""
    if layout.dp * layout.mb > sequences:
        return (f"dp·mb = {layout.dp}·{layout.mb} = {layout.dp * layout.mb:,} sequences in one micro-batch "
                f"step, more than the {sequences:,} of the batch (--global-batch-tokens / --seq): a smaller "
                "dp or mb, or a larger batch")
    return None


def _nearest(x: float) -> int:
    """The nearest whole number, a half rounding up (Python's `round` takes a half to even)."""
    return math.floor(x + 0.5)


def _microbatches(batch: float, dp: int, mb: int) -> int:
    """The micro-batches per step nearest the batch asked for: `batch` is --global-batch-tokens /
    --seq unrounded, and a half rounds up (rounding the sequences first, then the quotient half to
    even, made 30 of 1M tokens' 30.52 at dp 4, seq 8192)."""
    return max(1, _nearest(batch / (dp * mb)))


def _vpps(n_layers: int, pp: int) -> list[int]:
    """Virtual stages that split the layers evenly (n or n + 2 divisible, as pipeline_chunks),
    down to one layer a chunk."""
    if pp == 1:
        return [1]
    return [v for v in range(1, MAX_VPP + 1)
            if v == 1 or n_layers % (pp * v) == 0 or (n_layers + 2) % (pp * v) == 0]


def candidates(plan: ModelPlan, data: ModelData, gpus: int, seq: int, sequences: int, batch: float,
               net: Interconnect, fixed: PartialLayout,
               settings: Settings) -> tuple[list[Layout], dict[int, str], str | None]:
    """Every layout the fixed fields admit, and why some were skipped: per TP degree that cannot
    split the model, and the first rule a layout completing the given fields broke (None: none did,
    or nothing was given)."""
    # the chunks' bound counts the main layers: the multi-token-prediction blocks sit on the last
    # chunk beside the head (`pipeline_chunks`), as `verify --layout` builds them; an even split
    # counts them among the layers (Megatron-Bridge's PP8×v4 for DeepSeek-V3 with its module)
    n_layers, blocks = data.n_main, len(data.plan.layers)
    out: list[Layout] = []
    tp_reasons: dict[int, str] = {}
    broken: str | None = None
    g = fixed.given
    # a given round N concerns interleaved layouts only: the example of a broken rule is one of
    # them where there is one, not a layout that breaks it by having no virtual stages
    interleaved_example = False
    # a given sp=on asks for sequence parallelism, which needs a TP group to split over
    tp_node = net.tp_node(gpus)  # once: the layouts below are checked against it one by one
    tps = [g["tp"]] if "tp" in g else [t for t in TP_DEGREES if t <= tp_node and (t > 1 or g.get("sp") is not True)]
    cps = [g["cp"]] if "cp" in g else searched_cp(seq)
    # FSDP2 runs every stage too (zero 0: `replicate`; 1: gradients accumulated unsharded;
    # 2: reshard_after_forward=False; 3: resharded; `distributed/shard.py`)
    zeros = [g["zero"]] if "zero" in g else list(ZERO_STAGES)
    # with flash kernels selective recompute is what the attention kernel already does: the same
    # layout as "none", not searched twice
    modes = [g["recompute"]] if "recompute" in g else (
        ["none", "full"] if settings.attention_kernel == "flash" else ["none", "selective", "full"])
    mbs = [g["mb"]] if "mb" in g else list(MICRO_BATCHES)
    for tp in tps:
        if gpus % tp:
            continue
        why = tp_problem(plan, tp)
        if why:
            tp_reasons[int(tp)] = why
            continue
        for cp in cps:
            if (gpus // tp) % cp or seq % cp or cp_problem(plan, tp, cp):
                continue
            rest = gpus // (tp * cp)
            # not given, sequence parallelism is on wherever each rank's tokens split over tp (the
            # norms' work and the activations between TP regions shrink by tp for the same
            # traffic) and off where they do not, which Megatron then requires (`layout_problem`),
            # but where the engine routes experts' tokens only from SP shards (Megatron-Core's and
            # torch's engines with routed experts: `expert_sp_problem`): kept on there, so that the
            # length is the rule it breaks
            splits = (seq // cp) % tp == 0
            pps = [g["pp"]] if "pp" in g else [p for p in _divisors(rest) if p <= blocks]
            for pp in pps:
                if rest % pp:
                    continue
                dp = rest // pp
                if "dp" in g and g["dp"] != dp:
                    continue
                eps = [g["ep"]] if "ep" in g else (
                    _divisors(math.gcd(data.n_experts, tp * cp * dp)) if data.n_experts else [1])
                vpps = [g["vpp"]] if "vpp" in g else _vpps(blocks, pp)
                # ZeRO shards the dense states over dp·cp and the experts' over tp·cp·dp / ep
                # (`cluster._stage_params`): with both groups one rank there is nothing to shard,
                # Megatron's stages price alike and would list one layout up to four times (FSDP2
                # still copies there)
                def stages(ep: int) -> list[int]:
                    alone = dp * cp == 1 and (not data.n_experts or tp * cp * dp // ep == 1)
                    return zeros if not alone or "zero" in g or settings.states.engine == "torch" else [0]

                for ep, vpp, mb, zero, mode in ((e, v, b, z, r) for e in eps for v in vpps
                                                for b in mbs for z in stages(e) for r in modes):
                    routed = bool(data.n_experts)
                    sp = g.get("sp", splits or expert_sp_problem(settings.states.engine, routed, tp, ep, False) is not None)
                    if (dp * mb > sequences or states_problem(pp, zero, settings.states)
                            or schedule_problem(settings.overlap, pp, vpp)
                            or expert_sp_problem(settings.states.engine, routed, tp, ep, sp)):
                        continue
                    # the interleaved schedule's round N stays the engine's (`layout.round_size`)
                    # unless given: in this model a longer round only lengthens the warm-up (its
                    # gain, more time to hide the p2p transfers, is not priced)
                    layout = Layout(tp=tp, cp=cp, pp=pp, vpp=vpp, group=int(g.get("group", 0)), dp=dp,
                                    ep=ep, zero=zero, recompute=mode, mb=mb, sp=sp)  # type: ignore[arg-type]
                    # what a fully given layout must pass (given fields and chosen ones together)
                    why = (group_problem(layout, _microbatches(batch, dp, mb))
                           or layout_problem(layout, n_layers=n_layers, n_experts=data.n_experts,
                                             gpus_per_node=tp_node, seq=seq))
                    if why is None:
                        out.append(layout)
                    elif g and (broken is None or ("group" in g and vpp > 1 and not interleaved_example)):
                        broken, interleaved_example = f"{layout.spec}: {why}", vpp > 1
    return out, tp_reasons, broken


def search(plan: ModelPlan, gpu: Accelerator, gpus: int, *, seq: int, global_batch_tokens: float,
           net: Interconnect, headroom: float = 0.1, settings: Settings = Settings(),
           fixed: PartialLayout = PartialLayout(), keep_unfit: bool = False,
           top: int | None = None) -> SearchResult:
    """Rank the layouts `fixed` admits; with every field fixed, exactly one is evaluated (and kept
    even when it does not fit, with keep_unfit). With `top`, `ranked` holds the `top` fastest
    exactly and may omit slower ones (`Evaluator.fastest`); every layout's memory is still
    computed, so `fitting` counts them all."""
    sequences = _check_inputs(plan, gpus, seq, global_batch_tokens, headroom, settings)
    batch = global_batch_tokens / seq  # sequences a step, unrounded (`_microbatches`)
    if top is not None and top < 1:
        raise ArchplanError(f"a search shows at least one layout, got top={top}")
    if settings.precision == "fp8":
        gpu.peak("fp8")  # one-line error for a GPU without fp8 tensor cores
    usable = int(gpu.memory_bytes * (1 - headroom))
    evaluator = Evaluator(plan, gpu, net, seq, settings, usable)
    n_layers, n_experts = evaluator.data.n_main, evaluator.data.n_experts
    by_user = bool(fixed.given)
    fixed = fixed.for_model(n_experts)
    check_partial(fixed, gpus=gpus, gpus_per_node=net.tp_node(gpus), n_layers=n_layers, n_experts=n_experts,
                  seq=seq)
    given = fixed.given
    if "tp" in given:
        why = tp_problem(plan, int(given["tp"]))
        if why:
            raise ArchplanError(f"--layout: tp={given['tp']}: {why}")
        if "cp" in given:
            why = cp_problem(plan, int(given["tp"]), int(given["cp"]))
            if why:
                raise ArchplanError(f"--layout: cp={given['cp']}: {why}")
    why = (states_problem(int(given.get("pp", 1)), int(given.get("zero", 0)), settings.states)
           or schedule_problem(settings.overlap, fixed.pp, fixed.vpp)
           or expert_sp_problem(settings.states.engine, bool(n_experts), fixed.tp, fixed.ep, fixed.sp))
    if why:
        raise ArchplanError(f"--layout: {why}")
    complete = fixed.complete()
    if complete is not None:
        check_layout(complete, n_layers=n_layers, gpus=gpus, gpus_per_node=net.tp_node(gpus),
                     n_experts=n_experts, seq=seq)
        why = (batch_problem(complete, sequences)
               or group_problem(complete, _microbatches(batch, complete.dp, complete.mb)))
        if why:
            raise ArchplanError(f"--layout: {why}")
        layouts = [complete]
    else:
        layouts, tp_reasons, broken = candidates(plan, evaluator.data, gpus, seq, sequences, batch, net, fixed,
                                                 settings)
        if not layouts:
            # no layout exists to fit or not: the request itself is impossible (exit 2)
            raise ArchplanError(no_split(plan, gpus, seq, sequences, net, tp_reasons, fixed, broken, settings=settings,
                                         by_user=by_user))
    kept: list[tuple[Layout, int, StageMemory]] = []
    fitting = 0
    tightest: Evaluated | None = None
    tightest_mem: tuple[Layout, int, StageMemory] | None = None
    for layout in layouts:
        m = _microbatches(batch, layout.dp, layout.mb)
        memory = evaluator.memory(layout, m)
        total = memory.worst[1].total
        fitting += total <= usable
        if total <= usable or keep_unfit and complete is not None:
            kept.append((layout, m, memory))
        elif tightest_mem is None or total < tightest_mem[2].worst[1].total:
            tightest_mem = (layout, m, memory)
    ranked = (evaluator.fastest(kept, top) if top is not None and complete is None
              else [evaluator.evaluate(*item) for item in kept])
    if tightest_mem is not None and not fitting:
        tightest = evaluator.evaluate(tightest_mem[0], tightest_mem[1], tightest_mem[2])
    reasons = _reasons(plan, gpus, usable, gpu, tightest, settings.states)
    # time per token: rounding m to whole micro-batches moves the batch as run by a few percent
    ranked.sort(key=lambda e: (not e.fits, e.time.total / e.global_batch_tokens, e.memory.total))
    return SearchResult(
        gpu=gpu, gpus=gpus, net=net, seq=seq, settings=settings, kernels=evaluator.kernels,
        calibrated=evaluator.calibrated, headroom=headroom, usable_bytes=usable,
        model_flops_per_token=evaluator.model_flops,
        ranked=tuple(e for e in ranked if e.fits or keep_unfit), considered=len(layouts),
        fitting=fitting, reasons=reasons, tightest=tightest or (ranked[0] if ranked and not fitting else None),
        fixed=fixed, routed=plan.routed, top=top, asked_batch_tokens=global_batch_tokens,
        flash_fractions=(flash_fractions(plan, seq, settings.flash_impl, evaluator.kernels,
                                         evaluator.pricer.rates.fp8_attention)
                         if settings.attention_kernel == "flash" and settings.efficiency is None else ()),
    )


def _reasons(plan: ModelPlan, gpus: int, usable: int, gpu: Accelerator, tightest: Evaluated | None,
             states: StatesConvention) -> tuple[str, ...]:
    if tightest is None:
        return ()
    mem = tightest.memory
    total = count_params(plan).total
    whole = states.bytes_per_param * total
    floor = (f"{total:,} params × {states.bytes_per_param} B (--states {states.key}) = {nbytes(whole)} over "
             f"{things(gpus, 'GPU')} is {nbytes(whole / gpus)} each before activations")
    if mem.model_states <= usable:
        why = f"model states + activations exceed it: {floor}"
    elif whole / gpus > usable:
        why = f"model states alone exceed it: {floor}"
    else:
        # the states of every GPU count would fit: the layouts the search may try shard them less
        why = (f"its model states alone ({nbytes(mem.model_states)}) exceed it, where {floor}: no layout "
               "tried shards them that far (the given --layout fields or the search's rules rule out those that do)")
    return (f"does not fit even at the least memory ({tightest.layout.label}): pipeline rank "
            f"{tightest.stage} needs {nbytes(mem.total)} per GPU (parameters {nbytes(mem.parameters)}, "
            f"gradients {nbytes(mem.gradients)}, optimizer {nbytes(mem.optimizer)}, activations "
            f"{nbytes(mem.activations)}, temporary {nbytes(mem.temporary)}) > {nbytes(usable)} usable (of "
            f"{nbytes(gpu.memory_bytes)}){overshoot(mem.total, usable)}; {why}",)


def searched_cp(seq: int) -> list[int]:
    """The CP degrees the search tries at `seq` tokens: each rank keeps ≥ CP_MIN_TOKENS of a
    sequence (a given cp= is not held to it)."""
    return [c for c in CP_DEGREES if c == 1 or seq // c >= CP_MIN_TOKENS]


def no_split(plan: ModelPlan, gpus: int, seq: int, sequences: int, net: Interconnect, tp_reasons: dict[int, str],
             fixed: PartialLayout, broken: str | None, *, by_user: bool, settings: Settings = Settings()) -> str:
    """Why no layout exists: the first rule a completion of the given fields broke, else the
    search's own rules, each as the search holds it (a given degree is not held to them)."""
    chosen = fixed.chosen(plan.routed)
    where = "--layout: " if by_user else ""
    given = f" with {chosen.spec}" if chosen.given else ""
    if broken is not None:
        return f"{where}no layout{given}: every completion breaks a rule, e.g. {broken}"
    g = fixed.given
    rules: dict[str, str] = {}
    if "tp" not in g:
        rules["tp"] = f"TP dividing a node of {net.tp_node(gpus)} (TP within a node)"
    if "cp" not in g:
        most = max(searched_cp(seq))
        rules["cp"] = (f"CP ≤ {most} (each rank keeping ≥ {CP_MIN_TOKENS:,} of a sequence's {seq:,} tokens; "
                       "a given cp= is not held to it)" if seq >= 2 * CP_MIN_TOKENS else
                       f"CP = 1 (a CP rank keeps ≥ {CP_MIN_TOKENS:,} tokens of a sequence, and these have "
                       f"{seq:,}; a given cp= is not held to it)")
    if "pp" not in g:
        rules["pp"] = (f"PP ≤ {things(len(plan.layers), 'layer')}"
                       + (", even and at least 2 (--overlap dualpipe)" if "dualpipe" in settings.overlap else ""))
    if g.get("sp") is True and "tp" not in g:
        rules["sp"] = "TP > 1 (sp=on)"
    rules["dp"] = f"DP·mb ≤ {things(sequences, 'sequence')} per step"
    tp_notes = "".join(f"; TP{t}: {w}" for t, w in tp_reasons.items())
    degrees = [name for name in ("tp", "cp", "pp", "dp") if name in g]
    if len(degrees) == 3:
        # three degrees given fix the fourth: name it and the rule it breaks, where one rule does
        left = next(name for name in ("tp", "cp", "pp", "dp") if name not in g)
        implied = gpus // math.prod(int(g[name]) for name in degrees)
        if (broken := _implied_breaks(left, implied, rules, tp_reasons, plan, gpus, seq, sequences, net,
                                      settings)) is not None:
            ranks = gpus // implied
            leave = "leaves" if ranks == 1 else "leave"
            return (f"{where}no layout{given}: {'·'.join(degrees)} = {things(ranks, 'rank')} {leave} "
                    f"{left} = {implied:,} for {things(gpus, 'GPU')}, {broken}")
    return (f"{where}no layout{given}: {things(gpus, 'GPU')} admit{'s' if gpus == 1 else ''} no TP×CP×PP×DP split "
            f"with {', '.join(rules.values())}" + tp_notes)


def _implied_breaks(left: str, implied: int, rules: dict[str, str], tp_reasons: dict[int, str], plan: ModelPlan,
                    gpus: int, seq: int, sequences: int, net: Interconnect, settings: Settings) -> str | None:
    """Why the one degree three given degrees leave cannot be, in `no_split`'s words ("outside"
    the search's rule it breaks, or "where" the model refuses it); None where it breaks none of them
    alone (the fields the search still chooses are then the cause, and every rule is listed)."""
    match left:
        case "tp":
            if implied in tp_reasons:
                return f"where {tp_reasons[implied]}"
            if implied == 1 and "sp" in rules:
                return f"outside {rules['sp']}"
            return f"outside {rules['tp']}" if net.tp_node(gpus) % implied else None
        case "cp":
            if implied not in CP_DEGREES:
                return (f"outside the CP degrees the search tries ({', '.join(map(str, CP_DEGREES))}; a given "
                        "cp= is tried as given)")
            return f"outside {rules['cp']}" if implied not in searched_cp(seq) else None
        case "pp":
            dualpipe = "dualpipe" in settings.overlap and (implied < 2 or implied % 2)
            return f"outside {rules['pp']}" if implied > len(plan.layers) or dualpipe else None
        case _:
            return f"outside {rules['dp']}" if implied > sequences else None


def training_days(result: Evaluated, tokens: float) -> float:
    """Wall-clock days to train on `tokens` at this layout's step time and global batch."""
    return tokens / result.global_batch_tokens * result.time.total / 86400


def rails(layout: Layout, gpus_per_node: int) -> int:
    """NICs one rank's data-parallel ring can use across nodes: the group's members on one node
    (`pricing.members_per_node`); 1 when the ring stays in a node."""
    mesh: MeshDim = "dp_cp" if layout.cp > 1 else "dp"
    if not spans_nodes(mesh, layout, gpus_per_node):
        return 1
    return members_per_node(mesh, layout, gpus_per_node)


@dataclass(frozen=True)
class RailBound:
    """A layout re-priced under the other ring convention (`rail_bound`): at one NIC per GPU, or at
    `nics`, its data-parallel ring's members on a node."""

    nics: int
    ring_nics: RingNics  # the convention the bound was priced under
    evaluated: Evaluated


def rail_bound(result: SearchResult, plan: ModelPlan, e: Evaluated) -> RailBound | None:
    """`e` re-priced under the ring convention it was not priced under (`pricing.collective_time`):
    the network's other end for its data-parallel traffic. Published runs fall on both sides
    (docs/validation.md, "The ring's NICs per GPU family"). None when the ring has one rail."""
    k = rails(e.layout, result.net.node(e.layout.world))
    if k < 2:
        return None
    other: RingNics = "one" if result.ring_nics == "members" else "members"
    evaluator = Evaluator(plan, result.gpu, result.net, result.seq, replace(result.settings, ring_nics=other),
                          result.usable_bytes)
    return RailBound(k, other, evaluator.evaluate(e.layout, e.microbatches))
