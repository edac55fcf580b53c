"""The whole model: module paths, numel per component against transformers' counts, FLOPs on meta,
every residual wiring, tied heads, DeepNorm init, devices."""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.modules.attention import Attention
from archplan.modules.ffn import GLU
from archplan.modules.mla import MLA
from archplan.modules.model import ArchplanModel, build_model
from archplan.modules.moe import MoEFFN
from archplan.modules.norms import LayerNorm, RMSNorm
from archplan.modules.positions import RotaryEmbedding
from archplan.resolve import resolve
from archplan.spec import Spec

EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "expected.json").read_text())["models"]


def tiny(**overrides: Any) -> Spec:
    base: dict[str, Any] = dict(
        name="tiny", vocab_size=50, d_model=32, n_layers=2, max_seq_len=64,
        attention=dict(kind="gqa", n_heads=4, n_kv_heads=2), ffn=dict(kind="glu", d_ff=48),
    )
    base.update(overrides)
    return Spec.model_validate(base)


def buckets(model: ArchplanModel) -> dict[str, int]:
    """numel by the buckets of tests/fixtures/expected.json `breakdown`, from module types only."""
    out: dict[str, int] = defaultdict(int)

    def add(bucket: str, module: nn.Module | None) -> None:
        if module is not None:
            out[bucket] += sum(p.numel() for p in module.parameters())

    add("embedding", model.embed)
    add("position_embedding", model.pos_embed)
    add("norm", model.embed_norm)
    add("norm", model.final_norm)
    if not model.plan.tied:
        add("lm_head", model.lm_head)
    for block, layer in zip(model.layers, model.plan.layers):
        for name in layer.norms:
            add("norm", getattr(block, name))
        add("attention" if isinstance(block.mixer, (Attention, MLA)) else "ssm", block.mixer)
        if isinstance(block.ffn, MoEFFN):
            add("moe_router", block.ffn.router)
            add("moe_routed_experts", block.ffn.experts)
            add("moe_shared_experts", block.ffn.shared)
            add("moe_shared_experts", block.ffn.shared_gate)
        else:
            add("mlp", block.ffn)
    return {k: v for k, v in out.items() if v}


PRESETS = {
    "gpt2": "gpt2",
    "llama-2-7b": "llama-2-7b",
    "llama-3-8b": "llama-3-8b",
    "llama-3-70b": "llama-3-70b",
    "mistral-7b": "mistral-7b-v0.1",
    "mixtral-8x7b": "mixtral-8x7b-v0.1",
    "deepseek-v3": "deepseek-v3",
    "falcon-7b": "falcon-7b",
    "bloom-560m": "bloom-560m",
    "qwen2.5-7b": "qwen2.5-7b",
    "gemma-2b": "gemma-2b",
    "jamba-v0.1": "jamba-v0.1",
    "mamba-2.8b": "mamba-2.8b",
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_numel_per_component_matches_transformers(preset: str) -> None:
    """Meta build of each preset == transformers' meta build of the HF config, bucket by bucket."""
    expected = EXPECTED[PRESETS[preset]]
    model = build_model(load_spec(preset))
    assert buckets(model) == expected["breakdown"]
    assert sum(p.numel() for p in model.parameters()) == expected["total_params"]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_module_paths_are_the_contract() -> None:
    """docs/architecture.md: parameter names start with the component paths."""
    model = build_model(tiny(position=dict(kind="learned"), embedding=dict(norm=True, lm_head_bias=True)))
    names = {n for n, _ in model.named_parameters()}
    assert {"embed.weight", "pos_embed.weight", "embed_norm.weight", "final_norm.weight", "lm_head.weight",
            "lm_head.bias", "layers.0.norm1.weight", "layers.0.norm2.weight",
            "layers.1.mixer.q_proj.weight", "layers.1.ffn.down_proj.weight"} <= names
    roots = {n.split(".")[0] for n in names}
    assert roots == {"embed", "pos_embed", "embed_norm", "layers", "final_norm", "lm_head"}


def test_deepseek_v3_builds_on_meta() -> None:
    """671B parameters, nothing allocated; MLA + 256-expert MoE layers, first 3 dense."""
    spec = Spec.model_validate(dict(
        name="deepseek-v3-inline", vocab_size=129280, d_model=7168, n_layers=61, max_seq_len=163840,
        position=dict(kind="rope", theta=10000.0, scaling=dict(
            kind="yarn", factor=40.0, original_max_positions=4096, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)),
        norm=dict(kind="rmsnorm", eps=1e-6),
        attention=dict(kind="mla", n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        ffn=dict(kind="glu", d_ff=18432),
        moe=dict(n_experts=256, top_k=8, expert=dict(kind="glu", d_ff=2048), shared=dict(n=1, d_ff=2048),
                 router=dict(scoring="sigmoid", score_correction_bias=True, scale=2.5)),
        layout=dict(first_dense=3),
    ))
    model = build_model(spec)
    # nothing allocated: every parameter and buffer is a meta tensor
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == EXPECTED["deepseek-v3"]["total_params"]
    assert isinstance(model.layers[0].mixer, MLA) and not isinstance(model.layers[2].ffn, MoEFFN)
    assert isinstance(model.layers[3].ffn, MoEFFN)
    logits = model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 4, 129280) and logits.device.type == "meta"


def _matmul_params(model: ArchplanModel) -> int:
    """Weights of every Linear (one per-token matmul each), plus embed.weight once more when the
    head is tied to it; embedding lookups and norms are not matmuls."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear + (model.embed.weight.numel() if model.plan.tied else 0)


DENSE_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa_rope": {},
    "mha_alibi": dict(position=dict(kind="alibi"), attention=dict(kind="mha", n_heads=4, qkv_bias=True)),
    "mqa_learned_tied": dict(position=dict(kind="learned"), embedding=dict(tied=True, lm_head_bias=True),
                             attention=dict(kind="mqa", n_heads=4, out_bias=True)),
    "sinusoidal_mlp": dict(position=dict(kind="sinusoidal"), ffn=dict(kind="mlp", d_ff=40, activation="relu")),
    "window": dict(attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, sliding_window=3),
                   layout=dict(mixers="SA")),
    "qk_norm_partial": dict(position=dict(kind="rope", fraction=0.5),
                            attention=dict(kind="gqa", n_heads=4, n_kv_heads=2, head_dim=12,
                                           qk_norm=dict(scope="per_head"))),
}


@pytest.mark.parametrize("variant", sorted(DENSE_VARIANTS))
def test_meta_forward_flops(variant: str) -> None:
    """docs/architecture.md: 2·B·T·P_matmul + Σ_layers 2·B·T²·H·(Dqk + Dv), and no other counted op."""
    spec = tiny(**DENSE_VARIANTS[variant])
    model = build_model(spec)
    b, t = 2, 7
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(b, t, dtype=torch.long, device="meta"))
    core = 0
    for layer in resolve(spec).layers:
        assert isinstance(layer.mixer, type(resolve(spec).layers[0].mixer))
        core += 2 * b * t * t * layer.mixer.n_heads * 2 * layer.mixer.head_dim  # type: ignore[union-attr]
    assert counter.get_total_flops() == 2 * b * t * _matmul_params(model) + core
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert ops <= {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}


RESIDUALS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "pre": (dict(kind="pre"), ("norm1", "norm2")),
    "post": (dict(kind="post"), ("norm1", "norm2")),
    "deepnorm": (dict(kind="deepnorm"), ("norm1", "norm2")),
    "parallel_shared": (dict(kind="parallel", shared_norm=True), ("norm1",)),
    "parallel_two": (dict(kind="parallel", shared_norm=False), ("norm1", "norm2")),
    "sandwich": (dict(kind="sandwich"), ("norm1", "post_norm1", "norm2", "post_norm2")),
    "reordered": (dict(kind="reordered"), ("post_norm1", "post_norm2")),
}


@pytest.mark.parametrize("residual", sorted(RESIDUALS))
def test_every_residual_builds_runs_and_is_causal(residual: str) -> None:
    wiring, norms = RESIDUALS[residual]
    spec = tiny(residual=wiring, norm=dict(kind="layernorm", bias=False))
    torch.manual_seed(0)
    model = build_model(spec, device="cpu")
    block = model.layers[0]
    for name in norms:
        assert isinstance(getattr(block, name), LayerNorm)
    n_norm_params = sum(p.numel() for n, p in block.named_parameters() if n.split(".")[0] in norms)
    assert n_norm_params == len(norms) * 32
    tokens = torch.randint(0, 50, (2, 8))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 50
    with torch.no_grad():
        y, y2 = model(tokens), model(changed)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, :5], y2[:, :5], rtol=0, atol=1e-5)
    assert not torch.allclose(y[:, 5], y2[:, 5])


# Each residual's block output, written from its paper with the block's own sublayers (f: mixer,
# g: FFN). Norms get random weights and biases first, so a block that feeds a sublayer the wrong
# norm, or the wrong tensor, cannot agree by the init's identical unit norms.
WIRINGS: dict[str, tuple[dict[str, Any], Callable[[nn.Module, Tensor], Tensor]]] = {
    # Xiong et al. 2020: h = x + f(n1(x)); y = h + g(n2(h))
    "pre": (dict(kind="pre"), lambda b, x: (h := x + b.mixer(b.norm1(x))) + b.ffn(b.norm2(h))),
    # Vaswani et al. 2017: h = n1(x + f(x)); y = n2(h + g(h))
    "post": (dict(kind="post"), lambda b, x: b.norm2((h := b.norm1(x + b.mixer(x))) + b.ffn(h))),
    # Wang et al. 2022 (DeepNet), eq. 3: post-norm with the residual scaled by α
    "deepnorm": (dict(kind="deepnorm", alpha=1.7),
                 lambda b, x: b.norm2(1.7 * (h := b.norm1(1.7 * x + b.mixer(x))) + b.ffn(h))),
    # GPT-J / PaLM: y = x + f(n(x)) + g(n(x)), one norm
    "parallel_shared": (dict(kind="parallel", shared_norm=True),
                        lambda b, x: x + b.mixer(b.norm1(x)) + b.ffn(b.norm1(x))),
    # GPT-NeoX: y = x + f(n1(x)) + g(n2(x))
    "parallel_two": (dict(kind="parallel", shared_norm=False),
                     lambda b, x: x + b.mixer(b.norm1(x)) + b.ffn(b.norm2(x))),
    # Gemma 2: h = x + pn1(f(n1(x))); y = h + pn2(g(n2(h)))
    "sandwich": (dict(kind="sandwich"),
                 lambda b, x: (h := x + b.post_norm1(b.mixer(b.norm1(x)))) + b.post_norm2(b.ffn(b.norm2(h)))),
    # OLMo 2: h = x + pn1(f(x)); y = h + pn2(g(h))
    "reordered": (dict(kind="reordered"),
                  lambda b, x: (h := x + b.post_norm1(b.mixer(x))) + b.post_norm2(b.ffn(h))),
}


def test_every_residual_has_a_wiring_test() -> None:
    assert set(WIRINGS) == set(RESIDUALS)


@pytest.mark.parametrize("residual", sorted(WIRINGS))
def test_residual_wiring_against_its_paper(residual: str) -> None:
    wiring, expected = WIRINGS[residual]
    torch.manual_seed(4)
    model = build_model(tiny(residual=wiring, n_layers=1, norm=dict(kind="layernorm")), device="cpu")
    block = model.layers[0]
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name.split(".")[0]:
                param.copy_(torch.randn_like(param))
        x = torch.randn(2, 5, 32)
        torch.testing.assert_close(block(x), expected(block, x))
    # every parameter takes part: a norm built but never applied (norm2 left out) has no gradient
    block(torch.randn(2, 5, 32)).square().sum().backward()
    unused = [name for name, param in block.named_parameters() if param.grad is None or not param.grad.any()]
    assert not unused


def test_deepnorm_beta_init() -> None:
    """DeepNet: v/o projections and FFN matrices scaled by β = (8L)^(-1/4); q/k untouched."""
    spec_pre = tiny(n_layers=2)
    spec_deep = tiny(n_layers=2, residual=dict(kind="deepnorm"))
    beta = (8 * 2) ** -0.25
    torch.manual_seed(5)
    plain = build_model(spec_pre, device="cpu")
    torch.manual_seed(5)
    deep = build_model(spec_deep, device="cpu")
    for a, b in zip(plain.layers, deep.layers):
        assert isinstance(a.mixer, Attention) and isinstance(b.mixer, Attention)
        torch.testing.assert_close(b.mixer.q_proj.weight, a.mixer.q_proj.weight)
        torch.testing.assert_close(b.mixer.v_proj.weight, beta * a.mixer.v_proj.weight)
        torch.testing.assert_close(b.mixer.o_proj.weight, beta * a.mixer.o_proj.weight)
        assert isinstance(a.ffn, GLU) and isinstance(b.ffn, GLU)
        for name in ("gate_proj", "up_proj", "down_proj"):  # every FFN matrix (torchscale's fc1 and fc2)
            torch.testing.assert_close(getattr(b.ffn, name).weight, beta * getattr(a.ffn, name).weight)


def test_deepnorm_beta_scales_mla_values_and_is_refused_beside_ssm_mixers() -> None:
    """MLA's values are kv_b_proj's W_UV rows (v = W_UV·c_kv): only o_proj was scaled, its keys' W_UK
    rows must not be. A Mamba, S4 or Hyena layer has no β in DeepNet, and was left unscaled while
    accepted (a pure SSM model's β changed nothing): the spec refuses deepnorm there."""
    mla = dict(kind="mla", n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=6)
    beta = (8 * 2) ** -0.25
    torch.manual_seed(5)
    plain = build_model(tiny(attention=mla), device="cpu")
    torch.manual_seed(5)
    deep = build_model(tiny(attention=mla, residual=dict(kind="deepnorm")), device="cpu")
    for a, b in zip(plain.layers, deep.layers):
        w_a, w_b = (m.mixer.kv_b_proj.weight.view(2, 4 + 6, 8) for m in (a, b))
        torch.testing.assert_close(w_b[:, :4], w_a[:, :4])  # W_UK: keys, as q/k, untouched
        torch.testing.assert_close(w_b[:, 4:], beta * w_a[:, 4:])  # W_UV: values
        torch.testing.assert_close(b.mixer.o_proj.weight, beta * a.mixer.o_proj.weight)
        torch.testing.assert_close(b.mixer.q_proj.weight, a.mixer.q_proj.weight)
    for mixer in (dict(ssm=dict(kind="mamba1"), layout=dict(mixers="AM")),
                  dict(long_conv=dict(kind="hyena", l_max=64), layout=dict(mixers="AH"))):
        with pytest.raises(ValueError, match="DeepNet defines none for the SSM or long-convolution mixers"):
            tiny(residual=dict(kind="deepnorm"), **mixer)

def test_tied_head_shares_the_embedding() -> None:
    model = build_model(tiny(embedding=dict(tied=True, lm_head_bias=True)), device="cpu")
    assert [n for n, _ in model.lm_head.named_parameters()] == ["bias"]
    x = torch.randint(0, 50, (1, 3))
    with torch.no_grad():
        model.lm_head.bias.fill_(0.5)
        logits = model(x)
        hidden = model.final_norm(model.layers[1](model.layers[0](model.embed(x))))
    torch.testing.assert_close(logits, hidden @ model.embed.weight.T + 0.5)
    untied = build_model(tiny(), device="cpu")
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 50 * 32 - 50


def test_dtypes_and_buffers() -> None:
    meta = build_model(tiny())
    assert meta.embed.weight.dtype == torch.bfloat16
    cpu = build_model(tiny(), device="cpu")
    assert cpu.embed.weight.dtype == torch.float32
    half = build_model(tiny(), device="cpu", dtype=torch.bfloat16)
    rope = [m for m in half.modules() if isinstance(m, RotaryEmbedding)]
    assert rope and all(m.inv_freq.dtype == torch.float32 for m in rope)
    assert all(isinstance(m, RMSNorm) for m in (half.final_norm, half.layers[0].norm1))
    # meta → to_empty → reset_buffers recovers the tables a direct build computes
    lazy = meta.to_empty(device="cpu")
    lazy.reset_buffers()
    assert torch.equal(lazy.layers[0].mixer.rotary.inv_freq, cpu.layers[0].mixer.rotary.inv_freq)
    assert not any(isinstance(b, torch.Tensor) and b.requires_grad for b in cpu.buffers())


def test_bad_devices_are_user_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ArchplanError, match="CUDA"):
            build_model(tiny(), device="cuda")
    with pytest.raises(ArchplanError, match="device"):
        build_model(tiny(), device="no-such-device")


def test_dense_aux_loss_is_zero() -> None:
    model = build_model(tiny(), device="cpu")
    model(torch.randint(0, 50, (1, 4)))
    assert model.aux_loss().item() == 0.0


def test_moe_aux_loss_sums_layers() -> None:
    spec = tiny(moe=dict(n_experts=4, top_k=2, expert=dict(kind="glu", d_ff=16), aux_loss_coef=0.1),
                layout=dict(moe_every=2, moe_offset=1), n_layers=4)
    model = build_model(spec, device="cpu")
    model(torch.randint(0, 50, (2, 6)))
    moe = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoEFFN)]
    assert len(moe) == 2
    expected = sum(m.last_aux_loss for m in moe)
    torch.testing.assert_close(model.aux_loss(), expected.float())
    assert model.aux_loss().item() > 0


# fvcore traces with torch.jit, which warns of its own deprecation the first time in a process
# (crosscheck silences it; here it depends on which test of the worker traced first)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("variant", ["gqa_rope", "mqa_learned_tied", "window"])
def test_fvcore_traces_the_model(variant: str) -> None:
    """fvcore JIT-traces the forward (GQA flags are Python bools) and counts every Linear:
    its multiply-adds × 2 equal 2·B·T·P_matmul; SDPA is the op it skips (docs/formulas.md §2.7)."""
    from fvcore.nn import FlopCountAnalysis

    model = build_model(tiny(**DENSE_VARIANTS[variant]), device="cpu").eval()
    tokens = torch.randint(0, 50, (2, 5))
    analysis = FlopCountAnalysis(model, tokens).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert 2 * analysis.total() == 2 * 2 * 5 * _matmul_params(model)
    assert "aten::scaled_dot_product_attention" in analysis.unsupported_ops()


# --------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers (optional dependency): the same random weights give the
# same logits, which pins every convention (RoPE layout and scalings, ALiBi, MLA, qk-norms,
# residual wirings, fused-QKV layouts) to the reference implementations.

HF = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, rms_norm_eps=1e-5)
OURS: dict[str, Any] = dict(name="parity", vocab_size=50, d_model=32, n_layers=2, max_seq_len=64,
                            ffn=dict(kind="glu", d_ff=48))
StateDict = dict[str, torch.Tensor]


def _renamer(pairs: list[tuple[str, str]]) -> Callable[[StateDict], StateDict]:
    """HF name → ours for every layer, weight and bias; `{i}` is the layer index."""
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight",
           "model.norm.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}

    def convert(sd: StateDict) -> StateDict:
        out = {ours: sd[hf] for hf, ours in top.items() if hf in sd}
        for i in range(2):
            for hf, ours in pairs:
                for suffix in ("weight", "bias"):
                    key = f"{hf.format(i=i)}.{suffix}"
                    if key in sd:
                        out[f"{ours.format(i=i)}.{suffix}"] = sd[key]
        return out

    return convert


def _llama_pairs(norms: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    attn = [(f"model.layers.{{i}}.self_attn.{n}", f"layers.{{i}}.mixer.{n}")
            for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
    mlp = [(f"model.layers.{{i}}.mlp.{n}", f"layers.{{i}}.ffn.{n}") for n in ("gate_proj", "up_proj", "down_proj")]
    return attn + mlp + [(f"model.layers.{{i}}.{hf}", f"layers.{{i}}.{ours}") for hf, ours in norms]


PRE_NORMS = (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"))
MLA_PAIRS = [(f"model.layers.{{i}}.self_attn.{hf}", f"layers.{{i}}.mixer.{ours}") for hf, ours in [
    ("q_a_proj", "q_a_proj"), ("q_a_layernorm", "q_a_norm"), ("q_b_proj", "q_b_proj"), ("q_proj", "q_proj"),
    ("kv_a_proj_with_mqa", "kv_a_proj_with_mqa"), ("kv_a_layernorm", "kv_a_norm"), ("kv_b_proj", "kv_b_proj"),
    ("o_proj", "o_proj")]]


def _gpt2(sd: StateDict) -> StateDict:
    """GPT-2 Conv1D weights are (in, out): transpose; c_attn stacks q, k, v."""
    out = {"embed.weight": sd["transformer.wte.weight"], "pos_embed.weight": sd["transformer.wpe.weight"],
           "final_norm.weight": sd["transformer.ln_f.weight"], "final_norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(2):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        for name, w, b in zip("qkv", sd[p + "attn.c_attn.weight"].T.chunk(3), sd[p + "attn.c_attn.bias"].chunk(3)):
            out[o + f"mixer.{name}_proj.weight"], out[o + f"mixer.{name}_proj.bias"] = w, b
        for hf, ours in (("attn.c_proj", "mixer.o_proj"), ("mlp.c_fc", "ffn.up_proj"), ("mlp.c_proj", "ffn.down_proj")):
            out[o + ours + ".weight"], out[o + ours + ".bias"] = sd[p + hf + ".weight"].T, sd[p + hf + ".bias"]
        for hf, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[o + ours + ".weight"], out[o + ours + ".bias"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
    return out


def _bloom(sd: StateDict, heads: int = 6, head_dim: int = 8, d: int = 48) -> StateDict:
    """BLOOM's fused query_key_value rows are grouped per head: (H, 3, Dh)."""
    out = {"embed.weight": sd["transformer.word_embeddings.weight"]}
    for s in ("weight", "bias"):
        out[f"embed_norm.{s}"] = sd[f"transformer.word_embeddings_layernorm.{s}"]
        out[f"final_norm.{s}"] = sd[f"transformer.ln_f.{s}"]
    for i in range(2):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        w = sd[p + "self_attention.query_key_value.weight"].view(heads, 3, head_dim, d)
        b = sd[p + "self_attention.query_key_value.bias"].view(heads, 3, head_dim)
        for j, name in enumerate("qkv"):
            out[o + f"mixer.{name}_proj.weight"] = w[:, j].reshape(heads * head_dim, d)
            out[o + f"mixer.{name}_proj.bias"] = b[:, j].reshape(heads * head_dim)
        for hf, ours in (("self_attention.dense", "mixer.o_proj"), ("mlp.dense_h_to_4h", "ffn.up_proj"),
                         ("mlp.dense_4h_to_h", "ffn.down_proj"), ("input_layernorm", "norm1"),
                         ("post_attention_layernorm", "norm2")):
            for s in ("weight", "bias"):
                out[o + f"{ours}.{s}"] = sd[p + f"{hf}.{s}"]
    return out


def _falcon(sd: StateDict, heads: int = 4, head_dim: int = 8) -> StateDict:
    """Falcon-7B MQA fused rows: all query heads, then the one key head, then the one value head."""
    out = {"embed.weight": sd["transformer.word_embeddings.weight"],
           "final_norm.weight": sd["transformer.ln_f.weight"], "final_norm.bias": sd["transformer.ln_f.bias"]}
    q = heads * head_dim
    for i in range(2):
        p, o = f"transformer.h.{i}.", f"layers.{i}."
        w = sd[p + "self_attention.query_key_value.weight"]
        out[o + "mixer.q_proj.weight"], out[o + "mixer.k_proj.weight"] = w[:q], w[q : q + head_dim]
        out[o + "mixer.v_proj.weight"] = w[q + head_dim :]
        out[o + "mixer.o_proj.weight"] = sd[p + "self_attention.dense.weight"]
        out[o + "ffn.up_proj.weight"] = sd[p + "mlp.dense_h_to_4h.weight"]
        out[o + "ffn.down_proj.weight"] = sd[p + "mlp.dense_4h_to_h.weight"]
        out[o + "norm1.weight"], out[o + "norm1.bias"] = sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"]
    return out


def _stablelm(sd: StateDict) -> StateDict:
    """StableLM's per-head q/k LayerNorms are a ModuleList of norms: stack them into (H, Dh)."""
    out = _renamer(_llama_pairs((("input_layernorm", "norm1"),)))(sd)
    for i in range(2):
        for hf, ours, heads in (("q_layernorm", "q_norm", 4), ("k_layernorm", "k_norm", 2)):
            norms = [sd[f"model.layers.{i}.self_attn.{hf}.norms.{j}.weight"] for j in range(heads)]
            out[f"layers.{i}.mixer.{ours}.weight"] = torch.stack(norms)
    return out


def _yarn(hf: bool, **extra: float) -> dict[str, Any]:
    if hf:
        return {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 16, **extra}
    return {"kind": "rope", "theta": 1000.0, "scaling": {"kind": "yarn", "factor": 4.0, "original_max_positions": 16, **extra}}


def _regex_renamer(rules: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> Callable[[StateDict], StateDict]:
    """Apply (pattern, replacement) rules in order to each HF name; `drop` removes tied copies."""

    def convert(sd: StateDict) -> StateDict:
        out = {}
        for name, tensor in sd.items():
            if name in drop:
                continue
            for pattern, replacement in rules:
                name = re.sub(pattern, replacement, name)
            out[name] = tensor
        return out

    return convert


MAMBA_RULES = [(r"^backbone\.embeddings\.", "embed."), (r"^backbone\.norm_f\.", "final_norm."),
               (r"^backbone\.layers\.(\d+)\.norm\.", r"layers.\1.norm1."), (r"^backbone\.layers\.", "layers.")]


def _fused_experts(rules: list[tuple[str, str]]) -> Callable[[StateDict], StateDict]:
    """Rename, then split HF's fused experts: gate_up_proj (E, 2F, D) = [gate; up], down_proj (E, D, F)."""

    def convert(sd: StateDict) -> StateDict:
        out = {}
        for name, tensor in _regex_renamer(rules)(sd).items():
            if name.endswith("ffn.experts.gate_up_proj"):
                prefix = name.removesuffix("gate_up_proj")
                out[prefix + "w_gate_EFD"], out[prefix + "w_up_EFD"] = tensor.chunk(2, dim=1)
            elif name.endswith("ffn.experts.down_proj"):
                out[name.removesuffix("down_proj") + "w_down_EDF"] = tensor
            else:
                out[name] = tensor
        return out

    return convert


def _gemma(norms: tuple[tuple[str, str], ...]) -> Callable[[StateDict], StateDict]:
    """Gemma's RMSNorm multiplies by (1 + w) where ours multiplies by w; the head is tied."""
    rename = _renamer(_llama_pairs(norms))

    def convert(sd: StateDict) -> StateDict:
        out = rename(sd)
        out.pop("lm_head.weight")
        return {name: 1 + tensor if "norm" in name else tensor for name, tensor in out.items()}

    return convert


GEMMA2_NORMS = (("input_layernorm", "norm1"), ("post_attention_layernorm", "post_norm1"),
                ("pre_feedforward_layernorm", "norm2"), ("post_feedforward_layernorm", "post_norm2"))
GEMMA_FFN = {"kind": "glu", "d_ff": 48, "activation": "gelu_tanh"}


MIXTRAL_RULES = [(r"^model\.embed_tokens\.", "embed."), (r"^model\.norm\.", "final_norm."),
                 (r"\.self_attn\.", ".mixer."), (r"\.input_layernorm\.", ".norm1."),
                 (r"\.post_attention_layernorm\.", ".norm2."), (r"\.mlp\.gate\.", ".ffn.router."),
                 (r"\.mlp\.", ".ffn."), (r"^model\.", "")]
JAMBA_RULES = [(r"^model\.embed_tokens\.", "embed."), (r"^model\.final_layernorm\.", "final_norm."),
               (r"\.(self_attn|mamba)\.", ".mixer."), (r"\.input_layernorm\.", ".norm1."),
               (r"\.pre_ff_layernorm\.", ".norm2."), (r"\.feed_forward\.", ".ffn."), (r"^model\.", "")]


MLA_DIMS = dict(kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)

HF_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any], Callable[[StateDict], StateDict]]] = {
    "llama3_scaling": (
        "llama",
        {**HF, "num_key_value_heads": 2, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        {**OURS, "position": {"kind": "rope", "theta": 500000.0, "scaling": {
            "kind": "llama3", "factor": 8.0, "original_max_positions": 16}},
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2}},
        _renamer(_llama_pairs(PRE_NORMS)),
    ),
    "qwen3_qk_norm_yarn": (
        "qwen3",
        {**HF, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_parameters": _yarn(True)},
        {**OURS, "norm": {"eps": 1e-6}, "position": _yarn(False),
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "qk_norm": {"scope": "head", "norm": {"eps": 1e-6}}}},
        _renamer(_llama_pairs(PRE_NORMS)),
    ),
    "mistral_window_mqa": (
        "mistral",
        {**HF, "num_key_value_heads": 1, "sliding_window": 5},
        {**OURS, "attention": {"kind": "mqa", "n_heads": 4, "sliding_window": 5}, "layout": {"mixers": "S"}},
        _renamer(_llama_pairs(PRE_NORMS)),
    ),
    "olmo2_reordered_full_qk_norm": (
        "olmo2",
        {**HF, "num_key_value_heads": 2, "rms_norm_eps": 1e-6},
        {**OURS, "norm": {"eps": 1e-6}, "residual": {"kind": "reordered"},
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "qk_norm": {"scope": "full", "norm": {"eps": 1e-6}}}},
        _renamer(_llama_pairs((("post_attention_layernorm", "post_norm1"), ("post_feedforward_layernorm", "post_norm2")))),
    ),
    "stablelm_parallel_per_head_partial": (
        "stablelm",
        {**HF, "num_key_value_heads": 2, "qk_layernorm": True, "use_parallel_residual": True, "use_qkv_bias": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        {**OURS, "norm": {"kind": "layernorm"}, "residual": {"kind": "parallel"}, "position": {"kind": "rope", "fraction": 0.5},
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True,
                       "qk_norm": {"scope": "per_head", "norm": {"kind": "layernorm", "bias": False}}}},
        _stablelm,
    ),
    "gemma_scaled_embedding_mqa": (
        "gemma",
        {**HF, "num_key_value_heads": 1, "head_dim": 16},
        {**OURS, "embedding": {"tied": True, "scaled": True}, "attention": {"kind": "mqa", "n_heads": 4, "head_dim": 16},
         "ffn": GEMMA_FFN},
        _gemma(PRE_NORMS),
    ),
    "gemma2_sandwich_query_scalar": (
        "gemma2",
        {**HF, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 5, "query_pre_attn_scalar": 12,
         "attn_logit_softcapping": None, "final_logit_softcapping": None},
        {**OURS, "embedding": {"tied": True, "scaled": True}, "residual": {"kind": "sandwich"},
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "sliding_window": 5,
                       "scale_dim": 12},
         "ffn": GEMMA_FFN, "layout": {"mixers": "SA"}},
        _gemma(GEMMA2_NORMS),
    ),
    "gpt2_learned_tied": (
        "gpt2",
        dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48),
        {**OURS, "position": {"kind": "learned"}, "embedding": {"tied": True}, "norm": {"kind": "layernorm"},
         "attention": {"kind": "mha", "n_heads": 4, "qkv_bias": True, "out_bias": True},
         "ffn": {"kind": "mlp", "d_ff": 48, "activation": "gelu_tanh", "bias": True}},
        _gpt2,
    ),
    # GPT2Attention skips the 1/sqrt(head_dim) without scale_attn_weights: scale_dim 1
    "gpt2_unscaled_attention": (
        "gpt2",
        dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, scale_attn_weights=False),
        {**OURS, "position": {"kind": "learned"}, "embedding": {"tied": True}, "norm": {"kind": "layernorm"},
         "attention": {"kind": "mha", "n_heads": 4, "qkv_bias": True, "out_bias": True, "scale_dim": 1},
         "ffn": {"kind": "mlp", "d_ff": 48, "activation": "gelu_tanh", "bias": True}},
        _gpt2,
    ),
    "bloom_alibi_6_heads": (
        "bloom",
        dict(vocab_size=50, hidden_size=48, n_layer=2, n_head=6),
        {**OURS, "d_model": 48, "position": {"kind": "alibi"}, "embedding": {"tied": True, "norm": True},
         "norm": {"kind": "layernorm"}, "attention": {"kind": "mha", "n_heads": 6, "qkv_bias": True, "out_bias": True},
         "ffn": {"kind": "mlp", "d_ff": 192, "activation": "gelu_tanh", "bias": True}},
        _bloom,
    ),
    "falcon_parallel_mqa": (
        "falcon",
        dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        {**OURS, "embedding": {"tied": True}, "norm": {"kind": "layernorm"}, "residual": {"kind": "parallel"},
         "attention": {"kind": "mqa", "n_heads": 4}, "ffn": {"kind": "mlp", "d_ff": 128, "activation": "gelu"}},
        _falcon,
    ),
    "mamba1_tied": (
        "mamba",
        dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
             tie_word_embeddings=True),
        {**OURS, "attention": None, "ffn": None, "layout": {"mixers": "M"}, "embedding": {"tied": True},
         "ssm": {"kind": "mamba1", "d_state": 8, "d_conv": 4}},
        _regex_renamer(MAMBA_RULES, drop=("lm_head.weight",)),
    ),
    "mamba2": (
        "mamba2",
        dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, head_dim=8,
             n_groups=2, num_heads=8, chunk_size=4, tie_word_embeddings=False),
        {**OURS, "attention": None, "ffn": None, "layout": {"mixers": "M"},
         "ssm": {"kind": "mamba2", "d_state": 8, "d_conv": 4, "head_dim": 8, "n_groups": 2, "chunk_size": 4}},
        _regex_renamer(MAMBA_RULES),
    ),
    "mixtral_moe": (
        "mixtral",
        {**HF, "intermediate_size": 16, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
        {**OURS, "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2}, "ffn": None,
         "moe": {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 16}}},
        _fused_experts(MIXTRAL_RULES),
    ),
    "jamba_hybrid": (
        "jamba",
        {**HF, "num_hidden_layers": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
         "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 4, "attn_layer_offset": 1,
         "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 2, "rms_norm_eps": 1e-6},
        {**OURS, "n_layers": 4, "norm": {"eps": 1e-6}, "position": {"kind": "none"},
         "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
         "ssm": {"kind": "mamba1", "d_state": 8, "d_conv": 4, "dt_rank": 2, "inner_norms": True},
         "moe": {"n_experts": 4, "top_k": 2, "expert": {"kind": "glu", "d_ff": 48}, "router": {"normalize_top_k": False}},
         "layout": {"mixers": "MAMM", "moe_every": 2, "moe_offset": 1}},
        _fused_experts(JAMBA_RULES),
    ),
    **{
        f"deepseek_v3_mla_q_lora_{q_lora}": (
            "deepseek_v3",
            {**HF, "num_key_value_heads": 4, "q_lora_rank": q_lora, **MLA_DIMS, "first_k_dense_replace": 2,
             "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "rope_interleave": False,
             "rms_norm_eps": 1e-6, "rope_parameters": _yarn(True, mscale=1.0, mscale_all_dim=1.0)},
            {**OURS, "norm": {"eps": 1e-6}, "position": _yarn(False, mscale=1.0, mscale_all_dim=1.0),
             "attention": {"kind": "mla", "n_heads": 4, "q_lora_rank": q_lora, **MLA_DIMS}},
            _renamer(_llama_pairs(PRE_NORMS) + MLA_PAIRS),
        )
        for q_lora in (12, None)
    },
}


def _reference(model_type: str, hf_config: dict[str, Any]) -> tuple[Any, torch.nn.Module]:
    """transformers' config and model (eager attention), every weight moved by 0.1·N(0, 1): HF's
    0.02-std init makes deep parts nearly vanish. DeepSeek's score-correction bias is a buffer:
    moved too, so that it picks experts."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **hf_config)
    config._attn_implementation = "eager"
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for tensor in (*reference.parameters(), *(b for n, b in reference.named_buffers() if "correction" in n)):
            tensor.add_(0.1 * torch.randn_like(tensor))
    return config, reference


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(case: str) -> None:
    model_type, hf_config, spec_dict, convert = HF_CASES[case]
    _, reference = _reference(model_type, hf_config)
    ours = build_model(Spec.model_validate(spec_dict), device="cpu").eval()
    ours.load_state_dict(convert(reference.state_dict()), strict=True)
    tokens = torch.randint(0, spec_dict["vocab_size"], (2, 24))  # longer than every window / original context
    with torch.no_grad():
        expected = reference(tokens).logits
        assert expected.std() > 0.1
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-4, atol=1e-4)


# Llama-style names (DeepSeek, Qwen, OLMoE, Mistral, Phi-3): `shared_experts` is DeepSeek's,
# `shared_expert` and its sigmoid `shared_expert_gate` Qwen2-MoE's
LLAMA_RULES = [(r"^model\.embed_tokens\.", "embed."), (r"^model\.norm\.", "final_norm."),
               (r"\.self_attn\.(q_a|kv_a)_layernorm\.", r".mixer.\1_norm."), (r"\.self_attn\.", ".mixer."),
               (r"\.input_layernorm\.", ".norm1."), (r"\.post_attention_layernorm\.", ".norm2."),
               (r"\.mlp\.gate\.e_score_correction_bias", ".ffn.router.score_correction_bias"),
               (r"\.mlp\.gate\.", ".ffn.router."), (r"\.mlp\.shared_experts?\.", ".ffn.shared."),
               (r"\.mlp\.shared_expert_gate\.", ".ffn.shared_gate."), (r"\.mlp\.", ".ffn."), (r"^model\.", "")]
DENSE_H_TO_4H = [(r"\.mlp\.dense_h_to_4h\.", ".ffn.up_proj."), (r"\.mlp\.dense_4h_to_h\.", ".ffn.down_proj.")]
NEOX_RULES = [(r"^gpt_neox\.embed_in\.", "embed."), (r"^gpt_neox\.final_layer_norm\.", "final_norm."),
              (r"\.input_layernorm\.", ".norm1."), (r"\.post_attention_layernorm\.", ".norm2."),
              (r"\.attention\.dense\.", ".mixer.o_proj."), (r"\.attention\.query_key_value\.", ".mixer.qkv."),
              *DENSE_H_TO_4H, (r"^gpt_neox\.", "")]
FALCON_RULES = [(r"^transformer\.word_embeddings\.", "embed."), (r"^transformer\.ln_f\.", "final_norm."),
                (r"\.ln_attn\.", ".norm1."), (r"\.ln_mlp\.", ".norm2."), (r"\.self_attention\.dense\.", ".mixer.o_proj."),
                (r"\.self_attention\.query_key_value\.", ".mixer.qkv."), *DENSE_H_TO_4H, (r"^transformer\.h\.", "layers.")]
MPT_RULES = [(r"^transformer\.wte\.", "embed."), (r"^transformer\.norm_f\.", "final_norm."), (r"\.norm_(\d)\.", r".norm\1."),
             (r"\.attn\.out_proj\.", ".mixer.o_proj."), (r"\.attn\.Wqkv\.", ".mixer.qkv."), (r"^transformer\.blocks\.", "layers.")]


def _split(fused: str, groups: int = 1, **rows: int) -> Callable[[StateDict], StateDict]:
    """Split a fused projection's weight and bias (`….{fused}.weight`) into its parts, beside it: the rows
    are `groups` equal blocks, each the named parts in order. One block for Phi-3 and MPT ([q; k; v],
    [gate; up]), one per head for GPT-NeoX ((H, 3, Dh)), one per KV head for Falcon's new decoder
    ((KV, H/KV + 2, Dh): the group's queries, then its key, then its value)."""

    def convert(sd: StateDict) -> StateDict:
        out = {}
        for key, tensor in sd.items():
            stem, _, suffix = key.rpartition(".")
            if not stem.endswith("." + fused):
                out[key] = tensor
                continue
            blocks = tensor.unflatten(0, (groups, -1)).split(list(rows.values()), dim=1)
            parent = stem.removesuffix(fused)
            out.update({f"{parent}{part}.{suffix}": block.flatten(0, 1) for part, block in zip(rows, blocks)})
        return out

    return convert


def _chain(*steps: Callable[[StateDict], StateDict]) -> Callable[[StateDict], StateDict]:
    return lambda sd: functools.reduce(lambda acc, step: step(acc), steps, sd)


LLAMA = _fused_experts(LLAMA_RULES)
QWEN_MOE = {**HF, "num_hidden_layers": 3, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16}
# model_type, the config's keys, the converter, and the spec fields the case exists for (so that it
# cannot pass by the importer no longer producing them)
IMPORT_CASES: dict[str, tuple[str, dict[str, Any], Callable[[StateDict], StateDict], dict[str, Any]]] = {
    # group-limited sigmoid routing (2 groups, 1 kept), the score-correction bias, routed_scaling_factor,
    # a shared expert, a dense first layer. transformers builds the latent norms with RMSNorm's default
    # eps, 1e-6, whatever rms_norm_eps says: at 1e-2 the logits differed by 0.045 with the spec's eps there
    **{f"deepseek_v3_mla_groups_eps_{eps:g}": (
        "deepseek_v3",
        {**HF, "num_hidden_layers": 3, "num_key_value_heads": 4, "q_lora_rank": 12, **MLA_DIMS, "first_k_dense_replace": 1,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
         "routed_scaling_factor": 2.5, "moe_intermediate_size": 8, "rope_interleave": False, "rms_norm_eps": eps},
        LLAMA,
        {"attention.kind": "mla", "moe.router.n_group": 2, "moe.router.score_correction_bias": True,
         "layout.first_dense": 1},
    ) for eps in (1e-6, 1e-2)},
    # qkv biases; layers from max_window_layers on slide
    "qwen2_bias_max_window_layers": (
        "qwen2",
        {**HF, "num_hidden_layers": 3, "num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 5,
         "max_window_layers": 1},
        LLAMA,
        {"attention.qkv_bias": True, "attention.sliding_window": 5, "layout.mixers": "ASS"},
    ),
    # shared expert behind a sigmoid gate; MoE on every decoder_sparse_step-th layer
    "qwen2_moe_sparse_step_norm_topk": (
        "qwen2_moe",
        {**QWEN_MOE, "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2, "norm_topk_prob": True},
        LLAMA,
        {"moe.shared.gate": True, "moe.router.normalize_top_k": True, "layout.moe_every": 2, "layout.moe_offset": 1},
    ),
    "qwen2_moe_mlp_only_layers": (
        "qwen2_moe",
        {**QWEN_MOE, "shared_expert_intermediate_size": 24, "mlp_only_layers": [1], "norm_topk_prob": False},
        LLAMA,
        {"moe.shared.gate": True, "moe.router.normalize_top_k": False, "layout.moe_every": 2, "layout.moe_offset": 0},
    ),
    "qwen3_moe_head_dim_norm_topk": (
        "qwen3_moe",
        {**QWEN_MOE, "head_dim": 12, "norm_topk_prob": True},
        LLAMA,
        {"attention.head_dim": 12, "attention.qk_norm.scope": "head", "moe.router.normalize_top_k": True},
    ),
    "olmoe_full_qk_norm": (
        "olmoe",
        {**HF, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2},
        LLAMA,
        {"attention.qk_norm.scope": "full", "moe.router.normalize_top_k": False, "moe.n_experts": 4},
    ),
    "gpt_neox_parallel": (
        "gpt_neox",
        dict(HF),
        _chain(_regex_renamer(NEOX_RULES), _split("qkv", 4, q_proj=8, k_proj=8, v_proj=8)),
        {"residual.kind": "parallel", "residual.shared_norm": False, "position.fraction": 0.25},
    ),
    "gpt_neox_sequential_half_rotary_tied": (
        "gpt_neox",
        {**HF, "use_parallel_residual": False, "rotary_pct": 0.5, "rotary_emb_base": 1000, "attention_bias": False,
         "tie_word_embeddings": True},
        _chain(_regex_renamer(NEOX_RULES, drop=("lm_head.weight",)), _split("qkv", 4, q_proj=8, k_proj=8, v_proj=8)),
        {"residual.kind": "pre", "position.fraction": 0.5, "position.theta": 1000.0, "embedding.tied": True},
    ),
    "phi3_fused_window_partial": (
        "phi3",
        {**HF, "num_key_value_heads": 2, "pad_token_id": 0, "sliding_window": 6, "partial_rotary_factor": 0.5},
        _chain(LLAMA, _split("qkv_proj", q_proj=32, k_proj=16, v_proj=16), _split("gate_up_proj", gate_proj=48, up_proj=48)),
        {"attention.sliding_window": 6, "position.fraction": 0.5, "ffn.kind": "glu"},
    ),
    "falcon_new_decoder_gqa": (
        "falcon",
        dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
             num_kv_heads=2),
        _chain(_regex_renamer(FALCON_RULES, drop=("lm_head.weight",)), _split("qkv", 2, q_proj=16, k_proj=8, v_proj=8)),
        {"attention.n_kv_heads": 2, "residual.kind": "parallel", "residual.shared_norm": False},
    ),
    "mpt_alibi": (
        "mpt",
        dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
        _chain(_regex_renamer(MPT_RULES, drop=("lm_head.weight",)), _split("qkv", q_proj=32, k_proj=32, v_proj=32)),
        {"position.kind": "alibi", "norm.kind": "layernorm", "norm.bias": False},
    ),
    # the 7-token prefill is longer than the window: the cache keeps only what the window sees
    "mistral_window_shorter_than_prefill": (
        "mistral",
        {**HF, "num_key_value_heads": 2, "sliding_window": 5},
        LLAMA,
        {"attention.sliding_window": 5, "layout.mixers": "S"},
    ),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_an_imported_config_computes_transformers_function(case: str) -> None:
    """The config through `archplan import hf`, not a spec written by hand: test_logits_match_transformers
    pins the modules' conventions with specs written to agree; here the importer's reading of each
    family's keys (per-layer windows, MoE placement, routing and shared-expert gates, partial rotary,
    residual wiring, ALiBi, head counts behind fused projections) is checked against the function
    transformers computes, for the logits of a full forward and of a decode through archplan's cache
    (a 7-token prefill, then one token at a time)."""
    from archplan.importers import spec_from_config

    model_type, hf_config, convert, reads = IMPORT_CASES[case]
    config, reference = _reference(model_type, hf_config)
    spec = spec_from_config({**config.to_dict(), "model_type": model_type}, file="config.json", name=case)
    assert {path: functools.reduce(getattr, path.split("."), spec) for path in reads} == reads
    ours = build_model(spec, device="cpu").eval()
    ours.load_state_dict(convert(reference.state_dict()), strict=True)
    tokens = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        expected = reference(tokens).logits
        assert expected.std() > 0.1
        torch.testing.assert_close(ours(tokens), expected, rtol=1e-4, atol=1e-4)
        cache = ours.new_cache(2, 24)
        steps = [ours(tokens[:, :7], cache)] + [ours(tokens[:, t:t + 1], cache) for t in range(7, 24)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_mla_latent_norms_take_their_own_eps() -> None:
    """DeepSeek-V2/V3 build the latent norms at 1e-6 whatever the model's norm eps (the default);
    a spec that says otherwise gets its own, and the block norms keep the model's."""
    base = {**OURS, "norm": {"eps": 1e-2}, "attention": {"kind": "mla", "n_heads": 4, "q_lora_rank": 12, **MLA_DIMS}}
    for given, eps in (({}, 1e-6), ({"latent_norm_eps": 1e-5}, 1e-5)):
        model = build_model(Spec.model_validate({**base, "attention": {**base["attention"], **given}}))
        mixer = model.layers[0].mixer
        assert mixer.q_a_norm.eps == mixer.kv_a_norm.eps == eps and model.layers[0].norm1.eps == 1e-2


def test_falcon_alibi_scales_its_bias_with_the_scores() -> None:
    """FalconModel divides the ALiBi tensor by sqrt(head_dim) (sdpa path; Falcon-RW's own code
    scales q·k + alibi together): the import says `scaled`, and the logits match; without it they
    do not. transformers' eager path adds the undivided tensor once more, which neither does."""
    transformers = pytest.importorskip("transformers")
    from archplan.importers import spec_from_config

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("falcon", vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True)
    config._attn_implementation = "sdpa"
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    spec = spec_from_config({**config.to_dict(), "model_type": "falcon"}, file="config.json", name="falcon-alibi")
    assert spec.position.kind == "alibi" and spec.position.scaled
    tokens = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        expected = reference(tokens).logits
        for scaled, close in ((True, True), (False, False)):
            variant = spec.model_copy(update={"position": spec.position.model_copy(update={"scaled": scaled})})
            ours = build_model(variant, device="cpu").eval()
            ours.load_state_dict(_falcon(reference.state_dict()), strict=True)
            assert torch.allclose(ours(tokens), expected, rtol=1e-4, atol=1e-4) is close
