"""`ArchplanModel` and `build_model`: a runnable decoder from a spec or its resolved plan.

Top-level attribute names are the module paths of docs/architecture.md (`embed`, `pos_embed`,
`embed_norm`, `layers.{i}.…`, `final_norm`, `lm_head`, and `mtp.{k}.…` for multi-token
prediction), so every parameter maps to its component by longest dotted prefix. On meta nothing is
allocated: a 671B model builds in seconds.

`forward` is inference: the main model's logits. A training step calls `training_loss`, which also
runs the multi-token-prediction modules where the spec has them (`mtp_logits`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.errors import ArchplanError
from archplan.modules.attention import Attention, BiasCache
from archplan.modules.block import Block
from archplan.modules.cache import ModelCache
from archplan.modules.ffn import GLU, MLP
from archplan.modules.mla import MLA
from archplan.modules.moe import MoEFFN
from archplan.modules.mtp import MTPLayer
from archplan.modules.norms import build_norm
from archplan.modules.positions import SinusoidalPositions, share_rope_tables
from archplan.resolve import ModelPlan, check_mtp_length, resolve
from archplan.spec import Spec


def _embedding(num: int, dim: int) -> nn.Embedding:
    """`nn.Embedding(num, dim)` on the current default device, initialised as torch does (N(0, 1),
    same RNG draw at the same point of the build), except on meta, where there is nothing to
    initialise: `normal_` is the one init whose meta kernel is a Python reference, and its first
    call imports torch._dynamo (~1 s, torch/_compile.py `_disable_dynamo`)."""
    weight_VD = torch.empty(num, dim)
    embedding = nn.Embedding(num, dim, _weight=weight_VD)
    if weight_VD.device.type != "meta":
        embedding.reset_parameters()
    return embedding


class TiedLMHead(nn.Module):
    """The LM head of a tied model: logits = x · embed.weightᵀ (+ its own bias, the only parameter)."""

    def __init__(self, vocab_size: int, bias: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def reset_parameters(self) -> None:
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x_BTD: Tensor, weight_VD: Tensor) -> Tensor:
        return F.linear(x_BTD, weight_VD, self.bias)


def share_biases(layers: nn.Module) -> None:
    """One `BiasCache` for the attention modules of `layers` (a model's, a pipeline stage's)."""
    biases = BiasCache()
    for module in layers.modules():
        if isinstance(module, Attention | MLA):
            module.biases = biases


IGNORED = -100  # F.cross_entropy's default ignore_index


def cross_entropy_ahead(logits_BTV: Tensor, tokens_BT: Tensor, ahead: int, positions: Tensor | None = None,
                        shards: int = 1) -> Tensor:
    """Mean fp32 cross-entropy of the logits at position i against token i + ahead, over the
    positions where that token is among the T given. The labels are gathered, not the logits: a
    slice of the logits would copy them (Megatron-Core's MTP rolls its labels and masks the tail the
    same way).

    `positions`: the global positions of the logits' rows, of T whole-sequence `tokens_BT` (a
    context-parallel rank's chunks; default: all T). The sum over them is divided by the whole
    sequences' count and multiplied by `shards`, the ranks whose losses are averaged (cp), so that
    average is the whole sequences' mean, however unevenly the targetless tail falls on them."""
    b, t = tokens_BT.shape
    if positions is None:
        positions = torch.arange(t, device=tokens_BT.device)
    ahead_at = positions + ahead
    labels_BT = tokens_BT[:, ahead_at.clamp(max=t - 1)].masked_fill(ahead_at >= t, IGNORED)
    total = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORED,
                            reduction="sum")
    return total * shards / (b * (t - ahead))


def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to nearest-even in `dtype`, in Python: no tensor op, so a trace, a compile or
    a fake tensor sees a constant. bf16 keeps the top 16 bits of the float32 pattern."""
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", value))[0]
    single = struct.unpack("<I", struct.pack("<f", value))[0]
    if dtype == torch.bfloat16:
        single = (single + 0x7FFF + ((single >> 16) & 1)) >> 16 << 16
    elif dtype != torch.float32:
        return value
    return struct.unpack("<f", struct.pack("<I", single))[0]


def token_embedding(plan: ModelPlan, embed: nn.Embedding, tokens_BT: Tensor) -> Tensor:
    """The embedding rows of the tokens, times sqrt(d_model) where the spec scales them (Gemma's
    normalizer, rounded to the activation dtype as transformers' GemmaModel rounds it): what a
    pipeline's last stage embeds for its multi-token-prediction modules too."""
    x_BTD = embed(tokens_BT)
    return x_BTD * rounded(plan.embed_scale, x_BTD.dtype) if plan.embed_scale != 1.0 else x_BTD


def embed_input(plan: ModelPlan, embed: nn.Embedding, pos_embed: nn.Module | None, embed_norm: nn.Module | None,
                tokens_BT: Tensor, offset: int = 0) -> Tensor:
    """The first layer's input (B, T, D) of tokens from position `offset`: `token_embedding`, +
    learned or sinusoidal positions, then the embedding norm, where the model has them. The whole
    model and a pipeline's first stage share it."""
    t = tokens_BT.shape[1]
    x_BTD = token_embedding(plan, embed, tokens_BT)
    if isinstance(pos_embed, nn.Embedding):
        x_BTD = x_BTD + pos_embed(torch.arange(offset, offset + t, device=tokens_BT.device))
    elif isinstance(pos_embed, SinusoidalPositions):
        x_BTD = x_BTD + pos_embed(offset, t).to(x_BTD.dtype)
    if embed_norm is not None:
        x_BTD = embed_norm(x_BTD)
    return x_BTD


class ArchplanModel(nn.Module):
    def __init__(self, plan: ModelPlan) -> None:
        super().__init__()
        self.plan = plan
        d = plan.d_model
        self.embed = _embedding(plan.vocab_size, d)
        self.pos_embed: nn.Module | None
        match plan.position:
            case "learned":
                self.pos_embed = _embedding(plan.max_seq_len, d)
            case "sinusoidal":
                self.pos_embed = SinusoidalPositions(d)
            case "rope" | "alibi" | "none":
                self.pos_embed = None  # rope and alibi act inside attention; none has no signal
            case _:
                assert_never(plan.position)
        self.embed_norm = build_norm(plan.norm, d) if plan.embed_norm else None
        self.layers = nn.ModuleList(Block(layer, plan) for layer in plan.layers)
        self.final_norm = build_norm(plan.norm, d) if plan.final_norm else None
        self.lm_head: nn.Module = (
            TiedLMHead(plan.vocab_size, plan.lm_head_bias)
            if plan.tied
            else nn.Linear(d, plan.vocab_size, bias=plan.lm_head_bias)
        )
        # Built last, so the main model draws the same initial weights with or without them; empty
        # (no parameters) without MTP
        self.mtp = nn.ModuleList(MTPLayer(layer, plan) for layer in plan.mtp)
        # the MTP blocks attend over the same T positions from 0, so they use the layers' biases
        # and rotary tables
        share_biases(self)
        share_rope_tables(self)

    def reset_buffers(self) -> None:
        """Recompute every non-persistent table (after `to_empty`, or after a dtype cast)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def new_cache(self, batch: int, max_len: int) -> ModelCache:
        limit = self.plan.position_limit()
        if limit is not None and max_len > limit.positions:
            raise ArchplanError(f"cache length {max_len} exceeds {limit.what} ({limit.field} {limit.positions})")
        weight = self.embed.weight
        states = [layer.mixer.new_state(batch, max_len, weight.device, weight.dtype) for layer in self.layers]
        return ModelCache(states, max_len)

    def embed_tokens(self, tokens_BT: Tensor, offset: int = 0) -> Tensor:
        """The input of the first layer (B, T, D): token embedding, + learned or sinusoidal positions
        from `offset`, then the embedding norm, where the model has them. The MTP modules take
        this same embedding of the tokens ahead (DeepSeek-V3 §2.2: the embedding layer is shared)."""
        t = tokens_BT.shape[1]
        if isinstance(self.pos_embed, nn.Embedding) and offset + t > self.plan.max_seq_len:
            raise ArchplanError(f"position {offset + t - 1} is beyond max_seq_len {self.plan.max_seq_len}")
        return embed_input(self.plan, self.embed, self.pos_embed, self.embed_norm, tokens_BT, offset)

    def trunk(self, x_BTD: Tensor, cache: ModelCache | None = None) -> Tensor:
        """The layers and the final norm: the main model's last hidden state, what the head reads."""
        states = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, state in zip(self.layers, states):
            x_BTD = layer(x_BTD, state)
        return x_BTD if self.final_norm is None else self.final_norm(x_BTD)

    def head(self, x_BTD: Tensor) -> Tensor:
        """Logits (B, T, V) of a hidden state; the main model and every MTP depth share it (§2.2)."""
        if isinstance(self.lm_head, TiedLMHead):
            return self.lm_head(x_BTD, self.embed.weight)
        return self.lm_head(x_BTD)

    def forward(self, tokens_BT: Tensor, cache: ModelCache | None = None) -> Tensor:
        """The main model's logits (B, T, V): inference, where the MTP modules never run (DeepSeek-V3
        §2.2 discards them, or keeps them for speculative decoding)."""
        _, t = tokens_BT.shape
        offset = cache.seen if cache is not None else 0
        if cache is not None and offset + t > cache.max_len:
            raise ArchplanError(f"cache holds {cache.max_len} tokens; {offset} cached + {t} new exceed it")
        hidden_BTD = self.trunk(self.embed_tokens(tokens_BT, offset), cache)
        if cache is not None:
            cache.seen += t
        return self.head(hidden_BTD)

    def _training_logits(self, tokens_BT: Tensor) -> Iterator[Tensor]:
        """The main model's logits, then depth k's for k = 0 … depth − 1, each (B, T, V) and made
        only when asked for, so a loss can drop each before the next exists.

        Full length T, as Megatron-Core keeps it: depth k reads the embedding rolled left by k + 1
        (`roll_tensor`; Megatron rolls the token and position ids, the same thing for an embedding
        computed per position), so its last k + 1 positions see wrapped-around tokens and have no
        target: the loss leaves them out. Each depth reads the previous one's normed output
        (Megatron's `MultiTokenPredictionBlock.forward`), depth 0 the main model's last hidden state."""
        emb_BTD = self.embed_tokens(tokens_BT)
        hidden_BTD = self.trunk(emb_BTD)
        yield self.head(hidden_BTD)
        for k, module in enumerate(self.mtp):
            hidden_BTD = module(hidden_BTD, emb_BTD.roll(-(k + 1), dims=1))
            yield self.head(hidden_BTD)

    def mtp_logits(self, tokens_BT: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One training forward: the main logits and one logits tensor per MTP depth, all (B, T, V).
        Depth k's logits at position i predict token i + k + 2 (DeepSeek-V3 eq. 23, P^{k+1}_{i+k+2});
        its last k + 2 positions have no target within the T tokens."""
        main_BTV, *depths = self._training_logits(tokens_BT)
        return main_BTV, depths

    def training_loss(self, tokens_BT: Tensor) -> Tensor:
        """What a training step differentiates: L_main + λ/D · Σ_k L_MTP^k (DeepSeek-V3 eq. 25; λ =
        `plan.mtp_loss_weight`, D the depth), or L_main alone without MTP.

        L_main: cross-entropy of positions 0 … T − 2 against tokens 1 … T − 1; L_MTP^k (eq. 24): of
        depth k's positions 0 … T − k − 3 against tokens k + 2 … T − 1. Each is the mean over the
        positions that have a target, as Megatron-Core's `process_mtp_loss` divides each depth's sum
        by its rolled loss mask's count (eq. 24 writes 1/T), in fp32 as the training step computes
        its cross-entropy. The MoE load-balancing losses, the MTP blocks' included, join the
        gradient through their layer outputs (`moe._AttachAuxLoss`), as in every training step
        here, not the value; `aux_loss` reports them."""
        t = tokens_BT.shape[1]
        depth = len(self.mtp)
        check_mtp_length(depth, t)
        logits = self._training_logits(tokens_BT)
        loss = cross_entropy_ahead(next(logits), tokens_BT, 1)
        for k, logits_BTV in enumerate(logits):
            loss = loss + self.plan.mtp_loss_weight / depth * cross_entropy_ahead(logits_BTV, tokens_BT, k + 2)
        return loss

    def aux_loss(self) -> Tensor:
        """Σ over MoE layers of their last forward's coef-weighted load-balancing loss (`moe.load_balancing_loss`),
        detached, for logging: the gradient of anything computed from that forward's output already
        includes it (`moe._AttachAuxLoss`). The MTP blocks' count as of the last `training_loss` or
        `mtp_logits` (`forward` does not run them).

        0 for a dense model, in eval mode, or before the first forward.
        """
        total = torch.zeros((), device=self.embed.weight.device, dtype=torch.float32)
        for layer in [*self.layers, *self.mtp]:
            loss = layer.ffn.last_aux_loss if isinstance(layer.ffn, MoEFFN) else None
            if loss is not None:
                total = total + loss.float()
        return total


class TrainingLoss(nn.Module):
    """`ArchplanModel.training_loss` as one module call. The multi-token-prediction pass runs the
    embedding and the head once per depth from a method of the model, not its forward; trackers
    that follow module calls (torch's MemTracker) take a second top-level call of a module for a
    second iteration. Under this root the step is one call, the repeated ones its submodules'."""

    def __init__(self, model: ArchplanModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens_BT: Tensor) -> Tensor:
        return self.model.training_loss(tokens_BT)


def _deepnorm_init(model: ArchplanModel, beta: float) -> None:
    """Scale the value/output projections and every FFN matrix by β (Wang et al. 2022, DeepNet
    Algorithm 1; microsoft/torchscale `Decoder.__init__` divides fc1/fc2/v_proj/out_proj by (8L)^(1/4)).
    MLA's values are the W_UV rows of kv_b_proj (DeepSeek-V2 §2.1.2: v = W_UV·c_kv); the spec
    refuses deepnorm beside SSM and long-convolution mixers, for which DeepNet defines no β."""
    with torch.no_grad():
        for layer in [*model.layers, *model.mtp]:  # an MTP block is one more layer of the same stack
            mixer = layer.mixer
            matrices: list[Tensor] = []
            if isinstance(mixer, Attention):
                matrices += [mixer.v_proj.weight, mixer.o_proj.weight]
            elif isinstance(mixer, MLA):
                h, dn, dv = mixer.plan.n_heads, mixer.plan.qk_nope_head_dim, mixer.plan.v_head_dim
                w_uv = mixer.kv_b_proj.weight.view(h, dn + dv, -1)[:, dn:]
                matrices += [w_uv, mixer.o_proj.weight]
            ffn = layer.ffn
            if isinstance(ffn, (MLP, GLU)):
                matrices += [p for p in ffn.parameters() if p.dim() == 2]
            elif isinstance(ffn, MoEFFN):  # weights only: the experts' (E, F) biases are 2-D too
                matrices += ffn.experts.weights()
                if ffn.shared is not None:
                    matrices += [p for p in ffn.shared.parameters() if p.dim() == 2]
            for w in matrices:
                w.mul_(beta)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from a CLI choice; `auto` is cuda when available, else cpu. The one place
    that turns an unusable device into a one-line error (build_model, verify, bench)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ArchplanError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        raise ArchplanError(f"--device cuda: CUDA is not available (torch {torch.__version__}, built "
                            f"{built} CUDA); use --device cpu")
    return dev


def build_model(
    spec_or_plan: Spec | ModelPlan, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> ArchplanModel:
    """Build on `device`; dtype defaults to bf16 on meta (grouped_mm's meta check wants it), else fp32.

    On meta nothing is allocated or initialised. On a real device every module initialises
    itself in its constructor (PyTorch defaults, Mamba's own A/D/dt init), then DeepNorm's β.
    """
    plan = spec_or_plan if isinstance(spec_or_plan, ModelPlan) else resolve(spec_or_plan)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "meta" else torch.float32
    with torch.device(dev):
        model = ArchplanModel(plan)
    model.to(dtype)
    model.reset_buffers()
    if dev.type != "meta" and plan.residual == "deepnorm":
        _deepnorm_init(model, plan.deepnorm_beta)
    return model
