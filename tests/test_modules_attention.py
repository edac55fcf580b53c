"""Attention modules on CPU with tiny dims: causality, windows, ALiBi, GQA/MQA equivalences, RoPE.

Each module is built straight from a hand-written plan, so these tests need nothing but
archplan.modules.{attention,mla,positions,norms}.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from archplan.analytic.attention import mla_decode_flops
from archplan.modules.attention import Attention, attention_mask, cache_step
from archplan.modules.mla import MLA
from archplan.modules.positions import (
    Alibi,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
    apply_rotary,
    rope_frequencies,
    yarn_mscale,
)
from archplan.resolve import AttentionPlan, MLAPlan, NormPlan, QKNormPlan
from archplan.spec import Rope, RopeScaling

D = 32
RMS = NormPlan("rmsnorm", False, 1e-6)
ROPE = Rope(theta=10000.0)


def attn_plan(
    n_heads: int = 4,
    n_kv: int = 4,
    head_dim: int = 8,
    window: int | None = None,
    rotary: int = 8,
    qk: QKNormPlan | None = None,
    bias: bool = False,
) -> AttentionPlan:
    kind = "mha" if n_kv == n_heads else ("mqa" if n_kv == 1 else "gqa")
    return AttentionPlan(kind, n_heads, n_kv, head_dim, bias, bias, qk, window, rotary)


def mla_plan(q_lora: int | None = 12, window: int | None = None) -> MLAPlan:
    return MLAPlan(
        n_heads=4, q_lora_rank=q_lora, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4,
        v_head_dim=5, window=window, norm=RMS,
    )


def make(kind: str) -> torch.nn.Module:
    """One module per attention flavour the spec accepts."""
    torch.manual_seed(0)
    match kind:
        case "mha":
            return Attention(attn_plan(), D, ROPE, alibi=False)
        case "gqa":
            return Attention(attn_plan(n_kv=2), D, ROPE, alibi=False)
        case "mqa":
            return Attention(attn_plan(n_kv=1), D, ROPE, alibi=False)
        case "partial_rope":
            return Attention(attn_plan(rotary=4, qk=QKNormPlan("head", RMS)), D, ROPE, alibi=False)
        case "window":
            return Attention(attn_plan(n_kv=2, window=3), D, ROPE, alibi=False)
        case "alibi":
            return Attention(attn_plan(rotary=0, bias=True), D, None, alibi=True)
        case "alibi_window":
            return Attention(attn_plan(n_heads=6, n_kv=3, rotary=0, window=4), D, None, alibi=True)
        case "mla":
            return MLA(mla_plan(), D, ROPE, alibi=False)
        case "mla_no_q_lora":
            return MLA(mla_plan(q_lora=None), D, ROPE, alibi=False)
        case "mla_window":
            return MLA(mla_plan(window=3), D, ROPE, alibi=False)
    raise AssertionError(kind)


KINDS = ["mha", "gqa", "mqa", "partial_rope", "window", "alibi", "alibi_window", "mla", "mla_no_q_lora", "mla_window"]


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind: str) -> None:
    """Changing token t+1 leaves every output at positions ≤ t unchanged (and does change t+1)."""
    module = make(kind).eval()
    x = torch.randn(2, 9, D)
    t = 4
    x2 = x.clone()
    x2[:, t + 1] += torch.randn(2, D)
    with torch.no_grad():
        y, y2 = module(x), module(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(y[:, t + 1], y2[:, t + 1])


@pytest.mark.parametrize("kind", ["window", "mla_window", "alibi_window"])
def test_sliding_window_forgets(kind: str) -> None:
    """With window W, the output at t depends on tokens t−W+1..t only (Mistral 7B §2)."""
    module = make(kind).eval()
    window = module.plan.window
    x = torch.randn(1, 10, D)
    t = 8
    x2 = x.clone()
    x2[:, t - window] += 5.0  # just outside the window of t
    with torch.no_grad():
        y, y2 = module(x), module(x2)
    torch.testing.assert_close(y[:, t], y2[:, t], rtol=0, atol=1e-6)
    x3 = x.clone()
    x3[:, t - window + 1] += 5.0  # the oldest token inside it
    with torch.no_grad():
        assert not torch.allclose(module(x3)[:, t], y[:, t])


def test_window_mask_values() -> None:
    pos = torch.arange(5)
    mask = attention_mask(pos, pos, 2, None, torch.float32)
    expected = torch.tensor([[i - 2 < j <= i for j in range(5)] for i in range(5)])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("kind", ["alibi", "alibi_window"])
def test_alibi_runs_the_cpus_flash_kernel(kind: str) -> None:
    """ALiBi's bias is 4-D, the shape the CPU's flash kernel takes (a 3-D one sent SDPA to the math
    kernel, which kept every head's T×T probabilities): only the flash kernel allowed, the module
    runs, forward and backward, and gives what the default selection gives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    module = make(kind)
    x = torch.randn(2, 9, D)
    pos = torch.arange(9)
    assert attention_mask(pos, pos, None, module.alibi, torch.float32).shape == (1, module.plan.n_heads, 9, 9)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        y = module(x)
    y.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), module(x), rtol=1e-5, atol=1e-6)


def _reference_attention(module: Attention, x_BTD: torch.Tensor) -> torch.Tensor:
    """The module's causal attention written out in fp64 with its weights: RoPE at θ = 10⁴ over the
    whole head (GPT-NeoX half split), each KV head expanded onto its H/Hkv consecutive query heads
    with repeat_interleave (Ainslie et al. 2023; HF `repeat_kv`), and a plain masked softmax."""
    p = module.plan
    assert p.rotary_dim == p.head_dim and p.window is None and module.alibi is None
    b, t, _ = x_BTD.shape
    x = x_BTD.double()

    def heads(proj: torch.nn.Linear, n: int) -> torch.Tensor:
        bias = proj.bias.double() if proj.bias is not None else None
        return F.linear(x, proj.weight.double(), bias).view(b, t, n, p.head_dim).transpose(1, 2)

    inv_freq = ROPE.theta ** (-torch.arange(0, p.head_dim, 2, dtype=torch.float64) / p.head_dim)
    half = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angle = torch.cat([half, half], dim=-1)
    cos, sin = angle.cos(), angle.sin()

    def rotate(z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z.chunk(2, dim=-1)
        return z * cos + torch.cat([-z2, z1], dim=-1) * sin

    group = p.n_heads // p.n_kv_heads
    q = rotate(heads(module.q_proj, p.n_heads))
    k = rotate(heads(module.k_proj, p.n_kv_heads)).repeat_interleave(group, dim=1)
    v = heads(module.v_proj, p.n_kv_heads).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(p.head_dim)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    o = module.o_proj
    o_bias = o.bias.double() if o.bias is not None else None
    return F.linear(out.transpose(1, 2).reshape(b, t, -1), o.weight.double(), o_bias).float()


def _prefill_then_decode(module: Attention, x_BTD: torch.Tensor, prefill: int) -> torch.Tensor:
    """The outputs of a cached prefill of the first `prefill` tokens, then one decode step per token."""
    b, t, _ = x_BTD.shape
    state = module.new_state(b, t, x_BTD.device, x_BTD.dtype)
    steps = [module(x_BTD[:, :prefill], state)] + [module(x_BTD[:, i : i + 1], state) for i in range(prefill, t)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(("n_heads", "n_kv"), [(4, 2), (6, 3), (4, 1)], ids=["gqa_4q_2kv", "gqa_6q_3kv", "mqa"])
def test_gqa_against_expanded_mha(n_heads: int, n_kv: int) -> None:
    """GQA with Hkv KV heads is MHA whose query head h reads KV head h // (H/Hkv) (Ainslie et al.
    2023), prefill and cached decode alike: catches K/V tiled instead of interleaved onto the query
    heads (head h reading KV head h % Hkv), which only real groups (1 < Hkv < H) can show."""
    torch.manual_seed(1)
    module = Attention(attn_plan(n_heads=n_heads, n_kv=n_kv), D, ROPE, alibi=False)
    x = torch.randn(2, 7, D)
    want = _reference_attention(module, x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_prefill_then_decode(module, x, prefill=4), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sdpa's CUDA-only K/V repeat for GQA")
def test_gqa_on_cuda_is_gqa_on_cpu() -> None:
    """On CUDA `sdpa` repeats K/V per query group itself (the fused kernels refuse `enable_gqa`);
    on CPU SDPA's `enable_gqa` groups them: the same weights give the same prefill and decode
    outputs, so a CUDA repeat that tiles the heads, or groups them otherwise than SDPA, fails."""
    torch.manual_seed(6)
    cpu = Attention(attn_plan(n_kv=2), D, ROPE, alibi=False)
    cuda = Attention(attn_plan(n_kv=2), D, ROPE, alibi=False).cuda()
    cuda.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(cuda(x.cuda()).cpu(), cpu(x))
        torch.testing.assert_close(_prefill_then_decode(cuda, x.cuda(), prefill=4).cpu(),
                                   _prefill_then_decode(cpu, x, prefill=4))


def test_gqa_with_all_kv_heads_is_mha() -> None:
    torch.manual_seed(2)
    gqa = Attention(AttentionPlan("gqa", 4, 4, 8, False, False, None, None, 8), D, ROPE, alibi=False)
    mha = Attention(attn_plan(), D, ROPE, alibi=False)
    mha.load_state_dict(gqa.state_dict())
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=0)


def test_mqa_equals_gqa_with_one_kv_head() -> None:
    torch.manual_seed(3)
    mqa = Attention(attn_plan(n_kv=1), D, ROPE, alibi=False)
    gqa = Attention(AttentionPlan("gqa", 4, 1, 8, False, False, None, None, 8), D, ROPE, alibi=False)
    gqa.load_state_dict(mqa.state_dict())
    assert mqa.k_proj.weight.shape == (8, D)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(mqa(x), gqa(x), rtol=0, atol=0)


SCALINGS = [
    None,
    RopeScaling(kind="linear", factor=4.0),
    RopeScaling(kind="ntk", factor=4.0),
    RopeScaling(kind="yarn", factor=8.0, original_max_positions=64),
    RopeScaling(kind="llama3", factor=8.0, original_max_positions=64),
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.kind if s else "plain")
def test_rope_depends_only_on_offset(scaling: RopeScaling | None) -> None:
    """⟨R_m q, R_n k⟩ is a function of m − n (Su et al. 2021, eq. 16), for every scaling."""
    rope = RotaryEmbedding(8, Rope(theta=500.0, scaling=scaling))
    q = torch.randn(1, 1, 1, 12, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 12, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = (t.double() for t in rope(m, 1))
        cos_n, sin_n = (t.double() for t in rope(n, 1))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(7, 3), score(20, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(score(3, 3), score(40, 40), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_partial_rotary_leaves_tail_untouched() -> None:
    rope = RotaryEmbedding(4, ROPE)
    x = torch.randn(1, 2, 3, 10)
    cos, sin = rope(5, 3)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])
    # a rotation: the norm of each rotated pair block is preserved
    torch.testing.assert_close(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1))


def test_rope_scaling_formulas() -> None:
    """Spot values from each scaling's defining formula."""
    base = rope_frequencies(8, Rope(theta=10000.0))[0]
    assert base == pytest.approx([10000.0 ** (-i / 4) for i in range(4)])
    linear = rope_frequencies(8, Rope(scaling=RopeScaling(kind="linear", factor=4.0)))[0]
    assert linear == pytest.approx([f / 4 for f in base])
    ntk = rope_frequencies(8, Rope(scaling=RopeScaling(kind="ntk", factor=4.0)))[0]
    ntk_theta = 10000.0 * 4.0 ** (8 / 6)
    assert ntk == pytest.approx([ntk_theta ** (-i / 4) for i in range(4)])
    llama3 = rope_frequencies(8, Rope(scaling=RopeScaling(kind="llama3", factor=8.0, original_max_positions=64)))[0]
    # wavelength 2π/f < 64/4 keeps f; > 64/1 divides by 8 (meta-llama `apply_scaling`)
    assert llama3[0] == base[0]
    assert llama3[3] == pytest.approx(base[3] / 8)
    yarn, gain = rope_frequencies(8, Rope(scaling=RopeScaling(kind="yarn", factor=8.0, original_max_positions=64)))
    assert yarn[0] == base[0] and yarn[3] == pytest.approx(base[3] / 8)
    assert gain == pytest.approx(0.1 * math.log(8.0) + 1.0)


def _transformers_rope(rope_type: str, parameters: dict[str, float | int | bool], max_positions: int = 4096,
                       seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' own inverse frequencies and cos/sin gain (`ROPE_INIT_FUNCTIONS`) for a
    64-wide rotary head at θ = 10⁴ (fp32, as it computes them)."""
    transformers = pytest.importorskip("transformers")  # Python 3.11+ (README)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=256, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
        vocab_size=32, max_position_embeddings=max_positions,
        rope_scaling={"rope_type": rope_type, "rope_theta": 10000.0, **parameters})
    length = {} if seq_len is None else {"seq_len": seq_len}
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **length)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_are_transformers(truncate: bool) -> None:
    """transformers' _compute_yarn_parameters, both ways of ending the ramp (its `truncate`)."""
    theirs, their_gain = _transformers_rope(
        "yarn", {"factor": 4.0, "original_max_position_embeddings": 1024, "truncate": truncate})
    ours, gain = rope_frequencies(64, Rope(scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024,
                                                               truncate=truncate)))
    assert torch.tensor(ours, dtype=torch.float32) == pytest.approx(theirs, rel=1e-6)
    assert gain == pytest.approx(their_gain)


@pytest.mark.parametrize(("scaling", "rope_type", "parameters", "max_positions", "seq_len", "blended"), [
    pytest.param(RopeScaling(kind="llama3", factor=8.0, original_max_positions=1024, low_freq_factor=2.0,
                             high_freq_factor=8.0),
                 "llama3", {"factor": 8.0, "original_max_position_embeddings": 1024, "low_freq_factor": 2.0,
                            "high_freq_factor": 8.0}, 8192, None, True, id="llama3_low2_high8"),
    pytest.param(RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024, beta_fast=16.0, beta_slow=2.0),
                 "yarn", {"factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16.0,
                          "beta_slow": 2.0}, 4096, None, True, id="yarn_beta16_2"),
    pytest.param(RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024, mscale=0.707, mscale_all_dim=1.0),
                 "yarn", {"factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 0.707,
                          "mscale_all_dim": 1.0}, 4096, None, True, id="yarn_mscale"),
    # mscale_all_dim alone: transformers' gain is 0.1·ln(factor) + 1 (it reads mscale only beside it)
    pytest.param(RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024, mscale_all_dim=1.0),
                 "yarn", {"factor": 4.0, "original_max_position_embeddings": 1024, "mscale_all_dim": 1.0},
                 4096, None, True, id="yarn_mscale_all_dim_alone"),
    pytest.param(RopeScaling(kind="linear", factor=4.0), "linear", {"factor": 4.0}, 4096, None, False, id="linear"),
    # transformers' dynamic NTK multiplies θ by (factor·seq_len/max_positions − (factor − 1))^(R/(R−2)):
    # archplan's static θ·factor^(R/(R−2)) is it at seq_len = (2 − 1/factor)·max_positions (at
    # max_positions itself dynamic leaves θ as it is)
    pytest.param(RopeScaling(kind="ntk", factor=4.0), "dynamic", {"factor": 4.0}, 1024, 1792, False, id="ntk"),
])
def test_rope_scalings_are_transformers(scaling: RopeScaling, rope_type: str,
                                        parameters: dict[str, float | int | bool], max_positions: int,
                                        seq_len: int | None, blended: bool) -> None:
    """Every frequency and the gain of each scaling with non-default options against transformers'
    own: catches llama3's low/high_freq_factor or yarn's beta_fast/beta_slow ignored, swapped or
    misused in the ramp (the blended middle band, which the endpoints in
    `test_rope_scaling_formulas` never reach), the mscale / mscale_all_dim gain, and a wrong
    linear or NTK base."""
    theirs, their_gain = _transformers_rope(rope_type, parameters, max_positions, seq_len)
    ours, gain = rope_frequencies(64, Rope(theta=10000.0, scaling=scaling))
    assert torch.tensor(ours, dtype=torch.float32) == pytest.approx(theirs, rel=1e-6)
    assert gain == pytest.approx(their_gain)
    if blended:  # some frequencies lie strictly between f/factor and f: the ramp's middle is compared
        base = rope_frequencies(64, Rope(theta=10000.0))[0]
        assert any(f / scaling.factor < g < f for f, g in zip(base, ours))
    if scaling.mscale and scaling.mscale_all_dim:
        assert gain == pytest.approx(yarn_mscale(scaling.factor, scaling.mscale)
                                     / yarn_mscale(scaling.factor, scaling.mscale_all_dim))
    elif scaling.kind == "yarn":
        assert gain == pytest.approx(yarn_mscale(scaling.factor))


def test_yarn_truncate_changes_the_ramp_and_is_yarn_only() -> None:
    cut = rope_frequencies(64, Rope(scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024)))[0]
    kept = rope_frequencies(64, Rope(scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024,
                                                         truncate=False)))[0]
    assert cut != kept
    with pytest.raises(ValueError, match="truncate: yarn field; linear scaling does not read it"):
        RopeScaling(kind="linear", factor=4.0, truncate=False)


def test_yarn_mscale_without_mscale_all_dim_is_refused() -> None:
    """transformers reads mscale only beside a nonzero mscale_all_dim: alone it would change nothing."""
    # transformers' test is truthiness: a zero mscale beside mscale_all_dim is not read either
    for fields in ({"mscale": 2.0}, {"mscale": 2.0, "mscale_all_dim": 0.0}, {"mscale": 0.0, "mscale_all_dim": 1.0}):
        with pytest.raises(ValueError, match="mscale: read only when it and mscale_all_dim are both nonzero"):
            RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024, **fields)
    # beside it, mscale moves the gain
    gains = {rope_frequencies(64, Rope(scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=1024,
                                                           mscale=m, mscale_all_dim=1.0)))[1] for m in (1.0, 2.0)}
    assert len(gains) == 2


def test_alibi_slopes_press_et_al() -> None:
    """ofirpress/attention_with_linear_biases: 2^(−8i/n) for n = 2^k; else fill from 2n's odd slots."""
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8-head slopes, then slopes 1, 3, 5, 7 (0-based even index) of the 16-head set
    sixteen = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    assert alibi_slopes(12) == pytest.approx(alibi_slopes(8) + sixteen[0::2][:4])
    assert alibi_slopes(12)[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


def test_alibi_bias_is_linear_in_distance() -> None:
    alibi = Alibi(4)
    pos = torch.arange(5)
    bias = alibi(pos, pos)
    assert bias.shape == (4, 5, 5)
    slopes = alibi_slopes(4)
    assert slopes == [0.25, 0.0625, 0.015625, 0.00390625]
    for h in range(4):
        for i in range(5):
            for j in range(5):
                assert bias[h, i, j].item() == pytest.approx(slopes[h] * (j - i))


def test_sinusoidal_table() -> None:
    pe = SinusoidalPositions(6)(0, 4)
    p, i = 3, 2
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)), abs=1e-6)


@pytest.mark.parametrize("scope", ["head", "per_head", "full"])
@pytest.mark.parametrize("norm", [RMS, NormPlan("layernorm", True, 1e-5)])
def test_qk_norm_params(scope: str, norm: NormPlan) -> None:
    """q/k norms per scope: Dh each, (H + Hkv)·Dh, or (H + Hkv)·Dh over the whole projections."""
    plan = attn_plan(n_kv=2, qk=QKNormPlan(scope, norm))  # type: ignore[arg-type]
    module = Attention(plan, D, ROPE, alibi=False)
    per = 2 if norm.bias else 1
    expected = {"head": 2 * 8, "per_head": (4 + 2) * 8, "full": (4 + 2) * 8}[scope] * per
    assert module.q_norm is not None and module.k_norm is not None
    got = sum(p.numel() for m in (module.q_norm, module.k_norm) for p in m.parameters())
    assert got == expected
    with torch.no_grad():
        assert module(torch.randn(1, 5, D)).shape == (1, 5, D)


def test_attention_numel() -> None:
    """docs/formulas.md §1.3: 2·D·H·Dh + 2·D·Hkv·Dh (+ H·Dh + 2·Hkv·Dh + D biases)."""
    module = Attention(attn_plan(n_kv=2, bias=True), D, ROPE, alibi=False)
    assert sum(p.numel() for p in module.parameters()) == 2 * D * 32 + 2 * D * 16 + (32 + 2 * 16) + D


@pytest.mark.parametrize("q_lora", [12, None])
def test_mla_numel(q_lora: int | None) -> None:
    """docs/formulas.md §1.4 with H=4, Q=12, C=10, Dn=6, R=4, Dv=5."""
    module = MLA(mla_plan(q_lora), D, ROPE, alibi=False)
    q = D * 12 + 12 + 12 * 4 * 10 if q_lora else D * 4 * 10
    expected = q + D * (10 + 4) + 10 + 10 * 4 * (6 + 5) + 4 * 5 * D
    assert sum(p.numel() for p in module.parameters()) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_meta_flops(kind: str) -> None:
    """On meta: 2·rows·in·out per projection plus 2·B·T²·H·(Dqk + Dv) for the core, nothing else."""
    with torch.device("meta"):
        module = make(kind).to(torch.bfloat16)
    b, t = 2, 6
    x = torch.zeros(b, t, D, device="meta", dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        module(x)
    matrices = sum(p.numel() for p in module.parameters() if p.dim() == 2)
    plan = module.plan
    if isinstance(plan, MLAPlan):
        core = 2 * b * t * t * plan.n_heads * (plan.qk_head_dim + plan.v_head_dim)
    else:
        core = 2 * b * t * t * plan.n_heads * 2 * plan.head_dim
    assert counter.get_total_flops() == 2 * b * t * matrices + core


def test_rope_buffers_survive_meta_to_empty() -> None:
    rope = Rope(theta=5000.0, scaling=RopeScaling(kind="yarn", factor=4.0, original_max_positions=32))
    direct = Attention(attn_plan(), D, rope, alibi=True)
    with torch.device("meta"):
        lazy = Attention(attn_plan(), D, rope, alibi=True)
    lazy = lazy.to_empty(device="cpu")
    for module in lazy.modules():
        if isinstance(module, (RotaryEmbedding, Alibi)):
            module.reset_buffers()
    assert lazy.rotary is not None and direct.rotary is not None and lazy.alibi is not None
    assert torch.equal(lazy.rotary.inv_freq, direct.rotary.inv_freq)
    assert torch.equal(lazy.alibi.slopes, torch.tensor(alibi_slopes(4)))
    assert lazy.rotary.inv_freq.dtype == torch.float32


# ------------------------------------------------------------------------------- MLA decode forms
def _absorbed_vs_expanded(module: MLA, steps: list[int], batch: int = 2) -> int:
    """Feed `steps` chunks through a cache; at each, both forms over the same cache rows must agree
    (fp64). Returns how many chunks the module itself would run absorbed."""
    module = module.double()
    state = module.new_state(batch, sum(steps), torch.device("cpu"), torch.float64)
    absorbed_steps = 0
    for t in steps:
        x = torch.randn(batch, t, D, dtype=torch.float64)
        qpos = torch.arange(state.seen, state.seen + t)
        q_nope, q_pe, latent = module.project(x, state.seen)
        # the cache rows the module attends: the same `cache_step` its forward uses, on a copy
        probe = module.new_state(batch, sum(steps), torch.device("cpu"), torch.float64)
        probe.latent_BLX.copy_(state.latent_BLX)
        (keys, ), kpos = cache_step([probe.latent_BLX], [latent], 1, state.seen, module.plan.window)
        absorbed = module.attend_absorbed(q_nope, q_pe, keys, qpos, kpos)
        expanded = module.attend_expanded(q_nope, q_pe, keys, qpos, kpos, cached=True)
        torch.testing.assert_close(absorbed, expanded, rtol=1e-10, atol=1e-10)
        absorbed_steps += module.absorbs(t, keys.shape[1])
        out = module(x, state)
        torch.testing.assert_close(out, module.o_proj(absorbed if module.absorbs(t, keys.shape[1]) else expanded))
    return absorbed_steps


@pytest.mark.parametrize("kind", ["mla", "mla_no_q_lora", "mla_window", "mla_no_rope", "mla_alibi_window"])
def test_mla_absorbed_equals_expanded(kind: str) -> None:
    """DeepSeek-V2 §2.1.2: attention in the latent space through W_UK / W_UV is the same attention."""
    torch.manual_seed(0)
    match kind:
        case "mla_no_rope":
            module = MLA(mla_plan(), D, None, alibi=False)
        case "mla_alibi_window":
            module = MLA(mla_plan(window=3), D, None, alibi=True)
        case _:
            module = make(kind)  # type: ignore[assignment]
    # prefill, single steps (absorbed), a chunk, more steps
    assert _absorbed_vs_expanded(module, [4, 1, 1, 3, 1, 1, 1]) >= 5


def test_mla_picks_the_cheaper_form() -> None:
    """H·(T·C·(Dn+Dv) + T·S·(2C+R)) vs H·(S·C·(Dn+Dv) + T·S·(Dn+R+Dv)) multiply-adds; ties expanded."""
    module = MLA(mla_plan(), D, ROPE, alibi=False)  # C=10, Dn=6, R=4, Dv=5
    assert not module.absorbs(1, 1)  # 110 + 24 vs 110 + 15
    assert module.absorbs(1, 2)
    assert not module.absorbs(8, 8)  # prefill into an empty cache: 2C ≥ Dn + Dv
    wide = MLA(MLAPlan(n_heads=2, q_lora_rank=None, kv_lora_rank=2, qk_nope_head_dim=6, qk_rope_head_dim=2,
                       v_head_dim=6, window=None, norm=RMS), D, ROPE, alibi=False)
    assert wide.absorbs(8, 8)  # 2C < Dn + Dv: absorbed even at T = S
    assert _absorbed_vs_expanded(wide, [5, 1, 2]) == 3


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("keys", [1, 2, 7])
def test_mla_decode_flops_on_meta(keys: int, window: int | None) -> None:
    """One decode step counted on meta = analytic `mla_decode_flops` (min of the two forms), exactly."""
    with torch.device("meta"):
        module = MLA(mla_plan(window=window), D, ROPE, alibi=False).to(torch.bfloat16)
    b = 3
    state = module.new_state(b, 8, torch.device("meta"), torch.bfloat16)
    if keys > 1:
        module(torch.zeros(b, keys - 1, D, device="meta", dtype=torch.bfloat16), state)
    with FlopCounterMode(display=False) as counter:
        module(torch.zeros(b, 1, D, device="meta", dtype=torch.bfloat16), state)
    attended = min(keys, window) if window else keys
    assert counter.get_total_flops() == b * mla_decode_flops(module.plan, D, attended)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_bf16_rotation_keeps_one_cast_of_each_table(kind: str) -> None:
    """RoPE's fp32 cos/sin tables are cast to the compute dtype once for q and k
    (`RotaryEmbedding.cast`): the rotation keeps one bf16 (T, R) copy of each, where a cast per
    operand kept two."""
    from autograd_units import saved_during, storages

    module = (Attention(attn_plan(n_kv=2), D, ROPE, alibi=False) if kind == "gqa" else MLA(mla_plan(), D, ROPE, False))
    module = module.bfloat16()
    t, r = 6, 8 if kind == "gqa" else 4
    _, saved = saved_during(lambda: module(torch.randn(1, t, D, dtype=torch.bfloat16, requires_grad=True)))
    tables = [s for s in saved if tuple(s.shape) == (t, r) and s.dtype == torch.bfloat16]
    assert len(storages(tables)) == 2, [tuple(s.shape) for s in saved]


def test_rope_tables_are_built_once_for_the_layers_and_the_steps() -> None:
    """A model's rotary layers share one bf16 cos and one sin table (`RopeTables`), kept by the
    rotation for the backward: one (T, R) tensor of each whatever the layers or steps, equal to
    the tables each layer would build; a new length builds its own (the last two position sets
    are held: MLA under cp rotates at two); an inference-mode pass builds its own, which a
    training step could not save; `reset_buffers` drops them with the frequencies they came from."""
    from archplan.modules.model import ArchplanModel
    from archplan.resolve import resolve
    from archplan.spec import Spec

    spec = Spec.model_validate({
        "name": "rope", "vocab_size": 64, "d_model": 32, "n_layers": 3, "max_seq_len": 32,
        "position": {"kind": "rope", "theta": 10000.0}, "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2},
        "ffn": {"kind": "glu", "d_ff": 64, "activation": "silu"},
    })
    torch.manual_seed(0)
    model = ArchplanModel(resolve(spec)).bfloat16()
    model.reset_buffers()
    rotary = [layer.mixer.rotary for layer in model.layers]
    assert len({id(r.tables) for r in rotary}) == 1
    tokens = torch.randint(0, 64, (2, 12))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(tokens).float().sum().backward()
    width = rotary[0].rotary_dim
    tables = [t for t in saved if tuple(t.shape) == (12, width) and t.dtype == torch.bfloat16]
    assert len(tables) == 3 * 2 * 2 and len({t.data_ptr() for t in tables}) == 2  # 3 layers, q and k, cos and sin
    cos, sin = rotary[2].at(torch.arange(12))
    assert torch.equal(rotary[2].cast(0, 12, torch.bfloat16)[0], cos.bfloat16())
    assert torch.equal(rotary[2].cast(0, 12, torch.bfloat16)[1], sin.bfloat16())
    model(tokens[:, :5])
    assert [tuple(cos_sin[0].shape) for cos_sin, _ in rotary[0].tables.built.values()][-1] == (5, width)
    rotary[0].tables.built.clear()
    with torch.inference_mode():
        model(tokens)
    model(tokens).float().sum().backward()
    rotary[0].reset_buffers()
    assert not rotary[0].tables.built


def test_rope_tables_are_not_cached_while_torch_compile_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the tables are built in the traced graph, not kept in the Python cache
    (which would split the graph at every new position set); the values are the same."""
    rope = RotaryEmbedding(8, ROPE)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    cos, sin = rope.cast(0, 6, torch.bfloat16)
    assert not rope.tables.built
    monkeypatch.undo()
    assert torch.equal(cos, rope.cast(0, 6, torch.bfloat16)[0]) and torch.equal(sin, rope.cast(0, 6, torch.bfloat16)[1])
    assert len(rope.tables.built) == 1


def test_alibi_bias_is_built_once_for_the_layers_and_the_steps() -> None:
    """A model's ALiBi layers share one bias (`BiasCache`), kept by SDPA for the backward: one
    (1, H, T, T) tensor whatever the layers or steps, equal to the one each layer would build; a
    new length replaces it; an inference-mode pass builds its own, which a training step could not
    save."""
    from archplan.modules.model import ArchplanModel
    from archplan.resolve import resolve
    from archplan.spec import Spec

    spec = Spec.model_validate({
        "name": "alibi", "vocab_size": 64, "d_model": 32, "n_layers": 3, "max_seq_len": 32,
        "position": {"kind": "alibi"}, "attention": {"kind": "mqa", "n_heads": 4},
        "ffn": {"kind": "mlp", "d_ff": 64, "activation": "gelu"},
    })
    torch.manual_seed(0)
    model = ArchplanModel(resolve(spec))
    biases = {id(layer.mixer.biases) for layer in model.layers}
    assert len(biases) == 1 and None not in biases
    cache = model.layers[0].mixer.biases
    tokens = torch.randint(0, 64, (2, 12))
    built = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: built.append(t) or t, lambda t: t):
        logits = model(tokens)
    biases_kept = [t for t in built if tuple(t.shape) == (1, 4, 12, 12)]
    assert len(biases_kept) == 3 and len({t.data_ptr() for t in biases_kept}) == 1
    pos = torch.arange(12)
    alibi = model.layers[1].mixer.alibi
    assert torch.equal(biases_kept[0], attention_mask(pos, pos, None, alibi, torch.float32))
    model(tokens)
    assert len(cache.built) == 1
    model(tokens[:, :5])
    assert [tuple(t.shape) for t in cache.built.values()] == [(1, 4, 5, 5)]
    assert torch.isfinite(logits).all()
    # an evaluation pass under inference mode leaves no inference tensor for the next training step
    cache.built.clear()
    with torch.inference_mode():
        model(tokens)
    assert not cache.built
    model(tokens).sum().backward()


def test_a_sliding_window_mask_is_built_once_for_the_layers() -> None:
    """A model's sliding-window layers share one additive mask per window (`BiasCache`), which
    SDPA keeps for the backward as it is given: a boolean mask, converted by SDPA on every call,
    kept a (T, T) copy a layer (2·T² bytes in bf16, measured by bench --train and verify
    --layout). Full causal layers of the same model take SDPA's is_causal and no mask. The
    logits are those of the boolean mask each layer built before."""
    from archplan.modules.model import ArchplanModel
    from archplan.resolve import resolve
    from archplan.spec import Spec

    spec = Spec.model_validate({
        "name": "swa", "vocab_size": 64, "d_model": 32, "n_layers": 3, "max_seq_len": 32,
        "position": {"kind": "rope"}, "attention": {"kind": "gqa", "n_heads": 4, "n_kv_heads": 2, "sliding_window": 4},
        "ffn": {"kind": "glu", "d_ff": 64}, "layout": {"mixers": "SSA"},
    })
    torch.manual_seed(0)
    model = ArchplanModel(resolve(spec))
    tokens = torch.randint(0, 64, (2, 12))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        logits = model(tokens)
    masks = [t for t in kept if tuple(t.shape) == (12, 12)]
    assert len(masks) == 2 and len({t.data_ptr() for t in masks}) == 1
    pos = torch.arange(12)
    allowed = attention_mask(pos, pos, 4, None, torch.float32)
    assert masks[0].dtype == torch.float32 and torch.equal(masks[0] == 0, allowed)
    for layer in model.layers:
        layer.mixer.biases = None  # each layer builds its boolean mask, as before the cache
    assert torch.allclose(model(tokens), logits, atol=1e-6)
