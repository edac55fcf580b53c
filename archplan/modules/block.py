"""One layer: its norms (names from `LayerPlan.norms`), a mixer and an FFN (dense, MoE or none).

Residual wiring (spec.Residual; f = mixer, g = FFN):
  pre        h = x + f(n1(x));                    y = h + g(n2(h))          (GPT-2, Llama)
  post       h = n1(x + f(x));                    y = n2(h + g(h))          (Vaswani et al. 2017)
  deepnorm   h = n1(α·x + f(x));                  y = n2(α·h + g(h))        (Wang et al. 2022, eq. 3)
  parallel   y = x + f(n1(x)) + g(n1(x)) shared,  or g(n2(x)) with two norms (GPT-J, GPT-NeoX)
  sandwich   h = x + pn1(f(n1(x)));               y = h + pn2(g(n2(h)))     (Gemma-2)
  reordered  h = x + pn1(f(x));                   y = h + pn2(g(h))         (OLMo-2)
A block without FFN (pure Mamba) stops after h.
"""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import assert_never

from archplan.modules.attention import Attention
from archplan.modules.hyena import HyenaMixer
from archplan.modules.cache import LayerState
from archplan.modules.ffn import build_ffn
from archplan.modules.mamba1 import Mamba1Mixer
from archplan.modules.mamba2 import Mamba2Mixer
from archplan.modules.mla import MLA
from archplan.modules.moe import MoEFFN
from archplan.modules.norms import build_norm
from archplan.modules.s4 import S4Mixer
from archplan.modules.stripedhyena import StripedHyenaMixer
from archplan.resolve import (
    AttentionPlan,
    FFNOrMoE,
    FFNPlan,
    HyenaPlan,
    LayerPlan,
    Mamba1Plan,
    Mamba2Plan,
    MixerPlan,
    MLAPlan,
    ModelPlan,
    MoEPlan,
    S4Plan,
    StripedHyenaPlan,
)


def build_mixer(mixer: MixerPlan, model: ModelPlan) -> nn.Module:
    alibi = model.position == "alibi"
    match mixer:
        case AttentionPlan():
            return Attention(mixer, model.d_model, model.rope, alibi, model.alibi_scale)
        case MLAPlan():
            return MLA(mixer, model.d_model, model.rope, alibi, model.alibi_scale)
        case Mamba1Plan():
            return Mamba1Mixer(mixer, model.d_model)
        case Mamba2Plan():
            return Mamba2Mixer(mixer, model.d_model)
        case S4Plan():
            return S4Mixer(mixer, model.d_model)
        case HyenaPlan():
            return HyenaMixer(mixer, model.d_model)
        case StripedHyenaPlan():
            return StripedHyenaMixer(mixer, model.d_model)
        case _:
            assert_never(mixer)


def build_ffn_or_moe(ffn: FFNOrMoE, d_model: int) -> nn.Module:
    match ffn:
        case FFNPlan():
            return build_ffn(ffn, d_model)
        case MoEPlan():
            return MoEFFN(ffn, d_model)
        case _:
            assert_never(ffn)


class Block(nn.Module):
    def __init__(self, layer: LayerPlan, model: ModelPlan) -> None:
        super().__init__()
        self.residual = model.residual
        self.alpha = model.deepnorm_alpha
        self.shared_norm = layer.norms == ("norm1",) and layer.ffn is not None
        for name in layer.norms:
            self.add_module(name, build_norm(model.norm, model.d_model))
        self.mixer = build_mixer(layer.mixer, model)
        self.ffn = build_ffn_or_moe(layer.ffn, model.d_model) if layer.ffn is not None else None

    def _norm(self, name: str, x: Tensor) -> Tensor:
        norm: nn.Module = getattr(self, name)
        return norm(x)

    def forward(self, x_BTD: Tensor, state: LayerState | None = None) -> Tensor:
        n = self._norm
        ffn = self.ffn
        match self.residual:
            case "pre":
                h = x_BTD + self.mixer(n("norm1", x_BTD), state)
                return h if ffn is None else h + ffn(n("norm2", h))
            case "post" | "deepnorm":
                # alpha = 1 for post-norm (resolve.py), (2L)^(1/4) by default for DeepNorm
                h = n("norm1", self.alpha * x_BTD + self.mixer(x_BTD, state))
                return h if ffn is None else n("norm2", self.alpha * h + ffn(h))
            case "parallel":
                a = n("norm1", x_BTD)
                if ffn is None:
                    return x_BTD + self.mixer(a, state)
                b = a if self.shared_norm else n("norm2", x_BTD)
                return x_BTD + self.mixer(a, state) + ffn(b)
            case "sandwich":
                h = x_BTD + n("post_norm1", self.mixer(n("norm1", x_BTD), state))
                return h if ffn is None else h + n("post_norm2", ffn(n("norm2", h)))
            case "reordered":
                h = x_BTD + n("post_norm1", self.mixer(x_BTD, state))
                return h if ffn is None else h + n("post_norm2", ffn(h))
            case _:
                assert_never(self.residual)
