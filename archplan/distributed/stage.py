"""One pipeline stage of an `ArchplanModel`: the layers of its chunk(s), plus the embedding on the
first stage and the final norm and head on the last.

Built from archplan's own modules: the ends from an `ArchplanModel` of no layers, the stage's
`Block`s by their global index, so the module paths stay the model's own (`embed`, `layers.12`,
`lm_head`) and the per-component names of verify apply unchanged. Layer ranges come from `planning.layout.pipeline_chunks`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dataclasses import replace

from archplan.errors import ArchplanError
from archplan.modules.block import Block
from archplan.modules.model import (
    ArchplanModel,
    TiedLMHead,
    cross_entropy_ahead,
    embed_input,
    resolve_device,
    share_biases,
    token_embedding,
)
from archplan.modules.mtp import MTPLayer
from archplan.modules.positions import share_rope_tables
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
        n_main = len(plan.layers)
        # the multi-token-prediction modules follow the main layers on the last chunk
        # (`pipeline_chunks`' tail), each under its model path `mtp.{k}` as `ArchplanModel` has it
        self.layers = nn.ModuleDict({str(i): Block(plan.layers[i], plan) for i in layers if i < n_main})
        self.mtp = nn.ModuleDict({str(i - n_main): MTPLayer(plan.mtp[i - n_main], plan)
                                  for i in layers if i >= n_main})
        # the MTP modules attend over the same positions from 0 as the layers: the same masks
        share_biases(self)
        share_rope_tables(self)
        self.final_norm = model.final_norm if last else None
        self.lm_head = model.lm_head if last else None
        # across stages the MTP modules read the shifted tokens through a copy of the embedding
        # (Megatron-Core's GPTModel builds one wherever `mtp_process` is), synced as a tied head's
        # copy is (`shard.tied_group`); a tied head's copy is that embedding already
        self.mtp_embed = model.embed if last and self.mtp and self.embed is None else None
        # under context parallelism (`context.apply_context_parallel`): the ranks, and the global
        # positions of this rank's rows of whole T-token sequences, which the MTP modules read
        self.context_ranks = 1
        self.rank_positions: Callable[[int, torch.device], Tensor] | None = None

    def named_blocks(self) -> list[tuple[str, Block]]:
        """The stage's blocks by model path, the main layers' (their index) and the MTP modules'
        (`mtp.{k}`: blocks with their own input parts), as every parallelism applies to them alike."""
        return [*self.layers.items(), *((f"mtp.{k}", block) for k, block in self.mtp.items())]

    def blocks(self) -> list[Block]:
        return [block for _, block in self.named_blocks()]

    @property
    def token_embedding(self) -> nn.Embedding | None:
        """The embedding this stage reads tokens through, whose gradient an end stage sums with the
        other's (`shard.tied_group`): the first stage's, a tied head's copy, or the copy the MTP
        modules read."""
        return self.mtp_embed if self.mtp_embed is not None else self.embed

    def forward(self, x: Tensor, sequence_BT: Tensor | None = None) -> Tensor:
        """Token ids (B, T) on the first stage, else the previous stage's hidden states (under
        context parallelism the rank's chunks of them). The last stage returns its logits, or,
        given `sequence_BT`, the whole sequences' tokens, with multi-token prediction the training
        loss (`ArchplanModel.training_loss`: the MTP modules read the tokens ahead). Without them
        it is inference, which discards the MTP modules (DeepSeek-V3 §2.2)."""
        if self.first:
            x = self._embed(x)
        for layer in self.layers.values():
            x = layer(x)
        if not self.last:
            return x
        if self.final_norm is not None:
            x = self.final_norm(x)
        if not self.mtp or sequence_BT is None:
            return self._head(x)
        embed = self.token_embedding
        assert embed is not None
        t = sequence_BT.shape[1]
        positions = (torch.arange(t, device=sequence_BT.device) if self.rank_positions is None
                     else self.rank_positions(t, sequence_BT.device))

        def ahead(logits_BTV: Tensor, n: int) -> Tensor:
            return cross_entropy_ahead(logits_BTV, sequence_BT, n, positions, self.context_ranks)

        # DeepSeek-V3 eq. 25, the main loss and each depth's, computed as each head pass ends
        loss = ahead(self._head(x), 1)
        for k, module in enumerate(self.mtp.values()):
            # depth k reads the tokens rolled left by k + 1 at the rank's positions, embedded per
            # depth as Megatron-Core's MTP block embeds its rolled input ids: a rank holds a
            # sequence shard of an embedding under SP or CP, which it could not roll
            # (`ArchplanModel._training_logits` rolls the embedding, the same tensor for an
            # embedding of the tokens alone)
            x = module(x, token_embedding(self.plan, embed, sequence_BT[:, (positions + k + 1) % t]))
            loss = loss + self.plan.mtp_loss_weight / len(self.mtp) * ahead(self._head(x), k + 2)
        return loss

    def _embed(self, tokens_BT: Tensor) -> Tensor:
        assert self.embed is not None
        return embed_input(self.plan, self.embed, self.pos_embed, self.embed_norm, tokens_BT)

    def _head(self, x: Tensor) -> Tensor:
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


def mtp_refusal(plan: ModelPlan, layout: Layout) -> str | None:
    """Why the stages cannot run this model's multi-token prediction (None: they can). The last
    stage's modules read an embedding of the tokens alone: learned or sinusoidal positions or an
    embedding norm would join it, and they are the first stage's parts."""
    if not plan.mtp:
        return None
    absolute = plan.position in ("learned", "sinusoidal")
    if absolute or plan.embed_norm:
        what = f"{plan.position} positions" if absolute else "embedding norm"
        return (f"{plan.name}'s multi-token prediction would read the tokens ahead through its {what}, which the "
                "torch.distributed stages do not build on the last stage (they embed the tokens alone, as for "
                "RoPE, ALiBi or no positions)")
    return None


def build_chunks(plan: ModelPlan, layout: Layout, stage: int, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.float32) -> list[Stage]:
    """The model chunks (virtual stages) of pipeline rank `stage`, in model order: chunk c of
    pp·vpp on rank c % pp (`pipeline_chunks`); the first chunk of the model holds the embedding,
    the last the head."""
    if why := mtp_refusal(plan, layout):
        raise ArchplanError(f"--layout: {why}")
    dev = resolve_device(device)
    total = layout.pp * layout.vpp
    out = []
    for v, layers in enumerate(pipeline_chunks(len(plan.layers), layout.pp, layout.vpp, len(plan.mtp))[stage]):
        index = stage + v * layout.pp
        with torch.device(dev):
            chunk = Stage(plan, list(layers), first=index == 0, last=index == total - 1)
        out.append(_built(chunk, dtype))
    return out
