"""DeepSeek-V3's multi-token prediction module (DeepSeek-AI 2024, arXiv:2412.19437, §2.2), as
Megatron-Core's `MultiTokenPredictionLayer` builds it.

Module k (0-based here, k + 1 in the report) sees, at position i, the representation of token i
from the depth before it (the main model's last hidden state for k = 0) and the input embedding of
token i + k + 1, the one its predecessor has just predicted, and predicts token i + k + 2:

  h'_i = proj([enorm(emb(t_{i+k+1})); hnorm(h^{k-1}_i)])     eq. 21 (embedding first: DeepSeek's eh_proj)
  h^k  = final_norm(TRM_k(h'))                               eq. 22
  P^k  = OutHead(h^k)                                        eq. 23 (the head shared with the main model)

h^k is normed as Megatron-Core's layer returns it and its `MultiTokenPredictionBlock` hands it to
the next depth, as the main model's h^{-1} is (its final norm applied). Where the report's h^k is
the block's output before that norm, modules k ≥ 1 (its depth 2 onwards) would read that instead;
DeepSeek-V3 trains one module.

Its parameters sit under `mtp.{k}` (resolve.py's module paths): `enorm`, `hnorm`, `proj`,
`final_norm`, and the block's own parts under the names a main layer's have under `layers.{i}`
(`norm1`, `mixer`, `ffn`, ...), which is why the module *is* a `Block` with four more children.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archplan.modules.block import Block
from archplan.modules.norms import build_norm
from archplan.resolve import LayerPlan, ModelPlan


class MTPLayer(Block):
    """One MTP depth: two input norms, the 2·D → D projection M_k (no bias, eq. 21), the block of
    `ModelPlan.mtp[k]`, and a final norm where the main model has one (its head shares that
    position: Megatron's `final_layernorm`, DeepSeek-V3's `shared_head.norm`)."""

    def __init__(self, layer: LayerPlan, model: ModelPlan) -> None:
        super().__init__(layer, model)
        d = model.d_model
        self.enorm = build_norm(model.norm, d)
        self.hnorm = build_norm(model.norm, d)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.final_norm = build_norm(model.norm, d) if model.final_norm else None

    # The module takes two streams where a layer takes one (and never a cache: MTP does not run at
    # inference); the block itself runs as `Block.forward`.
    def forward(self, h_prev_BTD: Tensor, emb_BTD: Tensor) -> Tensor:  # type: ignore[override]
        """The depth's normed output (B, T, D): what the head turns into its logits, and, as
        Megatron-Core's `MultiTokenPredictionBlock` chains its layers, the next depth's h_prev.

        h_prev_BTD: the previous depth's output at position i; emb_BTD: the main model's input
        embedding at position i + k + 1 (its sequence rolled left by k + 1)."""
        pair = torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1)  # (B, T, 2·D)
        h_BTD = super().forward(self.proj(pair))
        return h_BTD if self.final_norm is None else self.final_norm(h_BTD)
