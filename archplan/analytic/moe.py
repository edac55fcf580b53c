"""Mixture of experts: router, routed experts (3-D weights), fused shared experts, shared gate.

Parameters docs/formulas.md §1.7: router D·E (+E bias), E routed experts, shared experts fused into one FFN
of width n·d_ff (as HF DeepSeek builds them), Qwen2-MoE shared gate Linear(D, 1). DeepSeek-V3's
score-correction bias is a buffer and is never counted. Active = router + top_k experts + shared.
Counted FLOPs (docs/architecture.md): router 2·B·T·D·E; experts via grouped_mm over the B·T·K routed
rows, 2·B·T·K·(expert matmul weights); shared as a dense FFN; shared gate 2·B·T·D.
Every function returns {submodule: value}, the suffixes of `layers.{i}.ffn.<submodule>`.
"""

from __future__ import annotations

from typing_extensions import assert_never

from archplan.analytic.ffn import ffn_elementwise_per_token, ffn_matmul_params, ffn_params
from archplan.resolve import MoEPlan


def _parts(m: MoEPlan, router: int, experts: int, shared: int | None, gate: int) -> dict[str, int]:
    parts = {"router": router, "experts": experts}
    if m.shared is not None and shared is not None:
        parts["shared"] = shared
    if m.shared_gate:
        parts["shared_gate"] = gate
    return parts


def moe_params(m: MoEPlan, d_model: int) -> dict[str, int]:
    router = d_model * m.n_experts + (m.n_experts if m.router_bias else 0)
    shared = ffn_params(m.shared, d_model) if m.shared is not None else None
    return _parts(m, router, m.n_experts * ffn_params(m.expert, d_model), shared, d_model)


def moe_active_params(m: MoEPlan, d_model: int) -> dict[str, int]:
    parts = moe_params(m, d_model)
    parts["experts"] = m.top_k * ffn_params(m.expert, d_model)
    return parts


def moe_matmul_params(m: MoEPlan, d_model: int, active: bool) -> dict[str, int]:
    """Weights that multiply a token: all experts, or (active) the top_k a token is routed to."""
    n_routed = m.top_k if active else m.n_experts
    shared = ffn_matmul_params(m.shared, d_model) if m.shared is not None else None
    return _parts(
        m, d_model * m.n_experts, n_routed * ffn_matmul_params(m.expert, d_model), shared, d_model
    )


def moe_counted_flops(m: MoEPlan, d_model: int, batch: int, seq_len: int) -> dict[str, int]:
    """Every row is scored by the router; each expert sees only the B·T·K rows routed to it."""
    rows = batch * seq_len
    return {name: 2 * rows * weights for name, weights in moe_matmul_params(m, d_model, True).items()}


def _scoring_flops(m: MoEPlan) -> int:
    """Per token over E scores: softmax 3 (Chinchilla App. F), sigmoid 4 (exp, add, divide + bias add)."""
    match m.scoring:
        case "softmax":
            return 3 * m.n_experts
        case "sigmoid":
            return 4 * m.n_experts
        case _:
            assert_never(m.scoring)


def moe_elementwise_per_token(m: MoEPlan, d_model: int) -> dict[str, int]:
    """Scoring (+ top-k renormalisation over K), K activations, the weighted sum of K outputs (2·K·D)."""
    router = _scoring_flops(m) + (2 * m.top_k if m.normalize_top_k else 0)
    experts = m.top_k * ffn_elementwise_per_token(m.expert) + 2 * m.top_k * d_model
    shared = ffn_elementwise_per_token(m.shared) + d_model if m.shared is not None else None
    # shared gate: sigmoid of one logit, then scale the shared output (D multiplies)
    return _parts(m, router, experts, shared, 4 + d_model)
