"""Loading CT volumes and label maps (NIfTI, NRRD, MHA/MHD, DICOM series, Slicer .seg.nrrd).

Everything comes back as core objects in the LPS frame (see :mod:`MSKdeXLib.io.images`).
Bad input raises :class:`~MSKdeXLib.errors.UserError` with a one-line message naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..anatomy.structures import (Structure, StructureTable, colour_of, detect_table, detect_table_from_names,
                                  get_table, kind_of, normalize_name, side_of)
from ..errors import UserError
from ..validation import nonfinite_summary
from .images import LabelMap, Volume
from .payload import check_dicom_files, check_dicom_folder, check_payload

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _read_sitk(path: Path, what: str):
    import SimpleITK as sitk

    if not path.exists():
        raise UserError(f"{what} not found", path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise UserError(f"{what}: folder holds no DICOM series", path)
            if len(series) > 1:
                # Take the series with most files; say which.
                series = sorted(series, key=lambda s: -len(reader.GetGDCMSeriesFileNames(str(path), s)))
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            check_dicom_folder(path, [f for s in series for f in reader.GetGDCMSeriesFileNames(str(path), s)],
                               what)
            check_dicom_files(list(files), what)
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            return reader.Execute()
        check_payload(path, what)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), first[-1] if first else "")
        raise UserError(f"cannot read {what} ({detail.strip()[:160]})", path) from None


#: what to do with NaN/inf voxels in a CT: refuse the CT (default), or mask them
NONFINITE_POLICIES = ("refuse", "mask")
#: HU given to non-finite voxels under ``nonfinite="mask"``: air (zero density, outside the lean window)
NONFINITE_FILL_HU = -1000.0


def load_ct(path: str | Path, nonfinite: str = "refuse") -> Volume:
    """A CT volume in Hounsfield units (float32), from a file or a DICOM series folder.

    Its pixel payload must be complete (see :mod:`.payload`) and every voxel finite: NaN/inf
    voxels are refused with their count and index box, or with ``nonfinite="mask"`` set to
    :data:`NONFINITE_FILL_HU` and recorded in ``metadata["nonfinite"]`` (outputs copy it)."""
    path = Path(path)
    img = _read_sitk(path, "CT")
    if img.GetDimension() != 3:
        raise UserError(f"CT must be 3D, this image is {img.GetDimension()}D", path)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError("CT must have one component per voxel", path)
    vol = Volume.from_sitk(img, source=str(path))
    vol.array = vol.array.astype(np.float32, copy=False)
    if min(vol.array.shape) < 2:
        raise UserError(f"CT is degenerate (shape {vol.array.shape})", path)
    bad = ~np.isfinite(vol.array)
    if bad.any():
        summary = nonfinite_summary(vol.array)
        if nonfinite != "mask":
            raise UserError(f"CT has {summary}; fix the file, or pass --nonfinite mask to treat them as "
                            f"air ({NONFINITE_FILL_HU:g} HU, recorded in the outputs)", path)
        vol.array = np.where(bad, np.float32(NONFINITE_FILL_HU), vol.array)
        vol.metadata["nonfinite"] = {"policy": "mask", "voxels": int(bad.sum()), "filled_hu": NONFINITE_FILL_HU,
                                     "summary": summary}
    return vol


def _label_stats(layer: np.ndarray, ct: Volume | None) -> tuple[dict[int, int], dict[int, float] | None]:
    values, counts = np.unique(layer, return_counts=True)
    label_counts = {int(v): int(c) for v, c in zip(values, counts) if v != 0}
    mean_hu = None
    if ct is not None and label_counts:
        flat = layer.ravel()
        sums = np.bincount(flat, weights=ct.array.ravel().astype(np.float64), minlength=int(flat.max()) + 1)
        mean_hu = {v: float(sums[v] / c) for v, c in label_counts.items()}
    return label_counts, mean_hu


def _to_integer_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int32, copy=False)
    rounded = np.rint(array)
    if not np.allclose(array, rounded, atol=1e-3):
        raise UserError("label map has non-integral values (is this a label map?)", path)
    if rounded.min() < 0:
        raise UserError("label map has negative values", path)
    return rounded.astype(np.int32)


def _resample_nearest(img, reference: Volume):
    import SimpleITK as sitk

    return sitk.Resample(img, reference.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         img.GetPixelID())


def load_labels(path: str | Path, ct: Volume | None = None, table: str | Path | None = None,
                resample: bool = False) -> LabelMap:
    """A label map or Slicer segmentation on the CT's grid.

    ``table``: a built-in table name or a CSV/JSON file; auto-detected when None (using the
    CT's intensities when ``ct`` is given). A grid different from the CT's is an error unless
    ``resample`` is true (nearest neighbour), which is then recorded in ``notes``.
    """
    path = Path(path)
    img = _read_sitk(path, "label map")
    if img.GetDimension() != 3:
        raise UserError(f"label map must be 3D, this image is {img.GetDimension()}D", path)
    is_seg = path.name.lower().endswith(".seg.nrrd") or img.HasMetaDataKey("Segment0_ID")
    notes: dict[str, Any] = {"source": str(path)}
    probe = Volume.from_sitk(img if img.GetNumberOfComponentsPerPixel() == 1 else
                             _first_component(img), source=str(path))
    if ct is not None and not probe.same_grid(ct):
        if not resample:
            raise UserError(
                f"label map grid {probe.size} @ {tuple(round(s, 3) for s in probe.spacing)} mm differs from "
                f"the CT's {ct.size} @ {tuple(round(s, 3) for s in ct.spacing)} mm (origin/direction may "
                "differ too); pass --resample-labels to resample it (nearest neighbour)", path)
        img = _resample_nearest(img, ct)
        notes["resampled_to_ct_grid"] = "nearest neighbour"
    grid = ct if ct is not None else probe
    if is_seg:
        return _segmentation(img, path, grid, table, notes)
    layer = _to_integer_labels(Volume.from_sitk(img).array, path)
    counts, mean_hu = _label_stats(layer, ct)
    if not counts:
        raise UserError("label map is empty (no non-zero label)", path)
    match = None
    if table is None:
        match = detect_table(counts, mean_hu)
        tab = match.table
    else:
        tab = get_table(table)
    unknown = sorted(v for v in counts if v not in tab)
    if unknown:
        # Keep unknown labels as generic structures rather than dropping their voxels silently.
        extra = [Structure(v, f"label_{v}", "other", "none", colour_of(f"label_{v}", "other")) for v in unknown]
        tab = StructureTable(tab.name, list(tab.structures) + extra)
        notes["labels_not_in_table"] = unknown
    entries = {v: (0, v) for v in counts}
    return LabelMap(grid.with_array(layer) if ct is None else grid, [layer], tab, entries, match, notes)


def _first_component(img):
    import SimpleITK as sitk

    return sitk.VectorIndexSelectionCast(img, 0)


def _segmentation(img, path: Path, grid: Volume, table, notes) -> LabelMap:
    """Slicer .seg.nrrd: segments with names, label values and (overlapping) layers."""
    import SimpleITK as sitk

    n_comp = img.GetNumberOfComponentsPerPixel()
    layers = []
    for c in range(n_comp):
        comp = img if n_comp == 1 else sitk.VectorIndexSelectionCast(img, c)
        layers.append(_to_integer_labels(sitk.GetArrayFromImage(comp), path))
    segs = []
    i = 0
    while img.HasMetaDataKey(f"Segment{i}_ID"):
        meta = lambda key, d="": img.GetMetaData(f"Segment{i}_{key}") if img.HasMetaDataKey(f"Segment{i}_{key}") else d  # noqa: E731
        segs.append({"name": meta("Name", meta("ID")), "layer": int(meta("Layer", "0") or 0),
                     "value": int(meta("LabelValue", str(i + 1)) or i + 1), "color": meta("Color")})
        i += 1
    if not segs:
        raise UserError("segmentation has no segments", path)
    names = [s["name"] for s in segs]
    match = detect_table_from_names(names) if table is None else None
    ref = match.table if match is not None else get_table(table)
    structures, entries = [], {}
    for idx, seg in enumerate(segs, start=1):
        known = ref.find(seg["name"])
        name = known.name if known else normalize_name(seg["name"])
        kind = known.kind if known else kind_of(name)
        color = known.color if known else colour_of(name, kind)
        if seg["color"]:
            try:
                color = tuple(int(round(float(c) * 255)) for c in seg["color"].split()[:3])
            except ValueError:
                pass
        label = known.label if known else 1000 + idx
        structures.append(Structure(label, name, kind, known.side if known else side_of(name), color))
        if seg["layer"] >= len(layers):
            raise UserError(f"segment '{seg['name']}' refers to missing layer {seg['layer']}", path)
        if np.any(layers[seg["layer"]] == seg["value"]):
            entries[label] = (seg["layer"], seg["value"])
    if not entries:
        raise UserError("segmentation is empty (all segments have no voxels)", path)
    notes["segments"] = names
    return LabelMap(grid, layers, StructureTable(ref.name, structures), entries, match, notes)
