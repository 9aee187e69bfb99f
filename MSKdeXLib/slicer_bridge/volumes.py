"""CT volumes: core Volume (LPS) <-> scalar / label map volume nodes (RAS)."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from ..errors import UserError
from ..io.images import Volume
from .common import LPS_RAS, _add, _display, _image_data, _node_array, _world_matrix, numpy_matrix, vtk_matrix


def ijk_to_ras_matrix(volume: Volume) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a core (LPS) volume."""
    return LPS_RAS @ volume.index_to_lps()


def volume_to_node(volume: Volume, scene, name: str = "CT", node=None, labelmap: bool = False,
                   array: np.ndarray | None = None):
    """A scalar (or label map) volume node holding ``volume`` (or ``array`` on its grid)."""
    if node is None:
        node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
        _add(scene, node, name)
    data = volume.array if array is None else array
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_matrix(volume)))
    node.SetAndObserveImageData(_image_data(data))
    _display(node)
    return node


def volume_from_node(node) -> Volume:
    """The core Volume (LPS, mm) of a scalar volume node, parent linear transforms applied."""
    if node is None:
        raise UserError("no volume selected")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_lps = LPS_RAS @ _world_matrix(node) @ numpy_matrix(m)
    lin = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    arr = _node_array(node)
    if arr.ndim != 3:
        raise UserError(f"volume node '{node.GetName()}' must have one component per voxel")
    return Volume(arr, tuple(spacing), tuple(ijk_to_lps[:3, 3]), direction,
                  source=f"mrml:{node.GetName()}")

