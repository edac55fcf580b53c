"""`archplan import hf` for model_type stripedhyena: StripedHyena-7B and Evo 1 import exactly.

Fixtures: hf-configs/stripedhyena-7b.json is togethercomputer/StripedHyena-Hessian-7B's config.json;
evo-1-8k-base.json and evo-1-131k-base.json are evo-design/evo `evo/configs/evo-1-*-base_inference.yml`
as JSON (model_type added; rotary_emb_base 10000, the reference model.py's default when the key is
absent). Expected totals are the reference implementation's structure (stripedhyena model.py,
layers.py) spelled out below, and for the 7B the count built from the reference code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archplan.analytic import count_params
from archplan.crosscheck import crosscheck
from archplan.errors import ArchplanError
from archplan.importers import import_hf, spec_from_config
from archplan.resolve import resolve

FIXTURES = Path(__file__).parent / "fixtures" / "hf-configs"


def hyena_block(d: int, inner: int, state: int, k: int = 3) -> int:
    """ParallelGatedConvBlock: 2 RMSNorms, projections D→3D + bias, FIR 3D·k + bias, D, poles and
    residues (D, S, 1, 2) each, out_filter_dense D→D + bias, gated MLP l1, l2, l3 without bias."""
    return 2 * d + (3 * d * d + 3 * d) + (3 * d * k + 3 * d) + d + 2 * (2 * d * state) + (d * d + d) + 3 * d * inner


def attention_block(d: int, inner: int, kv_heads: int, heads: int, qkv_bias: bool, out_bias: bool) -> int:
    head_dim = d // heads
    qkv = d * head_dim * (heads + 2 * kv_heads) + (head_dim * (heads + 2 * kv_heads) if qkv_bias else 0)
    return 2 * d + qkv + d * d + (d if out_bias else 0) + 3 * d * inner


def test_stripedhyena_7b_is_exact() -> None:
    spec = import_hf(FIXTURES / "stripedhyena-7b.json")
    pc = count_params(resolve(spec))
    assert pc.total == 7_646_023_680  # built from the reference code on meta
    assert hyena_block(4096, 14336, 2) == 243_380_224
    assert attention_block(4096, 14336, 8, 32, False, False) == 218_112_000
    assert pc.total == 16 * 243_380_224 + 16 * 218_112_000 + 2 * 32000 * 4096 + 4096
    assert spec.layout.mixers == "HA"
    assert spec.max_seq_len == 32768


@pytest.mark.parametrize("name", ["evo-1-8k-base", "evo-1-131k-base"])
def test_evo_1_is_exact(name: str) -> None:
    """32 layers, attention at 8, 16, 24 (MHA with biases), state 8, tied 512-token embedding, and
    the MLP width ParallelGatedMLP derives: int(2·4096·4/3) = 10922 -> multiple of 16 = 10928."""
    spec = import_hf(FIXTURES / f"{name}.json")
    d, inner = 4096, 10928
    expected = 29 * hyena_block(d, inner, 8) + 3 * attention_block(d, inner, 32, 32, True, True) + 512 * d + d
    assert spec.ffn is not None and spec.ffn.d_ff == inner and spec.ffn.activation == "gelu"
    assert count_params(resolve(spec)).total == expected == 6_452_781_056


def test_evo_131k_uses_linear_rope_interpolation() -> None:
    spec = import_hf(FIXTURES / "evo-1-131k-base.json")
    assert spec.position.kind == "rope" and spec.position.scaling is not None
    assert (spec.position.scaling.kind, spec.position.scaling.factor) == ("linear", 16.0)


def test_a_tiny_stripedhyena_verifies_exactly() -> None:
    config = {"model_type": "stripedhyena", "vocab_size": 60, "hidden_size": 16, "num_layers": 3,
              "num_attention_heads": 4, "proj_groups": 2, "attn_layer_idxs": [1], "hyena_layer_idxs": [0, 2],
              "inner_mlp_size": 24,
              "state_size": 3, "hyena_filter_groups": 4, "max_seqlen": 64, "num_filters": 16}
    spec = spec_from_config(config, file="config.json", name="tiny")
    result = crosscheck(resolve(spec), seq_len=9, batch=2, fvcore=False)
    assert result.ok, result.failures


@pytest.mark.parametrize(("change", "field"), [
    ({"attn_layer_idxs": [40]}, "attn_layer_idxs"),
    ({"smeared_gqa": True}, "smeared_gqa"),
    ({"proj_groups": 3}, "proj_groups"),
    ({"num_filters": 3000}, "num_filters"),
    ({"mystery": 1}, "mystery"),  # an unknown key: refused under --strict (docs/import.md key policy)
    ({"hyena_layer_idxs": [0]}, "layer 2 is in neither"),  # model.get_block raises NotImplementedError
])
def test_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    config = {"model_type": "stripedhyena", "attn_layer_idxs": [1],
              "hyena_layer_idxs": [i for i in range(32) if i != 1], **change}
    with pytest.raises(ArchplanError, match=field):
        spec_from_config(config, file="config.json", name="t", strict=True)


def test_the_published_configs_have_no_unread_key() -> None:
    for name in ("stripedhyena-7b", "evo-1-8k-base", "evo-1-131k-base"):
        spec_from_config(json.loads((FIXTURES / f"{name}.json").read_text()), file=name, name=name, strict=True)


def test_a_config_without_hyena_layers_imports_its_attention_blocks() -> None:
    """Every index in attn_layer_idxs: the reference builds AttentionBlocks only, so the spec has
    no long_conv block (it had one, which the validator refused for want of an H layer)."""
    config = json.loads((FIXTURES / "stripedhyena-7b.json").read_text(encoding="utf-8"))
    config.update(num_layers=2, attn_layer_idxs=[0, 1], hyena_layer_idxs=[])
    spec = spec_from_config(config, file="config.json", name="all-attention", strict=True)
    assert spec.long_conv is None and spec.layout.mixers == "A"
    assert count_params(resolve(spec)).total == 2 * attention_block(4096, 14336, 8, 32, False, False) + 2 * 32000 * 4096 + 4096


def test_the_vocabulary_is_the_configs_and_a_model_without_attention_has_no_positions() -> None:
    """The reference's VocabParallelEmbedding is built with vocab_size as given (only the HF wrapper's
    attribute is padded to make_vocab_size_divisible_by); with no attention block there is no
    rotary to carry."""
    config = json.loads((FIXTURES / "stripedhyena-7b.json").read_text(encoding="utf-8"))
    padded = spec_from_config({**config, "vocab_size": 32001}, file="config.json", name="odd", strict=True)
    assert padded.vocab_size == 32001
    assert count_params(resolve(padded)).total == 7_646_023_680 + 2 * 4096
    hyena_only = spec_from_config({**config, "attn_layer_idxs": [], "hyena_layer_idxs": list(range(32))},
                                  file="config.json", name="hyena", strict=True)
    assert hyena_only.position.kind == "none" and hyena_only.attention is None
    assert hyena_only.layout.mixers == "H"
