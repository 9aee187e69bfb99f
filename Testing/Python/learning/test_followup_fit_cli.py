"""``mskdex followup --reader fit`` (issue 14, session 12): the follow-up fitted with the baseline CT's
physics runs end to end on the real pelvis CT at a small scale (6 mm CT, 64 px detector, modes from an
8 mm CT), writes the same outputs as the ridge reader with its own reader record, reads an unchanged
follow-up near the baseline, and refuses bad options in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from MSKdeXLib.io.outputs import write_volume
from MSKdeXLib.learning import followup_fit as ff
from MSKdeXLib.learning.followup_fit_reader import FitSettings, check_codes
from MSKdeXLib.projection.simulate import SimulationSettings, simulate_radiograph, write_dicom_dx


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "MSKdeXLib", "followup", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def files(small_baseline, tmp_path_factory):
    """Baseline CT + labels on disk and a follow-up radiograph of the unchanged CT at the baseline pose
    (DICOM; the pose as a registration.json)."""
    ct, labels, camera, pose, _, _ = small_baseline
    d = tmp_path_factory.mktemp("followup_fit")
    write_volume(d / "ct.nii.gz", ct)
    write_volume(d / "labels.nii.gz", labels.grid.with_array(labels.layers[0]))
    settings = SimulationSettings(kvp=78, noise_level=0.003, scatter_fraction=0.2)
    write_dicom_dx(d / "fu.dcm", simulate_radiograph(ct, camera, pose, settings, seed=2), camera, pose, settings, 2)
    (d / "truth.json").write_text(json.dumps({"bodies": [{"name": "truth", "ct_to_camera": pose.tolist()}]}))
    return d


def _args(d, out, *extra):
    return ("--ct", str(d / "ct.nii.gz"), "--labels", str(d / "labels.nii.gz"), "--xray", str(d / "fu.dcm"),
            "--registration", str(d / "truth.json"), "--out", str(d / out), *extra)


def test_cli_fit_reader_reads_an_unchanged_followup(files):
    """No muscle changed: every muscle reads within 12 % of its baseline, the calibrated intervals hold 0 %
    change for most, the report says which reader and what it assumes, the progress counts the modes'
    control points and the two fits."""
    d = files
    r = _cli(*_args(d, "out", "--reader", "fit", "--fit-modes", "20", "--fit-voxel-mm", "8", "--progress", "json"))
    assert r.returncode == 0, r.stderr
    steps = [json.loads(line) for line in r.stderr.splitlines() if line.startswith('{"event": "progress"')]
    doc = json.loads((d / "out" / "followup.json").read_text())
    rd = doc["reader"]
    assert rd["kind"] == "fit" and rd["settings"]["modes"] == 20 and rd["settings"]["interval_scale"] == ff.INTERVAL_SCALE
    assert 0 < rd["modes"] <= 20 and steps and steps[-1]["step"] == steps[-1]["total"] == rd["control_points"] + 2
    assert 70 < rd["acquisition"]["energy_kvp"] < 90 and rd["jacobian_s"] > 0
    assert any("deformation" in a for a in doc["assumptions"]) and any("x the fit" in a for a in doc["assumptions"])
    m = doc["muscles"]
    change = np.array([v["change_percent"] for v in m.values()])
    lo, hi = np.array([v["change_interval_percent"] for v in m.values()]).T
    assert np.all(np.abs(change) < 12), change
    assert np.mean((lo < 0) & (0 < hi)) >= 0.8 and np.all(hi - lo > 0)
    assert doc["implausible_muscles"] == [] and doc["doubtful"] is False
    assert set(doc["asymmetry"]["estimate"]) >= {"gluteus_medius", "iliopsoas"}
    rows = (d / "out" / "followup.csv").read_text().strip().splitlines()
    assert rows[0].startswith("muscle,baseline_g") and len(rows) == 1 + len(m)
    assert (d / "out" / "followup.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, message", [
    (("--reader", "lasso"), "--reader"),
    (("--reader", "fit", "--samples", "300"), "--samples does not apply to --reader fit"),
    (("--fit-modes", "10"), "--fit-modes does not apply to --reader ridge"),
    (("--reader", "fit", "--fit-voxel-mm", "0.1"), "--fit-voxel-mm must be"),
    (("--reader", "fit", "--fit-fat-mm", "-3"), "--fit-fat-mm must be"),
    (("--fit-fat-mm", "9"), "--fit-fat-mm does not apply to --reader ridge"),
    (("--reader", "fit", "--fit-pose-sd", "0.5", "-1", "8"), "--fit-pose-sd needs 3 values"),
])
def test_cli_bad_reader_options_are_one_line(files, extra, message, capsys):
    """Refused before any work, in one line, exit code 2 (in-process: ``mskdex``'s own ``main``)."""
    from MSKdeXLib.cli import main

    try:
        code = main(["followup", *_args(files, "never", *extra, "--progress", "none")])
    except SystemExit as exc:   # argparse's own refusal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (files / "never").exists()


def test_codes_outside_the_chain_are_refused(small_baseline):
    camera = small_baseline[2]
    ok = np.full((camera.rows, camera.cols), 1000.0)
    assert check_codes(ok, camera).dtype == np.float64
    for bad in (ok * 60, ok[:-1], ok * 0):
        with pytest.raises(Exception) as exc:
            check_codes(bad, camera)
        assert type(exc.value).__name__ == "UserError"
    with pytest.raises(Exception):
        FitSettings(pool_px=0)
