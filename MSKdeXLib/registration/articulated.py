"""Simulated radiographs of an articulated CT, for testing and benchmarking registration:
bodies (the femurs) seen at their own poses (a hip rotation about the joint centre) without
resampling the CT, and the CT continued past its inferior end so that no artificial edge
appears where the scan stops. Frames: CT LPS mm; poses are 4x4 ``ct_to_camera``."""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from ..projection.geometry import Camera
from ..io.images import Volume
from ..projection.rendering import DRRRenderer
from ..projection.simulate import (SimulationSettings, detect, isocentre_distance_mm, spectrum, split_materials,
                        transmission_poly)


def rotate_about(centre_lps: np.ndarray, rotvec_deg: np.ndarray) -> np.ndarray:
    """4x4 LPS rigid motion: rotation by ``rotvec_deg`` (axis * angle, deg) about ``centre_lps``."""
    r = Rotation.from_rotvec(np.deg2rad(rotvec_deg)).as_matrix()
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = r, centre_lps - r @ centre_lps
    return m


def extend_inferior(ct, labels, keep: list, mm: float = 90.0):
    """The CT continued ``mm`` below its first slice (k = 0) by repeating that slice, so that a
    simulated radiograph shows no artificial soft tissue / air edge where the scan ends:
    voxels of the ``keep`` bodies (the femurs: their shafts continue) are repeated as they are,
    other bone (HU > 150) becomes soft tissue (40 HU). Returns (ct, pad) with ``pad(mask)``
    extending a mask of the original grid. Real radiographs show anatomy the CT lacks: this
    reproduces that, too (the DRR's femurs end where the CT ends)."""
    n = int(round(mm / ct.spacing[2]))
    first = ct.array[0].astype(np.float32).copy()
    femur = np.zeros(first.shape, dtype=bool)
    for b in keep:
        femur |= b.mask(labels)[0]
    first[(first > 150) & ~femur] = 40.0
    arr = np.concatenate([np.repeat(first[None], n, 0), ct.array.astype(np.float32)], 0)
    origin = np.asarray(ct.origin) - ct.direction @ np.array([0.0, 0.0, n * ct.spacing[2]])
    out = Volume(arr, ct.spacing, tuple(origin), ct.direction.copy(), ct.source, dict(ct.metadata))

    def pad(mask: np.ndarray) -> np.ndarray:
        return np.concatenate([np.repeat(mask[:1], n, 0), mask], 0)

    return out, pad


def simulate_articulated(ct, camera: Camera, pose: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]],
                         seed: int = 0) -> np.ndarray:
    """Radiograph (detector codes) of ``ct`` seen at ``pose`` (ct_to_camera), except that the
    voxels of each part (bool mask, own ct_to_camera pose) are rendered at that part's pose - a
    joint that moved between CT and radiograph, with no resampling of the CT. The physics is
    :func:`simulate.simulate_radiograph`'s (two materials, poly-energetic, default detector);
    line integrals of the parts add up. The parts' original place becomes empty (density 0)."""
    settings = SimulationSettings()
    soft, bone = split_materials(ct, settings.bone_hu_range)
    any_part = np.zeros(ct.array.shape, dtype=bool)
    for m, _ in parts:
        any_part |= m
    paths = []
    for vol in (soft, bone):
        arr = np.asarray(vol.array, dtype=np.float32)
        rest = vol.with_array(np.where(any_part, -1000.0, arr).astype(np.float32))
        r = DRRRenderer(rest, camera)
        g_cm2 = 0.1 / r.mu_water_per_mm
        total = r.attenuation(pose)[0].to(torch.float64)
        for m, part_pose in parts:
            part = vol.with_array(np.where(m, arr, -1000.0).astype(np.float32))
            total = total + DRRRenderer(part, camera).attenuation(part_pose)[0].to(torch.float64)
        paths.append(total * g_cm2)
    energies, weights = spectrum(settings.kvp, settings.filtration_mm_al, settings.bin_kev)
    with torch.no_grad():
        trans = transmission_poly(paths[0], paths[1], energies, weights)
        codes, _ = detect(trans, camera, settings, seed, camera.sid_mm / isocentre_distance_mm(ct, pose))
    return codes.cpu().numpy()
