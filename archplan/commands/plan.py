"""`archplan plan`: a budget to a compute-optimal spec, a partial spec to a complete one (--solve),
or a spec to a cluster layout (SPEC --gpus N --gpu KEY). docs/plan.md states every model used."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from archplan import jsonout
from archplan.commands.options import (
    ForceOpt,
    JsonOpt,
    KernelChoice,
    complete_gpu,
    complete_partial,
    complete_spec,
    given_by_user,
    length_option,
    refuse_foreign_options,
)
from archplan.console import echo, figure_written, settle
from archplan.errors import ArchplanError, printable
from archplan.outfile import SPEC_SUFFIXES, check_target

if TYPE_CHECKING:
    from archplan.hardware import Accelerator
    from archplan.planning.accuracy import HeldOutAccuracy
    from archplan.planning.design import Design, NoRecipe
    from archplan.planning.cluster import StatesConvention
    from archplan.planning.layout import Layout, PartialLayout
    from archplan.planning.optimal import Optimum
    from archplan.planning.parallel import Evaluated, RailBound, SearchResult, Settings
    from archplan.planning.solve import SolveResult
    from archplan.resolve import ModelPlan
    from archplan.spec import Spec


# Choices spelled as archplan.planning.design.Family and archplan.planning.optimal.LawChoice (a test
# checks they agree); kept here so loading the CLI does not import the analytic package.
class FamilyChoice(str, Enum):
    dense = "dense"
    moe = "moe"
    hybrid = "hybrid"
    hybrid_moe = "hybrid-moe"


class LawOption(str, Enum):
    chinchilla = "chinchilla"
    epoch = "epoch"
    twenty = "20x"
    approach1 = "approach1"
    hoffmann2022 = "hoffmann2022"
    hoffmann2022_tex = "hoffmann2022-tex"
    besiroglu2024 = "besiroglu2024"


class StatesChoice(str, Enum):
    megatron = "megatron"
    zero = "zero"
    fsdp2 = "fsdp2"
    deepspeed = "deepspeed"


class StateDTypeChoice(str, Enum):
    """A 16- or 32-bit float state: gradients on the wire (--grad-reduce), Adam's moments
    (--optimizer-moments)."""

    bf16 = "bf16"
    fp32 = "fp32"

    @property
    def bytes(self) -> int:
        return 2 if self is StateDTypeChoice.bf16 else 4


class CPCommChoice(str, Enum):
    all_gather = "all_gather"
    ring = "ring"


class DispatcherChoice(str, Enum):
    auto = "auto"
    nccl = "nccl"
    hierarchical = "hierarchical"


class FP8ScalingChoice(str, Enum):
    delayed = "delayed"
    current = "current"
    mxfp8 = "mxfp8"


class PrecisionChoice(str, Enum):
    bf16 = "bf16"
    fp8 = "fp8"


class CrossEntropyChoice(str, Enum):
    """How the run computes its loss (pricing.CROSS_ENTROPY_BYTES)."""

    fp32_fused = "fp32-fused"
    bf16_fused = "bf16-fused"
    eager = "eager"


class MasterChoice(str, Enum):
    fp32 = "fp32"
    remainders = "remainders"


class RingNicsChoice(str, Enum):
    """How many NICs a data-parallel ring across nodes drives (hardware.KernelEfficiency.ring_nics)."""

    one = "one"
    members = "members"


class FlashImplChoice(str, Enum):
    """Which FlashAttention implementation runs `--attention-kernel flash` (hardware.FLASH_IMPL_SPEED)."""

    fa2 = "fa2"
    triton = "triton"
    cudnn = "cudnn"


# how the settings line names each fp8 recipe
FP8_SCALING_WORDS: dict[str, str] = {
    "delayed": "fp8 scales per tensor from an amax history (delayed)",
    "current": "fp8 scales per tensor from each tensor's amax (current)",
    "mxfp8": "fp8 scales per 32-element block (MXFP8)",
}

LAYOUT_PANEL = "Cluster layout (SPEC --gpus N)"
MODEL_PANEL = "Layout model (how the run is carried out)"

HELP = (
    "Plan an architecture: from a compute budget to a compute-optimal spec, from a partial spec to "
    "the missing sizes (--solve), or from a spec to a cluster layout (SPEC --gpus N --gpu KEY). "
    "Analytic, no torch; the models are stated in docs/plan.md. A layout search also prints how "
    "close its GPU family's step times came on published runs held out from calibration, and the "
    "range of training days their spread puts around its own (docs/validation.md).\n\n"
    "Examples:\n\n"
    "  archplan plan --compute 1e24 --family moe -o moe.yaml\n\n"
    "  archplan plan --params 70e9 --law chinchilla --json\n\n"
    "  archplan plan --solve gpt-4-partial --total 1.8e12 --active 220e9 --multiple 128 --tol 0.07\n\n"
    "  archplan plan llama-3-70b --gpus 1024 --gpu h100 --seq 8192 --global-batch-tokens 4M\n\n"
    "  archplan plan llama-3.1-405b --gpus 16384 --gpu h100 --seq 8192 --global-batch-tokens 16Mi "
    "--headroom 0 --layout tp=8,cp=1,pp=16,vpp=8,dp=128,ep=1,zero=1,recompute=none,mb=1  # Llama 3's run, "
    "which fitted\n\n"
    "  archplan plan deepseek-v3 --gpus 2048 --gpu h800 --seq 4096 --global-batch-tokens 60M "
    "--precision fp8 --fp8-experts --fp8-dispatch --overlap dp,dualpipe\n\n"
    "  archplan plan qwen3-235b-a22b --gpus 256 --gpu h100 --seq 32768 --global-batch-tokens 8M "
    "--flash-impl cudnn --cp-comm ring --overlap dp,pp  # Megatron-Core with Transformer Engine\n\n"
    "  archplan plan deepseek-v3 --gpus 256 --gpu gb300 --seq 4096 --global-batch-tokens 16777216 "
    "--precision fp8 --fp8-scaling mxfp8 --cudnn-norm --flash-impl cudnn --overlap dp,pp,ep --fused-grouped-mlp "
    "--fp8-attention --fp8-lm-head  # Megatron-Bridge's MXFP8 recipe on a GB300 NVL72\n\n"
    "  archplan plan llama-3-70b --gpus 64 --gpu h100 --seq 8192 --global-batch-tokens 2097152 "
    "--precision fp8 --fp8-scaling current --fp8-params --flash-impl cudnn --overlap dp,tp,pp "
    "--layout tp=4,cp=1,pp=8,vpp=5,dp=2,zero=1,recompute=none,mb=1,sp=on  # Megatron-Bridge's FP8-CS "
    "recipe on DGX-H100"
)

DEFAULT_BUDGET_SEQ = 8192
TOP_LAYOUTS = 5  # the layouts a search shows, and the solve mode's candidates
MAX_TOP_LAYOUTS = 100


def _amount(text: str | None, option: str) -> float | None:
    from archplan.commands.size import parse_amount

    return parse_amount(text, option) if text is not None else None


def _token_count(text: str, option: str = "--tokens") -> float:
    """--tokens beside a SPEC, --global-batch-tokens: tokens, in the range `size --tokens` takes
    (0 and an overflow to infinity are out of it, and said alike)."""
    from archplan.report import MAX_TOKENS

    value = _amount(text, option)
    assert value is not None
    if not 1 <= value <= MAX_TOKENS:
        raise ArchplanError(f"{option} must be between 1 and {MAX_TOKENS:.0e}, got {value:.10g}")
    return value


def _console() -> Any:
    from archplan.render import report_console

    return report_console()


# ------------------------------------------------------------------------------------- budget
def _budget(compute: float | None, params: float | None, tokens: float | None, family: FamilyChoice,
            law: LawOption, vocab: int, seq: int) -> tuple[Optimum, Design | NoRecipe]:
    """The allocation, and the spec the family's recipes make of it, or why none lands near it."""
    from archplan.planning.design import Family, NoRecipe, design
    from archplan.planning.optimal import LawChoice, budget, optimum
    from archplan.units import count, sci

    choice = LawChoice(law.value)
    result = optimum(choice, budget(choice, compute=compute, params=params, tokens=tokens))
    fam = Family(family.value)
    n_opt, d_opt = result.optimal.params, result.optimal.tokens
    name = f"plan-{fam.value}-{count(n_opt).replace(' ', '')}"
    description = (
        f"archplan plan: compute-optimal under {choice.value} for C = {sci(result.compute)} FLOPs "
        f"(N = {count(n_opt)} {'active' if fam in (Family.moe, Family.hybrid_moe) else 'total'}, "
        f"D = {count(d_opt)} tokens)"
    )
    try:
        made: Design | NoRecipe = design(fam, n_opt, vocab=vocab, seq=seq, name=name, tokens=round(d_opt),
                                         description=description)
    except NoRecipe as exc:
        made = exc
    return result, made


def _extrapolated(result: Optimum) -> bool:
    """Whether the optimum's N or D lies outside the runs the laws were fitted on (as `size` marks it)."""
    from archplan.analytic.scaling import outside_fit_data

    return outside_fit_data(result.optimal.params, result.optimal.tokens)


# what `model_flops_per_token` and each layout's `mfu` count, as the text output's closing line says
MFU_CONVENTION = ("model FLOPs per token: training (forward + backward), 2 FLOPs per multiply-add, attention "
                  "causal, LM head counted, embedding lookups not, no recompute; a layout's own figure at its "
                  "micro-batch, whose sequences share a long convolution's filters; mfu = model FLOPs / (step time "
                  "× GPUs × bf16 peak), also under --precision fp8, whose GEMMs run against the fp8 peak, "
                  "so that MFU can pass 100%")


def _counted(kind: str) -> str:
    """What N counts in the budget's C = 6·N·D for a family whose `design.target_kind` is `kind`."""
    return ("every parameter, embeddings included" if kind == "total" else
            "the active parameters, embeddings included: the dense law at N_active")


def _budget_json(result: Optimum, made: Design | NoRecipe, written: str | None, kind: str) -> dict[str, Any]:
    from archplan.planning import spec_data
    from archplan.planning.design import NoRecipe

    allocation = {
        "mode": "budget",
        "law": result.law.value,
        "loss_law": result.loss_law.key,
        "compute": result.compute,
        "compute_convention": f"C = 6·N·D; N counts {_counted(kind)}",
        "optimal": {
            "params": result.optimal.params,
            "tokens": result.optimal.tokens,
            "loss": result.optimal.loss,
            "tokens_per_param": result.tokens_per_param,
            "extrapolated": _extrapolated(result),
        },
        "isoflop": [
            {"factor": f, "params": p.params, "tokens": p.tokens, "loss": p.loss}
            for f, p in result.isoflop
        ],
    }
    if isinstance(made, NoRecipe):
        return allocation | {"family": None, "target": None, "design": None, "spec": None, "written": None,
                             "no_spec": made.message}
    spec = made.spec
    return allocation | {
        "family": made.family.value,
        "target": {"kind": made.target_kind, "params": made.target},
        "design": {
            "total_params": made.params.total,
            "active_params": made.params.active,
            "error": made.error,
            "n_layers": spec.n_layers,
            "d_model": spec.d_model,
            "recipe_layers": made.recipe_layers,
            "recipe_d_model": made.recipe_width,
        },
        "spec": spec_data(spec),
        "written": written,
        "no_spec": None,
    }


def _ffn_text(spec: Spec) -> str:
    parts = []
    if spec.ffn is not None:
        parts.append(f"SwiGLU d_ff {spec.ffn.d_ff:,}")
    if spec.moe is not None:
        moe = spec.moe
        shared = f" + {moe.shared.n} shared" if moe.shared else ""
        parts.append(f"MoE {moe.n_experts} experts top-{moe.top_k}{shared}, expert d_ff "
                     f"{moe.expert.d_ff:,}")
    return "; ".join(parts)


def _print_budget(result: Optimum, made: Design | NoRecipe, written: str | None, kind: str) -> None:
    """`kind`: what N counts for the family (`design.target_kind`): every parameter, or for an MoE the
    active ones a token's 6·N FLOPs run through."""
    from rich.markup import escape
    from rich.table import Table

    from archplan.planning.design import NoRecipe
    from archplan.units import count, sci, things

    console = _console()
    opt = result.optimal
    law_title = {"chinchilla": "Hoffmann et al. 2022 Approach 3 (as printed)",
                 "hoffmann2022": "Hoffmann et al. 2022 Approach 3 (as printed)",
                 "hoffmann2022-tex": "Hoffmann et al. 2022 Approach 3 (TeX-source values)",
                 "epoch": "Besiroglu et al. 2024 (Epoch AI replication)",
                 "besiroglu2024": "Besiroglu et al. 2024 (Epoch AI replication)",
                 "20x": "20 tokens per parameter (Hoffmann Table 3)",
                 "approach1": "Hoffmann et al. 2022 Approach 1 (Table 3's projections, fitted)"}[result.law.value]
    console.print(f"[bold]Compute-optimal allocation[/] — {law_title}; C = {sci(result.compute)} FLOPs "
                  f"(C = 6·N·D; N counts {_counted(kind)})")
    console.print(f"  N_opt {count(opt.params)}   D_opt {count(opt.tokens)}   D/N "
                  f"{result.tokens_per_param:.1f}   predicted loss {opt.loss:.4f} "
                  f"({result.loss_law.title})")
    if _extrapolated(result):
        from archplan.analytic.scaling import FIT_DATA_PARAMS, FIT_DATA_TOKENS

        console.print(f"  N or D lies outside the runs the laws were fitted on ({count(FIT_DATA_PARAMS[0])}–"
                      f"{count(FIT_DATA_PARAMS[1])} parameters, {count(FIT_DATA_TOKENS[0])}–"
                      f"{count(FIT_DATA_TOKENS[1])} tokens, Hoffmann et al. 2022 §3): the losses are extrapolated")
    table = Table(title="IsoFLOP alternatives (same C)", title_justify="left")
    for col in ("N / N_opt", "N", "D", "D/N", "loss", "Δ loss"):
        table.add_column(col, justify="right")
    for factor, point in result.isoflop:
        table.add_row(f"{factor:g}×", count(point.params), count(point.tokens),
                      f"{point.tokens / point.params:.1f}", f"{point.loss:.4f}",
                      f"{point.loss - opt.loss:+.4f}")
    console.print(table)
    if isinstance(made, NoRecipe):
        console.print(f"[bold red]no spec:[/] {escape(made.message)}")
        return
    from archplan.spec import GQA

    spec = made.spec
    attn = spec.attention
    assert isinstance(attn, GQA)  # every recipe uses grouped-query attention
    heads = f"{attn.n_heads} heads / {attn.n_kv_heads} KV × {attn.head_dim}"
    layout = f", mixers {spec.layout.mixers}" if spec.ssm is not None or spec.long_conv is not None else ""
    console.print(
        f"[bold]Generated spec[/] {spec.name} ({made.family.value}; target = {made.target_kind} "
        f"params {count(made.target)})\n"
        f"  {things(spec.n_layers, 'layer')} × d_model {spec.d_model:,}{layout}; {heads}; {_ffn_text(spec)}; "
        f"vocab {spec.vocab_size:,}; RoPE, pre-RMSNorm\n"
        f"  total {made.params.total:,}  active {made.params.active:,}  "
        f"({made.target_kind} {made.error:+.2%} from target; recipe shape at this size "
        f"{made.recipe_layers:.0f} × {made.recipe_width:,.0f})"
    )
    if written:
        console.print(f"  written to {escape(printable(written))}")
    else:
        console.print("  (-o FILE.yaml writes it; --json prints it as `spec`)")


def _plot_budget(result: Optimum, made: Design | NoRecipe, path: str, force: bool) -> None:
    from archplan.planning.design import NoRecipe
    from archplan.planning.optimal import isoflop_curve
    from archplan.plot import figure_target, pyplot, save
    from archplan.units import count, sci

    plt = pyplot()
    target = figure_target(path, force=force)
    curve = isoflop_curve(result)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p.params for p in curve], [p.loss for p in curve], color="C0",
            label=f"IsoFLOP C = {sci(result.compute)} ({result.loss_law.key})")
    opt = result.optimal
    ax.scatter([opt.params], [opt.loss], color="C3", zorder=3,
               label=f"optimum ({result.law.value}): N {count(opt.params)}, D {count(opt.tokens)}")
    for factor, point in result.isoflop:
        if factor != 1.0:
            ax.scatter([point.params], [point.loss], color="C1", s=14, zorder=3)
            ax.annotate(f"{factor:g}×", (point.params, point.loss), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    if not isinstance(made, NoRecipe):
        ax.axvline(made.achieved, color="C2", linestyle="--", linewidth=1,
                   label=f"generated spec ({made.target_kind}) {count(made.achieved)}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("predicted loss L(N, D = C / 6N)")
    ax.set_title("archplan plan: loss along the IsoFLOP curve")
    ax.legend(fontsize=8)
    save(fig, target)
    plt.close(fig)


# -------------------------------------------------------------------------------------- plots
def _plot_layouts(result: SearchResult, path: str, force: bool) -> None:
    from archplan.plot import figure_target, pyplot, save

    plt = pyplot()
    target = figure_target(path, force=force)
    rows = _table_rows(result)
    gib = float(1 << 30)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    labels = [_label(e.layout, result.settings.states) for e in rows]
    left = [0.0] * len(rows)
    for name in ("parameters", "gradients", "optimizer", "activations", "temporary"):
        values = [getattr(e.memory, name) / gib for e in rows]
        ax.barh(labels, values, left=left, label=name)
        left = [a + b for a, b in zip(left, values)]
    ax.axvline(result.usable_bytes / gib, color="k", linestyle="--", linewidth=1,
               label="usable per GPU")
    ax.invert_yaxis()
    ax.set_xlabel("GiB per GPU (most loaded pipeline stage)")
    what = (("the given layout" + ("" if rows[0].fits else " (does not fit)")) if result.fixed.complete() is not None
            else "fastest layouts" if result.ranked else "the layout needing the least memory (none fits)")
    ax.set_title(f"{result.gpus:,} × {result.gpu.name}: {what}")
    # beside the bars, not over them (the figure is saved with a tight bounding box)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, target)
    plt.close(fig)


# -------------------------------------------------------------------------------------- solve
def _solve_json(result: SolveResult, written: str | None) -> dict[str, Any]:
    from archplan.planning import spec_data

    return {
        "mode": "solve",
        "unknowns": list(result.unknowns),
        "tied": list(result.tied),
        "targets": {k: v for k, v in result.targets.items()},
        "tolerance": result.tolerance,
        "multiple": result.multiple,
        "solved": result.solved,
        "solutions": result.within,
        "candidates": [
            {"values": c.values, "total_params": c.total, "active_params": c.active,
             "errors": c.errors, "within_tolerance": c.within(result.tolerance)}
            for c in result.candidates
        ],
        "spec": spec_data(result.nearest.spec) if result.solved else None,
        "nearest": spec_data(result.nearest.spec),
        "note": result.floor_note,
        "skipped": result.skipped,
        "written": written,
    }


def _solve_error(error: float) -> str:
    """A solve candidate's relative miss: a percentage, or a ratio where a percentage would run to
    ten digits (a target far below what the fixed sizes hold)."""
    return f"{error:+.3%}" if abs(error) < 10 else f"×{1 + error:.3g}"


def _print_solve(result: SolveResult, written: str | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from archplan.units import count, percent

    console = _console()
    goals = ", ".join(f"{name} {count(value)}" for name, value in result.targets.items())
    tied = f"; tied: {', '.join(result.tied)} = moe.expert.d_ff" if result.tied else ""
    console.print(f"[bold]Solve[/] {', '.join(result.unknowns)}{tied}\n  targets: {goals}; "
                  f"tolerance {percent(result.tolerance) if result.tolerance >= 1e-3 else f'{result.tolerance:.3g}'}; "
                  f"widths in multiples of {result.multiple}")
    table = Table()
    # a narrow terminal folds a figure's digits and a field's dotted name, never cuts them
    for col in result.unknowns:
        table.add_column(col.replace(".", ".\n"), justify="right", overflow="fold")
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("active", justify="right", no_wrap=True)
    for name, _ in result.targets.items():
        table.add_column(f"Δ {name}", justify="right", overflow="fold")
    table.add_column("ok")
    for c in result.candidates[:TOP_LAYOUTS]:
        # "—": a width the candidate's choices leave out (the shared experts' at n = 0)
        table.add_row(*(f"{c.values[u]:,}" if u in c.values else "—" for u in result.unknowns),
                      f"{c.total:,}", f"{c.active:,}",
                      *(_solve_error(c.errors[name]) for name, _ in result.targets.items()),
                      "✓" if c.within(result.tolerance) else "✗")
    console.print(table)
    best = result.nearest
    if result.solved:
        shown = f" (the best {len(result.candidates)} kept)" if result.within > len(result.candidates) else ""
        console.print(f"solved: {result.within:,} candidate(s) within tolerance{shown}; best "
                      + ", ".join(f"{k} = {v:,}" for k, v in best.values.items())
                      + f" ({count(best.total)} total, {count(best.active)} active)")
    else:
        console.print(
            "[bold red]no integer solution[/] within tolerance; nearest: "
            + ", ".join(f"{k} = {v:,}" for k, v in best.values.items())
            + " ("
            # the count too: a miss of a few parameters reads -0.000% at any useful precision
            + ", ".join(f"{name} off by {best.count(name) - target:+,.0f} "
                        f"({_solve_error(best.errors[name])})" for name, target in result.targets.items())
            + ")"
        )
        if note := result.floor_note:
            console.print(f"[yellow]note:[/] {escape(note)}")
    if result.skipped:
        console.print(f"[yellow]note:[/] {escape(result.skipped)}")
    if written:
        console.print(f"written to {escape(printable(written))}")


# ------------------------------------------------------------------------------------- layout
def _refuse_cudnn_attention_before_hopper(settings: Settings, device: Accelerator) -> None:
    """cuDNN's attention is priced at its measured ratio to FlashAttention-2 on H100 (Shah et al.
    2024), and Transformer Engine runs FlashAttention, not cuDNN's kernel, before sm90
    (`get_attention_backend`): on Ampere and Ada that ratio has no run behind it and priced A100's
    attention at 98% of its bf16 peak, past what its GEMMs reach."""
    from archplan.hardware import PRE_HOPPER_NVIDIA, flash_speed, kernel_efficiency

    if settings.flash_impl != "cudnn" or device.key not in PRE_HOPPER_NVIDIA:
        return
    eff, _ = kernel_efficiency(device)
    share = eff.attention_fwd * flash_speed("cudnn", 128)[0] / device.peak("bf16")
    raise ArchplanError(f"--flash-impl cudnn: Transformer Engine runs FlashAttention before Hopper, and cuDNN's "
                        f"measured speed-up is H100's, which on {device.name} would price attention at "
                        f"{share:.0%} of the bf16 peak; use --flash-impl fa2")


def _training_tokens(spec: Spec, tokens: float | None, law: LawOption, law_given: bool) -> tuple[float, str]:
    """Tokens to price the training run: --tokens, else the spec's, else the law's D for its N. A
    --law beside the tokens would go unread: refused, as every option a mode does not read is."""
    given = ("--tokens" if tokens is not None else
             "spec training.tokens" if spec.training is not None and spec.training.tokens is not None else None)
    if given is not None and law_given:
        raise ArchplanError(f"sets the tokens from the model's size, which {given} gives already: drop one",
                            field="--law")
    if tokens is not None:
        return tokens, "--tokens"
    if spec.training is not None and spec.training.tokens is not None:
        return spec.training.tokens, "spec training.tokens"
    from archplan.analytic import count_params
    from archplan.planning.optimal import MAX_COMPUTE, MIN_COMPUTE, LawChoice, allocate, budget, law_params
    from archplan.resolve import resolve
    from archplan.units import count

    params = count_params(resolve(spec))
    n, which = law_params(params.total, params.active, spec.moe is not None)
    choice = LawChoice(law.value)
    try:
        d = allocate(choice, budget(choice, params=n))[1]
    except ArchplanError:
        # the law's own message names --params, which this user did not give
        raise ArchplanError(f"no token budget for {spec.name}: its {count(n)} {which} parameters are "
                            f"outside the {choice.value} law's range (budgets of {MIN_COMPUTE:.0e} to "
                            f"{MAX_COMPUTE:.0e} FLOPs); give --tokens (e.g. --tokens 1B) or "
                            "training.tokens in the spec", field="--tokens") from None
    return d, f"compute-optimal D for N = {which} params under {choice.value}"


def _label(layout: Layout, states: StatesConvention) -> str:
    """The layout's label as the states' engine names its ZeRO-3: DeepSpeed's is not FSDP."""
    return layout.named("ZeRO-3") if states.module_fetch else layout.label


def _layout_row(e: Evaluated, tokens: float, usable: int,
                spread: tuple[float, float] | None, states: StatesConvention) -> dict[str, Any]:
    from archplan.planning.layout import round_size
    from archplan.planning.parallel import training_days

    lay, mem = e.layout, e.memory
    days = training_days(e, tokens)
    return {
        "layout": lay.spec, "label": _label(lay, states),
        "tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "vpp": lay.vpp, "group": round_size(lay, e.microbatches),
        "dp": lay.dp, "ep": lay.ep,
        "zero": lay.zero, "recompute": lay.recompute, "mb": lay.mb, "sp": lay.sequence_parallel,
        "microbatches": e.microbatches,
        "global_batch_tokens": e.global_batch_tokens,
        "memory": {"stage": e.stage, **mem.as_dict(), "total": mem.total, "usable": usable,
                   "fits": e.fits},
        "step_time": {"stage": e.time_stage, **e.time.as_dict()},
        "mfu": e.mfu,
        "model_flops_per_token": e.model_flops_per_token,
        "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu,
        "training_days": days,
        "training_days_range": [days * spread[0], days * spread[1]] if spread else None,
    }


# Where the layout model is known to be optimistic (docs/validation.md): what a user should check.
ZERO3_CAUTION_RANKS = 384


# the share by which a layout's batch as run may differ from --global-batch-tokens unremarked
BATCH_NOTE_ABOVE = 0.1


def _node_size(result: SearchResult) -> int:
    """The GPUs that share a node's links in this job (an NVL72 job of 256 GPUs: 64 of each rack)."""
    return result.net.node(result.gpus)


def _notes(result: SearchResult) -> list[str]:
    from archplan.hardware import matmul_ratio

    notes = []
    if result.ranked:
        best = result.ranked[0].layout
        if (best.zero == 3 and best.dp * best.cp >= ZERO3_CAUTION_RANKS
                and not result.settings.states.module_fetch):
            notes.append(
                f"the top layout re-gathers parameters (ZeRO-3/FSDP) over {best.dp * best.cp} ranks, priced "
                "with whole blocks prefetched behind compute as FSDP does; DeepSpeed's ZeRO-3 fetches "
                "module by module and hides less (--states deepspeed: 28-49% less throughput on "
                "Narayanan et al. 2021 Table 2's runs at 384-1,536 ranks); compare with the best ZeRO-1 "
                "layout (--layout zero=1), which is what large published runs chose")
    given = result.fixed.complete()
    if (given is not None and given.zero > 0 and given.dp * given.cp == 1 and result.settings.states.engine == "megatron"
            and (not result.routed or given.expert_dp == 1)):
        experts = " (and the experts' over 1)" if result.routed else ""
        notes.append(f"zero={given.zero} shards the states over dp·cp = 1 rank{experts}: nothing to shard, so "
                     "they are zero=0's")
    split = [i for i, e in enumerate(result.shown, 1) if e.layout.tp > 1]
    if result.routed and split:
        # Megatron-Core's parallel folding (Liu et al. 2025); its `expert_tensor_parallel_size`
        # defaults to the tensor-parallel size, which Megatron-Bridge's MoE recipes set to 1
        shown = ", ".join(map(str, split))
        notes.append(f"layout{'s' if len(split) > 1 else ''} {shown}: the routed experts are whole on every "
                     "tensor-parallel rank (expert tensor parallelism 1, as Megatron-Bridge's MoE recipes set "
                     "it), sharded only over ep; Megatron-Core's default expert TP = tp, which splits each "
                     "expert's weights tp ways and its tokens' GEMMs with them, is not priced")
    per_node = _node_size(result)
    if result.gpus > per_node and result.gpus % per_node:
        whole, rest = divmod(result.gpus, per_node)
        # the rings' NICs are priced per node only under --ring-nics members
        nics = (f"a data-parallel ring through that node drives its {rest} NIC{'s' if rest > 1 else ''} across "
                "nodes, and " if result.ring_nics == "members" else "")
        notes.append(f"{result.gpus:,} GPUs are {whole:,} whole node{'s' if whole > 1 else ''} of {per_node} "
                     f"and {rest} GPU{'s' if rest > 1 else ''} on another: {nics}a group that straddles two "
                     "nodes is priced across them; --gpus-per-node sets the node's size")
    if not result.calibrated and result.settings.efficiency is not None:
        notes.append(f"no calibration for {result.gpu.name}: its HBM bandwidth fraction is Hopper's; its "
                     "GEMMs and attention run at the --efficiency given")
    elif not result.calibrated:
        ratio = matmul_ratio(result.gpu)
        gemms = ("" if ratio is None else
                 f", its GEMMs' at {ratio:.3f}× Hopper's for its measured matmul rate against H100's")
        notes.append(f"no calibration for {result.gpu.name}: its kernel efficiencies are the Hopper "
                     f"fractions scaled to its peak{gemms}")
    return notes


# the share of the step in exposed data-parallel traffic, at one NIC per GPU, from which `plan`
# shows the network's other end (`parallel.rail_bound`): below it the answer hardly depends on the NICs
DP_CAUTION_SHARE = 0.10


def _network_bound(result: SearchResult, plan: ModelPlan) -> RailBound | None:
    """The top layout under the other ring convention, when its data-parallel ring has several
    members on each node and, at one NIC per GPU, its exposed data-parallel traffic is a large share
    of the step. Not the fast end under `--states deepspeed`: DeepSpeed's 2021 ZeRO-3 runs behaved
    as one NIC per GPU (docs/validation.md)."""
    from archplan.planning.parallel import rail_bound

    if not result.ranked or (result.settings.states.module_fetch and result.ring_nics == "one"):
        return None
    top = result.ranked[0]
    bound = rail_bound(result, plan, top)
    if bound is None:
        return None
    slow = _at_one_nic(result, bound)
    return bound if slow.time.dp >= DP_CAUTION_SHARE * slow.time.total else None


def _at_one_nic(result: SearchResult, bound: RailBound) -> Evaluated:
    """The top layout as priced at one NIC per GPU: itself, or the bound that re-priced it so."""
    return bound.evaluated if bound.ring_nics == "one" else result.ranked[0]


def _ring_text(result: SearchResult) -> str:
    """How the layouts' rings across nodes were priced, and whose convention that is."""
    whose = "--ring-nics" if result.settings.ring_nics else "the GPU family's; --ring-nics sets it"
    what = ("one NIC per GPU" if result.ring_nics == "one"
            else "as many NICs per GPU as the group has members on a node")
    return f"data-parallel rings across nodes over {what} ({whose})"


def _network_note(result: SearchResult, bound: RailBound) -> str:
    top, other = result.ranked[0], bound.evaluated
    change = other.tokens_per_s_per_gpu / top.tokens_per_s_per_gpu - 1
    slow = _at_one_nic(result, bound)
    share = f"{slow.time.dp / slow.time.total:.0%} of the top layout's step at one NIC per GPU is data-parallel traffic"
    if bound.ring_nics == "members":
        return (f"{share}, priced so; its ring has {bound.nics} members on each node and NCCL can drive "
                f"{bound.nics} NICs for it: then {other.tokens_per_s_per_gpu:,.0f} tokens/s per GPU ({change:+.0%}; "
                "--ring-nics members prices every layout so). Published runs fall between the two ends, so the "
                "one-NIC figure is the cautious one (docs/validation.md)")
    return (f"{share}; priced over its ring's {bound.nics} NICs per node (NCCL's one ring per NIC). At one NIC "
            f"per GPU: {other.tokens_per_s_per_gpu:,.0f} tokens/s per GPU ({change:+.0%}; --ring-nics one prices "
            "every layout so). Published runs fall between the two ends (docs/validation.md)")


# Megatron-Core MoE runs on H100 priced under this many seconds a layer pass (one GPU's forward and
# backward of one layer for one micro-batch) measured 9.4-9.7 ms a pass where their recipes capture
# no CUDA graphs: time the GPU waits on its host. Held-out runs show it and no source measures it,
# so it is told, not priced (docs/validation.md, "A floor under Megatron-Core's MoE layer on H100").
MOE_HOST_FLOOR_S = 9.4e-3


def _moe_host_note(result: SearchResult, plan: ModelPlan) -> str | None:
    """The caution for an MoE layout on a Hopper GPU priced under `MOE_HOST_FLOOR_S` a layer pass."""
    from archplan.hardware import FAMILY_OF

    if not result.routed or not result.ranked or FAMILY_OF.get(result.gpu.key) != "hopper":
        return None
    top = result.ranked[0]
    per_pass = top.time.total / (len(plan.trained_layers) / top.layout.pp * top.microbatches)
    if per_pass >= MOE_HOST_FLOOR_S:
        return None
    return (f"the top layout is priced at {per_pass * 1e3:.1f} ms a layer pass (one layer's forward and "
            "backward of one micro-batch on one GPU); Megatron-Core MoE runs on H100 priced under "
            f"{MOE_HOST_FLOOR_S * 1e3:.1f} ms measured 9.4-9.7 ms a pass when they captured no CUDA graphs "
            "(the GPU waiting on the host that launches and synchronises the MoE layer), which would make "
            f"this layout {MOE_HOST_FLOOR_S / per_pass - 1:.0%} slower; not priced (docs/validation.md)")


def _loss_hint(settings: Settings) -> str:
    """Under FSDP2 states the default loss is Megatron's fused one, which no FSDP2 stack runs:
    say which option prices torchtitan's or Hugging Face's, whose backward also holds memory."""
    from archplan.planning.cluster import LOSS_BACKWARD_BYTES

    if settings.eager and settings.cross_entropy == "fp32-fused":
        whole, split = LOSS_BACKWARD_BYTES["eager"]
        return (f" (torchtitan and Hugging Face run --cross-entropy eager, whose backward also holds {whole} B a "
                f"logit, {split} B under loss_parallel; llm-foundry bf16-fused)")
    return ""


def _kv_heads_note(result: SearchResult, plan: ModelPlan) -> str | None:
    """What the megatron engine's figures leave out where the top layout has fewer KV heads than
    tp ranks (docs/plan.md, "fewer KV heads than tp ranks")."""
    from archplan.resolve import AttentionPlan

    if not result.ranked or result.settings.states.engine != "megatron":
        return None
    tp = result.ranked[0].layout.tp
    fewer = sorted({layer.mixer.n_kv_heads for layer in plan.layers
                    if isinstance(layer.mixer, AttentionPlan) and layer.mixer.n_kv_heads < tp})
    if not fewer:
        return None
    heads = " or ".join(map(str, fewer))
    return (f"the top layout runs {heads} KV head{'s' if fewer != [1] else ''} over tp={tp}: Megatron-Core "
            "all-gathers each attention layer's fused QKV output and keeps the rank's head (priced); the "
            "gathered output, which Megatron may keep for the backward, is not priced as an activation "
            "(docs/plan.md)")


def _model_notes(result: SearchResult, plan: ModelPlan) -> list[str]:
    """The notes that read the model: the MoE host floor and KV heads fewer than tp."""
    return [note for note in (_moe_host_note(result, plan), _kv_heads_note(result, plan)) if note]


def _all_notes(result: SearchResult, bound: RailBound | None, model_notes: list[str],
               train_tokens: float) -> list[str]:
    return (_notes(result) + model_notes
            + ([_network_note(result, bound)] if bound else []) + _batch_notes(result)
            + _pipeline_fill_notes(result) + _tokens_notes(result, train_tokens))


def _tokens_notes(result: SearchResult, train_tokens: float) -> list[str]:
    """A run shorter than one step of the top layout: its days price a fraction of a step."""
    from archplan.units import count

    step = result.ranked[0].global_batch_tokens if result.ranked else 0
    if train_tokens >= step:
        return []
    are = "token is" if train_tokens == 1 else "tokens are"
    return [f"the run's {count(train_tokens)} {are} fewer than one step of layout 1 ({count(step)} tokens): its "
            "training time prices a fraction of a step"]


def _batch_notes(result: SearchResult) -> list[str]:
    """Each layout runs m = round(sequences / (dp·mb)) whole micro-batches, so its batch as run may
    differ from --global-batch-tokens: said where it differs by more than `BATCH_NOTE_ABOVE`."""
    asked = result.asked_batch_tokens
    off = [(i, e) for i, e in enumerate(result.shown, 1)
           if asked and abs(e.global_batch_tokens / asked - 1) > BATCH_NOTE_ABOVE]
    if not off:
        return []
    runs = "; ".join(f"layout {i} {e.global_batch_tokens:,} ({e.global_batch_tokens / asked - 1:+.0%})"
                     for i, e in off)
    return [f"tokens per step as run differ from {_asked(result)}, since each layout runs whole "
            f"micro-batches of dp·mb sequences: {runs}; ranked by time per token"]


def _batch_as_run(result: SearchResult) -> str:
    """Layout 1's tokens per step, beside the asked batch where it differs and the other layouts'
    where theirs differ from it: each layout rounds --global-batch-tokens to its own whole micro-batches
    (`_batch_notes` says why, where the difference is large)."""
    best = result.shown[0].global_batch_tokens
    batches = sorted({e.global_batch_tokens for e in result.shown})
    text = f"{best:,} tokens per step as run" if len(batches) == 1 else (
        f"{best:,} tokens per step as layout 1 runs them (the layouts shown run {batches[0]:,} to {batches[-1]:,})")
    asked = result.asked_batch_tokens
    return text + (f", for {_asked(result)}" if asked and round(asked) != best else "")


def _asked(result: SearchResult) -> str:
    """The batch asked for, or the default taken where none was: a user who gave none should know
    the layouts were ranked for it (4M tokens leaves a 16,384-GPU pipeline unfilled)."""
    asked = result.asked_batch_tokens
    return (f"the default {asked:,.0f} (--global-batch-tokens)" if result.batch_default
            else f"the {asked:,.0f} asked")


def _pipeline_fill_notes(result: SearchResult) -> list[str]:
    """Layouts shown with fewer micro-batches than pipeline stages: the first stage runs out of
    forwards before the last one starts its first, so no moment has every stage busy (1F1B's
    bubble is (p − 1)/m of the ideal step, Narayanan et al. 2021 §2.2.1). Said with the batch
    that fills them, pp·dp·mb sequences. A batch asked in SI units ("16M" = 16·10⁶) can round to
    one micro-batch short of a power-of-two pipeline's: where the filling batch is within
    `BATCH_NOTE_ABOVE` above the one asked, the note names the binary units."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, e in enumerate(result.shown, 1):
        if e.microbatches < e.layout.pp:
            fill = e.layout.pp * e.layout.dp * e.layout.mb * result.seq
            groups.setdefault((e.microbatches, e.layout.pp, fill), []).append(i)
    if not groups:
        return []
    runs = "; ".join(f"layout{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))}: m = {m} for pp = {pp}, "
                     f"filled by {fill:,} tokens per step" for (m, pp, fill), shown in groups.items())
    asked = result.asked_batch_tokens
    near = asked and any(0 < fill / asked - 1 <= BATCH_NOTE_ABOVE for _, _, fill in groups)
    binary = "; --global-batch-tokens takes binary units too (16Mi = 16·2^20)" if near else ""
    # Megatron-Core's interleaved schedule refuses a round outside [pp, m] (a ValueError in
    # `forward_backward_pipelining_with_interleaving`); torch's runs m < pp as one round, as priced
    interleaved = (result.settings.states.engine == "megatron"
                   and any(e.layout.vpp > 1 and e.microbatches < e.layout.pp for e in result.shown))
    megatron = ("; Megatron-Core runs no interleaved schedule (vpp > 1) on fewer micro-batches than pp: "
                "priced as torch's one round" if interleaved else "")
    return [f"fewer micro-batches than pipeline stages, so the pipeline never fills ({runs}){binary}{megatron}"]


def _network_json(bound: RailBound | None) -> dict[str, Any] | None:
    if bound is None:
        return None
    other = bound.evaluated
    return {"layout": other.layout.spec, "ring_nics": bound.ring_nics,
            "nics_per_gpu": bound.nics if bound.ring_nics == "members" else 1, "step_s": other.time.total,
            "tokens_per_s_per_gpu": other.tokens_per_s_per_gpu, "mfu": other.mfu, "dp_s": other.time.dp}


def _efficiency_text(result: SearchResult) -> str:
    settings, k = result.settings, result.kernels
    if settings.efficiency is not None:
        # the family's GEMM scaling (an uncalibrated GPU's matmul ratio) is not applied: the GEMMs run
        # at the user's rate
        source = f"{k.family} constants" if result.calibrated else "Hopper's fraction: no calibration on this GPU"
        return (f"--efficiency {settings.efficiency:g}: GEMMs and attention at {settings.efficiency:.0%} "
                f"of the dense peak (user-measured); elementwise and optimizer at {k.hbm:.0%} of HBM "
                f"bandwidth ({source})")
    from archplan.hardware import flash_speed

    calibrated = "" if result.calibrated else " [not calibrated on this GPU]"
    fwd, bwd = flash_speed(settings.flash_impl, 128)  # the rates quoted are at head dim 128
    if settings.attention_kernel == "flash":
        attention = (f"attention at {k.attention_fwd * fwd / 1e12:,.0f}/{k.attention_bwd * bwd / 1e12:,.0f} "
                     f"TFLOP/s fwd/bwd (flash, {settings.flash_impl}, long sequences, head dim 128"
                     f"{_fraction_text(result)})")
    else:
        # eager: the scores' and the values' batched GEMMs over the full square at the GEMM
        # efficiency of their shape, the softmax's passes at HBM bandwidth (`pricing._layer_micro`)
        attention = "attention as batched GEMMs over the full square by shape, its softmax at HBM bandwidth (eager)"
    fp8 = ""
    if settings.precision == "fp8":
        slower = (f"backward fp8 GEMMs {k.fp8_split_acc:g}× slower: split accumulator, "
                  if k.fp8_split_acc != 1.0 else "")
        experts = ("" if not result.routed else "routed experts' GEMMs at the fp8 rate (--fp8-experts), "
                   if settings.fp8_experts else "routed experts' GEMMs at the bf16 rate, ")
        fp8 = f" ({slower}{experts}fp8 casts at HBM bandwidth)"
    return (f"compute model, {k.family} constants{calibrated}: GEMMs up to {k.gemm:.0%} of the "
            f"{settings.precision} peak by shape{fp8}, {attention}, elementwise "
            f"and optimizer at {k.hbm:.0%} of HBM bandwidth")


def _family_label(result: SearchResult) -> str:
    """The constants' family as `--json` names it; under `--efficiency` an uncalibrated GPU's
    matmul-rate scaling of the GEMMs is left out of the name, since the user's rate replaces it."""
    if result.settings.efficiency is None or result.calibrated:
        return result.kernels.family
    return f"uncalibrated ({result.gpu.name}, Hopper fractions)"


def _fraction_text(result: SearchResult) -> str:
    """What share of the quoted rates this model's attention layers run at (`flash_fractions`: the
    length law, a head-dim-64 layer's share and speed, fp8 attention), where it is not all of them:
    ", 68% of that for this model at 1,024 tokens", forward and backward apart where they differ."""
    fractions = result.flash_fractions  # (forward, backward), smallest forward first
    if not fractions or all(f == (1.0, 1.0) for f in fractions):
        return ""

    def span(values: list[float]) -> str:
        low, high = f"{min(values):.0%}", f"{max(values):.0%}"
        return low if low == high else f"{low}–{high}"

    forward, backward = span([f for f, _ in fractions]), span([b for _, b in fractions])
    share = forward if forward == backward else f"{forward}/{backward}"
    return f"; {share} of that for this model at {result.seq:,} tokens"


def _accuracy(result: SearchResult) -> HeldOutAccuracy | None:
    """The held-out accuracy of the GPU's family constants, on the runs of the engine the states
    run on where the family has enough (`accuracy.for_plan`); none under `--efficiency`, whose GEMM
    and attention rates are the user's, not the ones validated."""
    from archplan.planning.accuracy import for_plan

    if result.settings.efficiency is not None:
        return None
    return for_plan(result.gpu, result.settings.states.engine, result.routed)


def _time_spread(spec: Spec, result: SearchResult) -> tuple[float, float] | None:
    """The factors on a predicted duration that nine held-out runs in ten of the GPU's own family
    fell between; none where no run on it, or no run of a model with the spec's mixers, was held
    out (the figures are then a check on other GPUs or other mixers, too loose a link to put a
    range on a duration)."""
    from archplan.planning.accuracy import own_runs, unjudged_mixers

    accuracy = _accuracy(result)
    judged = accuracy and own_runs(result.gpu, accuracy) and unjudged_mixers(spec) is None
    return accuracy.time_range() if accuracy and judged else None


def _accuracy_text(spec: Spec, result: SearchResult, accuracy: HeldOutAccuracy) -> str:
    from archplan.planning.accuracy import label, model_in_runs, own_runs, unjudged_mixers

    mixers, own = unjudged_mixers(spec), own_runs(result.gpu, accuracy)
    # a GPU judged by its family's runs on another model of it (H200 by H100 runs) is told so;
    # one judged by none says so below
    none_on = None if not own or model_in_runs(result.gpu, accuracy) else label(result.gpu)
    if own and mixers is None:
        return accuracy.text(none_on)
    subject = f"a model with {mixers} mixers" if mixers else "an MoE model" if accuracy.moe else None
    run = "no published run" + (f" of {subject}" if subject else "") + ("" if own else f" on the {result.gpu.name}")
    if mixers:
        others = ("MoE " if accuracy.moe else "") + "transformer runs" + ("" if own else " on other GPUs")
    elif accuracy.moe:
        others = "MoE runs on other GPU families"
    else:
        others = "other GPUs priced with Hopper's fractions"
    return (f"accuracy: {run} was held out; the nearest check is the {others}, "
            f"{accuracy.text(none_on).removeprefix('accuracy: ')}")


def _layout_json(spec: Spec, result: SearchResult, tokens: float, source: str,
                 bound: RailBound | None, seq_note: str | None, model_notes: list[str]) -> dict[str, Any]:
    from archplan.planning.accuracy import own_runs, unjudged_mixers

    settings = result.settings
    spread = _time_spread(spec, result)
    shown = _table_rows(result)
    return {
        "mode": "layout",
        "spec": spec.name,
        "gpus": result.gpus,
        "gpu": result.gpu.key,
        "seq": result.seq,
        "fixed": dict(result.fixed.chosen(result.routed).given),
        "efficiency": {"override": settings.efficiency, "family": _family_label(result),
                       "calibrated": result.calibrated, "description": _efficiency_text(result),
                       "flash_fractions": [f for f, _ in result.flash_fractions],
                       "flash_fractions_backward": [b for _, b in result.flash_fractions]},
        "accuracy": ({**accuracy.as_dict(), "gpu_in_runs": own_runs(result.gpu, accuracy),
                      "mixers_in_runs": unjudged_mixers(spec) is None}
                     if (accuracy := _accuracy(result)) else None),
        "states": {"convention": settings.states.key, "bytes_per_param": settings.states.bytes_per_param,
                   "optimizer_moment_bytes": settings.states.moment_bytes,
                   "master_bytes": settings.states.master_bytes,
                   "description": settings.states.on_gpu(result.gpu).description},
        "attention_kernel": settings.attention_kernel,
        "grad_reduce_bytes": settings.reduce_bytes,
        "cp_comm": settings.cp_comm,
        "dispatcher": settings.dispatcher,
        "fp8_experts": settings.fp8_experts,
        "fp8_dispatch": settings.fp8_dispatch,
        "fp8_params": settings.fp8_params,
        "fused_grouped_mlp": settings.fused_grouped_mlp,
        "fp8_attention": settings.fp8_attention,
        "fp8_lm_head": settings.fp8_lm_head,
        "fp8_scaling": settings.fp8_scaling if settings.precision == "fp8" else None,
        "cudnn_norm": settings.cudnn_norm,
        "recompute_modules": sorted(settings.recompute_modules),
        "overlap": sorted(settings.overlap),
        "precision": settings.precision,
        "flash_impl": settings.flash_impl,
        "recompute_early_stop": settings.stops_early,
        "fused_qkv": settings.fused_qkv,
        "cross_entropy": settings.cross_entropy,
        "headroom": result.headroom,
        "usable_bytes_per_gpu": result.usable_bytes,
        "network": {"intra_node_bytes_per_s": result.net.intra_node,
                    "inter_node_bytes_per_s": result.net.inter_node,
                    "gpus_per_node": _node_size(result), "source": result.net.source,
                    "ring_nics": result.ring_nics},
        "model_flops_per_token": result.model_flops_per_token,
        "flops_convention": MFU_CONVENTION,
        "training_tokens": tokens,
        "training_tokens_source": source,
        "feasible": result.feasible,
        "reasons": list(result.reasons) + ([f"does not fit: {unfit}"] if (unfit := _given_unfit(result)) else []),
        "considered": result.considered,
        "fitting": result.fitting,
        "notes": ([seq_note] if seq_note else []) + _all_notes(result, bound, model_notes, tokens),
        "network_bound": _network_json(bound),
        "layouts": [_layout_row(e, tokens, result.usable_bytes, spread, result.settings.states) for e in shown],
    }


BAR_WIDTH = 24
# each category's colour, and its glyph where the output has no colour (NO_COLOR, a pipe, a file),
# so that the bar and its legend still tell the categories apart
BAR_STYLES = (("parameters", "blue", "█"), ("gradients", "yellow", "▓"), ("optimizer", "green", "▒"),
              ("activations", "red", "░"), ("temporary", "magenta", "·"))


def _colourless(console: Any) -> bool:
    return bool(console.no_color or console.color_system is None)


def _bar_glyph(glyph: str, plain: bool) -> str:
    return glyph if plain else "█"


def _memory_bar(e: Evaluated, usable: int, plain: bool) -> Any:
    """Stacked bar of the per-GPU memory, full width = the usable memory; a layout that does not
    fit is drawn to its own total instead, with `OVER_MARK` where the usable memory ends (an
    uncapped bar would push every other column off the terminal). `plain`: one glyph a category,
    for output without colour."""
    from rich.text import Text

    scale = max(usable, e.memory.total)
    cells = [(style, glyph) for name, style, glyph in BAR_STYLES
             for _ in range(round(BAR_WIDTH * getattr(e.memory, name) / scale))]
    bar = Text()
    limit = round(BAR_WIDTH * usable / scale) if scale > usable else None
    for i, (style, glyph) in enumerate(cells):
        bar.append(OVER_MARK if i == limit else _bar_glyph(glyph, plain), style="bold" if i == limit else style)
    return bar


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[Evaluated], Any]
    hide_rank: int | None = None  # the order in which a narrow terminal hides it; None: always shown
    justify: Literal["left", "right"] = "right"
    wraps: bool = False
    split: bool = False  # one of the memory split's columns (or its bar), which a stacked table leaves out
    one_line: str | None = None  # its name on one line, where the header's second line is a unit

    @property
    def name(self) -> str:
        return self.one_line or self.header.replace("\n", " ")


LAYOUT_MIN_WIDTH = 14  # a layout label (up to ~40 characters) on at most three lines
BAR_HEADER = "of\nusable"
OVER_MARK = "┃"


def _layout_columns(result: SearchResult, tokens: float, plain: bool) -> tuple[_Column, ...]:
    """The layout table's columns. A narrow terminal hides the memory categories first (the bar
    still shows them, by colour or, without colour, by glyph), then the bar, the days and the
    communication share: the total, step time, MFU and throughput, what a layout is chosen by,
    always stay. `plain`: the console shows no colour (`_colourless`)."""
    from archplan.planning.parallel import training_days
    from archplan.units import amount, duration, nbytes, percent

    def mark(e: Evaluated) -> str:
        return nbytes(e.memory.total) + ("" if e.fits else " ✗")

    return (
        _Column("layout", lambda e: _label(e.layout, result.settings.states), justify="left", wraps=True),
        _Column("m", lambda e: str(e.microbatches)),
        _Column("params", lambda e: nbytes(e.memory.parameters), 4, split=True),
        _Column("grads", lambda e: nbytes(e.memory.gradients), 3, split=True),
        _Column("optim.", lambda e: nbytes(e.memory.optimizer), 2, split=True),
        _Column("activ.", lambda e: nbytes(e.memory.activations), 5, split=True),
        _Column("temp.", lambda e: nbytes(e.memory.temporary), 1, split=True),
        _Column("total", mark),
        _Column(BAR_HEADER, lambda e: _memory_bar(e, result.usable_bytes, plain), 6, "left", split=True),
        _Column("step\ns", lambda e: amount(e.time.total), one_line="step (s)"),
        _Column("comm +\nbubble", lambda e: percent(e.time.exposed / e.time.total), 8),
        _Column("MFU", lambda e: percent(e.mfu)),
        _Column("tok/s\nper GPU", lambda e: f"{e.tokens_per_s_per_gpu:,.0f}"),
        _Column("time", lambda e: duration(training_days(e, tokens)), 7),
    )


def _build_table(rows: tuple[Evaluated, ...], columns: list[_Column], title: str, *,
                 narrowest: bool = False) -> Any:
    """The table; `narrowest`: the wrapping column capped at its least width, to measure the table
    by (`render.table_width`)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    for col in columns:
        table.add_column(col.header, justify=col.justify, no_wrap=not col.wraps,
                         min_width=LAYOUT_MIN_WIDTH if col.wraps else None,
                         max_width=LAYOUT_MIN_WIDTH if col.wraps and narrowest else None)
    for i, e in enumerate(rows, 1):
        table.add_row(str(i), *(col.cell(e) for col in columns))
    return table


def _layout_table(rows: tuple[Evaluated, ...], result: SearchResult, tokens: float, title: str,
                  width: int, plain: bool) -> tuple[Any, list[str]]:
    """The table of `rows` at most `width` columns wide, and the headers it hid to get there."""
    from archplan.render import table_width

    columns = list(_layout_columns(result, tokens, plain))
    hidden: list[str] = []
    for col in sorted((c for c in columns if c.hide_rank is not None), key=lambda c: c.hide_rank or 0):
        if table_width(_build_table(rows, columns, title, narrowest=True)) <= width:
            break
        columns.remove(col)
        hidden.append(col.header)
    else:
        if table_width(_build_table(rows, columns, title, narrowest=True)) > width:
            # the figures fold under each label, so all but the memory split (the bar's) come back
            every = list(_layout_columns(result, tokens, plain))
            return (_stacked_table(rows, [c for c in every if not c.split], title),
                    [c.header for c in every if c.split])
    return _build_table(rows, columns, title), hidden


def _stacked_table(rows: tuple[Evaluated, ...], columns: list[_Column], title: str) -> Any:
    """The table for a terminal too narrow even for the columns that always stay: each layout's
    figures under its label, as 'name value' pairs that fold, rather than columns cut at the edge."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layout, then its figures", overflow="fold")
    for i, e in enumerate(rows, 1):
        label, *figures = columns
        pairs = " · ".join(f"{col.name} {col.cell(e)}" for col in figures)
        table.add_row(str(i), f"{label.cell(e)}\n{pairs}")
    return table


def _print_table(console: Any, rows: tuple[Evaluated, ...], result: SearchResult, tokens: float,
                 title: str) -> None:
    """The layout table at the console's width, with the bar's legend when it is shown and the
    hidden columns named."""
    from archplan.units import nbytes

    plain = _colourless(console)
    table, hidden = _layout_table(rows, result, tokens, title, console.width, plain)
    console.print(table)
    console.print("m: micro-batches a step on each data-parallel rank (the global batch / (mb × DP))")
    if BAR_HEADER not in hidden:
        console.print("bars: " + ", ".join(f"[{style}]{_bar_glyph(glyph, plain)}[/] {name}"
                                           for name, style, glyph in BAR_STYLES)
                      + f"; full width = {nbytes(result.usable_bytes)}"
                      + ("" if all(e.fits for e in rows) else
                         f", or the total of a layout that does not fit, {OVER_MARK} where the usable ends"))
    if hidden:
        names = ", ".join(header.replace("\n", " ") for header in hidden)
        console.print(f"hidden at {console.width} columns: {names} (a wider terminal shows them; "
                      "--json has every figure)")


def _print_layout(spec: Spec, result: SearchResult, tokens: float, source: str,
                  bound: RailBound | None, seq_note: str | None, model_notes: list[str]) -> None:
    from rich.markup import escape

    from archplan.planning.cluster import STATE_DTYPES
    from archplan.planning.parallel import training_days
    from archplan.units import count, duration, nbytes, percent

    console = _console()
    net, settings = result.net, result.settings
    given = result.fixed.chosen(result.routed)
    fixed = f"; fixed: {given.spec}" if given.given else ""
    console.print(
        f"[bold]Cluster layouts[/] for {escape(spec.name)} on {result.gpus:,} × {result.gpu.name} "
        f"({nbytes(result.usable_bytes)} usable per GPU after {percent(result.headroom)} headroom); "
        f"seq {result.seq:,}; links {net.intra_node / 1e9:g} GB/s in-node, {net.inter_node / 1e9:g} "
        f"GB/s across ({net.source}); {result.fitting:,} of {result.considered:,} layouts fit{fixed}")
    console.print(f"  {escape(_efficiency_text(result))}; {_ring_text(result)}")
    if accuracy := _accuracy(result):
        console.print(f"  {escape(_accuracy_text(spec, result, accuracy))}")
    overlap = ", ".join(sorted(settings.overlap)) or "none"
    if settings.states.module_fetch and "dp" in settings.overlap:
        overlap += " (dp: ZeRO 0-2; ZeRO-3 hides what DeepSpeed's fetch rules let it)"
    from archplan.planning.cluster import NORM_AFTER_OUTPUT

    recompute = "stops early (non-reentrant checkpoint)" if settings.stops_early else "re-runs the whole block"
    if settings.stops_early and spec.residual.kind in NORM_AFTER_OUTPUT:
        recompute += f", which {spec.residual.kind} blocks' last norm makes the whole block"
    passes = ((["bias gradients summed apart"] if settings.bias_grad_pass else [])
              + (["fused QKV's gradients concatenated"] if settings.qkv_concat_pass else []))
    eager = f"; eager autograd: {', '.join(passes)}" if passes else ""
    if settings.recompute_modules:
        eager += f"; modules re-run under none/selective: {', '.join(sorted(settings.recompute_modules))}"
    sent = "" if settings.precision != "fp8" else ", fp8 tokens" if settings.fp8_dispatch else ", bf16 tokens"
    if settings.fused_grouped_mlp:
        sent += ", fused grouped MLP"
    if settings.fp8_attention:
        sent += "; attention in MXFP8"
    if settings.fp8_lm_head:
        sent += "; LM head in MXFP8"
    if settings.precision == "fp8":
        sent += f"; {FP8_SCALING_WORDS[settings.fp8_scaling]}"
        if settings.cudnn_norm:
            sent += ", cuDNN norms"
    console.print(f"  states: {settings.states.on_gpu(result.gpu).description}; gradients reduced in "
                  f"{STATE_DTYPES[settings.reduce_bytes]}; overlap: {overlap}; "
                  f"CP K/V by {settings.cp_comm}; MoE dispatch {settings.dispatcher}{sent}; "
                  f"full recompute {recompute}{eager}; loss "
                  f"{settings.cross_entropy}{_loss_hint(settings)}")
    if spec.mtp is not None:
        console.print(f"  multi-token prediction: {spec.mtp.depth} module(s) on the last pipeline stage, each a "
                      "block, a 2·d → d projection and a head pass, with an embedding copy where pp > 1; the "
                      "layers split as Megatron-Bridge's DeepSeek-V3 layouts (docs/plan.md)")
    if seq_note:
        console.print(f"[yellow]note:[/] {escape(seq_note)}")
    for reason in result.reasons:
        console.print(f"[bold red]infeasible:[/] {reason}")
    if not result.ranked:
        if result.tightest is not None:
            _print_table(console, (result.tightest,), result, tokens,
                         "the layout needing the least memory (does not fit)")
        # the notes that need no ranked layout (a partly filled node, an uncalibrated GPU), as --json
        for note in _all_notes(result, bound, model_notes, tokens):
            console.print(f"[yellow]note:[/] {note}")
        return
    rows = result.shown
    title = ("the given layout" if result.fixed.complete() is not None else
             f"fastest {len(rows)}") + " (per-GPU memory of the most loaded pipeline rank)"
    _print_table(console, rows, result, tokens, title)
    if (unfit := _given_unfit(result)) is not None:
        console.print(f"[bold red]does not fit:[/] {escape(unfit)}")
    for note in _all_notes(result, bound, model_notes, tokens):
        console.print(f"[yellow]note:[/] {note}")
    best = rows[0]
    noun = "token" if tokens == 1 else "tokens"
    shared = ("; a micro-batch's sequences share the long convolutions' filters, so a layout counts them once "
              f"per micro-batch: layout 1's mb {best.layout.mb}, {best.model_flops_per_token:,}/token"
              if any(e.model_flops_per_token != result.model_flops_per_token for e in rows) else "")
    console.print(f"training on {count(tokens)} {noun} ({source}): {_batch_as_run(result)}; MFU = model FLOPs "
                  f"({result.model_flops_per_token:,}/token, "
                  f"causal, no recompute; `size --seq {result.seq} --attention causal` counts the same, its default full square "
                  f"more{shared}) / (step time × GPUs × bf16 peak)"
                  + ("; the GEMMs in fp8 run against the fp8 peak, so MFU can pass 100%"
                     if result.settings.precision == "fp8" else ""))
    if accuracy and (spread := _time_spread(spec, result)):
        days = training_days(best, tokens)
        console.print(f"held-out spread: nine in ten of the {accuracy.described('held-out')} "
                      f"took {spread[0]:.2f}× to {spread[1]:.2f}× the time predicted for them; for layout 1, "
                      f"{duration(days * spread[0])} to {duration(days * spread[1])} ({duration(days)} predicted)")


def _table_rows(result: SearchResult) -> tuple[Evaluated, ...]:
    """The layouts the table, `--json` and `--plot` show: the fastest (or the given one), else the
    one needing the least memory."""
    return result.shown if result.ranked else ((result.tightest,) if result.tightest is not None else ())


def _given_unfit(result: SearchResult) -> str | None:
    """Why the given layout, kept although it does not fit (`search`'s keep_unfit), does not;
    None when it fits or none was given. A search's own reasons are `result.reasons`."""
    from archplan.units import nbytes, overshoot

    if not result.ranked or result.ranked[0].fits:
        return None
    e = result.ranked[0]
    mem = e.memory
    return (f"pipeline rank {e.stage} needs {nbytes(mem.total)} > {nbytes(result.usable_bytes)} usable"
            f"{overshoot(mem.total, result.usable_bytes)} (parameters "
            f"{nbytes(mem.parameters)}, gradients {nbytes(mem.gradients)}, optimizer {nbytes(mem.optimizer)}, "
            f"activations {nbytes(mem.activations)}, temporary {nbytes(mem.temporary)})")


# What each mode of `plan` reads, or answers with its own message (-o in a layout search, --gpus
# in a budget, ...); any other option given is refused (`options.refuse_foreign_options`)
_ANSWERED = frozenset({"compute", "params", "output", "force", "as_json", "plot", "total", "active",
                       "gpus", "layout", "tokens"})
PLAN_MODES: dict[str, frozenset[str]] = {
    "a budget": _ANSWERED | {"family", "law", "vocab", "seq"},
    "--solve": _ANSWERED | {"solve", "tol", "multiple"},
    "a layout search": _ANSWERED | {
        "gpu", "seq", "global_batch_tokens", "law", "efficiency", "mfu", "states", "attention", "grad_reduce",
        "optimizer_moments", "master_weights",
        "cp_comm", "dispatcher", "overlap", "precision", "fp8_experts", "fp8_dispatch", "fp8_params", "flash_impl",
        "recompute_modules", "fused_grouped_mlp", "fp8_attention", "fp8_lm_head", "fp8_scaling",
        "cudnn_norm", "early_stop", "fused_qkv", "cross_entropy", "headroom",
        "ring_nics", "top",
        "gpus_per_node", "nvlink_gbs", "ib_gbs"},
}


# --------------------------------------------------------------------------------- the command
def register(app: typer.Typer) -> None:
    @app.command("plan", help=HELP)
    def plan(
        ctx: typer.Context,
        spec: Annotated[str | None, typer.Argument(
            help="Spec YAML, preset or - (standard input): search cluster layouts for it (with --gpus, --gpu).",
            show_default=False, metavar="SPEC", autocompletion=complete_spec)] = None,
        compute: Annotated[str | None, typer.Option(
            "--compute", help="Training budget in FLOPs, e.g. 1e24.")] = None,
        params: Annotated[str | None, typer.Option(
            "--params", help="Plan for this N instead (the budget for which it is optimal), e.g. 70e9.")] = None,
        tokens: Annotated[str | None, typer.Option(
            "--tokens", help="Plan for this D instead; with SPEC: training tokens to price, e.g. 15T.")] = None,
        family: Annotated[FamilyChoice, typer.Option(
            "--family", help="Architecture family of the generated spec.")] = FamilyChoice.dense,
        law: Annotated[LawOption, typer.Option(
            "--law", help="chinchilla (= hoffmann2022): Hoffmann 2022 Approach 3 as printed; hoffmann2022-tex: its "
            "TeX-source values; epoch (= besiroglu2024): Besiroglu 2024 refit; 20x: D = 20N; approach1: Hoffmann "
            "2022 Approach 1, fitted over its Table 3.")] = LawOption.epoch,
        vocab: Annotated[int, typer.Option("--vocab", help="Vocabulary of the generated spec.")] = 128256,
        seq: Annotated[int | None, typer.Option(
            "--seq", parser=length_option, metavar="LENGTH",
            help="Budget: max_seq_len of the generated spec [8192]; SPEC: training sequence length "
            "\\[min(8192, max_seq_len)]; past max_seq_len: priced with a note (RoPE), refused past a learned "
            "position table or Hyena filter.")] = None,
        output: Annotated[str | None, typer.Option("-o", "--output", help="Write the generated/solved spec here.")] = None,
        force: ForceOpt = False,
        as_json: JsonOpt = False,
        plot: Annotated[str | None, typer.Option(
            "--plot", help="Figure (PNG/SVG/PDF): loss along the IsoFLOP curve, or the layouts' memory.")] = None,
        solve: Annotated[str | None, typer.Option(
            "--solve", help="Partial spec YAML (- for standard input): sizes marked `solve` (or left out) are "
                            "solved for; gpt-4-partial and claude-3-opus-partial (the rumoured presets') are bundled.",
            autocompletion=complete_partial)] = None,
        total: Annotated[str | None, typer.Option("--total", help="Target total parameters, e.g. 1.8e12.")] = None,
        active: Annotated[str | None, typer.Option("--active", help="Target active parameters, e.g. 220e9.")] = None,
        tol: Annotated[float, typer.Option("--tol", help="Relative tolerance on each target.")] = 0.01,
        multiple: Annotated[int, typer.Option("--multiple", help="Solved widths are multiples of this.")] = 1,
        gpus: Annotated[int | None, typer.Option("--gpus", help="Number of GPUs.", rich_help_panel=LAYOUT_PANEL)] = None,
        gpu: Annotated[str, typer.Option("--gpu", help="Accelerator: h100, a100-80gb, h800, h200, b200, gb200, b300, "
                                         "gb300, mi300x, ...",
                                         rich_help_panel=LAYOUT_PANEL, autocompletion=complete_gpu)] = "h100",
        global_batch_tokens: Annotated[str, typer.Option(
            "--global-batch-tokens", help="Tokens per optimizer step, e.g. 4M (SI: 4·10^6) or 16Mi (binary: "
            "16·2^20, Llama 3's 2,048 sequences of 8,192); rounded to whole sequences of --seq.",
            rich_help_panel=LAYOUT_PANEL)] = "4M",
        layout: Annotated[str | None, typer.Option(
            "--layout", help="Fix layout fields, e.g. tp=8,pp=16,vpp=2 (fields: tp cp pp vpp dp ep zero recompute "
            "mb sp; any subset; the rest is searched; all but vpp/sp given = exactly that layout); group=N sets the "
            "interleaved schedule's micro-batches per round (default pp).",
            rich_help_panel=LAYOUT_PANEL)] = None,
        efficiency: Annotated[float | None, typer.Option(
            "--efficiency", help="Your measured GEMM + attention efficiency (fraction of the dense peak) "
            "instead of the per-GPU-family compute model.", rich_help_panel=MODEL_PANEL)] = None,
        mfu: Annotated[float | None, typer.Option("--mfu", hidden=True)] = None,
        states: Annotated[StatesChoice, typer.Option(
            "--states", help="Model-state convention: megatron 18 B/param (fp32 main grads), zero 16 B/param, "
            "fsdp2 (fp32 sharded params + grads, bf16 compute copies), deepspeed (zero's bytes; ZeRO-3 "
            "fetched module by module as DeepSpeed does).", rich_help_panel=MODEL_PANEL)] = StatesChoice.megatron,
        attention: Annotated[KernelChoice, typer.Option(
            "--attention-kernel", "--attention",
            help="flash: FlashAttention + fused kernels (no s×s memory); eager: plain torch autograd (as size's "
            "--attention-kernel; --attention, its older name, is read too).",
            rich_help_panel=MODEL_PANEL)] = KernelChoice.flash,
        grad_reduce: Annotated[StateDTypeChoice | None, typer.Option(
            "--grad-reduce", help=("Gradient reduction dtype \\[the states' gradient dtype]; under --states "
                                    "megatron also the main grads' (Megatron-Core's buffer: bf16 = 16 B/param)."),
            rich_help_panel=MODEL_PANEL)] = None,
        optimizer_moments: Annotated[StateDTypeChoice, typer.Option(
            "--optimizer-moments", help="Adam's m and v in fp32, or bf16 (DeepSeek-V3 §3.3.1; Megatron-Core's "
            "precision-aware optimizer, --exp-avg-dtype bf16, as Megatron-Bridge's tuned DeepSeek recipes set "
            "it): --states megatron 14 B/param, zero 12.", rich_help_panel=MODEL_PANEL)] = StateDTypeChoice.fp32,
        master_weights: Annotated[MasterChoice, typer.Option(
            "--master-weights", help="The fp32 master copy whole, or as the 16 bits its bf16 weight lacks "
            "(remainders: Megatron-Core's precision-aware optimizer, whose store_param_remainders is on by "
            "default; --states megatron only): 2 B/param less.", rich_help_panel=MODEL_PANEL)] = MasterChoice.fp32,
        cp_comm: Annotated[CPCommChoice, typer.Option(
            "--cp-comm", help="Context-parallel K/V exchange: all_gather (Llama 3) or ring (Megatron-Core).",
            rich_help_panel=MODEL_PANEL)] = CPCommChoice.all_gather,
        dispatcher: Annotated[DispatcherChoice, typer.Option(
            "--dispatcher", help="How the MoE all-to-all crosses nodes: nccl (NCCL's all-to-all, every remote "
            "copy over the NIC; Megatron's alltoall dispatcher), hierarchical (DeepEP's internode kernels, "
            "HybridEP: each token once per remote node, forwarded over NVLink), or auto (hierarchical where "
            "the router limits a token's nodes, as DeepSeek-V3's does; nccl otherwise).",
            rich_help_panel=MODEL_PANEL)] = DispatcherChoice.auto,
        overlap: Annotated[str, typer.Option(
            "--overlap", help=("Communication hidden behind compute: any of dp,tp,pp,ep,dualpipe, or none "
                               "(ep: Megatron-Core's EP overlap, a measured share of the MoE all-to-all; "
                               "dualpipe: DeepSeek's DualPipe, all of it)."),
            rich_help_panel=MODEL_PANEL)] = "dp",
        precision: Annotated[PrecisionChoice, typer.Option(
            "--precision", help="bf16, or fp8 GEMMs inside the blocks (router and LM head stay bf16; see --fp8-lm-head).",
            rich_help_panel=MODEL_PANEL)] = PrecisionChoice.bf16,
        fp8_experts: Annotated[bool, typer.Option(
            "--fp8-experts/--bf16-experts",
            help="Under --precision fp8, whether the routed experts' grouped GEMMs run at the fp8 rate, as "
            "DeepGEMM's do (DeepSeek-V3's kernels), or gain nothing, as Transformer Engine's measure "
            "(Megatron-Core, Hopper and Blackwell; their fp8 casts still paid).",
            rich_help_panel=MODEL_PANEL, metavar="")] = False,
        fp8_dispatch: Annotated[bool, typer.Option(
            "--fp8-dispatch/--bf16-dispatch",
            help="Under --precision fp8, whether the MoE dispatch sends the tokens in fp8, quantized once "
            "before it (DeepSeek-V3's DeepEP), or in bf16, each routed copy quantized by the experts "
            "(Megatron-Core's dispatchers until 2026-08).", rich_help_panel=MODEL_PANEL, metavar="")] = False,
        fp8_params: Annotated[bool, typer.Option(
            "--fp8-params/--bf16-params",
            help="Under --precision fp8 and --states megatron, whether the GEMM weights are kept and gathered in "
            "fp8, one byte each (Megatron-Core's FP8 primary weights, --fp8-param-gather, on in Megatron-Bridge's "
            "fp8 recipes), or in bf16. The embedding, LM head, norms and routers stay bf16.",
            rich_help_panel=MODEL_PANEL, metavar="")] = False,
        recompute_modules: Annotated[str, typer.Option(
            "--recompute-modules",
            help="Megatron-Core's module recompute beside the layout's mode (recompute_modules): mla_up_proj "
            "re-runs MLA's up-projections and RoPE in the backward, so each MLA layer keeps its latents, not "
            "Q, K and V; or none. Applies under recompute none or selective; Megatron-style --states only.",
            rich_help_panel=MODEL_PANEL)] = "none",
        fused_grouped_mlp: Annotated[bool, typer.Option(
            "--fused-grouped-mlp/--unfused-grouped-mlp",
            help="Under --fp8-scaling mxfp8 (B200, GB200, B300 or GB300), whether the routed experts run Transformer "
            "Engine's fused grouped MLP (Megatron-Bridge's MXFP8 MoE recipes from 26.06): their activation and "
            "the down-projection's fp8 cast run inside the GEMMs, so neither makes a pass over HBM.",
            rich_help_panel=MODEL_PANEL, metavar="")] = False,
        fp8_attention: Annotated[bool, typer.Option(
            "--fp8-attention/--bf16-attention",
            help="Under --fp8-scaling mxfp8 with --flash-impl cudnn on GB200 or GB300, whether the attention core "
            "runs in MXFP8 (Transformer Engine's fp8_dot_product_attention), at cuDNN's measured speed over its "
            "BF16 kernel: a faster forward, and on short sequences a slower backward.",
            rich_help_panel=MODEL_PANEL, metavar="")] = False,
        fp8_lm_head: Annotated[bool, typer.Option(
            "--fp8-lm-head/--bf16-lm-head",
            help="Under --fp8-scaling mxfp8 (B200, GB200, B300 or GB300) with a Megatron-style --states, whether the "
            "LM head runs in MXFP8 (Megatron-Core's fp8_output_proj) or stays bf16, as fp8 recipes keep it by "
            "default.", rich_help_panel=MODEL_PANEL, metavar="")] = False,
        fp8_scaling: Annotated[FP8ScalingChoice, typer.Option(
            "--fp8-scaling",
            help="Under --precision fp8, how scales are found: delayed (per tensor, from an amax history; the "
            "cast fused into the norm), current (per tensor, from the tensor itself: Transformer Engine's "
            "Float8CurrentScaling, Megatron-Bridge's FP8-CS; an amax pass before each cast, the norms' outputs "
            "cast apart) or mxfp8 (per 32-element block: Blackwell's MXFP8, which --fused-grouped-mlp, "
            "--fp8-attention and --fp8-lm-head need; the norms' outputs cast apart unless --cudnn-norm).",
            rich_help_panel=MODEL_PANEL)] = FP8ScalingChoice.delayed,
        cudnn_norm: Annotated[bool, typer.Option(
            "--cudnn-norm/--te-norm",
            help="Under --fp8-scaling current or mxfp8, whether the norms run cuDNN's kernels "
            "(NVTE_NORM_FWD_USE_CUDNN=1): under MXFP8 they write the quantized output themselves, under "
            "current scaling the cast takes an amax pass of its own; or Transformer Engine's (the default).",
            rich_help_panel=MODEL_PANEL, metavar="")] = False,
        flash_impl: Annotated[FlashImplChoice, typer.Option(
            "--flash-impl", help="FlashAttention implementation: fa2 (FlashAttention-2), triton (FlashAttention "
            "in Triton, e.g. llm-foundry's attn_impl: triton; Dao 2023 §4.1: 1.4× slower forward, 2× backward), "
            "or cudnn (cuDNN's fused attention, what Transformer Engine, so Megatron-Core, NeMo and "
            "Megatron-Bridge, runs on H100 and B200; Shah et al. 2024: 1.6× FlashAttention-2 at head dim 128). "
            "Each runs slower on short sequences, as its benchmark figures measure (the output says how much).",
            rich_help_panel=MODEL_PANEL)] = FlashImplChoice.fa2,
        early_stop: Annotated[bool | None, typer.Option(
            "--recompute-early-stop/--no-recompute-early-stop",
            help="Whether full recompute stops once the tensors the backward saved are rebuilt, skipping each "
            "block's last GEMM (PyTorch's non-reentrant checkpoint from 2.1 on), or re-runs the whole block "
            "(Megatron-LM, reentrant checkpoint, PyTorch before 2.1) \\[on with --states fsdp2, off otherwise].",
            show_default=False, rich_help_panel=MODEL_PANEL, metavar="")] = None,
        fused_qkv: Annotated[bool, typer.Option(
            "--fused-qkv/--separate-qkv",
            help="Whether one linear projects q, k and v and its output is split (llm-foundry's MPT Wqkv, "
            "GPT-2's c_attn) or three do (torchtitan, Hugging Face Llama). Under --states fsdp2 (eager "
            "autograd) the split's backward concatenates the three gradients, a copy priced at HBM "
            "bandwidth; Transformer Engine splits without one.", rich_help_panel=MODEL_PANEL, metavar="")] = False,
        cross_entropy: Annotated[CrossEntropyChoice, typer.Option(
            "--cross-entropy",
            help="The loss's implementation, HBM bytes per logit forward and backward: fp32-fused (a fused "
            "kernel over fp32 logits, Megatron's vocab-parallel loss: 24), bf16-fused (flash-attention's or "
            "Apex's kernel on bf16 logits, llm-foundry's default: 8), eager (F.cross_entropy on logits cast to "
            "fp32, torchtitan and Hugging Face: 36; its backward also holds two fp32 gradients of the rank's "
            "logits, 8 B a logit, 12 B under torch's loss_parallel, priced as temporary memory).",
            rich_help_panel=MODEL_PANEL)] = CrossEntropyChoice.fp32_fused,
        ring_nics: Annotated[RingNicsChoice | None, typer.Option(
            "--ring-nics",
            help="NICs a data-parallel or context-parallel ring across nodes moves a GPU's bytes over: one, or "
            "members (as many as the group has GPUs on a node: NCCL runs one ring per NIC) \\[the GPU family's: "
            "members on Hopper, one on A100, docs/validation.md]. All-to-alls and pipeline sends use one.",
            rich_help_panel=LAYOUT_PANEL)] = None,
        top: Annotated[int, typer.Option(
            "--top", help=f"Layouts to show, the fastest first (1-{MAX_TOP_LAYOUTS}); only those that can rank "
            "among them are priced.", rich_help_panel=LAYOUT_PANEL)] = TOP_LAYOUTS,
        headroom: Annotated[float, typer.Option(
            "--headroom", help="Fraction of GPU memory kept free (allocator, NCCL buffers, fragmentation).",
            rich_help_panel=LAYOUT_PANEL)] = 0.1,
        gpus_per_node: Annotated[int | None, typer.Option(
            "--gpus-per-node", help="GPUs per NVLink domain (default: the GPU's, 8; 72 for gb200 and gb300, "
                                    "whose NVL72 rack is one domain).", rich_help_panel=LAYOUT_PANEL)] = None,
        nvlink_gbs: Annotated[float | None, typer.Option("--nvlink-gbs", help="In-node bandwidth per GPU, GB/s one way.",
                                                         rich_help_panel=LAYOUT_PANEL)] = None,
        ib_gbs: Annotated[float | None, typer.Option("--ib-gbs", help="Inter-node bandwidth per GPU, GB/s one way.",
                                                     rich_help_panel=LAYOUT_PANEL)] = None,
    ) -> None:
        if spec is not None and solve is not None:
            raise ArchplanError("give either SPEC (layout search) or --solve, not both")
        if (solve is not None or spec is not None) and (compute is not None or params is not None):
            raise ArchplanError("--compute/--params plan from a budget; they go without SPEC or --solve")
        if mfu is not None:  # retired, hidden: checked before the modes, which would call it foreign
            raise ArchplanError("plan's --mfu is now --efficiency (the kernels' fraction of peak, read by a "
                                "layout search); MFU is an output of the compute model")
        refuse_foreign_options(ctx, "--solve" if solve is not None else "a layout search" if spec is not None
                               else "a budget", PLAN_MODES)
        if solve is None and (total is not None or active is not None):
            raise ArchplanError("--total/--active go with --solve PARTIAL.yaml")
        if solve is not None:
            if tokens is not None or gpus is not None or layout is not None:
                raise ArchplanError("--solve takes --total/--active, not --tokens, --gpus or --layout")
            _run_solve(solve, total, active, tol, multiple, output, force, as_json, plot)
        elif spec is None and compute is None and params is None and tokens is None:
            # a bare `archplan plan`: name all three modes, not only the budget's options
            raise ArchplanError("give a budget (--compute, --params or --tokens), a spec to lay out (SPEC --gpus N) "
                                "or a partial spec to complete (--solve PARTIAL.yaml --total N); see 'archplan "
                                "plan --help'")
        elif spec is not None:
            if output is not None:
                raise ArchplanError("-o writes a generated or solved spec; the layout search writes none")
            if gpus is None:
                raise ArchplanError("the layout search needs --gpus N (--gpu defaults to h100), e.g. "
                                    f"archplan plan {spec} --gpus 1024")
            if force and plot is None:
                raise ArchplanError("--force overwrites the --plot figure; the layout search writes nothing else")
            train_tokens = None if tokens is None else _token_count(tokens)
            settings = _settings(efficiency, states, attention, grad_reduce, cp_comm, overlap, precision,
                                 flash_impl, early_stop, fused_qkv, cross_entropy, ring_nics, optimizer_moments,
                                 master_weights, dispatcher, fp8_experts, fp8_dispatch, fp8_params,
                                 recompute_modules, fused_grouped_mlp, fp8_attention, fp8_lm_head,
                                 fp8_scaling, cudnn_norm)
            if not 1 <= top <= MAX_TOP_LAYOUTS:
                raise ArchplanError(f"--top must be between 1 and {MAX_TOP_LAYOUTS}, got {top}")
            _run_layout(spec, gpus, gpu, seq, global_batch_tokens, layout, settings, headroom,
                        gpus_per_node, nvlink_gbs, ib_gbs, train_tokens, law, given_by_user(ctx, "law"), as_json,
                        plot, force, top, given_by_user(ctx, "top"), given_by_user(ctx, "global_batch_tokens"))
        else:
            if gpus is not None or layout is not None:
                raise ArchplanError("--gpus/--layout go with a SPEC: archplan plan SPEC --gpus N --gpu KEY")
            _run_budget(_amount(compute, "--compute"), _amount(params, "--params"),
                        _amount(tokens, "--tokens"), family, law, vocab,
                        seq if seq is not None else DEFAULT_BUDGET_SEQ, output, force, as_json, plot)


def _check_output(output: str | None, force: bool, plot: str | None = None) -> None:
    """Every place the command writes, checked before it writes any: a refused --plot must not
    leave the -o spec behind (a rerun would then refuse -o as existing)."""
    if force and output is None and plot is None:
        raise ArchplanError("--force overwrites the -o spec or the --plot figure; without either nothing is written")
    if output is not None:
        check_target(output, force=force, field="-o/--output", suffixes=SPEC_SUFFIXES)
    if plot is not None:
        from archplan.plot import figure_target, pyplot

        figure_target(plot, force=force)
        pyplot()


def _run_budget(compute: float | None, params: float | None, tokens: float | None,
                family: FamilyChoice, law: LawOption, vocab: int, seq: int, output: str | None,
                force: bool, as_json: bool, plot: str | None) -> None:
    from archplan.planning import write_spec

    _check_output(output, force, plot)
    from archplan.spec import MAX_DIM, MAX_SEQ_LEN

    # the generated spec's own bounds (spec.py), checked here to name the option that broke them
    for name, value, upper in (("--vocab", vocab, MAX_DIM), ("--seq", seq, MAX_SEQ_LEN)):
        if not 1 <= value <= upper:
            raise ArchplanError(f"{name} must be between 1 and {upper:,}, got {value:,}")
    from archplan.planning.design import NoRecipe, target_kind

    result, made = _budget(compute, params, tokens, family, law, vocab, seq)
    written = None  # no spec, nothing written: the allocation still prints, and the exit is 1
    if output is not None and not isinstance(made, NoRecipe):
        write_spec(made.spec, output, force=force, header=(
            f"generated by archplan plan --{'compute' if compute is not None else 'params' if params is not None else 'tokens'} "
            f"{compute or params or tokens!r} --family {family.value} --law {law.value} --vocab {vocab} --seq {seq}"))
        written = output
    if plot is not None:
        _plot_budget(result, made, plot, force)
    settle(1 if isinstance(made, NoRecipe) else 0)
    if as_json:
        echo(jsonout.dumps(_budget_json(result, made, written, target_kind(family)), indent=2))
    else:
        _print_budget(result, made, written, target_kind(family))
    figure_written(plot, json_out=as_json)
    if isinstance(made, NoRecipe):
        raise SystemExit(1)


def _run_solve(partial: str, total: str | None, active: str | None, tol: float, multiple: int,
               output: str | None, force: bool, as_json: bool, plot: str | None) -> None:
    from archplan.loader import spec_source
    from archplan.planning import write_spec
    from archplan.planning.solve import Targets, solve

    if plot is not None:
        raise ArchplanError("--plot draws a budget's IsoFLOP curve or a layout search, not a solve")
    _check_output(output, force)
    result = solve(partial, Targets(_amount(total, "--total"), _amount(active, "--active")),
                   tolerance=tol, multiple=multiple)
    written = None
    if output is not None and result.solved:
        best = result.nearest
        # the command's own targets beside what it solved: the file says how to solve it again
        asked = "".join(f" --{name} {text}" for name, text in (("total", total), ("active", active)) if text)
        write_spec(best.spec, output, force=force, header=(
            f"solved by archplan plan --solve {spec_source(partial)}{asked} --tol {tol:g} --multiple {multiple}: "
            + ", ".join(f"{k} = {v}" for k, v in best.values.items())))
        written = output
    settle(0 if result.solved else 1)
    if as_json:
        echo(jsonout.dumps(_solve_json(result, written), indent=2))
    else:
        _print_solve(result, written)
        if output is not None and not result.solved:
            echo(f"nothing written to {printable(output)}: no candidate within tolerance")
    if not result.solved:
        # SystemExit, not typer.Exit: cli.main runs the app with standalone_mode=False, where click
        # returns an Exit's code instead of exiting with it.
        raise SystemExit(1)


def _comma_set(text: str, option: str) -> set[str]:
    """The names of a comma list; one named twice is a slip the user should see, not fold away."""
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ArchplanError(f"{option}: '{text}' names {', '.join(twice)} more than once")
    return set(names)


def _settings(efficiency: float | None, states: StatesChoice, attention: KernelChoice,
              grad_reduce: StateDTypeChoice | None, cp_comm: CPCommChoice, overlap: str,
              precision: PrecisionChoice, flash_impl: FlashImplChoice = FlashImplChoice.fa2,
              early_stop: bool | None = None, fused_qkv: bool = False,
              cross_entropy: CrossEntropyChoice = CrossEntropyChoice.fp32_fused,
              ring_nics: RingNicsChoice | None = None,
              optimizer_moments: StateDTypeChoice = StateDTypeChoice.fp32,
              master_weights: MasterChoice = MasterChoice.fp32,
              dispatcher: DispatcherChoice = DispatcherChoice.auto, fp8_experts: bool = False,
              fp8_dispatch: bool = False, fp8_params: bool = False, recompute_modules: str = "none",
              fused_grouped_mlp: bool = False, fp8_attention: bool = False,
              fp8_lm_head: bool = False,
              fp8_scaling: FP8ScalingChoice = FP8ScalingChoice.delayed, cudnn_norm: bool = False) -> Settings:
    from archplan.planning.cluster import EP_OVERLAPS, OVERLAPS, RECOMPUTE_MODULES, STATES
    from archplan.planning.parallel import Settings

    parts = _comma_set(overlap, "--overlap")
    if not parts:
        raise ArchplanError(f"--overlap: '{overlap}' names nothing (any of {', '.join(OVERLAPS)}, or none)")
    if parts == {"none"}:
        parts = set()
    elif "none" in parts:
        raise ArchplanError(f"--overlap: '{overlap}': none stands alone (it hides nothing), not beside "
                            f"{', '.join(sorted(parts - {'none'}))}")
    unknown = parts - set(OVERLAPS)
    if unknown:
        raise ArchplanError(f"--overlap: unknown {', '.join(sorted(unknown))} (any of {', '.join(OVERLAPS)}, or none)")
    if EP_OVERLAPS <= parts:
        raise ArchplanError("--overlap: ep and dualpipe are two schedules hiding the same MoE all-to-all; give one")
    modules = _comma_set(recompute_modules, "--recompute-modules") - {"none"}
    if unknown := modules - set(RECOMPUTE_MODULES):
        raise ArchplanError(f"--recompute-modules: unknown {', '.join(sorted(unknown))} "
                            f"(any of {', '.join(RECOMPUTE_MODULES)}, or none)")
    for flag, given in (("--fp8-experts", fp8_experts), ("--fp8-dispatch", fp8_dispatch),
                        ("--fused-grouped-mlp", fused_grouped_mlp), ("--fp8-attention", fp8_attention),
                        ("--fp8-lm-head", fp8_lm_head),
                        (f"--fp8-scaling {fp8_scaling.value}", fp8_scaling is not FP8ScalingChoice.delayed),
                        ("--cudnn-norm", cudnn_norm)):
        if given and precision is not PrecisionChoice.fp8:
            raise ArchplanError(f"{flag} says how a run uses fp8: it goes with --precision fp8")
    return Settings(
        states=STATES[states.value], attention_kernel=attention.value,  # type: ignore[arg-type]
        grad_reduce=None if grad_reduce is None else grad_reduce.bytes,
        cp_comm=cp_comm.value, overlap=frozenset(parts), precision=precision.value,  # type: ignore[arg-type]
        efficiency=efficiency, flash_impl=flash_impl.value,  # type: ignore[arg-type]
        early_stop=early_stop, fused_qkv=fused_qkv, cross_entropy=cross_entropy.value,  # type: ignore[arg-type]
        ring_nics=None if ring_nics is None else ring_nics.value,  # type: ignore[arg-type]
        moments=optimizer_moments.bytes,
        master_remainders=master_weights is MasterChoice.remainders,
        dispatcher=dispatcher.value,  # type: ignore[arg-type]
        fp8_experts=fp8_experts, fp8_dispatch=fp8_dispatch, fp8_params=fp8_params,
        recompute_modules=frozenset(modules),  # type: ignore[arg-type]
        fused_grouped_mlp=fused_grouped_mlp, fp8_attention=fp8_attention, fp8_lm_head=fp8_lm_head,
        fp8_scaling=fp8_scaling.value, cudnn_norm=cudnn_norm,  # type: ignore[arg-type]
    )


_OVERLAPPED = (("tp", "the tensor-parallel traffic behind its GEMMs"),
               ("pp", "the pipeline's sends and receives behind compute"),
               ("ep", "the experts' all-to-all behind compute"))


def _refuse_overlap_the_gpus_rule_out(settings: Settings, fixed: PartialLayout, gpus: int, tp_node: int) -> None:
    """--overlap of a degree that --gpus and the degrees given leave at 1 would change nothing:
    said in one line (after the given layout's own checks, whose refusal is the cause where it
    applies). The other degrees given leave this one the GPUs over (EP folds over a stage's
    ranks, so only pp bounds it): none when they take them all, and for TP none of its degrees
    (powers of two, within the node) dividing what is left."""
    from archplan.planning.parallel import TP_DEGREES

    given = fixed.given
    for degree, what in _OVERLAPPED:
        bounding = ("pp",) if degree == "ep" else tuple(d for d in ("tp", "cp", "pp", "dp") if d != degree)
        others = math.prod(int(given.get(d, 1)) for d in bounding)
        if degree not in settings.overlap or degree in given or gpus % others:
            continue
        rest = gpus // others
        if rest == 1 or (degree == "tp" and not any(rest % t == 0 for t in TP_DEGREES if 1 < t <= tp_node)):
            why = "" if rest == 1 else f" (no TP degree, a power of two within the node of {tp_node}, divides {rest})"
            raise ArchplanError(f"--overlap {degree} hides {what}, and --gpus {gpus:,}"
                                f"{' with the given --layout' if others > 1 else ''} leaves {degree}=1{why}: "
                                f"drop {degree} from --overlap")


def _refuse_settings_the_layout_rules_out(settings: Settings, fixed: PartialLayout, seq: int,
                                          attention: bool, gpus: int) -> None:
    """An option about a degree or mode the given --layout, the search's rules or the states rule
    out would change nothing: said in one line, as a MoE option on a dense model is. (The published
    runs' stacks set these for every run, whatever its layout: the check is the command line's, not
    the search's.) A model without attention layers is left to the search's check, which names that."""
    from archplan.planning.parallel import CP_MIN_TOKENS

    given = fixed.given
    if settings.cp_comm != "all_gather" and given.get("cp") == 1:
        raise ArchplanError(f"--cp-comm {settings.cp_comm} exchanges K/V between context-parallel ranks, and "
                            "the given --layout has cp=1: drop --cp-comm (a search applies it only where cp > 1)")
    if settings.cp_comm != "all_gather" and "cp" not in given and attention:
        others = math.prod(int(given.get(degree, 1)) for degree in ("tp", "pp", "dp"))
        if gpus <= others:
            raise ArchplanError(f"--cp-comm {settings.cp_comm} exchanges K/V between context-parallel ranks, and "
                                f"--gpus {gpus:,}{' with the given --layout' if others > 1 else ''} leaves cp=1")
        if seq < 2 * CP_MIN_TOKENS:
            raise ArchplanError(f"--cp-comm {settings.cp_comm} exchanges K/V between context-parallel ranks, and "
                                f"the search tries cp > 1 only from {2 * CP_MIN_TOKENS:,} tokens (each rank "
                                f"keeping ≥ {CP_MIN_TOKENS:,}), not at --seq {seq:,}: give --layout cp=N, or a "
                                "longer --seq")
    for degree, what in _OVERLAPPED:
        if degree in settings.overlap and given.get(degree) == 1:
            raise ArchplanError(f"--overlap {degree} hides {what}, and the given --layout has {degree}=1: drop "
                                f"{degree} from --overlap (a search applies it only where {degree} > 1)")
    if settings.dispatcher != "auto" and given.get("ep") == 1:
        raise ArchplanError(f"--dispatcher {settings.dispatcher} routes the experts' all-to-all across nodes, and "
                            "the given --layout has ep=1, which sends none: drop --dispatcher (a search applies it "
                            "only where ep > 1)")
    if settings.recompute_modules and given.get("recompute") == "full":
        raise ArchplanError(f"--recompute-modules {','.join(sorted(settings.recompute_modules))} re-runs modules "
                            "under recompute none or selective, and the given --layout has recompute=full (which "
                            "re-runs every module): drop --recompute-modules (a search applies it only where "
                            "recompute is none or selective)")
    if settings.fused_qkv and not settings.eager and attention:
        raise ArchplanError(f"--fused-qkv: the concatenation of q's, k's and v's gradients it prices is eager "
                            f"autograd's, which only --states fsdp2 runs; under --states {settings.states.key} "
                            "it would change nothing")
    if settings.early_stop is not None and given.get("recompute", "full") != "full":
        raise ArchplanError(f"--{'' if settings.early_stop else 'no-'}recompute-early-stop says how full recompute "
                            f"re-runs a block, and the given --layout has recompute={given['recompute']}: drop "
                            f"--{'' if settings.early_stop else 'no-'}recompute-early-stop (a search applies it only "
                            "where recompute is full)")


def _run_layout(name: str, gpus: int, gpu_key: str, seq: int | None, batch_text: str,
                layout_text: str | None, settings: Settings, headroom: float,
                gpus_per_node: int | None, nvlink_gbs: float | None, ib_gbs: float | None,
                tokens: float | None, law: LawOption, law_given: bool, as_json: bool, plot: str | None, force: bool,
                top: int = TOP_LAYOUTS, top_given: bool = False, batch_given: bool = True) -> None:
    from archplan.hardware import accelerator
    from archplan.loader import load_spec
    from archplan.planning.cluster import model_data
    from archplan.planning.layout import LAYOUT_FIELDS, PartialLayout, check_partial, parse_layout
    from archplan.planning.parallel import interconnect, search
    from archplan.resolve import resolve

    if layout_text is not None and not layout_text.strip(" ,"):
        raise ArchplanError(f"--layout: no fields given; write NAME=VALUE pairs such as tp=8,pp=16 "
                            f"(names: {', '.join(LAYOUT_FIELDS)})")
    fixed = parse_layout(layout_text) if layout_text is not None else PartialLayout()
    spec = load_spec(name)
    seq = min(DEFAULT_BUDGET_SEQ, spec.max_seq_len) if seq is None else seq
    plan = resolve(spec)
    _refuse_settings_the_layout_rules_out(settings, fixed, seq, plan.has_attention, gpus)
    if top_given and fixed.for_model(1 if plan.routed else 0).complete() is not None:
        raise ArchplanError(f"--top {top} ranks a search, and the given --layout fixes every field: one layout")
    device = accelerator(gpu_key)
    cudnn = [flag for flag, on in (("--flash-impl cudnn", settings.flash_impl == "cudnn"),
                                   ("--cudnn-norm", settings.cudnn_norm)) if on]
    if cudnn and device.vendor != "NVIDIA":
        instead = "; --flash-impl fa2 or triton" if settings.flash_impl == "cudnn" else ""
        raise ArchplanError(f"{', '.join(cudnn)}: cuDNN is NVIDIA's library, and {device.name} runs "
                            f"none (drop {'them' if len(cudnn) > 1 else 'it'}{instead})")
    _refuse_cudnn_attention_before_hopper(settings, device)
    batch_tokens = _token_count(batch_text, "--global-batch-tokens")
    net = interconnect(device, intra_gbs=nvlink_gbs, inter_gbs=ib_gbs, gpus_per_node=gpus_per_node)
    if settings.overlap & {"tp", "pp", "ep"} and fixed.given:
        # the given layout's own refusal first: it is the cause where it applies
        data = model_data(plan, seq)
        check_partial(fixed.for_model(data.n_experts), gpus=gpus, gpus_per_node=net.tp_node(gpus),
                      n_layers=data.n_main, n_experts=data.n_experts, seq=seq)
    _refuse_overlap_the_gpus_rule_out(settings, fixed, gpus, net.tp_node(gpus))
    if plot is not None:
        from archplan.plot import figure_target

        figure_target(plot, force=force)  # a refused figure costs no search
    result = search(plan, device, gpus, seq=seq,
                    global_batch_tokens=batch_tokens, net=net, headroom=headroom, settings=settings,
                    fixed=fixed, keep_unfit=True, top=top)
    result = replace(result, batch_default=not batch_given)
    bound = _network_bound(result, plan)
    seq_note = plan.past_trained_note("seq", result.seq, "priced as asked")
    model_notes = _model_notes(result, plan)
    train_tokens, source = _training_tokens(spec, tokens, law, law_given)
    if plot is not None:
        _plot_layouts(result, plot, force)
    settle(0 if result.feasible else 1)
    if as_json:
        echo(jsonout.dumps(_layout_json(spec, result, train_tokens, source, bound, seq_note, model_notes),
                           indent=2))
    else:
        _print_layout(spec, result, train_tokens, source, bound, seq_note, model_notes)
    figure_written(plot, json_out=as_json)
    if not result.feasible:
        raise SystemExit(1)
