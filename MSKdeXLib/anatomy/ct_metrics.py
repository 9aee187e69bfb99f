"""CT-derived per-structure metrics: volume (cm^3) and mass (g).

* ``volume_cm3``: all voxels of the structure's label.
* ``mass_g``: muscles -> *lean* mass (voxels with HU in the lean window only); bones and other
  structures -> total mass. Density from :class:`~MSKdeXLib.anatomy.density.DensityModel`.

These are the truths that the DRR channel sums reproduce and that the network learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.images import LabelMap, Volume
from .density import DensityModel
from .structures import Structure

MM3_PER_CM3 = 1000.0
#: the columns of a metrics table (``mskdex metrics --csv``, the Slicer module's table), in order
METRIC_COLUMNS = ("name", "label", "kind", "side", "voxels", "volume_cm3", "mass_g", "lean_volume_cm3", "mean_hu")


@dataclass
class StructureMetrics:
    structure: Structure
    voxels: int
    volume_cm3: float
    mass_g: float
    lean_volume_cm3: float
    mean_hu: float

    def to_dict(self) -> dict:
        s = self.structure
        return {"name": s.name, "label": s.label, "kind": s.kind, "side": s.side,
                "voxels": self.voxels, "volume_cm3": self.volume_cm3, "mass_g": self.mass_g,
                "lean_volume_cm3": self.lean_volume_cm3, "mean_hu": self.mean_hu,
                "mass_definition": "lean" if s.kind == "muscle" else "total"}


def mass_weights(ct: Volume, structure: Structure, density: DensityModel) -> np.ndarray:
    """Per-voxel mass in grams that counts towards ``structure``'s ``mass_g`` (whole grid).

    Muscles count only lean voxels; other kinds count all. Multiply by the structure mask.
    """
    hu = ct.array
    grams = density.density(hu.astype(np.float64)) * (ct.voxel_volume_mm3 / MM3_PER_CM3)
    if structure.kind == "muscle":
        grams = np.where(density.lean(hu), grams, 0.0)
    return grams


def structure_metrics(ct: Volume, labels: LabelMap, structures: list[Structure] | None = None,
                      density: DensityModel = DensityModel()) -> list[StructureMetrics]:
    """Metrics of each structure (default: all present) of ``labels`` on ``ct``'s grid.

    One pass per label layer: per-value voxel counts and density sums by ``np.bincount``, so
    the cost does not grow with the number of structures.
    """
    hu = ct.array.ravel()
    voxel_cm3 = ct.voxel_volume_mm3 / MM3_PER_CM3
    rho = density.density(hu.astype(np.float64))
    lean = density.lean(hu)
    lean_rho = np.where(lean, rho, 0.0)
    hu64 = hu.astype(np.float64)
    sums: dict[int, tuple[np.ndarray, ...]] = {}
    out = []
    for s in structures or labels.structures:
        layer, value = labels.entries[labels.resolve(s).label]
        if layer not in sums:
            flat = labels.layers[layer].ravel()
            n = int(flat.max()) + 1
            sums[layer] = (np.bincount(flat, minlength=n), np.bincount(flat, rho, n),
                           np.bincount(flat, lean_rho, n), np.bincount(flat, lean, n),
                           np.bincount(flat, hu64, n))
        count, rho_sum, lean_rho_sum, lean_count, hu_sum = (a[value] for a in sums[layer])
        mass = (lean_rho_sum if s.kind == "muscle" else rho_sum) * voxel_cm3
        out.append(StructureMetrics(s, int(count), int(count) * voxel_cm3, float(mass),
                                    float(lean_count) * voxel_cm3,
                                    float(hu_sum / count) if count else float("nan")))
    return out


def metrics_document(ct: Volume, labels: LabelMap, structures: list[Structure] | None = None,
                     density: DensityModel = DensityModel()) -> dict:
    """Metrics of ``structures`` (default: all present) as ``mskdex metrics --json`` writes them: the
    rows of :meth:`StructureMetrics.to_dict`, the settings (density, table and how it was detected,
    label notes) and the CT grid."""
    rows = [m.to_dict() for m in structure_metrics(ct, labels, structures, density)]
    detection = None if labels.match is None else {"confidence": labels.match.confidence,
                                                   "scores": labels.match.scores}
    return {"structures": rows,
            "settings": {"density": density.to_dict(), "table": labels.table.name,
                         "table_detection": detection, "labels": labels.notes},
            "ct": ct.grid_description()}


def metrics_csv(rows: list[dict]) -> str:
    """The rows of :func:`metrics_document` as CSV text with the :data:`METRIC_COLUMNS`."""
    lines = [",".join(METRIC_COLUMNS)] + [",".join(str(r[c]) for c in METRIC_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"
