"""The result of ``mskdex register`` as MRML nodes: one pose transform node per rigid body, a
table of the bodies and the registered bones over the radiograph. Each transform node remembers
what it was made from (node references to the CT and the radiograph, the camera as an attribute),
so that a later step on the same CT and radiograph (the follow-up reading) can find and reuse it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vtk

from ..errors import UserError
from ..io.documents import read_json
from .channels import _read_channel_file, _volume_on
from .common import ATTR, numpy_matrix
from .radiographs import radiograph_from_node
from .tables import table_node_from_rows
from .transforms import pose_to_transform_node


@dataclass
class RegistrationNodes:
    """MRML view of a ``mskdex register`` result: one pose transform node per rigid body."""

    transforms: dict = field(default_factory=dict)  # body name -> linear transform node
    bodies: list = field(default_factory=list)       # rows: name, final/initial similarity, doubtful ...
    doubtful: bool = False                           # any body doubtful
    drr: object = None                               # registered bone mass channels over the radiograph
    table: object = None                             # table node of ``bodies``
    geometry: dict = field(default_factory=dict)     # the camera (Camera.to_dict())

    def summary(self) -> str:
        """One line: 'pelvis 0.612, femur_left 0.154 (doubtful)'."""
        return ", ".join(f"{b['name']} {b['final_similarity']:.3f}" + (" (doubtful)" if b["doubtful"] else "")
                         for b in self.bodies)


#: node reference roles of a registered body's transform node: the CT and radiograph it was made on
CT_ROLE, RADIOGRAPH_ROLE = "MSKdeXRegisteredCT", "MSKdeXRegisteredRadiograph"
#: attribute with the names of those inputs (JSON {"CT": name, "radiograph": name}): MRML drops a
#: reference when its node is deleted, the names stay, so a registration whose input is gone is still
#: told apart from a pose made by hand
MADE_ON = ATTR + "registeredOn"


def registration_to_nodes(path, scene, radiograph_node=None, prefix: str = "MSKdeX registered",
                          nodes: RegistrationNodes | None = None, ct_node=None) -> RegistrationNodes:
    """Read registration.json (a file or its output folder) into one transform node per body
    (matrix = the body's ``ct_to_camera`` as CT RAS -> camera mm, see :func:`pose_to_transform_node`;
    attributes MSKdeX.body / .bodyIndex (0: the first body) / .similarity / .doubtful / .doubtfulReasons (why,
    "; "-separated; empty when not doubtful) / .geometry (the
    camera, JSON) / .registration (the file) / .registeredOn (the inputs' names); node references to
    ``ct_node`` and ``radiograph_node``, the inputs it was run on), a table of the bodies and, when
    ``radiograph_node`` is given, the registered bone mass channels summed into one volume on the
    radiograph's pixel grid (the camera's detector) for visual QA."""
    p = Path(path)
    if p.is_dir():
        p = p / "registration.json"
    doc = read_json(p, "registration.json")
    if not doc.get("bodies"):
        raise UserError("registration.json has no 'bodies'", p)
    res = nodes or RegistrationNodes()
    res.bodies, res.geometry = [], dict(doc.get("geometry") or {})
    for b in doc["bodies"]:
        pose = np.asarray(b["ct_to_camera"], dtype=np.float64)
        node = pose_to_transform_node(pose, scene, f"{prefix} {b['name']}", res.transforms.get(b["name"]))
        node.SetAttribute(ATTR + "body", str(b["name"]))
        node.SetAttribute(ATTR + "similarity", repr(float(b["final_similarity"])))
        node.SetAttribute(ATTR + "doubtful", "1" if b.get("doubtful") else "0")
        why = "; ".join(b.get("doubtful_reasons") or [])
        node.SetAttribute(ATTR + "doubtfulReasons", why)
        node.SetAttribute(ATTR + "bodyIndex", str(len(res.bodies)))
        node.SetAttribute(ATTR + "geometry", json.dumps(res.geometry) if res.geometry else "")
        node.SetAttribute(ATTR + "registration", str(p))
        for role, made_on in ((CT_ROLE, ct_node), (RADIOGRAPH_ROLE, radiograph_node)):
            node.SetNodeReferenceID(role, made_on.GetID() if made_on is not None else None)
        node.SetAttribute(MADE_ON, json.dumps({what: made_on.GetName() for what, made_on in
                                               (("CT", ct_node), ("radiograph", radiograph_node))
                                               if made_on is not None}))
        res.transforms[b["name"]] = node
        row = {"name": b["name"], "final_similarity": float(b["final_similarity"]),
               "initial_similarity": float(b.get("initial_similarity", float("nan"))),
               "doubtful": bool(b.get("doubtful", False)), "why_doubtful": why,
               "structures": " ".join(b.get("structures", []))}
        if b.get("mtre_mm") is not None:
            row["mtre_mm"] = float(b["mtre_mm"])
        res.bodies.append(row)
    res.doubtful = bool(doc.get("doubtful", any(r["doubtful"] for r in res.bodies)))
    table_rows = [{**r, "doubtful": "yes" if r["doubtful"] else "no"} for r in res.bodies]
    res.table = table_node_from_rows(table_rows, scene, f"{prefix} bodies", node=res.table)
    files = [p.parent / f for f in (doc.get("channels") or {}).values()]
    if radiograph_node is not None and files:
        shape = radiograph_from_node(radiograph_node).shape
        total = np.zeros(shape, np.float32)
        for f in files:
            if not f.is_file():
                raise UserError("registered channel image not found", f)
            arr, _ = _read_channel_file(f)
            if arr.shape != shape:
                raise UserError(f"registered channel is {arr.shape} but the radiograph is {shape}", f)
            total += arr
        m = vtk.vtkMatrix4x4()
        radiograph_node.GetIJKToRASMatrix(m)
        res.drr = _volume_on(scene, f"{prefix} bones", total, numpy_matrix(m), radiograph_node, res.drr)
        res.drr.SetAttribute(ATTR + "quantity", "mass_g")
    return res


def registration_for(scene, ct_node, radiograph_node):
    """The first body's transform node of the latest registration made on ``ct_node`` and
    ``radiograph_node`` (node references of :func:`registration_to_nodes`), or None."""
    if ct_node is None or radiograph_node is None:
        return None
    found = None
    for node in scene.GetNodesByClass("vtkMRMLLinearTransformNode"):  # in the order they were added
        if (node.GetAttribute(ATTR + "bodyIndex") == "0" and node.GetNodeReferenceID(CT_ROLE) == ct_node.GetID()
                and node.GetNodeReferenceID(RADIOGRAPH_ROLE) == radiograph_node.GetID()):
            found = node
    return found


def registration_mismatch(transform_node, ct_node, radiograph_node) -> str | None:
    """Why ``transform_node`` cannot place ``ct_node`` on ``radiograph_node``: one line when it is a
    registration made on another CT or radiograph, or on one since deleted from the scene; None when
    it matches, or when it records no inputs (a pose made by hand: the user vouches for it)."""
    try:
        names = json.loads(transform_node.GetAttribute(MADE_ON) or "{}")
    except ValueError:
        names = {}
    for role, node, what in ((CT_ROLE, ct_node, "CT"), (RADIOGRAPH_ROLE, radiograph_node, "radiograph")):
        made_on = transform_node.GetNodeReference(role)
        made_on_id = transform_node.GetNodeReferenceID(role)
        if not made_on_id and names.get(what):
            return (f"'{transform_node.GetName()}' was registered on the {what} '{names[what]}', which is no "
                    f"longer in the scene: register this {what} again (or choose none: it is registered first)")
        if made_on_id and (node is None or made_on_id != node.GetID()):
            other = made_on.GetName() if made_on is not None else "a node no longer in the scene"
            mine = node.GetName() if node is not None else "none"
            return (f"'{transform_node.GetName()}' was registered on the {what} '{other}', not on '{mine}': "
                    f"choose a registration of this {what} (or none: it is registered first)")
    return None
