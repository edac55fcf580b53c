"""Roofline prediction for a bench run (Williams, Waterman & Patterson 2009, "Roofline").

Prefill: each component runs in time max(FLOPs / peak FLOP/s, bytes moved / copy bandwidth); the
prediction is the sum over components, reported per layer kind. Pure Python (no torch), from the
analytic counts of the same plan the benchmark builds.

Decode is priced by what bounds a one-token step (docs/benchmarks.md, "`bench` decode model"): the
weights stream through matmuls at the decode batch, at a GEMV bandwidth far below copy bandwidth on
CPU, and every other dispatched op (norms, rotary, cache writes, attention over the cache) costs
what it costs once, which a 1-token step cannot amortise:

    step = Σ_kinds layers × (weight bytes / GEMV bandwidth of the kind + replayed seconds of its other ops)

CPU runs it all in sequence (the sum); on CUDA the host issues kernels ahead of the device, so the
step is max(Σ weight time, Σ host time of all ops). The bandwidth and the replayed seconds are
measured in the same run on the calls the step dispatches (`bench/decode.py`).

On CUDA a prefill has the same floor: the roofline's sum is compared with the host's issue of
every call the pass dispatches (counted on the built model, each at its group's per-call cost in
the decode calibration), and the larger is the prediction (`with_host_floor`). At batch 1 × 512
tokens of a 7-8B model an H200 finishes each layer's kernels in a fraction of their issue.

Bytes moved per component (stated in docs/benchmarks.md):
- prefill: its weights once (MoE: only the experts the B·T·K routed rows can reach, min(E, B·T·K);
  the embedding only the B·T rows it looks up), plus its activation input and output (2·B·T·D
  elements), plus, for attention, the K/V it writes;
- decode (one token per sequence): its weights once (MoE: min(E, B·K) experts; the embedding only
  the B rows it looks up). The cache (KV, MLA latent or SSM state) is read by the attention and
  other ops whose replayed time is the overhead, so it is not priced again as bytes.
Elementwise FLOPs are not priced separately: they are memory-bound and covered by the activation
bytes (prefill) or by the replayed ops (decode).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from archplan.analytic import count_params, decode_flops, forward_flops, kv_cache
from archplan.analytic.attention import (
    attention_core_causal_flops,
    attention_core_flops,
    mla_core_causal_flops,
    mla_core_flops,
)
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    HyenaPlan,
    S4Plan,
    StripedHyenaPlan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    layer_index,
)
from typing_extensions import assert_never


@dataclass(frozen=True)
class RooflineRow:
    kind: str  # layer kind label, or "embed+head"
    count: int  # layers of this kind
    flops: float
    bytes: float
    seconds: float  # work + overhead
    bound: str  # "memory", "compute" or "overhead": the largest term
    work: float = 0.0  # prefill: Σ_components max(FLOPs / rate, bytes / bandwidth); decode: bytes / GEMV bandwidth
    ops: int = 0  # dispatched ops per pass, all layers of this kind (decode; a prefill with its host floor)
    overhead: float = 0.0  # decode: seconds of the ops other than weight reads; prefill: the host's issue of its ops


@dataclass(frozen=True)
class Roofline:
    rows: tuple[RooflineRow, ...]
    peak_flops: float  # the compute rate priced (decode: none, 0: its matmuls' time is in the bandwidth)
    bandwidth: float  # the bandwidth priced (decode: weight bytes / weight seconds, all kinds together)
    # CUDA (decode, and a prefill with its host floor): the host issues kernels ahead of the device
    overlap: bool = False

    @property
    def work_seconds(self) -> float:
        """Σ work: the roofline's (prefill) or the weight reads' (decode)."""
        return sum(r.work for r in self.rows)

    @property
    def overhead_seconds(self) -> float:
        """Σ overhead: the replayed ops (decode) or the host's issue of the pass's calls (a prefill
        with its host floor)."""
        return sum(r.overhead for r in self.rows)

    @property
    def seconds(self) -> float:
        if self.overlap:
            return max(self.work_seconds, self.overhead_seconds)
        return sum(r.seconds for r in self.rows)


@dataclass(frozen=True)
class OpCount:
    """Dispatched ops of one decode step: matmuls reading a weight (mm/addmm/grouped_mm/...),
    attention kernels (SDPA), and every other op (elementwise, copies, views, matmuls on the cache)."""

    matmuls: int
    attention: int
    others: int

    @property
    def total(self) -> int:
        return self.matmuls + self.attention + self.others


@dataclass(frozen=True)
class DecodeRates:
    """What bounds a decode step on a device, measured in the run (`bench/decode.py`), per layer kind
    (and "embed+head")."""

    gemv_bandwidth: dict[str, float]  # bytes/s of weights through the kind's own matmul calls
    matmul_seconds: float  # host cost of issuing one weight matmul (CUDA; on CPU it is in the bandwidth: 0)
    attention_seconds: dict[str, float]  # one layer's attention kernels, replayed
    op_seconds: dict[str, float]  # one layer's other ops, replayed
    overlap: bool  # CUDA: the host runs ahead of the device

    def overhead(self, kind: str, ops: OpCount) -> float:
        """Seconds of one layer of `kind` beyond its weight reads."""
        return ops.matmuls * self.matmul_seconds + self.attention_seconds[kind] + self.op_seconds[kind]

    def issue_seconds(self, kind: str, step: OpCount, ops: OpCount) -> float:
        """Host seconds to issue `ops` in one layer of `kind` (CUDA), at the per-call cost of each
        group in the calibrated decode step, whose calls per layer of the kind are `step`."""
        per_attention = self.attention_seconds[kind] / step.attention if step.attention else 0.0
        per_other = self.op_seconds[kind] / step.others if step.others else 0.0
        return ops.matmuls * self.matmul_seconds + ops.attention * per_attention + ops.others * per_other


def layer_kind(layer: LayerPlan) -> str:
    """A label grouping layers that cost the same (mixer, FFN, window)."""
    match layer.mixer:
        case AttentionPlan() as a:
            mixer = a.kind + (f"/window {a.window}" if a.window else "")
        case MLAPlan() as m:
            mixer = "mla" + (f"/window {m.window}" if m.window else "")
        case Mamba1Plan():
            mixer = "mamba1"
        case Mamba2Plan():
            mixer = "mamba2"
        case S4Plan() as m:
            mixer = "s4" if m.dplr else "s4d"
        case HyenaPlan():
            mixer = "hyena"
        case StripedHyenaPlan():
            mixer = "stripedhyena"
        case _:
            assert_never(layer.mixer)
    match layer.ffn:
        case None:
            ffn = ""
        case FFNPlan():
            ffn = "+dense"
        case MoEPlan():
            ffn = "+moe"
        case _:
            assert_never(layer.ffn)
    return mixer + ffn


def _experts_touched(moe: MoEPlan, routed_rows: int) -> int:
    return min(moe.n_experts, routed_rows)


def _inference_components(by_component: dict[str, int]) -> list[str]:
    """The components an inference pass reads: all but the multi-token-prediction modules, which
    only training runs (DeepSeek-AI 2024 §2.2: discarded at inference; `ArchplanModel.forward`)."""
    return [path for path in by_component if path.split(".")[0] != "mtp"]


def _component_weight_elems(plan: ModelPlan, path: str, by_component: dict[str, int],
                            routed_rows: int) -> float:
    """Weights a component reads once; MoE experts only as many as routed rows can reach."""
    elems = by_component.get(path, 0)
    if path.endswith(".ffn.experts"):
        index = layer_index(path)
        assert index is not None
        layer = plan.layers[index]
        assert isinstance(layer.ffn, MoEPlan)
        elems = elems * _experts_touched(layer.ffn, routed_rows) / layer.ffn.n_experts
    return elems


def _predict(plan: ModelPlan, flops_by_path: dict[str, float], bytes_by_path: dict[str, float],
             peak: float, bandwidth: float) -> Roofline:
    """Sum max(compute, memory) per component into its layer kind."""
    flops_by_kind: dict[str, float] = defaultdict(float)
    bytes_by_kind: dict[str, float] = defaultdict(float)
    work_by_kind: dict[str, float] = defaultdict(float)
    counts = kind_counts(plan)
    for path in set(flops_by_path) | set(bytes_by_path):
        kind = _kind_of(plan, path)
        f, b = flops_by_path.get(path, 0.0), bytes_by_path.get(path, 0.0)
        flops_by_kind[kind] += f
        bytes_by_kind[kind] += b
        work_by_kind[kind] += max(f / peak, b / bandwidth)
    rows = []
    for kind in sorted(work_by_kind, key=lambda k: (k == "embed+head", k)):
        work = work_by_kind[kind]
        bound = "compute" if flops_by_kind[kind] / peak > bytes_by_kind[kind] / bandwidth else "memory"
        rows.append(RooflineRow(kind, counts[kind], flops_by_kind[kind], bytes_by_kind[kind], work, bound, work))
    return Roofline(tuple(rows), peak, bandwidth)


def predict_prefill(plan: ModelPlan, batch: int, seq: int, dtype_bytes: float, peak: float,
                    bandwidth: float, attention: str = "causal") -> Roofline:
    """Prefill of `batch` sequences of `seq` tokens (one forward)."""
    params = count_params(plan)
    flops = forward_flops(plan, seq, batch)
    kv = kv_cache(plan, seq, batch, dtype_bytes)
    tokens = batch * seq
    flops_by_path: dict[str, float] = dict(flops.counted_by_component)
    # Attention counted as the convention asked for: causal keeps only each layer's attended pairs
    # (a sliding window's own, so a windowed layer and a full one differ, as `size` counts them)
    if attention == "causal":
        for path, (full, causal) in _attention_cores(plan, batch, seq).items():
            flops_by_path[path] -= full - causal
    bytes_by_path: dict[str, float] = {}
    for path in _inference_components(params.by_component):
        routed = tokens * _top_k_of(plan, path)
        weight = _component_weight_elems(plan, path, params.by_component, routed) * dtype_bytes
        act = 2 * tokens * plan.d_model * dtype_bytes if _is_layer_body(path) else 0
        bytes_by_path[path] = weight + act + kv.by_component.get(path, 0)
    _price_lookups(plan, bytes_by_path, tokens, dtype_bytes)
    bytes_by_path["lm_head"] += tokens * plan.vocab_size * dtype_bytes
    return _predict(plan, flops_by_path, bytes_by_path, peak, bandwidth)


def _price_lookups(plan: ModelPlan, bytes_by_path: dict[str, float], rows: int, dtype_bytes: float) -> None:
    """A lookup reads the `rows` it gathers, not its table (a prefill priced the whole table: 514 MB
    of BLOOM's for 128 tokens); a tied head still reads the whole matrix."""
    for table in ("embed", "pos_embed"):
        if table in bytes_by_path:
            bytes_by_path[table] = rows * plan.d_model * dtype_bytes
    bytes_by_path["lm_head"] = bytes_by_path.get("lm_head", 0) + (
        plan.vocab_size * plan.d_model * dtype_bytes if plan.tied else 0)


def with_host_floor(prefill: Roofline, rates: DecodeRates, step_ops: dict[str, OpCount],
                    pass_ops: dict[str, OpCount]) -> Roofline:
    """The prefill where the host issues kernels ahead of the device (CUDA, `rates.overlap`): the
    pass cannot end before the host has issued every call it dispatches, so it takes
    max(Σ work, Σ host issue), as a CUDA decode step does. `pass_ops`: the calls of one prefill per
    layer of each kind, counted on the built model; each is priced at the per-call issue cost its
    group had in the calibrated decode step (`step_ops`: that step's calls per layer), where the
    device runs each small call in less than its launch, so the replayed seconds are the host's."""
    rows = []
    for row in prefill.rows:
        ops = pass_ops.get(row.kind, OpCount(0, 0, 0))
        host = row.count * rates.issue_seconds(row.kind, step_ops[row.kind], ops)
        rows.append(replace(row, seconds=row.work + host, bound=row.bound if row.work >= host else "overhead",
                            ops=row.count * ops.total, overhead=host))
    return replace(prefill, rows=tuple(rows), overlap=True)


def predict_decode_step(plan: ModelPlan, batch: int, context: int, dtype_bytes: float, rates: DecodeRates,
                        ops_by_kind: dict[str, OpCount]) -> Roofline:
    """One decode step: `batch` new tokens, each attending `context` keys (itself included).

    `ops_by_kind`: dispatched ops of ONE layer of each kind, and of "embed+head" (the rest of the
    step), as counted on the built model; every layer of a kind is priced alike. FLOPs are reported
    (the analytic step, what FlopCounterMode counts), not priced: at the decode batch a weight
    matmul's time is its calibrated bandwidth's, compute included.
    """
    params = count_params(plan)
    flops_by_path = decode_flops(plan, context, batch).counted_by_component
    bytes_by_path: dict[str, float] = {}
    for path in _inference_components(params.by_component):
        routed = batch * _top_k_of(plan, path)
        bytes_by_path[path] = _component_weight_elems(plan, path, params.by_component, routed) * dtype_bytes
    _price_lookups(plan, bytes_by_path, batch, dtype_bytes)
    counts = kind_counts(plan)
    flops_by_kind: dict[str, float] = defaultdict(float)
    bytes_by_kind: dict[str, float] = defaultdict(float)
    for path in set(flops_by_path) | set(bytes_by_path):
        kind = _kind_of(plan, path)
        flops_by_kind[kind] += flops_by_path.get(path, 0.0)
        bytes_by_kind[kind] += bytes_by_path.get(path, 0.0)
    rows = []
    for kind in sorted(counts, key=lambda k: (k == "embed+head", k)):
        ops = ops_by_kind.get(kind, OpCount(0, 0, 0))
        work = bytes_by_kind[kind] / rates.gemv_bandwidth[kind]
        overhead = counts[kind] * rates.overhead(kind, ops)
        rows.append(RooflineRow(kind, counts[kind], flops_by_kind[kind], bytes_by_kind[kind], work + overhead,
                                "memory" if work >= overhead else "overhead", work, counts[kind] * ops.total,
                                overhead))
    weight_seconds = sum(r.work for r in rows)
    return Roofline(tuple(rows), 0.0, sum(r.bytes for r in rows) / weight_seconds if weight_seconds else 0.0,
                    rates.overlap)


def kind_counts(plan: ModelPlan) -> dict[str, int]:
    """Layers of each kind, and "embed+head": 1 (the rest of the model)."""
    counts: dict[str, int] = defaultdict(int, {"embed+head": 1})
    for layer in plan.layers:
        counts[layer_kind(layer)] += 1
    return dict(counts)


def _kind_of(plan: ModelPlan, path: str) -> str:
    index = layer_index(path)
    return layer_kind(plan.layers[index]) if index is not None else "embed+head"


def _top_k_of(plan: ModelPlan, path: str) -> int:
    index = layer_index(path)
    if index is None or not path.endswith(".ffn.experts"):
        return 1
    moe = plan.layers[index].ffn
    assert isinstance(moe, MoEPlan)
    return moe.top_k


def _is_layer_body(path: str) -> bool:
    return path.endswith(".mixer") or path.endswith(".ffn") or path.endswith(".ffn.experts")


def _attention_cores(plan: ModelPlan, batch: int, seq: int) -> dict[str, tuple[int, int]]:
    """QKᵀ+AV FLOPs of each attention layer for a (batch, seq) forward (MLA expanded): the full
    square and the attended pairs, by `analytic.attention`'s counts."""
    cores: dict[str, tuple[int, int]] = {}
    for layer in plan.layers:
        match layer.mixer:
            case AttentionPlan() as a:
                cores[f"{layer.path}.mixer"] = (attention_core_flops(a, batch, seq),
                                                attention_core_causal_flops(a, batch, seq))
            case MLAPlan() as m:
                cores[f"{layer.path}.mixer"] = (mla_core_flops(m, batch, seq), mla_core_causal_flops(m, batch, seq))
            case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
                pass
            case _:
                assert_never(layer.mixer)
    return cores
