"""MHA / GQA / MQA (one module: the sizes say which) through `F.scaled_dot_product_attention`.

Masks: causal, sliding window (key j visible from query i iff i − W < j ≤ i, HF Mistral), ALiBi
biases. Without a cache and without window/ALiBi the call is `is_causal=True` so GPU kernels
(flash / memory-efficient) apply; otherwise an explicit mask from absolute positions. A model's
layers share one ALiBi bias, or one additive mask per sliding window (`BiasCache`). On meta,
SDPA is counted as the full T² square over the query heads (docs/architecture.md, FLOPs).

The KV cache (`cache.KVState`) is written in place; sliding layers use a rolling buffer of the
window's length (Mistral 7B §2, "rolling buffer cache").

Context parallelism (`SequenceShard`, set by `archplan.distributed.context`): the module holds
some of the sequence's tokens, rotates them at their global positions, gathers every rank's K and
V (Llama 3 §3.3.2) and masks by positions.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from typing_extensions import assert_never

from archplan.errors import ArchplanError
from archplan.modules.cache import KVState
from archplan.modules.norms import HeadwiseNorm, build_norm
from archplan.modules.positions import Alibi, RotaryEmbedding, apply_rotary
from archplan.resolve import AttentionPlan, QKNormPlan
from archplan.spec import Rope


def cache_step(
    buffers: list[Tensor], news: list[Tensor], dim: int, seen: int, window: int | None
) -> tuple[list[Tensor], Tensor]:
    """Append T new entries (along `dim`) to cache buffers; return what to attend and its positions.

    Plain cache: slot = position; the keys are the buffer's first seen + T slots.
    Rolling buffer (window W): slot = position % L; the keys are the old positions the first new
    query can still see, (seen − W, seen), gathered *before* writing (with T > L the new tokens
    overwrite keys that earlier queries of this same call still see), followed by the new entries.
    A single decode step thus attends exactly min(seen + 1, W) keys, the count the analytic decode
    FLOPs use. Only Python ints and arange arithmetic decide the positions, so this stays static
    and runs on meta.
    """
    capacity = buffers[0].shape[dim]
    n_new = news[0].shape[dim]
    device = buffers[0].device
    if window is None:
        if seen + n_new > capacity:
            raise ArchplanError(f"KV cache holds {capacity} tokens; {seen} cached + {n_new} new exceed it")
        for buf, new in zip(buffers, news):
            buf.narrow(dim, seen, n_new).copy_(new)
        return [buf.narrow(dim, 0, seen + n_new) for buf in buffers], torch.arange(seen + n_new, device=device)
    n_old = min(seen, capacity, window - 1)
    old_pos = torch.arange(seen - n_old, seen, device=device)
    keys = [torch.cat([buf.index_select(dim, old_pos % capacity), new], dim=dim) for buf, new in zip(buffers, news)]
    positions = torch.cat([old_pos, torch.arange(seen, seen + n_new, device=device)])
    n_keep = min(n_new, capacity)
    slots = torch.arange(seen + n_new - n_keep, seen + n_new, device=device) % capacity
    for buf, new in zip(buffers, news):
        buf.index_copy_(dim, slots, new.narrow(dim, n_new - n_keep, n_keep))
    return keys, positions


def attention_mask(
    qpos_T: Tensor, kpos_S: Tensor, window: int | None, alibi: Alibi | None, dtype: torch.dtype
) -> Tensor:
    """Boolean (T, S) mask (True = attend), or with ALiBi a float (1, H, T, S) additive bias: 4-D,
    since the CPU's flash kernel takes a 2-D or 4-D mask only (sdp_utils_cpp.h); given a 3-D bias
    SDPA falls back to the math kernel, which keeps the T×S probabilities of every head."""
    delta_TS = qpos_T[:, None] - kpos_S[None, :]
    allowed_TS = delta_TS >= 0
    if window is not None:
        allowed_TS = allowed_TS & (delta_TS < window)
    if alibi is None:
        return allowed_TS
    bias_HTS = alibi(qpos_T, kpos_S).masked_fill(~allowed_TS[None], float("-inf"))
    return bias_HTS.to(dtype)[None]


def additive_mask(qpos_T: Tensor, kpos_S: Tensor, window: int | None, alibi: Alibi | None,
                  dtype: torch.dtype) -> Tensor:
    """`attention_mask` as an additive mask in `dtype` (0 or −inf; ALiBi's bias as it is): the
    form a mask shared by many calls takes, since SDPA converts a boolean mask to this on every
    call and keeps the copy (`convert_boolean_attn_mask`)."""
    allowed = attention_mask(qpos_T, kpos_S, window, alibi, dtype)
    if allowed.dtype != torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class BiasCache:
    """The ALiBi biases, or the sliding windows' masks, of a model's (or pipeline stage's)
    attention layers, built once and shared by the layers, the micro-batches and the re-runs of
    recompute, as the context-parallel mask is (`SequenceShard.mask`): SDPA keeps the mask it is
    given for the backward, so a bias built per layer kept H·T·S elements a layer, and one built
    in a re-run added its fp32 working set to the backward's peak. Hugging Face's BLOOM builds its
    ALiBi once per forward, and its Mistral one sliding-window mask. A window's mask is additive
    (`additive_mask`): a boolean one, converted by SDPA on every call, kept a copy, T·S elements a
    layer. Only a fresh sequence's masks (no cache: positions 0 … T − 1 in every layer) are kept,
    and only the last length's."""

    def __init__(self) -> None:
        self.shape: tuple[object, ...] | None = None  # (T, S, dtype, device) of the biases built
        self.built: dict[tuple[object, ...], Tensor] = {}  # by slopes and window

    def mask(self, qpos_T: Tensor, kpos_S: Tensor, window: int | None, alibi: Alibi | None,
             dtype: torch.dtype) -> Tensor:
        shape = (qpos_T.shape[0], kpos_S.shape[0], dtype, qpos_T.device)
        if shape != self.shape:  # a new length, dtype or device: the old biases are not used again
            self.shape, self.built = shape, {}
        key = (alibi.signature() if alibi is not None else None, window)
        if key not in self.built:
            self.built[key] = additive_mask(qpos_T, kpos_S, window, alibi, dtype)
        return self.built[key]


_CACHED_KERNELS = (
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
)


def _kernels(q: Tensor, cached: bool) -> AbstractContextManager[object]:
    """Keep cached (decode) calls off cuDNN's SDPA when another kernel is allowed: cuDNN builds an
    execution plan per (query, key) shape, and the key length grows by one every decode step, so
    each step rebuilt the plan — 1.3 ms of host time per call, 24 ms per layer-step, measured on an
    H200 with torch 2.11 (docs/benchmarks.md). A backend the caller pinned is left as it is."""
    if not cached or q.device.type != "cuda" or not torch.backends.cuda.cudnn_sdp_enabled():
        return nullcontext()
    allowed = [backend for backend, enabled in _CACHED_KERNELS if enabled()]
    return sdpa_kernel(allowed) if allowed else nullcontext()


def attention_core(recompute: bool, q_BHTD: Tensor, k_BHSD: Tensor, v_BHSDv: Tensor, qpos_T: Tensor,
                   kpos_S: Tensor, *, cached: bool, **options: Any) -> Tensor:
    """`sdpa`, re-run in the backward under selective recompute (Korthikanti et al. 2022 §5: the
    attention core alone). A non-reentrant checkpoint of this one call keeps its inputs, which the
    fused kernel saves anyway, and drops what the kernel would keep beyond them (its output and
    log-sum-exp; the s×s probabilities of a non-fused path); the projections, norms and rotary
    around it keep what plain autograd keeps, and nothing but the core is run twice."""
    if recompute and torch.is_grad_enabled() and not cached:
        out = checkpoint(partial(sdpa, cached=cached, **options), q_BHTD, k_BHSD, v_BHSDv, qpos_T, kpos_S,
                         use_reentrant=False, preserve_rng_state=False)
        assert isinstance(out, Tensor)
        return out
    return sdpa(q_BHTD, k_BHSD, v_BHSDv, qpos_T, kpos_S, cached=cached, **options)


def repeats_kv(q_BHTD: Tensor) -> bool:
    """Whether `sdpa` repeats K and V to every query head before SDPA, which then keeps the copies
    for the backward (`analytic.memory` prices them under archplan's units on CUDA). CUDA's fused
    kernels (flash, memory-efficient) refuse `enable_gqa` on dense inputs (torch 2.11 sdp_utils:
    "both fused kernels require query, key and value to have the same num_heads"), so SDPA would
    silently fall back to the math kernel and its T×S scores; repeating K/V per query group (as
    Hugging Face's `repeat_kv` does) keeps them eligible. The FLOPs are the same, and meta/CPU
    (where FLOPs are counted) keep `enable_gqa`."""
    return q_BHTD.device.type == "cuda"


def sdpa(
    q_BHTD: Tensor,
    k_BHSD: Tensor,
    v_BHSDv: Tensor,
    qpos_T: Tensor,
    kpos_S: Tensor,
    *,
    window: int | None,
    alibi: Alibi | None,
    cached: bool,
    gqa: bool,
    scale: float | None = None,
    mask: Tensor | None = None,
    biases: BiasCache | None = None,
) -> Tensor:
    """Causal attention over (cached +) new keys; GQA/MQA through `enable_gqa` (no K/V repeat).

    `gqa` comes from the plan's integers, not from tensor shapes, so a JIT trace (fvcore) sees a
    Python bool. `mask`: one already built (context parallelism: the keys are not in sequence
    order, and the layers share one mask, `SequenceShard.mask`); `biases`: the layers' shared
    ALiBi biases and window masks (`BiasCache`).
    """
    if gqa and repeats_kv(q_BHTD):
        group = q_BHTD.shape[1] // k_BHSD.shape[1]
        k_BHSD = k_BHSD.repeat_interleave(group, dim=1)
        v_BHSDv = v_BHSDv.repeat_interleave(group, dim=1)
        gqa = False
    with _kernels(q_BHTD, cached):
        if window is None and alibi is None and mask is None:
            if not cached:
                return F.scaled_dot_product_attention(
                    q_BHTD, k_BHSD, v_BHSDv, is_causal=True, scale=scale, enable_gqa=gqa
                )
            if q_BHTD.shape[2] == 1:
                # one new token sees every cached key: no mask, so GPU decode keeps the fused kernels
                return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSDv, scale=scale, enable_gqa=gqa)
        if mask is None and biases is not None and not cached and not torch.is_inference_mode_enabled():
            # an inference tensor could not be saved by a later training step's SDPA
            mask = biases.mask(qpos_T, kpos_S, window, alibi, q_BHTD.dtype)
        if mask is None:
            mask = attention_mask(qpos_T, kpos_S, window, alibi, q_BHTD.dtype)
        return F.scaled_dot_product_attention(
            q_BHTD, k_BHSD, v_BHSDv, attn_mask=mask, scale=scale, enable_gqa=gqa
        )


def _qk_norms(
    qk: QKNormPlan, n_heads: int, n_kv: int, head_dim: int
) -> tuple[nn.Module, nn.Module]:
    """Qwen3/Gemma-3 `head` (shared over heads), StableLM-2 `per_head`, OLMo-2 `full` (over H·Dh)."""
    match qk.scope:
        case "head":
            return build_norm(qk.norm, head_dim), build_norm(qk.norm, head_dim)
        case "per_head":
            return HeadwiseNorm(n_heads, head_dim, qk.norm), HeadwiseNorm(n_kv, head_dim, qk.norm)
        case "full":
            return build_norm(qk.norm, n_heads * head_dim), build_norm(qk.norm, n_kv * head_dim)
        case _:
            assert_never(qk.scope)


class SequenceShard(Protocol):
    """A context-parallel rank's part of the sequence (`archplan.distributed.context`)."""

    def positions(self, t: int, device: torch.device) -> Tensor:
        """Global positions of the rank's `t` tokens."""
        ...

    def key_positions(self, t: int, device: torch.device) -> Tensor:
        """Global positions of the gathered keys, in the order `gather` returns them."""
        ...

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """Every rank's `x` concatenated along `dim` (differentiable)."""
        ...

    def mask(self, t: int, window: int | None, alibi: Alibi | None, dtype: torch.dtype,
             device: torch.device) -> Tensor:
        """The additive (T, S) mask (H, T, S with ALiBi) of the rank's queries against the gathered
        keys, built once and shared by every layer and micro-batch."""
        ...


class Attention(nn.Module):
    """Params: D·H·Dh + 2·D·Hkv·Dh + H·Dh·D (+ H·Dh + 2·Hkv·Dh qkv bias, + D out bias, + qk-norms)."""

    def __init__(self, plan: AttentionPlan, d_model: int, rope: Rope | None, alibi: bool,
                 alibi_scale: float = 1.0) -> None:
        super().__init__()
        self.plan = plan
        h, hkv, dh = plan.n_heads, plan.n_kv_heads, plan.head_dim
        self.q_proj = nn.Linear(d_model, h * dh, bias=plan.qkv_bias)
        self.k_proj = nn.Linear(d_model, hkv * dh, bias=plan.qkv_bias)
        self.v_proj = nn.Linear(d_model, hkv * dh, bias=plan.qkv_bias)
        self.o_proj = nn.Linear(h * dh, d_model, bias=plan.out_bias)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if plan.qk_norm is not None:
            self.q_norm, self.k_norm = _qk_norms(plan.qk_norm, h, hkv, dh)
        self.rotary = RotaryEmbedding(plan.rotary_dim, rope) if rope is not None and plan.rotary_dim else None
        self.alibi = Alibi(h, alibi_scale) if alibi else None
        self.context: SequenceShard | None = None
        self.recompute_core = False  # selective recompute (`attention_core`)
        self.biases: BiasCache | None = None  # the model's, shared by its layers (`model.share_biases`)

    def new_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> KVState:
        p = self.plan
        length = min(p.window, max_len) if p.window is not None else max_len
        shape = (batch, p.n_kv_heads, length, p.head_dim)
        return KVState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x_BTD: Tensor, state: KVState | None = None) -> Tensor:
        p = self.plan
        b, t, _ = x_BTD.shape
        q_BTX, k_BTX, v_BTX = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        scope = p.qk_norm.scope if p.qk_norm is not None else None
        if scope == "full" and self.q_norm is not None and self.k_norm is not None:
            q_BTX, k_BTX = self.q_norm(q_BTX), self.k_norm(k_BTX)
        q_BTHD = q_BTX.view(b, t, p.n_heads, p.head_dim)
        k_BTHD = k_BTX.view(b, t, p.n_kv_heads, p.head_dim)
        if scope == "head" and self.q_norm is not None and self.k_norm is not None:
            # token-major, as Hugging Face's Qwen3Attention norms them: the normed q stays
            # token-major through the transpose, and so does SDPA's output, which o_proj then reads
            # as a view; normed head-major, the output is head-major and o_proj's input a second copy
            q_BTHD, k_BTHD = self.q_norm(q_BTHD), self.k_norm(k_BTHD)
        q, k = q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2)
        v = v_BTX.view(b, t, p.n_kv_heads, p.head_dim).transpose(1, 2)
        if scope == "per_head" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.context is not None and state is None:
            return self.o_proj(self._context_parallel(q, k, v, self.context).transpose(1, 2).reshape(
                b, t, p.n_heads * p.head_dim))
        offset = state.seen if state is not None else 0
        if self.rotary is not None:
            cos, sin = self.rotary.cast(offset, t, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        qpos_T = torch.arange(offset, offset + t, device=x_BTD.device)
        if state is None:
            kpos_S = qpos_T
        else:
            (k, v), kpos_S = cache_step([state.k_BHLD, state.v_BHLD], [k, v], 2, state.seen, p.window)
            state.advance(t)
        out_BHTDh = attention_core(
            self.recompute_core, q, k, v, qpos_T, kpos_S,
            window=p.window, alibi=self.alibi, cached=state is not None, gqa=p.n_kv_heads != p.n_heads,
            scale=p.scale, biases=self.biases,
        )
        return self.o_proj(out_BHTDh.transpose(1, 2).reshape(b, t, p.n_heads * p.head_dim))


    def _context_parallel(self, q: Tensor, k: Tensor, v: Tensor, shard: SequenceShard) -> Tensor:
        """Rotate at the rank's global positions, gather K and V of the whole sequence in one
        call (its backward reduce-scatters their gradients) and attend under the causal mask of
        the positions (the rank's chunks are not contiguous)."""
        p = self.plan
        t = q.shape[2]
        qpos_T = shard.positions(t, q.device)
        if self.rotary is not None:
            cos, sin = self.rotary.cast_at(qpos_T, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = shard.gather(torch.stack([k, v]), 3).unbind(0)
        return attention_core(self.recompute_core, q, k, v, qpos_T, shard.key_positions(t, q.device),
                              window=p.window, alibi=self.alibi, cached=False, gqa=p.n_kv_heads != p.n_heads,
                              scale=p.scale, mask=shard.mask(t, p.window, self.alibi, q.dtype, q.device))
