"""Run the rules over files: discovery, configuration, and turning every failure into a finding.

A file that cannot be read or validated is still lint input: its problem becomes a finding
(AP001/AP002, or a validator rule's own code) with the line the loader located. Only unusable
*invocations* are ArchplanErrors (exit 2): a path that does not exist, a glob matching nothing,
an unknown rule code, a malformed `[tool.archplan.lint]` table.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, packaged for Python 3.10
    import tomli as tomllib

from archplan.errors import ArchplanError, dotted
from archplan.lint.rules import BY_CODE, RULES, FieldPath, Hit, Recognise, Rule, Severity, SpecContext
from archplan.loader import (
    DANGLING_LINK,
    STDIN_LABEL,
    STDIN_PATH,
    LoadedYaml,
    find_spec_path,
    is_stdin,
    parse_yaml,
    preset_names,
    read_text,
    spec_from_data,
    spec_label,
)
from archplan.outfile import SPEC_SUFFIXES

SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
MAX_MESSAGE = 300  # characters of a finding's message (one line in CI logs and annotations)


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    file: str
    line: int  # 1-based; 1 when the problem has no better place (a binary file, a model-level error)
    column: int
    message: str
    fix: str | None = None
    field: str | None = None  # dotted YAML path, when the finding concerns one field

    @property
    def rule(self) -> Rule:
        return BY_CODE[self.code]

    @property
    def labelled(self) -> str:
        """The message with its field path in front, as `archplan size` prints a spec error
        (`attention.n_heads: d_model (500) is not divisible ...`), for the formats that have no
        field of their own (text, github, sarif). A message that already opens with the whole
        dotted path (`vocab_size 50,257 is not ...`) is left as it is; one that opens with its last
        name only (`top_k (9) exceeds ...`) still gets the path, or the section would be lost."""
        if self.field is None:
            return self.message
        if self.message.startswith(f"{self.field} "):
            return self.message
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class LintConfig:
    select: tuple[str, ...] = ()  # codes or code prefixes; empty = every rule
    ignore: tuple[str, ...] = ()
    strict: bool = False  # warnings fail too (info never does)
    source: str | None = None  # the pyproject.toml it came from


@dataclass
class LintResult:
    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    rules: tuple[Rule, ...] = RULES

    def counts(self) -> dict[Severity, int]:
        out: dict[Severity, int] = {s: 0 for s in SEVERITIES}
        for finding in self.findings:
            out[finding.severity] += 1
        return out

    def exit_code(self, strict: bool) -> int:
        counts = self.counts()
        failing = counts["error"] + (counts["warning"] if strict else 0)
        return 1 if failing else 0


# ------------------------------------------------------------------------------ discovery
def _lint_input(path: Path) -> bool:
    """A file to lint: a regular one, or a symbolic link, whose target may be missing or loop (a
    finding, AP001, not something to skip)."""
    return path.is_file() or path.is_symlink()


def _unreadable_folder(exc: OSError) -> None:
    # os.walk skips a folder it cannot list unless told: a gate would pass specs it never read
    raise ArchplanError(f"cannot read this folder ({exc.strerror})", file=str(exc.filename))


def _walk(root: str | Path) -> Iterator[tuple[str, list[str]]]:
    """Each folder under `root` (itself first) with its files, sorted; hidden folders and files
    (.git, .github) are skipped. Symlinked folders are followed, as a glob's `**` follows them (a
    gate must not pass a folder that links to a broken spec); each folder is entered once, so a
    link cycle ends."""
    entered: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, onerror=_unreadable_folder, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in entered:
            dirs.clear()
            continue
        entered.add((status.st_dev, status.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield folder, sorted(name for name in files if not name.startswith("."))


def _walk_yaml(root: Path) -> Iterable[Path]:
    """YAML files under a folder, recursively (`_walk`)."""
    for folder, files in _walk(root):
        for name in files:
            path = Path(folder, name)
            if name.lower().endswith(SPEC_SUFFIXES) and _lint_input(path):
                yield path


def _glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), but each `**` expanded by `_walk`: the glob module
    follows a symlinked folder at every depth, and two links up a tree (`up -> ..`,
    `up2 -> ../..`) made it run for minutes."""
    parts = pattern.split("/")
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    prefix, rest = "/".join(parts[:at]), parts[at + 1:]
    if at == 0:
        bases = [""]  # the current folder, its paths shown relative as glob shows them
    elif not prefix:
        bases = ["/"]
    else:
        bases = glob.glob(prefix) if glob.has_magic(prefix) else [prefix]
    found: list[str] = []
    for base in bases:
        if not os.path.isdir(base or "."):
            continue
        for folder, files in _walk(base or "."):
            shown = folder if base else os.path.relpath(folder)
            if rest:
                found += _glob(os.path.join(shown, *rest))
            else:  # a trailing `**`: every folder and file under the base, as glob gives them
                found += [shown, *(os.path.join(shown, name) for name in files)]
    return found


def _file_key(path: Path) -> str:
    """The file a path names; a dangling or looping link names itself (two links to one missing
    target are two findings). realpath, unlike Path.resolve, neither raises on a loop nor meets
    ELOOP on a long path, as it follows one link at a time."""
    if path == STDIN_PATH:
        return STDIN_LABEL
    target = os.path.realpath(path)
    return target if os.path.exists(target) else os.path.join(os.path.realpath(path.parent), path.name)


def discover(paths: Sequence[str]) -> list[Path]:
    """Files, folders (recursive *.yaml/*.yml) and globs, de-duplicated, in a stable order."""
    if not paths:
        raise ArchplanError("no paths given; e.g. `archplan lint configs/`")
    found: list[Path] = []
    for arg in paths:
        if not arg.strip():
            # Path("") is the current folder: an unset shell variable would lint all of it
            raise ArchplanError("an empty path; give a file, folder or glob (`.` for the current folder)")
        if glob.has_magic(arg) and not Path(arg).exists():
            matches = sorted(set(_glob(arg)))
            if not matches:
                raise ArchplanError("glob matches nothing", file=arg)
            for match in matches:
                path = Path(match)
                if path.is_dir():
                    found.extend(_walk_yaml(path))
                elif path.name.lower().endswith(SPEC_SUFFIXES) and _lint_input(path):
                    # `configs/*` also matches the README and spec.schema.json beside the specs
                    found.append(path)
            continue
        if is_stdin(arg):  # standard input, as `cat` reads it: a file named `-` is `./-`
            found.append(STDIN_PATH)
            continue
        path = Path(arg)
        if path.is_dir():
            found.extend(_walk_yaml(path))
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise ArchplanError("not a regular file or folder", file=arg)
        elif arg in preset_names():
            found.append(find_spec_path(arg))  # a bundled preset, by name as everywhere
        elif path.is_symlink():
            raise ArchplanError(DANGLING_LINK, file=arg)
        else:
            raise ArchplanError("no such file, folder or preset", file=arg)
    # keyed by the file itself: presets/ beside a preset's name, or a symlinked folder, is one file.
    # Of the paths to one file the shortest is kept: a `**` glob through a folder cycle also meets
    # it too deep for the kernel to open (ELOOP), where it would read as a dangling link.
    shortest: dict[str, Path] = {}
    for path in found:
        key = _file_key(path)
        if key not in shortest or len(path.parts) < len(shortest[key].parts):
            shortest[key] = path
    unique = list(shortest.values())
    if not unique:
        raise ArchplanError(f"no *.yaml or *.yml files under {', '.join(paths)}")
    return unique


# ---------------------------------------------------------------------------------- config
def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above `start` (as ruff and black look for theirs)."""
    for folder in (start, *start.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def _codes(value: object, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArchplanError(f"[tool.archplan.lint] {key} must be a list of rule codes", file=source)
    codes = parse_codes(value)
    check_codes(codes, source)
    return codes


def load_config(start: Path) -> LintConfig:
    path = find_pyproject(start)
    if path is None:
        return LintConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # TOML and UTF-8 decode errors, an int past 4,300 digits
        raise ArchplanError(f"cannot read: {exc}", file=str(path)) from None
    except RecursionError:  # tomllib recurses once per nested array
        raise ArchplanError("cannot read: arrays nested too deeply", file=str(path)) from None
    source = str(path)
    # Any pyproject.toml may have `tool = 3`: each level of tool.archplan.lint must be a table.
    keys = ("tool", "archplan", "lint")
    table: dict = data
    for depth, key in enumerate(keys, start=1):
        value = table.get(key)
        if value is None:
            return LintConfig()
        if not isinstance(value, dict):
            name = ".".join(keys[:depth])
            raise ArchplanError(f"malformed config: {name} must be a table, not {type(value).__name__}",
                                file=source)
        table = value
    unknown = set(table) - {"select", "ignore", "strict"}
    if unknown:
        raise ArchplanError(
            f"[tool.archplan.lint] unknown key(s) {', '.join(sorted(unknown))}; "
            "expected select, ignore, strict", file=source,
        )
    strict = table.get("strict", False)
    if not isinstance(strict, bool):
        raise ArchplanError("[tool.archplan.lint] strict must be true or false", file=source)
    return LintConfig(
        select=_codes(table.get("select", []), "select", source),
        ignore=_codes(table.get("ignore", []), "ignore", source),
        strict=strict,
        source=source,
    )


def parse_codes(values: Sequence[str]) -> tuple[str, ...]:
    """`--select AP003,AP007 --select AP01` -> ('AP003', 'AP007', 'AP01')."""
    return tuple(code.strip().upper() for value in values for code in value.split(",") if code.strip())


def check_codes(codes: Sequence[str], source: str | None = None) -> None:
    """Refuse a code (or code prefix) no rule has, naming the file it came from, if any."""
    for code in codes:
        if not any(rule.code.startswith(code) for rule in RULES):
            raise ArchplanError(
                f"unknown rule code {code!r}; codes are {RULES[0].code}-{RULES[-1].code} "
                "(see docs/rules.md)", file=source,
            )


def select_rules(select: Sequence[str], ignore: Sequence[str]) -> tuple[Rule, ...]:
    """Rules whose code starts with a selected code (all if none), minus the ignored ones, and
    always the rules of a file that cannot load (`Rule.on_load`)."""
    check_codes((*select, *ignore))

    def matches(rule: Rule, codes: Sequence[str]) -> bool:
        return any(rule.code.startswith(code) for code in codes)

    return tuple(
        rule for rule in RULES
        if rule.on_load or (not select or matches(rule, select)) and not matches(rule, ignore)
    )


# ---------------------------------------------------------------------------------- linting
def _locate(loaded: LoadedYaml, path: FieldPath) -> tuple[int, int]:
    """Where a field is written; a default (unwritten) field points at its nearest written parent."""
    for cut in range(len(path), 0, -1):
        where = loaded.locations.get(path[:cut])
        if where is not None:
            return where
    return (1, 1)


def _invalid_spec(error: ArchplanError, loaded: LoadedYaml, file: str) -> list[Finding]:
    """A validation failure: a validator rule's code if its message is recognised, else AP002
    (under any selection: `Rule.on_load`)."""
    for rule in RULES:
        if not isinstance(rule.detect, Recognise):
            continue
        match = rule.detect.pattern.search(error.message)
        if match is None:
            continue
        # the validator's own field where it is one of the rule's (AP005: head_dim 65 beside a
        # written fraction of 1); where it is derived, not written, the first written field after
        # it in the rule's list, which lists what a field is derived from after it (head_dim:
        # n_heads); else the first of the rule's fields that is written
        named = tuple(error.field.split(".")) if error.field else None
        candidates = rule.detect.at[rule.detect.at.index(named):] if named in rule.detect.at else rule.detect.at
        at = next((p for p in candidates if p in loaded.locations), None)
        line, column = _locate(loaded, at) if at else (error.line or 1, error.column or 1)
        return [Finding(
            rule.code, rule.severity, file, line, column, error.message,
            rule.detect.fix(match), dotted(at) if at else error.field,
        )]
    return _input_finding("AP002", error, file)


def _clip(message: str) -> str:
    """Validation messages quote the offending value; a 4 MB string must not become a 4 MB line."""
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}… ({len(message) - MAX_MESSAGE:,} more characters)"


def _input_finding(code: str, error: ArchplanError, file: str) -> list[Finding]:
    """A file that cannot be read or parsed (AP001) or validated (AP002), under any selection
    (`Rule.on_load`)."""
    rule = BY_CODE[code]
    return [Finding(
        rule.code, rule.severity, file, error.line or 1, error.column or 1, _clip(error.message),
        None, error.field,
    )]


def lint_text(text: str, file: str, rules: Sequence[Rule] = RULES) -> list[Finding]:
    """Lint one spec's text; every problem comes back as a finding, never as an exception."""
    try:
        loaded = parse_yaml(text, file)
    except ArchplanError as error:
        return _input_finding("AP001", error, file)
    try:
        spec = spec_from_data(loaded, file)
    except ArchplanError as error:
        # every problem of the validation pass, not one a run; the rules on a valid spec (AP004 on)
        # wait for it to validate
        return [finding for each in (error, *getattr(error, "others", ()))
                for finding in _invalid_spec(each, loaded, file)]
    ctx = SpecContext(spec, loaded)
    findings: list[Finding] = []
    for rule in rules:
        if isinstance(rule.detect, Recognise) or rule.detect is None:
            continue
        for hit in rule.detect(ctx):
            findings.append(_from_hit(rule, hit, loaded, file))
    return findings


def _from_hit(rule: Rule, hit: Hit, loaded: LoadedYaml, file: str) -> Finding:
    line, column = _locate(loaded, hit.path)
    return Finding(rule.code, rule.severity, file, line, column, hit.message, hit.fix, dotted(hit.path))


def lint_file(path: Path, rules: Sequence[Rule] = RULES) -> list[Finding]:
    file = spec_label(path)
    try:
        text = read_text(path)
    except ArchplanError as error:
        return _input_finding("AP001", error, file)
    return lint_text(text, file, rules)


def lint_paths(paths: Sequence[str], config: LintConfig) -> LintResult:
    rules = select_rules(config.select, config.ignore)
    files = discover(paths)
    findings = [finding for path in files for finding in lint_file(path, rules)]
    findings.sort(key=lambda f: (f.file, f.line, f.column, f.code))
    return LintResult([spec_label(p) for p in files], findings, rules)
