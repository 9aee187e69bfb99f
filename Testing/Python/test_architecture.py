"""The package layout's rules, checked by parsing the source (no imports executed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "MSKdeXLib"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved), anywhere in the file."""
    pkg = _module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = (pkg[:len(pkg) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            base = [p for p in base if p]
            found.add(".".join(base))
            found |= {".".join(base + [a.name]) for a in node.names}
    return found


def test_import_parser_resolves_relative_imports():
    mods = imported_modules(LIB / "cli" / "drr_cmd.py")
    assert "MSKdeXLib.cli.common" in mods and "MSKdeXLib.projection.geometry" in mods


def test_library_never_imports_the_command_line():
    offenders = {}
    for path in sorted(LIB.rglob("*.py")):
        if "cli" in path.relative_to(LIB).parts or path.name == "__main__.py":
            continue
        bad = sorted(m for m in imported_modules(path) if m == "MSKdeXLib.cli" or m.startswith("MSKdeXLib.cli."))
        if bad:
            offenders[str(path.relative_to(LIB.parent))] = bad
    assert not offenders, f"library modules import the command line: {offenders}"


LONG_FUNCTION_LINES = 80
ARCHITECTURE_DOC = LIB.parent / "docs" / "architecture.md"


def long_functions(limit: int = LONG_FUNCTION_LINES) -> dict[str, int]:
    """{"module.py:qualified.name": lines} of every library function longer than ``limit`` lines
    (decorators and docstring included)."""
    out = {}
    for path in sorted(LIB.rglob("*.py")):
        rel = str(path.relative_to(LIB.parent))

        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - min([child.lineno] + [d.lineno for d in child.decorator_list]) + 1
                        if n > limit:
                            out[f"{rel}:{name}"] = n
                    visit(child, name + ".")

        visit(ast.parse(path.read_text(encoding="utf-8"), rel))
    return out


def test_every_long_function_is_explained_in_the_architecture_doc():
    """docs/architecture.md lists each library function over 80 lines with a sentence why (or who
    splits it), and lists no function that is no longer that long: the list stays honest."""
    doc = ARCHITECTURE_DOC.read_text(encoding="utf-8")
    section = doc.split("## Long functions", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(MSKdeXLib/[\w/]+\.py:[\w.]+)`", section))
    found = long_functions()
    assert not set(found) - listed, f"long functions missing from docs/architecture.md: {sorted(set(found) - listed)}"
    assert not listed - set(found), f"docs/architecture.md lists functions no longer > 80 lines: {sorted(listed - set(found))}"


if __name__ == "__main__":  # python Testing/Python/test_architecture.py: the list for the doc
    for name, n in sorted(long_functions().items(), key=lambda kv: -kv[1]):
        print(f"- `{name}` ({n} lines)")
