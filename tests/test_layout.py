"""The package's shape: no import cycles, no lower layer importing a higher one, a small top level,
and every file the code and the docs cite exists in the repository.

Layers, lowest first (a module may import its own layer and those below it; imports inside
functions count too, since a lazy import is still a dependency)::

    0  errors, io                              file formats, the error hierarchy
    1  config, losses, lora, parallel,         the core every family shares
       checkpoint, trainer
    2  models                                  Flax networks (and their tokenizers)
    3  convert                                 PyTorch <-> Flax per model family
    4  diffusion, vila_u, data, fairness,      per-family pipelines, datasets, metrics, the toy
       toy.world, toy.model                    world's renderer and model
    5  tasks                                   thin model adapters for the trainer
    6  train, generate, evaluate,              entry points and applications
       data.build_prefs, analysis, toy
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fairjax"

LAYERS = {
    "fairjax": 0, "fairjax.errors": 0, "fairjax.io": 0,
    "fairjax.config": 1, "fairjax.losses": 1, "fairjax.lora": 1, "fairjax.parallel": 1,
    "fairjax.checkpoint": 1, "fairjax.trainer": 1,
    "fairjax.models": 2,
    "fairjax.convert": 3,
    "fairjax.diffusion": 4, "fairjax.vila_u": 4, "fairjax.data": 4, "fairjax.fairness": 4,
    "fairjax.toy.world": 4, "fairjax.toy.model": 4,
    "fairjax.tasks": 5,
    "fairjax.train": 6, "fairjax.generate": 6, "fairjax.evaluate": 6, "fairjax.data.build_prefs": 6,
    "fairjax.analysis": 6, "fairjax.toy": 6, "fairjax.locate_bias": 6,
}
MAX_TOP_LEVEL_MODULES = 12


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """fairjax modules that ``path`` imports anywhere (module level or inside functions)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import fairjax.a.b.c` of a name inside a module
                name = name.rpartition(".")[0]
            if name.startswith("fairjax"):
                deps.add(name)
    return deps


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer: add it to LAYERS in tests/test_layout.py"
    return LAYERS[best]


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_lower_layer_imports_a_higher_one():
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
           for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not bad, "\n".join(bad)


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_top_level_keeps_the_entry_points_and_the_core():
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules at the top of fairjax/: {top}"


def test_checker_sees_a_planted_cycle_and_a_layer_violation():
    """The two checks above fail on a graph that has what they look for."""
    saved = dict(GRAPH)
    try:
        GRAPH["fairjax.models.unet"] = GRAPH["fairjax.models.unet"] | {"fairjax.tasks.diffusion_pref"}
        assert _cycle() is not None
        with pytest.raises(AssertionError, match="fairjax.models.unet .layer 2. imports fairjax.tasks"):
            test_no_lower_layer_imports_a_higher_one()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


# ----------------------------------------------------------------------------- cited files

_CITED = re.compile(r"(?<![\w/.-])((?:docs|bench|tools|configs|launch|tests|fairjax)/[\w./-]+\.(?:py|md|sh|sbatch|json|txt))")
_OUTSIDE = re.compile(r"(?<![\w/])(DESIGN\.md|REFERENCE\.md)|\.\./shared")


def _text_files():
    for sub in ("fairjax", "tools", "bench", "configs", "launch", "docs", "tests", ".ci"):
        for path in (ROOT / sub).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".sh", ".sbatch", "") and "__pycache__" not in path.parts:
                yield path
    yield ROOT / "README.md"
    yield ROOT / "BENCHMARKS.md"


def test_every_cited_file_exists():
    missing = []
    for path in _text_files():
        text = path.read_text(errors="replace")
        for m in _CITED.finditer(text):
            cited = m.group(1).rstrip(".")
            if "*" in cited or "<" in cited or "{" in cited:
                continue
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_nothing_cites_files_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _text_files() if p.name != "test_layout.py"
           for m in _OUTSIDE.finditer(p.read_text(errors="replace"))]
    assert not bad, "\n".join(bad)


_DOTTED = re.compile(r"(?<![\w.])fairjax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(ref: str, cache: dict) -> bool:
    import importlib

    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        if mod not in MODULES:
            continue
        if mod not in cache:
            cache[mod] = importlib.import_module(mod)
        obj = cache[mod]
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_dotted_name_the_code_and_docs_cite_exists():
    """``fairjax.a.b.name`` in docstrings, docs and scripts names a module and an attribute that exist
    (a moved function leaves no reference to its old home)."""
    cache: dict = {}
    bad = set()
    for path in _text_files():
        if path.name == "test_layout.py":
            continue
        for m in _DOTTED.finditer(path.read_text(errors="replace")):
            ref = m.group(0).rstrip(".")
            if ref == "fairjax.json":  # the model-dir index file, not a module
                continue
            if not _resolves(ref, cache):
                bad.add(f"{path.relative_to(ROOT)} cites {ref}")
    assert not bad, "\n".join(sorted(bad))
