"""Every parameter tensor of a model, with its shape and how tensor parallelism splits it, so a
rank's share is counted tensor by tensor (FSDP2 pads each tensor's dim 0, Megatron's distributed
optimizer pads one flat buffer: the two differ by a few elements per tensor, and the torch side
measures one of them exactly).

Shapes are the (out, in) layout of `nn.Linear.weight` and the (E, F, D) / (E, D, F) layout of
stacked expert weights, as a checkpoint stores them. Splits (Megatron-LM, Shoeybi et al. 2019 §3;
torch `ColwiseParallel` / `RowwiseParallel`):
- column: dim 0 split over tp (q/k/v, up/gate, in_proj; their biases). Query heads are
  indivisible units; k and v split by rows, so with fewer KV heads than tp ranks (MQA among them)
  a rank's rows cut across a head, as Megatron-Core splits its fused QKV weight, and the layer
  all-gathers the projection's output (`cluster._qkv_gathered`).
- row: dim 1 split over tp (o_proj, down_proj, out_proj); the bias stays whole.
- vocab: dim 0 (the vocabulary) split over tp in torch.chunk's way, ceil(V/tp) rows on rank 0
  (VocabParallelEmbedding, a colwise LM head).
- replicated: norms, routers, the shared-expert gate, MLA's low-rank down-projections.
- expert_column / expert_row: stacked experts, dim 0 (experts) over ep, whole on every tp rank:
  expert tensor parallelism 1 (Megatron-Core `--expert-tensor-parallel-size 1`, torchtitan's
  default), each tp rank feeding them its own sequence shard of tokens; so they replicate over
  the expert data-parallel group (`layout.Layout.expert_dp`), which spans the tp ranks.
Mamba mixers split like Megatron-Core's MambaMixer: everything indexed by d_inner or SSM heads
column-wise, out_proj row-wise; Mamba-1's x_proj (input d_inner) row-wise, its small output
(dt_rank + 2·d_state) reduced over tp and read whole by every rank (Jamba's dt/B/C norms on it
replicated).
Long-convolution mixers (S4/S4D, Hyena, StripedHyena) split their d_model channels over tp, as
Megatron splits heads: every convolution is depthwise (per channel), so a rank convolves its own
channels with no communication; the projections into the channels are column-parallel, the
projection out row-parallel, per-channel parameters (filters, skips, poles and residues) follow
their channels, and small tensors shared by all channels are replicated (their gradients are
summed over tp, as Megatron does for norm weights under sequence parallelism). Each function says
why, with its source. `per_position` marks weights applied once per sequence position (Hyena's
implicit filter MLP), not once per token: pricing runs them on seq rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce
from operator import mul
from typing import Literal

from typing_extensions import assert_never

from archplan.analytic.mtp import mtp_norm_names
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    HyenaPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    NormPlan,
    S4Plan,
    StripedHyenaPlan,
)

Split = Literal["column", "row", "vocab", "replicated", "expert_column", "expert_row"]
# What a parameter does in the forward, for pricing: a linear layer's weight (one GEMM), an MoE
# router's or the shared-expert gate's (a GEMM fp8 recipes keep in bf16, the router's over the tokens
# a rank routes), an expert bank's (one grouped GEMM over the routed copies) or its bias (added to
# each routed copy by its expert's row), or anything else: norms, linear biases, convolutions, SSM
# parameters, positions, embeddings
Role = Literal["linear", "router", "gate", "experts", "expert_bias", "other"]


@dataclass(frozen=True)
class Tensor:
    """One parameter: its module path + name, full shape, split, and the indivisible units of dim 0
    under a column split (heads; 0 = every row is a unit); `per_position`: applied once per sequence
    position, whatever the batch (Hyena's filter MLP), instead of once per token."""

    name: str
    shape: tuple[int, ...]
    split: Split
    units: int = 0
    per_position: bool = False
    role: Role = "other"

    @property
    def numel(self) -> int:
        return reduce(mul, self.shape, 1)

    @property
    def expert(self) -> bool:
        return self.split in ("expert_column", "expert_row")

    def local_shape(self, tp: int, ep: int = 1) -> tuple[int, ...]:
        """The shape on tensor-parallel rank 0 (and expert-parallel rank 0)."""
        shape = list(self.shape)
        match self.split:
            case "column":
                units = self.units or shape[0]
                shape[0] = math.ceil(units / tp) * (shape[0] // units)
            case "row":
                shape[1] = math.ceil(shape[1] / tp)
            case "vocab":
                shape[0] = math.ceil(shape[0] / tp)
            case "replicated":
                pass
            case "expert_column" | "expert_row":
                shape[0] = shape[0] // ep
            case _:
                assert_never(self.split)
        return tuple(shape)

    def local_numel(self, tp: int, ep: int = 1) -> int:
        return reduce(mul, self.local_shape(tp, ep), 1)


def fp8_weight(t: Tensor) -> bool:
    """Whether Megatron-Core's FP8 primary weights (`--fp8-param-gather`) keep `t` in fp8: the weight
    matrix of a tensor- or expert-parallel linear, Transformer Engine's. The embedding and the LM
    head (vocabulary-parallel, Megatron's own layers), norms, biases and routers stay bf16, and so,
    as priced here, do the replicated linears (MLA's latent down-projections): a small overcount.
    Hyena's filter MLP, run in bf16 once per position (`pricing._gemm_shape`), is no fp8 GEMM's."""
    return (t.role in ("linear", "experts") and not t.per_position
            and t.split in ("column", "row", "expert_column", "expert_row"))


def _norm(path: str, norm: NormPlan, width: int, split: Split = "replicated") -> list[Tensor]:
    if not norm.affine:
        return []
    out = [Tensor(f"{path}.weight", (width,), split)]
    if norm.bias:
        out.append(Tensor(f"{path}.bias", (width,), split))
    return out


def _linear(path: str, out: int, inp: int, bias: bool, split: Split, units: int = 0,
            role: Role = "linear") -> list[Tensor]:
    tensors = [Tensor(f"{path}.weight", (out, inp), split, units, role=role)]
    if bias:
        # a row-split linear adds its bias once, after the reduction: the bias stays whole
        tensors.append(Tensor(f"{path}.bias", (out,), "replicated" if split == "row" else split, units))
    return tensors


def _attention(path: str, a: AttentionPlan, d: int) -> list[Tensor]:
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    out = (_linear(f"{path}.q_proj", q, d, a.qkv_bias, "column", a.n_heads)
           # by rows: with fewer KV heads than tp ranks a rank's rows cut across a head
           + _linear(f"{path}.k_proj", kv, d, a.qkv_bias, "column")
           + _linear(f"{path}.v_proj", kv, d, a.qkv_bias, "column")
           + _linear(f"{path}.o_proj", d, q, a.out_bias, "row"))
    if a.qk_norm is not None:
        norm = a.qk_norm.norm
        match a.qk_norm.scope:
            case "head":
                out += _norm(f"{path}.q_norm", norm, a.head_dim) + _norm(f"{path}.k_norm", norm, a.head_dim)
            case "per_head":
                for name, heads in (("q_norm", a.n_heads), ("k_norm", a.n_kv_heads)):
                    out += [Tensor(t.name, (heads, a.head_dim), "column", heads)
                            for t in _norm(f"{path}.{name}", norm, a.head_dim)]
            case "full":
                out += [Tensor(t.name, t.shape, "column", a.n_heads)
                        for t in _norm(f"{path}.q_norm", norm, q)]
                out += [Tensor(t.name, t.shape, "column", a.n_kv_heads)
                        for t in _norm(f"{path}.k_norm", norm, kv)]
            case _:
                assert_never(a.qk_norm.scope)
    return out


def _mla(path: str, m: MLAPlan, d: int) -> list[Tensor]:
    h = m.n_heads
    out: list[Tensor] = []
    if m.q_lora_rank is None:
        out += _linear(f"{path}.q_proj", h * m.qk_head_dim, d, False, "column", h)
    else:
        out += _linear(f"{path}.q_a_proj", m.q_lora_rank, d, False, "replicated")
        out += _norm(f"{path}.q_a_norm", m.norm, m.q_lora_rank)
        out += _linear(f"{path}.q_b_proj", h * m.qk_head_dim, m.q_lora_rank, False, "column", h)
    out += _linear(f"{path}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, d, False,
                   "replicated")
    out += _norm(f"{path}.kv_a_norm", m.norm, m.kv_lora_rank)
    out += _linear(f"{path}.kv_b_proj", h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank,
                   False, "column", h)
    out += _linear(f"{path}.o_proj", d, h * m.v_head_dim, False, "row")
    return out


def _conv(path: str, channels: int, width: int, bias: bool) -> list[Tensor]:
    out = [Tensor(f"{path}.weight", (channels, 1, width), "column")]
    if bias:
        out.append(Tensor(f"{path}.bias", (channels,), "column"))
    return out


def _mamba1(path: str, m: Mamba1Plan, d: int) -> list[Tensor]:
    i, n, r = m.d_inner, m.d_state, m.dt_rank
    out = _linear(f"{path}.in_proj", 2 * i, d, m.proj_bias, "column")
    out += _conv(f"{path}.conv1d", i, m.d_conv, m.conv_bias)
    out += [Tensor(f"{path}.x_proj.weight", (r + 2 * n, i), "row", role="linear")]
    out += _linear(f"{path}.dt_proj", i, r, True, "column")
    out += [Tensor(f"{path}.A_log", (i, n), "column"), Tensor(f"{path}.D", (i,), "column")]
    out += _linear(f"{path}.out_proj", d, i, m.proj_bias, "row")
    if m.inner_norms:
        out += (_norm(f"{path}.dt_layernorm", m.norm, r) + _norm(f"{path}.b_layernorm", m.norm, n)
                + _norm(f"{path}.c_layernorm", m.norm, n))
    return out


def _mamba2(path: str, m: Mamba2Plan, d: int) -> list[Tensor]:
    width = 2 * m.d_inner + 2 * m.n_groups * m.d_state + m.n_heads
    out = _linear(f"{path}.in_proj", width, d, m.proj_bias, "column")
    out += _conv(f"{path}.conv1d", m.conv_dim, m.d_conv, m.conv_bias)
    out += [Tensor(f"{path}.{name}", (m.n_heads,), "column") for name in ("dt_bias", "A_log", "D")]
    out += _norm(f"{path}.norm", m.norm, m.d_inner, "column")
    out += _linear(f"{path}.out_proj", d, m.d_inner, m.proj_bias, "row")
    return out


def _s4(path: str, m: S4Plan, d: int) -> list[Tensor]:
    """archplan.modules.s4.S4Mixer (state-spaces/s4 `models/s4/s4.py`): the SSM runs per channel H,
    so D, C and log Δ split with the channels. The S = n_ssm copies of (A, B, P) serve H/S
    consecutive channels each: they split as units (a rank holds the copies its channels use, the
    single copy of S = 1 on every rank, like a KV head under GQA). There is no input projection: a
    rank convolves its slice of the block input's channels. output_linear (H -> 2H, then the GLU)
    is row-parallel on those channels (Shoeybi et al. 2019 §3's second GEMM): its 2H partial sums
    are reduced before the GLU, which then runs on whole rows; its bias is added once, after."""
    s, modes = m.n_ssm, m.modes
    out = [Tensor(f"{path}.D", (d,), "column"), Tensor(f"{path}.C", (d, modes, 2), "column")]
    out += _linear(f"{path}.output_linear", 2 * d, d, True, "row")
    if m.ssm_buffers:  # registered as buffers (lr 0 in the reference): no gradient, no optimizer state
        return out
    out.append(Tensor(f"{path}.log_dt", (d,), "column"))
    ssm = {"B": (s, modes, 2), "A_log_real": (s, modes), "A_imag": (s, modes)}
    if m.dplr:
        ssm["P"] = (s, modes, 2)
    return out + [Tensor(f"{path}.{name}", shape, "column", s) for name, shape in ssm.items()]


def _hyena(path: str, m: HyenaPlan, d: int) -> list[Tensor]:
    """archplan.modules.hyena.HyenaMixer (safari HyenaOperator; Poli et al. 2023 §3). in_proj
    (D -> (N_o+1)·D) is column-parallel: each rank takes its channel slice of every one of the
    N_o + 1 projections (as Megatron interleaves a fused QKV), so the depthwise short conv over those
    channels, the gates x_i·v and the long convolutions stay local; out_proj is row-parallel. The
    implicit filter's output layer mlp_out (F -> (N_o−1)·D) has one row per channel's filter and
    splits with the channels (a rank generates only its channels' filters), as does the filter's
    skip bias. The filter MLP's trunk (mlp_in, mlp_inner, the shared Sin frequency, trainable
    positional features) is F-wide and shared by every channel: replicated, run in full on every
    rank (a few F × F GEMMs per position). The positional table when not trained, t and the
    modulation deltas are buffers, not parameters."""
    inner, f = (m.order + 1) * d, m.filter_order
    channels = d * (m.order - 1)
    out = _linear(f"{path}.in_proj", inner, d, m.bias, "column")
    out += _conv(f"{path}.short_filter", inner, m.short_filter, True)
    flt = f"{path}.filter"
    if m.trainable_positions:
        out.append(Tensor(f"{flt}.z", (1, m.l_max, m.emb_dim), "replicated"))
    trunk = _linear(f"{flt}.mlp_in", f, m.emb_dim, True, "replicated")
    for j in range(m.filter_depth):
        trunk += _linear(f"{flt}.mlp_inner.{j}", f, f, True, "replicated")
    trunk += _linear(f"{flt}.mlp_out", channels, f, False, "column")
    out += [replace(t, per_position=True) for t in trunk]
    out += [Tensor(f"{flt}.freq", (1, f), "replicated"), Tensor(f"{flt}.bias", (channels,), "column")]
    out += _linear(f"{path}.out_proj", d, d, m.bias, "row")
    return out


def _striped_hyena(path: str, m: StripedHyenaPlan, d: int) -> list[Tensor]:
    """archplan.modules.stripedhyena.StripedHyenaMixer (togethercomputer/stripedhyena `model.py`
    ParallelGatedConvBlock + ParallelHyenaFilter). projections (D -> 3D) are column-parallel: the
    reference's `column_split_hyena` (`utils.column_split`) lays its 3D outputs out per head as
    [x2_h | x1_h | v_h], the layout of a Megatron column split (the checkpoints come from a
    tensor-parallel trainer), so a rank holds whole (x2, x1, v) triples of its channels. The short
    FIR (3D channels) follows those columns; the D skip follows the channels; the D/g modal
    filters' poles and residues split as units (filter c serves channels c·g … c·g + g − 1), the
    one filter of g = D on every rank. out_filter_dense is row-parallel."""
    out = _linear(f"{path}.projections", 3 * d, d, True, "column")
    out.append(Tensor(f"{path}.short_filter_weight", (3 * d, 1, m.short_filter), "column"))
    if m.short_filter_bias:
        out.append(Tensor(f"{path}.short_filter_bias", (3 * d,), "column"))
    filters = d // m.filter_groups
    out.append(Tensor(f"{path}.D", (d,), "column"))
    out += [Tensor(f"{path}.{name}", (filters, m.state_size, 1, 2), "column", filters)
            for name in ("poles", "residues")]
    out += _linear(f"{path}.out_filter_dense", d, d, True, "row")
    return out


def _ffn(path: str, f: FFNPlan, d: int) -> list[Tensor]:
    out: list[Tensor] = []
    if f.kind == "glu":
        out += _linear(f"{path}.gate_proj", f.d_ff, d, f.bias, "column")
    out += _linear(f"{path}.up_proj", f.d_ff, d, f.bias, "column")
    out += _linear(f"{path}.down_proj", d, f.d_ff, f.bias, "row")
    return out


def _moe(path: str, m: MoEPlan, d: int) -> list[Tensor]:
    e, f = m.n_experts, m.expert.d_ff
    out = _linear(f"{path}.router", e, d, m.router_bias, "replicated", role="router")
    glu = m.expert.kind == "glu"
    experts = f"{path}.experts"
    if glu:
        out.append(Tensor(f"{experts}.w_gate_EFD", (e, f, d), "expert_column", role="experts"))
    out.append(Tensor(f"{experts}.w_up_EFD", (e, f, d), "expert_column", role="experts"))
    out.append(Tensor(f"{experts}.w_down_EDF", (e, d, f), "expert_row", role="experts"))
    if m.expert.bias:
        if glu:
            out.append(Tensor(f"{experts}.b_gate_EF", (e, f), "expert_column", role="expert_bias"))
        out.append(Tensor(f"{experts}.b_up_EF", (e, f), "expert_column", role="expert_bias"))
        out.append(Tensor(f"{experts}.b_down_ED", (e, d), "expert_column", role="expert_bias"))
    if m.shared is not None:
        out += _ffn(f"{path}.shared", m.shared, d)
    if m.shared_gate:
        out += _linear(f"{path}.shared_gate", 1, d, False, "replicated", role="gate")
    return out


def layer_tensors(layer: LayerPlan, plan: ModelPlan) -> list[Tensor]:
    """Every parameter of one block, by module path (`layers.{i}.…`)."""
    d, p = plan.d_model, layer.path
    out: list[Tensor] = []
    for name in layer.norms:
        out += _norm(f"{p}.{name}", plan.norm, d)
    match layer.mixer:
        case AttentionPlan():
            out += _attention(f"{p}.mixer", layer.mixer, d)
        case MLAPlan():
            out += _mla(f"{p}.mixer", layer.mixer, d)
        case Mamba1Plan():
            out += _mamba1(f"{p}.mixer", layer.mixer, d)
        case Mamba2Plan():
            out += _mamba2(f"{p}.mixer", layer.mixer, d)
        case S4Plan():
            out += _s4(f"{p}.mixer", layer.mixer, d)
        case HyenaPlan():
            out += _hyena(f"{p}.mixer", layer.mixer, d)
        case StripedHyenaPlan():
            out += _striped_hyena(f"{p}.mixer", layer.mixer, d)
        case _:
            assert_never(layer.mixer)
    match layer.ffn:
        case FFNPlan():
            out += _ffn(f"{p}.ffn", layer.ffn, d)
        case MoEPlan():
            out += _moe(f"{p}.ffn", layer.ffn, d)
        case None:
            pass
        case _:
            assert_never(layer.ffn)
    return out


def first_tensors(plan: ModelPlan) -> list[Tensor]:
    """What the first pipeline stage holds before its layers: embedding, learned positions, the
    embedding norm (BLOOM)."""
    out = [Tensor("embed.weight", (plan.vocab_size, plan.d_model), "vocab")]
    if plan.position == "learned":
        out.append(Tensor("pos_embed.weight", (plan.max_seq_len, plan.d_model), "replicated"))
    if plan.embed_norm:
        out += _norm("embed_norm", plan.norm, plan.d_model)
    return out


def last_tensors(plan: ModelPlan, *, tied_copy: bool) -> list[Tensor]:
    """What the last pipeline stage holds after its layers: final norm and LM head. A tied head is
    the embedding itself at one stage; across stages the last one holds a copy (Megatron's shared
    embedding, kept in sync by an all-reduce of the two gradients), `tied_copy`.

    The multi-token-prediction modules live there too (Megatron-Core builds its MTP block on the
    last stage): each one's norms and its 2·d → d projection (column-parallel, Megatron's
    `eh_proj`; their blocks are layers of the last chunk), and, across stages, a copy of the
    embedding they read the shifted tokens through (Megatron-Core's GPTModel builds the embedding
    wherever `mtp_process` is, synced as a tied one) unless the tied head already is one."""
    d = plan.d_model
    out = _norm("final_norm", plan.norm, d) if plan.final_norm else []
    if not plan.tied or tied_copy:
        out.append(Tensor("lm_head.weight", (plan.vocab_size, d), "vocab"))
    if plan.lm_head_bias:
        out.append(Tensor("lm_head.bias", (plan.vocab_size,), "vocab"))
    if plan.mtp and tied_copy and not plan.tied:
        out.append(Tensor("mtp_embed.weight", (plan.vocab_size, d), "vocab"))
    for block in plan.mtp:
        for name in mtp_norm_names(plan):
            out += _norm(f"{block.path}.{name}", plan.norm, d)
        out += _linear(f"{block.path}.proj", d, 2 * d, False, "column")
    return out
