"""``mskdex followup`` as one library call: register the baseline CT to the follow-up radiograph (or
take a registration already made), fit the patient's reader at that pose
(:mod:`MSKdeXLib.learning.followup`) and write ``followup.json``, ``followup.csv`` and
``followup.png`` (per-muscle lean-mass change with its interval). Frames: CT LPS mm, poses
``ct_to_camera``; lean mass g; changes in % of the baseline CT's lean mass.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..anatomy.density import DensityModel
from ..errors import UserError
from ..io.outputs import atomic_path, write_json
from ..io.radiographs import UncalibratedWarning, load_radiograph
from ..io.volumes import load_ct, load_labels
from ..registration.documents import KnownPose, check_geometry, read_known_pose
from ..settings import SID_MM
from .followup import (FOLLOWUP_FORMAT, ReaderSettings, asymmetry, ct_change_samples, fit_reader, implausible,
                       jittered_physics, muscle_estimates)
from .followup_fit_reader import FitSettings, fit_assumptions, fit_followup_reading

OUTPUTS = ("followup.json", "followup.csv", "followup.png", "registration")
#: the readers ``mskdex followup --reader`` offers: a ridge fitted on re-simulations (default), or the physics fitted
READERS = ("ridge", "fit")
#: the long side (px) of the detector grid the reader's re-simulations are made on
WORKING_PX = 256
ASSUMPTIONS = ("the patient's shape other than the muscles is the baseline CT's (no weight change; soft tissue "
               "where the CT has it)", "the whole CT moves rigidly with the first registered body",
               "the follow-up's acquisition lies within the preset's ranges (kVp, noise, scatter, gamma, blur, "
               "collimation, vendor processing)",
               "muscle changes are lean tissue turning to fat (atrophy replaced by fat, fat infiltration)")


def assumptions(reader: ReaderSettings) -> list[str]:
    """What the estimate assumes, with the soft-tissue change the reader allows for when it has one."""
    out = list(ASSUMPTIONS)
    if reader.soft_tissue:
        out[0] = (f"the patient's shape other than the muscles is the baseline CT's, up to a subcutaneous fat change "
                  f"within +-{float(reader.fat_mm):g} mm and a smooth deformation of SD {float(reader.elastic_mm):g} mm "
                  f"(the reader's views and interval calibration include them)")
    if float(reader.warp_mm) > 0:
        out[0] += (f"; the reader's re-simulations are also moved by smooth 2D fields of SD {float(reader.warp_mm):g} mm "
                   f"(its interval calibration includes them only through --elastic-mm)")
    return out


@dataclass
class FollowupRequest:
    """What ``mskdex followup`` was asked: the baseline CT + labels, the follow-up radiograph, where
    the pose comes from, and the reader's settings."""

    xray: str
    ct_path: str
    labels_path: str
    out: Path
    registration: str | None = None   # an existing registration.json of this radiograph (its first body's pose)
    bones: str = "pelvis"             # bodies to register when no registration is given (the first gives the pose)
    sid_mm: float = SID_MM
    spacing_mm: tuple[float, float] | None = None
    table: str | None = None
    resample_labels: bool = False     # a label map on another grid is resampled onto the CT's
    nonfinite: str = "refuse"         # NaN/inf CT voxels: refuse, or mask as air
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    density: DensityModel = field(default_factory=DensityModel)
    force: bool = False
    method: str = "ridge"             # READERS: the ridge reader, or the baseline's physics fitted
    fit: FitSettings = field(default_factory=FitSettings)

    def __post_init__(self) -> None:
        if self.method not in READERS:
            raise UserError(f"--reader must be one of {', '.join(READERS)}, got {self.method!r}")


def registered_pose(req: FollowupRequest, known: KnownPose | None,
                    notify: Callable[..., None] | None) -> tuple[np.ndarray, dict]:
    """(the first body's ct_to_camera, a summary of the registration) from ``known`` (the checked
    ``req.registration``) or a new registration written to ``OUT/registration/``."""
    from ..registration.run import RegistrationRequest, register_radiograph

    if known is not None:
        return known.ct_to_camera, {"source": str(req.registration), "body": known.body, "doubtful": known.doubtful,
                                    "final_similarity": known.final_similarity}
    rr = RegistrationRequest(req.xray, req.ct_path, req.labels_path, req.out / "registration", req.bones,
                             sid_mm=req.sid_mm, spacing_mm=req.spacing_mm, table=req.table,
                             resample_labels=req.resample_labels, force=req.force)
    outcome = register_radiograph(rr, "cpu", notify)
    first = outcome.results[0]
    summary = {"source": "registration/registration.json", "body": first.name, "doubtful": bool(first.doubtful),
               "final_similarity": first.final_similarity}
    if first.mtre_mm is not None:
        summary["mtre_mm"] = first.mtre_mm
    return np.asarray(first.ct_to_camera, np.float64), summary


def run_followup(req: FollowupRequest, notify: Callable[..., None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Estimate each muscle's lean mass on the follow-up radiograph; writes the outputs into
    ``req.out`` (a staging folder: the caller moves it into place) and returns the report.
    ``progress(i, n)`` is called after each jittered view (:func:`jittered_physics`), each calibration
    follow-up, then each re-simulation: ``reader.poses - 1 + reader.calibration_samples + reader.samples``
    calls in all; with ``req.method`` "fit", after each control point of the deformation modes and each of
    the two fits (``n`` says how many)."""
    from ..registration.run import load_geometry
    from ..registration.views import working_grid

    t0 = time.time()
    # a given registration is read first (a rigid 4x4 first pose), its camera checked once the radiograph's is known
    known = read_known_pose(req.registration) if req.registration else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncalibratedWarning)
        xray = load_radiograph(req.xray, req.spacing_mm)
    camera, _ = load_geometry(req.xray, xray, req.sid_mm)
    if known is not None:
        check_geometry(known, camera)
    ct = load_ct(req.ct_path, req.nonfinite)
    labels = load_labels(req.labels_path, ct, req.table, req.resample_labels)
    pose, reg = registered_pose(req, known, notify)
    # the reader's re-simulations on a detector grid of at most WORKING_PX px (same rays, coarser pixels)
    step = max(camera.spacing_row_mm, camera.spacing_col_mm) * max(1.0, max(camera.rows, camera.cols) / WORKING_PX)
    work_camera, work_pixels = working_grid(camera, xray.pixels, step)
    if req.method == "fit":
        fitted = fit_followup_reading(ct, labels, work_camera, pose, work_pixels.numpy(), req.fit, req.density, progress)
        names, baseline, est = fitted.muscles, fitted.baseline_g, fitted.estimate_g
        muscles = muscle_estimates(names, baseline, est, fitted.half_width_g)
        reader_doc = {"kind": "fit", "settings": vars(req.fit), "interval_coverage": 0.9,
                      "working_grid": work_camera.to_dict(), "acquisition": fitted.acquisition, **fitted.info,
                      "interval_note": f"90 % half-width = {float(req.fit.interval_scale):g} x the fit's posterior SD "
                                       "(calibrated on validation follow-ups, benchmarks/RESULTS_network.md session 12)"}
        stated = fit_assumptions(req.fit)
    else:
        views, baseline = jittered_physics(ct, labels, work_camera, pose, req.reader, req.density, progress)
        calibration = ct_change_samples(ct, labels, work_camera, pose, views[0].muscles, req.reader, req.density,
                                        progress) if req.reader.calibration_samples else None
        reader = fit_reader(views, baseline, req.reader, progress, calibration)
        muscles = reader.estimate(np.asarray(xray.pixels, np.float64), camera)
        names = reader.muscles
        est = np.array([muscles[n]["estimate_g"] for n in names])
        reader_doc = {"kind": "ridge", "settings": vars(req.reader), "ridge_penalty": reader.alpha,
                      "interval_coverage": req.reader.coverage,
                      "held_out": {n: {"pcc": float(p), "mae_g": float(m)} for n, p, m in
                                   zip(names, reader.holdout_pcc, reader.holdout_mae_g)},
                      "working_grid": work_camera.to_dict(),
                      "calibration": reader.info["calibration"], "calibration_samples": reader.info["calibration_samples"],
                      "interval_note": "split-conformal intervals: they hold the reader's error under the preset's "
                                       "ranges and the calibration's pose jitter, not a violated assumption"}
        stated = assumptions(req.reader)
    odd = implausible(names, est, baseline)
    report = {
        "format": FOLLOWUP_FORMAT, "xray": str(req.xray), "ct": str(req.ct_path), "labels": str(req.labels_path),
        "pose": {"ct_to_camera": pose.tolist(), **reg},
        "units": {"mass": "g (lean mass)", "change": "% of the baseline CT's lean mass"},
        "muscles": muscles,
        "implausible_muscles": odd, "doubtful": bool(reg["doubtful"] or odd),
        "asymmetry": {"estimate": asymmetry(names, est), "baseline": asymmetry(names, baseline)},
        "reader": reader_doc, "assumptions": stated, "runtime_s": round(time.time() - t0, 2),
    }
    write_json(req.out / "followup.json", report, req.force)
    write_table(req.out / "followup.csv", muscles, req.force)
    change_figure(req.out / "followup.png", muscles, f"{Path(req.xray).name}: lean-mass change vs baseline CT"
                  + (" (registration DOUBTFUL)" if reg["doubtful"] else "")
                  + (" (IMPLAUSIBLE estimate)" if odd else ""), req.force)
    return report


def write_table(path: Path, muscles: dict, force: bool = False) -> None:
    """``followup.csv``: one row per muscle (g and %), intervals as low / high columns."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["muscle", "baseline_g", "estimate_g", "estimate_low_g", "estimate_high_g", "change_percent",
                "change_low_percent", "change_high_percent"])
    for name, m in muscles.items():
        w.writerow([name, f"{m['baseline_g']:.2f}", f"{m['estimate_g']:.2f}", f"{m['interval_g'][0]:.2f}",
                    f"{m['interval_g'][1]:.2f}", f"{m['change_percent']:.1f}", f"{m['change_interval_percent'][0]:.1f}",
                    f"{m['change_interval_percent'][1]:.1f}"])
    with atomic_path(path, force) as tmp:
        tmp.write_text(buf.getvalue())


def change_figure(path: Path, muscles: dict, title: str, force: bool = False) -> None:
    """``followup.png``: each muscle's estimated lean-mass change (%) with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(muscles)
    y = np.arange(len(names))[::-1]
    c = np.array([muscles[n]["change_percent"] for n in names])
    lo = np.array([muscles[n]["change_interval_percent"][0] for n in names])
    hi = np.array([muscles[n]["change_interval_percent"][1] for n in names])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4))
    ax.barh(y, c, color=["#b2182b" if v < 0 else "#2166ac" for v in c], alpha=0.8)
    ax.errorbar(c, y, xerr=[c - lo, hi - c], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [n.replace("_", " ") for n in names])
    ax.set_xlabel("lean-mass change vs baseline CT, % (bar: estimate; whisker: 90 % interval)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
