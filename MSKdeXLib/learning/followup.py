"""Per-muscle lean mass on a follow-up radiograph of a patient whose baseline CT is known (issue 14).

Reading a muscle from one radiograph needs the patient's own anatomy to about 0.1 % of the image's
contrast (benchmarks/RESULTS_network.md): a model that has never seen the patient cannot separate a
muscle's change from the patient's shape. With a baseline CT + label map of the same patient (e.g. a
pre-operative planning CT, radiographs at follow-up), the anatomy is known:

1. the CT's bones are registered to the follow-up radiograph (:mod:`MSKdeXLib.registration`; the
   first body, default the pelvis, gives the pose: CT LPS mm -> camera);
2. at that pose the CT is split into water- and bone-like line integrals on the radiograph's detector
   (g/cm^2), each muscle's lean-mass channel (g/pixel) and its lean -> fat coefficients are rendered
   (:func:`baseline_physics`, the same quantities as a cohort subject's ``physics.safetensors``);
3. a **reader** (ridge regression of the muscles' lean mass on the radiograph, area-averaged to a
   coarse grid and z-scored) is fitted on re-simulations of this patient alone
   (:mod:`MSKdeXLib.learning.resimulation`): muscle changes and acquisitions (kVp, noise, scatter,
   gamma, blur, collimation, vendor processing) drawn from a cohort preset's ranges;
4. the reader is applied to the follow-up radiograph; 90 % intervals come from the reader's errors on
   held-out re-simulations (split conformal, per muscle).

What it assumes (stated in the output): the patient's shape other than the muscles is the CT's
(no weight change, soft tissue where the CT has it), the whole CT moves rigidly with the first body,
and the follow-up's acquisition lies within the preset's ranges. Units: lean mass g; frames: CT LPS
mm, ``ct_to_camera`` poses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from ..anatomy.ct_metrics import structure_metrics
from ..anatomy.density import DensityModel
from ..errors import UserError
from ..evaluation.baselines import RidgeBaseline
from ..io.images import LabelMap, Volume
from ..projection.geometry import Camera, check_rigid, perturbed_pose
from .cohort import (FAT_HU, INFILTRATED_HU, CohortRanges, RealisedSubject, SubjectSpec, acquisition_settings,
                     bone_centre, change_muscles, lean_to_water, preset_ranges, relabel, resample_case, sample_subject,
                     subject_radiograph)
from .resimulation import SubjectPhysics, draw, resimulate

FOLLOWUP_FORMAT = "mskdex-followup/1"
ALPHAS = (0.1, 1.0, 10.0, 100.0)


@dataclass
class ReaderSettings:
    """How the patient's reader is fitted. ``samples``: re-simulations (the last ``holdout`` share
    choose the ridge penalty and calibrate the intervals); ``grid``: the reader's input grid (px per
    side over the detector); ``preset``: cohort preset whose muscle-change and acquisition ranges are
    drawn; ``coverage``: of the intervals; ``seed``: of the draws."""

    samples: int = 600
    grid: int = 32
    margin: float = 0.08
    preset: str = "specificity"
    coverage: float = 0.9
    holdout: float = 0.25
    poses: int = 12
    jitter_mm: float = 0.3
    jitter_deg: float = 0.15
    calibration_samples: int = 40
    calibration_voxel_mm: float = 3.0
    fat_mm: float = 0.0
    elastic_mm: float = 0.0
    warp_mm: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.samples) < 40:
            raise UserError(f"--samples must be >= 40 (re-simulations for the reader), got {self.samples}")
        if not 4 <= int(self.grid) <= 128:
            raise UserError(f"--grid must be 4-128 px, got {self.grid}")
        if not 0.0 <= float(self.margin) < 0.4:
            raise UserError(f"--margin must be in [0, 0.4), got {self.margin}")
        if not 0.5 <= float(self.coverage) < 1.0:
            raise UserError(f"--coverage must be in [0.5, 1), got {self.coverage}")
        if int(self.calibration_samples) != 0 and int(self.calibration_samples) < 20:
            raise UserError(f"--calibration-samples must be 0 or >= 20, got {self.calibration_samples}")
        if float(self.calibration_voxel_mm) <= 0 or min(self.jitter_mm, self.jitter_deg) < 0 or int(self.poses) < 1:
            raise UserError("the calibration voxel must be > 0 mm, the pose jitter >= 0 and poses >= 1")
        if not 0.1 <= float(self.holdout) <= 0.5:
            raise UserError(f"holdout must be in [0.1, 0.5], got {self.holdout}")
        if not 0.0 <= float(self.fat_mm) <= 30.0 or not 0.0 <= float(self.elastic_mm) <= 10.0:
            raise UserError(f"--fat-mm must be 0-30 mm and --elastic-mm 0-10 mm, got {self.fat_mm} and "
                            f"{self.elastic_mm}")
        if not 0.0 <= float(self.warp_mm) <= 10.0:
            raise UserError(f"--warp-mm must be 0-10 mm, got {self.warp_mm}")

    @property
    def soft_tissue(self) -> bool:
        """Whether the reader's views also vary the soft tissue (``fat_mm`` or ``elastic_mm`` > 0)."""
        return float(self.fat_mm) > 0 or float(self.elastic_mm) > 0

    def ranges(self) -> CohortRanges:
        return preset_ranges(self.preset)

    @property
    def margin_cells(self) -> int:
        """Input cells left out at each edge: ``margin`` of ``grid``, rounded up."""
        return int(np.ceil(float(self.margin) * int(self.grid) - 1e-9))


def muscles_of(labels: LabelMap) -> list:
    """The label map's muscle structures (those a follow-up estimates)."""
    found = [s for s in labels.select(kinds=["muscle"]) if labels.mask(s).any()]
    if not found:
        raise UserError("the label map has no muscle structure", labels.source if hasattr(labels, "source") else None)
    return found


def baseline_physics(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, ranges: CohortRanges,
                     density: DensityModel = DensityModel()) -> tuple[SubjectPhysics, np.ndarray]:
    """The patient's :class:`~MSKdeXLib.learning.resimulation.SubjectPhysics` at ``pose`` (CT LPS mm
    -> camera) on ``camera``'s pixels, and the baseline lean mass (g) of each muscle (its order is
    ``physics.muscles``). The acquisition of the physics' own spec is the middle of the ranges."""
    from ..projection.rendering import DRRRenderer
    from ..projection.simulate import isocentre_distance_mm, material_paths

    pose = check_rigid(np.asarray(pose, np.float64), "pose")
    muscles = muscles_of(labels)
    mid = lambda r: float(np.mean(r))  # noqa: E731
    spec = SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": mid(ranges.energy_kvp), "noise": mid(ranges.noise),
                                                     "scatter": mid(ranges.scatter), "contrast": mid(ranges.contrast)})
    dist = isocentre_distance_mm(ct, pose)
    if not 0 < dist < camera.sid_mm:
        raise UserError(f"the CT is not between the source and the detector at this pose (isocentre at {dist:.0f} mm "
                        f"from the source, SID {camera.sid_mm:.0f} mm)")
    paths = material_paths(ct, camera, pose, acquisition_settings(spec, camera))
    renderer = DRRRenderer(ct, camera, labels=labels, structures=muscles, density=density, device="cpu")
    with torch.no_grad():
        mass = renderer.render_channels(torch.as_tensor(pose, dtype=torch.float64), ("mass",)).images["mass"][0]
    mass = mass.detach().cpu().numpy().astype(np.float64)
    subject = RealisedSubject(spec, ct, labels, muscles, camera, pose, {})
    atrophy = lean_to_water(subject, density, FAT_HU)
    names = [s.name for s in muscles if s.name in atrophy]
    physics = SubjectPhysics(
        water=paths["water"], bone=paths["bone"],
        muscle_mass={s.name: mass[k] for k, s in enumerate(muscles) if s.name in atrophy},
        atrophy_coefficient=atrophy, infiltration_coefficient=lean_to_water(subject, density, INFILTRATED_HU),
        camera=camera, magnification=camera.sid_mm / dist, spec=spec, noise_seed=0, ranges=ranges, muscles=names)
    by_name = {m.structure.name: m.mass_g for m in structure_metrics(ct, labels, muscles, density)}
    physics.lean_mass_g = np.array([by_name[n] for n in names], np.float64)
    return physics, physics.lean_mass_g.copy()


def input_spacing(camera: Camera, grid: int) -> tuple[float, float]:
    """The reader's input pixel (row, col mm at the detector): the detector's field over ``grid`` px."""
    return camera.rows * camera.spacing_row_mm / grid, camera.cols * camera.spacing_col_mm / grid


#: control-point spacing (mm) of the smooth soft-tissue deformation, as the cohort's
ELASTIC_CONTROL_MM = 80.0


def deform_soft_tissue(hu: np.ndarray, lab: np.ndarray, spacing, elastic_mm: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT's HU and label arrays (ijk order, ``spacing`` mm) deformed smoothly: control-point
    displacements of SD ``elastic_mm`` mm, ``ELASTIC_CONTROL_MM`` apart. Nothing is drawn at 0."""
    from .cohort import elastic_deform

    if float(elastic_mm) > 0:
        hu, lab, _ = elastic_deform(hu, lab, spacing, float(elastic_mm), ELASTIC_CONTROL_MM, rng)
    return hu, lab


def change_subcutaneous_fat(hu: np.ndarray, lab: np.ndarray, spacing, fat_mm: float,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The subcutaneous fat thickness of a CT's HU array (ijk, ``spacing`` mm) changed in place by
    U(-``fat_mm``, ``fat_mm``) mm (labels untouched). Nothing is drawn at 0."""
    from .cohort import subcutaneous_fat

    if float(fat_mm) > 0:
        subcutaneous_fat(hu, lab, float(rng.uniform(-fat_mm, fat_mm)), spacing, rng)
    return hu, lab


def soft_tissue_variant(ct: Volume, labels: LabelMap, settings: ReaderSettings,
                        rng: np.random.Generator) -> tuple[Volume, LabelMap]:
    """The patient's CT with one draw of the soft-tissue change the reader is made robust to:
    :func:`deform_soft_tissue` (``settings.elastic_mm``), then :func:`change_subcutaneous_fat`
    (``settings.fat_mm``)."""
    hu = ct.array.astype(np.float32, copy=True)
    lab = labels.label_array().astype(np.int32)
    hu, lab = deform_soft_tissue(hu, lab, ct.spacing, settings.elastic_mm, rng)
    hu, lab = change_subcutaneous_fat(hu, lab, ct.spacing, settings.fat_mm, rng)
    changed = ct.with_array(hu)
    return changed, relabel(changed, labels, lab)


def jittered_physics(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, settings: ReaderSettings,
                     density: DensityModel = DensityModel(),
                     progress: Callable[[int, int], None] | None = None) -> tuple[list[SubjectPhysics], np.ndarray]:
    """The patient's physics at ``pose`` and at ``settings.poses - 1`` poses jittered about the bones'
    centre (up to ``jitter_mm`` / ``jitter_deg`` per axis), each of those also with its own draw of the
    soft-tissue change (:func:`soft_tissue_variant`) when ``settings.soft_tissue``; and the baseline
    lean mass (g)."""
    ranges = settings.ranges()
    first, base = baseline_physics(ct, labels, camera, pose, ranges, density)
    centre = bone_centre(ct, labels)
    rng = np.random.default_rng([int(settings.seed), 7])
    tissue_rng = np.random.default_rng([int(settings.seed), 8])
    jm, jd = float(settings.jitter_mm), float(settings.jitter_deg)
    views = [first]
    for k in range(int(settings.poses) - 1):
        p = perturbed_pose(pose, tuple(rng.uniform(-jd, jd, 3)), tuple(rng.uniform(-jm, jm, 3)), centre)
        view_ct, view_labels = soft_tissue_variant(ct, labels, settings, tissue_rng) if settings.soft_tissue \
            else (ct, labels)
        views.append(baseline_physics(view_ct, view_labels, camera, p, ranges, density)[0])
        if progress is not None:
            progress(k + 1, int(settings.poses) - 1)
    return views, base


def reader_input(codes: np.ndarray, camera: Camera, grid: int, spacing_mm: tuple[float, float],
                 margin: int = 0) -> np.ndarray:
    """The reader's input (float64, (grid - 2 margin)^2): the radiograph's detector codes (bone bright,
    on ``camera``'s pixels) area-averaged onto a ``grid`` x ``grid`` raster of ``spacing_mm`` pixels
    centred on the principal point, its outer ``margin`` cells dropped (where collimation may cut the
    field), then z-scored."""
    from .dataset.builder import prepare_radiograph

    if codes.shape != (camera.rows, camera.cols):
        raise UserError(f"radiograph is {codes.shape[0]}x{codes.shape[1]} px but its geometry is "
                        f"{camera.rows}x{camera.cols}")
    cx, cy = camera.principal_point
    x = prepare_radiograph(np.asarray(codes, np.float64), (camera.spacing_row_mm, camera.spacing_col_mm),
                           (grid, grid), {"method": "none", "pixel_spacing_mm": list(spacing_mm)}, (cy, cx))
    x = np.asarray(x, np.float64)[margin:grid - margin, margin:grid - margin].ravel()
    return (x - x.mean()) / max(float(x.std()), 1e-12)


@dataclass
class FollowupReader:
    """A ridge reader of one patient's muscles (lean mass, g), fitted on re-simulations of that
    patient at one pose (:func:`fit_reader`)."""

    muscles: list[str]
    baseline_g: np.ndarray
    model: RidgeBaseline
    alpha: float
    half_width_g: np.ndarray          # interval half-width per muscle (split conformal, ``coverage``)
    holdout_mae_g: np.ndarray         # mean |error| per muscle on held-out re-simulations
    holdout_pcc: np.ndarray           # PCC per muscle on held-out re-simulations
    settings: ReaderSettings
    spacing_mm: tuple[float, float]   # the input grid's pixel at the detector, mm
    info: dict = field(default_factory=dict)

    def predict(self, codes: np.ndarray, camera: Camera) -> np.ndarray:
        """Lean mass (g) per muscle (``self.muscles`` order) of a radiograph's detector codes on
        ``camera``'s pixels (the follow-up's own detector; same rays as the reader's)."""
        return self.model.predict(reader_input(codes, camera, self.settings.grid, self.spacing_mm, self.settings.margin_cells)[None])[0]

    def estimate(self, codes: np.ndarray, camera: Camera) -> dict:
        """Per muscle: baseline and estimated lean mass (g), their change (%), with intervals."""
        return muscle_estimates(self.muscles, self.baseline_g, self.predict(codes, camera), self.half_width_g)


def muscle_estimates(names: list[str], baseline_g, estimate_g, half_width_g) -> dict:
    """``followup.json``'s per-muscle entries: baseline and estimated lean mass (g), the interval
    estimate +- half-width (g), and the change (% of the baseline) with its interval."""
    return {n: {"baseline_g": float(b), "estimate_g": float(e), "interval_g": [float(e - h), float(e + h)],
                "change_percent": float(100.0 * (e / b - 1.0)),
                "change_interval_percent": [float(100.0 * ((e - h) / b - 1.0)), float(100.0 * ((e + h) / b - 1.0))]}
            for n, b, e, h in zip(names, baseline_g, estimate_g, half_width_g)}


@dataclass
class CalibrationSet:
    """Follow-ups simulated from the patient's CT (:func:`ct_change_samples`): detector codes on
    ``camera`` and each muscle's true lean mass relative to the baseline (``factor``, (n, muscles))."""

    codes: list[np.ndarray]
    factor: np.ndarray
    camera: Camera


def conformal_half_width(errors: np.ndarray, coverage: float) -> np.ndarray:
    """Split-conformal half-width per column of ``|errors|`` (n, k): the ceil((n + 1) coverage)-th
    smallest, so that a new error falls inside with probability >= ``coverage``."""
    n = len(errors)
    q = min(1.0, np.ceil((n + 1) * coverage) / n)
    return np.quantile(np.abs(errors), q, axis=0, method="higher")


def fit_reader(physics: SubjectPhysics | list[SubjectPhysics], baseline_g: np.ndarray,
               settings: ReaderSettings = ReaderSettings(), progress: Callable[[int, int], None] | None = None,
               calibration: CalibrationSet | None = None) -> FollowupReader:
    """Fit the patient's reader on ``settings.samples`` re-simulations (muscle changes and acquisition
    drawn from ``physics.ranges``; with a list of physics, e.g. :func:`jittered_physics`, each sample
    at one of them drawn at random, all on the same camera; targets scale a view's own ``lean_mass_g``
    when it has one, else ``baseline_g``); the held-out share picks the ridge penalty (mean |error| / truth).
    The reader is the model fitted on the rest; its interval half-widths are the split-conformal
    ``coverage`` quantile of |error| per muscle on ``calibration`` (CT-simulated follow-ups) when given,
    else on the held-out re-simulations."""
    from .projection_warp import warp_physics

    rng = np.random.default_rng([int(settings.seed), 14])
    warp_rng = np.random.default_rng([int(settings.seed), 15])   # its own stream: warp_mm 0 draws as before
    views = physics if isinstance(physics, list) else [physics]
    # each view's own lean mass (g): the targets scale it (a soft-tissue view's differs from the baseline)
    views = [v if v.lean_mass_g is not None else replace(v, lean_mass_g=np.asarray(baseline_g, np.float64))
             for v in views]
    names, camera = views[0].muscles, views[0].camera
    spacing = input_spacing(camera, int(settings.grid))
    x, y = [], []
    for i in range(int(settings.samples)):
        view = views[int(rng.integers(0, len(views)))]
        view = warp_physics(view, settings.warp_mm, warp_rng, ELASTIC_CONTROL_MM)   # unchanged at warp_mm 0
        changes, spec = draw(rng, view)
        codes = resimulate(view, changes, spec, int(rng.integers(0, 2**31 - 1)))
        x.append(reader_input(codes, camera, settings.grid, spacing, settings.margin_cells))
        y.append(view.lean_mass_g * np.array([changes.lean_factor(n) for n in names]))
        if progress is not None:
            progress(i + 1, int(settings.samples))
    x, y = np.asarray(x), np.asarray(y)
    n_fit = int(round(len(x) * (1.0 - settings.holdout)))
    model, errors = RidgeBaseline.select(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], ALPHAS)
    pred = model.predict(x[n_fit:])
    err = pred - y[n_fit:]
    pcc = np.array([np.corrcoef(pred[:, k], y[n_fit:, k])[0, 1] for k in range(len(names))])
    info = {"penalty_errors": errors, "calibration": "held-out re-simulations", "calibration_samples": len(err)}
    half = conformal_half_width(err, settings.coverage)
    if calibration is not None and len(calibration.codes):
        cal = np.array([model.predict(reader_input(c, calibration.camera, settings.grid, spacing,
                                                   settings.margin_cells)[None])[0] for c in calibration.codes])
        truth = baseline_g * calibration.factor
        half = conformal_half_width(cal - truth, settings.coverage)
        info.update({"calibration": "follow-ups simulated from the CT (muscles changed in the CT, pose jittered)",
                     "calibration_samples": len(cal), "calibration_mae_g": np.abs(cal - truth).mean(axis=0).tolist(),
                     "calibration_pcc": [float(np.corrcoef(cal[:, k], truth[:, k])[0, 1]) for k in range(len(names))]})
    return FollowupReader(names, baseline_g, model, model.alpha, half, np.abs(err).mean(axis=0), pcc, settings,
                          spacing, info)


def ct_change_samples(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, names: list[str],
                      settings: ReaderSettings, density: DensityModel = DensityModel(),
                      progress: Callable[[int, int], None] | None = None) -> CalibrationSet:
    """``settings.calibration_samples`` follow-ups simulated from the patient's CT (resampled to
    ``calibration_voxel_mm`` when finer): each muscle changed **in the CT** by the cohort's functions
    (boundary atrophy, hypertrophy into fat, blob fat infiltration; a fresh draw from the preset),
    the pose jittered about the bones' centre, with ``settings.soft_tissue`` also a soft-tissue change
    (:func:`deform_soft_tissue` before and :func:`change_subcutaneous_fat` after), an acquisition drawn from the preset (the camera's SID),
    noise; truth = each muscle's lean mass on the changed CT over that on the unchanged one."""
    ranges = settings.ranges()
    if min(ct.spacing) < settings.calibration_voxel_mm:
        ct, labels = resample_case(ct, labels, float(settings.calibration_voxel_mm))
    by_name = lambda c, lab: {m.structure.name: m.mass_g for m in  # noqa: E731
                              structure_metrics(c, lab, [lab.table.by_name(n) for n in names], density)}
    base = by_name(ct, labels)
    centre = bone_centre(ct, labels)
    structures = [labels.table.by_name(n) for n in names]
    rng = np.random.default_rng([int(settings.seed), 41])
    tissue_rng = np.random.default_rng([int(settings.seed), 42])
    jm, jd = float(settings.jitter_mm), float(settings.jitter_deg)
    codes, factor = [], []
    n = int(settings.calibration_samples)
    for i in range(n):
        fresh = sample_subject(int(rng.integers(0, 2**31 - 1)), i, names, ranges)
        hu = ct.array.astype(np.float32, copy=True)
        lab = labels.label_array().astype(np.int32)
        hu, lab = deform_soft_tissue(hu, lab, ct.spacing, settings.elastic_mm, tissue_rng)
        change_muscles(hu, lab, labels.table, ct.spacing, fresh.muscle_changes, fresh.infiltration, rng, density)
        hu, lab = change_subcutaneous_fat(hu, lab, ct.spacing, settings.fat_mm, tissue_rng)
        changed = ct.with_array(hu)
        changed_labels = relabel(changed, labels, lab)
        spec = SubjectSpec(index=i, seed=int(settings.seed), acquisition={**fresh.acquisition, "sid_mm": camera.sid_mm},
                           processing=dict(fresh.processing))
        p = perturbed_pose(pose, tuple(rng.uniform(-jd, jd, 3)), tuple(rng.uniform(-jm, jm, 3)), centre)
        subject = RealisedSubject(spec, changed, changed_labels, structures, camera, p, {})
        codes.append(subject_radiograph(subject, int(rng.integers(0, 2**31 - 1)))[0].pixels)
        after = by_name(changed, changed_labels)
        factor.append([after[k] / base[k] for k in names])
        if progress is not None:
            progress(i + 1, n)
    return CalibrationSet(codes, np.asarray(factor, np.float64), camera)


#: a muscle's estimate is implausible (the reading or the pose failed) outside (0, 2 x baseline] lean mass
PLAUSIBLE_FACTOR = (0.0, 2.0)


def implausible(names: list[str], estimate_g: np.ndarray, baseline_g: np.ndarray) -> list[str]:
    """Muscles whose estimate is physically implausible for a follow-up: no lean mass left or more than
    doubled (:data:`PLAUSIBLE_FACTOR`); a sign that the pose (registration) or the reading failed."""
    lo, hi = PLAUSIBLE_FACTOR
    f = np.asarray(estimate_g, np.float64) / np.asarray(baseline_g, np.float64)
    return [n for n, v in zip(names, f) if not lo < v <= hi]


def asymmetry(names: list[str], values: np.ndarray) -> dict[str, float]:
    """Left-right asymmetry index ``(L - R) / (L + R)`` of each muscle pair among ``names``."""
    from ..evaluation.specificity import side_pairs

    v = dict(zip(names, np.asarray(values, np.float64)))
    return {stem: float((v[lft] - v[rgt]) / (v[lft] + v[rgt])) for stem, lft, rgt in side_pairs(names)}
