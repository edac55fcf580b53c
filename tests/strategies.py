"""Hypothesis strategies for valid, tiny specs that reach every variant the spec accepts.

`MEMBERS` lists, per union of `archplan.spec.UNIONS`, the strategy of each member; `specs(only=...)`
forces chosen members (e.g. `only={"attention": MLA}`), which is how tests/test_unions.py proves
each member is generated and handled by both halves. Values are drawn so that every validator in
spec.py passes by construction (no `assume`), keeping the property tests fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from hypothesis import strategies as st
from pydantic import BaseModel

from archplan.spec import (
    GLU,
    GQA,
    MHA,
    S4,
    S4D,
    MLA,
    MLP,
    MQA,
    Alibi,
    MoE,
    DeepNorm,
    Hyena,
    LearnedPositions,
    Mamba1,
    Mamba2,
    NoPositions,
    NormSpec,
    Parallel,
    PostNorm,
    PreNorm,
    QKNorm,
    Reordered,
    Rope,
    RopeScaling,
    Router,
    Sandwich,
    SinusoidalPositions,
    Spec,
    StripedHyena,
)

# odd and unaligned widths too: a bf16 row of 9 or 15 values is not 16 bytes long, which the
# grouped_mm path pads and a sequence of 3-wide heads rotates only in part
D_MODELS = (6, 8, 9, 12, 15, 16, 24, 30, 32)
HEADS = (1, 2, 3, 4)


def _divisors(n: int, among: tuple[int, ...]) -> list[int]:
    return [k for k in among if n % k == 0]


@dataclass(frozen=True)
class Case:
    """A spec and the (batch, seq) its forward is counted at."""

    spec: Spec
    batch: int
    seq: int


def values(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    """Every value a `Literal` field of the spec accepts, so a value added there is drawn too."""
    return get_args(model.model_fields[name].annotation)


Draw = Callable[[st.SearchStrategy[Any]], Any]
MemberStrategy = Callable[[Draw, int], dict[str, Any]]  # (draw, d_model) -> the member's fields


def _norm(draw: Draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(values(NormSpec, "kind")))
    if not draw(st.integers(0, 3)):  # now and then parameter-free (OLMo-1's LayerNorm)
        return {"kind": kind, "affine": False}
    if kind == "rmsnorm":
        return {"kind": kind}
    return {"kind": kind, "bias": draw(st.booleans())}


def _head_fields(draw: Draw, d_model: int) -> dict[str, Any]:
    n_heads = draw(st.sampled_from(_divisors(d_model, HEADS)))
    head_dim = draw(st.sampled_from((None, 2, 3, 4, 5, 6, 7, 8)))
    fields: dict[str, Any] = {
        "n_heads": n_heads,
        "qkv_bias": draw(st.booleans()),
        "out_bias": draw(st.booleans()),
    }
    if head_dim is not None:
        fields["head_dim"] = head_dim
    if draw(st.booleans()):
        fields["qk_norm"] = {"scope": draw(st.sampled_from(values(QKNorm, "scope"))), "norm": _norm(draw)}
    if draw(st.booleans()):
        fields["scale_dim"] = draw(st.sampled_from((3, 12.5)))
    return fields


def _mha(draw: Draw, d_model: int) -> dict[str, Any]:
    return {"kind": "mha", **_head_fields(draw, d_model)}


def _gqa(draw: Draw, d_model: int) -> dict[str, Any]:
    fields = _head_fields(draw, d_model)
    n_kv = draw(st.sampled_from([k for k in HEADS if fields["n_heads"] % k == 0]))
    return {"kind": "gqa", "n_kv_heads": n_kv, **fields}


def _mqa(draw: Draw, d_model: int) -> dict[str, Any]:
    return {"kind": "mqa", **_head_fields(draw, d_model)}


def _mla(draw: Draw, d_model: int) -> dict[str, Any]:
    return {
        "kind": "mla",
        "n_heads": draw(st.integers(1, 3)),
        "q_lora_rank": draw(st.sampled_from((None, 4, 6))),
        "kv_lora_rank": draw(st.integers(2, 8)),
        "qk_nope_head_dim": draw(st.integers(1, 6)),
        "qk_rope_head_dim": draw(st.sampled_from((2, 4))),
        "v_head_dim": draw(st.integers(1, 6)),
    }


def _mamba1(draw: Draw, d_model: int) -> dict[str, Any]:
    return {
        "kind": "mamba1",
        "d_state": draw(st.integers(1, 4)),
        "d_conv": draw(st.integers(1, 4)),
        "expand": draw(st.integers(1, 2)),
        "dt_rank": draw(st.sampled_from(("auto", 1, 3))),
        "conv_bias": draw(st.booleans()),
        "proj_bias": draw(st.booleans()),
        "inner_norms": draw(st.booleans()),
    }


def _mamba2(draw: Draw, d_model: int) -> dict[str, Any]:
    expand = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from(_divisors(expand * d_model, (1, 2, 3, 4, 5, 8))))
    n_heads = expand * d_model // head_dim
    return {
        "kind": "mamba2",
        "d_state": draw(st.integers(1, 8)),
        "d_conv": draw(st.integers(1, 4)),
        "expand": expand,
        "head_dim": head_dim,
        "n_groups": draw(st.sampled_from([g for g in (1, 2, 4) if n_heads % g == 0])),
        # small chunks so short sequences span several (padded) chunks
        "chunk_size": draw(st.sampled_from((2, 3, 4, 8, 256))),
        "conv_bias": draw(st.booleans()),
        "proj_bias": draw(st.booleans()),
    }


def _s4(kind: str) -> MemberStrategy:
    def draw_s4(draw: Draw, d_model: int) -> dict[str, Any]:
        return {
            "kind": kind,
            "d_state": draw(st.sampled_from((2, 4, 6))),
            "n_ssm": draw(st.sampled_from([None, *_divisors(d_model, (1, 2, 3, 4, 8))])),
            "ssm_buffers": draw(st.booleans()),
        }

    return draw_s4


def _hyena(draw: Draw, d_model: int) -> dict[str, Any]:
    return {
        "kind": "hyena",
        "order": draw(st.integers(2, 3)),
        "filter_order": draw(st.integers(1, 6)),
        "filter_depth": draw(st.integers(0, 2)),
        "emb_dim": draw(st.sampled_from((3, 5, 7))),
        "short_filter": draw(st.integers(1, 4)),
        "l_max": draw(st.sampled_from((48, 64))),  # >= every drawn max_seq_len
        "trainable_positions": draw(st.booleans()),
        "modulation": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "sin_freq": draw(st.sampled_from((1.0, 14.0))),
    }


def _stripedhyena(draw: Draw, d_model: int) -> dict[str, Any]:
    return {
        "kind": "stripedhyena",
        "short_filter": draw(st.integers(1, 4)),
        "short_filter_bias": draw(st.booleans()),
        "state_size": draw(st.integers(1, 3)),
        "filter_groups": draw(st.sampled_from(_divisors(d_model, (1, 2, 3, 4, 8)))),
    }


def _ffn(kind: str) -> MemberStrategy:
    def draw_ffn(draw: Draw, d_model: int) -> dict[str, Any]:
        acts = values(MLP if kind == "mlp" else GLU, "activation")
        return {
            "kind": kind,
            "d_ff": draw(st.integers(1, 24)),
            "activation": draw(st.sampled_from(acts)),
            "bias": draw(st.booleans()),
        }

    return draw_ffn


def _rope(draw: Draw, d_model: int) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": "rope",
        "theta": draw(st.sampled_from((10000.0, 500000.0))),
        "fraction": draw(st.sampled_from((1.0, 0.5, 0.25))),
    }
    scaling = draw(st.sampled_from((None, *values(RopeScaling, "kind"))))
    if scaling is not None:
        fields["scaling"] = {"kind": scaling, "factor": draw(st.sampled_from((2.0, 4.0, 8.0)))}
        if scaling in ("yarn", "llama3"):
            fields["scaling"]["original_max_positions"] = draw(st.sampled_from((8, 16)))
        if scaling == "yarn":
            fields["scaling"]["mscale_all_dim"] = draw(st.sampled_from((0.0, 1.0)))
    return fields


def _fixed(kind: str, **extra: Callable[[Draw], Any]) -> MemberStrategy:
    def draw_fixed(draw: Draw, d_model: int) -> dict[str, Any]:
        return {"kind": kind, **{name: make(draw) for name, make in extra.items()}}

    return draw_fixed


def _optional_positive(draw: Draw) -> float | None:
    return draw(st.sampled_from((None, 0.5, 2.0)))


# One strategy per member of every union in spec.UNIONS (tests/test_unions.py checks the keys).
MEMBERS: dict[str, dict[type[BaseModel], MemberStrategy]] = {
    "attention": {MHA: _mha, GQA: _gqa, MQA: _mqa, MLA: _mla},
    "ssm": {Mamba1: _mamba1, Mamba2: _mamba2},
    "long_conv": {S4D: _s4("s4d"), S4: _s4("s4"), Hyena: _hyena, StripedHyena: _stripedhyena},
    "ffn": {MLP: _ffn("mlp"), GLU: _ffn("glu")},
    "position": {
        Rope: _rope,
        Alibi: _fixed("alibi", scaled=lambda draw: draw(st.booleans())),
        LearnedPositions: _fixed("learned"),
        SinusoidalPositions: _fixed("sinusoidal"),
        NoPositions: _fixed("none"),
    },
    "residual": {
        PreNorm: _fixed("pre"),
        PostNorm: _fixed("post"),
        DeepNorm: _fixed("deepnorm", alpha=_optional_positive, beta=_optional_positive),
        Parallel: _fixed("parallel", shared_norm=lambda draw: draw(st.booleans())),
        Sandwich: _fixed("sandwich"),
        Reordered: _fixed("reordered"),
    },
}


def _member(draw: Draw, union: str, only: Mapping[str, type[BaseModel]], d_model: int) -> dict[str, Any]:
    members = MEMBERS[union]
    cls = only[union] if union in only else draw(st.sampled_from(list(members)))
    fields = members[cls](draw, d_model)
    fields = {k: v for k, v in fields.items() if v is not None}
    return fields


def _fix_rotary(attention: dict[str, Any], position: dict[str, Any], d_model: int) -> None:
    """RoPE rotates pairs, at least one: shrink `fraction` until the rotated dims are even and not
    none (spec._check_attention_dims); MLA rotates all of its own rotary width, so no fraction."""
    if position["kind"] != "rope":
        return
    if attention["kind"] == "mla":
        position["fraction"] = 1.0
        return
    head_dim = attention.get("head_dim") or d_model // attention["n_heads"]
    for fraction in (position["fraction"], 0.5, 1.0):
        if (rotary := int(head_dim * fraction + 1e-9)) % 2 == 0 and rotary > 0:
            position["fraction"] = fraction
            return
    # an odd head (3, 5, 7 dims; every drawn head has 2 or more) under none of those: rotate its
    # first pair (2/5 of 5 is 2)
    position["fraction"] = 2 / head_dim


def _pattern(draw: Draw, n_layers: int, attention: bool, ssm: bool, conv: bool) -> str:
    letters = [letter for letter, on in (("A", attention), ("S", attention), ("M", ssm), ("H", conv)) if on]
    required = (["M"] if ssm else []) + (["H"] if conv else [])
    required += [draw(st.sampled_from(("A", "S")))] if attention else []
    length = draw(st.integers(len(required), n_layers))
    body = draw(st.lists(st.sampled_from(letters), min_size=length - len(required), max_size=length - len(required)))
    return "".join(draw(st.permutations(required + body)))


def _moe_layers(n_layers: int, every: int, offset: int, first_dense: int) -> int:
    return sum(1 for i in range(n_layers) if i >= first_dense and i % every == offset)


@st.composite
def cases(draw: Draw, only: Mapping[str, type[BaseModel]] | None = None) -> Case:
    """A valid spec (tiny dims) with the batch and sequence length to count it at."""
    only = dict(only or {})
    unknown = set(only) - set(MEMBERS)
    if unknown:
        raise KeyError(f"no strategy for unions {sorted(unknown)}")
    d_model = draw(st.sampled_from(D_MODELS))
    n_layers = draw(st.integers(1, 4))
    # DeepNet's β is defined for attention and FFN sublayers only: a forced deepnorm keeps to them
    shapes = ("attention",) if only.get("residual") is DeepNorm else ("attention", "ssm", "hybrid", "conv",
                                                                       "conv hybrid", "ssm conv")
    shape = draw(st.sampled_from(shapes))
    # RoPE and ALiBi act inside attention: a spec forced to one of them has it
    has_attention = ("attention" in only or only.get("position") in (Rope, Alibi)
                     or shape in ("attention", "hybrid", "conv hybrid"))
    has_ssm = ("ssm" in only or shape in ("ssm", "hybrid", "ssm conv")
               or (shape == "conv hybrid" and draw(st.booleans())))
    has_conv = "long_conv" in only or shape in ("conv", "conv hybrid", "ssm conv")
    n_layers = max(n_layers, has_attention + has_ssm + has_conv)
    pattern = _pattern(draw, n_layers, has_attention, has_ssm, has_conv)

    data: dict[str, Any] = {
        "name": "hypothesis",
        "vocab_size": draw(st.integers(2, 40)),
        "d_model": d_model,
        "n_layers": n_layers,
        "max_seq_len": draw(st.integers(16, 48)),
        "embedding": {
            "tied": draw(st.booleans()), "norm": draw(st.booleans()), "lm_head_bias": draw(st.booleans()),
            "scaled": draw(st.booleans()),
        },
        "position": _member(draw, "position", only, d_model),
        "norm": _norm(draw),
        "residual": _member(draw, "residual", only, d_model),
        "final_norm": draw(st.booleans()),
    }
    layout: dict[str, Any] = {"mixers": pattern}
    if has_attention:
        attention = _member(draw, "attention", only, d_model)
        if "S" in pattern:
            attention["sliding_window"] = draw(st.integers(1, 12))
        _fix_rotary(attention, data["position"], d_model)
        data["attention"] = attention
    elif data["position"]["kind"] in ("rope", "alibi"):
        data["position"] = {"kind": "none"}  # both act inside attention: the spec refuses them without it
    if (has_ssm or has_conv) and data["residual"]["kind"] == "deepnorm":
        data["residual"] = {"kind": "post"}  # DeepNet's β init is defined for attention and FFN only
    if has_ssm:
        data["ssm"] = _member(draw, "ssm", only, d_model)
    if has_conv:
        data["long_conv"] = _member(draw, "long_conv", only, d_model)

    # DeepSeek-V3's multi-token prediction: its blocks continue the layout's pattern
    mtp_depth = draw(st.integers(1, 2)) if draw(st.integers(0, 3)) == 0 else 0
    use_moe = draw(st.booleans())
    if use_moe:
        n_experts = draw(st.integers(1, 4))
        moe: dict[str, Any] = {
            "n_experts": n_experts,
            "top_k": draw(st.integers(1, n_experts)),
            "expert": _member(draw, "ffn", {}, d_model),
            "router": {
                "scoring": draw(st.sampled_from(values(Router, "scoring"))),
                "normalize_top_k": draw(st.booleans()),
                "bias": draw(st.booleans()),
                "score_correction_bias": draw(st.booleans()),
                "scale": draw(st.sampled_from((1.0, 2.5))),
            },
            "aux_loss_coef": draw(st.sampled_from((0.0, 0.01))),
            "aux_loss_scope": draw(st.sampled_from(values(MoE, "aux_loss_scope"))),
        }
        if draw(st.booleans()):  # group-limited routing: n_group divides E, the kept groups hold top_k
            groups = draw(st.sampled_from([g for g in range(1, n_experts + 1) if n_experts % g == 0]))
            per = n_experts // groups
            moe["router"].update(
                n_group=groups, topk_group=draw(st.integers(-(-moe["top_k"] // per), groups)),
                group_score=draw(st.sampled_from(values(Router, "group_score") if per >= 2 else ("max",))))
        if draw(st.booleans()):
            moe["shared"] = {"n": draw(st.integers(1, 2)), "d_ff": draw(st.integers(1, 16)),
                             "gate": draw(st.booleans())}
        data["moe"] = moe
        every = draw(st.integers(1, 3))
        offset = draw(st.integers(0, every - 1))
        first_dense = draw(st.integers(0, n_layers - 1))
        if _moe_layers(n_layers, every, offset, first_dense) == 0:
            offset, first_dense = 0, 0
        layout.update(moe_every=every, moe_offset=offset, first_dense=first_dense)
        # the multi-token-prediction blocks continue the layout: a dense one needs `ffn` too
        trained = n_layers + mtp_depth
        dense_layers = trained - _moe_layers(trained, every, offset, first_dense)
        if not dense_layers and "ffn" in only:
            # no layer is dense (a spec may not set `ffn` then): the experts are the member drawn
            moe["expert"] = _member(draw, "ffn", only, d_model)
        need_ffn = dense_layers > 0
    else:
        # attention-only stacks need an FFN; a stack with Mamba or long-conv layers may have none
        need_ffn = not (has_ssm or has_conv) or "ffn" in only or draw(st.booleans())
    if need_ffn:
        data["ffn"] = _member(draw, "ffn", only, d_model)
    data["layout"] = layout
    if mtp_depth:
        data["mtp"] = {"depth": mtp_depth}

    spec = Spec.model_validate(data)
    # a training step with multi-token prediction needs a target per module ahead (`check_mtp_length`)
    seq = draw(st.integers(mtp_depth + 2 if mtp_depth else 1, 16))
    return Case(spec=spec, batch=draw(st.integers(1, 2)), seq=seq)
