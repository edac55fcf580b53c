"""Scaling laws: Chinchilla budgets (docs/formulas.md §5).

- Approach 3 (Hoffmann et al. 2022 §3.3, App. D.2): L(N, D) = E + A/N^α + B/D^β, minimised under
  C = 6ND (eq. 4) in closed form: N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b with
  G = (αA/(βB))^(1/(α+β)), a = β/(α+β), b = α/(α+β).
- Fits: Hoffmann's printed (rounded) constants, the unrounded TeX-source values, and the Epoch AI
  replication (Besiroglu et al. 2024, arXiv:2404.10102).
- The ~20 tokens/parameter rule (D/N of Table 3): N = sqrt(C/120), D = 20N.
- Approach 1 (Table 3): a least-squares fit of log N on log C over Table 3 (DERIVED in docs/formulas.md §5.2).
N and D are total parameters (embeddings included, Hoffmann App. F) and training tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from archplan.errors import ArchplanError

TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022 Table 3 (D/N 20.0-21.6) and Chinchilla itself (70B, 1.4T)
FLOPS_PER_PARAM_TOKEN = 6  # C ≈ 6ND (Hoffmann eq. 4, Kaplan §2.1): forward 2N + backward 4N

# the runs the Approach-3 fits were fitted on: "over 400 language models ranging from 70 million
# to over 16 billion parameters on 5 to 500 billion tokens" (Hoffmann et al. 2022, abstract and §3;
# Besiroglu et al. 2024 refit the same runs); a loss outside them is an extrapolation
FIT_DATA_PARAMS = (70e6, 16e9)
FIT_DATA_TOKENS = (5e9, 500e9)


def outside_fit_data(n_params: float, tokens: float) -> bool:
    """Whether N or D lies outside the runs the Approach-3 fits were fitted on."""
    return not (FIT_DATA_PARAMS[0] <= n_params <= FIT_DATA_PARAMS[1]
                and FIT_DATA_TOKENS[0] <= tokens <= FIT_DATA_TOKENS[1])


# Approach 1 prefactor and exponent, fitted over Table 3 (docs/formulas.md §5.2, DERIVED): N_opt ≈ k·C^a
APPROACH1_K = 0.099159
APPROACH1_A = 0.49810


@dataclass(frozen=True)
class Law:
    key: str
    title: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)


LAWS: dict[str, Law] = {
    "hoffmann2022": Law("hoffmann2022", "Hoffmann et al. 2022, App. D.2 (as printed)",
                        E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "hoffmann2022-tex": Law("hoffmann2022-tex", "Hoffmann et al. 2022, TeX-source values",
                            E=1.6934, A=406.4, B=410.7, alpha=0.3392, beta=0.2849),
    "besiroglu2024": Law("besiroglu2024", "Besiroglu et al. 2024 (Epoch AI replication)",
                         E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}
DEFAULT_LAWS: tuple[str, ...] = ("hoffmann2022", "besiroglu2024")
# `plan --law`'s names for two of the fits, which `size --law` takes too: one option, one set of names
LAW_SYNONYMS: dict[str, str] = {"chinchilla": "hoffmann2022", "epoch": "besiroglu2024"}


def law(key: str) -> Law:
    try:
        return LAWS[key]
    except KeyError:
        raise ArchplanError(f"unknown scaling law '{key}'; known: {', '.join(LAWS)}") from None


def loss(law: Law, n_params: float, n_tokens: float) -> float:
    """Predicted loss L̂(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2)."""
    return law.E + law.A / n_params**law.alpha + law.B / n_tokens**law.beta


def compute_optimal(law: Law, compute: float) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L̂ at fixed C = 6ND (Hoffmann et al. 2022, eq. 4 and App. D.2)."""
    scaled = compute / FLOPS_PER_PARAM_TOKEN
    return law.G * scaled**law.a, scaled**law.b / law.G


def twenty_tokens(compute: float) -> tuple[float, float]:
    """D = 20N with C = 6ND: N = sqrt(C/120), D = 20N (docs/formulas.md §5.3)."""
    n = math.sqrt(compute / (FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def approach1(compute: float) -> tuple[float, float]:
    """Hoffmann Approach 1 (Table 3) via the fit N_opt ≈ 0.099159·C^0.49810, D = C/(6N)."""
    n = APPROACH1_K * compute**APPROACH1_A
    return n, compute / (FLOPS_PER_PARAM_TOKEN * n)


def training_flops(n_params: float, n_tokens: float) -> float:
    """The scaling-law budget C = 6ND (Hoffmann eq. 4) of N parameters over D tokens; which N the laws
    read (every parameter, or the active ones beside routed experts): `planning.optimal.law_params`."""
    return FLOPS_PER_PARAM_TOKEN * n_params * n_tokens


def gpu_hours(compute: float, peak_flops_per_s: float, mfu: float) -> float:
    """Wall-clock GPU-hours to spend `compute` FLOPs at a model-FLOPs utilisation of `mfu`."""
    return compute / (peak_flops_per_s * mfu) / 3600
