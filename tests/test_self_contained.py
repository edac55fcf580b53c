"""The repository stands alone: no file cites a document outside it, and every citation of
docs/formulas.md or docs/architecture.md names a section that exists there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("archplan", "docs", "tests", "benchmarks", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ".ini", ".sh"}
# Spelled in pieces so this file does not match itself. An absolute path of the machine a
# measurement was taken on names nothing a reader of a clone can open.
OUTSIDE = ("FORMULAS" + ".md", "DESIGN" + ".md", "../" + "shared", "/" + "work/", "/" + "tmp/", "/" + "root/")


def _text_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files.extend(
            p for p in candidates
            if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
        )
    return files


def _citations(pattern: str) -> list[tuple[Path, str]]:
    found = []
    for path in _text_files():
        for match in re.finditer(pattern, path.read_text(encoding="utf-8")):
            found.append((path.relative_to(ROOT), match.group(1)))
    return found


def test_no_file_cites_a_document_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {needle}"
        for path in _text_files()
        for needle in OUTSIDE
        if needle in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def _formula_sections() -> set[str]:
    """Headings of docs/formulas.md (`## 2.`, `### 2.7`) and the numbered items under them (§8.6)."""
    sections: set[str] = set()
    current = ""
    for line in (ROOT / "docs" / "formulas.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"#{2,4} (\d+(?:\.\d+)?)\.? ", line)
        if heading:
            current = heading.group(1)
            sections.add(current)
            continue
        item = re.match(r"(\d+)\. ", line)
        if item and current:
            sections.add(f"{current}.{item.group(1)}")
    return sections


def test_every_formulas_citation_names_an_existing_section() -> None:
    sections = _formula_sections()
    cited = _citations(r"docs/formulas\.md\s+§(\d+(?:\.\d+)?)")
    assert cited, "no citation of docs/formulas.md found"
    assert [f"{path}: §{number}" for path, number in cited if number not in sections] == []


def test_every_architecture_citation_names_an_existing_section() -> None:
    headings = [
        line.lstrip("#").strip()
        for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    ]
    cited = _citations(r'docs/architecture\.md "([^"]+)"')
    missing = [f"{path}: {name}" for path, name in cited if not any(h.startswith(name) for h in headings)]
    assert missing == []


@pytest.mark.parametrize("section", ["0", "1.4", "2.7", "2.9", "4.1", "5.2", "6.2", "8.6"])
def test_formulas_keeps_the_numbering_code_cites(section: str) -> None:
    assert section in _formula_sections()
