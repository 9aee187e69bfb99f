"""Decomposed channels over a radiograph: channel volumes, the dominant-structure label map,
and the outputs of ``mskdex predict`` (estimates table, channel images on the model's grid)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from ..anatomy.structures import Structure, colour_of as _colour, kind_of as _kind_of, side_of as _side_of
from ..errors import UserError
from ..io.documents import read_json
from .common import ATTR, _add, _display, _image_data, numpy_matrix, vtk_matrix
from .labels import color_table_node
from .radiographs import radiograph_from_node
from .tables import table_node_from_rows


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


def _dominant_label(ch: np.ndarray, threshold: float) -> np.ndarray:
    """(rows, cols) int16: k+1 where channel k is the largest and above ``threshold`` x its peak."""
    peak = ch.reshape(len(ch), -1).max(axis=1)
    relevant = ch > (threshold * np.maximum(peak, 1e-30))[:, None, None]
    winner = np.argmax(np.where(relevant, ch, -np.inf), axis=0)
    return np.where(relevant.any(axis=0), winner + 1, 0).astype(np.int16)


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


def _read_channel_file(path) -> tuple[np.ndarray, tuple[float, float]]:
    """(image (rows, cols) float32, spacing (row, col) mm) of a 2D channel NRRD / NIfTI."""
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

