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
