"""Radiographs from a forward model this project did not write, for measuring registration
without an "inverse crime" (benchmarks and tests only: DiffDRR is not a dependency of MSKdeXLib).

* Line integrals by **DiffDRR's Siddon ray tracer** (:class:`diffdrr.renderers.Siddon`, DiffDRR
  0.6.1, MIT; exact ray / voxel intersection lengths, nearest-voxel values), not by this
  project's plane-sampled trilinear :class:`MSKdeXLib.projection.rendering.DRRRenderer`. Only
  ``diffdrr.renderers`` is imported (it needs torch alone), so DiffDRR's other dependencies
  (torchvision, kornia ...) are not needed. Each volume is rendered at its own pose: the
  (moved) soft tissue at the first body's pose, every body's bone at its pose
  (:func:`siddon_line_integral`); line integrals add.
* A **detector chain unlike** ``MSKdeXLib.projection.simulate``'s (:class:`DetectorChain`):
  one HU -> attenuation map at another effective energy with bone relatively more attenuating,
  beam hardening on the line integral, anode heel effect, a two-Gaussian scatter kernel with a
  higher scatter-to-primary ratio, quantum noise at a clinical dose, scintillator spread (two
  Gaussians) applied to the noisy quanta, electronic noise, and vendor-style processing: log,
  unsharp-mask edge enhancement, dynamic-range compression, a sigmoid look-up table, 10 bits,
  and electronic shutters (collimation) that hide the CT's cut ends (:func:`shutters_hiding`).

Frames: CT LPS mm; a pose is the 4x4 ``ct_to_camera`` (camera origin at the source, detector
plane z = SID, :class:`~MSKdeXLib.projection.geometry.Camera`); pixels (row, col).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from diffdrr.renderers import Siddon
from scipy import ndimage

from MSKdeXLib.io.images import Volume
from MSKdeXLib.projection.geometry import Camera, invert_rigid, project

#: effective linear attenuation of water of the foreign model (1/mm, about 60 keV; ours: 0.02)
MU_WATER_FOREIGN = 0.0206


def mu_of_hu(hu: np.ndarray, bone_gain: float = 1.3, mu_water: float = MU_WATER_FOREIGN) -> np.ndarray:
    """Linear attenuation (1/mm) of CT numbers at the foreign model's effective energy: water-
    like below 0 HU, and above it CT numbers count ``bone_gain`` times (calcium attenuates
    relatively more at a radiograph's energy than at a CT's)."""
    hu = np.asarray(hu, dtype=np.float32)
    rel = np.where(hu > 0, 1.0 + bone_gain * hu / 1000.0, 1.0 + hu / 1000.0)
    return (mu_water * np.maximum(rel, 0.0)).astype(np.float32)


def siddon_line_integral(mu: Volume, camera: Camera, pose: np.ndarray, chunk_rays: int = 8192) -> np.ndarray:
    """(rows, cols) line integral of ``mu.array`` (1/mm, indexed [k, j, i]) along every
    source-to-pixel ray of ``camera`` with the volume at ``pose`` (ct_to_camera), by DiffDRR's
    Siddon renderer (voxel centres at integer indices, ``voxel_shift`` 0.5)."""
    to_index = np.linalg.inv(mu.index_to_lps()) @ invert_rigid(np.asarray(pose, dtype=np.float64))
    pix = camera.pixel_centres_camera().reshape(-1, 3)
    target = pix @ to_index[:3, :3].T + to_index[:3, 3]
    source = np.broadcast_to(to_index[:3, 3], target.shape)
    length_mm = np.linalg.norm(pix, axis=1)   # source (camera origin) to pixel, mm
    vol = torch.from_numpy(np.ascontiguousarray(np.asarray(mu.array, dtype=np.float32).transpose(2, 1, 0)))
    siddon = Siddon(voxel_shift=0.5, mode="nearest")
    out = np.empty(len(pix), dtype=np.float64)
    with torch.no_grad():
        for a in range(0, len(pix), chunk_rays):
            s = torch.from_numpy(np.ascontiguousarray(source[a:a + chunk_rays], dtype=np.float32))[None]
            t = torch.from_numpy(np.ascontiguousarray(target[a:a + chunk_rays], dtype=np.float32))[None]
            out[a:a + chunk_rays] = siddon(vol, s, t, None)[0, 0].double().numpy()
    return (out * length_mm).reshape(camera.rows, camera.cols)


def gaussian_mm(img: np.ndarray, sigma_mm: float, camera: Camera) -> np.ndarray:
    """Gaussian blur with sigma in mm at the detector (edges reflected)."""
    return ndimage.gaussian_filter(img, (sigma_mm / camera.spacing_row_mm, sigma_mm / camera.spacing_col_mm),
                                   mode="reflect")


@dataclass
class DetectorChain:
    """Acquisition and vendor processing of the foreign model (see the module doc).
    :meth:`sample` draws one per trial."""

    beam_hardening: float = 0.04      # effective path = p / (1 + beam_hardening * p)
    heel: float = 0.08                # relative intensity change across the rows (anode heel effect)
    spr: float = 0.8                  # scatter-to-primary ratio at the field centre
    scatter_sigmas_mm: tuple[float, float] = (25.0, 80.0)
    photons_per_mm2: float = 8.0e4    # unattenuated quanta at the detector: a few hundred per mm^2
                                      # behind the pelvis (about 2.5 uGy at ~70 kVp)
    spread_mm: tuple[float, float] = (0.15, 0.9)   # scintillator spread: narrow / wide Gaussian
    spread_wide_share: float = 0.25
    electronic_noise: float = 3.0     # read noise, std in quanta per pixel
    unsharp_mm: float = 4.0           # edge enhancement: sigma of the low-pass, mm
    unsharp_gain: float = 0.8
    drc_mm: float = 40.0              # dynamic-range compression: sigma of the low-pass, mm
    drc_gain: float = 0.5
    lut_slope: float = 4.0            # sigmoid look-up table steepness (over the windowed range)
    bits: int = 10

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "DetectorChain":
        """A random acquisition / processing (one per trial)."""
        return cls(beam_hardening=rng.uniform(0.02, 0.06), heel=rng.uniform(-0.12, 0.12), spr=rng.uniform(0.4, 1.2),
                   photons_per_mm2=float(np.exp(rng.uniform(np.log(3.0e4), np.log(2.0e5)))),
                   unsharp_mm=rng.uniform(2.0, 6.0), unsharp_gain=rng.uniform(0.3, 1.5),
                   drc_mm=rng.uniform(25.0, 60.0), drc_gain=rng.uniform(0.2, 0.7), lut_slope=rng.uniform(2.5, 6.0))

    def to_dict(self) -> dict:
        return asdict(self)

    def acquire(self, path: np.ndarray, camera: Camera, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """(detected quanta per pixel, unattenuated quanta) from the line integral ``path``
        (rows, cols)."""
        rows = np.linspace(-0.5, 0.5, camera.rows)[:, None]
        flat = self.photons_per_mm2 * camera.pixel_area_mm2 * (1.0 + self.heel * 2 * rows) * np.ones((1, camera.cols))
        primary = flat * np.exp(-path / (1.0 + self.beam_hardening * path))
        kernel = 0.6 * gaussian_mm(primary, self.scatter_sigmas_mm[0], camera) \
            + 0.4 * gaussian_mm(primary, self.scatter_sigmas_mm[1], camera)
        expected = primary + self.spr * kernel * primary.mean() / max(kernel.mean(), 1e-12)
        quanta = rng.poisson(np.maximum(expected, 0.0)).astype(np.float64)
        n, w = self.spread_mm
        spread = (1 - self.spread_wide_share) * gaussian_mm(quanta, n, camera) \
            + self.spread_wide_share * gaussian_mm(quanta, w, camera)
        return spread + rng.normal(0.0, self.electronic_noise, spread.shape), flat

    def process(self, quanta: np.ndarray, flat: np.ndarray, camera: Camera, field: np.ndarray) -> np.ndarray:
        """Vendor-style processing to stored values (bone bright); outside ``field`` (bool, the
        shutters) the stored value is 0."""
        log = -np.log(np.maximum(quanta, 0.5) / flat)
        log = log + self.unsharp_gain * (log - gaussian_mm(log, self.unsharp_mm, camera))
        log = log - self.drc_gain * gaussian_mm(log, self.drc_mm, camera)
        lo, hi = np.percentile(log[field], [1.0, 99.0])
        z = (log - 0.5 * (lo + hi)) / max(hi - lo, 1e-9)
        lut = 1.0 / (1.0 + np.exp(-self.lut_slope * z))
        levels = 2 ** self.bits - 1
        return np.where(field, np.round(lut * levels), 0.0).astype(np.float32)


def shutters_hiding(camera: Camera, pose: np.ndarray, end_points: list[np.ndarray], margin_mm: float,
                    extra_mm: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)) -> np.ndarray:
    """Bool (rows, cols) field of electronic shutters (rectangular collimation): rows and
    columns that would show the CT's cut ends are shut. ``end_points``: LPS points of each cut
    end (e.g. the patient's voxels in the first / last slice); each end's projection decides on
    which side (top / bottom / left / right) it lies, and everything beyond its innermost
    projected pixel, plus ``margin_mm``, is shut. ``extra_mm`` (top, bottom, left, right)
    narrows the field further (a tighter collimation)."""
    r0, r1, c0, c1 = 0.0, camera.rows - 1.0, 0.0, camera.cols - 1.0
    centre_r, centre_c = (camera.rows - 1) / 2.0, (camera.cols - 1) / 2.0
    mr, mc = margin_mm / camera.spacing_row_mm, margin_mm / camera.spacing_col_mm
    for pts in end_points:
        rc = project(camera, pose, pts)
        dr, dc = rc[:, 0].mean() - centre_r, rc[:, 1].mean() - centre_c
        if abs(dr) / camera.rows >= abs(dc) / camera.cols:
            if dr < 0:
                r0 = max(r0, rc[:, 0].max() + mr)
            else:
                r1 = min(r1, rc[:, 0].min() - mr)
        elif dc < 0:
            c0 = max(c0, rc[:, 1].max() + mc)
        else:
            c1 = min(c1, rc[:, 1].min() - mc)
    t, b, left, right = extra_mm
    r0, r1 = r0 + t / camera.spacing_row_mm, r1 - b / camera.spacing_row_mm
    c0, c1 = c0 + left / camera.spacing_col_mm, c1 - right / camera.spacing_col_mm
    rr, cc = np.arange(camera.rows)[:, None], np.arange(camera.cols)[None, :]
    return (rr >= r0) & (rr <= r1) & (cc >= c0) & (cc <= c1)


def foreign_radiograph(volumes: list[tuple[Volume, np.ndarray]], camera: Camera, chain: DetectorChain,
                       field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stored radiograph (rows, cols; bone bright, 0 under the shutters) of attenuation volumes
    (``mu`` 1/mm, each with its ``ct_to_camera`` pose): Siddon line integrals added, then
    ``chain``."""
    path = sum(siddon_line_integral(mu, camera, pose) for mu, pose in volumes)
    quanta, flat = chain.acquire(path, camera, rng)
    return chain.process(quanta, flat, camera, field)
