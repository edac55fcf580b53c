"""`ArchplanModel` and `build_model`: a runnable decoder from a spec or its resolved plan.

Top-level attribute names are the module paths of docs/architecture.md (`embed`, `pos_embed`,
`embed_norm`, `layers.{i}.…`, `final_norm`, `lm_head`), so every parameter maps to its
component by longest dotted prefix. On meta nothing is allocated: a 671B model builds in seconds.
"""

from __future__ import annotations

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
from archplan.modules.norms import build_norm
from archplan.modules.positions import SinusoidalPositions
from archplan.resolve import ModelPlan, resolve
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
        share_biases(self.layers)
        self.final_norm = build_norm(plan.norm, d) if plan.final_norm else None
        self.lm_head: nn.Module = (
            TiedLMHead(plan.vocab_size, plan.lm_head_bias)
            if plan.tied
            else nn.Linear(d, plan.vocab_size, bias=plan.lm_head_bias)
        )

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

    def forward(self, tokens_BT: Tensor, cache: ModelCache | None = None) -> Tensor:
        _, t = tokens_BT.shape
        offset = cache.seen if cache is not None else 0
        if cache is not None and offset + t > cache.max_len:
            raise ArchplanError(f"cache holds {cache.max_len} tokens; {offset} cached + {t} new exceed it")
        x_BTD = self.embed(tokens_BT)
        if isinstance(self.pos_embed, nn.Embedding):
            if offset + t > self.plan.max_seq_len:
                raise ArchplanError(f"position {offset + t - 1} is beyond max_seq_len {self.plan.max_seq_len}")
            x_BTD = x_BTD + self.pos_embed(torch.arange(offset, offset + t, device=tokens_BT.device))
        elif isinstance(self.pos_embed, SinusoidalPositions):
            x_BTD = x_BTD + self.pos_embed(offset, t).to(x_BTD.dtype)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)
        states = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, state in zip(self.layers, states):
            x_BTD = layer(x_BTD, state)
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        if cache is not None:
            cache.seen += t
        if isinstance(self.lm_head, TiedLMHead):
            return self.lm_head(x_BTD, self.embed.weight)
        return self.lm_head(x_BTD)

    def aux_loss(self) -> Tensor:
        """Σ over MoE layers of their last forward's coef-weighted load-balancing loss (`moe.load_balancing_loss`),
        detached, for logging: the gradient of anything computed from that forward's output already
        includes it (`moe._AttachAuxLoss`).

        0 for a dense model, in eval mode, or before the first forward.
        """
        total = torch.zeros((), device=self.embed.weight.device, dtype=torch.float32)
        for layer in self.layers:
            loss = layer.ffn.last_aux_loss if isinstance(layer.ffn, MoEFFN) else None
            if loss is not None:
                total = total + loss.float()
        return total


def _deepnorm_init(model: ArchplanModel, beta: float) -> None:
    """Scale the value/output projections and every FFN matrix by β (Wang et al. 2022, DeepNet
    Algorithm 1; microsoft/torchscale `Decoder.__init__` divides fc1/fc2/v_proj/out_proj by (8L)^(1/4))."""
    with torch.no_grad():
        for layer in model.layers:
            mixer = layer.mixer
            matrices: list[Tensor] = []
            if isinstance(mixer, Attention):
                matrices += [mixer.v_proj.weight, mixer.o_proj.weight]
            elif isinstance(mixer, MLA):
                matrices.append(mixer.o_proj.weight)
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
