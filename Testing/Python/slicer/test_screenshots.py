"""Screenshots of the real flow, rendered offscreen by Slicer's own slice pipeline (slicer-core's
vtkMRMLSliceLogic: reslice + layer blend) in the Slicer-in-a-box session, with the module's Logic
placing the layers. Written to a temporary folder; with MSKDEX_UPDATE_SCREENSHOTS=1 to
Resources/Screenshots/ (the files the docs show), so a test run never changes the checkout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import alive, launcher_children  # noqa: F401  (the launcher fixture's helpers)

ROOT = Path(__file__).resolve().parents[3]
SHOTS = ROOT / "Resources" / "Screenshots"


def shot_path(name: str, tmp_path: Path) -> Path:
    """Where a screenshot goes: Resources/Screenshots when MSKDEX_UPDATE_SCREENSHOTS=1, else tmp_path."""
    return (SHOTS if os.environ.get("MSKDEX_UPDATE_SCREENSHOTS") == "1" else tmp_path) / name
#: a registration small enough for a test, large enough to converge on this case
QA_REGISTRATION = ["--max-evals", "60", "--refine-steps", "30", "--fine-px", "64"]


def _drr_file(pelvis, path, pose, cam):
    """The attenuation DRR of the real pelvis CT at ``pose`` as a 2D NRRD (a file a user loads)."""
    import SimpleITK as sitk
    import torch

    from MSKdeXLib.projection.rendering import DRRRenderer

    ct, labels = pelvis
    with torch.no_grad():
        img = DRRRenderer(ct, cam, labels=labels).attenuation(torch.as_tensor(pose))[0].numpy()
    image = sitk.GetImageFromArray(img.astype(np.float32))
    image.SetSpacing((cam.spacing_col_mm, cam.spacing_row_mm))
    sitk.WriteImage(image, str(path))
    return path


def _save_png(rgba, path: Path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(path)


@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_overlay_on_a_radiograph_loaded_from_file(box, pelvis, tmp_path):
    """Per-muscle channels (the true CT-derived mass channels of the same view, as the estimate
    shows a model's) over a radiograph loaded with File > Add Data, in the module's view."""
    import torch

    from MSKdeXLib import slicer_bridge as sb
    from MSKdeXLib.projection.geometry import Camera
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    ct, labels = pelvis
    cam = Camera(160, 176, 2.2, 2.2, 1000.0)
    pose = default_view(ct, labels, cam)
    box.load_module()
    node = box.slicer.util.loadVolume(str(_drr_file(pelvis, tmp_path / "radiograph.nrrd", pose, cam)))
    muscles = labels.select(kinds=["muscle"])
    with torch.no_grad():
        ch = DRRRenderer(ct, cam, labels=labels, structures=muscles).channels(torch.as_tensor(pose), quantity="mass")
    layers = sb.channels_to_nodes(ch[0].numpy(), muscles, node, box.scene, quantity="mass_g")
    logic = box.py.MSKdeXLogic()
    logic.showInSliceView(node, layers.label)
    logic.setOverlayOpacity(0.5)
    red = box.slicer.app.layoutManager().sliceWidget("Red")
    red.mrmlSliceNode().SetDimensions(528, 480, 1)
    rgba = sb.slice_rgba(red.sliceLogic())
    # the picture holds the radiograph (grey) and coloured channels
    rgb = rgba[..., :3].astype(int)
    coloured = (np.ptp(rgb, axis=2) > 30).mean()
    assert 0.03 < coloured < 0.6
    assert rgb.std() > 20
    _save_png(rgba, shot_path("overlay_loaded_radiograph.png", tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("box", ["v5.8.1"], indirect=True)
def test_registration_qa(box, panel, sample_cache, pelvis, launcher, tmp_path):
    """Registration QA after a real ``mskdex register`` run from the panel on a radiograph of a
    known pose (the CT turned 4 deg and shifted 6 mm): registered bones over the radiograph, and
    the checkerboard."""
    from MSKdeXLib import slicer_bridge as sb
    from MSKdeXLib.projection.geometry import Camera, perturbed_pose
    from MSKdeXLib.projection.rendering import default_view, isocentre_of

    ct, labels = pelvis
    cam = Camera(120, 132, 3.0, 3.0, 1000.0)
    base = default_view(ct, labels, cam)
    truth = perturbed_pose(base, (0.0, 0.0, 4.0), (6.0, 0.0, 0.0), isocentre_of(ct, labels))
    ui, p = panel.ui, panel._parameterNode
    panel.logic.registrationExtraArgs = list(QA_REGISTRATION)
    assert ui.loadSampleButton.click()
    p.radiograph = box.slicer.util.loadVolume(str(_drr_file(pelvis, tmp_path / "radiograph.nrrd", truth, cam)))
    p.registrationBones = "pelvis"
    p.sidMm = cam.sid_mm
    assert ui.runRegistrationButton.click()
    box.process_events(until=lambda: panel._job is None, timeout=400)
    assert not box.errors, box.errors
    reg = json.loads((Path(panel.logic._outputs["registration"]) / "registration.json").read_text(encoding="utf-8"))
    assert not reg["bodies"][0]["doubtful"]
    from MSKdeXLib.projection.geometry import project

    pts = ct.voxel_centres_lps(labels.mask("hip_left") | labels.mask("hip_right") | labels.mask("sacrum"))[::50]
    err = np.linalg.norm(project(cam, np.asarray(reg["bodies"][0]["ct_to_camera"]), pts) - project(cam, truth, pts), axis=1)
    print(f"QA registration: mean reprojection error {err.mean():.2f} px (3 mm pixels), max {err.max():.2f}")
    assert err.mean() < 2.0
    red = box.slicer.app.layoutManager().sliceWidget("Red")
    red.mrmlSliceNode().SetDimensions(440, 400, 1)
    p.qaOpacity = 0.5
    overlay = sb.slice_rgba(red.sliceLogic())
    comp = red.mrmlSliceCompositeNode()
    rgb = overlay[..., :3].astype(int)
    assert ((rgb[..., 0] - rgb[..., 1]) > 40).mean() > 0.02  # the registered bones, in red
    assert comp.GetForegroundVolumeID() == p.drrVolume.GetID() and comp.GetForegroundOpacity() == 0.5
    p.showCheckerboard = True
    board = sb.slice_rgba(red.sliceLogic())
    assert comp.GetForegroundVolumeID() is None
    gap = np.full((overlay.shape[0], 8, 4), 255, np.uint8)
    _save_png(np.concatenate([overlay, gap, board], axis=1), shot_path("registration_qa.png", tmp_path))
