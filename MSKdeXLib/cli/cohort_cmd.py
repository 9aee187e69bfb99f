"""``mskdex cohort``: a virtual cohort of N subjects with known truth from one real CT + labels."""

from __future__ import annotations

from .common import add_ct_args, add_density_args, add_force, add_progress, density_from_args


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="virtual cohort: N simulated subjects (radiograph + truth) from a CT",
                       description="From a real CT + labels, build N virtual subjects: per-muscle "
                       "atrophy/hypertrophy and fat infiltration, subcutaneous fat change, a smooth "
                       "elastic deformation, a pose change and acquisition changes. Each subject folder "
                       "holds a DICOM DX radiograph + sidecar (true pose), metrics.json (truth), and "
                       "targets.safetensors (mass g/pixel and volume cm^3/pixel channels rendered at the "
                       "true pose). Subject i depends only on --seed and i.")
    add_ct_args(p)
    p.add_argument("--n", type=int, required=True, help="number of subjects")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per subject)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--start", type=int, default=0,
                   help="index of the first subject (extend a cohort or build it in pieces)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument("--detector", nargs=2, type=int, metavar=("ROWS", "COLS"), default=(256, 256),
                   help="detector size in pixels (default 256 256); the pixel spacing is fitted so "
                        "that the labelled anatomy fills the field of view")
    p.add_argument("--sid", type=float, default=1000.0, help="source-to-image distance, mm (default 1000)")
    p.add_argument("--voxel-mm", type=float, default=None,
                   help="resample the CT to isotropic voxels of this size first (faster on big CTs)")
    p.add_argument("--kind", action="append", choices=("muscle", "bone", "other"),
                   help="structures whose channels and metrics are produced (default: muscle, bone)")
    p.add_argument("--keep-ct", action="store_true", help="also write each subject's modified CT + labels")
    p.add_argument("--no-deformation", action="store_true", help="no elastic deformation")
    p.add_argument("--no-pose-change", action="store_true", help="every subject at the default AP view")
    add_density_args(p)
    add_force(p)
    add_progress(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..cohort import CohortConfig, CohortRanges, build_cohort
    from ..errors import UserError, require_file
    from .common import Progress

    require_file(args.ct, "CT")
    require_file(args.labels, "label map")
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    ranges = CohortRanges()
    if args.no_deformation:
        ranges.elastic_mm = 0.0
    if args.no_pose_change:
        ranges.rotation_deg = ranges.translation_mm = 0.0
    config = CohortConfig(ct=str(args.ct), labels=str(args.labels), table=args.table, seed=args.seed,
                          rows=args.detector[0], cols=args.detector[1], sid_mm=args.sid,
                          voxel_mm=args.voxel_mm, keep_ct=args.keep_ct,
                          kinds=tuple(args.kind or ("muscle", "bone")),
                          density=density_from_args(args).to_dict(), ranges=ranges.to_dict())
    bar = Progress(args.progress, args.n, "cohort")
    try:
        doc = build_cohort(config, args.n, args.out, workers=args.workers, force=args.force,
                           on_subject=lambda e: bar.update(1, subject=e["name"]), start=args.start)
    finally:
        bar.close()
    bar.event("done", subjects=len(doc["subjects"]), seconds=doc["seconds"])
    if args.progress != "json":
        print(f"{len(doc['subjects'])} subjects in {args.out} ({doc['seconds']:.1f} s)")
    return 0
