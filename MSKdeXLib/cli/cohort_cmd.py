"""``mskdex cohort``: a virtual cohort of N subjects with known truth from one real CT + labels."""

from __future__ import annotations

import dataclasses
import json
from contextlib import closing

from ..errors import UserError, require_file
from ..io.documents import read_json
from ..io.outputs import resumable_folder
from ..settings import COHORT_DETECTOR
from .common import (LazyChoices, Progress, add_ct_args, add_density_args, add_force, add_kind, add_progress, add_sid,
                     density_from_args, settings_options, settings_values)

#: body-composition option dest -> CohortRanges field (defaults come from there)
RANGE_FIELDS = {"body_change": "body_change", "max_atrophy": "max_atrophy", "max_hypertrophy": "max_hypertrophy",
                "max_infiltration": "max_infiltration", "subcutaneous_fat_mm": "subcutaneous_fat_mm"}


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
    p.add_argument("--detector", nargs=2, type=int, metavar=("ROWS", "COLS"),
                   default=(COHORT_DETECTOR.rows, COHORT_DETECTOR.cols),
                   help=f"detector size in pixels (default {COHORT_DETECTOR.rows} {COHORT_DETECTOR.cols}); the pixel "
                        "spacing is fitted so that the labelled anatomy fills the field of view")
    add_sid(p)
    p.add_argument("--voxel-mm", type=float, default=None,
                   help="resample the CT to isotropic voxels of this size first (faster on big CTs)")
    add_kind(p, "structures whose channels and metrics are produced (repeatable)")
    p.add_argument("--keep-ct", action="store_true", help="also write each subject's modified CT + labels")
    p.add_argument("--physics", action="store_true",
                   help="also write each subject's line integrals (physics.safetensors), so that training can "
                        "re-simulate its radiograph with other muscle amounts and acquisitions (data.resimulate)")
    p.add_argument("--no-deformation", action="store_true", help="no elastic deformation")
    p.add_argument("--no-pose-change", action="store_true", help="every subject at the default AP view")
    p.add_argument("--preset", choices=LazyChoices("MSKdeXLib.learning.cohort:PRESETS"), default=None, metavar="NAME",
                   help="named variation ranges (%(choices)s; MSKdeXLib.learning.cohort.PRESETS): 'specificity' draws every "
                        "muscle and side independently, adds unilateral hip-osteoarthritis patterns, size, and "
                        "acquisition as wide as real AP hip radiographs; --ranges and the flags below override it")
    g = p.add_argument_group("body composition (fractions of a muscle's voxels; override --ranges)")
    g.add_argument("--ranges", default=None, metavar="FILE|demo",
                   help="JSON file with any of the cohort's variation ranges (keys of "
                        "MSKdeXLib.learning.cohort.CohortRanges, e.g. body_change, max_atrophy, noise), or 'demo' for "
                        "the demo's ranges (muscle change wide, nuisance moderate)")
    g.add_argument("--body-change", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="body-wide muscle change shared by all muscles of a subject, U(LOW, HIGH) "
                        "(sarcopenic to muscular)")
    g.add_argument("--max-atrophy", type=float, help="per-muscle extra atrophy: up to this fraction becomes fat")
    g.add_argument("--max-hypertrophy", type=float,
                   help="per-muscle extra growth into nearby fat, up to this fraction")
    g.add_argument("--max-infiltration", type=float,
                   help="fat infiltration: up to this fraction of lean voxels become fatty")
    g.add_argument("--subcutaneous-fat-mm", type=float, help="subcutaneous fat thickness change in [-MM, +MM]")
    settings_options(p, "MSKdeXLib.learning.cohort:CohortRanges", RANGE_FIELDS)
    settings_options(p, "MSKdeXLib.learning.cohort:CohortConfig", {"kind": "kinds"})
    add_density_args(p)
    add_force(p)
    add_progress(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..learning.cohort import CohortConfig, build_cohort  # lazy: scipy and torch; keeps `mskdex --help` instant

    require_file(args.ct, "CT")
    require_file(args.labels, "label map")
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    ranges = ranges_from_args(args)
    if args.no_deformation:
        ranges.elastic_mm = 0.0
    if args.no_pose_change:
        ranges.rotation_deg = ranges.translation_mm = 0.0
    config = CohortConfig(ct=str(args.ct), labels=str(args.labels), table=args.table, seed=args.seed,
                          rows=args.detector[0], cols=args.detector[1], sid_mm=args.sid,
                          voxel_mm=args.voxel_mm, keep_ct=args.keep_ct, physics=args.physics,
                          density=density_from_args(args).to_dict(), ranges=ranges.to_dict(),
                          **({"kinds": tuple(args.kind)} if args.kind else {}))
    bar = Progress(args.progress, args.n, "cohort")
    # each subject folder is built atomically; a cohort folder without any finished subject is removed
    with resumable_folder(args.out, lambda p: any(p.glob("subject-*/subject.json"))), closing(bar):
        doc = build_cohort(config, args.n, args.out, workers=args.workers, force=args.force,
                           on_subject=lambda e: bar.update(1, subject=e["name"]), start=args.start)
    bar.event("done", subjects=len(doc["subjects"]), seconds=doc["seconds"])
    if args.progress != "json":
        print(f"{len(doc['subjects'])} subjects in {args.out} ({doc['seconds']:.1f} s)")
    return 0


def ranges_from_args(args):
    """The cohort's :class:`~MSKdeXLib.learning.cohort.CohortRanges` from --ranges and the body-composition
    flags (UserError naming the file or flag when invalid)."""
    from ..learning.cohort import MAX_TOTAL_ATROPHY, MAX_TOTAL_HYPERTROPHY, CohortRanges  # lazy: scipy (--help)

    base: dict = {}
    if getattr(args, "preset", None):
        from ..learning.cohort import preset_ranges  # lazy: scipy (--help)

        base = preset_ranges(args.preset).to_dict()
    if args.ranges == "demo":
        from ..demo import demo_ranges  # lazy: the demo's ranges only for --ranges demo

        base = demo_ranges()
    elif args.ranges:
        user = read_json(args.ranges, "cohort ranges")
        if not isinstance(user, dict):
            raise UserError("cohort ranges must be a JSON object", args.ranges)
        known = {f.name for f in dataclasses.fields(CohortRanges)}
        unknown = sorted(set(user) - known)
        if unknown:
            raise UserError(f"unknown cohort range key(s) {unknown}; known: {sorted(known)}", args.ranges)
        base = {**base, **user}
    values = {**base, **settings_values(args, RANGE_FIELDS)}
    try:
        ranges = CohortRanges(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()})
        json.dumps(ranges.to_dict())
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid cohort ranges ({exc})", args.ranges or None) from None
    lo, hi = ranges.body_change
    if not (-MAX_TOTAL_ATROPHY <= lo <= hi <= MAX_TOTAL_HYPERTROPHY):
        raise UserError(f"--body-change must satisfy {-MAX_TOTAL_ATROPHY} <= LOW <= HIGH <= {MAX_TOTAL_HYPERTROPHY}, "
                        f"got {lo} {hi}")
    for name in ("max_atrophy", "max_hypertrophy", "max_infiltration"):
        v = float(getattr(ranges, name))
        if not 0.0 <= v <= 0.9:
            raise UserError(f"--{name.replace('_', '-')} must be a fraction in [0, 0.9], got {v}")
    if ranges.subcutaneous_fat_mm < 0:
        raise UserError(f"--subcutaneous-fat-mm must be >= 0, got {ranges.subcutaneous_fat_mm}")
    return ranges
