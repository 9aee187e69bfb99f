"""Small VTK / MRML helpers shared by the bridge modules (matrices, image data, adding and
displaying nodes, parent transforms)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import UserError


#: homogeneous LPS <-> RAS (its own inverse)
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


ATTR = "MSKdeX."  # prefix of node attributes written here


def vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData of a [k, j, i] array (i fastest, as VTK stores it)."""
    k, j, i = array.shape
    img = vtk.vtkImageData()
    img.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    img.GetPointData().SetScalars(scalars)
    return img


def _node_array(node) -> np.ndarray:
    """The voxel array [k, j, i] of a volume node (a copy)."""
    img = node.GetImageData()
    if img is None or img.GetPointData().GetScalars() is None:
        raise UserError(f"volume node '{node.GetName()}' has no image data")
    i, j, k = img.GetDimensions()
    comps = img.GetNumberOfScalarComponents()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).copy()
    return arr.reshape((k, j, i) if comps == 1 else (k, j, i, comps))


def _add(scene, node, name: str):
    node.SetName(scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) else name)
    scene.AddNode(node)
    return node


def ensure_default_colors(scene) -> None:
    """Make sure Slicer's default colour tables (Grey ...) are in ``scene`` (a bare scene
    outside the application has none; inside Slicer this does nothing)."""
    if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
        logic = slicer.vtkMRMLColorLogic()
        logic.SetMRMLScene(scene)
        logic.SetMRMLScene(None)


def _display(node) -> None:
    """Create the node's default display node, with a grey colour table for scalar volumes."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and display.GetColorNode() is None and not node.IsA("vtkMRMLLabelMapVolumeNode"):
        ensure_default_colors(node.GetScene())
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")


def _world_matrix(node) -> np.ndarray:
    """4x4 node-to-world (RAS) matrix of the node's parent transforms (identity when none)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise UserError(f"node '{node.GetName()}' is under a non-linear transform; harden it first")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return numpy_matrix(m)

