"""Re-simulation of a virtual subject's radiograph with other muscle amounts and another acquisition.

A training-time augmentation for per-muscle specificity (issue 14). A virtual subject's radiograph is
made from two line-integral maps on the detector's pixels (water-like and bone-like paths, g/cm^2,
:func:`~MSKdeXLib.projection.simulate.material_paths`), through the spectrum, the detector and any
vendor processing. A muscle that loses lean mass to fat lowers the water-like path where it projects,
in proportion to its lean-mass channel ``M_k`` (g/pixel): ``dW = -c_k * dM_k`` with ``c_k`` the
subject's own :func:`~MSKdeXLib.learning.cohort.lean_to_water` coefficient (g/cm^2 per g; rendered
from its lean voxels, so depth and magnification are exact; the pixel pattern of a real change is
matched at r ~0.98, see the tests). So one cached anatomy yields radiographs of *any* muscle amounts,
each with a freshly drawn acquisition (kVp, noise, scatter, grid, blur, gamma, collimation, vendor
processing), and targets that scale exactly with them, for a few milliseconds per sample instead of
re-building a subject (~1 s). Pose, size, deformation and fat stay those of the cached subject.

Draws: a muscle's relative change ``a`` (+grow / -shrink, volume and lean mass) and fat infiltration
``i`` (lean fraction; volume kept) come from the cohort's own :class:`~MSKdeXLib.learning.cohort.CohortRanges`
(via :func:`~MSKdeXLib.learning.cohort.sample_subject` with a fresh seed), on top of the subject's own:
lean mass x ``(1 + a)(1 - i)``, volume x ``(1 + a)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..projection.geometry import Camera
from .cohort import (PHYSICS_FORMAT, CohortRanges, SubjectSpec, acquisition_settings, sample_subject,
                     vendor_processing)

#: training option ``data.resimulate`` (documented in training.default_config's ``_doc``)
DEFAULT_RESIMULATE: dict[str, Any] = {"probability": 0.0, "muscles": True, "acquisition": True}


@dataclass
class SubjectPhysics:
    """What a virtual subject's radiograph is made of, on the detector's pixels (rows, cols)."""

    water: torch.Tensor                      # water-like path, g/cm^2, float64
    bone: torch.Tensor                       # bone-like path, g/cm^2, float64
    muscle_mass: dict[str, np.ndarray]       # lean-mass channel per muscle, g/pixel
    atrophy_coefficient: dict[str, float]    # g/cm^2 (summed over pixels) of water path per g of lean -> fat
    infiltration_coefficient: dict[str, float]
    camera: Camera                           # the subject's camera (its SID)
    magnification: float                     # at the isocentre (focal-spot blur)
    spec: SubjectSpec                        # the subject's own draws (acquisition, processing)
    noise_seed: int                          # the seed of its stored radiograph
    ranges: CohortRanges                     # its cohort's ranges (what a re-draw draws from)
    muscles: list[str] = field(default_factory=list)
    lean_mass_g: np.ndarray | None = None    # each muscle's lean mass (g) on the CT it was rendered from, if known


def load_physics(folder: str | Path) -> SubjectPhysics:
    """A cohort subject's :class:`SubjectPhysics` from its folder (``physics.safetensors``,
    ``targets.safetensors``, ``subject.json``, the radiograph's sidecar and the cohort's ``cohort.json``)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    path = folder / "physics.safetensors"
    if not path.exists():
        raise UserError("no physics.safetensors: re-simulation needs a cohort built by this version "
                        "(mskdex cohort writes it)", folder)
    try:
        with safe_open(str(path), "numpy") as fh:
            meta = fh.metadata() or {}
            water, bone = fh.get_tensor("water"), fh.get_tensor("bone")
        if meta.get("format") != PHYSICS_FORMAT:
            raise UserError(f"unknown physics format {meta.get('format')!r}", path)
        with safe_open(str(folder / "targets.safetensors"), "numpy") as fh:
            tmeta = fh.metadata() or {}
            mass = fh.get_tensor("mass")
        doc = json.loads((folder / "subject.json").read_text())
        side = json.loads((folder / doc["files"]["sidecar"]).read_text())
        cohort = json.loads((folder.parent / "cohort.json").read_text())
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise UserError(f"cannot read the subject's physics ({str(exc).splitlines()[0][:120]})", folder) from None
    names = json.loads(tmeta["structures"])
    atrophy = json.loads(meta["lean_to_water_atrophy"])
    return SubjectPhysics(
        water=torch.from_numpy(water), bone=torch.from_numpy(bone),
        muscle_mass={n: mass[names.index(n)] for n in atrophy if n in names},
        atrophy_coefficient=atrophy,
        infiltration_coefficient=json.loads(meta["lean_to_water_infiltration"]),
        camera=Camera.from_dict(json.loads(tmeta["camera"])), magnification=float(json.loads(meta["magnification"])),
        spec=SubjectSpec.from_dict(doc["spec"]), noise_seed=int(side["seed"]),
        ranges=CohortRanges.from_dict(cohort["config"]["ranges"]), muscles=[n for n in atrophy if n in names])


@dataclass
class MuscleDraw:
    """Extra relative changes per muscle: ``change`` (+grow / -shrink: volume and lean mass) and
    ``infiltration`` (fraction of the remaining lean mass that turns fatty; volume kept)."""

    change: dict[str, float] = field(default_factory=dict)
    infiltration: dict[str, float] = field(default_factory=dict)

    def lean_factor(self, name: str) -> float:
        return (1.0 + self.change.get(name, 0.0)) * (1.0 - self.infiltration.get(name, 0.0))

    def volume_factor(self, name: str) -> float:
        return 1.0 + self.change.get(name, 0.0)


def draw(rng: np.random.Generator, physics: SubjectPhysics, muscles: bool = True,
         acquisition: bool = True) -> tuple[MuscleDraw, SubjectSpec]:
    """Muscle changes and an acquisition from the subject's cohort ranges (a fresh
    :func:`sample_subject`); what is not re-drawn stays the subject's own (the SID always does:
    the geometry is cached)."""
    seed, index = (int(v) for v in rng.integers(0, 2**31 - 1, 2))
    fresh = sample_subject(seed, index, physics.muscles, physics.ranges)
    changes = MuscleDraw(dict(fresh.muscle_changes), dict(fresh.infiltration)) if muscles else MuscleDraw()
    spec = physics.spec
    if acquisition:
        acq = {**fresh.acquisition}
        if "sid_mm" in spec.acquisition:
            acq["sid_mm"] = spec.acquisition["sid_mm"]
        spec = SubjectSpec(index=spec.index, seed=spec.seed, acquisition=acq, processing=dict(fresh.processing))
    return changes, spec


def water_change(physics: SubjectPhysics, changes: MuscleDraw) -> torch.Tensor:
    """Change of the water-like path (g/cm^2, detector pixels) when the muscles change by ``changes``."""
    out = torch.zeros_like(physics.water)
    for name, m in physics.muscle_mass.items():
        a, i = changes.change.get(name, 0.0), changes.infiltration.get(name, 0.0)
        if a == 0.0 and i == 0.0:
            continue
        coef = a * physics.atrophy_coefficient[name] - (1.0 + a) * i * physics.infiltration_coefficient[name]
        out += coef * torch.from_numpy(np.asarray(m, dtype=np.float64))
    return out


def resimulate(physics: SubjectPhysics, changes: MuscleDraw | None = None, spec: SubjectSpec | None = None,
               noise_seed: int | None = None) -> np.ndarray:
    """Detector codes (rows, cols, float32) of the subject with ``changes`` under ``spec``'s acquisition
    (default: its own), noise from ``noise_seed`` (default: its own). With neither changes nor a new
    acquisition or seed this reproduces the cohort's stored radiograph exactly."""
    from ..projection.simulate import radiograph_from_paths

    spec = physics.spec if spec is None else spec
    settings = acquisition_settings(spec, physics.camera)
    water = physics.water if changes is None else physics.water + water_change(physics, changes)
    seed = physics.noise_seed if noise_seed is None else int(noise_seed)
    codes = radiograph_from_paths({"water": water, "bone": physics.bone}, physics.camera, settings, seed,
                                  physics.magnification)[0].cpu().numpy()
    if spec.processing:
        codes = vendor_processing(codes, settings.bits, physics.camera.spacing_col_mm, spec.processing)
    return codes


class Resimulator:
    """Re-simulated training samples of a data set's virtual records (``data.resimulate``): the
    record's radiograph is replaced by a re-simulation with fresh draws, its muscle targets and truth
    scaled by the same draws; other records (real ones) pass unchanged."""

    def __init__(self, info, cfg: dict[str, Any]):
        unknown = set(cfg or {}) - set(DEFAULT_RESIMULATE)
        if unknown:
            raise UserError(f"unknown key(s) {sorted(unknown)} in data.resimulate (use {sorted(DEFAULT_RESIMULATE)})")
        self.info, self.cfg = info, {**DEFAULT_RESIMULATE, **(cfg or {})}
        p = float(self.cfg["probability"])
        if not 0.0 <= p <= 1.0:
            raise UserError(f"data.resimulate.probability must be in [0, 1], got {p}")
        self._physics: dict[str, SubjectPhysics] = {}

    @property
    def enabled(self) -> bool:
        return float(self.cfg["probability"]) > 0.0

    def physics(self, record: dict[str, Any]) -> SubjectPhysics | None:
        if record.get("kind") != "virtual" or not record.get("source"):
            return None
        key = str(record["source"])
        if key not in self._physics:
            self._physics[key] = load_physics(key)
        return self._physics[key]

    def __call__(self, record: dict[str, Any], sample: dict[str, torch.Tensor], rng: np.random.Generator
                 ) -> dict[str, torch.Tensor]:
        if not self.enabled or rng.random() >= float(self.cfg["probability"]):
            return sample
        phys = self.physics(record)
        if phys is None:
            return sample
        from .dataset.builder import prepare_radiograph

        changes, spec = draw(rng, phys, bool(self.cfg["muscles"]), bool(self.cfg["acquisition"]))
        codes = resimulate(phys, changes, spec, int(rng.integers(0, 2**31 - 1)))
        cam = phys.camera
        cx, cy = cam.principal_point
        xray = prepare_radiograph(codes, (cam.spacing_row_mm, cam.spacing_col_mm), self.info.image_size,
                                  self.info.normalisation, (cy, cx))
        factor = torch.ones(len(self.info.channels), dtype=torch.float64)
        for j, c in enumerate(self.info.channels):
            if c["structure"] in phys.muscle_mass:
                factor[j] = changes.lean_factor(c["structure"]) if c["quantity"] == "mass_g" \
                    else changes.volume_factor(c["structure"])
        return {**sample, "xray": torch.from_numpy(xray)[None].float(),
                "targets": sample["targets"] * factor.float()[:, None, None], "truth": sample["truth"] * factor}
