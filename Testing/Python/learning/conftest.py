"""Fixtures shared by the follow-up readers' tests."""

from __future__ import annotations

import pytest

from MSKdeXLib.learning import cohort as co
from MSKdeXLib.learning import followup as fu


@pytest.fixture(scope="module")
def small_baseline(pelvis_case, one_torch_thread):
    """(ct, labels, camera, pose, physics, baseline lean mass g): the real pelvis CT at 6 mm seen in a
    64 x 64 px AP view, its physics under the specificity preset (one per test module: tests may change it)."""
    config = co.CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), voxel_mm=6.0)
    ct, labels = co.load_source(config)
    camera = co.fit_camera(ct, labels, 64, 64)
    pose = co.base_view(ct, labels, camera)
    physics, base = fu.baseline_physics(ct, labels, camera, pose, co.preset_ranges("specificity"))
    return ct, labels, camera, pose, physics, base
