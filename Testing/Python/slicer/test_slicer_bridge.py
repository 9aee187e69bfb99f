"""MRML bridge against REAL Slicer MRML nodes (PyPI slicer-core), on the real pelvis CT."""

from __future__ import annotations

import numpy as np
import pytest

from slicer_box import require_slicer_core

slicer = require_slicer_core()

from MSKdeXLib import slicer_bridge as sb  # noqa: E402
from MSKdeXLib.projection.geometry import Camera, ap_pose, perturbed_pose, project  # noqa: E402
from MSKdeXLib.io.images import Radiograph  # noqa: E402
from MSKdeXLib.anatomy.ct_metrics import structure_metrics  # noqa: E402
from MSKdeXLib.anatomy.structures import detect_table_from_names  # noqa: E402


@pytest.fixture(scope="module")
def pelvis_nodes(pelvis):
    """A module-wide scene with the CT and its label map loaded."""
    ct, labels = pelvis
    s = slicer.vtkMRMLScene()
    ct_node = sb.volume_to_node(ct, s, "pelvis CT")
    label_node = sb.labelmap_to_node(labels, s, "pelvis labels")
    return s, ct_node, label_node


def test_ct_node_is_ras_and_round_trips(pelvis, pelvis_nodes):
    ct, _ = pelvis
    _, node, _ = pelvis_nodes
    m = sb.vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = sb.numpy_matrix(m)
    # an arbitrary voxel: RAS from Slicer's matrix == LPS from the core with x, y negated
    ijk = np.array([17, 40, 63, 1.0])
    lps = ct.index_to_lps() @ ijk
    np.testing.assert_allclose(ijk_to_ras @ ijk, [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)
    # Slicer's own RAS->IJK agrees
    node.GetRASToIJKMatrix(m)
    np.testing.assert_allclose(sb.numpy_matrix(m) @ (ijk_to_ras @ ijk), ijk, atol=1e-6)
    back = sb.volume_from_node(node)
    assert back.same_grid(ct)
    np.testing.assert_array_equal(back.array, ct.array)


def test_parent_transform_is_applied(pelvis, scene):
    ct, _ = pelvis
    node = sb.volume_to_node(ct, scene, "moved")
    t = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(t)
    shift = np.eye(4)
    shift[:3, 3] = [10.0, 0.0, -5.0]  # RAS: 10 mm to the right, 5 mm down
    t.SetMatrixTransformToParent(sb.vtk_matrix(shift))
    node.SetAndObserveTransformNodeID(t.GetID())
    moved = sb.volume_from_node(node)
    np.testing.assert_allclose(np.subtract(moved.origin, ct.origin), [-10.0, 0.0, -5.0], atol=1e-6)


def test_labelmap_node_round_trip_and_detection(pelvis, pelvis_nodes, scene):
    ct, labels = pelvis
    _, _, label_node = pelvis_nodes
    colors = label_node.GetDisplayNode().GetColorNode()
    gmax = labels.table.by_name("gluteus maximus left")
    assert colors.GetColorName(gmax.label) == gmax.name
    back = sb.labelmap_from_node(label_node, ct)
    assert back.table.name == "totalseg_v1"
    assert [s.name for s in back.structures] == [s.name for s in labels.structures]
    for s in labels.structures:
        np.testing.assert_array_equal(back.mask(s.name), labels.mask(s))
    # without colour names, the table is detected from label values + CT numbers
    bare = sb.volume_to_node(labels.grid, scene, "bare", labelmap=True, array=labels.label_array())
    bare.GetDisplayNode().SetAndObserveColorNodeID("")
    back2 = sb.labelmap_from_node(bare, ct)
    assert back2.table.name == "totalseg_v1" and back2.match is not None


def test_segmentation_names_to_structures(pelvis, pelvis_nodes):
    ct, labels = pelvis
    s, ct_node, label_node = pelvis_nodes
    seg = sb.labelmap_to_segmentation(label_node, s, "pelvis segmentation")
    names = sb.segment_names(seg)
    assert len(names) == len(labels.structures)
    assert detect_table_from_names(names).table.name == "totalseg_v1"
    # Rename two segments the way a user would: loose names still resolve
    segmentation = seg.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        if segmentation.GetNthSegment(n).GetName() == "gluteus_medius_left":
            segmentation.GetNthSegment(n).SetName("Left Gluteus Medius Muscle")
    back = sb.labelmap_from_segmentation(seg, ct_node)
    assert back.table.name == "totalseg_v1"
    for st in labels.structures:
        np.testing.assert_array_equal(back.mask(st.name), labels.mask(st), err_msg=st.name)
    assert back.grid.same_grid(ct)


def test_metrics_table_contents(pelvis, scene):
    ct, labels = pelvis
    chosen = labels.select(kinds=["muscle"])[:4]
    rows = [m.to_dict() for m in structure_metrics(ct, labels, chosen)]
    node = sb.metrics_table_node(rows, scene)
    assert node.GetNumberOfRows() == len(rows)
    assert node.GetColumnUnitLabel("mass_g") == "g" and node.GetColumnUnitLabel("volume_cm3") == "cm^3"
    back = sb.rows_from_table_node(node)
    for r, b in zip(rows, back):
        assert b["name"] == r["name"]
        # independent check: volume = voxel count x voxel volume
        assert b["volume_cm3"] == pytest.approx(labels.mask(r["name"]).sum() * ct.voxel_volume_mm3 / 1000)
        assert b["mass_g"] == pytest.approx(r["mass_g"])


def test_pose_round_trip_against_hand_projection(pelvis, pelvis_nodes, scene):
    ct, labels = pelvis
    _, ct_node, _ = pelvis_nodes
    cam = Camera(64, 80, 4.0, 4.0, 1000.0)
    iso = ct.voxel_centres_lps(labels.mask("sacrum")).mean(axis=0)
    pose = perturbed_pose(ap_pose(iso, cam), (5.0, -8.0, 12.0), (3.0, -4.0, 7.0), iso)
    tnode = sb.pose_to_transform_node(pose, scene)
    np.testing.assert_allclose(sb.pose_from_transform_node(tnode), pose, atol=1e-9)
    # A voxel, located through Slicer's IJKToRAS, then through the transform node's matrix
    m = sb.vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    ras = sb.numpy_matrix(m) @ np.array([60.0, 50.0, 70.0, 1.0])
    tnode.GetMatrixTransformToParent(m)
    x, y, z, _ = sb.numpy_matrix(m) @ ras
    # pinhole by hand: detector plane at SID, principal point at the detector centre
    col = x * cam.sid_mm / z / cam.spacing_col_mm + (cam.cols - 1) / 2
    row = y * cam.sid_mm / z / cam.spacing_row_mm + (cam.rows - 1) / 2
    lps = ct.index_to_lps() @ np.array([60.0, 50.0, 70.0, 1.0])
    np.testing.assert_allclose(project(cam, pose, lps[:3])[0], [row, col], atol=1e-6)
    with pytest.raises(sb.UserError):
        sb.pose_to_transform_node(np.diag([2.0, 1, 1, 1]), scene)


def test_markups_landmarks_round_trip(scene):
    names = ["ASIS left", "ASIS right", "pubic symphysis"]
    lps = np.array([[100.0, -20.0, 30.0], [-95.0, -22.0, 31.0], [2.0, -40.0, -60.0]])
    node = sb.landmarks_to_markups(names, lps, scene)
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, p)
    np.testing.assert_allclose(p, [-100.0, 20.0, 30.0])  # stored in RAS
    got_names, got = sb.landmarks_from_markups(node)
    assert got_names == names
    np.testing.assert_allclose(got, lps)


def _drr_like(ct, labels, structures):
    """Radiograph-like image and per-structure projected masks: numpy sums of the real CT along
    its AP axis (j), displayed radiologically (patient right on the left, head up)."""
    mu = np.clip(ct.array.astype(np.float32) + 1000.0, 0, None) / 1000.0  # ~ density
    # CT axes: i -> patient right (LPS -x), j -> anterior, k -> superior.
    to_display = lambda a: a.sum(axis=1)[::-1, ::-1]  # noqa: E731  rows: head up; cols: right->left
    xray = to_display(mu)
    masks = np.stack([to_display(labels.mask(s).astype(np.float32)) for s in structures]) \
        if structures else np.zeros((0,) + xray.shape, np.float32)
    return xray.astype(np.float32), masks


def test_radiograph_node_geometry_and_points(pelvis, scene):
    ct, labels = pelvis
    xray, _ = _drr_like(ct, labels, [])
    rg = Radiograph(xray, (ct.spacing[2], ct.spacing[0]), "test")
    node = sb.radiograph_to_node(rg, scene)
    back = sb.radiograph_from_node(node)
    np.testing.assert_array_equal(back.pixels, xray)
    assert back.pixel_spacing == pytest.approx(rg.pixel_spacing)
    m = sb.vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = sb.numpy_matrix(m)
    # column +1 -> patient left (RAS x decreases); row +1 -> inferior (RAS z decreases)
    np.testing.assert_allclose(ijk_to_ras[:3, 0], [-3.0, 0, 0])
    np.testing.assert_allclose(ijk_to_ras[:3, 1], [0, 0, -3.0])
    # a point list placed on pixels comes back as (row, col)
    rc = np.array([[10.0, 20.0], [55.5, 7.25]])
    ras = np.c_[rc[:, 1], rc[:, 0], np.zeros(2), np.ones(2)] @ ijk_to_ras.T
    lps = ras[:, :3] * [-1, -1, 1]
    mk = sb.landmarks_to_markups(["a", "b"], lps, scene)
    names, got = sb.radiograph_points_from_markups(mk, node)
    np.testing.assert_allclose(got, rc, atol=1e-9)


def test_overlay_screenshot_and_estimates(pelvis, scene, tmp_path):
    """Render a real slice view (Slicer's reslice + blend pipeline) of a DRR-like radiograph with
    coloured per-muscle channels; check the pixels; save overlay.png (into Resources/Screenshots
    with MSKDEX_UPDATE_SCREENSHOTS=1)."""
    ct, labels = pelvis
    structures = labels.select(kinds=["muscle"])
    xray, masks = _drr_like(ct, labels, structures)
    rg_node = sb.radiograph_to_node(Radiograph(xray, (3.0, 3.0), "test"), scene, "DRR")
    layers = sb.channels_to_nodes(masks, structures, rg_node, scene, quantity="volume_mm")
    # channel volumes share the radiograph's geometry and hold the channels
    m_ref, m = sb.vtk.vtkMatrix4x4(), sb.vtk.vtkMatrix4x4()
    rg_node.GetIJKToRASMatrix(m_ref)
    for k, v in enumerate(layers.volumes):
        v.GetIJKToRASMatrix(m)
        np.testing.assert_allclose(sb.numpy_matrix(m), sb.numpy_matrix(m_ref))
        np.testing.assert_array_equal(sb.radiograph_from_node(v).pixels, masks[k])
    label = sb.radiograph_from_node(layers.label).pixels.astype(int)
    assert set(np.unique(label)) <= set(range(len(structures) + 1))
    on = label > 0
    rr, cc = np.nonzero(on)
    chosen_val = masks[label[on] - 1, rr, cc]
    peaks = masks.reshape(len(masks), -1).max(1)
    assert np.all(chosen_val > 0.05 * peaks[label[on] - 1])  # above its channel's threshold
    assert np.mean(chosen_val == masks[:, rr, cc].max(0)) > 0.99  # the dominant channel
    assert not np.any(masks[:, ~on] > 0.05 * peaks[:, None])  # unlabelled: no relevant channel
    # the colour table carries the structure names and colours
    for k, s in enumerate(structures):
        assert layers.colors.GetColorName(k + 1) == s.name

    logic = sb.slice_logic(scene, size=(488, 448))
    comp = logic.GetSliceCompositeNode()
    sb.set_overlay(comp, background=rg_node, label=layers.label, label_opacity=1.0)
    assert comp.GetBackgroundVolumeID() == rg_node.GetID()
    assert comp.GetLabelVolumeID() == layers.label.GetID()
    assert comp.GetLabelOpacity() == 1.0
    rgba = sb.slice_rgba(logic)
    h, w, _ = rgba.shape
    # map every view pixel to the radiograph pixel it shows (Slicer's XYToRAS, RASToIJK)
    xy_to_ras = sb.numpy_matrix(logic.GetSliceNode().GetXYToRAS())
    rg_node.GetRASToIJKMatrix(m)
    ras_to_ijk = sb.numpy_matrix(m)
    ys, xs = np.mgrid[0:h, 0:w]
    xy = np.stack([xs.ravel(), (h - 1 - ys).ravel(), np.zeros(xs.size), np.ones(xs.size)])
    ijk = ras_to_ijk @ xy_to_ras @ xy
    col, row = np.rint(ijk[0]).astype(int), np.rint(ijk[1]).astype(int)
    inside = (col >= 1) & (col < xray.shape[1] - 1) & (row >= 1) & (row < xray.shape[0] - 1)
    assert inside.mean() > 0.5  # fitted: the radiograph fills most of the view
    # interior label pixels (3x3 neighbourhood of one label) must show exactly that colour
    from scipy.ndimage import maximum_filter, minimum_filter

    uniform = maximum_filter(label, 3) == minimum_filter(label, 3)
    rgb = rgba[..., :3].reshape(-1, 3).astype(int)
    checked = 0
    for k, s in enumerate(structures):
        sel = inside.copy()
        sel[inside] = (label[row[inside], col[inside]] == k + 1) & uniform[row[inside], col[inside]]
        if sel.sum() < 20:
            continue
        np.testing.assert_allclose(rgb[sel].mean(0), s.color, atol=2.5, err_msg=s.name)
        checked += 1
    assert checked >= 4
    bg = inside.copy()
    bg[inside] = (label[row[inside], col[inside]] == 0) & uniform[row[inside], col[inside]]
    assert np.abs(rgb[bg][:, 0] - rgb[bg][:, 2]).max() <= 1  # grey radiograph where no channel
    # brighter where the radiograph is brighter (background layer really is the DRR)
    vals = xray[row[bg], col[bg]]
    assert np.corrcoef(vals, rgb[bg][:, 0])[0, 1] > 0.9

    # the screenshot: semi-transparent channels over the radiograph
    sb.set_overlay(comp, label_opacity=0.55)
    shot = sb.slice_rgba(logic)
    from test_screenshots import shot_path
    import matplotlib.image

    SCREENSHOT = shot_path("overlay.png", tmp_path)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)

    matplotlib.image.imsave(SCREENSHOT, shot[..., :3])
    assert SCREENSHOT.stat().st_size > 10_000

    # per-structure toggle hides one structure's colour
    hidden = structures[0]
    sb.set_structure_visible(layers.colors, 1, False)
    shot2 = sb.slice_rgba(logic, fit=False)
    sel = inside.copy()
    sel[inside] = (label[row[inside], col[inside]] == 1) & uniform[row[inside], col[inside]]
    g = shot2[..., :3].reshape(-1, 3).astype(int)[sel]
    assert np.abs(g[:, 0] - g[:, 2]).max() <= 1, hidden.name  # grey again

    # estimates table + bar chart
    rows = [{"name": s.name, "mass_g": float(masks[k].sum()), "mass_g_sd": 1.5, "kind": s.kind}
            for k, s in enumerate(structures)]
    tnode = sb.table_node_from_rows(rows, scene, "MSKdeX estimates")
    back = sb.rows_from_table_node(tnode)
    assert [r["name"] for r in back] == [s.name for s in structures]
    np.testing.assert_allclose([r["mass_g"] for r in back], masks.reshape(len(masks), -1).sum(1))
    chart = sb.bar_chart(tnode, scene, y_columns=["mass_g"])
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
    assert series.GetTableNode() is tnode and series.GetYColumnName() == "mass_g"


# ---------------------------------------------------------------------------------------------
# Outputs of the real ``mskdex train / predict / register`` command lines, loaded as MRML nodes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset, tmp_path_factory):
    """A tiny model trained by the real ``mskdex train`` command line the Slicer module builds
    (jobs.train_args), in-process, on conftest's tiny data set; returns (model folder, training
    progress events)."""
    import contextlib
    import io

    from MSKdeXLib import jobs
    from MSKdeXLib.cli import main

    d, cfg = tiny_dataset
    out = tmp_path_factory.mktemp("bridge_model") / "model"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(jobs.train_args(str(d), str(out), config=str(cfg), device="cpu")) == 0
    events = [e for e in map(jobs.parse_event, err.getvalue().splitlines()) if e]
    return out, events


def test_training_progress_events_carry_the_losses_the_module_plots(tiny_model):
    from MSKdeXLib import jobs

    out, events = tiny_model
    steps = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in steps] == [1, 2] and all(e["total"] == 2 for e in steps)
    history = __import__("json").loads((out / "history.json").read_text())
    for e, h in zip(steps, history):
        losses = jobs.losses_of(e)
        assert set(losses) >= {"total", "intensity_sum"}
        assert losses["total"] == pytest.approx(h["total"], rel=1e-6)  # the value training recorded
        assert losses["intensity_sum"] == pytest.approx(h["intensity_sum"], rel=1e-6)
    assert jobs.losses_of(next(e for e in events if e["event"] == "done")) == {}


def _pixel_ras(origin, spacing_rc, rc):
    """RAS of radiograph pixel (row, col) by hand: column -> RAS -x, row -> RAS -z (bridge convention)."""
    return np.asarray(origin) + rc[1] * spacing_rc[1] * np.array([-1.0, 0, 0]) + rc[0] * spacing_rc[0] * np.array([0, 0, -1.0])


def test_prediction_channels_sit_where_inference_resampled_the_radiograph(pelvis, tiny_model, scene, tmp_path):
    """A real ``mskdex predict`` subprocess on a radiograph node written the module's way; its
    estimates table and channel images are loaded over that node (channels_from_prediction)."""
    import json

    import SimpleITK as sitk
    from scipy.ndimage import zoom

    from MSKdeXLib import jobs
    from MSKdeXLib.learning.dataset.builder import resample_mean

    ct, _ = pelvis
    model, _ = tiny_model
    rho = np.clip(1 + ct.array.astype(np.float64) / 1000, 0, None).sum(axis=1)[::-1, ::-1]
    shape = (57, 61)  # not the model's grid: 57 x 61 px vs 32 x 32
    img = zoom(rho, (shape[0] / rho.shape[0], shape[1] / rho.shape[1]), order=1).astype(np.float32)
    sp_in = (ct.spacing[2] * rho.shape[0] / shape[0], ct.spacing[0] * rho.shape[1] / shape[1])
    rg_node = sb.radiograph_to_node(Radiograph(img, sp_in, "file"), scene, "xray")
    origin = np.array([12.0, -3.0, 40.0])
    rg_node.SetOrigin(*origin)
    xray = tmp_path / "xray.tif"
    written = sb.write_radiograph_file(rg_node, xray)
    np.testing.assert_array_equal(written.pixels, img)
    out = tmp_path / "estimate"
    job = jobs.run_mskdex(*jobs.predict_args(str(model), str(xray), str(out), device="cpu",
                                             pixel_spacing_mm=written.pixel_spacing, tta=0), timeout=300)
    assert job.returncode == 0, job.summary()
    doc = json.loads((out / "estimates.json").read_text())
    layers = sb.channels_from_prediction(out, rg_node, scene)

    # table == estimates.json's per-structure rows (mass_g, volume_cm3 and their intervals)
    table = sb.rows_from_table_node(layers.table)
    assert len(table) == len(doc["structures"]) == 2
    for got, want in zip(table, doc["structures"]):
        assert set(want) <= set(got)
        for k, v in want.items():
            assert got[k] == (pytest.approx(v, rel=1e-12) if isinstance(v, float) else
                              "; ".join(v) if isinstance(v, list) else str(v)), k
    assert layers.table.GetColumnUnitLabel("mass_g_low") == "g"
    assert layers.table.GetColumnUnitLabel("volume_cm3") == "cm^3"
    # whether the interval is calibrated travels with the table (the GUI states it)
    calibrated = doc["interval_method"]["calibrated"]
    assert layers.table.GetAttribute("MSKdeX.interval_calibrated") == ("true" if calibrated else "false")
    assert layers.table.GetAttribute("MSKdeX.interval_method")

    # one volume per channel, holding the file's image, summing to the estimate (no TTA)
    assert len(layers.volumes) == len(doc["rows"]) == 4
    value = {(r["structure"], r["quantity"]): r["value"] for r in doc["rows"]}
    H, W = 32, 32
    sp_m = tuple(doc["pixel_spacing_mm"])
    m = sb.vtk.vtkMatrix4x4()
    for v in layers.volumes:
        s, q = v.GetAttribute("MSKdeX.structure"), v.GetAttribute("MSKdeX.quantity")
        arr = sb._node_array(v)[0]
        np.testing.assert_array_equal(arr, sitk.GetArrayFromImage(sitk.ReadImage(str(out / "channels" / f"{s}__{q}.nrrd"))))
        assert arr.astype(np.float64).sum() == pytest.approx(value[(s, q)], rel=1e-5)
        v.GetIJKToRASMatrix(m)
        ijk_to_ras = sb.numpy_matrix(m)
        # physical extent: model spacing along the radiograph's column / row directions
        np.testing.assert_allclose(ijk_to_ras[:3, 0], [-sp_m[1], 0, 0], atol=1e-9)
        np.testing.assert_allclose(ijk_to_ras[:3, 1], [0, 0, -sp_m[0]], atol=1e-9)
        # centre of the model grid == centre of the radiograph (inference resamples about it)
        centre_rg = _pixel_ras(origin, sp_in, ((shape[0] - 1) / 2, (shape[1] - 1) / 2))
        np.testing.assert_allclose(ijk_to_ras @ [(W - 1) / 2, (H - 1) / 2, 0, 1], [*centre_rg, 1], atol=1e-9)
        # pixel (row 3, col 20) by hand: offset from the centre in model pixels x model spacing
        want = centre_rg + (20 - (W - 1) / 2) * sp_m[1] * np.array([-1.0, 0, 0]) \
            + (3 - (H - 1) / 2) * sp_m[0] * np.array([0, 0, -1.0])
        np.testing.assert_allclose((ijk_to_ras @ [20, 3, 0, 1])[:3], want, atol=1e-9)
    # the label map shares the grid and labels the mass channels' structures
    layers.label.GetIJKToRASMatrix(m)
    np.testing.assert_allclose(sb.numpy_matrix(m), ijk_to_ras)
    assert layers.quantity == "mass_g" and [s.name for s in layers.structures] == ["hip_left", "gluteus_medius_left"]
    assert set(np.unique(sb._node_array(layers.label))) <= {0, 1, 2}
    cfg = json.loads((model / "config.json").read_text())
    assert layers.structures[0].color == tuple(cfg["structures"][0]["color"])

    # independent check of the placement: the radiograph's area mean over each channel pixel's
    # footprint (found through the nodes' RAS geometry) == inference's resampling of the radiograph
    rg_node.GetRASToIJKMatrix(m)
    ras_to_rg = sb.numpy_matrix(m)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    jj, ii = np.mgrid[0:H, 0:W]
    acc = np.zeros((H, W))
    for dj in sub:
        for di in sub:
            pts = np.stack([ii.ravel() + di, jj.ravel() + dj, np.zeros(H * W), np.ones(H * W)])
            c, r = (ras_to_rg @ ijk_to_ras @ pts)[:2]
            ok = (c > -0.5) & (c < shape[1] - 0.5) & (r > -0.5) & (r < shape[0] - 0.5)
            vals = np.where(ok, img[np.clip(np.rint(r), 0, shape[0] - 1).astype(int),
                                    np.clip(np.rint(c), 0, shape[1] - 1).astype(int)], img.min())
            acc += vals.reshape(H, W)
    acc /= sub.size ** 2
    expected = resample_mean(img, sp_in, ((shape[0] - 1) / 2, (shape[1] - 1) / 2), (H, W), sp_m)
    assert np.corrcoef(acc.ravel(), expected.ravel())[0, 1] > 0.995
    assert np.abs(acc - expected).max() < 0.05 * (img.max() - img.min())


def test_registration_result_becomes_one_transform_per_body(pelvis, pelvis_case, scene, tmp_path, capsys):
    """A real (tiny) ``mskdex register`` run with the module's arguments (jobs.register_args and a
    landmarks CSV written from markups nodes), read back as transform nodes."""
    import json

    import torch

    from MSKdeXLib import jobs
    from MSKdeXLib.cli import main
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    ct, labels = pelvis
    cam = Camera(48, 56, 6.0, 6.0, 1000.0)
    pose = default_view(ct, labels, cam)
    with torch.no_grad():
        drr = DRRRenderer(ct, cam, labels=labels).attenuation(torch.as_tensor(pose))[0].numpy()
    rg_node = sb.radiograph_to_node(Radiograph(drr.astype(np.float32), (6.0, 6.0), "file"), scene, "xray")
    xray = tmp_path / "xray.tif"
    written = sb.write_radiograph_file(rg_node, xray)

    # landmarks: 5 CT points (placed on the CT) and their projections placed on the radiograph node
    lps = np.array([ct.voxel_centres_lps(labels.mask(s)).mean(axis=0)
                    for s in ("hip_left", "hip_right", "sacrum", "femur_left", "femur_right")])
    rc = project(cam, pose, lps)
    names = ["a", "b", "c", "d", "e"]
    ct_pts = sb.landmarks_to_markups(names, lps, scene, "CT landmarks")
    m = sb.vtk.vtkMatrix4x4()
    rg_node.GetIJKToRASMatrix(m)
    ras = np.c_[rc[:, 1], rc[:, 0], np.zeros(5), np.ones(5)] @ sb.numpy_matrix(m).T
    xr_pts = sb.landmarks_to_markups(names[::-1], (ras[:, :3] * [-1, -1, 1])[::-1], scene, "xray landmarks")
    got_names, got_lps, got_rc = sb.landmark_pairs(ct_pts, xr_pts, rg_node)  # paired by label
    assert got_names == names
    np.testing.assert_allclose(got_lps, lps, atol=1e-9)
    np.testing.assert_allclose(got_rc, rc, atol=1e-6)
    csv = sb.write_landmarks_csv(tmp_path / "landmarks.csv", got_lps, got_rc, got_names)
    from MSKdeXLib.registration.initialise import load_landmarks

    back_lps, back_rc = load_landmarks(csv)
    np.testing.assert_allclose(back_lps, lps)
    np.testing.assert_allclose(back_rc, rc)

    out = tmp_path / "registration"
    argv = jobs.register_args(str(pelvis_case.ct), str(pelvis_case.labels), str(xray), str(out),
                              bones="pelvis,femur_left", landmarks=str(csv), sid_mm=cam.sid_mm,
                              spacing_mm=written.pixel_spacing, device="cpu",
                              extra=["--max-evals", "0", "--refine-steps", "2", "--fine-px", "32"])
    assert main(argv) == 0
    capsys.readouterr()
    doc = json.loads((out / "registration.json").read_text())
    assert doc["initialisation"]["source"] == "landmarks (PnP)"
    res = sb.registration_to_nodes(out, scene, rg_node)
    assert list(res.transforms) == ["pelvis", "femur_left"]
    for body in doc["bodies"]:
        node = res.transforms[body["name"]]
        want = np.asarray(body["ct_to_camera"])
        np.testing.assert_allclose(sb.pose_from_transform_node(node), want, atol=1e-9)
        node.GetMatrixTransformToParent(m)  # CT RAS -> camera: first RAS -> LPS
        np.testing.assert_allclose(sb.numpy_matrix(m), want @ sb.LPS_RAS, atol=1e-9)
        assert float(node.GetAttribute("MSKdeX.similarity")) == body["final_similarity"]
        assert node.GetAttribute("MSKdeX.doubtful") == ("1" if body["doubtful"] else "0")
        assert node.GetAttribute("MSKdeX.doubtfulReasons") == "; ".join(body["doubtful_reasons"])
        assert bool(body["doubtful_reasons"]) == body["doubtful"]
    rows = sb.rows_from_table_node(res.table)
    assert [r["name"] for r in rows] == ["pelvis", "femur_left"]
    assert [r["doubtful"] for r in rows] == ["yes" if b["doubtful"] else "no" for b in doc["bodies"]]
    assert [r["why_doubtful"] for r in rows] == ["; ".join(b["doubtful_reasons"]) for b in doc["bodies"]]
    assert res.doubtful == doc["doubtful"]
    assert "pelvis" in res.summary() and f"{doc['bodies'][1]['final_similarity']:.3f}" in res.summary()
    # registered bones over the radiograph: its grid, the sum of the written channels
    res.drr.GetIJKToRASMatrix(m)
    m2 = sb.vtk.vtkMatrix4x4()
    rg_node.GetIJKToRASMatrix(m2)
    np.testing.assert_allclose(sb.numpy_matrix(m), sb.numpy_matrix(m2))
    import SimpleITK as sitk

    total = sum(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f))).astype(np.float64)
                for f in doc["channels"].values())
    np.testing.assert_allclose(sb._node_array(res.drr)[0], total, rtol=1e-5, atol=1e-6)
    # reading again reuses the nodes (no duplicates)
    n_before = scene.GetNumberOfNodes()
    sb.registration_to_nodes(out, scene, rg_node, nodes=res)
    assert scene.GetNumberOfNodes() == n_before
