"""Roofline prediction for a bench run (Williams, Waterman & Patterson 2009, "Roofline").

Each component runs in time max(FLOPs / peak FLOP/s, bytes moved / bandwidth); the run's prediction
is the sum over components, reported per layer kind. Pure Python (no torch), from the analytic
counts of the same plan the benchmark builds.

Bytes moved per component (stated in docs/benchmarks.md):
- prefill: its weights once (MoE: only the experts the B·T·K routed rows can reach, min(E, B·T·K)),
  plus its activation input and output (2·B·T·D elements), plus, for attention, the K/V it writes;
- decode (one token per sequence): its weights once (MoE: min(E, B·K) experts), plus the cache it
  reads at the current context (KV, MLA latent or SSM state).
Elementwise FLOPs are not priced separately: they are memory-bound and covered by the activation bytes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from archplan.analytic import count_params, forward_flops, kv_cache
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
)
from typing_extensions import assert_never


@dataclass(frozen=True)
class RooflineRow:
    kind: str  # layer kind label, or "embed+head"
    count: int  # layers of this kind
    flops: float
    bytes: float
    seconds: float
    bound: str  # "compute" or "memory"


@dataclass(frozen=True)
class Roofline:
    rows: tuple[RooflineRow, ...]
    peak_flops: float
    bandwidth: float

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)


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


def _component_weight_elems(plan: ModelPlan, path: str, by_component: dict[str, int],
                            routed_rows: int) -> float:
    """Weights a component reads once; MoE experts only as many as routed rows can reach."""
    elems = by_component.get(path, 0)
    if path.endswith(".ffn.experts"):
        layer = plan.layers[int(path.split(".")[1])]
        assert isinstance(layer.ffn, MoEPlan)
        elems = elems * _experts_touched(layer.ffn, routed_rows) / layer.ffn.n_experts
    return elems


def _layer_of(path: str) -> int | None:
    parts = path.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _predict(plan: ModelPlan, flops_by_path: dict[str, float], bytes_by_path: dict[str, float],
             peak: float, bandwidth: float) -> Roofline:
    flops_by_kind: dict[str, float] = defaultdict(float)
    bytes_by_kind: dict[str, float] = defaultdict(float)
    seconds_by_kind: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for layer in plan.layers:
        counts[layer_kind(layer)] += 1
    counts["embed+head"] = 1
    for path in set(flops_by_path) | set(bytes_by_path):
        index = _layer_of(path)
        kind = layer_kind(plan.layers[index]) if index is not None else "embed+head"
        f, b = flops_by_path.get(path, 0.0), bytes_by_path.get(path, 0.0)
        flops_by_kind[kind] += f
        bytes_by_kind[kind] += b
        seconds_by_kind[kind] += max(f / peak, b / bandwidth)
    rows = tuple(
        RooflineRow(kind, counts[kind], flops_by_kind[kind], bytes_by_kind[kind], seconds_by_kind[kind],
                    "compute" if flops_by_kind[kind] / peak >= bytes_by_kind[kind] / bandwidth else "memory")
        for kind in sorted(seconds_by_kind, key=lambda k: (k == "embed+head", k))
    )
    return Roofline(rows, peak, bandwidth)


def predict_prefill(plan: ModelPlan, batch: int, seq: int, dtype_bytes: float, peak: float,
                    bandwidth: float, attention: str = "causal") -> Roofline:
    """Prefill of `batch` sequences of `seq` tokens (one forward)."""
    params = count_params(plan)
    flops = forward_flops(plan, seq, batch)
    kv = kv_cache(plan, seq, batch, dtype_bytes)
    tokens = batch * seq
    flops_by_path: dict[str, float] = dict(flops.counted_by_component)
    # Attention counted as the convention asked for: causal keeps only the attended pairs.
    if attention == "causal" and flops.attention_full:
        scale = flops.attention_causal / flops.attention_full
        for path, value in _attention_core_by_path(plan, batch, seq).items():
            flops_by_path[path] -= value * (1 - scale)
    bytes_by_path: dict[str, float] = {}
    for path, elems in params.by_component.items():
        routed = tokens * _top_k_of(plan, path)
        weight = _component_weight_elems(plan, path, params.by_component, routed) * dtype_bytes
        act = 2 * tokens * plan.d_model * dtype_bytes if _is_layer_body(path) else 0
        bytes_by_path[path] = weight + act + kv.by_component.get(path, 0)
    bytes_by_path["lm_head"] = bytes_by_path.get("lm_head", 0) + (
        plan.vocab_size * plan.d_model * dtype_bytes if plan.tied else 0
    ) + tokens * plan.vocab_size * dtype_bytes
    return _predict(plan, flops_by_path, bytes_by_path, peak, bandwidth)


def predict_decode_step(plan: ModelPlan, batch: int, context: int, dtype_bytes: float, peak: float,
                        bandwidth: float) -> Roofline:
    """One decode step: `batch` new tokens, each attending to `context` cached tokens."""
    params = count_params(plan)
    kv = kv_cache(plan, context, batch, dtype_bytes)
    # One new token: the matmuls of a 1-token forward, plus attention over the cached context
    # (FORMULAS §2.8: 4·n_h·d_h·t per layer, window-capped).
    one = forward_flops(plan, 1, 1)
    flops_by_path: dict[str, float] = {p: batch * v for p, v in one.counted_by_component.items()}
    for path, per_key in _attention_core_per_key(plan).items():
        window = plan.layers[int(path.split(".")[1])].mixer.window  # type: ignore[union-attr]
        keys = min(context, window) if window else context
        flops_by_path[path] += batch * per_key * keys
    bytes_by_path: dict[str, float] = {}
    for path in params.by_component:
        routed = batch * _top_k_of(plan, path)
        weight = _component_weight_elems(plan, path, params.by_component, routed) * dtype_bytes
        bytes_by_path[path] = weight + kv.by_component.get(path, 0)
    if plan.tied:
        bytes_by_path["lm_head"] = bytes_by_path.get("lm_head", 0) + plan.vocab_size * plan.d_model * dtype_bytes
    return _predict(plan, flops_by_path, bytes_by_path, peak, bandwidth)


def _top_k_of(plan: ModelPlan, path: str) -> int:
    index = _layer_of(path)
    if index is None or not path.endswith(".ffn.experts"):
        return 1
    moe = plan.layers[index].ffn
    assert isinstance(moe, MoEPlan)
    return moe.top_k


def _is_layer_body(path: str) -> bool:
    return path.endswith(".mixer") or path.endswith(".ffn") or path.endswith(".ffn.experts")


def _attention_core_per_key(plan: ModelPlan) -> dict[str, float]:
    """QKᵀ+AV FLOPs of one query against one key, per attention layer (docs/architecture.md)."""
    core: dict[str, float] = {}
    for layer in plan.layers:
        match layer.mixer:
            case AttentionPlan() as a:
                core[f"{layer.path}.mixer"] = 4 * a.n_heads * a.head_dim
            case MLAPlan() as m:
                core[f"{layer.path}.mixer"] = 2 * m.n_heads * (m.qk_head_dim + m.v_head_dim)
            case Mamba1Plan() | Mamba2Plan() | S4Plan() | HyenaPlan() | StripedHyenaPlan():
                pass
            case _:
                assert_never(layer.mixer)
    return core


def _attention_core_by_path(plan: ModelPlan, batch: int, seq: int) -> dict[str, float]:
    """Full-square QKᵀ+AV FLOPs of each attention layer for a (batch, seq) forward."""
    return {p: batch * seq * seq * v for p, v in _attention_core_per_key(plan).items()}
