"""`archplan lint PATH...`: rule-coded checks of spec files, for CI and pre-commit.

Exit 0 clean (or only warnings/info without --strict), 1 findings, 2 unusable input or usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from archplan.commands.options import JsonOpt, complete_spec
from archplan.console import echo, settle
from archplan.errors import ArchplanError
from archplan.lint.engine import LintConfig, lint_paths, load_config, parse_codes
from archplan.lint.formats import Format, render
from archplan.loader import STDIN_LABEL

PathsArg = Annotated[
    list[str],
    typer.Argument(help="Spec files, folders (searched recursively for *.yaml/*.yml, through symlinked folders) or "
                                      "globs (their matches, too, kept to *.yaml/*.yml); - reads a spec from standard "
                                      "input.",
                   show_default=False, metavar="PATH", autocompletion=complete_spec),
]
CodesOpt = Annotated[
    list[str],
    typer.Option(help="Rule codes or prefixes, comma-separated or repeated (AP003,AP01).",
                 show_default=False),
]


def register(app: typer.Typer) -> None:
    # help= as one string per paragraph: in rich markup mode a docstring's line breaks are printed
    @app.command(help=(
        "Check spec files for shape, efficiency and training-budget mistakes.\n\n"
        "Rules, rationale and sources: docs/rules.md. Defaults for --select/--ignore/--strict come "
        "from \\[tool.archplan.lint] in the nearest pyproject.toml; --select replaces its select, "
        "--ignore adds to its ignore.\n\n"
        "Examples:\n\n"
        "  archplan lint configs/\n\n"
        "  archplan lint 'configs/**/*.yaml' --format github --strict\n\n"
        "  archplan lint configs/ llama-3-8b --ignore AP007,AP008 --format sarif > lint.sarif"
    ))
    def lint(
        paths: PathsArg,
        fmt: Annotated[Format | None, typer.Option(
            "--format", help="text (the default), json, github (workflow annotations) or sarif (2.1.0).",
            show_default=False,
        )] = None,
        select: CodesOpt = [],
        ignore: CodesOpt = [],
        strict: Annotated[bool | None, typer.Option(
            "--strict/--no-strict", help="Warnings fail too (exit 1); --no-strict overrides "
                                         "pyproject.toml's strict = true. \\[default: pyproject.toml's, "
                                         "else no-strict]", show_default=False, metavar=""
        )] = None,
        as_json: JsonOpt = False,
    ) -> None:
        if as_json and fmt not in (None, Format.json):
            raise ArchplanError(f"--json and --format {fmt.value} contradict each other")
        config = load_config(Path.cwd())
        selected = parse_codes(select) or config.select
        config = LintConfig(selected, config.ignore + parse_codes(ignore), config.strict if strict is None else strict,
                            config.source)
        result = lint_paths(paths, config)
        code = settle(result.exit_code(config.strict))
        echo(render(result, Format.json if as_json else fmt or Format.text), nl=False)
        if fmt is Format.sarif and any(f.file == STDIN_LABEL for f in result.findings):
            # SARIF lets a result have no location, which standard input's are; GitHub code
            # scanning refuses a whole upload that holds one (github/codeql-action#1738)
            typer.echo("lint: standard input's findings have no file to point at, so GitHub code scanning "
                       "refuses this SARIF log; lint the files themselves for an upload", err=True)
        # SystemExit, not typer.Exit: cli.main runs the app with standalone_mode=False, where click
        # returns an Exit's code instead of exiting with it.
        raise SystemExit(code)
