"""KV cache and SSM state against docs/formulas.md §3 and §6.2."""

from __future__ import annotations

import re
from typing import Any

import pytest

from archplan.analytic import kv_cache
from archplan.errors import ArchplanError
from archplan.loader import load_spec
from archplan.resolve import ModelPlan, resolve
from archplan.spec import Spec


def plan(**fields: Any) -> ModelPlan:
    return resolve(Spec.model_validate({"name": "t", **fields}))


@pytest.mark.parametrize(
    ("name", "per_token"),
    [
        ("llama-2-7b", 524_288),
        ("llama-3-8b", 131_072),
        ("llama-3-70b", 327_680),
        ("falcon-7b", 8_192),
        ("deepseek-v3", 70_272),
        ("jamba-v0.1", 16_384),
    ],
)
def test_bytes_per_token_bf16(name: str, per_token: int) -> None:
    assert kv_cache(resolve(load_spec(name)), 1).bytes_per_token == per_token


def test_full_context_and_batch() -> None:
    p = resolve(load_spec("llama-3-8b"))
    assert kv_cache(p, 8192).bytes == 1 << 30  # 8192 tokens -> 1.0 GiB
    assert kv_cache(p, 8192, batch=3, dtype_bytes=1).bytes == 3 << 29
    assert kv_cache(p, 8192).ssm_state_bytes == 0


def test_mistral_window_caps_the_cache() -> None:
    p = resolve(load_spec("mistral-7b"))
    assert kv_cache(p, 32768).bytes == 536_870_912  # 512 MiB per sequence at most
    assert kv_cache(p, 4096).bytes == 536_870_912
    assert kv_cache(p, 1000).bytes == 1000 * 131_072
    assert kv_cache(p, 32768).bytes_per_token == 131_072  # the window is not applied per token


def test_mla_absorbed_and_naive() -> None:
    kv = kv_cache(resolve(load_spec("deepseek-v3")), 131_072)
    assert kv.bytes == 131_072 * 70_272  # ~8.58 GiB at 128K
    assert kv.naive_mla_bytes_per_token == 61 * 128 * (192 + 128) * 2
    assert kv_cache(resolve(load_spec("llama-3-8b")), 1).naive_mla_bytes_per_token is None


def test_mamba_states() -> None:
    """mamba-130m 737,280 and mamba2-130m 4,890,624 state elements per sequence (docs/formulas.md §6.2)."""
    m1 = plan(vocab_size=50280, d_model=768, n_layers=24, position={"kind": "none"},
              ssm={"kind": "mamba1"}, layout={"mixers": "M"}, embedding={"tied": True})
    m2 = plan(vocab_size=50288, d_model=768, n_layers=24, position={"kind": "none"},
              ssm={"kind": "mamba2"}, layout={"mixers": "M"}, embedding={"tied": True})
    for p, elements in ((m1, 737_280), (m2, 4_890_624)):
        short, long = kv_cache(p, 1, dtype_bytes=4), kv_cache(p, 100_000, dtype_bytes=4)
        assert short.ssm_state_bytes == long.ssm_state_bytes == long.bytes == 4 * elements
        assert long.bytes_per_token == 0


def test_jamba_state_and_attention() -> None:
    p = resolve(load_spec("jamba-v0.1"))
    kv = kv_cache(p, 1000, batch=2, dtype_bytes=1)  # an fp8 cache: K/V 1 B, the Mamba states still 2 B
    assert kv.ssm_state_bytes == 2 * 4_587_520 * 2
    assert kv.bytes == 2 * (4_587_520 * 2 + 1000 * 8_192)
    assert kv.by_component["layers.4.mixer"] == 2 * 1000 * 2 * 8 * 128
    assert kv.by_component["layers.0.mixer"] == 2 * (8192 * 4 + 8192 * 16) * 2
    assert list(kv.by_component) == [f"layers.{i}.mixer" for i in range(32)]



@pytest.mark.parametrize("batch", [1, 3])
def test_one_more_token_grows_the_cache_by_what_the_per_token_rows_say(batch: int) -> None:
    """hyena-153m: the per-token row said 30.4 KiB where one more token costs 91.1 KiB at batch 1,
    its fp32 filters growing with the context too (18 layers × 864 channels × 4 B, once for the
    batch): `filter_bytes_per_position` states them, for every preset."""
    for name in ("hyena-153m", "llama-3-8b", "mistral-7b", "jamba-v0.1", "stripedhyena-7b", "s4d-lm"):
        p = resolve(load_spec(name))
        short, long = kv_cache(p, 1000, batch=batch), kv_cache(p, 1001, batch=batch)
        assert long.bytes - short.bytes == batch * short.bytes_per_token + short.filter_bytes_per_position, name
    assert kv_cache(resolve(load_spec("hyena-153m")), 1).filter_bytes_per_position == 18 * 864 * 4
    assert kv_cache(resolve(load_spec("llama-3-8b")), 1).filter_bytes_per_position == 0

def test_sub_byte_dtype_rounds_up() -> None:
    p = plan(vocab_size=10, d_model=8, n_layers=1, attention={"kind": "mqa", "n_heads": 8},
             position={"kind": "none"},
             ffn={"kind": "mlp", "d_ff": 8})
    assert kv_cache(p, 3, dtype_bytes=0.5).bytes == 3  # 2·1·1 elements x 3 tokens, 4 bits each
    assert kv_cache(p, 1, dtype_bytes=0.5).bytes_per_token == 1
    # an odd count rounds up: MLA's latent 3 + rope key 2 = 5 elements a token, 2.5 B in int4
    mla = plan(vocab_size=10, d_model=8, n_layers=1, position={"kind": "rope"}, ffn={"kind": "mlp", "d_ff": 8},
               attention={"kind": "mla", "n_heads": 2, "kv_lora_rank": 3, "qk_nope_head_dim": 2,
                          "qk_rope_head_dim": 2, "v_head_dim": 2})
    assert kv_cache(mla, 1, dtype_bytes=0.5).bytes == 3
    assert kv_cache(mla, 3, dtype_bytes=0.5).bytes == 8  # 15 elements, 7.5 B


@pytest.mark.parametrize(
    ("context", "batch", "dtype_bytes", "said"), [
        (0, 1, 2, "context must be a positive integer (got 0)"), (8, 0, 2, "batch must be a positive integer (got 0)"),
        (8, 1, 0, "dtype_bytes must be positive (got 0)"), (8, 1, -2.0, "dtype_bytes must be positive (got -2.0)"),
    ]
)
def test_bad_arguments(context: int, batch: int, dtype_bytes: float, said: str) -> None:
    with pytest.raises(ArchplanError, match=re.escape(said)):
        kv_cache(resolve(load_spec("llama-2-7b")), context, batch=batch, dtype_bytes=dtype_bytes)
