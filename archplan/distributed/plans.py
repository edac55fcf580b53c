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

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard
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
from archplan.modules.s4 import S4Mixer
from archplan.modules.stripedhyena import StripedHyenaMixer
from archplan.resolve import ModelPlan


def residual_layout(sp: bool) -> Placement:
    """How the residual stream between sub-blocks is laid out over the TP group."""
    return Shard(1) if sp else Replicate()


@dataclass(frozen=True)
class TPPlan:
    """Styles by submodule path ("" = the module itself) and the local plan of a shard."""

    styles: dict[str, ParallelStyle]
    local_plan: Callable[[object, int], object] | None = None


def _gathered_input(sp: bool) -> PrepareModuleInput:
    # (x, state): the cache state is None in training
    return PrepareModuleInput(input_layouts=(residual_layout(sp), None), desired_input_layouts=(Replicate(), None))


def attention_plan(module: Attention, sp: bool) -> TPPlan:
    styles: dict[str, ParallelStyle] = {
        "": _gathered_input(sp),
        "q_proj": ColwiseParallel(),
        "k_proj": ColwiseParallel(),
        "v_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    return TPPlan(styles, lambda plan, tp: replace(plan, n_heads=plan.n_heads // tp,
                                                   n_kv_heads=plan.n_kv_heads // tp))


def ffn_plan(module: MLP | GLU, sp: bool) -> TPPlan:
    styles: dict[str, ParallelStyle] = {
        "": PrepareModuleInput(input_layouts=(residual_layout(sp),), desired_input_layouts=(Replicate(),)),
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=residual_layout(sp)),
    }
    if isinstance(module, GLU):
        styles["gate_proj"] = ColwiseParallel()
    return TPPlan(styles)


def norm_plan(sp: bool) -> ParallelStyle | None:
    # use_local_output: the residual stream stays plain local tensors between sub-blocks
    return SequenceParallel(use_local_output=True) if sp else None


def refusal(module: nn.Module, plan: ModelPlan, tp: int) -> str | None:
    """Why a module cannot be tensor-parallel over tp ranks (None: it can)."""
    match module:
        case Attention():
            p = module.plan
            if p.n_heads % tp or p.n_kv_heads % tp:
                return (f"{p.n_heads} query / {p.n_kv_heads} key-value heads do not split over tp={tp} "
                        "(Megatron replicates KV heads below tp; archplan does not)")
            if p.qk_norm is not None:
                return "qk-norm under tensor parallelism (its weights see only a rank's heads)"
            if module.alibi is not None:
                return "ALiBi under tensor parallelism (the slope table is per global head)"
            return None
        case MLA():
            return ("MLA under tensor parallelism (its rotary key k_pe is shared by all heads, so its "
                    "gradient needs a TP reduction DTensor's plans do not express); use tp=1 with ep/pp/dp")
        case MoEFFN():
            return "MoE layers under tensor parallelism (experts shard over ep; use tp=1 with ep)"
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
    if plan.vocab_size % tp:
        return f"vocabulary {plan.vocab_size} over tp={tp}"
    if plan.tied and plan.lm_head_bias:
        return "a tied head with a bias under tensor parallelism"
    if sp and plan.position in ("learned", "sinusoidal"):
        return "absolute positions added to a sequence-parallel residual stream"
    return None


def module_plan(module: nn.Module, sp: bool) -> TPPlan | None:
    match module:
        case Attention():
            return attention_plan(module, sp)
        case MLP() | GLU():
            return ffn_plan(module, sp)
        case _:
            return None


def check_tp(plan: ModelPlan, model: nn.Module, tp: int, sp: bool) -> None:
    reasons = [model_refusal(plan, tp, sp)]
    if tp > 1:
        reasons += [refusal(m, plan, tp) for m in model.modules()]
    first = next((r for r in reasons if r), None)
    if first:
        raise ArchplanError(f"--layout: not run on torch.distributed: {first}")
