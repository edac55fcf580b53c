"""FLOPs of one forward at (batch, seq_len), keyed by module path, in two parts.

*Counted*: exactly what `torch.utils.flop_counter.FlopCounterMode` sees on the meta device for the
torch model built from the same plan (docs/architecture.md "FLOPs convention": matmuls at
2·rows·in·out without bias adds, convolutions, SDPA over the full T² square whatever the mask,
grouped expert matmuls over the B·T·K routed rows, the SSD einsums). A multiply-add is 2 FLOPs
(Kaplan et al. 2020 Table 1; Hoffmann et al. 2022 App. F).
*Elementwise*: our documented estimates of what the counter does not see (norms, softmax,
activations, RoPE, scan updates, residual adds); `archplan verify` shows them as analytic-only.

Training and decode per token follow docs/formulas.md §2.8-2.9 (PaLM App. B / torchtitan: backward =
2 × forward; full recompute adds the checkpointed blocks' forward, not the LM head's; selective
recompute re-runs the attention core, Korthikanti et al. 2022 §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from typing_extensions import assert_never

from archplan.analytic.attention import (
    attention_core_causal_flops,
    attention_core_flops,
    attention_elementwise_per_token,
    attention_matmul_params,
    mla_core_causal_flops,
    mla_core_flops,
    mla_decode_flops,
    mla_elementwise_per_token,
    mla_matmul_params,
)
from archplan.analytic.embedding import lm_head_matmul_params
from archplan.analytic.ffn import ffn_elementwise_per_token, ffn_matmul_params
from archplan.analytic.mamba import (
    mamba1_counted_flops,
    mamba1_elementwise_per_token,
    mamba2_counted_flops,
    mamba2_elementwise,
)
from archplan.analytic.hyena import (
    hyena_backward_adjust,
    hyena_counted_flops,
    hyena_decode_counted_flops,
    hyena_decode_elementwise,
    hyena_elementwise,
    striped_backward_adjust,
    striped_counted_flops,
    striped_decode_counted_flops,
    striped_decode_elementwise,
    striped_elementwise,
)
from archplan.analytic.model import layer_paths
from archplan.analytic.s4 import (
    s4_backward_adjust,
    s4_counted_flops,
    s4_decode_counted_flops,
    s4_decode_elementwise,
    s4_elementwise,
)
from archplan.analytic.memory import RECOMPUTE_MODES, Recompute
from archplan.analytic.moe import moe_counted_flops, moe_elementwise_per_token
from archplan.analytic.mtp import mtp_own_flops
from archplan.analytic.norms import norm_flops
from archplan.analytic.positions import alibi_flops, position_add_flops
from archplan.errors import ArchplanError
from archplan.resolve import (
    AttentionPlan,
    FFNOrMoE,
    FFNPlan,
    HyenaPlan,
    Mamba1Plan,
    Mamba2Plan,
    MixerPlan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
)

AttentionConvention = Literal["full", "causal"]
ATTENTION_CONVENTIONS: tuple[str, ...] = ("full", "causal")


@dataclass(frozen=True)
class FlopCount:
    batch: int
    seq_len: int
    counted_by_component: dict[str, int]  # FlopCounterMode on meta, one forward at (batch, seq_len)
    elementwise_by_component: dict[str, int]  # analytic-only estimates, same keys
    attention_full: int  # the attention-core (QKᵀ + AV) part of `counted`, dense T²
    attention_causal: int  # the same, only attended pairs: Σ_t min(t, window)
    counted: int  # sum(counted_by_component.values()), attention full
    elementwise: int
    # backward counted FLOPs minus 2 x forward counted: 0 for matmuls and convs; an FFT convolution's
    # irfft has a 1 x backward (one rfft), and kernels built from buffers need no gradient (s4.py)
    backward_adjust: int = 0

    def training(self, attention: AttentionConvention = "full") -> int:
        """Counted forward + backward of this (batch, seq_len) step: 3 x forward + backward_adjust."""
        return 3 * self.forward(attention) + self.backward_adjust

    def forward(self, attention: AttentionConvention = "full") -> int:
        """Counted forward FLOPs with the attention core counted full (T²) or causal (attended pairs)."""
        _check_choice("attention", attention, ATTENTION_CONVENTIONS)
        match attention:
            case "full":
                return self.counted
            case "causal":
                return self.counted - self.attention_full + self.attention_causal
            case _:
                assert_never(attention)

    def attention_core(self, attention: AttentionConvention = "full") -> int:
        _check_choice("attention", attention, ATTENTION_CONVENTIONS)
        return self.attention_full if attention == "full" else self.attention_causal


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ArchplanError(f"{what} must be one of {', '.join(choices)} (got {value!r})")


def _check_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchplanError(f"{what} must be a positive integer (got {value!r})")


# ------------------------------------------------------------------------------------- per mixer
@dataclass(frozen=True)
class _MixerFlops:
    counted: int  # includes the attention core, full square
    core_full: int
    core_causal: int
    elementwise: int
    backward_adjust: int = 0


def _mixer_flops(
    plan: ModelPlan, mixer: MixerPlan, batch: int, seq_len: int, residual: int
) -> _MixerFlops:
    d = plan.d_model
    rows = batch * seq_len
    match mixer:
        case AttentionPlan():
            full = attention_core_flops(mixer, batch, seq_len)
            scores = batch * seq_len * seq_len  # full square per head, as the kernel computes
            # Chinchilla App. F: softmax 3·heads·T² per sequence; ALiBi adds its bias to every score
            softmax = 3 * mixer.n_heads * scores
            alibi = alibi_flops(mixer.n_heads, scores) if plan.position == "alibi" else 0
            return _MixerFlops(
                counted=2 * rows * attention_matmul_params(mixer, d) + full,
                core_full=full,
                core_causal=attention_core_causal_flops(mixer, batch, seq_len),
                elementwise=rows * attention_elementwise_per_token(mixer) + softmax + alibi + residual,
            )
        case MLAPlan():
            full = mla_core_flops(mixer, batch, seq_len)
            softmax = 3 * mixer.n_heads * batch * seq_len * seq_len
            return _MixerFlops(
                counted=2 * rows * mla_matmul_params(mixer, d) + full,
                core_full=full,
                core_causal=mla_core_causal_flops(mixer, batch, seq_len),
                elementwise=rows * mla_elementwise_per_token(mixer) + softmax + residual,
            )
        case Mamba1Plan():
            return _MixerFlops(
                counted=mamba1_counted_flops(mixer, d, batch, seq_len),
                core_full=0,
                core_causal=0,
                elementwise=rows * mamba1_elementwise_per_token(mixer) + residual,
            )
        case Mamba2Plan():
            return _MixerFlops(
                counted=mamba2_counted_flops(mixer, d, batch, seq_len),
                core_full=0,
                core_causal=0,
                elementwise=mamba2_elementwise(mixer, batch, seq_len) + residual,
            )
        case S4Plan():
            return _MixerFlops(
                counted=s4_counted_flops(mixer, d, batch, seq_len),
                core_full=0,
                core_causal=0,
                elementwise=s4_elementwise(mixer, d, batch, seq_len) + residual,
                backward_adjust=s4_backward_adjust(mixer, d, batch, seq_len),
            )
        case HyenaPlan():
            return _MixerFlops(
                counted=hyena_counted_flops(mixer, d, batch, seq_len),
                core_full=0,
                core_causal=0,
                elementwise=hyena_elementwise(mixer, d, batch, seq_len) + residual,
                backward_adjust=hyena_backward_adjust(mixer, d, batch, seq_len),
            )
        case StripedHyenaPlan():
            return _MixerFlops(
                counted=striped_counted_flops(mixer, d, batch, seq_len),
                core_full=0,
                core_causal=0,
                elementwise=striped_elementwise(mixer, d, batch, seq_len) + residual,
                backward_adjust=striped_backward_adjust(mixer, d, batch, seq_len),
            )
        case _:
            assert_never(mixer)


def _ffn_flops(
    d_model: int, ffn: FFNOrMoE, batch: int, seq_len: int, residual: int
) -> tuple[dict[str, int], dict[str, int]]:
    """({part: counted}, {part: elementwise}); '' is a dense FFN, else the MoE submodules.
    The residual add is booked on the dense FFN or on the routed experts."""
    rows = batch * seq_len
    match ffn:
        case FFNPlan():
            counted = {"": 2 * rows * ffn_matmul_params(ffn, d_model)}
            return counted, {"": rows * ffn_elementwise_per_token(ffn) + residual}
        case MoEPlan():
            elementwise = {k: rows * v for k, v in moe_elementwise_per_token(ffn, d_model).items()}
            elementwise["experts"] += residual
            return moe_counted_flops(ffn, d_model, batch, seq_len), elementwise
        case _:
            assert_never(ffn)


# ------------------------------------------------------------------------------------- the model
def _residual_flops(plan: ModelPlan, rows: int) -> int:
    """x + f(x): D adds per token and sub-block; DeepNorm's norm(α·x + f(x)) (Wang et al. 2022) also scales."""
    return rows * plan.d_model * (2 if plan.residual == "deepnorm" else 1)


def forward_flops(plan: ModelPlan, seq_len: int, batch: int = 1, mtp: bool = False) -> FlopCount:
    """One forward's FLOPs per module path. `mtp`: a training forward, which also runs the
    multi-token-prediction modules (each embeds the sequence again, runs its own parts and block,
    and passes through the shared head: DeepSeek-V3 §2.2); inference never runs them."""
    _check_positive("seq_len", seq_len)
    _check_positive("batch", batch)
    d = plan.d_model
    rows = batch * seq_len
    norm = rows * norm_flops(plan.norm, d)
    residual = _residual_flops(plan, rows)

    counted: dict[str, int] = {"embed": 0}
    elementwise: dict[str, int] = {"embed": 0}
    if plan.position == "learned":
        counted["pos_embed"] = 0
        elementwise["pos_embed"] = rows * position_add_flops(plan)
    else:
        elementwise["embed"] = rows * position_add_flops(plan)  # sinusoidal add, else 0
    if plan.embed_scale != 1.0:
        elementwise["embed"] += rows * d  # Gemma's × sqrt(d_model) on every embedded token
    if plan.embed_norm:
        counted["embed_norm"] = 0
        elementwise["embed_norm"] = norm

    modules = plan.mtp if mtp else ()
    passes = 1 + len(modules)  # the embedding and the head run once more per MTP module
    for name in ("embed", "pos_embed", "embed_norm"):
        if name in elementwise:
            elementwise[name] *= passes

    core_full = core_causal = backward_adjust = 0
    for layer in plan.layers + modules:
        mixer = _mixer_flops(plan, layer.mixer, batch, seq_len, residual)
        backward_adjust += mixer.backward_adjust
        core_full += mixer.core_full
        core_causal += mixer.core_causal
        ffn_counted: dict[str, int] = {}
        ffn_elementwise: dict[str, int] = {}
        if layer.ffn is not None:
            ffn_counted, ffn_elementwise = _ffn_flops(d, layer.ffn, batch, seq_len, residual)
        counted |= layer_paths(layer, mixer.counted, ffn_counted, 0)
        elementwise |= layer_paths(layer, mixer.elementwise, ffn_elementwise, norm)
        if layer.where == "mtp":
            own_counted, own_elementwise = mtp_own_flops(plan, layer, rows)
            counted |= own_counted
            elementwise |= own_elementwise

    if plan.final_norm:
        counted["final_norm"] = 0
        elementwise["final_norm"] = norm
    counted["lm_head"] = passes * 2 * rows * lm_head_matmul_params(plan)
    elementwise["lm_head"] = passes * rows * plan.vocab_size if plan.lm_head_bias else 0
    return FlopCount(
        batch=batch,
        seq_len=seq_len,
        counted_by_component=counted,
        elementwise_by_component=elementwise,
        attention_full=core_full,
        attention_causal=core_causal,
        counted=sum(counted.values()),
        elementwise=sum(elementwise.values()),
        backward_adjust=backward_adjust,
    )


def per_token_rounded(total: int, tokens: int) -> int:
    """Integer FLOPs per token, rounded half up (exact whenever the total divides evenly)."""
    return (2 * total + tokens) // (2 * tokens)


def training_flops_per_token(
    plan: ModelPlan,
    seq_len: int,
    attention: AttentionConvention = "full",
    recompute: Recompute = "none",
    batch: int = 1,
) -> int:
    """`training_flops_of_batch` per token, rounded half up to an integer. At `batch` 1, `size`'s
    figure; a layout's micro-batch shares a long convolution's filters among its sequences."""
    return per_token_rounded(training_flops_of_batch(plan, seq_len, batch, attention, recompute), batch * seq_len)


def training_flops_per_sequence(
    plan: ModelPlan,
    seq_len: int,
    attention: AttentionConvention = "full",
    recompute: Recompute = "none",
) -> int:
    """`training_flops_of_batch` of one sequence alone."""
    return training_flops_of_batch(plan, seq_len, 1, attention, recompute)


def training_flops_of_batch(
    plan: ModelPlan,
    seq_len: int,
    batch: int,
    attention: AttentionConvention = "full",
    recompute: Recompute = "none",
) -> int:
    """Forward + backward = 3 × forward counted FLOPs (Kaplan et al. 2020 §2.1; PaLM App. B) of a
    batch of `batch` sequences; FFT mixers' backward is their own count (`ForwardFlops.training`).
    Every count is `batch` times one sequence's but a long convolution's filter (and S4's kernel)
    generation, which a batch runs once (`forward_flops`).

    Full recompute re-runs the checkpointed blocks' forward, the layers' and the MTP modules', not
    the LM head, which no checkpoint wraps (Narayanan et al. 2021 eq. 3 counts the logit layer 3×);
    selective recompute re-runs only the attention core, QKᵀ/softmax/AV (Korthikanti et al. 2022
    §5; docs/formulas.md §2.9 item 3).
    """
    _check_choice("attention", attention, ATTENTION_CONVENTIONS)
    _check_choice("recompute", recompute, RECOMPUTE_MODES)
    flops = forward_flops(plan, seq_len, batch=batch, mtp=True)
    forward = flops.forward(attention)
    match recompute:
        case "none":
            extra = 0
        case "selective":
            extra = flops.attention_core(attention)
        case "full":
            extra = forward - flops.counted_by_component["lm_head"]
        case _:
            assert_never(recompute)
    return flops.training(attention) + extra


@dataclass(frozen=True)
class DecodeFlops:
    """One decode step: `batch` sequences each feed one new token that attends `context` keys
    (itself included; sliding-window layers min(context, W), SSM and S4 / StripedHyena layers one
    recurrent step, Hyena a direct convolution over `context` cached inputs). `counted` is exactly
    what FlopCounterMode counts on meta for that step of the torch model with its cache (MLA in the
    cheaper of its two forms, `attention.mla_decode_flops`); `elementwise` is our estimate of the
    rest, as in `FlopCount` (softmax over the attended keys, recurrence updates, norms, gates)."""

    batch: int
    context: int
    counted_by_component: dict[str, int]
    elementwise_by_component: dict[str, int]

    @property
    def counted(self) -> int:
        return sum(self.counted_by_component.values())

    @property
    def elementwise(self) -> int:
        return sum(self.elementwise_by_component.values())


@dataclass(frozen=True)
class _MixerDecode:
    counted: int
    elementwise: int


def _mixer_decode(plan: ModelPlan, mixer: MixerPlan, context: int, batch: int, residual: int) -> _MixerDecode:
    """One mixer for one new token in each of `batch` sequences at `context` (docs/formulas.md §2.8).
    Work shared by the batch (S4's discretisation) is counted once, not per sequence."""
    d = plan.d_model
    match mixer:
        case AttentionPlan():
            attended = context if mixer.window is None else min(context, mixer.window)
            core = 2 * mixer.n_heads * (mixer.head_dim + mixer.head_dim) * attended
            alibi = alibi_flops(mixer.n_heads, attended) if plan.position == "alibi" else 0
            per_token = attention_elementwise_per_token(mixer) + 3 * mixer.n_heads * attended + alibi
            return _MixerDecode(
                counted=batch * (2 * attention_matmul_params(mixer, d) + core),
                elementwise=batch * per_token + residual,
            )
        case MLAPlan():
            attended = context if mixer.window is None else min(context, mixer.window)
            per_token = mla_elementwise_per_token(mixer) + 3 * mixer.n_heads * attended
            return _MixerDecode(batch * mla_decode_flops(mixer, d, attended), batch * per_token + residual)
        case Mamba1Plan():
            # one recurrent step is the T = 1 forward from the cached conv/SSM states: the
            # conv over the K cached columns and the C contraction of the new state
            return _MixerDecode(
                mamba1_counted_flops(mixer, d, batch, 1), batch * mamba1_elementwise_per_token(mixer) + residual
            )
        case Mamba2Plan():
            # the module continues through the same chunked SSD with one token (q = 1): C·Bᵀ,
            # (CBᵀ∘L)·X, the chunk state and state → output all run (`ssd_counted_flops` at T = 1)
            return _MixerDecode(mamba2_counted_flops(mixer, d, batch, 1), mamba2_elementwise(mixer, batch, 1) + residual)
        case S4Plan():
            return _MixerDecode(batch * s4_decode_counted_flops(d), s4_decode_elementwise(mixer, d, batch) + residual)
        case HyenaPlan():
            return _MixerDecode(
                batch * hyena_decode_counted_flops(mixer, d, context),
                batch * hyena_decode_elementwise(mixer, d) + residual,
            )
        case StripedHyenaPlan():
            return _MixerDecode(
                batch * striped_decode_counted_flops(mixer, d), batch * striped_decode_elementwise(mixer, d) + residual
            )
        case _:
            assert_never(mixer)


def decode_flops(plan: ModelPlan, context: int, batch: int = 1) -> DecodeFlops:
    """One decode step, by module path (docs/formulas.md §2.8): the forward of one token per sequence
    (embeddings, norms, FFN or MoE with its router, shared and top_k routed experts, LM head), with
    each mixer reading its cache instead (`_mixer_decode`)."""
    _check_positive("context", context)
    _check_positive("batch", batch)
    step = forward_flops(plan, 1, batch)
    counted = dict(step.counted_by_component)
    elementwise = dict(step.elementwise_by_component)
    for layer in plan.layers:
        mixer = _mixer_decode(plan, layer.mixer, context, batch, _residual_flops(plan, batch))
        counted[f"{layer.path}.mixer"] = mixer.counted
        elementwise[f"{layer.path}.mixer"] = mixer.elementwise
    return DecodeFlops(batch, context, counted, elementwise)


def decode_flops_per_token(plan: ModelPlan, context: int) -> int:
    """One new token at context t (docs/formulas.md §2.8): 2·P_matmul,active + Σ_attention 4·H·Dh·min(t, W),
    MLA absorbed (`attention.mla_decode_flops`), SSM layers one recurrent step. P_matmul,active counts
    the router and the shared experts with the top_k routed ones (torchtitan's choice)."""
    return decode_flops(plan, context, 1).counted
