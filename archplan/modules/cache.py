"""Decode state: one `LayerState` per layer, grouped in a `ModelCache`.

Contract (docs/architecture.md, "Cache contract"): `model.new_cache(batch, max_len)` allocates
every layer's state up front; each forward with `cache=` appends T tokens. A layer's mixer owns
its state's layout; this module only fixes what every state offers:

- `tensors()`: the tensors that hold the state, so their bytes can be summed against the
  analytic KV figure (`archplan.analytic.kv`), whatever the mixer;
- `seen`: how many tokens this layer has consumed (a Python int, never a tensor, so the
  bookkeeping stays static and runs on meta). The mixer advances it after writing its T tokens.

Concrete states are dataclasses subclassing `LayerState` with their tensors first and
`seen: int = 0` last, e.g. ``KVState(k_BHLD, v_BHLD)`` here, Mamba conv/SSM states in mamba1/2.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor


class LayerState(ABC):
    """Per-layer decode state; subclasses are dataclasses that define `seen: int = 0`."""

    seen: int

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """Every tensor holding this layer's state (their bytes are the cache's size)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def advance(self, n_tokens: int) -> None:
        self.seen += n_tokens


@dataclass(eq=False)
class KVState(LayerState):
    """K/V cache of MHA/GQA/MQA: (B, Hkv, L, Dh) each; L = max_len, or the window (rolling buffer).

    With a window, token at absolute position p lives in slot p % L, so the buffer keeps exactly
    the last L tokens a sliding-window query may attend to (Mistral's rolling buffer cache,
    Jiang et al. 2023 §2).
    """

    k_BHLD: Tensor
    v_BHLD: Tensor
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.k_BHLD, self.v_BHLD]

    @property
    def capacity(self) -> int:
        return self.k_BHLD.shape[2]


@dataclass(eq=False)
class LatentState(LayerState):
    """MLA's absorbed cache (DeepSeek-V2 §2.1.3): the compressed latent c_kv and the shared rope key.

    One buffer (B, L, kv_lora_rank + qk_rope_head_dim), latent first: the key of the absorbed
    attention is a whole row and its value the latent part, so decode reads the cache in place (the
    layout of DeepSeek's FlashMLA `kv_cache`, 512 + 64 wide). `ckv_BLC` / `kpe_BLR` are views of it.
    Rolling like `KVState` when windowed.
    """

    latent_BLX: Tensor
    kv_lora_rank: int
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [self.latent_BLX]

    @property
    def ckv_BLC(self) -> Tensor:
        return self.latent_BLX[..., : self.kv_lora_rank]

    @property
    def kpe_BLR(self) -> Tensor:
        return self.latent_BLX[..., self.kv_lora_rank :]

    @property
    def capacity(self) -> int:
        return self.latent_BLX.shape[1]


@dataclass(eq=False)
class ModelCache:
    """All layers' states plus the model-level position (for RoPE / learned / sinusoidal offsets)."""

    layers: list[LayerState]
    max_len: int
    seen: int = 0

    def tensors(self) -> list[Tensor]:
        return [t for state in self.layers for t in state.tensors()]

    def nbytes(self) -> int:
        return sum(state.nbytes() for state in self.layers)

    def seek(self, seen: int) -> None:
        """Set every counter to `seen` tokens, forward or back, and nothing else: bench records the
        step it prices at the timed steps' median context this way (`bench.decode.record_step_at`),
        its writes kept out of the state. A state's tensors past `seen` are never read before the
        next steps write them (a windowed buffer's ring excepted); a recurrent state (Mamba, S4)
        holds whatever the steps since wrote, so a decode whose outputs matter does not seek."""
        self.seen = seen
        for state in self.layers:
            state.seen = seen
