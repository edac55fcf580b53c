"""Multi-token prediction's own parts, beside its blocks (DeepSeek-AI 2024, arXiv:2412.19437 §2.2).

Module k normalises the previous depth's hidden state and the embedding of the token k + 1
positions ahead (`hnorm`, `enorm`), projects their concatenation 2·d → d (`proj`, M_k of eq. 21,
no bias), runs its block (counted as a layer: `resolve.ModelPlan.mtp`), normalises (`final_norm`,
where the model has one) and predicts through the shared head (eq. 23). Megatron-Core's
`MultiTokenPredictionLayer` keeps every depth at the full sequence length: the input ids are
rolled left and the loss masks the positions past the end, so every figure here is per token of
the sequence. The embedding lookup and the head are the main model's modules; their extra passes
are counted under `embed` and `lm_head`.
"""

from __future__ import annotations

from archplan.analytic.norms import norm_flops, norm_params
from archplan.resolve import LayerPlan, ModelPlan


def mtp_norm_names(plan: ModelPlan) -> tuple[str, ...]:
    """The module's norms: both inputs', and the head's where the main model normalises before it."""
    return ("enorm", "hnorm", "final_norm") if plan.final_norm else ("enorm", "hnorm")


def mtp_proj_params(plan: ModelPlan) -> int:
    """M_k ∈ R^{d×2d} (report eq. 21)."""
    return 2 * plan.d_model * plan.d_model


def mtp_own_params(plan: ModelPlan, block: LayerPlan) -> dict[str, int]:
    """Module path → parameters of one module's parts outside its block."""
    norm = norm_params(plan.norm, plan.d_model)
    return {f"{block.path}.{name}": norm for name in mtp_norm_names(plan)} | {f"{block.path}.proj": mtp_proj_params(plan)}


def mtp_own_flops(plan: ModelPlan, block: LayerPlan, rows: int) -> tuple[dict[str, int], dict[str, int]]:
    """(counted, elementwise) FLOPs of one module's parts outside its block, over `rows` tokens:
    the projection's matmul, and the norms as estimates."""
    norm = rows * norm_flops(plan.norm, plan.d_model)
    names = mtp_norm_names(plan)
    counted = {f"{block.path}.{name}": 0 for name in names} | {f"{block.path}.proj": 2 * rows * mtp_proj_params(plan)}
    elementwise = {f"{block.path}.{name}": norm for name in names} | {f"{block.path}.proj": 0}
    return counted, elementwise
