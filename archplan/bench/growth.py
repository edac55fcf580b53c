"""How prefill cost grows with sequence length: the log-log exponent fit, and the analytic peak
memory of one inference prefill that `bench --seq a,b,c` puts beside the measurement.

Pure Python (no torch): the predictions come from the same analytic counts as `size`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

from archplan.analytic import activation_memory, built_weights_bytes, count_params
from archplan.analytic.memory import ACT_BYTES
from archplan.errors import ArchplanError
from archplan.resolve import AttentionPlan, MLAPlan, ModelPlan, layer_index
from archplan.units import NonPositiveLength, parse_length

# "fused": the attention core never holds the T×S scores (FlashAttention, Dao et al. 2022; torch's
# CPU flash kernel and the CUDA flash / memory-efficient / cuDNN backends). "materialised": SDPA's
# math backend, which holds the scores and their softmax (two B·H·T·S tensors) at once.
AttentionCore = Literal["fused", "materialised"]

def parse_lengths(text: str, option: str = "--seq") -> list[int]:
    """'1k,2k,4k' -> [1024, 2048, 4096] (`units.parse_length`, each)."""
    lengths = []
    for part in text.split(","):
        try:
            length = parse_length(part)
        except NonPositiveLength as exc:  # named as every other --seq names it
            raise ArchplanError(str(exc), field=option) from None
        except ValueError:
            raise ArchplanError(f"expected lengths such as 512 or 1k,2k,4k (k = 1024), got {text!r}",
                                field=option) from None
        lengths.append(length)
    if len(set(lengths)) != len(lengths):
        raise ArchplanError(f"a length appears twice in {text!r}", field=option)
    return sorted(lengths)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope k of the least-squares line log y = k·log x + c: y grows as x^k over the range."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("an exponent needs at least two (x, y) points")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("an exponent fit needs positive values")
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError("an exponent needs at least two distinct x values")
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx


# SDPA's math kernel works in fp32 on 16-bit inputs (`_scaled_dot_product_attention_math` upcasts
# them; its scores and the additive causal mask it builds are fp32)
MATH_BYTES = 4


def scores_bytes(plan: ModelPlan, batch: int, seq: int, dtype_bytes: float) -> int:
    """The largest layer's scores and their softmax when the core is materialised (2·B·H·T·T), in
    the math kernel's fp32 or the run's wider dtype."""
    heads = [layer.mixer.n_heads for layer in plan.layers if isinstance(layer.mixer, AttentionPlan | MLAPlan)]
    return int(2 * max(heads, default=0) * batch * seq * seq * max(dtype_bytes, MATH_BYTES))


def _masks(plan: ModelPlan) -> tuple[int, bool]:
    """(ALiBi heads, 0 without ALiBi; whether a layer has a sliding window): the explicit masks a
    prompt's attention builds (`modules.attention.attention_mask`)."""
    attention = [layer.mixer for layer in plan.layers if isinstance(layer.mixer, (AttentionPlan, MLAPlan))]
    alibi_heads = max((mixer.n_heads for mixer in attention), default=0) if plan.position == "alibi" else 0
    return alibi_heads, any(mixer.window is not None for mixer in attention)


def mask_bytes(plan: ModelPlan, seq: int, dtype_bytes: int) -> int:
    """The most a prompt's attention mask takes while built and held (`modules.attention`): the
    int64 position differences and boolean masks, T·S elements each; with ALiBi, inside
    `Alibi.forward`, its int64 and float distances too (freed when it returns), then the fp32
    (H, T, S) bias and its masked copy, alive together, then the copy in the run's dtype (a window
    folded into it); a sliding window's additive mask, T·S in the run's dtype (a spec has one
    window). Plain causal attention builds none (SDPA's `is_causal`)."""
    alibi_heads, windowed = _masks(plan)
    area = seq * seq
    if alibi_heads:
        # inside `Alibi.forward` the int64 and float distances beside the position masks; once it
        # returns they are freed, and the fp32 bias and its masked copy live beside the masks
        return max(area * (8 + 1 + 8 + 4), area * (8 + 1 + 1) + alibi_heads * area * max(8, 4 + dtype_bytes))
    return area * (8 + 1 + 1 + dtype_bytes) if windowed else 0


def held_mask_bytes(plan: ModelPlan, seq: int, dtype_bytes: int) -> int:
    """What of `mask_bytes` the layers see, once built: the ALiBi bias (1, H, T, S) or the window's
    additive (T, S) mask, in the run's dtype (`modules.attention.additive_mask`)."""
    alibi_heads, windowed = _masks(plan)
    if alibi_heads:
        return alibi_heads * seq * seq * dtype_bytes
    return seq * seq * dtype_bytes if windowed else 0


def prefill_peak_bytes(plan: ModelPlan, batch: int, seq: int, dtype_bytes: float,
                       core: AttentionCore = "fused") -> int:
    """Peak bytes of one inference prefill (no cache), as predicted from the analytic counts.

    weights + the largest layer's working set + the logits. Inference frees a layer's tensors when
    the next layer starts, so one layer's worth is live: we take the tensors training would keep for
    that layer without the attention scores (Korthikanti et al. 2022 §4.1 generalised, as
    `activation_memory(..., "selective")`, at the run's dtype), plus the residual stream, plus the
    scores when the core is materialised. The logits are (B, T, V) in the run's dtype. An ALiBi
    bias or a sliding window's mask is built once for the whole forward (`mask_bytes` while it is
    built) and held beside either (`held_mask_bytes`).
    """
    tokens = batch * seq
    weights = built_weights_bytes(count_params(plan), dtype_bytes)
    saved = activation_memory(plan, batch, seq, "selective").by_component
    per_layer: dict[int, int] = defaultdict(int)
    for path, value in saved.items():
        if (index := layer_index(path)) is not None:
            per_layer[index] += value
    layer = max(per_layer.values(), default=0) * dtype_bytes / ACT_BYTES
    residual = tokens * plan.d_model * dtype_bytes
    held = held_mask_bytes(plan, seq, int(dtype_bytes))
    scores = scores_bytes(plan, batch, seq, dtype_bytes) if core == "materialised" else 0
    if scores and not held:
        # SDPA's math kernel turns `is_causal` into a T × S boolean mask and its additive (fp32) form
        scores += int(seq * seq * (max(dtype_bytes, MATH_BYTES) + 1))
    layer += scores
    logits = tokens * plan.vocab_size * dtype_bytes
    return int(weights + residual + max(mask_bytes(plan, seq, int(dtype_bytes)), held + max(layer, logits)))
