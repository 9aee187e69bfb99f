"""Static checks of the Slicer module (no Slicer application needed): UI <-> Widget <-> parameter
node consistency, light imports at module load, extension build files."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODULE = ROOT / "MSKdeX" / "MSKdeX.py"
UI = ROOT / "MSKdeX" / "Resources" / "UI" / "MSKdeX.ui"

#: parameter type -> widget classes whose parameterNodeWrapper connector can represent it
COMPATIBLE = {
    "node": {"qMRMLNodeComboBox"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox", "qMRMLSliderWidget", "ctkRangeWidget"},
    "int": {"QSpinBox", "ctkSliderWidget", "QSlider"},
    "bool": {"QCheckBox", "QPushButton", "QRadioButton", "ctkCheckBox"},
    "str": {"QLineEdit", "QComboBox", "ctkComboBox", "ctkPathLineEdit"},  # paths: MSKdeX's own connector
    "choice": {"QComboBox", "ctkComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}
#: widget class -> attributes/methods the Widget may use on it (beyond QWidget's)
WIDGET_API = {
    "QPushButton": {"connect", "enabled", "text"},
    "QLabel": {"text"},
    "QProgressBar": {"visible", "value", "maximum"},
    "QTableWidget": {"clear", "setRowCount", "setColumnCount", "setHorizontalHeaderLabels", "setItem"},
    "QListWidget": {"clear", "addItem", "row", "connect"},
    "QComboBox": {"clear", "addItem", "currentText", "connect"},
    "qMRMLNodeComboBox": {"connect", "currentNode", "setMRMLScene"},
    "ctkSliderWidget": {"connect", "value"},
    "QCheckBox": {"connect", "checked"},
}


def _ui_widgets() -> dict[str, tuple[str, str | None]]:
    """name -> (class, SlicerParameterName or None) of every widget in the .ui file."""
    out = {}
    for w in ET.parse(UI).getroot().iter("widget"):
        param = None
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                param = prop.find("string").text
        out[w.get("name")] = (w.get("class"), param)
    return out


def _module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _parameters() -> dict[str, str]:
    """Parameter node field -> kind (node, float, int, bool, str, choice, path)."""
    cls = _class(_module_tree(), "MSKdeXParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in cls.decorator_list)
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign):
            text = ast.unparse(stmt.annotation)
            if "vtkMRML" in text:
                kind = "node"
            elif "Choice(" in text:
                kind = "choice"
            elif "pathlib.Path" in text:
                kind = "path"
            else:
                kind = re.search(r"\b(float|int|bool|str)\b", text).group(1)
            out[stmt.target.id] = kind
    return out


def _ui_uses() -> dict[str, set[str]]:
    """Every ``self.ui.<name>`` in the module -> the attributes used on it."""
    uses: dict[str, set[str]] = {}
    for node in ast.walk(_module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            uses.setdefault(node.attr, set())
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "ui"):
            uses.setdefault(node.value.attr, set()).add(node.attr)
    return uses


def test_every_ui_name_used_by_the_widget_exists_with_a_compatible_class():
    widgets = _ui_widgets()
    uses = _ui_uses()
    assert len(uses) > 30
    for name, attrs in uses.items():
        assert name in widgets, f"self.ui.{name} is not in {UI.name}"
        cls = widgets[name][0]
        allowed = WIDGET_API.get(cls)
        if allowed is not None:
            unknown = attrs - allowed - {"enabled", "visible", "toolTip"}
            assert not unknown, f"{name} ({cls}) used with {unknown}"


def test_every_slicer_parameter_name_matches_a_parameter_of_a_compatible_type():
    params = _parameters()
    bound = {}
    for name, (cls, param) in _ui_widgets().items():
        if param is None:
            continue
        assert param in params, f"{name}: SlicerParameterName '{param}' is not a parameter node field"
        assert cls in COMPATIBLE[params[param]], f"{name} ({cls}) cannot represent {param}: {params[param]}"
        assert param not in bound, f"{param} bound to both {bound[param]} and {name}"
        bound[param] = name
    # the GUI edits (almost) every parameter
    assert len(bound) >= len(params) - 1, sorted(set(params) - set(bound))


def test_node_selectors_have_the_right_node_types_and_scene():
    root = ET.parse(UI).getroot()
    params = _parameters()
    cls = _class(_module_tree(), "MSKdeXParameterNode")
    ann = {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    for w in root.iter("widget"):
        if w.get("class") != "qMRMLNodeComboBox":
            continue
        types = [s.text for p in w.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
        param = next((p.find("string").text for p in w.findall("property") if p.get("name") == "SlicerParameterName"), None)
        assert types, w.get("name")
        assert param and params[param] == "node"
        assert set(types) == set(re.findall(r"vtkMRML\w+", ann[param])), w.get("name")
        assert w.get("name") in connected, f"{w.get('name')} never gets the scene"


#: the light core modules MSKdeX.py imports at load (defaults and the dependency list)
LIGHT_CORE = {"MSKdeXLib", "MSKdeXLib.dependencies", "MSKdeXLib.anatomy.density", "MSKdeXLib.anatomy.structures",
              "MSKdeXLib.projection.geometry"}


def test_module_load_imports_nothing_heavy():
    """Top-level imports of MSKdeX.py: Slicer/Qt/VTK, the standard library and a few light core
    modules (numpy at most: Slicer ships it; never torch); the rest inside functions."""
    import subprocess
    import sys

    tree = _module_tree()
    allowed = {"logging", "os", "pathlib", "sys", "typing", "ctk", "qt", "slicer", "vtk"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for n in names:
            assert n.split(".")[0] in allowed or n in LIGHT_CORE, f"MSKdeX.py imports {n} at load time"
    code = ("import sys; " + "; ".join(f"import {m}" for m in sorted(LIGHT_CORE)) +
            "; heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy', 'SimpleITK', "
            "'matplotlib', 'monai', 'skimage', 'safetensors', 'cma'}); print(heavy); assert not heavy")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # functions importing the heavy parts do it lazily; torch itself is never imported by the module
    assert "import torch" not in MODULE.read_text(encoding="utf-8")
    # module-level statements run at load: only the path setup call, constants, classes, functions
    for node in tree.body:
        if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Constant):
            pytest.fail(f"module-level expression at line {node.lineno}")


def test_module_finds_its_library_in_both_layouts(tmp_path):
    """The path logic of MSKdeX.py (run on its own): source checkout (../MSKdeXLib) and build
    (MSKdeXLib beside the module)."""
    tree = _module_tree()
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_add_library_path")
    import os
    import sys

    for layout in ("source", "build"):
        root = tmp_path / layout
        module_dir = root / "MSKdeX"
        lib_parent = root if layout == "source" else module_dir
        (lib_parent / "MSKdeXLib").mkdir(parents=True)
        (lib_parent / "MSKdeXLib" / "__init__.py").write_text("")
        module_dir.mkdir(exist_ok=True)
        ns = {"os": os, "sys": sys, "__file__": str(module_dir / "MSKdeX.py")}
        saved = list(sys.path)
        try:
            exec(compile(ast.Module([fn], []), str(MODULE), "exec"), ns)
            assert ns["_add_library_path"]() == str(lib_parent)
            assert sys.path[0] == str(lib_parent)
        finally:
            sys.path[:] = saved


def test_extension_build_files():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY \"Quantification\"", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
                "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MSKdeX)",
                "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert key in top, key
    mod = (ROOT / "MSKdeX" / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("slicerMacroBuildScriptedModule", "Resources/UI/MSKdeX.ui", "Resources/Icons/MSKdeX.png",
                "slicer_add_python_unittest", "MSKdeXLib"):
        assert key in mod, key
    for rel in re.findall(r"(Resources/\S+\.(?:ui|png))", mod):
        assert (ROOT / "MSKdeX" / rel).is_file(), rel
    # every MSKdeXLib source file is picked up by the CMake glob
    assert "GLOB_RECURSE" in mod and "../MSKdeXLib/*.py" in mod
    png = (ROOT / "MSKdeX" / "Resources" / "Icons" / "MSKdeX.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_logic_builds_command_lines_through_jobs_only():
    """The Logic starts subprocesses with MSKdeXLib.jobs' argument builders (checked against the
    real parsers in test_jobs.py) and spells no command-line flag itself."""
    logic = _class(_module_tree(), "MSKdeXLogic")
    methods = {f.name: f for f in logic.body if isinstance(f, ast.FunctionDef)}
    for method, builder in (("startRegistration", "register_args"), ("startTraining", "train_args"),
                            ("startEstimate", "predict_args"), ("startFollowup", "followup_args")):
        calls = {n.func.attr for n in ast.walk(methods[method]) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute)}
        assert builder in calls, f"{method} does not use jobs.{builder}"
    flags = [n.value for n in ast.walk(logic) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"--[a-z][a-z-]*", n.value)]
    assert not flags, f"the Logic spells flags itself: {flags}"
    # outputs are read with the bridge's readers of the real formats
    text = ast.unparse(logic)
    assert "channels_from_prediction" in text and "registration_to_nodes" in text and "followup_to_nodes" in text
