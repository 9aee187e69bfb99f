"""``mskdex followup`` results as REAL Slicer MRML nodes (PyPI slicer-core): a followup.json made by
the core on the real pelvis CT (tiny reader settings) read into a table node, its figure into an RGB
volume, its warnings; a transform node's pose written as the registration the follow-up reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML in plain Python) not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from MSKdeXLib import slicer_bridge as sb  # noqa: E402
from MSKdeXLib.errors import UserError  # noqa: E402


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(True)


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
