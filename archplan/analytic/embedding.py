"""Token embedding, embedding norm and LM head (docs/formulas.md §1.1; Kaplan et al. 2020 Table 1).

The embedding is a lookup (0 counted FLOPs); the LM head is a matmul 2·D·V per token and takes part
in P_matmul even when its weight is tied to the embedding (docs/formulas.md §0: "the LM head (counted even
when tied)").
"""

from __future__ import annotations

from archplan.analytic.norms import norm_params
from archplan.resolve import ModelPlan


def embed_params(plan: ModelPlan) -> int:
    return plan.vocab_size * plan.d_model


def embed_norm_params(plan: ModelPlan) -> int:
    """BLOOM `word_embeddings_layernorm`: the model's norm kind over d_model."""
    return norm_params(plan.norm, plan.d_model) if plan.embed_norm else 0


def lm_head_weight_params(plan: ModelPlan) -> int:
    """Parameters the head adds beyond the embedding: its weight only when untied."""
    return 0 if plan.tied else plan.vocab_size * plan.d_model


def lm_head_params(plan: ModelPlan) -> int:
    return lm_head_weight_params(plan) + (plan.vocab_size if plan.lm_head_bias else 0)


def lm_head_matmul_params(plan: ModelPlan) -> int:
    return plan.vocab_size * plan.d_model
