"""The house's shape, by a scan of the source (see docs/architecture.md): Flower is imported only at
the edges (``sites/``, ``server/``), and the modules of ``fedmae/`` import each other one way."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "fedmae"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIBRARY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[str]:
    """Every module name an import in the file names (module level, in functions, under
    TYPE_CHECKING), relative imports resolved; ``from pkg import x`` names ``pkg`` and ``pkg.x``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_nothing_in_the_library_imports_flower():
    offenders = [f"{path.relative_to(LIBRARY.parent)} imports {name}"
                 for path in sorted(LIBRARY.rglob("*.py"))
                 for name in imported_names(path) if name == "flwr" or name.startswith("flwr.")]
    assert not offenders, "Flower belongs in sites/ and server/: " + "; ".join(offenders)


def test_the_library_has_no_import_circle():
    files = {module_name(path): path for path in LIBRARY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(path):
            while imported and imported not in files:  # `import a.b.c` depends on the nearest module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        raise AssertionError(f"import circle in fedmae/: {' -> '.join(err.args[1])}") from None
