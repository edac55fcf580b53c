"""The architecture spec: a frozen, `extra="forbid"` Pydantic v2 tree.

Every variant set is a discriminated union on `kind`. The spec only *describes*; `resolve.py`
turns it into one explicit plan per layer with final integers, which both the analytic sizer
and the torch builder read. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic_core.core_schema import ValidatorFunctionWrapHandler
from typing_extensions import assert_never

# Sizes above this are rejected as absurd: 2^40 would already be a 1-trillion-wide matrix side.
MAX_DIM = 1 << 24
MAX_ROPE_FACTOR = 1024.0  # the largest RoPE scaling factor a spec takes
MAX_LAYERS = 100_000
MAX_SEQ_LEN = 1 << 26
# the most sequences one forward takes (size's --batch and --micro-batch, verify's --batch, a layout's mb)
MAX_BATCH = 1 << 20

# Strict: YAML reads `true`, `yes` and `on` as booleans and `"32"` as a string, which lax mode
# would take as 1 and 32 without a word (the JSON schema already refuses them). Strict integers
# refuse floats too (4096.0); strict numbers still take integers (`theta: 10000`). No number a
# spec holds is meaningful as YAML's .inf or .nan.
Int = Annotated[int, Strict()]
# lax booleans took "true", "off", 1 and 0: a quoted "false" read as false by luck, `tied: 1` as true
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Dim = Annotated[Int, Field(gt=0, le=MAX_DIM)]
NonNegDim = Annotated[Int, Field(ge=0, le=MAX_DIM)]
PositiveInt = Annotated[Int, Field(gt=0)]
NAME_MAX_CHARS = 200  # a spec's name, as tables and file names show it


def control_character(c: str) -> bool:
    """A C0 or C1 control character (or DEL), which no name and, but line breaks and tabs, no prose keeps."""
    return ord(c) < 32 or 127 <= ord(c) < 160


def _printable(text: str, allowed: str) -> str:
    """Names and prose reach the terminal as written: an escape sequence in a spec's name would
    recolour or rewrite it. `allowed`: the control characters the field keeps (prose's line breaks)."""
    bad = next((c for c in text if control_character(c) and c not in allowed), None)
    if bad is not None:
        raise ValueError(f"control character {bad!r} at position {text.index(bad)}; write printable text")
    return text


# the same rule in the JSON Schema, for editors (`archplan schema`): no C0 or C1 control character
# but the ones the field keeps
Line = Annotated[str, AfterValidator(lambda text: _printable(text, "")),
                 Field(json_schema_extra={"pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"})]
Text = Annotated[str, AfterValidator(lambda text: _printable(text, "\n\t")),
                 Field(json_schema_extra={"pattern": "^[^\\u0000-\\u0008\\u000b-\\u001f\\u007f-\\u009f]*$"})]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------- norms
class NormSpec(Frozen):
    """RMSNorm (Zhang & Sennrich 2019: weight only) or LayerNorm (Ba et al. 2016: weight + bias)."""

    kind: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    bias: Bool = Field(True, description="LayerNorm only: learnable bias (MPT/OLMo drop it).")
    eps: Number = Field(1e-5, gt=0, lt=1)
    affine: Bool = Field(True, description="False: no learnable weight or bias (OLMo-1's LayerNorm).")

    @model_validator(mode="after")
    def _rms_has_no_bias(self) -> NormSpec:
        if self.kind == "rmsnorm" and "bias" in self.model_fields_set and self.bias:
            raise ValueError("rmsnorm has no bias; set kind: layernorm or drop `bias`")
        if not self.affine and "bias" in self.model_fields_set and self.bias:
            raise ValueError("a norm with affine: false has no bias; drop `bias`")
        return self

    @property
    def has_bias(self) -> bool:
        return self.kind == "layernorm" and self.bias and self.affine


# ----------------------------------------------------------------------------------- positions
class RopeScaling(Frozen):
    """RoPE length extension as shipped by Llama 3.1 (`llama3`), DeepSeek-V3 (`yarn`) and others."""

    kind: Literal["linear", "ntk", "yarn", "llama3"]
    factor: Number = Field(gt=1.0, le=MAX_ROPE_FACTOR, description="How many times longer the context is than "
                                                                     "the one trained on.")
    original_max_positions: PositiveInt | None = Field(
        None, description="Tokens of the context trained on before the extension (the config's "
                          "original_max_position_embeddings).")
    # llama3 (meta-llama/llama-models `apply_scaling`)
    low_freq_factor: Number = Field(1.0, gt=0)
    high_freq_factor: Number = Field(4.0, gt=0)
    # yarn (Peng et al. 2023, eq. 19-20; DeepSeek-V3 `yarn_get_mscale`)
    beta_fast: Number = Field(32.0, gt=0)
    beta_slow: Number = Field(1.0, gt=0)
    mscale: Number | None = Field(None, ge=0, description="yarn only, nonzero, and only beside a nonzero mscale_all_dim: "
                                                          "the attention gain is then m(mscale) / m(mscale_all_dim), "
                                                          "m(x) = 0.1·x·ln(factor) + 1; without them it is m(1) "
                                                          "(transformers' yarn)")
    mscale_all_dim: Number = Field(0.0, ge=0)
    truncate: Bool = Field(True, description="yarn only: round the ramp's ends to whole dimensions (floor, "
                                             "ceil), as YaRN's reference code does; false keeps them fractional "
                                             "(transformers' rope_parameters `truncate`).")

    @model_validator(mode="after")
    def _needs_original(self) -> RopeScaling:
        if self.kind in ("yarn", "llama3") and self.original_max_positions is None:
            raise ValueError(f"{self.kind} scaling needs original_max_positions")
        # a field of another kind changes nothing here: refused, so that it cannot read as if it counted
        for kind, fields in _SCALING_FIELDS.items():
            stray = sorted(set(fields) & self.model_fields_set) if self.kind != kind else []
            if stray:
                raise ValueError(f"{', '.join(stray)}: {kind} field{'s' if len(stray) > 1 else ''}; "
                                 f"{self.kind} scaling does not read {'them' if len(stray) > 1 else 'it'}")
        if self.kind == "yarn" and "mscale" in self.model_fields_set and not (self.mscale and self.mscale_all_dim):
            # transformers' _compute_yarn_parameters reads mscale only when it and mscale_all_dim are nonzero
            raise ValueError("mscale: read only when it and mscale_all_dim are both nonzero; otherwise the "
                             "attention gain is 0.1·ln(factor) + 1 whatever mscale says (transformers' yarn)")
        return self


# the fields only one scaling kind reads
_SCALING_FIELDS = {
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


class Rope(Frozen):
    """Rotary embeddings (Su et al. 2021); `fraction` < 1 rotates only the first dims (GPT-NeoX/Phi)."""

    kind: Literal["rope"] = "rope"
    theta: Number = Field(10000.0, gt=1.0)
    fraction: Number = Field(1.0, gt=0.0, le=1.0)
    scaling: RopeScaling | None = None


class Alibi(Frozen):
    """Linear attention biases (Press et al. 2022); slopes are fixed, no parameters."""

    kind: Literal["alibi"] = "alibi"
    scaled: Bool = Field(False, description="The bias is added before the scores' 1/sqrt(head_dim) and "
                                            "scaled with them: (q·k + bias)/sqrt(head_dim), Falcon-RW's "
                                            "attention (transformers' FalconModel divides the ALiBi tensor).")


class LearnedPositions(Frozen):
    """Absolute learned position table (GPT-2 `wpe`); its size is the spec's `max_seq_len`."""

    kind: Literal["learned"] = "learned"


class SinusoidalPositions(Frozen):
    """Fixed sinusoids added to the embeddings (Vaswani et al. 2017, §3.5)."""

    kind: Literal["sinusoidal"] = "sinusoidal"


class NoPositions(Frozen):
    """No positional signal (Jamba: its Mamba layers carry order)."""

    kind: Literal["none"] = "none"


Position = Annotated[
    Union[Rope, Alibi, LearnedPositions, SinusoidalPositions, NoPositions], Field(discriminator="kind")
]


# ----------------------------------------------------------------------------------- attention
class QKNorm(Frozen):
    """Normalisation of queries and keys before the dot product.

    scope `head`: one norm of width head_dim shared by all heads (Qwen3, Gemma-3);
    `per_head`: a separate norm per head (StableLM-2 `qk_layernorm`);
    `full`: one norm over the whole projected q (n_heads·head_dim) and k (n_kv·head_dim) (OLMo-2).
    """

    scope: Literal["head", "per_head", "full"] = "head"
    norm: NormSpec = NormSpec()


class _HeadAttention(Frozen):
    n_heads: Dim
    head_dim: Dim | None = Field(None, description="Defaults to d_model / n_heads (must divide).")
    qkv_bias: Bool = False
    out_bias: Bool = False
    qk_norm: QKNorm | None = None
    sliding_window: Dim | None = Field(
        None, description="Tokens each query of the layers marked `S` in layout.mixers attends to (itself included)."
    )
    scale_dim: Annotated[Number, Field(gt=0, le=MAX_DIM)] | None = Field(
        None, description="Scores scaled by 1/sqrt(scale_dim) instead of 1/sqrt(head_dim) (Gemma 2's "
                          "query_pre_attn_scalar: 144 for heads of 128 in Gemma-2-27B)."
    )


class MHA(_HeadAttention):
    """Multi-head attention (Vaswani et al. 2017): one K/V head per query head."""

    kind: Literal["mha"] = "mha"


class GQA(_HeadAttention):
    """Grouped-query attention (Ainslie et al. 2023): n_heads / n_kv_heads queries share a K/V head."""

    kind: Literal["gqa"] = "gqa"
    n_kv_heads: Dim

    @model_validator(mode="after")
    def _groups_divide(self) -> GQA:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        return self


class MQA(_HeadAttention):
    """Multi-query attention (Shazeer 2019): a single K/V head."""

    kind: Literal["mqa"] = "mqa"


class MLA(Frozen):
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434)."""

    kind: Literal["mla"] = "mla"
    n_heads: Dim
    q_lora_rank: Dim | None = Field(None, description="None: a plain q_proj (DeepSeek-V2-Lite).")
    kv_lora_rank: Dim
    qk_nope_head_dim: Dim
    # even: rotary pairs its dimensions (the loader's validator says so; the schema, for editors)
    qk_rope_head_dim: Dim = Field(json_schema_extra={"multipleOf": 2})
    v_head_dim: Dim
    sliding_window: Dim | None = None
    latent_norm_eps: Number = Field(
        1e-6, gt=0, description="eps of the q and kv latent RMSNorms. DeepSeek-V2/V3 build them at "
        "RMSNorm's default 1e-6 whatever the model's norm eps (DeepSeek-V3 inference/model.py; "
        "transformers' DeepseekV3Attention); some later MLA models read the model's rms_norm_eps.")

    @model_validator(mode="after")
    def _even_rope(self) -> MLA:
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (rotary pairs)")
        return self


Attention = Annotated[Union[MHA, GQA, MQA, MLA], Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ SSM
class Mamba1(Frozen):
    """Selective SSM block (Gu & Dao 2023; state-spaces/mamba `mamba_simple.Mamba`)."""

    kind: Literal["mamba1"] = "mamba1"
    d_state: Dim = 16
    d_conv: Dim = 4
    expand: Dim = 2
    dt_rank: Dim | Literal["auto"] = Field("auto", description="auto = ceil(d_model / 16).")
    conv_bias: Bool = True
    proj_bias: Bool = False
    inner_norms: Bool = Field(False, description="Jamba's RMSNorms on dt, B and C.")

    @field_validator("dt_rank", mode="wrap")
    @classmethod
    def _rank_or_auto(cls, value: object, handler: ValidatorFunctionWrapHandler) -> int | str:
        # one problem, one message: pydantic reports each member of the union apart
        try:
            return handler(value)
        except ValidationError:
            shown = "null" if value is None else repr(value) if isinstance(value, str) else str(value).lower()
            raise ValueError(f"expected a positive integer (at most {MAX_DIM:,}) or 'auto', got {shown}") from None


class Mamba2(Frozen):
    """SSD block (Dao & Gu 2024; state-spaces/mamba `mamba2.Mamba2`)."""

    kind: Literal["mamba2"] = "mamba2"
    d_state: Dim = 128
    d_conv: Dim = 4
    expand: Dim = 2
    head_dim: Dim = 64
    n_groups: Dim = 1
    chunk_size: Dim = 256
    conv_bias: Bool = True
    proj_bias: Bool = False


SSM = Annotated[Union[Mamba1, Mamba2], Field(discriminator="kind")]


# ------------------------------------------------------------------- long convolutions (letter H)
class _S4Fields(Frozen):
    d_state: Dim = Field(64, description="N: state size; N/2 complex modes are kept (conjugate pairs).",
                         json_schema_extra={"multipleOf": 2})
    n_ssm: Dim | None = Field(
        None, description="Copies of (A, B): None = one per channel (d_model, the s4 code default); 1 in the published configs."
    )
    ssm_buffers: Bool = Field(
        False, description="A, B (and P) and log Δ registered as buffers (the s4 code's lr=0.0), not parameters."
    )


class S4D(_S4Fields):
    """Diagonal SSM layer (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal
    State Space Models"; state-spaces/s4 `models/s4/s4.py` FFTConv with `mode: diag`).

    Kernel K_l = 2·Re Σ_n C_n·B̄_n·exp(Δ·A_n)^l over N/2 conjugate-pair modes (ZOH), applied by an
    FFT convolution of length 2T; D skip, GELU, then Linear(H, 2H) + GLU. Decodes as a recurrence.
    """

    kind: Literal["s4d"] = "s4d"


class S4(_S4Fields):
    """S4 with the diagonal-plus-low-rank A = Λ − P·P* (Gu et al. 2022, "Efficiently Modeling Long
    Sequences with Structured State Spaces", §3; s4.py `SSMKernelDPLR`, rank 1, bilinear step),
    initialised as s4.py's `dplr-lin` (S4D-Lin Λ, a random P), not the paper's HiPPO-LegS."""

    kind: Literal["s4"] = "s4"


class Hyena(Frozen):
    """Hyena operator (Poli et al. 2023, "Hyena Hierarchy", §3; HazyResearch/safari
    `src/models/sequence/hyena.py` HyenaOperator + HyenaFilter).

    in_proj to (order+1)·D, a short causal depthwise conv, then order−1 gated long convolutions whose
    filters an MLP (Sin activations) generates from positional features, then out_proj.
    """

    kind: Literal["hyena"] = "hyena"
    order: Annotated[Int, Field(ge=2, le=16)] = 2
    filter_order: Dim = Field(64, description="Width F of the implicit filter MLP.")
    filter_depth: Annotated[Int, Field(ge=0, le=64)] = Field(2, description="Inner Linear(F, F) + Sin layers.")
    emb_dim: Dim = Field(3, description="Positional features E = 1 + 2·bands (odd, >= 3): t, cos, sin.",
                         json_schema_extra={"minimum": 3, "not": {"multipleOf": 2}})
    short_filter: Dim = Field(3, description="Taps of the short causal depthwise conv.")
    l_max: Dim = Field(description="Longest filter; the positional table has l_max rows.")
    trainable_positions: Bool = Field(
        True, description="Positional features z are a parameter (safari LM configs) or a buffer (HyenaDNA)."
    )
    modulation: Bool = Field(True, description="Exponential decay window on the filter (safari ExponentialModulation).")
    sin_freq: Number = Field(1.0, gt=0, le=1e4, description="Initial frequency w of the Sin activations (safari `w`; 14 in the Pile configs).")
    bias: Bool = Field(True, description="Biases of in_proj and out_proj.")

    @model_validator(mode="after")
    def _odd_features(self) -> Hyena:
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"emb_dim: emb_dim ({self.emb_dim}) must be odd and >= 3: 1 time feature + cos/sin pairs")
        return self


class StripedHyena(Frozen):
    """The hyena mixer of StripedHyena (Poli et al. 2023, togethercomputer/stripedhyena `model.py`
    ParallelGatedConvBlock without its norms and MLP, which are the layer's norms and `ffn`).

    projections Linear(D, 3D) → short depthwise FIR over 3D channels → x2, x1, v;
    y = x2 · (h ∗ (x1·v) + D_skip·x1·v) with the modal long filter h(t) = Re Σ_s r_s·p_s^t;
    out_filter_dense Linear(D, D). Decodes with the FIR tail and the modal state.
    """

    kind: Literal["stripedhyena"] = "stripedhyena"
    short_filter: Dim = 3
    short_filter_bias: Bool = True
    state_size: Dim = Field(2, description="Poles (and residues) per filter.")
    filter_groups: Dim = Field(1, description="Channels sharing one modal filter (hyena_filter_groups).")


LongConv = Annotated[Union[S4D, S4, Hyena, StripedHyena], Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------ FFN
class MLP(Frozen):
    """Two-matrix FFN: down(act(up(x)))."""

    kind: Literal["mlp"] = "mlp"
    d_ff: Dim
    activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "gelu"
    bias: Bool = False


class GLU(Frozen):
    """Gated three-matrix FFN (Shazeer 2020): down(act(gate(x)) * up(x)); silu = SwiGLU, gelu = GeGLU."""

    kind: Literal["glu"] = "glu"
    d_ff: Dim
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    bias: Bool = False


FFN = Annotated[Union[MLP, GLU], Field(discriminator="kind")]


class Router(Frozen):
    """Top-k router. softmax: Mixtral/Switch; sigmoid: DeepSeek-V3 (with a score-correction bias buffer).

    Group-limited routing (DeepSeek-V2 §2.2.2 device-limited routing, DeepSeek-V3 §2.1.2 node-limited
    routing, as transformers' DeepseekV2/V3TopkRouter): the experts form `n_group` equal groups, each
    token keeps its `topk_group` best groups and picks its top_k experts inside them. It changes
    which experts a token uses, never a count.
    """

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    normalize_top_k: Bool = True
    bias: Bool = False
    score_correction_bias: Bool = Field(
        False, description="DeepSeek-V3 aux-loss-free balancing bias: a buffer, not a parameter."
    )
    bias_update_speed: Number = Field(
        0.001, ge=0, le=1, description="score_correction_bias only: γ, the step each training step moves an "
        "expert's bias, down if it took more than the mean load, up if less (DeepSeek-V3 §2.1.2: 0.001 for "
        "the first 14.3T tokens, then 0).")
    scale: Number = Field(1.0, gt=0, description="Routed output scale (DeepSeek-V3 routed_scaling_factor).")
    n_group: Dim | None = Field(None, description="Group-limited routing: number of equal expert groups.")
    topk_group: Dim | None = Field(None, description="Group-limited routing: groups each token may use.")
    group_score: Literal["max", "top2_sum"] = Field(
        "top2_sum", description="A group's score: its best expert (DeepSeek-V2 group_limited_greedy) or "
                                "the sum of its best two (DeepSeek-V3 noaux_tc).")

    @model_validator(mode="after")
    def _groups_paired(self) -> Router:
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("n_group and topk_group go together (group-limited routing)")
        if not self.score_correction_bias and "bias_update_speed" in self.model_fields_set:
            raise ValueError("bias_update_speed moves the score-correction bias; set score_correction_bias: "
                             "true, or remove it")
        if self.n_group is None and "group_score" in self.model_fields_set:
            raise ValueError("group_score scores the groups of group-limited routing; set n_group and "
                             "topk_group, or remove it")
        if self.n_group is not None and self.topk_group is not None and self.topk_group > self.n_group:
            raise ValueError(f"topk_group: topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        return self


class SharedExperts(Frozen):
    """Always-active experts (DeepSeek-MoE); built as one FFN of width n·d_ff, as HF does."""

    n: Dim = 1
    d_ff: Dim
    gate: Bool = Field(False, description="Qwen2-MoE: sigmoid(Linear(d_model, 1)) gate on the shared output.")


class MoE(Frozen):
    """Routed experts replacing the dense FFN on the layers the layout marks as MoE."""

    n_experts: Dim
    top_k: Dim
    expert: FFN
    shared: SharedExperts | None = None
    router: Router = Router()
    aux_loss_coef: Number = Field(0.01, ge=0, description=(
        "Load-balancing loss weight (Switch α, DeepSeek aux_loss_alpha), on f_e = an expert's share of the "
        "T·top_k routed slots, so uniform routing costs α (as Megatron-Core takes it); transformers' "
        "router_aux_loss_coef counts over T: it is α / top_k."))
    aux_loss_scope: Literal["batch", "sequence"] = Field(
        "batch", description="Balance pooled over the batch's tokens (Switch Transformer eq. 4-6, GShard) or "
                             "per sequence, then averaged (DeepSeek-V3 eq. 17-20; HF seq_aux).")

    @model_validator(mode="after")
    def _k_fits(self) -> MoE:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k: top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        groups, keep = self.router.n_group, self.router.topk_group
        if groups is not None and keep is not None:
            if self.n_experts % groups:
                raise ValueError(f"router.n_group ({groups}) must divide n_experts ({self.n_experts})")
            per_group = self.n_experts // groups
            if self.router.group_score == "top2_sum" and per_group < 2:
                raise ValueError(f"router.group_score top2_sum needs groups of 2+ experts (got {per_group})")
            if self.top_k > keep * per_group:
                raise ValueError(f"top_k: top_k ({self.top_k}) exceeds the {keep * per_group} experts of "
                                 f"router.topk_group ({keep}) groups")
        return self


# ------------------------------------------------------------------------------------- residual
class PreNorm(Frozen):
    """x + f(norm(x)) (GPT-2, Llama)."""

    kind: Literal["pre"] = "pre"


class PostNorm(Frozen):
    """norm(x + f(x)) (Vaswani et al. 2017, BERT)."""

    kind: Literal["post"] = "post"


class DeepNorm(Frozen):
    """norm(alpha·x + f(x)), with beta-scaled init (Wang et al. 2022, DeepNet, Table 1).

    Defaults (decoder-only column): alpha = (2L)^(1/4), beta = (8L)^(-1/4), L the spec's n_layers.
    β scales attention's value and output projections and the FFN; DeepNet defines none for SSM or
    long-convolution mixers, so a layout with M or H layers refuses it.
    """

    kind: Literal["deepnorm"] = "deepnorm"
    alpha: Number | None = Field(None, gt=0)
    beta: Number | None = Field(None, gt=0)


class Parallel(Frozen):
    """x + attn(norm(x)) + ffn(norm'(x)) (GPT-J, Falcon, GPT-NeoX); shared_norm: one norm (GPT-J, Falcon-7B)."""

    kind: Literal["parallel"] = "parallel"
    shared_norm: Bool = True


class Sandwich(Frozen):
    """x + norm_post(f(norm_pre(x))) (Gemma-2: four norms per layer)."""

    kind: Literal["sandwich"] = "sandwich"


class Reordered(Frozen):
    """x + norm(f(x)) (OLMo-2 'reordered norm')."""

    kind: Literal["reordered"] = "reordered"


Residual = Annotated[
    Union[PreNorm, PostNorm, DeepNorm, Parallel, Sandwich, Reordered], Field(discriminator="kind")
]


# --------------------------------------------------------------------------------------- layout
class Layout(Frozen):
    """Which mixer and which FFN each layer gets (layers counted from 0).

    `mixers` is a pattern repeated cyclically over the layers (or spelled out in full):
    `A` global attention, `S` sliding-window attention, `M` the SSM (`ssm`: Mamba), `H` the long
    convolution (`long_conv`: S4D, S4, Hyena or StripedHyena). Jamba: `MMMMAMMM`; StripedHyena-7B: `HA`.
    A layer has routed experts iff `layer >= first_dense` and `layer % moe_every == moe_offset`
    (HF DeepSeek `first_k_dense_replace`/`moe_layer_freq`; Jamba `expert_layer_period/offset`).
    """

    mixers: str = Field("A", pattern=r"^[ASMH]+$", max_length=MAX_LAYERS)
    moe_every: PositiveInt = 1
    moe_offset: NonNegDim = 0
    first_dense: NonNegDim = 0

    def routes(self, layer: int) -> bool:
        """Whether layer `layer` (an MTP block's: n_layers + k) takes the routed experts, where a spec has them."""
        return layer >= self.first_dense and layer % self.moe_every == self.moe_offset

    @model_validator(mode="after")
    def _offset_in_period(self) -> Layout:
        if self.moe_offset >= self.moe_every:
            raise ValueError(f"moe_offset: moe_offset ({self.moe_offset}) must be < moe_every ({self.moe_every})")
        return self


# ------------------------------------------------------------------------------------ the model
class Embedding(Frozen):
    tied: Bool = Field(False, description="LM head shares the input embedding matrix.")
    norm: Bool = Field(False, description="Norm right after the embedding (BLOOM word_embeddings_layernorm).")
    lm_head_bias: Bool = False
    scaled: Bool = Field(False, description="Embedding output multiplied by sqrt(d_model), rounded to the "
                                            "activation dtype (Gemma's normalizer; Vaswani et al. 2017 §3.4).")


class MultiTokenPrediction(Frozen):
    """DeepSeek-V3's multi-token prediction (DeepSeek-AI 2024, arXiv:2412.19437, §2.2), a training
    objective with modules of its own: module k (1..depth) normalises the previous depth's hidden
    state and the embedding of the token k positions ahead (two norms), projects their concatenation
    from 2·d_model to d_model (no bias), runs one more block (the layer the pattern gives next, index
    n_layers + k − 1: DeepSeek-V3's is an MoE layer), normalises where the model has a final norm, and
    predicts the token k + 1 ahead through the shared head. Inference does not run it: it adds
    parameters, training FLOPs and training memory, never KV cache or decode cost."""

    depth: Annotated[Int, Field(gt=0, le=16, description="Modules, each predicting one more token ahead.")]
    loss_weight: Number = Field(0.3, gt=0, le=10, description="λ: the loss adds λ/depth · Σ_k L_k (report eq. 25).")


class Training(Frozen):
    """Optional training intent, read by `lint` and `plan`."""

    tokens: Number | None = Field(None, ge=1, le=1e18, description="Planned training tokens (1 to 1e18, the range --tokens takes).")
    target_device_memory_gib: Number | None = Field(
        None, gt=0, description="GiB (2^30 bytes) of one device's memory the KV cache of training.batch sequences at "
                                "max_seq_len must fit (lint's AP015).")
    batch: PositiveInt = Field(1, le=MAX_BATCH, description="Sequences the KV cache holds (lint's AP015).")


class Reference(Frozen):
    """Where a spec comes from and what was published: the tests hold each preset's counts to
    total_params and active_params exactly."""

    source: Text
    total_params: Int | None = Field(None, ge=0)
    active_params: Int | None = Field(None, ge=0)
    rumour: Bool = False
    notes: Text | None = None


class Spec(Frozen):
    """An archplan model spec: one decoder-only language model, from which `size`, `compare`,
    `plan`, `verify` and `bench` compute parameters, FLOPs, KV cache and memory. Each layer's
    mixer is `attention`, `ssm` or `long_conv` and its feed-forward `ffn` or `moe`, as `layout`
    assigns them; the rules across fields are the loader's and `archplan lint`'s."""

    name: Line = Field(min_length=1, max_length=NAME_MAX_CHARS,
                       description="The model's name, as reports and tables print it (one line).")
    description: Text | None = None
    vocab_size: Dim = Field(description="Tokens in the vocabulary: rows of the embedding and of the LM head.")
    d_model: Dim = Field(description="Width of the residual stream (hidden size).")
    n_layers: Annotated[Int, Field(gt=0, le=MAX_LAYERS)] = Field(
        description="Blocks of the main model (a multi-token-prediction module's are extra).")
    max_seq_len: Annotated[Int, Field(gt=0, le=MAX_SEQ_LEN)] = Field(
        4096, description="Tokens of the longest context the model was trained for: the default --seq and "
                          "--context, and the rows of a learned position table.")
    embedding: Embedding = Embedding()
    position: Position = Field(Rope(), description="rope by default; none for a model without attention, as RoPE and ALiBi act inside attention (learned and sinusoidal positions, added to the embeddings, still apply).")
    norm: NormSpec = NormSpec()
    residual: Residual = PreNorm()
    final_norm: Bool = True
    attention: Attention | None = None
    ssm: SSM | None = None
    long_conv: LongConv | None = None
    ffn: FFN | None = None
    moe: MoE | None = None
    layout: Layout = Layout()
    mtp: MultiTokenPrediction | None = None
    training: Training | None = None
    reference: Reference | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_rope_without_attention(cls, data: Any) -> Any:
        """RoPE, the default, acts inside attention: a model with none (Mamba, S4, Hyena) has no
        positions unless it names embedding-side ones, so that no figure reads it as rotary."""
        if isinstance(data, dict) and data.get("attention") is None and "position" not in data:
            return {**data, "position": {"kind": "none"}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        _check_layout(self)
        _check_attention_dims(self)
        _check_ssm_dims(self)
        _check_long_conv(self)
        _check_mtp_positions(self)
        return self

    @property
    def deepnorm_alpha(self) -> float:
        assert isinstance(self.residual, DeepNorm)
        return self.residual.alpha or (2 * self.n_layers) ** 0.25

    @property
    def deepnorm_beta(self) -> float:
        assert isinstance(self.residual, DeepNorm)
        return self.residual.beta or (8 * self.n_layers) ** -0.25


def mtp_training_tokens(depth: int) -> int:
    """The shortest training sequence with `depth` multi-token-prediction modules: module k's target
    is k + 1 tokens past the main head's, so some position needs depth + 1 tokens ahead of it,
    depth + 2 in all (DeepSeek-V3 §2.2)."""
    return depth + 2


def _check_mtp_positions(spec: Spec) -> None:
    """Multi-token prediction needs a training sequence of `mtp_training_tokens`; where positions
    end (a learned table's max_seq_len rows, a Hyena filter's l_max) before that, no step of the
    model has a target for its modules, and verify and bench refuse every length."""
    if spec.mtp is None:
        return
    # the learned table first: l_max ≥ max_seq_len (`_check_long_conv`), so where both are short
    # the table is, and naming l_max alone would leave it to fail next
    limits: list[tuple[int, str]] = []
    if isinstance(spec.position, LearnedPositions):
        limits.append((spec.max_seq_len, "the learned position table (max_seq_len)"))
    if isinstance(spec.long_conv, Hyena):  # a long_conv is set only with H layers (`_check_layout`)
        limits.append((spec.long_conv.l_max, "the Hyena filter length (long_conv.l_max)"))
    need = mtp_training_tokens(spec.mtp.depth)
    positions, what = min(limits, default=(need, ""), key=lambda limit: limit[0])
    if positions < need:
        raise ValueError(f"mtp.depth: {spec.mtp.depth} needs training sequences of at least {need} tokens (the next "
                         f"one and {spec.mtp.depth} more ahead), but {what} ends at {positions}")


def takes_deepnorm(mixers: str) -> bool:
    """Whether a layout's mixers all have DeepNet's β (Wang et al. 2022, Algorithm 1: attention's
    value and output projections; none is defined for an SSM or a long convolution)."""
    return not set(mixers) & {"M", "H"}


def _check_layout(spec: Spec) -> None:
    layout = spec.layout
    letters = set(layout.mixers)
    if letters & {"A", "S"} and spec.attention is None:
        raise ValueError("layout.mixers: uses attention (A/S) but `attention` is not set")
    if isinstance(spec.residual, DeepNorm) and not takes_deepnorm(layout.mixers):
        raise ValueError("residual: deepnorm's β initialisation (Wang et al. 2022, DeepNet Algorithm 1) scales "
                         "attention's value and output projections and the FFN; DeepNet defines none for the "
                         "SSM or long-convolution mixers (M/H) of this layout; use pre, post or sandwich")
    if spec.attention is None and isinstance(spec.position, (Rope, Alibi)):
        # as for an unused mixer: a field that changes nothing would read as if it counted
        raise ValueError(f"position: {spec.position.kind} acts inside attention, and this model has none; "
                         "remove it or set position: {kind: none}")
    if "M" in letters and spec.ssm is None:
        raise ValueError("layout.mixers: uses the SSM (M) but `ssm` is not set")
    if spec.attention is not None and not letters & {"A", "S"}:
        raise ValueError("attention: set, but layout.mixers has no A or S layer")
    if spec.ssm is not None and "M" not in letters:
        raise ValueError("ssm: set, but layout.mixers has no M layer; e.g. mixers: M")
    if "H" in letters and spec.long_conv is None:
        raise ValueError("layout.mixers: uses a long convolution (H) but `long_conv` is not set")
    if spec.long_conv is not None and "H" not in letters:
        raise ValueError("long_conv: set, but layout.mixers has no H layer; e.g. mixers: H")
    window = spec.attention.sliding_window if spec.attention is not None else None
    if "S" in letters and window is None:
        raise ValueError("layout.mixers: has S layers but attention.sliding_window is not set")
    if window is not None and "S" not in letters:
        raise ValueError("attention.sliding_window: set, but no layer is S in layout.mixers")
    if len(layout.mixers) > spec.n_layers:
        raise ValueError(
            f"layout.mixers: {len(layout.mixers)} letters for only {spec.n_layers} layers"
        )

    def is_moe(i: int) -> bool:
        return spec.moe is not None and layout.routes(i)

    moe_layers = sum(map(is_moe, range(spec.n_layers)))
    if spec.moe is None:
        if layout.moe_every != 1 or layout.moe_offset or layout.first_dense:
            raise ValueError("layout: moe_every/moe_offset/first_dense need `moe`")
    elif moe_layers == 0:
        raise ValueError("moe: set, but the layout places it on no layer")
    dense_layers = spec.n_layers - moe_layers
    # a multi-token-prediction block is the layer that would come next (`resolve`), dense or MoE
    depth = spec.mtp.depth if spec.mtp is not None else 0
    dense_mtp = [k for k in range(depth) if not is_moe(spec.n_layers + k)]
    if spec.moe is not None and dense_layers and spec.ffn is None:
        raise ValueError(f"ffn: {dense_layers} {'layer is' if dense_layers == 1 else 'layers are'} dense under "
                         "the layout but `ffn` is not set")
    if spec.moe is not None and dense_mtp and spec.ffn is None:
        k = dense_mtp[0]
        raise ValueError(f"ffn: multi-token-prediction block {k} takes the place of layer {spec.n_layers + k}, "
                         "which is dense under the layout, but `ffn` is not set")
    if spec.moe is not None and not dense_layers and not dense_mtp and spec.ffn is not None:
        # as for an unused mixer: a field that changes nothing would read as if it counted
        raise ValueError("ffn: set, but the layout puts `moe` on every layer, so no layer is dense; remove it, "
                         "or make layers dense with layout.first_dense or layout.moe_every")
    if spec.ffn is None and spec.moe is None and not letters & {"M", "H"}:
        raise ValueError("ffn: attention layers need `ffn` or `moe`")


def _check_attention_dims(spec: Spec) -> None:
    attn = spec.attention
    if attn is None:
        return
    if isinstance(attn, MLA):
        rotary = head_dim = attn.qk_rope_head_dim
        if isinstance(spec.position, Rope) and spec.position.fraction != 1.0:
            # MLA's rotary part is its own width; rotating a fraction of it is not built
            raise ValueError(f"position.fraction: MLA rotates the qk_rope_head_dim ({rotary}) dimensions set "
                             "aside for it, all of them; set attention.qk_rope_head_dim instead")
    else:
        if attn.head_dim is None and spec.d_model % attn.n_heads:
            raise ValueError(
                f"attention.n_heads: d_model ({spec.d_model}) is not divisible by n_heads ({attn.n_heads}); "
                "set attention.head_dim explicitly"
            )
        head_dim = attn.head_dim or spec.d_model // attn.n_heads
        rotary = head_dim
        if isinstance(spec.position, Rope):
            rotary = rotary_dim(head_dim, spec.position.fraction)
    if isinstance(spec.position, Rope) and rotary % 2:
        field = "position.fraction" if rotary != head_dim else "attention.head_dim"
        raise ValueError(f"{field}: rotary dimension {rotary} is odd; RoPE rotates pairs of dimensions")
    if isinstance(spec.position, Rope) and rotary == 0:
        raise ValueError(f"position.fraction: {spec.position.fraction:g} of a {head_dim}-wide head rotates no "
                         "dimension, so the model has no positions; raise it, or set position.kind: none")


def _check_ssm_dims(spec: Spec) -> None:
    ssm = spec.ssm
    if not isinstance(ssm, Mamba2):
        return
    d_inner = ssm.expand * spec.d_model
    if d_inner % ssm.head_dim:
        raise ValueError(
            f"ssm.head_dim: d_inner = expand·d_model = {d_inner} is not divisible by head_dim ({ssm.head_dim})"
        )
    if (d_inner // ssm.head_dim) % ssm.n_groups:
        raise ValueError(
            f"ssm.n_groups: {d_inner // ssm.head_dim} SSM heads are not divisible by n_groups ({ssm.n_groups})"
        )


def _check_long_conv(spec: Spec) -> None:
    conv = spec.long_conv
    match conv:
        case None:
            return
        case S4D() | S4():
            if conv.d_state % 2:
                raise ValueError(f"long_conv.d_state: {conv.d_state} is odd; it must be even: modes come in conjugate pairs")
            if conv.n_ssm is not None and spec.d_model % conv.n_ssm:
                raise ValueError(
                    f"long_conv.n_ssm: d_model ({spec.d_model}) is not divisible by n_ssm ({conv.n_ssm})"
                )
        case Hyena():
            if conv.l_max < spec.max_seq_len:
                raise ValueError(
                    f"long_conv.l_max: {conv.l_max} is shorter than max_seq_len ({spec.max_seq_len}): "
                    "the implicit filter has no positions beyond l_max"
                )
        case StripedHyena():
            if spec.d_model % conv.filter_groups:
                raise ValueError(
                    f"long_conv.filter_groups: d_model ({spec.d_model}) is not divisible by filter_groups ({conv.filter_groups})"
                )
        case _:
            assert_never(conv)


def rotary_dim(head_dim: int, fraction: float) -> int:
    """Rotated dims of a head (HF GPT-NeoX/Phi: int(head_dim * partial_rotary_factor))."""
    return int(math.floor(head_dim * fraction + 1e-9))


def _members(union: Any) -> tuple[type[BaseModel], ...]:
    """The models of an `Annotated[Union[...], discriminator]` alias."""
    return get_args(get_args(union)[0])


# The closed variant sets, read from the aliases the spec's fields are typed with, so tests can
# check every member has both halves (a member added to an alias is a member here).
UNIONS: dict[str, tuple[type[BaseModel], ...]] = {
    "attention": _members(Attention),
    "ssm": _members(SSM),
    "long_conv": _members(LongConv),
    "ffn": _members(FFN),
    "position": _members(Position),
    "residual": _members(Residual),
}
