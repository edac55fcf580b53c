"""Tensor / sequence parallel plans as data beside each module kind (torchtitan's `parallelize`
manner: the modules know nothing of tensor parallelism).

Megatron-LM's split (Shoeybi et al. 2019 §3; sequence parallelism, Korthikanti et al. 2022 §4.2.2):
the projections into heads or the FFN width are column-parallel, the projection back to d_model
row-parallel; the residual stream between sub-blocks is sequence-sharded (Shard(1)) under SP,
replicated without it; norms run on the sequence shard (`SequenceParallel`, whose weight gradients
DTensor all-reduces over tp). Each sub-block's input is gathered to Replicate once
(`PrepareModuleInput`, kept a DTensor so its backward makes one reduce-scatter / all-reduce for all
the column-parallel projections that read it). The embedding is vocabulary-parallel (row-wise),
the head column-parallel over the vocabulary with a vocabulary-parallel loss (`loss_parallel`).

A module whose forward reads head counts from its plan gets a *local* plan (heads ÷ tp), the plan
of the shard it computes: the same module code runs sharded or not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)
from typing_extensions import assert_never

from archplan.errors import ArchplanError
from archplan.modules.attention import Attention
from archplan.modules.ffn import GLU, MLP
from archplan.modules.hyena import HyenaMixer
from archplan.modules.mamba1 import Mamba1Mixer
from archplan.modules.mamba2 import Mamba2Mixer
from archplan.modules.mla import MLA
from archplan.modules.moe import MoEFFN
from archplan.modules.norms import LayerNorm, RMSNorm, for_unit, normalise_with, width_moments
from archplan.modules.positions import Alibi, alibi_slopes
from archplan.modules.s4 import S4Mixer
from archplan.modules.stripedhyena import StripedHyenaMixer
from archplan.resolve import AttentionPlan, ModelPlan
from archplan.units import things


def residual_layout(sp: bool) -> Placement:
    """How the residual stream between sub-blocks is laid out over the TP group."""
    return Shard(1) if sp else Replicate()


@dataclass(frozen=True)
class TPPlan:
    """Styles by submodule path ("" = the module itself), the local plan of a shard, and what else
    a rank's shard keeps of its own (`localize(module, tp_rank, tp)`: ALiBi slopes of its heads)."""

    styles: dict[str, ParallelStyle]
    local_plan: Callable[[object, int], object] | None = None
    localize: Callable[[nn.Module, int, int], None] | None = None


class RankAlibi(Alibi):
    """The ALiBi slopes of one tp rank's heads: rows [start, start + count) of the global table
    (Press et al. 2022 §3; BLOOM's Megatron-DeepSpeed slices them the same way)."""

    def __init__(self, total: int, start: int, count: int, scale: float) -> None:
        self.total, self.start = total, start
        super().__init__(count, scale)

    def signature(self) -> tuple[object, ...]:
        return ("rank", self.total, self.start, self.n_heads, self.scale)

    def reset_buffers(self) -> None:
        table = alibi_slopes(self.total)[self.start:self.start + self.n_heads]
        self.slopes = torch.tensor([s * self.scale for s in table], dtype=torch.float32, device=self.slopes.device)


def _rank_alibi(module: nn.Module, rank: int, tp: int) -> None:
    alibi = getattr(module, "alibi", None)
    if alibi is not None:
        count = alibi.n_heads // tp
        module.alibi = RankAlibi(alibi.n_heads, rank * count, count, alibi.scale).to(alibi.slopes.device)


def _gathered_input(sp: bool) -> PrepareModuleInput:
    # (x, state): the cache state is None in training
    return PrepareModuleInput(input_layouts=(residual_layout(sp), None), desired_input_layouts=(Replicate(), None))


def attention_plan(module: Attention, sp: bool) -> TPPlan:
    """Megatron's attention: q/k/v column-parallel over the heads, o_proj row-parallel; with fewer
    KV heads than tp ranks (MQA among them) k_proj and v_proj split by rows and gather their
    output (`KVHeads`)."""
    p = module.plan
    kv = KVHeads(p.n_kv_heads, p.head_dim)
    styles: dict[str, ParallelStyle] = {
        "": _gathered_input(sp),
        "q_proj": ColwiseParallel(),
        "k_proj": kv,
        "v_proj": kv,
        "o_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    } | qk_norm_styles(module.plan)
    return TPPlan(styles, lambda plan, tp: replace(plan, n_heads=plan.n_heads // tp,
                                                   n_kv_heads=max(1, plan.n_kv_heads // tp)), _rank_alibi)


class Replicated(ParallelStyle):
    """Parameters replicated over tp as DTensors (torchtitan's `NoParallel`): the module runs on the
    gathered Replicate input, and where its output's gradient arrives as a Partial sum (each rank's
    heads or tokens contribute a part) DTensor reduces its weight gradients over tp."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh)


class LocalWithPartialGrad(ParallelStyle):
    """The module's Replicate DTensor output becomes this rank's local tensor, its gradient declared
    a Partial sum (`to_local(grad_placements=(Partial(),))`): each rank's heads use their local copy,
    and DTensor sums the parts over tp where the gradient meets the replicated weights before it."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_local(_module: nn.Module, _inputs: object, out: DTensor) -> object:
            return out.to_local(grad_placements=(Partial(),))

        module.register_forward_hook(to_local)
        return module


class RowShardParallel(ParallelStyle):
    """Input rows that are this rank's own, weights whole on every rank: torch's `SequenceParallel`
    on the flattened (B·T/tp, D) rows of an MoE layer (sequence dim 0, the default), or a qk-norm
    on the rank's heads (dim 2 of (B, T, H/tp, Dh) shared by the heads, dim 1 of (B, H/tp, T, Dh)
    per head; `qk_norm_styles`). Parameters replicated as
    DTensors (`weights`; Shard(0) for per-head weights that follow their heads), buffers left
    plain (distribute_module would replicate the router's score-correction bias too, which the
    routing then adds to plain scores). The input is made a DTensor sharded on `dim`, so the
    gradients of replicated weights come out Partial and are summed over tp."""

    def __init__(self, dim: int = 0, weights: Placement = Replicate()) -> None:
        super().__init__()
        self.dim, self.weights = dim, weights

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, param in list(module.named_parameters(recurse=False)):
            # src_data_rank=None: every rank splits its own copy (the same seed built them)
            local = distribute_tensor(param.detach(), device_mesh, [self.weights], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))

        def shard_rows(_module: nn.Module, inputs: tuple[object, ...]) -> tuple[object, ...]:
            return tuple(DTensor.from_local(x, device_mesh, [Shard(self.dim)], run_check=False) for x in inputs)

        def to_local(_module: nn.Module, _inputs: object, out: DTensor) -> object:
            return out.to_local()

        module.register_forward_pre_hook(shard_rows)
        module.register_forward_hook(to_local)
        return module


def _sum_over(stats: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Each rank's partial sums → their total on every rank: one all-reduce forward, and one of the
    gradient backward (each rank's gradient of the total is its own heads' part)."""
    total = DTensor.from_local(stats, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    return total.to_local(grad_placements=(Partial(),))


def width_sharded_norm(norm: RMSNorm | LayerNorm, mesh: DeviceMesh, width: int, x: torch.Tensor) -> torch.Tensor:
    """`norm` over a width split across tp ranks (OLMo-2's qk-norm over n_heads·head_dim, each rank
    holding its heads' columns): RMSNorm from the all-reduced sum of squares, LayerNorm from the
    all-reduced [sum, sum of squares] (one call), in fp32 as `modules.norms` computes, keeping x in
    its own dtype as the unsharded norms do; the weights are the rank's columns (Shard(0))."""
    match norm:
        case RMSNorm():
            mean: torch.Tensor | None = None
            mean_sq = _sum_over(width_moments(x, centred=False), mesh) / width
        case LayerNorm():
            mean, mean_sq = (_sum_over(width_moments(x, centred=True), mesh) / width).split(1, dim=-1)
        case _:
            assert_never(norm)
    weight = for_unit(norm.weight.to_local()) if norm.weight is not None else None
    bias = for_unit(norm.bias.to_local()) if isinstance(norm, LayerNorm) and norm.bias is not None else None
    return normalise_with(x, mean, mean_sq, weight, bias, norm.eps).type_as(x)


class WidthShardedNorm(ParallelStyle):
    """A norm whose normalised width is split over tp (`width_sharded_norm`): weights Shard(0), the
    module's forward replaced by the distributed one (DTensor's own layer/RMS norm would all-gather
    the whole input to Replicate first, b·s·n_heads·head_dim per call, where the statistics need
    one fp32 value, or two, per token)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        assert isinstance(module, RMSNorm | LayerNorm)
        width = module.shape[0]
        for name, param in list(module.named_parameters(recurse=False)):
            local = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(local, requires_grad=param.requires_grad))
        module.forward = partial(width_sharded_norm, module, device_mesh, width)  # type: ignore[method-assign]
        return module


def qk_norm_styles(plan: AttentionPlan) -> dict[str, ParallelStyle]:
    """qk-norm under tp (each rank holds whole heads): `head` (one head_dim-wide norm shared by
    the heads, normed token-major: dim 2 of (B, T, H/tp, Dh)) is replicated on the rank's heads, its
    weight gradients summed over tp; `per_head`
    weights follow their heads (Shard(0), local); `full` (over n_heads·head_dim) normalises across
    the ranks (`WidthShardedNorm`). One KV head (MQA) is whole on every rank: its k-norm is
    replicated whatever the scope, its gradients summed over tp."""
    if plan.qk_norm is None:
        return {}
    scope = plan.qk_norm.scope
    match scope:
        case "head":
            q: ParallelStyle = RowShardParallel(dim=2)
        case "per_head":
            q = RowShardParallel(dim=1, weights=Shard(0))
        case "full":
            q = WidthShardedNorm()
        case _:
            assert_never(scope)
    # the one KV head's rows: its heads dim, or for `full` (B, T, Dh) its batch dim
    heads = {"full": 0, "head": 2, "per_head": 1}[scope]
    k = RowShardParallel(dim=heads) if plan.n_kv_heads == 1 else q
    return {"q_norm": q, "k_norm": k}


class KVHeads(ParallelStyle):
    """k_proj or v_proj, column-parallel over the KV heads where they split whole over tp. With
    fewer KV heads than tp ranks, as Megatron-Core runs them (`Attention`'s `num_query_groups <
    world_size` branch): the weight's rows split evenly over tp, so a rank's rows cut across a
    head; the projection's output is all-gathered over tp and the rank keeps the head its query
    heads read, rank // (tp / n_kv), as Megatron-Core indexes its groups. Its gradient is declared
    a Partial sum (each rank's query heads contribute a part), which the gather's backward
    reduce-scatters to the rank's rows. The kept head is copied out, so the gathered heads are
    freed at once (`planning.cluster` prices the gather, and a rank's one head as activations)."""

    def __init__(self, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        if self.n_kv_heads >= tp:
            return ColwiseParallel()._apply(module, device_mesh)
        module = ColwiseParallel(use_local_output=False)._apply(module, device_mesh)
        head = device_mesh.get_local_rank() // (tp // self.n_kv_heads)
        kept = slice(head * self.head_dim, (head + 1) * self.head_dim)

        def keep_head(_module: nn.Module, _inputs: object, out: DTensor) -> torch.Tensor:
            whole = out.redistribute(out.device_mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))
            return whole[..., kept].contiguous()

        module.register_forward_hook(keep_head)
        return module


def mla_plan(module: MLA, sp: bool) -> TPPlan:
    """DeepSeek-V3's tensor-parallel MLA (torchtitan `deepseek_v3/infra/parallelize.py`): the latent
    down-projections and their norms are replicated (they run on every rank's gathered input), the
    up-projections q_b_proj / kv_b_proj (q_proj without a query latent) column-parallel over the
    heads, o_proj row-parallel. The latent c_kv stays a Replicate DTensor into kv_b_proj, so its
    gradient returns as a Partial sum; the rotary key k_pe, which every head reads, is made local
    with a Partial gradient (`LocalWithPartialGrad`): torch sums both over tp in the backward, and
    all-reduces the replicated weights' gradients."""
    styles: dict[str, ParallelStyle] = {
        "": _gathered_input(sp),
        "kv_a_proj_with_mqa": Replicated(),
        "kv_a_norm": Replicated(),
        "k_pe": LocalWithPartialGrad(),
        "kv_b_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    if module.q_proj is not None:
        styles["q_proj"] = ColwiseParallel()
    else:
        styles |= {"q_a_proj": Replicated(), "q_a_norm": Replicated(), "q_b_proj": ColwiseParallel()}
    return TPPlan(styles, lambda plan, tp: replace(plan, n_heads=plan.n_heads // tp), _rank_alibi)


def _ffn_styles(module: MLP | GLU, outside: Placement) -> dict[str, ParallelStyle]:
    styles: dict[str, ParallelStyle] = {
        "": PrepareModuleInput(input_layouts=(outside,), desired_input_layouts=(Replicate(),)),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=outside),
    }
    if isinstance(module, GLU):
        styles["gate_proj"] = ColwiseParallel()
    return styles


def ffn_plan(module: MLP | GLU, sp: bool) -> TPPlan:
    return TPPlan(_ffn_styles(module, residual_layout(sp)))


def moe_plan(module: MoEFFN, sp: bool) -> TPPlan:
    """An MoE layer under tensor + sequence parallelism, as Megatron-Core runs it with expert tensor
    parallelism 1 (`MoELayer`, `TopKRouter`, `SharedExpertMLP`): each tp rank routes its own
    sequence shard (the flattened (B·T/tp, D) rows) with the router replicated, its rows go through
    the expert all-to-all over ep (`expert.py`) to whole experts, and come back to the same shard.
    The router's and the shared gate's weights see only the rank's tokens: their gradients are
    summed over tp (Megatron marks them `sequence_parallel`; here DTensor's Partial → Replicate).
    Shared experts are a tensor-parallel FFN on those rows: gathered over tp, column/row-parallel,
    reduce-scattered back. Without SP every tp rank would route the same tokens (Megatron-Core
    refuses it too: `refusal`)."""
    styles: dict[str, ParallelStyle] = {"router": RowShardParallel()}
    if module.shared_gate is not None:
        styles["shared_gate"] = RowShardParallel()
    if module.shared is not None:
        styles |= {f"shared.{k}" if k else "shared": v for k, v in _ffn_styles(module.shared, Shard(0)).items()}
    return TPPlan(styles)


class SequenceShardedPositions(ParallelStyle):
    """Absolute positions added to a sequence-parallel residual stream: every tp rank computes the
    whole (T, D) table (a learned table replicated as a DTensor, its position ids made Replicate),
    and keeps the rows of its own sequence shard (Replicate → Shard(0), a local slice in torch.chunk's
    way, as the residual stream's Shard(1)). In the backward DTensor all-gathers the (T, D) gradient
    of the rows, so every rank's table gradient is whole and equal, no all-reduce of the table
    (Megatron-LM adds the positions before scattering the sequence, `LanguageModelEmbedding`: the
    same all-gather, of the whole embedding gradient)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, nn.Embedding):  # a learned table
            def replicate_ids(_module: nn.Module, inputs: tuple[object, ...], mesh: DeviceMesh) -> tuple[object, ...]:
                return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                             if isinstance(x, torch.Tensor) else x for x in inputs)

            module = distribute_module(module, device_mesh, input_fn=replicate_ids)

        def own_rows(_module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, DTensor):  # a computed table (sinusoidal): the same on every rank
                out = DTensor.from_local(out, device_mesh, [Replicate()], run_check=False)
            return out.redistribute(device_mesh, [Shard(0)]).to_local()

        module.register_forward_hook(own_rows)
        return module


def positions_plan(sp: bool) -> ParallelStyle | None:
    """Without SP the residual stream is whole on every rank and the positions are added as they are."""
    return SequenceShardedPositions() if sp else None


# ------------------------------------------------------------- SSM and long-convolution mixers
Parts = tuple[int, ...]


def rank_channels(t: torch.Tensor, dim: int, parts: Parts, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s channels of a tensor whose `dim` concatenates blocks of `parts` channels (a
    fused projection's [x | z], a conv over [x | B | C]): its 1/tp of every block, in block order.
    One block is a view: a weight sliced so while a mixer runs under cp is saved by its matmul,
    and a copy would be kept per micro-batch in flight."""
    if len(parts) == 1:
        n = parts[0] // tp
        return t.narrow(dim, rank * n, n)
    chunks, start = [], 0
    for size in parts:
        n = size // tp
        chunks.append(t.narrow(dim, start + rank * n, n))
        start += size
    return torch.cat(chunks, dim)


def _record_view(module: nn.Module, name: str, view: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """How a parameter's stored form (its DTensor's global tensor, or a plain local slice) reads
    off the unsharded one (`parity` compares gradients through it)."""
    module.__dict__.setdefault("tp_views", {})[name] = view


class FusedColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a Linear whose outputs are several column blocks (Mamba's in_proj
    [x | z] or [z | x | B | C | dt], Hyena's N_o + 1 projections): each rank keeps its 1/tp of every
    block, as Megatron-LM lays out a fused QKV per rank, so its local output is the same blocks at
    1/tp width and the module splits it as before. The DTensor is Shard(0) over those rank-ordered
    rows: its global tensor is the unsharded weight with rows regrouped by rank (`rank_channels`)."""

    def __init__(self, parts: Parts, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.parts = parts

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        rank, tp = device_mesh.get_local_rank(), device_mesh.size()
        for pname, param in list(module.named_parameters()):
            local = rank_channels(param.detach(), 0, self.parts, rank, tp).clone()
            sharded = DTensor.from_local(local, device_mesh, [Shard(0)], run_check=False)
            module.register_parameter(pname, nn.Parameter(sharded, requires_grad=param.requires_grad))
            parts = self.parts
            _record_view(module, pname, lambda full, p=parts, n=tp: torch.cat(
                [rank_channels(full, 0, p, r, n) for r in range(n)]))


class OwnTensors(ParallelStyle):
    """A module's own parameters and buffers (not its submodules'): `channels` ones replaced by this
    rank's channels (`rank_channels`, name -> (dim, parts)) as plain tensors, since a per-channel
    tensor (a depthwise conv's taps, A_log, D, a filter's decay) meets only that rank's channels
    and its gradient needs no reduction (Megatron-Core's MambaMixer stores them per rank the same
    way); `replicated` ones as Replicate DTensors, read by every rank's channels, whose Partial
    gradients DTensor sums over tp."""

    def __init__(self, channels: dict[str, tuple[int, Parts]], replicated: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.channels, self.replicated = channels, replicated

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, tp = device_mesh.get_local_rank(), device_mesh.size()
        for name, (dim, parts) in self.channels.items():
            full = getattr(module, name)
            local = rank_channels(full.detach(), dim, parts, rank, tp).clone()
            if name in module._parameters:
                module.register_parameter(name, nn.Parameter(local, requires_grad=full.requires_grad))
                _record_view(module, name, lambda t, d=dim, p=parts: rank_channels(t, d, p, rank, tp))
            else:
                module._buffers[name] = local
        for name in self.replicated:
            param = module._parameters[name]
            assert param is not None
            replicated = DTensor.from_local(param.detach(), device_mesh, [Replicate()], run_check=False)
            module.register_parameter(name, nn.Parameter(replicated, requires_grad=param.requires_grad))
        return module


class ReplicatedOnInput(ParallelStyle):
    """`Replicated`, its plain tensor inputs taken as Replicate DTensors (the same on every rank:
    Hyena's positional features when they are a buffer)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_module: nn.Module, inputs: tuple[object, ...], mesh: DeviceMesh) -> tuple[object, ...]:
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

        return distribute_module(module, device_mesh, input_fn=to_dtensor)


class RowwiseReplicated(RowwiseParallel):
    """A row-parallel Linear whose output every rank reads whole (Mamba-1's x_proj): its partial
    sums all-reduced in the forward, and in the backward the parts of its gradient that each
    rank's consumers return (Partial) all-reduced once before the Linear's own backward: Megatron's
    reduce / copy-to-region pair. Plain DTensor would keep that gradient Partial and gather the
    weight and the input instead (measured: four collectives of the weight's and the input's size
    where one of the output's suffices). The output is re-entered `from_local` as Replicate, whose
    backward redistributes the arriving Partial gradient to Replicate."""

    def __init__(self) -> None:
        super().__init__(input_layouts=Shard(-1), output_layouts=Replicate(), use_local_output=False)

    @staticmethod
    def _prepare_output_fn(output_layouts: tuple[Placement, ...], use_local_output: bool, mod: nn.Module,
                           outputs: DTensor, device_mesh: DeviceMesh) -> DTensor:
        reduced = outputs.redistribute(placements=output_layouts)
        return DTensor.from_local(reduced.to_local(), device_mesh, output_layouts, run_check=False)


def mamba1_plan(module: Mamba1Mixer, sp: bool) -> TPPlan:
    """Mamba-1 over tp ranks (the Mamba authors' and Megatron's split of d_inner): in_proj
    column-parallel on both halves [x | z]; the depthwise conv1d, A_log and D per channel, local;
    x_proj contracts the rank's channels, so its (dt_rank + 2·d_state)-wide output is a partial sum,
    all-reduced (`RowwiseParallel` to Replicate); dt_proj column-parallel from that replicated
    dt_rank input; Jamba's dt/B/C norms replicated on it. B and C enter the scan made local with a
    Partial gradient (`LocalWithPartialGrad` at the `bc` hook): every channel reads them. out_proj
    row-parallel. The rank's parts of the gradients of B, C and the dt input come back as a Partial
    sum that DTensor all-reduces before x_proj's backward."""
    i = module.plan.d_inner
    styles: dict[str, ParallelStyle] = {
        "": Composed(_gathered_input(sp), OwnTensors({"A_log": (0, (i,)), "D": (0, (i,))})),
        "in_proj": FusedColwiseParallel((i, i)),
        "conv1d": OwnTensors({"weight": (0, (i,))} | ({"bias": (0, (i,))} if module.conv1d.bias is not None else {})),
        "x_proj": RowwiseReplicated(),
        "dt_proj": ColwiseParallel(),
        "bc": LocalWithPartialGrad(),
        "out_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    if module.dt_layernorm is not None:
        styles |= {name: Replicated() for name in ("dt_layernorm", "b_layernorm", "c_layernorm")}
    return TPPlan(styles, lambda plan, tp: replace(plan, d_inner=plan.d_inner // tp))


class Composed(ParallelStyle):
    """Several styles on one module, applied in order (a mixer's input preparation and its own
    per-channel tensors share the path "")."""

    def __init__(self, *styles: ParallelStyle) -> None:
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module


def _bias(module: nn.Module, name: str, dim_parts: tuple[int, Parts]) -> dict[str, tuple[int, Parts]]:
    return {name: dim_parts} if getattr(module, name, None) is not None else {}


def mamba2_plan(module: Mamba2Mixer, sp: bool) -> TPPlan:
    """Mamba-2 over tp ranks as Dao & Gu 2024 §8 designed it (and Megatron-Core's MambaMixer): each
    rank holds Hs/tp heads and G/tp whole groups, so in_proj is column-parallel per block
    [z | x | B | C | dt], the depthwise conv over [x | B | C], dt_bias, A_log, D and the gated
    RMSNorm's weight (its groups whole on a rank) are per-channel and local, out_proj row-parallel:
    one reduction per mixer, as an attention block."""
    p = module.plan
    i, gn, hs = p.d_inner, p.n_groups * p.d_state, p.n_heads
    conv = (0, (i, gn, gn))
    styles: dict[str, ParallelStyle] = {
        "": Composed(_gathered_input(sp), OwnTensors({name: (0, (hs,)) for name in ("dt_bias", "A_log", "D")})),
        "in_proj": FusedColwiseParallel((i, i, gn, gn, hs)),
        "conv1d": OwnTensors({"weight": conv} | _bias(module.conv1d, "bias", conv)),
        "norm": OwnTensors({"weight": (0, (i,))}),
        "out_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }

    def local_groups(mixer: nn.Module, _rank: int, tp: int) -> None:
        mixer.norm.n_groups //= tp

    return TPPlan(styles, lambda plan, tp: replace(plan, d_inner=plan.d_inner // tp, n_heads=plan.n_heads // tp,
                                                   n_groups=plan.n_groups // tp), local_groups)


def _local_channels(mixer: nn.Module, _rank: int, tp: int) -> None:
    mixer.d_model //= tp


def hyena_plan(module: HyenaMixer, sp: bool) -> TPPlan:
    """Hyena (Poli et al. 2023) over tp ranks, split by channel as Megatron splits heads: in_proj
    column-parallel on each of its N_o + 1 blocks, so the depthwise short conv, the gates and the
    long convolutions run on the rank's channels; the implicit filter's output layer mlp_out and
    its skip bias and decay per channel (a rank generates its channels' filters only); the
    filter's trunk (positional features, mlp_in, mlp_inner, the Sin frequency) replicated, run
    whole on every rank, its gradients summed over tp; out_proj row-parallel. The filter rows
    interleave the orders (`order_channels`), so a rank's channels of every order are one block."""
    d, o = module.d_model, module.plan.order
    inner, filters = (0, (d,) * (o + 1)), ((o - 1) * d,)
    flt = module.filter
    trunk = ("freq", "z") if isinstance(flt.z, nn.Parameter) else ("freq",)
    styles: dict[str, ParallelStyle] = {
        "": _gathered_input(sp),
        "in_proj": FusedColwiseParallel(inner[1]),
        "short_filter": OwnTensors({"weight": inner} | _bias(module.short_filter, "bias", inner)),
        "filter": OwnTensors({"bias": (0, filters)} | _bias(flt, "deltas", (2, filters)), replicated=trunk),
        "filter.mlp_in": ReplicatedOnInput(),
        "filter.mlp_out": FusedColwiseParallel(filters),
        "out_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    styles |= {f"filter.mlp_inner.{j}": Replicated() for j in range(len(flt.mlp_inner))}
    return TPPlan(styles, localize=_local_channels)


def striped_hyena_plan(module: StripedHyenaMixer, sp: bool) -> TPPlan:
    """StripedHyena's hyena mixer over tp ranks (the reference trains with Megatron-style column
    splits, `column_split_hyena`): projections column-parallel on each of [x2 | x1 | v], the short
    FIR's taps and bias on those channels, D and the modal filters' poles and residues (filter c
    serves channels c·g … c·g + g − 1) local; out_filter_dense row-parallel."""
    d, filters = module.d_model, module.poles.shape[0]
    fir = (0, (d, d, d))
    own = {"short_filter_weight": fir, "D": (0, (d,)), "poles": (0, (filters,)), "residues": (0, (filters,))}
    styles: dict[str, ParallelStyle] = {
        "": Composed(_gathered_input(sp), OwnTensors(own | _bias(module, "short_filter_bias", fir))),
        "projections": FusedColwiseParallel(fir[1]),
        "out_filter_dense": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    return TPPlan(styles, localize=_local_channels)


class SSMCopies(ParallelStyle):
    """S4's S copies of (A, B, P) (H/S channels each): split with the channels when S divides over
    tp (plain local tensors, as `OwnTensors`); one copy is read by every rank's channels, so its
    parameters are Replicate DTensors, made local at the module's `copies` hook with a Partial
    gradient, summed over tp (as MQA's one KV head). Buffers (the reference's lr = 0) stay whole."""

    def __init__(self, names: tuple[str, ...], copies: int) -> None:
        super().__init__()
        self.names, self.n = names, copies

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.n % device_mesh.size() == 0:
            return OwnTensors({name: (0, (self.n,)) for name in self.names})._apply(module, device_mesh)
        OwnTensors({}, replicated=tuple(n for n in self.names if n in module._parameters))._apply(module, device_mesh)

        def to_local(_module: nn.Module, _inputs: object, out: torch.Tensor) -> torch.Tensor:
            return out.to_local(grad_placements=(Partial(),)) if isinstance(out, DTensor) else out

        module.copies.register_forward_hook(to_local)
        return module


class ChannelShardedInput(ParallelStyle):
    """A mixer's (b, s, d) input as this rank's d/tp channels of the whole sequence. Under SP an
    all-to-all from sequence shards to channel shards (torch's autograd-aware functional
    `all_to_all_single`, an all-to-all back in the backward; DTensor's own Shard(1) -> Shard(2)
    runs an all-gather on a CPU mesh); without SP a local slice of the Replicate input, whose
    gradient DTensor all-gathers from the ranks' channel slices."""

    def __init__(self, sp: bool) -> None:
        super().__init__()
        self.sp = sp

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp, group = device_mesh.size(), device_mesh.get_group()

        def to_channels(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x_BSD, *rest = inputs
            if self.sp:
                b, s, d = x_BSD.shape
                send_PBSC = x_BSD.unflatten(2, (tp, d // tp)).movedim(2, 0).contiguous()
                recv_PBSC = all_to_all_single_autograd(send_PBSC, None, None, group)
                x_BTC = recv_PBSC.movedim(0, 1).reshape(b, tp * s, d // tp)
            else:
                whole = DTensor.from_local(x_BSD, device_mesh, [Replicate()], run_check=False)
                x_BTC = whole.redistribute(placements=[Shard(2)]).to_local()
            return (x_BTC, *rest)

        module.register_forward_pre_hook(to_channels)
        return module


def s4_plan(module: S4Mixer, sp: bool) -> TPPlan:
    """S4 / S4D over tp ranks by channel: it has no input projection, so its input goes from the
    residual layout straight to channel shards (`ChannelShardedInput`); D, C and log Δ follow the channels, the S
    SSM copies split with them or stay replicated (`SSMCopies`); output_linear (H → 2H) is
    row-parallel, its 2H partial sums reduced (reduce-scattered under SP) before the GLU."""
    d, s = module.d_model, module.plan.n_ssm
    own = {name: (0, (d,)) for name in ("D", "C", "log_dt")}
    copies = tuple(name for name in ("B", "A_log_real", "A_imag", "P") if hasattr(module, name))
    styles: dict[str, ParallelStyle] = {
        "": Composed(ChannelShardedInput(sp), OwnTensors(own), SSMCopies(copies, s)),
        "output_linear": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    return TPPlan(styles, lambda plan, tp: replace(plan, n_ssm=plan.n_ssm // tp if plan.n_ssm % tp == 0 else plan.n_ssm),
                  _local_channels)


def norm_plan(sp: bool) -> ParallelStyle | None:
    # use_local_output: the residual stream stays plain local tensors between sub-blocks
    return SequenceParallel(use_local_output=True) if sp else None


def refusal(module: nn.Module, plan: ModelPlan, tp: int) -> str | None:
    """Why a module cannot be tensor-parallel over tp ranks (None: it can)."""
    match module:
        case Attention():
            p = module.plan
            if not p.splits_over(tp):
                return f"{p.n_heads} query / {p.n_kv_heads} key-value heads do not split over tp={tp}"
            scope = p.qk_norm.scope if p.qk_norm is not None else None
            if 1 < p.n_kv_heads < tp and scope in ("per_head", "full"):
                # the k-norm's weights are per KV head: a rank would need its group's rows of them
                return (f"a {scope} k-norm over {p.n_kv_heads} KV heads at tp={tp} (fewer KV heads than "
                        "tp ranks are built with no k-norm or one shared by the heads)")
            return None
        case MLA():
            if module.plan.n_heads % tp:
                return f"{module.plan.n_heads} MLA heads do not split over tp={tp}"
            return None
        case MoEFFN():
            shared = module.shared
            if shared is not None and shared.up_proj.out_features % tp:
                return f"shared-expert d_ff {shared.up_proj.out_features} over tp={tp}"
            return None
        case Mamba1Mixer():
            i = module.plan.d_inner
            return None if i % tp == 0 else f"Mamba d_inner {i} over tp={tp}"
        case Mamba2Mixer():
            p = module.plan
            if p.n_heads % tp or p.n_groups % tp:
                return (f"{things(p.n_heads, 'Mamba-2 head')} / {things(p.n_groups, 'group')} do not split over tp={tp} "
                        "(B and C replicated for fewer groups than tp ranks is not built)")
            return None
        case S4Mixer():
            d, s = module.d_model, module.plan.n_ssm
            if d % tp or s % tp and s != 1:
                return f"S4's {d} channels / {s} SSM copies over tp={tp} (one copy is replicated, more must split)"
            return None
        case HyenaMixer() | StripedHyenaMixer():
            d = module.d_model
            filters = module.poles.shape[0] if isinstance(module, StripedHyenaMixer) else d
            if d % tp == 0 and filters % tp == 0:
                return None
            return f"{d} channels / {things(filters, 'filter')} over tp={tp}"
        case MLP() | GLU():
            return None if module.up_proj.out_features % tp == 0 else f"d_ff {module.up_proj.out_features} over tp={tp}"
        case _:
            return None


def model_refusal(plan: ModelPlan, tp: int, sp: bool) -> str | None:
    if tp == 1:
        return None
    if plan.tied and plan.lm_head_bias:
        return "a tied head with a bias under tensor parallelism"
    if not sp and plan.routed:
        # Megatron-Core's MoELayer raises the same: every tp rank would route the same tokens
        return "MoE layers under tensor parallelism without sequence parallelism"
    return None


def module_plan(module: nn.Module, sp: bool) -> TPPlan | None:
    match module:
        case Attention():
            return attention_plan(module, sp)
        case MLA():
            return mla_plan(module, sp)
        case MLP() | GLU():
            return ffn_plan(module, sp)
        case MoEFFN():
            return moe_plan(module, sp)
        case Mamba1Mixer():
            return mamba1_plan(module, sp)
        case Mamba2Mixer():
            return mamba2_plan(module, sp)
        case HyenaMixer():
            return hyena_plan(module, sp)
        case StripedHyenaMixer():
            return striped_hyena_plan(module, sp)
        case S4Mixer():
            return s4_plan(module, sp)
        case _:
            return None


def check_tp(plan: ModelPlan, model: nn.Module, tp: int, sp: bool) -> None:
    reasons = [model_refusal(plan, tp, sp)]
    if tp > 1:
        reasons += [refusal(m, plan, tp) for m in model.modules()]
    first = next((r for r in reasons if r), None)
    if first:
        raise ArchplanError(f"--layout: not run on torch.distributed: {first}")
