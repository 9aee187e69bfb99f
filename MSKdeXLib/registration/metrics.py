"""Accuracy of a registered pose against a known one (simulated radiographs): mean target
registration error over a body's voxels (mm) and mean projection distance (detector pixels)."""

from __future__ import annotations

import numpy as np

from ..projection.geometry import Camera, project


def mtre_mm(points_lps: np.ndarray, true_pose: np.ndarray, estimate: np.ndarray) -> float:
    """Mean target registration error: mean distance (mm) between ``points_lps`` mapped by the
    true and the estimated ct_to_camera poses."""
    p = np.asarray(points_lps, dtype=np.float64)
    a = p @ true_pose[:3, :3].T + true_pose[:3, 3]
    b = p @ estimate[:3, :3].T + estimate[:3, 3]
    return float(np.linalg.norm(a - b, axis=1).mean())


def mean_projection_distance_px(camera: Camera, points_lps: np.ndarray, true_pose, estimate) -> float:
    """Mean distance (detector pixels) between the points projected with both poses."""
    return float(np.linalg.norm(project(camera, true_pose, points_lps) - project(camera, estimate, points_lps),
                                axis=1).mean())
