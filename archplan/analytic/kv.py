"""Inference cache: attention KV (docs/formulas.md §3; DeepSeek-V2 §2.1.4 Table 1) and SSM states (§6.2).

Per attention layer and token: K and V, 2·Hkv·Dh elements (MHA/GQA/MQA); MLA's absorbed cache holds
the latent and the shared RoPE key, kv_lora_rank + qk_rope_head_dim (DeepSeek-V3 `inference/model.py`
kv_cache + pe_cache). A sliding-window layer keeps at most W positions (Mistral 7B §2, rolling
buffer). A Mamba layer keeps a constant state per sequence: conv + SSM state (mamba_ssm
`allocate_inference_cache`); S4/S4D a complex state of N/2 modes per channel in fp32 (4·H·N bytes);
StripedHyena its FIR tail 3D·(k−1) plus the modal state D·S complex64; plain Hyena has no constant
state: exact decoding keeps the inputs of its order−1 long convolutions, (order−1)·D values per
token, a cache that grows like the KV cache (+ its short conv tail), and its (order−1)·D filter
taps per position computed once for the batch in fp32 (the filters depend on no input). These are the shapes `model.new_cache(batch, max_len)` allocates
(docs/architecture.md "Cache contract"), all in one dtype of `dtype_bytes` per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing_extensions import assert_never

from archplan.analytic.hyena import (
    hyena_cache_per_token,
    hyena_filter_cache_per_token,
    hyena_state_elements,
    striped_state_elements,
)
from archplan.analytic.mamba import mamba1_state_elements, mamba2_state_elements
from archplan.analytic.s4 import s4_state_fp32_elements
from archplan.errors import ArchplanError
from archplan.resolve import (
    AttentionPlan,
    HyenaPlan,
    Mamba1Plan,
    Mamba2Plan,
    MixerPlan,
    MLAPlan,
    ModelPlan,
    S4Plan,
    StripedHyenaPlan,
)

# S4 and StripedHyena keep their complex state in complex64 whatever the model dtype
# (state-spaces/s4 `default_state`; stripedhyena engine `prefill_via_modal_fft`, state_dtype).
FP32_BYTES = 4
# A quantized KV cache (fp8, int8, int4) quantizes what grows per token (attention's keys and
# values, Hyena's cached inputs): engines keep constant recurrent states (Mamba's conv and SSM
# state, the short-conv and FIR tails) in the model's dtype, which their own option sets (vLLM:
# `mamba_cache_dtype` / `mamba_ssm_cache_dtype`, "auto" = the model's dtype, apart from
# `kv_cache_dtype`). So a state takes the cache dtype, but never under 16 bits.
STATE_MIN_BYTES = 2


@dataclass(frozen=True)
class KVCache:
    dtype_bytes: float
    bytes_per_token: int  # per sequence, all attention layers, window NOT applied
    bytes: int  # batch x context, sliding windows capped, + SSM states
    ssm_state_bytes: int  # batch x constant per-sequence SSM state (conv + ssm, S4, FIR + modal), 0 if none
    by_component: dict[str, int]  # layers.i.mixer -> bytes for (batch, context)
    naive_mla_bytes_per_token: int | None  # MLA without absorption: full K (n_h·(nope+rope)) and V (n_h·v)
    # Hyena layers' long-convolution inputs, (order−1)·D per token: part of bytes_per_token, shown apart
    conv_bytes_per_token: int = 0
    # Hyena layers' filters over the context, fp32, held once for the batch: part of `bytes`
    filter_cache_bytes: int = 0
    # what those filters add per position: one more token grows the cache by this beside
    # batch × bytes_per_token (hyena-153m: 60.8 KiB against 30.4 KiB of inputs per sequence)
    filter_bytes_per_position: int = 0


@dataclass(frozen=True)
class _LayerCache:
    per_token: int  # elements per cached position
    window: int | None  # cap on cached positions, None = the whole context
    state: int  # constant elements per sequence
    state_fp32: int = 0  # constant elements per sequence held in fp32 whatever the dtype
    shared_fp32_per_token: int = 0  # elements per cached position held once for the batch, fp32


def _layer_cache(mixer: MixerPlan, d_model: int) -> _LayerCache:
    match mixer:
        case AttentionPlan():
            return _LayerCache(2 * mixer.n_kv_heads * mixer.head_dim, mixer.window, 0)
        case MLAPlan():
            return _LayerCache(mixer.kv_lora_rank + mixer.qk_rope_head_dim, mixer.window, 0)
        case Mamba1Plan():
            return _LayerCache(0, None, mamba1_state_elements(mixer))
        case Mamba2Plan():
            return _LayerCache(0, None, mamba2_state_elements(mixer))
        case S4Plan():
            return _LayerCache(0, None, 0, s4_state_fp32_elements(mixer, d_model))
        case HyenaPlan():
            return _LayerCache(
                hyena_cache_per_token(mixer, d_model), None, hyena_state_elements(mixer, d_model),
                shared_fp32_per_token=hyena_filter_cache_per_token(mixer, d_model),
            )
        case StripedHyenaPlan():
            return _LayerCache(0, None, *striped_state_elements(mixer, d_model))
        case _:
            assert_never(mixer)


def _bytes(elements: int, dtype_bytes: float) -> int:
    """Whole bytes; sub-byte dtypes (int4) pack two elements per byte, an odd one still takes a byte."""
    return math.ceil(elements * dtype_bytes)


def kv_cache(plan: ModelPlan, context: int, batch: int = 1, dtype_bytes: float = 2) -> KVCache:
    for what, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArchplanError(f"{what} must be a positive integer (got {value!r})")
    if not dtype_bytes > 0:
        raise ArchplanError(f"dtype_bytes must be positive (got {dtype_bytes!r})")

    state_bytes = max(dtype_bytes, STATE_MIN_BYTES)
    by_component: dict[str, int] = {}
    per_token = state_elements = state_fp32 = conv_per_token = shared = shared_per_position = 0
    naive_mla: int | None = None
    for layer in plan.layers:
        cache = _layer_cache(layer.mixer, plan.d_model)
        positions = context if cache.window is None else min(context, cache.window)
        by_component[f"{layer.path}.mixer"] = (
            _bytes(batch * positions * cache.per_token, dtype_bytes) + _bytes(batch * cache.state, state_bytes)
            + (batch * cache.state_fp32 + positions * cache.shared_fp32_per_token) * FP32_BYTES)
        shared += positions * cache.shared_fp32_per_token * FP32_BYTES
        shared_per_position += cache.shared_fp32_per_token * FP32_BYTES
        per_token += cache.per_token
        state_elements += cache.state
        state_fp32 += cache.state_fp32
        if isinstance(layer.mixer, HyenaPlan):
            conv_per_token += cache.per_token
        if isinstance(layer.mixer, MLAPlan):
            m = layer.mixer
            naive_mla = (naive_mla or 0) + m.n_heads * (m.qk_head_dim + m.v_head_dim)
    return KVCache(
        dtype_bytes=dtype_bytes,
        bytes_per_token=_bytes(per_token, dtype_bytes),
        bytes=sum(by_component.values()),
        ssm_state_bytes=_bytes(batch * state_elements, state_bytes) + batch * state_fp32 * FP32_BYTES,
        by_component=by_component,
        naive_mla_bytes_per_token=_bytes(naive_mla, dtype_bytes) if naive_mla is not None else None,
        conv_bytes_per_token=_bytes(conv_per_token, dtype_bytes),
        filter_cache_bytes=shared,
        filter_bytes_per_position=shared_per_position,
    )
