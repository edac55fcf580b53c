"""`archplan compare A B [more]`: the `size` figures side by side, with ratios against the first."""

from __future__ import annotations


import typer

from archplan import jsonout
from archplan.commands.options import JsonListOpt, SpecsArg, refuse_force_without_plot
from archplan.commands.size import (
    ActDTypeChoice,
    ActDTypeOpt,
    AutocastOpt,
    AttentionChoice,
    AttentionOpt,
    BatchOpt,
    ContextOpt,
    GpuOpt,
    KernelOpt,
    KVDTypeChoice,
    KVDtypeOpt,
    LawOpt,
    MemoryKernelChoice,
    MfuOpt,
    MicroBatchOpt,
    PlotForceOpt,
    PlotOpt,
    QuantizeChoice,
    QuantizeOpt,
    RecomputeChoice,
    RecomputeOpt,
    ResidualDTypeOpt,
    SeqOpt,
    TokensOpt,
    size_options,
)
from archplan.console import echo, figure_written
from archplan.errors import ArchplanError


def register(app: typer.Typer) -> None:
    @app.command(
        "compare",
        help=(
            "The `size` figures of two or more specs side by side, with ratios against the first "
            "column. Options apply to every spec (--context, --seq, --tokens: each spec's own "
            "default when omitted).\n\n"
            "Examples:\n\n"
            "  archplan compare llama-3-8b mixtral-8x7b\n\n"
            "  archplan compare 7b 70b deepseek-v3 --context 32768 --json"
        ),
    )
    def compare(
        specs: SpecsArg,
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
        as_json: JsonListOpt = False,
        plot: PlotOpt = None,
        force: PlotForceOpt = False,
    ) -> None:
        from archplan.loader import load_spec, spec_source
        from archplan.report import size_report

        if len(specs) < 2:
            raise ArchplanError("compare needs at least two specs (use `archplan size` for one)")
        refuse_force_without_plot(force, plot)
        opts = size_options(context, batch, kv_dtype, seq, micro_batch, recompute, tokens, gpu, mfu,
                            law, attention, attention_kernel, activation_dtype, residual_dtype, autocast,
                            quantize)
        reports = [size_report(load_spec(spec), opts, source=spec_source(spec)) for spec in specs]
        if plot is not None:
            from archplan.plot import plot_compare

            plot_compare(reports, plot, force=force)
        if as_json:
            echo(jsonout.dumps(reports, indent=2))
        else:
            from archplan.render import print_compare

            print_compare(reports)
        figure_written(plot, json_out=as_json)
