"""``mskdex followup``: per-muscle lean-mass change on a follow-up radiograph of a patient whose
baseline CT (+ label map) is known."""

from __future__ import annotations

from pathlib import Path

from .common import (LazyChoices, Progress, add_ct_args, add_density_args, add_force, add_pixel_spacing, add_progress,
                     add_sid, density_from_args, field_default, settings_options, settings_values, spacing_rc)

#: reader options -> fields of MSKdeXLib.learning.followup.ReaderSettings (their defaults live there)
READER_FIELDS = {"samples": "samples", "grid": "grid", "margin": "margin", "preset": "preset", "coverage": "coverage",
                 "poses": "poses", "calibration_samples": "calibration_samples", "fat_mm": "fat_mm",
                 "elastic_mm": "elastic_mm", "warp_mm": "warp_mm"}
#: fit-reader options -> fields of MSKdeXLib.learning.followup_fit_reader.FitSettings
FIT_FIELDS = {"fit_modes": "modes", "fit_elastic_mm": "elastic_mm", "fit_voxel_mm": "modes_voxel_mm",
              "fit_pool": "pool_px", "fit_fat_mm": "fat_mm", "fit_pose_sd": "pose_sd", "fit_pose_rounds": "pose_rounds",
              "preset": "preset"}


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="per-muscle lean-mass change on a follow-up radiograph, given the baseline CT",
                       description="Per-muscle lean mass on a follow-up radiograph of a patient whose baseline CT "
                       "and label map are known (e.g. a planning CT, radiographs at follow-up). The CT's pelvis is "
                       "registered to the radiograph (or --registration gives the pose); at that pose a reader "
                       "(ridge regression on the radiograph at --grid px) is fitted on --samples re-simulations of "
                       "this patient's own CT with muscle changes and acquisitions drawn from a cohort preset, and "
                       "applied to the radiograph. Writes followup.json (per muscle: baseline and estimated lean "
                       "mass, change %, 90 %% intervals; left-right asymmetry; the assumptions), followup.csv, "
                       "followup.png and, when it registers, registration/. Exit code 3 when the registration is "
                       "doubtful or an estimate is implausible (a muscle with no lean mass left or more than doubled). Accuracy: benchmarks/RESULTS_network.md, 'Follow-up radiographs'.")
    add_ct_args(p)
    p.add_argument("--xray", required=True, help="the follow-up radiograph (DICOM, PNG, TIFF; a JSON sidecar "
                   "FILE.json gives its geometry)")
    p.add_argument("--registration", default=None, help="an existing registration.json of this radiograph "
                   "(mskdex register, or written from a Slicer transform node): its first body's pose is used and "
                   "no registration is run; checked first (a rigid 4x4 ct_to_camera and, when the file records "
                   "it, the same camera as this radiograph's: detector, pixel spacing, --sid)")
    p.add_argument("--bones", help="bodies to register, as in mskdex register (the first one's pose places the CT)")
    settings_options(p, "MSKdeXLib.learning.followup_run:FollowupRequest", {"bones": "bones"})
    p.add_argument("--out", required=True, help="output folder")
    add_sid(p, "source-to-image distance, mm, when the radiograph has no sidecar")
    add_pixel_spacing(p, None, "detector pixel spacing (mm), overrides the file's")
    p.add_argument("--reader", choices=LazyChoices("MSKdeXLib.learning.followup_run:READERS"),
                   metavar="KIND", help="ridge: a ridge reader fitted on re-simulations of the CT (default); fit: the "
                   "radiograph fitted with the CT's own physics (muscle changes, smooth-deformation modes and the "
                   "acquisition; better under a deformation on simulated follow-ups; intervals calibrated on 3 "
                   "validation subjects): %(choices)s")
    settings_options(p, "MSKdeXLib.learning.followup_run:FollowupRequest", {"reader": "method"})
    g = p.add_argument_group("reader")
    g.add_argument("--samples", type=int, help="re-simulations the reader is fitted on; a quarter of them picks "
                   "its ridge penalty and calibrates the intervals")
    g.add_argument("--grid", type=int, help="reader input grid, px per side over the detector")
    g.add_argument("--margin", type=float, help="share of the field at each edge left out of the reader's input "
                   "(where a collimator may cut it)")
    g.add_argument("--preset", choices=LazyChoices("MSKdeXLib.learning.cohort:PRESETS"), metavar="NAME",
                   help="cohort preset whose muscle-change and acquisition ranges are drawn (%(choices)s)")
    g.add_argument("--poses", type=int, help="poses about the registered one (up to a registration error away) the "
                   "re-simulations are spread over, so that the reader ignores such an error")
    g.add_argument("--coverage", type=float, help="coverage of the intervals")
    g.add_argument("--calibration-samples", type=int, help="follow-ups simulated from the CT itself (muscles changed "
                   "in the CT) that calibrate the intervals; 0: held-out re-simulations (faster, narrower, less honest)")
    g.add_argument("--fat-mm", type=float, help="soft tissue the reader allows for between CT and follow-up: its "
                   "views and calibration follow-ups change the subcutaneous fat thickness by U(-x, x) mm (0: none)")
    g.add_argument("--elastic-mm", type=float, help="soft tissue the reader allows for: its views and calibration "
                   "follow-ups deform the anatomy smoothly (SD of control displacements 80 mm apart, mm; 0: none)")
    g.add_argument("--warp-mm", type=float, help="soft tissue the reader allows for, cheaply: every re-simulation's "
                   "line integrals are moved by its own smooth 2D field (SD of control displacements 80 mm apart at "
                   "the patient, mm; 0: none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the re-simulations")
    settings_options(p, "MSKdeXLib.learning.followup:ReaderSettings", READER_FIELDS)
    f = p.add_argument_group("fit reader (--reader fit)")
    f.add_argument("--fit-modes", type=int, help="deformation modes fitted at most (0: none)")
    f.add_argument("--fit-elastic-mm", type=float, help="deformation SD (mm) the modes' prior assumes")
    f.add_argument("--fit-voxel-mm", type=float, help="the CT's voxel (mm) for the deformation modes (their cost "
                   "grows with the volume)")
    f.add_argument("--fit-pool", type=int, help="residuals averaged over POOL x POOL working pixels")
    f.add_argument("--fit-fat-mm", type=float, help="subcutaneous-fat thickness change the fit allows for, "
                   "U(-x, x) mm, fitted as bands of the CT's fat made thicker or thinner (0: none)")
    f.add_argument("--fit-pose-sd", type=float, nargs=3, metavar=("ROT_DEG", "INPLANE_MM", "DEPTH_MM"),
                   help="prior SDs of the registered pose's error (rotation deg, in-plane translation mm, depth mm), "
                   "fitted with the muscles as a nuisance; 0 0 0: the registered pose taken as exact")
    f.add_argument("--fit-pose-rounds", type=int, help="times the physics is re-made at the fitted pose and the fit "
                   "repeated (0-3)")
    settings_options(p, "MSKdeXLib.learning.followup_fit_reader:FitSettings",
                     {k: v for k, v in FIT_FIELDS.items() if k != "preset"})
    add_density_args(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Estimate, writing OUT through a staging folder renamed into place at the end (an error or
    Ctrl-C leaves nothing; followup.json moves in last)."""
    from ..io.outputs import output_folder
    from ..learning.followup_run import OUTPUTS

    from ..learning.followup import ReaderSettings

    from ..errors import UserError
    from ..learning.followup_fit_reader import FitSettings
    from ..learning.followup_run import FollowupRequest

    reader = ReaderSettings(**settings_values(args, READER_FIELDS), seed=args.seed)
    reader.ranges()  # an unknown preset fails before any work
    fit = FitSettings(**settings_values(args, FIT_FIELDS))
    args.reader = args.reader or field_default(FollowupRequest, "method")
    stray = [k for k in (FIT_FIELDS if args.reader == "ridge" else READER_FIELDS)
             if k != "preset" and getattr(args, k, None) is not None]
    if stray:
        raise UserError(f"--{stray[0].replace('_', '-')} does not apply to --reader {args.reader}")
    with output_folder(args.out, args.force, OUTPUTS, last=("followup.json",)) as stage:
        return _run(args, stage, reader, fit)


def _run(args, stage: Path, reader, fit) -> int:
    from ..errors import EXIT_DOUBTFUL
    from ..learning.followup_run import FollowupRequest, run_followup

    req = FollowupRequest(args.xray, args.ct, args.labels, stage, args.registration, sid_mm=args.sid,
                          spacing_mm=spacing_rc(args.pixel_spacing), table=args.table,
                          resample_labels=args.resample_labels, nonfinite=args.nonfinite, reader=reader,
                          density=density_from_args(args), force=args.force, method=args.reader, fit=fit,
                          **settings_values(args, {"bones": "bones"}))
    total = None if args.reader == "fit" else max(0, reader.poses - 1) + reader.calibration_samples + reader.samples
    prog = Progress(args.progress, total, "followup")

    def step(i: int, n: int) -> None:   # the fit reader's total is known once its control grid is
        if args.reader == "fit" and prog.total != n:
            prog.set_total(n)
        prog.update(1)

    def notify(event, **info):
        if event == "body-done":
            prog.event("log", message="registered", **info)

    try:
        report = run_followup(req, notify, step)
    finally:
        prog.close()
    prog.event("done", output=str(args.out))
    doubtful = report["doubtful"]
    if args.progress != "json":
        print(f"{'muscle':<24} {'baseline g':>10} {'estimate g':>10} {'change %':>9}  90 % interval %")
        for name, m in report["muscles"].items():
            lo, hi = m["change_interval_percent"]
            print(f"{name:<24} {m['baseline_g']:>10.1f} {m['estimate_g']:>10.1f} {m['change_percent']:>9.1f}  "
                  f"[{lo:.1f}, {hi:.1f}]")
        out = Path(args.out)
        print(f"wrote {out / 'followup.json'}, {out / 'followup.csv'} and {out / 'followup.png'}")
        if report["pose"]["doubtful"]:
            print(f"DOUBTFUL registration: exit code {EXIT_DOUBTFUL}; check registration/qa.png before using these")
        if report["implausible_muscles"]:
            print(f"IMPLAUSIBLE estimate ({', '.join(report['implausible_muscles'])}: no lean mass left or more than "
                  f"doubled): exit code {EXIT_DOUBTFUL}; the pose is probably wrong, check registration/qa.png")
    return EXIT_DOUBTFUL if doubtful else 0
