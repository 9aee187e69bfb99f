"""``mskdex followup`` results as REAL Slicer MRML nodes (PyPI slicer-core): a followup.json made by
the core on the real pelvis CT (tiny reader settings) read into a table node, its figure into an RGB
volume, its warnings; a transform node's pose written as the registration the follow-up reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slicer_box import require_slicer_core

slicer = require_slicer_core()

from MSKdeXLib import slicer_bridge as sb  # noqa: E402
from MSKdeXLib.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def followup_out(pelvis_case, followup_view, tmp_path_factory, one_torch_thread):
    """A real ``mskdex followup`` output folder (run_followup, tiny settings): the CT's pose given as
    the registration.json written from a transform node holding it."""
    from MSKdeXLib.io.radiographs import write_radiograph_image
    from MSKdeXLib.learning.followup import ReaderSettings
    from MSKdeXLib.learning.followup_run import FollowupRequest, run_followup

    rg, cam, pose = followup_view
    d = tmp_path_factory.mktemp("bridge_followup")
    write_radiograph_image(d / "fu.tif", rg, force=True)
    s = slicer.vtkMRMLScene()
    node = sb.pose_to_transform_node(pose, s, "MSKdeX registered pelvis")
    node.SetAttribute("MSKdeX.body", "pelvis")
    node.SetAttribute("MSKdeX.similarity", "0.75")
    reg = sb.write_registration_json(node, d / "reg.json")
    (d / "out").mkdir()
    run_followup(FollowupRequest(str(d / "fu.tif"), str(pelvis_case.ct), str(pelvis_case.labels), d / "out", str(reg),
                                 sid_mm=cam.sid_mm, spacing_mm=rg.pixel_spacing,
                                 reader=ReaderSettings(samples=40, grid=16, poses=1, calibration_samples=0)))
    return d, pose


def test_transform_node_becomes_the_registration_followup_reads(followup_out):
    d, pose = followup_out
    reg = json.loads((d / "reg.json").read_text())
    assert reg["bodies"][0]["name"] == "pelvis" and reg["bodies"][0]["final_similarity"] == 0.75
    assert reg["doubtful"] is False
    np.testing.assert_allclose(reg["bodies"][0]["ct_to_camera"], pose, atol=1e-9)
    doc = json.loads((d / "out" / "followup.json").read_text())
    assert doc["pose"]["source"].endswith("reg.json") and doc["pose"]["body"] == "pelvis"
    np.testing.assert_allclose(doc["pose"]["ct_to_camera"], pose, atol=1e-9)


def test_followup_json_becomes_a_table_of_muscles_and_asymmetries(followup_out, scene):
    d, _ = followup_out
    doc = json.loads((d / "out" / "followup.json").read_text())
    res = sb.followup_to_nodes(d / "out", scene, exit_code=0)
    rows = sb.rows_from_table_node(res.table)
    names = list(doc["muscles"])
    stems = list(doc["asymmetry"]["estimate"])
    assert len(names) >= 6 and len(stems) >= 3
    assert [r["structure"] for r in rows] == names + [f"asymmetry {s}" for s in stems]
    t = res.table.GetTable()
    assert [t.GetColumn(c).GetName() for c in range(t.GetNumberOfColumns())] == list(sb.FOLLOWUP_COLUMNS)
    for r in rows[:len(names)]:
        m = doc["muscles"][r["structure"]]
        assert r["baseline_g"] == pytest.approx(m["baseline_g"]) and r["estimate_g"] == pytest.approx(m["estimate_g"])
        assert (r["estimate_low_g"], r["estimate_high_g"]) == pytest.approx(tuple(m["interval_g"]))
        assert r["change_percent"] == pytest.approx(m["change_percent"])
        assert (r["change_low_percent"], r["change_high_percent"]) == pytest.approx(tuple(m["change_interval_percent"]))
        assert r["estimate_low_g"] < r["estimate_g"] < r["estimate_high_g"]
        assert r["change_percent"] == pytest.approx(100 * (r["estimate_g"] / r["baseline_g"] - 1), abs=1e-6)
        assert np.isnan(r["asymmetry_estimate"])
    for r, stem in zip(rows[len(names):], stems):
        assert r["asymmetry_estimate"] == pytest.approx(doc["asymmetry"]["estimate"][stem])
        assert r["asymmetry_baseline"] == pytest.approx(doc["asymmetry"]["baseline"][stem])
        assert np.isnan(r["baseline_g"])
        # the baseline index is the CT's: (L - R) / (L + R) of the baseline rows
        left = next(x for x in rows if x["structure"] == f"{stem}_left")["baseline_g"]
        right = next(x for x in rows if x["structure"] == f"{stem}_right")["baseline_g"]
        assert r["asymmetry_baseline"] == pytest.approx((left - right) / (left + right), abs=1e-9)
    assert res.table.GetColumnUnitLabel("baseline_g") == "g"
    # an unchanged CT at its own pose: a usable result, no warning
    assert not res.warnings and not res.doubtful and res.table.GetAttribute("MSKdeX.doubtful") == "0"
    assert float(res.table.GetAttribute("MSKdeX.interval_coverage")) == doc["reader"]["interval_coverage"]
    worst = min(rows[:len(names)], key=lambda r: r["change_percent"])
    assert res.summary().startswith(f"{worst['structure']} {worst['change_percent']:+.1f} %")
    # the figure: followup.png's pixels in an RGB volume
    from PIL import Image

    png = np.asarray(Image.open(d / "out" / "followup.png").convert("RGB"))
    assert res.figure.IsA("vtkMRMLVectorVolumeNode") and res.figure.GetDisplayNode() is not None
    np.testing.assert_array_equal(sb._node_array(res.figure)[0], png)
    assert res.table.GetAttribute("MSKdeX.figure") == str(d / "out" / "followup.png")
    # shown through Slicer's slice pipeline turned to its plane: upright, not mirrored (the rendered view
    # correlates with the picture better than with its flips)
    sb.ensure_default_colors(scene)
    logic = sb.slice_logic(scene, "Yellow", "Sagittal", (png.shape[1] // 2, png.shape[0] // 2))
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(res.figure.GetID())
    logic.GetSliceNode().RotateToVolumePlane(res.figure)
    view = sb.slice_rgba(logic)[..., :3].mean(axis=2)
    small = np.asarray(Image.fromarray(png).convert("L").resize(view.shape[::-1]), float)
    corr = lambda a: np.corrcoef(a.ravel(), view.ravel())[0, 1]  # noqa: E731
    assert corr(small) > 0.6 and corr(small) > max(corr(small[::-1]), corr(small[:, ::-1])) + 0.2
    # read again: the same nodes, updated
    n = scene.GetNumberOfNodes()
    again = sb.followup_to_nodes(d / "out", scene, nodes=res)
    assert again.table is res.table and scene.GetNumberOfNodes() == n


def test_doubtful_or_implausible_results_warn(followup_out, scene, tmp_path):
    """The same real result flagged as mskdex followup flags it (exit code 3): one warning per reason."""
    d, _ = followup_out
    doc = json.loads((d / "out" / "followup.json").read_text())
    assert sb.followup_warnings(doc, 0) == []
    doubtful = {**doc, "pose": {**doc["pose"], "doubtful": True}, "doubtful": True}
    w = sb.followup_warnings(doubtful, 3)
    assert len(w) == 1 and w[0].startswith("DOUBTFUL registration (pelvis)")
    name = next(iter(doc["muscles"]))
    odd = {**doc, "implausible_muscles": [name], "doubtful": True}
    w = sb.followup_warnings(odd, 3)
    assert len(w) == 1 and "IMPLAUSIBLE" in w[0] and name in w[0]
    # an exit code 3 is never silent, whatever the document says
    assert sb.followup_warnings(doc, 3)
    (tmp_path / "followup.json").write_text(json.dumps(odd))
    res = sb.followup_to_nodes(tmp_path, scene, exit_code=3)
    assert res.doubtful and res.implausible == [name] and res.figure is None
    assert res.table.GetAttribute("MSKdeX.doubtful") == "1" and res.table.GetAttribute("MSKdeX.implausible") == name


@pytest.mark.parametrize("content, message", [
    (None, "followup.json not found"),
    ("{not json", "not valid JSON"),
    (json.dumps({"format": "mskdex-registration/1", "bodies": []}), "not a followup.json"),
    (json.dumps({"format": "mskdex-followup/1", "muscles": {"a": {"baseline_g": 1.0}}}), "incomplete muscle entry"),
])
def test_bad_followup_json_is_one_line(tmp_path, scene, content, message):
    if content is not None:
        (tmp_path / "followup.json").write_text(content)
    with pytest.raises(UserError) as exc:
        sb.followup_to_nodes(tmp_path, scene)
    assert message in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# A finished registration, found and reused by the follow-up
# ---------------------------------------------------------------------------------------------
def test_registration_nodes_remember_their_inputs_and_the_followup_finds_them(followup_registration, pelvis,
                                                                              followup_view, scene, tmp_path):
    """registration_to_nodes (a real ``mskdex register`` result) marks each body's transform node with the CT and
    radiograph it was run on and the camera; registration_for finds the first body for exactly those inputs;
    registration_mismatch refuses it for others (a hand-made pose is the user's call); the registration.json
    written from the node carries the camera, which ``mskdex followup`` checks against its radiograph."""
    from MSKdeXLib.io.radiographs import load_radiograph
    from MSKdeXLib.registration.documents import check_geometry, read_known_pose
    from MSKdeXLib.registration.run import load_geometry

    def check_known_pose(registration, xray, sid_mm, spacing_mm):   # as mskdex followup checks --registration
        check_geometry(read_known_pose(registration), load_geometry(xray, load_radiograph(xray, spacing_mm), sid_mm)[0])

    folder, xray = followup_registration
    ct, labels = pelvis
    rg, cam, _ = followup_view
    ct_node = sb.volume_to_node(ct, scene, "baseline CT")
    rg_node = sb.radiograph_to_node(rg, scene, "follow-up")
    other_rg = sb.radiograph_to_node(rg, scene, "another radiograph")
    other_ct = sb.volume_to_node(ct, scene, "another CT")
    assert sb.registration_for(scene, ct_node, rg_node) is None
    res = sb.registration_to_nodes(folder, scene, rg_node, ct_node=ct_node)
    doc = json.loads((folder / "registration.json").read_text())
    pelvis_node = res.transforms["pelvis"]
    assert pelvis_node.GetAttribute("MSKdeX.bodyIndex") == "0"
    assert json.loads(pelvis_node.GetAttribute("MSKdeX.geometry")) == doc["geometry"]
    assert pelvis_node.GetAttribute("MSKdeX.registration") == str(folder / "registration.json")
    found = sb.registration_for(scene, ct_node, rg_node)
    assert found is not None and found.GetID() == pelvis_node.GetID()
    for c, r in ((ct_node, other_rg), (other_ct, rg_node), (None, rg_node)):
        assert sb.registration_for(scene, c, r) is None
    assert sb.registration_mismatch(pelvis_node, ct_node, rg_node) is None
    msg = sb.registration_mismatch(pelvis_node, ct_node, other_rg)
    assert "radiograph 'follow-up'" in msg and "'another radiograph'" in msg and "\n" not in msg
    assert "CT 'baseline CT'" in sb.registration_mismatch(pelvis_node, other_ct, rg_node)
    by_hand = sb.pose_to_transform_node(np.asarray(doc["bodies"][0]["ct_to_camera"]), scene, "by hand")
    assert sb.registration_mismatch(by_hand, other_ct, other_rg) is None
    # the node's pose and camera as the registration.json mskdex followup reads (and checks)
    path = sb.write_registration_json(pelvis_node, tmp_path / "reg.json")
    written = json.loads(path.read_text())
    assert written["geometry"] == doc["geometry"] and written["bodies"][0]["name"] == "pelvis"
    np.testing.assert_allclose(written["bodies"][0]["ct_to_camera"], doc["bodies"][0]["ct_to_camera"], atol=1e-9)
    check_known_pose(str(path), str(xray), cam.sid_mm, None)
    with pytest.raises(UserError) as exc:
        check_known_pose(str(path), str(xray), cam.sid_mm + 100.0, None)
    assert str(exc.value).startswith(str(path)) and "sid_mm" in str(exc.value)
    with pytest.raises(UserError, match="spacing_row_mm"):
        check_known_pose(str(path), str(xray), cam.sid_mm, (5.0, 5.0))
    # read again onto another radiograph (the module reuses its nodes): the marks follow the new inputs
    again = sb.registration_to_nodes(folder, scene, other_rg, nodes=res, ct_node=ct_node)
    assert again.transforms["pelvis"] is pelvis_node
    assert sb.registration_for(scene, ct_node, rg_node) is None
    assert sb.registration_for(scene, ct_node, other_rg).GetID() == pelvis_node.GetID()
    # its CT deleted from the scene: MRML drops the reference, the registration is refused, not taken as by hand
    scene.RemoveNode(ct_node)
    assert not pelvis_node.GetNodeReferenceID("MSKdeXRegisteredCT")
    msg = sb.registration_mismatch(pelvis_node, other_ct, other_rg)
    assert msg is not None and "CT 'baseline CT'" in msg and "no longer in the scene" in msg and "\n" not in msg
    assert sb.registration_mismatch(by_hand, other_ct, other_rg) is None


def test_followup_cli_refuses_a_registration_of_another_camera(followup_registration, pelvis_case, tmp_path, capsys):
    """``mskdex followup --registration`` with the registration's own file: a different --sid is refused in one
    line naming the file (exit 2) before any work, nothing written."""
    from MSKdeXLib.cli import main

    folder, xray = followup_registration
    argv = ["followup", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--xray", str(xray),
            "--registration", str(folder / "registration.json"), "--out", str(tmp_path / "out"), "--progress", "none"]
    assert main(argv + ["--sid", "1200"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder / "registration.json") in err and "sid_mm 1000" in err
    assert not (tmp_path / "out").exists()
