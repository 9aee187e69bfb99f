"""``mskdex register``: rigid 2D-3D registration of CT bones to a radiograph."""

from __future__ import annotations

from pathlib import Path

from .common import (LazyChoices, Progress, add_ct_args, add_device, add_force, add_pixel_spacing, add_progress,
                     add_sid, resolve_device, settings_options, spacing_rc)


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="register CT bones (pelvis, femurs ...) to a radiograph",
                       description="Intensity-based rigid 2D-3D registration: each rigid body's "
                       "DRR is matched to the radiograph (patch-wise gradient NCC; CMA-ES "
                       "on a coarse level, then gradient refinement through the DRR). Bodies are registered "
                       "in order; the first one carries the big search. A later body touching one registered "
                       "before it (a femur after the pelvis) rotates about the joint centre, starting from that "
                       "body's pose (hip = ball joint); a later body made of some of a registered body's "
                       "structures (a vertebra after 'spine') moves a little about its own centre from that "
                       "body's pose. Both are searched at fine pixels in a window around them. The DRR holds the "
                       "body's bones and, by default, the CT's other tissue moving with the first body (the "
                       "radiograph's soft tissue; --soft-tissue off: bones only). Writes "
                       "registration.json (ct_to_camera per body), qa.png and the registered bone "
                       "mass channels (g per pixel) as NRRD.")
    add_ct_args(p)
    p.add_argument("--xray", required=True, help="radiograph (DICOM, PNG, TIFF); a simulated one's "
                   "JSON sidecar (FILE.json) gives the geometry and the true pose")
    p.add_argument("--bones", default=None,
                   help="comma-separated rigid bodies, registered in order: structure names, groups "
                        "NAME=a+b+c, ranges NAME=a..b (every structure of the label map from a to b in table "
                        "order), 'pelvis' (= hip_left+hip_right+sacrum) and 'bones' (every bone of the label "
                        "map). Default: pelvis,femur_left,femur_right. A chest / spine radiograph: "
                        "bones,spine=vertebrae_T6..vertebrae_L1,vertebrae_T9 (all bones first, then the "
                        "spine and each vertebra as parts with small motions)")
    p.add_argument("--init-pose", default=None,
                   help="start pose: JSON file (or inline JSON) with a 4x4 ct_to_camera, "
                        "{'ct_to_camera': ...}, or a previous registration.json")
    p.add_argument("--landmarks", default=None,
                   help="CSV x,y,z,row,col (CT LPS mm <-> radiograph pixel), >= 4 pairs: start pose by PnP")
    add_sid(p, "source-to-image distance, mm, when the radiograph has no sidecar")
    add_pixel_spacing(p, None, "detector pixel spacing (mm), overrides the file's")
    p.add_argument("--similarity", default=None, choices=LazyChoices("MSKdeXLib.registration.similarity:MEASURES"),
                   metavar="MEASURE", help="similarity measure: %(choices)s")
    p.add_argument("--fine-px", type=int, default=None, help="long side of the finest level, px")
    p.add_argument("--no-inplane-search", action="store_true",
                   help="skip the 2D rotation + shift search of the first body")
    p.add_argument("--max-evals", type=int, default=None, help="CMA-ES evaluations per body")
    p.add_argument("--refine-steps", type=int, default=None, help="gradient steps per pyramid level")
    # help shows RegistrationSettings' defaults (the options left out keep them: settings_from_args)
    settings_options(p, "MSKdeXLib.registration.settings:RegistrationSettings",
                     {"similarity": "similarity", "fine_px": "fine_px", "max_evals": "cma_max_evals",
                      "refine_steps": "refine_steps"})
    p.add_argument("--soft-tissue", choices=("on", "off"), default=None,
                   help="model the radiograph's soft tissue: the first body's DRR also holds the CT's other "
                        "tissue, which stays with it for the later bodies (default on; off: bone-only DRRs, "
                        "for a radiograph whose soft tissue differs much from the CT's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CMA-ES search")
    p.add_argument("--out", required=True, help="output folder")
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args):
    """RegistrationSettings with the command's options applied."""
    from ..registration.settings import RegistrationSettings

    s = RegistrationSettings(seed=args.seed)
    if args.similarity:
        s.similarity = args.similarity
    if args.fine_px:
        s.fine_px = args.fine_px
    if args.max_evals is not None:
        s.cma_max_evals = max(0, args.max_evals)
        s.cma = args.max_evals > 0
    if args.refine_steps is not None:
        s.refine_steps = max(0, args.refine_steps)
    if args.soft_tissue is not None:
        s.soft_tissue = args.soft_tissue == "on"
    if args.no_inplane_search:
        s.first.inplane_search = False
    return s


def run(args) -> int:
    """Register, writing OUT through a staging folder renamed into place at the end (an error or
    Ctrl-C leaves nothing; registration.json moves in last). Exit code 3 when a body is doubtful."""
    from ..io.outputs import output_folder
    from ..registration.run import OUTPUTS

    with output_folder(args.out, args.force, OUTPUTS, last=("registration.json",)) as stage:
        return _run(args, stage)


def _run(args, stage: Path) -> int:
    # the registration (torch) is imported here, not at the top: every `mskdex` command imports
    # this module to build its parser, and most never register
    from ..errors import EXIT_DOUBTFUL
    from ..registration.run import RegistrationRequest, register_radiograph
    from ..validation import NonFiniteError, is_finite

    req = RegistrationRequest(args.xray, args.ct, args.labels, stage, args.bones, args.init_pose,
                              args.landmarks, args.sid, spacing_rc(args.pixel_spacing), args.table, args.resample_labels,
                              settings_from_args(args), args.force)
    device = resolve_device(args.device)
    # the bar counts bodies (one per comma-separated entry of --bones; the default is 3)
    prog = Progress(args.progress, len(args.bones.split(",")) if args.bones else 3, "register")

    def notify(event, **info):
        if event in ("inplane", "body-done"):
            prog.event("log", message=event, **info)
        if event != "inplane":  # the count is of bodies; a search step only shows the body and similarity
            prog.update(1 if event == "body-done" else 0, body=info.get("body"), similarity=info.get("similarity"))

    try:
        outcome = register_radiograph(req, device, notify)
    finally:
        prog.close()
    for r in outcome.results:  # a NaN similarity or pose is a failed registration, never a success
        if not (is_finite(r.final_similarity) and is_finite(r.ct_to_camera)):
            what = "similarity" if not is_finite(r.final_similarity) else "pose"
            raise NonFiniteError(f"registration failed: body '{r.name}' has a non-finite {what}", args.xray)
    prog.event("done", output=str(args.out))
    if args.progress != "json":
        for r in outcome.results:
            extra = f", mTRE {r.mtre_mm:.2f} mm" if r.mtre_mm is not None else ""
            print(f"{r.name}: similarity {r.initial_similarity:.3f} -> {r.final_similarity:.3f}"
                  f"{' (DOUBTFUL: ' + '; '.join(r.doubtful_reasons) + ')' if r.doubtful else ''}{extra}, {r.runtime_s:.1f} s")
        out = Path(args.out)
        print(f"wrote {out / outcome.path.name}, {out / 'qa.png'} (check the alignment by eye) and "
              f"{len(outcome.report.get('channels', {}))} registered bone channels in {out / 'channels'}/")
    doubtful = any(r.doubtful for r in outcome.results)
    if doubtful and args.progress != "json":
        print(f"DOUBTFUL: exit code {EXIT_DOUBTFUL}; check qa.png before using this registration")
    return EXIT_DOUBTFUL if doubtful else 0
