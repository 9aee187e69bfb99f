"""Rigid bodies of a registration: which label-map structures move together, and the anatomy
their kinds need (a body's centre, the ball-joint centre of a femur in its acetabulum, the
registered group a part belongs to, the other registered bones seen behind a body).

Frames: CT LPS mm; poses are 4x4 ``ct_to_camera``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..anatomy.structures import Structure
from ..errors import UserError
from ..io.images import LabelMap
from ..projection.rendering import union_mask

#: named groups of structures that move together
DEFAULT_GROUPS = {
    "pelvis": ("hip_left", "hip_right", "sacrum"),
}
DEFAULT_BODIES = "pelvis,femur_left,femur_right"
#: body name meaning every bone structure of the label map (e.g. a chest: spine, ribs, sternum ...)
ALL_BONES = "bones"

@dataclass
class Body:
    """A rigid body: a name and the label-map structures that move with it."""

    name: str
    structures: list[Structure]

    def mask(self, labels: LabelMap) -> np.ndarray:
        """Boolean [k, j, i] mask of the body's structures (one lookup pass per label layer: the
        chest's 'bones' has ~50 structures, one comparison each took 5 s on its CT)."""
        return union_mask(labels, self.structures)


def expand_range(item: str, labels: LabelMap) -> list[str]:
    """'a..b' -> the structures of the label map's table from a to b (inclusive, table order,
    either direction) that are present in the label map."""
    a, b = (v.strip() for v in item.split("..", 1))
    found = []
    for n in (a, b):
        st = labels.table.find(n)
        if st is None:
            raise UserError(f"range '{item}': unknown structure '{n}' (table '{labels.table.name}')",
                            labels.notes.get("source"))
        found.append(st.label)
    lo, hi = sorted(found)
    return [st.name for st in labels.structures if lo <= st.label <= hi]


def parse_bodies(text: str | None, labels: LabelMap) -> list[Body]:
    """Bodies from 'pelvis,femur_left,name=a+b+c,spine=vertebrae_T6..vertebrae_L1'
    (comma-separated; 'pelvis' is hip_left+hip_right+sacrum; 'bones' is every bone structure of
    the label map; 'a..b' is every structure of the label map from a to b in table order).
    Unknown or absent structures raise UserError."""
    text = text or DEFAULT_BODIES
    bodies = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        if "=" in item:
            name, members = (v.strip() for v in item.split("=", 1))
            names = []
            for m in (m.strip() for m in members.split("+")):
                if m:
                    names += expand_range(m, labels) if ".." in m else [m]
            if any(".." in m for m in members.split("+")) and not names:
                raise UserError(f"body '{name}': no structure of the range is in the label map",
                                labels.notes.get("source"))
        elif item in DEFAULT_GROUPS:
            name, names = item, list(DEFAULT_GROUPS[item])
        elif item == ALL_BONES:
            name, names = item, [st.name for st in labels.select(kinds=["bone"])]
            if not names:
                raise UserError("body 'bones': the label map has no bone structures", labels.notes.get("source"))
        else:
            name, names = item, [item]
        if not name or not names:
            raise UserError(f"bad body specification '{item}' (use NAME or NAME=a+b+c)")
        structs = []
        for n in names:
            if labels.table.find(n) is None:
                raise UserError(f"body '{name}': unknown structure '{n}' (table '{labels.table.name}')",
                                labels.notes.get("source"))
            structs.append(labels.resolve(n))  # raises when absent from the label map
        bodies.append(Body(name, structs))
    names = [b.name for b in bodies]
    if len(set(names)) != len(names):
        raise UserError(f"body names must be unique, got {names}")
    return bodies


def body_centre(labels: LabelMap, body: Body) -> np.ndarray:
    """Centre (LPS mm) of the body's voxels."""
    return labels.grid.voxel_centres_lps(body.mask(labels)).mean(0)


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere (centre mm, radius mm) through (N, 3) points (algebraic fit)."""
    p = np.asarray(points, dtype=np.float64)
    a = np.c_[2 * p, np.ones(len(p))]
    sol, *_ = np.linalg.lstsq(a, (p * p).sum(1), rcond=None)
    centre = sol[:3]
    return centre, float(np.sqrt(max(sol[3] + centre @ centre, 0.0)))


def joint_centre(labels: LabelMap, body: Body, parent: Body, contact_mm: float = 7.5,
                 radius_mm: tuple[float, float] = (10.0, 45.0)) -> np.ndarray | None:
    """Centre (LPS mm) of the ball joint between ``body`` and ``parent`` (e.g. the femoral head
    in the acetabulum): a sphere fitted to the body's voxels within ``contact_mm`` of the
    parent's voxels. None when they do not touch or the fit is not a plausible joint
    (radius outside ``radius_mm``, centre far from the contact surface)."""
    own, other = body.mask(labels), parent.mask(labels)
    if not own.any() or not other.any():
        return None
    spacing = np.asarray(labels.grid.spacing, dtype=np.float64)[::-1]  # array axes (k, j, i)
    # work in the body's bounding box grown by the contact distance (large CTs stay fast)
    idx = np.argwhere(own)
    pad = np.ceil(contact_mm / spacing).astype(int) + 1
    lo, hi = np.maximum(idx.min(0) - pad, 0), idx.max(0) + pad + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = ndimage.distance_transform_edt(~other[box], sampling=spacing)
    contact = np.zeros_like(own)
    contact[box] = own[box] & (dist <= contact_mm)
    if contact.sum() < 10:
        return None
    pts = labels.grid.voxel_centres_lps(contact)
    centre, radius = fit_sphere(pts)
    if not (radius_mm[0] <= radius <= radius_mm[1]):
        return None
    if np.linalg.norm(centre - pts.mean(0)) > radius_mm[1]:
        return None
    return centre


def inplane_radius_mm(labels: LabelMap, body: Body, pose: np.ndarray) -> float:
    """In-plane RMS radius (mm) of the body's voxel centres about their centre, in the camera
    frame of ``pose`` (ct_to_camera): depth (camera z) is left out."""
    p = labels.grid.voxel_centres_lps(body.mask(labels)) @ np.asarray(pose)[:3, :3].T
    d = p[:, :2] - p[:, :2].mean(0)
    return float(np.sqrt((d * d).sum(1).mean()))


def parent_group(body: Body, registered: list[tuple[Body, np.ndarray]]) -> tuple[Body, np.ndarray] | None:
    """The last registered body that holds all of ``body``'s structures and more (a vertebra
    inside a registered 'spine'), with its pose; else None."""
    own = {st.label for st in body.structures}
    for other, pose in reversed(registered):
        theirs = {st.label for st in other.structures}
        if own < theirs:
            return other, pose
    return None


def background_groups(body: Body, registered: list[tuple[Body, np.ndarray]]) -> list[tuple[list, np.ndarray]]:
    """[(structures, pose)]: every registered structure not in ``body``, at the pose of the
    last registered body that holds it."""
    own = {st.label for st in body.structures}
    latest: dict[int, tuple[Structure, int]] = {}
    for i, (other, _) in enumerate(registered):
        for st in other.structures:
            latest[st.label] = (st, i)
    groups: dict[int, list] = {}
    for label, (st, i) in latest.items():
        if label not in own:
            groups.setdefault(i, []).append(st)
    return [(sts, registered[i][1]) for i, sts in sorted(groups.items())]
