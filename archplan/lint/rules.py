"""The lint rules: one registry, each rule with its code, severity, rationale and source.

Three kinds of rule, by what they read:
- input rules (AP001, AP002): produced by the engine when a file is not YAML or not a valid spec;
- validator rules (AP003-AP006): mistakes the spec validator already rejects. They arrive as a
  schema error; the engine recognises the validator's message and files it under the rule's own
  code, pointing at the field to change and with a fix worked out from the numbers;
- spec rules (AP007+): small functions over a validated spec and its YAML locations.

Rules are attention-type aware: MHA/GQA/MQA rules read `spec.attention` only when it is one of
those (MLA has no head_dim or n_kv_heads, Mamba layers have no heads at all).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Union

from archplan.loader import LoadedYaml
from archplan.resolve import ModelPlan, resolve
from archplan.spec import GQA, MAX_ROPE_FACTOR, MHA, MLA, MQA, PostNorm, Rope, Spec, takes_deepnorm
from archplan.units import amount, count, nbytes

Severity = Literal["error", "warning", "info"]
FieldPath = tuple[Union[str, int], ...]

# Tensor-core alignment in elements for 16-bit operands on A100-class GPUs: 128 bytes = 64 halves
# (NVIDIA Deep Learning Performance, "Matrix Multiplication Background", §2.2 Tensor Core Requirements).
ALIGN = 64
# FlashAttention-2's kernel widths (csrc/flash_attn/src/static_switch.h, HEADDIM_SWITCH): a head_dim
# runs on the smallest that holds it
KERNEL_HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
# Beyond this many times the Chinchilla ratio we say so (Llama-3-8B: 15T tokens, ~94x).
FAR_ABOVE = 5.0
# Below the Chinchilla ratio by more than this factor we warn: the compute-optimal ratio is not one
# number. Besiroglu et al. 2024's refit of Hoffmann's Approach 3 (`plan --law epoch`, the default)
# puts it at 19.2 tokens/param at 1e23 FLOPs and 12.8 at 1e30, so a spec `plan` wrote at its own
# optimum would be flagged by a bare "< 20".
FAR_BELOW = 2.0
# MoE expert counts from which DeepSeekMoE-style shared experts are the norm (DeepSeek-V2/V3: 160/256).
MANY_EXPERTS = 64
# Post-LN trains at 12-24 layers with warm-up (BERT-large is 24); deeper stacks diverge
# (Xiong et al. 2020; Wang et al. 2022, DeepNet).
POST_NORM_MAX_LAYERS = 24
KV_DTYPE_BYTES = 2  # bf16 cache, the serving default; the spec has no cache dtype


@dataclass(frozen=True)
class Hit:
    """What a rule reports: the YAML field it concerns, a message and, where it helps, a fix."""

    path: FieldPath
    message: str
    fix: str | None = None


class SpecContext:
    """A validated spec, its YAML (for locations and what was written) and its plan, resolved once."""

    def __init__(self, spec: Spec, loaded: LoadedYaml) -> None:
        self.spec = spec
        self.loaded = loaded

    @cached_property
    def plan(self) -> ModelPlan:
        return resolve(self.spec)

    @cached_property
    def active_params(self) -> int:
        """Parameters one token trains (= total for dense models); read by both budget rules."""
        from archplan.analytic import count_params

        return count_params(self.plan).active

    def written(self, path: FieldPath) -> bool:
        """Whether the YAML spells this field out (defaults are not written)."""
        return path in self.loaded.locations


Check = Callable[[SpecContext], Iterator[Hit]]


@dataclass(frozen=True)
class Recognise:
    """A spec-validator message this rule names, where in the YAML to point, and the fix."""

    pattern: re.Pattern[str]
    at: tuple[FieldPath, ...]  # first of these written in the YAML is the finding's location
    fix: Callable[[re.Match[str]], str]


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    title: str
    rationale: str
    source: str
    detect: Check | Recognise | None  # None: produced by the engine itself (input rules)

    @property
    def on_load(self) -> bool:
        """Whether it reports a file that no command can load (the input rules and the
        validator's): such a rule runs under any --select/--ignore, so that a file `size` refuses
        cannot pass a CI gate (as ruff reports a syntax error under any selection)."""
        return self.detect is None or isinstance(self.detect, Recognise)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nearest(values: list[int], target: int, k: int = 3) -> list[int]:
    return sorted(sorted(values, key=lambda v: (abs(v - target), v))[:k])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _multiples(n: int, multiple: int) -> str:
    """The multiples of `multiple` on either side of n (positive ones only)."""
    down = n // multiple * multiple
    up = _round_up(n, multiple)
    return f"{down} or {up}" if down else f"{up}"


def _aligned_choices(n: int) -> str:
    return _multiples(n, ALIGN)


# ------------------------------------------------------------------------- validator rules
def _gqa_fix(m: re.Match[str]) -> str:
    n_heads = int(m["heads"])
    return (
        f"n_kv_heads must divide n_heads ({n_heads}): one of "
        f"{', '.join(map(str, _divisors(n_heads)))}"
    )


def _head_dim_fix(m: re.Match[str]) -> str:
    d_model, n_heads = int(m["d"]), int(m["heads"])
    # Several heads of at least 2 dims each; an even head_dim where one exists, since the default
    # RoPE rotates pairs (a head_dim of 125 would only trade this error for AP005).
    splits = [h for h in _divisors(d_model) if 1 < h < d_model]
    even = [h for h in splits if (d_model // h) % 2 == 0]
    explicit = "write attention.head_dim explicitly (then n_heads·head_dim may differ from d_model, as in Gemma)"
    # a multiple of 2·n_heads: an even head_dim, which the default RoPE needs (504 / 8 = 63 is AP005)
    multiples = f"make d_model a multiple of 2·n_heads, for an even head_dim ({_multiples(d_model, 2 * n_heads)})"
    if not splits:
        return f"d_model ({d_model}) cannot be split into several heads: {multiples}, or {explicit}"
    near = _nearest(even or splits, n_heads)
    return f"use n_heads dividing d_model (nearest: {', '.join(map(str, near))}), {multiples}, or {explicit}"


def _rotary_fix(m: re.Match[str]) -> str:
    # Both validator messages carry the odd width: a head's rotary part (MHA/GQA/MQA: head_dim,
    # or d_model / n_heads where it is not written, times position.fraction) or MLA's own width.
    if m["dim2"] is not None:
        dim = int(m["dim2"])
        return f"set attention.qk_rope_head_dim to {dim - 1} or {dim + 1}"
    dim = int(m["dim"])
    return (f"rotate {dim - 1} or {dim + 1} dimensions: change attention.head_dim (d_model / n_heads where it "
            "is not written) or position.fraction")


def _top_k_fix(m: re.Match[str]) -> str:
    if m["grouped"] is not None:  # group-limited routing: only topk_group groups' experts are candidates
        return (f"top_k must be at most the {m['grouped']} experts of the kept groups: raise "
                "moe.router.topk_group or lower top_k; DeepSeek-V3 routes 8 of 256 from 4 of 8 groups")
    return f"top_k must be at most n_experts ({m['experts']}); Mixtral routes 2 of 8, DeepSeek-V3 8 of 256"


# ---------------------------------------------------------------------------- spec rules
def _head_attention(spec: Spec) -> MHA | GQA | MQA | None:
    """The attention config if it is a per-head family (MHA/GQA/MQA); MLA and SSM-only: None."""
    attn = spec.attention
    if isinstance(attn, (MHA, GQA, MQA)):
        return attn
    return None


def check_vocab(ctx: SpecContext) -> Iterator[Hit]:
    vocab = ctx.spec.vocab_size
    if vocab % ALIGN:
        padded = _round_up(vocab, ALIGN)
        yield Hit(
            ("vocab_size",),
            f"vocab_size {vocab:,} is not a multiple of {ALIGN}: the embedding and LM-head matmuls "
            "fall off the tensor-core fast path",
            f"pad to {padded:,} (+{padded - vocab} unused rows), as nanoGPT pads GPT-2's 50,257 to 50,304",
        )


def check_ffn_width(ctx: SpecContext) -> Iterator[Hit]:
    spec = ctx.spec
    # (path, d_ff, how many of them make one matmul): the shared experts are built as one FFN of
    # n·d_ff (as Hugging Face's DeepSeek and Qwen2-MoE build them), which is what the kernels see
    widths: list[tuple[FieldPath, int, int]] = []
    if spec.ffn is not None:
        widths.append((("ffn", "d_ff"), spec.ffn.d_ff, 1))
    if spec.moe is not None:
        widths.append((("moe", "expert", "d_ff"), spec.moe.expert.d_ff, 1))
        if spec.moe.shared is not None:
            widths.append((("moe", "shared", "d_ff"), spec.moe.shared.d_ff, spec.moe.shared.n))
    for path, d_ff, n in widths:
        if n * d_ff % ALIGN:
            width = f"{d_ff:,}" if n == 1 else f"{d_ff:,} (x {n} shared experts, one FFN {n * d_ff:,} wide)"
            yield Hit(
                path,
                f"{'.'.join(map(str, path))} {width} is not a multiple of {ALIGN}: every FFN matmul "
                "pays tile-quantisation waste",
                # n·d_ff aligns where d_ff is a multiple of ALIGN / gcd(n, ALIGN)
                f"use {_multiples(d_ff, ALIGN // math.gcd(n, ALIGN))} (Llama rounds its SwiGLU width with "
                "multiple_of=256)",
            )


def check_head_dim(ctx: SpecContext) -> Iterator[Hit]:
    attn = _head_attention(ctx.spec)
    if attn is None:
        return
    head_dim = attn.head_dim or ctx.spec.d_model // attn.n_heads
    if head_dim in KERNEL_HEAD_DIMS or (head_dim > KERNEL_HEAD_DIMS[-1] and head_dim % ALIGN == 0):
        return
    written = ctx.written(("attention", "head_dim"))
    path: FieldPath = ("attention", "head_dim") if written else ("attention", "n_heads")
    how = "" if written else f" (d_model {ctx.spec.d_model:,} / n_heads {attn.n_heads})"
    if head_dim < KERNEL_HEAD_DIMS[-1]:
        run_as = next(w for w in KERNEL_HEAD_DIMS if w > head_dim)
        below = [w for w in KERNEL_HEAD_DIMS if w < head_dim]
        yield Hit(
            path,
            f"head_dim {head_dim}{how} is not one of FlashAttention-2's kernel widths "
            f"({', '.join(map(str, KERNEL_HEAD_DIMS))}): it runs as {run_as}, QKᵀ and AV on padded tiles",
            f"head_dim {below[-1]} or {run_as}" if below else f"head_dim {run_as}",
        )
    else:
        yield Hit(
            path,
            f"head_dim {head_dim}{how} is past FlashAttention-2's widest kernel ({KERNEL_HEAD_DIMS[-1]}) "
            f"and not a multiple of {ALIGN}: QKᵀ and AV run on padded tiles",
            f"head_dim {_aligned_choices(head_dim)}",
        )


def check_top1_balancing(ctx: SpecContext) -> Iterator[Hit]:
    moe = ctx.spec.moe
    if moe is None or moe.top_k != 1:
        return
    router = moe.router
    if moe.aux_loss_coef == 0 and not (router.score_correction_bias and router.bias_update_speed > 0):
        # a correction bias whose update speed is 0 never moves: no balancing either
        bias = ("a score_correction_bias whose bias_update_speed is 0" if router.score_correction_bias
                else "no score_correction_bias")
        speed = ("moe", "router", "bias_update_speed")
        fixed = router.score_correction_bias and ctx.written(speed)
        yield Hit(
            speed if fixed else ("moe", "aux_loss_coef") if ctx.written(("moe", "aux_loss_coef")) else ("moe", "top_k"),
            f"top-1 routing with no load balancing (aux_loss_coef 0, {bias}): "
            "the router collapses onto a few experts",
            "set moe.aux_loss_coef: 0.01 (Switch Transformer) or "
            + ("moe.router.bias_update_speed: 0.001" if router.score_correction_bias else
               "moe.router.score_correction_bias: true") + " (DeepSeek-V3 auxiliary-loss-free balancing)",
        )
    if router.normalize_top_k:
        # one weight renormalised over itself is 1 for every token: the layer's output no longer
        # depends on the router's scores, so the task loss sends the router no gradient
        where = ("moe", "router", "normalize_top_k")
        yield Hit(
            where if ctx.written(where) else ("moe", "top_k"),
            "top-1 routing with normalize_top_k: every token's one routing weight is renormalised to 1, so "
            "the output does not depend on the router's scores and the task loss gives it no gradient",
            "set moe.router.normalize_top_k: false (Switch Transformer keeps the gate's probability, eq. 2)",
        )


def check_shared_experts(ctx: SpecContext) -> Iterator[Hit]:
    moe = ctx.spec.moe
    if moe is None or moe.shared is not None or moe.n_experts < MANY_EXPERTS:
        return
    yield Hit(
        ("moe", "n_experts"),
        f"{moe.n_experts} experts and no shared expert: common knowledge is learnt "
        "again by many experts",
        "consider moe.shared: {n: 1, d_ff: <expert d_ff>} (DeepSeekMoE shared-expert isolation; "
        "DeepSeek-V3: 256 routed + 1 shared)",
    )


def check_context(ctx: SpecContext) -> Iterator[Hit]:
    spec = ctx.spec
    # Learned positions need no check here: the spec sizes their table from max_seq_len itself.
    # ALiBi and sinusoids extrapolate by construction; plain RoPE declares no trained range.
    if not isinstance(spec.position, Rope) or spec.position.scaling is None:
        return
    scaling = spec.position.scaling
    original = scaling.original_max_positions
    # Llama 3's factor divides only the low-frequency band; the length comes from long-context
    # training, not from the product: Llama 3.1 ships factor 8 over 8,192 positions at 131,072.
    if original is None or scaling.kind == "llama3":
        return
    reach = int(original * scaling.factor)
    if spec.max_seq_len > reach:
        yield Hit(
            ("max_seq_len",),
            f"max_seq_len {spec.max_seq_len:,} is {spec.max_seq_len / reach:.2f}× the range "
            f"{scaling.kind} scaling extends RoPE to (original_max_positions {original:,} × factor "
            f"{scaling.factor:g} = {reach:,})",
            _context_fix(spec.max_seq_len, original, reach),
        )


def _context_fix(max_seq_len: int, original: int, reach: int) -> str:
    """Raise the factor where the spec takes the one needed (at most MAX_ROPE_FACTOR), else lower
    max_seq_len."""
    needed = math.ceil(max_seq_len / original)
    raise_factor = f"raise position.scaling.factor to {needed} or " if needed <= MAX_ROPE_FACTOR else ""
    return f"{raise_factor}lower max_seq_len to {reach:,}, unless long-context training covers the rest"


def _tokens_per_param(ctx: SpecContext) -> tuple[float, int, float] | None:
    training = ctx.spec.training
    if training is None or training.tokens is None:
        return None
    # Active parameters: what each token trains; Chinchilla's N (total, embeddings included) is
    # for dense models, where the two are the same.
    n_params = ctx.active_params
    return training.tokens, n_params, training.tokens / n_params


def _tokens(n: float) -> str:
    """'1 token', '15.0 T tokens'."""
    return f"{count(n)} token" + ("" if n == 1 else "s")


def check_undertrained(ctx: SpecContext) -> Iterator[Hit]:
    from archplan.analytic.scaling import TOKENS_PER_PARAM
    budget = _tokens_per_param(ctx)
    if budget is None:
        return
    tokens, n_params, ratio = budget
    if ratio < TOKENS_PER_PARAM / FAR_BELOW:
        yield Hit(
            ("training", "tokens"),
            f"{_tokens(tokens)} for {count(n_params)} active parameters is {amount(ratio)} tokens/param, "
            f"{amount(TOKENS_PER_PARAM / ratio)}× below the compute-optimal ~20",
            f"train on ≈{count(TOKENS_PER_PARAM * n_params)} tokens, or size the model to "
            f"≈{count(tokens / TOKENS_PER_PARAM)} parameters for this budget",
        )


def check_overtrained(ctx: SpecContext) -> Iterator[Hit]:
    from archplan.analytic.scaling import TOKENS_PER_PARAM
    budget = _tokens_per_param(ctx)
    if budget is None:
        return
    tokens, n_params, ratio = budget
    if ratio > FAR_ABOVE * TOKENS_PER_PARAM:
        yield Hit(
            ("training", "tokens"),
            f"{_tokens(tokens)} for {count(n_params)} active parameters is {ratio:,.0f} tokens/param, "
            f"{ratio / TOKENS_PER_PARAM:.1f}× Chinchilla's ~20",
            # not "compute-optimal": Hoffmann's Approach 3 fit (`plan --law chinchilla`) puts the
            # optimum at 153 tokens/param at 1e26 FLOPs, and that spec would contradict it
            "fine if deliberate (a smaller model trained longer is cheaper to serve) or where a fitted law "
            "puts the optimum higher (Hoffmann's Approach 3, `plan --law chinchilla`, at large budgets); "
            f"at 20 tokens/param these parameters take ≈{count(TOKENS_PER_PARAM * n_params)} tokens",
        )


def check_kv_cache(ctx: SpecContext) -> Iterator[Hit]:
    training = ctx.spec.training
    if training is None or training.target_device_memory_gib is None:
        return
    from archplan.analytic import kv_cache

    context = ctx.spec.max_seq_len
    cache = kv_cache(ctx.plan, context, batch=training.batch, dtype_bytes=KV_DTYPE_BYTES)
    total = cache.bytes  # `size`'s figure at training.batch
    # KV and SSM state are per sequence; Hyena's filters over the context are held once for the batch
    shared = cache.filter_cache_bytes
    per_sequence = (total - shared) // training.batch
    budget = training.target_device_memory_gib * (1 << 30)
    if total > budget:
        fits = int((budget - shared) // per_sequence) if budget > shared and per_sequence else 0
        # rounded alike, the two sizes would read equal: the excess in bytes says by how much
        by = f" by {total - budget:,.0f} B" if nbytes(total) == nbytes(budget) else ""
        # a budget under 1 GiB reads in the unit the cache is printed in
        gib = training.target_device_memory_gib
        target = f"{gib:g} GiB" + (f" ({nbytes(budget)})" if gib < 1 else "")
        smaller = _cache_remedies(ctx.spec, cache.conv_bytes_per_token)
        filters = f"; with Hyena's fp32 filters, {nbytes(shared)} once for the batch" if shared else ""
        what = "KV cache" if ctx.spec.attention is not None and not cache.ssm_state_bytes else "inference cache"
        yield Hit(
            ("training", "target_device_memory_gib"),
            f"the {what} alone at max_seq_len {context:,} × batch {training.batch:,} is {nbytes(total)} "
            f"(bf16{filters}), over target_device_memory_gib {target}{by}",
            (f"batch ≤ {fits:,} fits the cache" + (f"; or {smaller}" if smaller else
                                                     " (the state is per sequence, whatever the length)"))
            if fits else f"not even one sequence fits: {smaller or 'a smaller state per sequence'}",
        )


def _cache_remedies(spec: Spec, conv_bytes_per_token: int) -> str:
    """What would shrink this spec's cache, of what it does not do already: fewer KV heads where
    its attention caches more than one a layer, a sliding window (a shorter one, or more windowed
    layers, where it has one), an 8-bit cache; a shorter context where a Hyena layer caches its
    long convolution's inputs per token. None (""): an SSM's state, and a modal or S4 filter's, is
    per sequence whatever the length."""
    attention = spec.attention
    remedies: list[str] = []
    if conv_bytes_per_token:
        remedies.append("a shorter max_seq_len (Hyena caches its long convolution's inputs per token)")
    if isinstance(attention, (MHA, GQA)) and getattr(attention, "n_kv_heads", attention.n_heads) > 1:
        remedies.append("fewer KV heads (GQA/MQA/MLA)")
    if attention is not None:
        window = getattr(attention, "sliding_window", None)
        remedies.append("a sliding window" if window is None else "a shorter sliding window (or more windowed layers)")
        remedies.append("an 8-bit cache (half the bytes)")
    if not remedies:
        return ""
    if len(remedies) == 1:
        return remedies[0]
    return ", ".join(remedies[:-1]) + ("," if len(remedies) > 2 else "") + " or " + remedies[-1]


def check_post_norm_depth(ctx: SpecContext) -> Iterator[Hit]:
    spec = ctx.spec
    if isinstance(spec.residual, PostNorm) and spec.n_layers > POST_NORM_MAX_LAYERS:
        # the spec refuses deepnorm beside SSM and long-convolution mixers: only pre-norm is offered there
        deepnorm = takes_deepnorm(spec.layout.mixers)
        yield Hit(
            ("residual",),
            f"post-norm residual with {spec.n_layers} layers: Post-LN stacks this deep diverge "
            "without special care",
            ("use residual: {kind: deepnorm} (DeepNet: α = (2L)^¼, β = (8L)^-¼) or residual: {kind: pre}"
             if deepnorm else "use residual: {kind: pre}"),
        )


def check_reference_counts(ctx: SpecContext) -> Iterator[Hit]:
    """A spec that states the published counts of the model it reproduces must count them."""
    reference = ctx.spec.reference
    if reference is None:
        return
    from archplan.analytic import count_params

    counts = count_params(ctx.plan)
    for field, published, counted in (("total_params", reference.total_params, counts.total),
                                      ("active_params", reference.active_params, counts.active)):
        if published is not None and published != counted:
            yield Hit(
                ("reference", field),
                f"the spec counts {counted:,} {field.removesuffix('_params')} parameters, "
                f"{abs(counted - published):,} {'more' if counted > published else 'fewer'} than the reference's "
                f"{published:,} ({counted / published - 1:+.2%})" if published else
                f"the spec counts {counted:,} {field.removesuffix('_params')} parameters, the reference 0",
                "correct the sizes or the reference figure: `archplan size` breaks the count down by component",
            )


def check_mla_compression(ctx: SpecContext) -> Iterator[Hit]:
    """MLA's down-projections exist to compress: a rank not below d_model widens instead, and a
    cached latent no smaller than the K/V it expands to saves no cache."""
    attn = ctx.spec.attention
    if not isinstance(attn, MLA):
        return
    d = ctx.spec.d_model
    for field, rank in (("q_lora_rank", attn.q_lora_rank), ("kv_lora_rank", attn.kv_lora_rank)):
        if rank is not None and rank >= d:
            plain = "; or drop q_lora_rank for a plain q_proj (DeepSeek-V2-Lite)" if field == "q_lora_rank" else ""
            yield Hit(
                ("attention", field),
                f"attention.{field} {rank:,} is not below d_model {d:,}: the low-rank path widens the "
                "hidden state instead of compressing it, paying a second projection's parameters and FLOPs",
                f"a rank well below d_model (DeepSeek-V3: q 1,536 and kv 512 for d_model 7,168){plain}",
            )
    cached = attn.kv_lora_rank + attn.qk_rope_head_dim
    expanded = attn.n_heads * (attn.qk_nope_head_dim + attn.qk_rope_head_dim + attn.v_head_dim)
    if cached >= expanded:
        yield Hit(
            ("attention", "kv_lora_rank"),
            f"the cached latent, kv_lora_rank + qk_rope_head_dim = {cached:,} per token and layer, is no "
            f"smaller than the keys and values it expands to, n_heads · (qk_nope + qk_rope + v) = {expanded:,}",
            "a latent of a few head widths (DeepSeek-V3 caches 512 + 64 for 128 heads of 128 + 64 + 128), "
            "or MHA/GQA, whose cache is no larger and needs no up-projections",
        )


# ------------------------------------------------------------------------------- registry
_NVIDIA_GEMM = (
    "NVIDIA Deep Learning Performance Guide, 'Matrix Multiplication Background' (§2.2 Tensor Core "
    "Requirements; §3.1 Tile Quantization), "
    "https://docs.nvidia.com/deeplearning/performance/dl-performance-matrix-multiplication/"
)

RULES: tuple[Rule, ...] = (
    Rule(
        "AP001", "invalid-yaml", "error", "File is not readable YAML",
        "The file could not be read as one safe YAML mapping: a syntax error, tabs used for "
        "indentation, a duplicate key (YAML says last-wins; archplan refuses, since one of the two "
        "values is a mistake), a `!!python` tag, an alias bomb, nesting deeper than 100 levels, "
        "more than 200,000 nodes, binary content or an oversized file.",
        "YAML 1.2.2 spec §3.2.1.1 (the keys of a mapping are unique); PyYAML SafeLoader",
        None,
    ),
    Rule(
        "AP002", "schema", "error", "Not a valid archplan spec",
        "A field is unknown, missing, of the wrong type or out of range, or the parts do not fit "
        "together (layout letters without their mixer, MoE placed on no layer, ...).",
        "archplan/spec.py (the Pydantic model; `archplan schema` prints it as JSON Schema)",
        None,
    ),
    Rule(
        "AP003", "gqa-groups", "error", "n_heads not divisible by n_kv_heads",
        "Grouped-query attention shares each K/V head among n_heads / n_kv_heads query heads; the "
        "groups must be equal, so n_kv_heads must divide n_heads.",
        "Ainslie et al. 2023, GQA (arXiv:2305.13245) §2.2",
        Recognise(
            re.compile(r"n_heads \((?P<heads>\d+)\) must be divisible by n_kv_heads \((?P<kv>\d+)\)"),
            (("attention", "n_kv_heads"),),
            _gqa_fix,
        ),
    ),
    Rule(
        "AP004", "implicit-head-dim", "error", "d_model not divisible by n_heads with head_dim implicit",
        "Without an explicit head_dim, archplan (like most codebases) uses d_model / n_heads; when "
        "that is not an integer the heads cannot tile the model width. An explicit head_dim may "
        "legitimately make n_heads·head_dim differ from d_model (Gemma-7B: 16 × 256 = 4096 ≠ 3072), "
        "so only the implicit case is an error.",
        "Vaswani et al. 2017 §3.2.2 (d_k = d_model / h); HF Gemma config (head_dim explicit)",
        Recognise(
            re.compile(r"d_model \((?P<d>\d+)\) is not divisible by n_heads \((?P<heads>\d+)\)"),
            (("attention", "n_heads"),),
            _head_dim_fix,
        ),
    ),
    Rule(
        "AP005", "odd-rotary", "error", "Odd rotary dimension",
        "RoPE rotates pairs of dimensions (x_2i, x_2i+1) by the angle m·θ_i; an odd rotary width "
        "leaves one dimension without a partner. The rotary width is head_dim·position.fraction for "
        "MHA/GQA/MQA and qk_rope_head_dim for MLA.",
        "Su et al. 2021, RoFormer (arXiv:2104.09864) §3.2.2, eq. 15",
        Recognise(
            re.compile(r"rotary dimension (?P<dim>\d+) is odd|qk_rope_head_dim \((?P<dim2>\d+)\) must be even"),
            (
                ("attention", "qk_rope_head_dim"), ("position", "fraction"),
                ("attention", "head_dim"), ("attention", "n_heads"),
            ),
            _rotary_fix,
        ),
    ),
    Rule(
        "AP006", "top-k-experts", "error", "top_k exceeds n_experts",
        "A token cannot be routed to more distinct experts than exist.",
        "Shazeer et al. 2017, Outrageously Large Neural Networks (arXiv:1701.06538) §2.1 (top-k gating)",
        Recognise(
            re.compile(r"top_k \((?P<k>\d+)\) exceeds (?:n_experts \((?P<experts>\d+)\)|"
                       r"the (?P<grouped>\d+) experts of router\.topk_group)"),
            (("moe", "top_k"),),
            _top_k_fix,
        ),
    ),
    Rule(
        "AP007", "vocab-alignment", "warning", "Vocabulary not a multiple of 64",
        "The embedding gather is cheap, but the LM head is a (tokens × d_model) · (d_model × vocab) "
        "matmul; a vocabulary that is not a multiple of 64 puts it on padded tensor-core tiles. "
        "Karpathy measured ~25% faster nanoGPT training by padding GPT-2's 50,257 to 50,304; the "
        "extra rows are never predicted after training.",
        "karpathy/nanoGPT model.py (GPTConfig vocab_size 50304, 'padded up to nearest multiple of "
        "64 for efficiency'); Karpathy 2023 on X (~25% speed-up from that padding); " + _NVIDIA_GEMM,
        check_vocab,
    ),
    Rule(
        "AP008", "ffn-alignment", "warning", "FFN width not a multiple of 64",
        "FFN matmuls are most of a dense model's FLOPs. With 16-bit operands, A100-class tensor "
        "cores reach full efficiency when the matrix dimensions are multiples of 64 elements "
        "(128 bytes); other sizes waste part of the last tile (tile quantisation). Shared experts are "
        "one FFN of n·d_ff, so that product is what must align.",
        _NVIDIA_GEMM + "; Touvron et al. 2023 / meta-llama model.py (FeedForward multiple_of)",
        check_ffn_width,
    ),
    Rule(
        "AP009", "head-dim-alignment", "warning", "Attention head_dim off the attention kernels' tiles",
        "head_dim is the inner dimension of QKᵀ and the output width of AV in every head; attention "
        "kernels compile one kernel per head width and pad a head_dim up to the next one: "
        "FlashAttention-2's are 32, 64, 96, 128, 160, 192 and 256 (80 runs as 96, 100 as 128); past "
        "256, a multiple of 64 keeps the GEMM tiles full. MHA/GQA/MQA only: MLA's per-head widths "
        "and Mamba heads are sized by their own designs.",
        _NVIDIA_GEMM + "; Dao 2023, FlashAttention-2 (arXiv:2307.08691) §3; flash-attention's "
        "csrc/flash_attn/src/static_switch.h (HEADDIM_SWITCH)",
        check_head_dim,
    ),
    Rule(
        "AP010", "top1-no-balancing", "warning", "Top-1 routing without load balancing or a router gradient",
        "With a single expert per token and nothing pushing the router towards uniform load, a few "
        "experts win early and the rest starve (routing collapse). Switch Transformer adds an "
        "auxiliary loss α·N·Σ f_i·P_i with α = 10⁻²; DeepSeek-V3 instead biases the routing scores. "
        "And a single weight renormalised over itself (normalize_top_k) is 1 for every token: the "
        "output no longer depends on the router, which then learns from the balance term alone, or "
        "from nothing; Switch keeps the gate's probability p_i as the weight (eq. 2).",
        "Fedus et al. 2021, Switch Transformers (arXiv:2101.03961) §2.1 eq. 2 and §2.2 eq. 4; "
        "DeepSeek-V3 technical report (arXiv:2412.19437) §2.1.2",
        check_top1_balancing,
    ),
    Rule(
        "AP011", "moe-no-shared", "info", "Many experts and no shared expert",
        "MoE with dozens to hundreds of experts (fine-grained ones especially) tends to relearn common "
        "knowledge in many experts; isolating one or two always-active shared experts removes that "
        "redundancy.",
        "Dai et al. 2024, DeepSeekMoE (arXiv:2401.06066) §3.2 (shared expert isolation)",
        check_shared_experts,
    ),
    Rule(
        "AP012", "context-beyond-positions", "warning", "Context beyond the positional scheme's range",
        "RoPE length-extension methods (linear/NTK/YaRN) stretch the trained range "
        "original_max_positions by the scaling factor; a max_seq_len beyond that product relies on "
        "extrapolation, which degrades quickly. Llama 3's scaling is not checked: its factor divides "
        "the frequencies of the low band only, and the length is what long-context training reached "
        "(Llama 3.1 pairs factor 8 over 8,192 positions with 131,072, trained in six stages to 128K). "
        "(Learned position tables are sized from max_seq_len, so they cannot be exceeded in a spec; "
        "ALiBi and sinusoids have no trained range.)",
        "Peng et al. 2023, YaRN (arXiv:2309.00071) §2-3; Chen et al. 2023, Position Interpolation "
        "(arXiv:2306.15595); Llama Team 2024, The Llama 3 Herd of Models §3.4.2",
        check_context,
    ),
    Rule(
        "AP013", "undertrained", "warning", "Training budget below half of ~20 tokens per parameter",
        "Hoffmann et al. find compute-optimal models see about 20 tokens per parameter; far fewer "
        "tokens leave the same compute better spent on a smaller model trained longer. The warning "
        "starts below 10: Besiroglu et al.'s refit of the same law puts the optimum at 19.2 tokens "
        "per parameter at 1e23 FLOPs and 12.8 at 1e30, which `archplan plan` writes. N is the "
        "active parameter count (= total for dense models).",
        "Hoffmann et al. 2022, Chinchilla (arXiv:2203.15556) Table 3; Besiroglu et al. 2024 "
        "(arXiv:2404.10102)",
        check_undertrained,
    ),
    Rule(
        "AP014", "overtrained", "info", "Training budget far above ~20 tokens per parameter",
        "More than 5× the Chinchilla ratio is often deliberate (a smaller model is cheaper to "
        "serve: Llama-3-8B saw 15T tokens, ~1,900 per parameter) but also what a units slip "
        "(tokens vs. billions of tokens) looks like, so it is reported with the factor.",
        "Hoffmann et al. 2022 Table 3; Sardana & Frankle 2023, Beyond Chinchilla-Optimal "
        "(arXiv:2401.00448)",
        check_overtrained,
    ),
    Rule(
        "AP015", "kv-cache-memory", "error", "KV cache exceeds the target device memory",
        "At max_seq_len and training.batch the KV cache (bf16, per attention layer 2·n_kv·head_dim "
        "per token, MLA its latent, sliding windows capped, SSM layers their constant state, Hyena "
        "layers their fp32 filters once for the batch) must fit in training.target_device_memory_gib "
        "before any weight is loaded: `size`'s cache at training.batch.",
        "DeepSeek-V2 (arXiv:2405.04434) §2.1.4 Table 1; Mistral 7B (arXiv:2310.06825) §2 (rolling "
        "buffer); archplan/analytic/kv.py",
        check_kv_cache,
    ),
    Rule(
        "AP016", "deep-post-norm", "warning", "Deep post-norm stack without DeepNorm",
        "Post-LN puts the norm after the residual sum, so gradients near the output are large and "
        "deep stacks diverge without long warm-up; DeepNorm up-weights the residual (α) and "
        "down-scales the initialisation (β) and trains 1,000 layers.",
        "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture "
        "(arXiv:2002.04745); Wang et al. 2022, DeepNet (arXiv:2203.00555) Table 1",
        check_post_norm_depth,
    ),
    Rule(
        "AP017", "reference-count", "error", "Parameter count differs from the spec's reference",
        "A spec that reproduces a published model states its counts in reference.total_params and "
        "active_params; the exact count of the spec as written must equal them, or the spec (a "
        "head count, a width, a tied head) or the figure is wrong. Published counts are exact: "
        "Llama-2-7B is 6,738,415,616 parameters.",
        "Touvron et al. 2023, Llama 2 (arXiv:2307.09288); Hugging Face transformers' model classes, "
        "whose parameter counts the presets match (docs/import.md)",
        check_reference_counts,
    ),
    Rule(
        "AP018", "mla-no-compression", "warning", "MLA latent that does not compress",
        "Multi-head latent attention caches one latent per token (kv_lora_rank + qk_rope_head_dim) "
        "and projects queries through a low rank, in place of every head's keys and values and a "
        "full query projection. A rank not below d_model, or a latent no smaller than the keys and "
        "values it expands to, costs the extra projections and saves nothing.",
        "DeepSeek-AI 2024, DeepSeek-V2 (arXiv:2405.04434) §2.1.2 (d_c ≪ d_h·n_h; d_c = 512, "
        "d_c' = 1,536 for d = 5,120) and Table 1; DeepSeek-V3 (arXiv:2412.19437) §4.2",
        check_mla_compression,
    ),
)



BY_CODE: dict[str, Rule] = {rule.code: rule for rule in RULES}
