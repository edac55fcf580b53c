"""Timed forward passes through the real modules: prefill, decode with the real cache, peak memory,
MFU against the device peak, the roofline prediction beside the measurement, and `--layers K`
extrapolation to the full depth."""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from rich.console import Console
from rich.progress import Progress
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from archplan.analytic import built_weights_bytes, count_params, decode_flops, forward_flops, kv_cache
from archplan.bench.decode import RecordedStep, Replay, WeightStreams, count_pass, decode_rates, record_step_at
from archplan.bench.device import (
    TORCH_DTYPES,
    DevicePeak,
    device_peak,
    free_memory,
)
from archplan.bench.fit import refuse_unless_fits, truncate
from archplan.bench.growth import AttentionCore, mask_bytes, prefill_peak_bytes, scores_bytes
from archplan.bench.peak import forward_peak_bytes, keep_freed_memory
from archplan.bench.roofline import (
    DecodeRates,
    OpCount,
    Roofline,
    layer_kind,
    predict_decode_step,
    predict_prefill,
    with_host_floor,
)
from archplan.bench.timing import Timing, progress_bar, time_calls
from archplan.dtypes import DType, nbytes
from archplan.errors import ArchplanError
from archplan.flop_registry import counter_mapping
from archplan.modules.attention import attention_mask, sdpa
from archplan.modules.model import build_model, resolve_device
from archplan.resolve import AttentionPlan, MLAPlan, ModelPlan

BACKENDS = ("math", "flash", "efficient", "cudnn")


# what every FLOP figure bench prints counts (size's convention)
_COUNTED = ("2 FLOPs per multiply-add, attention causal, LM head counted, embedding lookups not, an FFT "
            "2.5·n·⌈log2 n⌉ per real transform of length n = 2T (5·n·⌈log2 n⌉ complex), a long convolution's "
            "filters made once for the batch")
# a prefill's (`analytic.forward_flops`, the counted forward)
PREFILL_FLOPS_CONVENTION = f"analytic forward, {_COUNTED}"
# a training step's model FLOPs (`analytic.training_flops_of_batch`), MFU's numerator
TRAINING_FLOPS_CONVENTION = (f"analytic forward + backward (docs/formulas.md §2.9: the backward 2 × the forward, an "
                             f"FFT convolution's irfft backward 1 ×), {_COUNTED}, no recompute (hardware FLOPs add "
                             "the recompute's re-run)")
# ... per token of a layout's step: its micro-batch's sequences share a long convolution's filters
LAYOUT_FLOPS_CONVENTION = (f"training, analytic forward + backward, {_COUNTED}, no recompute, at the layout's "
                           "micro-batch")


@dataclass(frozen=True)
class BenchConfig:
    device: str = "auto"
    dtype: DType = DType.bf16
    batch: int = 1
    seq: int = 512
    decode_tokens: int = 16
    layers: int | None = None
    warmup: int = 2
    iters: int = 5
    compile: bool = False
    attn_backend: str = "auto"


@dataclass(frozen=True)
class Extrapolation:
    """How a `--layers K` measurement becomes a full-depth figure."""

    built_layers: dict[str, int]
    full_layers: dict[str, int]
    block_seconds: dict[str, float]  # measured seconds of one block of each kind
    rest_seconds: float  # embedding, final norm, head: measured total minus the blocks

    def scale(self) -> float:
        return self.rest_seconds + sum(self.full_layers[k] * self.block_seconds[k] for k in self.full_layers)


@dataclass
class BenchResult:
    name: str  # the spec's
    device: str
    dtype: str
    config: BenchConfig
    peak: DevicePeak
    prefill: Timing
    prefill_seconds: float  # full-depth figure (extrapolated when --layers)
    prefill_flops: int  # analytic forward FLOPs of the full model, attention causal
    decode: Timing | None
    decode_seconds_per_token: float | None
    peak_memory_bytes: int
    peak_memory_method: str
    # one prefill's peak as `growth.prefill_peak_bytes` predicts it (weights, the largest layer's
    # working set, the logits), beside `peak_memory_bytes`, that prefill's measured peak
    analytic_memory_bytes: int
    predicted_prefill: Roofline
    predicted_decode: Roofline | None
    extrapolation: Extrapolation | None
    decode_model: DecodeModel | None = None
    backends: list[dict[str, object]] = field(default_factory=list)
    # what torch.compile warned while it compiled (e.g. inductor's "no code generation for complex
    # operators": S4's and Hyena's FFTs run eager), each once, printed as notes instead of raw
    # warnings; a compile served from inductor's on-disk cache may warn nothing
    compile_warnings: tuple[str, ...] = ()

    @property
    def tokens_per_s(self) -> float:
        return self.config.batch * self.config.seq / self.prefill_seconds

    @property
    def achieved_flops_per_s(self) -> float:
        return self.prefill_flops / self.prefill_seconds

    @property
    def mfu(self) -> float:
        return self.achieved_flops_per_s / self.peak.peak_flops

    def peak_note(self) -> str | None:
        """A line when the model ran faster than the peak it is measured against: a calibrated peak
        (CPU, unknown GPU) times one square matmul in the run's dtype, which some devices run on a
        slower path than the model's own GEMMs (fp16 on a CPU without fp16 arithmetic)."""
        if self.mfu <= 1:
            return None
        return (f"MFU {self.mfu:.0%}: the model's forward ran faster than the peak it is measured against "
                f"({self.peak.source}), so that peak understates this device; the MFU and the roofline's "
                "compute bound are not meaningful here (another --dtype may calibrate a truer one)")

    @property
    def decode_noise(self) -> str | None:
        """The timed decode steps' spread, judged as prefill's is (None without decode steps)."""
        if self.decode is None:
            return None
        return self.decode.noise_note("decode step", samples_flag="--decode-tokens")

    @property
    def decode_prediction_error(self) -> float | None:
        """(predicted − measured) / measured for one decode step."""
        if self.decode_seconds_per_token is None or self.predicted_decode is None:
            return None
        return (self.predicted_decode.seconds - self.decode_seconds_per_token) / self.decode_seconds_per_token

    @property
    def prediction_error(self) -> float:
        """(predicted − measured) / measured."""
        return (self.predicted_prefill.seconds - self.prefill_seconds) / self.prefill_seconds

    def to_json(self) -> dict[str, object]:
        decode = None
        if self.decode_seconds_per_token is not None:
            assert self.predicted_decode is not None
            assert self.decode_model is not None
            assert self.decode is not None  # the timed steps behind decode_seconds_per_token
            dm = self.decode_model
            batch = self.config.batch
            decode = {
                # a step is one new token for each of the batch's sequences
                "ms_per_step": 1e3 * self.decode_seconds_per_token,
                "ms_per_token": 1e3 * self.decode_seconds_per_token / batch,
                "tokens_per_s": batch / self.decode_seconds_per_token,
                "predicted_ms_per_step": 1e3 * self.predicted_decode.seconds,
                "predicted_ms_per_token": 1e3 * self.predicted_decode.seconds / batch,
                # as prefill's: the spread is the built layers' steps, whose median this is (under
                # --layers, ms_per_step is the full depth extrapolated step by step)
                "measured_ms_per_step": 1e3 * self.decode.median,
                "p10_s": self.decode.quantile(0.1),
                "p90_s": self.decode.quantile(0.9),
                "noise": self.decode_noise,
                "error": self.decode_prediction_error,
                "steps": self.config.decode_tokens,
                "context": dm.context,
                "flops": dm.flops,
                "flops_counted": dm.flops_counted,
                "flops_convention": "one step, batch × 1 new token at `context` keys (itself included), "
                                    "2 FLOPs/MAC, LM head counted, embedding lookups not, MLA absorbed where "
                                    "that costs fewer multiply-adds; counted = FlopCounterMode on meta, full model",
                "model": DECODE_MODEL,
                "rates": dm.rates.__dict__,
                "ops_per_layer": {kind: ops.__dict__ for kind, ops in dm.ops_by_kind.items()},
                "by_kind": [r.__dict__ for r in self.predicted_decode.rows],
            }
        cfg = self.config
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "batch": cfg.batch,
            "seq": cfg.seq,
            # how it ran: a compiled run or a forced backend is not an eager default one
            "run": {"layers": cfg.layers, "warmup": cfg.warmup, "iters": cfg.iters, "compile": cfg.compile,
                    "attn_backend": cfg.attn_backend, "decode_tokens": cfg.decode_tokens},
            "peak": {"flops_per_s": self.peak.peak_flops, "bandwidth_bytes_per_s": self.peak.bandwidth,
                     "source": self.peak.source},
            "prefill": {
                "median_s": self.prefill_seconds,
                "measured_median_s": self.prefill.median,
                "p10_s": self.prefill.quantile(0.1),
                "p90_s": self.prefill.quantile(0.9),
                "noise": self.prefill.noise_note("prefill"),
                "tokens_per_s": self.tokens_per_s,
                "flops": self.prefill_flops,
                "flops_convention": PREFILL_FLOPS_CONVENTION,
                "achieved_flops_per_s": self.achieved_flops_per_s,
                "mfu": self.mfu,
                "peak_note": self.peak_note(),
            },
            "decode": decode,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_method": self.peak_memory_method,
            "analytic_memory_bytes": self.analytic_memory_bytes,
            "predicted": {
                "prefill_s": self.predicted_prefill.seconds,
                "error": self.prediction_error,
                # CUDA: the roofline's sum and the host's issue of the pass's calls, the larger predicted
                "roofline_s": self.predicted_prefill.work_seconds,
                "host_issue_s": self.predicted_prefill.overhead_seconds if self.predicted_prefill.overlap else None,
                "flops_convention": PREFILL_FLOPS_CONVENTION,
                "by_kind": [r.__dict__ for r in self.predicted_prefill.rows],
            },
            "extrapolated": self.extrapolation is not None,
            "extrapolation": None if self.extrapolation is None else {
                "method": EXTRAPOLATION_METHOD,
                "built_layers": self.extrapolation.built_layers,
                "full_layers": self.extrapolation.full_layers,
                "block_seconds": self.extrapolation.block_seconds,
                "rest_seconds": self.extrapolation.rest_seconds,
            },
            "backends": self.backends,
            "compile_warnings": list(self.compile_warnings),
        }


EXTRAPOLATION_METHOD = (
    "built K layers of each layer kind (plus embedding and head); --iters extra timed passes with "
    "per-block hooks (on the eager modules, also under --compile) give each kind's share of a pass, "
    "the median share over those passes times the median is its block time, the rest is what the "
    "built blocks leave of the median; full depth = rest + Σ_kind (layers of that kind) × "
    "block time. Decode: the hooks time every timed step's blocks, each step is extrapolated the same "
    "way from its own split (unscaled), and the decode figure is the median of those"
)


DECODE_MODEL = (
    "Σ_kinds layers × (weight bytes / the kind's GEMV bandwidth + its other ops' replayed seconds) "
    "(CUDA: max of weight time and host time); calls recorded in one decode step of the built model; "
    "bandwidth from its weight matmuls re-issued on fresh weights, other ops re-issued as recorded, "
    "both sampled between the timed steps of this run"
)


@dataclass(frozen=True)
class DecodeModel:
    """What the decode prediction was made from, and the FLOP check beside it."""

    context: int  # keys the median timed step attends (itself included)
    rates: DecodeRates
    ops_by_kind: dict[str, OpCount]  # one layer of each kind, and "embed+head"
    flops: int  # analytic decode_flops(plan, context, batch), full model
    flops_counted: int  # FlopCounterMode on meta for the same step, full model


def kinds(plan: ModelPlan) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for layer in plan.layers:
        counts[layer_kind(layer)] += 1
    return dict(counts)


def materialises_scores(plan: ModelPlan, backend: str, device: torch.device, dtype: DType) -> bool:
    """Whether the model's attention core holds its T × S scores: under a forced math backend, and
    under `auto` where no fused kernel takes the model's calls, so SDPA falls back to math (on a
    CPU the flash kernel refuses MLA's unequal q and v head sizes and an explicit ALiBi or window
    mask: `available_backends`)."""
    if backend != "auto":
        return backend == "math"
    calls = attention_calls(plan)
    return bool(calls) and not set(available_backends(device, TORCH_DTYPES[dtype], attention_mask_kind(plan),
                                                      calls)) - {"math"}


def attention_core(plan: ModelPlan, backend: str, device: torch.device, dtype: DType) -> AttentionCore:
    """The attention core `growth.prefill_peak_bytes` prices for a run: its scores held or fused."""
    return "materialised" if materialises_scores(plan, backend, device, dtype) else "fused"


def estimate_bytes(plan: ModelPlan, cfg: BenchConfig, materialised: bool | None = None) -> int:
    """What a bench run holds: weights, the cache, logits and a few activations of width D; under
    SDPA's math kernel also one layer's T × T scores and their softmax per head, which it builds
    whole (the fused kernels work in tiles); an ALiBi bias or a sliding window's mask
    (`mask_bytes`). At least the build's fp32 weights (`build_model` initialises in fp32 and
    casts), which a 16-bit run needs before it runs. `materialised`: whether the core holds the
    scores (`materialises_scores`); by default where the backend is forced to math."""
    b = nbytes(cfg.dtype)
    tokens = cfg.batch * cfg.seq
    counted = count_params(plan)
    params = counted.total
    weights = built_weights_bytes(counted, b)
    cache = kv_cache(plan, cfg.seq + cache_steps(cfg.decode_tokens), cfg.batch, b).bytes
    logits = tokens * plan.vocab_size * b
    # one layer's transients of an inference forward, in D-wide tensors a token: the residual, the
    # norm's output, q, k and v (5), and a GLU's gate, up, activation and product at Llama's
    # d_ff = 8/3·D (4 · 8/3 ≈ 11)
    activations = 16 * tokens * plan.d_model * b
    if materialised is None:
        materialised = cfg.attn_backend == "math"
    scores = scores_bytes(plan, cfg.batch, cfg.seq, b) if materialised else 0
    masks = mask_bytes(plan, cfg.seq, b)
    return int(max(weights + cache + logits + activations + scores + masks, params * nbytes(DType.fp32)))


def check_fits(plan: ModelPlan, cfg: BenchConfig, device: torch.device, run: str = "bench") -> None:
    """Refuse a run of `plan`, built as `cfg` says (`--layers`), that `device` cannot hold, by
    `estimate_bytes`."""
    built = plan if cfg.layers is None else truncate(plan, cfg.layers)
    materialised = materialises_scores(built, cfg.attn_backend, device, cfg.dtype)
    scores = ", and the math kernel's attention scores" if materialised else ""
    refuse_unless_fits(built, lambda p, batch, seq: estimate_bytes(p, replace(cfg, batch=batch, seq=seq),
                                                                   materialised),
                       cfg.batch, cfg.seq, device=device.type, free=free_memory(device), run=run,
                       priced=f"the larger of the fp32 weights the build starts from and the analytic "
                              f"weights + cache + logits + attention masks{scores}")


def cache_steps(decode_tokens: int) -> int:
    """Positions the decode cache holds beyond the prompt: the untimed first step and the timed
    steps (`_decode`); none for a prefill-only run."""
    return decode_tokens + 1 if decode_tokens else 0


def decode_context(seq: int, decode_tokens: int) -> int:
    """Keys the median timed decode step attends, itself included: after a prompt of `seq` and one
    untimed step, the timed steps attend seq + 2 … seq + decode_tokens + 1. The step the decode
    model records and prices is this one."""
    return seq + 1 + (decode_tokens + 1) // 2


def check_positions(plan: ModelPlan, cfg: BenchConfig) -> None:
    """Refuse up front, not after the prefill was timed, a run needing more positions than the model
    has: the decode cache holds the prompt and `cache_steps` more."""
    limit = plan.position_limit()
    steps = cache_steps(cfg.decode_tokens)
    if limit is None or cfg.seq + steps <= limit.positions:
        return
    most = limit.positions
    fixes = [f"--seq {most - steps} or less"] if most - steps >= 1 else []
    if cfg.seq <= most:  # d ≥ 1 decode steps need seq + d + 1 positions, none (prefill only) seq
        most_steps = max(most - cfg.seq - 1, 0)
        fixes.append(f"--decode-tokens {most_steps} or fewer" if most_steps else "--decode-tokens 0 (prefill only)")
    if not fixes:  # neither alone suffices: the prompt is too long and the steps leave it no room
        fixes.append(f"--seq {most} or less with --decode-tokens 0 (prefill only)")
    need = (f"--seq {cfg.seq} and --decode-tokens {cfg.decode_tokens} need a cache of {cfg.seq + steps} positions "
            "(the prompt, one untimed step and the timed steps)" if steps else f"--seq {cfg.seq} needs {cfg.seq} positions")
    raise ArchplanError(f"{need}, beyond {limit.what} ({limit.field} {most}): use {', or '.join(fixes)}")


@contextlib.contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    with sdpa_kernel([backend]):
        yield


MaskKind = Literal["alibi", "window"] | None


def attention_mask_kind(plan: ModelPlan) -> MaskKind:
    """The explicit mask the model's prefill attention takes instead of SDPA's is_causal (which
    every kernel takes): ALiBi's additive (1, H, T, S) bias, or a sliding window's boolean (T, S)
    mask. Kernels differ in the masks they accept."""
    if plan.position == "alibi":
        return "alibi"
    if any(isinstance(layer.mixer, AttentionPlan | MLAPlan) and layer.mixer.window is not None for layer in plan.layers):
        return "window"
    return None


# How a model's attention calls SDPA: (q/k head size, v head size, grouped query heads)
AttentionCall = tuple[int, int, bool]


def attention_calls(plan: ModelPlan) -> set[AttentionCall]:
    """The distinct SDPA calls of the model's attention layers: GQA/MHA/MQA with equal head sizes
    over grouped K/V heads, MLA with q·k wider than v and one K per head (`modules.mla`)."""
    calls: set[AttentionCall] = set()
    for layer in plan.layers:
        match layer.mixer:
            case AttentionPlan(head_dim=d):
                calls.add((d, d, True))
            case MLAPlan(qk_head_dim=qk, v_head_dim=v):
                calls.add((qk, v, False))
    return calls


def available_backends(device: torch.device, dtype: torch.dtype, mask: MaskKind = None,
                       calls: set[AttentionCall] | None = None) -> list[str]:
    """SDPA backends that run a small causal attention on this device and dtype for every call the
    model makes (`attention_calls`; default a GQA call of 64-wide heads), called the way
    `modules.attention.sdpa` calls it (4 query heads over 2 K/V heads, or 4 over 4 for MLA), with
    the model's kind of mask (`attention_mask_kind`). Kernels differ in the head sizes they take:
    on a CPU the flash kernel refuses MLA's unequal q and v."""
    pos = torch.arange(64, device=device)
    allowed = attention_mask(pos, pos, None, None, dtype)
    explicit = {None: None, "window": allowed,
                "alibi": torch.zeros(1, 4, 64, 64, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))}[mask]
    found = []
    for name in BACKENDS:
        try:
            for qk, v, gqa in sorted(calls or {(64, 64, True)}):
                q = torch.randn(1, 4, 64, qk, device=device, dtype=dtype)
                k = torch.randn(1, 2 if gqa else 4, 64, qk, device=device, dtype=dtype)
                values = torch.randn(1, 2 if gqa else 4, 64, v, device=device, dtype=dtype)
                # a backend that refuses warns why before it raises: the probe's answer is the list
                with sdpa_backend(name), warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    sdpa(q, k, values, pos, pos, window=None, alibi=None, cached=False, gqa=gqa, mask=explicit)
            found.append(name)
        except RuntimeError:
            continue
    return found


def check_backend(plan: ModelPlan, backend: str, device: torch.device, dtype: DType) -> None:
    """A forced SDPA backend the model's calls can take on this device and dtype, else one line
    naming why (a model without attention has no call for it to choose)."""
    if backend == "auto":
        return
    calls = attention_calls(plan)
    if not calls:
        raise ArchplanError(f"--attn-backend {backend}: {plan.name} has no attention layer, so no SDPA call "
                            "for it to choose")
    mask = attention_mask_kind(plan)
    if backend not in (found := available_backends(device, TORCH_DTYPES[dtype], mask, calls)):
        unequal = any(qk != v for qk, v, _ in calls)
        needs = (f" and this model's {mask} mask" if mask else "") + (" and MLA's unequal q and v head sizes"
                                                                    if unequal else "")
        raise ArchplanError(f"--attn-backend {backend}: not available on {device.type} with {dtype.value}{needs} "
                            f"(available: {', '.join(found)})")


def _check_compile(device: torch.device) -> None:
    if not torch._dynamo.is_dynamo_supported():
        raise ArchplanError("--compile: torch.compile is not supported on this Python/platform")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ArchplanError("--compile: torch.compile needs Triton on CUDA, and it is not installed")


@contextlib.contextmanager
def _block_clock(model: torch.nn.Module, plan: ModelPlan, device: torch.device,
                 on: bool = True) -> Iterator[list[tuple[str, object, object]]]:
    """Hooks marking each block's start and end (kind, start, end) while the context is open;
    `on=False` installs none (the list stays empty)."""
    marks: list[tuple[str, object, object]] = []
    handles = []
    for layer, block in zip(plan.layers, model.layers) if on else ():  # type: ignore[attr-defined]

        def pre(_m: object, _a: object, kind: str = layer_kind(layer)) -> None:
            marks.append((kind, _now(device), None))

        def post(_m: object, _a: object, _o: object) -> None:
            kind, start, _ = marks[-1]
            marks[-1] = (kind, start, _now(device))

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield marks
    finally:
        for h in handles:
            h.remove()


def _per_kind(marks: list[tuple[str, object, object]]) -> dict[str, list[float]]:
    """Seconds spent in each block, by kind, from a `_block_clock`'s marks."""
    per_kind: dict[str, list[float]] = defaultdict(list)
    for kind, start, end in marks:
        per_kind[kind].append(_elapsed(start, end))
    return per_kind


def _now(device: torch.device) -> object:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(start: object, end: object) -> float:
    if isinstance(start, float):
        assert isinstance(end, float)
        return end - start
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3  # type: ignore[attr-defined]


def _extrapolate(full: ModelPlan, built: ModelPlan, passes: Sequence[tuple[dict[str, list[float]], float]],
                 median: float) -> Extrapolation:
    """Each kind's block time as its median share of an instrumented pass (seconds in each block by
    kind, and the pass's total) times `median`: a share, not the hooked seconds, leaves out the
    hooks' own overhead, and the median over passes one pass's noise (a loaded machine moved one
    pass's block times 16–460 ms). The rest is what the built blocks leave of `median`."""
    share = {k: statistics.median(statistics.mean(per_kind[k]) / total for per_kind, total in passes)
             for k in passes[0][0]}
    block = {k: median * f for k, f in share.items()}
    built_kinds = kinds(built)
    rest = max(0.0, median - sum(built_kinds[k] * block[k] for k in block))
    return Extrapolation(built_kinds, kinds(full), block, rest)


def run_bench(plan: ModelPlan, cfg: BenchConfig, console: Console | None = None) -> BenchResult:
    console = console or Console(stderr=True)
    device = resolve_device(cfg.device)
    if cfg.dtype not in TORCH_DTYPES:
        raise ArchplanError(f"--dtype {cfg.dtype.value}: bench runs fp32, bf16 or fp16")
    torch_dtype = TORCH_DTYPES[cfg.dtype]
    if cfg.compile:
        _check_compile(device)
    check_backend(plan, cfg.attn_backend, device, cfg.dtype)
    check_positions(plan, cfg)
    check_fits(plan, cfg, device)
    built = plan if cfg.layers is None else truncate(plan, cfg.layers)
    peak = device_peak(device, cfg.dtype)
    b = nbytes(cfg.dtype)

    torch.manual_seed(0)
    model = build_model(built, device=device.type, dtype=torch_dtype).eval()
    forward = torch.compile(model) if cfg.compile else model
    tokens = torch.randint(0, plan.vocab_size, (cfg.batch, cfg.seq), device=device)

    def prefill() -> object:
        with torch.inference_mode(), sdpa_backend(cfg.attn_backend):
            return forward(tokens)

    with progress_bar(console) as progress:
        # the first call compiles (a warm-up one: bench refuses --compile with --warmup 0): what it
        # warns becomes the result's notes (`compile_warnings`)
        with warnings.catch_warnings(record=True) if cfg.compile else contextlib.nullcontext() as compiled:
            time_calls(prefill, device, cfg.warmup, progress, "warm-up")
            timing = time_calls(prefill, device, cfg.iters, progress, f"prefill {cfg.batch}×{cfg.seq}")
        extrapolation = None
        if cfg.layers is not None and built.n_layers < plan.n_layers:
            # as many passes again with block hooks, on the eager model: each one's split
            splits: list[dict[str, list[float]]] = []
            with torch.inference_mode(), sdpa_backend(cfg.attn_backend), \
                    _block_clock(model, built, device) as marks:

                def split() -> None:
                    splits.append(_per_kind(marks))
                    marks.clear()

                hooked = time_calls(lambda: model(tokens), device, cfg.iters, progress, "block split", between=split)
            extrapolation = _extrapolate(plan, built, list(zip(splits, hooked.samples)), timing.median)
        # CUDA: the calls one eager prefill dispatches, for the host's floor under its roofline (the
        # decode calibration prices each); a compiled pass issues fused kernels, not these calls
        pass_ops = None
        if device.type == "cuda" and cfg.decode_tokens and not cfg.compile:
            with torch.inference_mode(), sdpa_backend(cfg.attn_backend):
                pass_ops = count_pass(model, built, lambda: model(tokens))
        decode, decode_s, calibrated = _decode(model, built, cfg, device, progress, extrapolation is not None, plan)
    # one more prefill, its peak measured as the --seq sweep measures it and beside what
    # `prefill_peak_bytes` predicts (the cache of a decode is freed by now)
    with keep_freed_memory(device):
        peak_bytes, method = forward_peak_bytes(model, prefill, device)
    recorded, rates = calibrated if calibrated is not None else (None, None)
    prefill_s = extrapolation.scale() if extrapolation else timing.median
    flops = forward_flops(plan, cfg.seq, cfg.batch).forward("causal")
    analytic_mem = prefill_peak_bytes(built, cfg.batch, cfg.seq, b,
                                      attention_core(built, cfg.attn_backend, device, cfg.dtype))
    decode_model = predicted_decode = None
    predicted_prefill = predict_prefill(plan, cfg.batch, cfg.seq, b, peak.peak_flops, peak.bandwidth)
    if recorded is not None and rates is not None:
        context = decode_context(cfg.seq, cfg.decode_tokens)
        ops_by_kind = recorded.ops()
        decode_model = DecodeModel(context, rates, ops_by_kind,
                                   decode_flops(plan, context, cfg.batch).counted,
                                   counted_decode_flops(plan, context, cfg.batch))
        predicted_decode = predict_decode_step(plan, cfg.batch, context, b, decode_model.rates, ops_by_kind)
        if pass_ops is not None:  # counted on CUDA only, where the host runs ahead (rates.overlap)
            predicted_prefill = with_host_floor(predicted_prefill, rates, ops_by_kind, pass_ops)
    return BenchResult(
        name=plan.name, device=peak.name, dtype=cfg.dtype.value, config=cfg, peak=peak, prefill=timing,
        prefill_seconds=prefill_s, prefill_flops=flops, decode=decode, decode_seconds_per_token=decode_s,
        peak_memory_bytes=peak_bytes, peak_memory_method=method, analytic_memory_bytes=analytic_mem,
        predicted_prefill=predicted_prefill,
        predicted_decode=predicted_decode, extrapolation=extrapolation, decode_model=decode_model,
        compile_warnings=tuple(dict.fromkeys(str(w.message) for w in compiled or ())),
    )


def start_decode(model: torch.nn.Module, built: ModelPlan, prompt: Tensor, decode_tokens: int, spare: int = 0
                 ) -> tuple[Callable[[], None], RecordedStep]:
    """Prefill `prompt` into a real cache, record the step at the median timed step's context
    (`decode_context`; `record_step_at` leaves the cache as the prompt left it), run the untimed
    first step from the prompt's own next token (not the recorded step's, which read a moved
    cache), and return the step that decodes on, with the recording. The cache holds `spare`
    positions past the timed steps (`benchmarks/decode_pieces.py` profiles two more)."""
    seq = prompt.shape[1]
    cache = model.new_cache(prompt.shape[0], seq + cache_steps(decode_tokens) + spare)  # type: ignore[operator]
    state = {"token": model(prompt, cache=cache)[:, -1:].argmax(-1)}

    def step() -> None:
        state["token"] = model(state["token"], cache=cache)[:, -1:].argmax(-1)

    first = state["token"]
    recorded = record_step_at(model, built, cache, step, decode_context(seq, decode_tokens))
    state["token"] = first
    step()
    return step, recorded


def _decode(model: torch.nn.Module, built: ModelPlan, cfg: BenchConfig, device: torch.device,
            progress: Progress, extrapolate: bool, full: ModelPlan
            ) -> tuple[Timing | None, float | None, tuple[RecordedStep, DecodeRates] | None]:
    """`start_decode` (the recording and one untimed step), then time `decode_tokens` single-token
    steps with the calibration's samples between them (the same load on a shared machine); when
    extrapolating to full depth, block hooks time each timed step's blocks."""
    if cfg.decode_tokens == 0:
        return None, None, None
    with torch.inference_mode(), sdpa_backend(cfg.attn_backend):
        prompt = torch.randint(0, built.vocab_size, (cfg.batch, cfg.seq), device=device)
        step, recorded = start_decode(model, built, prompt, cfg.decode_tokens)
        replay, streams = Replay(recorded, device), WeightStreams(recorded, device)

        steps: list[dict[str, list[float]]] = []  # each timed step's blocks, when extrapolating
        with _block_clock(model, built, device, on=extrapolate) as marks:

            def calibrate() -> None:
                steps.append(_per_kind(marks))
                marks.clear()
                replay.sample()
                streams.sample()

            timing = time_calls(step, device, cfg.decode_tokens, progress, f"decode {cfg.decode_tokens} tokens",
                                between=calibrate)
        calibrated = recorded, decode_rates(recorded, replay, streams)
    if not extrapolate:
        return timing, timing.median, calibrated
    # each timed step extrapolated from its own split between the blocks and the rest, then the
    # median: one step's split, multiplied by full/built layers, carries that step's noise
    full_depth = [_extrapolate(full, built, [(per_kind, t)], t).scale() for per_kind, t in zip(steps, timing.samples)]
    return timing, statistics.median(full_depth), calibrated


def counted_decode_flops(plan: ModelPlan, context: int, batch: int) -> int:
    """FlopCounterMode on meta for one decode step: `batch` new tokens, each attending `context`
    keys (itself included), after a prefill of context − 1 tokens into the real cache path. What
    `analytic.decode_flops(plan, context, batch)` predicts exactly (tests/test_decode.py)."""
    # no parameter requires grad: torch's ModuleTracker (inside FlopCounterMode) hooks autograd on
    # module inputs that do, and fails on a parameter slice fed as an input (Hyena's positions)
    model = build_model(plan).requires_grad_(False)
    cache = model.new_cache(batch, context)
    with torch.no_grad():
        if context > 1:
            model(torch.zeros(batch, context - 1, dtype=torch.long, device="meta"), cache=cache)
        # with the formulas verify adds (an FFT, a grouped matmul), which torch's own counter prices at 0
        with FlopCounterMode(display=False, custom_mapping=counter_mapping()) as counter:
            model(torch.zeros(batch, 1, dtype=torch.long, device="meta"), cache=cache)
    return counter.get_total_flops()
