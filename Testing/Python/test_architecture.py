"""The package layout's rules, checked by parsing the source (no imports executed)."""

from __future__ import annotations

import ast
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
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
