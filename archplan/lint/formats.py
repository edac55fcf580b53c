"""Render lint results: compiler-style text, JSON, GitHub workflow commands, SARIF 2.1.0."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

from typing_extensions import assert_never

from archplan import __version__
from archplan.errors import printable
from archplan.lint.engine import Finding, LintResult
from archplan.lint.rules import Rule, Severity
from archplan.loader import STDIN_LABEL


class Format(str, Enum):
    text = "text"
    json = "json"
    github = "github"
    sarif = "sarif"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 or word == "info" else "s")


def summary(result: LintResult) -> str:
    counts = result.counts()
    files = _plural(len(result.files), "file")
    if not result.findings:
        return f"{files} checked, no findings"
    parts = [_plural(counts[s], s) for s in ("error", "warning", "info") if counts[s]]
    return f"{files} checked: {', '.join(parts)}"


def render_text(result: LintResult) -> str:
    lines: list[str] = []
    for f in result.findings:
        lines.append(f"{printable(f.file)}:{f.line}:{f.column}: {f.code} {f.severity}: {f.labelled}")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    lines.append(summary(result))
    return "\n".join(lines) + "\n"


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code, "name": f.rule.name, "severity": f.severity, "file": f.file, "line": f.line,
        "column": f.column, "field": f.field, "message": f.message, "fix": f.fix,
    }


def render_json(result: LintResult) -> str:
    return json.dumps({
        "version": __version__,
        "files": result.files,
        "summary": result.counts(),
        "findings": [_finding_json(f) for f in result.findings],
    }, indent=2) + "\n"


def _escape_data(text: str) -> str:
    # GitHub Actions toolkit `escapeData` (actions/toolkit packages/core/src/command.ts)
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    # toolkit `escapeProperty`: data escapes plus ':' and ','
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github_command(severity: Severity) -> str:
    match severity:
        case "error":
            return "error"
        case "warning":
            return "warning"
        case "info":
            return "notice"
        case _:
            assert_never(severity)


def _github_file(file: str) -> str:
    """A finding's file as GitHub places an annotation: relative to the checkout
    ($GITHUB_WORKSPACE), as the runner itself rewrites an absolute path under it. A relative path
    is read from the checkout's root, so one from a step run in a subfolder (`working-directory:
    configs`) landed on the wrong file; outside a workflow, or outside the checkout, as given."""
    workspace = os.environ.get("GITHUB_WORKSPACE")
    if workspace and file != STDIN_LABEL:
        under = _under(file, Path(os.path.realpath(workspace)))
        if under is not None:
            return under.as_posix()
    return PurePath(file).as_posix()


def _under(file: str, root: Path) -> PurePath | None:
    """`file` relative to `root` (a folder with its links resolved), or None outside it. The
    file's folder is resolved, not the file itself: a link keeps its own name, as it is the path
    the user's repository holds."""
    path = Path(file)
    folder = Path(os.path.realpath(path.parent))
    return folder.relative_to(root) / path.name if folder.is_relative_to(root) else None


def render_github(result: LintResult) -> str:
    """One workflow command per finding, so each shows inline on the pull request's diff."""
    lines = []
    for f in result.findings:
        props = ",".join((
            f"file={_escape_property(_github_file(f.file))}",
            f"line={f.line}",
            f"col={f.column}",
            f"title={_escape_property(f'{f.code} {f.rule.name}')}",
        ))
        message = f.labelled + (f"\nfix: {f.fix}" if f.fix else "")
        lines.append(f"::{_github_command(f.severity)} {props}::{_escape_data(message)}")
    lines.append(summary(result))
    return "\n".join(lines) + "\n"


def _sarif_level(severity: Severity) -> str:
    match severity:
        case "error":
            return "error"
        case "warning":
            return "warning"
        case "info":
            return "note"
        case _:
            assert_never(severity)


def _sarif_rule(rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.rationale},
        # the anchor of the rule's heading in docs/rules.md (`## AP007 vocab-alignment`)
        "help": {"text": f"{rule.rationale}\nSource: {rule.source}\n"
                         f"See docs/rules.md#{rule.code.lower()}-{rule.name}"},
        "defaultConfiguration": {"level": _sarif_level(rule.severity)},
    }


# the base a relative URI is resolved against (SARIF 2.1.0 §3.4.4), named in the run's
# originalUriBaseIds, so that a consumer that did not run lint there can still place it
SRCROOT = "%SRCROOT%"


def _here() -> Path:
    """The base of the log's relative URIs: the checkout ($GITHUB_WORKSPACE) in a workflow step
    run inside it, whose root code scanning resolves them from (a step's `working-directory:
    configs` included), else the current folder; links resolved, as $GITHUB_WORKSPACE may name
    the checkout through a link that the current folder's physical path does not show."""
    here = Path(os.path.realpath(Path.cwd()))
    workspace = os.environ.get("GITHUB_WORKSPACE")
    if workspace:
        root = Path(os.path.realpath(workspace))
        if here.is_relative_to(root):
            return root
    return here


def _sarif_artifact(file: str) -> dict[str, Any]:
    """Where a finding's file is, as SARIF's artifactLocation (or artifact, for standard input):
    a URI reference relative to `SRCROOT` for a file under `_here()`, else a file://
    URI (a bare absolute path, or `../x.yaml`, is neither); standard input is no file to point
    at, but a stream (§3.24.6)."""
    if file == STDIN_LABEL:
        return {"description": {"text": "standard input"}}
    under = _under(file, _here())
    if under is not None:
        return {"uri": quote(under.as_posix()), "uriBaseId": SRCROOT}
    path = Path(file)
    return {"uri": (Path(os.path.realpath(path.parent)) / path.name).as_uri()}


def _sarif_location(file: str, line: int, column: int) -> list[dict[str, Any]]:
    """A result's locations: none for standard input, which has no artifact to place it in."""
    if file == STDIN_LABEL:
        return []
    return [{"physicalLocation": {"artifactLocation": _sarif_artifact(file),
                                  "region": {"startLine": line, "startColumn": column}}}]


def render_sarif(result: LintResult) -> str:
    """SARIF 2.1.0 (OASIS), the format GitHub code scanning accepts via upload-sarif."""
    index = {rule.code: i for i, rule in enumerate(result.rules)}
    results = []
    for f in result.findings:
        text = f.labelled + (f" Fix: {f.fix}" if f.fix else "")
        results.append({
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": _sarif_level(f.severity),
            # standard input's place, which no location can hold, is said in the message
            "message": {"text": text if f.file != STDIN_LABEL else f"{f.file}:{f.line}:{f.column}: {text}"},
            "locations": _sarif_location(f.file, f.line, f.column),
        })
    log = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "archplan",
                "version": __version__,
                "rules": [_sarif_rule(rule) for rule in result.rules],
            }},
            "originalUriBaseIds": {SRCROOT: {"uri": _here().as_uri().rstrip("/") + "/"}},
            # PyYAML counts a line's columns in characters (code points), not UTF-16 units (§3.14.27)
            "columnKind": "unicodeCodePoints",
            "artifacts": [{"roles": ["standardStream"], **_sarif_artifact(f)} if f == STDIN_LABEL
                          else {"location": _sarif_artifact(f)} for f in result.files],
            "results": results,
        }],
    }
    return json.dumps(log, indent=2) + "\n"


def render(result: LintResult, fmt: Format) -> str:
    match fmt:
        case Format.text:
            return render_text(result)
        case Format.json:
            return render_json(result)
        case Format.github:
            return render_github(result)
        case Format.sarif:
            return render_sarif(result)
        case _:
            assert_never(fmt)
