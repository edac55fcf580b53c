"""Context parallelism: the sequence split over the cp mesh dimension, K/V all-gathered.

Llama 3 §3.3.2 (Dubey et al. 2024): the sequence is cut into 2·cp chunks and cp rank r holds
chunks r and 2·cp − 1 − r, so every rank has the same causal work; each attention layer
all-gathers K and V of the whole sequence and attends its local queries to them. Here the
gather is one functional collective over the cp group (K and V stacked, `GatherKV`), whose
backward reduce-scatters their gradients back to the ranks that produced them;
the queries rotate at their global positions (RoPE) and the causal mask (with a sliding window
and ALiBi when the layer has them) comes from the global positions of queries and keys.

torch's own `torch.distributed.tensor.experimental.context_parallel` is not used: its ring
attention replaces the CUDA SDPA kernels only (`aten._scaled_dot_product_flash_attention`,
`_efficient_attention`, cuDNN) and refuses any other ("CP only supports flash attention and
memory efficient attention now"), so it cannot run on the CPU, in FakeTensorMode or in the gloo
tests, and it takes `is_causal` SDPA without masks, windows or ALiBi.

Everything else runs on the rank's tokens as it is: the norms, projections and FFNs are
per-token, the loss is the mean over the rank's tokens (the same count on every rank, so the
mean over dp × cp of the ranks' gradients is the gradient of the global mean), and the weights
are replicated over cp and reduced over dp × cp (`mesh.LayoutMesh.dp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from archplan.distributed.mesh import LayoutMesh
from archplan.distributed.stage import Stage
from archplan.errors import ArchplanError
from archplan.modules.attention import Attention


def chunk_positions(rank: int, cp: int, t: int, device: torch.device | str = "cpu") -> Tensor:
    """Global positions of cp rank `rank`'s `t` tokens: chunks rank and 2·cp − 1 − rank of 2·cp."""
    if t % 2:
        raise ArchplanError(f"context parallelism cuts the sequence into 2·cp chunks; {t} tokens per rank is odd")
    c = t // 2
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c, device=device), torch.arange(second, second + c, device=device)])


def shard_sequence(x_BT: Tensor, rank: int, cp: int) -> Tensor:
    """The rank's tokens (or labels) of whole sequences (B, T)."""
    if cp == 1:
        return x_BT
    if x_BT.shape[1] % (2 * cp):
        raise ArchplanError(f"--seq {x_BT.shape[1]} does not split into 2·cp = {2 * cp} chunks")
    return x_BT.index_select(1, chunk_positions(rank, cp, x_BT.shape[1] // cp, x_BT.device))


def _waited(t: Tensor) -> Tensor:
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


class GatherKV(torch.autograd.Function):
    """All-gather along `dim` over the cp group; the backward reduce-scatters the gradient.

    torch's own differentiable all-gather (`all_gather_single_autograd`) is not used: under
    selective activation checkpointing (`shard.apply_recompute`) its recomputation replays the
    cached outputs out of order ("Recomputed values ... have different metadata"); a Function
    records one autograd node of its own and runs the same functional collectives."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, dim: int,  # type: ignore[override]
                group: dist.ProcessGroup, size: int) -> Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, size  # type: ignore[attr-defined]
        gathered = _waited(funcol.all_gather_single(x.contiguous(), 0, group))
        return torch.cat(gathered.chunk(size, 0), dim)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dim, group, size = ctx.dim, ctx.group, ctx.size  # type: ignore[attr-defined]
        stacked = torch.cat(grad.chunk(size, dim), 0).contiguous()
        return _waited(funcol.reduce_scatter_single(stacked, "sum", 0, group)), None, None, None


@dataclass(frozen=True)
class ContextShard:
    """`modules.attention.SequenceShard` of one cp rank."""

    group: dist.ProcessGroup
    rank: int
    cp: int

    def positions(self, t: int, device: torch.device) -> Tensor:
        return chunk_positions(self.rank, self.cp, t, device)

    def key_positions(self, t: int, device: torch.device) -> Tensor:
        return torch.cat([chunk_positions(r, self.cp, t, device) for r in range(self.cp)])

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return GatherKV.apply(x, dim, self.group, self.cp)


def refusal(stage: Stage) -> str | None:
    """Why this stage cannot run context-parallel, or None."""
    for i, block in stage.layers.items():
        if not isinstance(block.mixer, Attention):
            return (f"layer {i}: {type(block.mixer).__name__} under context parallelism (only MHA/GQA/MQA "
                    "attention gathers K/V here)")
    if stage.plan.position in ("learned", "sinusoidal"):
        return f"{stage.plan.position} positions under context parallelism (the embedding adds them by local index)"
    return None


def apply_context_parallel(stage: Stage, mesh: LayoutMesh) -> None:
    """Every attention layer of the stage gathers K/V over the cp mesh dimension."""
    cp = mesh.layout.cp
    if cp == 1:
        return
    why = refusal(stage)
    if why is not None:
        raise ArchplanError(f"--layout: not run on torch.distributed: {why}")
    shard = ContextShard(mesh["cp"].get_group(), mesh["cp"].get_local_rank(), cp)
    for block in stage.layers.values():
        block.mixer.context = shard
