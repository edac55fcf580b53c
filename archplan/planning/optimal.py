"""From a budget to the compute-optimal (N, D) under a scaling law, and the IsoFLOP alternatives.

The laws themselves live in `archplan.analytic.scaling` (docs/formulas.md §5); this module only chooses one,
inverts it when the user gives N or D instead of C, and tabulates the IsoFLOP profile:
- `chinchilla`: Hoffmann et al. 2022 Approach 3 with the constants as printed (App. D.2);
- `epoch`: the Besiroglu et al. 2024 refit of Approach 3 (arXiv:2404.10102);
- `hoffmann2022`, `hoffmann2022-tex`, `besiroglu2024`: the fits by the names `size --law` gives
  them (the first and last are `chinchilla` and `epoch`; the TeX-source values are the ones that
  give the paper's 40B at the Gopher budget, docs/formulas.md §5.1);
- `20x`: D = 20·N with C = 6ND (Hoffmann Table 3's D/N ratio, docs/formulas.md §5.3);
- `approach1`: Hoffmann's Approach 1 (Table 3's projections) as the power law fitted over that table,
  N_opt ≈ 0.099159·C^0.49810, D = C/(6N) (docs/formulas.md §5.2).
These two rules have no loss of their own, so their predicted losses are evaluated with the Besiroglu
fit (said in the output).
N is every parameter, embeddings included (Hoffmann App. F); C = 6ND (Hoffmann eq. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from archplan.analytic.scaling import (
    FLOPS_PER_PARAM_TOKEN,
    LAW_SYNONYMS,
    LAWS,
    Law,
    approach1,
    compute_optimal,
    loss,
    twenty_tokens,
)
from archplan.errors import ArchplanError


class LawChoice(str, Enum):
    chinchilla = "chinchilla"
    epoch = "epoch"
    twenty = "20x"
    approach1 = "approach1"
    hoffmann2022 = "hoffmann2022"
    hoffmann2022_tex = "hoffmann2022-tex"
    besiroglu2024 = "besiroglu2024"


# the rules without a loss of their own: their allocation, and the fit their losses are scored with
RULES = {LawChoice.twenty: twenty_tokens, LawChoice.approach1: approach1}
LAW_KEYS: dict[LawChoice, str] = {
    **{choice: LAW_SYNONYMS.get(choice.value, choice.value) for choice in LawChoice if choice not in RULES},
    **{choice: "besiroglu2024" for choice in RULES},
}

# The IsoFLOP view: N at these multiples of N_opt, D = C/(6N) (Hoffmann §3.2, Figure 3).
ISOFLOP_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

# Budgets we accept: below 1e15 FLOPs the optimum is smaller than any vocabulary's embeddings, and
# 1e30 is thousands of times any training run reported so far; beyond either end the laws (fitted on
# runs of about 6e18-3e21 FLOPs, Hoffmann et al. 2022 §3.2) would be extrapolated absurdly far.
MIN_COMPUTE = 1e15
MAX_COMPUTE = 1e30


@dataclass(frozen=True)
class Point:
    params: float
    tokens: float
    loss: float

    @property
    def compute(self) -> float:
        return FLOPS_PER_PARAM_TOKEN * self.params * self.tokens


@dataclass(frozen=True)
class Optimum:
    law: LawChoice
    loss_law: Law  # the fit every loss below is evaluated with
    compute: float
    optimal: Point
    isoflop: tuple[tuple[float, Point], ...]  # (N / N_opt, point) at fixed C

    @property
    def tokens_per_param(self) -> float:
        return self.optimal.tokens / self.optimal.params


def law_params(total: int, active: int, routed: bool) -> tuple[int, str]:
    """The N a model's token budget is read for, and its name: the active count for a model with
    routed experts, since the laws were fitted on dense models, where a token costs 6·N_active
    training FLOPs (docs/plan.md, "Budget")."""
    return (active, "active") if routed else (total, "total")


def allocate(choice: LawChoice, compute: float) -> tuple[float, float]:
    """(N_opt, D_opt) for C under the chosen rule."""
    if choice in RULES:
        return RULES[choice](compute)
    return compute_optimal(LAWS[LAW_KEYS[choice]], compute)


def _invert(choice: LawChoice, target: float, index: int) -> float:
    """The budget C whose optimum has N (index 0) or D (index 1) equal to `target`.

    N_opt(C) and D_opt(C) are increasing power laws of C for every rule, so bisection on log C
    inverts them without restating the closed forms here.
    """
    start = lo, hi = math.log(MIN_COMPUTE) - 20, math.log(MAX_COMPUTE) + 20
    for _ in range(200):
        mid = (lo + hi) / 2
        if allocate(choice, math.exp(mid))[index] < target:
            lo = mid
        else:
            hi = mid
    # past either end of the bracket the budget is not known, only out of range: 0 or inf, which
    # `_check_compute` names as such instead of the bracket's end as if it were the budget
    if hi == start[0]:
        return 0.0
    if lo == start[1]:
        return math.inf
    return math.exp((lo + hi) / 2)


def _check_compute(compute: float, what: str) -> None:
    # a relative allowance of 1e-9: N_opt at exactly the lower bound, given as --params, inverts to a
    # hair below it, and the refusal read "implies a budget of 1e+15 ... between 1e+15 and ..."
    if not math.isfinite(compute) or compute < MIN_COMPUTE * (1 - 1e-9) or compute > MAX_COMPUTE * (1 + 1e-9):
        implied = (f"far below {MIN_COMPUTE:.0e} FLOPs" if compute == 0 else
                   f"far above {MAX_COMPUTE:.0e} FLOPs" if math.isinf(compute) else f"of {compute:.3g} FLOPs")
        raise ArchplanError(
            f"{what} implies a budget {implied}; plan works between "
            f"{MIN_COMPUTE:.0e} and {MAX_COMPUTE:.0e} FLOPs"
        )


def budget(choice: LawChoice, *, compute: float | None = None, params: float | None = None,
           tokens: float | None = None) -> float:
    """The compute budget from exactly one of C, N or D (N or D: the C for which it is optimal)."""
    given = [(name, value) for name, value in (("--compute", compute), ("--params", params),
                                               ("--tokens", tokens)) if value is not None]
    if len(given) != 1:
        raise ArchplanError("give exactly one of --compute, --params or --tokens")
    name, value = given[0]
    if math.isnan(value) or value <= 0:
        raise ArchplanError(f"must be a positive number, got {value:g}", field=name)
    if math.isinf(value):  # 1e400 overflows a float: out of range, not "not positive"
        _check_compute(value, name)
    if compute is not None:
        result = compute
    elif params is not None:
        result = _invert(choice, params, 0)
    else:
        assert tokens is not None
        result = _invert(choice, tokens, 1)
    _check_compute(result, name)
    return result


def optimum(choice: LawChoice, compute: float) -> Optimum:
    _check_compute(compute, "--compute")
    fit = LAWS[LAW_KEYS[choice]]
    n_opt, d_opt = allocate(choice, compute)
    points = []
    for factor in ISOFLOP_FACTORS:
        n = n_opt * factor
        d = compute / (FLOPS_PER_PARAM_TOKEN * n)
        points.append((factor, Point(n, d, loss(fit, n, d))))
    return Optimum(choice, fit, compute, Point(n_opt, d_opt, loss(fit, n_opt, d_opt)), tuple(points))


def isoflop_curve(result: Optimum, n_points: int = 81, span: float = 10.0) -> list[Point]:
    """Loss along the IsoFLOP line from N_opt/span to N_opt·span (for the plot)."""
    n_opt, compute = result.optimal.params, result.compute
    out = []
    for i in range(n_points):
        n = n_opt * span ** (2 * i / (n_points - 1) - 1)
        d = compute / (FLOPS_PER_PARAM_TOKEN * n)
        out.append(Point(n, d, loss(result.loss_law, n, d)))
    return out
