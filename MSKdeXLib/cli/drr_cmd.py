"""``mskdex drr``: attenuation DRR and per-structure mass / volume channels of a CT.

Writes into ``--out``: ``summary.json`` (geometry, pose, per-channel sums vs CT metrics,
settings), ``drr.nrrd`` (attenuation line integrals, unitless, 2D with detector spacing),
``channels.nrrd`` (stack (C, rows, cols), channel c as listed in summary.json; g or cm^3 per
pixel) and ``preview.png`` (DRR beside a colour composite of the channels).
"""

from __future__ import annotations

from contextlib import closing

from ..anatomy.quantities import CHANNEL_KINDS
from ..errors import UserError
from ..projection.geometry import Camera
from ..settings import DRR_DETECTOR, MU_WATER_PER_MM
from .common import (Progress, add_ct_args, add_density_args, add_device, add_force, add_pixel_spacing, add_progress,
                     add_sid, add_structure_args, density_from_args, load_case, resolve_device, spacing_rc,
                     split_names)


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="render a DRR and exact per-structure mass/volume channels",
                       description="Render the attenuation DRR of a CT and, per structure, a mass "
                       "(g per pixel) and/or volume (cm^3 per pixel) channel whose sum equals the "
                       "structure's CT mass/volume. Default view: AP, centred on the labelled bones.")
    add_ct_args(p)
    add_structure_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--channels", default=",".join(CHANNEL_KINDS),
                   help=f"comma-separated quantities: {', '.join(CHANNEL_KINDS)}, or 'none' (default: %(default)s)")
    g = p.add_argument_group("geometry (see docs/frames.md)")
    g.add_argument("--rows", type=int, default=DRR_DETECTOR.rows, help=f"detector rows (default {DRR_DETECTOR.rows})")
    g.add_argument("--cols", type=int, default=DRR_DETECTOR.cols, help=f"detector columns (default {DRR_DETECTOR.cols})")
    add_pixel_spacing(g, DRR_DETECTOR.pixel_spacing_mm, "detector pixel spacing in mm")
    add_sid(g)
    g.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("RX", "RY", "RZ"),
                   help="extra rotation in degrees about the patient L, P, S axes through the isocentre")
    g.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                   metavar=("TX", "TY", "TZ"), help="extra translation in mm along L, P, S")
    g.add_argument("--step", type=float, default=None, metavar="MM",
                   help="attenuation sample spacing along the dominant CT axis (default: one per slice)")
    g.add_argument("--mu-water", type=float, default=MU_WATER_PER_MM, metavar="PER_MM",
                   help=f"linear attenuation of water in 1/mm (default {MU_WATER_PER_MM:g}, about 70 keV)")
    add_density_args(p)
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def _quantities(text: str) -> tuple[str, ...]:
    names = split_names(text) or []
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in CHANNEL_KINDS]
    if bad or not names:
        raise UserError(f"--channels: unknown quantity {bad or text!r}; use {', '.join(CHANNEL_KINDS)} or none")
    return tuple(dict.fromkeys(names))


def run(args) -> int:
    from ..projection.drr_outputs import make_drr  # lazy: torch; keeps `mskdex --help` instant

    quantities = _quantities(args.channels)
    spacing = spacing_rc(args.pixel_spacing)
    progress = Progress(args.progress, total=4, desc="drr")
    with closing(progress):
        ct, labels = load_case(args)
        kinds = args.kind or (None if args.structures else ["muscle", "bone"])
        structures = labels.select(split_names(args.structures), kinds) if labels is not None else []
        if quantities and labels is None:
            raise UserError("--channels needs --labels (or pass --channels none)")
        if quantities and not structures:
            raise UserError("no structure selected (check --structures / --kind)", args.labels)
        camera = Camera(args.rows, args.cols, *spacing, args.sid)
        result = make_drr(args.out, ct, labels, structures, camera, quantities, force=args.force,
                          on_step=lambda stage: progress.update(1, stage=stage),
                          density=density_from_args(args), rotation_deg=args.rotation,
                          translation_mm=args.translation, device=resolve_device(args.device),
                          step_mm=args.step, mu_water_per_mm=args.mu_water)
        progress.event("done", out=str(args.out))
    bad = [e for e in result.entries if not e["inside_detector"]]
    print(f"wrote {args.out} ({len(result.entries)} channels"
          + (f"; {len(bad)} not fully inside the detector" if bad else "") + ")")
    return 0
