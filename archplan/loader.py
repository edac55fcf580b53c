"""Read a spec from YAML: safe loader, duplicate keys rejected, errors with file:line:col and field path.

`load_spec` accepts a path, the name of a bundled preset (`archplan size llama-3-8b`) or `-` for
standard input (`archplan import hf config.json | archplan size -`).
"""

from __future__ import annotations

import datetime
import difflib
import functools
import math
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from archplan.errors import ArchplanError, clipped, dotted
from archplan.outfile import SPEC_SUFFIXES
from archplan.spec import Spec
from archplan.units import SI_EXPONENTS

# The presets are package data (pyproject.toml `package-data`): found through the package, so an
# installed wheel and a checkout read the same files.
PRESETS_DIR = Path(str(resources.files("archplan") / "presets"))
MAX_FILE_BYTES = 1024 * 1024  # a spec is a page of YAML; anything bigger is not a spec
MAX_YAML_NODES = 200_000  # guards against alias ("billion laughs") expansion

Loc = tuple[int, int]  # 1-based line, column


@dataclass(frozen=True)
class LoadedYaml:
    data: Any
    locations: dict[tuple[str | int, ...], Loc]  # field path -> where its key/item starts
    # each mapping key that is not a field name (`1:`, `null:`), located: readable YAML, an invalid
    # spec, which `spec_from_data` reports in place of pydantic's "Keys should be strings" (it names
    # neither the line nor the key as written)
    key_errors: tuple[ArchplanError, ...] = ()


# libyaml's parser when present: 5x faster on `lint` of hundreds of specs.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that keeps the position of every mapping key and rejects duplicate keys."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # PyYAML's scalar constructors raise plain Python errors on a value their tag cannot take
        # (`!!timestamp 2024-13-45`, `!!bool maybe`, `!!int abc`, an integer of more digits than
        # Python converts, an empty `!!int` or `!!float`, which indexes past its text): name the
        # node's place and say what went wrong, as a syntax error does
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError, IndexError) as exc:
            raise yaml.constructor.ConstructorError(None, None, _unreadable(node, exc), node.start_mark) from None


def _unreadable(node: yaml.Node, exc: Exception) -> str:
    """Why a node's value could not be read as its (implicit or explicit) tag, for one line."""
    kind = node.tag.rsplit(":", 1)[-1]
    shown = repr(clipped(str(node.value), 40)) if isinstance(node, yaml.ScalarNode) else "this node"
    reason = clipped(str(exc), 80) if isinstance(exc, ValueError) else "not written as one"
    return f"{shown} cannot be read as a YAML {kind} ({reason}); quote it if it is text"


# libyaml's parser keeps its own stack, but PyYAML's C composer recurses once per level with no
# limit: `[[[...]]]` or `- - - ...` some 25,000 deep overflowed the C stack and killed the process.
# `_check_shape` walks the parser's events first (no recursion) and refuses a text deeper than a
# spec ever nests, or with more nodes than MAX_YAML_NODES, before anything is composed; composing a
# megabyte of small nodes only to refuse it afterwards took seconds.
_MAX_DEPTH = 100
_OPEN = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
_CLOSE = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
_NODE = (yaml.ScalarEvent, *_OPEN)


# YAML 1.1 (PyYAML) reads `2.0e12` (no exponent sign) as a string; YAML 1.2 and users mean a float.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # a merge key's (`<<: *base`) entries come first and the mapping's own override them (YAML's
    # merge type): only the mapping's own keys can repeat one another
    own = [(k, v) for k, v in node.value if k.tag != "tag:yaml.org,2002:merge"]
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in own:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain scalars", key_node.start_mark
            )
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first defined on line {first})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return {
        loader.construct_object(k, deep=True): loader.construct_object(v, deep=True)
        for k, v in node.value
    }


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class Yaml11Number(str):
    """An unquoted scalar that YAML 1.1 (PyYAML) and YAML 1.2 (editors, the JSON Schema of
    `archplan schema`) read differently. To 1.1 a leading zero is octal (`010000` is 4096), `0b`
    binary, colons base 60 (`3:20` is 200), and underscores separate digits (`4_096`); 1.2 reads a
    leading zero as decimal (`010000` is 10000, `08` is 8), `0o` as octal (`0o100` is 64), and the
    others as text, where 1.1 reads `08` and `0o100` as text. Kept as its text, so a name or a
    description keeps what was written and a number field refuses it, saying what each version
    makes of it (`reading`) instead of taking one number without a word."""

    reading: str


# the int and float forms YAML 1.1 and 1.2 read otherwise (PyYAML's resolver.py; the 1.2 core
# schema): a leading zero (1.1's octal, 1.2's decimal; with an 8 or 9, 1.1's text), 1.2's `0o`
# octal, base 60 (an int's first part 1-9, a float's any digits), binary, and digits with
# underscores (decimal ints start 1-9 in 1.1; floats as `_FLOAT`)
_YAML11_ONLY = re.compile(r"""^(?:[-+]?0[0-7_]+
    |[-+]?0[0-9_]*[89][0-9_]*
    |[-+]?0o[0-7_]+
    |[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?0b[01_]+
    |[-+]?0x[0-9a-fA-F_]*_[0-9a-fA-F_]*
    |[-+]?[1-9][0-9_]*_[0-9_]*
    |[-+]?[0-9][0-9_]*_[0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*_[0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*\.[0-9_]*_[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]*_[0-9_]*(?:[eE][-+]?[0-9]+)?)$""", re.X)
_YAML11_TAG = "tag:archplan,2026:yaml11-number"


def _base60(text: str) -> int | float:
    """YAML 1.1's sexagesimal reading: `3:20` is 200, `1:30.5` 90.5 (an integer's first part
    starts 1-9, so `08:00` is text to both versions; a float's may be `08:00.5`)."""
    parts = text.lstrip("+-").replace("_", "").split(":")
    value: int | float = 0
    for part in parts:
        value = value * 60 + (float(part) if "." in part else int(part))
    return -value if text.startswith("-") else value


def _construct_yaml11_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Yaml11Number:
    text = Yaml11Number(loader.construct_scalar(node))
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-")
    bare = digits.replace("_", "")
    if ":" in text:
        text.reading = f"YAML 1.1 reads it in base 60, as {_base60(text):,}"
    elif digits.startswith("0b"):
        value = int(bare[2:], 2)
        text.reading = f"YAML 1.1 reads 0b as binary, {sign}{value:,}; write {sign}{value}"
    elif digits.startswith("0o"):
        value = int(bare[2:], 8)
        # YAML 1.2's core schema writes its octal `0o[0-7]+`: no sign, no underscores
        text.reading = (f"YAML 1.2 (editors) reads 0o as octal, {value:,}, and YAML 1.1 as text; write {value}"
                        if re.fullmatch(r"0o[0-7]+", text) else
                        f"YAML 1.1 and 1.2 both read it as text; write the number, {sign}{value} in decimal")
    elif re.fullmatch(r"0[0-9_]+", digits):
        decimal = int(bare)
        octal = int(bare, 8) if re.fullmatch(r"0[0-7_]+", digits) else None
        one = (f"YAML 1.1 reads a leading zero as octal, {sign}{octal:,}" if octal is not None else
               "YAML 1.1 reads it as text, having no 8 or 9 in octal")
        # YAML 1.2's core schema: `[-+]?[0-9]+`, a leading zero decimal, no underscores
        two = (f"YAML 1.2 (editors) as decimal, {sign}{decimal:,}" if "_" not in digits else
               "YAML 1.2 (editors) as text, having no underscores in numbers")
        write = ("write the one meant without the zero" if octal is not None and octal != decimal else
                 f"write {sign}{decimal}")
        text.reading = f"{one}, and {two}; {write}"
    else:
        plain = text.replace("_", "")
        text.reading = f"YAML 1.1 reads the underscores as digit separators and YAML 1.2 as text; write {plain}"
    return text


# ahead of the inherited int resolver, which would match first
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, (_YAML11_TAG, _YAML11_ONLY))
_Loader.add_constructor(_YAML11_TAG, _construct_yaml11_number)

# No implicit dates: YAML 1.2's core schema, which editors follow, has none, so `name: 2024-06-01`
# is the text an editor validated, not a date the loader refused (an explicit `!!timestamp` stays
# one, and a field that wants a string or a number refuses it by name).
for _first, _resolvers in list(_Loader.yaml_implicit_resolvers.items()):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in _resolvers if tag != "tag:yaml.org,2002:timestamp"]

# YAML 1.2's booleans only. YAML 1.1 (PyYAML) also reads yes/no/on/off as booleans, which YAML 1.2,
# editors and the JSON Schema read as text: `tied: yes` loaded as true where the editor flagged it,
# and `name: no` was refused as a boolean. Now they are text, which a boolean field refuses
# (`_not_a_boolean` says why) and a name keeps.
_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
for _first, _resolvers in list(_Loader.yaml_implicit_resolvers.items()):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, _BOOL_12 if tag == "tag:yaml.org,2002:bool" else regexp) for tag, regexp in _resolvers]


# A plain `=` or `<<` as a value: YAML 1.1's value and merge tags, which YAML 1.2, editors and the
# JSON Schema read as text, as PyYAML reads them as keys (`flatten_mapping`: a `<<` key still merges).
for _tag in ("tag:yaml.org,2002:value", "tag:yaml.org,2002:merge"):
    _Loader.add_constructor(_tag, _Loader.construct_yaml_str)


def _check_shape(text: str, file: str) -> None:
    """Refuse a text that nests deeper than `_MAX_DEPTH` or holds more than MAX_YAML_NODES nodes,
    at the event where it does, from the parser's events alone (see `_MAX_DEPTH`)."""
    loader = _Loader(text)
    depth = nodes = 0
    too_deep = f"YAML nests more than {_MAX_DEPTH} levels deep; a spec nests a few"
    try:
        while (event := loader.get_event()) is not None:
            if isinstance(event, _CLOSE):
                depth -= 1
                continue
            depth += isinstance(event, _OPEN)
            nodes += isinstance(event, _NODE)
            if depth > _MAX_DEPTH:
                problem = too_deep
            elif nodes > MAX_YAML_NODES:
                problem = f"YAML has more than {MAX_YAML_NODES:,} nodes; a spec has a few hundred"
            else:
                continue
            mark = event.start_mark
            raise ArchplanError(problem, file=file, line=mark.line + 1, column=mark.column + 1)
    except yaml.MarkedYAMLError as exc:
        # libyaml 0.2.6 (PyYAML 6.0.4's wheels) refuses 1,000 levels in its scanner, which reads a
        # flow collection's brackets ahead of the events: the same refusal, at its own mark
        mark = exc.problem_mark
        if mark is None or "maximum nesting depth" not in (exc.problem or ""):
            raise
        raise ArchplanError(too_deep, file=file, line=mark.line + 1, column=mark.column + 1) from None
    finally:
        loader.dispose()


def _count_nodes(node: yaml.Node, budget: list[int], file: str) -> None:
    """Walk the composed graph as construction would expand it (aliases counted each time)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ArchplanError(f"YAML's aliases expand it past {MAX_YAML_NODES:,} nodes (an alias bomb?)", file=file)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            _count_nodes(k, budget, file)
            _count_nodes(v, budget, file)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _count_nodes(item, budget, file)


# a field name, or `<<` merging a mapping; a number only to YAML 1.1 (`08`, `4_096`) is text to 1.2
# and to editors, and a key that names no field is said so once, as an unknown field
_KEY_TAGS = {"tag:yaml.org,2002:str", "tag:yaml.org,2002:merge", _YAML11_TAG}


def _bad_keys(node: yaml.Node, file: str) -> Iterator[ArchplanError]:
    """Each mapping key that is not a field name: YAML reads `1:`, `null:` or `true:` as a number,
    null or boolean, which no spec field is named (a key that is not a scalar at all the
    constructor has refused already, `_Loader.construct_mapping`)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.tag not in _KEY_TAGS:
                yield ArchplanError(f"key `{k.value}` (YAML reads it as {k.tag.rsplit(':', 1)[-1]}) is not a field "
                                    "name; spec fields are names such as `n_layers` (quote it to use the text)",
                                    file=file, line=k.start_mark.line + 1, column=k.start_mark.column + 1)
            yield from _bad_keys(v, file)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _bad_keys(item, file)


def _locations(node: yaml.Node, path: tuple[str | int, ...], out: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        # after construction a merge (`<<: *base`) puts the merged keys first and the mapping's own
        # after them, so the last place of a key is the one whose value the data holds
        for k, v in node.value:
            key_path = path + (k.value,)
            out[key_path] = (k.start_mark.line + 1, k.start_mark.column + 1)
            _locations(v, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(path + (i,), (item.start_mark.line + 1, item.start_mark.column + 1))
            _locations(item, path + (i,), out)


def parse_yaml(text: str, file: str) -> LoadedYaml:
    """Parse one YAML document safely; every failure is an ArchplanError naming file:line:col."""
    if "\x00" in text:
        raise ArchplanError("not a text file (NUL bytes)", file=file)
    try:
        _check_shape(text, file)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise ArchplanError("empty file; expected a mapping of spec fields", file=file)
            _count_nodes(node, [MAX_YAML_NODES], file)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "could not determine a constructor" in str(exc):
            problem = f"tag not allowed ({exc.problem}); archplan loads YAML with a safe loader"
        elif "but found another document" in str(exc):
            problem = "a second document (`---`); a spec is one YAML document a file"
        elif mark is not None and text[mark.index:mark.index + 1] == "\t":
            problem = "a tab; YAML indents with spaces"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        lines = text.splitlines()
        if line is not None and line > len(lines):
            # the stream's end, after the last line: name the last line, as an editor shows it
            line, column = max(len(lines), 1), len(lines[-1]) + 1 if lines else 1
        raise ArchplanError(f"invalid YAML: {problem}", file=file, line=line, column=column) from None
    except yaml.reader.ReaderError as exc:
        # a character YAML does not allow in a stream (a control character, U+FFFE) carries no
        # mark, only its offset in the text: in characters from PyYAML's reader, in UTF-8 bytes
        # from libyaml's
        before = (text[:exc.position] if _BaseLoader is yaml.SafeLoader
                  else text.encode("utf-8")[:exc.position].decode("utf-8", "ignore"))
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise ArchplanError(f"invalid YAML: the character U+{ord(char):04X} is not allowed in YAML text",
                            file=file, line=line, column=column) from None
    except yaml.YAMLError as exc:
        raise ArchplanError(f"invalid YAML: {exc}", file=file) from None
    except RecursionError:
        raise ArchplanError("YAML nests too deeply", file=file) from None
    locations: dict[tuple[str | int, ...], Loc] = {}
    _locations(node, (), locations)
    return LoadedYaml(data, locations, tuple(_bad_keys(node, file)))


def read_capped(path: Path, limit: int, what: str, not_regular: str = "not a regular file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes.

    A device or a pipe (/dev/zero, <(cmd)) reports size 0 and may never end, so it is refused
    before it is opened; the read itself stops at limit + 1 bytes, as a file may grow meanwhile.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ArchplanError(not_regular, file=str(path))
        if info.st_size > limit:
            raise ArchplanError(f"file is {info.st_size:,} bytes; {what} is at most {limit:,}", file=str(path))
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as exc:
        raise ArchplanError(f"cannot read: {exc.strerror}", file=str(path)) from None
    if len(raw) > limit:
        raise ArchplanError(f"file is over {limit:,} bytes; {what} is at most {limit:,}", file=str(path))
    return raw


# a link whose target is missing, or links that lead to each other: `exists()` is False for both
DANGLING_LINK = "a symbolic link to nothing: its target is missing, or the links loop"


STDIN = "-"
STDIN_LABEL = "<stdin>"
# What `find_spec_path` gives for `-`, and what `read_text` reads standard input for: not Path("-"),
# which `./-`, a file of that name, also is
STDIN_PATH = Path("/dev/stdin")
PIPE_HINT = "pipe a spec in (e.g. `archplan import hf config.json | archplan size -`)"


@functools.cache
def stdin_bytes() -> bytes:
    """Standard input, read once (a pipe can be read only once, and `bench` and `verify` load
    their spec more than once), at most one byte past what a spec may be."""
    if sys.stdin is None:  # started with it closed (`<&-`)
        raise ArchplanError(f"standard input is closed: {PIPE_HINT}", file=STDIN_LABEL)
    if sys.stdin.isatty():
        raise ArchplanError(f"standard input is a terminal: {PIPE_HINT}", file=STDIN_LABEL)
    try:
        return sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ArchplanError(f"cannot read: {exc.strerror}", file=STDIN_LABEL) from None


def is_stdin(name_or_path: str) -> bool:
    """Whether a spec given on the command line is standard input: `-`, or /dev/stdin itself."""
    return name_or_path == STDIN or Path(name_or_path) == STDIN_PATH


@contextmanager
def spec_as_file(name_or_path: str) -> Iterator[str]:
    """`name_or_path` as processes of their own can read it: standard input's text written to a
    private folder for as long as the block runs (`bench --nproc`'s torchrun workers have no
    standard input of theirs), anything else as given."""
    if not is_stdin(name_or_path):
        yield name_or_path
        return
    with tempfile.TemporaryDirectory(prefix="archplan-stdin-") as folder:
        copy = Path(folder) / "stdin.yaml"
        copy.write_text(read_text(STDIN_PATH), encoding="utf-8")
        yield str(copy)


def spec_label(path: Path) -> str:
    """How a found spec file is named in messages: `<stdin>` for what was piped in, `./-` for a
    file named `-` (which, given as `-`, would read standard input)."""
    if path == STDIN_PATH:
        return STDIN_LABEL
    return f"./{STDIN}" if str(path) == STDIN else str(path)


def spec_source(name_or_path: str) -> str:
    """How a spec given on the command line is named in messages and reports: `<stdin>` for `-`
    and /dev/stdin, anything else as typed."""
    return STDIN_LABEL if is_stdin(name_or_path) else name_or_path


def read_text(path: Path) -> str:
    if path == STDIN_PATH:
        raw = stdin_bytes()
        if len(raw) > MAX_FILE_BYTES:
            raise ArchplanError(f"over {MAX_FILE_BYTES:,} bytes; a spec is at most {MAX_FILE_BYTES:,}",
                                file=STDIN_LABEL)
    else:
        if not path.exists():
            raise ArchplanError(DANGLING_LINK if path.is_symlink() else "no such file", file=str(path))
        if path.is_dir():
            raise ArchplanError("is a directory; expected a YAML spec file", file=str(path))
        raw = read_capped(path, MAX_FILE_BYTES, "a spec", "not a regular file; expected a YAML spec file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchplanError("not UTF-8 text (binary file?)", file=spec_label(path)) from None


_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", re.S)


class InvalidSpec(ArchplanError):
    """A spec that does not validate: the first problem, as every command reports it, and every
    other one pydantic found in the same pass (`others`), which `lint` reports too."""

    def __init__(self, first: ArchplanError, others: list[ArchplanError]) -> None:
        super().__init__(first.message, file=first.file, line=first.line, column=first.column, field=first.field)
        self.others = others


def _pydantic_errors(exc: ValidationError, loaded: LoadedYaml, file: str) -> InvalidSpec:
    # A misspelt key also makes its intended field "missing": report the typo, it explains both.
    # Only the field the typo's "did you mean" names: an unrelated unknown key (`foo`) explains no
    # missing field beside it. A key that is not a string is the loader's to report, located.
    errors = sorted((e for e in exc.errors(include_url=False) if e["type"] != "invalid_key"),
                    key=lambda e: e["type"] != "extra_forbidden")
    meant = {(tuple(e["loc"][:-1]), guess) for e in errors if e["type"] == "extra_forbidden"
             for guess in _typo_guess(loaded, _yaml_path(loaded, tuple(e["loc"])))}
    shown = [e for e in errors if not (e["type"] == "missing" and (tuple(e["loc"][:-1]), e["loc"][-1]) in meant)]
    first, *others = (*loaded.key_errors, *(_pydantic_error(err, loaded, file) for err in shown))
    return InvalidSpec(first, others)


def _yaml_path(loaded: LoadedYaml, loc: tuple) -> tuple:
    """pydantic's location as the YAML's keys: without the discriminator tags (e.g. 'gqa') pydantic
    inserts, which the YAML has no key for."""
    return tuple(p for p in loc if p in _path_keys(loaded, loc))


def _typo_guess(loaded: LoadedYaml, yaml_path: tuple) -> list[str]:
    """The field an unknown key at `yaml_path` is a near-miss spelling of, if any (difflib's closest)."""
    return difflib.get_close_matches(str(yaml_path[-1]), _valid_names(loaded, yaml_path[:-1]), n=1)


def _pydantic_error(err: Any, loaded: LoadedYaml, file: str) -> ArchplanError:
    loc = tuple(err["loc"])
    yaml_path = _yaml_path(loaded, loc)
    line_col = None
    for cut in range(len(yaml_path), 0, -1):
        line_col = loaded.locations.get(yaml_path[:cut])
        if line_col:
            break
    field = dotted(yaml_path) or None
    kind = err["type"]
    message = err["msg"]
    if kind == "extra_forbidden":
        parent = yaml_path[:-1]
        names = _valid_names(loaded, parent)
        guess = _typo_guess(loaded, yaml_path)
        owners = _kinds_with_field(loaded, parent, yaml_path[-1])
        if owners:
            # a field of another kind of the same block (n_kv_heads under kind: mha): name the kind
            node: Any = loaded.data
            for part in parent:
                node = node[part] if isinstance(node, (dict, list)) else None
            kind = node.get("kind") if isinstance(node, dict) else None
            message = (f"not a field of kind {kind}" if kind else "not a field of this kind") + (
                f"; {yaml_path[-1]} belongs to kind {' or '.join(owners)}")
        else:
            message = "unknown field" + (f"; did you mean '{guess[0]}'?" if guess else "")
        if names:
            message += f" (expected one of: {', '.join(sorted(names))})"
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "union_tag_invalid":
        message = f"unknown kind {_as_yaml(err['input'].get('kind'))}; expected one of {err['ctx']['expected_tags']}"
        # at the `kind:` line that names it, not the block's
        line_col = loaded.locations.get((*yaml_path, "kind"), line_col)
    elif kind == "union_tag_not_found":
        # pydantic's own words ("Unable to extract tag using discriminator") name no choice
        kinds = ", ".join(repr(_kind_of(m)) for m in _models_at(loaded, yaml_path))
        message = "`kind` is missing" + (f"; expected one of {kinds}" if kinds else "")
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
        # Cross-field checks run on the whole spec; their message starts with the field to change.
        # A block's own cross-field checks (GQA's groups, MoE's top_k) name theirs the same way,
        # relative to the block: reported at that field, as `lint` reports it.
        named = _FIELD_PREFIX.match(message)
        if named:
            yaml_path = (*yaml_path, *named.group(1).split("."))
            message = named.group(2)
            field = dotted(yaml_path)
            line_col = next((loaded.locations[yaml_path[:cut]] for cut in range(len(yaml_path), 0, -1)
                             if yaml_path[:cut] in loaded.locations), None)
    elif kind in ("model_type", "model_attributes_type", "dict_type") and yaml_path:
        message = _not_a_mapping(loaded, yaml_path, err.get("input"))
    elif kind in ("int_type", "float_type") and isinstance(err.get("input"), (bool, str, float)):
        message = _not_a_number("an integer" if kind == "int_type" else "a number", err["input"])
    elif kind in ("int_type", "float_type") and "input" in err:
        message = f"expected {'an integer' if kind == 'int_type' else 'a number'}, got {_as_yaml(err['input'])}"
    elif kind == "string_pattern_mismatch" and yaml_path[-1:] == ("mixers",):
        message = (f"expected a pattern of the letters A (attention), S (sliding-window attention), M (the ssm) "
                   f"and H (the long_conv), repeated over the layers (e.g. MMMMAMMM); got {_as_yaml(err.get('input'))}")
    elif kind == "string_type" and "input" in err:
        # YAML reads an unquoted 2024-01-01, 7 or true as no string
        message = f"expected a string, got {_as_yaml(err['input'])}; quote it"
    elif kind == "bool_type":
        message = _not_a_boolean(err.get("input"))
    elif kind == "literal_error":
        # pydantic's "Input should be 'relu', ..." named no input for a mapping or a list
        message = f"expected {err['ctx']['expected']}, got {_as_yaml(err['input'])}"
    elif kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        message = f"expected a value {_BOUNDS[kind]} {_shown(bound)}, got {_shown(err['input'])}"
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        message = f"{message} (got {_as_yaml(err['input'])})"
    return ArchplanError(
        message, file=file, line=line_col[0] if line_col else None,
        column=line_col[1] if line_col else None, field=field,
    )


def _not_a_mapping(loaded: LoadedYaml, path: tuple, value: Any) -> str:
    """pydantic says "a valid dictionary or instance of NormSpec": a class name the user never
    wrote. Say what the block takes instead, and how to write a bare kind (`position: rope`)."""
    models = _models_at(loaded, path)
    kinds = [k for k in map(_kind_of, models) if isinstance(k, str)] if len(models) > 1 else []
    got = _as_yaml(value)
    name = path[-1]
    if isinstance(value, str) and value in kinds:
        return f"expected a mapping, got {got}; write {name}: {{kind: {value}}}"
    if kinds:
        return f"expected a mapping such as {{kind: {kinds[0]}, ...}} (kinds: {', '.join(kinds)}), got {got}"
    if models:
        return f"expected a mapping with the fields {', '.join(models[0].model_fields)}; got {got}"
    return f"expected a mapping (key: value pairs), got {got}"


def _as_yaml(value: Any, most: int = 80) -> str:
    """A value as YAML wrote it, not as Python prints it: `null`, not None; a date tagged
    `!!timestamp 2024-01-01`, not datetime.date(2024, 1, 1)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return f"the date {value.isoformat()} (!!timestamp)"
    if isinstance(value, bytes):
        return "binary data (!!binary)"
    if isinstance(value, str) and not value:
        return "an empty string"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    return clipped(repr(value), most)


_BOUNDS = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}


def _shown(value: Any) -> str:
    """A bound or a value as the user writes it: integers with thousands separators."""
    return clipped(f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else repr(value), 80)


def _not_a_boolean(value: Any) -> str:
    """The spec's booleans are strict (spec.py): YAML's true/false, unquoted."""
    if isinstance(value, str) and value.strip().lower() in ("yes", "no", "on", "off"):
        meant = "true" if value.strip().lower() in ("yes", "on") else "false"
        return (f"expected true or false, got {value!r}, which YAML 1.2 (editors, the schema) reads as text "
                f"and YAML 1.1 as {meant}; write {meant}")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return f"expected true or false, got the string {value!r}; write true or false without quotes"
    return f"expected true or false, got {_as_yaml(value, 40)}"


_SI_AMOUNT = re.compile(rf"^\s*([0-9]*\.?[0-9]+)\s*([{''.join(SI_EXPONENTS)}])\s*$", re.IGNORECASE)


def _not_a_number(expected: str, value: bool | str | float) -> str:
    """The spec's numbers are strict (spec.py): say what YAML made of the value instead."""
    if isinstance(value, bool):
        return f"expected {expected}, got a boolean ({str(value).lower()})"
    if isinstance(value, Yaml11Number):
        return f"expected {expected}, got {str(value)}: {value.reading}"
    if isinstance(value, float):
        # 1e5 is a float in YAML: an integer field wants its digits, which a whole float has (said as
        # the form to write, not as a value the field's own bounds accept)
        whole = ("integer" in expected and value.is_integer() and abs(value) < 1e18)
        return f"expected {expected}, got {value!r}" + (
            f"; an integer takes no decimal point or exponent ({int(value)})" if whole else "")
    shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}…"
    try:
        float(value.replace("_", ""))
    except ValueError:
        suffixed = _SI_AMOUNT.match(value)
        if suffixed is None:
            return f"expected {expected}, got the string {shown}"
        # The command line reads 15T (parse_amount) and 128k (a length, 2^17); a spec is YAML, whose
        # numbers have no suffixes. Only a real number's reading is unambiguous enough to offer.
        digits, suffix = suffixed.groups()
        written = "write the number in full" if "integer" in expected else \
            f"write {digits}e{SI_EXPONENTS[suffix.lower()]}"
        return f"expected {expected}, got the string {shown}; a spec's numbers take no suffix: {written}"
    return f"expected {expected}, got the string {shown}; write the number without quotes"


def _path_keys(loaded: LoadedYaml, loc: tuple) -> set:
    """Keys of `loc` that really occur in the YAML (drops pydantic's union-tag segments)."""
    keys: set = set()
    node = loaded.data
    for part in loc:
        if isinstance(node, dict) and part not in node and part == node.get("kind"):
            continue  # pydantic's discriminated-union tag, not a YAML key
        if isinstance(node, dict) and part in node:
            keys.add(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            keys.add(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str):
            keys.add(part)  # a missing/unknown key at the end of the path still names the field
            node = None
    return keys


def _valid_names(loaded: LoadedYaml, parent: tuple) -> list[str]:
    models = _models_at(loaded, parent)
    return list(models[0].model_fields) if models else []


def _kinds_with_field(loaded: LoadedYaml, parent: tuple, name: object) -> list[str]:
    """The kinds of the block at `parent` (a discriminated union) that have the field `name`."""
    if not parent:
        return []
    models = _models_at(loaded, parent[:-1])
    field = models[0].model_fields.get(parent[-1]) if models else None
    if field is None:
        return []
    kinds = (_kind_of(m) for m in _models_in(field.annotation) if name in m.model_fields)
    return [kind for kind in kinds if isinstance(kind, str)]


def _models_at(loaded: LoadedYaml, path: tuple) -> list[type[BaseModel]]:
    """The models the YAML node at `path` may be: a discriminated union's members, narrowed to the
    one its `kind` names when it names one."""
    node: Any = loaded.data
    models: list[type[BaseModel]] = [Spec]
    for part in path:
        node = node[part] if isinstance(node, (dict, list)) else None
        field = models[0].model_fields.get(part) if models else None
        if field is None:
            return []
        models = _models_in(field.annotation)
        if isinstance(node, dict) and "kind" in node:
            models = [c for c in models if _kind_of(c) == node["kind"]] or models
    return models


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _kind_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    return field.default if field is not None else None


def _binary_values(data: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """The field path of each !!binary value (bytes) in the loaded data."""
    if isinstance(data, bytes):
        yield path
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _binary_values(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _binary_values(value, (*path, i))


def spec_from_data(loaded: LoadedYaml, file: str) -> Spec:
    data = loaded.data
    if not isinstance(data, dict):
        raise ArchplanError(
            f"expected a mapping of spec fields at the top level, got {_as_yaml(data)}", file=file
        )
    binary = next(_binary_values(data, ()), None)
    if binary is not None:
        # pydantic reads bytes as a string field's text: `name: !!binary aGVsbG8=` became "hello" unsaid
        line_col = loaded.locations.get(binary)
        raise ArchplanError("binary data (!!binary) is no spec value", file=file, field=dotted(binary),
                            line=line_col[0] if line_col else None, column=line_col[1] if line_col else None)
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        # every spec block forbids extra keys, so a key that is no string fails validation too
        raise _pydantic_errors(exc, loaded, file) from None


# Partial specs of the presets `plan --solve` made (`archplan/partials/NAME.yaml`, beside the presets
# so that linting those finds only whole specs), by name as presets are: `archplan plan --solve
# gpt-4-partial --total 1.8e12 ...` runs outside a checkout too.
PARTIALS_DIR = Path(str(resources.files("archplan") / "partials"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def partial_names() -> list[str]:
    return sorted(p.stem for p in PARTIALS_DIR.glob("*.yaml"))


def find_partial_path(name_or_path: str) -> Path:
    """A bundled partial spec by its bare name (gpt-4-partial), else what `find_spec_path` finds."""
    if name_or_path in partial_names() and not Path(name_or_path).exists():
        return PARTIALS_DIR / f"{name_or_path}.yaml"
    try:
        return find_spec_path(name_or_path)
    except ArchplanError as exc:
        if Path(name_or_path).suffix or "/" in name_or_path:
            raise
        raise ArchplanError(f"no such file or bundled partial spec ({', '.join(partial_names())})",
                            file=name_or_path) from exc


def find_spec_path(name_or_path: str) -> Path:
    """A path, the name of a bundled preset (with or without .yaml), or `-`: standard input, as
    `cat` reads it (a file named `-` is `./-`)."""
    if not name_or_path.strip():
        # Path("") is the current folder, which would be reported as "is a directory"
        raise ArchplanError("the spec path is empty: give a YAML file or a preset name (`archplan presets` lists them)")
    if name_or_path == STDIN:
        return STDIN_PATH
    path = Path(name_or_path)
    if path.is_dir() and path.name in preset_names():
        # A folder is never a spec, so a bare name that is also a folder here (`mkdir gpt2`) can
        # only mean the preset; a path to the folder (`./gpt2`) is pointed at the preset's name.
        if "/" not in name_or_path:
            return PRESETS_DIR / f"{name_or_path}.yaml"
        raise ArchplanError(f"is a directory; for the bundled preset give its name alone: {path.name}",
                            file=name_or_path)
    if path.exists() or path.suffix.lower() in SPEC_SUFFIXES or "/" in name_or_path:
        if not path.exists() and path.stem in preset_names():
            # e.g. the README's `presets/70b.yaml` run outside a checkout of the repository
            raise ArchplanError(f"no such file; the bundled preset '{path.stem}' is given by its name alone",
                                file=name_or_path)
        return path
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    raise unknown_preset(name_or_path, "no such file or preset")


def unknown_preset(typed: str, what: str) -> ArchplanError:
    """`what` (no such file or preset, ...) with the bundled names closest to what was typed."""
    # close spellings, then the names that contain what was typed, its dashes aside (gpt4 is in
    # gpt-4-rumored), at most three
    names = preset_names()
    lowered = typed.lower()
    bare = lowered.replace("-", "")
    within = [name for name in names if bare in name.replace("-", "")] if bare else []
    guess = list(dict.fromkeys([*difflib.get_close_matches(lowered, names, n=3), *within]))[:3]
    hint = ("; did you mean " + " or ".join(f"preset '{name}'" for name in guess) + "?" if guess
            else "; `archplan presets` lists the bundled ones")
    return ArchplanError(f"{what}{hint}", file=typed)


def load_spec(name_or_path: str | Path) -> Spec:
    path = find_spec_path(str(name_or_path))
    file = (str(path.relative_to(PRESETS_DIR.parent)) if path.is_relative_to(PRESETS_DIR)
            else spec_source(str(name_or_path)))
    text = read_text(path)
    return spec_from_data(parse_yaml(text, file), file)
