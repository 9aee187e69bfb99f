"""``mskdex register``: rigid 2D-3D registration of CT bones to a radiograph."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..io.documents import read_json
from .common import (LazyChoices, add_ct_args, add_device, add_force, add_pixel_spacing, add_progress, add_sid,
                     load_case, spacing_rc)

OUTPUTS = ("registration.json", "qa.png", "channels")


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="register CT bones (pelvis, femurs ...) to a radiograph",
                       description="Intensity-based rigid 2D-3D registration: each rigid body's "
                       "bone-only DRR is matched to the radiograph (patch-wise gradient NCC; CMA-ES "
                       "on a coarse level, then gradient refinement through the DRR). Bodies are registered "
                       "in order; the first one carries the big search. A later body touching one registered "
                       "before it (a femur after the pelvis) rotates about the joint centre, starting from that "
                       "body's pose (hip = ball joint); a later body made of some of a registered body's "
                       "structures (a vertebra after 'spine') moves a little about its own centre from that "
                       "body's pose. Both are searched at fine pixels in a window around them. Writes "
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
                   metavar="MEASURE", help="similarity measure: %(choices)s (default pgncc)")
    p.add_argument("--fine-px", type=int, default=None, help="long side of the finest level, px (default 192)")
    p.add_argument("--no-inplane-search", action="store_true",
                   help="skip the 2D rotation + shift search of the first body")
    p.add_argument("--max-evals", type=int, default=None, help="CMA-ES evaluations per body (default 480)")
    p.add_argument("--refine-steps", type=int, default=None,
                   help="gradient steps per pyramid level (default 40)")
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


def _read_json_arg(text: str, what: str):
    from ..errors import UserError

    t = text.strip()
    if t.startswith(("[", "{")):
        try:
            return json.loads(t), None
        except json.JSONDecodeError as exc:
            raise UserError(f"{what}: invalid inline JSON ({exc.msg})") from None
    p = Path(text)
    return read_json(p, what, require_object=False), p


def load_init_poses(text: str):
    """(first-body pose or None, {body: pose}) from --init-pose."""
    import numpy as np

    from ..errors import UserError
    from ..projection.geometry import check_rigid

    doc, path = _read_json_arg(text, "initial pose")
    where = path or "--init-pose"
    try:
        if isinstance(doc, dict) and "bodies" in doc:
            per = {b["name"]: check_rigid(np.asarray(b["ct_to_camera"], dtype=float), f"{where}: pose of {b['name']}")
                   for b in doc["bodies"]}
            return next(iter(per.values()), None), per
        if isinstance(doc, dict):
            doc = doc.get("ct_to_camera")
        return check_rigid(np.asarray(doc, dtype=float), f"{where}: ct_to_camera"), {}
    except (TypeError, ValueError, KeyError):
        raise UserError("initial pose must be a 4x4 matrix, {'ct_to_camera': 4x4} or a registration.json",
                        path) from None


def load_geometry(xray_path: str, radiograph, sid_mm: float):
    """(Camera, sidecar dict or None) for the radiograph."""
    from ..errors import UserError
    from ..projection.geometry import Camera
    from ..projection.simulate import sidecar_path

    side = sidecar_path(xray_path)
    doc = None
    if side.exists():
        doc = read_json(side, "radiograph sidecar")
    rows, cols = radiograph.shape
    if doc and doc.get("geometry"):
        g = dict(doc["geometry"])
        if radiograph.spacing_source == "user":
            g["spacing_row_mm"], g["spacing_col_mm"] = radiograph.pixel_spacing
        cam = Camera.from_dict(g)
        if (cam.rows, cam.cols) != (rows, cols):
            raise UserError(f"sidecar geometry is {cam.rows}x{cam.cols} but the image is {rows}x{cols}", side)
        return cam, doc
    if radiograph.pixel_spacing is None:
        raise UserError("radiograph has no pixel spacing and no sidecar; pass --pixel-spacing MM", xray_path)
    return Camera(rows, cols, radiograph.pixel_spacing[0], radiograph.pixel_spacing[1], sid_mm), None


def run(args) -> int:
    import warnings

    import numpy as np
    import torch

    from ..io.outputs import atomic_path, prepare_out_dir, remove_stale, write_json
    from ..io.radiographs import UncalibratedWarning, load_radiograph
    from ..registration import initialise, pipeline
    from ..registration.qa import qa_figure
    from ..projection.rendering import DRRRenderer, default_view
    from .common import Progress, resolve_device

    t0 = time.time()
    device = resolve_device(args.device)
    out = Path(args.out)
    prepare_out_dir(out, args.force, expected=OUTPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncalibratedWarning)
        xray = load_radiograph(args.xray, spacing_rc(args.pixel_spacing))
    camera, sidecar = load_geometry(args.xray, xray, args.sid)
    landmarks = initialise.load_landmarks(args.landmarks) if args.landmarks else None
    init_pose, init_per_body = load_init_poses(args.init_pose) if args.init_pose else (None, {})
    ct, labels = load_case(args)
    bodies = pipeline.parse_bodies(args.bones, labels)

    init_source = "default AP view"
    pnp_rms = None
    if landmarks is not None:
        init_pose, pnp_rms = initialise.solve_pnp(landmarks[0], landmarks[1], camera, None)
        init_source = "landmarks (PnP)"
    elif init_pose is not None:
        init_source = "--init-pose"
    if init_pose is None:
        init_pose = default_view(ct, labels, camera)
    settings = pipeline.RegistrationSettings(seed=args.seed)
    if args.similarity:
        settings.similarity = args.similarity
    if args.fine_px:
        settings.fine_px = args.fine_px
    if args.max_evals is not None:
        settings.cma_max_evals = max(0, args.max_evals)
        settings.cma = args.max_evals > 0
    if args.refine_steps is not None:
        settings.refine_steps = max(0, args.refine_steps)
    if args.soft_tissue is not None:
        settings.soft_tissue = args.soft_tissue == "on"
    if args.no_inplane_search or landmarks is not None or args.init_pose:
        settings.inplane_search = False
    truth = None
    if sidecar and sidecar.get("ct_to_camera") is not None:
        true = np.asarray(sidecar["ct_to_camera"], dtype=float)
        per = sidecar.get("body_poses") or {}
        truth = {b.name: np.asarray(per.get(b.name, true), dtype=float) for b in bodies}

    prog = Progress(args.progress, None, "register")
    def notify(event, **info):  # noqa: E306
        if event in ("inplane", "body-done"):
            prog.event("log", message=event, **info)
        else:
            prog.update(info.pop("step", 1), body=info.get("body"), similarity=info.get("similarity"))
    try:
        results = pipeline.register(ct, labels, xray.pixels, camera, bodies, init_pose, settings, device,
                                    notify, truth, init_per_body or None)
    finally:
        prog.close()

    # registered bone channels (mass g per pixel) and the QA picture, at full resolution; a
    # structure in several bodies (a vertebra in 'bones' and on its own) is drawn and written once,
    # for the last body holding it
    owner = {st: r.name for r in results for st in r.structures}
    drrs, written = {}, {}
    with torch.no_grad():
        for body, res in zip(bodies, results):
            own = [st for st in body.structures if owner[st.name] == body.name]
            if not own:
                continue
            r = DRRRenderer(ct, camera, labels=labels, structures=own, device=device)
            pose = torch.as_tensor(res.ct_to_camera)
            drrs[body.name] = r.attenuation(pose, own)[0].float().cpu().numpy()
            ch = r.channels(pose, "mass")[0].float().cpu().numpy()
            for k, st in enumerate(r.structures):
                path = out / "channels" / f"{body.name}__{st.name}_mass_g.nrrd"
                _write_channel(path, ch[k], camera, args.force, atomic_path)
                written[f"{body.name}/{st.name}"] = str(path.relative_to(out))
    if args.force:  # channels of an earlier run (other bodies) would not match this report
        remove_stale(out / "channels", [out / v for v in written.values()])
    worst = any(r.doubtful for r in results)
    qa_figure(out / "qa.png", xray.pixels, drrs, None,
              title=f"{Path(args.xray).name}: " + ", ".join(
                  f"{r.name} sim {r.final_similarity:.3f}{' DOUBTFUL' if r.doubtful else ''}" for r in results),
              force=args.force)
    report = {
        "format": "mskdex-registration/1",
        "xray": str(args.xray), "ct": str(args.ct), "labels": str(args.labels),
        "geometry": camera.to_dict(), "geometry_source": "sidecar" if sidecar else "DICOM spacing + --sid",
        "initialisation": {"source": init_source, "ct_to_camera": np.asarray(init_pose).tolist(),
                           "landmark_rms_px": pnp_rms},
        "similarity": {"measure": settings.similarity, "patch_px": settings.patch_px,
                       "higher_is_better": True, "soft_tissue": settings.soft_tissue,
                       "doubtful_below": settings.doubtful_threshold("first"),
                       "doubtful_below_joint": settings.doubtful_threshold("joint"),
                       "doubtful_below_part": settings.doubtful_threshold("part"),
                       "doubtful_threshold_note": "the thresholds of this run's DRRs (soft_tissue on or off); "
                                                  "doubtful_below: first / free bodies (whole detector); "
                                                  "doubtful_below_joint / _part: joint / part bodies "
                                                  "(their window); also doubtful: a joint / part at its "
                                                  "motion bound or with a doubtful parent; "
                                                  "calibrated on simulated radiographs of the pelvis and chest "
                                                  "CTs (benchmarks/RESULTS_registration.md)"},
        "bodies": [r.to_dict() for r in results],
        # a structure in several bodies (a vertebra in 'bones', 'spine' and its own) is placed by
        # the last body registered that holds it: the most specific one
        "structure_body": owner,
        "doubtful": bool(worst),
        "channels": written, "channel_units": "g per pixel (mass channels at the registered pose)",
        "settings": settings.to_dict(),
        "runtime_s": round(time.time() - t0, 2),
        "device": str(device),
    }
    if truth is not None:
        report["truth"] = "ct_to_camera from the simulated radiograph's sidecar; mtre_mm = mean distance " \
                          "between the body's voxel centres mapped by the true and estimated poses (mm)"
    write_json(out / "registration.json", report, args.force)
    prog.event("done", output=str(out))
    if args.progress != "json":
        for r in results:
            extra = f", mTRE {r.mtre_mm:.2f} mm" if r.mtre_mm is not None else ""
            print(f"{r.name}: similarity {r.initial_similarity:.3f} -> {r.final_similarity:.3f}"
                  f"{' (DOUBTFUL)' if r.doubtful else ''}{extra}, {r.runtime_s:.1f} s")
        print(f"wrote {out / 'registration.json'}")
    return 0


def _write_channel(path: Path, image, camera, force: bool, atomic_path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(image)
    img.SetSpacing((camera.spacing_col_mm, camera.spacing_row_mm))
    with atomic_path(path, force) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
