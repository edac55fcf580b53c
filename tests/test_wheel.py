"""A wheel built from the repository works on its own: presets, sizing and the schema path.

The wheel is built from a copy of the source tree (symlinks kept as links, build outputs left
out), installed into a fresh venv, and run with the working directory outside the repository.
The venv sees the system site-packages for the dependencies (pydantic, typer, ... without a
download; when the suite itself runs in a venv, that venv's), so the test asserts that
`archplan` itself is imported from the venv's copy, never from the source tree or an editable
install.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.xdist_group("test_wheel")

ROOT = Path(__file__).resolve().parent.parent
BUILD_OUTPUTS = (".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", ".venv")


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    # The installed setuptools builds offline; without one (Python 3.12 ships none) pip fetches
    # the build backend pyproject.toml names.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp / "wheels"),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "wheels").glob("archplan-*.whl")
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)],
                   check=True, timeout=120)
    if sys.prefix != sys.base_prefix:
        # the suite runs in a venv: --system-site-packages shows the base interpreter's packages,
        # not this venv's, so its site-packages join the path (plain lines: their .pth files,
        # an editable archplan's among them, are not run)
        purelib = sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)})
        Path(purelib, "outer-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
                    "-q", "--no-deps", str(wheel)], check=True, capture_output=True, timeout=300)
    return env


@pytest.mark.slow
def test_the_installed_wheel_is_what_runs(venv: Path, tmp_path: Path) -> None:
    out = _run(venv / "bin" / "python", "-c",
               "import archplan, archplan.loader as l, archplan.modeline as s;"
               "print(archplan.__file__); print(l.PRESETS_DIR); print(s.schema_file())", cwd=tmp_path)
    package, presets, schema = (Path(line) for line in out.stdout.splitlines())
    site = venv / "lib"
    assert package.is_relative_to(site) and presets.is_relative_to(site) and schema.is_relative_to(site)
    assert len(list(presets.glob("*.yaml"))) == len(list((ROOT / "archplan" / "presets").glob("*.yaml")))
    assert schema.is_file() and json.loads(schema.read_text())["title"] == "Spec"


@pytest.mark.slow
def test_presets_and_size_run_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    listing = _run(venv / "bin" / "archplan", "presets", "--json", cwd=tmp_path)
    names = {row["name"] for row in json.loads(listing.stdout)}
    assert {"llama-3-8b", "deepseek-v3", "mamba-2.8b"} <= names
    size = _run(venv / "bin" / "archplan", "size", "llama-3-8b", "--json", cwd=tmp_path)
    assert json.loads(size.stdout)["params"]["total"] == 8_030_261_248  # Meta's Llama 3 8B


@pytest.mark.slow
def test_an_imported_spec_points_at_the_installed_schema(venv: Path, tmp_path: Path) -> None:
    config = ROOT / "tests" / "fixtures" / "hf-configs" / "llama-3-8b.json"
    _run(venv / "bin" / "archplan", "import", "hf", config, "-o", tmp_path / "spec.yaml", cwd=tmp_path)
    modeline = (tmp_path / "spec.yaml").read_text().splitlines()[0]
    reference = modeline.removeprefix("# yaml-language-server: $schema=")
    schema = (tmp_path / reference).resolve()
    assert schema.is_file() and schema.is_relative_to(venv.resolve())


def test_the_sources_parse_as_the_oldest_python_the_package_accepts() -> None:
    """requires-python's floor holds for the package's syntax. `ast.parse`'s feature_version
    refuses some newer syntax (`except*`) but lets star-unpacking in a subscript through (3.11,
    PEP 646), which once kept every torch.distributed path from importing on 3.10."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    major, minor = (int(part) for part in floor.removeprefix(">=").split("."))
    found = []
    for path in sorted((ROOT / "archplan").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, str(path), feature_version=(major, minor))
        # `a[(x, *y)]` is 3.10 and parses to the same tree as `a[x, *y]`; only the parentheses tell
        found += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple)
                  and any(isinstance(item, ast.Starred) for item in node.slice.elts)
                  and not (ast.get_source_segment(source, node.slice) or "").startswith("(")]
    assert (major, minor) == (3, 10) and not found, found


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="builds with the installed setuptools")
def test_the_sdist_is_the_package_its_docs_and_license(tmp_path: Path) -> None:
    """MANIFEST.in: the license text and the docs beside the package; no tests or benchmarks, which
    read the checkout's links and fixtures (setuptools shipped tests/test*.py alone, which failed)."""
    import tarfile

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    out = tmp_path / "dist"
    build = f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"
    built = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (sdist,) = out.glob("archplan-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        info = archive.extractfile(next(n for n in archive.getnames() if n.endswith("/PKG-INFO") and n.count("/") == 1))
        assert info is not None
        metadata = info.read().decode()
    assert {"LICENSE", "README.md", "docs/figures.md", "archplan/presets/gpt2.yaml", "archplan/spec.schema.json"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
