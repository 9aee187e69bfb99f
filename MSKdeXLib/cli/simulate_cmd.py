"""``mskdex simulate-xray``: simulate a radiograph from a CT, written as DICOM DX + JSON sidecar."""

from __future__ import annotations

from pathlib import Path

from .common import add_ct_args, add_device, add_force, add_progress


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
    g.add_argument("--rows", type=int, default=512, help="detector rows (default 512)")
    g.add_argument("--cols", type=int, default=512, help="detector columns (default 512)")
    g.add_argument("--spacing", type=float, nargs="+", default=[0.8], metavar="MM",
                   help="detector pixel spacing in mm, one value or ROW COL (default 0.8)")
    g.add_argument("--sid", type=float, default=1000.0, help="source-to-image distance, mm (default 1000)")
    g.add_argument("--sod", type=float, default=None,
                   help="source-to-isocentre distance, mm (default SID - 150)")
    g.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("RX", "RY", "RZ"),
                   help="extra rotation in degrees about the patient's L, P, S axes through the isocentre")
    g.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                   metavar=("TX", "TY", "TZ"), help="extra translation in mm along L, P, S")
    s = p.add_argument_group("acquisition and detector (defaults: see SimulationSettings)")
    s.add_argument("--spectrum", choices=("poly", "mono"), default="poly",
                   help="poly: kVp spectrum with water/bone materials; mono: renderer's effective energy")
    s.add_argument("--kvp", type=float, default=75.0, help="tube voltage, kV (default 75)")
    s.add_argument("--filtration", type=float, default=2.5, help="total filtration, mm Al (default 2.5)")
    s.add_argument("--focal-spot", type=float, default=1.2, help="focal spot FWHM, mm (default 1.2)")
    s.add_argument("--scatter-fraction", type=float, default=0.3,
                   help="mean scatter share of the detected signal, 0..<1 (default 0.3)")
    s.add_argument("--scatter-sigma", type=float, default=30.0, help="scatter kernel sigma, mm (default 30)")
    s.add_argument("--photons", type=float, default=3.0e6,
                   help="unattenuated photons per mm^2 at the detector: the dose (default 3e6)")
    s.add_argument("--noise-level", type=float, default=None,
                   help="relative quantum noise at the median signal (overrides --photons)")
    s.add_argument("--no-quantum-noise", action="store_true", help="no Poisson noise")
    s.add_argument("--electronic-noise", type=float, default=20.0,
                   help="Gaussian read noise, std in photons per pixel (default 20)")
    s.add_argument("--bits", type=int, default=12, help="stored bits, 8..16 (default 12)")
    s.add_argument("--gamma", type=float, default=1.0, help="detector contrast exponent (default 1)")
    s.add_argument("--window", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="window of -ln(I/I0) mapped to the output codes (default: automatic)")
    s.add_argument("--collimation", type=float, nargs=4, default=None, metavar=("X0", "X1", "Y0", "Y1"),
                   help="open field in detector mm from the image centre (x right, y down)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args):
    from ..projection.simulate import SimulationSettings

    return SimulationSettings(
        spectrum=args.spectrum, kvp=args.kvp, filtration_mm_al=args.filtration,
        focal_spot_mm=args.focal_spot, scatter_fraction=args.scatter_fraction,
        scatter_sigma_mm=args.scatter_sigma, photons_per_mm2=args.photons, noise_level=args.noise_level,
        quantum_noise=not args.no_quantum_noise, electronic_noise_photons=args.electronic_noise,
        bits=args.bits, gamma=args.gamma, window=tuple(args.window) if args.window else None,
        collimation_mm=tuple(args.collimation) if args.collimation else None)


def run(args) -> int:
    from ..errors import UserError
    from ..projection.geometry import Camera, perturbed_pose
    from ..io.outputs import check_new
    from ..projection.rendering import default_view, isocentre_of
    from ..projection.simulate import sidecar_path, simulate_radiograph, write_dicom_dx
    from .common import Progress, load_case, resolve_device

    out = Path(args.out)
    if out.suffix.lower() != ".dcm":
        raise UserError("--out must be a .dcm file", out)
    check_new(out, args.force)
    check_new(sidecar_path(out), args.force)
    if len(args.spacing) not in (1, 2):
        raise UserError(f"--spacing takes one or two values, got {len(args.spacing)}")
    sr, sc = (args.spacing * 2)[:2]
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
