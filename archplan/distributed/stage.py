"""One pipeline stage of an `ArchplanModel`: the layers of its chunk(s), plus the embedding on the
first stage and the final norm and head on the last.

Built from archplan's own modules: the ends from an `ArchplanModel` of no layers, the stage's
`Block`s by their global index, so the module paths stay the model's own (`embed`, `layers.12`,
`lm_head`) and the per-component names of verify apply unchanged. Layer ranges come from `planning.layout.pipeline_chunks`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dataclasses import replace

from archplan.modules.block import Block
from archplan.modules.model import ArchplanModel, TiedLMHead, resolve_device
from archplan.modules.positions import SinusoidalPositions
from archplan.planning.layout import Layout, pipeline_chunks
from archplan.resolve import ModelPlan


class Stage(nn.Module):
    def __init__(self, plan: ModelPlan, layers: list[int], *, first: bool, last: bool) -> None:
        super().__init__()
        self.plan = plan
        model = ArchplanModel(replace(plan, layers=()))
        self.first, self.last = first, last
        self.embed = model.embed if first or (last and plan.tied) else None
        self.pos_embed = model.pos_embed if first else None
        self.embed_norm = model.embed_norm if first else None
        self.layers = nn.ModuleDict({str(i): Block(plan.layers[i], plan) for i in layers})
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: Tensor) -> Tensor:
        """Token ids (B, T) on the first stage, else the previous stage's hidden states."""
        if self.first:
            assert self.embed is not None
            tokens_BT = x
            x = self.embed(tokens_BT)
            if isinstance(self.pos_embed, nn.Embedding):
                x = x + self.pos_embed(torch.arange(tokens_BT.shape[1], device=tokens_BT.device))
            elif isinstance(self.pos_embed, SinusoidalPositions):
                x = x + self.pos_embed(0, tokens_BT.shape[1]).to(x.dtype)
            if self.embed_norm is not None:
                x = self.embed_norm(x)
        for layer in self.layers.values():
            x = layer(x)
        if not self.last:
            return x
        if self.final_norm is not None:
            x = self.final_norm(x)
        if isinstance(self.lm_head, TiedLMHead):
            assert self.embed is not None
            return self.lm_head(x, self.embed.weight)
        assert self.lm_head is not None
        return self.lm_head(x)


def stage_layers(plan: ModelPlan, layout: Layout, stage: int) -> list[int]:
    return [i for chunk in pipeline_chunks(len(plan.layers), layout.pp, layout.vpp)[stage] for i in chunk]


def build_stage(plan: ModelPlan, layout: Layout, stage: int, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> Stage:
    """Stage `stage` of `layout`, fp32 master weights by default (mixed precision casts to bf16)."""
    dev = resolve_device(device)
    with torch.device(dev):
        stage_module = Stage(plan, stage_layers(plan, layout, stage), first=stage == 0, last=stage == layout.pp - 1)
    stage_module.to(dtype)
    for module in stage_module.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return stage_module
