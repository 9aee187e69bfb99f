"""The result of ``mskdex register`` as MRML nodes: one pose transform node per rigid body, a
table of the bodies and the registered bones over the radiograph."""

from __future__ import annotations

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


def registration_to_nodes(path, scene, radiograph_node=None, prefix: str = "MSKdeX registered",
                          nodes: RegistrationNodes | None = None) -> RegistrationNodes:
    """Read registration.json (a file or its output folder) into one transform node per body
    (matrix = the body's ``ct_to_camera`` as CT RAS -> camera mm, see :func:`pose_to_transform_node`;
    attributes MSKdeX.similarity / MSKdeX.doubtful), a table of the bodies and, when
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
        res.transforms[b["name"]] = node
        row = {"name": b["name"], "final_similarity": float(b["final_similarity"]),
               "initial_similarity": float(b.get("initial_similarity", float("nan"))),
               "doubtful": bool(b.get("doubtful", False)), "structures": " ".join(b.get("structures", []))}
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

