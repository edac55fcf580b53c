"""Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434; DeepSeek-V3 `inference/model.py` MLA).

Queries: x → q_a_proj (D→Q) → q_a_norm → q_b_proj (Q→H·(Dn+R)), or one q_proj when q_lora_rank
is None (DeepSeek-V2-Lite). Keys/values: x → kv_a_proj_with_mqa (D→C+R) splits into the latent
c_kv (normed by kv_a_norm) and one rotary key k_pe shared by all heads; kv_b_proj (C→H·(Dn+Dv))
holds W_UK (H, Dn, C) and W_UV (H, Dv, C). RoPE touches only the R-dim parts (decoupled RoPE, §2.1.3).

The decode cache is the absorbed one DeepSeek serves with, [c_kv | k_pe] (B, L, C+R). Two forms
compute the same attention (DeepSeek-V2 §2.1.2, "absorb"):

- expanded: k_nope, v = W_UK·c_kv, W_UV·c_kv for every key, then SDPA with Dqk = Dn+R, Dv;
  multiply-adds per sequence, T queries over S keys: H·(S·C·(Dn+Dv) + T·S·(Dn+R+Dv)).
- absorbed (DeepSeek-V3 `attn_impl="absorb"`, vLLM/SGLang MLA decode): q_nope·W_UK → latent space,
  one-KV-head SDPA with key [c_kv | k_pe] (C+R) and value c_kv (C), then the output through W_UV:
  H·(T·C·(Dn+Dv) + T·S·(2C+R)); the cached keys are never re-expanded.

A forward with a cache takes the form with fewer multiply-adds at its (T, S), ties expanded: decode
(T = 1) is absorbed as soon as it attends two keys for every published MLA. The cache-less forward
(training, prefill, `verify`) is always expanded, the form DeepSeek's and HF's training code
differentiate; at T = S it is also the cheaper one whenever 2·C ≥ Dn + Dv (DeepSeek-V2/V3: 1024 vs 256).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archplan.modules.attention import BiasCache, SequenceShard, attention_core, cache_step, sdpa
from archplan.modules.cache import LatentState
from archplan.modules.norms import build_norm
from archplan.modules.positions import Alibi, RotaryEmbedding, apply_rotary, yarn_mscale
from archplan.resolve import MLAPlan
from archplan.spec import Rope


class MLA(nn.Module):
    """Params (DeepSeek-V2 §2.1; docs/formulas.md §1.4): D·Q + Q + Q·H·(Dn+R) (or D·H·(Dn+R)) + D·(C+R) + C
    + C·H·(Dn+Dv) + H·Dv·D."""

    def __init__(self, plan: MLAPlan, d_model: int, rope: Rope | None, alibi: bool,
                 alibi_scale: float = 1.0) -> None:
        super().__init__()
        self.plan = plan
        h, r = plan.n_heads, plan.qk_rope_head_dim
        q_out = h * plan.qk_head_dim
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_norm: nn.Module | None = None
        self.q_b_proj: nn.Linear | None = None
        if plan.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, plan.q_lora_rank, bias=False)
            self.q_a_norm = build_norm(plan.norm, plan.q_lora_rank)
            self.q_b_proj = nn.Linear(plan.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, plan.kv_lora_rank + r, bias=False)
        self.kv_a_norm = build_norm(plan.norm, plan.kv_lora_rank)
        # the rotary key every head shares: a hook point where a tensor-parallel plan hands each
        # rank its local copy, whose gradient is then summed over the ranks' heads (plans.py)
        self.k_pe = nn.Identity()
        self.kv_b_proj = nn.Linear(plan.kv_lora_rank, h * (plan.qk_nope_head_dim + plan.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * plan.v_head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(r, rope) if rope is not None else None
        self.alibi = Alibi(h, alibi_scale) if alibi else None
        self.context: SequenceShard | None = None  # context parallelism (`distributed.context`)
        self.recompute_core = False  # selective recompute (`attention.attention_core`)
        self.biases: BiasCache | None = None  # the model's, shared by its layers (`model.share_biases`)
        self.scale = 1.0 / math.sqrt(plan.qk_head_dim)
        scaling = rope.scaling if rope is not None else None
        if scaling is not None and scaling.kind == "yarn" and scaling.mscale_all_dim:
            # DeepSeek-V3 `MLA.__init__`: softmax_scale *= mscale² under YaRN
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

    def new_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LatentState:
        p = self.plan
        length = min(p.window, max_len) if p.window is not None else max_len
        width = p.kv_lora_rank + p.qk_rope_head_dim
        return LatentState(torch.zeros(batch, length, width, device=device, dtype=dtype), p.kv_lora_rank)

    def absorbs(self, new: int, keys: int) -> bool:
        """Whether `new` cached queries over `keys` keys run absorbed: strictly fewer multiply-adds
        than expanded (module docstring; the attention core and the W_UK/W_UV products)."""
        p = self.plan
        c, dn, r, dv = p.kv_lora_rank, p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim
        absorbed = new * c * (dn + dv) + new * keys * (2 * c + r)
        expanded = keys * c * (dn + dv) + new * keys * (dn + r + dv)
        return absorbed < expanded

    def _queries(self, x_BTD: Tensor) -> Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_BTD)
        assert self.q_a_proj is not None and self.q_a_norm is not None and self.q_b_proj is not None
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))

    def project(self, x_BTD: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """q_nope (B, H, T, Dn), rotated q_pe (B, H, T, R) and the new cache rows [c_kv | k_pe] (B, T, C+R)."""
        q_nope, q_pe, ckv_BTC, kpe_BTR = self._project(x_BTD, offset)
        return q_nope, q_pe, torch.cat([ckv_BTC, kpe_BTR], dim=-1)

    def _latent(self, x_BTD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_nope, q_pe (not rotated), the normed latent c_kv (B, T, C) and k_pe (B, T, R) before
        the per-rank hook and the rotation."""
        p = self.plan
        b, t, _ = x_BTD.shape
        dn, r, c = p.qk_nope_head_dim, p.qk_rope_head_dim, p.kv_lora_rank
        q_BHTX = self._queries(x_BTD).view(b, t, p.n_heads, dn + r).transpose(1, 2)
        q_nope, q_pe = q_BHTX.split([dn, r], dim=-1)
        ckv_BTC, kpe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([c, r], dim=-1)
        return q_nope, q_pe, self.kv_a_norm(ckv_BTC), kpe_BTR

    def _project(self, x_BTD: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q_nope, rotated q_pe, the normed latent c_kv (B, T, C) and the rotated k_pe (B, T, R)."""
        q_nope, q_pe, ckv_BTC, kpe_BTR = self._latent(x_BTD)
        kpe_BTR = self.k_pe(kpe_BTR)
        if self.rotary is not None:
            cos, sin = self.rotary.cast(offset, x_BTD.shape[1], q_pe.dtype)
            q_pe = apply_rotary(q_pe, cos, sin)
            kpe_BTR = apply_rotary(kpe_BTR, cos, sin)
        return q_nope, q_pe, ckv_BTC, kpe_BTR

    def _context_parallel(self, x_BTD: Tensor, shard: SequenceShard) -> Tensor:
        """Context parallelism with the latent gathered: every rank's [c_kv | k_pe] (C + R per
        token, the rows of the decode cache) in one all-gather over cp, then each rank expands
        the keys and values of its heads for the whole sequence and attends its queries at their
        global positions. The expanded K/V would be H·(Dn + R + Dv) per token (40,960 vs 576 for
        DeepSeek-V3, DeepSeek-V2 §2.1.2's cache ratio): the gather is that much smaller, at the
        cost of re-expanding every key on every rank (kv_b_proj over T instead of T/cp tokens)."""
        p = self.plan
        t, device = x_BTD.shape[1], x_BTD.device
        q_nope, q_pe, ckv_BTC, kpe_BTR = self._latent(x_BTD)
        latent_BSX = shard.gather(torch.cat([ckv_BTC, kpe_BTR], dim=-1), 1)
        ckv_BSC, kpe_BSR = latent_BSX.split([p.kv_lora_rank, p.qk_rope_head_dim], dim=-1)
        kpe_BSR = self.k_pe(kpe_BSR)
        qpos_T, kpos_S = shard.positions(t, device), shard.key_positions(t, device)
        if self.rotary is not None:
            q_pe = apply_rotary(q_pe, *self.rotary.cast_at(qpos_T, q_pe.dtype))
            kpe_BSR = apply_rotary(kpe_BSR, *self.rotary.cast_at(kpos_S, kpe_BSR.dtype))
        mask = shard.mask(t, p.window, self.alibi, q_nope.dtype, device)
        return self._expand(q_nope, q_pe, ckv_BSC, kpe_BSR, qpos_T, kpos_S, False, mask)

    def forward(self, x_BTD: Tensor, state: LatentState | None = None) -> Tensor:
        p = self.plan
        b, t, _ = x_BTD.shape
        if state is None and self.context is not None:
            return self.o_proj(self._context_parallel(x_BTD, self.context))
        if state is None:
            # no cache: c_kv and k_pe go to the expansion as they are, never concatenated (under
            # tensor parallelism c_kv is replicated over tp and k_pe this rank's share of it)
            q_nope, q_pe, ckv_BTC, kpe_BTR = self._project(x_BTD, 0)
            qpos_T = torch.arange(t, device=x_BTD.device)
            return self.o_proj(self._expand(q_nope, q_pe, ckv_BTC, kpe_BTR, qpos_T, qpos_T, False))
        q_nope, q_pe, latent_BTX = self.project(x_BTD, state.seen)
        qpos_T = torch.arange(state.seen, state.seen + t, device=x_BTD.device)
        (keys_BSX,), kpos_S = cache_step([state.latent_BLX], [latent_BTX], 1, state.seen, p.window)
        state.advance(t)
        if self.absorbs(t, keys_BSX.shape[1]):
            out_BTX = self.attend_absorbed(q_nope, q_pe, keys_BSX, qpos_T, kpos_S)
        else:
            out_BTX = self.attend_expanded(q_nope, q_pe, keys_BSX, qpos_T, kpos_S, True)
        return self.o_proj(out_BTX)

    def attend_expanded(self, q_nope: Tensor, q_pe: Tensor, keys_BSX: Tensor, qpos_T: Tensor, kpos_S: Tensor,
                        cached: bool) -> Tensor:
        """Every key re-expanded through kv_b_proj, then SDPA over H heads; returns (B, T, H·Dv)."""
        ckv_BSC, kpe_BSR = keys_BSX.split([self.plan.kv_lora_rank, self.plan.qk_rope_head_dim], dim=-1)
        return self._expand(q_nope, q_pe, ckv_BSC, kpe_BSR, qpos_T, kpos_S, cached)

    def _expand(self, q_nope: Tensor, q_pe: Tensor, ckv_BSC: Tensor, kpe_BSR: Tensor, qpos_T: Tensor,
                kpos_S: Tensor, cached: bool, mask: Tensor | None = None) -> Tensor:
        p = self.plan
        b, h, t, _ = q_nope.shape
        s = kpe_BSR.shape[1]
        dn, dv, r = p.qk_nope_head_dim, p.v_head_dim, p.qk_rope_head_dim
        kv_BHSX = self.kv_b_proj(ckv_BSC).view(b, s, h, dn + dv).transpose(1, 2)
        k_nope, v_BHSDv = kv_BHSX.split([dn, dv], dim=-1)
        k_BHSX = torch.cat([k_nope, kpe_BSR[:, None].expand(b, h, s, r)], dim=-1)
        q_BHTX = torch.cat([q_nope, q_pe], dim=-1)
        out_BHTDv = attention_core(
            self.recompute_core, q_BHTX, k_BHSX, v_BHSDv, qpos_T, kpos_S,
            window=p.window, alibi=self.alibi, cached=cached, gqa=False, scale=self.scale, mask=mask,
            biases=self.biases,
        )
        return out_BHTDv.transpose(1, 2).reshape(b, t, h * dv)

    def attend_absorbed(self, q_nope: Tensor, q_pe: Tensor, keys_BSX: Tensor, qpos_T: Tensor,
                        kpos_S: Tensor) -> Tensor:
        """Attention in the latent space (DeepSeek-V3 `inference/model.py` MLA.forward, attn_impl="absorb"):
        q_nope·W_UK (H, B·T, C), one-KV-head SDPA over the cache rows, the output through W_UVᵀ;
        returns (B, T, H·Dv). bmm over the heads, not einsum (docs/architecture.md, FLOPs)."""
        p = self.plan
        b, h, t, dn = q_nope.shape
        c, dv = p.kv_lora_rank, p.v_head_dim
        w_uk_HDnC, w_uv_HDvC = self.kv_b_proj.weight.view(h, dn + dv, c).split([dn, dv], dim=1)
        qlat_HNC = torch.bmm(q_nope.transpose(0, 1).reshape(h, b * t, dn), w_uk_HDnC)
        q_BHTX = torch.cat([qlat_HNC.view(h, b, t, c).transpose(0, 1), q_pe], dim=-1)
        k_B1SX = keys_BSX[:, None]
        out_BHTC = sdpa(
            q_BHTX, k_B1SX, k_B1SX[..., :c], qpos_T, kpos_S,
            window=p.window, alibi=self.alibi, cached=True, gqa=True, scale=self.scale,
        )
        out_HNDv = torch.bmm(out_BHTC.transpose(0, 1).reshape(h, b * t, c), w_uv_HDvC.transpose(1, 2))
        return out_HNDv.view(h, b, t, dv).permute(1, 2, 0, 3).reshape(b, t, h * dv)
