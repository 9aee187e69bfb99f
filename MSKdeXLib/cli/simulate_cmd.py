"""``mskdex simulate-xray``: simulate a radiograph from a CT, written as DICOM DX + JSON sidecar."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io.outputs import check_new
from ..projection.geometry import ISOCENTRE_TO_DETECTOR_MM, Camera, perturbed_pose
from ..settings import RADIOGRAPH_DETECTOR
from .common import (LazyChoices, Progress, add_ct_args, add_device, add_force, add_pixel_spacing, add_progress,
                     add_sid, load_case, resolve_device, settings_options, settings_values, spacing_rc)


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="simulate a radiograph (DICOM DX + JSON sidecar) from a CT",
                       description="Simulate an AP radiograph of a CT (cone beam, Beer-Lambert with a "
                       "kVp spectrum, focal-spot/scatter blur, quantum + electronic noise, log detector). "
                       "Writes FILE.dcm (DX For Presentation) and FILE.json (geometry, ct_to_camera, "
                       "settings, seed). Default view: AP centred on the labelled bones (CT centre "
                       "without labels); --rotation / --translation move the CT about that isocentre.")
    add_ct_args(p, labels_required=False)
    p.add_argument("--out", required=True, help="output DICOM file (.dcm); the sidecar is FILE.json")
    g = p.add_argument_group("geometry")
    g.add_argument("--rows", type=int, default=RADIOGRAPH_DETECTOR.rows,
                   help=f"detector rows (default {RADIOGRAPH_DETECTOR.rows})")
    g.add_argument("--cols", type=int, default=RADIOGRAPH_DETECTOR.cols,
                   help=f"detector columns (default {RADIOGRAPH_DETECTOR.cols})")
    add_pixel_spacing(g, RADIOGRAPH_DETECTOR.pixel_spacing_mm, "detector pixel spacing in mm")
    add_sid(g)
    g.add_argument("--sod", type=float, default=None,
                   help=f"source-to-isocentre distance, mm (default SID - {ISOCENTRE_TO_DETECTOR_MM:g})")
    g.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("RX", "RY", "RZ"),
                   help="extra rotation in degrees about the patient's L, P, S axes through the isocentre")
    g.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                   metavar=("TX", "TY", "TZ"), help="extra translation in mm along L, P, S")
    s = p.add_argument_group("acquisition and detector (defaults: SimulationSettings)")
    s.add_argument("--spectrum", choices=LazyChoices("MSKdeXLib.projection.simulate:SPECTRA"), metavar="MODEL",
                   help="%(choices)s; poly: kVp spectrum with water/bone materials, mono: the renderer's "
                        "effective energy")
    s.add_argument("--kvp", type=float, help="tube voltage, kV")
    s.add_argument("--filtration", type=float, help="total filtration, mm Al")
    s.add_argument("--focal-spot", type=float, help="focal spot FWHM, mm")
    s.add_argument("--scatter-fraction", type=float, help="mean scatter share of the detected signal, 0..<1")
    s.add_argument("--scatter-sigma", type=float, help="scatter kernel sigma, mm")
    s.add_argument("--photons", type=float, help="unattenuated photons per mm^2 at the detector: the dose")
    s.add_argument("--noise-level", type=float,
                   help="relative quantum noise at the median signal (overrides --photons)")
    s.add_argument("--no-quantum-noise", action="store_true", help="no Poisson noise")
    s.add_argument("--electronic-noise", type=float, help="Gaussian read noise, std in photons per pixel")
    s.add_argument("--bits", type=int, help="stored bits, 8..16")
    s.add_argument("--gamma", type=float, help="detector contrast exponent")
    s.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="window of -ln(I/I0) mapped to the output codes (default: automatic)")
    s.add_argument("--collimation", type=float, nargs=4, default=None, metavar=("X0", "X1", "Y0", "Y1"),
                   help="open field in detector mm from the image centre (x right, y down)")
    settings_options(p, "MSKdeXLib.projection.simulate:SimulationSettings", SETTINGS_FIELDS)
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


#: option dest -> SimulationSettings field (defaults come from there)
SETTINGS_FIELDS = {"spectrum": "spectrum", "kvp": "kvp", "filtration": "filtration_mm_al",
                   "focal_spot": "focal_spot_mm", "scatter_fraction": "scatter_fraction",
                   "scatter_sigma": "scatter_sigma_mm", "photons": "photons_per_mm2", "noise_level": "noise_level",
                   "electronic_noise": "electronic_noise_photons", "bits": "bits", "gamma": "gamma"}


def settings_from_args(args):
    from ..projection.simulate import SimulationSettings  # lazy: torch; keeps `mskdex --help` instant

    extra = {"window": tuple(args.window) if args.window else None,
             "collimation_mm": tuple(args.collimation) if args.collimation else None}
    if args.no_quantum_noise:
        extra["quantum_noise"] = False
    return SimulationSettings(**settings_values(args, SETTINGS_FIELDS), **extra)


def run(args) -> int:
    from ..projection.rendering import default_view, isocentre_of  # lazy: torch; keeps `mskdex --help` instant
    from ..projection.simulate import sidecar_path, simulate_radiograph, write_dicom_dx

    out = Path(args.out)
    if out.suffix.lower() != ".dcm":
        raise UserError("--out must be a .dcm file", out)
    check_new(out, args.force)
    check_new(sidecar_path(out), args.force)
    sr, sc = spacing_rc(args.pixel_spacing)
    camera = Camera(args.rows, args.cols, sr, sc, args.sid)
    settings = settings_from_args(args)
    device = resolve_device(args.device)
    progress = Progress(args.progress, total=3, desc="simulate-xray")
    try:
        ct, labels = load_case(args)
        progress.update(1, step_name="loaded")
        base = default_view(ct, labels, camera, args.sod)
        iso = isocentre_of(ct, labels)
        pose = perturbed_pose(base, args.rotation, args.translation, iso)
        rad = simulate_radiograph(ct, camera, pose, settings, args.seed, labels=labels, device=device,
                                  isocentre_lps=iso)
        progress.update(1, step_name="simulated")
        extra = {"view": {"base": "AP, centred on the labelled bones" if labels is not None else
                          "AP, centred on the CT", "isocentre_lps_mm": iso.tolist(),
                          "rotation_deg": list(args.rotation), "translation_mm": list(args.translation)},
                 "labels_source": args.labels}
        dcm, side = write_dicom_dx(out, rad, camera, pose, settings, args.seed, args.force, extra=extra)
        progress.update(1, step_name="written")
        progress.event("done", outputs=[str(dcm), str(side)])
    finally:
        progress.close()
    if args.progress != "json":
        print(f"wrote {dcm} ({camera.rows}x{camera.cols}, {sr:g}x{sc:g} mm) and {side}")
    return 0
