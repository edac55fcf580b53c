"""Shard a `Stage` over a `LayoutMesh`: tensor/sequence parallel plans (`plans`), experts over the
ep dimension (`expert`), then FSDP2 (`fully_shard`) over the data-parallel dimension.

ZeRO stages on FSDP2 (Rajbhandari et al. 2020 §5; FSDP2 keeps every parameter sharded between
uses, so ZeRO-1/2's replicated weights become a gathered bf16 copy held through the step):
- zero=3: `reshard_after_forward=True`: gather in each micro-batch's forward and backward,
  reduce-scatter each micro-batch's gradients;
- zero=2: gathered once per step and kept (`reshard_after_forward=False`, no reshard after a
  backward but the last), gradients reduce-scattered every micro-batch;
- zero=1: as zero=2, but gradients accumulate unsharded over the micro-batches and are
  reduce-scattered once, after the last backward (`set_requires_gradient_sync` on it only);
- zero=0: `replicate` (FSDP2's replicate mode, DDP semantics): gradients all-reduced once per step.
Mixed precision as torchtitan: fp32 master weights, bf16 compute (`param_dtype`), fp32 gradient
reduction (`reduce_dtype`); `mixed=False` keeps everything fp32 (the equivalence tests).
Experts shard over the ranks that hold the same experts (`mesh.experts`: expert_dp, the stage's
ranks ep apart, experts being whole on every rank holding them).
Each layer is one FSDP unit (its experts another), the embedding another; everything else (learned
positions, embedding norm, final norm, head) is in the stage's root unit.
Tied embeddings over pp > 1: the last stage's head is a copy of the embedding, its gradient summed
with the first stage's each step over a 2-rank group (`tied_group`, Megatron's embedding group).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_param as fsdp_param
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel,
                                               parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor import DTensor, Replicate, Shard

from archplan.distributed.context import ContextShard, apply_context_parallel, summed_over
from archplan.distributed.expert import ExpertParallel
from archplan.distributed.mesh import LayoutMesh
from archplan.distributed.plans import check_tp, module_plan, norm_plan, positions_plan, residual_layout
from archplan.distributed.stage import Stage
from archplan.modules.block import Block
from archplan.modules.checkpointing import apply_recompute
from archplan.modules.model import TiedLMHead
from archplan.modules.moe import Experts, MoEFFN, TokenShards
from archplan.modules.mtp import MTPLayer

MIXED = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@dataclass(frozen=True)
class Sharded:
    stage: Stage
    units: tuple[FSDPModule, ...]  # every FSDP unit, the root last
    compute_dtype: torch.dtype  # what the stage computes in and sends to the next: FSDP2's param_dtype
    # tied embeddings over pp > 1: this rank and its peer on the other end stage (`tied_group`)
    tied: dist.ProcessGroup | None = None
    context: ContextShard | None = None  # cp > 1: the rank's positions and shared masks


def tied_group(stage: Stage, mesh: LayoutMesh) -> dist.ProcessGroup | None:
    """Megatron's embedding group (`parallel_state._EMBEDDING_GROUP`; Shoeybi et al. 2019 §3): with
    tied embeddings over pp > 1 the first stage holds the embedding and the last a copy as its
    head; the two ranks at the same (dp, tp) coordinate of the end stages all-reduce their copies'
    gradients each step (`step.StageRunner`), so the copies, updated alike, stay equal. Only the
    two members create the group (`use_local_synchronization`). The last stage's copy of an
    untied embedding that the multi-token-prediction modules read is kept equal the same way."""
    layout = mesh.layout
    if not (stage.plan.tied or stage.plan.mtp) or layout.pp == 1 or not (stage.first or stage.last):
        return None
    span = layout.world // layout.pp  # ranks per pipeline stage (pp is the slowest mesh dimension)
    rank = dist.get_rank()
    first = rank % span
    return dist.new_group([first, first + (layout.pp - 1) * span], use_local_synchronization=True)


def _parallelize(module: nn.Module, mesh: DeviceMesh, plan: ParallelStyle | dict[str, ParallelStyle]) -> None:
    """`parallelize_module` with every style splitting the rank's own copy (`src_data_rank=None`,
    as `plans`' own styles do): every rank built the same weights from one seed, so torch's
    default scatter from rank 0 would only send each rank what it already holds."""
    for style in plan.values() if isinstance(plan, dict) else (plan,):
        style.src_data_rank = None
    parallelize_module(module, mesh, plan)


def _tensor_parallel(stage: Stage, mesh: LayoutMesh) -> None:
    layout = mesh.layout
    tp, sp = layout.tp, layout.sequence_parallel
    check_tp(stage.plan, stage, tp, sp)
    if tp == 1:
        return
    tp_mesh = mesh["tp"]
    seq = residual_layout(sp)
    norm = norm_plan(sp)
    for block in stage.blocks():
        assert isinstance(block, Block)
        for sub in (block.mixer, block.ffn):
            tp_plan = module_plan(sub, sp) if sub is not None else None
            if tp_plan is None:
                continue
            _parallelize(sub, tp_mesh, tp_plan.styles)
            if tp_plan.local_plan is not None:
                sub.plan = tp_plan.local_plan(sub.plan, tp)
            if tp_plan.localize is not None:
                tp_plan.localize(sub, tp_mesh.get_local_rank(), tp)
        if norm is not None:
            for name in ("norm1", "norm2", "post_norm1", "post_norm2"):
                if hasattr(block, name):
                    _parallelize(getattr(block, name), tp_mesh, norm_plan(sp))
    for module in stage.mtp.values():
        _mtp_parallel(module, tp_mesh, sp)
    # the first stage's embedding, the last one's tied copy (its head), the MTP modules' copy
    for embed in (stage.embed, stage.mtp_embed):
        if embed is not None:
            _parallelize(embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=seq))
    positions = positions_plan(sp)
    if stage.pos_embed is not None and positions is not None:
        _parallelize(stage.pos_embed, tp_mesh, positions)
    for end in (stage.embed_norm, stage.final_norm):
        if end is not None and norm is not None:
            _parallelize(end, tp_mesh, norm_plan(sp))
    if isinstance(stage.lm_head, TiedLMHead):
        # x · embed.weightᵀ with the weight vocabulary-sharded: the logits come out Shard(-1)
        _parallelize(stage.lm_head, tp_mesh, PrepareModuleInput(
            input_layouts=(seq, None), desired_input_layouts=(Replicate(), None)))
    elif stage.lm_head is not None:
        _parallelize(stage.lm_head, tp_mesh, ColwiseParallel(
            input_layouts=seq, output_layouts=Shard(-1), use_local_output=False))


def _mtp_parallel(module: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> None:
    """A multi-token-prediction module's own parts as Megatron-Core's MTP layer splits them: its
    norms on the rank's sequence shard under SP (replicated without), the 2·d → d projection
    column-parallel, its input gathered over the sequence under SP, its output gathered over the
    last dim and, under SP, split back to the rank's sequence shard for the block
    (`_concat_embeddings`: gather_from_tensor_model_parallel_region, then
    scatter_to_sequence_parallel_region, whose backward gathers)."""
    assert isinstance(module, MTPLayer)
    norm = norm_plan(sp)
    for part in (module.enorm, module.hnorm, module.final_norm):
        if part is not None and norm is not None:
            _parallelize(part, tp_mesh, norm_plan(sp))
    _parallelize(module.proj, tp_mesh, ColwiseParallel(input_layouts=residual_layout(sp), output_layouts=Replicate(),
                                                       use_local_output=not sp))
    if sp:
        _parallelize(module.proj, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(),
                                                               desired_output_layouts=Shard(1)))


def _token_shards(stage: Stage, mesh: LayoutMesh) -> None:
    """Tell each MoE layer which ranks split its micro-batch's tokens, the tp ranks under SP and
    the cp ranks, over which its load-balancing loss sums the routed-pair counts
    (`modules.moe.TokenShards`; Megatron-Core's router all-reduces them over its tp_cp_group). Over
    its shard alone, the loss would pull the router toward balancing each shard."""
    layout = mesh.layout
    dims = [dim for dim, split in (("tp", layout.sequence_parallel), ("cp", layout.cp > 1)) if split]
    if not dims:
        return
    groups = [mesh[dim].get_group() for dim in dims]

    def summed(x: Tensor) -> Tensor:
        for group in groups:  # over tp, then over cp: the one tp_cp sum, in two calls
            x = summed_over(x, group)
        return x

    summed_ranks = layout.tp if layout.sequence_parallel else 1
    shards = TokenShards(ranks=math.prod(mesh[dim].size() for dim in dims), summed=summed_ranks, reduce=summed)
    for block in stage.blocks():
        if isinstance(block.ffn, MoEFFN):
            block.ffn.shards = shards


def _expert_parallel(stage: Stage, mesh: LayoutMesh, balanced: bool) -> None:
    ep = mesh.layout.ep
    if ep == 1:
        return
    group = mesh["ep"].get_group()
    for block in stage.blocks():
        moe = block.ffn
        if not isinstance(moe, MoEFFN):
            continue
        e = moe.plan.n_experts
        with torch.device("meta"):
            local = Experts(moe.plan.expert, e // ep, stage.plan.d_model)
        # this rank's experts: rows [r·E/ep, (r+1)·E/ep) of every expert tensor (free on meta)
        start = mesh["ep"].get_local_rank() * (e // ep)
        for name, full in moe.experts.named_parameters():
            setattr(local, name, nn.Parameter(full.detach().narrow(0, start, e // ep).clone()))
        moe.experts = ExpertParallel(local, e, group, balanced=balanced)


@contextmanager
def unit_view_outputs() -> Iterator[None]:
    """Run stage forwards without FSDP2's warning that a unit (the embedding's, a block's) returned a view.

    FSDP2 warns whenever a unit's output is a view: an in-place op on it would bypass the unit's
    pre-backward hook and skip its gradient's reduction. `nn.Embedding`'s output always is one
    (aten's embedding views index_select's fresh (B·T, D) rows as (B, T, D)), so the warning fired on
    every run with the embedding as its own unit. `Stage.forward` only adds to that output out of
    place, and the multi-process parity tests compare the embedding's gradient with one process's,
    so the warning says nothing here. The same holds for a model chunk with no layers (more chunks
    than layers: 2 layers over pp = 2, vpp = 2), whose `Stage.forward` hands its input on as it
    came, a view under TP, and for a block that ends in a sequence-parallel norm (post, DeepNorm,
    sandwich and reordered residuals) or a multi-token-prediction module (its final norm), whose
    output is the norm's `DTensor.to_local()` view, under any unit (FSDP2's sharded, replicated or
    checkpoint-wrapped): every block and stage takes its input out of place (`x + f(x)`), and no
    archplan module writes into a block's output. Only those messages, for embedding units,
    blocks, MTP modules and stages, are silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"FSDP2-wrapped module \((\w*Embedding|\w*Stage|\w*Block|\w*MTPLayer|\w*CheckpointWrapper)\) "
                                        "returned a view tensor")
        yield


class _RankChunks(Sequence[Tensor]):
    """FSDP2's `_chunk_with_empty(tensor, n, dim)`, torch.chunk's pieces with empty ones after the
    last up to n, as a sequence that makes an empty piece only when one is read. FSDP2 reads two
    (its rank's and the 0th, the padded size) of a list it builds with one tensor per rank: at
    dp = 131,072 that was 23 of verify --layout's 26 s (3.1 million empty tensors for 24
    parameters), linear in the world size."""

    def __init__(self, tensor: Tensor, n: int, dim: int) -> None:
        self.pieces, self.n = torch.chunk(tensor, n, dim=dim), n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int | slice) -> Tensor | list[Tensor]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self._piece(i) for i in range(*index.indices(self.n))]
        i = index + self.n if index < 0 else index
        if not 0 <= i < self.n:
            raise IndexError(index)
        return self._piece(i)

    def _piece(self, i: int) -> Tensor:
        return self.pieces[i] if i < len(self.pieces) else self.pieces[0].new_empty(0)


@contextmanager
def _chunks_read_lazily() -> Iterator[None]:
    """FSDP2's parameter sharding with `_RankChunks` for its `_chunk_with_empty`, which torch 2.13
    reads by index only (`_fsdp_param.py`); restored after. A torch without that helper shards as
    it does, only slower at a large dp."""
    original = getattr(fsdp_param, "_chunk_with_empty", None)
    if original is None:
        yield
        return
    fsdp_param._chunk_with_empty = _RankChunks
    try:
        yield
    finally:
        fsdp_param._chunk_with_empty = original


@contextmanager
def _meshes_concatenated_once() -> Iterator[None]:
    """FSDP2 under tensor parallelism concatenates the data-parallel and tp meshes once per
    parameter (torch 2.13 `FSDPParam._init_sharding_spec_tp`), each time a new DeviceMesh with its
    own world-sized rank map, kept in that parameter's spec: at a fake world of 800,000 ranks
    (tp 2) a 2-layer toy's 2.0 GB and 19 s. Within the sharding, one mesh per list of meshes,
    shared by every parameter that asks for it (a mesh is never changed once made); restored after."""
    original = DeviceMesh.__dict__["_concatenate"]
    made: dict[tuple[int, ...], tuple[list[DeviceMesh], DeviceMesh]] = {}

    def once(meshes: list[DeviceMesh]) -> DeviceMesh:
        key = tuple(map(id, meshes))
        if key not in made:
            # the meshes are held beside their concatenation, so no other mesh takes their ids
            made[key] = (list(meshes), original.__func__(meshes))
        return made[key][1]

    DeviceMesh._concatenate = staticmethod(once)  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh._concatenate = original  # type: ignore[method-assign]


def _fsdp(stage: Stage, mesh: LayoutMesh, policy: MixedPrecisionPolicy) -> tuple[FSDPModule, ...]:
    zero = mesh.layout.zero

    def unit(module: nn.Module, group: DeviceMesh, **sharding: Callable[[nn.Parameter], Shard]) -> FSDPModule:
        if zero == 0:
            # FSDP2's replicate mode: whole fp32 parameters and gradients, one gradient all-reduce
            # per unit (`DDPMeshInfo`), the same units and mixed precision as the sharded stages
            return replicate(module, mesh=group, mp_policy=policy)
        return fully_shard(module, mesh=group, mp_policy=policy, reshard_after_forward=zero == 3, **sharding)

    units: list[FSDPModule] = []
    for block in stage.blocks():
        moe = block.ffn
        # experts are their own unit whenever other ranks hold them than the dense weights (ep
        # splits them; under tp every tp rank holds them whole and feeds them its own tokens)
        if isinstance(moe, MoEFFN) and (mesh.layout.ep > 1 or mesh.layout.tp > 1):
            # fewer local experts than shards: shard dim 1 instead of padding dim 0 (torchtitan
            # `apply_fsdp`'s `_experts_shard_placement_fn`), where it splits evenly: FSDP2 pads
            # dim 0 only and refuses an uneven shard of any other dim
            replicas = mesh.experts.size()
            experts = unit(moe.experts, mesh.experts,
                           shard_placement_fn=lambda p: Shard(1) if p.shape[0] < replicas and p.shape[1] % replicas == 0
                           else Shard(0))
            # an expert's rows come from every rank's tokens (through the all-to-all), and each
            # dp·cp rank's loss is the mean over its own tokens (a cp rank's: its chunks), so the
            # gradient averages over dp·cp as the dense weights' does, not over expert_dp
            # (torchtitan `apply_fsdp`, Megatron's expert gradient scaling); tp ranks share one loss
            experts.set_gradient_divide_factor(mesh.layout.dp * mesh.layout.cp)
            if mesh.experts.size() > 1 and dist.get_backend(mesh.experts.get_group()) == "gloo":
                # a factor other than the group size is a PREMUL_SUM reduction, which gloo lacks:
                # sum, then divide (the same reduce-scatter)
                experts.set_force_sum_reduction_for_comms(True)
            units.append(experts)
        units.append(unit(block, mesh["dp"]))
    # the ends: the embedding its own unit (as torchtitan), everything else (learned positions,
    # embedding norm, final norm, head) in the stage's root unit (a list of modules as one unit,
    # torchtitan's `fully_shard([norm, output])`, reduces its members' gradients apart and
    # gathers it again per module in torch 2.13); a tied head on the same stage reads the
    # embedding's weight, so then the root holds both ends (`cluster._fsdp_end_units`)
    if stage.embed is not None and not isinstance(stage.lm_head, TiedLMHead):
        units.append(unit(stage.embed, mesh["dp"]))
    units.append(unit(stage, mesh["dp"]))
    return tuple(units)


def local_bytes(t: Tensor) -> int:
    """Bytes of this rank's part of `t` (its local shard of a DTensor)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _fsdp_params(units: tuple[FSDPModule, ...]) -> Iterator[FSDPParam]:
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        yield from group.fsdp_params if group is not None else ()


def sharded_params(units: tuple[FSDPModule, ...]) -> list[nn.Parameter]:
    """Every parameter of the units as FSDP2 keeps it between uses: this rank's fp32 shard."""
    return [param.sharded_param for param in _fsdp_params(units)]


def accumulated_grad_bytes(units: tuple[FSDPModule, ...]) -> int:
    """Bytes of the unsharded gradients FSDP2 accumulates over ZeRO-0/1's micro-batches (held on
    its FSDPParams, not as `.grad`, until the last backward reduces them)."""
    grads = (param.unsharded_accumulated_grad for param in _fsdp_params(units))
    return sum(local_bytes(grad) for grad in grads if grad is not None)


def shard_stage(stage: Stage, mesh: LayoutMesh, *, balanced: bool, mixed: bool = True) -> Sharded:
    """Apply the layout's parallelisms in torchtitan's order: TP, CP, EP, then FSDP over dp (× cp)."""
    policy = MIXED if mixed else MixedPrecisionPolicy()
    compute_dtype = policy.param_dtype or torch.float32
    _tensor_parallel(stage, mesh)
    context = apply_context_parallel(stage, mesh, compute_dtype)
    _token_shards(stage, mesh)
    _expert_parallel(stage, mesh, balanced)
    apply_recompute(stage.layers, mesh.layout.recompute)
    apply_recompute(stage.mtp, mesh.layout.recompute)  # each MTP module whole, its input parts included
    with _chunks_read_lazily(), _meshes_concatenated_once():
        units = _fsdp(stage, mesh, policy)
    return Sharded(stage, units, compute_dtype, tied_group(stage, mesh), context)
