"""CT number -> mass density, and the soft-tissue window used for lean muscle mass.

Default law: rho [g/cm^3] = max(0, 1 + HU / 1000) (water 1.0, air 0). Lean muscle mass counts
voxels whose HU lies in the skeletal-muscle window [-29, 150] (inclusive). Both settable; the
settings are recorded in every output through :meth:`DensityModel.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..validation import check_non_negative, check_number, check_positive, check_window


@dataclass(frozen=True)
class DensityModel:
    """rho = max(min_density, intercept + slope * HU) in g/cm^3; lean window in HU."""

    intercept_g_cm3: float = 1.0
    slope_g_cm3_per_hu: float = 0.001
    min_density_g_cm3: float = 0.0
    lean_window_hu: tuple[float, float] = (-29.0, 150.0)

    def __post_init__(self) -> None:  # one check per field, one line naming it
        check_number("density intercept (g/cm^3)", self.intercept_g_cm3)
        check_positive("density slope (g/cm^3 per HU)", self.slope_g_cm3_per_hu)
        check_non_negative("minimum density (g/cm^3)", self.min_density_g_cm3)
        check_window("lean HU window", self.lean_window_hu)

    def density(self, hu):
        """Density in g/cm^3 of an array of HU (numpy or torch)."""
        rho = self.intercept_g_cm3 + self.slope_g_cm3_per_hu * hu
        if isinstance(rho, np.ndarray):
            return np.maximum(rho, self.min_density_g_cm3)
        return rho.clamp_min(self.min_density_g_cm3)

    def lean(self, hu):
        """Boolean: HU inside the lean-muscle window (inclusive)."""
        lo, hi = self.lean_window_hu
        return (hu >= lo) & (hu <= hi)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["law"] = "rho = max(min_density, intercept + slope * HU)"
        d["lean_window_hu"] = list(self.lean_window_hu)
        return d
