"""The ``mskdex-dataset/1`` folder format, owned here (docs/CONTRACTS.md, "Training data set").

A data-set folder holds ``dataset.json`` (the header: image size, pixel spacing at the detector
in mm (row, col), structures, channels, normalisation, density; and the list of records) and
``records/<id>.safetensors``, one file per record with the tensors

* ``xray``    (1, H, W) float32 - the normalised radiograph;
* ``targets`` (C, H, W) float32 - channel images, g or cm^3 per pixel (sums kept);
* ``paired``  (C,) uint8        - 1 where the channel is pixel-aligned with the radiograph;
* ``truth``   (C,) float64      - the CT-derived value of each channel's structure (g or cm^3).

Writing (:func:`write_record`, :func:`dataset_header`, :func:`write_dataset_json`) and reading
(:func:`load_dataset_info`) both live here, and :func:`normalise`, the meaning of ``dataset.json``'s
``normalisation`` (applied again at inference); :mod:`.builder` builds records, :mod:`.records`
feeds them to torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import save_file

from ...anatomy.quantities import QUANTITIES
from ...anatomy.structures import Structure
from ...errors import UserError
from ...io.documents import read_json
from ...io.outputs import atomic_path, write_json
from ...validation import require_finite

FORMAT = "mskdex-dataset/1"
#: radiograph scalings a data set is built with (:func:`normalise` also reads "fixed" and "none",
#: which need parameters, in hand-written data sets)
NORMALISATION_METHODS = ("zscore", "percentile", "minmax")
__all__ = ["FORMAT", "QUANTITIES", "DatasetInfo", "load_dataset_info", "record_file", "write_record",
           "dataset_header", "write_dataset_json", "normalise"]

#: header keys of dataset.json (other keys are kept in ``DatasetInfo.extra``)
HEADER_KEYS = ("format", "image_size", "pixel_spacing_mm", "structures", "channels", "normalisation", "density")


@dataclass
class DatasetInfo:
    """The parsed ``dataset.json`` of a training-set folder."""

    root: Path
    image_size: tuple[int, int]
    pixel_spacing_mm: tuple[float, float]
    structures: list[Structure]
    channels: list[dict[str, str]]
    normalisation: dict[str, Any]
    density: dict[str, Any]
    records: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split", "train") == name]

    def channel_names(self) -> list[str]:
        return [f"{c['structure']}:{c['quantity']}" for c in self.channels]


def _struct_from_dict(d: dict, path: Path) -> Structure:
    try:
        return Structure(int(d["label"]), str(d["name"]), str(d.get("kind", "other")),
                         str(d.get("side", "none")), tuple(int(v) for v in d.get("color", (128, 128, 128))))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"bad structure entry {d}", path) from None


def load_dataset_info(folder: str | Path) -> DatasetInfo:
    """Parse and check ``folder/dataset.json`` (UserError naming the file when malformed)."""
    folder = Path(folder)
    path = folder / "dataset.json"
    if not path.exists():
        raise UserError("not a training-set folder (dataset.json missing)", folder)
    d = read_json(path, "dataset description")
    if d.get("format") != FORMAT:
        raise UserError(f"unsupported data-set format {d.get('format')!r} (expected {FORMAT})", path)
    try:
        size = tuple(int(v) for v in d["image_size"])
        spacing = tuple(float(v) for v in d["pixel_spacing_mm"])
        structures = [_struct_from_dict(s, path) for s in d["structures"]]
        channels = [dict(c) for c in d["channels"]]
        records = list(d["records"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"dataset.json lacks or has a bad field ({exc})", path) from None
    names = {s.name for s in structures}
    for c in channels:
        if c.get("structure") not in names:
            raise UserError(f"channel {c} names a structure not in 'structures'", path)
        if c.get("quantity") not in QUANTITIES:
            raise UserError(f"channel {c} has quantity {c.get('quantity')!r}; use {QUANTITIES}", path)
    if not channels or not records:
        raise UserError("data set has no channels or no records", path)
    known = set(HEADER_KEYS) | {"records"}
    return DatasetInfo(folder, size, spacing, structures, channels, dict(d.get("normalisation") or {}),
                       dict(d.get("density") or {}), records, {k: v for k, v in d.items() if k not in known})


def record_file(rec_id: str) -> str:
    """The record's file, relative to the data-set folder."""
    return f"records/{rec_id}.safetensors"


def write_record(folder: str | Path, rec_id: str, arrays: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> str:
    """Write ``records/<id>.safetensors`` (atomically) from ``arrays`` with the keys xray, targets,
    paired and truth (cast to the format's dtypes; UserError for NaN/inf values); returns the relative
    file name."""
    for k in ("xray", "targets", "truth"):  # a NaN record would poison training silently
        require_finite(f"record {k}", arrays[k], rec_id)
    rel = record_file(rec_id)
    tensors = {"xray": np.ascontiguousarray(arrays["xray"], dtype=np.float32),
               "targets": np.ascontiguousarray(arrays["targets"], dtype=np.float32),
               "paired": np.asarray(arrays["paired"], dtype=np.uint8),
               "truth": np.asarray(arrays["truth"], dtype=np.float64)}
    with atomic_path(Path(folder) / rel, force=True) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return rel


def dataset_header(image_size: Sequence[int], pixel_spacing_mm: Sequence[float], structures: Sequence[Structure],
                   channels: Sequence[dict], normalisation: dict, density: dict) -> dict:
    """The header of ``dataset.json`` (everything but the records)."""
    return {"format": FORMAT, "image_size": list(image_size), "pixel_spacing_mm": list(pixel_spacing_mm),
            "structures": [s.to_dict() for s in structures], "channels": list(channels),
            "normalisation": normalisation, "density": density}


def write_dataset_json(folder: str | Path, header: dict, records: Sequence[dict], force: bool = True,
                       **extra: Any) -> Path:
    """Write ``dataset.json`` (atomically): ``header`` + the records (+ ``extra`` keys)."""
    return write_json(Path(folder) / "dataset.json", {**header, "records": list(records), **extra}, force)


# ---------------------------------------------------------------------------------------------
def normalise(pixels: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a data set's ``normalisation`` to raw radiograph pixels (bone bright).

    ``method``: "zscore" (per image: (x - mean) / std, the default), "minmax" (-> [0, 1]),
    "percentile" (``low``/``high`` percentiles -> [0, 1], default 1 / 99), "fixed"
    ((x - ``offset``) / ``scale``), "none".
    """
    x = np.asarray(pixels, dtype=np.float64)
    method = str(spec.get("method", "zscore")).lower()
    if method == "zscore":
        out = (x - x.mean()) / max(float(x.std()), 1e-12)
    elif method == "minmax":
        lo, hi = float(x.min()), float(x.max())
        out = (x - lo) / max(hi - lo, 1e-12)
    elif method == "percentile":
        lo, hi = np.percentile(x, [float(spec.get("low", 1.0)), float(spec.get("high", 99.0))])
        out = (x - lo) / max(float(hi - lo), 1e-12)
    elif method == "fixed":
        out = (x - float(spec.get("offset", 0.0))) / float(spec.get("scale", 1.0))
    elif method in ("none", "identity"):
        out = x
    else:
        raise UserError(f"unknown radiograph normalisation method '{method}'")
    return out.astype(np.float32)
