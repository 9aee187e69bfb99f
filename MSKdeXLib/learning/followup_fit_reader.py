"""``mskdex followup --reader fit``: the follow-up radiograph read by fitting the baseline CT's physics
(:mod:`MSKdeXLib.learning.followup_fit`) instead of a learned ridge reader, at the registered pose.

On the working grid (the radiograph area-averaged to about 256 px): the baseline's physics
(:func:`~MSKdeXLib.learning.followup.baseline_physics`), deformation modes of the cohort's smooth field
from the CT resampled to ``modes_voxel_mm`` (:func:`~MSKdeXLib.learning.followup_fit.deformation_jacobian`,
one render per control point and axis), bands of the subcutaneous fat made thicker / thinner
(:func:`~MSKdeXLib.learning.followup_fit.fat_bands`, ``fat_mm``), then the acquisition, the muscles and the fat
fitted without modes, and again with the modes started from there, each Gauss-Newton step kept only if it
lowers the cost (:func:`~MSKdeXLib.learning.followup_fit.fit_unknown_acquisition`; the sequence validated in
benchmarks/RESULTS_network.md, sessions 11-12 and 14). Intervals:
:data:`~MSKdeXLib.learning.followup_fit.INTERVAL_SCALE` x the posterior SD. Units: lean mass g; paths
g/cm^2; codes the radiograph's 12-bit detector codes; poses CT LPS mm -> camera.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from ..anatomy.density import DensityModel
from ..errors import UserError
from ..io.images import LabelMap, Volume
from ..projection.geometry import Camera
from . import followup_fit as ff
from . import followup_fit_pose as fp
from .cohort import SubjectSpec, preset_ranges, resample_case
from .followup import ELASTIC_CONTROL_MM, baseline_physics


@dataclass
class FitSettings:
    """How the fit reader works. ``modes``: deformation modes kept (at most); ``elastic_mm``: the
    deformation SD the modes' prior assumes (mm; 0: no modes); ``pool_px``: residuals area-averaged over
    ``pool_px`` x ``pool_px`` working pixels; ``iterations``: Gauss-Newton steps at most;
    ``modes_voxel_mm``: the CT is resampled to this voxel for the modes (cost ~ volume);
    ``control_mm``: control-point spacing of the deformation field; ``preset``: the cohort preset whose
    muscle-change and acquisition priors are used; ``interval_scale``: 90 % half-width / posterior SD;
    ``fat_mm``: a subcutaneous-fat thickness change U(-fat_mm, fat_mm) mm fitted too (bands of the CT's fat
    made thicker / thinner, :func:`~MSKdeXLib.learning.followup_fit.fat_bands`; 0: none); ``step_control``:
    a Gauss-Newton step is kept only if it lowers the fit's cost, changes kept >= -100 %;
    ``pose_sd``: prior SDs (rotation deg, in-plane translation mm, depth mm) of the registered pose's error,
    fitted as a nuisance (:mod:`~MSKdeXLib.learning.followup_fit_pose`; all 0: the pose is taken as exact);
    ``pose_rounds``: times the physics is re-made at the fitted pose and the fit repeated from there."""

    modes: int = 150
    elastic_mm: float = 1.0
    pool_px: int = 2
    iterations: int = 15
    modes_voxel_mm: float = 4.0
    control_mm: float = ELASTIC_CONTROL_MM
    keep: float = 0.995
    preset: str = "specificity"
    interval_scale: float = ff.INTERVAL_SCALE
    fat_mm: float = 9.0          # session 14 (validation): adopted by the rule fixed before the run
    step_control: bool = True
    pose_sd: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pose_rounds: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fat_mm) <= 30.0:
            raise UserError(f"--fit-fat-mm must be 0-30 mm, got {self.fat_mm}")
        self.pose_sd = tuple(float(v) for v in self.pose_sd)
        if len(self.pose_sd) != 3 or not all(0.0 <= v <= 50.0 for v in self.pose_sd) or not 0 <= int(self.pose_rounds) <= 3:
            raise UserError(f"--fit-pose-sd needs 3 values 0-50 (rotation deg, in-plane mm, depth mm) and the pose "
                            f"rounds 0-3, got {self.pose_sd} and {self.pose_rounds}")
        if not 0 <= int(self.modes) <= 1000:
            raise UserError(f"--fit-modes must be 0-1000, got {self.modes}")
        if not 0.0 <= float(self.elastic_mm) <= 10.0:
            raise UserError(f"the fit's deformation SD must be 0-10 mm, got {self.elastic_mm}")
        if not 1 <= int(self.pool_px) <= 16 or not 1 <= int(self.iterations) <= 100:
            raise UserError(f"the fit's pooling must be 1-16 px and its iterations 1-100, got {self.pool_px} and "
                            f"{self.iterations}")
        if not 1.0 <= float(self.modes_voxel_mm) <= 20.0 or not 20.0 <= float(self.control_mm) <= 400.0:
            raise UserError(f"--fit-voxel-mm must be 1-20 mm and the control spacing 20-400 mm, got "
                            f"{self.modes_voxel_mm} and {self.control_mm}")

    def ranges(self):
        return preset_ranges(self.preset)


@dataclass
class FittedFollowup:
    """A fitted follow-up: per muscle (``muscles`` order) the baseline and estimated lean mass (g) and the
    calibrated 90 % half-width (g); the fit itself and what it found."""

    muscles: list[str]
    baseline_g: np.ndarray
    estimate_g: np.ndarray
    half_width_g: np.ndarray
    result: ff.FitResult
    acquisition: dict
    info: dict = field(default_factory=dict)


def check_codes(codes: np.ndarray, camera: Camera) -> np.ndarray:
    """The follow-up's working-grid codes as float64, refused (one line) when they cannot be the chain's:
    another shape than ``camera``'s, codes outside 0-4095, or no signal."""
    x = np.asarray(codes, np.float64)
    if x.shape != (camera.rows, camera.cols):
        raise UserError(f"radiograph is {x.shape[0]}x{x.shape[1]} px on the working grid but the camera is "
                        f"{camera.rows}x{camera.cols}")
    if x.min() < 0 or x.max() > ff.MAX_CODE or not (x > 0).any():
        raise UserError(f"the fit reader models 12-bit detector codes (0-4095, 0 outside the collimation); this "
                        f"radiograph holds {x.min():.0f}-{x.max():.0f}: use --reader ridge")
    return x


def deformation_modes_of(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, spec: SubjectSpec,
                         settings: FitSettings, progress: Callable[[int, int], None] | None = None,
                         extra_steps: int = 0) -> tuple[np.ndarray, dict]:
    """Deformation modes (J, 2, rows, cols; g/cm^2 per mm) of ``ct`` (resampled to
    ``settings.modes_voxel_mm`` when finer) on ``camera`` at ``pose``, and what they cost (seconds,
    control points, variance share kept). ``progress(i, n + extra_steps)`` after each control point."""
    t0 = time.time()
    if int(settings.modes) == 0 or float(settings.elastic_mm) <= 0:
        return np.zeros((0, 2, camera.rows, camera.cols)), {"modes": 0}
    coarse = ct
    if min(ct.spacing) < float(settings.modes_voxel_mm):
        coarse, _ = resample_case(ct, labels, float(settings.modes_voxel_mm))
    report = None if progress is None else (lambda i, n: progress(i, n + int(extra_steps)))
    jac = ff.deformation_jacobian(coarse, camera, pose, spec, float(settings.control_mm), report)
    t_jac = time.time() - t0
    modes = ff.deformation_modes(jac, float(settings.keep), int(settings.modes))
    info = {"modes": len(modes), "control_points": len(jac) // 3, "ct_voxel_mm": list(map(float, coarse.spacing)),
            "jacobian_s": round(t_jac, 2), "modes_s": round(time.time() - t0 - t_jac, 2)}
    return modes, info


def fit_followup_reading(ct: Volume, labels: LabelMap, camera: Camera, pose: np.ndarray, codes: np.ndarray,
                         settings: FitSettings = FitSettings(), density: DensityModel = DensityModel(),
                         progress: Callable[[int, int], None] | None = None,
                         modes: tuple[np.ndarray, dict] | None = None) -> FittedFollowup:
    """Read the follow-up ``codes`` (on ``camera``, the working grid) by fitting the baseline ``ct``'s
    physics at ``pose``: acquisition and muscles first without modes, then with the deformation modes
    started from that fit; with ``settings.pose_sd`` the pose's error fitted too (and with
    ``settings.pose_rounds`` the physics re-made at the fitted pose and the fit with the modes repeated).
    ``progress(i, n)`` after each control point of the modes' Jacobian and each of the two fits.
    ``modes``: (modes, info) of :func:`deformation_modes_of` already made at ``pose`` (else made here)."""
    codes = check_codes(codes, camera)
    ranges = settings.ranges()
    sd = fp.pose_sds(*settings.pose_sd)
    t0 = time.time()
    physics, base = baseline_physics(ct, labels, camera, pose, ranges, density)
    t_physics = time.time() - t0
    if modes is None:
        modes = deformation_modes_of(ct, labels, camera, pose, physics.spec, settings, progress, 2)
    modes, modes_info = modes
    total = modes_info.get("control_points", 0) + 2
    blind = SubjectSpec(index=0, seed=0, acquisition={"sid_mm": float(camera.sid_mm)})
    t1 = time.time()
    here = np.asarray(pose, np.float64)
    moved = np.zeros(6)
    try:
        for round_ in range(1 + (int(settings.pose_rounds) if sd.any() else 0)):
            if round_:
                physics, _ = baseline_physics(ct, labels, camera, here, ranges, density)
            model = ff.FitModel.build(physics, base, modes, ranges)
            if float(settings.fat_mm) > 0:
                t_fat = time.time()
                model = ff.with_fat_bands(model, ct, labels, camera, here, physics.spec, float(settings.fat_mm))
                modes_info.setdefault("fat_bands_s", round(time.time() - t_fat, 2))
            if sd.any():
                model = model.with_nuisance(*fp.pose_nuisance(ct, labels, camera, here, physics.spec, sd))
            if round_ == 0:
                first, found = ff.fit_unknown_acquisition(model, codes, blind, ranges, 0.0, int(settings.pool_px),
                                                          iterations=int(settings.iterations),
                                                          step_control=bool(settings.step_control))
                if progress is not None:
                    progress(total - 1, total)
                res = first
            else:   # from the last fit, its pose change now in the physics
                first = replace(res, nuisance=np.where(np.isin(model.nuisance_names, fp.POSE_NAMES), 0.0, res.nuisance))
            if len(modes) or round_:
                res, found = ff.fit_unknown_acquisition(model, codes, blind, ranges,
                                                        float(settings.elastic_mm) if len(modes) else 0.0,
                                                        int(settings.pool_px), iterations=int(settings.iterations),
                                                        start=first, step_control=bool(settings.step_control))
            if sd.any():   # the fitted pose, and what it moved from the registered one
                fitted = fp.pose_space(ct, labels, here).matrix(fp.pose_change(model.nuisance_names, res.nuisance))
                moved = fp.pose_space(ct, labels, pose).params_of(fitted)
                if round_ < int(settings.pose_rounds):
                    here = fitted
    except ff.FitDiverged as e:
        raise UserError(f"the fit reader failed on this radiograph ({e}): the image is outside what it models "
                        f"({'a fat change beyond the fitted one' if float(settings.fat_mm) > 0 else 'no fat change'}, the "
                        "registered pose exact); read it with --reader ridge") from None
    if progress is not None:
        progress(total, total)
    if model.n_nuisance:
        modes_info["nuisance"] = dict(zip(model.nuisance_names, map(float, res.nuisance)))
    info = {**modes_info, "physics_s": round(t_physics, 2), "fit_s": round(time.time() - t1, 2),
            "iterations": int(res.iterations), "cost": float(res.cost), "pixels": int(codes.size),
            "noise_codes": ff.noise_of(codes)}
    if sd.any():
        info["pose_change"] = {n: round(float(v), 3) for n, v in zip(fp.POSE_NAMES, moved)}
        info["pose_rounds"] = int(settings.pose_rounds)
    return FittedFollowup(list(physics.muscles), base, res.estimate_g, ff.half_width_g(res, base, settings.interval_scale),
                          res, {**found.acquisition, **found.processing}, info)


def fit_assumptions(settings: FitSettings) -> list[str]:
    """What the fit reader's estimate assumes (stated in ``followup.json``)."""
    moved = (f"up to a smooth deformation of the family the fit models (the cohort's cubic field, control points "
             f"{float(settings.control_mm):g} mm apart, prior SD {float(settings.elastic_mm):g} mm, its leading "
             f"{int(settings.modes)} modes)" if int(settings.modes) and float(settings.elastic_mm) > 0
             else "with nothing moved")
    fat = float(settings.fat_mm)
    fat_text = (f"the subcutaneous fat thickness may have changed by up to +-{fat:g} mm, uniformly along the body "
                f"(bands {ff.FAT_BAND_MM:g} mm thick at the CT's skin, thicker or thinner, fitted; a change that "
                "differs between regions or exceeds it is not modelled)" if fat > 0 else "no fat or weight change")
    posed = ("the whole CT moves rigidly with the first registered body, its registered pose exact" if not any(settings.pose_sd)
             else "the whole CT moves rigidly with the first registered body, whose registered pose may be off by a "
             f"rigid error fitted with the muscles (prior SD {settings.pose_sd[0]:g} deg per rotation, "
             f"{settings.pose_sd[1]:g} mm in-plane, {settings.pose_sd[2]:g} mm in depth; first order about the pose"
             + (f", the physics re-made {int(settings.pose_rounds)} x at the fitted pose" if int(settings.pose_rounds) else "")
             + ")")
    return [f"the patient's shape other than the muscles is the baseline CT's {moved}; {fat_text}",
            posed,
            "the radiograph is the library's detector chain (12-bit codes, 0 outside the collimation); kVp, scatter, "
            "gamma, focal spot, detector blur, unsharp masking and LUT are fitted within 3 SDs of the preset's prior",
            "muscle changes are lean tissue turning to fat (atrophy replaced by fat, fat infiltration)",
            f"90 % intervals: {float(settings.interval_scale):g} x the fit's linearised posterior SD, calibrated on "
            "simulated follow-ups of 3 validation subjects (true pose, deformation of the modelled family); they do "
            + ("not include a registration error" if not any(settings.pose_sd) else
               "not count the pose term's error beyond its posterior (not re-calibrated with it)")]
