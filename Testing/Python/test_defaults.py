"""No default or choice list is written twice: the command line's (and the Slicer module's)
defaults and choices equal the settings objects' (MSKdeXLib.settings says where each lives)."""

from __future__ import annotations

import numbers

import pytest
from defaults_check import cli_options, slicer_expected, slicer_literals

from MSKdeXLib.anatomy.density import DensityModel
from MSKdeXLib.anatomy.quantities import CHANNEL_KINDS
from MSKdeXLib.anatomy.structures import BUILTIN_TABLES, KINDS
from MSKdeXLib.demo import DemoSettings
from MSKdeXLib.learning.cohort import PRESETS, CohortConfig, CohortRanges
from MSKdeXLib.learning.dataset.builder import SPLIT_CHOICES, DatasetSettings
from MSKdeXLib.learning.dataset.format import NORMALISATION_METHODS
from MSKdeXLib.learning.followup import ReaderSettings
from MSKdeXLib.learning.followup_fit_reader import FitSettings
from MSKdeXLib.learning.followup_run import READERS, FollowupRequest
from MSKdeXLib.progress import MODES
from MSKdeXLib.projection.simulate import SPECTRA, SimulationSettings
from MSKdeXLib.registration.settings import RegistrationSettings
from MSKdeXLib.registration.similarity import MEASURES
from MSKdeXLib.settings import COHORT_DETECTOR, DRR_DETECTOR, MU_WATER_PER_MM, RADIOGRAPH_DETECTOR, SID_MM

#: options whose default is not a setting: identities (no extra rotation), seeds, run control
NOT_SETTINGS = {"seed", "rotation", "translation", "start", "workers", "shard", "cases", "device", "nonfinite",
                "soft_tissue", "format"}


def expected_defaults() -> dict[tuple[str, str], object]:
    """(command, dest) -> the default, read from the settings objects."""
    d, sim, rng, ds, demo = DensityModel(), SimulationSettings(), CohortRanges(), DatasetSettings(), DemoSettings()
    exp: dict[tuple[str, str], object] = {}
    for cmd in ("metrics", "drr", "cohort", "followup"):
        exp.update({(cmd, "lean_window"): d.lean_window_hu, (cmd, "density_intercept"): d.intercept_g_cm3,
                    (cmd, "density_slope"): d.slope_g_cm3_per_hu})
    for cmd in ("drr", "simulate-xray", "register", "cohort", "followup"):
        exp[(cmd, "sid")] = SID_MM
    for cmd, det in (("drr", DRR_DETECTOR), ("simulate-xray", RADIOGRAPH_DETECTOR)):
        exp.update({(cmd, "rows"): det.rows, (cmd, "cols"): det.cols, (cmd, "pixel_spacing"): [det.pixel_spacing_mm]})
    exp.update({("drr", "mu_water"): MU_WATER_PER_MM, ("drr", "channels"): ",".join(CHANNEL_KINDS),
                ("cohort", "detector"): (COHORT_DETECTOR.rows, COHORT_DETECTOR.cols),
                ("cohort", "kind"): CohortConfig.__dataclass_fields__["kinds"].default})
    exp.update({("simulate-xray", k): getattr(sim, f) for k, f in (
        ("spectrum", "spectrum"), ("kvp", "kvp"), ("filtration", "filtration_mm_al"), ("focal_spot", "focal_spot_mm"),
        ("scatter_fraction", "scatter_fraction"), ("scatter_sigma", "scatter_sigma_mm"),
        ("photons", "photons_per_mm2"), ("electronic_noise", "electronic_noise_photons"), ("bits", "bits"),
        ("gamma", "gamma"))})
    exp.update({("cohort", k): getattr(rng, k) for k in ("body_change", "max_atrophy", "max_hypertrophy",
                                                         "max_infiltration", "subcutaneous_fat_mm")})
    exp.update({("build-dataset", k): getattr(ds, f) for k, f in (
        ("image_size", "image_size"), ("kind", "kinds"), ("quantities", "quantities"),
        ("bone_quantities", "bone_quantities"), ("normalisation", "normalisation_method"), ("split", "split"),
        ("val_fraction", "val_fraction"), ("test_fraction", "test_fraction"))})
    exp.update({("demo", k): getattr(demo, f) for k, f in (
        ("subjects", "train_subjects"), ("heldout", "heldout_subjects"),
        ("calibration_subjects", "calibration_subjects"), ("steps", "steps"), ("workers", "workers"))})
    reg = RegistrationSettings()
    exp.update({("register", "similarity"): reg.similarity, ("register", "fine_px"): reg.fine_px,
                ("register", "max_evals"): reg.cma_max_evals, ("register", "refine_steps"): reg.refine_steps})
    exp.update({(cmd, "progress"): "bar" for cmd in ("drr", "simulate-xray", "register", "cohort", "build-dataset",
                                                     "train", "demo", "followup")})
    reader = ReaderSettings()
    exp.update({("followup", k): getattr(reader, k) for k in ("samples", "grid", "margin", "preset", "coverage", "poses",
                                                                  "calibration_samples", "fat_mm", "elastic_mm", "warp_mm")})
    exp[("followup", "bones")] = FollowupRequest.__dataclass_fields__["bones"].default
    exp[("followup", "reader")] = FollowupRequest.__dataclass_fields__["method"].default
    fit = FitSettings()
    exp.update({("followup", k): getattr(fit, f) for k, f in (("fit_modes", "modes"), ("fit_elastic_mm", "elastic_mm"),
                                                              ("fit_voxel_mm", "modes_voxel_mm"), ("fit_pool", "pool_px"),
                                                              ("fit_fat_mm", "fat_mm"), ("fit_pose_sd", "pose_sd"),
                                                              ("fit_pose_rounds", "pose_rounds"))})
    return exp


EXPECTED_CHOICES = {"kind": KINDS, "progress": MODES, "similarity": MEASURES, "normalisation": NORMALISATION_METHODS,
                    "split": SPLIT_CHOICES, "spectrum": SPECTRA, "preset": tuple(PRESETS),
                    "reader": READERS}


def _values(v) -> tuple:
    """A default as a tuple of values (argparse keeps nargs defaults as lists, settings as tuples)."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


@pytest.fixture(scope="module")
def options():
    return cli_options()


def test_every_cli_default_comes_from_a_settings_object(options):
    expected = expected_defaults()
    unknown, wrong = [], []
    for (cmd, dest), o in sorted(options.items()):
        if dest in NOT_SETTINGS or o["store_true"] or o["default"] is None:
            continue
        if (cmd, dest) not in expected:
            unknown.append(f"{cmd} {o['flags'][0]} = {o['default']!r}")
        elif _values(o["default"]) != _values(expected[(cmd, dest)]):
            wrong.append(f"{cmd} {o['flags'][0]}: {o['default']!r} != settings {expected[(cmd, dest)]!r}")
    assert not unknown, f"defaults not read from a settings object (add them to one and to this test): {unknown}"
    assert not wrong, wrong
    missing = sorted(set(expected) - set(options))
    assert not missing, f"options gone from the command line: {missing}"


def test_every_cli_choice_list_is_the_library_list(options):
    checked = 0
    for (cmd, dest), o in options.items():
        if o["choices"] is None or dest in NOT_SETTINGS:
            continue
        assert dest in EXPECTED_CHOICES, f"{cmd} {o['flags'][0]} spells its own choice list {o['choices']}"
        assert o["choices"] == tuple(EXPECTED_CHOICES[dest]), (cmd, dest)
        checked += 1
    assert checked >= 10


def test_help_shows_the_settings_defaults():
    """Options whose defaults live in heavy modules print them in --help (filled in when shown)."""
    import argparse

    from MSKdeXLib.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sim = sub.choices["simulate-xray"].format_help()
    assert f"(default {SimulationSettings().kvp:g})" in sim and "(default poly)" in sim
    demo = sub.choices["demo"].format_help()
    assert f"(default {DemoSettings().train_subjects}; --quick {DemoSettings.quick().train_subjects})" in demo
    cohort = " ".join(sub.choices["cohort"].format_help().split())
    lo, hi = CohortRanges().body_change
    assert f"(default {lo:g} {hi:g})" in cohort


def test_command_builds_the_settings_object_from_the_options_given():
    from MSKdeXLib.cli import build_parser
    from MSKdeXLib.cli.simulate_cmd import settings_from_args

    base = ["simulate-xray", "--ct", "ct.nii.gz", "--out", "x.dcm"]
    assert settings_from_args(build_parser().parse_args(base)) == SimulationSettings()
    s = settings_from_args(build_parser().parse_args(base + ["--kvp", "90", "--no-quantum-noise"]))
    assert (s.kvp, s.quantum_noise, s.filtration_mm_al) == (90.0, False, SimulationSettings().filtration_mm_al)


@pytest.mark.parametrize("command, extra", [("drr", ["--out", "o"]), ("simulate-xray", ["--out", "x.dcm"]),
                                            ("register", ["--xray", "x.dcm", "--out", "o"]),
                                            ("build-dataset", ["--out", "o"])])
def test_old_spacing_flag_is_a_deprecated_alias(command, extra, capsys):
    from MSKdeXLib.cli import build_parser

    args = build_parser().parse_args([command, "--ct", "ct.nii.gz", "--labels", "l.nii.gz", *extra, "--spacing", "0.5",
                                      "0.7"] if command != "build-dataset" else [command, *extra, "--spacing", "0.5", "0.7"])
    assert args.pixel_spacing == [0.5, 0.7]
    assert "--spacing is deprecated" in capsys.readouterr().err
    new = build_parser().parse_args([command, "--ct", "c", "--labels", "l", *extra, "--pixel-spacing", "0.5"]
                                    if command != "build-dataset" else [command, *extra, "--pixel-spacing", "0.5"])
    assert new.pixel_spacing == [0.5] and capsys.readouterr().err == ""


def test_slicer_module_reads_its_defaults_from_the_core():
    """The Slicer module's defaults that have a settings object are read from it (an expression on the
    core's objects), never spelled as a number; a number that is spelled must at least equal the setting."""
    found = slicer_literals()
    expected = slicer_expected()
    present = {k: found[k] for k in expected if k in found}
    assert len(present) >= 6, f"known defaults not found in MSKdeX/MSKdeX.py: {sorted(set(expected) - set(found))}"
    spelled = {k: (v, expected[k]) for k, v in present.items() if isinstance(v, numbers.Number)}
    assert not spelled, f"Slicer module spells defaults instead of reading them (value, setting): {spelled}"
    tables = set(BUILTIN_TABLES)
    for tup in found["string_tuples"]:
        if set(tup) & tables and set(tup) <= tables | {"custom"}:
            assert set(tup) >= tables, f"MSKdeX.py lists built-in tables {tup}; BUILTIN_TABLES has {sorted(tables)}"


def test_slicer_followup_reader_choices_are_the_commands():
    """The Slicer panel's follow-up reader (parameter node choice and the .ui combo box) offers exactly
    ``mskdex followup --reader``'s readers, the command's default first."""
    import re
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from MSKdeXLib.learning.followup_run import READERS, FollowupRequest

    root = Path(__file__).resolve().parents[2] / "MSKdeX"
    m = re.search(r'followupReader: Annotated\[str, Choice\(\[([^\]]*)\]\)\] = "(\w+)"', (root / "MSKdeX.py").read_text())
    assert m, "MSKdeX.py declares no followupReader choice"
    choices = [c.strip().strip('"') for c in m.group(1).split(",")]
    assert tuple(choices) == READERS and m.group(2) == FollowupRequest.__dataclass_fields__["method"].default
    combo = next(w for w in ET.parse(root / "Resources" / "UI" / "MSKdeX.ui").iter("widget")
                 if w.get("name") == "followupReaderComboBox")
    items = [i.find("property/string").text for i in combo.findall("item")]
    param = [p.find("string").text for p in combo.findall("property") if p.get("name") == "SlicerParameterName"]
    assert tuple(items) == READERS and param == ["followupReader"]


def test_command_modules_spell_no_default_number():
    """Static check: no ``add_argument(..., default=<number literal>)`` in MSKdeXLib/cli except for options
    that are not settings (seeds, identities, run control): the numbers are read from settings objects."""
    import ast
    from pathlib import Path

    import MSKdeXLib.cli as cli

    def numeric(node) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
        if isinstance(node, ast.UnaryOp):
            return numeric(node.operand)
        return isinstance(node, (ast.Tuple, ast.List)) and bool(node.elts) and all(numeric(e) for e in node.elts)

    offenders = []
    for path in sorted(Path(cli.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
                continue
            flag = next((a.value for a in node.args if isinstance(a, ast.Constant)), "?")
            dest = flag.lstrip("-").replace("-", "_")
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if default is not None and numeric(default) and dest not in NOT_SETTINGS:
                offenders.append(f"{path.name}: {flag} default={ast.unparse(default)}")
    assert not offenders, offenders
