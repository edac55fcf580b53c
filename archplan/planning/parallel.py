"""Cluster layout search: data, tensor, pipeline and expert parallel degrees, ZeRO stage and
recompute mode, ranked by an estimated step time; each kept layout fits in GPU memory with headroom.

Memory per GPU (the worst pipeline stage; bf16 mixed-precision Adam, 16 B/param, ZeRO convention):
- model states: `analytic.memory.zero_model_states` (Rajbhandari et al. 2020 §5) over the GPU's
  shard: a stage's layers (PP), split over t tensor-parallel ranks (Megatron: attention heads, FFN
  width, vocabulary; norms and routers replicated), experts split over EP × TP; ZeRO shards over
  the data-parallel group (dp ranks; dp/ep for expert weights, their data-parallel group).
  ZeRO-3/FSDP also holds the gathered bf16 weights of the layer being computed and of the
  prefetched next one.
- activations: `analytic.memory.activation_memory` (Korthikanti et al. 2022 §4, per saved tensor) of
  one micro-batch, divided by t (tensor + sequence parallelism, Korthikanti §4.2.2: every activation
  is split over the t ranks), times the micro-batches in flight under 1F1B (Narayanan et al. 2021
  §2.2): stage j of p holds min(p − j, m), so the first stage holds p (Korthikanti §4.2.3: "(L/p)·p").
  The first stage also keeps the token ids, the last the final norm input and the fp32 logits.

Step time (no overlap of communication with compute is assumed: an upper bound):
- compute: the training FLOPs of a stage (forward + backward + recompute, attention causal) at
  `hfu` × the dense bf16 peak, per micro-batch;
- TP: per layer and micro-batch, one all-reduce (or its reduce-scatter + all-gather pair under SP)
  of the s·b·h bf16 activations per sub-block in the forward and one in the backward (another
  forward with full recompute), each moving 2·(t−1)/t × bytes per GPU at the intra-node bandwidth
  (Megatron-LM, Shoeybi et al. 2019 §3, Fig. 4);
- EP: per MoE layer and micro-batch, an all-to-all to dispatch and one to combine, forward and
  backward, each moving (ep−1)/ep of the k routed copies of the GPU's tokens (Lepikhin et al. 2020
  GShard); intra-node if tp·ep GPUs fit in a node, else inter-node;
- PP: the 1F1B bubble: a step takes (m + p − 1) slots of the slowest stage (bubble fraction
  (p−1)/(m+p−1), Narayanan et al. 2021 §2.2.1) plus the activation send/receive between stages;
- DP: after the pipeline flush, ZeRO-0/1 all-reduce the bf16 gradients once per step
  (2·(d−1)/d × 2Ψ bytes); ZeRO-2 reduce-scatters every micro-batch's gradients into their owner's
  shard ((d−1)/d × 2Ψ each, since the gradients are partitioned) and all-gathers the updated
  weights once; ZeRO-3/FSDP gathers the weights in the forward and the backward and reduce-scatters
  the gradients of every micro-batch (3 × (d−1)/d × 2Ψ, ZeRO §7.2.2's 1.5× of data parallelism);
  at the inter-node bandwidth unless the data-parallel group fits in one node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from archplan.analytic import count_params
from archplan.analytic.flops import forward_flops, training_flops_per_token
from archplan.analytic.memory import (
    RECOMPUTE_MODES,
    ModelStates,
    Recompute,
    activation_memory,
    zero_model_states,
)
from archplan.errors import ArchplanError
from archplan.hardware import Accelerator
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
from archplan.units import nbytes

GB = 1e9
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)
MICRO_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
TP_DEGREES: tuple[int, ...] = (1, 2, 4, 8, 16)
FSDP_PREFETCH_LAYERS = 2  # the layer being computed and the next one, gathered in bf16


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU, one-direction bandwidths in bytes/s, and GPUs per node (NVLink/xGMI domain)."""

    intra_node: float
    inter_node: float
    gpus_per_node: int
    source: str


# Datasheet figures (per GPU, one direction = half the bidirectional figure NVIDIA prints) and the
# usual scale-out NIC of that generation's reference systems (DGX/HGX: one NIC per GPU).
INTERCONNECTS: dict[str, Interconnect] = {
    "a100-40gb": Interconnect(300 * GB, 25 * GB, 8, "NVLink 3 600 GB/s bidir.; HDR IB 200 Gb/s"),
    "a100-80gb": Interconnect(300 * GB, 25 * GB, 8, "NVLink 3 600 GB/s bidir.; HDR IB 200 Gb/s"),
    "h100-sxm": Interconnect(450 * GB, 50 * GB, 8, "NVLink 4 900 GB/s bidir.; NDR IB 400 Gb/s"),
    "h100-pcie": Interconnect(64 * GB, 50 * GB, 8, "PCIe 5 x16 64 GB/s; NDR IB 400 Gb/s"),
    "h200": Interconnect(450 * GB, 50 * GB, 8, "NVLink 4 900 GB/s bidir.; NDR IB 400 Gb/s"),
    "b200": Interconnect(900 * GB, 50 * GB, 8, "NVLink 5 1.8 TB/s bidir.; ConnectX-7 400 Gb/s"),
    "l4": Interconnect(32 * GB, 12.5 * GB, 8, "PCIe 4 x16 32 GB/s; 100 Gb/s Ethernet"),
    "l40s": Interconnect(32 * GB, 25 * GB, 8, "PCIe 4 x16 32 GB/s; 200 Gb/s"),
    "rtx4090": Interconnect(32 * GB, 12.5 * GB, 8, "PCIe 4 x16 32 GB/s; 100 Gb/s Ethernet"),
    "mi300x": Interconnect(448 * GB, 50 * GB, 8, "Infinity Fabric 7 × 64 GB/s; 400 Gb/s NIC"),
    "v100": Interconnect(150 * GB, 12.5 * GB, 8, "NVLink 2 300 GB/s bidir.; EDR IB 100 Gb/s"),
}


def interconnect(gpu: Accelerator, *, intra_gbs: float | None = None, inter_gbs: float | None = None,
                 gpus_per_node: int | None = None) -> Interconnect:
    """The GPU's table entry, with any of its figures overridden (GB/s = 1e9 bytes/s, one way)."""
    for name, value in (("--nvlink-gbs", intra_gbs), ("--ib-gbs", inter_gbs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ArchplanError(f"{name} must be a positive number of GB/s, got {value}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ArchplanError(f"--gpus-per-node must be positive, got {gpus_per_node}")
    base = INTERCONNECTS.get(gpu.key)
    if base is None:
        if intra_gbs is None or inter_gbs is None:
            raise ArchplanError(f"no interconnect figures on record for {gpu.name}; "
                                "pass --nvlink-gbs and --ib-gbs")
        base = Interconnect(intra_gbs * GB, inter_gbs * GB, 8, "user-given")
    return Interconnect(
        intra_gbs * GB if intra_gbs is not None else base.intra_node,
        inter_gbs * GB if inter_gbs is not None else base.inter_node,
        gpus_per_node or base.gpus_per_node,
        base.source if intra_gbs is None and inter_gbs is None else "user-given",
    )


@dataclass(frozen=True)
class ClusterLayout:
    tp: int
    pp: int
    dp: int
    ep: int
    zero: int
    recompute: Recompute
    micro_batch: int  # sequences per micro-batch
    microbatches: int  # m, per pipeline per step

    @property
    def label(self) -> str:
        zero = "FSDP/ZeRO-3" if self.zero == 3 else f"ZeRO-{self.zero}"
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        return f"TP{self.tp} PP{self.pp} DP{self.dp}{ep} {zero} {self.recompute} b{self.micro_batch}"


@dataclass(frozen=True)
class GpuMemory:
    """Bytes on the most loaded GPU (pipeline stage `stage`)."""

    stage: int
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step and where they go."""

    compute: float  # all micro-batches through the slowest stage, without the bubble
    tp: float
    ep: float
    pp_p2p: float
    bubble: float
    dp: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.ep + self.pp_p2p + self.bubble + self.dp


@dataclass(frozen=True)
class Evaluated:
    layout: ClusterLayout
    memory: GpuMemory
    time: StepTime
    global_batch_tokens: int  # as run: m · dp · b · seq
    mfu: float  # model FLOPs (no recompute) / (step time · GPUs · peak)
    fits: bool


@dataclass(frozen=True)
class SearchResult:
    gpu: Accelerator
    gpus: int
    net: Interconnect
    seq: int
    hfu: float
    headroom: float
    usable_bytes: int
    model_flops_per_token: int
    ranked: tuple[Evaluated, ...]  # every fitting layout, least time per token first
    considered: int  # layouts evaluated
    fitting: int  # of which fit
    reasons: tuple[str, ...] = field(default=())  # why nothing fits, when `ranked` is empty
    tightest: Evaluated | None = None  # the least memory any layout needs

    @property
    def feasible(self) -> bool:
        return bool(self.ranked)


@dataclass(frozen=True)
class _Layer:
    """One layer's aggregates for the search (params split by how TP/EP shard them)."""

    sharded: int  # split over TP (attention/SSM projections, FFN, shared experts)
    replicated: int  # norms, router, shared-expert gate
    experts: int  # routed experts, split over EP × TP
    flops: float  # share of the model's counted forward FLOPs
    sub_blocks: int  # residual branches: TP collectives per pass
    moe_top_k: int  # 0 for a dense layer
    act: dict[str, int]  # recompute mode -> activation bytes of one sequence (b = 1, unsharded)
    working: int  # the layer's whole activations (re-materialised under full recompute)


class _Model:
    """What the search needs from the plan, computed once."""

    def __init__(self, plan: ModelPlan, seq: int) -> None:
        self.plan = plan
        params = count_params(plan)
        self.params = params
        by = params.by_component
        flops = forward_flops(plan, seq, batch=1)
        counted = flops.counted_by_component
        total_counted = flops.counted
        acts = {mode: activation_memory(plan, 1, seq, mode) for mode in RECOMPUTE_MODES}
        self.layers: list[_Layer] = []
        for layer in plan.layers:
            p = layer.path
            norms = sum(by[f"{p}.{n}"] for n in layer.norms)
            sharded = by[f"{p}.mixer"]
            replicated = norms
            experts = 0
            top_k = 0
            match layer.ffn:
                case FFNPlan():
                    sharded += by[f"{p}.ffn"]
                case MoEPlan():
                    experts = by[f"{p}.ffn.experts"]
                    replicated += by[f"{p}.ffn.router"] + by.get(f"{p}.ffn.shared_gate", 0)
                    sharded += by.get(f"{p}.ffn.shared", 0)
                    top_k = layer.ffn.top_k
                case None:
                    pass
            keys = [k for k in counted if k == p or k.startswith(p + ".")]
            act = {mode: sum(v for k, v in acts[mode].by_component.items()
                             if k == p or k.startswith(p + ".")) for mode in RECOMPUTE_MODES}
            working = act["none"]
            self.layers.append(_Layer(
                sharded, replicated, experts, sum(counted[k] for k in keys) / total_counted,
                1 + (layer.ffn is not None), top_k, act, working,
            ))
        # embeddings: vocab-parallel over TP (Megatron VocabParallelEmbedding), on the first stage;
        # the untied LM head (or, tied, a copy of the embedding) and the final norm on the last.
        self.first_sharded = by["embed"] + by.get("pos_embed", 0)
        self.first_replicated = by.get("embed_norm", 0)
        self.last_sharded = by["lm_head"] + (by["embed"] if plan.tied else 0)
        self.last_replicated = by.get("final_norm", 0)
        self.first_flops = counted["embed"] / total_counted
        self.last_flops = counted["lm_head"] / total_counted
        self.first_act = {m: acts[m].by_component["embed"] + acts[m].by_component.get("embed_norm", 0)
                          for m in RECOMPUTE_MODES}
        self.last_act = {m: acts[m].by_component.get("final_norm", 0) + acts[m].by_component["lm_head"]
                         for m in RECOMPUTE_MODES}
        self.train_flops = {m: training_flops_per_token(plan, seq, "causal", m) for m in RECOMPUTE_MODES}
        self.model_flops = self.train_flops["none"]
        self.n_experts = max((l.ffn.n_experts for l in plan.layers if isinstance(l.ffn, MoEPlan)),
                             default=0)

    def tp_ok(self, tp: int) -> str | None:
        """Why TP degree tp cannot split this model (Megatron splits heads and FFN columns)."""
        for layer in self.plan.layers:
            mixer = layer.mixer
            match mixer:
                case AttentionPlan():
                    if mixer.n_heads % tp or (mixer.n_kv_heads % tp and tp % mixer.n_kv_heads):
                        return f"{mixer.n_heads} query / {mixer.n_kv_heads} KV heads do not split {tp} ways"
                case MLAPlan():
                    if mixer.n_heads % tp:
                        return f"{mixer.n_heads} heads do not split {tp} ways"
                case Mamba1Plan():
                    if mixer.d_inner % tp:
                        return f"d_inner {mixer.d_inner} does not split {tp} ways"
                case Mamba2Plan():
                    if mixer.n_heads % tp or (mixer.n_groups % tp and tp % mixer.n_groups):
                        return f"{mixer.n_heads} SSM heads / {mixer.n_groups} groups do not split {tp} ways"
                case S4Plan() | HyenaPlan() | StripedHyenaPlan():
                    # long convolutions are per channel: TP splits the d_model channels
                    if self.plan.d_model % tp:
                        return f"d_model {self.plan.d_model} does not split {tp} ways"
            ffn = layer.ffn
            widths = []
            match ffn:
                case FFNPlan():
                    widths = [ffn.d_ff]
                case MoEPlan():
                    widths = [ffn.expert.d_ff] + ([ffn.shared.d_ff] if ffn.shared else [])
                case None:
                    pass
            for width in widths:
                if width % tp:
                    return f"FFN width {width} does not split {tp} ways"
        return None


def _stages(n_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges; the extra layers of an uneven split go to the last stages, whose
    fewer in-flight micro-batches leave them memory to spare."""
    base, extra = divmod(n_layers, pp)
    out, start = [], 0
    for j in range(pp):
        size = base + (1 if j >= pp - extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _ring(bytes_: float, n: int, bandwidth: float, factor: float = 2.0) -> float:
    """Ring collective time: all-reduce moves 2·(n−1)/n × bytes per GPU, reduce-scatter and
    all-gather (n−1)/n (Patarasuk & Yuan 2009; NCCL's busbw convention)."""
    return factor * (n - 1) / n * bytes_ / bandwidth if n > 1 else 0.0


def evaluate(model: _Model, gpu: Accelerator, net: Interconnect, layout: ClusterLayout, seq: int,
             hfu: float, usable: int) -> Evaluated:
    tp, pp, dp, ep, zero = layout.tp, layout.pp, layout.dp, layout.ep, layout.zero
    b, m, mode = layout.micro_batch, layout.microbatches, layout.recompute
    h = model.plan.d_model
    peak = gpu.peak("bf16")
    tokens_mb = seq * b  # tokens per micro-batch per pipeline
    worst: GpuMemory | None = None
    slowest = 0.0
    slowest_tp = slowest_ep = 0.0
    for j, stage in enumerate(_stages(len(model.layers), pp)):
        layers = [model.layers[i] for i in stage]
        sharded = sum(x.sharded for x in layers)
        replicated = sum(x.replicated for x in layers)
        experts = sum(x.experts for x in layers)
        flops = sum(x.flops for x in layers)
        act = sum(x.act[mode] for x in layers)
        if j == 0:
            sharded += model.first_sharded
            replicated += model.first_replicated
            flops += model.first_flops
        if j == pp - 1:
            sharded += model.last_sharded
            replicated += model.last_replicated
            flops += model.last_flops
        dense_local = math.ceil(sharded / tp) + replicated
        expert_local = math.ceil(experts / (tp * ep))
        s_dense: ModelStates = zero_model_states(dense_local, zero, dp)
        s_exp: ModelStates = zero_model_states(expert_local, zero, max(1, dp // ep))
        weights = s_dense.weights + s_exp.weights
        if zero == 3:
            biggest = max((x.sharded / tp + x.replicated + x.experts / (tp * ep) for x in layers),
                          default=0)
            weights += math.ceil(FSDP_PREFETCH_LAYERS * 2 * biggest)
        in_flight = min(pp - j, m)
        activations = act * b * in_flight / tp
        if j == 0:
            activations += model.first_act[mode] * b * in_flight
        if j == pp - 1:
            activations += model.last_act[mode] * b / tp
        if mode == "full":
            activations += max((x.working for x in layers), default=0) * b / tp
        mem = GpuMemory(j, weights, s_dense.grads + s_exp.grads,
                        s_dense.optimizer + s_exp.optimizer, math.ceil(activations))
        if worst is None or mem.total > worst.total:
            worst = mem
        # time of one micro-batch through this stage (forward + backward)
        compute = model.train_flops[mode] * flops * tokens_mb / (tp * peak * hfu)
        passes = 3 if mode == "full" else 2  # forward, backward (+ the recomputed forward)
        msg = 2 * tokens_mb * h  # bf16 activations of the micro-batch
        tp_time = sum(x.sub_blocks for x in layers) * passes * _ring(msg, tp, net.intra_node)
        ep_bw = net.intra_node if tp * ep <= net.gpus_per_node else net.inter_node
        ep_time = sum(2 * passes * _ring(msg / tp * x.moe_top_k, ep, ep_bw, 1.0)
                      for x in layers if x.moe_top_k)
        total = compute + tp_time + ep_time
        if total > slowest:
            slowest, slowest_tp, slowest_ep = total, tp_time, ep_time
    assert worst is not None
    # activations (forward) and their gradients (backward) cross each stage boundary
    pp_bw = net.inter_node if tp * dp * pp > net.gpus_per_node else net.intra_node
    p2p = 2 * (2 * tokens_mb * h / tp) / pp_bw if pp > 1 else 0.0
    per_slot = slowest + p2p
    compute_only = slowest - slowest_tp - slowest_ep
    # data parallel gradient traffic of the most loaded GPU
    dp_bw = net.intra_node if tp * dp <= net.gpus_per_node else net.inter_node
    ends = model.first_sharded + model.last_sharded if pp == 1 else max(model.first_sharded,
                                                                         model.last_sharded)
    dense_params = ends / tp
    dense_params += sum(x.sharded / tp + x.replicated for x in model.layers) / pp
    expert_params = sum(x.experts for x in model.layers) / (tp * ep * pp)
    dp_time = 0.0
    for n_params, group in ((dense_params, dp), (expert_params, max(1, dp // ep))):
        grad_bytes = 2 * n_params
        match zero:
            case 0 | 1:
                dp_time += _ring(grad_bytes, group, dp_bw)
            case 2:
                dp_time += (m + 1) * _ring(grad_bytes, group, dp_bw, 1.0)
            case 3:
                dp_time += 3 * m * _ring(grad_bytes, group, dp_bw, 1.0)
    time = StepTime(
        compute=m * compute_only, tp=m * slowest_tp, ep=m * slowest_ep, pp_p2p=m * p2p,
        bubble=(pp - 1) * per_slot, dp=dp_time,
    )
    batch_tokens = m * dp * b * seq
    mfu = model.model_flops * batch_tokens / (time.total * tp * pp * dp * peak)
    return Evaluated(layout, worst, time, batch_tokens, mfu, worst.total <= usable)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(plan: ModelPlan, gpu: Accelerator, gpus: int, *, seq: int, global_batch_tokens: float,
           hfu: float, net: Interconnect, headroom: float = 0.1,
           zero_stages: tuple[int, ...] = ZERO_STAGES,
           recompute_modes: tuple[Recompute, ...] = RECOMPUTE_MODES) -> SearchResult:
    if gpus < 1:
        raise ArchplanError(f"--gpus must be positive, got {gpus}")
    if not 0 < hfu <= 1:
        raise ArchplanError(f"--mfu must be in (0, 1], got {hfu}")
    if not 0 <= headroom < 1:
        raise ArchplanError(f"--headroom must be in [0, 1), got {headroom}")
    if seq < 1:
        raise ArchplanError(f"--seq must be positive, got {seq}")
    if seq > plan.max_seq_len:
        raise ArchplanError(f"--seq {seq} exceeds the spec's max_seq_len {plan.max_seq_len}")
    sequences = round(global_batch_tokens / seq)
    if sequences < 1:
        raise ArchplanError(
            f"--global-batch-tokens {global_batch_tokens:.3g} is less than one sequence of {seq}"
        )
    model = _Model(plan, seq)
    usable = int(gpu.memory_bytes * (1 - headroom))
    reasons: list[str] = []
    evaluated: list[Evaluated] = []
    considered = 0
    tightest: Evaluated | None = None
    tp_reasons = {}
    for tp in TP_DEGREES:
        if tp > net.gpus_per_node or gpus % tp:
            continue
        why = model.tp_ok(tp)
        if why:
            tp_reasons[tp] = why
            continue
        for pp in _divisors(gpus // tp):
            if pp > len(model.layers):
                break
            dp = gpus // (tp * pp)
            eps = [e for e in _divisors(math.gcd(model.n_experts, dp))] if model.n_experts else [1]
            for ep in eps:
                for b in MICRO_BATCHES:
                    if dp * b > sequences:
                        break
                    m = max(1, round(sequences / (dp * b)))
                    for zero in zero_stages:
                        for mode in recompute_modes:
                            layout = ClusterLayout(tp, pp, dp, ep, zero, mode, b, m)
                            result = evaluate(model, gpu, net, layout, seq, hfu, usable)
                            considered += 1
                            if tightest is None or result.memory.total <= tightest.memory.total:
                                tightest = result
                            if result.fits:
                                evaluated.append(result)
    if not evaluated:
        if tightest is None:
            reasons.append(
                f"no layout: {gpus} GPUs admit no TP×PP×DP split with TP ≤ {net.gpus_per_node} "
                f"(TP within a node), PP ≤ {len(model.layers)} layers and DP ≤ {sequences} sequences "
                "per step"
                + "".join(f"; TP{t}: {w}" for t, w in tp_reasons.items())
            )
        else:
            mem = tightest.memory
            states = mem.weights + mem.grads + mem.optimizer
            what = "model states alone" if states > usable else "model states + activations"
            reasons.append(
                f"does not fit even at maximum sharding ({tightest.layout.label}): stage "
                f"{mem.stage} needs {nbytes(mem.total)} per GPU (weights {nbytes(mem.weights)}, grads "
                f"{nbytes(mem.grads)}, optimizer {nbytes(mem.optimizer)}, activations "
                f"{nbytes(mem.activations)}) > {nbytes(usable)} usable of {nbytes(gpu.memory_bytes)}; "
                f"{what} exceed it: {model.params.total:,} params × 16 B = "
                f"{nbytes(16 * model.params.total)} over {gpus} GPUs is "
                f"{nbytes(16 * model.params.total / gpus)} each before activations"
            )
    # Rank by time per token: rounding m to whole micro-batches changes the batch as run by a few
    # percent between layouts, so raw step times are not comparable.
    evaluated.sort(key=lambda e: (e.time.total / e.global_batch_tokens, e.memory.total))
    return SearchResult(
        gpu=gpu, gpus=gpus, net=net, seq=seq, hfu=hfu, headroom=headroom, usable_bytes=usable,
        model_flops_per_token=model.model_flops, ranked=tuple(evaluated),
        considered=considered, fitting=len(evaluated), reasons=tuple(reasons), tightest=tightest,
    )


def training_days(result: Evaluated, tokens: float) -> float:
    """Wall-clock days to train on `tokens` at this layout's step time and global batch."""
    return tokens / result.global_batch_tokens * result.time.total / 86400

