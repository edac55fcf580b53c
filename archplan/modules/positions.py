"""Position signals: RoPE (with partial rotary and length-extension scaling), ALiBi, sinusoids.

Learned absolute positions are a plain `nn.Embedding(max_seq_len, D)` built by the model.
No table here is a parameter: all are non-persistent buffers rebuilt by `reset_buffers()`, so
`meta → to_empty → reset_buffers()` gives the same values as a direct build. Tables come from
Python floats (a few hundred numbers), and per-position angles from an elementwise outer
product, never a matmul: the FLOP counter must see only the model's true matmuls. The
compute-dtype cos/sin a forward builds are shared by a model's rotary layers (`RopeTables`) and
dropped by `reset_buffers()` with the frequencies they came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.spec import Rope, RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature (Peng et al. 2023, eq. 22; DeepSeek-V3 `yarn_get_mscale`)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn(freqs: list[float], dim: int, theta: float, s: RopeScaling) -> list[float]:
    """YaRN "NTK-by-parts" blend (Peng et al. 2023, eq. 18-20; HF `_compute_yarn_parameters`)."""
    assert s.original_max_positions is not None

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    out = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolation = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
        out.append(f / s.factor * (1.0 - extrapolation) + f * extrapolation)
    return out


def _llama3(freqs: list[float], s: RopeScaling) -> list[float]:
    """Llama 3.1 frequency-dependent scaling (meta-llama/llama-models `apply_scaling`)."""
    assert s.original_max_positions is not None
    low_wavelen = s.original_max_positions / s.low_freq_factor
    high_wavelen = s.original_max_positions / s.high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen or s.high_freq_factor == s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out


def rope_frequencies(rotary_dim: int, rope: Rope) -> tuple[list[float], float]:
    """Inverse frequencies θ^(−2i/R) for i < R/2 (Su et al. 2021, eq. 15), scaled, and the cos/sin gain."""
    theta = rope.theta
    s = rope.scaling
    if s is not None and s.kind == "ntk":
        # NTK-aware base change (bloc97 2023), fixed at the factor: HF's dynamic form
        # (`_compute_dynamic_ntk_parameters`) grows θ with the running length L past the original
        # M, θ·(s·L/M − (s − 1))^(R/(R−2)), which is this θ at L = (2 − 1/s)·M
        theta = theta * s.factor ** (rotary_dim / (rotary_dim - 2)) if rotary_dim > 2 else theta
    freqs = [theta ** (-(2 * i) / rotary_dim) for i in range(rotary_dim // 2)]
    if s is None:
        return freqs, 1.0
    match s.kind:
        case "linear":
            # Position interpolation (Chen et al. 2023): positions / factor ≡ frequencies / factor
            return [f / s.factor for f in freqs], 1.0
        case "ntk":
            return freqs, 1.0
        case "yarn":
            if s.mscale and s.mscale_all_dim:
                gain = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
            else:
                gain = yarn_mscale(s.factor)
            return _yarn(freqs, rotary_dim, theta, s), gain
        case "llama3":
            return _llama3(freqs, s), 1.0
        case _:
            assert_never(s.kind)


class RopeTables:
    """The compute-dtype cos/sin tables of a model's (or pipeline stage's) rotary layers of one
    configuration, built once per positions and shared by the layers, the micro-batches and
    recompute's re-runs, as torchtitan's models precompute one `freqs_cis` for every layer and
    Megatron-Core's GPTModel builds one rotary embedding per forward. The rotation's products keep
    the tables they multiply by for the backward, so tables built per layer kept 4·R bytes a
    position a layer (bf16 cos and sin). The last `KEPT` position sets are held: MLA under context
    parallelism rotates its queries and its gathered keys at two."""

    KEPT = 2

    def __init__(self) -> None:
        # by (positions, dtype, device): the tables and the positions tensor a key names by id,
        # held so that no other tensor can take that id while the entry lives
        self.built: dict[tuple[object, ...], tuple[tuple[Tensor, Tensor], Tensor | None]] = {}

    def lookup(self, key: tuple[object, ...], pinned: Tensor | None,
               build: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # traced into the compiled graph, where the compiler decides what the backward keeps;
            # a Python cache there would split the graph at every new position set
            return build()
        # an inference tensor could not be saved by a later training step's rotation
        key = (*key, torch.is_inference_mode_enabled())
        if key not in self.built:
            if len(self.built) == self.KEPT:
                del self.built[next(iter(self.built))]
            self.built[key] = (build(), pinned)
        return self.built[key][0]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [offset, offset + T); rotates the first `rotary_dim` dims."""

    inv_freq: Tensor

    def __init__(self, rotary_dim: int, rope: Rope) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.rope = rope
        # this layer's own until `share_rope_tables` gives it the model's
        self.tables = RopeTables()
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        freqs, self.gain = rope_frequencies(self.rotary_dim, self.rope)
        # kept in fp32 whatever the model dtype: bf16 frequencies lose long-range positions
        self.inv_freq = torch.tensor(freqs, dtype=torch.float32, device=self.inv_freq.device)
        self.tables.built.clear()

    def signature(self) -> tuple[int, str]:
        """What fixes the tables: layers that agree on it can share them."""
        return self.rotary_dim, self.rope.model_dump_json()

    def forward(self, offset: int, length: int) -> tuple[Tensor, Tensor]:
        return self.at(torch.arange(offset, offset + length, device=self.inv_freq.device))

    def at(self, pos_T: Tensor) -> tuple[Tensor, Tensor]:
        """fp32 cos/sin tables for the given positions (context parallelism: a rank's chunks)."""
        half = pos_T.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, R/2): elementwise, not a matmul
        angle_TR = torch.cat([half, half], dim=-1)
        return angle_TR.cos() * self.gain, angle_TR.sin() * self.gain

    def cast(self, offset: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The tables for positions [offset, offset + length) in `dtype`, built once for every layer
        sharing `self.tables`."""
        key = ("range", offset, length, dtype, self.inv_freq.device)
        return self.tables.lookup(key, None, lambda: _cast(self(offset, length), dtype))

    def cast_at(self, pos_T: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """`cast` at given positions; the callers pass one cached tensor per position set
        (`SequenceShard.positions`), which names the entry."""
        key = ("at", id(pos_T), dtype, self.inv_freq.device)
        return self.tables.lookup(key, pos_T, lambda: _cast(self.at(pos_T), dtype))


def _cast(cos_sin: tuple[Tensor, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return cos_sin[0].to(dtype), cos_sin[1].to(dtype)


def share_rope_tables(layers: nn.Module) -> None:
    """One `RopeTables` per rotary configuration for the rotary layers of `layers`."""
    shared: dict[tuple[int, str], RopeTables] = {}
    for module in layers.modules():
        if isinstance(module, RotaryEmbedding):
            module.tables = shared.setdefault(module.signature(), RopeTables())


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHTDh: Tensor, cos_TR: Tensor, sin_TR: Tensor) -> Tensor:
    """Rotate the first R dims in GPT-NeoX half-split layout (HF `apply_rotary_pos_emb`); the rest pass."""
    r = cos_TR.shape[-1]
    rot, rest = x_BHTDh[..., :r], x_BHTDh[..., r:]
    cos, sin = cos_TR.to(x_BHTDh.dtype), sin_TR.to(x_BHTDh.dtype)
    rotated = rot * cos + rotate_half(rot) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes from Press et al. 2022 §3 (ofirpress/attention_with_linear_biases `get_slopes`).

    For 2^k heads: the geometric sequence starting at 2^(−8/n) with that ratio. Otherwise the
    slopes of the closest lower power of two, then every other slope of twice that many.
    """

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


class Alibi(nn.Module):
    """Bias slope_h · (key_pos − query_pos) added to the scores (Press et al. 2022, eq. in §3)."""

    slopes: Tensor

    def __init__(self, n_heads: int, scale: float = 1.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.scale = scale  # 1/sqrt(head_dim) where the bias is scaled with the scores (Falcon-RW)
        self.register_buffer("slopes", torch.empty(n_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.slopes = torch.tensor([s * self.scale for s in alibi_slopes(self.n_heads)], dtype=torch.float32,
                                   device=self.slopes.device)

    def signature(self) -> tuple[object, ...]:
        """What its slopes are a function of: layers with equal signatures have equal biases."""
        return ("alibi", self.n_heads, self.scale)

    def forward(self, qpos_T: Tensor, kpos_S: Tensor) -> Tensor:
        distance_TS = (kpos_S[None, :] - qpos_T[:, None]).float()
        return self.slopes[:, None, None] * distance_TS[None]  # (H, T, S), elementwise


class SinusoidalPositions(nn.Module):
    """PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...) (Vaswani et al. 2017, §3.5)."""

    inv_freq: Tensor

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("inv_freq", torch.empty((d_model + 1) // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        freqs = [10000.0 ** (-(2 * i) / self.d_model) for i in range((self.d_model + 1) // 2)]
        self.inv_freq = torch.tensor(freqs, dtype=torch.float32, device=self.inv_freq.device)

    def forward(self, offset: int, length: int) -> Tensor:
        return self.at(torch.arange(offset, offset + length, device=self.inv_freq.device))

    def at(self, pos_T: Tensor) -> Tensor:
        """The table's rows at the given positions (context parallelism: a rank's chunks)."""
        angle = pos_T.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (T, ⌈D/2⌉)
        # interleave sin (even dims) and cos (odd dims), then drop the extra dim of an odd D
        pe = torch.stack([angle.sin(), angle.cos()], dim=-1)  # (T, ⌈D/2⌉, 2)
        return pe.flatten(-2)[:, : self.d_model]
