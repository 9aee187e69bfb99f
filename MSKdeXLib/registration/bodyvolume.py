"""Small volumes and detector windows that make registering one body cheap.

* :func:`body_volume`: the attenuation of a set of bone structures only, cropped to their
  bounding box (+ margin) and block-averaged to about ``target_mm`` voxels, stored as a
  :class:`~MSKdeXLib.io.images.Volume` of HU whose DRR (``DRRRenderer(volume, camera)``, no label
  map) is the bone-only DRR of those structures. Voxels outside the structures are air
  (-1000 HU: mu = 0). Block averaging is done on mu (1/mm), so partial voxels keep their
  attenuation; with a factor of 1 the DRR equals the full CT's structure-masked DRR.
* :func:`tissue_volume`: the rest of the CT (soft tissue ...), the same way, for a DRR that models
  the radiograph's soft tissue.
* :func:`crop_camera`: a detector window (rows r0:r1, cols c0:c1) as a camera of its own
  (same rays: the principal point is shifted).

Frames: CT LPS mm; voxel arrays [k, j, i].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..projection.geometry import Camera
from ..io.images import Volume
from ..projection.rendering import MU_WATER_PER_MM, union_mask


def block_factors(spacing_ijk, target_mm: float) -> tuple[int, int, int]:
    """Integer down-sampling factor per axis (i, j, k): voxels become about ``target_mm``
    (never finer than they are, never coarser than ``target_mm``)."""
    return tuple(max(1, int(np.floor(target_mm / s + 1e-6))) for s in spacing_ijk)  # type: ignore[return-value]


def body_volume(ct: Volume, labels, structures, margin_mm: float = 6.0, target_mm: float = 1.5,
                mu_water_per_mm: float = MU_WATER_PER_MM, max_hu: float | None = None,
                over_hu: float | None = None) -> Volume:
    """Bone-only volume (HU) of ``structures``: cropped, block-averaged on mu (see module doc).
    ``max_hu``: CT numbers above it (metal implants) count as ``max_hu``: a radiograph's
    beam-hardened metal is much less bright than a linear DRR of it. ``over_hu``: the bone's
    attenuation in excess of tissue of this CT number (what a bone adds to a
    :func:`tissue_volume` whose bone voxels were filled with it; clipped at 0)."""
    mask = union_mask(labels, structures)
    if not mask.any():
        raise ValueError("structures have no voxels")
    minus = 0.0 if over_hu is None else mu_water_per_mm * max(0.0, 1.0 + over_hu / 1000.0)
    out = masked_volume(ct, mask, margin_mm, target_mm, mu_water_per_mm, max_hu, minus)
    out.metadata["body_volume"] = [s.name for s in structures]
    return out


def tissue_volume(ct: Volume, labels, excluded, target_mm: float = 1.5, mu_water_per_mm: float = MU_WATER_PER_MM,
                  max_hu: float | None = None, body_only: bool = True, fill_hu: float | None = None) -> Volume:
    """Everything of the CT but the voxels of ``excluded`` structures (soft tissue, unregistered
    bones ...), block-averaged like :func:`body_volume`: what moves with the first body when the
    DRR models the radiograph's soft tissue. ``body_only``: only the patient (:func:`body_mask`),
    not the CT's table or other objects, which a radiograph does not share. ``fill_hu``: the
    excluded voxels hold tissue of this CT number instead of air (a bone that moves displaces
    soft tissue; its DRR is then its excess over it, :func:`body_volume`'s ``over_hu``)."""
    excluded_mask = union_mask(labels, excluded)
    keep = ~excluded_mask
    src = ct
    if fill_hu is not None:
        src = ct.with_array(np.where(excluded_mask, np.float32(fill_hu), ct.array).astype(np.float32))
        keep = np.ones_like(keep)
    if body_only:
        keep &= body_mask(ct) | (excluded_mask if fill_hu is not None else False)
    out = masked_volume(src, keep, 0.0, target_mm, mu_water_per_mm, max_hu)
    out.metadata["body_volume"] = "tissue"
    return out


def body_mask(ct: Volume, threshold_hu: float = -400.0) -> np.ndarray:
    """The patient [k, j, i]: the largest 26-connected region of voxels above ``threshold_hu``
    (the CT's table, cushions and clothes apart from the body are left out; the lungs' air is
    below the threshold either way and adds no attenuation)."""
    lab, n = ndimage.label(ct.array > threshold_hu, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return np.zeros(ct.array.shape, dtype=bool)
    return lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))


def masked_volume(ct: Volume, mask: np.ndarray, margin_mm: float = 6.0, target_mm: float = 1.5,
                  mu_water_per_mm: float = MU_WATER_PER_MM, max_hu: float | None = None,
                  minus_mu: float = 0.0) -> Volume:
    """The CT's voxels in ``mask`` [k, j, i] (others air), cropped to the mask's bounding box +
    ``margin_mm`` and block-averaged on mu to about ``target_mm`` voxels (see module doc);
    ``minus_mu`` (1/mm) is taken off every masked voxel's mu (clipped at 0)."""
    if not mask.any():
        raise ValueError("mask has no voxels")
    spacing = np.asarray(ct.spacing, dtype=np.float64)          # (i, j, k)
    f_ijk = np.array(block_factors(spacing, target_mm))
    f_kji = f_ijk[::-1]
    shape = np.array(mask.shape)
    hit = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    pad = np.ceil(margin_mm / spacing[::-1]).astype(int)
    lo = np.maximum([h[0] for h in hit] - pad, 0)
    hi = np.minimum([h[-1] + 1 for h in hit] + pad, shape)
    hi = lo + np.ceil((hi - lo) / f_kji).astype(int) * f_kji  # whole blocks (may pass the edge)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    hu = np.full(tuple(hi - lo), -1000.0, dtype=np.float32)
    m = np.zeros(tuple(hi - lo), dtype=bool)
    src = ct.array[box]
    hu[tuple(slice(0, n) for n in src.shape)] = src if max_hu is None else np.minimum(src, max_hu)
    m[tuple(slice(0, n) for n in src.shape)] = mask[box]
    mu = np.where(m, np.maximum(0.0, mu_water_per_mm * np.maximum(0.0, 1.0 + hu / 1000.0) - minus_mu), 0.0)
    mu = mu.astype(np.float32)
    if np.any(f_kji > 1):
        k, j, i = mu.shape
        mu = mu.reshape(k // f_kji[0], f_kji[0], j // f_kji[1], f_kji[1], i // f_kji[2], f_kji[2]).mean((1, 3, 5))
    hu_out = ((mu / mu_water_per_mm - 1.0) * 1000.0).astype(np.float32)
    # centre of the first block, in index units of the original grid
    first = np.r_[lo[::-1] + (f_ijk - 1) / 2.0, 1.0]
    origin = (ct.index_to_lps() @ first)[:3]
    return Volume(hu_out, tuple(spacing * f_ijk), tuple(origin), ct.direction.copy(), ct.source,
                  {"block_factors_ijk": f_ijk.tolist()})


def crop_camera(camera: Camera, r0: int, r1: int, c0: int, c1: int) -> Camera:
    """The detector window rows r0:r1, cols c0:c1 of ``camera`` as a camera (same rays)."""
    cx, cy = camera.principal_point
    return Camera(int(r1 - r0), int(c1 - c0), camera.spacing_row_mm, camera.spacing_col_mm, camera.sid_mm,
                  cx - c0, cy - r0)


def mask_box(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) bounding box of a 2D bool mask grown by ``pad`` px (clipped), None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return None
    h, w = mask.shape
    return (max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad), max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad))
