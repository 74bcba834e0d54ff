"""The package's import graph: no cycles, and arrows point one way (docs/architecture.md).

Every import counts, also those inside functions (a lazy import is still a dependency: the old chunked <-> losses
and cache-command <-> pipeline cycles were lazy on one side).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmkd"

# Lower layers never import higher ones; a package may import its own layer's other packages only where listed.
LAYERS = {
    "llmkd": 0,  # the root: version and lazy exports
    "llmkd.atomic": 0,
    "llmkd.modeling": 0,
    "llmkd.losses": 1,
    "llmkd.data": 2,
    "llmkd.knowledge": 3,
    "llmkd.students": 3,
    "llmkd.teachers": 4,
    "llmkd.evaluation": 4,
    "llmkd.publish": 4,  # model cards and checkpoints that the base trainer writes
    "llmkd.export": 5,  # ONNX export: checks its model with llmkd.evaluation
    "llmkd.schemes": 5,
    "llmkd.cli": 6,
    "llmkd.compress": 6,  # the compress command's stages: may use cli-level checks (llmkd.cli.preflight)
    "llmkd.models": 6,  # kept for `from llmkd.models import student_from_teacher`
}
OUTSIDE = ("recipes", "benchmarks", "eval", "tests", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules `name` imports anywhere in its file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return out


def graph() -> nx.DiGraph:
    found = modules()
    g = nx.DiGraph()
    g.add_nodes_from(found)
    for name, path in found.items():
        for target in imports(path, name, set(found)):
            g.add_edge(name, target)
    return g


def layer(module: str) -> int:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def test_no_import_cycles():
    internal = graph().subgraph(modules())
    assert list(nx.simple_cycles(internal)) == []


def test_imports_point_down_the_layers():
    g, found = graph(), modules()
    upward = [(a, b) for a, b in g.edges if b in found and layer(b) > layer(a)]
    assert upward == []


def test_nothing_in_the_package_imports_recipes_benchmarks_or_tests():
    g = graph()
    outside = [(a, b) for a, b in g.edges if b.split(".")[0] in OUTSIDE]
    assert outside == []


def test_the_checks_can_fail():
    """Controls: the old lazy cycle and an upward import are both caught by the rules above."""
    g = nx.DiGraph(
        [("llmkd.losses", "llmkd.losses.kernels.chunked"), ("llmkd.losses.kernels.chunked", "llmkd.losses")]
    )
    assert list(nx.simple_cycles(g))
    assert layer("llmkd.cli.pipeline") > layer("llmkd.losses.response")
    assert imports(PACKAGE / "cli" / "cache.py", "llmkd.cli.cache", set(modules())) >= {"llmkd.cli.pipeline"}


def test_scripts_recipes_and_benchmarks_import_names_that_exist():
    """A module moved or renamed in the package must not leave a script outside the test suite broken."""
    import importlib

    missing = []
    for folder in OUTSIDE[:-2] + ("scripts",):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmkd"):
                    module = importlib.import_module(node.module)
                    missing += [
                        f"{path.name}: {node.module}.{a.name}" for a in node.names if not _has(module, a.name)
                    ]
    assert missing == []


def _has(module, name: str) -> bool:
    import importlib

    if hasattr(module, name):
        return True
    try:  # a submodule: `from llmkd.students import quantize`
        importlib.import_module(f"{module.__name__}.{name}")
    except ModuleNotFoundError:
        return False
    return True
