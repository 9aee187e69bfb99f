"""CT-derived metrics agree with an independent SimpleITK computation and with the issue's values."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MSKdeXLib.anatomy.density import DensityModel
from MSKdeXLib.anatomy.ct_metrics import structure_metrics

MUSCLE_BONE_15 = ["femur_left", "femur_right", "hip_left", "hip_right", "sacrum",
                  "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
                  "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
                  "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right"]


def _independent(ct_path, labels_path, window=(-29, 150)):
    """Per-label volume (cm^3) and mass (g) with SimpleITK filters only (no MSKdeX code)."""
    ct = sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat64)
    lab = sitk.Cast(sitk.Round(sitk.Cast(sitk.ReadImage(str(labels_path)), sitk.sitkFloat64)), sitk.sitkUInt16)
    voxel_cm3 = float(np.prod(ct.GetSpacing())) / 1000.0
    rho = sitk.Maximum(ct / 1000.0 + 1.0, 0.0)
    lean = sitk.Cast(sitk.BinaryThreshold(ct, window[0], window[1], 1, 0), sitk.sitkFloat64)
    stats_all, stats_lean = sitk.LabelStatisticsImageFilter(), sitk.LabelStatisticsImageFilter()
    stats_all.Execute(rho, lab)
    stats_lean.Execute(rho * lean, lab)
    return {lbl: (stats_all.GetCount(lbl) * voxel_cm3, stats_all.GetSum(lbl) * voxel_cm3,
                  stats_lean.GetSum(lbl) * voxel_cm3) for lbl in stats_all.GetLabels()}


def test_pelvis_metrics_match_independent_computation(pelvis_case, pelvis):
    ct, labels = pelvis
    ref = _independent(pelvis_case.ct, pelvis_case.labels)
    rows = {m.structure.name: m for m in structure_metrics(ct, labels, labels.select(MUSCLE_BONE_15))}
    assert set(rows) == set(MUSCLE_BONE_15)
    for name, m in rows.items():
        vol, total, lean = ref[m.structure.label]
        expected_mass = lean if m.structure.kind == "muscle" else total
        assert m.volume_cm3 == pytest.approx(vol, rel=1e-3), name
        assert m.mass_g == pytest.approx(expected_mass, rel=1e-3), name
    # The values quoted in the issue (an independent computation by its author).
    assert rows["gluteus_medius_left"].volume_cm3 == pytest.approx(246.83, abs=0.01)
    assert rows["gluteus_medius_left"].mass_g == pytest.approx(238.59, abs=0.01)
    assert rows["iliopsoas_right"].volume_cm3 == pytest.approx(266.92, abs=0.01)
    assert rows["iliopsoas_right"].mass_g == pytest.approx(272.56, abs=0.01)


def test_chest_metrics_match_independent_computation(chest_case, chest):
    ct, labels = chest
    assert labels.table.name == "totalseg_v2"
    ref = _independent(chest_case.ct, chest_case.labels)
    chosen = labels.select(kinds=["muscle"]) + labels.select(["vertebrae_T8", "rib_left_5"])
    for m in structure_metrics(ct, labels, chosen):
        vol, total, lean = ref[m.structure.label]
        assert m.volume_cm3 == pytest.approx(vol, rel=1e-3)
        assert m.mass_g == pytest.approx(lean if m.structure.kind == "muscle" else total, rel=1e-3)


def test_lean_window_and_density_settings_change_mass(pelvis):
    ct, labels = pelvis
    s = labels.select(["gluteus_maximus_left"])
    base = structure_metrics(ct, labels, s)[0]
    narrow = structure_metrics(ct, labels, s, DensityModel(lean_window_hu=(0.0, 100.0)))[0]
    heavier = structure_metrics(ct, labels, s, DensityModel(intercept_g_cm3=1.05))[0]
    assert narrow.mass_g < base.mass_g and narrow.volume_cm3 == base.volume_cm3
    assert heavier.mass_g == pytest.approx(base.mass_g + 0.05 * base.lean_volume_cm3, rel=1e-6)


def test_cli_metrics_json(pelvis_case, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "MSKdeXLib", "metrics", "--ct", str(pelvis_case.ct), "--labels",
           str(pelvis_case.labels), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    names = {r["name"]: r for r in report["structures"]}
    assert set(MUSCLE_BONE_15) <= set(names)
    assert {"name", "label", "kind", "volume_cm3", "mass_g"} <= set(names["sacrum"])
    assert report["settings"]["density"]["lean_window_hu"] == [-29.0, 150.0]
    assert report["settings"]["table"] == "totalseg_v1"
    assert report["ct"]["spacing_mm"] == [3.0, 3.0, 3.0]
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert subprocess.run(cmd + ["--force"], capture_output=True).returncode == 0
