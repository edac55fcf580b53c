"""The CLI shell: usage errors and a missing torch extra are one line and exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archplan.cli import main
from archplan.errors import ArchplanError


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (("size", "--no-such-option", "gpt2"), "No such option"),
    (("size",), "Missing argument"),
    (("plan", "--compute"), "requires an argument"),
    (("no-such-command",), "No such command"),
])
def test_usage_errors_exit_2_without_traceback(args: tuple[str, ...], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args, line", [
    (("plan", "--foo"), "archplan: error: No such option: --foo (did you mean --force or --top or --tol?); "
                        "see 'archplan plan --help'"),
    (("plan", "llama-3-8b", "--gpus", "abc"), "archplan: error: Invalid value for '--gpus': "),
    (("no-such-command",), "archplan: error: No such command 'no-such-command'; see 'archplan --help'"),
    (("import", "hf"), "archplan: error: Missing argument 'CONFIG'; see 'archplan import hf --help'"),
    (("size", "gpt2", "--context"), "archplan: error: Option '--context' requires an argument; "
                                    "see 'archplan size --help'"),
])
def test_usage_errors_are_one_line(args: tuple[str, ...], line: str) -> None:
    """As every other bad input; the retired, hidden --mfu is never suggested."""
    proc = run(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith(line)
    assert "--mfu" not in proc.stderr


@pytest.mark.parametrize("args", [(), ("import",)])
def test_no_command_prints_the_help_and_no_empty_error(args: tuple[str, ...]) -> None:
    """A group alone asks for its overview, as --help does: the help, exit 0 (click's default
    since 8.2 is 2, which a first `archplan` in a shell script would read as a failure)."""
    proc = run(*args)
    assert proc.returncode == 0 and "Usage:" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("command", [("size",), ("lint",), ("compare", "gpt2")])
def test_a_file_name_too_long_is_bad_input_named(command: tuple[str, ...]) -> None:
    name = "a" * 300 + ".yaml"
    proc = run(*command, name)
    assert proc.returncode == 2 and proc.stderr == f"archplan: error: {name}: File name too long\n"


def test_a_failed_write_is_one_line() -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "size", "gpt2",
                               "--json"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "archplan: error: No space left on device\n"


def test_python_running_out_of_memory_is_one_line() -> None:
    """A MemoryError (a process limit, or a structure past the host) printed Python's traceback."""
    code = ("import archplan.loader as loader\n"
            "def out_of_memory(*args, **kwargs):\n    raise MemoryError\n"
            "loader.load_spec = out_of_memory\n"  # before the commands import it
            "from archplan.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code, "verify", "gpt2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "archplan: error: the sizes asked for need more memory than this process can have; give a smaller --seq")
    assert "Traceback" not in proc.stderr

def test_a_torchrun_worker_out_of_memory_is_the_workers_failure() -> None:
    """A `bench --layout` worker whose allocation failed exited 2, which the launcher reads as a
    refusal of the input (exit 2) its host-memory check had accepted, and named --batch and
    --layers, which --layout refuses: exit 3 under torchrun, and the layout's sizes named."""
    code = ("import archplan.loader as loader\n"
            "def out_of_memory(*args, **kwargs):\n    raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')\n"
            "loader.load_spec = out_of_memory\n"
            "import torch\nfrom archplan.cli import main\nmain()\n")
    argv = ["bench", "gpt2", "--layout", "tp=1,cp=1,pp=1,dp=2,zero=3,recompute=none,mb=1"]
    for env, exit_code in (({"RANK": "1", "WORLD_SIZE": "2"}, 3), ({}, 2)):
        clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                              env={**clean, **env})
        assert proc.returncode == exit_code, proc.stderr
        assert proc.stderr.strip().endswith("give a smaller --seq, a smaller mb in --layout, or smaller degrees"), \
            proc.stderr
    # another command under RANK and WORLD_SIZE (a user's own launcher) is no bench worker
    proc = subprocess.run([sys.executable, "-c", code, "verify", "gpt2"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().endswith("give a smaller --seq or --batch"), proc.stderr


@pytest.mark.parametrize("command", [("plan", "llama-3-70b", "--gpus", "1024"), ("plan", "llama-3-70b", "--gpus", "1024", "--json"),
                                     ("size", "gpt2"), ("compare", "gpt2", "llama-2-7b"), ("--help",), ("plan", "--help")])
def test_a_reader_that_stops_early_is_not_a_failure(command: tuple[str, ...]) -> None:
    """`archplan ... | head` in a `pipefail` CI job: the closed pipe ends a command that succeeded
    quietly with 0 (rich's and click's own handlers exit 1, which here means a check disagrees or
    no layout fits), typer's help included."""
    proc = subprocess.Popen([sys.executable, "-c", "from archplan.cli import main; main()", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes a byte
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


NO_LAYOUT_FITS = ("plan", "llama-3.1-405b", "--gpus", "8", "--gpu", "h100")


@pytest.mark.parametrize("command", [NO_LAYOUT_FITS, (*NO_LAYOUT_FITS, "--json"),
                                     (*NO_LAYOUT_FITS, "--layout", "tp=8,cp=1,pp=1,dp=1,zero=1,recompute=none,mb=1"),
                                     ("lint", "LINT_FIXTURE")])
def test_a_reader_that_stops_early_keeps_the_verdict(command: tuple[str, ...]) -> None:
    """No layout fits, or lint's gate fails: exit 1 whether the reader takes every line, none, or
    (`--json`) the whole report in one write; `plan ... | head` under `pipefail` read 0 where
    `plan --json | head` read 1 (the verdict is settled before the report renders)."""
    command = tuple(str(Path(__file__).parent / "lint_fixtures" / "AP003_fail.yaml") if part == "LINT_FIXTURE"
                    else part for part in command)
    full = run(*command)
    assert full.returncode == 1, full.stderr
    proc = subprocess.Popen([sys.executable, "-c", "from archplan.cli import main; main()", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(timeout=120) == 1
    assert b"Traceback" not in proc.stderr.read()
    proc.stderr.close()


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
@pytest.mark.parametrize("command", [("size", "7b"), ("compare", "7b", "gpt2"), ("plan", "llama-3-70b", "--gpus", "64"),
                                     ("plan", "--compute", "1e24"), ("plan", "--help")])
def test_an_output_encoding_without_our_glyphs_is_not_a_crash(command: tuple[str, ...], encoding: str) -> None:
    """An ASCII locale, or cp1252 where Windows redirects to a file: the report whole and exit 0
    (Python's default raises UnicodeEncodeError, a traceback with exit 1, which `plan` uses for "no
    layout fits"), the memory bars, `Δ`, `⌈`, `±` spelled in ASCII (they were all `?`: a bar of
    `?????` meant nothing, `±5.1%` read `?5.1%`)."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", *command],
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": encoding})
    assert proc.returncode == 0, proc.stderr.decode(encoding, "replace")
    assert proc.stderr == b""
    out = proc.stdout.decode(encoding)
    assert len(out.splitlines()) > 5
    # cp1252 has ×, ± and · of its own; neither has the bars
    plus_minus = "+/-" if encoding == "ascii" else "±"
    spelled = {"size": "##", "compare": "x)" if encoding == "ascii" else "×)",
               "plan": plus_minus if "--gpus" in command else ""}[command[0]]
    assert spelled in out
    assert "??" not in out, [line for line in out.splitlines() if "??" in line]


def test_an_ascii_locale_spells_the_one_line_errors_too() -> None:
    """click wraps an ASCII stream it finds itself in UTF-8: errors and `typer.echo` lines came out
    as raw UTF-8 bytes (`tp\xc2\xb7pp`) past the ASCII spelling the reports got."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "plan", "llama-3-8b",
                           "--gpus", "48", "--layout", "tp=2,pp=1,dp=8"], capture_output=True, timeout=120,
                          env={**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""})
    assert proc.returncode == 2 and proc.stderr.isascii() and b"tp*pp*dp" in proc.stderr, proc.stderr


def test_completion_is_for_archplan_under_python_m() -> None:
    """Under `python -m archplan` click named the program "python -m archplan": the completion
    script registered a function for `python` that called a program "_PYTHON _M ARCHPLAN"."""
    proc = subprocess.run([sys.executable, "-m", "archplan", "--show-completion", "bash"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "SHELL": "/bin/bash"})
    assert proc.returncode == 0 and "complete -o default -F _archplan_completion archplan" in proc.stdout
    assert "_ARCHPLAN_COMPLETE" in proc.stdout and "python" not in proc.stdout


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("archplan ")
    # `python -m archplan` is the command too (it failed: the package had no __main__)
    module = subprocess.run([sys.executable, "-m", "archplan", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert module.returncode == 0 and module.stdout == proc.stdout


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_missing_torch_is_one_line(command: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["archplan", command, "gpt2"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"`archplan {command}` needs PyTorch" in err and "Traceback" not in err
    # by the distribution's name: `-e '.[torch]'` installed whatever project the user stood in
    assert "pip install 'archplan[torch]'" in err and "-e" not in err


@pytest.mark.parametrize("error", ["ImportError('numpy.core.multiarray failed to import')",
                                   "OSError('libcudnn.so.9: cannot open shared object file')",
                                   "RuntimeError('CUDA driver version is insufficient')"])
def test_a_torch_that_fails_to_import_is_one_line(error: str, tmp_path: Path) -> None:
    """A torch installed at a supported version but broken (a CUDA wheel missing a library): one
    line naming torch, exit 2; an OSError is not read as a report that could not be written."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(f"raise {error}\n")
    (tmp_path / "torch-2.13.0.dist-info").mkdir()
    (tmp_path / "torch-2.13.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    for command in ("verify", "bench"):
        proc = subprocess.run([sys.executable, "-m", "archplan", command, "gpt2"], capture_output=True, text=True,
                              env=env, timeout=120)
        message = error.split("'")[1]
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert (f"`archplan {command}`: PyTorch 2.13.0 is installed but fails to import ({message})"
                in proc.stderr)


def test_bench_layout_without_numpy_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """torch installed alone (no `[torch]` extra): its object collectives need NumPy, which torch does
    not declare; the workers failed with exit 3 and "Numpy is not available"."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numpy" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["archplan", "bench", "gpt2", "--nproc", "2",
                                      "--layout", "tp=2,cp=1,pp=1,dp=1,zero=3,recompute=none,mb=1"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "`archplan bench --layout` needs NumPy" in err and "pip install 'archplan[torch]'" in err


def _commands(command, name: str = "archplan"):  # type: ignore[no-untyped-def]
    yield name, command
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, f"{name} {sub_name}")


def test_help_paragraphs_have_no_hard_line_breaks() -> None:
    # rich markup mode prints a help text's line breaks as they are: a docstring wrapped at 100
    # columns came out as "... come\nfrom ..." at any terminal width
    import typer

    from archplan.cli import app

    for name, command in _commands(typer.main.get_command(app)):
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph.strip(), (name, paragraph)



def test_no_help_text_loses_brackets_to_rich_markup() -> None:
    """rich markup mode reads `[word ...]` as a style tag and drops it: lint's --strict printed
    no "[default: pyproject.toml's, else no-strict]". A bracket that starts like a tag is escaped."""
    import re

    import typer

    from archplan.cli import app

    tag = re.compile(r"(?<!\\)\[[a-z#/@][^\[]*?\]")
    for name, command in _commands(typer.main.get_command(app)):
        for text in [command.help or ""] + [getattr(param, "help", None) or "" for param in command.params]:
            assert not tag.search(text), (name, tag.search(text))


@pytest.mark.parametrize("command", [[], ["import", "hf"], ["size"], ["compare"], ["plan"], ["bench"], ["verify"],
                                     ["lint"], ["schema"], ["presets"]])
def test_no_flag_shows_a_value_in_help(command: list[str]) -> None:
    """`--json <bool>` read as if the flag took a value (`--json true` is an error): no flag shows
    one, --help itself included (typer typed it `<bool>`)."""
    proc = run(*command, "--help")
    flagged = [line for line in proc.stdout.splitlines() if "<bool>" in line]
    assert proc.returncode == 0 and "--help" in proc.stdout and not flagged, flagged


@pytest.mark.parametrize("columns", ["60", "80", "120"])
@pytest.mark.parametrize("command", ["size", "compare", "plan", "bench", "verify", "lint", "schema", "presets"])
def test_help_cuts_nothing(command: str, columns: str) -> None:
    """rich cuts a word longer than its column with "…": at 80 columns typer's option table cut
    plan's longest names (`--optimizer-mome…`, `--no-recompute-…`), and at 120 the --layout
    examples of plan, verify and bench (`tp=8,cp=1,pp=16,...`, one word) in the option's own help
    (`archplan.console.keep_option_names_whole`)."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", command, "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": columns})
    assert proc.returncode == 0 and "…" not in proc.stdout, [line for line in proc.stdout.splitlines() if "…" in line]
    import typer

    from archplan.cli import app

    words = set(proc.stdout.replace("│", " ").split())
    shown = [param for param in typer.main.get_command(app).commands[command].params
             if not getattr(param, "hidden", False)]
    names = [name for param in shown for name in (*param.opts, *param.secondary_opts) if name.startswith("-")]
    assert names and all(name in words for name in names), sorted(set(names) - words)


@pytest.mark.parametrize("args", [("presets",), ("size", "gpt2", "--json"), ("--help",)])
def test_a_closed_stdout_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    """`archplan size x >&-`: Python sets sys.stdout to None, rich and click dropped every write,
    and the report was lost with exit 0. It is now what a full disk is: one line, exit 1."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", *args],
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 1 and proc.stderr == "archplan: error: standard output is closed: the report has nowhere to go\n"


def test_help_keeps_its_text_a_column_to_read_at_80() -> None:
    """At 80 columns the names (`--attention-kernel,--attention` on one line) and a choice list
    left plan's help text 12 characters (`FlashAttenti` / `on + fused`): 771 lines. The names now
    go one a line, a choice list folds past a quarter of the width, and the help keeps 26."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "plan", "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    rows = [line.split("│")[1] for line in proc.stdout.splitlines() if line.startswith("│ --attention-kernel")]
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) < 450 and rows
    assert "--attention " not in rows[0] and "flash: FlashAttention +" in rows[0]


@pytest.mark.parametrize(("args", "said"), [
    (("plan",), "give a budget (--compute, --params or --tokens), a spec to lay out (SPEC --gpus N)"),
    (("plan", "llama-3-8b"), "needs --gpus N (--gpu defaults to h100)"),
    (("size", "gpt2", "--kv-dtype", "fp4"), "Invalid value for '--kv-dtype': 'fp4' is not one of"),
    # tf32 is a matmul mode, not a storage dtype: a cache "in tf32" is an fp32 cache
    (("size", "gpt2", "--kv-dtype", "tf32"), "'tf32' is not one of 'fp32', 'bf16', 'fp16', 'fp8', 'int8', 'int4'"),
])
def test_guidance_names_every_mode_and_no_pydantic_prefix(args: tuple[str, ...], said: str) -> None:
    """A bare `plan` named only the budget's options; a bad choice read "Value error, 'fp4' ..."."""
    proc = run(*args)
    assert proc.returncode == 2 and said in proc.stderr and "Value error" not in proc.stderr, proc.stderr


def _help_examples() -> list[list[str]]:
    """Every `archplan ...` line of every command's help, as argv, its `# comment` cut off."""
    import shlex

    import typer

    from archplan.cli import app

    examples = []
    for _, command in _commands(typer.main.get_command(app)):
        for line in (command.help or "").splitlines():
            text = line.strip().split("  # ", 1)[0]
            if text.startswith("archplan "):
                examples.append(shlex.split(text)[1:])
    return examples


# commands an example may run in a test: no torch, no file of the user's (`configs/`, a config.json)
_RUNNABLE = {"size", "compare", "presets", "plan"}


def test_every_help_example_without_torch_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An example a user pastes from `--help` works: the 405B one ran at the SI 16M a step, short
    of the 16Mi its own help names Llama 3's batch, and two plan examples ended in a note in
    brackets, which bash reads as a syntax error (now a `# comment`)."""
    from tests.test_bad_input import run_main

    examples = _help_examples()
    assert len(examples) >= 25 and all(not any(word.startswith("(") for word in argv) for argv in examples)
    runnable = [argv for argv in examples if argv[0] in _RUNNABLE and not {">", "|", "&&"} & set(argv)]
    assert len(runnable) >= 15
    monkeypatch.chdir(tmp_path)
    for argv in runnable:
        outcome = run_main(argv, capsys, monkeypatch)
        assert outcome.code == 0 and "Traceback" not in outcome.stderr, (argv, outcome.stderr[-400:])
        assert "the pipeline never fills" not in outcome.stdout, argv


@pytest.mark.parametrize("argv", [["size", "gpt2"], ["plan", "gpt2", "--gpus", "8"], ["presets"],
                                  ["compare", "gpt2", "bloom-560m"]])
def test_a_zero_or_tiny_columns_still_prints_the_report(argv: list[str]) -> None:
    """`COLUMNS=0` had rich print nothing at all (exit 0) and `COLUMNS=1` a column of single
    characters: a width below `render.MIN_WIDTH` is taken as that width."""
    from typer.testing import CliRunner

    from archplan.cli import app
    from archplan.render import MIN_WIDTH

    for columns in ("0", "1"):
        result = CliRunner().invoke(app, argv, env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) > 5 and max(len(line) for line in lines) <= MIN_WIDTH
        assert "gpt2" in result.stdout


@pytest.mark.parametrize("argv", [["size", "deepseek-v3"], ["plan", "deepseek-v3", "--gpus", "256"], ["presets"]])
def test_piped_output_is_as_wide_as_compares(argv: list[str]) -> None:
    """Piped with no COLUMNS (CI logs, files), `plan`, `size` and `presets` print at the width
    `compare` does (`render.PIPED_WIDTH`), not rich's 80, where `plan` hid six columns."""
    from typer.testing import CliRunner

    from archplan.cli import app
    from archplan.render import PIPED_WIDTH

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "hidden at" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= PIPED_WIDTH


def test_a_file_name_with_a_line_break_keeps_errors_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A path holding a line break is quoted as Python writes it, as a YAML key is: the error, and
    each lint finding, stay one line for the tools that read them line by line."""
    odd = tmp_path / "n\nl.yaml"
    odd.write_text("name: x\n")
    for argv in (["archplan", "size", str(odd)], ["archplan", "size", str(tmp_path / "a\nb.yaml")]):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "\\n" in err, err
    monkeypatch.setattr(sys, "argv", ["archplan", "lint", str(odd)])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    finding = [line for line in out.splitlines() if "AP0" in line]
    assert finding and all(line.startswith(repr(str(odd))) for line in finding)


def test_h_is_help_too() -> None:
    """`-h` answered "No such option: -h", on the app and on every command."""
    for args in (("-h",), ("size", "-h"), ("plan", "-h")):
        result = run(*args)
        assert result.returncode == 0 and "Usage: archplan" in result.stdout, args


def test_ctrl_c_before_the_command_runs_is_an_abort(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while typer still built the command (the first half second) printed a traceback:
    click turns it into Abort only once the command runs."""
    import archplan.cli as cli

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli._main()
    assert stopped.value.code == 130 and capsys.readouterr().err == "Aborted.\n"


def test_a_preset_typo_offers_every_close_name() -> None:
    """`size gpt4` offered only gpt2, where gpt-4-rumored holds what was typed."""
    result = run("size", "gpt4")
    assert result.returncode == 2
    assert "did you mean preset 'gpt2' or preset 'gpt-4-rumored'?" in result.stderr


def piped(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


PRESETS = Path(__file__).parents[1] / "archplan" / "presets"


def test_a_dash_reads_the_spec_from_standard_input(tmp_path: Path) -> None:
    """`archplan import hf config.json | archplan size -` was refused: `-` reads standard input, in
    every command that takes a spec, and names it `<stdin>`."""
    gpt2 = (PRESETS / "gpt2.yaml").read_text()
    size = piped("size", "-", "--json", stdin=gpt2)
    assert size.returncode == 0, size.stderr
    report = json.loads(size.stdout)
    assert report["source"] == "<stdin>" and report["params"]["total"] == 124_439_808
    compare = piped("compare", "-", "gpt2", "--json", stdin=gpt2)
    assert compare.returncode == 0, compare.stderr
    assert [r["source"] for r in json.loads(compare.stdout)] == ["<stdin>", "gpt2"]
    assert piped("plan", "-", "--gpus", "8", "--gpu", "h100", "--top", "1", stdin=gpt2).returncode == 0
    broken = gpt2.replace("vocab_size: 50257", "vocab_size: -1")
    for command, code in (("size", 2), ("lint", 1)):  # lint's findings exit 1
        result = piped(command, "-", stdin=broken)
        assert result.returncode == code and "<stdin>:" in result.stdout + result.stderr
        assert "vocab_size" in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert "<stdin>: empty file" in piped("size", "-", stdin="").stderr
    partial = (Path(__file__).parents[1] / "archplan" / "partials" / "gpt-4-partial.yaml").read_text()
    solved = piped("plan", "--solve", "-", "--total", "1.8e12", "-o", str(tmp_path / "solved.yaml"), stdin=partial)
    assert solved.returncode == 0, solved.stderr
    # the header says what was solved; `-` would send a reader to a pipe long gone
    assert "solved by archplan plan --solve <stdin> --total 1.8e12" in (tmp_path / "solved.yaml").read_text()
    assert "did you mean" not in run("size", "--", "--").stderr


@pytest.mark.parametrize(("stdin", "said"), [(None, "standard input is closed"),
                                             ("terminal", "standard input is a terminal")])
def test_a_dash_refuses_a_terminal_or_a_closed_stdin(stdin: str | None, said: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`archplan size -` typed at a prompt would wait for a spec nobody pipes in; with standard
    input closed (`<&-`) it was said to be a terminal."""
    import io

    from archplan import loader

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    loader.stdin_bytes.cache_clear()
    monkeypatch.setattr(sys, "stdin", Terminal() if stdin else None)
    try:
        with pytest.raises(ArchplanError, match=f"{said}: pipe a spec in"):
            loader.load_spec("-")
    finally:
        loader.stdin_bytes.cache_clear()


def test_a_dash_is_standard_input_even_beside_a_file_of_that_name(tmp_path: Path) -> None:
    """A file named `-` in the folder was read in place of the pipe, which was dropped unsaid:
    `-` is standard input, as `cat` reads it, and the file is `./-`."""
    (tmp_path / "-").write_text((PRESETS / "gpt2.yaml").read_text())
    broken = "name: [\n"
    for command in ("size", "lint"):
        result = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", command, "-"],
                                input=broken, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert "<stdin>:1:" in result.stdout + result.stderr and result.returncode in (1, 2)
    local = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "size", "./-", "--json"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert local.returncode == 0 and json.loads(local.stdout)["name"] == "gpt2"
    # lint names that file as it was given, not `-`, which would read standard input
    linted = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "lint", "./-"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert linted.stdout.startswith("./-:6:1: AP007 warning: vocab_size 50,257")


def test_dev_stdin_is_standard_input_named_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """`/dev/stdin` read the pipe in size but was "not a regular file or folder" to lint, and its
    errors named /dev/stdin where `-`'s name <stdin>; `bench --nproc` handed it to workers that
    have no standard input, where `-` gets them a copy."""
    from archplan import loader

    monkeypatch.setattr(loader, "stdin_bytes", lambda: b"name: piped\n")
    with loader.spec_as_file("/dev/stdin") as path:
        assert path != "/dev/stdin" and Path(path).read_text() == "name: piped\n"
    broken = (PRESETS / "gpt2.yaml").read_text().replace("vocab_size: 50257", "vocab_size: -1")
    for command, code in (("size", 2), ("lint", 1)):
        result = piped(command, "/dev/stdin", stdin=broken)
        assert result.returncode == code and "<stdin>:" in result.stdout + result.stderr, result.stderr


def test_lint_reports_unreadable_standard_input_as_it_reports_a_file() -> None:
    """Binary or oversized input on `lint -` stopped the whole run (exit 2) where the same in a
    file is an AP001 finding beside the other files' findings."""
    result = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()", "lint", "-", "gpt2"],
                            input=b"\xff\xfe\x00binary", capture_output=True, timeout=120)
    out = result.stdout.decode()
    assert result.returncode == 1 and "<stdin>:1:1: AP001 error: not UTF-8 text" in out and "2 files checked" in out
    big = piped("lint", "-", stdin="# " + "x" * (1 << 20) + "\n")
    assert big.returncode == 1 and "<stdin>:1:1: AP001 error: over 1,048,576 bytes" in big.stdout


def test_compare_tells_specs_of_one_name_apart(tmp_path: Path) -> None:
    """A copy of a spec with one field changed kept its name: both columns read `7b`."""
    presets = Path(__file__).parents[1] / "archplan" / "presets"
    one, two = tmp_path / "a.yaml", tmp_path / "b.yaml"
    one.write_text((presets / "7b.yaml").read_text())
    two.write_text((presets / "7b.yaml").read_text().replace("n_layers: 32", "n_layers: 40"))
    from typer.testing import CliRunner

    from archplan.cli import app

    result = CliRunner().invoke(app, ["compare", str(one), str(two)], env={"COLUMNS": "300"})
    head = " ".join(result.stdout.split())
    assert result.exit_code == 0 and f"7b ({one})" in head and f"7b ({two})" in head
    assert "ratios (×) against 7b (" in head
    twice = CliRunner().invoke(app, ["compare", "llama-3-8b", "llama-3-8b"], env={"COLUMNS": "300"})
    assert "llama-3-8b #1" in twice.stdout and "llama-3-8b #2" in twice.stdout


def test_a_colourless_plan_tells_the_memory_categories_apart() -> None:
    """Piped or under NO_COLOR every bar cell and legend key was the same █: one glyph a category."""
    from typer.testing import CliRunner

    from archplan.cli import app

    result = CliRunner().invoke(app, ["plan", "llama-3-8b", "--gpus", "8", "--gpu", "h100", "--top", "1"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "bars: █ parameters, ▓ gradients, ▒ optimizer, ░ activations, · temporary" in result.stdout
    assert "m: micro-batches a step on each data-parallel rank" in result.stdout


def test_a_figure_beside_json_is_said_on_stderr(tmp_path: Path) -> None:
    """`size --json --plot f.png` wrote the figure and said nothing: stdout is the JSON alone."""
    pytest.importorskip("matplotlib")
    figure = tmp_path / "f.png"
    result = run("size", "gpt2", "--json", "--plot", str(figure))
    assert result.returncode == 0 and figure.exists()
    assert result.stderr == f"figure written to {figure}\n" and result.stdout.lstrip().startswith("{")


def test_shell_completion_offers_presets_spec_files_and_gpus(tmp_path: Path) -> None:
    """Completing `archplan size llama` or `--gpu h` offered nothing: the presets' names, the spec
    files and folders, and the hardware table's keys now complete."""
    from archplan.commands.options import complete_gpu, complete_spec

    (tmp_path / "mine.yaml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "more").mkdir()
    assert complete_spec("llama-3-") == ["llama-3-70b", "llama-3-8b"]
    assert complete_spec(f"{tmp_path}/") == [f"{tmp_path}/mine.yaml", f"{tmp_path}/more/"]
    assert complete_gpu("a100") == ["a100-40gb", "a100-80gb", "a100", "a100-pcie-40gb", "a100-pcie-80gb", "a100-pcie"]
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "_ARCHPLAN_COMPLETE": "complete_bash",
                                                       "COMP_WORDS": "archplan plan x --gpu h2", "COMP_CWORD": "4"})
    assert proc.stdout.split() == ["h200", "h200-sxm"]


@pytest.mark.parametrize(("words", "offered"), [
    ("archplan plan lla", ["llama-2-7b", "llama-3-70b", "llama-3-8b", "llama-3.1-405b"]),
    ("archplan plan --solve gpt", ["gpt-4-partial"]),
    ("archplan lint mix", ["mixtral-8x7b"]),
])
def test_plan_and_lint_complete_their_specs_too(words: str, offered: list[str]) -> None:
    """`size`, `compare`, `verify` and `bench` completed a SPEC; `plan`'s SPEC, its --solve (the
    bundled partial specs) and lint's PATH offered nothing."""
    proc = subprocess.run([sys.executable, "-c", "from archplan.cli import main; main()"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "_ARCHPLAN_COMPLETE": "complete_bash",
                                                       "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)})
    assert proc.stdout.split() == offered


def test_choices_read_in_any_case() -> None:
    """`--kv-dtype BF16` was refused as "not one of 'fp32', 'bf16', ..." where `--gpu H100` was
    taken; a spec's path keeps its case."""
    from typer.testing import CliRunner

    from archplan.cli import app

    runner = CliRunner()
    upper = runner.invoke(app, ["size", "gpt2", "--kv-dtype", "BF16", "--recompute", "Selective", "--json"])
    lower = runner.invoke(app, ["size", "gpt2", "--kv-dtype", "bf16", "--recompute", "selective", "--json"])
    assert upper.exit_code == 0 and upper.stdout == lower.stdout
    plan = runner.invoke(app, ["plan", "gpt2", "--gpus", "8", "--gpu", "H100", "--states", "FSDP2", "--json"])
    assert plan.exit_code == 0 and json.loads(plan.stdout)["states"]["convention"] == "fsdp2"
    assert "no such file" in run("size", str(PRESETS / "GPT2.yaml")).stderr
    # a command typed in capitals is the command its help pointer names
    assert "; see 'archplan size --help'" in run("SIZE", "gpt2", "--kv-dtype", "nope").stderr


@pytest.mark.parametrize("command", ["size", "compare"])
def test_size_and_compare_group_their_options_as_the_report_does(command: str) -> None:
    """size's 20 options were one list in --help: inference, training and budget options mixed."""
    from typer.testing import CliRunner

    from archplan.cli import app
    from archplan.commands.size import BUDGET_PANEL, INFERENCE_PANEL, TRAINING_PANEL

    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"}).stdout
    panels = [text.index(f"─ {panel} ─") for panel in (INFERENCE_PANEL, TRAINING_PANEL, BUDGET_PANEL)]
    assert panels == sorted(panels)
    rows = [text.index(f"│ {option} ") for option in ("--kv-dtype", "--recompute", "--mfu")]
    assert panels[0] < rows[0] < panels[1] < rows[1] < panels[2] < rows[2]
