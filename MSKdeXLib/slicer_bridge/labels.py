"""Structures, colour tables, label maps and segmentations <-> the core's LabelMap."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import slicer
import vtk

from ..anatomy.structures import (Structure, StructureTable, colour_of as _colour, detect_table,
                                 detect_table_from_names, get_table, kind_of as _kind_of, normalize_name,
                                 side_of as _side_of)
from ..errors import UserError
from ..io.images import LabelMap, Volume
from .common import ATTR, _add, _node_array
from .volumes import volume_from_node, volume_to_node


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

