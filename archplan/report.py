"""The `size` figures of one spec as a JSON-ready object: built once, rendered by `size` and `compare`.

The object is the `--json` contract documented in docs/json.md; every printed number comes from it.
Conventions are stored beside the numbers so a reader of the JSON knows what each figure counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from typing_extensions import assert_never

from archplan.analytic import count_params, decode_flops, forward_flops, kv_cache
from archplan.analytic import training_flops_per_sequence
from archplan.analytic.memory import (
    BYTES_PER_PARAM,
    INFERENCE_DTYPES,
    STATES_CONVENTION,
    AttentionKernel,
    Quantize,
    Recompute,
    int4_grouped_bytes,
    quantized_weights_bytes,
    training_memory,
    weights_bytes,
)
from archplan.analytic.kv import KVCache
from archplan.analytic.model import ParamCount
from archplan.analytic.mtp import mtp_own_params
from archplan.analytic.scaling import (
    DEFAULT_LAWS,
    TOKENS_PER_PARAM,
    compute_optimal,
    gpu_hours,
    law,
    loss,
    outside_fit_data,
    training_flops,
)
from archplan.dtypes import BYTES, DType
from archplan.errors import ArchplanError
from archplan.hardware import MIN_FRACTION_OF_PEAK, accelerator
from archplan.planning.optimal import LawChoice, allocate, law_params
from archplan.planning.optimal import budget as optimal_budget
from archplan.resolve import (
    AttentionPlan,
    FFNPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    HyenaPlan,
    S4Plan,
    StripedHyenaPlan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    resolve,
)
from archplan.spec import MAX_BATCH, MAX_SEQ_LEN, Spec

Attention = Literal["full", "causal"]

DEFAULT_TRAIN_SEQ = 4096  # capped at the spec's max_seq_len (a learned position table ends there)
MAX_CONTEXT = MAX_SEQ_LEN  # the longest --context or --seq: the longest max_seq_len a spec takes
MAX_TOKENS = 1e18

FLOPS_CONVENTION = (
    "2 FLOPs per multiply-add; embedding lookups not counted; LM head counted; "
    "training = 3 x forward (backward = 2 x forward; an FFT convolution's irfft backward is 1 x); "
    "FFTs: 2.5·n·⌈log2 n⌉ per real transform of length n = 2T, 5·n·⌈log2 n⌉ per complex one; "
    "per token of one sequence (batch 1): a long convolution makes its filters once per batch, so "
    "a micro-batch of b sequences shares them (verify and bench count at their --batch, plan at each layout's "
    "micro-batch)"
)
CHINCHILLA_CONVENTION = (
    "training_flops: C = 6·N·D (Hoffmann et al. 2022 eq. 4), N = n_params (embeddings included; the active "
    "count where n_params_kind is active, a model with routed experts), D = tokens; "
    "the scaling laws' budget, not the model FLOPs (flops.*) MFU is defined on"
)
MTP_FLOPS_NOTE = (
    "; training also runs the multi-token-prediction modules (DeepSeek-V3 §2.2: each one's projection, "
    "block and a head pass), which inference does not, so it is more than 3 x forward"
)
MOE_FLOPS_NOTE = (
    "; MoE layers count the router (2·d·E a token), the shared experts and the top-k routed experts "
    "(Megatron's 6·N formulas leave the router out)"
)
S4_FLOPS_NOTE = (
    "; S4 (DPLR) layers count archplan's kernel generation (Ā's powers by doubling on its N × N real "
    "form: 2·H·N²·(T−1), and 2·H·N³ a squaring), which grows as N², where the reference S4's Cauchy kernel "
    "at the FFT nodes makes the same kernel in O(H·N·T)"
)
S4_MEMORY_NOTE = (
    "; S4 (DPLR) layers keep what archplan's kernel generation keeps (its H·N·T fp32 basis and the "
    "doubling's operands), not what the reference S4's Cauchy kernel keeps"
)
MLA_DECODE_NOTE = (
    "; MLA decode reads the absorbed latent cache and counts the cheaper of the absorbed form and "
    "re-expanding every key (DeepSeek-V2 §2.1.2), the absorbed one from two keys on; a cache of whole K "
    "and V (size's \"MLA without absorption\" row) would need fewer FLOPs and more bytes"
)
PARAMS_CONVENTION = "unique parameters (tied weights once, buffers excluded); active = what one token touches"
KV_CONVENTION = (
    "K and V of every attention layer (MLA: the absorbed latent + rope key); sliding windows cap a "
    "layer at its window; SSM layers hold a constant state per sequence (S4/S4D and StripedHyena's modal "
    "state in fp32 whatever the dtype, the other constant states in no less than 16 bits: an fp8, int8 or "
    "int4 cache quantizes only what grows per token, at that dtype's width with no quantization scales or zero "
    "points); Hyena layers keep their long-convolution inputs, (order−1)·D per token"
)

# Display order of the component kinds (docs/figures.md §Parameters).
KINDS = ("embedding", "attention", "ssm", "long conv", "ffn", "moe router", "moe routed experts",
         "moe shared experts", "norms", "lm_head", "multi-token prediction")


@dataclass(frozen=True)
class SizeOptions:
    """What `archplan size` was asked for; None means "derive from the spec"."""

    context: int | None = None
    batch: int = 1
    kv_dtype: DType = DType.bf16
    seq: int | None = None
    micro_batch: int = 1
    recompute: Recompute = "none"
    attention_kernel: AttentionKernel = "eager"
    activation_dtype: DType = DType.bf16
    residual_dtype: DType | None = None  # None: the activation dtype (fp32 under `autocast`)
    autocast: bool = False  # torch.autocast over fp32 weights (`memory.input_copies`)
    tokens: float | None = None
    gpu: str | None = None
    mfu: float = 0.4
    laws: tuple[str, ...] = field(default=DEFAULT_LAWS)
    attention: Attention = "full"
    quantize: Quantize = "all"  # which weights the fp8, int8 and int4 rows store at that width

    @property
    def residual(self) -> DType | None:
        """The residual stream's dtype: --residual-dtype, else fp32 under --autocast (fp32 weights'
        residual adds), else None (the activation dtype)."""
        if self.residual_dtype is not None:
            return self.residual_dtype
        return DType.fp32 if self.autocast else None

    def check(self) -> None:
        """Option values a user typed: out-of-range values are ArchplanErrors (one line, exit 2)."""
        lengths = (("--context", self.context, MAX_CONTEXT), ("--batch", self.batch, MAX_BATCH),
                   ("--seq", self.seq, MAX_CONTEXT), ("--micro-batch", self.micro_batch, MAX_BATCH))
        for name, value, upper in lengths:
            if value is not None and not 0 < value <= upper:
                raise ArchplanError(f"must be between 1 and {upper:,}, got {value:,}", field=name)
        if self.tokens is not None and not 1 <= self.tokens <= MAX_TOKENS:
            raise ArchplanError(f"must be between 1 and {MAX_TOKENS:.0e}, got {self.tokens:.10g}",
                                field="--tokens")
        if not MIN_FRACTION_OF_PEAK <= self.mfu <= 1:
            raise ArchplanError(f"must be in [{MIN_FRACTION_OF_PEAK}, 1], got {self.mfu:g}", field="--mfu")
        if self.autocast and BYTES[self.activation_dtype] > 2:
            raise ArchplanError("autocast runs the matmuls in 16 bits; fp32 activations are a run without it: "
                                "drop --autocast or --activation-dtype fp32", field="--autocast")
        if self.autocast and self.residual_dtype not in (None, DType.fp32):
            # the embedding's output and every residual add are fp32 under autocast over fp32 weights
            raise ArchplanError("autocast over fp32 weights keeps an fp32 residual stream; drop --residual-dtype",
                                field="--residual-dtype")
        if self.residual_dtype is not None and BYTES[self.residual_dtype] < BYTES[self.activation_dtype]:
            # activations in fp32 come from fp32 weights, whose residual adds are fp32
            raise ArchplanError(f"a {self.residual_dtype.value} residual stream beside "
                                f"{self.activation_dtype.value} activations does not occur; drop --residual-dtype",
                                field="--residual-dtype")
        for key in self.laws:
            law(key)
        if self.gpu is not None:
            accelerator(self.gpu)


def _layer_kinds(layer: LayerPlan) -> dict[str, str]:
    """One block's module paths -> display kind."""
    kinds = {f"{layer.path}.{name}": "norms" for name in layer.norms}
    match layer.mixer:
        case AttentionPlan() | MLAPlan():
            kinds[f"{layer.path}.mixer"] = "attention"
        case Mamba1Plan() | Mamba2Plan():
            kinds[f"{layer.path}.mixer"] = "ssm"
        case S4Plan() | HyenaPlan() | StripedHyenaPlan():
            kinds[f"{layer.path}.mixer"] = "long conv"
        case _:
            assert_never(layer.mixer)
    ffn = layer.ffn
    match ffn:
        case None:
            pass
        case FFNPlan():
            kinds[f"{layer.path}.ffn"] = "ffn"
        case MoEPlan():
            kinds[f"{layer.path}.ffn.router"] = "moe router"
            kinds[f"{layer.path}.ffn.experts"] = "moe routed experts"
            kinds[f"{layer.path}.ffn.shared"] = "moe shared experts"
            kinds[f"{layer.path}.ffn.shared_gate"] = "moe shared experts"
        case _:
            assert_never(ffn)
    return kinds


def component_kinds(plan: ModelPlan) -> dict[str, str]:
    """Module path -> display kind, read from the plan (never from the path's spelling)."""
    kinds = {"embed": "embedding", "pos_embed": "embedding", "embed_norm": "norms",
             "final_norm": "norms", "lm_head": "lm_head"}
    for layer in plan.layers:
        kinds |= _layer_kinds(layer)
    # a training-only module, shown whole: what MTP adds is the question (DeepSeek-V3 §2.2)
    for block in plan.mtp:
        for path in _layer_kinds(block).keys() | mtp_own_params(plan, block).keys():
            kinds[path] = "multi-token prediction"
    return kinds


def params_by_kind(plan: ModelPlan, params: ParamCount) -> dict[str, dict[str, int]]:
    kinds = component_kinds(plan)
    out: dict[str, dict[str, int]] = {}
    for path, n in params.by_component.items():
        entry = out.setdefault(kinds[path], {"total": 0, "active": 0})
        entry["total"] += n
        entry["active"] += params.active_by_component[path]
    return {kind: out[kind] for kind in KINDS if kind in out}


def _per_token(value: int, tokens: int) -> int | float:
    return value // tokens if value % tokens == 0 else value / tokens


def size_report(spec: Spec, opts: SizeOptions, source: str | None = None) -> dict[str, Any]:
    """Every `size` figure of one spec (the `--json` object)."""
    opts.check()
    plan = resolve(spec)
    params = count_params(plan)
    context = opts.context if opts.context is not None else plan.max_seq_len
    seq = opts.seq if opts.seq is not None else min(DEFAULT_TRAIN_SEQ, plan.max_seq_len)
    for option, length in (("--context", context), ("--seq", seq)):
        plan.check_length(length, option)
    # exact per token, as the forward's figures are (an integer where the total divides)
    training = {att: _per_token(training_flops_per_sequence(plan, seq, attention=att, recompute="none"), seq)
                for att in ("full", "causal")}
    kv = kv_cache(plan, context=context, batch=opts.batch, dtype_bytes=BYTES[opts.kv_dtype])
    return {
        "name": spec.name,
        "description": spec.description,
        "source": source,
        "params": _params_section(plan, params),
        "flops": _flops_section(plan, params, opts, seq, context, training),
        "kv_cache": _kv_section(plan, kv, opts, context),
        "memory": _memory_section(plan, params, kv, opts, seq),
        "chinchilla": _chinchilla_section(spec, params, opts, training),
    }


def _params_section(plan: ModelPlan, params: ParamCount) -> dict[str, Any]:
    return {
        "total": params.total,
        "active": params.active,
        "embedding": params.embedding,
        "position_embedding": params.position_embedding,
        "lm_head": params.lm_head,
        "non_embedding": params.non_embedding,
        # the input embedding is a lookup, no compute: DeepSeek-V3's model card counts its "activated"
        # parameters without it (a tied matrix is also the head's, so it stays)
        "active_without_input_embedding": params.active - (0 if plan.tied else params.embedding),
        "matmul": params.matmul,
        "matmul_active": params.matmul_active,
        "tied_embeddings": plan.tied,
        "by_kind": params_by_kind(plan, params),
        "by_component": dict(params.by_component),
        "active_by_component": dict(params.active_by_component),
        "convention": PARAMS_CONVENTION,
    }


def _flops_section(plan: ModelPlan, params: ParamCount, opts: SizeOptions, seq: int, context: int,
                   training: dict[str, int | float]) -> dict[str, Any]:
    fwd = forward_flops(plan, seq_len=seq, batch=1)
    hardware = _per_token(training_flops_per_sequence(plan, seq, attention=opts.attention, recompute=opts.recompute),
                          seq)
    decode = decode_flops(plan, context, 1)
    return {
        "attention": opts.attention,
        "seq_len": seq,
        "forward_per_token": _per_token(fwd.forward(opts.attention), seq),
        "training_per_token": training[opts.attention],
        "forward_per_token_full": _per_token(fwd.forward("full"), seq),
        "forward_per_token_causal": _per_token(fwd.forward("causal"), seq),
        "training_per_token_full": training["full"],
        "training_per_token_causal": training["causal"],
        "recompute": opts.recompute,
        "training_per_token_with_recompute": hardware,
        "elementwise_per_token": _per_token(fwd.elementwise, seq),
        "six_n_active": 6 * params.active,
        "decode_per_token": decode.counted,
        "decode_elementwise_per_token": decode.elementwise,
        "decode_context": context,
        "past_max_seq_len": plan.past_trained_note("seq", seq, "FLOPs and training memory are sized as asked"),
        "short_for_mtp": plan.short_for_mtp_note(seq),
        "convention": flops_convention(plan),
    }


def _dplr_s4(plan: ModelPlan) -> bool:
    """Whether a layer is S4 with its diagonal-plus-low-rank A (not S4D)."""
    return any(isinstance(layer.mixer, S4Plan) and layer.mixer.dplr for layer in plan.layers)


def flops_convention(plan: ModelPlan) -> str:
    """The FLOP convention, with what this model's MTP modules, experts, MLA and S4 layers add to it."""
    mla = any(isinstance(layer.mixer, MLAPlan) for layer in plan.layers)
    return (FLOPS_CONVENTION + (MTP_FLOPS_NOTE if plan.mtp else "") + (MOE_FLOPS_NOTE if plan.routed else "")
            + (MLA_DECODE_NOTE if mla else "") + (S4_FLOPS_NOTE if _dplr_s4(plan) else ""))


def _kv_section(plan: ModelPlan, kv: KVCache, opts: SizeOptions, context: int) -> dict[str, Any]:
    return {
        "dtype": opts.kv_dtype.value,
        "context": context,
        "batch": opts.batch,
        "bytes_per_token": kv.bytes_per_token,
        "bytes": kv.bytes,
        "ssm_state_bytes": kv.ssm_state_bytes,
        "naive_mla_bytes_per_token": kv.naive_mla_bytes_per_token,
        "conv_bytes_per_token": kv.conv_bytes_per_token,
        "filter_cache_bytes": kv.filter_cache_bytes,
        "filter_bytes_per_position": kv.filter_bytes_per_position,
        "by_component": dict(kv.by_component),
        "past_max_seq_len": plan.past_trained_note("context", context, "the cache is sized as asked"),
        "convention": KV_CONVENTION,
    }


def _memory_section(plan: ModelPlan, params: ParamCount, kv: KVCache, opts: SizeOptions,
                    seq: int) -> dict[str, Any]:
    # inference holds the model its forward runs: the multi-token-prediction modules are training's
    served = count_params(replace(plan, mtp=())) if plan.mtp else params
    weights = {dtype.value: quantized_weights_bytes(served, dtype, opts.quantize) if BYTES[dtype] < 2
               else weights_bytes(served, dtype) for dtype in INFERENCE_DTYPES}
    weights["int4-g128"] = int4_grouped_bytes(served, 128)
    train_mem = training_memory(plan, params, opts.micro_batch, seq, opts.recompute,
                                activation_dtype=opts.activation_dtype, attention_kernel=opts.attention_kernel,
                                residual_dtype=opts.residual, autocast=opts.autocast)
    states, acts = train_mem.states, train_mem.activations
    return {
        "weights_dtype": "bf16",
        "weights_bytes": weights["bf16"],
        "weights_by_dtype": weights,
        "weights_quantized": opts.quantize,
        "inference_bytes_by_dtype": {dtype: value + kv.bytes for dtype, value in weights.items()},
        "training_bytes": train_mem.total,
        "training": {
            "micro_batch": opts.micro_batch,
            "seq_len": seq,
            "recompute": opts.recompute,
            "bytes_per_param": BYTES_PER_PARAM,
            "weights": states.weights,
            "grads": states.grads,
            "master_weights": states.master_weights,
            "adam_m": states.adam_m,
            "adam_v": states.adam_v,
            "optimizer": states.optimizer,
            "activations": acts.kept,
            "activations_working_set": acts.working_set,
            "loss_backward": acts.loss_backward,
            "attention_backward": acts.core_gradients,
            "scan_backward": acts.scan_transient,
            "long_conv_backward": acts.conv_transient,
            "kernel_generation": acts.generation_transient,
            "tied_grad_sum": train_mem.tied_grad_sum,
            "optimizer_step": train_mem.optimizer_step,
            "phases": dict(train_mem.phases),
            "peak_phase": train_mem.peak_phase,
            "attention_kernel": opts.attention_kernel,
            "activation_dtype": opts.activation_dtype.value,
            "residual_dtype": (opts.residual or opts.activation_dtype).value,
            "autocast": opts.autocast,
            "activations_by_component": dict(acts.by_component),
            "convention": STATES_CONVENTION + (S4_MEMORY_NOTE if _dplr_s4(plan) else ""),
        },
    }


def _chinchilla_section(spec: Spec, params: ParamCount, opts: SizeOptions,
                        training: dict[str, int | float]) -> dict[str, Any]:
    # N as plan and lint read it: the active count for a model with routed experts, so that C = 6·N·D
    # is the compute the run spends (Kaplan et al. 2020 §2.1); the total is printed beside it
    n_chinchilla, n_kind = law_params(params.total, params.active, spec.moe is not None)
    optimal_tokens = TOKENS_PER_PARAM * n_chinchilla
    # the run's tokens as plan prices them: --tokens, else the spec's training.tokens, else 20 a parameter
    planned = spec.training.tokens if spec.training is not None else None
    tokens, tokens_source = ((opts.tokens, "--tokens") if opts.tokens is not None else
                             (float(planned), "spec training.tokens") if planned is not None else
                             (float(optimal_tokens), f"{TOKENS_PER_PARAM} tokens/param"))
    budget = training_flops(n_chinchilla, tokens)
    # what `plan SPEC --gpus N` prices when neither --tokens nor the spec names the tokens
    try:
        plan_tokens: float | None = allocate(LawChoice.epoch, optimal_budget(LawChoice.epoch, params=n_chinchilla))[1]
    except ArchplanError:
        plan_tokens = None
    laws = {}
    for key in opts.laws:
        fit = law(key)
        n_opt, d_opt = compute_optimal(fit, budget)
        laws[key] = {
            "title": fit.title, "E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta,
            "loss": loss(fit, n_chinchilla, tokens),
            "optimal_params": n_opt, "optimal_tokens": d_opt, "optimal_loss": loss(fit, n_opt, d_opt),
        }
    gpu = None
    if opts.gpu is not None:
        acc = accelerator(opts.gpu)
        peak = acc.peak("bf16")
        model_flops = training[opts.attention] * tokens
        gpu = {
            "key": acc.key, "name": acc.name, "dtype": "bf16", "peak_flops_per_s": peak, "mfu": opts.mfu,
            "training_flops": model_flops,
            "gpu_hours": gpu_hours(model_flops, peak, opts.mfu),
            "gpu_hours_6nd": gpu_hours(training_flops(params.total, tokens), peak, opts.mfu),
            # an MoE's token passes through its active parameters only: C ≈ 6·N·D with N the parameters
            # a token uses (Kaplan et al. 2020 §2.1) is 6·N_active·D there, 17.9× below 6·N_total·D
            # for DeepSeek-V3 (37.6 B of 671 B)
            "gpu_hours_6nd_active": gpu_hours(training_flops(params.active, tokens), peak, opts.mfu),
            "convention": f"gpu_hours: model FLOPs (training FLOPs per token at --seq, {opts.attention} "
                          "attention, no recompute) x tokens; gpu_hours_6nd: 6·N_total·D"
                          + ("; gpu_hours_6nd_active: 6·N_active·D, what each token's pass runs through the "
                             "routed experts" if params.active < params.total else "")
                          + "; all at the dense bf16 peak x MFU",
        }
    return {
        "n_params": n_chinchilla,
        "n_params_kind": n_kind,
        "total_params": params.total,
        "active_params": params.active,
        "tokens_per_param": TOKENS_PER_PARAM,
        "optimal_tokens": optimal_tokens,
        "tokens": tokens,
        "tokens_source": tokens_source,
        "plan_tokens": plan_tokens,
        "plan_tokens_params": n_kind,
        "training_flops": budget,
        "laws": laws,
        "extrapolated": outside_fit_data(n_chinchilla, tokens),
        "gpu": gpu,
        "convention": CHINCHILLA_CONVENTION,
    }

