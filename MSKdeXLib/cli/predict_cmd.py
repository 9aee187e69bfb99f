"""``mskdex predict``: per-structure mass and volume from one radiograph with a trained model."""

from __future__ import annotations

import warnings

from ..errors import UserError
from ..io.outputs import output_folder
from ..io.radiographs import load_radiograph
from .common import add_device, add_force, add_pixel_spacing, resolve_device, spacing_rc


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="estimate per-structure mass_g / volume_cm3 from a radiograph",
                       description="Decompose a radiograph with a trained model (folder with model.safetensors "
                       "+ config.json). Writes estimates.csv, estimates.json (mean over test-time augmentation and a "
                       "90 %% "
                       "interval, calibrated on held-out data when the model carries a calibration, else the "
                       "uncalibrated TTA percentiles), overlay.png and channels/*.nrrd.")
    p.add_argument("--model", required=True, help="model folder (model.safetensors + config.json)")
    p.add_argument("--xray", required=True, help="radiograph (DICOM, PNG, JPEG, TIFF)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tta", type=int, default=None,
                   help="extra test-time-augmentation passes (default: as many as the model's interval was "
                        "calibrated with, else 4; 0 = none)")
    add_pixel_spacing(p, None, "pixel spacing (mm) overriding the file's", old_alias=False)
    p.add_argument("--id", default=None, help="case id in the outputs (default: from the file name)")
    p.add_argument("--format", choices=("nrrd", "nifti"), default="nrrd", help="channel image format")
    p.add_argument("--seed", type=int, default=0, help="seed of the test-time augmentation")
    add_device(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.tta is not None and args.tta < 0:
        raise UserError("--tta must be >= 0")
    spacing = spacing_rc(args.pixel_spacing)
    names = ("estimates.csv", "estimates.json", "overlay.png", "channels")
    with output_folder(args.out, args.force, names, last=("estimates.json",)) as stage:  # nothing left on error
        return _predict(args, stage, spacing)


def _predict(args, out, spacing) -> int:
    from ..learning.inference import load_model, predict, write_outputs  # lazy: torch; keeps `mskdex --help` instant

    model = load_model(args.model, resolve_device(args.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the estimates carry their own warnings
        rg = load_radiograph(args.xray, spacing)
    est = predict(model, rg, tta=args.tta, seed=args.seed, rec_id=args.id)
    write_outputs(out, est, force=True, image_format=args.format)
    lo, hi = est.interval()
    how = est.interval_method()
    head = f"{how['level']:.0%} interval" + ("" if how["calibrated"] else " (uncalibrated)")
    print(f"{'structure':<30}{'quantity':<12}{'estimate':>12}{head:>30}")
    for c, m, a, b in zip(est.channels, est.mean, lo, hi):
        print(f"{c['structure']:<30}{c['quantity']:<12}{m:>12.2f}{f'{a:.2f} .. {b:.2f}':>30}")
    if not how["calibrated"]:
        print(f"note: {how['note']}")
    for w in est.warnings:
        print(f"warning: {w}")
    print(f"wrote {args.out}")
    return 0
