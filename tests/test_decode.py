"""Incremental decoding with the real caches equals the full forward; cache bytes equal the contract.

docs/architecture.md, "Cache contract": K/V (B, Hkv, L, Dh) with L = max_len or min(window,
max_len); MLA (B, L, kv_lora_rank) + (B, L, qk_rope_head_dim); Mamba constant states.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from strategies import Case, cases

from archplan.analytic import decode_flops
from archplan.bench.runner import counted_decode_flops
from archplan.errors import ArchplanError
from archplan.modules.cache import KVState, LatentState
from archplan.modules.model import ArchplanModel, build_model
from archplan.modules.positions import apply_rotary
from archplan.resolve import AttentionPlan, Mamba1Plan, Mamba2Plan, MLAPlan, resolve
from archplan.spec import Spec

VOCAB = 61


def spec(**overrides: Any) -> Spec:
    base: dict[str, Any] = dict(
        name="decode", vocab_size=VOCAB, d_model=32, n_layers=2, max_seq_len=64,
        attention=dict(kind="gqa", n_heads=4, n_kv_heads=2), ffn=dict(kind="glu", d_ff=48),
    )
    base.update(overrides)
    return Spec.model_validate(base)


MLA_ATTN = dict(kind="mla", n_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=5)

VARIANTS: dict[str, dict[str, Any]] = {
    "gqa_rope": {},
    "mha_alibi_bias": dict(position=dict(kind="alibi"),
                           attention=dict(kind="mha", n_heads=4, qkv_bias=True, out_bias=True)),
    "mqa_learned_tied": dict(position=dict(kind="learned"), embedding=dict(tied=True),
                             attention=dict(kind="mqa", n_heads=4)),
    "sinusoidal_parallel": dict(position=dict(kind="sinusoidal"), residual=dict(kind="parallel")),
    "window_rolling": dict(attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, sliding_window=3),
                           layout=dict(mixers="SA")),
    "window_alibi": dict(position=dict(kind="alibi"), layout=dict(mixers="S"),
                         attention=dict(kind="mha", n_heads=6, head_dim=8, sliding_window=4)),
    "partial_rope_qk_norm": dict(
        position=dict(kind="rope", fraction=0.5, scaling=dict(kind="llama3", factor=4.0, original_max_positions=16)),
        attention=dict(kind="gqa", n_heads=4, n_kv_heads=1, head_dim=12, qk_norm=dict(scope="full"))),
    "mla": dict(attention=MLA_ATTN, norm=dict(kind="rmsnorm", eps=1e-6)),
    "mla_plain_q_yarn": dict(
        attention={**MLA_ATTN, "q_lora_rank": None},
        position=dict(kind="rope", scaling=dict(kind="yarn", factor=4.0, original_max_positions=16,
                                                mscale=1.0, mscale_all_dim=1.0))),
    "mla_window": dict(attention={**MLA_ATTN, "sliding_window": 3}, layout=dict(mixers="AS")),
    "jamba_like": dict(
        n_layers=4, position=dict(kind="none"), layout=dict(mixers="MAMM", moe_every=2, moe_offset=1),
        ssm=dict(kind="mamba1", d_state=8, d_conv=4, inner_norms=True),
        moe=dict(n_experts=4, top_k=2, expert=dict(kind="glu", d_ff=16))),
    "mamba1_only": dict(attention=None, ffn=None, layout=dict(mixers="M"),
                        ssm=dict(kind="mamba1", d_state=8, d_conv=3, dt_rank=5, conv_bias=False, proj_bias=True)),
    "mamba2_hybrid": dict(
        n_layers=3, layout=dict(mixers="MSM"), norm=dict(kind="layernorm"),
        attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, sliding_window=3),
        ssm=dict(kind="mamba2", d_state=8, d_conv=4, head_dim=8, n_groups=2, chunk_size=3)),
    "mamba2_only": dict(attention=None, ffn=None, layout=dict(mixers="M"), residual=dict(kind="sandwich"),
                        ssm=dict(kind="mamba2", d_state=4, d_conv=2, head_dim=16, chunk_size=2, proj_bias=True)),
    "moe": dict(n_layers=3, moe=dict(n_experts=4, top_k=2, expert=dict(kind="glu", d_ff=16),
                                     shared=dict(n=1, d_ff=16)), layout=dict(first_dense=1)),
}

SCHEDULES = {"prefill_then_steps": [5, 1, 1, 1, 1, 1], "chunks": [2, 4, 1, 3]}


def decode(model: ArchplanModel, tokens_BT: torch.Tensor, schedule: list[int], max_len: int) -> torch.Tensor:
    cache = model.new_cache(tokens_BT.shape[0], max_len)
    outs, start = [], 0
    for n in schedule:
        outs.append(model(tokens_BT[:, start : start + n], cache=cache))
        start += n
    assert cache.seen == start
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decoding_equals_full_forward(variant: str, schedule: str) -> None:
    torch.manual_seed(0)
    model = build_model(spec(**VARIANTS[variant]), device="cpu").eval()
    steps = SCHEDULES[schedule]
    tokens = torch.randint(0, VOCAB, (2, sum(steps)))
    with torch.no_grad():
        full = model(tokens)
        incremental = decode(model, tokens, steps, max_len=16)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)


def test_rolling_buffer_keeps_the_last_window() -> None:
    """After 7 tokens with window 3, the ring holds positions 4, 5, 6 at slots 1, 2, 0."""
    torch.manual_seed(1)
    model = build_model(spec(layout=dict(mixers="S"), attention=dict(
        kind="gqa", n_heads=4, n_kv_heads=2, sliding_window=3)), device="cpu").eval()
    tokens = torch.randint(0, VOCAB, (1, 7))
    cache = model.new_cache(1, 32)
    state = cache.layers[0]
    assert isinstance(state, KVState) and state.capacity == 3
    with torch.no_grad():
        model(tokens, cache=cache)
        # the first layer's keys for the same tokens, recomputed without a cache
        layer = model.layers[0]
        x = layer.norm1(model.embed(tokens))
        mixer = layer.mixer
        k = mixer.k_proj(x).view(1, 7, 2, 8).transpose(1, 2)
        cos, sin = mixer.rotary(0, 7)
        k = apply_rotary(k, cos, sin)
    for pos in (4, 5, 6):
        torch.testing.assert_close(state.k_BHLD[:, :, pos % 3], k[:, :, pos])


def _contract_bytes(spec_: Spec, batch: int, context: int, element: int) -> int:
    """2·Hkv·Dh per token per attention layer, (C + R) for MLA, window-capped (docs/formulas.md §3)."""
    total = 0
    for layer in resolve(spec_).layers:
        m = layer.mixer
        if isinstance(m, AttentionPlan):
            length = min(m.window, context) if m.window is not None else context
            total += 2 * m.n_kv_heads * m.head_dim * length
        elif isinstance(m, MLAPlan):
            length = min(m.window, context) if m.window is not None else context
            total += (m.kv_lora_rank + m.qk_rope_head_dim) * length
        elif isinstance(m, Mamba1Plan):
            total += m.d_inner * m.d_conv + m.d_inner * m.d_state  # conv + SSM state, any context
        elif isinstance(m, Mamba2Plan):
            total += m.conv_dim * m.d_conv + m.n_heads * m.head_dim * m.d_state
    return batch * total * element


@pytest.mark.parametrize("variant", ["gqa_rope", "window_rolling", "mla", "mla_window", "mqa_learned_tied", "jamba_like", "mamba2_hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_after_prefill(variant: str, dtype: torch.dtype) -> None:
    s = spec(**VARIANTS[variant])
    model = build_model(s, device="cpu", dtype=dtype).eval()
    batch, context = 3, 10
    cache = model.new_cache(batch, context)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (batch, context)), cache=cache)
    element = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes() == _contract_bytes(s, batch, context, element)
    for layer, state in zip(resolve(s).layers, cache.layers):
        if isinstance(layer.mixer, AttentionPlan):
            assert isinstance(state, KVState)
            length = min(layer.mixer.window or context, context)
            assert state.k_BHLD.shape == (batch, layer.mixer.n_kv_heads, length, layer.mixer.head_dim)
        elif isinstance(layer.mixer, MLAPlan):
            assert isinstance(state, LatentState)
            assert state.ckv_BLC.shape[2] == 10 and state.kpe_BLR.shape[2] == 4


def test_llama_3_8b_cache_on_meta() -> None:
    """Llama-3-8B at 8192 tokens in bf16: 131,072 B/token (docs/formulas.md §3) → exactly 1 GiB;
    nothing allocated."""
    from archplan.loader import load_spec

    model = build_model(load_spec("llama-3-8b"))
    cache = model.new_cache(1, 8192)
    assert cache.nbytes() == 131_072 * 8192 == 1 << 30
    assert all(t.device.type == "meta" for t in cache.tensors())
    logits = model(torch.zeros(1, 3, dtype=torch.long, device="meta"), cache=cache)
    assert logits.shape == (1, 3, 128256) and cache.seen == 3


def test_cache_overflow_is_a_user_error() -> None:
    model = build_model(spec(), device="cpu")
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ArchplanError, match="cache"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    learned = build_model(spec(position=dict(kind="learned"), max_seq_len=8), device="cpu")
    with pytest.raises(ArchplanError, match="learned"):
        learned.new_cache(1, 9)


@pytest.mark.parametrize("variant", ["jamba_like", "mamba2_hybrid", "mla_window", "window_alibi"])
def test_decode_runs_on_meta(variant: str) -> None:
    """The cache path is static too: prefill and steps on meta, states stay on meta, bytes as contracted."""
    s = spec(**VARIANTS[variant])
    model = build_model(s)
    cache = model.new_cache(2, 12)
    for n in (5, 1, 4):
        logits = model(torch.zeros(2, n, dtype=torch.long, device="meta"), cache=cache)
        assert logits.shape == (2, n, VOCAB) and logits.device.type == "meta"
    assert cache.seen == 10 and all(state.seen == 10 for state in cache.layers)
    assert all(t.device.type == "meta" for t in cache.tensors())
    assert cache.nbytes() == _contract_bytes(s, 2, 12, 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_decode_equals_forward_for_generated_specs(case: Case) -> None:
    """Any valid spec (every union member, hybrids, MoE, windows): prefill half, then one token at a time."""
    torch.manual_seed(0)
    model = build_model(case.spec, device="cpu").eval()
    seq = max(case.seq, 2)
    tokens = torch.randint(0, case.spec.vocab_size, (case.batch, seq))
    prefill = seq // 2
    with torch.no_grad():
        full = model(tokens)
        incremental = decode(model, tokens, [prefill] + [1] * (seq - prefill), max_len=seq)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_decode_step_flops_on_meta_for_generated_specs(case: Case) -> None:
    """One decode step counted on meta = `analytic.decode_flops` exactly, at and past any window."""
    plan = resolve(case.spec)
    # a learned position table ends at max_seq_len: a longer cache is refused (`new_cache`)
    past = case.seq + 3 if plan.position != "learned" else min(case.seq + 3, plan.max_seq_len)
    for context in (1, 2, past):
        assert counted_decode_flops(plan, context, case.batch) == decode_flops(plan, context, case.batch).counted


@pytest.mark.parametrize("preset", ["deepseek-v3", "llama-3-8b", "mixtral-8x7b", "jamba-v0.1", "mamba-2.8b"])
def test_decode_step_flops_on_meta_for_presets(preset: str) -> None:
    """DeepSeek-V3 decodes absorbed: its counted step equals `size`'s decode FLOPs × batch."""
    from archplan.analytic import decode_flops_per_token
    from archplan.loader import load_spec

    plan = resolve(load_spec(preset))
    counted = counted_decode_flops(plan, 40, 2)
    assert counted == decode_flops(plan, 40, 2).counted == 2 * decode_flops_per_token(plan, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_h0", [True, False])
def test_mamba1_one_token_step_is_the_chunked_scan_bit_for_bit(dtype: torch.dtype, with_h0: bool) -> None:
    """A Mamba-1 decode step skips the chunked scan's no-op work at T = 1 and changes no bit of y or
    of the state it returns."""
    from archplan.modules.mamba1 import chunked_scan, selective_scan

    torch.manual_seed(0)
    b, i, n = 2, 40, 8
    u, B, C = torch.randn(b, 1, i).to(dtype), torch.randn(b, 1, n).to(dtype), torch.randn(b, 1, n).to(dtype)
    dt, A = torch.rand(b, 1, i), -3 * torch.rand(i, n)
    h0 = torch.randn(b, i, n).to(dtype) if with_h0 else None
    y, h = selective_scan(u, dt, A, B, C, h0)
    y_chunked, h_chunked = chunked_scan(u, dt, A, B, C, h0)
    assert y.shape == y_chunked.shape == (b, 1, i) and h.shape == h_chunked.shape == (b, i, n)
    assert torch.equal(y, y_chunked) and torch.equal(h, h_chunked)
