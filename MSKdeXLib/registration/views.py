"""What one body is compared with: pyramid levels of the radiograph, the bodies' small volumes
and their DRRs, and per-body detector windows in which the bodies registered before it are a
fixed background.

Frames: detector pixels (row, col) of a :class:`~MSKdeXLib.projection.geometry.Camera`; poses
are 4x4 ``ct_to_camera``; volumes in CT LPS mm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import LabelMap, Volume
from ..projection.geometry import Camera
from ..projection.rendering import DRRRenderer
from ..projection.filters import separable_gaussian
from .bodies import Body, background_groups
from .bodyvolume import body_volume, crop_camera, mask_box, tissue_volume
from .settings import RegistrationSettings
from .similarity import valid_mask

#: key of the tissue volume among the bone volumes (:class:`BodyVolumes`)
TISSUE = ("tissue",)


def pyramid_factors(camera: Camera, coarse_px: int, fine_px: int) -> list[float]:
    """Down-sampling factors, coarse to fine: the finest level has at most ``fine_px`` pixels
    on its long side, each coarser level half as many, the coarsest about ``coarse_px``."""
    long_side = max(camera.rows, camera.cols)
    f = max(1.0, long_side / fine_px)
    factors = [f]
    while long_side / (factors[-1] * 2) >= coarse_px * 0.99:
        factors.append(factors[-1] * 2)
    return factors[::-1]


def resample_to(pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Area-average a (H, W) image onto (rows, cols) covering the same field of view."""
    if tuple(pixels.shape) == (rows, cols):
        return pixels
    return F.adaptive_avg_pool2d(pixels[None, None], (rows, cols))[0, 0]


def working_grid(camera: Camera, pixels: np.ndarray, working_mm: float) -> tuple[Camera, torch.Tensor]:
    """(camera, float32 pixels) of the registration's working grid: a radiograph whose pixels
    are finer than ``working_mm`` is area-averaged by the integer factor that brings them to
    about it (a 2500 x 3000 radiograph at 0.15 mm becomes 250 x 300 at 1.5 mm), in slabs of rows
    so that no full-size float copy is made; the same rays, so poses are unchanged."""
    f = int(np.floor(working_mm / min(camera.spacing_row_mm, camera.spacing_col_mm) + 1e-6))
    if f < 2:
        return camera, torch.as_tensor(np.asarray(pixels, dtype=np.float32))
    rows, cols = camera.rows // f, camera.cols // f
    out = np.empty((rows, cols), dtype=np.float32)
    for r in range(0, rows, 64):
        block = np.asarray(pixels[r * f:min(rows, r + 64) * f, :cols * f], dtype=np.float32)
        out[r:r + 64] = block.reshape(-1, f, cols, f).mean((1, 3))
    cx, cy = camera.principal_point
    cam = Camera(rows, cols, camera.spacing_row_mm * f, camera.spacing_col_mm * f, camera.sid_mm,
                 (cx + 0.5) / f - 0.5, (cy + 0.5) / f - 0.5)
    return cam, torch.from_numpy(out)


def blur_batch(img: torch.Tensor, sigma_px: tuple[float, float]) -> torch.Tensor:
    """Gaussian blur (separable, edges replicated, differentiable) of (B, H, W) images with
    sigma (rows, cols) in pixels; unchanged when both are below 0.05 px."""
    if max(sigma_px) < 0.05:
        return img
    return separable_gaussian(img[:, None], sigma_px, 0.05)[:, 0]


class Level:
    """One pyramid level of the whole detector: its camera, the radiograph and the valid mask."""

    def __init__(self, camera: Camera, pixels: torch.Tensor, settings: RegistrationSettings, device, dtype):
        self.camera, self.source = camera, pixels
        self.fixed = resample_to(pixels, camera.rows, camera.cols).to(device=device, dtype=dtype)
        self.mask = torch.from_numpy(valid_mask(self.fixed.cpu().numpy(), settings.border_px)).to(device)
        self.device, self.dtype = device, dtype


def level_at(levels: list[Level], camera: Camera, factor: float, settings: RegistrationSettings,
             device, dtype) -> Level:
    """A level with pixels ``factor`` times the detector's: one of ``levels`` when it matches,
    else re-sampled from the full radiograph."""
    cam = camera.scaled(factor) if factor > 1.0 else camera
    for lv in levels:
        if lv.camera == cam:
            return lv
    return Level(cam, levels[-1].source, settings, device, dtype)


class BodyVolumes:
    """Bone-only volumes (:func:`~.bodyvolume.body_volume`) per set of structures, and their
    renderers per camera (sharing the volume's plane stacks); built on first use, kept for the whole
    registration."""

    def __init__(self, ct: Volume, labels: LabelMap, settings: RegistrationSettings, device, dtype,
                 bodies: list[Body] = ()):
        self.ct, self.labels, self.s, self.device, self.dtype = ct, labels, settings, device, dtype
        self._vols: dict = {}
        self._renderers: dict = {}
        self._first: dict = {}  # per volume: its first renderer (whose plane stacks the others share)
        #: the structures of every body: not part of the tissue volume
        self.body_structures = list({st.label: st for b in bodies for st in b.structures}.values())

    def renderer(self, structures, camera: Camera) -> DRRRenderer:
        """Renderer of the bone-only volume of ``structures`` (None: the tissue volume)."""
        key = TISSUE if structures is None else tuple(sorted(st.label for st in structures))
        if key not in self._vols:
            max_hu = self.s.max_hu if self.s.max_hu > 0 else None
            fill = self.s.tissue_fill_hu if self.s.soft_tissue else None
            self._vols[key] = (tissue_volume(self.ct, self.labels, self.body_structures, self.s.tissue_mm, max_hu=max_hu,
                                             fill_hu=fill)
                               if structures is None else
                               body_volume(self.ct, self.labels, structures, target_mm=self.s.volume_mm, max_hu=max_hu,
                                           over_hu=fill))
        rkey = (key, camera)
        if rkey not in self._renderers:
            if len(self._renderers) > 24:  # bounded: drop the oldest
                self._renderers.pop(next(iter(self._renderers)))
            r = DRRRenderer(self._vols[key], camera, device=self.device)
            if key in self._first:  # the volume's plane stacks, built for its first camera
                r.share_planes(self._first[key])
            else:
                self._first[key] = r
            self._renderers[rkey] = r
        return self._renderers[rkey]

    def tissue_drr(self, camera: Camera, poses) -> torch.Tensor:
        """(B, rows, cols) DRR of the tissue volume at ``poses``; on a camera with pixels finer than
        ``tissue_drr_mm`` it is rendered on the same field of view with an integer factor fewer
        pixels and bilinearly up-sampled (the same rays' line integrals, interpolated)."""
        f = int(np.floor(self.s.tissue_drr_mm / min(camera.spacing_row_mm, camera.spacing_col_mm) + 1e-6))
        if f < 2:
            return self.drr(None, camera, poses)
        coarse = self.drr(None, camera.scaled(f), poses)
        return F.interpolate(coarse[:, None], size=(camera.rows, camera.cols), mode="bilinear",
                             align_corners=False)[:, 0]

    def drr(self, structures, camera: Camera, poses) -> torch.Tensor:
        """(B, rows, cols) bone-only DRR of ``structures`` at ``poses`` ((B,)4x4); None: of the
        tissue volume."""
        poses = torch.as_tensor(poses)
        if poses.dim() == 2:
            poses = poses[None]
        return self.renderer(structures, camera).attenuation(poses.to(device=self.device, dtype=self.dtype))


class View:
    """What one body is compared with on one level: a detector window (the whole detector, or
    the box around the body's region of interest), the radiograph and mask in it, and the DRR
    of the bodies already registered (fixed background)."""

    def __init__(self, camera: Camera, fixed: torch.Tensor, mask: torch.Tensor, background: torch.Tensor):
        self.camera, self.fixed, self.mask, self.background = camera, fixed, mask, background

    @property
    def shape(self) -> tuple[int, int]:
        return (self.camera.rows, self.camera.cols)


def window(level: Level, own: torch.Tensor, margin_mm: float) -> tuple[Camera, torch.Tensor, torch.Tensor]:
    """(camera, radiograph, mask) of the detector window holding every valid pixel within
    ``margin_mm`` of ``own`` (a body's projection, bool (rows, cols) on ``level``); the whole
    level when nothing is left."""
    cam = level.camera
    k = 2 * int(round(margin_mm / cam.spacing_col_mm)) + 1
    own = own[None, None].float()  # dilated by a k x k square: its rows' maximum, then its columns'
    roi = F.max_pool2d(F.max_pool2d(own, (k, 1), stride=1, padding=(k // 2, 0)), (1, k), stride=1,
                       padding=(0, k // 2))[0, 0] > 0
    roi = roi & level.mask
    b = mask_box(roi.cpu().numpy())
    if b is None:
        return cam, level.fixed, level.mask
    r0, r1, c0, c1 = b
    return crop_camera(cam, r0, r1, c0, c1), level.fixed[r0:r1, c0:c1], roi[r0:r1, c0:c1]


def body_views(body: Body, levels: list[Level], start: np.ndarray, registered: list[tuple[Body, np.ndarray]],
               vols: BodyVolumes, margin_mm: float, settings: RegistrationSettings) -> list[View]:
    """The views of ``body`` on ``levels`` (coarse to fine). With bodies ``registered`` before
    it (and ``margin_mm`` > 0) each is cut to the window within ``margin_mm`` of the body's
    projection at ``start`` and holds their DRR as background: every registered structure not
    in the body at the pose of the last body holding it, and (``soft_tissue``) the tissue at
    the first body's pose."""
    groups = background_groups(body, registered)
    if settings.soft_tissue and registered:  # the tissue (None) stays with the first body
        groups = [(None, registered[0][1])] + groups
    views = []
    with torch.no_grad():
        for lv in levels:
            cam, fixed, mask = lv.camera, lv.fixed, lv.mask
            if registered and margin_mm > 0:
                own = vols.drr(body.structures, cam, torch.as_tensor(start))[0] > 0
                cam, fixed, mask = window(lv, own, margin_mm)
            bg = torch.zeros(1, cam.rows, cam.cols, dtype=lv.dtype, device=lv.device)
            for sts, pose in groups:
                bg = bg + vols.drr(sts, cam, torch.as_tensor(pose))
            views.append(View(cam, fixed, mask, bg))
    return views
