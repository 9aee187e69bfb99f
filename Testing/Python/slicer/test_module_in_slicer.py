"""The MSKdeX module driven through Slicer's own Python (5.8.1 and 5.10.0) as a user would.

Every test runs once per Slicer release (the ``box`` fixture); see slicer_box.py for what is
real and what is stood in. Issue 13's defects each have a test here (named in its docstring).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_REGISTRATION, alive, launcher_children

ROOT = Path(__file__).resolve().parents[3]


def _radiograph_file(pelvis, path: Path, rows=72, cols=80, spacing=5.0) -> Path:
    """A radiograph file (2D NRRD with its pixel spacing) rendered from the real pelvis CT at the
    default AP view: what a user loads with File > Add Data. (slicer-core's ITK reads NRRD but
    not TIFF/PNG; Slicer reads all of them with the same archetype reader, same geometry.)"""
    import SimpleITK as sitk
    import torch

    from MSKdeXLib.projection.geometry import Camera
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    ct, labels = pelvis
    cam = Camera(rows, cols, spacing, spacing, 1000.0)
    with torch.no_grad():
        img = DRRRenderer(ct, cam, labels=labels).attenuation(torch.as_tensor(default_view(ct, labels, cam)))[0]
    image = sitk.GetImageFromArray(img.numpy().astype(np.float32))
    image.SetSpacing((spacing, spacing))
    sitk.WriteImage(image, str(path))
    return path


def _rows(table_node):
    from MSKdeXLib import slicer_bridge as sb

    return sb.rows_from_table_node(table_node)


def _wait_idle(box, widget, timeout=240):
    box.process_events(until=lambda: widget._job is None, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Defect 1: the parameter node
# ---------------------------------------------------------------------------------------------
def test_setup_creates_a_parameter_node_bound_to_every_widget(box, panel):
    """Defect 1 (Optional node types): setup() and enter() give a parameter node; every
    parameter is connected to its widget both ways; nodes can be unset (None)."""
    p = panel._parameterNode
    assert p is not None
    ui = panel.ui
    names = {w.property("SlicerParameterName") for w in vars(ui).values() if w.property("SlicerParameterName")}
    assert names == set(type(p).allParameters)
    # GUI -> parameter node -> GUI
    ui.sidSpinBox.value = 1100.0
    assert p.sidMm == 1100.0
    p.detectorRows = 128
    assert ui.detectorRowsSpinBox.value == 128
    ct = box.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    ui.ctVolumeSelector.setCurrentNode(ct)
    assert p.ctVolume is ct
    p.ctVolume = None
    assert ui.ctVolumeSelector.currentNode() is None and p.ctVolume is None
    assert not box.errors


def test_hu_window_widgets_keep_their_range(box, panel):
    """Defect 11 (HU range widgets overridden to +-inf): the lean HU spin boxes keep a finite
    range that holds the core's default window."""
    from MSKdeXLib.anatomy.density import DensityModel

    lo, hi = DensityModel().lean_window_hu
    for w, v in ((panel.ui.leanLowSpinBox, lo), (panel.ui.leanHighSpinBox, hi)):
        assert np.isfinite(w.minimum) and np.isfinite(w.maximum)
        assert w.minimum <= v <= w.maximum and w.value == v


def test_defaults_come_from_the_core(box, panel):
    """The module's defaults are the core's: lean HU window (DensityModel), SID and detector
    (Camera)."""
    from MSKdeXLib.anatomy.density import DensityModel
    from MSKdeXLib.projection.geometry import Camera

    p = panel._parameterNode
    assert (p.leanLowHU, p.leanHighHU) == tuple(DensityModel().lean_window_hu)
    cam = Camera()
    assert (p.sidMm, p.detectorRows, p.detectorCols, p.pixelSpacingMm) == (
        cam.sid_mm, cam.rows, cam.cols, cam.spacing_row_mm)


def test_unset_paths_show_empty(box, panel):
    """Defect 11 ('.' shown for unset paths): a path nobody chose shows as an empty field."""
    for name in ("datasetPathLineEdit", "trainConfigPathLineEdit", "trainOutputPathLineEdit",
                 "modelPathLineEdit"):
        assert getattr(panel.ui, name).currentPath == "", name
    assert not panel.ui.startTrainingButton.enabled and not panel.ui.applyButton.enabled


# ---------------------------------------------------------------------------------------------
# Defect 2: sample data
# ---------------------------------------------------------------------------------------------
def test_sample_data_loads_through_slicers_sample_data(box, sample_cache, pelvis):
    """Defect 2 (loadFileProperties list; downloadSample returns one node): the registered
    sources load with SampleData's own code (checksums verified) as a CT and a label map."""
    import SampleData

    box.load_module()
    logic = box.py.MSKdeXLogic()
    ct, labels = logic.loadSampleData()
    assert ct.IsA("vtkMRMLScalarVolumeNode") and not ct.IsA("vtkMRMLLabelMapVolumeNode")
    assert labels.IsA("vtkMRMLLabelMapVolumeNode")
    ct_core, lab_core = pelvis
    assert box.slicer.util.arrayFromVolume(ct).shape == ct_core.array.shape
    assert logic.labelMap(ct, labels).table.name == "totalseg_v1"
    # every source registered for the Sample Data panel loads on its own, one node each
    sources = SampleData.SampleDataLogic.sampleDataSourcesByCategory("MSKdeX")
    assert sources
    for source in sources:
        node = SampleData.SampleDataLogic().downloadSample(source.sampleName)
        assert node is not None and node.GetScene() is box.scene
    assert not box.errors


# ---------------------------------------------------------------------------------------------
# Defects 3 and 4: dependencies
# ---------------------------------------------------------------------------------------------
def test_every_job_asks_for_its_dependencies_first(box, panel, sample_cache, pelvis, tmp_path, monkeypatch):
    """Defect 4 (DRR / registration never ensure torch) and 3: every action that needs the
    module's runtime packages asks for them first; when the user declines, nothing runs."""
    asked = []

    def decline(*args, **kwargs):
        asked.append(True)
        return False

    for name in ("ensureDependencies", "ensureTorch"):
        if hasattr(panel.logic, name):
            monkeypatch.setattr(panel.logic, name, decline)
    panel.ui.loadSampleButton.click()
    p = panel._parameterNode
    p.radiograph = box.slicer.util.loadVolume(str(_radiograph_file(pelvis, tmp_path / "xray.nrrd")))
    p.followupRadiograph = p.radiograph
    p.detectorRows = p.detectorCols = 32
    p.pixelSpacingMm = 10.0
    for button in (panel.ui.updateDRRButton, panel.ui.runRegistrationButton, panel.ui.readFollowupButton):
        n = len(asked)
        assert button.click()
        assert len(asked) == n + 1, button.objectName
    assert p.drrVolume is None and panel._job is None


# ---------------------------------------------------------------------------------------------
# Defect 5: cancel through the launcher
# ---------------------------------------------------------------------------------------------
def test_cancel_stops_the_worker_behind_the_launcher(box, panel, tiny_dataset, launcher, tmp_path):
    """Defect 5: inside Slicer the job's process is the PythonSlicer launcher, which does not
    forward signals; Cancel must stop the worker (its process group) and the panel leaves busy."""
    import json

    data, cfg = tiny_dataset
    long_cfg = tmp_path / "long.json"
    long_cfg.write_text(json.dumps({**json.loads(cfg.read_text(encoding="utf-8")), "steps": 100000}))
    p = panel._parameterNode
    p.datasetFolder, p.trainConfig, p.trainOutputFolder = str(data), str(long_cfg), str(tmp_path / "model")
    p.trainDevice = "cpu"
    assert panel.ui.startTrainingButton.click()
    job = panel._job
    assert job is not None and panel.ui.cancelTrainingButton.enabled
    box.process_events(until=lambda: job.state.step >= 1, timeout=180)  # training really runs
    workers = launcher_children(launcher)
    assert workers and all(alive(w) for w in workers)
    panel.ui.cancelTrainingButton.click()
    box.process_events(until=lambda: panel._job is None, timeout=30)
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)
    assert panel.ui.startTrainingButton.enabled and not panel.ui.cancelTrainingButton.enabled
    assert "cancelled" in panel.ui.statusLabel.text


# ---------------------------------------------------------------------------------------------
# Defect 6: the bones field's hint
# ---------------------------------------------------------------------------------------------
def test_bones_placeholder_is_valid_input(box, panel, pelvis):
    """Defect 6: what the Bones field suggests is what the registration parser accepts."""
    from MSKdeXLib.registration.pipeline import parse_bodies

    hint = panel.ui.registrationBonesLineEdit.placeholderText
    text = hint.split("e.g.", 1)[-1].strip()
    bodies = parse_bodies(text, pelvis[1])
    assert len(bodies) >= 2


# ---------------------------------------------------------------------------------------------
# Defect 7: overlays in the volume's own plane
# ---------------------------------------------------------------------------------------------
def _slice_normal(slice_node):
    m = slice_node.GetSliceToRAS()
    return np.array([m.GetElement(r, 2) for r in range(3)])


def _volume_normal(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    k = np.array([m.GetElement(r, 2) for r in range(3)])
    return k / np.linalg.norm(k)


def test_radiograph_overlay_lies_in_the_image_plane(box, pelvis, tmp_path):
    """Defect 7: a radiograph loaded the normal Slicer way (File > Add Data: a 2D image lies
    in the axial plane) is shown face-on, not edge-on."""
    box.load_module()
    node = box.slicer.util.loadVolume(str(_radiograph_file(pelvis, tmp_path / "xray.nrrd")))
    logic = box.py.MSKdeXLogic()
    logic.showInSliceView(node)
    red = box.slicer.app.layoutManager().sliceWidget("Red")
    assert abs(np.dot(_slice_normal(red.mrmlSliceNode()), _volume_normal(node))) == pytest.approx(1.0, abs=1e-6)
    from MSKdeXLib import slicer_bridge as sb

    rgba = sb.slice_rgba(red.sliceLogic(), fit=False)
    assert (rgba[..., :3].std(axis=(0, 1)) > 5).all()  # the image, not a line


def test_qa_view_follows_the_value_just_chosen(box, panel, pelvis, tmp_path):
    """Defect 10: moving the QA opacity slider shows the value just chosen (the QA handler ran
    before the parameter node had it), and the checkerboard box switches the view."""
    util = box.slicer.util
    p = panel._parameterNode
    p.radiograph = util.loadVolume(str(_radiograph_file(pelvis, tmp_path / "xray.nrrd", rows=40, cols=44, spacing=8.0)))
    p.drrVolume = util.loadVolume(str(tmp_path / "xray.nrrd"), {"name": "drr"})
    panel.onQAChanged()  # what a finished registration does
    comp = box.slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
    for value in (0.8, 0.3, 0.65):
        panel.ui.qaOpacitySlider.value = value
        assert comp.GetForegroundOpacity() == pytest.approx(value)
    panel.ui.checkerboardCheckBox.checked = True
    assert comp.GetForegroundVolumeID() is None
    assert box.scene.GetNodeByID(comp.GetBackgroundVolumeID()).GetName() == "MSKdeX checkerboard"


# ---------------------------------------------------------------------------------------------
# Defect 9: saving the user's nodes for the subprocesses
# ---------------------------------------------------------------------------------------------
def test_saving_inputs_keeps_the_users_files_and_transforms(box, pelvis_case):
    """Defect 9: writing the CT for a subprocess neither re-points the node's own storage (the
    user's file) nor ignores a parent transform."""
    import SimpleITK as sitk
    import vtk

    box.load_module()
    node = box.slicer.util.loadVolume(str(pelvis_case.ct))
    before = node.GetStorageNode().GetFileName()
    t = box.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)  # 25 mm to the patient's right... RAS +x = left; LPS x = -25
    t.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(t.GetID())
    logic = box.py.MSKdeXLogic()
    path = logic._save(node, "ct.nii.gz")
    assert node.GetStorageNode().GetFileName() == before
    written = sitk.ReadImage(path)
    original = sitk.ReadImage(str(pelvis_case.ct))
    np.testing.assert_allclose(np.subtract(written.GetOrigin(), original.GetOrigin()), [-25.0, 0, 0], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Defect 11: module housekeeping and packaging
# ---------------------------------------------------------------------------------------------
def test_cleanup_stops_timers_and_observers(box, panel):
    """Defect 11 (timers left running in cleanup()): after the module is unloaded no timer of
    the panel runs and no scene observer of it is left."""
    panel._drrTimer.start()
    panel._jobTimer.start()
    box.exit()
    box.unload()
    assert not box.active_timers()
    assert not panel.Observations


def test_help_links_to_this_modules_documentation(box):
    """Defect 11 (documentation link to a page that does not exist): the help links to the
    repository's docs/slicer.md, which exists."""
    import re

    box.load_module()
    links = re.findall(r'href="([^"]+)"', box.parent.helpText)
    assert links and not any("slicer.readthedocs.io" in u for u in links)
    for url in links:
        m = re.match(r"https://github.com/mskdex/SlicerMSKdeX/blob/main/(.+)$", url)
        assert m and (ROOT / m.group(1)).is_file(), url


def test_self_test_registered_once(box):
    """Defect 11 (self-test registered twice): MSKdeXTest runs from one ctest registration."""
    box.load_module()
    assert "MSKdeX" in box.slicer.selfTests
    cmake = [p.read_text(encoding="utf-8") for p in (ROOT / "MSKdeX").rglob("CMakeLists.txt")]
    regs = sum(t.count("slicer_add_python_unittest") for t in cmake)
    assert regs == 1
    assert not (ROOT / "MSKdeX" / "Testing" / "Python" / "MSKdeXSelfTest.py").exists()


@pytest.mark.slow
@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_self_test_passes(box, pelvis_case, launcher, monkeypatch):
    """The module's own self-test (MSKdeXTest.runTest, what Slicer's ctest runs) passes here: CT
    metrics, overlay, DRR and the follow-up step (a tiny registration, picked up by the follow-up)."""
    monkeypatch.setenv("MSKDEX_DATA", str(pelvis_case.ct.parent.parent))
    box.load_module()
    test = box.py.MSKdeXTest()
    steps = []
    monkeypatch.setattr(test, "delayDisplay", lambda message, *a, **k: steps.append(message))
    test.runTest()
    assert "Follow-up passed" in steps and "Test passed" in steps, steps
    assert not box.errors, box.errors


# ---------------------------------------------------------------------------------------------
# The whole session, as a user would click it (defects 8, 10 and everything together)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_user_session(box, panel, sample_cache, pelvis, tiny_dataset, launcher, tmp_path):
    """Load sample -> metrics -> DRR -> registration (real subprocess, tiny settings) -> QA ->
    train a tiny model -> estimate -> export CSV -> Close Scene -> estimate again (defect 8)
    -> exit -> cleanup. QA opacity changes are applied with the new value (defect 10)."""
    ui, util = panel.ui, box.slicer.util
    p = panel._parameterNode
    panel.logic.registrationExtraArgs = list(TINY_REGISTRATION)

    # inputs
    assert ui.loadSampleButton.click()
    assert p.ctVolume is not None and p.segmentation is not None
    assert ui.structuresTableWidget.rowCount() > 5
    assert "totalseg_v1" in ui.structureTableLabel.text

    # CT metrics
    assert ui.computeMetricsButton.enabled and ui.computeMetricsButton.click()
    rows = _rows(p.metricsTable)
    assert {"gluteus_maximus_left", "femur_right"} <= {r["name"] for r in rows}

    # DRR
    p.detectorRows = p.detectorCols = 48
    p.pixelSpacingMm = 6.0
    assert ui.updateDRRButton.click()
    assert util.arrayFromVolume(p.drrVolume).shape == (1, 48, 48)

    # registration on a radiograph file loaded the normal way
    xray = util.loadVolume(str(_radiograph_file(pelvis, tmp_path / "xray.nrrd", rows=48, cols=56, spacing=6.0)))
    p.radiograph = xray
    p.registrationBones = "pelvis,femur_left"
    p.followupRadiograph = xray  # the same radiograph read as a follow-up: the registration is picked up
    assert p.followupRegistration is None
    assert ui.runRegistrationButton.enabled and ui.runRegistrationButton.click()
    assert ui.cancelRegistrationButton.enabled and not ui.runRegistrationButton.enabled
    _wait_idle(box, panel)
    assert not box.errors, box.errors
    assert "pelvis" in ui.similarityLabel.text
    assert p.registrationTransform is not None and p.drrVolume is not None
    assert p.registrationTransform.GetAttribute("MSKdeX.body") == "pelvis"
    assert p.followupRegistration is not None and p.followupRegistration.GetID() == p.registrationTransform.GetID()
    red = box.slicer.app.layoutManager().sliceWidget("Red")
    comp = red.mrmlSliceCompositeNode()
    assert comp.GetBackgroundVolumeID() == xray.GetID() and comp.GetForegroundVolumeID() == p.drrVolume.GetID()
    ui.qaOpacitySlider.value = 0.8  # defect 10: the view shows the value just chosen
    assert comp.GetForegroundOpacity() == pytest.approx(0.8)
    ui.qaOpacitySlider.value = 0.3
    assert comp.GetForegroundOpacity() == pytest.approx(0.3)

    # training
    data, cfg = tiny_dataset
    p.datasetFolder, p.trainConfig, p.trainOutputFolder = str(data), str(cfg), str(tmp_path / "model")
    p.trainDevice = "cpu"
    assert ui.startTrainingButton.enabled and ui.startTrainingButton.click()
    _wait_idle(box, panel)
    assert not box.errors, box.errors
    assert (tmp_path / "model" / "config.json").is_file()
    assert str(p.modelFolder) == str(tmp_path / "model")

    # estimate on the radiograph
    p.device = "cpu"
    assert ui.applyButton.enabled and ui.applyButton.click()
    _wait_idle(box, panel)
    assert not box.errors, box.errors
    est = _rows(p.estimatesTable)
    assert [r["structure"] for r in est] == ["hip_left", "gluteus_medius_left"]
    assert ui.structureVisibilityListWidget.count == 2
    assert comp.GetLabelVolumeID()  # the channels' label map over the radiograph
    assert abs(np.dot(_slice_normal(red.mrmlSliceNode()), _volume_normal(xray))) == pytest.approx(1.0, abs=1e-6)

    # export
    from slicer_box import QFileDialog

    QFileDialog.nextSavePath = str(tmp_path / "estimates.csv")
    assert ui.exportCsvButton.click()
    with open(tmp_path / "estimates.csv") as f:
        assert [r["structure"] for r in csv.DictReader(f)] == ["hip_left", "gluteus_medius_left"]

    # File > Close Scene, then the same again on a radiograph loaded afresh (defect 8)
    box.close_scene()
    p = panel._parameterNode
    assert p is not None and p.radiograph is None and p.estimatesTable is None
    xray2 = util.loadVolume(str(tmp_path / "xray.nrrd"))
    p.radiograph, p.modelFolder, p.device = xray2, str(tmp_path / "model"), "cpu"
    assert ui.applyButton.enabled and ui.applyButton.click()
    _wait_idle(box, panel)
    assert not box.errors, box.errors
    assert p.estimatesTable is not None and p.estimatesTable.GetScene() is box.scene
    assert len(_rows(p.estimatesTable)) == 2
    assert box.scene.GetNodeByID(comp.GetLabelVolumeID()) is not None

    box.exit()
    box.unload()
    assert not box.active_timers()
    assert panel._job is None


@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_doubtful_registration_is_shown_not_failed(box, panel, sample_cache, pelvis, launcher, tmp_path):
    """Found by the harness: ``mskdex register`` exits 3 when a registration is doubtful (its
    outputs written); the panel loads them and flags the body instead of reporting a failure.
    The radiograph here is a lateral parallel projection: an AP registration of the bones cannot match
    it (an AP parallel projection, used before round 10 of the registration, is near enough to a
    cone-beam view that the registration's tissue candidate can match it)."""
    import SimpleITK as sitk

    ct, _ = pelvis
    rho = np.clip(1 + ct.array / 1000.0, 0, None).sum(axis=2)[::-1, ::-1].astype(np.float32)
    image = sitk.GetImageFromArray(rho)
    image.SetSpacing((3.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "parallel.nrrd"))
    ui, p = panel.ui, panel._parameterNode
    panel.logic.registrationExtraArgs = list(TINY_REGISTRATION)
    assert ui.loadSampleButton.click()
    p.radiograph = box.slicer.util.loadVolume(str(tmp_path / "parallel.nrrd"))
    p.registrationBones = "pelvis"
    assert ui.runRegistrationButton.click()
    job = panel._job
    _wait_idle(box, panel)
    assert job.returncode == 3
    assert not box.errors, box.errors
    assert "doubtful: pelvis" in ui.doubtfulLabel.text and "pelvis" in ui.similarityLabel.text
    assert p.registrationTransform is not None and p.registrationTransform.GetAttribute("MSKdeX.doubtful") == "1"


# ---------------------------------------------------------------------------------------------
# Follow-up (issue 14's command in the panel)
# ---------------------------------------------------------------------------------------------
def test_followup_button_needs_the_case_and_a_follow_up_radiograph(box, panel, followup_view, tmp_path, monkeypatch):
    """The Follow-up section's parameters are bound under Slicer's parameterNodeWrapper; *Read
    follow-up* is enabled only with a CT, a segmentation and a follow-up radiograph, Cancel only while
    a job runs; the reader chosen in the panel is the one the logic is asked to run."""
    import SimpleITK as sitk

    ui, p = panel.ui, panel._parameterNode
    assert not ui.readFollowupButton.enabled and not ui.cancelFollowupButton.enabled
    assert not ui.followupProgressBar.visible
    image = sitk.GetImageFromArray(followup_view[0].pixels.astype(np.float32))
    image.SetSpacing((6.0, 6.0))
    sitk.WriteImage(image, str(tmp_path / "fu.nrrd"))
    xray = box.slicer.util.loadVolume(str(tmp_path / "fu.nrrd"))
    ui.followupRadiographSelector.setCurrentNode(xray)
    assert p.followupRadiograph is xray and not ui.readFollowupButton.enabled
    p.ctVolume = box.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    p.segmentation = box.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert ui.readFollowupButton.enabled
    t = box.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pose")
    ui.followupRegistrationSelector.setCurrentNode(t)
    assert p.followupRegistration is t
    p.followupRegistration = None
    assert ui.followupRegistrationSelector.currentNode() is None
    # the reader: the command's default, bound both ways, and what *Read follow-up* asks the logic for
    assert p.followupReader == "ridge" and ui.followupReaderComboBox.currentText == "ridge"
    ui.followupReaderComboBox.currentText = "fit"
    assert p.followupReader == "fit"
    calls = []
    monkeypatch.setattr(panel.logic, "ensureDependencies", lambda *a, **k: True)
    monkeypatch.setattr(panel.logic, "startFollowup", lambda *a, **k: calls.append(k) or "job")
    monkeypatch.setattr(panel, "_startJob", lambda kind, job: calls.append((kind, job)))
    assert ui.readFollowupButton.click()
    assert calls == [{"reader": "fit"}, ("followup", "job")]
    p.followupReader = "ridge"
    assert ui.followupReaderComboBox.currentText == "ridge"
    p.followupRadiograph = None
    assert not ui.readFollowupButton.enabled
    assert not box.errors


@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_followup_picks_up_the_registration_of_its_radiograph(box, panel, pelvis_case, followup_view,
                                                              followup_registration, tmp_path):
    """A registration made on the baseline CT and the follow-up radiograph (a real ``mskdex register``
    result read the way the Registration section reads it) is selected for the follow-up as soon as that
    radiograph is chosen; on another radiograph it is refused with a one-line error and nothing runs."""
    import SimpleITK as sitk

    from MSKdeXLib import slicer_bridge as sb

    ui, p, util = panel.ui, panel._parameterNode, box.slicer.util
    rg, cam, _ = followup_view
    image = sitk.GetImageFromArray(rg.pixels.astype(np.float32))
    image.SetSpacing((cam.spacing_col_mm, cam.spacing_row_mm))
    sitk.WriteImage(image, str(tmp_path / "fu.nrrd"))
    p.ctVolume, p.segmentation = util.loadVolume(str(pelvis_case.ct)), util.loadLabelVolume(str(pelvis_case.labels))
    xray, other = util.loadVolume(str(tmp_path / "fu.nrrd")), util.loadVolume(str(tmp_path / "fu.nrrd"))
    registered = sb.registration_to_nodes(followup_registration[0], box.scene, xray,
                                          ct_node=p.ctVolume).transforms["pelvis"]
    assert p.followupRegistration is None
    ui.followupRadiographSelector.setCurrentNode(xray)
    assert p.followupRegistration is not None and p.followupRegistration.GetID() == registered.GetID()
    assert ui.followupRegistrationSelector.currentNode().GetID() == registered.GetID()
    assert registered.GetName() in ui.followupStatusLabel.text
    # another radiograph: no registration of it, the chosen one kept but refused when reading
    p.followupRadiograph = other
    assert p.followupRegistration.GetID() == registered.GetID()
    assert ui.readFollowupButton.enabled
    with pytest.raises(ValueError) as exc:  # shown in an error box (raised here: Slicer's testing mode)
        ui.readFollowupButton.click()
    assert f"registered on the radiograph '{xray.GetName()}', not on '{other.GetName()}'" in str(exc.value)
    assert panel._job is None and "\n" not in str(exc.value)
    # the user clears it; back on the registered radiograph it is offered again
    p.followupRegistration = None
    p.followupRadiograph = xray
    assert p.followupRegistration.GetID() == registered.GetID()


@pytest.mark.slow
@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_followup_reading_fills_the_table_and_warns_on_exit_code_3(box, panel, sample_cache, pelvis, followup_view,
                                                                   launcher, tmp_path):
    """*Read follow-up* runs ``mskdex followup`` (real subprocess, tiny reader) on the sample CT and a
    radiograph simulated from it: with a registration flagged doubtful the job exits 3, and the panel
    loads the result and shows a WARNING in the status line (not an error, not silently); the table
    holds followup.json's values; the figure is shown. Run again with a sound registration: exit 0, no
    warning, the same table node refilled."""
    import SimpleITK as sitk

    from MSKdeXLib import slicer_bridge as sb
    from conftest import TINY_FOLLOWUP

    rg, cam, pose = followup_view
    image = sitk.GetImageFromArray(rg.pixels.astype(np.float32))
    image.SetSpacing((cam.spacing_col_mm, cam.spacing_row_mm))
    sitk.WriteImage(image, str(tmp_path / "fu.nrrd"))
    ui, p = panel.ui, panel._parameterNode
    panel.logic.followupExtraArgs = list(TINY_FOLLOWUP)
    assert ui.loadSampleButton.click()
    p.followupRadiograph = box.slicer.util.loadVolume(str(tmp_path / "fu.nrrd"))
    p.sidMm = cam.sid_mm
    reg = sb.pose_to_transform_node(pose, box.scene, "MSKdeX registered pelvis")
    reg.SetAttribute("MSKdeX.doubtful", "1")  # what registration_to_nodes writes for a doubtful body
    p.followupRegistration = reg
    assert ui.readFollowupButton.enabled and ui.readFollowupButton.click()
    job = panel._job
    assert job is not None and ui.cancelFollowupButton.enabled and not ui.readFollowupButton.enabled
    assert ui.followupProgressBar.visible
    seen_total = []
    box.process_events(until=lambda: seen_total.append(ui.followupProgressBar.maximum) or panel._job is None,
                       timeout=240)
    assert job.returncode == 3, job.summary()
    assert not box.errors, box.errors
    assert max(seen_total) == 40  # the bar ran over the re-simulations
    assert "WARNING" in ui.statusLabel.text and "DOUBTFUL registration" in ui.statusLabel.text
    assert ui.followupStatusLabel.text.startswith("WARNING: DOUBTFUL registration")
    assert not ui.followupProgressBar.visible and ui.readFollowupButton.enabled
    out = Path(panel.logic._outputs["followup"])
    doc = json.loads((out / "followup.json").read_text(encoding="utf-8"))
    assert doc["pose"]["doubtful"] is True
    np.testing.assert_allclose(doc["pose"]["ct_to_camera"], pose, atol=1e-6)
    table = p.followupTable
    rows = _rows(table)
    assert [r["structure"] for r in rows][:len(doc["muscles"])] == list(doc["muscles"])
    for r in rows[:len(doc["muscles"])]:
        m = doc["muscles"][r["structure"]]
        assert (r["baseline_g"], r["estimate_g"], r["change_percent"]) == pytest.approx(
            (m["baseline_g"], m["estimate_g"], m["change_percent"]))
        assert (r["change_low_percent"], r["change_high_percent"]) == pytest.approx(tuple(m["change_interval_percent"]))
    assert any(r["structure"].startswith("asymmetry ") for r in rows)
    assert table.GetAttribute("MSKdeX.doubtful") == "1"
    # the table in the table view, the figure (followup.png) in the Yellow view
    sel = box.app_logic.GetSelectionNode()
    assert sel.GetActiveTableID() == table.GetID()
    yellow = box.slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceCompositeNode()
    figure = box.scene.GetNodeByID(yellow.GetBackgroundVolumeID())
    assert figure.IsA("vtkMRMLVectorVolumeNode") and figure.GetAttribute("MSKdeX.figure") == str(out / "followup.png")
    rgb = sb.slice_rgba(box.slicer.app.layoutManager().sliceWidget("Yellow").sliceLogic())[..., :3].astype(int)
    assert (np.ptp(rgb, axis=2) > 60).mean() > 0.005  # the figure's coloured bars, drawn by the slice view

    # a sound registration: exit 0, no warning, the same table node refilled
    reg.SetAttribute("MSKdeX.doubtful", "0")
    assert ui.readFollowupButton.click()
    job = panel._job
    _wait_idle(box, panel)
    assert job.returncode == 0, job.summary()
    assert not box.errors, box.errors
    assert "WARNING" not in ui.statusLabel.text and "followup finished" in ui.statusLabel.text
    assert "WARNING" not in ui.followupStatusLabel.text and "%" in ui.followupStatusLabel.text
    assert p.followupTable is table and table.GetAttribute("MSKdeX.doubtful") == "0"
    assert Path(panel.logic._outputs["followup"]) != out  # a fresh output folder, nothing overwritten
