"""Landmarks: point lists (markups) <-> LPS points and radiograph pixels; the landmarks CSV of
``mskdex register --landmarks``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer
import vtk

from ..errors import UserError
from ..io.outputs import write_text
from .common import LPS_RAS, _add, _world_matrix, numpy_matrix


def landmarks_to_markups(names: Sequence[str], points_lps: np.ndarray, scene,
                         name: str = "MSKdeX landmarks", node=None):
    """A point list (markups fiducial node) of 3D landmarks given in LPS mm."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if len(names) != len(pts):
        raise UserError(f"{len(names)} landmark names for {len(pts)} points")
    if node is None:
        node = _add(scene, slicer.vtkMRMLMarkupsFiducialNode(), name)
        node.CreateDefaultDisplayNodes()
    node.RemoveAllControlPoints()
    for label, p in zip(names, pts):
        ras = LPS_RAS[:3, :3] @ p
        node.AddControlPoint(vtk.vtkVector3d(*ras), str(label))
    return node


def landmarks_from_markups(node) -> tuple[list[str], np.ndarray]:
    """(names, (N, 3) LPS mm world positions) of a point list."""
    names, pts = [], []
    for n in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, p)
        names.append(node.GetNthControlPointLabel(n))
        pts.append(LPS_RAS[:3, :3] @ np.asarray(p))
    return names, np.asarray(pts, dtype=np.float64).reshape(-1, 3)


def radiograph_points_from_markups(node, radiograph_node) -> tuple[list[str], np.ndarray]:
    """(names, (N, 2) (row, col) pixel positions) of points placed on a radiograph node."""
    names, lps = landmarks_from_markups(node)
    m = vtk.vtkMatrix4x4()
    radiograph_node.GetRASToIJKMatrix(m)
    ras_to_ijk = numpy_matrix(m) @ np.linalg.inv(_world_matrix(radiograph_node))
    ras = lps @ LPS_RAS[:3, :3].T
    ijk = ras @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
    return names, ijk[:, [1, 0]]


def landmark_pairs(ct_points_node, xray_points_node, radiograph_node
                   ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, CT points (N, 3) LPS mm, radiograph pixels (N, 2) (row, col)) of paired landmarks:
    points placed on the CT in ``ct_points_node`` and on the radiograph in ``xray_points_node``,
    paired by label when every CT label appears once on the radiograph, else by order."""
    names3, lps = landmarks_from_markups(ct_points_node)
    names2, rc = radiograph_points_from_markups(xray_points_node, radiograph_node)
    if len(set(names3)) == len(names3) and set(names3) <= set(names2) and len(set(names2)) == len(names2):
        idx = [names2.index(n) for n in names3]
        return names3, lps, rc[idx]
    if len(names3) != len(names2):
        raise UserError(f"landmarks: {len(names3)} points on the CT ('{ct_points_node.GetName()}') but "
                        f"{len(names2)} on the radiograph ('{xray_points_node.GetName()}'), and their "
                        "labels do not pair them")
    return names3, lps, rc


def write_landmarks_csv(path, points_lps: np.ndarray, pixels_rc: np.ndarray, names: Sequence[str] | None = None,
                        force: bool = True):
    """The landmarks file of ``mskdex register --landmarks``: CSV ``x,y,z,row,col`` (CT LPS mm,
    radiograph pixel), one pair per line, names as comments."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    rc = np.asarray(pixels_rc, dtype=np.float64).reshape(-1, 2)
    if len(pts) != len(rc):
        raise UserError(f"{len(pts)} CT landmarks for {len(rc)} radiograph points")
    lines = ["x,y,z,row,col"]
    for n, (p, q) in enumerate(zip(pts, rc)):
        if names is not None:
            lines.append(f"# {names[n]}")
        lines.append(",".join(repr(float(v)) for v in (*p, *q)))
    return write_text(path, "\n".join(lines) + "\n", force)

