"""CT-derived per-structure metrics: volume (cm^3) and mass (g).

* ``volume_cm3``: all voxels of the structure's label.
* ``mass_g``: muscles -> *lean* mass (voxels with HU in the lean window only); bones and other
  structures -> total mass. Density from :class:`~MSKdeXLib.density.DensityModel`.

These are the truths that the DRR channel sums reproduce and that the network learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .density import DensityModel
from .image import Volume
from .io.volumes import LabelMap
from .structures import Structure

MM3_PER_CM3 = 1000.0


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
    """Metrics of each structure (default: all present) of ``labels`` on ``ct``'s grid."""
    hu = ct.array.astype(np.float64)
    voxel_cm3 = ct.voxel_volume_mm3 / MM3_PER_CM3
    rho = density.density(hu)
    lean = density.lean(hu)
    out = []
    for s in structures or labels.structures:
        m = labels.mask(s)
        n = int(m.sum())
        sel_rho, sel_lean = rho[m], lean[m]
        mass = float((sel_rho[sel_lean] if s.kind == "muscle" else sel_rho).sum() * voxel_cm3)
        out.append(StructureMetrics(s, n, n * voxel_cm3, mass, float(sel_lean.sum()) * voxel_cm3,
                                    float(hu[m].mean()) if n else float("nan")))
    return out
