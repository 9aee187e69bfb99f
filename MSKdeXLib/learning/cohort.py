"""Virtual cohort: many virtual subjects with known truth from one real CT + labels.

Each subject is the real CT with anatomy changes applied on the CT arrays (HU and labels, both
on the CT grid, LPS mm), then imaged with a changed pose and acquisition:

* per-muscle **atrophy** (boundary muscle voxels become fat, ~ -100 HU, label 0) or
  **hypertrophy** (unlabelled fat voxels next to the muscle become muscle): a body-wide change
  shared by all muscles of the subject (``body_change``: sarcopenic to muscular subjects, as
  muscle sizes within one person are strongly correlated) plus an independent per-muscle part;
* per-muscle **fat infiltration** (HU inside the muscle lowered to fat: lean mass drops, volume
  stays);
* **subcutaneous fat** thicker (air at the body surface becomes fat) or thinner (surface fat
  becomes air);
* a smooth **elastic deformation** (random low-frequency displacement field; CT linear, labels
  nearest);
* a **pose** change (rotation deg about the LPS axes through the isocentre, translation mm);
* **acquisition** changes (energy, noise, scatter, contrast) of the simulated radiograph;
* with the **specificity** preset (:func:`specificity_ranges`, ``mskdex cohort --preset
  specificity``) also: every muscle and side changed on its own, a unilateral hip-osteoarthritis
  pattern, an anisotropic size change (voxel spacing scaled, so the truth stays exact), the SID,
  focal spot and detector blur, grid or no grid, collimation, and vendor-style processing of the
  image (unsharp masking, S-shaped LUT). Every range: :class:`CohortRanges`.

Subject ``i`` depends only on (seed, i): its random generator is ``default_rng([seed, i])``.
The truth (metrics.json) is computed from the modified CT + labels; the target channels are
rendered at the radiograph's true pose, so they are pixel-aligned with it (paired).

Subject folder (``subject-0007/``)::

    xray.dcm + xray.json        DICOM DX radiograph + sidecar (true pose, camera, settings)
    metrics.json                CT-derived metrics, ``mskdex metrics --json`` format
    targets.safetensors         mass (K, rows, cols) g/pixel, volume (K, rows, cols) cm^3/pixel
    subject.json                parameters of the subject (the changes), camera, pose, structures
    ct.nii.gz, labels.nii.gz    modified CT and labels (only with keep_ct)
    physics.safetensors         water- and bone-like paths (g/cm^2) + lean-to-water coefficients (only
                                with physics: what learning.resimulation re-simulates the radiograph from)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..anatomy.ct_metrics import metrics_document
from ..anatomy.density import DensityModel
from ..errors import UserError
from ..projection.geometry import Camera, ap_pose, perturbed_pose, project
from ..io.images import LabelMap, Volume
from ..anatomy.structures import Structure
from ..settings import COHORT_DETECTOR, SID_MM

COHORT_FORMAT = "mskdex-cohort/1"
SUBJECT_FORMAT = "mskdex-virtual-subject/1"
FAT_HU = -100.0
AIR_HU = -1000.0
FAT_RANGE_HU = (-190.0, -30.0)
MAX_TOTAL_ATROPHY = 0.6       # a muscle keeps at least 40 % of its voxels
MAX_TOTAL_HYPERTROPHY = 0.5
#: mean HU of fat-infiltrated voxels (fat_infiltration draws U(-110, -40))
INFILTRATED_HU = -75.0
PHYSICS_FORMAT = "mskdex-subject-physics/1"


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
@dataclass
class CohortRanges:
    """How strongly subjects vary: every range of a cohort, in one place. Fractions are of a
    muscle's voxels; mm, deg, HU, kV. ``(lo, hi)`` = uniform in [lo, hi]. The defaults are the
    original cohort (mostly one body-wide muscle factor, moderate nuisance); the fields after
    ``contrast`` default to "off", so a cohort made without them is unchanged. Named presets:
    :data:`PRESETS` (``mskdex cohort --preset``)."""

    # --- muscles: a body-wide part shared by all muscles, then each muscle and side on its own ---
    body_change: tuple[float, float] = (-0.25, 0.15)  # body-wide change (fraction of voxels), all muscles
    change_probability: float = 0.8         # chance that a muscle (each side separately) gets its own extra change
    max_atrophy: float = 0.15               # per-muscle extra atrophy: U(0.03, x) of voxels become fat (2/3 of changes)
    max_hypertrophy: float = 0.15           # per-muscle extra growth: U(0.03, x) (1/3 of changes; limited by nearby fat)
    # the total change of a muscle is kept in [-MAX_TOTAL_ATROPHY, MAX_TOTAL_HYPERTROPHY]
    infiltration_probability: float = 0.5   # chance that a muscle (each side separately) is fat-infiltrated
    max_infiltration: float = 0.20          # U(0.02, x) of its lean voxels become fatty
    # --- habitus and pose (independent of the muscles) ---
    subcutaneous_fat_mm: float = 9.0        # thickness change in [-x, +x] mm
    elastic_mm: float = 3.0                 # std of the control-point displacements, mm
    elastic_control_mm: float = 80.0        # control-point spacing, mm (low frequency)
    rotation_deg: float = 5.0               # uniform in [-x, x] about each LPS axis
    translation_mm: float = 10.0            # uniform in [-x, x] along each LPS axis
    # --- acquisition ---
    energy_kvp: tuple[float, float] = (70.0, 90.0)   # tube voltage, kV
    # relative noise at the median signal, scatter fraction, detector gamma: moderate ranges (a
    # scatter fraction of 0.3 or noise of 1 % already hide most bone contrast at these pixel sizes)
    noise: tuple[float, float] = (0.002, 0.008)      # relative quantum noise at the median signal
    scatter: tuple[float, float] = (0.02, 0.15)      # scatter share of the signal (with an anti-scatter grid)
    contrast: tuple[float, float] = (0.9, 1.1)       # detector / LUT gamma
    # --- specificity preset additions (off by default) ---
    oa_probability: float = 0.0             # chance of a unilateral hip-osteoarthritis pattern (side 50/50)
    oa_muscles: tuple[str, ...] = ("gluteus_medius", "gluteus_minimus", "iliopsoas")  # affected-side muscles
    oa_atrophy: tuple[float, float] = (0.10, 0.30)       # their extra atrophy (fraction of voxels)
    oa_infiltration: tuple[float, float] = (0.05, 0.25)  # their extra fat infiltration (fraction of lean voxels)
    scale: float = 0.0                      # overall size: each grid axis scaled by U(1 - x, 1 + x), independently
    sid_mm: tuple[float, float] | None = None            # source-to-image distance, mm (None: the cohort's)
    focal_spot_mm: tuple[float, float] = (1.2, 1.2)      # focal spot FWHM, mm
    detector_blur_mm: tuple[float, float] = (0.15, 0.15)  # detector unsharpness (Gaussian sigma), mm
    no_grid_probability: float = 0.0        # chance of a grid-less image (bedside): scatter from scatter_no_grid
    scatter_no_grid: tuple[float, float] = (0.5, 0.7)    # scatter share without a grid
    collimation: float = 0.0                # up to this fraction of the field width cut at each edge, U(0, x)
    unsharp_probability: float = 0.0        # vendor processing: chance of unsharp masking
    unsharp_amount: tuple[float, float] = (0.3, 1.5)     # x + a (x - blur(x)), on the [0, 1] detector codes
    unsharp_sigma_mm: tuple[float, float] = (4.0, 20.0)  # its blur (Gaussian sigma at the detector), mm
    lut_strength: tuple[float, float] = (0.0, 0.0)       # S-shaped LUT (logistic of slope k; 0 = linear)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CohortRanges":
        """From :meth:`to_dict`'s JSON (lists back to tuples); unknown keys raise TypeError."""
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def specificity_ranges() -> CohortRanges:
    """The **specificity** preset: each muscle and side changes on its own (atrophy/hypertrophy
    and fat infiltration drawn independently), a unilateral hip-osteoarthritis pattern in 40 %
    of subjects (affected-side gluteus medius/minimus and iliopsoas atrophy + fat infiltration),
    a smaller body-wide factor, and habitus (subcutaneous fat, anisotropic size +-10 %), pose and
    acquisition drawn independently of them, acquisition as wide as real AP hip radiographs
    (kVp, SID, noise, grid or not, blur, collimation, unsharp masking, LUT/gamma). A method that
    knows one number per subject cannot predict the per-muscle shares or the left-right
    asymmetries of this cohort."""
    return CohortRanges(
        body_change=(-0.15, 0.10), change_probability=1.0, max_atrophy=0.20, max_hypertrophy=0.15,
        infiltration_probability=0.6, max_infiltration=0.20,
        oa_probability=0.4, oa_atrophy=(0.05, 0.20), oa_infiltration=(0.05, 0.20),
        subcutaneous_fat_mm=9.0, scale=0.10, elastic_mm=2.0, rotation_deg=3.0, translation_mm=10.0,
        energy_kvp=(70.0, 85.0), sid_mm=(1000.0, 1150.0), noise=(0.001, 0.006), scatter=(0.10, 0.35),
        no_grid_probability=0.15, scatter_no_grid=(0.5, 0.7), focal_spot_mm=(0.6, 1.2),
        detector_blur_mm=(0.1, 0.4), collimation=0.05, contrast=(0.8, 1.25), unsharp_probability=0.7,
        unsharp_amount=(0.3, 1.5), unsharp_sigma_mm=(4.0, 20.0), lut_strength=(0.0, 6.0))


def preset_ranges(name: str) -> CohortRanges:
    """The ranges of a named preset (:data:`PRESETS`); UserError for an unknown name."""
    if name == "demo":  # the demo's ranges live with the demo (lazy: demo imports the cohort)
        from ..demo import demo_ranges

        return CohortRanges.from_dict(demo_ranges())
    if name not in PRESETS:
        raise UserError(f"unknown cohort preset '{name}' (use {', '.join(PRESETS)})")
    return PRESETS[name]()


#: named cohort presets (``mskdex cohort --preset``): the original ranges, the demo's
#: (wide body-wide muscle change, moderate nuisance) and the specificity benchmark's
PRESETS: dict[str, Callable[[], CohortRanges]] = {"default": CohortRanges, "demo": lambda: preset_ranges("demo"),
                                                   "specificity": specificity_ranges}


@dataclass
class SubjectSpec:
    """All random choices of one subject (JSON-ready), drawn by :func:`sample_subject`."""

    index: int
    seed: int
    muscle_changes: dict[str, float] = field(default_factory=dict)    # +grow / -shrink fraction (total)
    body_change: float = 0.0                                          # its body-wide part
    infiltration: dict[str, float] = field(default_factory=dict)      # fraction of lean voxels
    subcutaneous_fat_mm: float = 0.0
    elastic_mm: float = 0.0
    elastic_control_mm: float = 80.0
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    acquisition: dict[str, float] = field(default_factory=dict)
    oa_side: str | None = None                                        # side of the hip-OA pattern
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)               # size factor per grid axis (i, j, k)
    processing: dict[str, float] = field(default_factory=dict)        # vendor processing of the image

    @property
    def name(self) -> str:
        return f"subject-{self.index:04d}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rotation_deg"], d["translation_mm"] = list(self.rotation_deg), list(self.translation_mm)
        d["scale"] = list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SubjectSpec":
        """From :meth:`to_dict`'s JSON (its lists back to tuples); unknown keys raise TypeError."""
        d = dict(d)
        for k in ("rotation_deg", "translation_mm", "scale"):
            d[k] = tuple(d[k])
        return cls(**d)


def subject_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The random generator of subject ``index``: depends only on (seed, index, stream)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def sample_subject(seed: int, index: int, muscles: list[str], ranges: CohortRanges = CohortRanges()
                   ) -> SubjectSpec:
    """Draw subject ``index``'s parameters (deterministic in seed and index). A muscle's change
    is the subject's body-wide change plus, with ``change_probability``, its own extra change
    (2/3 atrophy, 1/3 hypertrophy), clipped to [-MAX_TOTAL_ATROPHY, MAX_TOTAL_HYPERTROPHY];
    each muscle and side is drawn independently. The specificity additions (hip-OA pattern,
    size, SID, blur, grid, collimation, vendor processing) come from their own random stream,
    so cohorts made without them are unchanged."""
    rng = subject_rng(seed, index, 0)
    lo, hi = (float(v) for v in ranges.body_change)
    body = float(subject_rng(seed, index, 3).uniform(lo, hi)) if hi > lo else lo
    changes, infil = {}, {}
    for name in muscles:
        u = rng.random()
        extra = 0.0
        if u < ranges.change_probability:
            # 2/3 atrophy, 1/3 hypertrophy (ageing cohorts lose muscle more often than gain)
            if rng.random() < 2.0 / 3.0:
                extra = -float(rng.uniform(min(0.03, ranges.max_atrophy), ranges.max_atrophy))
            else:
                extra = float(rng.uniform(min(0.03, ranges.max_hypertrophy), ranges.max_hypertrophy))
        changes[name] = body + extra
        if rng.random() < ranges.infiltration_probability:
            infil[name] = float(rng.uniform(0.02, ranges.max_infiltration))
    lo_hi = lambda r: float(rng.uniform(*r))  # noqa: E731
    spec = SubjectSpec(
        index=int(index), seed=int(seed), body_change=body,
        subcutaneous_fat_mm=float(rng.uniform(-1, 1) * ranges.subcutaneous_fat_mm),
        elastic_mm=float(ranges.elastic_mm), elastic_control_mm=float(ranges.elastic_control_mm),
        rotation_deg=tuple(float(v) for v in rng.uniform(-1, 1, 3) * ranges.rotation_deg),
        translation_mm=tuple(float(v) for v in rng.uniform(-1, 1, 3) * ranges.translation_mm),
        acquisition={"energy_kvp": lo_hi(ranges.energy_kvp), "noise": lo_hi(ranges.noise),
                     "scatter": lo_hi(ranges.scatter), "contrast": lo_hi(ranges.contrast)},
    )
    _specificity_draws(spec, subject_rng(seed, index, 4), muscles, ranges, changes, infil)
    spec.muscle_changes = {k: min(max(v, -MAX_TOTAL_ATROPHY), MAX_TOTAL_HYPERTROPHY) for k, v in changes.items()
                           if abs(min(max(v, -MAX_TOTAL_ATROPHY), MAX_TOTAL_HYPERTROPHY)) > 1e-9}
    spec.infiltration = {k: min(v, 0.9) for k, v in infil.items()}
    return spec


def _specificity_draws(spec: SubjectSpec, rng: np.random.Generator, muscles: list[str], ranges: CohortRanges,
                       changes: dict[str, float], infil: dict[str, float]) -> None:
    """The specificity preset's draws (in place; nothing drawn for a feature that is off):
    the hip-OA pattern (added to ``changes`` / ``infil``), size, and acquisition extras."""
    if ranges.oa_probability > 0 and rng.random() < ranges.oa_probability:
        spec.oa_side = "left" if rng.random() < 0.5 else "right"
        for stem in ranges.oa_muscles:
            name = f"{stem}_{spec.oa_side}"
            if name in muscles:
                changes[name] = changes.get(name, 0.0) - float(rng.uniform(*ranges.oa_atrophy))
                infil[name] = infil.get(name, 0.0) + float(rng.uniform(*ranges.oa_infiltration))
    if ranges.scale > 0:
        spec.scale = tuple(float(v) for v in 1.0 + rng.uniform(-1, 1, 3) * ranges.scale)
    acq = spec.acquisition
    if ranges.sid_mm is not None:
        acq["sid_mm"] = float(rng.uniform(*ranges.sid_mm))
    if tuple(ranges.focal_spot_mm) != (1.2, 1.2) or tuple(ranges.detector_blur_mm) != (0.15, 0.15):
        acq["focal_spot_mm"] = float(rng.uniform(*ranges.focal_spot_mm))
        acq["detector_blur_mm"] = float(rng.uniform(*ranges.detector_blur_mm))
    if ranges.no_grid_probability > 0 and rng.random() < ranges.no_grid_probability:
        acq["grid"], acq["scatter"] = 0.0, float(rng.uniform(*ranges.scatter_no_grid))
    if ranges.collimation > 0:
        acq["collimation_fraction"] = [float(v) for v in rng.uniform(0, ranges.collimation, 4)]
    if ranges.unsharp_probability > 0 and rng.random() < ranges.unsharp_probability:
        spec.processing["unsharp_amount"] = float(rng.uniform(*ranges.unsharp_amount))
        spec.processing["unsharp_sigma_mm"] = float(rng.uniform(*ranges.unsharp_sigma_mm))
    if max(ranges.lut_strength) > 0:
        spec.processing["lut_strength"] = float(rng.uniform(*ranges.lut_strength))


# ------------------------------------------------------------------------------------------------
# Anatomy changes on arrays (in place; arrays indexed [k, j, i]; spacing (i, j, k) mm)
# ------------------------------------------------------------------------------------------------
def _smooth_noise(shape, rng: np.random.Generator, sigma_vox: float = 2.0) -> np.ndarray:
    """A smooth random field with unit std (for irregular, blob-like change fronts)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    s = float(f.std())
    return f / s if s > 0 else f


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(a.min()) - margin), min(n, int(a.max()) + margin + 1))
                 for a, n in zip(idx, mask.shape))


def _zyx(spacing_ijk) -> tuple[float, float, float]:
    return tuple(float(s) for s in reversed(tuple(spacing_ijk)))  # type: ignore[return-value]


def atrophy(hu: np.ndarray, labels: np.ndarray, label: int, fraction: float, spacing_ijk,
            rng: np.random.Generator, fat_hu: float = FAT_HU) -> int:
    """Replace ``fraction`` of muscle ``label``'s voxels, from its boundary inwards, by fat.

    The removed voxels get HU ~ ``fat_hu`` (+- 10) and label 0. Returns the number removed.
    """
    mask = labels == label
    n = int(mask.sum())
    target = int(round(min(max(fraction, 0.0), 0.95) * n))
    if target == 0:
        return 0
    box = _crop_box(mask, 2)
    m = mask[box]
    depth = ndimage.distance_transform_edt(m, sampling=_zyx(spacing_ijk))
    score = depth + float(min(spacing_ijk)) * 0.7 * _smooth_noise(m.shape, rng)
    score[~m] = np.inf
    flat = np.argpartition(score.ravel(), target - 1)[:target]
    sel = np.zeros(m.size, dtype=bool)
    sel[flat] = True
    sel = sel.reshape(m.shape)
    hu_box, lab_box = hu[box], labels[box]
    hu_box[sel] = fat_hu + rng.normal(0.0, 10.0, int(sel.sum()))
    lab_box[sel] = 0
    return int(sel.sum())


def hypertrophy(hu: np.ndarray, labels: np.ndarray, label: int, fraction: float, spacing_ijk,
                rng: np.random.Generator, max_distance_mm: float = 12.0,
                fat_range_hu: tuple[float, float] = FAT_RANGE_HU, density: DensityModel = DensityModel()) -> int:
    """Grow muscle ``label`` by ``fraction`` of its voxels into unlabelled fat next to it.

    Grown voxels take HU values drawn from the muscle's own lean voxels (``density``'s lean window)
    and the muscle's label.
    Growth is limited to fat within ``max_distance_mm``; returns the number of voxels grown.
    """
    mask = labels == label
    n = int(mask.sum())
    target = int(round(max(fraction, 0.0) * n))
    if target == 0:
        return 0
    margin = int(np.ceil(max_distance_mm / min(spacing_ijk))) + 1
    box = _crop_box(mask, margin)
    m, hu_box, lab_box = mask[box], hu[box], labels[box]
    dist = ndimage.distance_transform_edt(~m, sampling=_zyx(spacing_ijk))
    cand = (lab_box == 0) & (hu_box >= fat_range_hu[0]) & (hu_box <= fat_range_hu[1]) & \
        (dist <= max_distance_mm)
    n_cand = int(cand.sum())
    if n_cand == 0:
        return 0
    target = min(target, n_cand)
    score = dist + float(min(spacing_ijk)) * 0.7 * _smooth_noise(m.shape, rng)
    score[~cand] = np.inf
    flat = np.argpartition(score.ravel(), target - 1)[:target]
    sel = np.zeros(m.size, dtype=bool)
    sel[flat] = True
    sel = sel.reshape(m.shape)
    source = hu_box[m]
    lean = source[density.lean(source)]
    pool = lean if lean.size else np.array([40.0])
    hu_box[sel] = rng.choice(pool, int(sel.sum()))
    lab_box[sel] = label
    return int(sel.sum())


def fat_infiltration(hu: np.ndarray, labels: np.ndarray, label: int, fraction: float,
                     rng: np.random.Generator, fat_hu: tuple[float, float] = (-110.0, -40.0)) -> int:
    """Lower the HU of ``fraction`` of muscle ``label``'s voxels (smooth blobs) to fat values.

    Labels are unchanged (volume stays), lean mass drops. Returns the number of voxels changed.
    """
    mask = labels == label
    n = int(mask.sum())
    target = int(round(min(max(fraction, 0.0), 0.9) * n))
    if target == 0:
        return 0
    box = _crop_box(mask, 0)
    m = mask[box]
    score = -_smooth_noise(m.shape, rng, 1.5)
    score[~m] = np.inf
    flat = np.argpartition(score.ravel(), target - 1)[:target]
    sel = np.zeros(m.size, dtype=bool)
    sel[flat] = True
    sel = sel.reshape(m.shape)
    hu[box][sel] = rng.uniform(fat_hu[0], fat_hu[1], int(sel.sum()))
    return int(sel.sum())


def body_mask(hu: np.ndarray, threshold_hu: float = -400.0) -> np.ndarray:
    """The patient's body: largest component above ``threshold_hu``, holes filled per slice."""
    body = hu > threshold_hu
    lab, n = ndimage.label(body)
    if n == 0:
        return body
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def subcutaneous_fat(hu: np.ndarray, labels: np.ndarray, change_mm: float, spacing_ijk,
                     rng: np.random.Generator, fat_range_hu: tuple[float, float] = FAT_RANGE_HU) -> int:
    """Thicken (``change_mm`` > 0: air at the skin becomes fat) or thin (< 0: unlabelled fat at
    the surface becomes air) the subcutaneous fat by about ``|change_mm|``. Returns voxels changed.

    Only unlabelled voxels change, so structure truths are untouched; the change is in-plane
    (per axial slice), as fat thickness is.
    """
    if abs(change_mm) < 1e-6:
        return 0
    body = body_mask(hu)
    sampling = (1e6, *_zyx(spacing_ijk)[1:])  # in-plane distances only
    half = 0.5 * min(spacing_ijk[:2])  # distance from the voxel centre to the body's edge
    if change_mm > 0:
        dist = ndimage.distance_transform_edt(~body, sampling=sampling) - half
        sel = (~body) & (dist <= change_mm) & (labels == 0)
        hu[sel] = FAT_HU + rng.normal(0.0, 10.0, int(sel.sum()))
    else:
        dist = ndimage.distance_transform_edt(body, sampling=sampling) - half
        sel = body & (dist <= -change_mm) & (labels == 0) & (hu >= fat_range_hu[0]) & \
            (hu <= fat_range_hu[1])
        hu[sel] = AIR_HU
    return int(sel.sum())


def elastic_deform(hu: np.ndarray, labels: np.ndarray, spacing_ijk, amplitude_mm: float,
                   control_mm: float, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Warp CT (linear) and labels (nearest) with a smooth random displacement field.

    Displacements (mm) are drawn N(0, amplitude_mm) on a coarse control grid of spacing
    ``control_mm`` and interpolated (cubic) to every voxel. Returns (hu, labels, max |d| mm).
    """
    shape = hu.shape
    zyx = np.array(_zyx(spacing_ijk))
    if amplitude_mm <= 0:
        return hu, labels, 0.0
    extent = np.array(shape) * zyx
    ctrl = [max(3, int(np.ceil(e / control_mm)) + 1) for e in extent]
    disp_vox = []
    for axis in range(3):
        coarse = rng.normal(0.0, amplitude_mm, ctrl).astype(np.float32)
        fine = ndimage.zoom(coarse, [s / c for s, c in zip(shape, ctrl)], order=3, mode="nearest",
                            grid_mode=True)
        fine = fine[:shape[0], :shape[1], :shape[2]]
        disp_vox.append(fine / zyx[axis])
    grid = np.indices(shape, dtype=np.float32)
    coords = [g + d for g, d in zip(grid, disp_vox)]
    del grid
    # outside the grid: the edge values (the CT's field of view stays filled)
    warped_hu = ndimage.map_coordinates(hu.astype(np.float32), coords, order=1,
                                        mode="nearest").astype(hu.dtype)
    warped_lab = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    mag = np.sqrt(sum((d * s) ** 2 for d, s in zip(disp_vox, zyx)))
    return warped_hu, warped_lab.astype(labels.dtype), float(mag.max())


def relabel(ct: Volume, labels: LabelMap, array: np.ndarray) -> LabelMap:
    """A single-layer LabelMap of ``array`` (values = table labels) on ``ct``'s grid."""
    present = [int(v) for v in np.unique(array) if v != 0 and int(v) in labels.table]
    grid = ct.with_array(array)
    return LabelMap(grid, [array], labels.table, {v: (0, v) for v in present}, labels.match,
                    dict(labels.notes))


def change_muscles(hu: np.ndarray, lab: np.ndarray, table, spacing_ijk, changes: dict[str, float],
                   infiltration: dict[str, float], rng: np.random.Generator,
                   density: DensityModel = DensityModel()) -> dict[str, dict[str, int]]:
    """Each muscle's change (in place on arrays [k, j, i]): ``changes`` (+grow into nearby fat / -shrink
    from the boundary, fraction of its voxels), then ``infiltration`` (fraction of its voxels made
    fatty), in name order; returns the voxels changed per muscle."""
    out: dict[str, dict[str, int]] = {}
    for name, frac in sorted(changes.items()):
        s = table.by_name(name)
        n0 = int((lab == s.label).sum())
        if frac < 0:
            changed = -atrophy(hu, lab, s.label, -frac, spacing_ijk, rng)
        else:
            changed = hypertrophy(hu, lab, s.label, frac, spacing_ijk, rng, density=density)
        out.setdefault(name, {})["voxels_changed"] = changed
        out[name]["voxels_before"] = n0
    for name, frac in sorted(infiltration.items()):
        out.setdefault(name, {})["voxels_infiltrated"] = fat_infiltration(hu, lab, table.by_name(name).label, frac, rng)
    return out


def modify_anatomy(ct: Volume, labels: LabelMap, spec: SubjectSpec, density: DensityModel = DensityModel()
                   ) -> tuple[Volume, LabelMap, dict]:
    """Apply ``spec``'s anatomy changes (lean tissue: ``density``'s window); returns (ct', labels', applied
    summary)."""
    rng = subject_rng(spec.seed, spec.index, 1)
    hu = ct.array.astype(np.float32, copy=True)
    lab = labels.label_array().astype(np.int32)
    hu, lab, max_disp = elastic_deform(hu, lab, ct.spacing, spec.elastic_mm, spec.elastic_control_mm, rng)
    applied: dict[str, Any] = {"elastic_max_displacement_mm": max_disp,
                               "muscles": change_muscles(hu, lab, labels.table, ct.spacing, spec.muscle_changes,
                                                         spec.infiltration, rng, density)}
    applied["subcutaneous_voxels_changed"] = subcutaneous_fat(hu, lab, spec.subcutaneous_fat_mm,
                                                              ct.spacing, rng)
    new_ct = ct.with_array(hu.astype(ct.array.dtype, copy=False))
    return new_ct, relabel(new_ct, labels, lab), applied


# ------------------------------------------------------------------------------------------------
# CT preparation, camera, pose
# ------------------------------------------------------------------------------------------------
def resample_case(ct: Volume, labels: LabelMap, voxel_mm: float) -> tuple[Volume, LabelMap]:
    """CT (linear) and labels (nearest) resampled to isotropic ``voxel_mm`` over the same extent."""
    import SimpleITK as sitk

    img = ct.to_sitk()
    size = [max(2, int(round(n * s / voxel_mm))) for n, s in zip(ct.size, ct.spacing)]
    # keep the outer edges of the grid where they were
    first_edge = np.array(ct.origin) - ct.direction @ (0.5 * np.array(ct.spacing))
    origin = first_edge + ct.direction @ (0.5 * np.full(3, voxel_mm))
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([voxel_mm] * 3)
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(tuple(ct.direction.ravel()))
    new_ct = Volume.from_sitk(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, AIR_HU,
                                            sitk.sitkFloat32), source=ct.source, metadata=ct.metadata)
    lab_img = Volume(labels.label_array(), ct.spacing, ct.origin, ct.direction).to_sitk()
    lab = sitk.GetArrayFromImage(sitk.Resample(lab_img, ref, sitk.Transform(), sitk.sitkNearestNeighbor,
                                               0, lab_img.GetPixelID())).astype(np.int32)
    out = relabel(new_ct, labels, lab)
    out.notes["resampled_voxel_mm"] = voxel_mm
    return new_ct, out


def bone_centre(ct: Volume, labels: LabelMap) -> np.ndarray:
    """LPS centre (mm) of the bounding box of the labelled bones (all labels when none)."""
    bones = labels.select(kinds=["bone"]) or labels.structures
    m = np.zeros(ct.array.shape, dtype=bool)
    for s in bones:
        m |= labels.mask(s)
    k, j, i = np.nonzero(m)
    lo, hi = np.array([i.min(), j.min(), k.min()]), np.array([i.max(), j.max(), k.max()])
    return (ct.index_to_lps() @ np.r_[(lo + hi) / 2.0, 1.0])[:3]


def base_view(ct: Volume, labels: LabelMap, camera: Camera) -> np.ndarray:
    """The default AP view (renderer's ``default_view`` when available, else ``ap_pose``)."""
    try:
        from ..projection.rendering import default_view
    except ImportError:
        return ap_pose(bone_centre(ct, labels), camera)
    return np.asarray(default_view(ct, labels, camera), dtype=np.float64)


def fit_camera(ct: Volume, labels: LabelMap, rows: int, cols: int, sid_mm: float = SID_MM,
               margin: float = 0.25) -> Camera:
    """A camera of ``rows x cols`` square pixels whose field of view holds every labelled voxel
    at the default view, with ``margin`` extra (room for pose changes and deformation)."""
    cam0 = Camera(rows, cols, 1.0, 1.0, sid_mm)
    pose = base_view(ct, labels, cam0)
    m = labels.label_array() > 0
    step = max(1, int(round(m.sum() ** (1 / 3) / 40)))
    pts = _subsampled_centres(ct, m, step)
    rc = project(cam0, pose, pts)
    c = np.array(cam0.principal_point[::-1])
    half = np.abs(rc - c).max(axis=0) + 2.0  # (rows, cols) in 1 mm pixels
    spacing = float(max(2 * half[0] / rows, 2 * half[1] / cols) * (1.0 + margin))
    return Camera(rows, cols, round(spacing, 4), round(spacing, 4), sid_mm)


def _subsampled_centres(ct: Volume, mask: np.ndarray, step: int) -> np.ndarray:
    k, j, i = np.nonzero(mask[::step, ::step, ::step])
    ijk1 = np.stack([i * step, j * step, k * step, np.ones_like(i)]).astype(np.float64)
    return (ct.index_to_lps() @ ijk1)[:3].T


def subject_pose(base: np.ndarray, spec: SubjectSpec, centre_lps: np.ndarray) -> np.ndarray:
    """The subject's true pose: ``base`` rotated/translated by the spec (CT frame, mm/deg)."""
    return perturbed_pose(base, spec.rotation_deg, spec.translation_mm, centre_lps)


# ------------------------------------------------------------------------------------------------
# Truth: metrics and target channels
# ------------------------------------------------------------------------------------------------
def render_channels(ct: Volume, labels: LabelMap, structures: list[Structure], camera: Camera,
                    pose: np.ndarray, density: DensityModel) -> dict[str, np.ndarray]:
    """Mass (g/pixel) and volume (cm^3/pixel) channels (K, rows, cols) at ``pose``."""
    import torch

    from ..projection.rendering import DRRRenderer

    r = DRRRenderer(ct, camera, labels=labels, structures=structures, density=density, device="cpu")
    p = torch.as_tensor(pose, dtype=torch.float64)
    with torch.no_grad():
        res = r.render_channels(p, ("mass", "volume"))
    out = {q: res.images[q][0].detach().cpu().numpy().astype(np.float32) for q in ("mass", "volume")}
    out["inside"] = res.inside[0].cpu().numpy().astype(np.uint8)  # 1: sums exact (whole structure seen)
    return out


# ------------------------------------------------------------------------------------------------
# One subject, end to end
# ------------------------------------------------------------------------------------------------
@dataclass
class CohortConfig:
    """Everything shared by the subjects of one cohort (JSON-ready)."""

    ct: str
    labels: str
    table: str | None = None
    seed: int = 0
    rows: int = COHORT_DETECTOR.rows
    cols: int = COHORT_DETECTOR.cols
    sid_mm: float = SID_MM
    voxel_mm: float | None = None          # resample the CT first (isotropic), e.g. for big CTs
    keep_ct: bool = False
    physics: bool = False                  # also write physics.safetensors (re-simulation in training)
    kinds: tuple[str, ...] = ("muscle", "bone")
    density: dict = field(default_factory=lambda: DensityModel().to_dict())
    ranges: dict = field(default_factory=lambda: CohortRanges().to_dict())
    camera: dict | None = None             # filled by prepare()

    def density_model(self) -> DensityModel:
        d = self.density
        return DensityModel(d["intercept_g_cm3"], d["slope_g_cm3_per_hu"], d["min_density_g_cm3"],
                            tuple(d["lean_window_hu"]))

    def cohort_ranges(self) -> CohortRanges:
        return CohortRanges.from_dict(self.ranges)


_CASE_CACHE: dict[str, Any] = {}


def load_source(config: CohortConfig) -> tuple[Volume, LabelMap]:
    """The source CT + labels of the cohort (resampled when asked), cached per process."""
    key = json.dumps([config.ct, config.labels, config.table, config.voxel_mm])
    if key not in _CASE_CACHE:
        from ..io.volumes import load_ct, load_labels

        ct = load_ct(config.ct)
        labels = load_labels(config.labels, ct, config.table)
        if config.voxel_mm:
            ct, labels = resample_case(ct, labels, float(config.voxel_mm))
        _CASE_CACHE.clear()
        _CASE_CACHE[key] = (ct, labels)
    return _CASE_CACHE[key]


def acquisition_settings(spec: SubjectSpec, camera: Camera | None = None):
    """The subject's :class:`~MSKdeXLib.projection.simulate.SimulationSettings` (kVp, noise, scatter,
    gamma; focal spot, detector blur and collimation when the spec has them; the collimation
    needs the ``camera``)."""
    from ..projection.simulate import SimulationSettings

    a = spec.acquisition
    extra = {k: a[k] for k in ("focal_spot_mm", "detector_blur_mm") if k in a}
    if "collimation_fraction" in a and camera is not None:
        left, right, top, bottom = a["collimation_fraction"]
        w, h = camera.cols * camera.spacing_col_mm, camera.rows * camera.spacing_row_mm
        extra["collimation_mm"] = (-w / 2 + left * w, w / 2 - right * w, -h / 2 + top * h, h / 2 - bottom * h)
    return SimulationSettings(kvp=a["energy_kvp"], noise_level=a["noise"], scatter_fraction=a["scatter"],
                              gamma=a["contrast"], **extra)


def subject_camera(camera: Camera, spec: SubjectSpec) -> Camera:
    """The cohort's camera with the subject's source-to-image distance (when drawn)."""
    sid = spec.acquisition.get("sid_mm")
    return camera if sid is None else Camera.from_dict({**camera.to_dict(), "sid_mm": float(sid)})


def scale_anatomy(ct: Volume, labels: LabelMap, factors, centre_lps) -> tuple[Volume, LabelMap]:
    """The subject larger or smaller: voxel spacing times ``factors`` (per grid axis i, j, k),
    about ``centre_lps`` (which stays in place). Masses and volumes scale with the product of
    the factors, and the truth is computed on the scaled grid, so it stays exact."""
    f = np.asarray(factors, np.float64)
    if np.allclose(f, 1.0):
        return ct, labels
    spacing = np.asarray(ct.spacing) * f
    c = np.asarray(centre_lps, np.float64)
    idx_c = np.linalg.solve(ct.direction @ np.diag(ct.spacing), c - np.asarray(ct.origin))
    origin = c - ct.direction @ (spacing * idx_c)
    new_ct = Volume(ct.array, tuple(spacing), tuple(origin), ct.direction, ct.source, dict(ct.metadata))
    return new_ct, relabel(new_ct, labels, labels.label_array())


def vendor_processing(codes: np.ndarray, bits: int, pixel_mm: float, processing: dict[str, float]) -> np.ndarray:
    """Vendor-style image processing of detector codes (0 .. 2^bits - 1; 0 = outside the field,
    left at 0): unsharp masking ``x + a (x - G_sigma(x))`` and an S-shaped LUT (logistic of
    slope ``lut_strength`` rescaled to [0, 1]; 0 = identity), on x = codes / (2^bits - 1)."""
    if not processing:
        return codes
    top = float(2 ** int(bits) - 1)
    inside = codes > 0
    x = codes.astype(np.float64) / top
    amount = float(processing.get("unsharp_amount", 0.0))
    if amount > 0:
        sigma = float(processing["unsharp_sigma_mm"]) / pixel_mm
        w = ndimage.gaussian_filter(inside.astype(np.float64), sigma)
        blur = ndimage.gaussian_filter(x * inside, sigma) / np.maximum(w, 1e-6)  # field edges not darkened
        x = x + amount * (x - blur)
    k = float(processing.get("lut_strength", 0.0))
    if k > 1e-3:
        sig = lambda v: 1.0 / (1.0 + np.exp(-k * (v - 0.5)))  # noqa: E731
        x = (sig(np.clip(x, 0, 1)) - sig(0.0)) / (sig(1.0) - sig(0.0))
    out = np.round(np.clip(x, 0.0, 1.0) * top) * inside
    return out.astype(codes.dtype)


def cohort_muscles(config: CohortConfig) -> list[str]:
    """Names of the source's muscles (the structures whose changes a subject draws)."""
    _, labels0 = load_source(config)
    return [s.name for s in labels0.select(kinds=list(config.kinds)) if s.kind == "muscle"]


@dataclass
class RealisedSubject:
    """A subject's anatomy and view: the modified, scaled CT (HU, LPS) and labels, the structures
    present, the camera (with the subject's SID) and the CT-to-camera pose; ``applied`` summarises
    the anatomy changes."""

    spec: SubjectSpec
    ct: Volume
    labels: LabelMap
    structures: list[Structure]
    camera: Camera
    pose: np.ndarray
    applied: dict


def realise_subject(config: CohortConfig, spec: SubjectSpec) -> RealisedSubject:
    """Apply ``spec`` to the cohort's source: anatomy changes, size, camera and pose (no files)."""
    ct0, labels0 = load_source(config)
    structures0 = labels0.select(kinds=list(config.kinds))
    ct, labels, applied = modify_anatomy(ct0, labels0, spec, config.density_model())
    centre = bone_centre(ct0, labels0)
    ct, labels = scale_anatomy(ct, labels, spec.scale, centre)
    camera = Camera.from_dict(config.camera) if config.camera else \
        fit_camera(ct0, labels0, config.rows, config.cols, config.sid_mm)
    camera = subject_camera(camera, spec)
    pose = subject_pose(base_view(ct0, labels0, camera), spec, centre)
    structures = [s for s in structures0 if s.label in labels.entries]
    return RealisedSubject(spec, ct, labels, structures, camera, pose, applied)


def subject_radiograph(subject: RealisedSubject, seed: int | None = None, paths_out: dict | None = None):
    """The subject's simulated radiograph (:class:`~MSKdeXLib.projection.simulate.Radiograph`, detector
    codes after any vendor processing) and its settings; ``seed`` (noise) defaults to the subject's own;
    ``paths_out`` (a dict) receives the material paths it was simulated from."""
    from ..projection.simulate import simulate_radiograph

    spec, camera = subject.spec, subject.camera
    settings = acquisition_settings(spec, camera)
    if seed is None:
        seed = int(subject_rng(spec.seed, spec.index, 2).integers(0, 2**31 - 1))
    rad = simulate_radiograph(subject.ct, camera, subject.pose, settings, seed, labels=subject.labels,
                              paths_out=paths_out)
    if spec.processing:
        rad.pixels = vendor_processing(rad.pixels, settings.bits, camera.spacing_col_mm, spec.processing)
    return rad, settings, seed


def make_subject(config: CohortConfig, index: int, out_dir: Path, force: bool = False) -> dict:
    """Build subject ``index`` into ``out_dir / subject-XXXX``; returns its cohort entry. The
    folder is built beside and renamed into place: an interrupted subject leaves nothing."""
    from ..io.outputs import output_folder

    with output_folder(Path(out_dir) / SubjectSpec(index, 0).name, force) as stage:
        return _make_subject(config, index, stage, force)


def _make_subject(config: CohortConfig, index: int, folder: Path, force: bool) -> dict:
    from ..io.outputs import write_json, write_volume

    t0 = time.time()
    spec = sample_subject(config.seed, index, cohort_muscles(config), config.cohort_ranges())
    subject = realise_subject(config, spec)
    ct, labels, structures, camera, pose = (subject.ct, subject.labels, subject.structures, subject.camera,
                                            subject.pose)
    applied, density = subject.applied, config.density_model()

    metrics = metrics_document(ct, labels, structures, density)
    metrics["settings"]["virtual_subject"] = {"seed": spec.seed, "index": spec.index}
    write_json(folder / "metrics.json", metrics, force)

    channels = render_channels(ct, labels, structures, camera, pose, density)
    outside = [s.name for s, ok in zip(structures, channels["inside"]) if not ok]
    from safetensors.numpy import save_file

    meta = {"format": "mskdex-targets/1", "structures": json.dumps([s.name for s in structures]),
            "units": json.dumps({"mass": "g/pixel", "volume": "cm3/pixel"}),
            "camera": json.dumps(camera.to_dict()), "ct_to_camera": json.dumps(pose.tolist())}
    from ..io.outputs import atomic_path

    with atomic_path(folder / "targets.safetensors", force) as tmp:
        save_file(channels, str(tmp), metadata=meta)

    paths: dict = {}
    xray_info = write_radiograph(subject, folder, force, paths_out=paths)
    physics = {}
    if config.physics:
        physics["physics"] = write_physics(subject, paths, xray_info["magnification"], density, folder, force)

    if config.keep_ct:
        write_volume(folder / "ct.nii.gz", ct, force)
        write_volume(folder / "labels.nii.gz", labels.grid.with_array(labels.layers[0]), force)
    doc = {"format": SUBJECT_FORMAT, "name": spec.name, "kind": "virtual", "spec": spec.to_dict(),
           "applied": applied, "camera": camera.to_dict(), "ct_to_camera": pose.tolist(),
           "structures": [s.to_dict() for s in structures], "table": labels.table.name,
           "outside_detector": outside,
           "density": density.to_dict(), "source": {"ct": config.ct, "labels": config.labels,
                                                     "voxel_mm": config.voxel_mm},
           "files": {"radiograph": xray_info["file"], "sidecar": xray_info.get("sidecar"),
                     "metrics": "metrics.json", "targets": "targets.safetensors", **physics,
                     **({"ct": "ct.nii.gz", "labels": "labels.nii.gz"} if config.keep_ct else {})},
           "seconds": None}
    doc["seconds"] = round(time.time() - t0, 3)
    write_json(folder / "subject.json", doc, force)
    return {"name": spec.name, "index": index, "folder": spec.name, "seconds": doc["seconds"]}


def lean_to_water(subject: RealisedSubject, density: DensityModel, fat_hu: float,
                  bone_hu_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Per muscle: the water-like path (g/cm^2, summed over the detector's pixels) lost per gram of
    lean mass whose voxels turn to fat of ``fat_hu`` (HU), at the subject's pose. Rendered from the
    muscle's own lean voxels (their water-like part, :func:`~MSKdeXLib.projection.simulate.split_materials`
    with the simulation's ``bone_hu_range``, minus the fat's density), so it carries the muscle's depth
    (magnification) exactly."""
    import torch

    from ..projection.rendering import DRRRenderer
    from ..projection.simulate import SimulationSettings, split_materials

    bone_hu_range = SimulationSettings().bone_hu_range if bone_hu_range is None else bone_hu_range
    ct, labels = subject.ct, subject.labels
    hu_all = np.asarray(ct.array, dtype=np.float32)
    out = {}
    for s in subject.structures:
        if s.kind != "muscle":
            continue
        mask = labels.mask(s) & density.lean(hu_all)
        if not mask.any():
            continue
        box = _crop_box(mask, 2)
        m = mask[box]
        start = np.array([sl.start for sl in reversed(box)], dtype=np.float64)  # (i, j, k)
        crop = Volume(hu_all[box], ct.spacing, tuple((ct.index_to_lps() @ np.r_[start, 1.0])[:3]), ct.direction)
        soft_hu = np.asarray(split_materials(crop, bone_hu_range)[0].array, np.float64)
        drho = np.where(m, np.maximum(soft_hu - fat_hu, 0.0) / 1000.0, 0.0)   # g/cm^3 lost per voxel
        lean_g = float(density.density(hu_all[box].astype(np.float64))[m].sum() * ct.voxel_volume_mm3 / 1000.0)
        r = DRRRenderer(crop.with_array((1000.0 * drho - 1000.0).astype(np.float32)), subject.camera, device="cpu")
        with torch.no_grad():
            path = r.attenuation(torch.as_tensor(subject.pose, dtype=torch.float64))[0].double()
        out[s.name] = float(path.sum()) * 0.1 / r.mu_water_per_mm / max(lean_g, 1e-9)
    return out


def write_physics(subject: RealisedSubject, paths: dict, magnification: float, density: DensityModel,
                  folder: Path, force: bool = False) -> str:
    """``physics.safetensors``: the subject's water-like and bone-like paths (g/cm^2, float64, detector
    pixels) and, in its metadata, the magnification and :func:`lean_to_water` for atrophy (fat at
    FAT_HU) and infiltration (INFILTRATED_HU): what :mod:`MSKdeXLib.learning.resimulation` needs to
    re-simulate the radiograph with other muscle amounts and another acquisition."""
    from safetensors.numpy import save_file

    from ..io.outputs import atomic_path

    meta = {"format": PHYSICS_FORMAT, "units": json.dumps({"water": "g/cm2", "bone": "g/cm2"}),
            "magnification": json.dumps(float(magnification)),
            "lean_to_water_atrophy": json.dumps(lean_to_water(subject, density, FAT_HU)),
            "lean_to_water_infiltration": json.dumps(lean_to_water(subject, density, INFILTRATED_HU))}
    arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float64) for k, v in paths.items()}
    with atomic_path(folder / "physics.safetensors", force) as tmp:
        save_file(arrays, str(tmp), metadata=meta)
    return "physics.safetensors"


def write_radiograph(subject: RealisedSubject, folder: Path, force: bool = False,
                     paths_out: dict | None = None) -> dict:
    """Simulate the subject's radiograph at its pose; write DICOM DX + sidecar (true pose). Returns the
    files' names and the magnification at the isocentre."""
    from ..projection.simulate import write_dicom_dx

    rad, settings, seed = subject_radiograph(subject, paths_out=paths_out)
    spec = subject.spec
    extra = {"virtual_subject": {"cohort_seed": spec.seed, "index": spec.index}}
    if spec.processing:
        extra["vendor_processing"] = dict(spec.processing)
    dcm, side = write_dicom_dx(folder / "xray.dcm", rad, subject.camera, subject.pose, settings, seed, force,
                               extra=extra)
    return {"file": dcm.name, "sidecar": side.name, "magnification": float(rad.metadata["detector"]["magnification"])}


# ------------------------------------------------------------------------------------------------
# The cohort
# ------------------------------------------------------------------------------------------------
def prepare(config: CohortConfig) -> CohortConfig:
    """Fill in the shared camera (fitted once on the source CT) so all subjects agree."""
    if config.camera is None:
        ct, labels = load_source(config)
        config.camera = fit_camera(ct, labels, config.rows, config.cols, config.sid_mm).to_dict()
    return config


def _worker_init(threads: int = 1) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _worker_job(payload: tuple[dict, int, str, bool]) -> dict:
    cfg, index, out, force = payload
    return make_subject(CohortConfig(**cfg), index, Path(out), force)


def build_cohort(config: CohortConfig, n: int, out_dir: str | Path, workers: int = 1,
                 force: bool = False, on_subject: Callable[[dict], None] | None = None,
                 start: int = 0) -> dict:
    """Build subjects ``start .. start+n-1`` into ``out_dir`` (in parallel with ``workers``
    spawn processes; one torch thread per subject in either mode, so that a subject is
    bit-identical however it was built) and write ``out_dir/cohort.json``."""
    from ..io.outputs import prepare_out_dir, write_json

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    prepare(config)
    cfg = asdict(config)
    cfg["kinds"] = list(config.kinds)
    indices = list(range(start, start + n))
    # extending a cohort (--start) is fine; clashing subjects or other settings need force
    old: list[dict] = []
    if (out / "cohort.json").exists():
        prev = json.loads((out / "cohort.json").read_text())
        if prev.get("config") != json.loads(json.dumps(cfg)) and not force:
            raise UserError("this folder holds a cohort made with other settings; pass --force "
                            "to overwrite it", out)
        old = [e for e in prev.get("subjects", []) if e["index"] not in indices] \
            if prev.get("config") == json.loads(json.dumps(cfg)) else []
    clash = [i for i in indices if (out / SubjectSpec(i, 0).name).exists()]
    if clash and not force:
        raise UserError(f"{SubjectSpec(clash[0], 0).name} exists; pass --force to overwrite", out)
    prepare_out_dir(out, force=True)
    entries = []
    t0 = time.time()
    if workers <= 1:
        # one torch thread, as in the workers: parallel float reductions sum in an order that
        # depends on the thread count, and a subject must depend only on (seed, index)
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in indices:
                e = make_subject(config, i, out, force)
                entries.append(e)
                if on_subject:
                    on_subject(e)
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(1,)) as pool:
            for e in pool.imap_unordered(_worker_job, [(cfg, i, str(out), force) for i in indices]):
                entries.append(e)
                if on_subject:
                    on_subject(e)
    entries = sorted(old + entries, key=lambda e: e["index"])
    doc = {"format": COHORT_FORMAT, "config": cfg, "subjects": entries,
           "seconds": round(time.time() - t0, 3)}
    write_json(out / "cohort.json", doc, force=True)
    return doc
