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
from typing_extensions import assert_never
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from archplan.errors import ArchplanError
from archplan.modules.attention import Attention
from archplan.modules.ffn import GLU, MLP
from archplan.modules.hyena import HyenaMixer
from archplan.modules.mamba1 import Mamba1Mixer
from archplan.modules.mamba2 import Mamba2Mixer
from archplan.modules.mla import MLA
from archplan.modules.moe import MoEFFN
from archplan.modules.norms import LayerNorm, RMSNorm
from archplan.modules.positions import Alibi, alibi_slopes
from archplan.modules.s4 import S4Mixer
from archplan.modules.stripedhyena import StripedHyenaMixer
from archplan.resolve import AttentionPlan, ModelPlan, MoEPlan


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

    def __init__(self, total: int, start: int, count: int) -> None:
        self.total, self.start = total, start
        super().__init__(count)

    def reset_buffers(self) -> None:
        table = alibi_slopes(self.total)[self.start:self.start + self.n_heads]
        self.slopes = torch.tensor(table, dtype=torch.float32, device=self.slopes.device)


def _rank_alibi(module: nn.Module, rank: int, tp: int) -> None:
    alibi = getattr(module, "alibi", None)
    if alibi is not None:
        count = alibi.n_heads // tp
        module.alibi = RankAlibi(alibi.n_heads, rank * count, count).to(alibi.slopes.device)


def _gathered_input(sp: bool) -> PrepareModuleInput:
    # (x, state): the cache state is None in training
    return PrepareModuleInput(input_layouts=(residual_layout(sp), None), desired_input_layouts=(Replicate(), None))


def attention_plan(module: Attention, sp: bool) -> TPPlan:
    """Megatron's attention: q/k/v column-parallel over the heads, o_proj row-parallel. With one KV
    head (MQA) and tp > 1 every rank keeps that head whole (Megatron replicates KV heads below tp):
    k_proj / v_proj replicated, their outputs local with Partial gradients (`SharedByHeads`)."""
    kv = SharedByHeads() if module.plan.n_kv_heads == 1 else ColwiseParallel()
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
    on the rank's heads (dim 1 of (B, H/tp, T, Dh); `qk_norm_styles`). Parameters replicated as
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
    all-reduced [sum, sum of squares] (one call), in fp32 as `modules.norms` computes; the weights
    are the rank's columns (Shard(0))."""
    x32 = x.float()
    match norm:
        case RMSNorm():
            mean_sq = _sum_over(x32.pow(2).sum(-1, keepdim=True), mesh) / width
            y = x32 * torch.rsqrt(mean_sq + norm.eps)
        case LayerNorm():
            sums = _sum_over(torch.cat([x32.sum(-1, keepdim=True), x32.pow(2).sum(-1, keepdim=True)], -1), mesh)
            mean, mean_sq = (sums / width).split(1, dim=-1)
            y = (x32 - mean) * torch.rsqrt(mean_sq - mean.pow(2) + norm.eps)
        case _:
            assert_never(norm)
    if norm.weight is not None:
        y = y * norm.weight.to_local().float()
    if isinstance(norm, LayerNorm) and norm.bias is not None:
        y = y + norm.bias.to_local().float()
    return y.type_as(x)


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
    the heads) is replicated on the rank's heads, its weight gradients summed over tp; `per_head`
    weights follow their heads (Shard(0), local); `full` (over n_heads·head_dim) normalises across
    the ranks (`WidthShardedNorm`). One KV head (MQA) is whole on every rank: its k-norm is
    replicated whatever the scope, its gradients summed over tp."""
    if plan.qk_norm is None:
        return {}
    scope = plan.qk_norm.scope
    match scope:
        case "head":
            q: ParallelStyle = RowShardParallel(dim=1)
        case "per_head":
            q = RowShardParallel(dim=1, weights=Shard(0))
        case "full":
            q = WidthShardedNorm()
        case _:
            assert_never(scope)
    # the one KV head's rows: its heads dim, or for `full` (B, T, Dh) its batch dim
    k = RowShardParallel(dim=0 if scope == "full" else 1) if plan.n_kv_heads == 1 else q
    return {"q_norm": q, "k_norm": k}


class SharedByHeads(ParallelStyle):
    """A projection every rank's heads read (MQA's one KV head): replicated weights on the gathered
    input, the output made local with a Partial gradient, so torch sums its gradient over tp."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return LocalWithPartialGrad()._apply(Replicated()._apply(module, device_mesh), device_mesh)


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


def norm_plan(sp: bool) -> ParallelStyle | None:
    # use_local_output: the residual stream stays plain local tensors between sub-blocks
    return SequenceParallel(use_local_output=True) if sp else None


def refusal(module: nn.Module, plan: ModelPlan, tp: int) -> str | None:
    """Why a module cannot be tensor-parallel over tp ranks (None: it can)."""
    match module:
        case Attention():
            p = module.plan
            if p.n_heads % tp or p.n_kv_heads % tp and p.n_kv_heads != 1:
                return (f"{p.n_heads} query / {p.n_kv_heads} key-value heads do not split over tp={tp} "
                        "(KV heads are replicated below tp only for one KV head)")
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
        case Mamba1Mixer() | Mamba2Mixer():
            return "Mamba mixers under tensor parallelism (the selective scan's projections are not split)"
        case S4Mixer() | HyenaMixer() | StripedHyenaMixer():
            return "long-convolution mixers (S4, Hyena) under tensor parallelism (their projections are not split)"
        case MLP() | GLU():
            return None if module.up_proj.out_features % tp == 0 else f"d_ff {module.up_proj.out_features} over tp={tp}"
        case _:
            return None


def model_refusal(plan: ModelPlan, tp: int, sp: bool) -> str | None:
    if tp == 1:
        return None
    if plan.tied and plan.lm_head_bias:
        return "a tied head with a bias under tensor parallelism"
    if not sp and any(isinstance(layer.ffn, MoEPlan) for layer in plan.layers):
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
        case _:
            return None


def check_tp(plan: ModelPlan, model: nn.Module, tp: int, sp: bool) -> None:
    reasons = [model_refusal(plan, tp, sp)]
    if tp > 1:
        reasons += [refusal(m, plan, tp) for m in model.modules()]
    first = next((r for r in reasons if r), None)
    if first:
        raise ArchplanError(f"--layout: not run on torch.distributed: {first}")
