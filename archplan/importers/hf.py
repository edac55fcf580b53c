"""Hugging Face `config.json` -> archplan `Spec`, exact to the model transformers builds from it.

One registry, `FAMILIES`, keyed by `model_type`: each entry is a small converter function plus the
defaults transformers' `configuration_<family>.py` applies when a key is absent (transformers 5.24,
the version `tests/fixtures/expected.json` was recorded with), and two tables: the family's inert
keys and its derived keys. Shared helpers read what every Llama-like family spells the same way
(dims, RoPE, sliding windows, MoE placement).

Every key of the config is accounted for by the key policy below (`COMMON_KEYS`, `Family.inert`,
`Family.derived`, `HFConfig.fixed`, or a converter's read). A key nothing accounts for is returned
in `Imported.ignored`: the CLI reports it on stderr, and `--strict` refuses it, since an importer
that silently drops a key it does not know may print a confident wrong number.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from archplan.errors import ArchplanError, as_text, clipped, dotted, printable
from archplan.loader import read_capped
from archplan.spec import (
    MAX_DIM,
    MAX_LAYERS,
    NAME_MAX_CHARS,
    GLU,
    GQA,
    MHA,
    MLA,
    MLP,
    MQA,
    Alibi,
    Embedding,
    Layout,
    LearnedPositions,
    Mamba1,
    Mamba2,
    MoE,
    MultiTokenPrediction,
    NoPositions,
    NormSpec,
    Parallel,
    PreNorm,
    QKNorm,
    Reference,
    Reordered,
    Rope,
    RopeScaling,
    Router,
    Sandwich,
    SharedExperts,
    Spec,
    control_character,
    rotary_dim,
)

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config.json is a few KB; anything this big is not one

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]

# transformers' ACT2FN names -> the spec's activations. gelu_new, gelu_fast and gelu_pytorch_tanh
# are all 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (Hendrycks & Gimpel 2016, eq. in §2).
ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}

# The key policy (docs/import.md, "Fields"). Every key of a config.json is one of:
#   read     - a converter reads it: it changes size or compute in transformers' modeling code;
#   common   - every `PretrainedConfig` carries it (below), or it never changes size or compute
#              in any family (dropout, init ranges, token ids, cache and generation switches);
#   inert    - the family's own keys that change neither size nor compute (`Family.inert`);
#   derived  - a duplicate of keys that are read (an alias written twice, or a value the family's
#              configuration class derives): accepted when consistent, refused otherwise
#              (`Family.derived`);
#   fixed    - a key transformers hard-codes, accepted only at that value (`HFConfig.fixed`);
#   ignored  - anything else: reported on stderr, an error under `--strict`.

# `PretrainedConfig` attributes (transformers 5 `configuration_utils.py`, and the v4 ones old configs
# still carry: generation defaults, TF/XLA switches, `output_past` of transformers 2-3).
PRETRAINED_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "output_past", "output_attentions", "output_hidden_states", "return_dict",
    "use_return_dict", "torchscript", "pruned_heads", "chunk_size_feed_forward", "id2label",
    "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params", "prefix",
    "tokenizer_class", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    "use_bfloat16", "xla_device", "gradient_checkpointing", "_attn_implementation",
    "attn_implementation", "_attn_implementation_autoset", "_commit_hash", "model_type",
})
# Keys many families carry that change neither the parameter count nor one forward's matmuls:
# training-time dropout and init, serving/runtime switches, quantisation storage metadata.
NEVER_SIZE_OR_COMPUTE = frozenset({
    "quantization_config", "use_cache", "initializer_range", "attention_dropout", "hidden_dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "emb_pdrop", "classifier_dropout",
    "output_router_logits", "router_jitter_noise", "pretraining_tp", "tokenizer_name",
    "cache_implementation",
})
COMMON_KEYS = PRETRAINED_CONFIG_KEYS | NEVER_SIZE_OR_COMPUTE

_ABSENT = object()


def as_json(value: Any) -> str:
    """A config value as config.json spells it (null, true, "yes", [1]), for messages: its first
    80 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return clipped(text, 80)


def is_number(value: Any) -> bool:
    """A finite JSON number a float holds (an integer of 400 digits is none: float() overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# ------------------------------------------------------------------------------- config reader
class HFConfig:
    """A config.json dict read key by key: every read marks the key; `unread()` is what is left.

    A key absent from the file takes the family's transformers default; `aliases` are the other
    spellings transformers' `attribute_map` accepts (GPT-2 `n_embd` for `hidden_size`, ...).
    """

    def __init__(self, data: Mapping[str, Any], *, file: str, model_type: str,
                 defaults: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
        self.data = data
        self.file = file
        self.model_type = model_type
        self.defaults = defaults
        self.aliases = aliases  # spelling in the file -> canonical name
        self.used: set[str] = {"model_type"}
        self.unread_nested: list[str] = []  # "attn_config.x": unknown keys inside a sub-config
        self.notes: list[str] = []
        self.said: list[str] = []  # notes the import also says on stderr: what the spec reads otherwise
        # `import hf --mtp`: build the multi-token-prediction modules a config declares, which
        # transformers does not (so the count is then archplan's, not transformers')
        self.mtp = False

    # -- raw access
    def _spelling(self, name: str) -> str | None:
        spellings = [name] + [alt for alt, canon in self.aliases.items() if canon == name]
        present = [s for s in spellings if s in self.data]
        self.used.update(spellings)
        if len(present) > 1 and len({json.dumps(self.data[s], sort_keys=True) for s in present}) > 1:
            raise self.error(name, f"given twice with different values ({', '.join(present)})")
        return present[0] if present else None

    def has(self, name: str) -> bool:
        return self._spelling(name) is not None

    def get(self, name: str, default: Any = _ABSENT) -> Any:
        """The file's value, else the explicit `default`, else the family default."""
        key = self._spelling(name)
        if key is not None:
            return self.data[key]
        if default is not _ABSENT:
            return default
        if name in self.defaults:
            return self.defaults[name]
        raise self.error(name, f"required field is missing (model_type {self.model_type!r} has no default)")

    def error(self, name: str, message: str) -> ArchplanError:
        return ArchplanError(message, file=self.file, field=name)

    # -- typed access
    def int_(self, name: str, default: Any = _ABSENT) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {as_json(value)}")
        if value <= 0:
            raise self.error(name, f"expected a positive integer, got {as_json(value)}")
        return value

    def layer_count(self, name: str) -> int:
        """A number of layers, refused past the spec's `MAX_LAYERS` before any per-layer list is
        built from it (a count of 10⁹ would exhaust memory spelling its layers out)."""
        value = self.int_(name)
        if value > MAX_LAYERS:
            raise self.error(name, f"expected at most {MAX_LAYERS:,} layers (a spec's limit), got {as_json(value)}")
        return value

    def opt_int(self, name: str, default: Any = _ABSENT) -> int | None:
        """An integer or null (null = 'derive it', as transformers' `getattr(...) or ...` does)."""
        if self.get(name, default) is None:
            return None
        return self.int_(name, default)

    def count(self, name: str, default: Any = _ABSENT) -> int:
        """A non-negative integer (0 allowed: 'no dense prefix', 'no shared expert')."""
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(name, f"expected a non-negative integer, got {as_json(value)}")
        return value

    def float_(self, name: str, default: Any = _ABSENT) -> float:
        value = self.get(name, default)
        if not is_number(value):
            raise self.error(name, f"expected a number, got {as_json(value)}")
        return float(value)

    def bool_(self, name: str, default: Any = _ABSENT) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {as_json(value)}")
        return value

    def str_(self, name: str, default: Any = _ABSENT) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {as_json(value)}")
        return value

    def dict_(self, name: str) -> dict[str, Any] | None:
        value = self.get(name, None)
        if value is not None and not isinstance(value, dict):
            raise self.error(name, f"expected a mapping or null, got {as_json(value)}")
        return value

    def int_list(self, name: str) -> list[int]:
        value = self.get(name, None)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.error(name, f"expected a list of layer indices, got {as_json(value)}")
        return value

    def activation(self, name: str, default: Any = _ABSENT) -> Activation:
        act = self.str_(name, default)
        if act not in ACTIVATIONS:
            raise self.error(name, f"cannot express activation {act!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
        return ACTIVATIONS[act]

    # -- fields that must not change anything
    def inert(self, *names: str) -> None:
        """Fields that change neither size nor compute in this case (the reason at the call)."""
        for name in names:
            self._spelling(name)

    def unread_unless(self, name: str, built: Any) -> None:
        """A key this transformers never reads: the model is built as `built` says whatever the file
        holds, so a value that agrees is accounted for and any other is reported ignored."""
        if name in self.data and self.data[name] == built:
            self.used.add(name)

    def fixed(self, name: str, expected: Any, why: str) -> None:
        """transformers hard-codes this; a config asking for anything else cannot be honoured exactly."""
        key = self._spelling(name)
        if key is not None and self.data[key] != expected:
            raise self.error(name, f"cannot express {name}={self.data[key]!r}: {why}")

    def unread(self) -> list[str]:
        """Keys no rule accounted for: the importer's `ignored` list."""
        # a key with a line break is quoted (`dotted`), so the one-line report stays one line
        top = [dotted((k,)) for k in self.data if k not in self.used and k not in COMMON_KEYS]
        return sorted(top + self.unread_nested)


# ------------------------------------------------------------------------------ shared helpers
@dataclass(frozen=True)
class Dims:
    """The sizes every decoder family has, read once."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    max_pos: int | None
    kv_key: str = "num_key_value_heads"  # the field n_kv was read from, for an error to name


def read_dims(cfg: HFConfig, *, head_dim_key: bool = True, kv_key: str | None = "num_key_value_heads",
              max_pos_key: str | None = "max_position_embeddings") -> Dims:
    """HF Llama-style names. head_dim: `getattr(config, "head_dim", None) or hidden // heads`
    (LlamaAttention and its copies); families whose modeling never reads a head_dim pass False."""
    d_model = cfg.int_("hidden_size")
    n_heads = cfg.int_("num_attention_heads")
    if head_dim_key and cfg.defaults.get("head_dim") is not None and "head_dim" in cfg.data \
            and cfg.data["head_dim"] is None:
        # Gemma's and Qwen3's attention read config.head_dim as it is, with no hidden // heads
        # fallback (transformers refuses the null): a derived width would be a guess
        raise cfg.error("head_dim", f"expected an integer, got null ({cfg.model_type}'s attention has no "
                                    f"hidden_size // num_attention_heads fallback; its default is "
                                    f"{cfg.defaults['head_dim']})")
    # absent and without a family default = derived, as the getattr(...) fallbacks do
    n_kv = (cfg.opt_int(kv_key, cfg.defaults.get(kv_key)) if kv_key else None) or n_heads
    head_dim = (cfg.opt_int("head_dim", cfg.defaults.get("head_dim")) if head_dim_key else None) or d_model // n_heads
    return Dims(
        vocab=cfg.int_("vocab_size"),
        d_model=d_model,
        n_layers=cfg.layer_count("num_hidden_layers"),
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=head_dim,
        max_pos=cfg.int_(max_pos_key) if max_pos_key else None,
    )


def attention(cfg: HFConfig, dims: Dims, *, qkv_bias: bool = False, out_bias: bool = False,
              qk_norm: QKNorm | None = None, window: int | None = None,
              scale_dim: float | None = None) -> MHA | GQA | MQA:
    """The attention kind follows from the head counts (Vaswani MHA, Shazeer MQA, Ainslie GQA);
    `scale_dim`: the scores scaled by 1/sqrt(scale_dim), where the config's scale is not head_dim's."""
    common: dict[str, Any] = dict(
        n_heads=dims.n_heads, head_dim=dims.head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
    )
    if qk_norm is not None:
        common["qk_norm"] = qk_norm
    if window is not None:
        common["sliding_window"] = window
    # a config that writes the default scale out (1/sqrt(128) as a float) states head_dim again
    if scale_dim is not None and not math.isclose(scale_dim, dims.head_dim, rel_tol=1e-9):
        common["scale_dim"] = scale_dim
    if dims.n_kv == dims.n_heads:
        return MHA(kind="mha", **common)
    if dims.n_kv == 1:
        return MQA(kind="mqa", **common)
    if dims.n_heads % dims.n_kv:
        # an absent key reads transformers' default for the family, which the file does not show
        absent = "" if cfg.has(dims.kv_key) else (
            f" (absent: {dims.n_kv} is transformers' {cfg.model_type} default; give {dims.kv_key})")
        raise cfg.error(dims.kv_key,
                        f"{dims.n_heads} query heads are not divisible by {dims.n_kv} key/value heads{absent}")
    return GQA(kind="gqa", n_kv_heads=dims.n_kv, **common)


M = TypeVar("M")


def built(cfg: HFConfig, key: str, model: Callable[..., M], **fields: Any) -> M:
    """`model(**fields)`, refused in the words of the config key its value came from (an eps of 0,
    a negative rope_theta) rather than as pydantic's traceback."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise cfg.error(key, _pydantic_message(exc)) from None


def rms(cfg: HFConfig, key: str = "rms_norm_eps") -> NormSpec:
    return built(cfg, key, NormSpec, kind="rmsnorm", eps=cfg.float_(key))


def layer_norm(cfg: HFConfig, key: str, *, bias: bool = True) -> NormSpec:
    return built(cfg, key, NormSpec, kind="layernorm", bias=bias, eps=cfg.float_(key))


# RoPE scaling types (transformers `ROPE_INIT_FUNCTIONS`) -> spec kinds, with the keys each reads.
_ROPE_KINDS: dict[str, tuple[Literal["linear", "ntk", "yarn", "llama3"], frozenset[str]]] = {
    "linear": ("linear", frozenset({"factor"})),
    "dynamic": ("ntk", frozenset({"factor", "original_max_position_embeddings"})),
    "yarn": ("yarn", frozenset({"factor", "original_max_position_embeddings", "beta_fast",
                                "beta_slow", "mscale", "mscale_all_dim", "truncate"})),
    "llama3": ("llama3", frozenset({"factor", "original_max_position_embeddings",
                                    "low_freq_factor", "high_freq_factor"})),
}
# transformers' rope validation requires `factor` of every scaled type (`required_keys`), and llama3's
# two frequency factors too
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
# keys transformers' rope validation reads for the type (`_validate_yarn_rope_parameters`'s optional
# keys) that the spec cannot express: refused. Any other key outside the type's is one transformers
# warns of and ignores ("Unrecognized keys in `rope_parameters`"): reported, refused under --strict.
_ROPE_UNEXPRESSED = {"yarn": frozenset({"attention_factor"})}
_ROPE_SCALING_FIELDS = {  # config key -> RopeScaling field
    "factor": "factor", "original_max_position_embeddings": "original_max_positions",
    "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim", "truncate": "truncate",
}


def _number(cfg: HFConfig, name: str, value: Any) -> float:
    if not is_number(value):
        raise cfg.error(name, f"expected a number, got {as_json(value)}")
    return float(value)


def rope_source(cfg: HFConfig) -> tuple[str, dict[str, Any]]:
    """The RoPE dict transformers reads, and its key: `rope_parameters = rope_scaling or
    rope_parameters` (modeling_rope_utils.convert_rope_params_to_dict), so beside a legacy dict
    rope_parameters is never read (and, unread, is reported ignored)."""
    legacy = cfg.dict_("rope_scaling")
    if legacy:
        return "rope_scaling", legacy
    return "rope_parameters", cfg.dict_("rope_parameters") or {}


def rope(cfg: HFConfig, dims: Dims, *, fraction: float = 1.0, theta: float = 10000.0, partial: bool = False,
         top_level: bool = True, names: tuple[str, str] = ("rope_theta", "partial_rotary_factor")) -> Rope:
    """RoPE from either spelling: legacy top-level `rope_theta`/`rope_scaling`/`partial_rotary_factor`
    or transformers 5's `rope_parameters` dict (modeling_rope_utils.convert_rope_params_to_dict:
    `rope_parameters = rope_scaling or rope_parameters`, so a legacy dict replaces the new one
    whole, and the top-level keys fill in what the dict leaves out). `fraction` and `theta` are the
    family's defaults; `partial`: the family's rotary embedding reads partial_rotary_factor (Phi,
    Phi-3, StableLM, GPT-NeoX; Llama's and its copies' rotate whole heads whatever it says);
    `top_level`: the family reads the top-level keys at all (GPT-NeoX fills its dict from its own
    names first, so a top-level rope_theta is never read); `names`: the keys the defaults came
    from, which an error about them names (GPT-NeoX's rotary_emb_base and rotary_pct)."""
    where, params = rope_source(cfg)
    if where == "rope_parameters" and any(isinstance(v, dict) for v in params.values()):
        raise cfg.error("rope_parameters", "cannot express per-layer-type RoPE parameters")
    theta_key = f"{where}.rope_theta" if "rope_theta" in params else names[0]
    outer_theta = cfg.float_("rope_theta", theta) if top_level else theta
    theta = _number(cfg, theta_key, params.get("rope_theta", outer_theta))
    if partial:
        outer = cfg.float_("partial_rotary_factor", fraction) if top_level else fraction
        fraction = _number(cfg, f"{where}.partial_rotary_factor", params.get("partial_rotary_factor", outer))
    elif params.get("partial_rotary_factor") is not None or cfg.data.get("partial_rotary_factor") is not None:
        # not marked read: a top-level key is reported ignored as any unread key is
        where_partial = (f"{where}.partial_rotary_factor" if "partial_rotary_factor" in params
                         else "partial_rotary_factor")
        given = params.get("partial_rotary_factor", cfg.data.get("partial_rotary_factor"))
        whole = rotary_dim(dims.head_dim, _number(cfg, where_partial, given)) == dims.head_dim
        if not whole and params.get("rope_type", params.get("type", "default")) not in ("default", None):
            # the scaled initialisers read the factor and build a partial inv_freq, the attention
            # rotates whole heads: transformers' forward fails on the shapes
            raise cfg.error(where_partial, "cannot express a partial rotary factor in a family whose attention "
                                           "rotates whole heads (transformers' scaled RoPE builds a partial "
                                           "frequency table beside it and its forward fails)")
        if where_partial != "partial_rotary_factor":
            cfg.unread_nested.append(where_partial)
    type_key = "rope_type" if "rope_type" in params else "type"
    kind_name = params.get(type_key, "default")
    if not isinstance(kind_name, str):
        raise cfg.error(f"{where}.{type_key}", f"expected a string, got {as_json(kind_name)}")
    scaling: RopeScaling | None = None
    bookkeeping = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if kind_name == "default":
        # `{"factor": 4}` with no type is plain RoPE to transformers, which warns of the keys it
        # does not recognise: reported ignored here (refused under --strict), not dropped unsaid
        cfg.unread_nested.extend(dotted((where, key)) for key in sorted(set(params) - bookkeeping))
    else:
        if kind_name not in _ROPE_KINDS:
            raise cfg.error(f"{where}.{type_key}",
                            f"cannot express RoPE scaling {kind_name!r}; supported: {', '.join(_ROPE_KINDS)}")
        kind, keys = _ROPE_KINDS[kind_name]
        unknown = sorted(set(params) - keys - bookkeeping)
        for key in unknown:
            if key in _ROPE_UNEXPRESSED.get(kind_name, ()):
                raise cfg.error(f"{where}.{key}", f"cannot express this {kind_name} RoPE field")
        cfg.unread_nested.extend(dotted((where, key)) for key in unknown)
        # transformers' rope validation requires every scaled type's factor, and llama3's two frequency
        # factors (the spec's defaults are Llama 3.1's, which a config that omits them has not said it means)
        for key in _ROPE_REQUIRED.get(kind_name, ()):
            if params.get(key) is None:
                given = ", null here" if key in params else ""
                raise cfg.error(f"{where}.{key}", f"required by {kind_name} RoPE scaling{given} (transformers "
                                                  "refuses a config without it)")
        values: dict[str, Any] = {
            _ROPE_SCALING_FIELDS[k]: v for k, v in params.items()
            if k in keys and v is not None
        }
        unscaled = values.get("factor") == 1 and kind in ("linear", "ntk", "llama3")
        if unscaled:
            # at factor 1 these frequencies are RoPE's own (positions / 1, θ·1, llama3's ramp between
            # a frequency and itself; YaRN's attention factor may still scale): transformers builds
            # it, the spec has no scaling to say it with
            cfg.said.append(f"{where}: {kind_name} scaling by a factor of 1 changes no frequency; imported as "
                            "plain RoPE")
        elif kind_name == "dynamic":
            cfg.said.append(
                "dynamic NTK RoPE scaling: transformers grows θ with the running length past "
                "max_position_embeddings; the spec's ntk fixes θ·factor^(R/(R−2)), transformers' θ at "
                "(2 − 1/factor)·max_position_embeddings tokens: counts and FLOPs are the same, the rotary "
                "frequencies at other lengths are not")
        if kind == "yarn" and "mscale" in values and not (values["mscale"] and values.get("mscale_all_dim")):
            # transformers' _compute_yarn_parameters reads mscale only when it and mscale_all_dim are nonzero
            del values["mscale"]
            cfg.said.append(f"{where}.mscale: transformers reads it only when it and mscale_all_dim are both "
                            "nonzero, which this config does not give; the attention gain is 0.1·ln(factor) + 1 "
                            "whatever it says: not imported")
        if kind in ("yarn", "llama3") and "original_max_positions" not in values and dims.max_pos:
            # transformers' _compute_yarn_parameters falls back to max_position_embeddings
            values["original_max_positions"] = dims.max_pos
        try:
            scaling = None if unscaled else RopeScaling(kind=kind, **values)
        except ValidationError as exc:
            raise cfg.error(where, _pydantic_message(exc)) from None
    out: dict[str, Any] = {"kind": "rope", "theta": theta}
    if fraction != 1.0:
        out["fraction"] = fraction
    if scaling is not None:
        out["scaling"] = scaling
    return built(cfg, theta_key if fraction == 1.0 else f"{theta_key} / {names[1]}", Rope, **out)


def compress_mixers(letters: Sequence[str]) -> str:
    """Shortest cyclic pattern that spells the per-layer letters (Layout.mixers repeats it): the
    string's smallest period, n minus its longest proper border, from the Knuth-Morris-Pratt prefix
    function in linear time (trying every period was quadratic: minutes at 100,000 layers)."""
    n = len(letters)
    if not n:
        return ""
    border = [0] * n  # border[i]: longest proper prefix of letters[:i + 1] that is also its suffix
    for i in range(1, n):
        k = border[i - 1]
        while k and letters[i] != letters[k]:
            k = border[k - 1]
        border[i] = k + (letters[i] == letters[k])
    return "".join(letters[:n - border[-1]])


def window_letters(cfg: HFConfig, n_layers: int, window: int | None) -> list[str]:
    """Per-layer A/S from an explicit `layer_types` list (transformers 5 configs), else uniform."""
    types = cfg.get("layer_types", None)
    if types is None:
        return ["S" if window is not None else "A"] * n_layers
    if not isinstance(types, list) or len(types) != n_layers:
        raise cfg.error("layer_types", f"expected a list of {n_layers} layer types")
    letters = []
    for t in types:
        if t == "full_attention":
            letters.append("A")
        elif t == "sliding_attention":
            # a 'sliding' layer without a window attends globally (Qwen2Attention.sliding_window = None)
            letters.append("S" if window is not None else "A")
        else:
            raise cfg.error("layer_types", f"cannot express layer type {t!r}")
    return letters


def moe_layout(cfg: HFConfig, n_layers: int, moe_layers: Sequence[int], fields: str) -> dict[str, int]:
    """Fit `first_dense`, `moe_every`, `moe_offset` to the exact set of MoE layers, or refuse.

    The spec places MoE on layer i iff i >= first_dense and i % moe_every == moe_offset. The layers
    must then be an arithmetic progression that runs to the last layer its step allows.
    """
    layers = sorted(moe_layers)
    if not layers:
        return {}
    if len(layers) == 1:
        every = n_layers - layers[0]
    else:
        every = layers[1] - layers[0]
    ok = all(b - a == every for a, b in zip(layers, layers[1:])) and layers[-1] + every >= n_layers
    if not ok:
        raise cfg.error(fields, f"cannot express MoE on layers {layers} with layout.first_dense/"
                                "moe_every/moe_offset (an arithmetic run to the last layer)")
    layout = {"moe_every": every, "moe_offset": layers[0] % every,
              "first_dense": max(0, layers[0] - every + 1)}
    return {k: v for k, v in layout.items() if v != (1 if k == "moe_every" else 0)}


def glu(d_ff: int, act: Activation, *, bias: bool = False) -> GLU:
    return GLU(kind="glu", d_ff=d_ff, activation=act, bias=bias)


def mlp(d_ff: int, act: Activation, *, bias: bool) -> MLP:
    return MLP(kind="mlp", d_ff=d_ff, activation=act, bias=bias)


def base(dims: Dims, *, tied: bool, lm_head_bias: bool = False, embed_norm: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"vocab_size": dims.vocab, "d_model": dims.d_model, "n_layers": dims.n_layers}
    if dims.max_pos is not None:
        out["max_seq_len"] = dims.max_pos
    emb: dict[str, bool] = {"tied": tied}
    if lm_head_bias:
        emb["lm_head_bias"] = True
    if embed_norm:
        emb["norm"] = True
    out["embedding"] = Embedding(**emb)
    return out


def tied(cfg: HFConfig) -> bool:
    return cfg.bool_("tie_word_embeddings")


def all_layers_window(cfg: HFConfig) -> int | None:
    """Mistral/Mixtral/Phi-3: `sliding_window` (null = global) applies to every layer."""
    return cfg.opt_int("sliding_window")


# ------------------------------------------------------------------------------------ registry
Converter = Callable[[HFConfig], dict[str, Any]]


@dataclass(frozen=True)
class Derived:
    """A key that duplicates what is read: `value(cfg)` is what it must equal (`rule` says how)."""

    value: Callable[[HFConfig], Any]
    rule: str


@dataclass(frozen=True)
class Family:
    convert: Converter
    defaults: Mapping[str, Any]
    aliases: Mapping[str, str] = field(default_factory=dict)
    inert: frozenset[str] = frozenset()
    derived: Mapping[str, Derived] = field(default_factory=dict)
    # (hidden key, heads key) where transformers refuses heads that do not split the hidden size
    # evenly, with or without a head_dim: the config's validate_architecture (llama, gemma2,
    # gpt_neox, deepseek_v2), the attention's ValueError (gpt2, gptj, falcon, bloom, stablelm), or
    # MPT's attention reshaping d_model into n_heads × (d_model // n_heads) at the first forward.
    # Elsewhere head_dim = hidden // heads (or the config's head_dim) builds and runs as read.
    even_heads: tuple[str, str] | None = None
    # keys transformers 5.24's config refuses as null (a strict `int` field, or, for qwen2_moe, a
    # null its attention cannot build with), where a llama-style reading would derive a value
    # (MHA for num_key_value_heads, the whole head for GPT-J's rotary_dim)
    non_null: frozenset[str] = frozenset()
    # keys transformers refuses to set at all, with why (FalconConfig's head_dim is a read-only property)
    refused: Mapping[str, str] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {}


def family(model_type: str, *, defaults: Mapping[str, Any], aliases: Mapping[str, str] | None = None,
           inert: Sequence[str] = (), derived: Mapping[str, Derived] | None = None,
           even_heads: tuple[str, str] | None = None, non_null: Sequence[str] = (),
           refused: Mapping[str, str] | None = None) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        FAMILIES[model_type] = Family(fn, defaults, aliases or {}, frozenset(inert), derived or {}, even_heads,
                                      frozenset(non_null), refused or {})
        return fn
    return register


def check_refused(cfg: HFConfig, fam: Family) -> None:
    """The keys transformers' config of this family refuses: a null where it wants an integer, and
    a key it cannot set at all. Read otherwise, the spec would describe a model transformers never
    builds from this file."""
    for key in sorted(fam.non_null):
        spelled = [key] + [alt for alt, canon in fam.aliases.items() if canon == key]
        for name in spelled:
            if name in cfg.data and cfg.data[name] is None:
                raise cfg.error(name, f"expected an integer, got null (transformers' {cfg.model_type} config "
                                      "refuses a null here)")
    for key, why in fam.refused.items():
        if key in cfg.data:
            raise cfg.error(key, f"transformers' {cfg.model_type} config refuses this key: {why}")


def check_even_heads(cfg: HFConfig, hidden_key: str, heads_key: str) -> None:
    hidden, heads = cfg.int_(hidden_key), cfg.int_(heads_key)
    if hidden % heads:
        raise cfg.error(heads_key, f"{hidden_key} ({hidden}) is not divisible by {heads_key} ({heads}); "
                                   f"transformers cannot build (or run) a {cfg.model_type} model whose heads "
                                   "split the hidden size unevenly")


def check_derived(cfg: HFConfig, derived: Mapping[str, Derived]) -> None:
    """A derived key present in the file must equal what transformers derives: a config that says
    two different things is refused rather than read one way."""
    for key, rule in derived.items():
        if key not in cfg.data:
            continue
        cfg.used.add(key)
        expected = rule.value(cfg)
        if cfg.data[key] != expected:
            raise cfg.error(key, f"{cfg.data[key]!r} contradicts {rule.rule} = {expected!r}")


# Defaults below are transformers 5.24's configuration_<family>.py values (dataclass fields and
# __post_init__), limited to the fields that change size or compute.
_HIDDEN_HEADS = ("hidden_size", "num_attention_heads")  # Family.even_heads of the Llama-style names
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
              max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False, head_dim=None)


def _llama_like(cfg: HFConfig, *, qkv_bias: bool = False, out_bias: bool = False,
                mlp_bias: bool = False, act: Activation | None = None, theta: float = 10000.0,
                window: int | None = None, qk_norm: QKNorm | None = None, partial: bool = False) -> dict[str, Any]:
    """Llama (modeling_llama.py) and its copies: pre-RMSNorm, GQA, gated FFN, RoPE. Biases are the
    caller's: each family decides which config key (if any) transformers reads for them."""
    dims = read_dims(cfg)
    return {
        **base(dims, tied=tied(cfg)),
        "position": rope(cfg, dims, theta=theta, partial=partial),
        "norm": rms(cfg),
        "attention": attention(cfg, dims, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm,
                               window=window),
        "ffn": glu(cfg.int_("intermediate_size"), act or cfg.activation("hidden_act"), bias=mlp_bias),
        "layout": Layout(mixers="S" if window is not None else "A"),
    }


@family("llama", defaults=_LLAMA, even_heads=_HIDDEN_HEADS)
def _llama(cfg: HFConfig) -> dict[str, Any]:
    """modeling_llama.py: attention_bias puts a bias on q, k, v and o; mlp_bias on all three FFN mats."""
    bias = cfg.bool_("attention_bias")
    return _llama_like(cfg, qkv_bias=bias, out_bias=bias, mlp_bias=cfg.bool_("mlp_bias"))


_MISTRAL = {**_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "sliding_window": 4096}


def _no_llama_biases(cfg: HFConfig, family_name: str) -> None:
    """Families whose attention and MLP hard-code bias=False: the Llama keys may only say so."""
    cfg.fixed("attention_bias", False, f"transformers' {family_name} builds no attention biases")
    cfg.fixed("mlp_bias", False, f"transformers' {family_name} builds no MLP biases")


@family("mistral", defaults=_MISTRAL, non_null=("num_key_value_heads",))
def _mistral(cfg: HFConfig) -> dict[str, Any]:
    """modeling_mistral.py: Llama without biases; `sliding_window` (default 4096) on every layer."""
    _no_llama_biases(cfg, "Mistral")
    return _llama_like(cfg, window=all_layers_window(cfg))


def _moe(cfg: HFConfig, *, n_experts: int, top_k: int, expert_ff: int, act: Activation,
         normalize: bool, shared: SharedExperts | None = None) -> MoE:
    """A softmax top-k MoE (Switch/Mixtral routing) with the family's aux-loss coefficient."""
    if top_k > n_experts:
        raise cfg.error("num_experts_per_tok", f"top-k {top_k} exceeds the {n_experts} experts")
    # transformers' load_balancing_loss_func (Mixtral, Qwen-MoE, OLMoE, Jamba) takes each expert's
    # routed tokens over T, so uniform routing costs top_k·coef; the spec's loss (Switch eq. 4, as
    # Megatron-Core and DeepSeek take it) over T·top_k, uniform = coef: the same pull is coef·top_k
    coef = cfg.float_("router_aux_loss_coef")
    if coef:
        cfg.notes.append(f"router_aux_loss_coef {coef:g}: transformers' balance loss counts an expert's tokens "
                         f"over T, the spec's over T·top_k, so aux_loss_coef is {coef:g} × top_k {top_k}")
    out: dict[str, Any] = dict(
        n_experts=n_experts, top_k=top_k, expert=glu(expert_ff, act),
        router=Router(scoring="softmax", normalize_top_k=normalize),
        aux_loss_coef=coef * top_k,
    )
    if shared is not None:
        out["shared"] = shared
    return MoE(**out)


def place_moe(cfg: HFConfig, spec: dict[str, Any], *, mixers: str, moe: Callable[[], MoE],
              moe_layers: Sequence[int], dense_ff: int, fields: str,
              expert_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Put experts on exactly `moe_layers` and the dense FFN (width dense_ff) on the others.
    `expert_keys`: the keys that describe only the experts, which size nothing where no layer gets
    them (a config whose layers are all dense)."""
    n_layers = spec["n_layers"]
    act = spec["ffn"].activation
    spec.pop("ffn")
    if not moe_layers:
        cfg.inert(*expert_keys)
        given = [key for key in expert_keys if cfg.has(key) and cfg.get(key) is not None]
        if given:  # an all-dense model from an MoE config: likely a slip in the experts' placement
            cfg.said.append(f"no layer gets experts ({fields}: all {n_layers} layers dense), "
                            f"so {', '.join(given)} size nothing")
        spec["ffn"] = glu(dense_ff, act)
        spec["layout"] = Layout(mixers=mixers)
        return spec
    if len(moe_layers) < n_layers:
        spec["ffn"] = glu(dense_ff, act)
    spec["moe"] = moe()
    spec["layout"] = Layout(mixers=mixers, **moe_layout(cfg, n_layers, moe_layers, fields))
    return spec


@family("mixtral", defaults={**_MISTRAL, "sliding_window": None, "rms_norm_eps": 1e-5,
                             "num_local_experts": 8, "num_experts_per_tok": 2,
                             "router_aux_loss_coef": 0.001},
        aliases={"num_experts": "num_local_experts"}, non_null=("num_key_value_heads",))
def _mixtral(cfg: HFConfig) -> dict[str, Any]:
    """modeling_mixtral.py: Mistral with a softmax top-k (renormalised) MoE on every layer."""
    _no_llama_biases(cfg, "Mixtral")
    window = all_layers_window(cfg)
    spec = _llama_like(cfg, theta=1e6, window=window)  # MixtralConfig.default_theta
    ff, act = spec["ffn"].d_ff, spec["ffn"].activation
    return place_moe(
        cfg, spec, mixers=spec["layout"].mixers, moe_layers=range(spec["n_layers"]), dense_ff=ff,
        fields="num_local_experts",
        moe=lambda: _moe(cfg, n_experts=cfg.int_("num_local_experts"), top_k=cfg.int_("num_experts_per_tok"),
                         expert_ff=ff, act=act, normalize=True),
    )


_QWEN2 = {**_LLAMA, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
          "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
          "max_window_layers": 28}


def sliding_window_if(cfg: HFConfig) -> int | None:
    """Qwen2/Qwen3(-MoE): `sliding_window` counts only if `use_sliding_window`; otherwise its value
    (Qwen2MoeConfig writes 0 there, Qwen3MoeConfig null) describes nothing that is built."""
    if not cfg.bool_("use_sliding_window"):
        cfg.inert("sliding_window")
        return None
    return cfg.opt_int("sliding_window")


def qwen_window(cfg: HFConfig, n_layers: int, default_sliding: Callable[[int, int], bool]) -> tuple[int | None, str]:
    """Qwen2/Qwen3(-MoE) `__post_init__`: a window only if use_sliding_window; without explicit
    layer_types, layer i slides iff default_sliding(i, max_window_layers)."""
    window = sliding_window_if(cfg)
    max_window = cfg.count("max_window_layers")
    if cfg.get("layer_types", None) is None and window is not None:
        letters = ["S" if default_sliding(i, max_window) else "A" for i in range(n_layers)]
    else:
        letters = window_letters(cfg, n_layers, window)
    return (window if "S" in letters else None), compress_mixers(letters)


@family("qwen2", defaults=_QWEN2)
def _qwen2(cfg: HFConfig) -> dict[str, Any]:
    """modeling_qwen2.py: Llama with q/k/v bias (o without); sliding layers i >= max_window_layers."""
    cfg.fixed("use_mrope", False, "multimodal RoPE sections (Qwen2-VL) are not a text-model feature")
    window, mixers = qwen_window(cfg, cfg.layer_count("num_hidden_layers"), lambda i, m: i >= m)
    spec = _llama_like(cfg, qkv_bias=True, window=window)
    spec["layout"] = Layout(mixers=mixers)
    return spec


def qk_head_norm(cfg: HFConfig) -> QKNorm:
    """Qwen3: one RMSNorm of width head_dim shared by all heads (modeling_qwen3.py q_norm/k_norm)."""
    return QKNorm(scope="head", norm=rms(cfg))


@family("qwen3", defaults={**_QWEN2, "head_dim": 128})
def _qwen3(cfg: HFConfig) -> dict[str, Any]:
    """modeling_qwen3.py: Llama + per-head-dim q/k RMSNorm; head_dim defaults to 128, not d/H."""
    window, mixers = qwen_window(cfg, cfg.layer_count("num_hidden_layers"), lambda i, m: i >= m)
    bias = cfg.bool_("attention_bias")
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias, qk_norm=qk_head_norm(cfg), window=window)
    spec["layout"] = Layout(mixers=mixers)
    return spec


def sparse_layers(cfg: HFConfig, n_layers: int, n_experts: int) -> list[int]:
    """Qwen2/3-MoE decoder layer: experts iff i not in mlp_only_layers and (i+1) % step == 0."""
    step = cfg.int_("decoder_sparse_step")
    dense = set(cfg.int_list("mlp_only_layers"))
    return [i for i in range(n_layers) if i not in dense and n_experts > 0 and (i + 1) % step == 0]


# what describes only the experts of a Qwen2/3-MoE config
_QWEN_EXPERT_KEYS = ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")


def _sparse_fields(cfg: HFConfig, n_experts: int) -> str:
    """What places Qwen's experts, as `place_moe` names it: with none, their count is the reason."""
    if n_experts == 0:
        return "num_experts 0"
    return "mlp_only_layers" if cfg.int_list("mlp_only_layers") else "decoder_sparse_step"


_QWEN_MOE = {**_QWEN2, "hidden_size": 2048, "num_hidden_layers": 24, "decoder_sparse_step": 1,
             "norm_topk_prob": False, "mlp_only_layers": None, "router_aux_loss_coef": 0.001}


@family("qwen2_moe", defaults={**_QWEN_MOE, "intermediate_size": 5632, "num_attention_heads": 16,
                               "num_key_value_heads": 16, "moe_intermediate_size": 1408,
                               "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
                               "num_experts": 60, "qkv_bias": True}, non_null=("num_key_value_heads",))
def _qwen2_moe(cfg: HFConfig) -> dict[str, Any]:
    """modeling_qwen2_moe.py: routed experts + one shared expert behind a sigmoid(Linear(D,1)) gate;
    default sliding layers are the even ones below max_window_layers (Qwen2MoeConfig.__post_init__)."""
    _no_llama_biases(cfg, "Qwen2-MoE")
    n_layers = cfg.layer_count("num_hidden_layers")
    window, mixers = qwen_window(cfg, n_layers, lambda i, m: bool((i + 1) % 2) and i < m)
    spec = _llama_like(cfg, qkv_bias=cfg.bool_("qkv_bias"), window=window)
    n_experts = cfg.count("num_experts")
    shared_ff = cfg.count("shared_expert_intermediate_size")

    def moe() -> MoE:
        # only a sparse layer builds the shared expert and its gate
        if shared_ff == 0:
            raise cfg.error("shared_expert_intermediate_size",
                            "cannot express a zero-width shared expert (transformers still builds its gate)")
        return _moe(cfg, n_experts=n_experts, top_k=cfg.int_("num_experts_per_tok"),
                    expert_ff=cfg.int_("moe_intermediate_size"), act=cfg.activation("hidden_act"),
                    normalize=cfg.bool_("norm_topk_prob"), shared=SharedExperts(n=1, d_ff=shared_ff, gate=True))

    return place_moe(
        cfg, spec, mixers=mixers, moe_layers=sparse_layers(cfg, n_layers, n_experts),
        dense_ff=cfg.int_("intermediate_size"), fields=_sparse_fields(cfg, n_experts), expert_keys=_QWEN_EXPERT_KEYS,
        moe=moe,
    )


@family("qwen3_moe", defaults={**_QWEN_MOE, "intermediate_size": 6144, "num_attention_heads": 32,
                               "num_key_value_heads": 4, "moe_intermediate_size": 768,
                               "num_experts_per_tok": 8, "num_experts": 128},
        aliases={"num_local_experts": "num_experts"},
        # Qwen3MoeConfig has no max_window_layers (Qwen3 configs carry it): unread, the window if
        # any is on every layer
        inert=("max_window_layers",), non_null=("num_key_value_heads",))
def _qwen3_moe(cfg: HFConfig) -> dict[str, Any]:
    """modeling_qwen3_moe.py: Qwen3 attention (q/k head norm; head_dim = getattr or d/H, no 128
    default here) + routed experts; the window (if use_sliding_window) is on every layer."""
    window = sliding_window_if(cfg)
    n_layers = cfg.layer_count("num_hidden_layers")
    bias = cfg.bool_("attention_bias")
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias, qk_norm=qk_head_norm(cfg), window=window)
    n_experts = cfg.count("num_experts")
    return place_moe(
        cfg, spec, mixers=spec["layout"].mixers, moe_layers=sparse_layers(cfg, n_layers, n_experts),
        dense_ff=cfg.int_("intermediate_size"), fields=_sparse_fields(cfg, n_experts), expert_keys=_QWEN_EXPERT_KEYS,
        moe=lambda: _moe(cfg, n_experts=n_experts, top_k=cfg.int_("num_experts_per_tok"),
                         expert_ff=cfg.int_("moe_intermediate_size"), act=cfg.activation("hidden_act"),
                         normalize=cfg.bool_("norm_topk_prob")),
    )


_GEMMA = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
              num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
              max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
              attention_bias=False)


def gemma_act(cfg: HFConfig, key: str) -> Activation:
    """GemmaConfig.__post_init__: the legacy "gelu" of the official releases means the tanh form."""
    act = cfg.activation(key)
    return "gelu_tanh" if act == "gelu" else act


def causal_only(cfg: HFConfig) -> None:
    """Gemma's attention is causal unless use_bidirectional_attention is true (`is_causal = not
    getattr(config, "use_bidirectional_attention", False)`): false and null are the same model."""
    if cfg.get("use_bidirectional_attention", None):
        raise cfg.error("use_bidirectional_attention", "cannot express use_bidirectional_attention=true: "
                                                       "bidirectional attention is not a causal LM")


def scaled_embedding(spec: dict[str, Any]) -> dict[str, Any]:
    """GemmaModel and Gemma2Model multiply the embedding by `normalizer = hidden_size**0.5`."""
    spec["embedding"] = spec["embedding"].model_copy(update={"scaled": True})
    return spec


@family("gemma", defaults=_GEMMA, inert=("hidden_activation",),  # GemmaMLP reads hidden_act only
        non_null=("num_key_value_heads",))
def _gemma(cfg: HFConfig) -> dict[str, Any]:
    """modeling_gemma.py: Llama with GeGLU, (1+w) RMSNorm (still D weights), head_dim default 256,
    tied head, embeddings scaled by sqrt(D) (no parameters)."""
    causal_only(cfg)
    bias = cfg.bool_("attention_bias")
    return scaled_embedding(_llama_like(cfg, qkv_bias=bias, out_bias=bias, act=gemma_act(cfg, "hidden_act")))


def unmodelled(cfg: HFConfig, given: str, operation: str, built: str) -> None:
    """An operation transformers runs that the spec has no field for, said on stderr and in the
    notes: it holds no parameters and no matmul, so the counts and the matmul FLOPs are the same,
    and the built model computes without it."""
    cfg.said.append(f"{given}: {operation} is not in the spec; parameters and matmul FLOPs are the same, {built}")


def softcaps(cfg: HFConfig, keys: tuple[str, ...]) -> None:
    """Gemma 2's soft-caps, c·tanh(x/c) on the attention scores and on the logits."""
    caps = [f"{key} {cfg.float_(key):g}" for key in keys if cfg.get(key) is not None]
    if caps:
        unmodelled(cfg, ", ".join(caps), "soft-capping c·tanh(x/c)",
                   "the built model's scores and logits are not capped")


def clipped_qkv(cfg: HFConfig, key: str, value: object, *, zero_clamps: bool) -> None:
    """OLMo's and MPT's clip_qkv: q, k and v clamped to ±clip_qkv before attention. OLMo clamps
    whenever it is not null (`zero_clamps`: a 0 clamps to zero); MPT only when it is truthy."""
    if value is not None and (zero_clamps or value):
        if not is_number(value):
            raise cfg.error(key, f"expected a number, got {as_json(value)}")
        unmodelled(cfg, f"{key} {value:g}", "clamping q, k and v to ±clip_qkv",
                   "the built model's are not clamped")


@family("gemma2", defaults={**_GEMMA, "hidden_size": 2304, "intermediate_size": 9216,
                            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                            "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                            "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0},
        inert=("hidden_act",),  # Gemma2MLP reads hidden_activation
        # a legacy duplicate of sliding_window that transformers never reads
        derived={"sliding_window_size": Derived(lambda cfg: cfg.opt_int("sliding_window"), "sliding_window")},
        even_heads=_HIDDEN_HEADS, non_null=("num_key_value_heads",))
def _gemma2(cfg: HFConfig) -> dict[str, Any]:
    """modeling_gemma2.py: four RMSNorms per block (sandwich), sliding window on even layers."""
    causal_only(cfg)
    n_layers = cfg.layer_count("num_hidden_layers")
    window = cfg.opt_int("sliding_window")
    if cfg.get("layer_types", None) is None:
        # Gemma2Config.__post_init__: "sliding_attention" if (i + 1) % 2 else "full_attention"
        letters = ["S" if (i + 1) % 2 and window is not None else "A" for i in range(n_layers)]
    else:
        letters = window_letters(cfg, n_layers, window)
    bias = cfg.bool_("attention_bias")
    # Gemma2Config keeps "gelu" as exact GELU (only GemmaConfig maps the legacy value to tanh)
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias, act=cfg.activation("hidden_activation"),
                       window=window if "S" in letters else None)
    spec["residual"] = Sandwich(kind="sandwich")
    spec["layout"] = Layout(mixers=compress_mixers(letters))
    # Gemma2Attention: scaling = query_pre_attn_scalar**-0.5 (Gemma-2-27B: 144 over heads of 128)
    scalar = cfg.float_("query_pre_attn_scalar")
    if scalar != spec["attention"].head_dim:
        spec["attention"] = built(cfg, "query_pre_attn_scalar", type(spec["attention"]),
                                  **{**spec["attention"].model_dump(), "scale_dim": scalar})
    softcaps(cfg, ("attn_logit_softcapping", "final_logit_softcapping"))
    return scaled_embedding(spec)


@family("phi", defaults=dict(vocab_size=51200, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=None,
                             hidden_act="gelu_new", max_position_embeddings=2048, layer_norm_eps=1e-5,
                             tie_word_embeddings=False, qk_layernorm=False))
def _phi(cfg: HFConfig) -> dict[str, Any]:
    """modeling_phi.py: one LayerNorm feeding attention and MLP in parallel (x + attn + mlp), biases
    on every Linear incl. the LM head, partial RoPE (default 0.5), optional per-head-dim qk LayerNorm."""
    dims = read_dims(cfg)
    qk = QKNorm(scope="head", norm=layer_norm(cfg, "layer_norm_eps")) if cfg.bool_("qk_layernorm") else None
    if qk is not None and dims.head_dim != dims.d_model // dims.n_heads:
        raise cfg.error("head_dim", f"cannot express qk_layernorm with head_dim {dims.head_dim}: transformers' "
                                    f"PhiAttention sizes its q/k LayerNorms hidden_size // num_attention_heads "
                                    f"= {dims.d_model // dims.n_heads}, which cannot normalise heads of {dims.head_dim}")
    return {
        **base(dims, tied=tied(cfg), lm_head_bias=True),
        "position": rope(cfg, dims, fraction=0.5, partial=True),
        "norm": layer_norm(cfg, "layer_norm_eps"),
        "residual": Parallel(kind="parallel", shared_norm=True),
        "attention": attention(cfg, dims, qkv_bias=True, out_bias=True, qk_norm=qk),
        "ffn": mlp(cfg.int_("intermediate_size"), cfg.activation("hidden_act"), bias=True),
    }


@family("phi3", defaults=dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                              hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
                              tie_word_embeddings=False, sliding_window=None),
        inert=("original_max_position_embeddings",))  # read by LongRoPE only, which is refused
def _phi3(cfg: HFConfig) -> dict[str, Any]:
    """modeling_phi3.py: fused qkv_proj and gate_up_proj (same sizes as split), no biases, RMSNorm,
    optional window on every layer. LongRoPE ('su'/'longrope'; Phi3 maps 'yarn' to it) is refused."""
    key, scaling = rope_source(cfg)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("su", "yarn", "longrope"):
        raise cfg.error(key, f"cannot express Phi-3 {kind!r} (LongRoPE: per-dimension rescale factors)")
    if kind not in (None, "default"):
        # Phi3Config's validation admits LongRoPE alone ("type must be one of ['longrope']")
        raise cfg.error(key, f"Phi-3 takes no {kind!r} RoPE scaling (transformers refuses every type but "
                             "LongRoPE, which archplan cannot express)")
    _no_llama_biases(cfg, "Phi-3")
    return _llama_like(cfg, qkv_bias=False, out_bias=False, window=all_layers_window(cfg), partial=True)


_LN_EPS = 1e-5


@family("gpt2", defaults=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                              n_inner=None, activation_function="gelu_new", layer_norm_epsilon=_LN_EPS,
                              tie_word_embeddings=True),
        aliases={"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                 "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"},
        # summary_*: the sequence-classification head; the fp32 upcast changes rounding, not the function
        inert=("summary_type", "summary_use_proj", "summary_activation",
                 "summary_proj_to_labels", "summary_first_dropout", "reorder_and_upcast_attn"),
        # n_ctx: the context of OpenAI's original hparams.json, a duplicate of n_positions
        derived={"n_ctx": Derived(lambda cfg: cfg.int_("n_positions"), "n_positions")},
        even_heads=("n_embd", "n_head"))
def _gpt2(cfg: HFConfig) -> dict[str, Any]:
    """modeling_gpt2.py: learned positions (wpe), pre-LayerNorm, biased Conv1D projections, tied head."""
    cfg.fixed("add_cross_attention", False, "cross-attention blocks belong to an encoder-decoder")
    d = cfg.int_("n_embd")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("n_layer"),
                n_heads=cfg.int_("n_head"), n_kv=cfg.int_("n_head"), head_dim=d // cfg.int_("n_head"),
                max_pos=cfg.int_("n_positions"))
    if cfg.bool_("scale_attn_by_inverse_layer_idx", False):
        unmodelled(cfg, "scale_attn_by_inverse_layer_idx true", "scaling layer i's scores by 1/(i + 1)",
                   "the built model's are not")
    # GPT2Attention divides the scores by sqrt(head_dim) only when scale_attn_weights
    unscaled = not cfg.bool_("scale_attn_weights", True)
    return {
        **base(dims, tied=tied(cfg)),
        "position": LearnedPositions(kind="learned"),
        "norm": layer_norm(cfg, "layer_norm_epsilon"),
        "attention": attention(cfg, dims, qkv_bias=True, out_bias=True, scale_dim=1 if unscaled else None),
        "ffn": mlp(cfg.opt_int("n_inner") or 4 * d, cfg.activation("activation_function"), bias=True),
    }


@family("gpt_neox", defaults=dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                                  num_attention_heads=64, intermediate_size=24576, hidden_act="gelu",
                                  max_position_embeddings=2048, layer_norm_eps=_LN_EPS,
                                  tie_word_embeddings=False, use_parallel_residual=True,
                                  attention_bias=True),
        even_heads=_HIDDEN_HEADS)
def _gpt_neox(cfg: HFConfig) -> dict[str, Any]:
    """modeling_gpt_neox.py: fused MHA qkv, biased MLP, two LayerNorms; parallel residual
    x + attn(ln1 x) + mlp(ln2 x) by default; partial RoPE `rotary_pct` (default 0.25)."""
    dims = read_dims(cfg, head_dim_key=False, kv_key=None)
    # GPTNeoXConfig.convert_rope_params_to_dict fills rope_parameters from its own names first
    # (rotary_emb_base, rotary_pct), so a top-level rope_theta / partial_rotary_factor is never read
    fraction = cfg.float_("rotary_pct") if cfg.has("rotary_pct") else 0.25
    theta = cfg.float_("rotary_emb_base") if cfg.has("rotary_emb_base") else 10000.0
    bias = cfg.bool_("attention_bias")
    parallel = cfg.bool_("use_parallel_residual")
    return {
        **base(dims, tied=tied(cfg)),
        "position": rope(cfg, dims, fraction=fraction, theta=theta, partial=True, top_level=False,
                         names=("rotary_emb_base", "rotary_pct")),
        "norm": layer_norm(cfg, "layer_norm_eps"),
        "residual": Parallel(kind="parallel", shared_norm=False) if parallel else PreNorm(kind="pre"),
        "attention": attention(cfg, dims, qkv_bias=bias, out_bias=bias),
        "ffn": mlp(cfg.int_("intermediate_size"), cfg.activation("hidden_act"), bias=True),
    }


@family("gptj", defaults=dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                              rotary_dim=64, n_inner=None, activation_function="gelu_new",
                              layer_norm_epsilon=_LN_EPS, tie_word_embeddings=False),
        aliases={"max_position_embeddings": "n_positions", "hidden_size": "n_embd",
                 "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"},
        # GPTJAttention scales by sqrt(head_dim) whatever scale_attn_weights says; summary_*: the
        # sequence-classification head of the GPT-2 config it was copied from
        inert=("scale_attn_weights", "summary_type", "summary_use_proj", "summary_activation",
                 "summary_proj_to_labels", "summary_first_dropout"),
        even_heads=("n_embd", "n_head"), non_null=("rotary_dim",))
def _gptj(cfg: HFConfig) -> dict[str, Any]:
    """modeling_gptj.py: parallel block on one LayerNorm, unbiased q/k/v/out, biased MLP (4D default),
    LM head with bias, RoPE on the first `rotary_dim` dims of each head (null = all)."""
    cfg.fixed("rotary", True, "GPT-J always rotates (the flag of the original mesh-transformer-jax config)")
    d, h = cfg.int_("n_embd"), cfg.int_("n_head")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("n_layer"), n_heads=h,
                n_kv=h, head_dim=d // h, max_pos=cfg.int_("n_positions"))
    rot = cfg.opt_int("rotary_dim") or dims.head_dim
    if rot > dims.head_dim or rotary_dim(dims.head_dim, rot / dims.head_dim) != rot:
        raise cfg.error("rotary_dim", f"cannot express rotary_dim {rot} for head_dim {dims.head_dim}")
    # create_sinusoidal_positions hard-codes θ 10,000 and no scaling, over rotary_dim: rope_theta,
    # rope_scaling, rope_parameters and partial_rotary_factor are never read (so reported ignored)
    fraction = rot / dims.head_dim
    position = built(cfg, "rotary_dim", Rope, kind="rope", theta=10000.0,
                     **({"fraction": fraction} if fraction != 1 else {}))
    return {
        **base(dims, tied=tied(cfg), lm_head_bias=True),
        "position": position,
        "norm": layer_norm(cfg, "layer_norm_epsilon"),
        "residual": Parallel(kind="parallel", shared_norm=True),
        "attention": attention(cfg, dims),
        "ffn": mlp(cfg.opt_int("n_inner") or 4 * d, cfg.activation("activation_function"), bias=True),
    }


def _falcon_legacy_keys(cfg: HFConfig) -> None:
    """The RefinedWeb configs' n_layer, n_head and n_head_kv: their remote code's RWConfig mapped them
    to num_hidden_layers, num_attention_heads and num_kv_heads (its attribute_map); transformers 5's
    FalconConfig has no attribute_map, so it builds its defaults (32 layers, 71 heads, K/V as the
    heads) and keeps them as stray attributes. Alone, they would make a count the file does not
    mean: refused. Beside the new names they are read as transformers reads them: ignored
    (reported), or nothing to say where they agree."""
    # n_head_kv sized K/V only under the new decoder architecture (num_kv_heads is read there alone)
    kv_read = cfg.data.get("new_decoder_architecture") is True
    for legacy, name in (("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
                         ("n_head_kv", "num_kv_heads")):
        if legacy not in cfg.data:
            continue
        if name not in cfg.data and (legacy != "n_head_kv" or kv_read):
            raise cfg.error(legacy, f"transformers' FalconConfig (5.x) no longer reads {legacy}: it would build "
                                    f"its default {name}={cfg.defaults[name]}; rename it to {name} "
                                    f"(the RefinedWeb remote code's RWConfig read {legacy} as that)")
        if cfg.data[legacy] == cfg.data.get(name):
            cfg.used.add(legacy)


@family("falcon", defaults=dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                                num_attention_heads=71, num_ln_in_parallel_attn=None,
                                layer_norm_epsilon=_LN_EPS, num_kv_heads=None, alibi=False,
                                new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                bias=False, max_position_embeddings=2048, ffn_hidden_size=None,
                                activation="gelu", tie_word_embeddings=True),
        aliases={"n_embed": "hidden_size"},
        refused={"head_dim": "FalconConfig derives it as hidden_size // num_attention_heads (a read-only property)"})
def _falcon(cfg: HFConfig) -> dict[str, Any]:
    """modeling_falcon.py FalconAttention/FalconDecoderLayer. K/V heads: new_decoder_architecture ->
    num_kv_heads (GQA); else multi_query -> 1; else all heads (qkv = 3·D). Norms: parallel with
    num_ln_in_parallel_attn == 2 (the new-architecture default) -> ln_attn + ln_mlp; parallel
    otherwise -> one shared input_layernorm; sequential -> pre-norm with two LayerNorms."""
    _falcon_legacy_keys(cfg)  # before the heads' split, which a legacy n_head would otherwise be blamed on
    check_even_heads(cfg, *_HIDDEN_HEADS)
    # transformers 5's Falcon never reads it (unlike BLOOM's): its residual is always the block's input
    cfg.unread_unless("apply_residual_connection_post_layernorm", False)
    d, h = cfg.int_("hidden_size"), cfg.int_("num_attention_heads")
    new_arch, multi_query = cfg.bool_("new_decoder_architecture"), cfg.bool_("multi_query")
    parallel = cfg.bool_("parallel_attn")
    n_ln = cfg.get("num_ln_in_parallel_attn")
    if n_ln is None and new_arch:
        n_ln = 2
    if new_arch and not parallel:
        raise cfg.error("parallel_attn", "cannot express new_decoder_architecture with parallel_attn=false "
                                         "(transformers' FalconDecoderLayer has no MLP input for it)")
    if not new_arch and parallel and n_ln == 2:
        raise cfg.error("num_ln_in_parallel_attn", "cannot express num_ln_in_parallel_attn=2 without "
                                                   "new_decoder_architecture (transformers builds norms it never calls)")
    if n_ln not in (None, 1, 2):
        raise cfg.error("num_ln_in_parallel_attn", f"expected 1 or 2, got {as_json(n_ln)}")
    n_kv = cfg.opt_int("num_kv_heads") or h
    if not new_arch and not multi_query and n_kv != h:
        raise cfg.error("num_kv_heads", "cannot express num_kv_heads without new_decoder_architecture or "
                                        "multi_query (transformers' fused qkv is then 3·hidden_size)")
    if not new_arch:
        n_kv = 1 if multi_query else h
    elif n_kv < h:
        # FalconAttention._split_heads broadcasts K and V to every query head before the cache
        cfg.said.append(f"new_decoder_architecture: transformers caches K and V broadcast to all {h} heads, "
                        f"{h // n_kv}x the cache `size` reports, which is the {n_kv} KV heads the "
                        "weights have (what a serving engine that keeps GQA holds)")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("num_hidden_layers"),
                n_heads=h, n_kv=n_kv, head_dim=d // h, max_pos=cfg.int_("max_position_embeddings"),
                kv_key="num_kv_heads")
    bias = cfg.bool_("bias")
    if parallel:
        residual: Parallel | PreNorm = Parallel(kind="parallel", shared_norm=n_ln != 2)
    else:
        residual = PreNorm(kind="pre")
    if cfg.bool_("alibi"):
        cfg.inert("rope_theta", "rope_scaling", "rope_parameters")  # FalconModel builds no rotary then
        # FalconModel divides the ALiBi tensor by sqrt(head_dim), as Falcon-RW's own code scales
        # (q·k + alibi); its eager path also adds the undivided tensor, a second time, which the sdpa
        # path and the original code do not: the spec follows those two
        position: Alibi | Rope = Alibi(kind="alibi", scaled=True)
    else:
        position = rope(cfg, dims)
    return {
        **base(dims, tied=tied(cfg)),
        "position": position,
        "norm": layer_norm(cfg, "layer_norm_epsilon"),
        "residual": residual,
        "attention": attention(cfg, dims, qkv_bias=bias, out_bias=bias),
        "ffn": mlp(cfg.opt_int("ffn_hidden_size") or 4 * d, cfg.activation("activation"), bias=bias),
    }


@family("bloom", defaults=dict(vocab_size=250880, hidden_size=64, n_layer=2, n_head=8,
                               layer_norm_epsilon=_LN_EPS, tie_word_embeddings=True),
        aliases={"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"},
        # Megatron-DeepSpeed fusion/precision switches and tensor-parallel slicing: numerics only
        inert=("slow_but_exact", "masked_softmax_fusion", "bias_dropout_fusion", "skip_bias_add",
                 "skip_bias_add_qkv", "attention_softmax_in_fp32", "offset_alibi"),
        even_heads=("hidden_size", "n_head"))
def _bloom(cfg: HFConfig) -> dict[str, Any]:
    """modeling_bloom.py: ALiBi, LayerNorm after the embedding, biased fused qkv/dense, MLP of
    4·D with bloom_gelu (the tanh form), tied head."""
    cfg.fixed("apply_residual_connection_post_layernorm", False,
              "a residual taken after the LayerNorm is not a residual kind archplan has")
    cfg.fixed("n_inner", None, "transformers' BloomMLP always builds 4·hidden_size")
    tp_slices = cfg.get("pretraining_tp", 1)
    if cfg.bool_("slow_but_exact", False) and isinstance(tp_slices, int) and tp_slices > 1:
        # BloomAttention/BloomMLP's sliced path runs F.linear on the slices without the dense and
        # dense_4h_to_h biases, which Megatron-DeepSpeed's code adds
        raise cfg.error("slow_but_exact", "cannot express slow_but_exact=true with pretraining_tp > 1: "
                                          "transformers then drops the output projections' biases, which "
                                          "Megatron-DeepSpeed's code adds; refusing to pick one")
    d, h = cfg.int_("hidden_size"), cfg.int_("n_head")
    # ALiBi has no position table, so transformers reads no length; Megatron-DeepSpeed's seq_length,
    # where the config keeps it, is the length the model was trained at
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("n_layer"), n_heads=h,
                n_kv=h, head_dim=d // h, max_pos=cfg.opt_int("seq_length", None))
    return {
        **base(dims, tied=tied(cfg), embed_norm=True),
        "position": Alibi(kind="alibi"),
        "norm": layer_norm(cfg, "layer_norm_epsilon"),
        "attention": attention(cfg, dims, qkv_bias=True, out_bias=True),
        "ffn": mlp(4 * d, "gelu_tanh", bias=True),
    }


# alibi_bias_max: transformers' port always builds the slopes of 8 (build_mpt_alibi_tensor's
# default), where MosaicML's code honours the key
_MPT_ATTN_FIXED = {"attn_type": "multihead_attention", "alibi": True, "qk_ln": False, "prefix_lm": False,
                   "alibi_bias_max": 8}
# read in `_mpt`: softmax_scale (the spec's scale_dim) and clip_qkv (said, not modelled);
# transformers 5 writes attn_config as a sub-config, with every PretrainedConfig key (COMMON_KEYS)
_MPT_ATTN_READ = frozenset({"softmax_scale", "clip_qkv"})
_MPT_ATTN_INERT = frozenset({"attn_pdrop", "attn_impl", "attn_uses_sequence_id"})


@family("mpt", defaults=dict(d_model=2048, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=50368,
                             layer_norm_epsilon=_LN_EPS, tie_word_embeddings=True),
        aliases={"num_attention_heads": "n_heads", "hidden_size": "d_model", "num_hidden_layers": "n_layers"},
        # learned_pos_emb is unused when ALiBi is on (the only mode transformers builds);
        # embedding_fraction scales embedding gradients; init_* are init
        inert=("learned_pos_emb", "embedding_fraction", "init_device", "init_config",
                 "verbose", "use_pad_tok_in_ffn"),
        even_heads=("d_model", "n_heads"))
def _mpt(cfg: HFConfig) -> dict[str, Any]:
    """modeling_mpt.py: transformers hard-codes MHA without biases, MLP 4·D exact GELU, LayerNorms
    without bias, ALiBi, tied head; configs asking for other values are refused, not approximated."""
    why = "transformers' MPT port ignores it (always 4·d_model, no biases, ALiBi, MHA)"
    cfg.fixed("expansion_ratio", 4, why)
    cfg.fixed("no_bias", True, why)
    # MosaicML's MPTForCausalLM multiplies the logits by it; transformers' port never reads it
    cfg.fixed("logit_scale", None, "transformers' MPT port ignores it while MosaicML's code scales the logits; "
                                   "refusing to pick one")
    norm_type = cfg.str_("norm_type", "low_precision_layernorm")
    if norm_type not in ("low_precision_layernorm", "layernorm"):
        raise cfg.error("norm_type", f"cannot express norm_type={norm_type!r}: transformers' MPT builds LayerNorm")
    attn_cfg = cfg.dict_("attn_config") or {}
    for key, value in attn_cfg.items():
        if key in _MPT_ATTN_FIXED and value != _MPT_ATTN_FIXED[key]:
            raise cfg.error(f"attn_config.{key}", f"cannot express {key}={value!r}: {why}")
        if key not in _MPT_ATTN_FIXED and key not in _MPT_ATTN_READ | _MPT_ATTN_INERT and key not in COMMON_KEYS:
            cfg.unread_nested.append(dotted(("attn_config", key)))
    d, h = cfg.int_("d_model"), cfg.int_("n_heads")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("n_layers"), n_heads=h,
                n_kv=h, head_dim=d // h, max_pos=cfg.int_("max_seq_len"))
    clipped_qkv(cfg, "attn_config.clip_qkv", attn_cfg.get("clip_qkv"), zero_clamps=False)
    # MptAttention multiplies the scores by softmax_scale (null: 1/sqrt(head_dim))
    softmax_scale = attn_cfg.get("softmax_scale")
    scale_dim = None
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not 0 < softmax_scale < math.inf:
            raise cfg.error("attn_config.softmax_scale", f"expected a positive number, got {as_json(softmax_scale)}")
        try:
            scale_dim = float(f"{softmax_scale ** -2:.12g}")  # 0.1 gives 100, not 99.99999999999999
        except OverflowError:
            scale_dim = math.inf
        if not 0 < scale_dim <= MAX_DIM:
            raise cfg.error("attn_config.softmax_scale", f"cannot express a scale of {softmax_scale:g}: the spec's "
                                                         f"scale_dim = 1/s² must lie in (0, {MAX_DIM:,}]")
    return {
        **base(dims, tied=tied(cfg)),
        "position": Alibi(kind="alibi"),
        "norm": layer_norm(cfg, "layer_norm_epsilon", bias=False),
        "attention": attention(cfg, dims, scale_dim=scale_dim),
        "ffn": mlp(4 * d, "gelu", bias=False),
    }


@family("stablelm", defaults=dict(vocab_size=50304, intermediate_size=6912, hidden_size=2560,
                                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                  hidden_act="silu", max_position_embeddings=4096, layer_norm_eps=_LN_EPS,
                                  tie_word_embeddings=False, use_qkv_bias=False, qk_layernorm=False,
                                  use_parallel_residual=False),
        even_heads=_HIDDEN_HEADS, non_null=("num_key_value_heads",))
def _stablelm(cfg: HFConfig) -> dict[str, Any]:
    """modeling_stablelm.py: LayerNorms with bias, SwiGLU, partial RoPE (default 0.25), optional q/k
    LayerNorm per head (a separate bias-free norm per head), optional parallel residual on one norm."""
    dims = read_dims(cfg, head_dim_key=False)
    qk = (QKNorm(scope="per_head", norm=layer_norm(cfg, "layer_norm_eps", bias=False))
          if cfg.bool_("qk_layernorm") else None)
    parallel = cfg.bool_("use_parallel_residual")
    return {
        **base(dims, tied=tied(cfg)),
        "position": rope(cfg, dims, fraction=0.25, partial=True),
        "norm": layer_norm(cfg, "layer_norm_eps"),
        "residual": Parallel(kind="parallel", shared_norm=True) if parallel else PreNorm(kind="pre"),
        "attention": attention(cfg, dims, qkv_bias=cfg.bool_("use_qkv_bias"), qk_norm=qk),
        "ffn": glu(cfg.int_("intermediate_size"), cfg.activation("hidden_act")),
    }


_OLMO = {**_LLAMA, "vocab_size": 50304, "rms_norm_eps": 1e-5}


@family("olmo", defaults=_OLMO)
def _olmo(cfg: HFConfig) -> dict[str, Any]:
    """modeling_olmo.py: Llama's attention and SwiGLU, but every norm is `OlmoLayerNorm`,
    F.layer_norm with no weight and no bias at a fixed eps 1e-5 (Groeneveld et al. 2024 §2.1)."""
    clipped_qkv(cfg, "clip_qkv", cfg.get("clip_qkv", None), zero_clamps=True)
    bias = cfg.bool_("attention_bias")
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias)
    spec["norm"] = NormSpec(kind="layernorm", affine=False, eps=1e-5)
    return spec


@family("olmo2", defaults=_OLMO)
def _olmo2(cfg: HFConfig) -> dict[str, Any]:
    """modeling_olmo2.py: 'reordered' norms x + norm(f(x)) and RMSNorm over the whole q (H·Dh) and
    k (Hkv·Dh) projections."""
    bias = cfg.bool_("attention_bias")
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias, qk_norm=QKNorm(scope="full", norm=rms(cfg)))
    spec["residual"] = Reordered(kind="reordered")
    return spec


@family("olmoe", defaults={**_OLMO, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
                           "num_attention_heads": 16, "max_position_embeddings": 4096,
                           "num_experts_per_tok": 8, "num_experts": 64, "norm_topk_prob": False,
                           "router_aux_loss_coef": 0.01},
        aliases={"num_local_experts": "num_experts"})
def _olmoe(cfg: HFConfig) -> dict[str, Any]:
    """modeling_olmoe.py: pre-RMSNorm, full-width q/k RMSNorm, routed experts on every layer."""
    clipped_qkv(cfg, "clip_qkv", cfg.get("clip_qkv", None), zero_clamps=True)
    dims = read_dims(cfg)
    if dims.head_dim * dims.n_heads != dims.d_model:
        # OlmoeAttention sizes q_norm by hidden_size and k_norm by (hidden // heads) · n_kv
        raise cfg.error("head_dim", "cannot express OLMoE q/k norms when head_dim · heads != hidden_size")
    bias = cfg.bool_("attention_bias")
    spec = _llama_like(cfg, qkv_bias=bias, out_bias=bias, qk_norm=QKNorm(scope="full", norm=rms(cfg)))
    ff, act = spec["ffn"].d_ff, spec["ffn"].activation
    return place_moe(
        cfg, spec, mixers="A", moe_layers=range(dims.n_layers), dense_ff=ff, fields="num_experts",
        moe=lambda: _moe(cfg, n_experts=cfg.int_("num_experts"), top_k=cfg.int_("num_experts_per_tok"),
                         expert_ff=ff, act=act, normalize=cfg.bool_("norm_topk_prob")),
    )


_DEEPSEEK = dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, first_k_dense_replace=0,
                 kv_lora_rank=512, q_lora_rank=1536, n_routed_experts=64, n_shared_experts=2,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0,
                 norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                 moe_intermediate_size=1407, topk_method="greedy", n_group=None, topk_group=None,
                 aux_loss_alpha=0.001, seq_aux=True)
# num_key_value_heads: MLA ignores it (keys and values come from the latent); ep_size: expert
# parallelism; rope_interleave: a layout of the same rotation.
_DEEPSEEK_INERT = ("num_key_value_heads", "ep_size", "rope_interleave")
# DeepseekV2/V3Config.__post_init__ derives both (and overwrites what the file says)
_DEEPSEEK_DERIVED = {
    "qk_head_dim": Derived(lambda cfg: cfg.int_("qk_nope_head_dim") + cfg.int_("qk_rope_head_dim"),
                           "qk_nope_head_dim + qk_rope_head_dim"),
    "head_dim": Derived(lambda cfg: cfg.int_("qk_rope_head_dim"), "qk_rope_head_dim"),
}


def _deepseek_normalizes(cfg: HFConfig, v3: bool) -> bool:
    """V3 renormalises the top-k weights iff norm_topk_prob (DeepseekV3TopkRouter); transformers'
    DeepseekV2TopkRouter never does, while DeepSeek's own V2 code honours the key: refuse to pick."""
    if v3:
        return cfg.bool_("norm_topk_prob")
    cfg.fixed("norm_topk_prob", False, "transformers' DeepseekV2TopkRouter ignores it while DeepSeek's "
                                       "code renormalises; refusing to pick one")
    return False


def _deepseek_groups(cfg: HFConfig, v3: bool) -> dict[str, Any]:
    """Group-limited routing. V2 (DeepseekV2TopkRouter): only with topk_method group_limited_greedy,
    a group scored by its best expert. V3 (DeepseekV3TopkRouter): always, a group scored by the sum
    of its best two (noaux_tc); null n_group/topk_group = no grouping."""
    if v3:
        cfg.fixed("topk_method", "noaux_tc", "transformers' DeepseekV3TopkRouter always routes noaux_tc "
                                             "while DeepSeek's code honours the key; refusing to pick one")
        score = "top2_sum"
    else:
        method = cfg.str_("topk_method")
        if method not in ("greedy", "group_limited_greedy"):
            raise cfg.error("topk_method", f"cannot express {method!r}: transformers' DeepseekV2TopkRouter "
                                           "routes greedy or group_limited_greedy")
        if method == "greedy":
            cfg.inert("n_group", "topk_group")  # DeepseekV2TopkRouter reads them only when grouping
            return {}
        score = "max"
    groups, keep = cfg.opt_int("n_group"), cfg.opt_int("topk_group")
    if groups is None or keep is None:
        return {}
    return {"n_group": groups, "topk_group": keep, "group_score": score}


def _deepseek(cfg: HFConfig, *, v3: bool) -> dict[str, Any]:
    """modeling_deepseek_v2/v3.py: MLA (DeepSeek-V2 §2.1) and DeepSeekMoE; layer i has experts iff
    i >= first_k_dense_replace. V2 routes by softmax, V3 by sigmoid with a score-correction buffer."""
    name = "DeepseekV3" if v3 else "DeepseekV2"
    cfg.fixed("attention_bias", False, "the spec's MLA has no projection biases")
    if v3:  # DeepseekV3's MLPs take no bias argument: the key is never read
        cfg.unread_unless("mlp_bias", False)
    else:
        cfg.fixed("mlp_bias", False, "the spec's MoE experts have no biases")
    cfg.fixed("moe_layer_freq", 1, f"transformers' {name}DecoderLayer ignores it while DeepSeek's own "
                                   "code places experts every moe_layer_freq-th layer; refusing to pick one")
    cfg.fixed("scoring_func", "sigmoid" if v3 else "softmax", f"transformers' {name} router fixes its scoring")
    depth = cfg.count("num_nextn_predict_layers") if v3 and cfg.has("num_nextn_predict_layers") else 0
    if depth and cfg.mtp:
        cfg.notes.append(f"num_nextn_predict_layers: built as `mtp: {{depth: {depth}}}` (--mtp); transformers "
                         "builds no multi-token-prediction module, so its count is the main model's")
    elif depth:  # said on stderr: the checkpoint holds a module the spec sizes nothing of
        cfg.said.append("num_nextn_predict_layers: transformers does not build the multi-token-prediction "
                         f"module, so neither does this spec; import with --mtp, or add `mtp: {{depth: {depth}}}`, "
                         "to size it as trained (the deepseek-v3-mtp preset)")
    dims = read_dims(cfg, head_dim_key=False, kv_key=None)
    cfg.inert(*_DEEPSEEK_INERT)
    attn = MLA(kind="mla", n_heads=dims.n_heads, q_lora_rank=cfg.opt_int("q_lora_rank"),
               kv_lora_rank=cfg.int_("kv_lora_rank"), qk_nope_head_dim=cfg.int_("qk_nope_head_dim"),
               qk_rope_head_dim=cfg.int_("qk_rope_head_dim"), v_head_dim=cfg.int_("v_head_dim"))
    act = cfg.activation("hidden_act")
    spec: dict[str, Any] = {
        **base(dims, tied=tied(cfg)),
        "position": rope(cfg, dims),
        "norm": rms(cfg),
        "attention": attn,
        "ffn": glu(cfg.int_("intermediate_size"), act),
    }
    n_routed = cfg.int_("n_routed_experts")
    first = cfg.count("first_k_dense_replace")
    # DeepseekV2/V3DecoderLayer: experts iff layer_idx >= first_k_dense_replace
    layers = range(min(first, dims.n_layers), dims.n_layers)

    def moe() -> MoE:
        top_k = cfg.opt_int("num_experts_per_tok")
        if top_k is None:
            raise cfg.error("num_experts_per_tok", "required when n_routed_experts is set")
        # 0: transformers' DeepseekV2Moe / DeepseekV3Moe still build their shared MLP, of width 0: no
        # parameters and a zero output, a layer without shared experts exactly
        n_shared = cfg.count("n_shared_experts")
        router = Router(scoring="sigmoid" if v3 else "softmax", normalize_top_k=_deepseek_normalizes(cfg, v3),
                        score_correction_bias=v3, scale=cfg.float_("routed_scaling_factor"),
                        **_deepseek_groups(cfg, v3))
        expert_ff = cfg.int_("moe_intermediate_size")
        if top_k > n_routed:
            raise cfg.error("num_experts_per_tok", f"top-k {top_k} exceeds the {n_routed} experts")
        # DeepSeek's configuration_deepseek.py: aux_loss_alpha (default 0.001) weights the balance
        # loss, seq_aux (default true) takes it per sequence (DeepSeek-V3 eq. 17-20)
        balance = dict(aux_loss_coef=cfg.float_("aux_loss_alpha"),
                       aux_loss_scope="sequence" if cfg.bool_("seq_aux") else "batch")
        try:
            return MoE(n_experts=n_routed, top_k=top_k, expert=glu(expert_ff, act),
                       shared=SharedExperts(n=n_shared, d_ff=expert_ff) if n_shared else None, router=router,
                       **balance)
        except ValidationError as exc:
            raise cfg.error("n_group", _pydantic_message(exc)) from None

    if depth and cfg.mtp:
        spec["mtp"] = MultiTokenPrediction(depth=depth)
    # a dense DeepSeek (no layer past first_k_dense_replace): no expert is built
    return place_moe(cfg, spec, mixers="A", moe=moe, moe_layers=layers,
                     dense_ff=cfg.int_("intermediate_size"), fields="first_k_dense_replace",
                     expert_keys=("num_experts_per_tok", "n_shared_experts", "norm_topk_prob",
                                  "routed_scaling_factor", "moe_intermediate_size", "n_group", "topk_group",
                                  "topk_method", "aux_loss_alpha", "seq_aux"))


@family("deepseek_v2", defaults=_DEEPSEEK, aliases={"num_experts": "n_routed_experts"}, derived=_DEEPSEEK_DERIVED,
        even_heads=_HIDDEN_HEADS, non_null=("n_routed_experts",))
def _deepseek_v2(cfg: HFConfig) -> dict[str, Any]:
    return _deepseek(cfg, v3=False)


@family("deepseek_v3", defaults={**_DEEPSEEK, "vocab_size": 129280, "hidden_size": 7168,
                                 "intermediate_size": 18432, "moe_intermediate_size": 2048,
                                 "num_hidden_layers": 61, "num_attention_heads": 128,
                                 "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
                                 "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                                 "norm_topk_prob": True, "max_position_embeddings": 4096,
                                 "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4},
        aliases={"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
        derived=_DEEPSEEK_DERIVED, non_null=("n_routed_experts",))
def _deepseek_v3(cfg: HFConfig) -> dict[str, Any]:
    return _deepseek(cfg, v3=True)


def _expand(cfg: HFConfig, key: str) -> int:
    """The spec's expand is an integer; HF computes int(expand · hidden)."""
    expand = cfg.float_(key)
    if expand <= 0:
        raise cfg.error(key, f"must be positive, got {expand:g}")
    if not expand.is_integer():
        raise cfg.error(key, f"cannot express a non-integer expand ({expand}); the spec's ssm.expand is an integer")
    return int(expand)


def _mamba1_expand(cfg: HFConfig, d: int) -> int:
    """MambaConfig builds d_inner = the file's intermediate_size, and int(expand · hidden_size) only
    where that is absent; then expand is read for nothing (reported ignored where it disagrees)."""
    if "intermediate_size" not in cfg.data:
        return _expand(cfg, "expand")
    inner = cfg.int_("intermediate_size")
    if inner <= 0 or inner % d:
        raise cfg.error("intermediate_size", f"{inner} is not a positive multiple of hidden_size {d}: the spec's "
                                             "Mamba d_inner is expand · d_model with an integer expand")
    if "expand" in cfg.data and cfg.data["expand"] == inner // d:
        cfg.used.add("expand")
    return inner // d


_MAMBA_INERT = ("residual_in_fp32", "time_step_scale", "time_step_min", "time_step_max",
                  "time_step_init_scheme", "time_step_floor", "time_step_limit", "rescale_prenorm_residual",
                  "use_mambapy", "use_associative_scan", "fused_add_norm", "pad_vocab_size_multiple",
                  "use_mamba_kernels")  # init ranges, kernel choice, fp32 residual, vocab padding (already applied)
# The mamba_ssm names the original checkpoints carry beside transformers' own, which must agree with
# them (MambaConfig reads a file's intermediate_size itself: `_mamba1_expand`).
_MAMBA_DERIVED = {
    "d_inner": Derived(lambda cfg: _expand(cfg, "expand") * cfg.int_("hidden_size"), "expand · hidden_size"),
    "d_model": Derived(lambda cfg: cfg.int_("hidden_size"), "hidden_size"),
    "n_layer": Derived(lambda cfg: cfg.layer_count("num_hidden_layers"), "num_hidden_layers"),
}

# Mamba2Config keeps a file's intermediate_size but builds expand · hidden_size: one that disagrees
# is refused rather than read one way
_MAMBA2_DERIVED = {**_MAMBA_DERIVED, "intermediate_size": Derived(
    lambda cfg: _expand(cfg, "expand") * cfg.int_("hidden_size"), "expand · hidden_size")}


@family("mamba", defaults=dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32,
                               layer_norm_epsilon=_LN_EPS, expand=2, conv_kernel=4, use_bias=False,
                               use_conv_bias=True, hidden_act="silu", time_step_rank="auto",
                               tie_word_embeddings=True),
        inert=_MAMBA_INERT, derived=_MAMBA_DERIVED)
def _mamba(cfg: HFConfig) -> dict[str, Any]:
    """modeling_mamba.py: RMSNorm -> MambaMixer per block (Gu & Dao 2023), no FFN, no positions."""
    cfg.fixed("rms_norm", True, "transformers' MambaBlock always uses RMSNorm")
    cfg.fixed("hidden_act", "silu", "the spec's Mamba block gates with SiLU")
    cfg.fixed("ssm_cfg", {}, "mamba_ssm's per-layer overrides, which transformers' MambaConfig never reads")
    d = cfg.int_("hidden_size")
    expand = _mamba1_expand(cfg, d)
    dt_rank = cfg.get("time_step_rank")
    if dt_rank != "auto":
        dt_rank = cfg.int_("time_step_rank")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("num_hidden_layers"),
                n_heads=1, n_kv=1, head_dim=d, max_pos=None)
    return {
        **base(dims, tied=tied(cfg)),
        "position": NoPositions(kind="none"),
        "norm": rms(cfg, "layer_norm_epsilon"),
        "ssm": Mamba1(kind="mamba1", d_state=cfg.int_("state_size"), d_conv=cfg.int_("conv_kernel"),
                      expand=expand, dt_rank=dt_rank, conv_bias=cfg.bool_("use_conv_bias"),
                      proj_bias=cfg.bool_("use_bias")),
        "layout": Layout(mixers="M"),
    }


def _json_float(value: object) -> object:
    """transformers 5 writes a float JSON cannot spell as {"__float__": "Infinity"} (its default
    time_step_limit, [0.0, inf]); the number it stands for, else the value as given."""
    if isinstance(value, dict) and set(value) == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
        return float(value["__float__"].lower().replace("infinity", "inf"))
    return value


@family("mamba2", defaults=dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096,
                                state_size=128, num_hidden_layers=64, layer_norm_epsilon=_LN_EPS,
                                expand=2, conv_kernel=4, n_groups=8, use_bias=False, use_conv_bias=True,
                                hidden_act="silu", chunk_size=256, tie_word_embeddings=False),
        # time_step_rank: Mamba2Mixer has no dt projection; norm_before_gate: transformers always
        # gates first (norm_before_gate=False); either order is the same weights, elementwise ops
        inert=(*(k for k in _MAMBA_INERT if k != "time_step_limit"), "time_step_rank", "norm_before_gate"),
        derived=_MAMBA2_DERIVED)
def _mamba2(cfg: HFConfig) -> dict[str, Any]:
    """modeling_mamba2.py: RMSNorm -> Mamba2Mixer (Dao & Gu 2024 SSD) with its gated RMSNorm."""
    cfg.fixed("rms_norm", True, "transformers' Mamba2Block always uses RMSNorm")
    cfg.fixed("hidden_act", "silu", "the spec's Mamba-2 block gates with SiLU")
    given = cfg.get("time_step_limit", None)
    limit = [_json_float(v) for v in given] if isinstance(given, list) else given
    if limit is not None and not (isinstance(limit, list) and len(limit) == 2
                                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit)):
        raise cfg.error("time_step_limit", f"expected [lo, hi], got {as_json(given)}")
    if limit is not None and limit != [0, math.inf]:
        # Mamba2Mixer clamps Δ to it after the softplus (mamba2_chunk_scan's dt_limit)
        unmodelled(cfg, f"time_step_limit {as_json(limit)}", "clamping Δ to [lo, hi] after its softplus",
                   "the built model's Δ is not clamped")
    d = cfg.int_("hidden_size")
    expand = _expand(cfg, "expand")
    n_heads, head_dim = cfg.int_("num_heads"), cfg.int_("head_dim")
    if n_heads * head_dim != expand * d:
        raise cfg.error("num_heads", f"num_heads · head_dim = {n_heads * head_dim} must equal "
                                     f"expand · hidden_size = {expand * d} (Mamba2Config.validate_architecture)")
    dims = Dims(vocab=cfg.int_("vocab_size"), d_model=d, n_layers=cfg.layer_count("num_hidden_layers"),
                n_heads=1, n_kv=1, head_dim=d, max_pos=None)
    return {
        **base(dims, tied=tied(cfg)),
        "position": NoPositions(kind="none"),
        "norm": rms(cfg, "layer_norm_epsilon"),
        "ssm": Mamba2(kind="mamba2", d_state=cfg.int_("state_size"), d_conv=cfg.int_("conv_kernel"),
                      expand=expand, head_dim=head_dim, n_groups=cfg.int_("n_groups"),
                      chunk_size=cfg.int_("chunk_size"), conv_bias=cfg.bool_("use_conv_bias"),
                      proj_bias=cfg.bool_("use_bias")),
        "layout": Layout(mixers="M"),
    }


@family("jamba", defaults=dict(vocab_size=65536, tie_word_embeddings=False, hidden_size=4096,
                               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-6,
                               max_position_embeddings=262144, num_experts_per_tok=2, num_experts=16,
                               expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8,
                               attn_layer_offset=4, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                               mamba_dt_rank="auto", mamba_conv_bias=True, mamba_proj_bias=False,
                               router_aux_loss_coef=0.001),
        aliases={"num_local_experts": "num_experts"},
        inert=(*_MAMBA_INERT, "num_logits_to_keep"),  # logits of the last token only at inference
        non_null=("num_key_value_heads",))
def _jamba(cfg: HFConfig) -> dict[str, Any]:
    """modeling_jamba.py: attention on i % attn_layer_period == attn_layer_offset, Mamba (with dt/B/C
    RMSNorms) elsewhere; experts on i % expert_layer_period == expert_layer_offset; no RoPE."""
    cfg.fixed("sliding_window", None, "transformers' Jamba attention never applies a window")
    dims = read_dims(cfg, head_dim_key=True)
    a_period, a_offset = cfg.int_("attn_layer_period"), cfg.count("attn_layer_offset")
    e_period, e_offset = cfg.int_("expert_layer_period"), cfg.count("expert_layer_offset")
    for key, off, per in (("attn_layer_offset", a_offset, a_period), ("expert_layer_offset", e_offset, e_period)):
        if off >= per:
            raise cfg.error(key, f"offset {off} must be smaller than its period {per}")
    letters = ["A" if i % a_period == a_offset else "M" for i in range(dims.n_layers)]
    act = cfg.activation("hidden_act")
    spec: dict[str, Any] = {
        **base(dims, tied=tied(cfg)),
        "position": NoPositions(kind="none"),
        "norm": rms(cfg),
        "ffn": glu(cfg.int_("intermediate_size"), act),
    }
    # a period that puts attention on every layer, or on none, builds no layer of the other kind
    # (transformers builds it so): the spec then has one mixer, and that kind's keys size nothing
    if "A" in letters:
        spec["attention"] = attention(cfg, dims)
    else:
        cfg.inert("num_attention_heads", "num_key_value_heads")
    if "M" in letters:
        dt_rank = cfg.get("mamba_dt_rank")
        if dt_rank != "auto":
            dt_rank = cfg.int_("mamba_dt_rank")
        spec["ssm"] = Mamba1(kind="mamba1", d_state=cfg.int_("mamba_d_state"), d_conv=cfg.int_("mamba_d_conv"),
                             expand=_expand(cfg, "mamba_expand"), dt_rank=dt_rank,
                             conv_bias=cfg.bool_("mamba_conv_bias"), proj_bias=cfg.bool_("mamba_proj_bias"),
                             inner_norms=True)
    else:
        cfg.inert("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias",
                  "mamba_proj_bias")
    n_experts = cfg.int_("num_experts")
    # JambaConfig.layers_num_experts: a layer with one expert is a plain JambaMLP
    layers = [i for i in range(dims.n_layers) if i % e_period == e_offset] if n_experts > 1 else []
    return place_moe(
        cfg, spec, mixers=compress_mixers(letters), moe_layers=layers,
        dense_ff=cfg.int_("intermediate_size"),
        fields="expert_layer_period" if n_experts > 1 else f"num_experts {n_experts}",
        expert_keys=("num_experts_per_tok", "router_aux_loss_coef"),
        # JambaSparseMoeBlock: softmax then top-k, the selected weights left unnormalised
        moe=lambda: _moe(cfg, n_experts=n_experts, top_k=cfg.int_("num_experts_per_tok"),
                         expert_ff=cfg.int_("intermediate_size"), act=act, normalize=False),
    )


# ------------------------------------------------------------------------------------ entry points
def _pydantic_message(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error" and isinstance(err.get("input"), (int, float, str)):
        msg += f" (got {clipped(repr(err['input']), 80)})"
    return f"{loc}: {msg}" if loc else msg


def config_path(path: str | Path) -> Path:
    """CONFIG may be the config.json itself or the model folder holding it."""
    if not str(path).strip():
        # Path("") is the current folder: an unset shell variable would import whatever is there
        raise ArchplanError("CONFIG: an empty path; give a config.json or the folder holding it")
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
        if not p.exists():
            raise ArchplanError("folder has no config.json", file=str(path))
    elif not p.exists():
        raise ArchplanError("no such file", file=str(path))
    return p


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's members, refused when a key repeats (json keeps the last one silently)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKey(key)
        data[key] = value
    return data


def read_config(path: Path) -> dict[str, Any]:
    if path.is_dir():  # a model folder's config.json that is itself a folder
        raise ArchplanError("a folder, where the config's JSON file was expected", file=str(path))
    raw = read_capped(path, MAX_CONFIG_BYTES, "a config.json", "not a regular file or folder")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is UTF-8 too, as the YAML loader reads it
    except UnicodeDecodeError:
        raise ArchplanError("not UTF-8 text (binary file?)", file=str(path)) from None
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ArchplanError(f"key '{exc.key}' appears twice in one object (transformers would keep the "
                            "last one without a word): keep one", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise ArchplanError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno, column=exc.colno) from None
    except ValueError as exc:  # a number json parses but Python cannot hold (an int past 4,300 digits)
        raise ArchplanError(f"invalid JSON: {str(exc).split(';')[0]}", file=str(path)) from None
    except RecursionError:
        raise ArchplanError("invalid JSON: nests too deeply", file=str(path)) from None
    if not isinstance(data, dict):
        raise ArchplanError(f"expected a JSON object at the top level, got {as_json(data)}", file=str(path))
    return data


def model_name(path: Path) -> str:
    """`.../Meta-Llama-3-8B/config.json` -> 'Meta-Llama-3-8B'; `llama-3-8b.json` -> 'llama-3-8b';
    Hugging Face's cache, `.../models--meta-llama--Meta-Llama-3-8B/snapshots/<revision>/config.json`
    (a link into the cache's `blobs/`, which the name must not follow) -> 'Meta-Llama-3-8B'. A file
    name is not the config: control characters become spaces and the name is cut to the spec's
    `name` limit, where the spec would refuse them."""
    absolute = Path(os.path.abspath(path))
    name = absolute.stem
    if absolute.name == "config.json" and absolute.parent.name:
        name = absolute.parent.name
        repo = absolute.parent.parent.parent.name
        if absolute.parent.parent.name == "snapshots" and repo.startswith(HF_CACHE_PREFIX):
            # huggingface_hub's folder per repository, `models--{org}--{name}` ("--" is in no repo id)
            name = repo.split("--")[-1]
    text = "".join(" " if control_character(c) else c for c in as_text(name))
    return text[:NAME_MAX_CHARS]


HF_CACHE_PREFIX = "models--"


@dataclass(frozen=True)
class Imported:
    """A converted config and the keys no rule accounted for (reported, never guessed at)."""

    spec: Spec
    ignored: tuple[str, ...]
    said: tuple[str, ...] = ()  # what the spec reads otherwise than the checkpoint, said on stderr


def convert_config(data: Mapping[str, Any], *, file: str, name: str, strict: bool = False,
                   mtp: bool = False) -> Imported:
    """Convert one parsed config.json; every refusal is an ArchplanError naming the field.

    `strict`: a key the policy does not account for is an error too (one error naming them all).
    `mtp`: also build the multi-token-prediction modules the config declares (an error where it
    declares none).
    """
    model_type = data.get("model_type")
    if model_type is None:
        raise ArchplanError("no model_type; is this a Hugging Face config.json?", file=file, field="model_type")
    if not isinstance(model_type, str):
        raise ArchplanError(f"expected a string such as \"llama\", got {as_json(model_type)}", file=file,
                            field="model_type")
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ArchplanError(f"unsupported model_type {as_json(model_type)}; supported: {', '.join(sorted(FAMILIES))}",
                            file=file, field="model_type")
    cfg = HFConfig(data, file=file, model_type=model_type, defaults=fam.defaults, aliases=fam.aliases)
    cfg.mtp = mtp
    check_refused(cfg, fam)
    if fam.even_heads is not None:
        check_even_heads(cfg, *fam.even_heads)
    cfg.inert(*fam.inert)
    try:
        fields = fam.convert(cfg)
    except ValidationError as exc:  # a block whose values the spec refuses (a negative router scale)
        raise ArchplanError(f"the config maps to an invalid spec: {_pydantic_message(exc)}", file=file) from None
    check_derived(cfg, fam.derived)
    if mtp and "mtp" not in fields:
        raise ArchplanError("--mtp: the config declares no multi-token-prediction module (DeepSeek-V3's "
                            "num_nextn_predict_layers > 0)", file=file, field="num_nextn_predict_layers")
    ignored = tuple(cfg.unread())
    if ignored and strict:
        raise cfg.error(", ".join(ignored), f"not read by the {model_type} importer, which does not know "
                                            "whether it changes the model (--strict; docs/import.md)")
    arch = data.get("architectures")
    described = f" ({arch[0]})" if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""
    # a file name an ASCII locale could not decode is text here, not escapes YAML cannot carry
    # a path with a control character in it is quoted as Python writes it (prose keeps none)
    reference: dict[str, Any] = {"source": f"Hugging Face config.json: {printable(file)}"}
    if ignored:
        cfg.notes.append(f"keys not read (not known to change size or compute): {', '.join(ignored)}")
    quantized = _quantization(data.get("quantization_config"))
    if quantized is not None:
        cfg.said.append(quantized)
    if cfg.notes or cfg.said:
        reference["notes"] = "; ".join([*cfg.notes, *cfg.said])
    try:
        spec = Spec(
            name=name,
            description=f"Imported from a Hugging Face {model_type} config{described}.",
            **fields,
            reference=Reference(**reference),
        )
    except ValidationError as exc:
        raise ArchplanError(f"the config maps to an invalid spec: {_pydantic_message(exc)}", file=file) from None
    return Imported(spec, ignored, tuple(cfg.said))


def _quantization(block: Any) -> str | None:
    """A quantized checkpoint's format, said once: the spec sizes the model's parameters, and its
    storage is a question `size` answers per dtype (its inference table)."""
    if not isinstance(block, Mapping):
        return None
    method = block.get("quant_method", "an unnamed method")
    bits = block.get("bits", block.get("w_bit"))
    width = f", {bits}-bit" if isinstance(bits, int) and not isinstance(bits, bool) else ""
    return (f"quantization_config ({method}{width}) describes the checkpoint's storage, not the architecture: "
            "the spec counts the parameters; size's inference memory prices them at fp8, int8, int4 and "
            "int4-g128 (a 16-bit scale per 128 weights, as AWQ and GPTQ store them)")


def spec_from_config(data: Mapping[str, Any], *, file: str, name: str, strict: bool = False) -> Spec:
    """`convert_config`'s spec alone (ignored keys stay recorded in `reference.notes`)."""
    return convert_config(data, file=file, name=name, strict=strict).spec


def read_hf(path: str | Path, *, strict: bool = False, mtp: bool = False) -> Imported:
    """Read CONFIG (a config.json or a folder holding one): its spec and the keys ignored."""
    p = config_path(path)
    return convert_config(read_config(p), file=str(p), name=model_name(p), strict=strict, mtp=mtp)


def import_hf(path: str | Path, *, strict: bool = False) -> Spec:
    """Read CONFIG (a config.json or a folder holding one) and return its spec."""
    return read_hf(path, strict=strict).spec


# Families converted in modules of their own register themselves on import (after FAMILIES exists).
from archplan.importers import stripedhyena  # noqa: E402,F401
