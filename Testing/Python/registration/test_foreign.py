"""Registration measured on radiographs it did not make: DiffDRR's Siddon renderer agrees with our
geometry, the moved-tissue scene adds up to the CT when nothing moves, and the pelvis registers
to a foreign radiograph with moved soft tissue (real pelvis CT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffdrr.renderers", reason="DiffDRR (the foreign renderer) is not installed")

from MSKdeXLib.io.images import Volume  # noqa: E402
from MSKdeXLib.projection.geometry import Camera, ap_pose, project, rotation_xyz  # noqa: E402
from MSKdeXLib.projection.rendering import DRRRenderer, default_view  # noqa: E402
from MSKdeXLib.registration import pipeline  # noqa: E402
from benchmarks.foreign import (DetectorChain, foreign_radiograph, mu_of_hu, shutters_hiding,  # noqa: E402
                                            siddon_line_integral)
from benchmarks.moved_tissue import TissueMotion, cut_ends, moved_scene  # noqa: E402
from MSKdeXLib.registration.optimize import PoseSpace  # noqa: E402
from MSKdeXLib.registration.views import working_grid  # noqa: E402


def test_siddon_projects_landmarks_where_our_geometry_does():
    """Round trip of landmarks: small cubes in an anisotropic, oblique volume rendered by DiffDRR's
    Siddon renderer land where :func:`project` puts their centres (blob centroids within 0.1 px)."""
    from scipy import ndimage

    arr = np.zeros((30, 40, 50), np.float32)
    centres = [(5, 5, 5), (44, 6, 8), (8, 34, 12), (40, 33, 24), (25, 20, 15), (15, 30, 25)]  # (i, j, k)
    for i, j, k in centres:
        arr[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 1.0
    direction = rotation_xyz(10, -20, 30) @ np.diag([1.0, -1.0, 1.0])
    vol = Volume(arr, (2.0, 2.5, 3.0), (10.0, -20.0, 5.0), direction)
    cam = Camera(160, 150, 1.0, 1.2, 1000.0, 70.3, 85.1)
    centre = vol.voxel_centres_lps().mean(0)
    pose = PoseSpace(ap_pose(centre, cam), centre).matrix([7.0, -5.0, 12.0, 4.0, -6.0, 10.0])
    img = siddon_line_integral(vol, cam, pose)
    lab, n = ndimage.label(img > 0)
    assert n == len(centres)
    blobs = np.array(ndimage.center_of_mass(img, lab, range(1, n + 1)))
    want = project(cam, pose, (vol.index_to_lps() @ np.c_[np.array(centres), np.ones(len(centres))].T)[:3].T)
    d = np.array([np.min(np.hypot(*(blobs - w).T)) for w in want])
    assert d.max() < 0.1, d
    # a line integral through a cube of side 3 voxels: about its depth along the ray (mm)
    assert 5.0 < img.max() < 3 * 3.0 * 1.8


def test_siddon_agrees_with_our_renderer_on_the_pelvis_ct(pelvis):
    """Same CT, same pose: DiffDRR's Siddon line integrals and our plane-sampled DRR agree
    (different algorithms: exact voxel intersections vs trilinear planes)."""
    ct, labels = pelvis
    cam = Camera(64, 64, 5.0, 5.0, 1000.0)
    pose = default_view(ct, labels, cam)
    mu = ct.with_array(mu_of_hu(ct.array, bone_gain=1.0, mu_water=0.02))
    a = siddon_line_integral(mu, cam, pose)
    b = DRRRenderer(ct, cam).attenuation(pose)[0].double().numpy()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995
    assert a.sum() == pytest.approx(b.sum(), rel=0.01)


def test_moved_scene_adds_up_when_nothing_moves(pelvis):
    """With no tissue change and every body at the first body's pose, the scene's volumes (tissue
    with bones replaced by filler + bones as excess over it) add up to the patient's attenuation;
    with changes, tissue within the taper distance of bone is untouched."""
    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis,femur_left", labels)
    cam = Camera(48, 48, 8.0, 8.0, 1000.0)
    pose = default_view(ct, labels, cam)
    still = TissueMotion(amplitude_mm=0.0, fat_mm=0.0, gas_pockets=0, fill_gas_probability=0.0)
    scene = moved_scene(ct, labels, bodies, {b.name: pose for b in bodies}, still, np.random.default_rng(0),
                        tissue_mm=3.0)
    assert len(scene) == 3
    total = sum(siddon_line_integral(v, cam, p) for v, p in scene)
    from MSKdeXLib.registration.bodyvolume import body_mask

    patient = ct.with_array(mu_of_hu(np.where(body_mask(ct), ct.array, -1000.0)))
    want = siddon_line_integral(patient, cam, pose)
    rel = np.abs(total - want) / want.max()
    # exact but for rays grazing a slice plane at the CT's cut end (float32 Siddon intersections)
    assert np.median(rel) < 1e-5 and (rel > 1e-4).mean() < 0.01 and rel.max() < 0.03
    moved = moved_scene(ct, labels, bodies, {b.name: pose for b in bodies}, TissueMotion(fat_mm=6.0, gas_pockets=2),
                        np.random.default_rng(1), tissue_mm=3.0)
    changed = np.abs(moved[0][0].array - scene[0][0].array) > 1e-6
    assert changed.mean() > 0.01
    near_bone = labels.mask("femur_left") | labels.mask("hip_left")
    assert not changed[near_bone].any()


def test_working_grid_keeps_the_rays():
    """A large radiograph is area-averaged to the working grid first; the same LPS point lands on
    the same physical detector position in both cameras."""
    cam = Camera(2500, 3000, 0.15, 0.15, 1100.0)
    pixels = np.random.default_rng(0).random((2500, 3000)).astype(np.float32)
    small, img = working_grid(cam, pixels, 1.5)
    assert (small.rows, small.cols) == (250, 300) and small.spacing_row_mm == pytest.approx(1.5)
    assert float(img[3, 7]) == pytest.approx(float(pixels[30:40, 70:80].mean()), rel=1e-5)
    pose = ap_pose(np.zeros(3), cam)
    pts = np.random.default_rng(1).normal(size=(20, 3)) * 50
    big_rc, small_rc = project(cam, pose, pts), project(small, pose, pts)
    np.testing.assert_allclose((small_rc + 0.5) * 10 - 0.5, big_rc, atol=1e-6)
    same, _ = working_grid(Camera(100, 100, 2.0, 2.0), pixels[:100, :100], 1.5)
    assert same.rows == 100


def test_pelvis_registers_to_a_foreign_radiograph_with_moved_soft_tissue(pelvis):
    """The CI-sized version of benchmarks/bench_registration.py: DiffDRR's Siddon renderer, soft
    tissue deformed (6 mm field, thicker fat, gas), another detector chain with shutters; the
    pelvis registers from a 4 deg / 10 mm start within 2 mm (with the CT's own, unmoved tissue)."""
    torch.manual_seed(0)
    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis", labels)
    cam = Camera(128, 128, 3.0, 3.0, 1000.0)
    centre = pipeline.body_centre(labels, bodies[0])
    truth = PoseSpace(ap_pose(centre, cam), centre).matrix([2.0, -3.0, 1.5, 6.0, -8.0, 5.0])
    rng = np.random.default_rng(11)
    motion = TissueMotion(amplitude_mm=6.0, field_sigma_mm=40.0, fat_mm=5.0, gas_pockets=2)
    scene = moved_scene(ct, labels, bodies, {"pelvis": truth}, motion, rng, tissue_mm=3.0)
    field = shutters_hiding(cam, truth, cut_ends(ct), 5.0, (6.0, 6.0, 9.0, 9.0))
    xray = foreign_radiograph(scene, cam, DetectorChain(), field, rng)
    assert (xray[~field] == 0).all() and xray[field].std() > 10
    start = PoseSpace(truth, centre).matrix([2.0, 2.5, -2.0, 7.0, 6.0, -4.0])
    s = pipeline.RegistrationSettings(cma_max_evals=160)
    res = pipeline.register(ct, labels, xray, cam, bodies, start, s, true_poses={"pelvis": truth})[0]
    pts = labels.grid.voxel_centres_lps(bodies[0].mask(labels))
    assert pipeline.mtre_mm(pts, truth, start) > 8.0
    assert res.mtre_mm < 2.0, res.mtre_mm
