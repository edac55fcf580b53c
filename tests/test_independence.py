"""The analytic sizer (`archplan/analytic/`) and the torch builder (`archplan/modules/`) never share
counting code (docs/architecture.md, "one spec, two interpreters, one cross-check"): read from the
sources, so every import counts, at any depth and in any form, including the ones inside a function
or under `TYPE_CHECKING` that a fresh interpreter importing the package never runs
(test_no_torch.py and test_analytic_params.py check what importing `archplan.analytic` loads)."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ANALYTIC, MODULES = "archplan.analytic", "archplan.modules"
# what both sides may reach in the rest of archplan: the plan they read (resolve, spec) and the
# error they raise, none of which counts anything; `archplan` is the package's __init__
SHARED = frozenset({"archplan", "archplan.resolve", "archplan.spec", "archplan.errors"})


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_name(path): path for path in sorted((ROOT / "archplan").rglob("*.py"))}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, name) of every import in `source`, the code of `module`: `import a.b` names a.b,
    `from a import b` names a and a.b (b may be a module), relative imports resolved against
    `module`'s package, and `importlib.import_module` of a literal name."""
    package = module if SOURCES.get(module, Path()).name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            anchor = parts[: len(parts) - node.level + 1] if node.level else []
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _edges(module: str) -> list[tuple[str, str]]:
    """(where, name) for what `module` imports: an archplan module (with the packages above it, whose
    __init__ runs first) or a name outside archplan; `where` is path:line."""
    path = SOURCES[module]
    out: list[tuple[str, str]] = []
    for line, name in imports(path.read_text(encoding="utf-8"), module):
        where = f"{path.relative_to(ROOT)}:{line}"
        if not _within(name, "archplan"):
            out.append((where, name))
        elif name in SOURCES:
            parts = name.split(".")
            out += [(where, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return out


def reached(package: str) -> dict[str, list[str]]:
    """Every name the modules of `package` import, directly or through other archplan modules, with
    the chain of imports (path:line -> name) that first reaches it."""
    chains: dict[str, list[str]] = {m: [] for m in SOURCES if _within(m, package)}
    queue = deque(chains)
    while queue:
        module = queue.popleft()
        for where, name in _edges(module):
            if name not in chains:
                chains[name] = [*chains[module], f"{where} -> {name}"]
                if name in SOURCES:
                    queue.append(name)
    return chains


@pytest.mark.parametrize("source", [
    "import archplan.analytic",
    "import archplan.analytic.flops as flops",
    "from archplan.analytic import count_params",
    "from archplan.analytic.model import ParamCount",
    "from archplan import analytic",
    "from .. import analytic",
    "from ..analytic import count_params",
    "def f():\n    from archplan.analytic.kv import kv_cache",
    "if TYPE_CHECKING:\n    from archplan.analytic import ParamCount",
    "importlib.import_module('archplan.analytic.flops')",
])
def test_every_form_of_import_is_read(source: str) -> None:
    # the reader the tests below rely on: a form it missed would let that import through unseen
    names = [name for _, name in imports(source, "archplan.modules.block")]
    assert any(_within(name, ANALYTIC) for name in names), names


def test_the_torch_modules_never_reach_the_analytic_sizer() -> None:
    # directly or through a third archplan module: the built model would count with the sizer's code
    chains = reached(MODULES)
    found = [chains[name] for name in chains if _within(name, ANALYTIC)]
    assert not found, found


def test_the_analytic_sizer_never_reaches_the_torch_modules_nor_torch() -> None:
    # the sizer is pure Python integers: no torch module to share, and torch nowhere on its path
    chains = reached(ANALYTIC)
    found = [chains[name] for name in chains if _within(name, MODULES) or _within(name, "torch")]
    assert not found, found


def test_the_two_sides_share_only_the_plan() -> None:
    # counting code moved into a third module both import is shared counting code all the same
    # (each side reaching the other's package is the two tests above)
    analytic, modules = reached(ANALYTIC), reached(MODULES)
    common = {name for name in analytic.keys() & modules.keys()
              if _within(name, "archplan") and not _within(name, ANALYTIC) and not _within(name, MODULES)}
    assert common <= SHARED, {name: (analytic[name], modules[name]) for name in common - SHARED}


def test_the_arithmetic_both_sides_read_from_resolve_is_pinned_to_published_shapes() -> None:
    """`archplan.resolve` is shared, so a mistake in the few derived sizes it holds would be made by
    both sides alike and the cross-check would not see it: each is pinned here to a published
    checkpoint's shape or a reference implementation's module list."""
    from archplan.loader import load_spec
    from archplan.resolve import MLAPlan, Mamba2Plan, S4Plan, layer_norm_names, resolve
    from archplan.spec import Parallel, PostNorm, PreNorm, Reordered, Sandwich, Spec

    # DeepSeek-V3's q_b_proj rows per head: qk_nope 128 + qk_rope 64 (HF config, 192 = 24,576 / 128)
    mla = resolve(load_spec("deepseek-v3")).layers[0].mixer
    assert isinstance(mla, MLAPlan) and mla.qk_head_dim == 192
    # state-spaces/mamba2-2.7b's conv1d.weight is (5,376, 1, 4): d_inner 5,120 + 2 · 1 group ·
    # d_state 128 (its config: d_model 2,560, expand 2, headdim 64, ngroups 1)
    mamba2_27b = Spec.model_validate({
        "name": "mamba2-2.7b", "vocab_size": 50_288, "d_model": 2560, "n_layers": 64, "max_seq_len": 2048,
        "attention": None, "ffn": None, "position": {"kind": "none"},
        "ssm": {"kind": "mamba2", "d_state": 128, "d_conv": 4, "expand": 2, "head_dim": 64, "n_groups": 1},
        "layout": {"mixers": "M"}})
    mamba2 = resolve(mamba2_27b).layers[0].mixer
    assert isinstance(mamba2, Mamba2Plan) and mamba2.conv_dim == 5376
    # Mamba-1's dt_rank "auto" is ceil(d_model / 16) (state-spaces/mamba `mamba_simple.py`,
    # `math.ceil(self.d_model / 16)`; transformers' MambaConfig time_step_rank the same): every
    # preset's d_model is a multiple of 16, where floor would agree, so d_model 24 pins it (2, not 1)
    mamba1 = Spec.model_validate({
        "name": "mamba-24", "vocab_size": 64, "d_model": 24, "n_layers": 1, "ffn": None,
        "ssm": {"kind": "mamba1"}, "layout": {"mixers": "M"}})
    assert resolve(mamba1).layers[0].mixer.dt_rank == 2
    # S4D keeps N/2 complex modes per channel, the conjugate halves implied (Gu et al. 2022 S4D
    # §3, the reference S4DKernel's A_imag of shape (H, N // 2)): d_state 64 → 32
    s4 = next(layer.mixer for layer in resolve(load_spec("s4d-lm")).layers if isinstance(layer.mixer, S4Plan))
    assert (s4.d_state, s4.modes) == (64, 32)
    # the norms of a block, by HF module names: Llama's 2, Falcon-7B's 1 (shared), GPT-NeoX's 2,
    # Gemma-2's 4, OLMo-2's 2 after the sublayers; a Mamba block without an FFN, 1
    assert len(layer_norm_names(PreNorm(), True)) == 2 and len(layer_norm_names(PostNorm(), True)) == 2
    assert layer_norm_names(Parallel(shared_norm=True), True) == ("norm1",)
    assert len(layer_norm_names(Parallel(shared_norm=False), True)) == 2
    assert len(layer_norm_names(Sandwich(), True)) == 4
    assert layer_norm_names(Reordered(), True) == ("post_norm1", "post_norm2")
    assert len(layer_norm_names(PreNorm(), False)) == 1
