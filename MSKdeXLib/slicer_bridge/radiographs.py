"""Radiographs: core Radiograph <-> single-slice scalar volume nodes; the file the ``mskdex``
subprocesses read."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from ..errors import UserError
from ..io.images import Radiograph
from ..io.radiographs import write_radiograph_image
from .common import ATTR, _add, _display, _image_data, _node_array, numpy_matrix, vtk_matrix


#: radiograph volume axes (columns = RAS directions of i, j, k), see the module docstring
RADIOGRAPH_DIRECTIONS_RAS = np.array([[-1.0, 0.0, 0.0],
                                      [0.0, 0.0, -1.0],
                                      [0.0, -1.0, 0.0]]).T


def radiograph_ijk_to_ras(pixel_spacing: tuple[float, float] | None) -> np.ndarray:
    row_mm, col_mm = pixel_spacing or (1.0, 1.0)
    m = np.eye(4)
    m[:3, :3] = RADIOGRAPH_DIRECTIONS_RAS @ np.diag([col_mm, row_mm, 1.0])
    return m


def radiograph_to_node(radiograph: Radiograph, scene, name: str = "Radiograph", node=None):
    """A single-slice scalar volume of a radiograph (displayed orientation kept)."""
    if node is None:
        node = _add(scene, slicer.vtkMRMLScalarVolumeNode(), name)
    node.SetIJKToRASMatrix(vtk_matrix(radiograph_ijk_to_ras(radiograph.pixel_spacing)))
    node.SetAndObserveImageData(_image_data(np.asarray(radiograph.pixels, np.float32)[None]))
    node.SetAttribute(ATTR + "radiograph", "1")
    node.SetAttribute(ATTR + "calibrated", "1" if radiograph.calibrated else "0")
    node.SetAttribute(ATTR + "spacing_source", radiograph.spacing_source)
    _display(node)
    return node


def radiograph_from_node(node) -> Radiograph:
    """The Radiograph of a single-slice scalar volume node (any 2D image loaded in Slicer)."""
    if node is None:
        raise UserError("no radiograph selected")
    arr = _node_array(node)
    if arr.ndim == 4:  # RGB(A) image: luminance
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.shape[0] != 1:
        raise UserError(f"'{node.GetName()}' is not a 2D image ({arr.shape[0]} slices)")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    lin = numpy_matrix(m)[:3, :3]
    col_mm, row_mm = np.linalg.norm(lin[:, 0]), np.linalg.norm(lin[:, 1])
    calibrated = node.GetAttribute(ATTR + "calibrated") != "0"
    return Radiograph(arr[0].astype(np.float32), (float(row_mm), float(col_mm)) if calibrated else None,
                      node.GetAttribute(ATTR + "spacing_source") or "slicer", f"mrml:{node.GetName()}")


def write_radiograph_file(node, path, force: bool = True) -> Radiograph:
    """Write a radiograph node as a float32 TIFF that ``mskdex register/predict`` read back with
    the same pixels, rows and columns (spacing as a per-centimetre resolution; pass it on the
    command line as well, that is exact). Returns the written Radiograph."""
    rg = radiograph_from_node(node)
    write_radiograph_image(path, rg, force=force)
    return rg

