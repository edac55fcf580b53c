"""Parameter counts of a resolved plan, keyed by module path (docs/architecture.md).

`total` counts unique parameters exactly as `sum(p.numel() for p in model.parameters())` does for the
torch model built from the same plan (tied weights once, buffers never); `active` drops the
(E - top_k) routed experts a token does not reach (docs/formulas.md §1.7). Both include the
multi-token-prediction modules where the spec has them: they are trained, stored and run on every
training token (docs/formulas.md, "Multi-token prediction").
"""

from __future__ import annotations

from dataclasses import dataclass

from typing_extensions import assert_never

from archplan.analytic.attention import (
    attention_matmul_params,
    attention_params,
    mla_matmul_params,
    mla_params,
)
from archplan.analytic.embedding import (
    embed_norm_params,
    embed_params,
    lm_head_matmul_params,
    lm_head_params,
    lm_head_weight_params,
)
from archplan.analytic.ffn import ffn_matmul_params, ffn_params
from archplan.analytic.mamba import (
    mamba1_matmul_params,
    mamba1_params,
    mamba2_matmul_params,
    mamba2_params,
)
from archplan.analytic.hyena import (
    hyena_matmul_params,
    hyena_params,
    striped_matmul_params,
    striped_params,
)
from archplan.analytic.s4 import s4_matmul_params, s4_params
from archplan.analytic.moe import moe_active_params, moe_matmul_params, moe_params
from archplan.analytic.mtp import mtp_own_params, mtp_proj_params
from archplan.analytic.norms import norm_params
from archplan.analytic.positions import position_table_params
from archplan.resolve import (
    AttentionPlan,
    FFNOrMoE,
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


@dataclass(frozen=True)
class ParamCount:
    by_component: dict[str, int]  # every module path of the plan, unique params
    active_by_component: dict[str, int]  # same keys, what one token touches
    total: int
    active: int
    embedding: int  # token embedding V·D
    position_embedding: int  # learned position table, else 0
    lm_head: int  # untied head weight (+bias); tied: its bias only
    non_embedding: int  # total - embedding - position_embedding - untied lm_head weight
    matmul: int  # P_matmul (docs/formulas.md §0): per-token matmul weights, LM head included even when tied
    matmul_active: int  # with MTP: its blocks, projections and one more head pass per depth


def mixer_params(mixer: MixerPlan, d_model: int) -> int:
    match mixer:
        case AttentionPlan():
            return attention_params(mixer, d_model)
        case MLAPlan():
            return mla_params(mixer, d_model)
        case Mamba1Plan():
            return mamba1_params(mixer, d_model)
        case Mamba2Plan():
            return mamba2_params(mixer, d_model)
        case S4Plan():
            return s4_params(mixer, d_model)
        case HyenaPlan():
            return hyena_params(mixer, d_model)
        case StripedHyenaPlan():
            return striped_params(mixer, d_model)
        case _:
            assert_never(mixer)


def mixer_matmul_params(mixer: MixerPlan, d_model: int) -> int:
    match mixer:
        case AttentionPlan():
            return attention_matmul_params(mixer, d_model)
        case MLAPlan():
            return mla_matmul_params(mixer, d_model)
        case Mamba1Plan():
            return mamba1_matmul_params(mixer, d_model)
        case Mamba2Plan():
            return mamba2_matmul_params(mixer, d_model)
        case S4Plan():
            return s4_matmul_params(d_model)
        case HyenaPlan():
            return hyena_matmul_params(mixer, d_model)
        case StripedHyenaPlan():
            return striped_matmul_params(d_model)
        case _:
            assert_never(mixer)


def ffn_parts(ffn: FFNOrMoE, d_model: int, active: bool) -> dict[str, int]:
    """{'': dense FFN} or the MoE submodules {'router': .., 'experts': .., ...}."""
    match ffn:
        case FFNPlan():
            return {"": ffn_params(ffn, d_model)}
        case MoEPlan():
            return moe_active_params(ffn, d_model) if active else moe_params(ffn, d_model)
        case _:
            assert_never(ffn)


def ffn_matmul_parts(ffn: FFNOrMoE, d_model: int, active: bool) -> dict[str, int]:
    match ffn:
        case FFNPlan():
            return {"": ffn_matmul_params(ffn, d_model)}
        case MoEPlan():
            return moe_matmul_params(ffn, d_model, active)
        case _:
            assert_never(ffn)


def ffn_path(layer: LayerPlan, part: str) -> str:
    return f"{layer.path}.ffn" + (f".{part}" if part else "")


def layer_paths(layer: LayerPlan, mixer: int, ffn: dict[str, int], norm: int) -> dict[str, int]:
    """One layer's components in forward order: `normN` before and `post_normN` after sub-block N
    (1 = mixer, 2 = FFN), as resolve.layer_norm_names names them."""

    def norms(name: str) -> dict[str, int]:
        return {f"{layer.path}.{name}": norm} if name in layer.norms else {}

    out = norms("norm1") | {f"{layer.path}.mixer": mixer} | norms("post_norm1") | norms("norm2")
    out |= {ffn_path(layer, part): value for part, value in ffn.items()}
    return out | norms("post_norm2")


def _components(plan: ModelPlan, active: bool) -> dict[str, int]:
    d = plan.d_model
    out: dict[str, int] = {"embed": embed_params(plan)}
    if plan.position == "learned":
        out["pos_embed"] = position_table_params(plan)
    if plan.embed_norm:
        out["embed_norm"] = embed_norm_params(plan)
    norm = norm_params(plan.norm, d)

    def block(layer: LayerPlan) -> dict[str, int]:
        ffn = ffn_parts(layer.ffn, d, active) if layer.ffn is not None else {}
        return layer_paths(layer, mixer_params(layer.mixer, d), ffn, norm)

    for layer in plan.layers:
        out.update(block(layer))
    if plan.final_norm:
        out["final_norm"] = norm
    out["lm_head"] = lm_head_params(plan)
    for layer in plan.mtp:
        out.update(mtp_own_params(plan, layer) | block(layer))
    return out


def matmul_params(plan: ModelPlan, active: bool) -> int:
    """P_matmul (docs/formulas.md §0): every weight a token multiplies, LM head included even when tied."""
    d = plan.d_model
    total = (1 + len(plan.mtp)) * lm_head_matmul_params(plan) + len(plan.mtp) * mtp_proj_params(plan)
    for layer in plan.trained_layers:
        total += mixer_matmul_params(layer.mixer, d)
        if layer.ffn is not None:
            total += sum(ffn_matmul_parts(layer.ffn, d, active).values())
    return total


def count_params(plan: ModelPlan) -> ParamCount:
    by_component = _components(plan, active=False)
    active_by_component = _components(plan, active=True)
    total = sum(by_component.values())
    embedding = embed_params(plan)
    position = position_table_params(plan)
    return ParamCount(
        by_component=by_component,
        active_by_component=active_by_component,
        total=total,
        active=sum(active_by_component.values()),
        embedding=embedding,
        position_embedding=position,
        lm_head=lm_head_params(plan),
        non_embedding=total - embedding - position - lm_head_weight_params(plan),
        matmul=matmul_params(plan, active=False),
        matmul_active=matmul_params(plan, active=True),
    )
