"""Thin Typer shell: each command lives in `archplan/commands/<name>.py` and registers itself.

`main()` maps ArchplanError / ValidationError to one line on stderr and exit code 2
(`ARCHPLAN_DEBUG=1` shows the traceback above it, and the exit code stays). torch is imported
lazily, inside verify/bench only.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback

import typer

from archplan.console import (
    ReaderGone,
    keep_option_names_whole,
    quiet_on_closed_pipe,
    replace_unencodable,
    reset_verdict,
    settled,
)
from archplan.errors import ArchplanError, first_line

COMMAND_MODULES = (
    "size", "compare", "presets", "schema", "verify", "bench", "lint", "plan", "import_hf",
)

app = typer.Typer(
    name="archplan",
    help=(
        "Plan and size LLM architectures: parameters, FLOPs, KV cache, memory and token budgets, "
        "computed analytically and checked against real PyTorch models.\n\n"
        "Examples:\n\n"
        "  archplan size 70b\n\n"
        "  archplan compare llama-3-8b mixtral-8x7b\n\n"
        "  archplan verify deepseek-v3\n\n"
        "  archplan plan llama-3.1-405b --gpus 16384 --gpu h100 --seq 8192 --global-batch-tokens 16Mi\n\n"
        "  archplan bench 7b --device cuda\n\n"
        "  archplan lint llama-3-8b mixtral-8x7b  # or a folder of specs, in CI"
    ),
    no_args_is_help=True,
    # choices read in any case (`--kv-dtype BF16`, `--device CUDA`), as `--gpu H100` is; click
    # applies this to option and command names and choice values, never to paths or free text
    context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": str.lower},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)



def _version(value: bool) -> None:
    if value:
        from archplan import __version__

        typer.echo(f"archplan {__version__}", file=sys.stdout)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                 help="Print the version and exit."),
) -> None:
    """Plan and size LLM architectures."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"archplan.commands.{_name}").register(app)


# what makes a real tensor smaller, by the command that built it (its own options)
SMALLER = {"verify": "a smaller --seq or --batch", "bench": "a smaller --seq or --batch, or --layers K"}
# under --layout the sizes are the layout's micro-batch and --seq: --batch and --layers are refused there
SMALLER_LAYOUT = "a smaller --seq, a smaller mb in --layout, or smaller degrees"


def _given_layout(argv: list[str]) -> bool:
    return any(arg == "--layout" or arg.startswith("--layout=") for arg in argv)


def _smaller(argv: list[str]) -> str:
    """What to give instead when the sizes asked for do not fit, for the command `argv` runs."""
    if _given_layout(argv):
        return SMALLER_LAYOUT
    return SMALLER.get(_command_path(argv).removeprefix("archplan "), "smaller sizes")


def _size_failure_code(argv: list[str]) -> int:
    """2 (the sizes asked for), but 3 in a torchrun worker of `bench --layout`: the launching
    command's host-memory check accepted the sizes, so a worker's allocation failing is the
    workers' failure, which the launcher reports as such (exit 3), not a refusal of its input."""
    if "torch" not in sys.modules or _command_path(argv) != "archplan bench" or not _given_layout(argv):
        return 2
    from archplan.distributed.workers import under_launcher

    return 3 if under_launcher() else 2


def _is_program() -> bool:
    """True when this process runs the CLI as its program (the console script, `python -m
    archplan.cli`, `python -c "...; main()"`), not when a caller such as a test imports `main`."""
    return getattr(sys.modules.get("__main__"), "main", None) is main


def main() -> None:
    if sys.stdout is None:
        # started without a standard output (`archplan size x >&-`): Python sets sys.stdout to None,
        # rich and click drop every write, and the report was lost with exit 0. Refused before any
        # work, so that no file is written whose "written to" line is lost with the report
        if sys.stderr is not None:
            print("archplan: error: standard output is closed: the report has nowhere to go", file=sys.stderr)
        sys.exit(1)
    quiet_on_closed_pipe()
    replace_unencodable()
    keep_option_names_whole()
    try:
        _main()
    finally:
        if _is_program():
            # The process ends here. Freezing the heap spares the interpreter's final garbage
            # collections a walk over every object torch (with torch._dynamo and sympy, pulled in
            # by meta kernels) created: ~0.7 s of `archplan verify`. Output is flushed and atexit
            # handlers run as usual; memory goes back to the OS with the process.
            gc.freeze()


def _main() -> None:
    debug = os.environ.get("ARCHPLAN_DEBUG") == "1"
    reset_verdict()
    try:
        # Without standalone mode, click returns typer.Exit's code instead of raising it.
        # prog_name: under `python -m archplan` click would name the program "python -m archplan",
        # and --install-completion would register a broken completion for `python`
        code = app(prog_name="archplan", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except ArchplanError as exc:
        if debug:
            # the traceback too, and still the error's own exit code
            traceback.print_exc()
        typer.echo(f"archplan: error: {exc.render()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        # Ctrl-C before click runs the command (typer still building it), where click's own
        # conversion to Abort does not reach: the same exit, no traceback
        typer.echo("Aborted.", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        # Usage errors (unknown option, missing argument, bad value): one line, as every other
        # bad input, with typer's message and exit code 2. No arguments at all print the help
        # (click's NoArgsIsHelpError, with no message): `archplan` or `archplan import` alone asks
        # for that overview, as `--help` does, and exits 0 as it does (typer, too, recognises the
        # error by its class name)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(0)
        if debug:  # the option parser's traceback, as ArchplanError's above
            traceback.print_exc()
        message = _usage_message(exc, sys.argv[1:])
        if message is not None:
            typer.echo(f"archplan: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except RuntimeError as exc:
        # torch refusing a tensor the sizes asked for (more bytes than an index holds, or than the
        # device can allocate: verify and bench build real tensors of the user's --seq and --batch)
        if debug or not _is_tensor_size_error(exc):
            raise
        fix = _smaller(sys.argv[1:])
        if TENSOR_SIZE_ERRORS[0] in str(exc):
            # past what an index holds: a spec's own weights can be (every field within its bounds,
            # their product not), where no --seq or --batch helps
            fix += ", or a spec whose dimensions multiply to less (a weight can be past it too)"
        typer.echo(f"archplan: error: the sizes asked for need a tensor the device cannot hold ({first_line(exc)}); "
                   f"give {fix}", file=sys.stderr)
        sys.exit(_size_failure_code(sys.argv[1:]))
    except MemoryError:
        # Python's own allocation failing (a process limit, or a structure the sizes asked for
        # grow past the host): one line as torch's refusal above
        if debug:
            raise
        typer.echo(f"archplan: error: the sizes asked for need more memory than this process can have; "
                   f"give {_smaller(sys.argv[1:])}", file=sys.stderr)
        sys.exit(_size_failure_code(sys.argv[1:]))
    except ReaderGone:
        # the reader stopped early (`| head`): what it took was all it wanted, and the command
        # ends with the verdict it settled on before rendering (`archplan.console`). Python would
        # meet the closed pipe again when it flushes stdout at exit; stdout points at /dev/null
        # first (Python's `signal` docs, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(settled())
    except OSError as exc:
        if exc.filename is not None:
            # a path the user gave that the system refuses before it is read (a name too long
            # for it): bad input, named as the loader names the files it cannot read
            typer.echo(f"archplan: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(2)
        # writing the report failed (a full disk, a closed terminal): nothing left to show but why
        typer.echo(f"archplan: error: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)


# the messages of torch's errors for a tensor too large to index or to allocate (c10's
# `computeStorageNbytes`, its CPU allocator and the CUDA caching allocator)
TENSOR_SIZE_ERRORS = ("Storage size calculation overflowed", "can't allocate memory", "out of memory")


def _is_tensor_size_error(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in TENSOR_SIZE_ERRORS)


def _usage_message(exc: Exception, argv: list[str]) -> str | None:
    """A usage error's message, the command it concerns and where its help is; an unknown option's
    suggestions without the hidden ones (retired options that only answer with a pointer). None
    for an error with no message (a group given no command, whose help is already printed)."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command if ctx is not None else None
    suggested = getattr(exc, "possibilities", None)
    if suggested is None:
        format_message = getattr(exc, "format_message", None)
        message = format_message() if format_message is not None else str(exc)
        if not message:
            return None
    else:
        message = getattr(exc, "message", str(exc))
        if command is not None:
            hidden = {opt for p in command.params if getattr(p, "hidden", False) for opt in p.opts}
            suggested = [name for name in suggested if name not in hidden]
        if suggested:
            message = f"{message.rstrip('.')} (did you mean {' or '.join(suggested)}?)"
    # typer words a bad choice as pydantic does ("Value error, 'foo' is not one of ..."): the
    # prefix names no value the user gave
    message = message.replace(": Value error, ", ": ")
    return f"{message.rstrip('.')}; see '{_command_path(argv)} --help'"


def _command_path(argv: list[str]) -> str:
    """The (sub)command `argv` names: 'archplan import hf' (for `Import HF` too, which click
    takes in any case). Read from the arguments, not the error's context, which click leaves out
    of some parse errors (an option missing its value)."""
    commands = getattr(typer.main.get_command(app), "commands", {})
    path = ["archplan"]
    for token in argv:
        if token.startswith("-"):
            continue
        name = token.lower()
        if name not in commands:
            break
        path.append(name)
        commands = getattr(commands[name], "commands", {})
    return " ".join(path)


if __name__ == "__main__":
    main()
