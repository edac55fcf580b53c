"""Resolve a spec into one explicit plan per layer, with every size a final integer.

This is the only code that turns layout patterns (Jamba's attention-every-8th, DeepSeek's
first-k-dense, sliding/global alternation) into per-layer plans; which layers are MoE is one rule,
`spec.Layout.routes`, which the spec's own checks call too. Everything downstream — analytic sizer
and torch builder alike — iterates `ModelPlan.layers` and never looks at a layer index to decide
what a layer is.

Module paths (the keys of every per-component result, and the names in the torch model):
  embed, pos_embed, embed_norm,
  layers.{i}.{norm}            one entry per name in LayerPlan.norms (norm1, norm2, post_norm1, ...)
  layers.{i}.mixer             attention / MLA / Mamba / S4 / Hyena, with their internal norms
  layers.{i}.ffn               dense FFN
  layers.{i}.ffn.router|experts|shared|shared_gate   MoE
  final_norm, lm_head
  mtp.{k}.enorm|hnorm|proj|final_norm   multi-token prediction module k (0-based), training only
  mtp.{k}.{norm}|mixer|ffn...  its block, named as a layer's parts
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

from archplan.errors import ArchplanError
from archplan.spec import (
    GLU,
    GQA,
    MHA,
    MLA,
    MLP,
    MQA,
    S4,
    S4D,
    Alibi,
    DeepNorm,
    Hyena,
    Mamba1,
    Mamba2,
    MoE,
    NormSpec,
    Parallel,
    PostNorm,
    PreNorm,
    Reordered,
    Residual,
    Rope,
    Sandwich,
    Spec,
    StripedHyena,
    mtp_training_tokens,
    rotary_dim,
)
from typing_extensions import assert_never


@dataclass(frozen=True)
class NormPlan:
    kind: Literal["rmsnorm", "layernorm"]
    bias: bool
    eps: float
    affine: bool = True  # False: no weight and no bias (OLMo-1)


@dataclass(frozen=True)
class QKNormPlan:
    scope: Literal["head", "per_head", "full"]
    norm: NormPlan


@dataclass(frozen=True)
class AttentionPlan:
    """MHA/GQA/MQA; `kind` is kept for display, the sizes say everything."""

    kind: Literal["mha", "gqa", "mqa"]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool
    out_bias: bool
    qk_norm: QKNormPlan | None
    window: int | None  # sliding window of this layer, None = global
    rotary_dim: int  # 0 when the model has no RoPE
    scale: float | None = None  # the scores' factor where it is not 1/sqrt(head_dim) (spec scale_dim)

    def splits_over(self, tp: int) -> bool:
        """Whether tp ranks split the heads as Megatron-Core does: the query heads evenly, the KV
        heads evenly or, fewer than tp and dividing it, one a rank (its `num_query_groups <
        world_size` branch). `plan`'s search and the torch engine accept the same splits."""
        return not (self.n_heads % tp or self.n_kv_heads % tp and tp % self.n_kv_heads)


@dataclass(frozen=True)
class MLAPlan:
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    window: int | None
    norm: NormPlan  # the q/kv latent RMSNorms (DeepSeek-V2 §2.1.2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class Mamba1Plan:
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    conv_bias: bool
    proj_bias: bool
    inner_norms: bool
    norm: NormPlan  # used for Jamba's dt/B/C norms


@dataclass(frozen=True)
class Mamba2Plan:
    d_inner: int
    d_state: int
    d_conv: int
    head_dim: int
    n_heads: int
    n_groups: int
    chunk_size: int
    conv_bias: bool
    proj_bias: bool
    norm: NormPlan  # the gated RMSNorm before out_proj

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


@dataclass(frozen=True)
class S4Plan:
    """S4D (dplr False) or S4 DPLR layer over d_model channels H (Gu et al. 2022)."""

    dplr: bool
    d_state: int  # N; N/2 complex modes are stored
    n_ssm: int  # copies of (A, B, P), each shared by H / n_ssm channels
    ssm_buffers: bool  # A, B, P, log Δ are buffers (not parameters)

    @property
    def modes(self) -> int:
        return self.d_state // 2


@dataclass(frozen=True)
class HyenaPlan:
    """Hyena operator (Poli et al. 2023; safari HyenaOperator)."""

    order: int
    filter_order: int  # F
    filter_depth: int  # inner Linear(F, F) layers
    emb_dim: int  # E
    short_filter: int  # k
    l_max: int
    trainable_positions: bool
    modulation: bool
    bias: bool
    sin_freq: float  # initial Sin frequency (init only)


@dataclass(frozen=True)
class StripedHyenaPlan:
    """StripedHyena's hyena mixer (togethercomputer/stripedhyena ParallelHyenaFilter + projections)."""

    short_filter: int
    short_filter_bias: bool
    state_size: int
    filter_groups: int  # channels per modal filter


@dataclass(frozen=True)
class FFNPlan:
    kind: Literal["mlp", "glu"]
    d_ff: int
    activation: Literal["relu", "gelu", "gelu_tanh", "silu"]
    bias: bool


@dataclass(frozen=True)
class MoEPlan:
    n_experts: int
    top_k: int
    expert: FFNPlan
    shared: FFNPlan | None  # all shared experts fused into one FFN of width n·d_ff
    shared_gate: bool
    scoring: Literal["softmax", "sigmoid"]
    normalize_top_k: bool
    router_bias: bool
    score_correction_bias: bool  # a buffer, never a parameter
    bias_update_speed: float  # γ of its per-step update (`modules.moe.Router.balance`)
    routed_scale: float
    aux_loss_coef: float
    aux_loss_scope: Literal["batch", "sequence"] = "batch"
    n_group: int | None = None  # group-limited routing (None: every expert is a candidate)
    topk_group: int | None = None
    group_score: Literal["max", "top2_sum"] = "top2_sum"


LongConvPlan = Union[S4Plan, HyenaPlan, StripedHyenaPlan]
MixerPlan = Union[AttentionPlan, MLAPlan, Mamba1Plan, Mamba2Plan, S4Plan, HyenaPlan, StripedHyenaPlan]
FFNOrMoE = Union[FFNPlan, MoEPlan]


@dataclass(frozen=True)
class LayerPlan:
    index: int
    mixer: MixerPlan
    ffn: FFNOrMoE | None
    norms: tuple[str, ...]  # module names of this layer's norms, in forward order
    where: Literal["layers", "mtp"] = "layers"  # a main-model layer, or a multi-token-prediction module's block

    @property
    def path(self) -> str:
        return f"{self.where}.{self.index}"


def layer_index(path: str) -> int | None:
    """The main-model layer a component path lies in (`layers.3.mixer` → 3; `LayerPlan.path`), or
    None for the embedding, the head and a multi-token-prediction module's block."""
    parts = path.split(".")
    return int(parts[1]) if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() else None


class PositionLimit(NamedTuple):
    positions: int  # the most positions one forward or one cache can hold
    what: str  # what sets it, for messages
    field: str  # the spec field that holds it


@dataclass(frozen=True)
class ModelPlan:
    name: str
    vocab_size: int
    d_model: int
    max_seq_len: int
    tied: bool
    embed_norm: bool
    lm_head_bias: bool
    position: Literal["rope", "alibi", "learned", "sinusoidal", "none"]
    rope: Rope | None
    norm: NormPlan
    residual: Literal["pre", "post", "deepnorm", "parallel", "sandwich", "reordered"]
    deepnorm_alpha: float  # residual scale; 1.0 unless deepnorm
    deepnorm_beta: float  # init gain; 1.0 unless deepnorm
    final_norm: bool
    layers: tuple[LayerPlan, ...]
    # DeepSeek-V3's multi-token prediction (spec.MultiTokenPrediction): one block per depth, run in
    # training only; each module also holds two input norms, a 2·d → d projection and a final norm
    mtp: tuple[LayerPlan, ...] = ()
    mtp_loss_weight: float = 0.0
    embed_scale: float = 1.0  # the embedding output's factor: sqrt(d_model) where spec embedding.scaled
    alibi_scale: float = 1.0  # the ALiBi slopes' factor: 1/sqrt(head_dim) where spec position.scaled

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def trained_layers(self) -> tuple[LayerPlan, ...]:
        """The blocks a training step runs: the main model's, then the MTP modules'."""
        return self.layers + self.mtp

    @property
    def routed(self) -> bool:
        """Whether some layer routes its tokens to experts."""
        return any(isinstance(layer.ffn, MoEPlan) for layer in self.layers)

    @property
    def has_attention(self) -> bool:
        """Whether some layer's mixer is attention (MHA/GQA/MQA or MLA)."""
        return any(isinstance(layer.mixer, AttentionPlan | MLAPlan) for layer in self.layers)

    def position_limit(self) -> PositionLimit | None:
        """The most positions the model takes, in one forward or in a cache, and what sets it: the
        learned position table (max_seq_len rows) or a Hyena layer's implicit filter, generated
        for l_max positions (safari `HyenaFilter`); None where nothing bounds them (rotary, ALiBi
        and sinusoidal positions, SSMs, S4D's and StripedHyena's filters, computed for any length)."""
        limits = [PositionLimit(layer.mixer.l_max, "the Hyena filter length", "l_max")
                  for layer in self.layers if isinstance(layer.mixer, HyenaPlan)]
        if self.position == "learned":
            limits.append(PositionLimit(self.max_seq_len, "the learned position table", "max_seq_len"))
        return min(limits, default=None)

    def check_length(self, length: int, option: str) -> None:
        """Refuse `length` positions where the model has none (`position_limit`: past a learned
        table's rows or a Hyena filter). Past max_seq_len elsewhere the model is sized, priced and
        run as asked; `past_trained_note` says what RoPE was not trained on."""
        limit = self.position_limit()
        if limit is not None and length > limit.positions:
            raise ArchplanError(f"{length:,} exceeds {limit.what} of {self.name} ({limit.field} "
                                f"{limit.positions:,})", field=option)

    def past_trained_note(self, what: str, length: int, sized: str) -> str | None:
        """Why `length` positions deserve a second look, or None: past the length a rotary model
        was trained (or scaled) to, its perplexity rises sharply unless the frequencies are rescaled
        (Chen et al. 2023, position interpolation; Peng et al. 2023, YaRN), which position.scaling
        states. ALiBi and sinusoidal positions are defined at every length and SSM / long-conv
        models carry none, so only RoPE gets the note; a learned table or a Hyena filter ends
        (`position_limit`). `what` names the length ("context", "seq"), `sized` what was done."""
        if self.position != "rope" or length <= self.max_seq_len:
            return None
        advice = ("raise position.scaling.factor and max_seq_len" if self.rope is not None and self.rope.scaling
                  else "give position.scaling and the new max_seq_len")
        return (f"{what} {length:,} is past {self.name}'s max_seq_len ({self.max_seq_len:,}): {sized}, but "
                f"RoPE was not trained there ({advice} to plan a longer window)")

    def short_for_mtp_note(self, seq: int) -> str | None:
        """Why a training sequence of `seq` tokens deserves a second look, or None: shorter than
        `mtp_training_tokens`, the step trains the multi-token-prediction modules on nothing
        (`verify` and `bench` refuse it: `modules.model.check_mtp_length`)."""
        need = mtp_training_tokens(len(self.mtp))
        if not self.mtp or seq >= need:
            return None
        return (f"seq {seq:,} is shorter than the {need} tokens a training sequence of {self.name} needs (the next "
                f"one and {len(self.mtp)} more ahead for its multi-token prediction): training FLOPs and memory are "
                "sized as asked, but such a step has no target for the modules (verify and bench refuse it)")


def check_mtp_length(depth: int, seq: int, field: str | None = None) -> None:
    """A training sequence with `depth` multi-token-prediction modules needs a target for the main
    head and for each module (`mtp_training_tokens`; `training_loss` and `verify --layout` alike)."""
    if seq < (need := mtp_training_tokens(depth)):
        raise ArchplanError(f"a training sequence needs at least {need} tokens (the next one, and "
                            f"{depth} more ahead for multi-token prediction); got {seq}", field=field)


def norm_plan(norm: NormSpec) -> NormPlan:
    return NormPlan(kind=norm.kind, bias=norm.has_bias, eps=norm.eps, affine=norm.affine)


def layer_norm_names(residual: Residual, has_ffn: bool) -> tuple[str, ...]:
    """Norms of one block. With no FFN (pure Mamba blocks) only the mixer's norms exist."""
    match residual:
        case PreNorm() | PostNorm() | DeepNorm():
            names: tuple[str, ...] = ("norm1", "norm2")
        case Parallel(shared_norm=True):
            return ("norm1",)
        case Parallel():
            names = ("norm1", "norm2")
        case Sandwich():
            names = ("norm1", "post_norm1", "norm2", "post_norm2")
        case Reordered():
            names = ("post_norm1", "post_norm2")
        case _:
            assert_never(residual)
    return names if has_ffn else names[: len(names) // 2]


def _attention_plan(spec: Spec, window: int | None) -> AttentionPlan | MLAPlan:
    attn = spec.attention
    assert attn is not None
    if isinstance(attn, MLA):
        return MLAPlan(
            n_heads=attn.n_heads,
            q_lora_rank=attn.q_lora_rank,
            kv_lora_rank=attn.kv_lora_rank,
            qk_nope_head_dim=attn.qk_nope_head_dim,
            qk_rope_head_dim=attn.qk_rope_head_dim,
            v_head_dim=attn.v_head_dim,
            window=window,
            norm=NormPlan("rmsnorm", False, attn.latent_norm_eps),
        )
    head_dim = attn.head_dim or spec.d_model // attn.n_heads
    match attn:
        case MHA():
            n_kv = attn.n_heads
        case GQA():
            n_kv = attn.n_kv_heads
        case MQA():
            n_kv = 1
        case _:
            assert_never(attn)
    rope = spec.position if isinstance(spec.position, Rope) else None
    return AttentionPlan(
        kind=attn.kind,
        n_heads=attn.n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        qkv_bias=attn.qkv_bias,
        out_bias=attn.out_bias,
        qk_norm=(
            QKNormPlan(attn.qk_norm.scope, norm_plan(attn.qk_norm.norm)) if attn.qk_norm else None
        ),
        window=window,
        rotary_dim=rotary_dim(head_dim, rope.fraction) if rope else 0,
        scale=attn.scale_dim ** -0.5 if attn.scale_dim is not None else None,
    )


def _ssm_plan(spec: Spec) -> Mamba1Plan | Mamba2Plan:
    ssm = spec.ssm
    match ssm:
        case Mamba1():
            # Gu & Dao 2023 / mamba_simple.py: dt_rank "auto" = ceil(d_model / 16)
            dt_rank = math.ceil(spec.d_model / 16) if ssm.dt_rank == "auto" else ssm.dt_rank
            return Mamba1Plan(
                d_inner=ssm.expand * spec.d_model,
                d_state=ssm.d_state,
                d_conv=ssm.d_conv,
                dt_rank=dt_rank,
                conv_bias=ssm.conv_bias,
                proj_bias=ssm.proj_bias,
                inner_norms=ssm.inner_norms,
                norm=NormPlan("rmsnorm", False, spec.norm.eps),
            )
        case Mamba2():
            d_inner = ssm.expand * spec.d_model
            return Mamba2Plan(
                d_inner=d_inner,
                d_state=ssm.d_state,
                d_conv=ssm.d_conv,
                head_dim=ssm.head_dim,
                n_heads=d_inner // ssm.head_dim,
                n_groups=ssm.n_groups,
                chunk_size=ssm.chunk_size,
                conv_bias=ssm.conv_bias,
                proj_bias=ssm.proj_bias,
                norm=NormPlan("rmsnorm", False, spec.norm.eps),
            )
        case None:
            raise AssertionError("layout places an SSM layer but spec.ssm is None")
        case _:
            assert_never(ssm)


def _long_conv_plan(spec: Spec) -> LongConvPlan:
    conv = spec.long_conv
    match conv:
        case S4D() | S4():
            return S4Plan(
                dplr=isinstance(conv, S4),
                d_state=conv.d_state,
                n_ssm=conv.n_ssm if conv.n_ssm is not None else spec.d_model,
                ssm_buffers=conv.ssm_buffers,
            )
        case Hyena():
            return HyenaPlan(
                order=conv.order,
                filter_order=conv.filter_order,
                filter_depth=conv.filter_depth,
                emb_dim=conv.emb_dim,
                short_filter=conv.short_filter,
                l_max=conv.l_max,
                trainable_positions=conv.trainable_positions,
                modulation=conv.modulation,
                bias=conv.bias,
                sin_freq=conv.sin_freq,
            )
        case StripedHyena():
            return StripedHyenaPlan(
                short_filter=conv.short_filter,
                short_filter_bias=conv.short_filter_bias,
                state_size=conv.state_size,
                filter_groups=conv.filter_groups,
            )
        case None:
            raise AssertionError("layout places a long-convolution layer but spec.long_conv is None")
        case _:
            assert_never(conv)


def ffn_plan(ffn: MLP | GLU) -> FFNPlan:
    return FFNPlan(kind=ffn.kind, d_ff=ffn.d_ff, activation=ffn.activation, bias=ffn.bias)


def _moe_plan(moe: MoE) -> MoEPlan:
    shared = None
    if moe.shared is not None:
        shared = FFNPlan(
            kind=moe.expert.kind,
            d_ff=moe.shared.n * moe.shared.d_ff,
            activation=moe.expert.activation,
            bias=moe.expert.bias,
        )
    return MoEPlan(
        n_experts=moe.n_experts,
        top_k=moe.top_k,
        expert=ffn_plan(moe.expert),
        shared=shared,
        shared_gate=moe.shared.gate if moe.shared is not None else False,
        scoring=moe.router.scoring,
        normalize_top_k=moe.router.normalize_top_k,
        router_bias=moe.router.bias,
        score_correction_bias=moe.router.score_correction_bias,
        bias_update_speed=moe.router.bias_update_speed,
        routed_scale=moe.router.scale,
        aux_loss_coef=moe.aux_loss_coef,
        aux_loss_scope=moe.aux_loss_scope,
        n_group=moe.router.n_group,
        topk_group=moe.router.topk_group,
        group_score=moe.router.group_score,
    )


def resolve(spec: Spec) -> ModelPlan:
    layout = spec.layout
    pattern = layout.mixers
    window = spec.attention.sliding_window if spec.attention is not None else None
    # Built once and shared: identical layers hold the identical (frozen) plan object.
    global_attn = _attention_plan(spec, None) if spec.attention is not None else None
    local_attn = _attention_plan(spec, window) if window is not None else None
    ssm = _ssm_plan(spec) if spec.ssm is not None else None
    long_conv = _long_conv_plan(spec) if spec.long_conv is not None else None
    dense = ffn_plan(spec.ffn) if spec.ffn is not None else None
    moe = _moe_plan(spec.moe) if spec.moe is not None else None

    def layer(i: int) -> tuple[MixerPlan, FFNOrMoE | None, tuple[str, ...]]:
        letter = pattern[i % len(pattern)]
        mixer = {"A": global_attn, "S": local_attn, "M": ssm, "H": long_conv}[letter]
        assert mixer is not None
        is_moe = moe is not None and layout.routes(i)
        ffn: FFNOrMoE | None = moe if is_moe else dense
        return mixer, ffn, layer_norm_names(spec.residual, ffn is not None)

    layers = [LayerPlan(i, *layer(i)) for i in range(spec.n_layers)]
    # DeepSeek-V3 §2.2: each MTP module's block is the layer that would come next (its layer 61, MoE)
    depth = spec.mtp.depth if spec.mtp is not None else 0
    mtp = tuple(LayerPlan(k, *layer(spec.n_layers + k), where="mtp") for k in range(depth))

    residual = spec.residual
    return ModelPlan(
        name=spec.name,
        vocab_size=spec.vocab_size,
        d_model=spec.d_model,
        max_seq_len=spec.max_seq_len,
        tied=spec.embedding.tied,
        embed_norm=spec.embedding.norm,
        lm_head_bias=spec.embedding.lm_head_bias,
        position=spec.position.kind,
        rope=spec.position if isinstance(spec.position, Rope) else None,
        norm=norm_plan(spec.norm),
        residual=residual.kind,
        deepnorm_alpha=spec.deepnorm_alpha if isinstance(residual, DeepNorm) else 1.0,
        deepnorm_beta=spec.deepnorm_beta if isinstance(residual, DeepNorm) else 1.0,
        final_norm=spec.final_norm,
        layers=tuple(layers),
        mtp=mtp,
        mtp_loss_weight=spec.mtp.loss_weight if spec.mtp is not None else 0.0,
        embed_scale=math.sqrt(spec.d_model) if spec.embedding.scaled else 1.0,
        alibi_scale=_alibi_scale(spec, layers),
    )


def _alibi_scale(spec: Spec, layers: Sequence[LayerPlan]) -> float:
    """1/sqrt(head_dim) where the bias joins the scores before their scale (spec Alibi.scaled), else 1."""
    if not (isinstance(spec.position, Alibi) and spec.position.scaled):
        return 1.0
    mixer = next(layer.mixer for layer in layers if isinstance(layer.mixer, AttentionPlan | MLAPlan))
    return (mixer.head_dim if isinstance(mixer, AttentionPlan) else mixer.qk_head_dim) ** -0.5
