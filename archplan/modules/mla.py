"""Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434; DeepSeek-V3 `inference/model.py` MLA).

Queries: x → q_a_proj (D→Q) → q_a_norm → q_b_proj (Q→H·(Dn+R)), or one q_proj when q_lora_rank
is None (DeepSeek-V2-Lite). Keys/values: x → kv_a_proj_with_mqa (D→C+R) splits into the latent
c_kv (normed by kv_a_norm) and one rotary key k_pe shared by all heads; kv_b_proj (C→H·(Dn+Dv))
expands c_kv into per-head k_nope and v. RoPE touches only the R-dim parts (decoupled RoPE, §2.1.3).

The decode cache is the absorbed one DeepSeek serves with: c_kv (B, L, C) and k_pe (B, L, R);
keys and values are re-expanded from it through kv_b_proj at each step (same math as the
weight-absorbed form, which only reorders the matmuls).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archplan.modules.attention import cache_step, sdpa
from archplan.modules.cache import LatentState
from archplan.modules.norms import build_norm
from archplan.modules.positions import Alibi, RotaryEmbedding, apply_rotary, yarn_mscale
from archplan.resolve import MLAPlan
from archplan.spec import Rope


class MLA(nn.Module):
    """Params (DeepSeek-V2 §2.1 / FORMULAS §1.4): D·Q + Q + Q·H·(Dn+R) (or D·H·(Dn+R)) + D·(C+R) + C
    + C·H·(Dn+Dv) + H·Dv·D."""

    def __init__(self, plan: MLAPlan, d_model: int, rope: Rope | None, alibi: bool) -> None:
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
        self.kv_b_proj = nn.Linear(plan.kv_lora_rank, h * (plan.qk_nope_head_dim + plan.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * plan.v_head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(r, rope) if rope is not None else None
        self.alibi = Alibi(h) if alibi else None
        self.scale = 1.0 / math.sqrt(plan.qk_head_dim)
        scaling = rope.scaling if rope is not None else None
        if scaling is not None and scaling.kind == "yarn" and scaling.mscale_all_dim:
            # DeepSeek-V3 `MLA.__init__`: softmax_scale *= mscale² under YaRN
            self.scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2

    def new_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LatentState:
        p = self.plan
        length = min(p.window, max_len) if p.window is not None else max_len
        return LatentState(
            torch.zeros(batch, length, p.kv_lora_rank, device=device, dtype=dtype),
            torch.zeros(batch, length, p.qk_rope_head_dim, device=device, dtype=dtype),
        )

    def _queries(self, x_BTD: Tensor) -> Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_BTD)
        assert self.q_a_proj is not None and self.q_a_norm is not None and self.q_b_proj is not None
        return self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BTD)))

    def forward(self, x_BTD: Tensor, state: LatentState | None = None) -> Tensor:
        p = self.plan
        b, t, _ = x_BTD.shape
        h, dn, r, dv, c = p.n_heads, p.qk_nope_head_dim, p.qk_rope_head_dim, p.v_head_dim, p.kv_lora_rank
        q_BHTX = self._queries(x_BTD).view(b, t, h, dn + r).transpose(1, 2)
        q_nope, q_pe = q_BHTX.split([dn, r], dim=-1)
        ckv_BTC, kpe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([c, r], dim=-1)
        ckv_BTC = self.kv_a_norm(ckv_BTC)
        offset = state.seen if state is not None else 0
        if self.rotary is not None:
            cos, sin = self.rotary(offset, t)
            q_pe = apply_rotary(q_pe, cos, sin)
            kpe_BTR = apply_rotary(kpe_BTR, cos, sin)
        qpos_T = torch.arange(offset, offset + t, device=x_BTD.device)
        if state is None:
            kpos_S = qpos_T
        else:
            (ckv_BTC, kpe_BTR), kpos_S = cache_step(
                [state.ckv_BLR, state.kpe_BLR], [ckv_BTC, kpe_BTR], 1, state.seen, p.window
            )
            state.advance(t)
        s = ckv_BTC.shape[1]
        kv_BHSX = self.kv_b_proj(ckv_BTC).view(b, s, h, dn + dv).transpose(1, 2)
        k_nope, v_BHSDv = kv_BHSX.split([dn, dv], dim=-1)
        k_BHSX = torch.cat([k_nope, kpe_BTR[:, None].expand(b, h, s, r)], dim=-1)
        q_BHTX = torch.cat([q_nope, q_pe], dim=-1)
        out_BHTDv = sdpa(
            q_BHTX, k_BHSX, v_BHSDv, qpos_T, kpos_S,
            window=p.window, alibi=self.alibi, cached=state is not None, gqa=False, scale=self.scale,
        )
        return self.o_proj(out_BHTDv.transpose(1, 2).reshape(b, t, h * dv))
