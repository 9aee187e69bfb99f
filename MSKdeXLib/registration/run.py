"""``mskdex register`` as one library call: :func:`register_radiograph` reads the radiograph and
its geometry, finds the start pose, registers the bodies (:func:`~.pipeline.register`), decides
which body places each structure, renders the registered bone mass channels and the QA picture,
and writes ``registration.json`` (docs/CONTRACTS.md). Frames: CT LPS mm; poses ``ct_to_camera``.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import UserError
from ..io.documents import read_json
from ..io.images import LabelMap, Volume
from ..io.outputs import atomic_path, prepare_out_dir, remove_stale, write_json
from ..io.radiographs import UncalibratedWarning, load_radiograph
from ..io.volumes import load_ct, load_labels
from ..projection.geometry import Camera, check_rigid
from ..projection.rendering import DRRRenderer, default_view
from ..projection.simulate import sidecar_path
from . import initialise
from .bodies import Body, parse_bodies
from .pipeline import BodyResult, register
from .qa import qa_figure
from ..settings import SID_MM
from .settings import RegistrationSettings

OUTPUTS = ("registration.json", "qa.png", "channels")


@dataclass
class RegistrationRequest:
    """What ``mskdex register`` was asked: inputs (paths as given), bodies, start, settings."""

    xray: str
    ct_path: str
    labels_path: str
    out: Path
    bones: str | None = None
    init_pose: str | None = None      # JSON file or inline JSON (4x4, {'ct_to_camera'}, registration.json)
    landmarks: str | None = None      # CSV x,y,z,row,col
    sid_mm: float = SID_MM            # when the radiograph has no sidecar
    spacing_mm: tuple[float, float] | None = None  # (row, col) mm, overrides the radiograph's
    table: str | None = None          # structure table of the label map (None: auto-detect)
    resample_labels: bool = False     # a label map on another grid is resampled onto the CT's
    settings: RegistrationSettings = field(default_factory=RegistrationSettings)
    force: bool = False


@dataclass
class RegistrationOutcome:
    results: list[BodyResult]
    report: dict
    path: Path


def _read_json_arg(text: str, what: str):
    t = text.strip()
    if t.startswith(("[", "{")):
        try:
            return json.loads(t), None
        except json.JSONDecodeError as exc:
            raise UserError(f"{what}: invalid inline JSON ({exc.msg})") from None
    p = Path(text)
    return read_json(p, what, require_object=False), p


def load_init_poses(text: str) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """(first-body pose or None, {body: pose}) from --init-pose."""
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


def load_geometry(xray_path: str, radiograph, sid_mm: float) -> tuple[Camera, dict | None]:
    """(Camera, sidecar dict or None) for the radiograph."""
    side = sidecar_path(xray_path)
    doc = read_json(side, "radiograph sidecar") if side.exists() else None
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


def start_pose(req: RegistrationRequest, ct: Volume, labels: LabelMap, camera: Camera
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(first body's start pose, per-body start poses, the report's ``initialisation``): landmarks
    (PnP), else --init-pose, else the default AP view."""
    pose, per_body = load_init_poses(req.init_pose) if req.init_pose else (None, {})
    source, rms = "default AP view", None
    if req.landmarks:
        pts, pix = initialise.load_landmarks(req.landmarks)
        pose, rms = initialise.solve_pnp(pts, pix, camera, None)
        source = "landmarks (PnP)"
    elif pose is not None:
        source = "--init-pose"
    if pose is None:
        pose = default_view(ct, labels, camera)
    return pose, per_body, {"source": source, "ct_to_camera": np.asarray(pose).tolist(), "landmark_rms_px": rms}


def true_poses_of(sidecar: dict | None, bodies: list[Body]) -> dict[str, np.ndarray] | None:
    """Per-body true poses from a simulated radiograph's sidecar (``body_poses``, else its
    ``ct_to_camera`` for every body), or None."""
    if not sidecar or sidecar.get("ct_to_camera") is None:
        return None
    true = np.asarray(sidecar["ct_to_camera"], dtype=float)
    per = sidecar.get("body_poses") or {}
    return {b.name: np.asarray(per.get(b.name, true), dtype=float) for b in bodies}


def structure_owner(results: list[BodyResult]) -> dict[str, str]:
    """Structure -> the body that places it: the last registered body holding it (the most
    specific one: a vertebra in 'bones', 'spine' and its own body is placed by its own)."""
    return {st: r.name for r in results for st in r.structures}


def write_channels(out: Path, ct: Volume, labels: LabelMap, camera: Camera, bodies: list[Body],
                   results: list[BodyResult], device, force: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Registered bone mass channels (g per pixel, NRRD, full detector resolution), one per
    structure from its placing body; returns ({body: attenuation DRR for the QA picture},
    {'body/structure': path relative to ``out``})."""
    owner = structure_owner(results)
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
                write_channel(path, ch[k], camera, force)
                written[f"{body.name}/{st.name}"] = str(path.relative_to(out))
    if force:  # channels of an earlier run (other bodies) would not match this report
        remove_stale(out / "channels", [out / v for v in written.values()])
    return drrs, written


def write_channel(path: Path, image: np.ndarray, camera: Camera, force: bool) -> None:
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((camera.spacing_col_mm, camera.spacing_row_mm))
    with atomic_path(path, force) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def similarity_report(settings: RegistrationSettings) -> dict:
    """The report's ``similarity``: measure, soft tissue, and the doubtful thresholds in effect."""
    return {"measure": settings.similarity, "patch_px": settings.patch_px,
            "higher_is_better": True, "soft_tissue": settings.soft_tissue,
            "doubtful_below": settings.doubtful_threshold("first"),
            "doubtful_below_joint": settings.doubtful_threshold("joint"),
            "doubtful_below_part": settings.doubtful_threshold("part"),
            "doubtful_gain_below": settings.first.doubtful_gain if settings.soft_tissue else None,
            "doubtful_threshold_note": "the thresholds of this run's DRRs (soft_tissue on or off); "
                                       "doubtful_below: first / free bodies (whole detector); "
                                       "doubtful_gain_below: a first body whose own DRR adds less "
                                       "than this to the similarity of the soft tissue moving with "
                                       "it (history stage own-gain); "
                                       "doubtful_below_joint / _part: joint / part bodies "
                                       "(their window); also doubtful: a joint / part at its "
                                       "motion bound or with a doubtful parent; "
                                       "calibrated on simulated radiographs of the pelvis and chest "
                                       "CTs (benchmarks/RESULTS_registration.md)"}


def register_radiograph(req: RegistrationRequest, device="cpu",
                        notify: Callable[..., None] | None = None) -> RegistrationOutcome:
    """Run ``mskdex register``: register ``req``'s bodies of its CT / label map to its
    radiograph and write ``registration.json``, ``qa.png`` and ``channels/`` into ``req.out``.
    Bad input raises :class:`~MSKdeXLib.errors.UserError` (one line, naming the file)."""
    t0 = time.time()
    prepare_out_dir(req.out, req.force, expected=OUTPUTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncalibratedWarning)
        xray = load_radiograph(req.xray, req.spacing_mm)
    camera, sidecar = load_geometry(req.xray, xray, req.sid_mm)
    if req.landmarks:  # read before the CT: a bad file fails fast
        initialise.load_landmarks(req.landmarks)
    if req.init_pose:
        load_init_poses(req.init_pose)
    ct = load_ct(req.ct_path)
    labels = load_labels(req.labels_path, ct, req.table, req.resample_labels)
    bodies = parse_bodies(req.bones, labels)
    pose, per_body, init = start_pose(req, ct, labels, camera)
    s = req.settings
    if req.landmarks or req.init_pose:
        s.first.inplane_search = False
    truth = true_poses_of(sidecar, bodies)
    results = register(ct, labels, xray.pixels, camera, bodies, pose, s, device, notify, truth, per_body or None)
    drrs, written = write_channels(req.out, ct, labels, camera, bodies, results, device, req.force)
    qa_figure(req.out / "qa.png", xray.pixels, drrs, None,
              title=f"{Path(req.xray).name}: " + ", ".join(
                  f"{r.name} sim {r.final_similarity:.3f}{' DOUBTFUL' if r.doubtful else ''}" for r in results),
              force=req.force, results=results, patient_orientation=xray.metadata.get("patient_orientation"))
    report = {
        "format": "mskdex-registration/1",
        "xray": str(req.xray), "ct": str(req.ct_path), "labels": str(req.labels_path),
        "geometry": camera.to_dict(), "geometry_source": "sidecar" if sidecar else "DICOM spacing + --sid",
        "initialisation": init, "similarity": similarity_report(s),
        "bodies": [r.to_dict() for r in results],
        "structure_body": structure_owner(results),
        "doubtful": any(r.doubtful for r in results),
        "channels": written, "channel_units": "g per pixel (mass channels at the registered pose)",
        "settings": s.to_dict(), "runtime_s": round(time.time() - t0, 2), "device": str(device),
    }
    if truth is not None:
        report["truth"] = "ct_to_camera from the simulated radiograph's sidecar; mtre_mm = mean distance " \
                          "between the body's voxel centres mapped by the true and estimated poses (mm)"
    path = req.out / "registration.json"
    write_json(path, report, req.force)
    return RegistrationOutcome(results, report, path)
