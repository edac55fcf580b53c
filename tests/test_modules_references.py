"""Modules against references written out here, with every norm's weights randomised first.

The Hugging Face comparisons (test_modules_model.py `test_logits_match_transformers`) cover these
options too, but only where transformers is installed, and its unit-weight init cannot tell one
norm from another. Each reference below is the paper's or the source model's formula, with plain
torch ops, so a module that applies a norm to the wrong tensor, over the wrong width, or not at all
fails here on its own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from archplan.modules.model import build_model
from archplan.modules.attention import Attention
from archplan.modules.mla import MLA
from archplan.spec import Spec

D, H, HKV, DH = 32, 4, 2, 8
EPS = 1e-5


def _spec(**overrides: Any) -> Spec:
    base: dict[str, Any] = dict(
        name="ref", vocab_size=50, d_model=D, n_layers=1, max_seq_len=16, position=dict(kind="learned"),
        norm=dict(kind="layernorm", eps=EPS), attention=dict(kind="gqa", n_heads=H, n_kv_heads=HKV),
        ffn=dict(kind="glu", d_ff=48),
    )
    base.update(overrides)
    return Spec.model_validate(base)


def _randomise_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param))


def _causal_gqa(q_BHTD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor) -> Tensor:
    """softmax(q·kᵀ/√Dh + causal mask)·v, each K/V head serving H/HKV consecutive query heads
    (Ainslie et al. 2023; Hugging Face `repeat_kv`)."""
    group = q_BHTD.shape[1] // k_BKTD.shape[1]
    k, v = k_BKTD.repeat_interleave(group, dim=1), v_BKTD.repeat_interleave(group, dim=1)
    t = q_BHTD.shape[2]
    scores = q_BHTD @ k.transpose(-1, -2) / q_BHTD.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last dim with an affine of x's trailing shape (Ba et al. 2016)."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def _qk_normed(attn: Attention, scope: str, q_BTX: Tensor, k_BTX: Tensor) -> tuple[Tensor, Tensor]:
    """q and k as (B, heads, T, Dh), normed as each source model norms them."""
    b, t, _ = q_BTX.shape
    qn, kn = attn.q_norm, attn.k_norm
    assert qn is not None and kn is not None
    if scope == "full":  # OLMo-2: one norm over all of q's (and k's) heads together
        q_BTX, k_BTX = _layer_norm(q_BTX, qn.weight, qn.bias), _layer_norm(k_BTX, kn.weight, kn.bias)
    q = q_BTX.view(b, t, H, DH).transpose(1, 2)
    k = k_BTX.view(b, t, HKV, DH).transpose(1, 2)
    if scope == "head":  # Qwen3 / Gemma-3: one norm of width Dh, shared by the heads
        q, k = _layer_norm(q, qn.weight, qn.bias), _layer_norm(k, kn.weight, kn.bias)
    if scope == "per_head":  # StableLM-2: head i has its own (Dh) weight and bias
        q = _layer_norm(q, qn.weight[:, None, :], qn.bias[:, None, :])
        k = _layer_norm(k, kn.weight[:, None, :], kn.bias[:, None, :])
    return q, k


@pytest.mark.parametrize("scope", ["head", "per_head", "full"])
def test_qk_norm_scopes_against_their_source_models(scope: str) -> None:
    torch.manual_seed(0)
    qk_norm = dict(scope=scope, norm=dict(kind="layernorm", eps=EPS))
    model = build_model(_spec(attention=dict(kind="gqa", n_heads=H, n_kv_heads=HKV, qk_norm=qk_norm)), device="cpu")
    attn = model.layers[0].mixer
    assert isinstance(attn, Attention)
    _randomise_norms(attn)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        q, k = _qk_normed(attn, scope, attn.q_proj(x), attn.k_proj(x))
        v = attn.v_proj(x).view(2, 6, HKV, DH).transpose(1, 2)
        expected = attn.o_proj(_causal_gqa(q, k, v).transpose(1, 2).reshape(2, 6, H * DH))
        torch.testing.assert_close(attn(x), expected)


def test_the_embedding_norm_follows_the_positions() -> None:
    """BLOOM's `word_embeddings_layernorm`: the norm reads token + position embedding, before layer 0."""
    torch.manual_seed(1)
    model = build_model(_spec(embedding=dict(norm=True)), device="cpu")
    assert model.embed_norm is not None
    _randomise_norms(model.embed_norm)
    tokens = torch.randint(0, 50, (2, 7))
    seen: list[Tensor] = []
    model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens)
        summed = model.embed(tokens) + model.pos_embed(torch.arange(7))
        torch.testing.assert_close(seen[0], _layer_norm(summed, model.embed_norm.weight, model.embed_norm.bias))


def test_layer_norm_reference_is_torchs() -> None:
    """The reference above is F.layer_norm itself, so the tests compare wiring, not two norms."""
    torch.manual_seed(2)
    x, w, b = torch.randn(3, 5, D), torch.randn(D), torch.randn(D)
    torch.testing.assert_close(_layer_norm(x, w, b), F.layer_norm(x, (D,), w, b, EPS))


def _rope_half_split(x_BHTR: Tensor, theta: float) -> Tensor:
    """RoPE (Su et al. 2021) at positions 0..T−1, GPT-NeoX's half-split pairing: dim i with i + R/2."""
    t, r = x_BHTR.shape[-2], x_BHTR.shape[-1]
    angles = torch.arange(t)[:, None] * theta ** (-torch.arange(0, r, 2) / r)[None]
    cos, sin = torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)
    first, second = x_BHTR.chunk(2, dim=-1)
    return x_BHTR * cos + torch.cat([-second, first], dim=-1) * sin


# DeepSeek's latent norms: RMSNorm(rank), its default eps, whatever the model's norms use
LATENT_EPS = 1e-6


def _rms(x: Tensor, weight: Tensor, eps: float = EPS) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("q_lora", [None, 12])
def test_mla_against_deepseek_v2_written_out(q_lora: int | None) -> None:
    """DeepSeek-V2 §2.1 (eqs. 9-19) with plain ops: q = W_UQ·rms(W_DQ·x) (or W_Q·x), split per head
    into [q_nope | q_pe]; [c_kv | k_pe] = W_DKV·x, c_kv normed; [k_nope | v] = W_UKV·c_kv per head;
    q_pe and the one shared k_pe rotated; keys [k_nope | k_pe]; causal softmax at 1/√(Dn + R);
    out = W_O·concat(heads). Norm weights random."""
    h, dn, r, dv, c = 4, 6, 4, 5, 10
    mla = dict(kind="mla", n_heads=h, q_lora_rank=q_lora, kv_lora_rank=c, qk_nope_head_dim=dn,
               qk_rope_head_dim=r, v_head_dim=dv)
    torch.manual_seed(3)
    spec = _spec(attention=mla, position=dict(kind="rope", theta=500.0), norm=dict(kind="rmsnorm", eps=EPS))
    model = build_model(spec, device="cpu")
    attn = model.layers[0].mixer
    assert isinstance(attn, MLA)
    _randomise_norms(attn)
    b, t = 2, 7
    x = torch.randn(b, t, D)
    with torch.no_grad():
        if q_lora is None:
            assert attn.q_proj is not None
            q = attn.q_proj(x)
        else:
            assert attn.q_a_proj is not None and attn.q_a_norm is not None and attn.q_b_proj is not None
            q = attn.q_b_proj(_rms(attn.q_a_proj(x), attn.q_a_norm.weight, LATENT_EPS))
        q_nope, q_pe = q.view(b, t, h, dn + r).transpose(1, 2).split([dn, r], dim=-1)
        ckv, k_pe = attn.kv_a_proj_with_mqa(x).split([c, r], dim=-1)
        k_nope, v = attn.kv_b_proj(_rms(ckv, attn.kv_a_norm.weight, LATENT_EPS)).view(b, t, h, dn + dv).transpose(1, 2) \
            .split([dn, dv], dim=-1)
        k_pe = _rope_half_split(k_pe[:, None], 500.0).expand(b, h, t, r)
        queries = torch.cat([q_nope, _rope_half_split(q_pe, 500.0)], dim=-1)
        keys = torch.cat([k_nope, k_pe], dim=-1)
        scores = queries @ keys.transpose(-1, -2) / (dn + r) ** 0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        heads = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * dv)
        torch.testing.assert_close(attn(x), attn.o_proj(heads))
