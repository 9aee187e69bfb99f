"""Core image types: a 3D :class:`Volume` in the LPS frame, the :class:`LabelMap` of structures on
a CT grid, and a 2D :class:`Radiograph`.

Frames and index order follow ITK / SimpleITK:

* ``Volume.array`` is indexed ``[k, j, i]`` (slice, row, column), exactly what
  ``SimpleITK.GetArrayFromImage`` returns.
* ``spacing`` and ``origin`` are given in ``(i, j, k)`` order, in millimetres; ``origin`` is the
  LPS position of the centre of voxel ``(i, j, k) = (0, 0, 0)``.
* ``direction`` is 3x3 whose *columns* are the LPS unit vectors of the i, j, k axes.

So the LPS position (mm) of voxel index ``(i, j, k)`` is ``origin + direction @ (spacing * ijk)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..anatomy.structures import Structure, StructureTable, TableMatch
from ..errors import UserError


@dataclass
class Volume:
    """A 3D image on a physical grid (LPS, mm). ``array`` is indexed [k, j, i]."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.array.shape}")

    # --- geometry -------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int, int]:
        """Grid size in (i, j, k) order, as SimpleITK's GetSize()."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous voxel indices (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def lps_to_index(self) -> np.ndarray:
        """4x4 matrix mapping LPS mm to continuous voxel indices (i, j, k)."""
        return np.linalg.inv(self.index_to_lps())

    def voxel_centres_lps(self, mask: np.ndarray | None = None) -> np.ndarray:
        """LPS positions (N, 3) of the voxels where ``mask`` (indexed [k, j, i]) is true."""
        if mask is None:
            mask = np.ones(self.array.shape, dtype=bool)
        k, j, i = np.nonzero(mask)
        ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=0).astype(np.float64)
        return (self.index_to_lps() @ ijk1)[:3].T

    def corners_lps(self) -> np.ndarray:
        """LPS positions (8, 3) of the outer corners of the grid (voxel edges, not centres)."""
        i, j, k = self.size
        c = np.array([[a, b, d] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5) for d in (-0.5, k - 0.5)])
        return (self.index_to_lps() @ np.c_[c, np.ones(8)].T)[:3].T

    def same_grid(self, other: "Volume", tol_mm: float = 1e-3) -> bool:
        """True when both volumes share size, spacing, origin and direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def with_array(self, array: np.ndarray, **metadata: Any) -> "Volume":
        """A volume on the same grid with another array."""
        return Volume(array, self.spacing, self.origin, self.direction.copy(), self.source,
                      {**self.metadata, **metadata})

    def grid_description(self) -> dict[str, Any]:
        """JSON-ready description of the grid (recorded in outputs)."""
        desc = {
            "size_ijk": list(self.size),
            "spacing_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "direction": self.direction.round(8).tolist(),
            "source": self.source,
        }
        if "nonfinite" in self.metadata:  # NaN/inf voxels masked at load (io.volumes.load_ct)
            desc["nonfinite"] = self.metadata["nonfinite"]
        return desc

    # --- SimpleITK bridge -----------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk  # lazy: the command line's parser imports these types; --help stays instant

        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, image, source: str = "", metadata: dict | None = None) -> "Volume":
        import SimpleITK as sitk  # lazy: the command line's parser imports these types; --help stays instant

        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
            source,
            dict(metadata or {}),
        )


@dataclass
class LabelMap:
    """Labelled structures on a CT grid, possibly in overlapping layers.

    ``layers`` are int32 arrays indexed [k, j, i]; ``entries`` maps a structure's label value in
    ``table`` to (layer index, value in that layer). A plain label map has one layer where the
    value is the label itself.
    """

    grid: Volume
    layers: list[np.ndarray]
    table: StructureTable
    entries: dict[int, tuple[int, int]]
    match: TableMatch | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def structures(self) -> list[Structure]:
        """Structures present (non-empty), in table order."""
        return [self.table.by_label(lbl) for lbl in sorted(self.entries)]

    def mask(self, structure: Structure | int | str) -> np.ndarray:
        """Boolean mask [k, j, i] of one structure."""
        s = self.resolve(structure)
        layer, value = self.entries[s.label]
        return self.layers[layer] == value

    def resolve(self, structure: Structure | int | str) -> Structure:
        if isinstance(structure, Structure):
            label = structure.label
        elif isinstance(structure, str):
            label = self.table.by_name(structure).label
        else:
            label = int(structure)
        if label not in self.entries:
            s = self.table.find(str(structure)) if isinstance(structure, str) else None
            name = s.name if s else structure
            raise UserError(f"structure '{name}' is not in the label map ({self.grid.source})")
        return self.table.by_label(label)

    def select(self, names=None, kinds=None) -> list[Structure]:
        """Present structures chosen by name (any spelling) and/or kind."""
        if names:
            chosen = [self.resolve(n) for n in names]
        else:
            chosen = self.structures
        if kinds:
            chosen = [s for s in chosen if s.kind in set(kinds)]
        return chosen

    def label_array(self, structures: list[Structure] | None = None) -> np.ndarray:
        """A single int32 label array (value = table label) of the given structures.

        Where layers overlap, later structures win; use :meth:`mask` for exact per-structure work.
        """
        out = np.zeros(self.grid.array.shape, dtype=np.int32)
        for s in structures or self.structures:
            out[self.mask(s)] = s.label
        return out


@dataclass
class Radiograph:
    """A 2D radiograph as displayed: row 0 at the top, column 0 at the left.

    ``pixels`` is float32 (rows, cols) with *more attenuation = brighter* (bone bright, air
    dark) whatever the file's photometric interpretation. ``pixel_spacing`` is
    (row spacing, column spacing) in mm at the detector plane, or None when uncalibrated.
    """

    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    spacing_source: str = "unknown"
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return self.pixel_spacing is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]
