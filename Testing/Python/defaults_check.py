"""Collect the defaults and choice lists that the front ends spell out, for comparing them with
the settings objects (Testing/Python/test_defaults.py). Reusable: the Slicer module's checks add
their names to :func:`slicer_expected`.

* :func:`cli_options` walks ``build_parser()``: every option of every subcommand with its
  default (for options whose default lives in a settings dataclass: that dataclass's value, as the
  command builds it) and its choices.
* :func:`slicer_literals` parses ``MSKdeX/MSKdeX.py`` (no Slicer needed): the parameter node's field
  defaults, the keyword defaults of the Logic's methods, and tuples of string literals.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SLICER_MODULE = ROOT / "MSKdeX" / "MSKdeX.py"


def cli_options() -> dict[tuple[str, str], dict[str, Any]]:
    """{(command, dest): {"flags", "default", "choices", "help"}} of every option of every subcommand."""
    from MSKdeXLib.cli import build_parser
    from MSKdeXLib.cli.common import settings_defaults

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, sp in sub.choices.items():
        from_settings = settings_defaults(sp)
        for a in sp._actions:
            if not a.option_strings or a.dest == "help" or a.help is argparse.SUPPRESS:
                continue
            out[(name, a.dest)] = {"flags": tuple(a.option_strings),
                                   "default": from_settings.get(a.dest, a.default),
                                   "choices": None if a.choices is None else tuple(a.choices),
                                   "store_true": isinstance(a, argparse._StoreTrueAction),
                                   "help": a.help}
    return out


def _literal(node) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def slicer_literals(path: Path = SLICER_MODULE) -> dict[str, Any]:
    """{"Class.field" or "method.argument": default} of the Slicer module, plus
    "string_tuples": [tuples of string literals found anywhere in it]."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out: dict[str, Any] = {"string_tuples": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and item.value is not None and isinstance(item.target, ast.Name):
                    out[f"{node.name}.{item.target.id}"] = _literal(item.value)
        elif isinstance(node, ast.FunctionDef):
            args = node.args.args[len(node.args.args) - len(node.args.defaults):] if node.args.defaults else []
            for arg, default in zip(args, node.args.defaults):
                out[f"{node.name}.{arg.arg}"] = _literal(default)
        elif isinstance(node, ast.Tuple) and node.elts and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
            out["string_tuples"].append(tuple(e.value for e in node.elts))
    return out


def slicer_expected() -> dict[str, Any]:
    """What the Slicer module's defaults must equal, by "Class.field" / "method.argument" name."""
    from MSKdeXLib.anatomy.density import DensityModel
    from MSKdeXLib.settings import DRR_DETECTOR, SID_MM

    lo, hi = DensityModel().lean_window_hu
    return {"MSKdeXParameterNode.leanLowHU": lo, "MSKdeXParameterNode.leanHighHU": hi,
            "MSKdeXParameterNode.sidMm": SID_MM, "MSKdeXParameterNode.detectorRows": DRR_DETECTOR.rows,
            "MSKdeXParameterNode.detectorCols": DRR_DETECTOR.cols,
            "MSKdeXParameterNode.pixelSpacingMm": DRR_DETECTOR.pixel_spacing_mm,
            "computeMetrics.leanLowHU": lo, "computeMetrics.leanHighHU": hi, "startRegistration.sidMm": SID_MM}
