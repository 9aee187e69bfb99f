"""Camera and pose conventions: round trips, radiological display, RAS <-> LPS."""

from __future__ import annotations

import numpy as np
import pytest

from MSKdeXLib.errors import UserError
from MSKdeXLib.projection.geometry import (Camera, angles_xyz, ap_pose, check_rigid, invert_rigid, perturbed_pose,
                                pose_from_slicer_ras, pose_to_slicer_ras, project, rotation_xyz,
                                source_position_lps)

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("angles", [(10.0, -20.0, 30.0), (-170.0, 45.0, 5.0), (0.0, 0.0, 0.0), (3.0, 89.0, -7.0)])
def test_rotation_angles_round_trip(angles):
    r = rotation_xyz(*angles)
    assert np.allclose(r @ r.T, np.eye(3)) and np.isclose(np.linalg.det(r), 1.0)
    assert np.allclose(rotation_xyz(*angles_xyz(r)), r, atol=1e-9)


def test_rigid_inverse_and_checks():
    pose = perturbed_pose(ap_pose([10, 20, 30], Camera()), (5, -7, 12), (3, 4, -5), [10, 20, 30])
    assert np.allclose(pose @ invert_rigid(pose), np.eye(4), atol=1e-12)
    assert check_rigid(pose) is not None
    bad = pose.copy()
    bad[:3, :3] *= 1.1
    with pytest.raises(UserError, match="not a rigid transform"):
        check_rigid(bad)
    with pytest.raises(UserError, match="4x4"):
        check_rigid(np.eye(3))


def test_default_ap_view_is_radiological():
    cam = Camera(rows=200, cols=300, spacing_row_mm=1.0, spacing_col_mm=1.0, sid_mm=1000.0)
    iso = np.array([5.0, -40.0, 120.0])
    pose = ap_pose(iso, cam)
    (r0, c0), = project(cam, pose, iso[None])
    assert np.allclose([r0, c0], [(cam.rows - 1) / 2, (cam.cols - 1) / 2])
    (_, c_left), = project(cam, pose, (iso + [50, 0, 0])[None])      # towards patient's left (+L)
    (r_sup, _), = project(cam, pose, (iso + [0, 0, 50])[None])       # towards the head (+S)
    assert c_left > c0, "patient left must appear on the image's right"
    assert r_sup < r0, "head must be up"
    src = source_position_lps(pose)
    assert src[1] < iso[1] - 800, "the source is anterior (smaller P) of the isocentre"
    # magnification: 50 mm at the isocentre (850 mm from the source) is 50*1000/850 mm on the detector
    assert (c_left - c0) * cam.spacing_col_mm == pytest.approx(50 * 1000 / 850)


def test_rotation_is_about_the_isocentre():
    cam = Camera()
    iso = np.array([0.0, 10.0, -20.0])
    base = ap_pose(iso, cam)
    moved = perturbed_pose(base, (0, 0, 25), (0, 0, 0), iso)
    assert np.allclose(project(cam, moved, iso[None]), project(cam, base, iso[None]))
    shifted = perturbed_pose(base, (0, 0, 0), (10, 0, 0), iso)   # 10 mm towards patient left
    assert project(cam, shifted, iso[None])[0, 1] > project(cam, base, iso[None])[0, 1]


def test_slicer_ras_round_trip_and_projection():
    cam = Camera(rows=64, cols=80, spacing_row_mm=2.0, spacing_col_mm=2.5)
    pose = perturbed_pose(ap_pose([30, -10, 50], cam), (4, -9, 17), (6, -2, 3), [30, -10, 50])
    ras_pose = pose_to_slicer_ras(pose)
    assert np.allclose(pose_from_slicer_ras(ras_pose), pose)
    pts_lps = RNG.uniform(-60, 60, (20, 3)) + [30, -10, 50]
    pts_ras = pts_lps * [-1, -1, 1]
    cam_from_ras = (ras_pose[:3, :3] @ pts_ras.T).T + ras_pose[:3, 3]
    cam_from_lps = (pose[:3, :3] @ pts_lps.T).T + pose[:3, 3]
    assert np.allclose(cam_from_ras, cam_from_lps)
    # by hand: pinhole projection with the principal point at the detector centre
    col = cam_from_lps[:, 0] / cam_from_lps[:, 2] * cam.sid_mm / cam.spacing_col_mm + (cam.cols - 1) / 2
    row = cam_from_lps[:, 1] / cam_from_lps[:, 2] * cam.sid_mm / cam.spacing_row_mm + (cam.rows - 1) / 2
    assert np.allclose(project(cam, pose, pts_lps), np.c_[row, col])


def test_scaled_camera_keeps_the_field_of_view():
    cam = Camera(rows=256, cols=192, spacing_row_mm=1.5, spacing_col_mm=2.0, sid_mm=1100.0, cx=90.0, cy=130.0)
    small = cam.scaled(4)
    assert (small.rows, small.cols) == (64, 48)
    assert small.rows * small.spacing_row_mm == pytest.approx(cam.rows * cam.spacing_row_mm)
    pose = ap_pose([0, 0, 0], cam)
    pts = RNG.uniform(-100, 100, (10, 3))
    # the same point lands on the same physical detector position (mm from the pixel grid's edge)
    big_mm = (project(cam, pose, pts) + 0.5) * [cam.spacing_row_mm, cam.spacing_col_mm]
    small_mm = (project(small, pose, pts) + 0.5) * [small.spacing_row_mm, small.spacing_col_mm]
    assert np.allclose(big_mm, small_mm)
    assert Camera.from_dict(cam.to_dict()) == cam


@pytest.mark.parametrize("kwargs, message", [({"rows": 0}, "detector size"), ({"spacing_col_mm": -1}, "spacing"),
                                             ({"sid_mm": 0}, "source-to-image")])
def test_bad_camera_is_user_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        Camera(**kwargs)
