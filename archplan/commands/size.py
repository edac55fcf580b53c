"""`archplan size SPEC`: parameters, FLOPs, KV cache, memory and the Chinchilla budget of one spec."""

from __future__ import annotations

import re
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer

from archplan import jsonout
from archplan.commands.options import (
    JsonOpt,
    MemoryKernelChoice,
    SpecArg,
    complete_gpu,
    length_option,
    refuse_force_without_plot,
)
from archplan.console import echo, figure_written
from archplan.dtypes import DType
from archplan.errors import ArchplanError
from archplan.units import SI_EXPONENTS

if TYPE_CHECKING:
    from archplan.report import SizeOptions


# Closed choices, spelled as in archplan.analytic.memory.RECOMPUTE_MODES and scaling.LAWS (a test
# checks they agree); kept here so loading the CLI does not import the analytic package.
class RecomputeChoice(str, Enum):
    none = "none"
    selective = "selective"
    full = "full"


class ActDTypeChoice(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


class KVDTypeChoice(str, Enum):
    """The KV cache's storage dtypes: DType less tf32, which is a matmul mode and stores as fp32."""
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    int8 = "int8"
    int4 = "int4"


class QuantizeChoice(str, Enum):
    all = "all"
    linear = "linear"


class LawChoice(str, Enum):
    hoffmann2022 = "hoffmann2022"
    hoffmann2022_tex = "hoffmann2022-tex"
    besiroglu2024 = "besiroglu2024"
    chinchilla = "chinchilla"  # plan's name for hoffmann2022
    epoch = "epoch"  # plan's name for besiroglu2024


class AttentionChoice(str, Enum):
    full = "full"
    causal = "causal"


# SI by default (a 15T-token dataset is 15·10¹²); Ki, Mi, Gi, Ti binary, for batches quoted in
# powers of two (Llama 3's "16M tokens" a step is 2,048 × 8,192 = 16·2²⁰, i.e. 16Mi)
_SUFFIX = {"": 1.0, **{suffix: 10.0**exponent for suffix, exponent in SI_EXPONENTS.items()},
           "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_AMOUNT = re.compile(rf"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([{''.join(SI_EXPONENTS)}]|[kmgt]i)?\s*$",
                     re.IGNORECASE)


def parse_amount(text: str, option: str) -> float:
    """'15T', '1.4e12', '300B' -> a float (SI suffixes K M B/G T P); '16Mi' = 16·2²⁰ (Ki Mi Gi Ti)."""
    match = _AMOUNT.match(text)
    if match is None and _AMOUNT.match(text.strip().removeprefix("-")):
        raise ArchplanError(f"must be a positive number, got {text.strip()}", field=option)
    if match is None:
        raise ArchplanError(f"expected a number such as 1.4e12, 15T (SI) or 16Mi (binary), got {text!r}",
                            field=option)
    return float(match.group(1)) * _SUFFIX[(match.group(2) or "").lower()]


# size's and compare's options in three groups in --help, as the report's sections are
INFERENCE_PANEL = "KV cache and inference memory"
TRAINING_PANEL = "FLOPs and training memory"
BUDGET_PANEL = "Token budget and GPU-hours"

ContextOpt = Annotated[int | None, typer.Option(
    "--context", parser=length_option, metavar="LENGTH",
    help="KV-cache context length, e.g. 8192 or 128k (k = 1024 here, as lengths are quoted; default: the "
         "spec's max_seq_len).",
    rich_help_panel=INFERENCE_PANEL)]
BatchOpt = Annotated[int, typer.Option(
    "--batch", help="Sequences in the KV cache.", rich_help_panel=INFERENCE_PANEL)]
KVDtypeOpt = Annotated[KVDTypeChoice, typer.Option(
    "--kv-dtype", help="KV-cache storage dtype.", rich_help_panel=INFERENCE_PANEL)]
SeqOpt = Annotated[int | None, typer.Option(
    "--seq", parser=length_option, metavar="LENGTH",
    help="Training/prefill sequence length for FLOPs and activations, e.g. 4096 or 4k (k = 1024) "
         "(default: min(4096, max_seq_len)).",
    rich_help_panel=TRAINING_PANEL)]
MicroBatchOpt = Annotated[int, typer.Option(
    "--micro-batch", help="Sequences per micro-batch for activation memory.",
    rich_help_panel=TRAINING_PANEL)]
RecomputeOpt = Annotated[RecomputeChoice, typer.Option(
    "--recompute", help="Activation recomputation (Korthikanti et al. 2022).",
    rich_help_panel=TRAINING_PANEL)]
KernelOpt = Annotated[MemoryKernelChoice, typer.Option(
    "--attention-kernel", help="Training activations of the attention core: eager keeps the s×s "
                               "probabilities without recompute (Korthikanti's rows); flash (FlashAttention, "
                               "torch SDPA) keeps an fp32 log-sum-exp instead; torch-cpu is what torch's SDPA "
                               "runs on a CPU (flash, but its math kernel for MLA's unequal q and v head "
                               "sizes: fp32 q, k, v and probabilities), as bench --train measures there.",
    rich_help_panel=TRAINING_PANEL)]
ActDTypeOpt = Annotated[ActDTypeChoice, typer.Option(
    "--activation-dtype", help="Dtype of the saved training activations (fp32: a run without autocast).",
    rich_help_panel=TRAINING_PANEL)]
ResidualDTypeOpt = Annotated[ActDTypeChoice | None, typer.Option(
    "--residual-dtype", help="Dtype of the residual stream, which the norms' inputs and full recompute's "
                             "layer inputs keep: fp32 under torch autocast with fp32 weights (what bench "
                             "--train runs) or Megatron-LM's --fp32-residual-connection (default: the "
                             "activation dtype).",
    show_default=False, rich_help_panel=TRAINING_PANEL)]
AutocastOpt = Annotated[bool, typer.Option(
    "--autocast", help="torch.autocast over fp32 weights (bench --train in bf16; Hugging Face's Trainer "
                       "with bf16): the residual stream in fp32 and each projection's own 16-bit cast of its "
                       "input. The default is Megatron's and FSDP2's mixed precision, which casts the weights "
                       "and hands every projection one 16-bit tensor.", metavar="",
    rich_help_panel=TRAINING_PANEL)]
QuantizeOpt = Annotated[QuantizeChoice, typer.Option(
    "--quantize", help="Which weights the fp8, int8 and int4 inference rows store at that width: all (every "
                       "parameter) or linear (the layers' matmul weights, Mamba's projections among them; the "
                       "embedding, LM head, MoE routers, norms, biases and convolutions in bf16, as vLLM's fp8 "
                       "and int8 methods and GPTQ/AWQ leave a transformer's). "
                       "int4-g128 is linear either way.",
    rich_help_panel=INFERENCE_PANEL)]
TokensOpt = Annotated[str | None, typer.Option(
    "--tokens", help="Training tokens, e.g. 15T or 1.4e12 (SI: 1M = 10^6; default: the spec's training.tokens, else 20 per "
    "parameter).",
    rich_help_panel=BUDGET_PANEL)]
GpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="Accelerator for GPU-hours: h100, a100, h200, b200, gb200, mi300x, ...",
    autocompletion=complete_gpu,
    rich_help_panel=BUDGET_PANEL)]
MfuOpt = Annotated[float | None, typer.Option(
    "--mfu", help="Model-FLOPs utilisation for the GPU-hours of --gpu [0.4], over the model FLOPs of "
                  "--attention (full by default; bench and plan measure MFU over causal attention, so "
                  "give --attention causal with an MFU they printed).", show_default=False,
    rich_help_panel=BUDGET_PANEL)]
LawOpt = Annotated[list[LawChoice] | None, typer.Option(
    "--law", help="Approach-3 fit(s) to show, repeatable (default: hoffmann2022 and besiroglu2024; plan's "
    "names chinchilla and epoch are the same two).",
    rich_help_panel=BUDGET_PANEL)]
AttentionOpt = Annotated[AttentionChoice, typer.Option(
    "--attention", help="Attention-core FLOPs in the headline figures: full T² square or causal pairs only.",
    rich_help_panel=TRAINING_PANEL)]
PlotOpt = Annotated[str | None, typer.Option(
    "--plot", help="Write a figure (PNG/SVG/PDF by suffix); needs matplotlib.")]
PlotForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing --plot file.", metavar="")]


def size_options(context: int | None, batch: int, kv_dtype: KVDTypeChoice, seq: int | None, micro_batch: int,
                 recompute: RecomputeChoice, tokens: str | None, gpu: str | None, mfu: float | None,
                 laws: list[LawChoice] | None, attention: AttentionChoice,
                 attention_kernel: MemoryKernelChoice = MemoryKernelChoice.eager,
                 activation_dtype: ActDTypeChoice = ActDTypeChoice.bf16,
                 residual_dtype: ActDTypeChoice | None = None, autocast: bool = False,
                 quantize: QuantizeChoice = QuantizeChoice.all) -> SizeOptions:
    """The typed options, shared by `size` and `compare`."""
    from archplan.analytic.scaling import DEFAULT_LAWS, LAW_SYNONYMS
    from archplan.errors import ArchplanError
    from archplan.report import SizeOptions

    if mfu is not None and gpu is None:
        raise ArchplanError("--mfu is the utilisation of --gpu's GPU-hours; give --gpu too")

    return SizeOptions(
        context=context, batch=batch, kv_dtype=DType(kv_dtype.value), seq=seq, micro_batch=micro_batch,
        recompute=recompute.value, attention_kernel=attention_kernel.value,
        activation_dtype=DType(activation_dtype.value),
        residual_dtype=DType(residual_dtype.value) if residual_dtype is not None else None, autocast=autocast,
        tokens=parse_amount(tokens, "--tokens") if tokens is not None else None,
        gpu=gpu, **({"mfu": mfu} if mfu is not None else {}),
        laws=tuple(dict.fromkeys(LAW_SYNONYMS.get(x.value, x.value) for x in laws)) if laws else DEFAULT_LAWS,
        attention=attention.value, quantize=quantize.value,
    )


def register(app: typer.Typer) -> None:
    @app.command(
        "size",
        help=(
            "Parameters, FLOPs per token, KV cache, inference and training memory, and the "
            "Chinchilla budget of one spec (analytic, no torch).\n\n"
            "Examples:\n\n"
            "  archplan size 70b\n\n"
            "  archplan size llama-3-8b --context 8192 --batch 4 --kv-dtype fp8 --quantize linear\n\n"
            "  archplan size mixtral-8x7b --seq 4096 --micro-batch 2 --recompute selective "
            "--tokens 2T --gpu h100 --mfu 0.4 --json\n\n"
            "  archplan size gpt2 --seq 1024 --micro-batch 8 --attention-kernel flash\n\n"
            "  archplan size llama-3-8b --seq 4096 --attention-kernel flash --autocast\n\n"
            "  archplan import hf config.json | archplan size -"
        ),
    )
    def size(
        spec: SpecArg,
        context: ContextOpt = None,
        batch: BatchOpt = 1,
        kv_dtype: KVDtypeOpt = KVDTypeChoice.bf16,
        seq: SeqOpt = None,
        micro_batch: MicroBatchOpt = 1,
        recompute: RecomputeOpt = RecomputeChoice.none,
        attention_kernel: KernelOpt = MemoryKernelChoice.eager,
        activation_dtype: ActDTypeOpt = ActDTypeChoice.bf16,
        residual_dtype: ResidualDTypeOpt = None,
        autocast: AutocastOpt = False,
        quantize: QuantizeOpt = QuantizeChoice.all,
        tokens: TokensOpt = None,
        gpu: GpuOpt = None,
        mfu: MfuOpt = None,
        law: LawOpt = None,
        attention: AttentionOpt = AttentionChoice.full,
        as_json: JsonOpt = False,
        plot: PlotOpt = None,
        force: PlotForceOpt = False,
    ) -> None:
        from archplan.loader import load_spec, spec_source
        from archplan.report import size_report

        refuse_force_without_plot(force, plot)
        opts = size_options(context, batch, kv_dtype, seq, micro_batch, recompute, tokens, gpu, mfu,
                            law, attention, attention_kernel, activation_dtype, residual_dtype, autocast,
                            quantize)
        loaded = load_spec(spec)
        report = size_report(loaded, opts, source=spec_source(spec))
        if plot is not None:
            from archplan.plot import plot_size
            from archplan.resolve import resolve

            plot_size(resolve(loaded), report, opts, plot, force=force)
        if as_json:
            echo(jsonout.dumps(report, indent=2))
        else:
            from archplan.render import print_size

            print_size(report)
        figure_written(plot, json_out=as_json)
