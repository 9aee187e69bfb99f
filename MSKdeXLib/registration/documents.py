"""A registration.json (``mskdex register``, or one written from a Slicer transform node) as an
input of another command: its first body's pose, checked (a rigid 4x4 ``ct_to_camera``, CT LPS mm
-> camera mm) and, when the file records the camera it was made with (``geometry``), checked
against the camera of the radiograph it is now used on: a pose only places the CT for the
detector and source-to-image distance it was found with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io.documents import read_json
from ..projection.geometry import Camera, check_rigid

#: camera fields a registration's geometry must share with the radiograph's (mm: to 1e-3 mm)
GEOMETRY_FIELDS = ("rows", "cols", "spacing_row_mm", "spacing_col_mm", "sid_mm", "cx", "cy")


@dataclass
class KnownPose:
    """The first body of a registration.json: its pose (CT LPS mm -> camera mm) and flags."""

    path: Path
    ct_to_camera: np.ndarray
    body: str | None
    doubtful: bool
    geometry: dict | None       # Camera.to_dict() of the registration's radiograph, when recorded
    final_similarity: float | None = None   # the first body's similarity at the end, when recorded


def read_known_pose(path) -> KnownPose:
    """The first body's pose of a registration.json; a one-line UserError naming the file when it
    is missing, not JSON, has no bodies, or its ``ct_to_camera`` is not a rigid 4x4 matrix."""
    p = Path(path)
    doc = read_json(p, "registration")
    bodies = doc.get("bodies")
    if not isinstance(bodies, list) or not bodies or not isinstance(bodies[0], dict):
        raise UserError("not a registration.json of mskdex register (no bodies)", p)
    first = bodies[0]
    try:
        pose = np.asarray(first["ct_to_camera"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise UserError("the first body has no 4x4 ct_to_camera", p) from None
    try:
        check_rigid(pose, "the first body's ct_to_camera")
    except UserError as exc:
        raise UserError(str(exc), p) from None
    geometry = doc.get("geometry")
    if geometry is not None and not isinstance(geometry, dict):
        raise UserError("'geometry' is not an object", p)
    return KnownPose(p, pose, first.get("name"), bool(doc.get("doubtful", first.get("doubtful", False))), geometry,
                     first.get("final_similarity"))


def check_geometry(known: KnownPose, camera: Camera) -> None:
    """UserError (naming the file) when the registration recorded a camera other than ``camera``
    (detector size, pixel spacing, principal point, source-to-image distance); nothing when it
    recorded none (a pose written by hand: the caller vouches for it)."""
    if not known.geometry:
        return
    mine = camera.to_dict()
    for k in GEOMETRY_FIELDS:
        if k not in known.geometry:
            continue
        try:
            theirs = float(known.geometry[k])
        except (TypeError, ValueError):
            raise UserError(f"geometry {k} is not a number", known.path) from None
        if not np.isclose(theirs, float(mine[k]), rtol=0.0, atol=1e-3):
            raise UserError(f"made for another camera ({k} {theirs:g}, the radiograph's {float(mine[k]):g}): "
                            "register on this radiograph with these settings", known.path)
