"""A patient whose soft tissue moved between CT and radiograph, for measuring registration: the
bones stay rigid per body, everything else changes (:func:`moved_scene`; benchmarks and tests).

* **Soft tissue deformed** by a smooth random displacement field (a Gaussian random field of
  correlation length ``field_sigma_mm``, largest displacement ``amplitude_mm``), tapered to
  zero near bone so that no bone is bent;
* **subcutaneous fat** thicker (a fat shell added outside the skin) or thinner (fat next to the
  skin removed) by up to ``fat_mm``;
* **gas** changed: random gas pockets (ellipsoids, -900 HU) in the soft tissue, and existing
  small gas volumes (bowel gas, not the lungs) filled with soft tissue at random;
* **bones**: every body's voxels are taken out of the tissue (filled with ``filler_hu``, the
  tissue they displace) and rendered at the body's own pose as their attenuation in excess of
  that filler: a femur turned in its hip displaces soft tissue instead of leaving a hole.

Hip poses (:func:`hip_motion`): flexion, abduction and rotation about the femoral head,
independent and uniform within +-``max_deg``. Frames: CT LPS mm, arrays [k, j, i].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from MSKdeXLib.io.images import Volume
from MSKdeXLib.registration.articulated import rotate_about
from MSKdeXLib.registration.bodies import Body
from MSKdeXLib.registration.bodyvolume import block_factors, body_mask

from benchmarks.foreign import mu_of_hu


@dataclass
class TissueMotion:
    """How much the soft tissue changes (per trial: :meth:`sample`)."""

    amplitude_mm: float = 6.0      # largest displacement of the smooth field
    field_sigma_mm: float = 40.0   # correlation length of the field
    bone_taper_mm: tuple[float, float] = (4.0, 20.0)  # displacement 0 within the first, full beyond the second
    fat_mm: float = 0.0            # > 0: fat shell added outside the skin; < 0: fat near the skin removed
    gas_pockets: int = 2
    gas_radius_mm: tuple[float, float] = (8.0, 20.0)
    fill_gas_probability: float = 0.5  # each existing small gas volume filled with soft tissue
    filler_hu: float = 40.0        # what a body's voxels become in the tissue (displaced soft tissue)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "TissueMotion":
        return cls(amplitude_mm=rng.uniform(3.0, 8.0), field_sigma_mm=rng.uniform(30.0, 60.0),
                   fat_mm=rng.uniform(-8.0, 8.0), gas_pockets=int(rng.integers(0, 5)))


def smooth_field(shape, spacing_kji, sigma_mm: float, amplitude_mm: float, rng: np.random.Generator) -> np.ndarray:
    """(3, k, j, i) displacement (mm, LPS-index axes k, j, i) of a Gaussian random field whose
    largest magnitude is ``amplitude_mm``; computed on a coarse grid and interpolated."""
    step = sigma_mm / 3.0
    coarse = [max(4, int(np.ceil(n * s / step)) + 1) for n, s in zip(shape, spacing_kji)]
    u = np.stack([ndimage.gaussian_filter(rng.normal(size=coarse), 3.0, mode="wrap") for _ in range(3)])
    mag = np.sqrt((u ** 2).sum(0)).max()
    u *= amplitude_mm / max(mag, 1e-12)
    zoom = [n / c for n, c in zip(shape, coarse)]
    return np.stack([ndimage.zoom(c, zoom, order=1)[:shape[0], :shape[1], :shape[2]] for c in u]).astype(np.float32)


def warp(hu: np.ndarray, disp_mm: np.ndarray, spacing_kji) -> np.ndarray:
    """``hu`` (k, j, i) resampled at x - u(x) (the tissue at x moved by u), trilinear, slab by slab."""
    out = np.empty_like(hu)
    jj, ii = np.meshgrid(np.arange(hu.shape[1], dtype=np.float32), np.arange(hu.shape[2], dtype=np.float32),
                         indexing="ij")
    for k in range(hu.shape[0]):
        coords = [np.full_like(jj, k) - disp_mm[0, k] / spacing_kji[0], jj - disp_mm[1, k] / spacing_kji[1],
                  ii - disp_mm[2, k] / spacing_kji[2]]
        out[k] = ndimage.map_coordinates(hu, coords, order=1, mode="nearest")
    return out


def change_fat(hu: np.ndarray, patient: np.ndarray, spacing_kji, fat_mm: float) -> np.ndarray:
    """Subcutaneous fat changed by ``fat_mm`` (in-plane distances from the skin)."""
    if abs(fat_mm) < 0.5:
        return hu
    sampling = (1e6, spacing_kji[1], spacing_kji[2])   # in-plane only: slices are independent
    out = hu.copy()
    if fat_mm > 0:
        d = ndimage.distance_transform_edt(~patient, sampling=sampling)
        out[(d > 0) & (d <= fat_mm)] = -100.0
    else:
        d = ndimage.distance_transform_edt(patient, sampling=sampling)
        out[(d <= -fat_mm) & patient & (hu > -190) & (hu < -30)] = -1000.0
    return out


def change_gas(hu: np.ndarray, patient: np.ndarray, far_from_bone: np.ndarray, spacing_kji, motion: TissueMotion,
               rng: np.random.Generator) -> np.ndarray:
    """Small existing gas volumes filled at random; ``motion.gas_pockets`` new pockets placed in
    soft tissue away from bone, in the middle half of the patient (axis i: left-right)."""
    out = hu.copy()
    gas, n = ndimage.label((hu < -500) & patient)
    if n:
        sizes = ndimage.sum_labels(np.ones_like(hu), gas, range(1, n + 1)) * np.prod(spacing_kji) / 1000.0
        for lab in np.flatnonzero((sizes < 300.0) & (rng.random(n) < motion.fill_gas_probability)) + 1:
            out[gas == lab] = 20.0
    # bowel gas lies in the abdomen and pelvis: the middle half of the patient from left to right
    cols = np.flatnonzero(patient.any((0, 1)))
    middle = np.zeros(hu.shape[2], dtype=bool)
    if cols.size:
        c0, c1 = cols[0], cols[-1]
        middle[int(c0 + 0.25 * (c1 - c0)):int(c1 - 0.25 * (c1 - c0)) + 1] = True
    soft = np.argwhere(far_from_bone & patient & (hu > -100) & (hu < 100) & middle[None, None, :])
    for _ in range(motion.gas_pockets if len(soft) else 0):
        centre = soft[rng.integers(len(soft))]
        radii = rng.uniform(*motion.gas_radius_mm, size=3)
        half = np.ceil(radii / spacing_kji).astype(int)
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, hu.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        g = np.indices(hi - lo, dtype=np.float32)
        r2 = sum(((g[a] + lo[a] - centre[a]) * spacing_kji[a] / radii[a]) ** 2 for a in range(3))
        out[box][(r2 <= 1.0) & patient[box]] = -900.0
    return out


def moved_scene(ct: Volume, labels, bodies: list[Body], true_poses: dict[str, np.ndarray], motion: TissueMotion,
                rng: np.random.Generator, tissue_mm: float = 1.5, masks: dict[str, np.ndarray] | None = None
                ) -> list[tuple[Volume, np.ndarray]]:
    """[(attenuation volume mu 1/mm, ct_to_camera pose)] of the patient with moved soft tissue:
    the tissue (block-averaged to about ``tissue_mm`` first, then changed) at the first body's
    pose, then each body's bone (the voxels it places: the last body holding them) as
    attenuation in excess of ``motion.filler_hu``, cropped, at its pose (see the module doc).
    ``masks``: each body's voxels on ``ct``'s grid when it is not the label map's (a CT continued
    past its end, :func:`~.articulated.extend_inferior`)."""
    hu = np.asarray(ct.array, dtype=np.float32)
    placed, owner = np.zeros(hu.shape, dtype=bool), []
    for body in bodies[::-1]:
        m = (masks[body.name] if masks else body.mask(labels)) & ~placed
        placed |= m
        owner.append((body, m))
    tissue = np.where(body_mask(ct), hu, -1000.0).astype(np.float32)
    tissue[placed] = motion.filler_hu
    grid = _blocked(ct, tissue, tissue_mm)
    bone = _blocked(ct, (placed | (hu > 200)).astype(np.float32), tissue_mm).array > 0
    spacing = np.asarray(grid.spacing, dtype=np.float64)[::-1]
    t = grid.array
    patient = t > -500
    dist = ndimage.distance_transform_edt(~bone, sampling=spacing)
    lo, hi = motion.bone_taper_mm
    taper = np.clip((dist - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    t = change_fat(t, patient, spacing, motion.fat_mm)
    t = change_gas(t, patient, dist > 15.0, spacing, motion, rng)
    disp = smooth_field(t.shape, spacing, motion.field_sigma_mm, motion.amplitude_mm, rng)
    t = warp(t, disp * taper[None], spacing)
    scene = [(grid.with_array(mu_of_hu(t)), true_poses[bodies[0].name])]
    filler_mu = float(mu_of_hu(np.array([motion.filler_hu]))[0])
    for body, m in owner[::-1]:
        if m.any():
            scene.append((_cropped(ct, np.where(m, mu_of_hu(hu) - filler_mu, 0.0), m), true_poses[body.name]))
    return scene


def _blocked(ct: Volume, arr: np.ndarray, target_mm: float) -> Volume:
    """``arr`` (on the CT grid) block-averaged to about ``target_mm`` voxels."""
    f = np.array(block_factors(ct.spacing, target_mm))[::-1]
    shape = (np.array(arr.shape) // f) * f
    m = arr[:shape[0], :shape[1], :shape[2]].reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1],
                                                      shape[2] // f[2], f[2]).mean((1, 3, 5))
    origin = (ct.index_to_lps() @ np.r_[(f[::-1] - 1) / 2.0, 1.0])[:3]
    return Volume(m.astype(np.float32), tuple(np.asarray(ct.spacing) * f[::-1]), tuple(origin), ct.direction.copy())


def _cropped(ct: Volume, mu: np.ndarray, mask: np.ndarray, pad: int = 1) -> Volume:
    """``mu`` cropped to ``mask``'s bounding box (+ ``pad`` voxels), on the CT's grid."""
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, mask.shape)
    sub = mu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
    origin = (ct.index_to_lps() @ np.r_[lo[::-1], 1.0])[:3]
    return Volume(sub, ct.spacing, tuple(origin), ct.direction.copy())


def femur_axis(labels, femur: Body) -> np.ndarray:
    """Unit long axis (LPS) of a femur: the first principal axis of its voxels, pointing down
    (towards -z, inferior in LPS)."""
    pts = labels.grid.voxel_centres_lps(femur.mask(labels))
    _, _, vt = np.linalg.svd(pts - pts.mean(0), full_matrices=False)
    return vt[0] if vt[0][2] < 0 else -vt[0]


def hip_motion(centre: np.ndarray, shaft_axis: np.ndarray, rng: np.random.Generator, max_deg: float = 15.0
               ) -> tuple[np.ndarray, dict]:
    """(4x4 LPS motion about the femoral head ``centre``, the angles deg): flexion about the
    left-right axis (LPS x), abduction about the anterior-posterior axis (LPS y) and rotation
    about the femur's ``shaft_axis``, each uniform within +-``max_deg``."""
    flex, abd, rot = rng.uniform(-max_deg, max_deg, 3)
    m = rotate_about(centre, np.array([flex, 0.0, 0.0]))
    m = rotate_about(centre, np.array([0.0, abd, 0.0])) @ m
    m = rotate_about(centre, np.asarray(shaft_axis) * rot) @ m
    return m, {"flexion_deg": float(flex), "abduction_deg": float(abd), "rotation_deg": float(rot)}


def cut_ends(ct: Volume, threshold_hu: float = -400.0) -> list[np.ndarray]:
    """LPS points of the patient where the CT's field of view cuts it: the first and last slice,
    and the first and last column (i) when the patient reaches them (a radiograph has no such
    edges: :func:`~.foreign.shutters_hiding` hides them)."""
    patient = body_mask(ct, threshold_hu)
    ends = []
    for sl in ((0, slice(None), slice(None)), (-1, slice(None), slice(None)),
               (slice(None), slice(None), 0), (slice(None), slice(None), -1)):
        m = np.zeros(patient.shape, dtype=bool)
        m[sl] = patient[sl]
        if m.sum() > 20:
            ends.append(ct.voxel_centres_lps(m)[:: max(1, int(m.sum()) // 2000)])
    return ends
