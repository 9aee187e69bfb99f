"""MRML <-> core conversions (the only place where Slicer's RAS frame meets the core's LPS).

Imports ``slicer`` MRML classes and ``vtk`` only: never ``qt``, ``ctk`` or ``slicer.app``, so it
runs inside the Slicer application and, for tests, with the PyPI package ``slicer-core``.

Frames and conventions
----------------------
* Core volumes are LPS (mm); Slicer volume nodes store ``IJKToRAS``. ``RAS = diag(-1,-1,1) LPS``:
  converted here, once (:func:`ijk_to_ras_matrix`, :func:`volume_from_node`).
* A pose (``ct_to_camera``, CT LPS mm -> camera mm) lives in a linear transform node whose
  matrix-to-parent is ``geometry.pose_to_slicer_ras(pose)``: it maps CT *RAS* points to camera mm.
* A radiograph is a single-slice scalar volume whose axes are the default AP camera axes:
  column i -> patient left (RAS -x), row j -> inferior (RAS -z), k -> posterior (RAS -y), so
  Slicer's Coronal view shows it radiologically (patient right on the left, head up).
  Spacing (col_mm, row_mm, 1); the pixel centre of (row 0, col 0) sits at the RAS origin.
* Channel layers: per-channel scalar volumes (g or cm^3 per pixel) on the radiograph's grid, and
  one label map (value k+1 = channel k where it dominates) with a colour table of structures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import UserError
from .projection.geometry import check_rigid, pose_from_slicer_ras, pose_to_slicer_ras
from .io.images import LabelMap, Radiograph, Volume
from .io.documents import read_json
from .anatomy.structures import (Structure, StructureTable, colour_of as _colour, detect_table,
                                 detect_table_from_names, get_table, kind_of as _kind_of, normalize_name,
                                 side_of as _side_of)

#: homogeneous LPS <-> RAS (its own inverse)
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: radiograph volume axes (columns = RAS directions of i, j, k), see the module docstring
RADIOGRAPH_DIRECTIONS_RAS = np.array([[-1.0, 0.0, 0.0],
                                      [0.0, 0.0, -1.0],
                                      [0.0, -1.0, 0.0]]).T
ATTR = "MSKdeX."  # prefix of node attributes written here


# ---------------------------------------------------------------------------------------------
# small VTK helpers
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# CT volumes
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Structures, colour tables, label maps, segmentations
# ---------------------------------------------------------------------------------------------
def color_table_node(structures: Sequence[Structure], scene, name: str = "MSKdeX structures",
                     values: Sequence[int] | None = None, node=None):
    """A user colour table: entry ``values[n]`` (default: the structure's label) = structure n."""
    values = [s.label for s in structures] if values is None else list(values)
    if node is None:
        node = _add(scene, slicer.vtkMRMLColorTableNode(), name)
    node.SetTypeToUser()
    node.SetNumberOfColors(int(max(values, default=0)) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for v in range(1, node.GetNumberOfColors()):
        node.SetColor(v, "", 0.0, 0.0, 0.0, 0.0)
    for v, s in zip(values, structures):
        r, g, b = (c / 255.0 for c in s.color)
        node.SetColor(int(v), s.name, r, g, b, 1.0)
    return node


def set_structure_visible(color_node, value: int, visible: bool, opacity: float = 1.0) -> None:
    """Show/hide one entry of a colour table (alpha = opacity or 0): per-structure toggle."""
    rgba = [0.0, 0.0, 0.0, 0.0]
    color_node.GetColor(int(value), rgba)
    color_node.SetColor(int(value), rgba[0], rgba[1], rgba[2], float(opacity) if visible else 0.0)


def labelmap_to_node(labels: LabelMap, scene, name: str = "Labels", structures=None):
    """A label map node (value = structure label) with a colour table of the structures."""
    chosen = list(structures or labels.structures)
    node = volume_to_node(labels.grid, scene, name, labelmap=True, array=labels.label_array(chosen))
    colors = color_table_node(chosen, scene, f"{name} colours")
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    node.SetAttribute(ATTR + "table", labels.table.name)
    return node


def _labelmap_from_arrays(grid: Volume, layers: list[np.ndarray], entries_by_name: dict | None,
                          counts: dict[int, int], table, ct: Volume | None, source: str) -> LabelMap:
    """LabelMap from one integer layer whose values are labels (``entries_by_name`` None)."""
    notes: dict = {"source": source}
    layer = layers[0]
    match = None
    if table is not None:
        tab = get_table(table)
    else:
        mean_hu = None
        if ct is not None:
            flat = layer.ravel()
            sums = np.bincount(flat, weights=ct.array.ravel().astype(np.float64))
            mean_hu = {v: float(sums[v] / c) for v, c in counts.items()}
        match = detect_table(counts, mean_hu)
        tab = match.table
    unknown = sorted(v for v in counts if v not in tab)
    if unknown:
        extra = [Structure(v, f"label_{v}", "other", "none", _colour(f"label_{v}", "other")) for v in unknown]
        tab = StructureTable(tab.name, list(tab.structures) + extra)
        notes["labels_not_in_table"] = unknown
    return LabelMap(grid, [layer], tab, {v: (0, v) for v in counts}, match, notes)


def labelmap_from_node(node, ct: Volume | None = None, table: str | None = None) -> LabelMap:
    """LabelMap of a label map node. Table: ``table``, else the names of the node's colour
    table (when they are structure names), else detected from label values and CT numbers."""
    grid = volume_from_node(node)
    if ct is not None and not grid.same_grid(ct):
        raise UserError(f"label map '{node.GetName()}' is not on the CT's grid; resample it "
                        "(Resample Scalar/Vector/DWI Volume, nearest neighbour)")
    arr = np.rint(grid.array).astype(np.int32)
    values, n = np.unique(arr, return_counts=True)
    counts = {int(v): int(c) for v, c in zip(values, n) if v > 0}
    if not counts:
        raise UserError(f"label map '{node.GetName()}' is empty")
    grid = ct if ct is not None else grid.with_array(arr)
    display = node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    if table is None and colors is not None:
        names = {v: colors.GetColorName(v) for v in counts if v < colors.GetNumberOfColors()}
        named = [nm for nm in names.values() if nm and nm.lower() not in ("", "(none)")]
        if named:
            m = detect_table_from_names(named)
            if not m.unknown and all(m.table.find(names[v]) and m.table.find(names[v]).label == v
                                     for v in names):
                out = _labelmap_from_arrays(grid, [arr], None, counts, m.table.name, None, node.GetName())
                out.match = m
                return out
    return _labelmap_from_arrays(grid, [arr], None, counts, table, ct, f"mrml:{node.GetName()}")


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())]


def labelmap_from_segmentation(segmentation_node, reference_node, table: str | None = None) -> LabelMap:
    """LabelMap of a segmentation node on ``reference_node``'s grid (the CT volume node).

    Segment names -> structures (``detect_table_from_names`` unless ``table`` is given);
    overlapping segments are kept exactly, in separate layers.
    """
    seg = segmentation_node.GetSegmentation()
    if seg.GetNumberOfSegments() == 0:
        raise UserError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    names = segment_names(segmentation_node)
    match = detect_table_from_names(names) if table is None else None
    ref_table = match.table if match is not None else get_table(table)
    grid = volume_from_node(reference_node)
    scene = segmentation_node.GetScene()
    tmp = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(tmp)
    layers: list[np.ndarray] = []
    structures, entries = [], {}
    try:
        for n in range(seg.GetNumberOfSegments()):
            sid = seg.GetNthSegmentID(n)
            segment = seg.GetSegment(sid)
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, tmp, reference_node)
            if not ok:
                raise UserError(f"cannot export segment '{segment.GetName()}' to the CT grid")
            mask = _node_array(tmp) > 0
            if not mask.any():
                continue
            known = ref_table.find(segment.GetName())
            name = known.name if known else normalize_name(segment.GetName())
            kind = known.kind if known else _kind_of(name)
            color = tuple(int(round(c * 255)) for c in segment.GetColor())
            label = known.label if known else 1000 + n
            structures.append(Structure(label, name, kind, known.side if known else _side_of(name), color))
            for li, layer in enumerate(layers):  # first layer where it does not overlap
                if not np.any(layer[mask]):
                    break
            else:
                layers.append(np.zeros(mask.shape, np.int32))
                li = len(layers) - 1
            layers[li][mask] = label
            entries[label] = (li, label)
    finally:
        scene.RemoveNode(tmp)
    if not entries:
        raise UserError(f"segmentation '{segmentation_node.GetName()}' is empty on the CT grid")
    return LabelMap(grid, layers, StructureTable(ref_table.name, structures), entries, match,
                    {"source": f"mrml:{segmentation_node.GetName()}", "segments": names})


def labelmap_to_segmentation(label_node, scene, name: str = "Segmentation"):
    """A segmentation node with one segment per label (names from the label's colour table)."""
    seg = _add(scene, slicer.vtkMRMLSegmentationNode(), name)
    seg.CreateDefaultDisplayNodes()
    if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, seg):
        raise UserError(f"cannot import label map '{label_node.GetName()}' as segments")
    return seg


def structure_rows(labels: LabelMap) -> list[dict]:
    """Rows for the 'detected structures' table: label, name, kind, side, voxels."""
    rows = []
    for s in labels.structures:
        rows.append({"label": s.label, "name": s.name, "kind": s.kind, "side": s.side,
                     "voxels": int(labels.mask(s).sum())})
    return rows


# ---------------------------------------------------------------------------------------------
# Pose <-> linear transform node; landmarks <-> markups
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Radiographs and channel layers
# ---------------------------------------------------------------------------------------------
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


@dataclass
class ChannelLayers:
    """MRML nodes showing decomposed channels over a radiograph."""

    volumes: list = field(default_factory=list)  # one scalar volume per channel (unit per pixel)
    label: object = None                           # label map: k+1 where channel k dominates
    colors: object = None                          # colour table of the channels' structures
    structures: list = field(default_factory=list)  # structure of label value k+1 = structures[k]
    quantity: str = ""                             # quantity shown by the label map
    channels: list = field(default_factory=list)   # per volume: {structure, quantity, ...}
    table: object = None                           # estimates table node (predictions)
    warnings: list = field(default_factory=list)   # the prediction's warnings


def channels_to_nodes(channels: np.ndarray, structures: Sequence[Structure], radiograph_node, scene,
                      quantity: str = "mass_g", threshold: float = 0.05, prefix: str = "MSKdeX",
                      layers: ChannelLayers | None = None) -> ChannelLayers:
    """Channel images (K, rows, cols) -> per-channel volumes + a dominant-channel label map.

    Geometry is the radiograph node's. A pixel is labelled with channel k+1 when channel k is
    the largest there and exceeds ``threshold`` times that channel's maximum.
    """
    ch = np.asarray(channels, dtype=np.float32)
    if ch.ndim != 3 or len(structures) != ch.shape[0]:
        raise UserError(f"channels must be (K, rows, cols) with K = {len(structures)} structures, "
                        f"got shape {ch.shape}")
    ref = radiograph_from_node(radiograph_node)
    if ch.shape[1:] != ref.shape:
        raise UserError(f"channels are {ch.shape[1:]} but radiograph '{radiograph_node.GetName()}' is {ref.shape}")
    m = vtk.vtkMatrix4x4()
    radiograph_node.GetIJKToRASMatrix(m)
    out = layers or ChannelLayers()
    for k, s in enumerate(structures):
        node = out.volumes[k] if k < len(out.volumes) else _add(
            scene, slicer.vtkMRMLScalarVolumeNode(), f"{prefix} {s.name} {quantity}")
        node.SetIJKToRASMatrix(m)
        node.SetAndObserveImageData(_image_data(ch[k][None]))
        node.SetAttribute(ATTR + "quantity", quantity)
        node.SetAttribute(ATTR + "structure", s.name)
        _display(node)
        if k >= len(out.volumes):
            out.volumes.append(node)
    label = _dominant_label(ch, threshold)
    if out.label is None:
        out.label = _add(scene, slicer.vtkMRMLLabelMapVolumeNode(), f"{prefix} channels")
    out.label.SetIJKToRASMatrix(m)
    out.label.SetAndObserveImageData(_image_data(label[None]))
    _display(out.label)
    out.colors = color_table_node(structures, scene, f"{prefix} channel colours",
                                  values=range(1, len(structures) + 1), node=out.colors)
    out.label.GetDisplayNode().SetAndObserveColorNodeID(out.colors.GetID())
    out.structures, out.quantity = list(structures), quantity
    out.channels = [{"structure": s.name, "quantity": quantity} for s in structures]
    return out


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
    from .visualize import checkerboard as tiles_of, window

    if a.shape != b.shape:
        raise UserError(f"checkerboard needs images of one shape, got {a.shape} and {b.shape}")
    return tiles_of(window(a, 1, 99), window(b, 1, 99), tiles)


# ---------------------------------------------------------------------------------------------
# Tables and charts
# ---------------------------------------------------------------------------------------------
def table_node_from_rows(rows: Sequence[dict], scene, name: str = "MSKdeX table",
                         columns: Sequence[str] | None = None, node=None):
    """A table node: one column per key (numbers -> double columns, others -> strings)."""
    rows = list(rows)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    table = vtk.vtkTable()
    for c in cols:
        vals = [r.get(c) for r in rows]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in vals if v is not None) and any(v is not None for v in vals)
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(c)
        for v in vals:
            if numeric:
                arr.InsertNextValue(float("nan") if v is None else float(v))
            else:
                arr.InsertNextValue("" if v is None else "; ".join(map(str, v)) if isinstance(v, list) else str(v))
        table.AddColumn(arr)
    if node is None:
        node = _add(scene, slicer.vtkMRMLTableNode(), name)
    node.SetAndObserveTable(table)
    for c in cols:
        unit = c.rsplit("_", 1)[-1] if "_" in c else ""
        if unit in ("g", "cm3", "mm", "hu", "HU", "s"):
            node.SetColumnUnitLabel(c, {"cm3": "cm^3", "hu": "HU"}.get(unit, unit))
    node.SetLocked(True)
    return node


def rows_from_table_node(node) -> list[dict]:
    """The rows of a table node as dicts (numbers as float, text as str)."""
    table = node.GetTable()
    cols = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for col in cols:
            v = col.GetValue(r)
            row[col.GetName()] = float(v) if isinstance(col, vtk.vtkDataArray) else str(v)
        out.append(row)
    return out


from .anatomy.ct_metrics import METRIC_COLUMNS  # noqa: E402  (the metrics table's columns, named once)


def metrics_table_node(rows: Sequence[dict], scene, name: str = "MSKdeX CT metrics", node=None):
    """Table node of ``metrics.StructureMetrics.to_dict()`` rows."""
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    return table_node_from_rows(rows, scene, name, cols, node)


def bar_chart(table_node, scene, x_column: str = "name", y_columns: Iterable[str] = ("mass_g",),
              name: str = "MSKdeX chart", chart=None):
    """A bar chart (plot chart node) of columns of a table node, one series per column."""
    if chart is None:
        chart = _add(scene, slicer.vtkMRMLPlotChartNode(), name)
    chart.RemoveAllPlotSeriesNodeIDs()
    for col in y_columns:
        series = _add(scene, slicer.vtkMRMLPlotSeriesNode(), f"{name} {col}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(x_column)
        series.SetLabelColumnName(x_column)
        series.SetYColumnName(col)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_column)
    chart.SetYAxisTitle(", ".join(y_columns))
    return chart


# ---------------------------------------------------------------------------------------------
# Headless slice rendering (screenshots, tests)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Inputs and outputs of the ``mskdex`` subprocesses (register, predict)
# ---------------------------------------------------------------------------------------------
def write_radiograph_file(node, path, force: bool = True) -> Radiograph:
    """Write a radiograph node as a float32 TIFF that ``mskdex register/predict`` read back with
    the same pixels, rows and columns (spacing as a per-centimetre resolution; pass it on the
    command line as well, that is exact). Returns the written Radiograph."""
    from .io.radiographs import write_radiograph_image

    rg = radiograph_from_node(node)
    write_radiograph_image(path, rg, force=force)
    return rg


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
    from .io.outputs import write_text

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


def model_grid_ijk_to_ras(radiograph_node, image_size: Sequence[int], model_spacing_mm: Sequence[float],
                          input_spacing_mm: Sequence[float], centre_rc: Sequence[float] | None = None
                          ) -> np.ndarray:
    """IJKToRAS (4x4) of a model-grid image (``image_size`` (H, W) pixels of ``model_spacing_mm``
    (row, col)) laid over ``radiograph_node`` the way inference resampled it
    (:func:`MSKdeXLib.learning.dataset.builder.prepare_radiograph`): the grid's centre on the radiograph pixel
    ``centre_rc`` (default: the image centre), the radiograph's pixels being ``input_spacing_mm``
    (row, col) wide. Expressed through the radiograph node's own IJKToRAS, so the overlay is
    right whatever that node's spacing, orientation or origin."""
    img = radiograph_node.GetImageData()
    if img is None:
        raise UserError(f"radiograph node '{radiograph_node.GetName()}' has no image data")
    cols, rows, _ = img.GetDimensions()
    h, w = (int(v) for v in image_size)
    cr, cc = ((rows - 1) / 2.0, (cols - 1) / 2.0) if centre_rc is None else (float(centre_rc[0]), float(centre_rc[1]))
    sr, sc = (float(model_spacing_mm[0]) / float(input_spacing_mm[0]),
              float(model_spacing_mm[1]) / float(input_spacing_mm[1]))
    model_to_rg = np.array([[sc, 0.0, 0.0, cc - (w - 1) / 2.0 * sc],
                            [0.0, sr, 0.0, cr - (h - 1) / 2.0 * sr],
                            [0.0, 0.0, 1.0, 0.0],
                            [0.0, 0.0, 0.0, 1.0]])
    m = vtk.vtkMatrix4x4()
    radiograph_node.GetIJKToRASMatrix(m)
    return numpy_matrix(m) @ model_to_rg


def prediction_input_spacing(doc: dict) -> tuple[float, float]:
    """The radiograph pixel spacing (row, col) mm that ``mskdex predict`` used, as it recorded it
    in estimates.json (the file's, the command line's, or its assumption for an uncalibrated
    radiograph: see :func:`MSKdeXLib.learning.inference.prepare_input`)."""
    given = doc.get("input_pixel_spacing_mm")
    if not given:
        raise UserError("estimates.json lacks input_pixel_spacing_mm (written by an older mskdex?); "
                        "run mskdex predict again")
    return float(given[0]), float(given[1])


ESTIMATE_COLUMNS = ("structure", "kind", "mass_g", "mass_g_low", "mass_g_high", "volume_cm3",
                    "volume_cm3_low", "volume_cm3_high", "id")


def read_estimates(out_dir) -> dict:
    """estimates.json of a ``mskdex predict`` output folder (format mskdex-estimates/1)."""
    from pathlib import Path

    p = Path(out_dir) / "estimates.json"
    doc = read_json(p, "estimates.json")
    if not str(doc.get("format", "")).startswith("mskdex-estimates/") or "structures" not in doc:
        raise UserError("not an mskdex estimates file (format mskdex-estimates/1 expected)", p)
    return doc


def estimates_table_node(doc: dict, scene, name: str = "MSKdeX estimates", node=None):
    """Table node of estimates.json's per-structure rows: structure, kind, mass_g with its
    90 % interval (mass_g_low, mass_g_high), volume_cm3 likewise, id."""
    rows = list(doc["structures"])
    cols = [c for c in ESTIMATE_COLUMNS if any(c in r for r in rows)]
    cols += [c for r in rows for c in r if c not in cols]
    node = table_node_from_rows(rows, scene, name, cols, node)
    for c in cols:
        for q, unit in (("mass_g", "g"), ("volume_cm3", "cm^3")):
            if c.startswith(q):
                node.SetColumnUnitLabel(c, unit)
    node.SetAttribute(ATTR + "interval", str(doc.get("interval", "")))
    how = doc.get("interval_method") or {}
    node.SetAttribute(ATTR + "interval_calibrated", "true" if how.get("calibrated") else "false")
    node.SetAttribute(ATTR + "interval_method", str(how.get("method") or how.get("note") or ""))
    return node


def _structures_of_prediction(doc: dict, names: Sequence[str]) -> list[Structure]:
    """Structures (name, kind, colour) of predicted channels: from the model's config.json when
    it is still there, else the table rows with the default colour of each name."""
    import json
    from pathlib import Path

    known: dict[str, Structure] = {}
    cfg = Path(str(doc.get("model", ""))) / "config.json"
    if doc.get("model") and cfg.is_file():
        try:
            for s in json.loads(cfg.read_text()).get("structures", []):
                known[s["name"]] = Structure(int(s.get("label", 0)), s["name"], s.get("kind", "other"),
                                             s.get("side", "none"), tuple(int(c) for c in s.get("color", (128, 128, 128))))
        except (ValueError, KeyError, TypeError):
            known = {}
    kinds = {r["structure"]: r.get("kind") or "other" for r in doc.get("structures", [])}
    out = []
    for n, nm in enumerate(names):
        s = known.get(nm)
        if s is None:
            kind = kinds.get(nm, _kind_of(nm))
            s = Structure(n + 1, nm, kind, _side_of(nm), _colour(nm, kind))
        out.append(s)
    return out


def _dominant_label(ch: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, cols) int16: k+1 where channel k is the largest and above ``threshold`` x its peak."""
    peak = ch.reshape(len(ch), -1).max(axis=1)
    relevant = ch > (threshold * np.maximum(peak, 1e-30))[:, None, None]
    winner = np.argmax(np.where(relevant, ch, -np.inf), axis=0)
    return np.where(relevant.any(axis=0), winner + 1, 0).astype(np.int16)


def _read_channel_file(path) -> tuple[np.ndarray, tuple[float, float]]:
    """(image (rows, cols) float32, spacing (row, col) mm) of a 2D channel NRRD / NIfTI."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UserError(f"cannot read channel image ({str(exc).strip().splitlines()[-1][:120]})", path) from None
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr = arr.reshape(arr.shape[-2:]) if arr.size == np.prod(arr.shape[-2:]) else arr
    if arr.ndim != 2:
        raise UserError(f"channel image is not 2D (shape {arr.shape})", path)
    sp = img.GetSpacing()
    return arr, (float(sp[1]), float(sp[0]))


def _volume_on(scene, name: str, array2d: np.ndarray, ijk_to_ras: np.ndarray, radiograph_node, node=None):
    """A single-slice scalar volume ``array2d`` with ``ijk_to_ras``, under the radiograph's parent."""
    if node is None:
        node = _add(scene, slicer.vtkMRMLScalarVolumeNode(), name)
    elif node.GetName() != name:
        node.SetName(name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    node.SetAndObserveImageData(_image_data(np.asarray(array2d, np.float32)[None]))
    node.SetAndObserveTransformNodeID(radiograph_node.GetTransformNodeID())
    _display(node)
    return node


def channels_from_prediction(out_dir, radiograph_node, scene, quantity: str | None = None,
                             threshold: float = 0.05, prefix: str = "MSKdeX", layers: ChannelLayers | None = None,
                             centre_rc: Sequence[float] | None = None) -> ChannelLayers:
    """Load a ``mskdex predict`` output folder over ``radiograph_node`` (the radiograph it ran on).

    Every channel image ``channels/<structure>__<quantity>.nrrd`` (g or cm^3 per pixel, on the
    model's grid) becomes a scalar volume whose IJKToRAS places that grid over the radiograph
    exactly where inference resampled it (:func:`model_grid_ijk_to_ras`); Slicer's slice views
    resample it onto the radiograph. The label map (structure k+1 where its channel of
    ``quantity`` dominates; default mass_g when predicted, else volume_cm3) and its colour table
    are on the same grid. ``layers.table`` is the estimates table node, ``layers.structures``
    the label map's structures, ``layers.channels`` estimates.json's channel records.
    """
    from pathlib import Path

    out = Path(out_dir)
    doc = read_estimates(out)
    rows = doc["rows"]
    names = list(dict.fromkeys(r["structure"] for r in rows))
    quantities = list(dict.fromkeys(r["quantity"] for r in rows))
    q = quantity or ("mass_g" if "mass_g" in quantities else quantities[0])
    if q not in quantities:
        raise UserError(f"the prediction has no {q} channels (it has {', '.join(quantities)})", out / "estimates.json")
    images, spacing = [], None
    for r in rows:
        cand = [out / "channels" / f"{r['structure']}__{r['quantity']}{ext}" for ext in (".nrrd", ".nii.gz")]
        path = next((p for p in cand if p.is_file()), None)
        if path is None:
            raise UserError(f"channel image of {r['structure']} {r['quantity']} not found", cand[0])
        arr, sp = _read_channel_file(path)
        if spacing is not None and (arr.shape != images[0].shape or not np.allclose(sp, spacing)):
            raise UserError("channel images differ in size or spacing", path)
        images.append(arr)
        spacing = sp
    model_sp = tuple(float(v) for v in doc.get("pixel_spacing_mm", spacing))
    if not np.allclose(model_sp, spacing, rtol=1e-5):
        raise UserError(f"channel spacing {spacing} differs from estimates.json's {model_sp}", out)
    shape = images[0].shape
    in_sp = prediction_input_spacing(doc)
    centre = centre_rc if centre_rc is not None else doc.get("principal_point_rc")
    ijk_to_ras = model_grid_ijk_to_ras(radiograph_node, shape, model_sp, in_sp, centre)

    structures = _structures_of_prediction(doc, names)
    out_layers = layers or ChannelLayers()
    for k, r in enumerate(rows):
        node = out_layers.volumes[k] if k < len(out_layers.volumes) else None
        node = _volume_on(scene, f"{prefix} {r['structure']} {r['quantity']}", images[k], ijk_to_ras,
                          radiograph_node, node)
        node.SetAttribute(ATTR + "quantity", r["quantity"])
        node.SetAttribute(ATTR + "structure", r["structure"])
        if k >= len(out_layers.volumes):
            out_layers.volumes.append(node)
    chosen = [k for k, r in enumerate(rows) if r["quantity"] == q]
    label = _dominant_label(np.stack([images[k] for k in chosen]), threshold)
    label_structs = [structures[names.index(rows[k]["structure"])] for k in chosen]
    if out_layers.label is None:
        out_layers.label = _add(scene, slicer.vtkMRMLLabelMapVolumeNode(), f"{prefix} channels")
    out_layers.label.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    out_layers.label.SetAndObserveImageData(_image_data(label[None]))
    out_layers.label.SetAndObserveTransformNodeID(radiograph_node.GetTransformNodeID())
    _display(out_layers.label)
    out_layers.colors = color_table_node(label_structs, scene, f"{prefix} channel colours",
                                         values=range(1, len(label_structs) + 1), node=out_layers.colors)
    out_layers.label.GetDisplayNode().SetAndObserveColorNodeID(out_layers.colors.GetID())
    out_layers.structures = label_structs
    out_layers.quantity = q
    out_layers.channels = rows
    out_layers.table = estimates_table_node(doc, scene, f"{prefix} estimates", out_layers.table)
    out_layers.warnings = list(doc.get("warnings", []))
    return out_layers


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
    from pathlib import Path

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
