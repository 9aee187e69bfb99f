"""The ``mskdex drr`` product: an attenuation DRR and exact per-structure channels of a CT, with a
summary that checks each channel's sum against the structure's CT metric.

:func:`render_drr` renders (arrays + summary), :func:`write_drr_outputs` writes ``summary.json``,
``drr.nrrd`` (attenuation line integrals, unitless, 2D with the detector spacing),
``channels.nrrd`` (stack (C, rows, cols), g or cm^3 per pixel, channel c as listed in the summary)
and ``preview.png``; :func:`make_drr` does both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..anatomy.ct_metrics import structure_metrics
from ..anatomy.density import DensityModel
from ..anatomy.quantities import QUANTITY_NAMES
from ..anatomy.structures import Structure
from ..io.images import LabelMap, Volume
from ..io.outputs import atomic_path, output_folder, write_json
from ..visualize import drr_preview
from .geometry import Camera, ap_pose, perturbed_pose
from .rendering import MU_WATER_PER_MM, DRRRenderer, isocentre_of

OUTPUT_FILES = ("summary.json", "drr.nrrd", "channels.nrrd", "preview.png")


@dataclass
class DRRResult:
    """``drr`` (rows, cols) unitless; ``channels`` (C, rows, cols) in g or cm^3 per pixel (None
    without channels), described by ``summary["channels"]``; ``composite`` (K, rows, cols): the
    channels drawn in the preview (mass when rendered)."""

    camera: Camera
    structures: list[Structure]
    drr: np.ndarray
    channels: np.ndarray | None
    composite: np.ndarray | None
    summary: dict

    @property
    def entries(self) -> list[dict]:
        return self.summary["channels"]


def write_detector_image(path: str | Path, array: np.ndarray, camera: Camera, force: bool,
                         meta: dict | None = None) -> None:
    """Write a 2D (rows, cols) or stacked 3D (C, rows, cols) float32 image with the detector's pixel
    spacing (mm), atomically; ``meta``: key/value strings stored in the header."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing((camera.spacing_col_mm, camera.spacing_row_mm) + ((1.0,) if array.ndim == 3 else ()))
    for k, v in (meta or {}).items():
        img.SetMetaData(k, str(v))
    with atomic_path(path, force) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def render_drr(ct: Volume, labels: LabelMap | None, structures: Sequence[Structure], camera: Camera,
               quantities: Sequence[str], density: DensityModel = DensityModel(),
               rotation_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), device="cpu",
               step_mm: float | None = None, mu_water_per_mm: float = MU_WATER_PER_MM,
               on_step: Callable[[str], None] | None = None) -> DRRResult:
    """Attenuation DRR and ``quantities`` ("mass", "volume") channels of ``structures`` at the
    default AP view (isocentre: the labelled bones' centre) moved by ``rotation_deg`` (about the
    patient's L, P, S axes through the isocentre) and ``translation_mm`` (along L, P, S)."""
    step = on_step or (lambda stage: None)
    iso = isocentre_of(ct, labels)
    pose = perturbed_pose(ap_pose(iso, camera), rotation_deg, translation_mm, iso)
    renderer = DRRRenderer(ct, camera, labels, structures, density, device, step_mm, mu_water_per_mm)
    step("loaded")
    with torch.no_grad():
        drr = renderer.attenuation(pose)[0].cpu().numpy()
        step("attenuation")
        result = renderer.render_channels(pose, quantities) if quantities else None
    step("channels")
    metrics = {m.structure.name: m for m in structure_metrics(ct, labels, structures, density)} \
        if quantities else {}
    images = {q: result.images[q][0].cpu().numpy() for q in quantities}
    entries, stack = [], []
    for q in quantities:
        for k, s in enumerate(structures):
            stack.append(images[q][k])
            entries.append({"structure": s.name, "kind": s.kind, "quantity": QUANTITY_NAMES[q],
                            "sum": float(images[q][k].astype(np.float64).sum()),
                            "inside_detector": bool(result.inside[0, k]),
                            "ct_metric": float(getattr(metrics[s.name], QUANTITY_NAMES[q]))})
    axis = renderer.dominant_axis(pose)
    summary = {
        "format": "mskdex-drr/1",
        "geometry": camera.to_dict(),
        "ct_to_camera": np.asarray(pose).tolist(),
        "channels": entries,
        "files": {"drr": "drr.nrrd", "channels": "channels.nrrd" if entries else None, "preview": "preview.png"},
        "settings": {
            "rotation_deg": list(rotation_deg), "translation_mm": list(translation_mm),
            "isocentre_lps_mm": iso.tolist(), "mu_water_per_mm": mu_water_per_mm,
            "attenuation": {"method": "plane-sampled trilinear ray marching", "dominant_axis": axis,
                            "samples_per_ray": renderer.ray_samples(axis), "step_mm": step_mm},
            "channels_method": "voxel splatting (separable box footprint, exact pixel overlaps)",
            "footprint_taps": list(result.footprint_taps) if result else None,
            "density": density.to_dict(),
            "table": labels.table.name if labels is not None else None,
            "device": str(device), "ct": ct.grid_description(),
        },
    }
    comp_q = "mass" if "mass" in quantities else (quantities[0] if quantities else None)
    return DRRResult(camera, list(structures), drr, np.stack(stack) if stack else None,
                     images[comp_q] if comp_q else None, summary)


def write_drr_outputs(out: str | Path, result: DRRResult, title: str = "", force: bool = False) -> Path:
    """Write the four outputs into the folder ``out`` (summary.json last); returns ``out``."""
    out = Path(out)
    cam = result.camera
    write_detector_image(out / "drr.nrrd", result.drr, cam, force, {"quantity": "attenuation line integral (unitless)"})
    if result.entries:
        write_detector_image(out / "channels.nrrd", result.channels, cam, force,
                             {f"channel_{i}": f"{e['structure']}:{e['quantity']}" for i, e in enumerate(result.entries)})
    drr_preview(out / "preview.png", result.drr, result.composite, [s.name for s in result.structures],
                [s.color for s in result.structures], title, force, (cam.spacing_row_mm, cam.spacing_col_mm))
    write_json(out / "summary.json", result.summary, force)
    return out


def make_drr(out: str | Path, ct: Volume, labels: LabelMap | None, structures: Sequence[Structure], camera: Camera,
             quantities: Sequence[str], force: bool = False, on_step: Callable[[str], None] | None = None,
             **render_options) -> DRRResult:
    """:func:`render_drr` then :func:`write_drr_outputs` into the folder ``out`` (new, or ``force``),
    built in a staging folder renamed into place at the end (an error or Ctrl-C leaves nothing);
    ``render_options``: density, rotation_deg, translation_mm, device, step_mm, mu_water_per_mm."""
    with output_folder(out, force, OUTPUT_FILES) as stage:
        result = render_drr(ct, labels, structures, camera, quantities, on_step=on_step, **render_options)
        rot, trans = render_options.get("rotation_deg", (0.0,) * 3), render_options.get("translation_mm", (0.0,) * 3)
        title = f"{ct.source.split('/')[-1]}  rot {tuple(rot)} deg  trans {tuple(trans)} mm"
        write_drr_outputs(stage, result, title, force)
    if on_step:
        on_step("written")
    return result
