"""Smooth soft-tissue motion in the projection domain: a re-simulation's physics (water- and bone-like
line integrals, the muscles' lean-mass channels; detector pixels) warped by one random smooth 2D
displacement field. It is the first-order picture of a smooth 3D deformation of the body seen in
projection (displacements at the object scaled by the magnification), at milliseconds per sample
instead of a CT deformation and re-rendering (seconds): a follow-up reader trained on such warps sees
thousands of distinct soft-tissue positions rather than a few dozen views.

Units: ``sd_mm`` and ``control_mm`` are at the object (isocentre), as the cohort's 3D deformation's;
fields are in detector pixels (row, col).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from .resimulation import SubjectPhysics


def smooth_displacement(shape: tuple[int, int], sd_px: tuple[float, float], control_px: tuple[float, float],
                        rng: np.random.Generator) -> np.ndarray:
    """A random smooth displacement field (2, rows, cols), px: per axis N(0, ``sd_px``) on a control
    grid ``control_px`` apart (at least 3 x 3 points over the image), cubic-interpolated to every pixel."""
    ctrl = [max(3, int(np.ceil(n / max(c, 1e-6))) + 1) for n, c in zip(shape, control_px)]
    out = np.empty((2, *shape), np.float64)
    for axis in range(2):
        coarse = rng.normal(0.0, float(sd_px[axis]), ctrl)
        fine = ndimage.zoom(coarse, [s / c for s, c in zip(shape, ctrl)], order=3, mode="nearest", grid_mode=True)
        out[axis] = fine[:shape[0], :shape[1]]
    return out


def _warp(images: np.ndarray, field: np.ndarray, padding: str) -> np.ndarray:
    """``images`` (k, rows, cols) sampled bilinearly at pixel + ``field`` (2, rows, cols; px); outside the
    image the edge value (``padding`` "border") or 0 ("zeros")."""
    rows, cols = images.shape[-2:]
    r = np.arange(rows, dtype=np.float64)[:, None] + field[0]
    c = np.arange(cols, dtype=np.float64)[None, :] + field[1]
    grid = np.stack([2.0 * c / max(cols - 1, 1) - 1.0, 2.0 * r / max(rows - 1, 1) - 1.0], axis=-1)[None]
    x = torch.from_numpy(np.ascontiguousarray(images, np.float64))[None]
    out = torch.nn.functional.grid_sample(x, torch.from_numpy(grid), mode="bilinear", padding_mode=padding,
                                          align_corners=True)
    return out[0].numpy()


def warp_physics(physics: SubjectPhysics, sd_mm: float, rng: np.random.Generator,
                 control_mm: float = 80.0) -> SubjectPhysics:
    """A copy of ``physics`` whose water and bone paths and muscle lean-mass channels are moved by one
    smooth field (SD ``sd_mm`` of the control displacements at the object, ``control_mm`` apart; x the
    magnification at the detector). Each muscle's lean mass (``lean_mass_g``, when known) follows its
    channel's sum, as a resampled CT's does under the cohort's 3D deformation. ``sd_mm`` 0: unchanged."""
    if float(sd_mm) <= 0:
        return physics
    cam = physics.camera
    shape = tuple(int(v) for v in physics.water.shape[-2:])
    px = (cam.spacing_row_mm, cam.spacing_col_mm)
    field = smooth_displacement(shape, tuple(sd_mm * physics.magnification / p for p in px),
                                tuple(control_mm * physics.magnification / p for p in px), rng)
    paths = _warp(np.stack([physics.water.detach().cpu().numpy(), physics.bone.detach().cpu().numpy()]),
                  field, "border")
    names = list(physics.muscle_mass)
    moved = _warp(np.stack([np.asarray(physics.muscle_mass[n], np.float64) for n in names]), field, "zeros")
    muscles = dict(zip(names, moved))
    lean = physics.lean_mass_g
    if lean is not None:
        ratio = [float(muscles[n].sum()) / max(float(np.sum(physics.muscle_mass[n])), 1e-12) for n in physics.muscles]
        lean = np.asarray(lean, np.float64) * np.asarray(ratio)
    return replace(physics, water=torch.from_numpy(paths[0]).to(physics.water.dtype),
                   bone=torch.from_numpy(paths[1]).to(physics.bone.dtype), muscle_mass=muscles, lean_mass_g=lean)
