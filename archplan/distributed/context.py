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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor

from archplan.distributed.mesh import LayoutMesh
from archplan.distributed.stage import Stage
from archplan.errors import ArchplanError
from archplan.modules.attention import Attention, attention_mask
from archplan.modules.mla import MLA
from archplan.modules.positions import Alibi, SinusoidalPositions


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
    """All-gather along `dim` over the cp group; the backward reduce-scatters the gradient. A
    DTensor over tp (MLA's replicated latent under TP) is gathered by its local tensor and keeps
    its placements; its gradient keeps the gradient's (a Partial sum over the tp ranks' heads).

    torch's own differentiable all-gather (`all_gather_single_autograd`) is not used: under
    selective activation checkpointing (`shard.apply_recompute`) its recomputation replays the
    cached outputs out of order ("Recomputed values ... have different metadata"); a Function
    records one autograd node of its own and runs the same functional collectives."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, dim: int,  # type: ignore[override]
                group: dist.ProcessGroup, size: int) -> Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, size  # type: ignore[attr-defined]
        local = x.to_local() if isinstance(x, DTensor) else x
        gathered = _waited(funcol.all_gather_single(local.contiguous(), 0, group))
        return _like(x, torch.cat(gathered.chunk(size, 0), dim))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dim, group, size = ctx.dim, ctx.group, ctx.size  # type: ignore[attr-defined]
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        stacked = torch.cat(local.chunk(size, dim), 0).contiguous()
        return _like(grad, _waited(funcol.reduce_scatter_single(stacked, "sum", 0, group))), None, None, None


def _like(template: Tensor, local: Tensor) -> Tensor:
    """`local` as a DTensor with `template`'s mesh and placements when `template` is one."""
    if isinstance(template, DTensor):
        return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False)
    return local


@dataclass(frozen=True)
class ContextShard:
    """`modules.attention.SequenceShard` of one cp rank. Positions and masks depend on the
    length only, so they are built once (`prepare`, before the stage's layers run) and shared by
    every layer and micro-batch: SDPA keeps its mask for the backward, and a mask per layer and
    micro-batch would be T/cp × T × 2 bytes each (2 GiB at 128K tokens over cp = 16). Built
    outside the layers, they are no ops of a layer's selective-recompute region either, whose
    re-run must repeat the forward's ops in order."""

    group: dist.ProcessGroup
    rank: int
    cp: int
    alibi: Alibi | None  # the layers' ALiBi (the same slopes in every layer)
    windows: tuple[int | None, ...]  # the distinct windows of the stage's attention layers
    built: dict[tuple[object, ...], Tensor] = field(default_factory=dict, compare=False)

    def prepare(self, t: int, dtype: torch.dtype, device: torch.device) -> None:
        for window in self.windows:
            self.mask(t, window, self.alibi, dtype, device)

    def _cached(self, key: tuple[object, ...], build: Callable[[], Tensor]) -> Tensor:
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]

    def positions(self, t: int, device: torch.device) -> Tensor:
        return self._cached(("q", t, device), lambda: chunk_positions(self.rank, self.cp, t, device))

    def key_positions(self, t: int, device: torch.device) -> Tensor:
        return self._cached(("k", t, device), lambda: torch.cat(
            [chunk_positions(r, self.cp, t, device) for r in range(self.cp)]))

    def mask(self, t: int, window: int | None, alibi: Alibi | None, dtype: torch.dtype,
             device: torch.device) -> Tensor:
        def build() -> Tensor:
            allowed = attention_mask(self.positions(t, device), self.key_positions(t, device), window, alibi, dtype)
            if alibi is not None:
                return allowed  # already the additive bias in `dtype`
            # additive, in the compute dtype: SDPA would convert a boolean mask on every call
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

        return self._cached(("mask", t, window, alibi is not None, dtype, device), build)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return GatherKV.apply(x, dim, self.group, self.cp)


def refusal(stage: Stage) -> str | None:
    """Why this stage cannot run context-parallel, or None."""
    for i, block in stage.layers.items():
        if not isinstance(block.mixer, Attention | MLA):
            return (f"layer {i}: {type(block.mixer).__name__} under context parallelism (only attention "
                    "gathers K/V here)")
    return None


def global_positions(stage: Stage, shard: ContextShard) -> None:
    """Absolute positions (learned, sinusoidal) added at the rank's global positions: the stage
    asks for rows 0 … T/cp − 1, the hook hands the learned table the rank's position ids
    (before TP's hooks turn them into a DTensor) and replaces the sinusoidal rows by those at
    the rank's positions (before SP keeps its sequence shard of them); prepended, so they run
    ahead of `plans.SequenceShardedPositions`."""
    match stage.pos_embed:
        case nn.Embedding():
            def ids(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                return (shard.positions(args[0].shape[0], args[0].device),)

            stage.pos_embed.register_forward_pre_hook(ids, prepend=True)
        case SinusoidalPositions():
            def rows(module: SinusoidalPositions, _args: object, out: Tensor) -> Tensor:
                return module.at(shard.positions(out.shape[0], out.device))

            stage.pos_embed.register_forward_hook(rows, prepend=True)
        case _:  # RoPE and ALiBi act inside attention (at the global positions); none has no table
            pass


def apply_context_parallel(stage: Stage, mesh: LayoutMesh, compute_dtype: torch.dtype) -> ContextShard | None:
    """Every attention layer of the stage gathers K/V over the cp mesh dimension; the shared
    positions and masks are built by a forward pre-hook of the stage, from its input's length
    (the first stage's token ids; later stages' hidden states, sequence-sharded under SP)."""
    layout = mesh.layout
    if layout.cp == 1:
        return None
    why = refusal(stage)
    if why is not None:
        raise ArchplanError(f"--layout: not run on torch.distributed: {why}")
    mixers = [block.mixer for block in stage.layers.values()]
    windows = tuple(dict.fromkeys(m.plan.window for m in mixers))
    shard = ContextShard(mesh["cp"].get_group(), mesh["cp"].get_local_rank(), layout.cp,
                         mixers[0].alibi if mixers else None, windows)
    for mixer in mixers:
        mixer.context = shard
    global_positions(stage, shard)
    split = layout.tp if layout.sequence_parallel else 1

    def prepare(module: Stage, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        shard.prepare(x.shape[1] * (1 if module.first else split), compute_dtype, x.device)

    stage.register_forward_pre_hook(prepare)
    return shard
