"""A registration.json as the input of ``mskdex followup --registration`` (registration.documents): the
first body's pose must be a rigid 4x4 and, when recorded, the camera the radiograph's; bad files are
refused in one line naming the file (exit 2), before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from MSKdeXLib.errors import UserError
from MSKdeXLib.projection.geometry import Camera, ap_pose
from MSKdeXLib.registration.documents import check_geometry, read_known_pose

CAMERA = Camera(64, 64, 6.0, 6.0, 1000.0)
POSE = ap_pose(np.array([10.0, -20.0, 30.0]), CAMERA)


def _write(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def test_first_body_and_its_camera(tmp_path):
    other = ap_pose(np.zeros(3), CAMERA)
    doc = {"geometry": CAMERA.to_dict(), "doubtful": True,
           "bodies": [{"name": "pelvis", "ct_to_camera": POSE.tolist()}, {"name": "femur_left",
                                                                         "ct_to_camera": other.tolist()}]}
    known = read_known_pose(_write(tmp_path / "r.json", doc))
    np.testing.assert_array_equal(known.ct_to_camera, POSE)
    assert known.body == "pelvis" and known.doubtful and known.geometry == CAMERA.to_dict()
    check_geometry(known, CAMERA)
    for changed in (Camera(64, 64, 6.0, 6.0, 1100.0), Camera(64, 80, 6.0, 6.0, 1000.0),
                    Camera(64, 64, 6.0, 5.0, 1000.0), Camera(64, 64, 6.0, 6.0, 1000.0, cx=20.0)):
        with pytest.raises(UserError) as exc:
            check_geometry(known, changed)
        assert str(exc.value).startswith(str(tmp_path / "r.json")) and "another camera" in str(exc.value)
    # no camera recorded (a pose written by hand): nothing to check against
    del doc["geometry"]
    check_geometry(read_known_pose(_write(tmp_path / "r.json", doc)), Camera(10, 10, 1.0, 1.0, 500.0))


@pytest.mark.parametrize("doc, message", [
    ({"bodies": []}, "no bodies"),
    ({"bodies": ["pelvis"]}, "no bodies"),
    ({"bodies": [{"name": "p"}]}, "no 4x4 ct_to_camera"),
    ({"bodies": [{"name": "p", "ct_to_camera": [[1, 2], [3]]}]}, "no 4x4 ct_to_camera"),
    ({"bodies": [{"name": "p", "ct_to_camera": np.eye(3).tolist()}]}, "must be a 4x4 matrix"),
    ({"bodies": [{"name": "p", "ct_to_camera": (2 * np.eye(4)).tolist()}]}, "not a rigid transform"),
    ({"bodies": [{"name": "p", "ct_to_camera": POSE.tolist()}], "geometry": [1, 2]}, "'geometry' is not an object"),
    ([1, 2], "not a JSON object"),
])
def test_bad_registration_is_one_line_naming_the_file(tmp_path, doc, message):
    with pytest.raises(UserError) as exc:
        read_known_pose(_write(tmp_path / "bad.json", doc))
    text = str(exc.value)
    assert message in text and text.startswith(str(tmp_path / "bad.json")) and "\n" not in text


def test_followup_cli_refuses_a_bad_registration_first(pelvis_case, tmp_path, capsys):
    """Exit 2, one line naming the file, nothing written (a ragged matrix used to end in a traceback)."""
    from MSKdeXLib.cli import main

    bad = _write(tmp_path / "ragged.json", {"bodies": [{"name": "p", "ct_to_camera": [[1, 2], [3]]}]})
    rc = main(["followup", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--xray",
               str(tmp_path / "never-read.tif"), "--registration", bad, "--out", str(tmp_path / "out"),
               "--progress", "none"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and bad in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
