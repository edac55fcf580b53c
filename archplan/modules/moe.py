"""Mixture of experts: router, routed experts as 3-D weights, fused shared experts, shared gate.

Dispatch (DESIGN.md §4) has static shapes, so one path serves meta, CPU and GPU:
  1. score the N = B·T tokens, pick K experts each (`route`);
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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.modules import flop_formulas
from archplan.modules.ffn import MLP, GLU, activation, build_ffn
from archplan.resolve import FFNPlan, MoEPlan

flop_formulas.register()

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


def _grouped_linear(
    x_MI: Tensor, w_EOI: Tensor, offs_E: Tensor, b_EO: Tensor | None, expert_M: Tensor
) -> Tensor:
    """y[r] = w[e(r)] @ x[r] (+ b[e(r)]) for rows sorted by expert: one grouped_mm.

    Three static-shape routes to the same product, chosen from shapes/dtype/device only:
    - aligned rows (the case of real model widths): grouped_mm directly; on meta its shape
      check wants bf16, and casting a meta tensor is free, so meta casts;
    - meta with unaligned widths (toy specs): the per-row weight gather contracted by a batched
      matmul, which allocates nothing on meta and counts exactly 2·M·I·O there (DESIGN.md §4);
    - real devices with unaligned widths: zero-pad I and O to 16-byte rows (zeros add nothing)
      and slice the result; never a per-row weight gather, which would materialise M·O·I values.
    """
    _, o, i = w_EOI.shape
    on_meta = x_MI.device.type == "meta"
    run_dtype = torch.bfloat16 if on_meta else x_MI.dtype
    aligned = _aligned(i, run_dtype) == i and _aligned(o, run_dtype) == o
    if on_meta and not aligned:
        # matmul, not einsum: einsum makes a size-1 contraction (I = 1) an uncounted product
        y_MO = torch.matmul(x_MI[:, None, :], w_EOI[expert_M].transpose(-2, -1)).squeeze(1)
    elif on_meta:
        y_MO = F.grouped_mm(x_MI.bfloat16(), w_EOI.bfloat16().transpose(-2, -1), offs=offs_E)
        y_MO = y_MO.to(x_MI.dtype)
    elif aligned:
        y_MO = F.grouped_mm(x_MI, w_EOI.transpose(-2, -1), offs=offs_E)
    else:
        ip, op = _aligned(i, x_MI.dtype), _aligned(o, x_MI.dtype)
        x_pad = F.pad(x_MI, (0, ip - i))
        w_pad = F.pad(w_EOI, (0, ip - i, 0, op - o))
        y_MO = F.grouped_mm(x_pad, w_pad.transpose(-2, -1), offs=offs_E)[:, :o]
    if b_EO is not None:
        y_MO = y_MO + b_EO[expert_M]
    return y_MO


def route(
    logits_NE: Tensor, plan: MoEPlan, correction_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing: (expert indices (N, K), weights (N, K), scores (N, E)), in fp32.

    softmax (Switch / Mixtral `MixtralSparseMoeBlock`): weights are the softmax probabilities of
    the chosen experts. sigmoid (DeepSeek-V3 §2.1.2, eq. 13-16): σ(logits) per expert; the
    aux-loss-free correction bias only steers *selection* (eq. 16), weights use the raw scores.
    normalize_top_k divides the K weights by their sum; routed_scale multiplies them
    (DeepSeek-V3 `routed_scaling_factor`).
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
    experts_NK = select_NE.topk(plan.top_k, dim=-1).indices
    weights_NK = scores_NE.gather(-1, experts_NK)
    if plan.normalize_top_k:
        # DeepSeek-V3 (HF `DeepseekV3TopkRouter`) adds 1e-20 so an all-zero sigmoid row stays finite.
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return experts_NK, weights_NK * plan.routed_scale, scores_NE


def load_balancing_loss(scores_NE: Tensor, counts_E: Tensor, top_k: int, coef: float) -> Tensor:
    """coef · E · Σ_e f_e · P_e (Fedus et al. 2022, Switch Transformer eq. 4-6).

    f_e: fraction of the N·K routed pairs sent to expert e (Switch's top-1 fraction generalised
    to top-k as in DeepSeek-V3 eq. 18, f_i = E/(K·T)·count_i, up to the E factor kept here);
    P_e: mean routing probability of e, with scores renormalised to sum to 1 per token (a no-op
    for softmax; DeepSeek-V3 eq. 19 s'_i for sigmoid scores). Uniform routing gives exactly coef.
    """
    n_tokens, n_experts = scores_NE.shape
    f_E = counts_E.float() / (n_tokens * top_k)
    p_E = (scores_NE / scores_NE.sum(dim=-1, keepdim=True)).mean(dim=0)
    return coef * n_experts * (f_E * p_E).sum()


class MoEFFN(nn.Module):
    """Routed experts (+ fused shared experts, + Qwen2-MoE shared gate) replacing a dense FFN.

    Submodules are the component paths of docs/architecture.md: `router`, `experts`, `shared`,
    `shared_gate`. `last_aux_loss` is the load-balancing loss of the latest forward, computed
    when read from the scores and group ends that forward kept (a pass that never reads it,
    such as verify's FLOP count on meta, skips the loss's ops).
    """

    def __init__(self, plan: MoEPlan, d_model: int) -> None:
        super().__init__()
        self.plan = plan
        self.router = nn.Linear(d_model, plan.n_experts, bias=plan.router_bias)
        # DeepSeek-V3 `e_score_correction_bias`: persistent (checkpoints carry it), not trained by
        # gradient, hence a buffer and never counted as a parameter.
        self.score_correction_bias: Tensor | None
        if plan.score_correction_bias:
            self.register_buffer("score_correction_bias", torch.zeros(plan.n_experts))
        else:
            self.score_correction_bias = None
        self.experts = Experts(plan.expert, plan.n_experts, d_model)
        self.shared: MLP | GLU | None = build_ffn(plan.shared, d_model) if plan.shared else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if plan.shared_gate else None
        self._aux_inputs: tuple[Tensor, Tensor] | None = None  # (scores_NE, ends_E) of the last forward

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.score_correction_bias is not None:
            nn.init.zeros_(self.score_correction_bias)

    @property
    def last_aux_loss(self) -> Tensor | None:
        """coef-weighted load-balancing loss of the latest forward (None before the first)."""
        if self._aux_inputs is None:
            return None
        scores_NE, ends_E = self._aux_inputs
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        return load_balancing_loss(scores_NE, counts_E, self.plan.top_k, self.plan.aux_loss_coef)

    def forward(self, x_BTD: Tensor) -> Tensor:
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        experts_NK, weights_NK, scores_NE = route(self.router(x_ND), self.plan, self.score_correction_bias)
        routed_ND, ends_E = self._dispatch(x_ND, experts_NK, weights_NK)
        self._aux_inputs = (scores_NE, ends_E)
        if self.shared is not None:
            routed_ND = routed_ND + self._shared(x_ND)
        return routed_ND.reshape(b, t, d)

    def _dispatch(self, x_ND: Tensor, experts_NK: Tensor, weights_NK: Tensor) -> tuple[Tensor, Tensor]:
        """Sort the N·K pairs by expert, run all experts as one grouped matmul, scatter back.

        Returns the combined output and each expert's group end in the sorted rows (ends_E).
        """
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
        y_MD = self.experts(x_ND[token_M], offs_E, expert_sorted_M)
        # Back to (token, k) order and a weighted sum over k: a gather and a reduction, both
        # parallel. (An index_add of the M rows onto N tokens hits every token K times, which the
        # CPU kernel serialises: 116 ms vs ~25 ms for this gather at N=2048, K=2, D=1024, 2 threads.)
        # mul + sum, not bmm: the combine is elementwise work in the FLOP convention.
        y_NKD = y_MD[order_M.argsort()].reshape(-1, top_k, y_MD.shape[-1])
        out_ND = (y_NKD * weights_NK[..., None].to(y_NKD.dtype)).sum(dim=1)
        return out_ND.to(x_ND.dtype), ends_E

    def _shared(self, x_ND: Tensor) -> Tensor:
        assert self.shared is not None
        y_ND = self.shared(x_ND)
        if self.shared_gate is not None:
            # Qwen2-MoE `Qwen2MoeSparseMoeBlock`: sigmoid(shared_expert_gate(x)) · shared_expert(x)
            y_ND = torch.sigmoid(self.shared_gate(x_ND)) * y_ND
        return y_ND


def experts_loop(moe: MoEFFN, x_BTD: Tensor) -> Tensor:
    """Slow, obviously-correct reference for tests and benchmarks only (data-dependent: not meta).

    The same routing, then for each expert the tokens whose top-k contains it, through plain
    matmuls, weighted and summed — the HF `MixtralSparseMoeBlock` loop.
    """
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    experts_NK, weights_NK, _ = route(moe.router(x_ND), moe.plan, moe.score_correction_bias)
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
