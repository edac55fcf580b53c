"""Mixture of experts: router, routed experts as 3-D weights, fused shared experts, shared gate.

Dispatch has static shapes, so one path serves meta, CPU and GPU:
  1. score the N = B·T tokens in fp32 (`Router`), pick K experts each (`route`), optionally inside
     the token's best expert groups (DeepSeek group-limited routing);
  2. sort the M = N·K (token, expert) pairs by expert (`argsort`) and find where each expert's
     rows end (`searchsorted` on the sorted ids: the grouped_mm offsets);
  3. gather the rows in that order and run every expert's matmuls at once with
     `torch.nn.functional.grouped_mm` (no Python loop over tokens or experts, no compute on
     unrouted tokens);
  4. put the rows back in (token, k) order (gather by the inverse permutation) and sum each
     token's K rows weighted by its routing weights.
No `nonzero`/`bincount`/`torch.where(mask)`/`.tolist()`: nothing depends on the data's values.

Counted FLOPs (docs/architecture.md): router 2·N·D·E, experts 2·M·D·F per matrix (the grouped_mm
formula registered in `flop_formulas`), shared experts as a dense FFN, shared gate 2·N·D.

The load-balancing loss is computed in the forward pass and attached to the layer's output by an
identity whose backward feeds it a gradient of 1 (Megatron-LM `MoEAuxLossAutoScaler`): it joins
every gradient taken through the output, and the module keeps only a detached copy for logging,
never the scores or their autograd graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.modules import flop_formulas
from archplan.modules.ffn import MLP, GLU, activation, build_ffn
from archplan.resolve import FFNPlan, MoEPlan

flop_formulas.register()

# torch.nn.functional.grouped_mm's docstring: "Inputs are currently expected to be torch.bfloat16
# values on CUDA devices with SM >= 80". Anything else on CUDA takes a loop of per-expert matmuls.
_CUDA_GROUPED_MM_DTYPE = torch.bfloat16
_CUDA_GROUPED_MM_MIN_SM = (8, 0)
# its CPU kernel refuses other dtypes ("Expected mat_a to be Float32, BFloat16 or Float16 matrix")
_CPU_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# grouped_mm's kernels want every stride of both operands to be a multiple of 16 bytes
# (aten/src/ATen/native/GroupedMMUtils.h); on meta its shape check also wants bf16 inputs.
_STRIDE_ALIGN_BYTES = 16


def _aligned(dim: int, dtype: torch.dtype) -> int:
    """`dim` rounded up so that a row of it is a multiple of 16 bytes."""
    per = max(1, _STRIDE_ALIGN_BYTES // dtype.itemsize)
    return math.ceil(dim / per) * per


class Experts(nn.Module):
    """E routed experts of one FFN shape, stored as 3-D weights (one matrix per expert).

    GLU: down(act(gate(x)) ⊙ up(x)) with w_gate_EFD, w_up_EFD, w_down_EDF; MLP: down(act(up(x)))
    with w_up_EFD, w_down_EDF; biases b_*_EF / b_down_ED when the expert plan has bias.
    Weights are laid out (out, in) per expert like `nn.Linear.weight`, so a checkpoint's
    per-expert Linear weights stack into them unchanged.
    """

    def __init__(self, plan: FFNPlan, n_experts: int, d_model: int) -> None:
        super().__init__()
        self.kind = plan.kind
        self.act = activation(plan.activation)
        e, f, d = n_experts, plan.d_ff, d_model
        self.w_gate_EFD = nn.Parameter(torch.empty(e, f, d)) if plan.kind == "glu" else None
        self.w_up_EFD = nn.Parameter(torch.empty(e, f, d))
        self.w_down_EDF = nn.Parameter(torch.empty(e, d, f))
        with_gate_bias = plan.bias and plan.kind == "glu"
        self.b_gate_EF = nn.Parameter(torch.empty(e, f)) if with_gate_bias else None
        self.b_up_EF = nn.Parameter(torch.empty(e, f)) if plan.bias else None
        self.b_down_ED = nn.Parameter(torch.empty(e, d)) if plan.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert: U(±1/√fan_in) for weights and biases."""
        d, f = self.w_down_EDF.shape[1:]
        into_f = (self.w_gate_EFD, self.w_up_EFD, self.b_gate_EF, self.b_up_EF)
        for param, fan_in in [*((p, d) for p in into_f), (self.w_down_EDF, f), (self.b_down_ED, f)]:
            if param is not None:
                nn.init.uniform_(param, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def weights(self) -> list[nn.Parameter]:
        """The 3-D weight matrices, without the biases (what DeepNorm's init scales)."""
        return [w for w in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF) if w is not None]

    def forward(self, x_MD: Tensor, offs_E: Tensor, expert_M: Tensor) -> Tensor:
        """Rows of `x_MD` sorted by expert; expert e owns rows [offs_E[e-1], offs_E[e])."""
        up_MF = _grouped_linear(x_MD, self.w_up_EFD, offs_E, self.b_up_EF, expert_M)
        match self.kind:
            case "glu":
                assert self.w_gate_EFD is not None
                gate_MF = _grouped_linear(x_MD, self.w_gate_EFD, offs_E, self.b_gate_EF, expert_M)
                h_MF = self.act(gate_MF) * up_MF
            case "mlp":
                h_MF = self.act(up_MF)
            case _:
                assert_never(self.kind)
        return _grouped_linear(h_MF, self.w_down_EDF, offs_E, self.b_down_ED, expert_M)

    def expert_forward(self, e: int, x_RD: Tensor) -> Tensor:
        """Expert `e` alone with plain matmuls (the reference `experts_loop` uses it)."""

        def linear(w: Tensor | None, b: Tensor | None, x: Tensor) -> Tensor:
            assert w is not None
            return F.linear(x, w[e], b[e] if b is not None else None)

        up = linear(self.w_up_EFD, self.b_up_EF, x_RD)
        match self.kind:
            case "glu":
                h = self.act(linear(self.w_gate_EFD, self.b_gate_EF, x_RD)) * up
            case "mlp":
                h = self.act(up)
            case _:
                assert_never(self.kind)
        return linear(self.w_down_EDF, self.b_down_ED, h)


def grouped_mm_path(device: torch.device, dtype: torch.dtype, sm: tuple[int, int] | None) -> str:
    """Which kernel runs the experts' grouped matmul (shapes, dtype and device only, never data):
    "meta" (grouped_mm after a free cast to bf16, the dtype its meta shape check wants), "grouped"
    (grouped_mm: CPU in fp32/bf16/fp16, CUDA in bf16 on SM >= 80) or "loop" (otherwise, e.g. an
    fp64 reference build: one matmul per expert, exact in the model's dtype)."""
    match device.type:
        case "meta":
            return "meta"
        case "cuda":
            ok = dtype == _CUDA_GROUPED_MM_DTYPE and sm is not None and sm >= _CUDA_GROUPED_MM_MIN_SM
            return "grouped" if ok else "loop"
        case _:
            return "grouped" if dtype in _CPU_GROUPED_MM_DTYPES else "loop"


class _AlignedRows(torch.autograd.Function):
    """The identity, whose backward hands on its gradient with rows 16 bytes apart: grouped_mm's
    backward refuses a gradient of an unaligned width laid out densely."""

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        width = grad.shape[-1]
        return F.pad(grad, (0, _aligned(width, grad.dtype) - width))[..., :width]


def autocast_operand(t: Tensor) -> Tensor:
    """t in autocast's compute dtype where autocast is on for its device, as autocast casts mm's
    operands. torch 2.13 registers no autocast kernel for `_grouped_mm` (neither AutocastCPU nor
    AutocastCUDA), so under autocast the experts would compute in the fp32 of the master weights
    and the residual stream, and keep fp32 activations, where a mixed-precision run's experts run
    in bf16 (and on CUDA, in fp32, the per-expert loop instead of grouped_mm)."""
    device = t.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return t
    return t.to(torch.get_autocast_dtype(device))


def per_expert_linear(x_MI: Tensor, w_EOI: Tensor, offs_E: Tensor) -> Tensor:
    """y[r] = w[e(r)] @ x[r] as one matmul per expert over its rows (the CUDA fallback). The group
    ends come to the host once per call (one sync); an expert with no rows multiplies 0 rows."""
    ends = offs_E.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x_MI[a:b] @ w_EOI[e].transpose(0, 1) for e, (a, b) in enumerate(zip(starts, ends))])


def _grouped_linear(
    x_MI: Tensor, w_EOI: Tensor, offs_E: Tensor, b_EO: Tensor | None, expert_M: Tensor
) -> Tensor:
    """y[r] = w[e(r)] @ x[r] (+ b[e(r)]) for rows sorted by expert: one grouped_mm.

    Static-shape routes to the same product, chosen from shapes/dtype/device only (`grouped_mm_path`):
    - grouped_mm, on meta after a cast to bf16 (the dtype its meta shape check wants; casting a
      meta tensor is free). It checks that rows start 16 bytes apart, not that widths are
      multiples of 16 bytes, so an unaligned input width (toy specs) runs it on views at its true
      width into zero-padded copies, with the gradient handed on in such rows (`_AlignedRows`);
      the backward keeps those copies, which no memory figure prices (never at real widths). The
      product, and every count of it (FlopCounterMode, `verify`'s fvcore trace), is exactly
      2·M·I·O, and fake tensors (`verify --layout`) run it too. Never a per-row weight gather,
      which would materialise M·O·I values;
    - CUDA outside grouped_mm's documented bf16/SM80 support: a loop of per-expert matmuls.
    """
    x_MI, w_EOI = autocast_operand(x_MI), autocast_operand(w_EOI)
    b_EO = autocast_operand(b_EO) if b_EO is not None else None
    _, o, i = w_EOI.shape
    sm = torch.cuda.get_device_capability(x_MI.device) if x_MI.device.type == "cuda" else None
    path = grouped_mm_path(x_MI.device, x_MI.dtype, sm)
    if path == "loop":
        y_MO = per_expert_linear(x_MI, w_EOI, offs_E)
    else:
        # meta's shape check wants bf16, and casting a meta tensor is free
        x_run, w_run = (x_MI.bfloat16(), w_EOI.bfloat16()) if path == "meta" else (x_MI, w_EOI)
        if _aligned(i, x_run.dtype) == i and _aligned(o, x_run.dtype) == o:
            y_MO = F.grouped_mm(x_run, w_run.transpose(-2, -1), offs=offs_E)
        else:
            # only an unaligned input width needs the copies (an aligned one with an unaligned
            # output would save a needless padded copy of x and w for the backward)
            pad = _aligned(i, x_run.dtype) - i
            x_view = F.pad(x_run, (0, pad))[:, :i] if pad else x_run
            w_view = F.pad(w_run, (0, pad))[..., :i] if pad else w_run
            y_MO = _AlignedRows.apply(F.grouped_mm(x_view, w_view.transpose(-2, -1), offs=offs_E))
        y_MO = y_MO.to(x_MI.dtype)
    if b_EO is not None:
        y_MO = y_MO + b_EO[expert_M]
    return y_MO


class Router(nn.Module):
    """Linear(D, E) router (+ bias) and DeepSeek-V3's score-correction bias, kept and computed in fp32
    whatever the model's dtype, under autocast too: the reference routers do (transformers' DeepseekV3TopkRouter keeps
    `gate.weight` and `e_score_correction_bias` in fp32 and computes F.linear on fp32 casts), since
    bf16 logits turn near-ties into different expert choices.

    `score_correction_bias` is persistent (checkpoints carry it) but not trained by gradient
    (DeepSeek-V3 §2.1.2 updates it by ±γ steps, which bf16 would round away): a buffer, never a
    parameter. A training loop that balances calls `track_load` once, then `balance` after each
    optimizer step (`balance_routers` does both for a model).
    """

    def __init__(self, d_model: int, n_experts: int, *, bias: bool, correction: bool,
                 update_speed: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(n_experts, dtype=torch.float32)) if bias else None
        self.score_correction_bias: Tensor | None
        if correction:
            self.register_buffer("score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))
        else:
            self.score_correction_bias = None
        self.update_speed = update_speed
        # tokens each expert took since the last `balance`; None until a loop asks (`track_load`), so
        # that inference, `verify` and the measured steps of `--layout` allocate nothing for it
        self.tracking = False
        self.load_E: Tensor | None = None
        self.reset_parameters()

    def track_load(self) -> None:
        """Count the tokens each expert takes in training forwards, for `balance`."""
        self.tracking = self.score_correction_bias is not None

    def count(self, experts_NK: Tensor) -> None:
        """Add one training forward's tokens per expert. A forward recomputed in the backward (full
        recompute) counts twice, as every micro-batch of its layer does: the mean moves with the
        loads, so no sign of `balance` changes."""
        if not self.tracking:
            return
        counts_E = torch.bincount(experts_NK.flatten(), minlength=self.weight.shape[0])
        self.load_E = counts_E if self.load_E is None else self.load_E + counts_E

    def balance(self) -> None:
        """DeepSeek-V3 §2.1.2 (aux-loss-free balancing): after a step, each expert's bias falls by γ if
        it took more tokens than the mean since the last step, rises by γ if fewer (Megatron-Core's
        `get_updated_expert_bias`: bias + γ·sign(mean − load)). One process's tokens: a data-parallel
        run sums the loads over the ranks holding this layer first."""
        if self.score_correction_bias is None or self.load_E is None:
            return
        load_E = self.load_E.float()
        with torch.no_grad():
            self.score_correction_bias.add_(self.update_speed * torch.sign(load_E.mean() - load_E))
        self.load_E = None

    def reset_parameters(self) -> None:
        """nn.Linear's default init (the same draws in the same order), a zero correction bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)
        if self.score_correction_bias is not None:
            nn.init.zeros_(self.score_correction_bias)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]  # nn.Module's signature
        """Device moves and `to_empty` apply; dtype casts (`model.to(bf16)`) do not: stays fp32."""

        def keep_fp32(t: Tensor) -> Tensor:
            out = fn(t)
            return out.float() if out.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)

    def forward(self, x_ND: Tensor) -> Tensor:
        device = x_ND.device.type
        autocast_on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        # autocast would run the linear in its 16-bit dtype, fp32 operands or not; FSDP2's
        # mixed precision gathers the weight in its param_dtype (bf16), whatever `_apply` keeps
        # at rest: the product is fp32 either way (`_Fp32Gating` for a 16-bit weight; a plain
        # linear otherwise, which fvcore's jit trace also reads)
        with torch.autocast(device, enabled=False) if autocast_on else nullcontext():
            if self.weight.dtype == torch.float32:
                return F.linear(x_ND.float(), self.weight, self.bias)  # (N, E) fp32 logits
            return _Fp32Gating.apply(x_ND.float(), self.weight, self.bias)


class _Fp32Gating(torch.autograd.Function):
    """F.linear on fp32 copies of the weight and bias, whose backward reads the weight as stored,
    as Megatron-Core's `RouterGatingLinearFunction` does: a 16-bit weight (FSDP2's bf16 gather) is
    cast in the forward and again in the backward, and the fp32 copy, E·D·4 B per MoE layer and
    micro-batch in flight, is not kept between them (autograd's `weight.float()` kept it:
    DeepSeek-V3's 7.3 MB a layer, measured by verify --layout)."""

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, weight_ED: Tensor, bias_E: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_ND, weight_ED)
        ctx.bias_dtype = None if bias_E is None else bias_E.dtype
        return F.linear(x_ND, weight_ED.float(), None if bias_E is None else bias_E.float())

    @staticmethod
    def backward(ctx: Any, grad_NE: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x_ND, weight_ED = ctx.saved_tensors
        grad_x = grad_NE @ weight_ED.float()
        grad_w = (grad_NE.flatten(0, -2).t() @ x_ND.flatten(0, -2)).to(weight_ED.dtype)
        grad_b = None if ctx.bias_dtype is None else grad_NE.flatten(0, -2).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def route(
    logits_NE: Tensor, plan: MoEPlan, correction_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing: (expert indices (N, K), weights (N, K), scores (N, E)), in fp32.

    softmax (Switch / Mixtral `MixtralSparseMoeBlock`): weights are the softmax probabilities of
    the chosen experts. sigmoid (DeepSeek-V3 §2.1.2, eq. 13-16): σ(logits) per expert; the
    aux-loss-free correction bias only steers *selection* (eq. 16), weights use the raw scores.
    Group-limited routing (n_group): selection only among the experts of the token's topk_group
    best groups (`_group_mask`). normalize_top_k divides the K weights by their sum; routed_scale
    multiplies them (DeepSeek-V3 `routed_scaling_factor`).
    """
    logits = logits_NE.float()
    match plan.scoring:
        case "softmax":
            scores_NE = logits.softmax(dim=-1)
        case "sigmoid":
            scores_NE = logits.sigmoid()
        case _:
            assert_never(plan.scoring)
    select_NE = scores_NE if correction_E is None else scores_NE + correction_E.float()
    if plan.n_group is not None:
        select_NE = select_NE.masked_fill(~_group_mask(select_NE, plan), float("-inf"))
    experts_NK = select_NE.topk(plan.top_k, dim=-1).indices
    weights_NK = scores_NE.gather(-1, experts_NK)
    if plan.normalize_top_k:
        # DeepSeek-V3 (HF `DeepseekV3TopkRouter`) adds 1e-20 so an all-zero sigmoid row stays finite.
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return experts_NK, weights_NK * plan.routed_scale, scores_NE


def _group_mask(select_NE: Tensor, plan: MoEPlan) -> Tensor:
    """(N, E) bool: expert e is in one of the token's topk_group best groups. Experts form n_group
    contiguous groups (DeepSeek-V2 §2.2.2, V3 §2.1.2); a group scores its best expert ("max",
    transformers' DeepseekV2TopkRouter group_limited_greedy) or its best two summed ("top2_sum",
    DeepseekV3TopkRouter), on the selection scores (correction bias included)."""
    assert plan.n_group is not None and plan.topk_group is not None
    n, e = select_NE.shape
    per = e // plan.n_group
    grouped_NGP = select_NE.reshape(n, plan.n_group, per)
    match plan.group_score:
        case "max":
            group_NG = grouped_NGP.amax(dim=-1)
        case "top2_sum":
            group_NG = grouped_NGP.topk(2, dim=-1).values.sum(dim=-1)
        case _:
            assert_never(plan.group_score)
    keep_NG = group_NG.topk(plan.topk_group, dim=-1).indices
    # scatter of a tensor, not of the scalar True: fvcore's jit trace has no schema for a bool Scalar
    kept_NK = torch.ones_like(keep_NG, dtype=torch.bool)
    mask_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter(1, keep_NG, kept_NK)
    return mask_NG[:, :, None].expand(n, plan.n_group, per).reshape(n, e)


@dataclass(frozen=True)
class TokenShards:
    """How one micro-batch's tokens are split over ranks, for the load-balancing loss: over the tp
    ranks under sequence parallelism, over the cp ranks under context parallelism (Megatron-Core's
    router sums its `tokens_per_expert` over its `tp_cp_group` and counts the group's tokens).

    ranks: how many ranks hold the micro-batch's tokens (tp · cp); summed: how many of them add their
    loss terms up rather than average them, the tp ranks (the router is replicated over tp and its
    gradients summed, while the cp ranks' average with the data-parallel ones, each cp rank's
    cross-entropy the mean of its own chunks); reduce: the sum of a tensor over the ranks."""

    ranks: int
    summed: int
    reduce: Callable[[Tensor], Tensor]


def load_balancing_loss(scores_NE: Tensor, experts_NK: Tensor, n_groups: int, coef: float,
                        shards: TokenShards | None = None) -> Tensor:
    """coef · mean over token groups of E · Σ_e f_e · P_e.

    Per group of T tokens (the whole batch: Switch Transformer eq. 4-6, GShard; one sequence:
    DeepSeek-V3 eq. 17-20, then averaged over the batch as DeepSeek's `seq_aux`):
    f_e = count_e / (T·K), the fraction of the group's T·K routed pairs sent to e (DeepSeek-V3 eq. 18,
    f_i = E/(K·T)·count_i, up to the E factor kept outside); P_e = mean over the T tokens of e's
    score renormalised to sum to 1 per token (a no-op for softmax; eq. 19 s'_i for sigmoid).
    Uniform routing gives exactly coef. The tokens are grouped as N = n_groups · T, in order.

    With `shards`, the rank holds T/ranks of each group's tokens: the counts are summed over the
    ranks, so f is the group's, and the rank's term holds its tokens' share of P, which the
    router's gradient reduction (summed over `summed` ranks, averaged over the rest) makes the
    group's P. The value is then the rank's share of the loss, not the loss.
    """
    n, n_experts = scores_NE.shape
    top_k = experts_NK.shape[1]
    t = n // n_groups
    ranks, summed = (shards.ranks, shards.summed) if shards else (1, 1)
    probs_GTE = (scores_NE / scores_NE.sum(dim=-1, keepdim=True)).reshape(n_groups, t, n_experts)
    p_GE = probs_GTE.sum(dim=1) / (t * summed)
    # scatter_add keeps a static (G, E) shape (bincount's depends on the data)
    picks_GM = experts_NK.reshape(n_groups, t * top_k)
    counts_GE = torch.zeros_like(p_GE).scatter_add_(1, picks_GM, torch.ones_like(picks_GM, dtype=p_GE.dtype))
    if shards is not None:
        counts_GE = shards.reduce(counts_GE)
    f_GE = counts_GE / (t * ranks * top_k)
    return coef * n_experts * (f_GE * p_GE).sum(dim=-1).mean()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output whose backward also gives the aux loss a gradient of `scale`
    (1, or 1/m in a step of m micro-batches: `MoEFFN.aux_grad_scale`), so the loss joins every
    gradient taken through the output and its graph lives exactly as long as the output's
    (Megatron-LM `moe_utils.MoEAuxLossAutoScaler`, whose scale its schedules set to 1/m)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        (aux,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad_out, torch.full_like(aux, ctx.scale), None  # type: ignore[attr-defined]


class MoEFFN(nn.Module):
    """Routed experts (+ fused shared experts, + Qwen2-MoE shared gate) replacing a dense FFN.

    Submodules are the component paths of docs/architecture.md: `router`, `experts`, `shared`,
    `shared_gate`. In training mode with aux_loss_coef > 0 the forward computes the load-balancing
    loss (per batch or per sequence, `plan.aux_loss_scope`), attaches it to the output's gradient
    (`_AttachAuxLoss`) and keeps only its detached value in `last_aux_loss`, for logging (the
    rank's share of it when a parallel layout splits the tokens: `shards`).
    """

    def __init__(self, plan: MoEPlan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        self.router = Router(d_model, plan.n_experts, bias=plan.router_bias, correction=plan.score_correction_bias,
                             update_speed=plan.bias_update_speed)
        self.experts = Experts(plan.expert, plan.n_experts, d_model)
        self.shared: MLP | GLU | None = build_ffn(plan.shared, d_model) if plan.shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if plan.shared_gate else None
        self.last_aux_loss: Tensor | None = None  # detached: no graph is kept between forwards
        # the gradient the aux loss joins with: 1/m where a step's loss is the mean of m
        # micro-batches' (`scale_aux_gradients`), as their cross-entropies are divided by m
        self.aux_grad_scale = 1.0
        self.shards: TokenShards | None = None  # set where a parallel layout splits the tokens

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()

    def forward(self, x_BTD: Tensor) -> Tensor:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        experts_NK, weights_NK, scores_NE = route(self.router(x_ND), self.plan, self.router.score_correction_bias)
        if self.training:
            self.router.count(experts_NK)
        out_ND = self._dispatch(x_ND, experts_NK, weights_NK)
        if self.shared is not None:
            out_ND = out_ND + self._shared(x_ND)
        self.last_aux_loss = None
        if self.training and self.plan.aux_loss_coef > 0:
            groups = b if self.plan.aux_loss_scope == "sequence" else 1
            aux = load_balancing_loss(scores_NE, experts_NK, groups, self.plan.aux_loss_coef, self.shards)
            self.last_aux_loss = aux.detach()
            if torch.is_grad_enabled() and aux.requires_grad:
                out_ND = _AttachAuxLoss.apply(out_ND, aux, self.aux_grad_scale)
        return out_ND.reshape(b, t, d)

    def _dispatch(self, x_ND: Tensor, experts_NK: Tensor, weights_NK: Tensor) -> Tensor:
        """Sort the N·K pairs by expert, run all experts as one grouped matmul, scatter back."""
        n_experts, top_k = self.plan.n_experts, self.plan.top_k
        expert_M = experts_NK.reshape(-1)
        order_M = expert_M.argsort(stable=True)
        # pair m = token·K + k; truncation equals floor for these non-negative indices, and
        # div(trunc)'s meta kernel is ~7× cheaper than floor_divide's on verify's meta pass
        token_M = torch.div(order_M, top_k, rounding_mode="trunc")
        expert_sorted_M = expert_M[order_M]
        # Group ends: in the sorted ids, where each expert's run stops. searchsorted has a static
        # (E,) shape (bincount's is data-dependent), never materialises the M×E table of
        # one_hot(...).sum(0), and avoids scatter-add's serialised collisions on CPU.
        experts_E = torch.arange(n_experts, device=x_ND.device)
        ends_E = torch.searchsorted(expert_sorted_M, experts_E, right=True)
        offs_E = ends_E.to(torch.int32)
        # cast before the gather: the M = N·K routed rows are copied in the compute dtype
        y_MD = self.experts(autocast_operand(x_ND)[token_M], offs_E, expert_sorted_M)
        # Back to (token, k) order and a weighted sum over k: a gather and a reduction, both
        # parallel. (An index_add of the M rows onto N tokens hits every token K times, which the
        # CPU kernel serialises: 116 ms vs ~25 ms for this gather at N=2048, K=2, D=1024, 2 threads.)
        # mul + sum, not bmm: the combine is elementwise work in the FLOP convention.
        y_NKD = y_MD[order_M.argsort()].reshape(-1, top_k, y_MD.shape[-1])
        out_ND = (y_NKD * weights_NK[..., None].to(y_NKD.dtype)).sum(dim=1)
        return out_ND.to(x_ND.dtype)

    def _shared(self, x_ND: Tensor) -> Tensor:
        assert self.shared is not None
        y_ND = self.shared(x_ND)
        if self.shared_gate is not None:
            # Qwen2-MoE `Qwen2MoeSparseMoeBlock`: sigmoid(shared_expert_gate(x)) · shared_expert(x)
            y_ND = torch.sigmoid(self.shared_gate(x_ND)) * y_ND
        return y_ND


def balance_routers(model: nn.Module, *, start: bool = False) -> None:
    """Every score-correction router of `model`: `start` begins counting loads, otherwise apply the
    step's update (call after each optimizer step)."""
    for module in model.modules():
        if isinstance(module, Router):
            if start:
                module.track_load()
            else:
                module.balance()


def scale_aux_gradients(model: nn.Module, scale: float) -> None:
    """Every MoE layer of `model` gives its load-balancing loss a gradient of `scale`: 1/m for a
    step that averages m micro-batches' losses, so each micro-batch's aux loss counts 1/m as its
    cross-entropy does (Megatron-LM sets `MoEAuxLossAutoScaler`'s scale to 1/m in its schedules)."""
    for module in model.modules():
        if isinstance(module, MoEFFN):
            module.aux_grad_scale = scale


def experts_loop(moe: MoEFFN, x_BTD: Tensor) -> Tensor:
    """Slow, obviously-correct reference for tests and benchmarks only (data-dependent: not meta).

    The same routing, then for each expert the tokens whose top-k contains it, through plain
    matmuls, weighted and summed — the HF `MixtralSparseMoeBlock` loop.
    """
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    experts_NK, weights_NK, _ = route(moe.router(x_ND), moe.plan, moe.router.score_correction_bias)
    out_ND = torch.zeros_like(x_ND)
    for e in range(moe.plan.n_experts):
        token_R, slot_R = torch.where(experts_NK == e)
        if token_R.numel() == 0:
            continue
        y_RD = moe.experts.expert_forward(e, x_ND[token_R])
        out_ND = out_ND.index_add(0, token_R, y_RD * weights_NK[token_R, slot_R, None].to(y_RD.dtype))
    if moe.shared is not None:
        out_ND = out_ND + moe._shared(x_ND)
    return out_ND.reshape(b, t, d)
