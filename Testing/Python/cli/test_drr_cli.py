"""``mskdex drr`` on the real pelvis CT: documented files, sums vs metrics, no overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MSKdeXLib.cli import main

ARGS = ["--rows", "88", "--cols", "80", "--pixel-spacing", "5", "--progress", "none",
        "--structures", "gluteus_medius_left,gluteus maximus right,femur_left,sacrum"]


@pytest.fixture(scope="module")
def drr_out(pelvis_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("drr") / "view"
    rc = main(["drr", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--out", str(out),
               "--rotation", "0", "0", "10", "--translation", "5", "0", "0", *ARGS])
    assert rc == 0
    return out


def test_writes_documented_files(drr_out):
    for name in ("summary.json", "drr.nrrd", "channels.nrrd", "preview.png"):
        assert (drr_out / name).stat().st_size > 0, name
    summary = json.loads((drr_out / "summary.json").read_text())
    assert summary["geometry"]["rows"] == 88 and summary["geometry"]["cols"] == 80
    pose = np.array(summary["ct_to_camera"])
    assert pose.shape == (4, 4) and np.allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3))
    chans = summary["channels"]
    assert [c["quantity"] for c in chans] == ["mass_g"] * 4 + ["volume_cm3"] * 4
    assert {c["structure"] for c in chans} == {"gluteus_medius_left", "gluteus_maximus_right",
                                               "femur_left", "sacrum"}
    stack = sitk.ReadImage(str(drr_out / "channels.nrrd"))
    arr = sitk.GetArrayFromImage(stack)
    assert arr.shape == (8, 88, 80)
    assert np.allclose(stack.GetSpacing()[:2], (5.0, 5.0))
    for c, image in zip(chans, arr):
        assert abs(image.astype(np.float64).sum() - c["sum"]) <= 1e-4 * c["sum"]
        if c["inside_detector"]:
            assert abs(c["sum"] - c["ct_metric"]) <= 5e-3 * c["ct_metric"]
    assert sum(c["inside_detector"] for c in chans) >= 6
    drr = sitk.GetArrayFromImage(sitk.ReadImage(str(drr_out / "drr.nrrd")))
    assert drr.shape == (88, 80) and drr.max() > 1.0 and drr.min() >= 0


def test_preview_is_a_picture(drr_out):
    import matplotlib.image as mpimg

    img = mpimg.imread(str(drr_out / "preview.png"))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not blank


def test_refuses_to_overwrite_then_force(drr_out, pelvis_case, capsys):
    before = (drr_out / "summary.json").read_text()
    argv = ["drr", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--out", str(drr_out),
            "--channels", "volume", *ARGS]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert (drr_out / "summary.json").read_text() == before
    assert main(argv + ["--force"]) == 0
    summary = json.loads((drr_out / "summary.json").read_text())
    assert {c["quantity"] for c in summary["channels"]} == {"volume_cm3"}


def test_user_errors_exit_2(pelvis_case, tmp_path, capsys):
    base = ["drr", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels)]
    assert main(base + ["--out", str(tmp_path / "a"), "--channels", "density", *ARGS]) == 2
    assert main(base + ["--out", str(tmp_path / "b"), *ARGS[:-1], "no_such_muscle"]) == 2
    assert main(["drr", "--ct", str(tmp_path / "missing.nii.gz"), "--labels", str(pelvis_case.labels),
                 "--out", str(tmp_path / "c"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3
