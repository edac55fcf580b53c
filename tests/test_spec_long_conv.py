"""Spec validation of the long-convolution mixers: impossible combinations are one error naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from archplan.resolve import HyenaPlan, S4Plan, StripedHyenaPlan, resolve
from archplan.spec import Spec

BASE: dict[str, Any] = {"name": "t", "vocab_size": 32, "d_model": 16, "n_layers": 2, "max_seq_len": 64}


def spec(**fields: Any) -> Spec:
    return Spec.model_validate({**BASE, **fields})


@pytest.mark.parametrize(("fields", "message"), [
    ({"layout": {"mixers": "H"}}, "long_conv"),
    ({"long_conv": {"kind": "s4d"}, "ffn": {"kind": "mlp", "d_ff": 8}, "attention": {"kind": "mha", "n_heads": 2}},
     "no H layer"),
    ({"long_conv": {"kind": "s4d", "d_state": 7}, "layout": {"mixers": "H"}}, "long_conv.d_state"),
    ({"long_conv": {"kind": "s4", "n_ssm": 3}, "layout": {"mixers": "H"}}, "long_conv.n_ssm"),
    ({"long_conv": {"kind": "hyena", "l_max": 32}, "layout": {"mixers": "H"}}, "long_conv.l_max"),
    # required: pydantic before 2.11.5 gave it Mamba-2's chunk_size default (256), another field of
    # the same Annotated type (pyproject.toml's floor)
    ({"long_conv": {"kind": "hyena"}, "layout": {"mixers": "H"}}, r"long_conv\.hyena\.l_max\n  Field required"),
    ({"long_conv": {"kind": "hyena", "l_max": 64, "emb_dim": 4}, "layout": {"mixers": "H"}}, "emb_dim"),
    ({"long_conv": {"kind": "hyena", "l_max": 64, "order": 1}, "layout": {"mixers": "H"}}, "order"),
    ({"long_conv": {"kind": "stripedhyena", "filter_groups": 3}, "layout": {"mixers": "H"}}, "long_conv.filter_groups"),
    ({"long_conv": {"kind": "mamba1"}, "layout": {"mixers": "H"}}, "long_conv"),
])
def test_impossible_combinations_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


def test_h_layers_mix_with_attention_mamba_and_moe() -> None:
    s = spec(
        n_layers=8,
        attention={"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
        ssm={"kind": "mamba2", "head_dim": 8},
        long_conv={"kind": "hyena", "l_max": 64},
        ffn={"kind": "glu", "d_ff": 32},
        moe={"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 8}},
        layout={"mixers": "MHAH", "moe_every": 2, "moe_offset": 1},
    )
    kinds = [type(layer.mixer).__name__ for layer in resolve(s).layers]
    assert kinds[:4] == ["Mamba2Plan", "HyenaPlan", "AttentionPlan", "HyenaPlan"]


def test_resolve_gives_final_integers() -> None:
    s4 = resolve(spec(long_conv={"kind": "s4", "d_state": 8}, layout={"mixers": "H"})).layers[0].mixer
    assert s4 == S4Plan(dplr=True, d_state=8, n_ssm=16, ssm_buffers=False)
    hyena = resolve(spec(long_conv={"kind": "hyena", "l_max": 64}, layout={"mixers": "H"})).layers[0].mixer
    assert isinstance(hyena, HyenaPlan) and hyena.order == 2 and hyena.l_max == 64
    striped = resolve(spec(long_conv={"kind": "stripedhyena"}, layout={"mixers": "H"})).layers[0].mixer
    assert striped == StripedHyenaPlan(short_filter=3, short_filter_bias=True, state_size=2, filter_groups=1)
