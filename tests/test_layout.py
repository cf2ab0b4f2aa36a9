"""The package layout's rules: imports point one way, and `import mmrag` is light."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mmrag

PACKAGE = Path(mmrag.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_checkpoints" not in p.parts}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> Iterator[str]:
    """Every mmrag module `module` imports: at module level, in functions, under
    TYPE_CHECKING; a package's `__init__` counts only as itself."""
    path = MODULES[module]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if path.name != "__init__.py":
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name.split(".")[0] == "mmrag":
                target = _resolve(name)
                if target and target != module and MODULES[target].name != "__init__.py":
                    yield target


GRAPH = {m: set(_imports(m)) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions() -> None:
    assert "mmrag.memory.milvus" not in GRAPH["mmrag.memory.memory"]  # a registry string
    assert "mmrag.models.ra_cm3.model" in GRAPH["mmrag.cli.generate"]
    assert "mmrag.checkpoints" in GRAPH["mmrag.models.gill.evaluate"]  # imported in main()


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("mmrag.documents", "mmrag."),
        ("mmrag.data", "mmrag.encoders"),
        ("mmrag.encoders", "mmrag.models"),
        ("mmrag.encoders", "mmrag.memory"),
        ("mmrag.memory", "mmrag.retrieval"),
        ("mmrag.memory", "mmrag.models"),
        ("mmrag.retrieval", "mmrag.models"),
        ("mmrag.models", "mmrag.chat"),
        ("mmrag.models", "mmrag.cli"),
        ("mmrag.models", "mmrag.server"),
        ("mmrag.chat", "mmrag.server"),
        ("mmrag.sampling", "mmrag.models"),
        ("mmrag.training", "mmrag.models"),
        ("mmrag.metrics", "mmrag.models"),
    ],
)
def test_dependencies_point_one_way(lower: str, upper: str) -> None:
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m == lower or m.startswith(lower + ".")
        for t in targets
        if t.startswith(upper) and not (t == lower or t.startswith(lower + "."))
    )
    assert wrong == []


def test_evaluations_never_import_a_trainer() -> None:
    trainers = {m for m in MODULES if m.endswith((".train", ".lite_train"))}
    evaluations = [m for m in MODULES if m.endswith(".evaluate")]
    assert evaluations
    assert {m: sorted(GRAPH[m] & trainers) for m in evaluations} == {m: [] for m in evaluations}


def test_import_mmrag_is_light_and_the_public_api_resolves() -> None:
    code = (
        "import sys, mmrag; assert 'torch' not in sys.modules, 'torch imported'; "
        "names = [n for n in mmrag.__all__ if n != '__version__']; "
        "print(len([getattr(mmrag, n) for n in names]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(mmrag.__all__) - 1
    assert {"Document", "Memory", "open_memory", "ensure_memory", "ingest", "Retriever"} <= set(
        mmrag.__all__
    )
    assert {"RACM3", "load_chat"} <= set(mmrag.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mmrag.nope
