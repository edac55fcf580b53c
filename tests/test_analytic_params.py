"""Analytic parameter counts, component by component, against docs/formulas.md §1 worked examples."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from archplan.analytic import count_params
from archplan.analytic.model import ParamCount
from archplan.loader import load_spec
from archplan.resolve import resolve
from archplan.spec import Spec


def count(**fields: Any) -> ParamCount:
    return count_params(resolve(Spec.model_validate({"name": "t", **fields})))


def llama_like(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": 1000, "d_model": 256, "n_layers": 2,
        "attention": {"kind": "gqa", "n_heads": 8, "n_kv_heads": 2},
        "ffn": {"kind": "glu", "d_ff": 688},
    }
    base.update(over)
    return base


def test_mamba_130m() -> None:
    """docs/formulas.md §1.8: 3,771,648 per layer; 129,135,360 total (HF MambaForCausalLM on meta)."""
    p = count(vocab_size=50280, d_model=768, n_layers=24, position={"kind": "none"},
              ssm={"kind": "mamba1"}, layout={"mixers": "M"}, embedding={"tied": True})
    assert p.by_component["layers.0.mixer"] + p.by_component["layers.0.norm1"] == 3_771_648
    assert "layers.0.norm2" not in p.by_component and "layers.0.ffn" not in p.by_component
    assert p.total == 129_135_360
    assert p.lm_head == 0 and p.non_embedding == 129_135_360 - 50280 * 768


def test_mamba2_130m() -> None:
    """docs/formulas.md §1.9: 3,765,320 per layer; 128,989,632 total (HF Mamba2ForCausalLM on meta)."""
    p = count(vocab_size=50288, d_model=768, n_layers=24, position={"kind": "none"},
              ssm={"kind": "mamba2"}, layout={"mixers": "M"}, embedding={"tied": True})
    assert p.by_component["layers.0.mixer"] + p.by_component["layers.0.norm1"] == 3_765_320
    assert p.total == 128_989_632


def test_deepseek_v3_mla_layer() -> None:
    p = count_params(resolve(load_spec("deepseek-v3")))
    assert p.by_component["layers.0.mixer"] == 187_107_328
    assert p.by_component["layers.3.ffn.router"] == 256 * 7168  # the correction bias is a buffer
    assert p.by_component["layers.3.ffn.shared"] == 3 * 7168 * 2048
    assert p.by_component["layers.3.ffn.experts"] == 256 * 3 * 7168 * 2048
    assert p.active_by_component["layers.3.ffn.experts"] == 8 * 3 * 7168 * 2048
    assert p.by_component["layers.2.ffn"] == 3 * 7168 * 18432


def test_mla_without_q_lora() -> None:
    """DeepSeek-V2-Lite style: a plain q_proj, no q latent norm."""
    mla = {"kind": "mla", "n_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
           "qk_rope_head_dim": 8, "v_head_dim": 16}
    p = count(**llama_like(attention=mla))
    d = 256
    expected = d * 4 * 24 + d * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * d
    assert p.by_component["layers.0.mixer"] == expected


def test_llama_3_8b_components_and_matmul() -> None:
    p = count_params(resolve(load_spec("llama-3-8b")))
    assert p.by_component["layers.0.mixer"] == 41_943_040
    assert p.by_component["layers.0.ffn"] == 176_160_768
    assert p.by_component["layers.0.norm1"] == p.by_component["layers.0.norm2"] == 4096
    assert p.matmul == 7_504_658_432  # docs/formulas.md §2.4: 6·P_matmul = 45,027,950,592
    assert p.matmul == p.matmul_active


def test_falcon_mqa_parallel_shared_norm() -> None:
    p = count_params(resolve(load_spec("falcon-7b")))
    assert p.by_component["layers.0.mixer"] == 41_877_504  # docs/formulas.md §1.3
    assert p.by_component["layers.0.ffn"] == 165_183_488  # §1.5, no bias
    assert p.by_component["layers.0.norm1"] == 2 * 4544
    assert "layers.0.norm2" not in p.by_component
    # tied: the head adds no parameters but its weight is still a per-token matmul
    assert p.by_component["lm_head"] == 0 and p.lm_head == 0
    assert p.matmul - 65024 * 4544 == sum(
        p.by_component[f"layers.{i}.{c}"] for i in range(32) for c in ("mixer", "ffn")
    )


def test_gpt2_biases_and_learned_positions() -> None:
    p = count_params(resolve(load_spec("gpt2")))
    assert p.by_component["pos_embed"] == p.position_embedding == 1024 * 768
    assert p.by_component["layers.0.mixer"] == 4 * 768 * 768 + 3 * 768 + 768
    assert p.by_component["layers.0.ffn"] == 4_722_432  # docs/formulas.md §1.5
    assert p.by_component["final_norm"] == 2 * 768


def test_bloom_embedding_norm() -> None:
    p = count_params(resolve(load_spec("bloom-560m")))
    assert p.by_component["embed_norm"] == 2 * 1024
    assert list(p.by_component)[:3] == ["embed", "embed_norm", "layers.0.norm1"]


def test_component_order_and_keys() -> None:
    p = count(**llama_like())
    assert list(p.by_component) == [
        "embed", "layers.0.norm1", "layers.0.mixer", "layers.0.norm2", "layers.0.ffn",
        "layers.1.norm1", "layers.1.mixer", "layers.1.norm2", "layers.1.ffn", "final_norm", "lm_head",
    ]
    assert p.by_component.keys() == p.active_by_component.keys()
    assert p.total == sum(p.by_component.values())


@pytest.mark.parametrize(
    ("scope", "norm", "expected"),
    [
        ("head", {"kind": "rmsnorm"}, 2 * 32),
        ("per_head", {"kind": "rmsnorm"}, (8 + 2) * 32),
        ("full", {"kind": "rmsnorm"}, 8 * 32 + 2 * 32),
        ("head", {"kind": "layernorm"}, 2 * 2 * 32),
        ("full", {"kind": "layernorm", "bias": False}, 8 * 32 + 2 * 32),
    ],
)
def test_qk_norm_scopes(scope: str, norm: dict[str, Any], expected: int) -> None:
    base = count(**llama_like()).by_component["layers.0.mixer"]
    attn = {"kind": "gqa", "n_heads": 8, "n_kv_heads": 2, "qk_norm": {"scope": scope, "norm": norm}}
    assert count(**llama_like(attention=attn)).by_component["layers.0.mixer"] - base == expected


def test_attention_biases_and_explicit_head_dim() -> None:
    attn = {"kind": "gqa", "n_heads": 8, "n_kv_heads": 2, "head_dim": 48, "qkv_bias": True, "out_bias": True}
    p = count(**llama_like(attention=attn))
    q, kv, d = 8 * 48, 2 * 48, 256
    assert p.by_component["layers.0.mixer"] == 2 * d * q + 2 * d * kv + q + 2 * kv + d


@pytest.mark.parametrize(
    ("ffn", "expected"),
    [
        ({"kind": "mlp", "d_ff": 100}, 2 * 256 * 100),
        ({"kind": "mlp", "d_ff": 100, "bias": True}, 2 * 256 * 100 + 100 + 256),
        ({"kind": "glu", "d_ff": 100}, 3 * 256 * 100),
        ({"kind": "glu", "d_ff": 100, "bias": True, "activation": "gelu"}, 3 * 256 * 100 + 200 + 256),
    ],
)
def test_ffn_variants(ffn: dict[str, Any], expected: int) -> None:
    assert count(**llama_like(ffn=ffn)).by_component["layers.1.ffn"] == expected


def test_moe_shared_gate_router_bias_and_layout() -> None:
    moe = {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 64},
           "shared": {"n": 2, "d_ff": 32, "gate": True}, "router": {"bias": True}}
    p = count(**llama_like(n_layers=4, moe=moe, layout={"moe_every": 2, "moe_offset": 1}))
    d, expert = 256, 3 * 256 * 64
    assert "layers.0.ffn" in p.by_component and "layers.0.ffn.router" not in p.by_component
    assert p.by_component["layers.1.ffn.router"] == d * 4 + 4
    assert p.by_component["layers.1.ffn.experts"] == 4 * expert
    assert p.by_component["layers.1.ffn.shared"] == 3 * d * 64  # n·d_ff = 64 wide
    assert p.by_component["layers.1.ffn.shared_gate"] == d
    assert p.total - p.active == 2 * (4 - 2) * expert
    assert p.matmul - p.matmul_active == 2 * (4 - 2) * expert


def test_mamba1_options() -> None:
    """Jamba's dt/B/C norms add dt_rank + 2N; proj biases add 2·d_inner + D; no conv bias removes d_inner."""
    def mixer(**ssm: Any) -> int:
        spec = llama_like(position={"kind": "none"}, ssm={"kind": "mamba1", **ssm},
                          layout={"mixers": "MA"})
        return count(**spec).by_component["layers.0.mixer"]

    base = mixer()
    assert mixer(inner_norms=True) - base == 16 + 2 * 16  # dt_rank auto = ceil(256/16)
    assert mixer(proj_bias=True) - base == 2 * 512 + 256
    assert base - mixer(conv_bias=False) == 512


def test_deepnorm_sandwich_reordered_norm_names() -> None:
    sandwich = count(**llama_like(residual={"kind": "sandwich"}))
    assert [k for k in sandwich.by_component if k.startswith("layers.0.")] == [
        "layers.0.norm1", "layers.0.mixer", "layers.0.post_norm1", "layers.0.norm2",
        "layers.0.ffn", "layers.0.post_norm2",
    ]
    reordered = count(**llama_like(residual={"kind": "reordered"}))
    assert "layers.0.post_norm2" in reordered.by_component
    assert count(**llama_like(residual={"kind": "deepnorm"})).total == count(**llama_like()).total


def test_lm_head_bias_and_untied() -> None:
    tied = count(**llama_like(embedding={"tied": True, "lm_head_bias": True}))
    assert tied.lm_head == tied.by_component["lm_head"] == 1000
    untied = count(**llama_like(embedding={"lm_head_bias": True}))
    assert untied.lm_head == 1000 * 256 + 1000
    assert untied.total - tied.total == 1000 * 256
    assert untied.non_embedding == tied.non_embedding


def test_analytic_never_imports_torch() -> None:
    code = "import sys, archplan.analytic; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
