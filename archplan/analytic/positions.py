"""Position encodings: parameters (only a learned table has any) and elementwise FLOPs.

docs/formulas.md §1.2: learned absolute = n_ctx·D (GPT-2 `wpe`); sinusoidal, RoPE and ALiBi carry no
parameters (RoPE `inv_freq` and ALiBi slopes are buffers or constants).
"""

from __future__ import annotations

from typing_extensions import assert_never

from archplan.resolve import ModelPlan


def position_table_params(plan: ModelPlan) -> int:
    match plan.position:
        case "learned":
            return plan.max_seq_len * plan.d_model
        case "rope" | "alibi" | "sinusoidal" | "none":
            return 0
        case _:
            assert_never(plan.position)


def position_add_flops(plan: ModelPlan) -> int:
    """Per token: learned and sinusoidal positions are added to the embedding (Vaswani et al. 2017 §3.5)."""
    match plan.position:
        case "learned" | "sinusoidal":
            return plan.d_model
        case "rope" | "alibi" | "none":
            return 0
        case _:
            assert_never(plan.position)


def rope_flops(rotary_dim: int, n_rotated_vectors: int) -> int:
    """Per token: rotating one pair is 4 multiplies + 2 adds (Su et al. 2021 eq. 34), 3 per dimension."""
    return 3 * rotary_dim * n_rotated_vectors


def alibi_flops(n_heads: int, scores: int) -> int:
    """ALiBi adds one bias per head and attention score (Press et al. 2022 §3)."""
    return n_heads * scores
