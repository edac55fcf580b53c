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

from archplan.errors import ArchplanError
from archplan.modules.block import Block
from archplan.modules.model import ArchplanModel, TiedLMHead, resolve_device, share_biases
from archplan.modules.positions import SinusoidalPositions
from archplan.planning.layout import Layout, pipeline_chunks
from archplan.resolve import ModelPlan


class Stage(nn.Module):
    def __init__(self, plan: ModelPlan, layers: list[int], *, first: bool, last: bool) -> None:
        super().__init__()
        self.plan = plan
        model = ArchplanModel(replace(plan, layers=(), mtp=()))
        self.first, self.last = first, last
        self.embed = model.embed if first or (last and plan.tied) else None
        self.pos_embed = model.pos_embed if first else None
        self.embed_norm = model.embed_norm if first else None
        self.layers = nn.ModuleDict({str(i): Block(plan.layers[i], plan) for i in layers})
        share_biases(self.layers)
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


def _built(stage_module: Stage, dtype: torch.dtype) -> Stage:
    stage_module.to(dtype)
    for module in stage_module.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return stage_module


def build_stage(plan: ModelPlan, layout: Layout, stage: int, device: str | torch.device = "meta",
                dtype: torch.dtype = torch.float32) -> Stage:
    """Stage `stage` of `layout` where it is one model chunk (vpp = 1), fp32 master weights by
    default (mixed precision casts to bf16)."""
    if layout.vpp > 1:
        raise ArchplanError("--layout: vpp > 1 gives a pipeline rank several model chunks (build_chunks)")
    [chunk] = build_chunks(plan, layout, stage, device, dtype)
    return chunk


def build_chunks(plan: ModelPlan, layout: Layout, stage: int, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.float32) -> list[Stage]:
    """The model chunks (virtual stages) of pipeline rank `stage`, in model order: chunk c of
    pp·vpp on rank c % pp (`pipeline_chunks`); the first chunk of the model holds the embedding,
    the last the head."""
    dev = resolve_device(device)
    total = layout.pp * layout.vpp
    out = []
    for v, layers in enumerate(pipeline_chunks(len(plan.layers), layout.pp, layout.vpp)[stage]):
        index = stage + v * layout.pp
        with torch.device(dev):
            chunk = Stage(plan, list(layers), first=index == 0, last=index == total - 1)
        out.append(_built(chunk, dtype))
    return out
