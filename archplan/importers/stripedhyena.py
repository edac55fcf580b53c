"""`model_type: stripedhyena` (StripedHyena-7B, Evo 1): togethercomputer/stripedhyena `model.py`.

Layers in `attn_layer_idxs` are AttentionBlocks (pre RMSNorm, flash-attn MHA with GQA over
num_attention_heads / proj_groups KV heads and full-head-dim rotary, post RMSNorm, gated MLP);
those in `hyena_layer_idxs` are ParallelGatedConvBlocks (pre RMSNorm, projections, short FIR,
modal long filter, out_filter_dense, post RMSNorm, gated MLP); `model.get_block` refuses an
index in neither list, and the import refuses such a config in one line. An index past the
layers is never asked for (the published 7B config lists 32 in hyena_layer_idxs). The vocabulary
is the config's: `VocabParallelEmbedding` is built with `vocab_size` as given, and only the HF
wrapper's own `vocab_size` attribute is padded to make_vocab_size_divisible_by. Defaults are the HF remote-code
`StripedHyenaConfig` (configuration_hyena.py); `ParallelGatedMLP` (layers.py) sizes a null
`inner_mlp_size` as int(2·D·4/3) rounded up to inner_size_multiple_of · model_parallel_size.
Registered in `archplan.importers.hf.FAMILIES` when that module is imported.
"""

from __future__ import annotations

from typing import Any

from archplan.importers.hf import HFConfig, built, compress_mixers, family, glu
from archplan.spec import GQA, MHA, Embedding, Layout, NormSpec, NoPositions, Rope, RopeScaling, StripedHyena

_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, num_filters=4096, inner_mlp_size=14336, attn_layer_idxs=[],
    hyena_layer_idxs=[],
    num_layers=32, tie_embeddings=False, short_filter_length=3, num_attention_heads=32, proj_groups=4,
    hyena_filter_groups=1, model_parallel_size=1, short_filter_bias=True, mha_out_proj_bias=False,
    qkv_proj_bias=False, final_norm=True, max_seqlen=32768, eps=1e-5, state_size=2,
    rotary_emb_base=500000, make_vocab_size_divisible_by=8, inner_size_multiple_of=64,
    mlp_activation="silu", use_interpolated_rotary_pos_emb=False, rotary_emb_scaling_factor=1.0,
)

# Runtime switches (kernels, dtypes, prefill method, checkpoint column order, parallel layout, init)
# that change neither the parameters nor the FLOPs of one forward; the HF wrapper's vocabulary
# padding, which the backbone does not read.
_INERT = (
    "make_vocab_size_divisible_by", "split_k0", "column_split_hyena", "column_split", "pipe_parallel_size",
    "pile_parallel_size", "use_flash_attn", "use_flash_attention_2", "use_flash_rmsnorm",
    "use_flash_depthwise", "use_flashfft", "use_laughing_hyena", "inference_mode", "prefill_style",
    "log_intermediate_values", "mlp_init_method", "mlp_output_init_method", "rng_fork", "tokenizer_type",
    "params_dtype", "attn_block_dtype", "hyena_block_dtype", "mlp_dtype", "max_batch_size", "compile",
    "low_mem_mode", "padding_idx",
)


def _inner_mlp_size(cfg: HFConfig, d: int) -> int:
    if cfg.get("inner_mlp_size") is not None:
        cfg.inert("inner_size_multiple_of", "model_parallel_size")  # only size a null inner_mlp_size
        return cfg.int_("inner_mlp_size")
    multiple = cfg.int_("inner_size_multiple_of") * cfg.int_("model_parallel_size")
    return -(-int(2 * d * 4 / 3) // multiple) * multiple


@family("stripedhyena", defaults=_DEFAULTS, aliases={"max_sequence_len": "max_seqlen"}, inert=_INERT)
def _stripedhyena(cfg: HFConfig) -> dict[str, Any]:
    cfg.fixed("smeared_gqa", False, "flash-attn would run MHA over GQA-shaped projections")
    cfg.fixed("bidirectional", False, "archplan's mixers are causal")
    cfg.fixed("long_fir_threshold", None, "a truncated long filter run as a direct conv is another operator")
    d = cfg.int_("hidden_size")
    n_layers = cfg.layer_count("num_layers")
    heads = cfg.int_("num_attention_heads")
    groups = cfg.int_("proj_groups")
    if d % heads:
        raise cfg.error("num_attention_heads", f"hidden_size {d} is not divisible by {heads} heads")
    if heads % groups:
        raise cfg.error("proj_groups", f"{heads} heads do not split into {groups} groups")
    filters = cfg.int_("num_filters")
    if d % filters:
        raise cfg.error("num_filters", f"hidden_size {d} is not divisible by num_filters {filters}")
    attn = set(cfg.int_list("attn_layer_idxs"))
    outside = sorted(i for i in attn if not 0 <= i < n_layers)
    if outside:
        raise cfg.error("attn_layer_idxs", f"layer {outside[0]} is outside range(num_layers={n_layers})")
    hyena = set(cfg.int_list("hyena_layer_idxs"))
    neither = [i for i in range(n_layers) if i not in attn | hyena]
    if neither:
        raise cfg.error("hyena_layer_idxs", f"layer {neither[0]} is in neither attn_layer_idxs nor hyena_layer_idxs: "
                                            "the reference's get_block builds no block for it")
    letters = ["A" if i in attn else "H" for i in range(n_layers)]
    scaling = None
    if cfg.bool_("use_interpolated_rotary_pos_emb"):
        # positional_embeddings.py LinearlyScaledRotaryEmbedding: positions divided by the factor
        scaling = RopeScaling(kind="linear", factor=cfg.float_("rotary_emb_scaling_factor"))
    else:
        cfg.inert("rotary_emb_scaling_factor")
    spec: dict[str, Any] = {
        "vocab_size": cfg.int_("vocab_size"),
        "d_model": d,
        "n_layers": n_layers,
        "max_seq_len": cfg.int_("max_seqlen"),
        "embedding": Embedding(tied=cfg.bool_("tie_embeddings")),
        # rotary acts inside the attention blocks: none, no positions
        "position": (built(cfg, "rotary_emb_base", Rope, theta=cfg.float_("rotary_emb_base"), scaling=scaling)
                     if attn else NoPositions()),
        "norm": built(cfg, "eps", NormSpec, kind="rmsnorm", eps=cfg.float_("eps")),
        "final_norm": cfg.bool_("final_norm"),
        "ffn": glu(_inner_mlp_size(cfg, d), cfg.activation("mlp_activation")),
        "layout": Layout(mixers=compress_mixers(letters)),
    }
    if "H" in letters:
        spec["long_conv"] = StripedHyena(
            short_filter=cfg.int_("short_filter_length"), short_filter_bias=cfg.bool_("short_filter_bias"),
            state_size=cfg.int_("state_size"), filter_groups=cfg.int_("hyena_filter_groups"),
        )
    else:  # every layer an AttentionBlock: the reference builds no hyena block to read these for
        cfg.inert("short_filter_length", "short_filter_bias", "state_size", "hyena_filter_groups")
    if attn:
        bias = dict(qkv_bias=cfg.bool_("qkv_proj_bias"), out_bias=cfg.bool_("mha_out_proj_bias"))
        spec["attention"] = (
            GQA(n_heads=heads, n_kv_heads=heads // groups, **bias) if groups > 1 else MHA(n_heads=heads, **bias)
        )
    else:
        cfg.inert("qkv_proj_bias", "mha_out_proj_bias", "rotary_emb_base")
    return spec
