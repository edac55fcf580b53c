"""`archplan import hf`: every reference config imports to transformers' exact count, tiny configs of
the other families match counts derived by hand from transformers' modeling code, the configs
transformers itself writes for every family import and size exactly (against the model transformers
builds on meta), the key policy reports or refuses what it does not know, and bad input exits 2
naming the field.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from archplan.analytic import count_params
from archplan.cli import main
from archplan.errors import ArchplanError
from archplan.importers import FAMILIES, convert_config, import_hf, read_hf, spec_from_config
from archplan.importers.hf import compress_mixers
from archplan.loader import load_spec, parse_yaml, spec_from_data
from archplan.planning import spec_yaml
from archplan.resolve import resolve
from archplan.spec import MAX_LAYERS

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["models"]

COVERAGE = (
    "llama mistral mixtral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 phi phi3 gpt2 gpt_neox gptj "
    "falcon bloom mpt stablelm olmo olmo2 olmoe deepseek_v2 deepseek_v3 mamba mamba2 jamba stripedhyena"
).split()


def lin(n_in: int, n_out: int, bias: bool = False) -> int:
    """nn.Linear(n_in, n_out, bias) (and GPT-2's Conv1D): weight + optional bias."""
    return n_in * n_out + (n_out if bias else 0)


@dataclass(frozen=True)
class Case:
    config: dict[str, Any]
    total: int
    active: int | None = None  # None: dense, active == total


# Tiny configs of the families without a reference fixture (and the quirks the fixtures miss).
# Each expected count is spelled as the modules transformers 5.24 builds (modeling_<family>.py), so
# the arithmetic is the derivation. V = 128, D = 64 throughout; untied unless the family ties.
V, D = 128, 64
EMB = V * D
TINY: dict[str, Case] = {
    # stripedhyena model.py: hyena blocks (projections + bias, FIR 3D·k + bias, D, poles and residues
    # D·S·2 each, out_filter_dense + bias) and one MHA block, both with two RMSNorms and the gated MLP
    "stripedhyena": Case(
        dict(model_type="stripedhyena", vocab_size=V, hidden_size=D, num_layers=3, num_attention_heads=4,
             proj_groups=1, attn_layer_idxs=[1], hyena_layer_idxs=[0, 2], inner_mlp_size=96, state_size=2, qkv_proj_bias=True, num_filters=D,
             tie_embeddings=True),
        EMB + D
        + 2 * (lin(D, 3 * D, True) + 3 * D * 3 + 3 * D + D + 2 * D * 2 * 2 + lin(D, D, True) + 2 * D + 3 * D * 96)
        + (lin(D, 3 * D, True) + lin(D, D) + 2 * D + 3 * D * 96),
    ),
    # LlamaAttention: attention_bias on q, k, v AND o; LlamaMLP: mlp_bias on gate/up/down; tied head
    "llama-biased-tied-llama3rope": Case(
        dict(model_type="llama", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, attention_bias=True, mlp_bias=True,
             tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=512,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        EMB + 2 * (lin(D, 64, True) + 2 * lin(D, 32, True) + lin(64, D, True)
                   + 2 * lin(D, 96, True) + lin(96, D, True) + 2 * D) + D),
    # MistralAttention with explicit head_dim 32 (q: 4·32 = 128 wide); window on every layer
    "mistral-window": Case(
        dict(model_type="mistral", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=96, sliding_window=32),
        2 * EMB + 2 * (lin(D, 128) + 2 * lin(D, 64) + lin(128, D) + 3 * D * 96 + 2 * D) + D),
    # MixtralSparseMoeBlock: router Linear(D, 4) + experts (4, 2·48, D) and (4, D, 48)
    "mixtral-window": Case(
        dict(model_type="mixtral", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
             sliding_window=32),
        2 * EMB + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + D * 4 + 4 * 3 * D * 48 + 2 * D) + D,
        2 * EMB + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + D * 4 + 2 * 3 * D * 48 + 2 * D) + D),
    # Qwen2Attention: bias on q/k/v only; layer 0 global, 1-2 sliding (i >= max_window_layers)
    "qwen2-max-window-layers": Case(
        dict(model_type="qwen2", vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, use_sliding_window=True, sliding_window=16,
             max_window_layers=1, tie_word_embeddings=True),
        EMB + 3 * (lin(D, 64, True) + 2 * lin(D, 32, True) + lin(64, D) + 3 * D * 96 + 2 * D) + D),
    # Qwen3Attention: q_norm/k_norm RMSNorm(head_dim = 32) each
    "qwen3": Case(
        dict(model_type="qwen3", vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=96, tie_word_embeddings=True,
             use_sliding_window=True, sliding_window=16, max_window_layers=1),
        EMB + 3 * (lin(D, 128) + 2 * lin(D, 64) + lin(128, D) + 2 * 32 + 3 * D * 96 + 2 * D) + D),
    # Qwen2MoeSparseMoeBlock: gate Linear(D,4), experts 4·3·D·32, shared_expert 3·D·48,
    # shared_expert_gate Linear(D,1); layer 0 in mlp_only_layers is a dense Qwen2MoeMLP(96)
    "qwen2_moe-mlp-only": Case(
        dict(model_type="qwen2_moe", vocab_size=V, hidden_size=D, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]),
        2 * EMB + D + 4 * (lin(D, 64, True) + 2 * lin(D, 32, True) + lin(64, D) + 2 * D)
        + 3 * D * 96 + 3 * (D * 4 + 4 * 3 * D * 32 + 3 * D * 48 + D),
        2 * EMB + D + 4 * (lin(D, 64, True) + 2 * lin(D, 32, True) + lin(64, D) + 2 * D)
        + 3 * D * 96 + 3 * (D * 4 + 2 * 3 * D * 32 + 3 * D * 48 + D)),
    # decoder_sparse_step 2: experts where (i+1) % 2 == 0, i.e. layers 1 and 3; MHA without bias
    "qwen2_moe-sparse-step": Case(
        dict(model_type="qwen2_moe", vocab_size=V, hidden_size=D, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
             qkv_bias=False),
        2 * EMB + D + 4 * (4 * lin(D, 64) + 2 * D) + 2 * 3 * D * 96
        + 2 * (D * 4 + 4 * 3 * D * 32 + 3 * D * 48 + D),
        2 * EMB + D + 4 * (4 * lin(D, 64) + 2 * D) + 2 * 3 * D * 96
        + 2 * (D * 4 + 2 * 3 * D * 32 + 3 * D * 48 + D)),
    # Qwen3MoeAttention head_dim = getattr(config, "head_dim", D/H) = 16 (no 128 default here)
    "qwen3_moe": Case(
        dict(model_type="qwen3_moe", vocab_size=V, hidden_size=D, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
             num_experts_per_tok=2, decoder_sparse_step=2),
        2 * EMB + D + 4 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 2 * 16 + 2 * D)
        + 2 * 3 * D * 96 + 2 * (D * 4 + 4 * 3 * D * 32),
        2 * EMB + D + 4 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 2 * 16 + 2 * D)
        + 2 * 3 * D * 96 + 2 * (D * 4 + 2 * 3 * D * 32)),
    # GemmaAttention MQA with head_dim 32; tied by default; "gelu" means the tanh GeGLU
    "gemma": Case(
        dict(model_type="gemma", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32, intermediate_size=128, hidden_act="gelu"),
        EMB + 2 * (lin(D, 128) + 2 * lin(D, 32) + lin(128, D) + 3 * D * 128 + 2 * D) + D),
    # Gemma2DecoderLayer: input/post_attention/pre_feedforward/post_feedforward RMSNorms
    "gemma2": Case(
        dict(model_type="gemma2", vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, intermediate_size=128, sliding_window=16),
        EMB + 3 * (lin(D, 128) + 2 * lin(D, 64) + lin(128, D) + 3 * D * 128 + 4 * D) + D),
    # PhiAttention: biased q/k/v/dense, q/k LayerNorm(head_dim 16, weight+bias); PhiMLP fc1/fc2 biased;
    # one input_layernorm per block; final LayerNorm; lm_head with bias
    "phi": Case(
        dict(model_type="phi", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, qk_layernorm=True, partial_rotary_factor=0.5),
        EMB + lin(D, V, True) + 2 * (4 * lin(D, 64, True) + 2 * 2 * 16 + lin(D, 128, True)
                                     + lin(128, D, True) + 2 * D) + 2 * D),
    # Phi3Attention qkv_proj (64 + 2·32) and Phi3MLP gate_up_proj (2·96): split sizes, no biases
    "phi3": Case(
        dict(model_type="phi3", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, sliding_window=32, partial_rotary_factor=0.5,
             pad_token_id=0),
        2 * EMB + 2 * (lin(D, 64 + 2 * 32) + lin(64, D) + lin(D, 2 * 96) + lin(96, D) + 2 * D) + D),
    # GPT2: wte + wpe(256), biased c_attn(3D)/c_proj, MLP n_inner 96, LayerNorms with bias, tied
    "gpt2-n_inner": Case(
        dict(model_type="gpt2", vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=256, n_inner=96),
        EMB + 256 * D + 2 * (lin(D, 3 * D, True) + lin(D, D, True) + lin(D, 96, True) + lin(96, D, True)
                             + 2 * 2 * D) + 2 * D),
    # GPTNeoXLayer: input + post_attention LayerNorms, biased fused qkv/dense and MLP; untied embed_out
    "gpt_neox-parallel": Case(
        dict(model_type="gpt_neox", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=256, rotary_pct=0.25),
        2 * EMB + 2 * (lin(D, 3 * D, True) + lin(D, D, True) + lin(D, 256, True) + lin(256, D, True)
                       + 2 * 2 * D) + 2 * D),
    "gpt_neox-sequential": Case(
        dict(model_type="gpt_neox", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=256, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True),
        EMB + 2 * (lin(D, 3 * D) + lin(D, D) + lin(D, 256, True) + lin(256, D, True) + 2 * 2 * D) + 2 * D),
    # GPTJBlock: one ln_1, unbiased q/k/v/out, fc_in/fc_out (n_inner None -> 4D) biased; lm_head biased
    "gptj": Case(
        dict(model_type="gptj", vocab_size=V, n_embd=D, n_layer=2, n_head=4, rotary_dim=8),
        EMB + lin(D, V, True) + 2 * (4 * lin(D, D) + lin(D, 4 * D, True) + lin(4 * D, D, True) + 2 * D) + 2 * D),
    # FalconAttention new_decoder_architecture: qkv (H + 2·Hkv)·Dh; ln_attn + ln_mlp; tied; no bias
    "falcon-new-arch": Case(
        dict(model_type="falcon", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_kv_heads=2, new_decoder_architecture=True, multi_query=False),
        EMB + 2 * (lin(D, (4 + 2 * 2) * 16) + lin(D, D) + lin(D, 4 * D) + lin(4 * D, D) + 2 * 2 * D) + 2 * D),
    # multi_query false, old architecture: qkv = 3·D; sequential -> input + post_attention LayerNorm
    "falcon-sequential-alibi": Case(
        dict(model_type="falcon", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             multi_query=False, parallel_attn=False, bias=True, alibi=True, tie_word_embeddings=False),
        2 * EMB + 2 * (lin(D, 3 * D, True) + lin(D, D, True) + lin(D, 4 * D, True) + lin(4 * D, D, True)
                       + 2 * 2 * D) + 2 * D),
    # BloomModel: word_embeddings_layernorm, biased qkv/dense/MLP(4D), tied
    "bloom": Case(
        dict(model_type="bloom", vocab_size=V, hidden_size=D, n_layer=2, n_head=4),
        EMB + 2 * D + 2 * (lin(D, 3 * D, True) + lin(D, D, True) + lin(D, 4 * D, True) + lin(4 * D, D, True)
                           + 2 * 2 * D) + 2 * D),
    # MptBlock: LayerNorms with their bias set to None, Wqkv/out_proj/up/down without bias, tied
    "mpt": Case(
        dict(model_type="mpt", vocab_size=V, d_model=D, n_heads=4, n_layers=2, max_seq_len=256,
             attn_config={"alibi": True, "attn_type": "multihead_attention", "clip_qkv": 8.0}),
        EMB + 2 * (lin(D, 3 * D) + lin(D, D) + lin(D, 4 * D) + lin(4 * D, D) + 2 * D) + D),
    # StableLmLayerNormPerHead: one bias-free LayerNorm(16) per head, 4 for q and 2 for k
    "stablelm-qk-norm": Case(
        dict(model_type="stablelm", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, qk_layernorm=True, use_qkv_bias=True),
        2 * EMB + 2 * (lin(D, 64, True) + 2 * lin(D, 32, True) + lin(64, D) + (4 + 2) * 16
                       + 3 * D * 96 + 2 * 2 * D) + 2 * D),
    # use_parallel_residual: no post_attention_layernorm
    "stablelm-parallel": Case(
        dict(model_type="stablelm", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, intermediate_size=96, use_parallel_residual=True),
        2 * EMB + 2 * (4 * lin(D, D) + 3 * D * 96 + 2 * D) + 2 * D),
    # Olmo2Attention q_norm RMSNorm(H·Dh = 64), k_norm RMSNorm(Hkv·Dh = 32); post-attention and
    # post-feedforward RMSNorms only
    "olmo2": Case(
        dict(model_type="olmo2", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96),
        2 * EMB + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 64 + 32 + 3 * D * 96 + 2 * D) + D),
    # OlmoLayerNorm has no weight and no bias: only Linear weights count (MHA, SwiGLU, untied head)
    "olmo": Case(
        dict(model_type="olmo", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=96),
        2 * EMB + 2 * (4 * lin(D, D) + 3 * D * 96)),
    # OlmoeSparseMoeBlock: gate Linear(D, 4), experts 4·3·D·32 on every layer
    "olmoe": Case(
        dict(model_type="olmoe", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
        2 * EMB + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 64 + 32 + D * 4 + 4 * 3 * D * 32 + 2 * D) + D,
        2 * EMB + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 64 + 32 + D * 4 + 2 * 3 * D * 32 + 2 * D) + D),
    # DeepseekV2Attention with q_lora_rank null: q_proj D -> H·(16+8); kv_a_proj_with_mqa D -> 32+8,
    # kv_a_layernorm 32, kv_b_proj 32 -> H·(16+16), o_proj H·16 -> D. Layer 0 dense (first_k 1);
    # DeepseekV2Moe: router (4, D), experts 4·3·D·16, shared MLP of width 2·16
    "deepseek_v2-lite": Case(
        dict(model_type="deepseek_v2", vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
             q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             intermediate_size=96, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=2, first_k_dense_replace=1, max_position_embeddings=256,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}),
        2 * EMB + D + 3 * (lin(D, 4 * 24) + lin(D, 32 + 8) + 32 + lin(32, 4 * 32) + lin(4 * 16, D) + 2 * D)
        + 3 * D * 96 + 2 * (4 * D + 4 * 3 * D * 16 + 3 * D * 32),
        2 * EMB + D + 3 * (lin(D, 4 * 24) + lin(D, 32 + 8) + 32 + lin(32, 4 * 32) + lin(4 * 16, D) + 2 * D)
        + 3 * D * 96 + 2 * (4 * D + 2 * 3 * D * 16 + 3 * D * 32)),
    # q_lora_rank 24: q_a_proj D -> 24, q_a_layernorm 24, q_b_proj 24 -> H·24; one shared expert;
    # e_score_correction_bias is a buffer, not a parameter
    "deepseek_v3": Case(
        dict(model_type="deepseek_v3", vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
             q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             intermediate_size=96, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1),
        2 * EMB + D + 3 * (lin(D, 24) + 24 + lin(24, 4 * 24) + lin(D, 40) + 32 + lin(32, 128) + lin(64, D) + 2 * D)
        + 3 * D * 96 + 2 * (4 * D + 4 * 3 * D * 16 + 3 * D * 16),
        2 * EMB + D + 3 * (lin(D, 24) + 24 + lin(24, 4 * 24) + lin(D, 40) + 32 + lin(32, 128) + lin(64, D) + 2 * D)
        + 3 * D * 96 + 2 * (4 * D + 2 * 3 * D * 16 + 3 * D * 16)),
    # MambaMixer, d_inner 128, N 8, dt_rank auto = ceil(64/16) = 4, use_bias on in/out_proj:
    # in_proj D -> 256, conv1d 128·4 + 128, x_proj 128 -> 4 + 2·8, dt_proj 4 -> 128 (+bias),
    # A_log 128·8, D 128, out_proj 128 -> D; one RMSNorm per block; tied
    "mamba-auto-dt": Case(
        dict(model_type="mamba", vocab_size=V, hidden_size=D, num_hidden_layers=2, state_size=8, expand=2,
             conv_kernel=4, time_step_rank="auto", use_bias=True),
        EMB + 2 * (lin(D, 256, True) + 128 * 4 + 128 + lin(128, 4 + 16) + lin(4, 128, True) + 128 * 8 + 128
                   + lin(128, D, True) + D) + D),
    # Mamba2Mixer, d_inner 128, 8 heads of 16, G 2, N 16: in_proj D -> 2·128 + 2·2·16 + 8, conv over
    # 128 + 2·2·16 = 192 channels (+bias), dt_bias/A_log/D 8 each, gated RMSNorm 128, out_proj
    "mamba2": Case(
        dict(model_type="mamba2", vocab_size=V, hidden_size=D, num_hidden_layers=2, num_heads=8, head_dim=16,
             expand=2, n_groups=2, state_size=16, conv_kernel=4, tie_word_embeddings=True),
        EMB + 2 * (lin(D, 2 * 128 + 2 * 2 * 16 + 8) + 192 * 4 + 192 + 3 * 8 + 128 + lin(128, D) + D) + D),
    # JambaMambaMixer (dt/B/C RMSNorms 4 + 8 + 8) on layers 0, 2; attention on 1, 3 (period 2,
    # offset 1); JambaSparseMoeBlock (router (4, D), 4·3·D·96) on 0, 2; JambaMLP(96) on 1, 3
    "jamba": Case(
        dict(model_type="jamba", vocab_size=V, hidden_size=D, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, attn_layer_period=2, attn_layer_offset=1,
             expert_layer_period=2, expert_layer_offset=0, num_experts=4, num_experts_per_tok=2,
             mamba_d_state=8, mamba_dt_rank="auto"),
        2 * EMB + D + 2 * (lin(D, 256) + 128 * 4 + 128 + lin(128, 4 + 16) + lin(4, 128, True) + 128 * 8 + 128
                           + lin(128, D) + 4 + 8 + 8 + 4 * D + 4 * 3 * D * 96 + 2 * D)
        + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 3 * D * 96 + 2 * D),
        2 * EMB + D + 2 * (lin(D, 256) + 128 * 4 + 128 + lin(128, 4 + 16) + lin(4, 128, True) + 128 * 8 + 128
                           + lin(128, D) + 4 + 8 + 8 + 4 * D + 2 * 3 * D * 96 + 2 * D)
        + 2 * (lin(D, 64) + 2 * lin(D, 32) + lin(64, D) + 3 * D * 96 + 2 * D)),
}


# Typical full configs: the key sets of public config.json files (transcribed by hand, not
# downloaded), so the importer is tested on every key real checkpoints carry, not only on the
# fields it reads. Counts recorded from transformers 5.24 on the meta device by
# benchmarks/hf_parity.py (which rebuilds and compares them on every run).
TYPICAL: dict[str, Case] = {
    "phi-2": Case(
        {"_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0,
         "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "hidden_act": "gelu_new",
         "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 2048, "model_type": "phi", "num_attention_heads": 32,
         "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4,
         "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0",
         "use_cache": True, "vocab_size": 51200},
        2_779_683_840),
    "pythia-1b": Case(
        {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
         "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
         "num_hidden_layers": 16, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
         "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
         "use_parallel_residual": True, "vocab_size": 50304},
        1_011_781_632),
    "gpt-j-6b": Case(
        {"activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"], "attn_pdrop": 0.0,
         "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "gradient_checkpointing": False,
         "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gptj", "n_embd": 4096,
         "n_head": 16, "n_inner": None, "n_layer": 28, "n_positions": 2048, "resid_pdrop": 0.0, "rotary": True,
         "rotary_dim": 64, "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
         "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
         "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50, "temperature": 1.0}},
         "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer",
         "transformers_version": "4.18.0.dev0", "use_cache": True, "vocab_size": 50400},
        6_050_882_784),
    "falcon-40b": Case(
        {"alibi": False, "apply_residual_connection_post_layernorm": False,
         "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False, "bos_token_id": 11,
         "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 8192, "initializer_range": 0.02,
         "layer_norm_epsilon": 1e-05, "model_type": "falcon", "new_decoder_architecture": True,
         "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8, "parallel_attn": True,
         "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024},
        41_303_293_952),
    "mpt-7b": Case(
        {"architectures": ["MPTForCausalLM"], "attn_config": {"alibi": True, "alibi_bias_max": 8,
         "attn_impl": "torch", "attn_pdrop": 0, "attn_type": "multihead_attention",
         "attn_uses_sequence_id": False, "clip_qkv": None, "prefix_lm": False, "qk_ln": False,
         "softmax_scale": None}, "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0,
         "expansion_ratio": 4,
         "init_config": {"emb_init_std": None, "init_div_is_residual": True, "name": "kaiming_normal_"},
         "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048,
         "model_type": "mpt", "n_heads": 32, "n_layers": 32, "no_bias": True,
         "norm_type": "low_precision_layernorm", "resid_pdrop": 0, "tokenizer_name": "EleutherAI/gpt-neox-20b",
         "torch_dtype": "bfloat16", "transformers_version": "4.28.1", "use_cache": False, "verbose": 0,
         "vocab_size": 50432},
        6_649_286_656),
    "stablelm-2-1_6b": Case(
        {"architectures": ["StableLmForCausalLM"], "bos_token_id": 100257, "eos_token_id": 100257,
         "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048, "initializer_range": 0.02,
         "intermediate_size": 5632, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
         "model_type": "stablelm", "num_attention_heads": 32, "num_hidden_layers": 24,
         "num_key_value_heads": 32, "partial_rotary_factor": 0.25, "qk_layernorm": False, "rope_scaling": None,
         "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.38.0", "use_cache": True, "use_parallel_residual": False,
         "use_qkv_bias": True, "vocab_size": 100352},
        1_644_515_328),
    "qwen1.5-moe-a2.7b": Case(
        {"architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
         "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
         "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
         "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
         "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
         "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "transformers_version": "4.39.0.dev0", "use_cache": True,
         "use_sliding_window": False, "vocab_size": 151936},
        14_315_784_192, 2_689_173_504),
    "qwen3-30b-a3b": Case(
        {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
         "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
         "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
         "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
         "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
         "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
         "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
         "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        30_532_122_624, 3_353_032_704),
    "qwen3-8b": Case(
        {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
         "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
         "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
         "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
         "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
         "use_sliding_window": False, "vocab_size": 151936},
        8_190_735_360),
    "deepseek-v2-lite": Case(
        {"architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
         "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
         "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
         "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
         "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
         "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
         "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
         "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1,
         "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
         "type": "yarn"}, "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
         "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
         "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128,
         "vocab_size": 102400},
        15_706_484_224, 2_661_150_208),
    "olmoe-1b-7b": Case(
        {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
         "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
         "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
         "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
         "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
         "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
         "torch_dtype": "float32", "transformers_version": "4.43.0.dev0", "use_cache": True,
         "vocab_size": 50304},
        6_919_161_856, 1_282_017_280),
    "olmo-2-7b": Case(
        {"architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
         "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "olmo2",
         "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277,
         "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False,
         "torch_dtype": "float32", "transformers_version": "4.47.0.dev0", "use_cache": True,
         "vocab_size": 100352},
        7_298_617_344),
    "gemma-2-9b": Case(
        {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
         "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
         "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
         "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "gemma2",
         "num_attention_heads": 16, "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0,
         "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
         "sliding_window_size": 4096, "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
         "use_cache": True, "vocab_size": 256000},
        9_241_705_984),
    "phi-3-mini-4k": Case(
        {"_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
         "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000,
         "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
         "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
         "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
         "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
         "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.40.2", "use_cache": True, "attention_bias": False, "vocab_size": 32064},
        3_821_079_552),
    "mamba-codestral-7b": Case(
        {"architectures": ["Mamba2ForCausalLM"], "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4,
         "eos_token_id": 0, "expand": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 4096,
         "initializer_range": 0.1, "layer_norm_epsilon": 1e-05, "model_type": "mamba2", "n_groups": 8,
         "norm_before_gate": True, "num_heads": 128, "num_hidden_layers": 64, "pad_token_id": 0,
         "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "state_size": 128,
         "tie_word_embeddings": False, "time_step_floor": 0.0001, "time_step_init_scheme": "random",
         "time_step_limit": [0.0, math.inf], "time_step_max": 0.1, "time_step_min": 0.001,
         "time_step_rank": 256, "time_step_scale": 1.0, "torch_dtype": "bfloat16",
         "transformers_version": "4.44.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
         "vocab_size": 32768},
        7_285_403_648),
    "bloom-7b1": Case(
        {"apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
         "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
         "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 4096,
         "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
         "model_type": "bloom", "n_head": 32, "n_inner": None, "n_layer": 30, "offset_alibi": 100,
         "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True, "skip_bias_add_qkv": False,
         "slow_but_exact": False, "unk_token_id": 0, "use_cache": True, "vocab_size": 250880},
        7_069_016_064),
    "llama-3.1-8b": Case(
        {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
         "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
         "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
         "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
         "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": False,
         "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True,
         "vocab_size": 128256},
        8_030_261_248),
    "gemma-7b": Case(
        {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "bos_token_id": 2, "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
         "hidden_activation": None, "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 24576,
         "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 16,
         "num_hidden_layers": 28, "num_key_value_heads": 16, "pad_token_id": 0, "rms_norm_eps": 1e-06,
         "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
         "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000},
        8_537_680_896),
}


def counts(config: dict[str, Any], name: str = "tiny") -> tuple[int, int]:
    pc = count_params(resolve(spec_from_config(config, file=name, name=name)))
    return pc.total, pc.active


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_configs_import_exactly(name: str) -> None:
    ref = EXPECTED[name]
    spec = import_hf(FIXTURES / ref["config_file"])
    pc = count_params(resolve(spec))
    assert pc.total == ref["total_params"]
    assert pc.active == ref["active_params"]
    assert pc.embedding == ref["embedding_params"]
    assert pc.position_embedding == ref["position_embedding_params"]
    assert pc.non_embedding == ref["non_embedding_params"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_configs_match_hand_derived_counts(name: str) -> None:
    case = TINY[name]
    assert counts(case.config, name) == (case.total, case.active if case.active is not None else case.total)


@pytest.mark.parametrize("name", sorted(TYPICAL))
def test_typical_full_configs_import_exactly(name: str) -> None:
    case = TYPICAL[name]
    assert counts(case.config, name) == (case.total, case.active if case.active is not None else case.total)


def test_every_covered_model_type_is_registered_and_exercised() -> None:
    assert set(COVERAGE) == set(FAMILIES)
    exercised = {c.config["model_type"] for c in TINY.values()} | {r["model_type"] for r in EXPECTED.values()}
    assert exercised == set(COVERAGE)


# ------------------------------------------------------------------------------- family quirks
def spec_of(config: dict[str, Any]):  # noqa: ANN201 - a Spec; the name reads better than the type
    return spec_from_config(config, file="config.json", name="t")


def test_layouts_follow_transformers_layer_rules() -> None:
    assert spec_of(TINY["qwen2-max-window-layers"].config).layout.mixers == "ASS"
    assert spec_of(TINY["gemma2"].config).layout.mixers == "SA"
    assert spec_of(TINY["mistral-window"].config).layout.mixers == "S"
    qwen_moe = spec_of(TINY["qwen2_moe-sparse-step"].config).layout
    assert (qwen_moe.moe_every, qwen_moe.moe_offset, qwen_moe.first_dense) == (2, 1, 0)
    assert spec_of(TINY["qwen2_moe-mlp-only"].config).layout.first_dense == 1
    jamba = spec_of(TINY["jamba"].config).layout
    assert (jamba.mixers, jamba.moe_every, jamba.moe_offset) == ("MA", 2, 0)


def test_explicit_layer_types_override_the_default_pattern() -> None:
    config = {**TINY["qwen2-max-window-layers"].config,
              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    windows = [layer.mixer.window for layer in resolve(spec_of(config)).layers]  # type: ignore[union-attr]
    assert windows == [16, None, 16]


def test_rope_fields_and_both_spellings() -> None:
    llama = spec_of(TINY["llama-biased-tied-llama3rope"].config).position
    assert llama.kind == "rope" and llama.theta == 500000.0
    assert llama.scaling is not None and llama.scaling.kind == "llama3" and llama.scaling.original_max_positions == 64
    # transformers 5 writes rope_parameters instead of rope_theta/rope_scaling
    v5 = {k: v for k, v in TINY["llama-biased-tied-llama3rope"].config.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert spec_of(v5).position == llama
    assert spec_of(TINY["gpt_neox-parallel"].config).position.fraction == 0.25
    assert spec_of(TINY["phi"].config).position.fraction == 0.5
    assert spec_of(TINY["gptj"].config).position.fraction == 8 / 16
    deepseek = spec_of(TINY["deepseek_v2-lite"].config).position.scaling
    assert deepseek is not None and (deepseek.kind, deepseek.mscale) == ("yarn", 0.707)


def test_falcon_kv_heads_that_do_not_divide_name_falcons_field() -> None:
    error = refusal({**TINY["falcon-new-arch"].config, "num_kv_heads": 3})
    assert error.field == "num_kv_heads" and "4 query heads are not divisible by 3" in str(error)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 1.0}, {"type": "dynamic", "factor": 1},
                                     {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_scaling_by_a_factor_of_one_is_plain_rope(scaling: dict[str, Any]) -> None:
    """transformers takes these (the frequencies are RoPE's own); the spec's scaling needs a factor
    above 1, and the import refused them: it imports plain RoPE and says so."""
    config = {**TINY["llama-biased-tied-llama3rope"].config, "rope_scaling": scaling}
    imported = convert_config(config, file="config.json", name="t")
    assert imported.spec.position.kind == "rope" and imported.spec.position.scaling is None
    assert any("a factor of 1 changes no frequency" in note for note in imported.said)


@pytest.mark.parametrize(("model_type", "key"), [
    *((t, "num_key_value_heads") for t in ("mistral", "mixtral", "jamba", "gemma", "gemma2", "qwen2_moe",
                                           "qwen3_moe", "stablelm")),
    ("gptj", "rotary_dim"), ("deepseek_v2", "n_routed_experts"), ("deepseek_v2", "num_experts"),
    ("deepseek_v3", "n_routed_experts"),
])
def test_a_null_transformers_refuses_is_refused(model_type: str, key: str) -> None:
    """These configs are strict `int` fields in transformers 5.24 (qwen2_moe's takes the null, and
    its attention then fails to build): a null was read as MHA, the whole head or no experts, a
    model transformers never builds from the file. Llama's and Qwen2's configs turn that null into
    all heads, and are read so."""
    error = refusal({"model_type": model_type, key: None})
    assert error.field == key and "got null" in str(error) and "refuses a null" in str(error)
    for derived in ("llama", "qwen2"):
        spec = convert_config({"model_type": derived, "num_key_value_heads": None}, file="c.json", name="t").spec
        assert spec.attention.kind == "mha"


def test_a_folder_name_an_ascii_locale_could_not_decode_names_the_model(tmp_path: Path) -> None:
    """Under PYTHONUTF8=0 LC_ALL=C Python decodes a UTF-8 folder name to surrogate escapes: the
    spec's name refused them (a valid config exited 2), and messages showed `\\udce6`."""
    from archplan.errors import printable
    from archplan.importers.hf import model_name

    escaped = "hf 模型".encode().decode("ascii", "surrogateescape")
    assert model_name(tmp_path / escaped / "config.json") == "hf 模型" and printable(escaped) == "hf 模型"


def test_a_config_in_the_hugging_face_cache_is_named_after_its_repository(tmp_path: Path) -> None:
    """The cache's `snapshots/<revision>/config.json` is a link into `blobs/`: the name followed it
    and every cached model was called `blobs`."""
    from archplan.importers.hf import model_name

    repo = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "a1b2").write_text("{}")
    (repo / "snapshots" / "8cde5ca8").mkdir(parents=True)
    (repo / "snapshots" / "8cde5ca8" / "config.json").symlink_to("../../blobs/a1b2")
    assert model_name(repo / "snapshots" / "8cde5ca8" / "config.json") == "Meta-Llama-3-8B"
    link = tmp_path / "mine" / "config.json"
    link.parent.mkdir()
    link.symlink_to(repo / "blobs" / "a1b2")
    assert model_name(link) == "mine"


def test_a_file_name_the_spec_would_refuse_does_not_refuse_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A tab in a folder's name, or a 230-character file name, made a valid config exit 2 ("the
    config maps to an invalid spec: name: ..."): the name is not the config."""
    source = tmp_path / "tab\tdir" / "config.json"
    source.parent.mkdir()
    source.write_text((FIXTURES / "hf-configs" / "gpt2.json").read_text())
    escape = tmp_path / "m\x1bx" / "config.json"  # the path also goes into reference.source, as prose
    escape.parent.mkdir()
    escape.write_text(source.read_text())
    long = tmp_path / f"{'x' * 230}.json"
    long.write_text(source.read_text())
    for path, name in ((source.parent, "tab dir"), (escape.parent, "m x"), (long, "x" * 200)):
        code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(path), "--json")
        assert code == 0, err
        assert json.loads(out)["spec"]["name"] == name


def test_an_absent_kv_head_count_says_whose_default_it_read() -> None:
    """Without `num_key_value_heads` Gemma reads transformers' default, 16, which 8 query heads do
    not divide: the error named a 16 the file does not hold."""
    data = json.loads((FIXTURES / "hf-configs" / "gemma-2b.json").read_text())
    del data["num_key_value_heads"]
    error = refusal(data)
    assert error.field == "num_key_value_heads"
    assert str(error).endswith("not divisible by 16 key/value heads (absent: 16 is transformers' gemma default; "
                               "give num_key_value_heads)")


def test_a_spec_imported_from_an_undecodable_folder_name_loads(tmp_path: Path) -> None:
    """The name was cleaned but `reference.source` kept the escapes, which YAML cannot carry: `-o`
    wrote a spec that would not load ("invalid Unicode character escape code")."""
    from archplan.loader import load_spec
    from archplan.planning import spec_yaml

    escaped = "hf 模型".encode().decode("ascii", "surrogateescape")
    data = json.loads((FIXTURES / "hf-configs" / "gpt2.json").read_text())
    spec = convert_config(data, file=f"{tmp_path}/{escaped}/config.json", name="t").spec
    path = tmp_path / "out.yaml"
    path.write_text(spec_yaml(spec, ""), encoding="utf-8")
    assert "hf 模型/config.json" in load_spec(str(path)).reference.source


def test_a_head_dim_falcon_cannot_set_is_refused() -> None:
    """FalconConfig's head_dim is a read-only property: a config that sets it fails to load, and the
    key was reported ignored."""
    error = refusal({"model_type": "falcon", "head_dim": 64})
    assert error.field == "head_dim" and "read-only" in str(error)


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_a_null_head_dim_is_refused_where_the_attention_has_no_fallback(family: str) -> None:
    # Gemma's and Qwen3's attention read config.head_dim as is: null became hidden // heads, silently
    error = refusal({**TINY[family].config, "head_dim": None})
    assert error.field == "head_dim" and "got null" in str(error)


def test_yarn_truncate_is_carried() -> None:
    config = {**TINY["qwen3"].config, "max_position_embeddings": 256,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "truncate": False}}
    scaling = spec_of(config).position.scaling
    assert scaling is not None and (scaling.kind, scaling.truncate) == ("yarn", False)


@pytest.mark.parametrize(("mscale", "all_dim"), [(2.0, None), (2.0, 0.0), (0.0, 1.0)])
def test_yarn_mscale_without_mscale_all_dim_is_not_imported(mscale: float, all_dim: float | None) -> None:
    """transformers reads mscale only when it and mscale_all_dim are both nonzero (its gain is
    otherwise 0.1·ln(factor) + 1 whatever mscale says); the spec refuses mscale there, so the import
    leaves it out and says so, and the gain stays transformers'."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": mscale}
    config = {**TINY["qwen3"].config, "max_position_embeddings": 256,
              "rope_scaling": rope | ({} if all_dim is None else {"mscale_all_dim": all_dim})}
    imported = convert_config(config, file="config.json", name="t")
    scaling = imported.spec.position.scaling
    assert scaling is not None and scaling.mscale is None
    assert any("mscale: transformers reads it only when it and mscale_all_dim are both nonzero" in note
               for note in imported.said)


def test_dynamic_ntk_is_said_to_be_fixed_at_one_length() -> None:
    """transformers' dynamic scaling moves θ with the running length; the spec's ntk cannot, and the
    import says so (counts and FLOPs do not depend on θ)."""
    config = {**TINY["llama-biased-tied-llama3rope"].config,
              "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}
    imported = convert_config(config, file="config.json", name="t")
    scaling = imported.spec.position.scaling
    assert scaling is not None and scaling.kind == "ntk"
    assert any(note.startswith("dynamic NTK RoPE scaling") for note in imported.said)
    assert "dynamic NTK" in (imported.spec.reference.notes or "")


def test_gemma_scales_its_embedding_and_gemma2_its_scores_and_says_the_soft_caps_are_not_modelled() -> None:
    """GemmaModel multiplies the embedding by sqrt(D); Gemma2Attention scales the scores by
    query_pre_attn_scalar**-0.5 (Gemma-2-27B: 144 over heads of 128); the soft-caps, which the spec
    cannot say, are said on stderr and in the notes (the logits are checked against transformers in
    tests/test_modules_model.py)."""
    gemma = convert_config({"model_type": "gemma"}, file="config.json", name="g").spec
    assert gemma.embedding.scaled and not gemma.reference.notes
    config = {"model_type": "gemma2", "hidden_size": 4608, "num_attention_heads": 32, "num_key_value_heads": 16,
              "head_dim": 128, "query_pre_attn_scalar": 144}
    imported = convert_config(config, file="config.json", name="g2")
    assert imported.spec.embedding.scaled and imported.spec.attention.scale_dim == 144
    said = "attn_logit_softcapping 50, final_logit_softcapping 30: soft-capping"
    assert any(note.startswith(said) for note in imported.said) and said in imported.spec.reference.notes
    plain = convert_config({**config, "query_pre_attn_scalar": 128, "attn_logit_softcapping": None,
                            "final_logit_softcapping": None}, file="config.json", name="g2")
    assert plain.spec.attention.scale_dim is None and not plain.said


def test_falcons_new_architecture_says_transformers_caches_every_head() -> None:
    """FalconAttention broadcasts K and V to all heads before its cache: `size` reports the cache of
    the KV heads the weights have, and the import says transformers holds n_head / n_kv times it."""
    config = {"model_type": "falcon", "new_decoder_architecture": True, "hidden_size": 64,
              "num_attention_heads": 8, "num_kv_heads": 2}
    imported = convert_config(config, file="config.json", name="f")
    assert any("all 8 heads, 4x the cache" in note for note in imported.said)
    assert not convert_config({**config, "num_kv_heads": 8}, file="config.json", name="f").said


def test_attention_scalings_map_to_scale_dim_and_clamps_are_said() -> None:
    """MptAttention multiplies the scores by softmax_scale s (scale_dim 1/s²); GPT2Attention skips
    1/sqrt(head_dim) without scale_attn_weights (scale_dim 1). What the spec cannot say (clip_qkv's
    clamp, GPT-2's per-layer 1/(i + 1), Mamba-2's clamp of Δ) is said, never dropped; what
    transformers ignores and the original code honours (MPT's alibi_bias_max and logit_scale) is
    refused."""
    mpt = {"model_type": "mpt", "d_model": 256, "n_heads": 4, "n_layers": 2, "max_seq_len": 512, "vocab_size": 1000,
           "attn_config": {"softmax_scale": 0.5, "clip_qkv": 6.0}}
    imported = convert_config(mpt, file="config.json", name="m", strict=True)
    assert imported.spec.attention.scale_dim == 4
    assert [note.split(":")[0] for note in imported.said] == ["attn_config.clip_qkv 6"]
    for refused, field in (({"attn_config": {"alibi_bias_max": 16}}, "alibi_bias_max"),
                           ({"logit_scale": 0.25}, "logit_scale")):
        with pytest.raises(ArchplanError, match=field):
            convert_config({**mpt, **refused}, file="config.json", name="m")
    clamped = convert_config({"model_type": "mamba2", "time_step_limit": [0.0, 0.05]}, file="config.json", name="s")
    assert [note.split(":")[0] for note in clamped.said] == ["time_step_limit [0.0, 0.05]"]
    assert not convert_config({"model_type": "mamba2", "time_step_limit": [0.0, math.inf]}, file="config.json",
                              name="s").said
    plain = convert_config({**mpt, "attn_config": {"softmax_scale": None, "clip_qkv": None, "alibi_bias_max": 8}},
                           file="config.json", name="m", strict=True)
    assert plain.spec.attention.scale_dim is None and not plain.said
    gpt2 = convert_config({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100,
                           "scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
                          file="config.json", name="g", strict=True)
    assert gpt2.spec.attention.scale_dim == 1
    assert [note.split(":")[0] for note in gpt2.said] == ["scale_attn_by_inverse_layer_idx true"]
    for family in ("olmo", "olmoe"):
        clipped = convert_config({"model_type": family, "clip_qkv": 8.0}, file="config.json", name="o", strict=True)
        assert [note.split(":")[0] for note in clipped.said] == ["clip_qkv 8"]


def test_keys_that_change_nothing_transformers_runs_are_not_refused_and_one_that_does_is() -> None:
    """Gemma's use_bidirectional_attention: false is causal, as null is; a Qwen2-MoE with no sparse
    layer builds no shared expert, so its zero width is no obstacle; BLOOM's sliced path
    (slow_but_exact with pretraining_tp > 1) drops two biases Megatron-DeepSpeed adds: refused."""
    for family in ("gemma", "gemma2"):
        assert convert_config({"model_type": family, "use_bidirectional_attention": False}, file="config.json",
                              name="g", strict=True).spec.embedding.scaled
        with pytest.raises(ArchplanError, match="use_bidirectional_attention=true"):
            convert_config({"model_type": family, "use_bidirectional_attention": True}, file="config.json", name="g")
    dense = convert_config({"model_type": "qwen2_moe", "num_experts": 0, "shared_expert_intermediate_size": 0},
                           file="config.json", name="q")
    assert dense.spec.moe is None
    with pytest.raises(ArchplanError, match="slow_but_exact"):
        convert_config({"model_type": "bloom", "pretraining_tp": 2, "slow_but_exact": True}, file="config.json", name="b")
    assert convert_config({"model_type": "bloom", "pretraining_tp": 4, "slow_but_exact": False}, file="config.json",
                          name="b").spec.position.kind == "alibi"


@pytest.mark.parametrize(("config", "said"), [
    ({"model_type": "mamba2", "time_step_limit": 5}, "time_step_limit: expected [lo, hi], got 5"),
    ({"model_type": "mamba2", "time_step_limit": [0.0]}, "time_step_limit: expected [lo, hi], got [0.0]"),
    ({"model_type": "mpt", "attn_config": {"softmax_scale": 1e-200}}, "attn_config.softmax_scale: cannot express"),
    ({"model_type": "mpt", "attn_config": {"softmax_scale": 1e200}}, "attn_config.softmax_scale: cannot express"),
])
def test_a_malformed_scale_or_limit_is_one_line_naming_its_key(config: dict[str, Any], said: str) -> None:
    with pytest.raises(ArchplanError) as refused:
        convert_config(config, file="config.json", name="x")
    assert said in str(refused.value)


def test_a_written_out_default_scale_is_no_scale_dim_and_olmo_clamps_at_zero_too() -> None:
    """MPT's softmax_scale of 1/sqrt(head_dim) as a float states the default again; OLMo clamps
    whenever clip_qkv is not null, 0 included (MPT only when it is truthy)."""
    mpt = convert_config({"model_type": "mpt", "d_model": 1024, "n_heads": 8,
                          "attn_config": {"softmax_scale": 1 / math.sqrt(128)}}, file="config.json", name="m")
    assert mpt.spec.attention.scale_dim is None
    assert convert_config({"model_type": "olmo", "clip_qkv": 0}, file="config.json", name="o").said
    assert not convert_config({"model_type": "mpt", "attn_config": {"clip_qkv": 0}}, file="config.json",
                              name="m").said


def test_mistral_window_defaults_to_4096_when_absent() -> None:
    config = {k: v for k, v in TINY["mistral-window"].config.items() if k != "sliding_window"}
    attn = spec_of(config).attention
    assert attn is not None and attn.sliding_window == 4096


def test_falcon_7b_is_mqa_with_one_shared_norm() -> None:
    spec = import_hf(FIXTURES / "hf-configs" / "falcon-7b.json")
    assert spec.attention is not None and spec.attention.kind == "mqa"
    assert spec.residual.kind == "parallel" and spec.residual.shared_norm


def test_deepseek_v3_notes_the_unbuilt_mtp_module() -> None:
    spec = import_hf(FIXTURES / "hf-configs" / "deepseek-v3.json")
    assert spec.reference is not None and "num_nextn_predict_layers" in (spec.reference.notes or "")
    assert spec.moe is not None and spec.moe.router.score_correction_bias


def test_mtp_imports_the_declared_module_as_trained(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--mtp builds DeepSeek-V3's num_nextn_predict_layers modules: the deepseek-v3-mtp preset's
    count exactly; a config that declares none is a one-line error."""
    from archplan.analytic import count_params
    from archplan.importers.hf import read_hf
    from archplan.loader import load_spec
    from archplan.resolve import resolve
    from tests.test_bad_input import assert_one_line_error, run_main

    spec = read_hf(FIXTURES / "hf-configs" / "deepseek-v3.json", mtp=True).spec
    assert spec.mtp is not None and spec.mtp.depth == 1
    assert spec.reference is not None and "--mtp" in (spec.reference.notes or "")
    assert count_params(resolve(spec)).total == count_params(resolve(load_spec("deepseek-v3-mtp"))).total
    assert_one_line_error(run_main(["import", "hf", str(FIXTURES / "hf-configs" / "llama-3-8b.json"), "--mtp"],
                                   capsys, monkeypatch), "--mtp", "num_nextn_predict_layers")


def test_ignored_fields_are_quiet_and_change_nothing() -> None:
    noisy = {**TINY["olmo2"].config, "attention_dropout": 0.1, "initializer_range": 0.5, "bos_token_id": 7,
             "torch_dtype": "bfloat16", "use_cache": False, "transformers_version": "4.0",
             "architectures": ["Olmo2ForCausalLM"], "quantization_config": {"quant_method": "fp8"}}
    assert counts(noisy) == counts(TINY["olmo2"].config)
    # with ALiBi, FalconModel builds no rotary embedding: its RoPE keys describe nothing
    alibi = {**TINY["falcon-sequential-alibi"].config, "rope_theta": 10000.0}
    assert spec_of(alibi).position.kind == "alibi"


# ----------------------------------------------------------------------------------- refusals
def refusal(config: dict[str, Any]) -> ArchplanError:
    with pytest.raises(ArchplanError) as info:
        spec_of(config)
    return info.value


@pytest.mark.parametrize(("change", "field"), [
    ({"model_type": "t5"}, "model_type"),
    ({"model_type": 5}, "model_type"),  # "expected a string", not "no model_type"
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),  # the key the file has
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.9}}, "rope_scaling.attention_factor"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    # values the spec refuses once read (they once ended in pydantic's traceback)
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rope_theta": -5.0}, "rope_theta"),
    # transformers requires llama3's two factors; the spec's defaults would be a guess
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}},
     "rope_scaling.low_freq_factor"),
    # ... and every scaled type's factor: a null one read as absent ("factor: Field required")
    ({"rope_scaling": {"type": "linear", "factor": None}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
])
def test_llama_refusals_name_the_field(change: dict[str, Any], field: str) -> None:
    assert refusal({**TINY["llama-biased-tied-llama3rope"].config, **change}).field == field


@pytest.mark.parametrize(("change", "said"), [
    ({"hidden_act": None}, "expected a string, got null"),
    ({"tie_word_embeddings": "yes"}, 'expected true or false, got "yes"'),
    ({"hidden_size": [64]}, "expected an integer, got [64]"),
    ({"model_type": ["llama"]}, 'expected a string such as "llama", got ["llama"]'),
    ({"model_type": "llamaa"}, 'unsupported model_type "llamaa"'),
])
def test_refused_values_are_quoted_as_the_config_spells_them(change: dict[str, Any], said: str) -> None:
    """JSON's null, true and "strings", not Python's None, True and 'strings'."""
    assert said in refusal({**TINY["llama-biased-tied-llama3rope"].config, **change}).message


@pytest.mark.parametrize(("case", "change", "field"), [
    ("qwen2_moe-mlp-only", {"mlp_only_layers": [1]}, "mlp_only_layers"),  # experts on 0, 2, 3
    ("mpt", {"expansion_ratio": 3}, "expansion_ratio"),
    ("mpt", {"attn_config": {"alibi": False}}, "attn_config.alibi"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v2-lite", {"attention_bias": True}, "attention_bias"),
    ("mistral-window", {"attention_bias": True}, "attention_bias"),
    ("mamba2", {"num_heads": 4}, "num_heads"),
    ("mamba-auto-dt", {"expand": 1.5}, "expand"),
    ("phi3", {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "rope_scaling"),
    ("gpt2-n_inner", {"add_cross_attention": True}, "add_cross_attention"),
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("jamba", {"sliding_window": 16}, "sliding_window"),
    ("gpt2-n_inner", {"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
])
def test_family_refusals_name_the_field(case: str, change: dict[str, Any], field: str) -> None:
    err = refusal({**TINY[case].config, **change})
    assert err.field == field


@pytest.mark.parametrize("case", ["llama-biased-tied-llama3rope", "mixtral-window", "deepseek_v3", "jamba",
                                  "qwen2-max-window-layers", "stripedhyena", "gpt2-n_inner", "mpt"])
def test_a_layer_count_past_the_spec_limit_is_refused_before_its_layers_are_spelled(case: str) -> None:
    """10⁹ layers once built per-layer lists first (MemoryError, or minutes), 10³⁰ overflowed an
    index; every family refuses the count itself, naming its field."""
    config = TINY[case].config
    key = next(k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in config)
    for count in (MAX_LAYERS + 1, 10**9, 10**30):
        err = refusal({**config, key: count})
        assert err.field == key and f"expected at most {MAX_LAYERS:,} layers" in err.message


@pytest.mark.parametrize(("scaling_key", "scaling"), [
    ("rope_scaling", {"rope_type": ["llama3"]}), ("rope_scaling", {"type": {}}), ("rope_parameters", {"rope_type": []}),
])
def test_a_rope_type_that_is_not_a_string_is_refused(scaling_key: str, scaling: dict[str, Any]) -> None:
    config = {k: v for k, v in TINY["llama-biased-tied-llama3rope"].config.items() if k != "rope_scaling"}
    err = refusal({**config, scaling_key: scaling})
    assert err.field == f"{scaling_key}.{next(iter(scaling))}" and "expected a string, got" in err.message


def test_the_mixer_pattern_is_the_layers_smallest_period() -> None:
    """`compress_mixers` finds the shortest pattern Layout.mixers repeats into the layers, the
    period that need not divide the count; checked against trying every period."""
    def every_period(letters: list[str]) -> str:
        n = len(letters)
        return next("".join(letters[:p]) for p in range(1, n + 1)
                    if all(letters[i] == letters[i % p] for i in range(n)))

    rng = random.Random(0)
    for _ in range(2000):
        n, alphabet = rng.randint(1, 24), rng.choice(["AS", "AMH", "AAAS"])
        base = [rng.choice(alphabet) for _ in range(rng.randint(1, 5))]
        letters = [base[i % len(base)] for i in range(n)]
        if rng.random() < 0.3:
            letters[rng.randrange(n)] = rng.choice(alphabet)
        assert compress_mixers(letters) == every_period(letters), letters
    assert compress_mixers(list("ASASA")) == "AS" and compress_mixers(list("AAAS")) == "AAAS"


def test_a_block_the_spec_refuses_is_one_error_not_a_traceback() -> None:
    """A value no single reader checks (DeepSeek-V3's router scale) is refused by the spec's own
    validation, as the importer's error."""
    err = refusal({**TINY["deepseek_v3"].config, "routed_scaling_factor": -2.5})
    assert "maps to an invalid spec" in err.message and "(got -2.5)" in err.message


UNEVEN_HEADS = {  # model_type: (hidden key, heads key), as transformers 5.24 spells them in its config
    "llama": ("hidden_size", "num_attention_heads"), "gemma2": ("hidden_size", "num_attention_heads"),
    "gpt_neox": ("hidden_size", "num_attention_heads"), "deepseek_v2": ("hidden_size", "num_attention_heads"),
    "gpt2": ("n_embd", "n_head"), "gptj": ("n_embd", "n_head"), "falcon": ("hidden_size", "num_attention_heads"),
    "bloom": ("hidden_size", "n_head"), "stablelm": ("hidden_size", "num_attention_heads"),
    "mpt": ("d_model", "n_heads"),
}


@pytest.mark.parametrize("model_type", sorted(UNEVEN_HEADS))
def test_heads_that_split_the_hidden_size_unevenly_are_refused(model_type: str) -> None:
    # transformers refuses these (config validation or the attention's ValueError; MPT's first
    # forward cannot reshape); the importer had floored head_dim and sized a model that does not exist
    hidden, heads = UNEVEN_HEADS[model_type]
    entry = next(f for f in FAMILY_CONFIGS if f["model_type"] == model_type)
    config = {**entry["kwargs"], "model_type": model_type, hidden: 72, heads: 5}
    config = {k: v for k, v in config.items() if k not in ("num_key_value_heads", "num_kv_heads", "head_dim")}
    err = refusal(config)
    assert err.field == heads
    assert err.message.startswith(f"{hidden} (72) is not divisible by {heads} (5); transformers cannot build")


def test_uneven_heads_stay_accepted_where_transformers_builds_them() -> None:
    # Mistral: head_dim = hidden_size // num_attention_heads, q_proj 72 -> 5·14, as transformers builds
    config = {**TINY["mistral-window"].config, "hidden_size": 72, "num_attention_heads": 5,
              "num_key_value_heads": 5}
    config.pop("head_dim", None)
    attention = spec_of(config).attention
    assert attention is not None and attention.n_heads == 5 and attention.head_dim == 14


def test_phi_qk_layernorm_needs_the_even_head_dim() -> None:
    # PhiAttention sizes q/k LayerNorms hidden // heads whatever head_dim says: they cannot run
    err = refusal({**TINY["phi"].config, "qk_layernorm": True, "head_dim": 2 * TINY["phi"].config["hidden_size"]
                   // TINY["phi"].config["num_attention_heads"]})
    assert err.field == "head_dim" and "cannot express qk_layernorm" in err.message


def test_olmo_norms_have_no_parameters() -> None:
    spec = spec_of(TINY["olmo"].config)
    assert spec.norm.kind == "layernorm" and not spec.norm.affine and not spec.norm.has_bias


# ---------------------------------------------------------------------------------------- CLI
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["archplan", *args])
    with pytest.raises(SystemExit) as info:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def test_a_config_without_a_context_length_is_said_to_default(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """BLOOM's config names no length (ALiBi has no position table): the spec took 4,096 without a
    word, where the model trained at 2,048, and size's default sequence with it. Megatron-DeepSpeed's
    `seq_length`, where a config keeps it, is read."""
    path = FIXTURES / "hf-configs" / "bloom-560m.json"
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(path))
    assert code == 0 and "the config states no context length; max_seq_len is the spec's default, 4,096" in err
    data = {**json.loads(path.read_text()), "seq_length": 2048}
    (tmp_path / "config.json").write_text(json.dumps(data))
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path / "config.json"))
    assert code == 0 and "context length" not in err and "max_seq_len: 2048" in out
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(FIXTURES / "hf-configs" / "llama-2-7b.json"))
    assert code == 0 and "context length" not in err


def test_a_quantized_checkpoint_is_said_to_be_sized_by_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An AWQ config imported without a word: the spec counts the parameters, and the user is told
    where the 4-bit storage is priced."""
    data = {**json.loads((FIXTURES / "hf-configs" / "llama-2-7b.json").read_text()),
            "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path / "config.json"))
    assert code == 0 and "quantization_config (awq, 4-bit) describes the checkpoint's storage" in err
    spec = spec_from_data(parse_yaml(out, "stdout"), "stdout")
    assert spec.reference is not None and "int4-g128" in (spec.reference.notes or "")
    code, out, _ = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path / "config.json"), "--json")
    assert code == 0 and json.loads(out)["said"][0].startswith("quantization_config (awq, 4-bit)")
    assert spec == import_hf(FIXTURES / "hf-configs" / "llama-2-7b.json").model_copy(
        update={"name": spec.name, "reference": spec.reference})


def test_cli_stdout_yaml_loads_back_equal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = FIXTURES / "hf-configs" / "mixtral-8x7b-v0.1.json"
    code, out, _ = run_cli(capsys, monkeypatch, "import", "hf", str(path))
    assert code == 0
    # absolute: the YAML printed may be saved in any folder (`> elsewhere/spec.yaml`)
    schema = Path(out.splitlines()[0].removeprefix("# yaml-language-server: $schema="))
    assert schema.is_absolute() and schema.is_file() and schema.name == "spec.schema.json"
    spec = spec_from_data(parse_yaml(out, "stdout"), "stdout")
    assert spec == import_hf(path)
    assert spec.reference is not None and str(path) in spec.reference.source


def test_cli_folder_and_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "Tiny-Qwen3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY["qwen3"].config))
    out = tmp_path / "spec.yaml"
    assert run_cli(capsys, monkeypatch, "import", "hf", str(model), "-o", str(out))[0] == 0
    spec = load_spec(out)
    assert spec.name == "Tiny-Qwen3"
    assert count_params(resolve(spec)).total == TINY["qwen3"].total
    code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(model), "-o", str(out))
    assert code == 2 and "--force" in err
    assert run_cli(capsys, monkeypatch, "import", "hf", str(model), "-o", str(out), "--force")[0] == 0


def test_cli_output_through_a_link_loop_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    for force in ((), ("--force",)):
        code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(FIXTURES / "hf-configs" / "gpt2.json"),
                               "-o", str(tmp_path / "a.yaml"), *force)
        assert code == 2
        assert err == f"archplan: error: {tmp_path / 'a.yaml'}: -o/--output: cannot write: Too many levels of symbolic links\n"
    assert (tmp_path / "a.yaml").is_symlink() and (tmp_path / "b.yaml").is_symlink()


def test_cli_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_cli(capsys, monkeypatch, "import", "hf", str(FIXTURES / "hf-configs" / "gpt2.json"), "--json")
    assert code == 0
    assert json.loads(out)["spec"]["position"] == {"kind": "learned"}


def test_cli_invalid_json_names_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}\n')
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(bad))
    assert code == 2 and out == ""
    assert f"{bad}:3:21: invalid JSON" in err  # the second comma
    assert len(err.strip().splitlines()) == 1


def test_cli_refuses_a_repeated_key_and_reads_a_byte_order_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """json keeps the last of two equal keys without a word (a config with two hidden_size imported
    the second); the YAML loader refuses them, and so does import now. A UTF-8 byte-order mark is
    read, as the YAML loader reads it."""
    config = json.loads((FIXTURES / "hf-configs" / "gpt2.json").read_text())
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps(config)[:-1] + ', "n_embd": 64}')
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(twice))
    assert code == 2 and out == "" and "'n_embd' appears twice" in err and len(err.strip().splitlines()) == 1
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())
    code, out, _ = run_cli(capsys, monkeypatch, "import", "hf", str(marked), "--json")
    assert code == 0 and json.loads(out)["spec"]["position"] == {"kind": "learned"}


@pytest.mark.parametrize(("content", "needle"), [
    ('[1, 2]', "JSON object"),
    ('{"vocab_size": 10}', "model_type"),
])
def test_cli_bad_configs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                content: str, needle: str) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(content)
    code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path))
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["device", "fifo", "folder-with-fifo"])
def test_cli_a_device_or_pipe_is_refused_unread(tmp_path: Path, kind: str) -> None:
    # /dev/zero reports size 0 and was read until memory ran out; a FIFO blocks its reader
    # (in a subprocess, so a regression times out instead of hanging the suite)
    if kind == "device":
        given = shown = "/dev/zero"
        if not Path(given).exists():
            pytest.skip("no /dev/zero here")
    else:
        os.mkfifo(tmp_path / "config.json")
        given = str(tmp_path if kind == "folder-with-fifo" else tmp_path / "config.json")
        shown = str(tmp_path / "config.json")
    proc = subprocess.run([sys.executable, "-m", "archplan.cli", "import", "hf", given],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"archplan: error: {shown}: not a regular file or folder\n"


def test_cli_a_config_json_that_is_a_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A model folder whose config.json is itself a folder was "not a regular file or folder"."""
    (tmp_path / "config.json").mkdir()
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path))
    assert code == 2 and out == ""
    assert err == f"archplan: error: {tmp_path / 'config.json'}: a folder, where the config's JSON file was expected\n"


def test_cli_uneven_heads_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 770, "n_head": 12}))
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(config))
    assert code == 2 and out == ""
    assert err == (f"archplan: error: {config}: n_head: n_embd (770) is not divisible by n_head (12); "
                   "transformers cannot build (or run) a gpt2 model whose heads split the hidden size unevenly\n")


def test_cli_missing_folder_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(tmp_path))
    assert code == 2 and "no config.json" in err


def test_written_yaml_round_trips_every_config() -> None:
    specs = [import_hf(path) for path in sorted((FIXTURES / "hf-configs").glob("*.json"))]
    specs += [spec_of(case.config) for case in (*TINY.values(), *TYPICAL.values())]
    for spec in specs:
        assert spec_from_data(parse_yaml(spec_yaml(spec, "header"), "t"), "t") == spec, spec.name


def test_import_does_not_load_torch() -> None:
    code = ("import sys, archplan.cli; from archplan.importers.hf import import_hf; "
            f"import_hf({str(FIXTURES / 'hf-configs' / 'jamba-v0.1.json')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------- the key policy
FAMILY_CONFIGS = json.loads((FIXTURES / "hf_families.json").read_text())["families"]
# Real Hub config.json files with legacy keys (output_past, n_ctx, d_inner, d_model, ssm_cfg...), and
# their parameter counts (transformers' `model.parameters()`, the tied head counted once).
HUB_LEGACY = {"gpt2-xl.json": 1_557_611_200, "mamba-130m-hf.json": 129_135_360}


def transformers_counts(transformers: Any, hf_config: Any) -> tuple[int, int]:
    """Total and active parameters of the model transformers builds on meta. Active: minus the
    (E - top_k) unused experts of each routed-expert tensor (leading dim E), as expected.json."""
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    top_k = getattr(hf_config, "num_experts_per_tok", None)
    inactive = sum((p.shape[0] - top_k) * (p.numel() // p.shape[0])
                   for name, p in model.named_parameters() if ".experts." in name and top_k)
    return total, total - inactive


# Families whose modeling code is Hub remote code, not part of transformers: AutoConfig cannot write
# their config; tests/test_import_stripedhyena.py checks them against the reference implementation.
REMOTE_CODE = {"stripedhyena"}


def test_family_list_covers_every_registered_model_type() -> None:
    assert sorted(f["model_type"] for f in FAMILY_CONFIGS) == sorted(set(FAMILIES) - REMOTE_CODE)


@pytest.mark.parametrize("entry", FAMILY_CONFIGS, ids=[f["model_type"] for f in FAMILY_CONFIGS])
def test_configs_transformers_writes_import_and_size_exactly(entry: dict[str, Any], tmp_path: Path) -> None:
    """The config.json transformers 5 writes (every key, defaults included) imports with no key
    left unaccounted for, and sizes exactly as the model transformers builds from it."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(entry["model_type"], **copy.deepcopy(entry["kwargs"]))
    hf_config.to_json_file(tmp_path / "config.json", use_diff=False)
    imported = read_hf(tmp_path, strict=True)
    assert imported.ignored == ()
    pc = count_params(resolve(imported.spec))
    assert (pc.total, pc.active) == transformers_counts(transformers, hf_config)


# DeepseekV2Config's default num_experts_per_tok is None: 64 experts and no top-k, which
# transformers' router cannot route either (topk(k=None)); the importer refuses it by name.
REFUSED_DEFAULTS = {"deepseek_v2": "num_experts_per_tok"}


@pytest.mark.parametrize("model_type", sorted(set(FAMILIES) - REMOTE_CODE))
def test_default_configs_transformers_writes_import_and_size_exactly(model_type: str) -> None:
    """Each family's full-size default config (no kwargs: Llama-7B, DeepSeek-V3 671B, ...), built
    by transformers on meta."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(model_type)
    data = json.loads(hf_config.to_json_string(use_diff=False))
    if model_type in REFUSED_DEFAULTS:
        assert refusal(data).field == REFUSED_DEFAULTS[model_type]
        return
    imported = convert_config(data, file="config.json", name=model_type, strict=True)
    assert imported.ignored == ()
    pc = count_params(resolve(imported.spec))
    assert (pc.total, pc.active) == transformers_counts(transformers, hf_config)


@pytest.mark.parametrize("name", sorted(HUB_LEGACY))
def test_hub_configs_with_legacy_keys_import_exactly(name: str) -> None:
    imported = read_hf(FIXTURES / "hf-configs" / name, strict=True)
    assert imported.ignored == ()
    assert count_params(resolve(imported.spec)).total == HUB_LEGACY[name]


@pytest.mark.parametrize("name", sorted(HUB_LEGACY))
def test_hub_legacy_counts_are_transformers_counts(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    data = json.loads((FIXTURES / "hf-configs" / name).read_text())
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    assert transformers_counts(transformers, hf_config)[0] == HUB_LEGACY[name]


def test_unknown_keys_are_reported_not_guessed() -> None:
    base = TINY["llama-biased-tied-llama3rope"].config
    imported = convert_config({**base, "flux_capacitor": 1, "another": "x"}, file="c.json", name="t")
    assert imported.ignored == ("another", "flux_capacitor")
    assert count_params(resolve(imported.spec)) == count_params(resolve(spec_of(base)))
    assert imported.spec.reference is not None and "flux_capacitor" in (imported.spec.reference.notes or "")
    with pytest.raises(ArchplanError) as info:
        convert_config({**base, "flux_capacitor": 1, "another": "x"}, file="c.json", name="t", strict=True)
    assert info.value.field == "another, flux_capacitor"
    # inside MPT's attn_config sub-config too
    mpt = {**TINY["mpt"].config, "attn_config": {"alibi": True, "new_knob": 3, "model_type": ""}}
    assert convert_config(mpt, file="c.json", name="t").ignored == ("attn_config.new_knob",)


@pytest.mark.parametrize(("case", "change", "field"), [
    ("mamba-auto-dt", {"d_inner": 100}, "d_inner"),  # must be expand · hidden_size
    ("mamba-auto-dt", {"intermediate_size": 100}, "intermediate_size"),
    ("mamba-auto-dt", {"d_model": 32}, "d_model"),
    ("mamba2", {"n_layer": 7}, "n_layer"),
    ("mamba2", {"expand": 0}, "expand"),  # "must be positive", not "non-integer"
    ("deepseek_v3", {"qk_head_dim": 100}, "qk_head_dim"),  # must be qk_nope_head_dim + qk_rope_head_dim
    ("gpt2-n_inner", {"n_ctx": 512}, "n_ctx"),  # must be n_positions
    ("gemma2", {"sliding_window_size": 8}, "sliding_window_size"),
])
def test_derived_keys_must_agree(case: str, change: dict[str, Any], field: str) -> None:
    assert refusal({**TINY[case].config, **change}).field == field


def test_falcon_s_legacy_layer_and_head_keys_are_read_as_transformers_5_reads_them() -> None:
    """RefinedWeb configs' n_layer / n_head: transformers 5's FalconConfig ignores them (it built 32
    layers of 71 heads where archplan read 24), so alone they are refused; beside the new names,
    equal they are silent and different they are reported ignored, as transformers ignores them."""
    base = TINY["falcon-new-arch"].config
    bare = {k: v for k, v in base.items() if k not in ("num_hidden_layers", "num_attention_heads")}
    assert refusal({**bare, "n_layer": 2, "num_attention_heads": 4}).field == "n_layer"
    assert "no longer reads n_head" in str(refusal({**bare, "n_head": 4, "num_hidden_layers": 2}))
    same = convert_config({**base, "n_layer": 2, "n_head": 4}, file="c.json", name="t")
    assert same.ignored == () and counts({**base, "n_layer": 2}) == counts(base)
    other = convert_config({**base, "n_layer": 7}, file="c.json", name="t")
    assert other.ignored == ("n_layer",) and count_params(resolve(other.spec)).total == counts(base)[0]
    # n_head_kv: K/V heads are read only under the new decoder architecture
    assert base["new_decoder_architecture"] is True and "num_kv_heads" in base
    kv = {k: v for k, v in base.items() if k != "num_kv_heads"}
    assert refusal({**kv, "n_head_kv": base["num_kv_heads"]}).field == "n_head_kv"
    assert convert_config({**base, "n_head_kv": base["num_kv_heads"]}, file="c.json", name="t").ignored == ()
    old_arch = {**kv, "new_decoder_architecture": False, "n_head_kv": 2}
    assert convert_config(old_arch, file="c.json", name="t").ignored == ("n_head_kv",)


def test_mamba_s_intermediate_size_is_the_width_transformers_builds() -> None:
    """MambaConfig builds the file's intermediate_size (expand only where it is absent): 4·hidden
    beside expand 2 was refused as contradicting expand · hidden_size; it is read, the stray expand
    reported ignored, and the count is transformers' own."""
    transformers = pytest.importorskip("transformers")
    config = {"model_type": "mamba", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "vocab_size": 128, "state_size": 8, "expand": 2}
    imported = convert_config(config, file="c.json", name="t")
    assert imported.ignored == ("expand",)
    data = dict(config)
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    assert counts(config) == transformers_counts(transformers, hf_config)
    assert refusal({**config, "intermediate_size": 100}).field == "intermediate_size"


@pytest.mark.parametrize("layers", [{"attn_layer_period": 1, "attn_layer_offset": 0},  # attention only
                                    {"attn_layer_period": 8, "attn_layer_offset": 4},  # Mamba only (4 layers)
                                    {"attn_layer_period": 1, "attn_layer_offset": 0, "num_experts": 1}])
def test_a_jamba_with_one_kind_of_mixer_is_what_transformers_builds(layers: dict[str, int]) -> None:
    """A period that puts attention on every layer, or on none, is a Jamba transformers builds (it
    was refused): the spec has that one mixer, and the other kind's keys are accounted for."""
    transformers = pytest.importorskip("transformers")
    config = {**TINY["jamba"].config, **layers}
    imported = convert_config(copy.deepcopy(config), file="config.json", name="jamba", strict=True)
    assert imported.ignored == ()
    only_attention = layers["attn_layer_period"] == 1
    assert (imported.spec.ssm is None, imported.spec.attention is None) == (only_attention, not only_attention)
    data = dict(config)
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    assert counts(config) == transformers_counts(transformers, hf_config)


@pytest.mark.parametrize(("case", "key"), [("deepseek_v2-lite", "first_k_dense_replace"),
                                         ("deepseek_v3", "first_k_dense_replace"),
                                         ("qwen2_moe-sparse-step", "decoder_sparse_step"),
                                         ("qwen3_moe", "mlp_only_layers")])
def test_a_moe_config_whose_layers_are_all_dense_is_dense_under_strict(case: str, key: str) -> None:
    """No layer gets experts (DeepSeek's first_k_dense_replace ≥ the layers, Qwen's sparse step past
    them or every layer MLP-only): the MoE keys size nothing (they were reported ignored, which
    --strict refused)."""
    transformers = pytest.importorskip("transformers")
    n = TINY[case].config["num_hidden_layers"]
    config = {**TINY[case].config, key: list(range(n)) if key == "mlp_only_layers" else n + 1}
    imported = convert_config(copy.deepcopy(config), file="config.json", name=case, strict=True)
    assert imported.ignored == () and imported.spec.moe is None
    data = dict(config)
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    assert counts(config) == transformers_counts(transformers, hf_config)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' width-0 MLP
@pytest.mark.parametrize("case", ["deepseek_v2-lite", "deepseek_v3"])
def test_deepseek_without_shared_experts_is_transformers_zero_width_mlp(case: str) -> None:
    """n_shared_experts 0: transformers builds a shared MLP of width 0, no parameters and a zero
    output, which is a MoE layer without shared experts (it was refused)."""
    transformers = pytest.importorskip("transformers")
    config = {**TINY[case].config, "n_shared_experts": 0}
    spec = spec_of(config)
    assert spec.moe is not None and spec.moe.shared is None
    data = dict(config)
    hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    assert counts(config) == transformers_counts(transformers, hf_config)


@pytest.mark.parametrize(("case", "key"), [("falcon-new-arch", "apply_residual_connection_post_layernorm"),
                                         ("deepseek_v3", "mlp_bias")])
def test_keys_this_transformers_never_reads_are_reported_not_refused(case: str, key: str) -> None:
    """transformers 5's Falcon never reads apply_residual_connection_post_layernorm, nor DeepseekV3
    mlp_bias: true builds the same model, so it is reported ignored (it was refused as a residual
    or a bias archplan cannot express); false is accounted for."""
    base = TINY[case].config
    flipped = convert_config({**base, key: True}, file="c.json", name="t")
    assert flipped.ignored == (key,) and count_params(resolve(flipped.spec)).total == counts(base)[0]
    assert convert_config({**base, key: False}, file="c.json", name="t").ignored == ()


def test_consistent_derived_keys_and_unused_windows_are_accepted() -> None:
    mamba = TINY["mamba-auto-dt"].config
    d, expand = mamba["hidden_size"], mamba.get("expand", 2)
    assert counts({**mamba, "d_inner": expand * d, "d_model": d}) == counts(mamba)
    ds = TINY["deepseek_v3"].config
    assert counts({**ds, "qk_head_dim": ds["qk_nope_head_dim"] + ds["qk_rope_head_dim"]}) == counts(ds)
    # Qwen2MoeConfig writes sliding_window 0 when use_sliding_window is false
    qwen = {**TINY["qwen2_moe-sparse-step"].config, "use_sliding_window": False, "sliding_window": 0}
    assert counts(qwen) == counts(TINY["qwen2_moe-sparse-step"].config)
    assert spec_of(qwen).attention.sliding_window is None  # type: ignore[union-attr]


def test_deepseek_routing_and_balance_keys_are_read() -> None:
    v3 = {**TINY["deepseek_v3"].config, "n_group": 2, "topk_group": 1, "aux_loss_alpha": 0.003, "seq_aux": True}
    moe = spec_of(v3).moe
    assert moe is not None
    assert (moe.router.n_group, moe.router.topk_group, moe.router.group_score) == (2, 1, "top2_sum")
    assert (moe.aux_loss_coef, moe.aux_loss_scope) == (0.003, "sequence")
    assert spec_of({**v3, "seq_aux": False}).moe.aux_loss_scope == "batch"  # type: ignore[union-attr]
    v2 = {**TINY["deepseek_v2-lite"].config, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}
    router = spec_of(v2).moe.router  # type: ignore[union-attr]
    assert (router.n_group, router.topk_group, router.group_score) == (2, 1, "max")
    greedy = spec_of({**v2, "topk_method": "greedy"}).moe.router  # type: ignore[union-attr]
    assert greedy.n_group is None  # DeepseekV2TopkRouter reads the groups only when grouping
    assert refusal({**v2, "n_group": 3}).field == "n_group"  # 4 experts in 3 groups
    assert refusal({**v2, "topk_method": "noaux_tc"}).field == "topk_method"
    assert refusal({**v2, "norm_topk_prob": True}).field == "norm_topk_prob"


def test_cli_reports_ignored_keys_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY["qwen3"].config, "flux_capacitor": 1, "warp": 2}))
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(config))
    assert code == 0 and out.startswith("# yaml-language-server")
    assert err.strip() == f"{config}: ignored keys (not read by the importer; --strict refuses them): flux_capacitor, warp"
    code, out, _ = run_cli(capsys, monkeypatch, "import", "hf", str(config), "--json")
    assert code == 0 and json.loads(out)["ignored"] == ["flux_capacitor", "warp"]
    code, out, err = run_cli(capsys, monkeypatch, "import", "hf", str(config), "--strict")
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "flux_capacitor, warp" in err


def test_a_key_with_a_line_break_keeps_the_report_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A config key "bad\\nkey" split the ignored-keys line and --strict's error over two lines."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY["qwen3"].config, "bad\nkey": 1}))
    code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(config))
    assert code == 0 and err.strip().endswith("--strict refuses them): 'bad\\nkey'") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, monkeypatch, "import", "hf", str(config), "--strict")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'bad\\nkey': not read by the qwen3 importer" in err

def test_yaml_to_a_stream_without_unicode_round_trips(tmp_path: Path) -> None:
    """On an ASCII stdout `archplan import hf CONFIG > spec.yaml` escapes what it cannot write
    (`"gemma-\\xE9"`) rather than write `?` in a name, which would load back as another spec."""
    config = tmp_path / "gemma-é.json"
    config.write_text((FIXTURES / "hf-configs" / "gemma-2b.json").read_text())
    done = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "import", "hf", str(config)],
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    written = tmp_path / "spec.yaml"
    written.write_bytes(done.stdout)
    assert load_spec(written).name == "gemma-é"


def test_an_empty_config_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Path("") is the current folder: `import hf "$UNSET"` imported whatever config.json was there."""
    (tmp_path / "config.json").write_text((FIXTURES / "hf-configs" / "gpt2.json").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArchplanError, match="CONFIG: an empty path"):
        read_hf("")


@pytest.mark.parametrize("strict", [False, True])
def test_rope_scaling_without_a_type_is_not_dropped_unsaid(strict: bool) -> None:
    """`{"factor": 4}` with no rope_type is plain RoPE to transformers, which warns of `factor`: the
    import reports it ignored, and --strict refuses it."""
    data = json.loads((FIXTURES / "hf-configs" / "llama-3-8b.json").read_text())
    data["rope_scaling"] = {"factor": 4}
    if strict:
        with pytest.raises(ArchplanError, match="rope_scaling.factor"):
            convert_config(data, file="config.json", name="x", strict=True)
    else:
        imported = convert_config(data, file="config.json", name="x")
        assert "rope_scaling.factor" in imported.ignored
        assert imported.spec.position.scaling is None  # type: ignore[union-attr]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0, "foo": 1},
                                     {"rope_type": "linear", "factor": 2.0, "beta_fast": 32},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "bar": 2}],
                         ids=["unknown", "another-types-key", "llama3-unknown"])
def test_a_key_a_scaled_rope_does_not_read_is_reported_not_refused(strict: bool, scaling: dict[str, Any]) -> None:
    """transformers warns of a key outside the rope type's and builds the same model: the import
    reports it ignored and keeps the scaling (--strict refuses it), as for unknown top-level keys.
    A key transformers reads that the spec cannot say (YaRN's attention_factor) is still refused."""
    data = json.loads((FIXTURES / "hf-configs" / "llama-3-8b.json").read_text())
    data["rope_scaling"] = scaling
    extra = next(k for k in scaling if k in {"foo", "beta_fast", "bar"})
    if strict:
        with pytest.raises(ArchplanError, match=f"rope_scaling.{extra}"):
            convert_config(data, file="config.json", name="x", strict=True)
        return
    imported = convert_config(data, file="config.json", name="x")
    assert f"rope_scaling.{extra}" in imported.ignored
    without = convert_config({**data, "rope_scaling": {k: v for k, v in scaling.items() if k != extra}},
                             file="config.json", name="x")
    assert imported.spec.position == without.spec.position  # type: ignore[union-attr]
    assert imported.spec.position.scaling is not None  # type: ignore[union-attr]


# ------------------------------------------------------------------ RoPE keys as each family reads them
def _imported(config: dict[str, Any], strict: bool = False):  # noqa: ANN202 - importers.Imported
    return convert_config(config, file="config.json", name="t", strict=strict)


def test_gemma2_reads_gelu_as_exact_gelu() -> None:
    """Only GemmaConfig maps the legacy "gelu" to the tanh form; Gemma2MLP runs ACT2FN["gelu"]."""
    assert spec_of({**TINY["gemma2"].config, "hidden_activation": "gelu"}).ffn.activation == "gelu"
    assert spec_of({**TINY["gemma"].config, "hidden_act": "gelu"}).ffn.activation == "gelu_tanh"


def test_gptj_rotates_at_theta_10000_whatever_the_rope_keys_say() -> None:
    """create_sinusoidal_positions hard-codes θ 10,000 over rotary_dim: rope_theta, rope_scaling and
    partial_rotary_factor were applied (θ 500,000, a linear scaling, a fraction of 0.25 for a
    rotary_dim of half the head); they are reported ignored."""
    config = {**TINY["gptj"].config, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
              "partial_rotary_factor": 0.25}
    imported = _imported(config)
    position = imported.spec.position
    assert (position.theta, position.fraction, position.scaling) == (10000.0, 0.5, None)
    assert {"rope_theta", "rope_scaling", "partial_rotary_factor"} <= set(imported.ignored)


def test_gpt_neox_fills_its_rope_from_its_own_names_first() -> None:
    """GPTNeoXConfig sets rope_parameters' θ from rotary_emb_base (else 10,000) and its fraction from
    rotary_pct (else 0.25) before the top-level keys could: those are never read (reported);
    inside rope_parameters they count."""
    base = TINY["gpt_neox-parallel"].config
    top = _imported({**base, "rope_theta": 500000.0, "partial_rotary_factor": 1.0})
    assert (top.spec.position.theta, top.spec.position.fraction) == (10000.0, 0.25)
    assert {"rope_theta", "partial_rotary_factor"} <= set(top.ignored)
    both = spec_of({**base, "rotary_pct": 0.25, "partial_rotary_factor": 0.5}).position
    assert both.fraction == 0.25
    nested = spec_of({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0,
                                                  "partial_rotary_factor": 0.5}}).position
    assert (nested.theta, nested.fraction) == (50000.0, 0.5)
    # a refused θ is named by the key it came from
    assert refusal({**base, "rotary_emb_base": 0.5}).field.startswith("rotary_emb_base")


def test_partial_rotary_factor_counts_only_where_the_family_reads_it() -> None:
    """Llama and its copies rotate whole heads (their default RoPE sizes the table by head_dim): the
    factor is reported ignored, and beside a scaled RoPE, whose initialiser does read it and whose
    forward then fails in transformers, refused. Phi, Phi-3 and StableLM read it."""
    llama = {k: v for k, v in TINY["llama-biased-tied-llama3rope"].config.items() if k != "rope_scaling"}
    plain = _imported({**llama, "partial_rotary_factor": 0.5})
    assert plain.spec.position.fraction == 1.0 and "partial_rotary_factor" in plain.ignored
    err = refusal({**llama, "partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert err.field == "partial_rotary_factor" and "rotates whole heads" in err.message
    # at 1.0 the scaled table is the whole head's, and transformers runs it: reported, not refused
    whole = _imported({**llama, "partial_rotary_factor": 1.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert whole.spec.position.fraction == 1.0 and "partial_rotary_factor" in whole.ignored
    assert spec_of({**TINY["phi3"].config, "partial_rotary_factor": 0.5}).position.fraction == 0.5
    assert spec_of({**TINY["phi"].config, "partial_rotary_factor": 0.75}).position.fraction == 0.75


def test_a_legacy_rope_scaling_replaces_rope_parameters_whole() -> None:
    """convert_rope_params_to_dict: rope_parameters = rope_scaling or rope_parameters, so beside a
    legacy dict θ comes from the top level or the default, not from the dict it replaced."""
    llama = {k: v for k, v in TINY["llama-biased-tied-llama3rope"].config.items() if k not in ("rope_scaling",
                                                                                              "rope_theta")}
    imported = _imported({**llama, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                          "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    position = imported.spec.position
    assert position.theta == 10000.0 and position.scaling is not None and position.scaling.kind == "linear"
    assert "rope_parameters" in imported.ignored


def test_phi3_takes_no_scaling_but_longrope() -> None:
    """Phi3Config's validation refuses every RoPE type but LongRoPE (which archplan cannot express)."""
    for kind in ("linear", "dynamic"):
        err = refusal({**TINY["phi3"].config, "rope_scaling": {"rope_type": kind, "factor": 2.0}})
        assert err.field == "rope_scaling" and "transformers refuses every type but LongRoPE" in err.message
    # beside a legacy rope_scaling, rope_parameters is never read: its type refuses nothing
    replaced = _imported({**TINY["phi3"].config, "rope_scaling": {"rope_type": "default", "rope_theta": 50000.0},
                          "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    assert replaced.spec.position.theta == 50000.0 and "rope_parameters" in replaced.ignored


def test_an_all_dense_qwen_moe_config_passes_strict() -> None:
    """A Qwen MoE config whose sparse step leaves no layer experts: its router keys size nothing and
    are accepted quietly, as its other expert keys are (--strict refused norm_topk_prob)."""
    config = {**TINY["qwen3_moe"].config, "decoder_sparse_step": 3, "norm_topk_prob": True,
              "router_aux_loss_coef": 0.01}
    config["num_hidden_layers"] = 2
    assert _imported(config, strict=True).spec.moe is None


@pytest.mark.parametrize(("change", "placement"), [
    ({"num_hidden_layers": 8, "first_k_dense_replace": 10}, "first_k_dense_replace: all 8 layers dense"),
])
def test_an_moe_config_with_no_expert_layer_is_said(change: dict[str, Any], placement: str) -> None:
    """A DeepSeek config whose experts land on no layer imported as a dense model without a word,
    its expert keys marked inert: a slip in first_k_dense_replace went unseen."""
    data = {**json.loads((FIXTURES / "hf-configs" / "deepseek-v3.json").read_text()), **change}
    imported = convert_config(data, file="config.json", name="t")
    assert imported.spec.moe is None
    assert any(note.startswith(f"no layer gets experts ({placement}), so num_experts_per_tok, n_shared_experts")
               for note in imported.said)
    plain = convert_config(json.loads((FIXTURES / "hf-configs" / "deepseek-v3.json").read_text()),
                           file="config.json", name="t")
    assert not any(note.startswith("no layer gets experts") for note in plain.said)


@pytest.mark.parametrize(("data", "reason"), [
    ({**TINY["qwen3_moe"].config, "num_experts": 0}, "num_experts 0: all 4 layers dense"),
    ({**json.loads((FIXTURES / "hf-configs" / "jamba-v0.1.json").read_text()), "num_experts": 1},
     "num_experts 1: all 32 layers dense"),
])
def test_the_expert_count_is_named_when_it_is_what_leaves_every_layer_dense(data: dict[str, Any], reason: str) -> None:
    """Qwen's experts need num_experts > 0 and Jamba's more than one: the note blamed the layers'
    placement (decoder_sparse_step, expert_layer_period), which was not the cause."""
    said = convert_config(data, file="config.json", name="t").said
    assert any(note.startswith(f"no layer gets experts ({reason})") for note in said), said


def test_the_mtp_module_left_out_is_said_on_stderr() -> None:
    """The checkpoint's 11.6 B multi-token-prediction module, which transformers does not build,
    was left out with a note in the spec's reference only: nothing on stderr or in --json's said."""
    data = json.loads((FIXTURES / "hf-configs" / "deepseek-v3.json").read_text())
    assert any(note.startswith("num_nextn_predict_layers: transformers does not build")
               for note in convert_config(data, file="config.json", name="t").said)
    assert not any(note.startswith("num_nextn_predict_layers")
                   for note in convert_config(data, file="config.json", name="t", mtp=True).said)


def test_router_aux_loss_coef_becomes_the_specs_coefficient_times_top_k() -> None:
    """transformers' load_balancing_loss_func counts each expert's tokens over T, the spec's loss over
    T·top_k: Mixtral's 0.02 balanced half as hard once imported, Qwen3's 0.001 an eighth. The
    imported coefficient times archplan's loss equals transformers' coefficient times its own."""
    transformers_moe = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    import torch

    from archplan.modules.moe import load_balancing_loss

    spec = import_hf(FIXTURES / "hf-configs" / "mixtral-8x7b-v0.1.json")
    preset = load_spec("mixtral-8x7b").moe
    assert spec.moe is not None and preset is not None
    assert spec.moe.aux_loss_coef == pytest.approx(0.02 * 2) == preset.aux_loss_coef
    torch.manual_seed(0)
    logits = torch.randn(64, 8)
    scores = logits.softmax(-1)
    experts = scores.topk(2, dim=-1).indices
    ours = load_balancing_loss(scores, experts, 1, spec.moe.aux_loss_coef)
    theirs = 0.02 * transformers_moe.load_balancing_loss_func((logits,), 8, 2)
    torch.testing.assert_close(ours, theirs)
