"""`plan --solve`: complete a partial spec so its analytic totals hit published (or rumoured) figures.

A partial spec is a spec YAML in which some sizes are unknown: written as `solve` (or `"?"`), or,
for the required ones, simply left out. What can be solved for:

| path | kind | values tried |
|---|---|---|
| `ffn.d_ff` | width | any positive multiple of `--multiple` |
| `moe.expert.d_ff` | width | same |
| `moe.shared.d_ff` | width | same (left out: equal to the expert width, as DeepSeek-MoE) |
| `moe.top_k` | choice | 1 .. min(n_experts, 16) |
| `moe.n_experts` | choice | powers of two, 2 .. 256 |
| `moe.shared.n` (or `moe.shared: solve`) | choice | 0 (no shared expert) .. 4 |

Every choice combination is enumerated. For each, the parameter counts are affine in the widths
(every FFN parameter count is linear in d_ff), so `count_params` at a base point and one unit step
per width gives the exact coefficients, and the widths come from least squares on the relative
errors against the targets (exactly determined when there are as many widths as targets), rounded
to the neighbouring multiples and counted again exactly. A solution is a candidate whose every
target is met within the tolerance; otherwise the nearest candidate is reported, with its errors.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from archplan.analytic import count_params
from archplan.errors import ArchplanError
from archplan.loader import (
    InvalidSpec,
    LoadedYaml,
    find_partial_path,
    parse_yaml,
    read_text,
    spec_from_data,
    spec_source,
)
from archplan.resolve import resolve
from archplan.spec import MAX_DIM, Spec

MARKERS = ("solve", "?")
TOP_K_MAX = 16
EXPERT_CHOICES: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)
SHARED_MAX = 4
_SHOWN = 4  # the skipped combinations a note names before "and N more"
MAX_COMBINATIONS = 20_000  # enumeration guard: choices multiply
MAX_TARGET = 1e18  # the most parameters --total / --active may ask for (the range --tokens takes)

Path_ = tuple[str, ...]
FFN_D_FF: Path_ = ("ffn", "d_ff")
EXPERT_D_FF: Path_ = ("moe", "expert", "d_ff")
SHARED_D_FF: Path_ = ("moe", "shared", "d_ff")
TOP_K: Path_ = ("moe", "top_k")
N_EXPERTS: Path_ = ("moe", "n_experts")
SHARED_N: Path_ = ("moe", "shared", "n")

WIDTHS: tuple[Path_, ...] = (FFN_D_FF, EXPERT_D_FF, SHARED_D_FF)
CHOICES: tuple[Path_, ...] = (N_EXPERTS, TOP_K, SHARED_N)
SOLVABLE = WIDTHS + CHOICES


def dotted(path: Path_) -> str:
    return ".".join(path)


@dataclass(frozen=True)
class Targets:
    total: float | None
    active: float | None

    def items(self) -> list[tuple[Literal["total", "active"], float]]:
        out: list[tuple[Literal["total", "active"], float]] = []
        if self.total is not None:
            out.append(("total", self.total))
        if self.active is not None:
            out.append(("active", self.active))
        return out


@dataclass(frozen=True)
class Candidate:
    values: dict[str, int]  # dotted path -> value (shared.n 0 = no shared experts)
    spec: Spec
    total: int
    active: int
    errors: dict[str, float]  # "total"/"active" -> achieved/target - 1
    miss: Fraction  # the worst |achieved/target - 1|, exact: what the ranking and the tolerance judge
    fixed: dict[str, float]  # "total"/"active" -> the count with every solved width at 0 (affine intercept)

    @property
    def worst(self) -> float:
        return max(abs(e) for e in self.errors.values())

    def within(self, tolerance: float) -> bool:
        """Every target met within `tolerance`, exactly: 1.01 × a target is within 1% (in floats
        199,723,327,488 / 197,745,868,800 − 1 is 0.010000000000000009)."""
        return self.miss <= Fraction(tolerance)

    def count(self, target: Literal["total", "active"]) -> int:
        """The parameters a target names: the total or the active count."""
        return self.total if target == "total" else self.active


@dataclass(frozen=True)
class SolveResult:
    unknowns: tuple[str, ...]
    tied: tuple[str, ...]  # widths set equal to another unknown (shared d_ff = expert d_ff)
    targets: Targets
    tolerance: float
    multiple: int
    candidates: tuple[Candidate, ...]  # the best `keep`, best first; the solutions are those within tolerance
    within: int = 0  # the candidates within tolerance, all of them (not only those kept)
    skipped: str | None = None  # the choice combinations not tried, and why

    @property
    def solutions(self) -> tuple[Candidate, ...]:
        """The kept candidates within tolerance (`within` counts them all)."""
        return tuple(c for c in self.candidates if c.within(self.tolerance))

    @property
    def solved(self) -> bool:
        return bool(self.solutions)

    @property
    def nearest(self) -> Candidate:
        return self.candidates[0]

    @property
    def floor_note(self) -> str | None:
        """Why no width helps: without a solution, the nearest has every width at its least and still
        holds more than a target asks, so the sizes the solve does not choose are what is too large
        (least squares wanted a width at or below zero)."""
        best = self.nearest
        # a width the nearest combination leaves out (the shared experts' at n = 0) is not one of its
        widths = [name for name in self.unknowns if name in {dotted(p) for p in WIDTHS} and name in best.values]
        if self.solved or not widths:
            return None
        top = self.multiple * (MAX_DIM // self.multiple)
        capped = [w for w in widths if best.values[w] == top]
        under = [(name, best.count(name), target) for name, target in self.targets.items()
                 if best.errors[name] < -self.tolerance]
        if capped and under:
            short = " and ".join(f"{count:,} {name} parameters, below the --{name} {target:,.0f} asked"
                                 for name, count, target in under)
            most = ", ".join(f"{w} = {top:,}" for w in capped)
            return f"at the spec's most ({most}) the widths reach only {short}"
        if any(best.values[w] != self.multiple for w in widths):
            return None
        over = [(name, best.count(name), target) for name, target in self.targets.items()
                if best.errors[name] > self.tolerance]
        if not over:
            return None
        held = " and ".join(f"{count:,} {name} parameters, above the --{name} {target:,.0f} asked"
                            for name, count, target in over)
        least = ", ".join(f"{w} = {self.multiple:,}" for w in widths)
        if all(best.fixed[name] <= target * (1 + self.tolerance) for name, _, target in over):
            # the sizes not solved for leave room: the step of --multiple is what overshoots
            return (f"at their least ({least}) the widths leave {held}, and --multiple {self.multiple:,} "
                    "allows nothing narrower: a smaller --multiple reaches the target")
        return (f"at their least ({least}) the widths leave {held}: the sizes the solve does not choose "
                "(d_model, n_layers, the vocabulary and the rest) hold too much for that")


def _get(data: Any, path: Path_) -> Any:
    node = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _has(data: Any, path: Path_) -> bool:
    node = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _set(data: dict, path: Path_, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _is_marker(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in MARKERS


def _markers(node: Any, path: Path_ = ()) -> list[Path_]:
    """Every path whose value is a `solve` marker (to reject the ones we cannot solve for)."""
    if _is_marker(node):
        return [path]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _markers(v, path + (str(k),))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _markers(v, path + (str(i),))]
    return []


def find_unknowns(loaded: LoadedYaml, file: str) -> tuple[list[Path_], list[Path_]]:
    """(unknown paths, tied widths) of a partial spec's parsed YAML (its data is edited in place).
    `moe.shared: solve` means an unknown count of shared experts."""
    data = loaded.data
    if _is_marker(_get(data, ("moe", "shared"))):
        data["moe"]["shared"] = {"n": "solve"}
    unknown: list[Path_] = []
    for path in _markers(data):
        if path not in SOLVABLE:
            # a list item's location is keyed by its index (a digits key of a mapping by its text)
            key = tuple(int(part) if part.isdigit() else part for part in path)
            line, column = loaded.locations.get(key, loaded.locations.get(path, (None, None)))
            raise ArchplanError(
                f"cannot solve for this field; solvable: {', '.join(dotted(p) for p in SOLVABLE)}",
                file=file, line=line, column=column, field=dotted(path),
            )
        unknown.append(path)
    # required sizes left out are unknowns too
    if isinstance(data.get("ffn"), dict) and "d_ff" not in data["ffn"]:
        unknown.append(FFN_D_FF)
    moe = data.get("moe")
    if isinstance(moe, dict):
        if "n_experts" not in moe:
            unknown.append(N_EXPERTS)
        if "top_k" not in moe:
            unknown.append(TOP_K)
        if isinstance(moe.get("expert"), dict) and "d_ff" not in moe["expert"]:
            unknown.append(EXPERT_D_FF)
    tied: list[Path_] = []
    shared = _get(data, ("moe", "shared"))
    if isinstance(shared, dict) and "d_ff" not in shared:
        tied.append(SHARED_D_FF)
    return sorted(set(unknown), key=SOLVABLE.index), tied


def _choice_values(path: Path_, assigned: dict[Path_, int], data: dict) -> list[int]:
    if path == N_EXPERTS:
        return list(EXPERT_CHOICES)
    if path == TOP_K:
        n_experts = assigned.get(N_EXPERTS, _get(data, N_EXPERTS))
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ArchplanError("moe.n_experts must be a positive integer to solve for moe.top_k")
        return list(range(1, min(n_experts, TOP_K_MAX) + 1))
    if path == SHARED_N:
        return list(range(0, SHARED_MAX + 1))
    raise AssertionError(path)


def _choice_combinations(choices: list[Path_], data: dict) -> list[dict[Path_, int]]:
    combos: list[dict[Path_, int]] = [{}]
    for path in choices:  # CHOICES order: n_experts before top_k, which depends on it
        combos = [c | {path: v} for c in combos for v in _choice_values(path, c, data)]
        if len(combos) > MAX_COMBINATIONS:
            raise ArchplanError(f"more than {MAX_COMBINATIONS:,} combinations to try; fix some sizes")
    return combos


def _fill(data: dict, values: dict[Path_, int], tied: list[Path_]) -> dict:
    out = copy.deepcopy(data)
    for path, value in values.items():
        _set(out, path, value)
    if SHARED_D_FF in tied and _has(out, ("moe", "shared")):
        _set(out, SHARED_D_FF, _get(out, EXPERT_D_FF))
    if values.get(SHARED_N) == 0:
        del out["moe"]["shared"]
    return out


def _counts(spec: Spec) -> tuple[int, int]:
    params = count_params(resolve(spec))
    return params.total, params.active


PROPORTIONAL = ("move the targets in proportion (e.g. a dense FFN and shared experts, both always "
                "active), so the targets cannot separate them")


def _least_squares(rows: list[tuple[float, list[float], float]]) -> list[float] | None:
    """argmin_w Σ ((c + a·w − T)/T)² for one or two widths (normal equations, solved directly);
    None where two widths move the targets in proportion (a line of optima, none preferred)."""
    k = len(rows[0][1])
    ata = [[sum(a[i] * a[j] / t**2 for _, a, t in rows) for j in range(k)] for i in range(k)]
    atb = [sum(a[i] * (t - c) / t**2 for c, a, t in rows) for i in range(k)]
    if k == 1:
        return [atb[0] / ata[0][0]] if ata[0][0] else [math.nan]
    det = ata[0][0] * ata[1][1] - ata[0][1] * ata[1][0]
    if abs(det) <= 1e-9 * ata[0][0] * ata[1][1]:
        return None
    return [(atb[0] * ata[1][1] - atb[1] * ata[0][1]) / det,
            (atb[1] * ata[0][0] - atb[0] * ata[1][0]) / det]


def _minimax(rows: list[tuple[float, list[float], float]]) -> list[float]:
    """argmin_w max |(c + a·w − T)/T| for one width and two targets. Each relative error is linear
    in w, so the worst of the two is least where they cross (opposite signs, or equal with opposite
    slopes) or where one is zero; least squares, which weighs both, misses it wherever the slopes
    differ (Mixtral's d_ff against its total and active counts: 14,336 is within 1% of both, the
    least-squares 14,328 is not)."""
    lines = [(c / t - 1, a[0] / t) for c, a, t in rows]  # error = e + s·w
    (e0, s0), (e1, s1) = lines
    points = [-e / s for e, s in lines if s]
    points += [-(e0 + e1) / (s0 + s1)] if s0 + s1 else []
    points += [(e1 - e0) / (s0 - s1)] if s0 - s1 else []
    return [min(points, key=lambda w: max(abs(e + s * w) for e, s in lines))] if points else [math.nan]


def _roundings(value: float, multiple: int) -> list[int]:
    """The multiples of `multiple` either side of `value`, within the spec's widths (1 ..
    MAX_DIM): a width wanted past the cap is tried at the cap, where the target may still be met
    within the tolerance."""
    top = multiple * (MAX_DIM // multiple)
    if not math.isfinite(value) or value <= multiple:
        return [multiple]
    if value >= top:
        return [top]
    low = multiple * math.floor(value / multiple)
    return sorted({low, min(low + multiple, top)})


def _held_at_least(rows: list[tuple[float, list[float], float]], optimum: list[float],
                   multiple: int) -> list[list[float]]:
    """For two widths where least squares put one at or below its least (`multiple`): that one
    held there and the other solved again for the targets (its least squares and, against two
    targets, its minimax), as rounding the first up leaves the second at a value that assumed it
    lower (DeepSeek-V3's dense and expert widths for one --total and --active)."""
    found: list[list[float]] = []
    for i, width in enumerate(optimum):
        if math.isfinite(width) and width > multiple:
            continue
        other = 1 - i
        held = [(c + a[i] * multiple, [a[other]], t) for c, a, t in rows]
        # one width: least squares always has an answer (NaN where the width moves nothing)
        solved = [_least_squares(held) or [math.nan]] + ([_minimax(held)] if len(held) == 2 else [])
        for (w,) in solved:
            found.append([float(multiple), w] if i == 0 else [w, float(multiple)])
    return found


def _proportional_note(combos: list[dict[Path_, int]], widths: list[Path_]) -> str | None:
    """The combinations whose two widths move the targets in proportion, named (the first few)."""
    if not combos:
        return None
    names = " and ".join(dotted(p) for p in widths)
    return f"not tried at {_combinations(combos)}: there {names} {PROPORTIONAL}; fix one width to try them"


def _combinations(combos: list[dict[Path_, int]]) -> str:
    """Choice combinations as a note names them: the first `_SHOWN`, then how many more."""
    shown = "; ".join(", ".join(f"{dotted(p)} = {v:,}" for p, v in combo.items()) for combo in combos[:_SHOWN])
    return shown + (f" (and {len(combos) - _SHOWN:,} more)" if len(combos) > _SHOWN else "")


def _without_stale_counts(spec: Spec, total: int, active: int) -> Spec:
    """The partial's `reference` counts belong to the model it was cut from, not to the sizes solved
    for it: a count the solved spec does not have is dropped (its source and notes kept), so the spec
    `-o` writes states no figure it contradicts (lint's AP017 refused every such file)."""
    ref = spec.reference
    if ref is None:
        return spec
    stale = {name: None for name, count in (("total_params", total), ("active_params", active))
             if getattr(ref, name) not in (None, count)}
    return spec.model_copy(update={"reference": ref.model_copy(update=stale)}) if stale else spec


def solve(partial: str | Path, targets: Targets, *, tolerance: float = 0.01, multiple: int = 1,
          keep: int = 10) -> SolveResult:
    if targets.total is None and targets.active is None:
        raise ArchplanError("--solve needs --total and/or --active")
    for name, value in targets.items():
        # a count below one parameter is no model; past 1e18 (a million GPT-4s) float noise shows in
        # the digits printed (1e29 read "99,999,999,999,999,984 T")
        if not math.isfinite(value) or not 1 <= value <= MAX_TARGET:
            raise ArchplanError(f"must be between 1 and {MAX_TARGET:.0e} parameters, got {value:g}", field=f"--{name}")
    if targets.total is not None and targets.active is not None and targets.active > targets.total:
        raise ArchplanError(f"--active {targets.active:,.0f} exceeds --total {targets.total:,.0f}: a token's "
                            "parameters are some of the model's")
    if not 0 <= tolerance < 1:
        raise ArchplanError(f"--tol must be in [0, 1), got {tolerance}")
    if multiple < 1:
        raise ArchplanError(f"--multiple must be a positive integer, got {multiple}")
    file = spec_source(str(partial))
    loaded = parse_yaml(read_text(find_partial_path(str(partial))), file)
    if loaded.key_errors:
        first, *others = loaded.key_errors
        raise InvalidSpec(first, others)
    if not isinstance(loaded.data, dict):
        raise ArchplanError("expected a mapping of spec fields at the top level", file=file)
    data = loaded.data
    unknown, tied = find_unknowns(loaded, file)
    if not unknown:
        # a value that is neither a size nor `solve` (`d_ff: solv`) is named as `size` names it
        spec_from_data(LoadedYaml(copy.deepcopy(data), loaded.locations), file)
        raise ArchplanError(
            "nothing to solve: mark sizes as `solve` (or leave out d_ff/top_k/n_experts); "
            f"solvable: {', '.join(dotted(p) for p in SOLVABLE)}"
        )
    if "moe" not in data and targets.total is not None and targets.active is not None \
            and targets.total != targets.active:
        raise ArchplanError(f"--total {targets.total:g} and --active {targets.active:g} differ, but without `moe` "
                            "every parameter is active: give one of them")
    widths = [p for p in unknown if p in WIDTHS]
    choices = [p for p in unknown if p in CHOICES]
    goals = targets.items()
    if len(widths) > len(goals):
        raise ArchplanError(
            f"{len(widths)} unknown widths ({', '.join(dotted(p) for p in widths)}) but only "
            f"{len(goals)} target(s); give both --total and --active, or fix a width"
        )

    def build(values: dict[Path_, int]) -> Spec:
        filled = _fill(data, values, tied)
        return spec_from_data(LoadedYaml(filled, loaded.locations), file)

    base_width = 1024
    candidates: dict[tuple, Candidate] = {}
    first_error: ArchplanError | None = None
    proportional: list[dict[Path_, int]] = []
    for combo in _choice_combinations(choices, data):
        base = combo | {p: base_width for p in widths}
        try:
            base_counts = _counts(build(base))
        except ArchplanError as exc:
            first_error = first_error or exc
            continue
        # exact affine coefficients: one unit step (of base_width) per width
        slopes = []
        for path in widths:
            stepped = _counts(build(base | {path: 2 * base_width}))
            slopes.append([(s - b) / base_width for s, b in zip(stepped, base_counts)])
        rows = []
        for name, target in goals:
            index = 0 if name == "total" else 1
            a = [slope[index] for slope in slopes]
            rows.append((base_counts[index] - sum(ai * base_width for ai in a), a, target))
        # a width this combination leaves out (the shared experts' at n = 0) moves no count
        moving = [i for i, slope in enumerate(slopes) if any(slope)]
        rows = [(c, [a[i] for i in moving], target) for c, a, target in rows]
        solving = [widths[i] for i in moving]
        optimum = _least_squares(rows) if solving else []
        if optimum is None:
            # said beside the result: a solve that finds its answer elsewhere (at shared.n = 0)
            # must not pass over these combinations in silence
            proportional.append(combo)
            continue
        optima = [optimum]
        if len(solving) == 1 and len(rows) == 2:
            optima.append(_minimax(rows))  # the nearest by the ranking's measure, the worst error
        if len(solving) == 2:
            optima += _held_at_least(rows, optima[0], multiple)
        fixed = {name: c for (c, _, _), (name, _) in zip(rows, goals)}  # the combination's intercepts
        tried = {rounded for optimum in optima
                 for rounded in itertools.product(*(_roundings(w, multiple) for w in optimum))}
        for rounded in sorted(tried):
            values = combo | dict(zip(solving, rounded))
            try:
                spec = build(values)
            except ArchplanError as exc:
                # the targets, not the file, ask for a size the spec refuses: name them
                asked = " and ".join(f"--{name} {target:.4g}" for name, target in goals)
                sizes = ", ".join(f"{dotted(p)} = {v:,}" for p, v in zip(solving, rounded))
                first_error = first_error or ArchplanError(
                    f"{asked} needs {sizes}, which the spec refuses ({exc.field}: {exc.message})")
                continue
            total, active = _counts(spec)
            errors = {name: (total if name == "total" else active) / target - 1
                      for name, target in goals}
            # the worst miss in exact arithmetic: in floats, two equal misses either side of a
            # target (d_ff 16 and 17 at their midpoint) differ in the last bit, and the larger
            # model ranked first
            miss = max(abs(Fraction(total if name == "total" else active) - Fraction(target)) / Fraction(target)
                       for name, target in goals)
            key = tuple(sorted(values.items()))
            candidates[key] = Candidate({dotted(p): v for p, v in values.items()},
                                        _without_stale_counts(spec, total, active), total, active, errors,
                                        miss, fixed)
    if not candidates:
        if proportional:
            # the cause the user can act on, before a size the solve itself chose and the spec refused
            at = "" if proportional == [{}] else f" at {_combinations(proportional)}"
            others = "" if first_error is None else (
                " (the spec refuses the others, e.g. "
                + (f"{first_error.field}: " if first_error.field else "") + f"{first_error.message})")
            raise ArchplanError(f"{' and '.join(dotted(p) for p in widths)} {PROPORTIONAL}{at}; fix one{others}")
        assert first_error is not None
        raise first_error
    # the nearest first, then the smaller model (total, then active parameters: a sum of the solved
    # values adds expert counts to widths, and ranked Mixtral at 2,386 × 128 experts, 121.7 B, above
    # its own 14,336 × 8, 12.9 B, at one --active); a stable sort keeps equal ones in the order tried
    # (docs/plan.md)
    ranked = sorted(candidates.values(), key=lambda c: (c.miss, c.total, c.active))
    return SolveResult(
        unknowns=tuple(dotted(p) for p in unknown), tied=tuple(dotted(p) for p in tied),
        targets=targets, tolerance=tolerance, multiple=multiple, candidates=tuple(ranked[:keep]),
        within=sum(c.within(tolerance) for c in ranked), skipped=_proportional_note(proportional, widths),
    )
