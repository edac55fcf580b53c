"""Context parallelism: the sequence split over the cp mesh dimension, K/V all-gathered,
long convolutions' channels exchanged.

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

MLA gathers its latent [c_kv | k_pe] instead (C + R per token, `MLA._context_parallel`), and
each rank expands the keys and values of its heads; long convolutions (S4/S4D, Hyena,
StripedHyena) trade sequence shards for channel shards by an all-to-all and back
(`long_conv_context`), and so do Mamba-1 and Mamba-2 around their convolution and selective scan
(`mamba_context`, after Megatron-Core's `MambaContextParallel`); learned and sinusoidal positions
are added at the rank's global positions (`global_positions`).

Everything else runs on the rank's tokens as it is: the norms, projections and FFNs are
per-token, the loss is the mean over the rank's tokens (the same count on every rank, so the
mean over dp × cp of the ranks' gradients is the gradient of the global mean), and the weights
are replicated over cp and reduced over dp × cp (`mesh.LayoutMesh.dp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor
from typing_extensions import assert_never

from archplan.distributed.mesh import LayoutMesh
from archplan.distributed.plans import Parts, rank_channels
from archplan.distributed.stage import Stage
from archplan.errors import ArchplanError
from archplan.modules.attention import Attention, additive_mask
from archplan.modules.mla import MLA
from archplan.modules.hyena import HyenaMixer
from archplan.modules.mamba1 import Mamba1Mixer
from archplan.modules.mamba2 import Mamba2Mixer
from archplan.modules.positions import Alibi, SinusoidalPositions
from archplan.modules.s4 import S4Mixer
from archplan.modules.stripedhyena import StripedHyenaMixer
from archplan.units import things


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

    torch's own differentiable all-gather (`all_gather_single_autograd`) is not used: under the
    selective activation checkpointing of the whole mixer that `checkpointing.apply_recompute`
    once applied, its recomputation replayed the cached outputs out of order ("Recomputed values ...
    have different metadata"); a Function records one autograd node of its own and runs the same
    functional collectives, inside a checkpointed region or not."""

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


class AllToAll(torch.autograd.Function):
    """All-to-all of dim-0 splits (`recv` rows from each rank, `send` to each; None: equal, as the
    cp exchanges use); the backward is the all-to-all of the gradient with the splits swapped. An
    autograd Function for the reason `GatherKV` is one: torch's differentiable
    `all_to_all_single_autograd` is replayed out of order by selective recomputation (the cp
    exchanges; the expert dispatch and combine, `expert.ExpertParallel`)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor,  # type: ignore[override]
                group: dist.ProcessGroup, recv: list[int] | None = None, send: list[int] | None = None) -> Tensor:
        ctx.group, ctx.recv, ctx.send = group, recv, send  # type: ignore[attr-defined]
        return _waited(funcol.all_to_all_single(x.contiguous(), recv, send, group))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        back = funcol.all_to_all_single(grad.contiguous(), ctx.send, ctx.recv, ctx.group)  # type: ignore[attr-defined]
        return _waited(back), None, None, None


class AllReduce(torch.autograd.Function):
    """Sum over the cp group of partial sums every rank then reads whole (Mamba-1's x_proj over
    its channel shards); the backward sums the parts of the gradient that each rank's channels
    return (Megatron's reduce / copy pair in one node). A DTensor over tp is reduced by its local
    tensor and keeps its placements, as in `GatherKV`."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor,  # type: ignore[override]
                group: dist.ProcessGroup) -> Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        return _like(x, summed_over(x, group))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return _like(grad, summed_over(grad, ctx.group)), None  # type: ignore[attr-defined]


def summed_over(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum of x over `group`, waited for (a DTensor by its local tensor, returned plain)."""
    local = x.to_local() if isinstance(x, DTensor) else x
    return _waited(funcol.all_reduce(local.contiguous(), "sum", group))


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
    exchanges: bool  # the stage has long convolutions or Mamba layers (their sequence order, `to_channels`)
    built: dict[tuple[object, ...], Tensor] = field(default_factory=dict, compare=False)

    def prepare(self, t: int, dtype: torch.dtype, device: torch.device) -> None:
        for window in self.windows:
            self.mask(t, window, self.alibi, dtype, device)
        if self.exchanges:
            self._sequence_order(t, device)

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
            return additive_mask(self.positions(t, device), self.key_positions(t, device), window, alibi, dtype)

        return self._cached(("mask", t, window, alibi is not None, dtype, device), build)

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return GatherKV.apply(x, dim, self.group, self.cp)

    def to_channels(self, x_BTC: Tensor, parts: Parts) -> Tensor:
        """The rank's T/cp tokens of C channels (blocks of `parts`) → every token, in sequence
        order, of its C/cp channels (its 1/cp of every block, `plans.rank_channels`): one
        all-to-all (DeepSpeed-Ulysses, Jacobs et al. 2023, over channels), then the load-balanced
        chunk order undone."""
        t, device = x_BTC.shape[1], x_BTC.device
        send_PBTC = torch.stack([rank_channels(x_BTC, 2, parts, j, self.cp) for j in range(self.cp)])
        recv_PBTC = AllToAll.apply(send_PBTC, self.group)
        return recv_PBTC.movedim(0, 1).flatten(1, 2).index_select(1, self._sequence_order(t, device))

    def to_sequence(self, y_BSC: Tensor, blocks: int = 1) -> Tensor:
        """`to_channels` back for `blocks` equal blocks side by side: every token of the rank's
        C/cp channels → its own T/cp tokens of all C channels, in the rank's chunk order."""
        t, device = y_BSC.shape[1] // self.cp, y_BSC.device
        send_PBTC = y_BSC.index_select(1, self.key_positions(t, device)).unflatten(1, (self.cp, t)).movedim(1, 0)
        recv_PBTC = AllToAll.apply(send_PBTC, self.group)
        # (B, t, source rank, block, C/(cp·blocks)) → each block's channels in rank order
        return recv_PBTC.movedim(0, 2).unflatten(3, (blocks, -1)).transpose(2, 3).flatten(2)

    def _sequence_order(self, t: int, device: torch.device) -> Tensor:
        return self._cached(("order", t, device), lambda: self.key_positions(t, device).argsort())


def refusal(stage: Stage, cp: int) -> str | None:
    """Why this stage cannot run context-parallel over cp ranks, or None."""
    for i, block in stage.named_blocks():
        match block.mixer:
            case Attention() | MLA():
                pass
            case HyenaMixer() | StripedHyenaMixer() | S4Mixer():
                why = _channel_problem(block.mixer, cp)
                if why:
                    return f"layer {i}: {why} under context parallelism (channel shards)"
            case Mamba1Mixer() | Mamba2Mixer():
                why = _mamba_problem(block.mixer, cp)
                if why:
                    return f"layer {i}: {why} under context parallelism (Megatron-Core's head/channel shards)"
            case _:
                return f"layer {i}: {type(block.mixer).__name__} under context parallelism (no exchange is built)"
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


def check_cp(stage: Stage, cp: int) -> None:
    """`refusal` as the one-line error `--layout` gives (`plans.check_tp`'s twin for cp)."""
    why = refusal(stage, cp) if cp > 1 else None
    if why is not None:
        raise ArchplanError(f"--layout: not run on torch.distributed: {why}")


def apply_context_parallel(stage: Stage, mesh: LayoutMesh, compute_dtype: torch.dtype) -> ContextShard | None:
    """Every attention layer of the stage gathers K/V over the cp mesh dimension; the shared
    positions and masks are built by a forward pre-hook of the stage, from its input's length
    (the first stage's token ids; later stages' hidden states, sequence-sharded under SP)."""
    layout = mesh.layout
    if layout.cp == 1:
        return None
    check_cp(stage, layout.cp)
    mixers = [block.mixer for block in stage.blocks()]
    attention = [m for m in mixers if isinstance(m, Attention | MLA)]
    windows = tuple(dict.fromkeys(m.plan.window for m in attention))
    shard = ContextShard(mesh["cp"].get_group(), mesh["cp"].get_local_rank(), layout.cp,
                         attention[0].alibi if attention else None, windows,
                         any(isinstance(m, LongConv | Mamba) for m in mixers))
    for mixer in mixers:
        match mixer:
            case Attention() | MLA():
                mixer.context = shard
            case HyenaMixer() | StripedHyenaMixer() | S4Mixer():
                long_conv_context(mixer, shard)
            case Mamba1Mixer() | Mamba2Mixer():
                mamba_context(mixer, shard)
    global_positions(stage, shard)
    # the MTP modules read the tokens ahead of the rank's positions (`Stage.forward`)
    stage.context_ranks = layout.cp
    stage.rank_positions = lambda t, device: shard.positions(t // layout.cp, device)
    split = layout.tp if layout.sequence_parallel else 1

    def prepare(module: Stage, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        shard.prepare(x.shape[1] * (1 if module.first else split), compute_dtype, x.device)

    stage.register_forward_pre_hook(prepare)
    return shard


# ------------------------------------------------------------------------- long convolutions
LongConv = HyenaMixer | StripedHyenaMixer | S4Mixer


def _channel_problem(mixer: LongConv, cp: int) -> str | None:
    """Channels (and the tensors shared by groups of them) that do not split over cp, after tp."""
    d = mixer.d_model
    match mixer:
        case StripedHyenaMixer():
            filters = mixer.poles.shape[0]
            if d % cp == 0 and filters % cp == 0:
                return None
            return f"{d} channels / {things(filters, 'filter')} over cp={cp}"
        case S4Mixer():
            n = mixer.plan.n_ssm
            if d % cp or n % cp and n != 1:
                return f"S4's {d} channels / {n} SSM copies over cp={cp} (one copy is read whole, more must split)"
            return None
        case HyenaMixer():
            return None if d % cp == 0 else f"{d} channels over cp={cp}"
        case _:
            assert_never(mixer)


def _channel_tensors(mixer: LongConv) -> tuple[Parts, dict[str, tuple[int, Parts]]]:
    """The blocks of the mixer's first convolution's channels, and its per-channel tensors
    (dotted name → dim, blocks): the rank keeps its 1/cp of each block of each."""
    d = mixer.d_model
    match mixer:
        case HyenaMixer():
            o = mixer.plan.order
            # the filter rows interleave the orders (`order_channels`): one block of channels
            inner, filters = (d,) * (o + 1), ((o - 1) * d,)
            tensors = {"short_filter.weight": (0, inner), "short_filter.bias": (0, inner),
                       "filter.bias": (0, filters)}
            return inner, tensors
        case StripedHyenaMixer():
            fir, groups = (d, d, d), (mixer.poles.shape[0],)
            tensors = {"short_filter_weight": (0, fir), "D": (0, (d,)), "poles": (0, groups),
                       "residues": (0, groups)}
            if mixer.short_filter_bias is not None:
                tensors["short_filter_bias"] = (0, fir)
            return fir, tensors
        case S4Mixer():
            tensors = {name: (0, (d,)) for name in ("D", "C", "log_dt")}
            n = mixer.plan.n_ssm
            if n > 1:
                copies = ("B", "A_log_real", "A_imag") + (("P",) if mixer.plan.dplr else ())
                tensors |= {name: (0, (n,)) for name in copies}
            return (d,), tensors
        case _:
            assert_never(mixer)


def _rows(dim: int, parts: Parts, rank: int, cp: int) -> Callable[[Tensor], Tensor]:
    return lambda t: rank_channels(t, dim, parts, rank, cp)


def _sliced_while_running(mixer: nn.Module, rows: dict[str, Callable[[Tensor], Tensor]]) -> None:
    """During the mixer's forward, each named parameter or buffer (dotted path → how the rank's
    channels read off it) is replaced by the rank's slice of it, a differentiable view (each
    channel's gradient comes from the one rank that ran it), and restored after. A DTensor over
    tp is sliced by its local tensor and keeps its placements (Mamba-1's x_proj and dt_proj)."""
    whole: dict[str, Tensor] = {}

    def owners(name: str) -> tuple[dict[str, Tensor | None], str]:
        path, _, leaf = name.rpartition(".")
        module = mixer.get_submodule(path) if path else mixer
        return (module._parameters if leaf in module._parameters else module._buffers), leaf

    def slice_in(_module: nn.Module, _args: object) -> None:
        for name, read in rows.items():
            table, leaf = owners(name)
            tensor = table[leaf]
            assert tensor is not None
            whole[name] = tensor
            table[leaf] = _like(tensor, read(tensor.to_local() if isinstance(tensor, DTensor) else tensor))

    def restore(_module: nn.Module, _args: object, _out: object) -> None:
        for name, tensor in whole.items():
            table, leaf = owners(name)
            table[leaf] = tensor
        whole.clear()

    mixer.register_forward_pre_hook(slice_in)
    # always_call: a recompute that stops early (torch's non-reentrant checkpoint, once the last
    # saved tensor is rebuilt) leaves the mixer's forward by an exception; the next forward would
    # otherwise slice the slices
    mixer.register_forward_hook(restore, always_call=True)


def long_conv_context(mixer: LongConv, shard: ContextShard) -> None:
    """A long-convolution mixer under context parallelism (`cluster.long_conv_exchange`): a
    causal convolution reads every earlier position, so the rank trades its T/cp tokens of the
    first convolution's input for every token of 1/cp of the channels (`ContextShard.to_channels`:
    after Hyena's in_proj or StripedHyena's projections, S4's input), runs the depthwise part
    (short conv, gates, long convolutions) on whole sequences of its channels, and trades back
    before the output projection (`to_sequence`). Weights stay replicated over cp (their
    gradients reduce over dp × cp): during the forward the per-channel ones are replaced by the
    rank's slices, differentiable views of them (each channel's gradient comes from the one rank
    that ran it); Hyena's filter runs whole and hands on the rank's rows."""
    rank, cp = shard.rank, shard.cp
    first, tensors = _channel_tensors(mixer)
    d = mixer.d_model
    _sliced_while_running(mixer, {name: _rows(dim, parts, rank, cp) for name, (dim, parts) in tensors.items()})
    mixer.d_model = d // cp

    def to_channels(_module: nn.Module, _args: object, out: Tensor) -> Tensor:
        return shard.to_channels(out, first)

    def to_sequence(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (shard.to_sequence(args[0]), *args[1:])

    match mixer:
        case HyenaMixer():
            mixer.in_proj.register_forward_hook(to_channels)
            mixer.filter.register_forward_hook(
                lambda _m, _a, h_CL: rank_channels(h_CL, 0, tensors["filter.bias"][1], rank, cp))
            mixer.out_proj.register_forward_pre_hook(to_sequence, prepend=True)
        case StripedHyenaMixer():
            mixer.projections.register_forward_hook(to_channels)
            mixer.out_filter_dense.register_forward_pre_hook(to_sequence, prepend=True)
        case S4Mixer():
            # after TP's own exchange to channel shards (`plans.ChannelShardedInput`)
            mixer.register_forward_pre_hook(lambda _m, args: (shard.to_channels(args[0], first), *args[1:]))
            mixer.output_linear.register_forward_pre_hook(to_sequence, prepend=True)
            if mixer.plan.n_ssm > 1:
                mixer.plan = replace(mixer.plan, n_ssm=mixer.plan.n_ssm // cp)
        case _:
            assert_never(mixer)


# ------------------------------------------------------------------------- selective scans
Mamba = Mamba1Mixer | Mamba2Mixer


def _mamba_problem(mixer: Mamba, cp: int) -> str | None:
    """Megatron-Core's `MambaContextParallel` rules on the tp rank's sizes: Mamba-2's heads split
    over cp, and its groups either split over cp or each go whole to cp/groups ranks; Mamba-1 (no
    context parallelism there) splits its d_inner channels."""
    match mixer:
        case Mamba1Mixer():
            i = mixer.plan.d_inner
            return None if i % cp == 0 else f"Mamba d_inner {i} per tp rank over cp={cp}"
        case Mamba2Mixer():
            h, g = mixer.plan.n_heads, mixer.plan.n_groups
            if h % cp or g % cp and cp % g:
                return f"{h} Mamba-2 heads / {g} groups per tp rank over cp={cp} (groups must split or divide cp)"
            return None
        case _:
            assert_never(mixer)


def _spread(t: Tensor, dim: int, parts: Parts, blocks: tuple[int, ...], groups: int, r: int) -> tuple[Tensor, Parts]:
    """`t` with each of the `groups` groups of channels in `blocks` repeated r times in place, and
    the widened parts: Mamba-2's B and C when a tp rank holds fewer groups than cp ranks, so that
    cp rank c receives whole group c // r with its heads (Megatron-Core `pre_conv_ssm`)."""
    if r == 1:
        return t, parts
    pieces, sizes = list(t.split(parts, dim)), list(parts)
    for k in blocks:
        pieces[k] = pieces[k].unflatten(dim, (groups, -1)).repeat_interleave(r, dim).flatten(dim, dim + 1)
        sizes[k] *= r
    return torch.cat(pieces, dim), tuple(sizes)


def mamba_context(mixer: Mamba, shard: ContextShard) -> None:
    """A Mamba mixer under context parallelism (`cluster.mamba_exchange`), as Megatron-Core's
    `MambaContextParallel`: in_proj runs on the rank's T/cp tokens; its output is traded for every
    token of 1/cp of the channels (`ContextShard.to_channels`), so the causal conv1d and the
    selective scan run on whole sequences of the rank's channels (Mamba-1) or heads with their
    groups' B and C (Mamba-2), with the rank's slices of the per-channel weights; the scan's
    output is traded back before out_proj (`to_sequence`). Mamba-1's x_proj contracts the rank's
    channels: its dt_rank + 2·d_state partial sums are all-reduced over cp (`AllReduce`), as over tp
    (`plans.RowwiseReplicated`), and dt_proj computes the rank's channels only. Mamba-2's gated
    RMSNorm runs on the rank's channels when it holds whole groups; when groups are spread over
    ranks, y and the gate z go back together before it (Megatron gates inside its fused scan
    kernel and sends y alone)."""
    rank, cp = shard.rank, shard.cp

    def to_sequence(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (shard.to_sequence(args[0]), *args[1:])

    match mixer:
        case Mamba1Mixer():
            i = mixer.plan.d_inner
            # every tensor indexed by d_inner: A_log, D, the conv's taps and bias, dt_proj's rows
            rows = {name: _rows(0, (i,), rank, cp) for name, _ in mixer.named_parameters()
                    if name.split(".")[0] in ("A_log", "D", "conv1d", "dt_proj")}
            _sliced_while_running(mixer, rows | {"x_proj.weight": _rows(1, (i,), rank, cp)})
            mixer.in_proj.register_forward_hook(lambda _m, _a, out: shard.to_channels(out, (i, i)))
            mixer.x_proj.register_forward_hook(lambda _m, _a, out: AllReduce.apply(out, shard.group))
            mixer.out_proj.register_forward_pre_hook(to_sequence, prepend=True)
            mixer.plan = replace(mixer.plan, d_inner=i // cp)
        case Mamba2Mixer():
            p = mixer.plan
            i, hs, g, gn = p.d_inner, p.n_heads, p.n_groups, p.n_groups * p.d_state
            r = max(cp // g, 1)
            conv = (i, gn, gn)

            def conv_rows(t: Tensor) -> Tensor:
                spread, parts = _spread(t, 0, conv, (1, 2), g, r)
                return rank_channels(spread, 0, parts, rank, cp)

            def to_channels(_module: nn.Module, _args: object, out: Tensor) -> Tensor:
                return shard.to_channels(*_spread(out, 2, (i, i, gn, gn, hs), (2, 3), g, r))

            rows = {name: conv_rows for name, _ in mixer.conv1d.named_parameters(prefix="conv1d")}
            rows |= {name: _rows(0, (hs,), rank, cp) for name in ("dt_bias", "A_log", "D")}
            mixer.in_proj.register_forward_hook(to_channels)
            if r == 1:  # whole groups on the rank: its heads' norm groups run where they are
                rows["norm.weight"] = _rows(0, (i,), rank, cp)
                mixer.norm.n_groups //= cp
                mixer.out_proj.register_forward_pre_hook(to_sequence, prepend=True)
            else:
                def yz_to_sequence(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
                    return tuple(shard.to_sequence(torch.cat(args, -1), 2).chunk(2, -1))

                mixer.norm.register_forward_pre_hook(yz_to_sequence)
            _sliced_while_running(mixer, rows)
            mixer.plan = replace(p, d_inner=i // cp, n_heads=hs // cp, n_groups=g * r // cp)
        case _:
            assert_never(mixer)
