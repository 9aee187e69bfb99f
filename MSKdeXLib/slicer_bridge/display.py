"""Slice-view display: layers of a composite node, the registration QA checkerboard, and
headless slice rendering (screenshots, tests)."""

from __future__ import annotations

import numpy as np
import slicer
from vtk.util import numpy_support

from ..errors import UserError
from ..visualize import checkerboard as tiles_of
from ..visualize import window


def set_overlay(composite_node, background=None, foreground=None, label=None,
                foreground_opacity: float | None = None, label_opacity: float | None = None) -> None:
    """Set the layers of a slice composite node (None leaves a layer unchanged)."""
    if background is not None:
        composite_node.SetBackgroundVolumeID(background.GetID())
    if foreground is not None:
        composite_node.SetForegroundVolumeID(foreground.GetID())
    if label is not None:
        composite_node.SetLabelVolumeID(label.GetID())
    if foreground_opacity is not None:
        composite_node.SetForegroundOpacity(float(foreground_opacity))
    if label_opacity is not None:
        composite_node.SetLabelOpacity(float(label_opacity))


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Checkerboard of two same-shape 2D images (registration QA), each windowed to [0, 1]."""

    if a.shape != b.shape:
        raise UserError(f"checkerboard needs images of one shape, got {a.shape} and {b.shape}")
    return tiles_of(window(a, 1, 99), window(b, 1, 99), tiles)


def slice_logic(scene, name: str = "Red", orientation: str = "Coronal", size=(512, 512)):
    """A slice logic with its slice node (application logic attached), usable without a GUI."""
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(scene)
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddSliceNode(name)
    node.SetOrientation(orientation)
    node.SetDimensions(int(size[0]), int(size[1]), 1)
    logic._mskdex_app = app  # keep the application logic alive with the slice logic
    return logic


def slice_rgba(logic, fit: bool = True) -> np.ndarray:
    """The slice view's blended layers (Slicer's own reslice + blend pipeline) as (H, W, 4) uint8,
    row 0 at the top of the view."""
    if fit:
        logic.FitSliceToAll()
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    img = producer.GetOutputDataObject(0)
    w, h, _ = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
    return np.ascontiguousarray(arr[::-1])  # VTK's row 0 is the bottom

