"""No two modules of a package import each other, directly or round a circle, read from every
import statement (module level, inside functions and under ``TYPE_CHECKING``: a circle there is
still one the next runtime import closes). edge_agent once had drift -> shadow -> updater ->
inference -> drift, through annotations only; the core now names what it offers a shadow
(``edge_agent.drift.RunTap``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_import_rules import OURS, REPO, _circles

# Every package of ours, a new one included: the last circles went by moving the shared piece
# below both sides (modelpack.writer, optimize.tf_import, bentos.k8s_options,
# cloud_sync.object_store) or naming what a phase uses of the rollout (cloud_sync.rollout_host).
ACYCLIC = tuple(sorted(OURS))


def _module_names(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _package_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of it that it imports: ``from p import m``
    counts as importing ``p.m`` when that is a module, else ``p``."""
    modules = _module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package upwards
                    up = here[: len(here) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in modules else base)
        graph[name] = {dep for dep in deps if dep in modules} - {name}
    return graph


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_modules_of_the_package_import_each_other_in_a_circle(package: str) -> None:
    circles = [sorted(c) for c in _circles(_package_graph(REPO, package))]
    assert circles == [], f"modules of {package} importing each other in a circle: {circles}"


def test_the_graph_sees_a_circle_through_annotations_functions_and_package_imports(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import b\n"
    )
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import pkg.a\ng = 1\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = _package_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert _circles(graph) == [{"pkg.a", "pkg.sub.b", "pkg.c"}]
