"""Dense FFNs (archplan/modules/ffn.py) built from their spec: each kind's forward is its defining
formula, with every activation the spec accepts taken from torch here, never from the module."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from archplan import spec
from archplan.modules.ffn import build_ffn
from archplan.resolve import ffn_plan

D, D_FF = 16, 24

# what each spec name means: gelu is the exact erf GELU, gelu_tanh GPT-2's tanh approximation
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}
KINDS: dict[str, type[spec.MLP] | type[spec.GLU]] = {"mlp": spec.MLP, "glu": spec.GLU}


def test_every_spec_kind_and_activation_has_a_reference() -> None:
    """A kind or activation added to the spec fails here until `ACTIVATIONS` / `KINDS` (and so
    the forward test below) cover it."""
    union = get_args(get_args(spec.FFN)[0])
    assert {get_args(kind.model_fields["kind"].annotation)[0]: kind for kind in union} == KINDS
    for kind in union:
        assert set(get_args(kind.model_fields["activation"].annotation)) == set(ACTIVATIONS)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ffn_forward_is_its_formula(kind: str, act: str, bias: bool) -> None:
    """mlp = down(act(up(x))) (Vaswani et al. 2017, eq. 2) and glu = down(act(gate(x)) ⊙ up(x))
    (Shazeer 2020, eq. 5-6), with the module's own random weights and biases (fp64): catches a spec
    name mapped to the wrong torch function (relu/gelu/silu mixed up, exact and tanh GELU swapped),
    the activation put on GLU's up branch instead of its gate, and a bias the spec asks for dropped."""
    torch.manual_seed(0)
    module = build_ffn(ffn_plan(KINDS[kind](d_ff=D_FF, activation=act, bias=bias)), D).double()
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (3 if kind == "glu" else 2)
    assert all((linear.bias is not None) == bias for linear in linears)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    f = ACTIVATIONS[act]

    def linear(name: str, h: torch.Tensor) -> torch.Tensor:
        proj = getattr(module, name)
        return F.linear(h, proj.weight, proj.bias)

    with torch.no_grad():
        hidden = f(linear("up_proj", x)) if kind == "mlp" else f(linear("gate_proj", x)) * linear("up_proj", x)
        torch.testing.assert_close(module(x), linear("down_proj", hidden), rtol=1e-12, atol=1e-12)
