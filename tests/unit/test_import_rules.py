"""DESIGN.md's table of who may import whom, read from every import statement (module level and
inside functions), so that the rules cannot drift. ``make lint`` runs this file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"modelpack", "optimize", "bentos", "cloud_sync", "edge_agent", "edgebento", "tools"}
# package -> the packages (or exact modules) of ours it may import, besides itself.
ALLOWED: dict[str, set[str]] = {
    "modelpack": set(),
    "optimize": {"modelpack"},
    "bentos": {"modelpack", "cloud_sync.store", "cloud_sync.s3store"},  # cloud_sync: store only
    "cloud_sync": {"modelpack"},
    "edge_agent": {"modelpack", "cloud_sync"},
    "edgebento": OURS - {"tools"},
    "tools": {"modelpack"},
}
# What a device or a small image must not load just by importing us: heavy libraries are
# imported inside the functions that need them.
HEAVY = {"bentoml", "tensorflow", "tf_keras", "torch", "onnx", "tf2onnx", "boto3", "botocore"}
LIGHT_PACKAGES = ("modelpack", "cloud_sync", "edge_agent")


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) in top))
    return found


def _allowed(package: str, module: str) -> bool:
    root = module.split(".")[0]
    if root not in OURS or root == package:
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[package])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_the_design_allows(package: str) -> None:
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _modules(package)
        for module, line, _ in _imports(path)
        if not _allowed(package, module)
    ]
    assert broken == [], "DESIGN.md's import table forbids: " + "; ".join(broken)


@pytest.mark.parametrize("package", LIGHT_PACKAGES)
def test_heavy_libraries_are_imported_inside_functions(package: str) -> None:
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {module} at module level"
        for path in _modules(package)
        for module, line, top in _imports(path)
        if top and module.split(".")[0] in HEAVY
    ]
    assert broken == [], "; ".join(broken)


def test_the_rules_see_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from edge_agent.agent import Agent\n")
    ((module, line, top),) = _imports(bad)
    assert (module, line, top) == ("edge_agent.agent", 2, False)
    assert not _allowed("modelpack", module) and not _allowed("bentos", "cloud_sync.registry")


def _edge_agent_graph() -> dict[str, set[str]]:
    """edge_agent's modules and the modules of edge_agent each imports, anywhere in it
    (``TYPE_CHECKING`` blocks and functions included: a circle there is still a circle)."""
    graph: dict[str, set[str]] = {}
    for path in _modules("edge_agent"):
        name = "edge_agent." + path.stem
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "edge_agent":
                deps |= {f"edge_agent.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edge_agent."):
                deps.add(str(node.module))
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("edge_agent.")}
        graph[name] = deps - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in graph:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# The agent and the parts that once imported it back (issue 20): each part is given the narrow
# view of edge_agent.ports it uses, and no circle may come back through any of them.
AGENT_CORE = {
    f"edge_agent.{m}"
    for m in ("agent", "commands", "dispatch", "metrics", "trust", "identity", "session", "ports")
}


def test_the_agent_and_its_command_parts_import_no_circle() -> None:
    graph = _edge_agent_graph()
    assert not any("edge_agent.agent" in deps for m, deps in graph.items() if m != "edge_agent.cli")
    circles = [sorted(c) for c in _circles(graph) if c & AGENT_CORE]
    assert circles == [], f"modules importing each other in a circle: {circles}"


def test_the_circle_finder_sees_a_circle_through_type_checking() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [{"a", "b", "c"}]
