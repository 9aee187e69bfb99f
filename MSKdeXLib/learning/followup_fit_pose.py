"""The pose as a fitted nuisance of the follow-up fit (issue 14, session 14): the registration leaves the
baseline's pose off (mostly in depth), and the fit reader of :mod:`MSKdeXLib.learning.followup_fit`
reads the follow-up at that pose. Here the water and bone paths' first-order change per unit of each of
the 6 pose parameters about the registered pose (the registration's own
:class:`~MSKdeXLib.registration.optimize.PoseSpace`: rotations in deg about the camera axes through the
bones' centre, translations in mm along the camera axes, +z the principal ray = depth) is made by central
differences of :func:`~MSKdeXLib.projection.simulate.material_paths`, to be fitted with the muscles
(:meth:`~MSKdeXLib.learning.followup_fit.FitModel.with_nuisance`, prior N(0, SD^2) per parameter).

The muscles' lean-mass channels are not moved: their change with the pose enters the codes only through
``r_k`` x (channel change), a product of two small quantities (second order). Units: paths g/cm^2; poses
CT LPS mm -> camera; rotations deg, translations mm.
"""

from __future__ import annotations

import numpy as np

from ..io.images import LabelMap, Volume
from ..projection.geometry import Camera
from .cohort import SubjectSpec, acquisition_settings, bone_centre

#: the 6 pose parameters' names (camera frame; z is depth, along the principal ray)
POSE_NAMES = ("pose rot x deg", "pose rot y deg", "pose rot z deg", "pose x mm", "pose y mm", "pose depth mm")


def pose_sds(rotation_deg: float, inplane_mm: float, depth_mm: float) -> np.ndarray:
    """The 6 pose parameters' prior SDs (deg, deg, deg, mm, mm, mm) from a rotation SD, an in-plane
    translation SD and a depth SD."""
    return np.array([rotation_deg] * 3 + [inplane_mm] * 2 + [depth_mm], np.float64)


def pose_space(ct: Volume, labels: LabelMap, pose: np.ndarray):
    """The registration's 6-parameter :class:`~MSKdeXLib.registration.optimize.PoseSpace` about ``pose``
    (CT LPS mm -> camera), rotations about the bones' centre."""
    from ..registration.optimize import PoseSpace

    return PoseSpace(np.asarray(pose, np.float64), bone_centre(ct, labels))


def pose_jacobian(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
                  steps: np.ndarray) -> np.ndarray:
    """(6, 2, rows, cols) float64: the (water, bone) paths' change (g/cm^2 per deg or mm) per unit of each
    pose parameter (:data:`POSE_NAMES`) about ``pose``, by central differences of ``+-steps`` (6 values;
    a step the size of the prior SD makes it the secant over the likely error rather than the tangent)."""
    from ..projection.simulate import material_paths

    steps = np.asarray(steps, np.float64).reshape(6)
    if not np.all(steps > 0):
        raise ValueError(f"pose steps must be positive, got {steps}")
    space = pose_space(ct, labels, pose)
    settings = acquisition_settings(spec, camera)
    out = np.empty((6, 2, camera.rows, camera.cols), np.float64)
    for i in range(6):
        both = []
        for sign in (1.0, -1.0):
            x = np.zeros(6)
            x[i] = sign * steps[i]
            p = material_paths(ct, camera, space.matrix(x), settings)
            both.append((p["water"].numpy().astype(np.float64), p["bone"].numpy().astype(np.float64)))
        (w1, b1), (w2, b2) = both
        out[i, 0], out[i, 1] = (w1 - w2) / (2 * steps[i]), (b1 - b2) / (2 * steps[i])
    return out


def pose_nuisance(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
                  sd: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The pose parameters with a positive prior SD in ``sd`` (6 values, :func:`pose_sds`) as
    :meth:`~MSKdeXLib.learning.followup_fit.FitModel.with_nuisance`'s arguments: paths per unit (secant
    over +-SD), SDs and names."""
    sd = np.asarray(sd, np.float64).reshape(6)
    keep = np.flatnonzero(sd > 0)
    if not len(keep):
        return np.zeros((0, 2, camera.rows, camera.cols)), np.zeros(0), ()
    jac = pose_jacobian(ct, labels, camera, pose, spec, np.where(sd > 0, sd, 1.0))
    return jac[keep], sd[keep], tuple(POSE_NAMES[i] for i in keep)


def pose_change(names: tuple[str, ...], values: np.ndarray) -> np.ndarray:
    """The 6 pose parameters (deg, mm; :data:`POSE_NAMES` order, 0 where not fitted) among a fit's
    nuisances ``names`` / ``values``."""
    x = np.zeros(6)
    for n, v in zip(names, np.asarray(values, np.float64)):
        if n in POSE_NAMES:
            x[POSE_NAMES.index(n)] = float(v)
    return x
