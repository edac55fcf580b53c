"""From a parameter target to a concrete spec that follows archplan's design recipes.

Recipes (the architecture guide's, docs/plan.md section 2): head_dim 128, GQA with 8 KV heads (4
or 2 where 8 do not divide the query heads),
SwiGLU with d_ff ≈ 3.5·d_model rounded to a multiple of 256, RoPE, pre-RMSNorm, untied embeddings;
depth and width in the proportions of the 7B (32×4096), 70B (80×8192) and 1T-MoE (120×16384
trunk) recipes.

Which N the target is:
- dense, hybrid: the total parameter count, embeddings included — the N of Hoffmann et al. 2022
  (App. F), which is what the scaling laws are fitted on.
- moe, hybrid-moe: the ACTIVE parameter count. The laws were fitted on dense models; a token's
  training cost is 6·N_active (Kaplan §2.1 with N the weights a token touches), so the MoE is
  matched to the dense optimum in compute per token. Its total is a multiple of that and is reported;
  the loss printed for it is the dense law at N_active (MoEs usually do better: a conservative figure).

The search: for each candidate width d (`D_MODEL_CANDIDATES`: multiples of 128 below 1024, where
every head keeps its own KV head, of 256 up to 4096, then of 1024), FFN width f and depth L,
the analytic `count_params` gives the exact N; among candidates within the tolerance the one closest
to the recipe shape wins (score: |ln d/d_r| + |ln L/L_r| + 2·|ln f/f_r| + 10·|N/N_target − 1|).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from typing_extensions import assert_never

from archplan.analytic import ParamCount, count_params
from archplan.errors import ArchplanError
from archplan.resolve import layer_index, resolve
from archplan.units import count, things
from archplan.spec import (
    MAX_LAYERS,
    GLU,
    GQA,
    Embedding,
    Layout,
    Mamba2,
    MoE,
    NormSpec,
    PreNorm,
    Rope,
    Router,
    SharedExperts,
    Spec,
    Training,
)


class NoRecipe(ArchplanError):
    """No spec of the family's recipes lands within the tolerance of the target: an answer about
    the budget (the allocation stands; `plan` prints it and exits 1), not bad input."""


class Family(str, Enum):
    dense = "dense"
    moe = "moe"
    hybrid = "hybrid"
    hybrid_moe = "hybrid-moe"


HEAD_DIM = 128  # Llama 2/3, Mistral, DeepSeek (v_head_dim) all use 128
KV_HEADS = 8  # Llama-3 8B/70B/405B (Ainslie et al. 2023 GQA)
# Where 8 does not divide the query heads, 4 KV heads (Qwen2.5-7B: 28 query heads of 128, 4 KV heads,
# its config.json), else 2 (10, 18, 22, 26 or 30 query heads: d_model 1280, 2304, 2816, 3328, 3840)
KV_HEADS_FEWER = (4, 2)
FFN_RATIO = 3.5  # Llama-3 8B 14336/4096 and 70B 28672/8192
FFN_MULTIPLE = 256  # Llama's `multiple_of` (meta-llama/llama model.py FeedForward)
EXPERT_MULTIPLE = 128  # fine-grained experts are narrower: DeepSeek-V3 2048, Qwen2-MoE 1408
ROPE_THETA = 500000.0  # Llama 3
# Fine-grained MoE (DeepSeek-MoE, Dai et al. 2024): 64 routed experts, 8 active, 1 shared expert of the
# same width; the routed + shared width a token sees is the dense 3.5·d (so N_active ≈ the dense trunk).
MOE_EXPERTS = 64
MOE_TOP_K = 8
MOE_SHARED = 1
# Hybrid (Jamba, Lieber et al. 2024, HF JambaConfig: attn_layer_period 8, offset 4): one attention
# layer in eight, the rest Mamba-2 (Dao & Gu 2024; d_state 128, head_dim 64, expand 2 as in
# mamba_ssm Mamba2 and Nemotron-H's 8 groups, or gcd(8, heads) where 8 do not divide the 2·d/64
# heads: 4 at d_model 384, 640, 896); hybrid-moe adds Jamba's MoE every second layer,
# 16 full-width experts, top-2.
HYBRID_MIXERS = "MMMMAMMM"
HYBRID_MOE_EXPERTS = 16
HYBRID_MOE_TOP_K = 2
SSM_GROUPS = 8

# The guide's recipes, (name, n_layers, d_model). The 1T recipe is a MoE; its 120×16384 trunk anchors
# the shape at the large end (its dense-equivalent trunk is ~0.4T).
RECIPES: tuple[tuple[str, int, int], ...] = (
    ("7B", 32, 4096), ("70B", 80, 8192), ("1T MoE trunk", 120, 16384),
)
# Below the 7B recipe, published small models' (n_layers, d_model) anchor the shape: extended down
# along the 7B-70B segment the curve gave 3 layers x 896 at GPT-2 small's size (d/L ~ 300 where
# these models keep 64-128). GPT-2 small (Radford et al. 2019), Llama 3.2 1B and 3B (Meta 2024,
# their config.json).
SMALL_MODELS: tuple[tuple[str, int, int], ...] = (
    ("GPT-2 small", 12, 768), ("Llama 3.2 1B", 16, 2048), ("Llama 3.2 3B", 28, 3072),
)

TOLERANCE = 0.02  # the spec's analytic N is within 2% of the target


@dataclass(frozen=True)
class Design:
    spec: Spec
    family: Family
    target: float  # N the law asked for
    target_kind: str  # "total" or "active"
    params: ParamCount
    recipe_layers: float  # L_r and d_r of the recipe curve at this size
    recipe_width: float

    @property
    def achieved(self) -> int:
        return self.params.active if self.target_kind == "active" else self.params.total

    @property
    def error(self) -> float:
        return self.achieved / self.target - 1


def target_kind(family: Family) -> str:
    match family:
        case Family.dense | Family.hybrid:
            return "total"
        case Family.moe | Family.hybrid_moe:
            return "active"
        case _:
            assert_never(family)


def _heads(d_model: int) -> tuple[int, int]:
    n_heads = d_model // HEAD_DIM
    if n_heads > KV_HEADS:
        for n_kv in (KV_HEADS, *KV_HEADS_FEWER):
            if n_heads % n_kv == 0:
                return n_heads, n_kv
    return n_heads, min(n_heads, KV_HEADS)  # below d_model 1024 one KV head per query head


def build(family: Family, *, d_model: int, n_layers: int, width: int, vocab: int, seq: int,
          name: str = "plan", tokens: float | None = None, description: str | None = None) -> Spec:
    """The recipe spec at (d_model, n_layers); `width` is the dense d_ff, or the expert d_ff."""
    n_heads, n_kv = _heads(d_model)
    attention = GQA(n_heads=n_heads, n_kv_heads=n_kv, head_dim=HEAD_DIM)
    common = dict(
        name=name, description=description, vocab_size=vocab, d_model=d_model, n_layers=n_layers,
        max_seq_len=seq, embedding=Embedding(tied=False), position=Rope(theta=ROPE_THETA),
        norm=NormSpec(kind="rmsnorm", eps=1e-5), residual=PreNorm(),
        training=Training(tokens=tokens) if tokens is not None else None,
    )
    match family:
        case Family.dense:
            return Spec(**common, attention=attention, ffn=GLU(d_ff=width))
        case Family.moe:
            moe = MoE(n_experts=MOE_EXPERTS, top_k=MOE_TOP_K, expert=GLU(d_ff=width),
                      shared=SharedExperts(n=MOE_SHARED, d_ff=width), router=Router())
            return Spec(**common, attention=attention, moe=moe)
        case Family.hybrid | Family.hybrid_moe:
            ssm_heads = 2 * d_model // 64
            ssm = Mamba2(d_state=128, head_dim=64, expand=2, n_groups=math.gcd(SSM_GROUPS, ssm_heads))
            if family is Family.hybrid:
                return Spec(**common, attention=attention, ssm=ssm, ffn=GLU(d_ff=width),
                            layout=Layout(mixers=HYBRID_MIXERS))
            moe = MoE(n_experts=HYBRID_MOE_EXPERTS, top_k=HYBRID_MOE_TOP_K, expert=GLU(d_ff=width))
            return Spec(**common, attention=attention, ssm=ssm, ffn=GLU(d_ff=width), moe=moe,
                        layout=Layout(mixers=HYBRID_MIXERS, moe_every=2, moe_offset=1))
        case _:
            assert_never(family)


def _recipe_width(family: Family, d_model: int) -> float:
    dense = FFN_RATIO * d_model
    match family:
        case Family.dense | Family.hybrid | Family.hybrid_moe:
            return dense
        case Family.moe:
            return dense / (MOE_TOP_K + MOE_SHARED)
        case _:
            assert_never(family)


def _multiple(family: Family) -> int:
    return EXPERT_MULTIPLE if family is Family.moe else FFN_MULTIPLE


def _round(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


@lru_cache(maxsize=1)
def _anchors() -> tuple[tuple[float, float, float], ...]:
    """(log trunk params, log L, log d) of each small model and recipe, by size; trunk =
    non-embedding params of the dense family's spec at that shape."""
    out = []
    for _, layers, width in SMALL_MODELS + RECIPES:
        spec = build(Family.dense, d_model=width, n_layers=layers,
                     width=_round(FFN_RATIO * width, FFN_MULTIPLE), vocab=32000, seq=4096)
        out.append((math.log(count_params(resolve(spec)).non_embedding), math.log(layers),
                    math.log(width)))
    return tuple(out)


def recipe_shape(trunk_params: float) -> tuple[float, float]:
    """(L_r, d_r): log-linear interpolation through the small models and the recipes, extrapolated
    along the end segments."""
    anchors = _anchors()
    x = math.log(trunk_params)
    i = min(max(bisect.bisect_right([a[0] for a in anchors], x) - 1, 0), len(anchors) - 2)
    (x0, l0, d0), (x1, l1, d1) = anchors[i], anchors[i + 1]
    t = (x - x0) / (x1 - x0)
    return math.exp(l0 + t * (l1 - l0)), math.exp(d0 + t * (d1 - d0))


def _counts(spec: Spec) -> ParamCount:
    return count_params(resolve(spec))


def _achieved(params: ParamCount, kind: str) -> int:
    return params.active if kind == "active" else params.total


@dataclass(frozen=True)
class _Depth:
    """N(L) for one (family, d, f): the layout repeats every `period` layers, so the exact count at
    any depth is the non-layer part plus the per-position layer counts of one period, both read from
    `count_params` of a one-period spec (its by-component keys are module paths, `layers.{i}.…`)."""

    fixed: int
    per_position: tuple[int, ...]

    def at(self, n_layers: int) -> int:
        whole, rest = divmod(n_layers, len(self.per_position))
        return self.fixed + whole * sum(self.per_position) + sum(self.per_position[:rest])


def _depth(spec: Spec, kind: str) -> _Depth:
    params = _counts(spec)
    by = params.active_by_component if kind == "active" else params.by_component
    per = [0] * spec.n_layers
    for path, value in by.items():
        if (index := layer_index(path)) is not None:
            per[index] += value
    return _Depth(_achieved(params, kind) - sum(per), tuple(per))


# FFN widths tried, as a fraction of the recipe's width at that d_model (docs/plan.md)
WIDTH_RANGE = (0.75, 4 / 3)

# d_model candidates: multiples of 128 below 1024 (heads < 8: one KV head per query head), multiples
# of 256 up to 4096 (8, 4 or 2 KV heads), then multiples of 1024 so that 8 KV heads divide the d/128
# query heads. Steps of 1024 from 1024 on made a 128K-vocabulary 853M model 6 x 2048 where the recipe
# curve says 14 x 1306, and steps of 512 still moved the depth 2-4x between budgets 1% apart (24 x
# 1024, then 8 x 1536): at a fixed N the depth goes as 1/d^2, so a d step of 1.5x is a depth step of
# 2.25x. Published models of this size take these widths: Qwen2.5-1.5B 1536 (12 heads, 2 KV heads).
D_MODEL_CANDIDATES: tuple[int, ...] = (tuple(range(256, 1024, 128)) + tuple(range(1024, 4096, 256))
                                       + tuple(1024 * k for k in range(4, 129)))


def _dense_meets(target: float, vocab: int, seq: int, tolerance: float) -> bool:
    """Whether the dense family has a spec for this target, which the refusal of another family
    then suggests (it has the same embeddings, so where they were the obstacle it fails too)."""
    try:
        design(Family.dense, target, vocab=vocab, seq=seq, tolerance=tolerance)
    except NoRecipe:
        return False
    return True


def design(family: Family, target: float, *, vocab: int, seq: int = 8192, name: str = "plan",
           tokens: float | None = None, description: str | None = None,
           tolerance: float = TOLERANCE) -> Design:
    """The recipe spec whose N (total, or active for MoE families) is within `tolerance` of target."""
    kind = target_kind(family)
    period = len(HYBRID_MIXERS) if family in (Family.hybrid, Family.hybrid_moe) else 1
    best: tuple[float, int, int, int, float, float] | None = None  # score, d, L, f, L_r, d_r
    shallowest = math.inf  # the fewest parameters one layout period reaches
    # Branch and bound: visit widths closest to the recipe first; the shape part of the score is a
    # lower bound, so stop once it exceeds the best score found.
    candidates = []
    for d in D_MODEL_CANDIDATES:
        trunk_target = target - 2 * vocab * d  # what is left after the embeddings and the LM head
        if trunk_target > 0:
            l_r, d_r = recipe_shape(trunk_target)
            candidates.append((abs(math.log(d / d_r)), d, l_r, d_r))
    step = _multiple(family)
    for bound, d, l_r, d_r in sorted(candidates):
        if best is not None and bound >= best[0]:
            break
        f_r = _recipe_width(family, d)
        f0 = _round(f_r, step)
        # within the recipe's range only: at d_model 256 the ±8 steps reached 0.19× to 7.7× it
        widths = sorted({f for f in (max(step, f0 + j * step) for j in range(-8, 9))
                         if WIDTH_RANGE[0] <= f / f_r <= WIDTH_RANGE[1]},
                        key=lambda f: abs(math.log(f / f_r)))
        for f in widths:
            if best is not None and bound + 2 * abs(math.log(f / f_r)) >= best[0]:
                break
            depth = _depth(build(family, d_model=d, n_layers=period, width=f, vocab=vocab, seq=seq),
                           kind)
            guess = period * (target - depth.fixed) / sum(depth.per_position)
            shallowest = min(shallowest, depth.at(period))
            for layers in range(max(period, math.floor(guess) - 1),
                                min(MAX_LAYERS, math.ceil(guess) + 2)):
                error = depth.at(layers) / target - 1
                if abs(error) > tolerance:
                    continue
                score = (abs(math.log(d / d_r)) + abs(math.log(layers / l_r))
                         + 2 * abs(math.log(f / f_r)) + 10 * abs(error))
                if best is None or score < best[0]:
                    best = (score, d, layers, f, l_r, d_r)
    if best is None:
        smallest = D_MODEL_CANDIDATES[0]
        embeddings = 2 * vocab * smallest >= (1 - tolerance) * target
        advice = "a larger budget, a smaller --vocab"  # the embeddings are in the way
        if embeddings:
            why = f"the embeddings alone take 2·V·d = {count(2 * vocab * smallest)} at the smallest d_model ({smallest})"
        elif shallowest > (1 + tolerance) * target:
            why = (f"the smallest {family.value} spec, one period of {things(period, 'layer')} at d_model "
                   f"{smallest}, has {count(shallowest)} {kind} parameters")
        else:
            why = (f"at this size one {family.value} period of {things(period, 'layer')}, with FFN widths "
                   f"{WIDTH_RANGE[0]:g}–{WIDTH_RANGE[1]:.3g}× the recipe's, is a step coarser than {tolerance:.0%}")
            advice = "a larger budget"  # one period's share of N does not depend on the vocabulary
        raise NoRecipe(
            f"no {family.value} recipe spec within {tolerance:.0%} of {target:.3g} {kind} parameters "
            f"at vocab {vocab}: {why}; try {advice}"
            + (" or --family dense" if family is not Family.dense and _dense_meets(target, vocab, seq, tolerance)
               else "")
        )
    _, d, layers, f, l_r, d_r = best
    spec = build(family, d_model=d, n_layers=layers, width=f, vocab=vocab, seq=seq, name=name,
                 tokens=tokens, description=description)
    params = _counts(spec)
    # the per-position shortcut is exact; the full count confirms it
    assert abs(_achieved(params, kind) / target - 1) <= tolerance, (spec, target)
    return Design(spec, family, target, kind, params, l_r, d_r)
