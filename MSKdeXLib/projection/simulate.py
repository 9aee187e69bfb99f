"""Radiograph simulation from a CT: X-ray physics on top of the DRR renderer.

Pipeline (every step settable in :class:`SimulationSettings`; units in the names):

1. **Line integrals** from :class:`MSKdeXLib.projection.rendering.DRRRenderer` (cone beam, LPS mm). The
   renderer integrates mu = mu_water * rho with rho = max(0, 1 + HU/1000).
2. **Attenuation** (Beer-Lambert). ``spectrum="mono"``: transmission T = exp(-integral) at the
   renderer's effective energy. ``spectrum="poly"`` (default): each voxel is split into a
   water-like and a bone-like part, bone mass fraction w = clip((HU - lo) / (hi - lo), 0, 1)
   with (lo, hi) = ``bone_hu_range`` (100, 1000) HU, rendered separately to path densities
   W and B (g/cm^2), and T = sum_E s(E) exp(-(mu/rho)_water(E) W - (mu/rho)_bone(E) B).
   s(E) are the energy-integrating detector's weights (proportional to E * photon fluence)
   of a tungsten spectrum: Kramers' law, fluence per keV ~ (kVp - E) / E, hardened by
   ``filtration_mm_al`` of aluminium (default 2.5 mm, the usual total filtration), in 5 keV
   bins from 15 keV to kVp. Mass attenuation coefficients (cm^2/g) of water, cortical bone
   (ICRU-44) and aluminium are the NIST tables of Hubbell & Seltzer (NISTIR 5632, SRD 126:
   Table 4 'Water, Liquid' and 'Bone, Cortical (ICRU-44)', Table 3 Z = 13; checked value by
   value, :data:`MASS_ATTENUATION_CM2_G`), interpolated log-log. At 75 kVp the mean detected energy is about 43 keV.
3. **Blur**: focal spot (Gaussian, FWHM ``focal_spot_mm`` at the tube, times (M - 1) at the
   detector, M = SID / source-to-isocentre distance), detector unsharpness (sigma
   ``detector_blur_mm``), and **scatter**: S = SPR * G(P), a wide Gaussian (sigma
   ``scatter_sigma_mm``) of the primary P with SPR = f / (1 - f), f = ``scatter_fraction``
   (mean share of scatter in the detected signal). The default f = 0.3 (SPR 0.43) is the
   scatter behind an anti-scatter grid for an adult AP pelvis; without a grid f is about
   0.7-0.8 (set it when simulating grid-less bedside images).
4. **Noise**: quantum noise, Poisson on expected photon counts N0 * (T_blurred + S) with
   N0 = ``photons_per_mm2`` * pixel area (unattenuated field; settable dose), or N0 chosen
   so the relative noise at the median signal in the field equals ``noise_level``; plus
   electronic noise, Gaussian with std ``electronic_noise_photons``.
5. **Detector response**: log transform p = -ln(I / N0) (flat-field corrected), a window
   [lo, hi] of p (``window``, or automatic percentiles of the noise-free image inside the
   field), optional ``gamma``, quantised to ``bits`` (12 to 16) bits: more attenuation =
   brighter. Collimation: pixels outside the ``collimation_mm`` rectangle are zero.

Seeded: the same call with the same ``seed`` gives the same image (a torch.Generator).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..validation import check_finite_fields
from ..io.images import Radiograph, Volume
from ..io.outputs import check_new, write_json
from ..io.radiographs import write_dx_dicom
from .filters import gaussian_blur
from .geometry import Camera, check_rigid
from .rendering import DRRRenderer

#: NIST (Hubbell & Seltzer, SRD 126) mass attenuation coefficients mu/rho (cm^2/g) at ``ENERGIES_KEV``.
ENERGIES_KEV = np.array([10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])
MASS_ATTENUATION_CM2_G = {
    "water": np.array([5.329, 1.673, 0.8096, 0.3756, 0.2683, 0.2269, 0.2059, 0.1837, 0.1707, 0.1505]),
    "bone": np.array([28.51, 9.032, 4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]),
    "aluminium": np.array([26.23, 7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]),
}
AL_DENSITY_G_CM3 = 2.699
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


#: the attenuation models (``SimulationSettings.spectrum``)
SPECTRA = ("poly", "mono")


@dataclass
class SimulationSettings:
    """Acquisition and detector settings of a simulated radiograph (defaults: AP pelvis)."""

    spectrum: str = "poly"                      # "poly" (kVp spectrum) or "mono" (renderer's mu)
    kvp: float = 75.0                           # tube voltage, kV (poly)
    filtration_mm_al: float = 2.5               # total filtration, mm aluminium (poly)
    bin_kev: float = 5.0                        # spectrum bin width, keV (poly)
    bone_hu_range: tuple[float, float] = (100.0, 1000.0)  # bone mass fraction 0 -> 1 over HU
    focal_spot_mm: float = 1.2                  # focal spot FWHM at the tube, mm
    detector_blur_mm: float = 0.15              # detector unsharpness, Gaussian sigma, mm
    scatter_fraction: float = 0.3               # mean scatter share of the signal, 0..<1
    scatter_sigma_mm: float = 30.0              # scatter kernel, Gaussian sigma at detector, mm
    photons_per_mm2: float = 3.0e6              # unattenuated photons / mm^2 at the detector
    noise_level: float | None = None            # if set: relative noise at the median signal
    quantum_noise: bool = True                  # Poisson noise on photon counts
    electronic_noise_photons: float = 20.0      # Gaussian read noise, std in photons / pixel
    bits: int = 12                              # stored bits of the output (12..16)
    window: tuple[float, float] | None = None   # window of -ln(I/N0); None: automatic
    window_percentiles: tuple[float, float] = (0.5, 99.5)  # automatic window, % inside field
    gamma: float = 1.0                          # detector contrast curve exponent
    collimation_mm: tuple[float, float, float, float] | None = None  # x0 x1 y0 y1, detector mm
    # (relative to the principal point: x to image right, y to image bottom)

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if self.spectrum not in SPECTRA:
            raise UserError(f"spectrum must be one of {', '.join(SPECTRA)}, got '{self.spectrum}'")
        if not 20.0 <= float(self.kvp) <= 150.0:
            raise UserError(f"kVp must be within 20..150, got {self.kvp}")
        if self.filtration_mm_al < 0 or self.bin_kev <= 0:
            raise UserError("filtration must be >= 0 mm Al and the spectrum bin > 0 keV")
        lo, hi = self.bone_hu_range
        if not lo < hi:
            raise UserError(f"bone HU range must have low < high, got {self.bone_hu_range}")
        if min(self.focal_spot_mm, self.detector_blur_mm, self.scatter_sigma_mm,
               self.electronic_noise_photons) < 0:
            raise UserError("blur sizes and electronic noise must be >= 0")
        if not 0.0 <= self.scatter_fraction < 1.0:
            raise UserError(f"scatter fraction must be in [0, 1), got {self.scatter_fraction}")
        if self.photons_per_mm2 <= 0:
            raise UserError(f"photons per mm^2 must be positive, got {self.photons_per_mm2}")
        if self.noise_level is not None and not 0.0 < self.noise_level < 1.0:
            raise UserError(f"noise level must be in (0, 1), got {self.noise_level}")
        if not 8 <= int(self.bits) <= 16:
            raise UserError(f"bits must be in 8..16, got {self.bits}")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise UserError(f"window must have low < high, got {self.window}")
        if self.gamma <= 0:
            raise UserError(f"gamma must be positive, got {self.gamma}")
        if self.collimation_mm is not None:
            x0, x1, y0, y1 = self.collimation_mm
            if not (x0 < x1 and y0 < y1):
                raise UserError(f"collimation needs x0 < x1 and y0 < y1, got {self.collimation_mm}")
        self.bits = int(self.bits)
        for name in ("bone_hu_range", "window", "window_percentiles", "collimation_mm"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(float(x) for x in v))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["units"] = {"kvp": "kV", "filtration_mm_al": "mm Al", "photons_per_mm2": "photons/mm^2",
                      "window": "-ln(I/N0)", "collimation_mm": "mm at detector (x0, x1, y0, y1)"}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SimulationSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# Physics on arrays
# --------------------------------------------------------------------------------------------
def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """(mu/rho) in cm^2/g of 'water', 'bone' or 'aluminium', log-log interpolated."""
    table = MASS_ATTENUATION_CM2_G[material]
    e = np.asarray(energy_kev, dtype=np.float64)
    return np.exp(np.interp(np.log(e), np.log(ENERGIES_KEV), np.log(table)))


def spectrum(kvp: float = 75.0, filtration_mm_al: float = 2.5, bin_kev: float = 5.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres keV, detector weights summing to 1) of a filtered tungsten spectrum.

    Photon fluence per keV ~ (kVp - E) / E (Kramers), times exp(-mu_Al(E) rho_Al t);
    weights ~ E * fluence (energy-integrating detector).
    """
    edges = np.arange(15.0, kvp, bin_kev)
    edges = np.append(edges, kvp)
    e = (edges[:-1] + edges[1:]) / 2.0
    fluence = (kvp - e) / e * (edges[1:] - edges[:-1])
    fluence *= np.exp(-mass_attenuation("aluminium", e) * AL_DENSITY_G_CM3 * filtration_mm_al / 10.0)
    w = e * fluence
    return e, w / w.sum()


def transmission_poly(water_g_cm2: torch.Tensor, bone_g_cm2: torch.Tensor, energies_kev: np.ndarray,
                      weights: np.ndarray) -> torch.Tensor:
    """Detected fraction of the unattenuated signal through W g/cm^2 water + B g/cm^2 bone."""
    mw, mb = mass_attenuation("water", energies_kev), mass_attenuation("bone", energies_kev)
    out = torch.zeros_like(water_g_cm2)
    for w, a, b in zip(weights, mw, mb):
        out = out + float(w) * torch.exp(-(float(a) * water_g_cm2 + float(b) * bone_g_cm2))
    return out


def field_mask(camera: Camera, collimation_mm, device="cpu") -> torch.Tensor:
    """Bool (rows, cols): pixel centres inside the collimation rectangle (all when None)."""
    if collimation_mm is None:
        return torch.ones(camera.rows, camera.cols, dtype=torch.bool, device=device)
    x0, x1, y0, y1 = collimation_mm
    cx, cy = camera.principal_point
    x = (torch.arange(camera.cols, dtype=torch.float64, device=device) - cx) * camera.spacing_col_mm
    y = (torch.arange(camera.rows, dtype=torch.float64, device=device) - cy) * camera.spacing_row_mm
    return ((y >= y0) & (y <= y1))[:, None] & ((x >= x0) & (x <= x1))[None, :]


def detect(transmission: torch.Tensor, camera: Camera, settings: SimulationSettings, seed: int,
           magnification: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Detector image (rows, cols) float32 integer codes from a transmission map (0..1).

    Returns (codes, info) with info: photons per pixel N0, window (lo, hi) of -ln(I/N0),
    blur sigmas. See the module docstring for the steps.
    """
    s = settings
    dev = transmission.device
    t = transmission.to(torch.float64)
    if t.dim() != 2:
        raise UserError(f"transmission must be 2D, got shape {tuple(t.shape)}")
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    inside = field_mask(camera, s.collimation_mm, dev)
    px = (camera.spacing_row_mm, camera.spacing_col_mm)
    # focal spot + detector unsharpness on the primary
    focal_sigma = s.focal_spot_mm * FWHM_TO_SIGMA * max(magnification - 1.0, 0.0)
    blur_mm = math.hypot(focal_sigma, s.detector_blur_mm)
    primary = gaussian_blur(t * inside, (blur_mm / px[0], blur_mm / px[1]))
    spr = s.scatter_fraction / (1.0 - s.scatter_fraction)
    scatter = spr * gaussian_blur(primary, (s.scatter_sigma_mm / px[0], s.scatter_sigma_mm / px[1])) \
        if spr > 0 else torch.zeros_like(primary)
    signal = (primary + scatter) * inside  # expected fraction of the open-field photons
    n0 = s.photons_per_mm2 * camera.pixel_area_mm2
    if s.noise_level is not None:
        ref = float(signal[inside].median()) if inside.any() else 1.0
        n0 = 1.0 / (s.noise_level ** 2 * max(ref, 1e-12))
    expected = signal * n0
    counts = torch.poisson(expected, generator=gen) if s.quantum_noise else expected.clone()
    if s.electronic_noise_photons > 0:
        counts = counts + s.electronic_noise_photons * torch.randn(counts.shape, generator=gen,
                                                                   dtype=counts.dtype, device=dev)
    floor = 0.5  # half a photon: keeps the log finite where nothing is detected
    log_att = -torch.log(counts.clamp_min(floor) / n0)
    if s.window is not None:
        lo, hi = s.window
    else:
        ref_att = -torch.log((expected).clamp_min(floor) / n0)
        vals = ref_att[inside] if inside.any() else ref_att.ravel()
        q = torch.tensor([s.window_percentiles[0] / 100.0, s.window_percentiles[1] / 100.0],
                         dtype=vals.dtype, device=dev)
        lo, hi = (float(v) for v in torch.quantile(vals.ravel()[:16_000_000], q))
        if hi - lo < 1e-6:
            hi = lo + 1.0
    top = 2 ** s.bits - 1
    x = ((log_att - lo) / (hi - lo)).clamp(0.0, 1.0) ** (1.0 / s.gamma)
    codes = torch.round(x * top) * inside
    info = {"photons_per_pixel": n0, "window": [lo, hi], "magnification": magnification,
            "blur_sigma_mm": blur_mm, "scatter_to_primary": spr,
            "mean_signal_photons": float(expected[inside].mean()) if inside.any() else 0.0,
            "code_to_attenuation": f"-ln(I/N0) = lo + (code / {top}) ** gamma * (hi - lo)"}
    return codes.to(torch.float32), info


# --------------------------------------------------------------------------------------------
# From the CT
# --------------------------------------------------------------------------------------------
def split_materials(ct: Volume, bone_hu_range: tuple[float, float]) -> tuple[Volume, Volume]:
    """(water-like CT, bone-like CT) whose densities (rho = 1 + HU/1000) add up to the CT's.

    The bone mass fraction of a voxel ramps linearly from 0 to 1 over ``bone_hu_range``."""
    hu = torch.from_numpy(np.asarray(ct.array, dtype=np.float32))
    rho = (1.0 + hu / 1000.0).clamp_min_(0.0)
    lo, hi = bone_hu_range
    rho_bone = ((hu - lo) / (hi - lo)).clamp_(0.0, 1.0).mul_(rho)
    soft = rho.sub_(rho_bone).sub_(1.0).mul_(1000.0).numpy()      # HU of rho * (1 - w)
    bone = rho_bone.sub_(1.0).mul_(1000.0).numpy()                # HU of rho * w
    return ct.with_array(soft, material="water-like"), ct.with_array(bone, material="bone-like")


def isocentre_distance_mm(ct: Volume, pose: np.ndarray, isocentre_lps=None) -> float:
    """Depth (mm) of the isocentre (default: the CT's centre) along the principal ray."""
    iso = ct.corners_lps().mean(axis=0) if isocentre_lps is None else np.asarray(isocentre_lps, float)
    return float((pose @ np.append(iso, 1.0))[2])


def material_paths(ct: Volume, camera: Camera, pose, settings: SimulationSettings,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Line integrals of ``ct`` (HU, LPS) at ``pose`` on the camera's pixels, float64 (rows, cols):
    "poly": {"water": g/cm^2 of the water-like part, "bone": g/cm^2 of the bone-like part}
    (:func:`split_materials`); "mono": {"mu": integral of the renderer's mu, unitless}."""
    with torch.no_grad():
        if settings.spectrum == "mono":
            return {"mu": DRRRenderer(ct, camera, device=device).attenuation(pose)[0].to(torch.float64)}
        soft, bone = split_materials(ct, settings.bone_hu_range)
        r_soft = DRRRenderer(soft, camera, device=device)
        g_cm2 = 0.1 / r_soft.mu_water_per_mm  # integral of mu (1/mm) -> rho * length g/cm^2
        water = r_soft.attenuation(pose)[0].to(torch.float64) * g_cm2
        del r_soft
        bone_path = DRRRenderer(bone, camera, device=device).attenuation(pose)[0].to(torch.float64) * g_cm2
        return {"water": water, "bone": bone_path}


def radiograph_from_paths(paths: dict[str, torch.Tensor], camera: Camera, settings: SimulationSettings,
                          seed: int, magnification: float = 1.0):
    """Detector codes from :func:`material_paths`: the spectrum's transmission, then :func:`detect`.
    Returns (codes, detector info, spectrum energies keV or None, their weights or None)."""
    with torch.no_grad():
        if settings.spectrum == "mono":
            trans = torch.exp(-paths["mu"])
            energies = weights = None
        else:
            energies, weights = spectrum(settings.kvp, settings.filtration_mm_al, settings.bin_kev)
            trans = transmission_poly(paths["water"], paths["bone"], energies, weights)
        codes, info = detect(trans, camera, settings, seed, magnification)
    return codes, info, energies, weights


def simulate_radiograph(ct: Volume, camera: Camera, pose, settings: SimulationSettings | None = None,
                        seed: int = 0, labels=None, device: str | torch.device = "cpu",
                        isocentre_lps=None, paths_out: dict | None = None) -> Radiograph:
    """Simulate the radiograph of ``ct`` (HU, LPS) seen by ``camera`` at ``pose`` (ct_to_camera).

    Returns a :class:`Radiograph` of integer detector codes (float32, bone bright) with
    pixel spacing at the detector and, in ``metadata``, the settings, seed, camera, pose and
    the detector info (window, photons per pixel, magnification). The magnification (focal
    spot blur, DICOM magnification factor) is taken at ``isocentre_lps`` (default: the CT's
    centre). ``labels`` are not needed by the physics; they are accepted for API symmetry.
    ``paths_out`` (a dict), when given, receives the :func:`material_paths` the image was made from.
    """

    settings = settings or SimulationSettings()
    pose = check_rigid(pose.detach().cpu().numpy() if isinstance(pose, torch.Tensor) else pose, "pose")
    dist = isocentre_distance_mm(ct, pose, isocentre_lps)
    if not 0 < dist < camera.sid_mm:
        raise UserError(f"the CT is not between the source and the detector (isocentre at {dist:.0f} mm "
                        f"from the source, SID {camera.sid_mm:.0f} mm)")
    magnification = camera.sid_mm / dist
    with torch.no_grad():
        paths = material_paths(ct, camera, pose, settings, device)
        if paths_out is not None:
            paths_out.update(paths)
        codes, info, energies, weights = radiograph_from_paths(paths, camera, settings, seed, magnification)
    meta = {
        "simulation": settings.to_dict(), "seed": int(seed), "camera": camera.to_dict(),
        "ct_to_camera": pose.tolist(), "detector": info, "ct_source": ct.source,
        "source_to_isocentre_mm": dist,
        "spectrum_kev": None if energies is None else
        {"energies": energies.round(3).tolist(), "weights": weights.round(6).tolist(),
         "mean_kev": float((energies * weights).sum())},
        "photometric": "MONOCHROME2", "modality": "DX", "view_position": "AP",
    }
    return Radiograph(codes.cpu().numpy(), (camera.spacing_row_mm, camera.spacing_col_mm), "simulation",
                      ct.source, meta)


# --------------------------------------------------------------------------------------------
# Writing: DICOM DX + JSON sidecar
# --------------------------------------------------------------------------------------------
def sidecar_path(dicom_path: str | Path) -> Path:
    """FILE.dcm -> FILE.json."""
    return Path(dicom_path).with_suffix(".json")


def write_dicom_dx(path: str | Path, radiograph: Radiograph, camera: Camera | None = None,
                   ct_to_camera=None, settings: SimulationSettings | None = None, seed: int | None = None,
                   force: bool = False, extra: dict | None = None) -> tuple[Path, Path]:
    """Write a simulated radiograph as DICOM DX (``path``) and its JSON sidecar (FILE.json).

    The sidecar holds "geometry" (camera dict), "ct_to_camera" (4x4), "settings", "seed",
    "ct_source" and the detector info; values not given are taken from the radiograph's
    metadata. Both files are checked before either is written (no overwrite without force).
    """

    meta = radiograph.metadata
    cam = camera.to_dict() if camera is not None else meta.get("camera")
    pose = np.asarray(ct_to_camera if ct_to_camera is not None else meta.get("ct_to_camera"), dtype=np.float64)
    sett = settings.to_dict() if settings is not None else meta.get("simulation")
    side = sidecar_path(path)
    if Path(path).suffix.lower() != ".dcm":
        raise UserError("simulated radiographs are written as .dcm", path)
    check_new(path, force)
    check_new(side, force)
    sid = (cam or {}).get("sid_mm")
    dist = meta.get("source_to_isocentre_mm")
    doc = {
        "format": "mskdex-simulated-radiograph/1",
        "dicom": Path(path).name,
        "geometry": cam,
        "ct_to_camera": pose.tolist() if pose.shape == (4, 4) else None,
        "settings": sett,
        "seed": seed if seed is not None else meta.get("seed"),
        "ct_source": meta.get("ct_source", radiograph.source),
        "detector": meta.get("detector"),
        "spectrum_kev": meta.get("spectrum_kev"),
        "source_to_isocentre_mm": dist,
        "pixel_spacing_mm": list(radiograph.pixel_spacing) if radiograph.pixel_spacing else None,
        "frames": "ct_to_camera maps CT LPS mm to the camera frame (origin at the source, +z to the "
                  "detector plane z = SID, +x image columns, +y image rows)",
        **(extra or {}),
    }
    bits = int((sett or {}).get("bits", 16))
    write_dx_dicom(path, radiograph, bits=bits, force=force, kvp=(sett or {}).get("kvp"), sid_mm=sid,
                   sod_mm=dist, series_description="MSKdeX simulated radiograph",
                   image_comments=json.dumps({"seed": doc["seed"], "ct_source": doc["ct_source"]}))
    try:
        write_json(side, doc, force)
    except BaseException:  # an error or Ctrl-C here: never leave the image without its sidecar
        Path(path).unlink(missing_ok=True)
        raise
    return Path(path), side
