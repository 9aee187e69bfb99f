"""Poses (``ct_to_camera``, CT LPS mm -> camera mm) <-> linear transform nodes (CT RAS mm ->
camera mm)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from ..errors import UserError
from ..projection.geometry import check_rigid, pose_from_slicer_ras, pose_to_slicer_ras
from .common import ATTR, _add, numpy_matrix, vtk_matrix


def pose_to_transform_node(pose: np.ndarray, scene, name: str = "MSKdeX pose", node=None):
    """A linear transform node whose matrix maps CT RAS mm to camera mm for ``pose`` (LPS)."""
    pose = check_rigid(pose)
    if node is None:
        node = _add(scene, slicer.vtkMRMLLinearTransformNode(), name)
    node.SetMatrixTransformToParent(vtk_matrix(pose_to_slicer_ras(pose)))
    node.SetAttribute(ATTR + "kind", "pose ct_ras_to_camera_mm")
    return node


def pose_from_transform_node(node) -> np.ndarray:
    """The pose (``ct_to_camera``, CT LPS mm -> camera mm) held by a transform node."""
    if node is None:
        raise UserError("no pose transform selected")
    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    return check_rigid(pose_from_slicer_ras(numpy_matrix(m)), f"transform '{node.GetName()}'")

