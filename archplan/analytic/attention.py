"""Attention mixers: MHA/GQA/MQA (one formula, n_kv heads) and DeepSeek MLA.

Parameters: FORMULAS §1.3 (HF `LlamaAttention`, Megatron `theoretical_memory_usage.py`) and §1.4
(DeepSeek-V3 `inference/model.py` class `MLA`, HF `DeepseekV3Attention`).
Counted FLOPs follow docs/architecture.md: projections 2·rows·in·out (bias adds not counted) and the
attention core 2·B·T²·H·Dqk + 2·B·T²·H·Dv, the full square SDPA computes whatever the mask.
"""

from __future__ import annotations

from typing_extensions import assert_never

from archplan.analytic.norms import norm_flops, norm_params
from archplan.analytic.positions import rope_flops
from archplan.resolve import AttentionPlan, MLAPlan, QKNormPlan


def attended_pairs(seq_len: int, window: int | None) -> int:
    """Σ_{t=1..T} min(t, W): the (query, key) pairs a causal (sliding-window) mask keeps per head.

    Mistral 7B §2 (Jiang et al. 2023): with window W each position attends at most W keys.
    """
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


# ------------------------------------------------------------------------------- MHA / GQA / MQA
def qk_norm_params(qk: QKNormPlan, a: AttentionPlan) -> int:
    """Norms on q and k (see spec.QKNorm): one per head width, one per head, or over the whole projection."""
    match qk.scope:
        case "head":
            return 2 * norm_params(qk.norm, a.head_dim)
        case "per_head":
            return (a.n_heads + a.n_kv_heads) * norm_params(qk.norm, a.head_dim)
        case "full":
            return norm_params(qk.norm, a.n_heads * a.head_dim) + norm_params(
                qk.norm, a.n_kv_heads * a.head_dim
            )
        case _:
            assert_never(qk.scope)


def attention_matmul_params(a: AttentionPlan, d_model: int) -> int:
    """W_q, W_k, W_v, W_o: 2·D·H·Dh + 2·D·Hkv·Dh (FORMULAS §1.3)."""
    q = a.n_heads * a.head_dim
    kv = a.n_kv_heads * a.head_dim
    return 2 * d_model * q + 2 * d_model * kv


def attention_params(a: AttentionPlan, d_model: int) -> int:
    biases = 0
    if a.qkv_bias:
        biases += (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    if a.out_bias:
        biases += d_model
    norms = qk_norm_params(a.qk_norm, a) if a.qk_norm is not None else 0
    return attention_matmul_params(a, d_model) + biases + norms


def attention_core_flops(a: AttentionPlan, batch: int, seq_len: int) -> int:
    """QKᵀ and AV over the full T² square (what SDPA computes and FlopCounterMode counts)."""
    return 2 * batch * seq_len * seq_len * a.n_heads * (a.head_dim + a.head_dim)


def attention_core_causal_flops(a: AttentionPlan, batch: int, seq_len: int) -> int:
    return 2 * batch * attended_pairs(seq_len, a.window) * a.n_heads * (a.head_dim + a.head_dim)


def attention_elementwise_per_token(a: AttentionPlan) -> int:
    """RoPE on q and k heads and qk-norms, per token (the T² softmax is added by the caller)."""
    flops = rope_flops(a.rotary_dim, a.n_heads + a.n_kv_heads)
    if a.qk_norm is not None:
        flops += (a.n_heads + a.n_kv_heads) * norm_flops(a.qk_norm.norm, a.head_dim)
    return flops


# ------------------------------------------------------------------------------------------- MLA
def mla_matmul_params(m: MLAPlan, d_model: int) -> int:
    """q_a/q_b (or q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj (FORMULAS §1.4)."""
    if m.q_lora_rank is not None:
        q = d_model * m.q_lora_rank + m.q_lora_rank * m.n_heads * m.qk_head_dim
    else:
        q = d_model * m.n_heads * m.qk_head_dim
    kv_a = d_model * (m.kv_lora_rank + m.qk_rope_head_dim)
    kv_b = m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
    out = m.n_heads * m.v_head_dim * d_model
    return q + kv_a + kv_b + out


def mla_norm_params(m: MLAPlan) -> int:
    """q_a_layernorm (when q is low-rank) and kv_a_layernorm: RMSNorms on the latents (DeepSeek-V2 §2.1.2)."""
    q_norm = norm_params(m.norm, m.q_lora_rank) if m.q_lora_rank is not None else 0
    return q_norm + norm_params(m.norm, m.kv_lora_rank)


def mla_params(m: MLAPlan, d_model: int) -> int:
    return mla_matmul_params(m, d_model) + mla_norm_params(m)


def mla_core_flops(m: MLAPlan, batch: int, seq_len: int) -> int:
    """Training/prefill path (no absorption): SDPA with Dqk = nope + rope and Dv = v_head_dim."""
    return 2 * batch * seq_len * seq_len * m.n_heads * (m.qk_head_dim + m.v_head_dim)


def mla_core_causal_flops(m: MLAPlan, batch: int, seq_len: int) -> int:
    return 2 * batch * attended_pairs(seq_len, m.window) * m.n_heads * (m.qk_head_dim + m.v_head_dim)


def mla_elementwise_per_token(m: MLAPlan) -> int:
    """RoPE on every query head's rope part and on the single shared rope key; the latent norms."""
    flops = rope_flops(m.qk_rope_head_dim, m.n_heads + 1) + norm_flops(m.norm, m.kv_lora_rank)
    if m.q_lora_rank is not None:
        flops += norm_flops(m.norm, m.q_lora_rank)
    return flops


def mla_decode_flops(m: MLAPlan, d_model: int, keys: int) -> int:
    """Counted FLOPs of MLA for one new token of one sequence attending `keys` cached latent rows
    (itself included): the cheaper of the two forms (DeepSeek-V2 §2.1.2), as `modules/mla.py` picks.

    Per new token: q_a/q_b (or q_proj), kv_a_proj_with_mqa and o_proj, 2·(their weights); plus
    - absorbed (DeepSeek-V3 `inference/model.py`, attn_impl="absorb"): q_nope·W_UK and out·W_UV,
      2·H·C·(Dn+Dv) per new token, and per key 2·H·(C+R) for the scores + 2·H·C for the
      weighted sum of latents (DeepSeek-V3: 33,554,432 per token, 278,528 per key);
    - expanded: kv_b_proj re-expands every key, 2·H·C·(Dn+Dv) per key (33,554,432 per key for
      DeepSeek-V3), plus SDPA 2·H·(Dn+R+Dv) per key.
    Absorbed is cheaper iff keys·(2C − Dn − Dv) < (keys − 1)·C·(Dn + Dv): from 2 keys on for
    DeepSeek-V3 (768·keys < 131,072·(keys − 1)); at a single key the expanded form.
    """
    h, c, dn, r, dv = m.n_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    kv_b = c * h * (dn + dv)
    projections = 2 * (mla_matmul_params(m, d_model) - kv_b)
    absorbed = 2 * kv_b + 2 * h * (2 * c + r) * keys
    expanded = 2 * kv_b * keys + 2 * h * (dn + r + dv) * keys
    return projections + min(absorbed, expanded)
