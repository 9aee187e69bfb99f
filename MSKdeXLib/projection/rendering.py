"""DRR engine: attenuation DRRs and exact per-structure mass / volume channels (PyTorch).

Frames and units follow :mod:`MSKdeXLib.projection.geometry`: CT points in LPS mm, a pose is the rigid
4x4 ``ct_to_camera`` (camera origin at the source, detector plane z = SID), detector pixels
(row, col) as in :meth:`Camera.pixel_centres_camera`. The same code runs on CPU and CUDA.

Two methods, each chosen for what it must guarantee:

* **Attenuation** (:meth:`DRRRenderer.attenuation`) is a line integral of linear attenuation
  mu = mu_water * max(0, 1 + HU/1000) [1/mm] along each source-to-pixel ray, so it is
  unitless. It is computed by *plane-sampled trilinear ray marching*: the CT axis closest to
  the principal ray is chosen, the volume is seen as a stack of planes perpendicular to it
  (the CT slices, or planes linearly resampled from them when another number of samples per
  ray is asked for), and every ray is sampled where it crosses each plane with bilinear
  interpolation inside the plane. A sample on a plane that is itself a linear interpolation
  of slices is exactly a trilinear sample of the CT, so this *is* trilinear ray marching with
  one sample per plane; but its samples are 2D lookups done by torch's vectorised 2D
  ``grid_sample`` (4 taps, contiguous memory) instead of 3D ones, which is several times
  faster, and the step length along each ray is exact (plane spacing / cosine). Planes are
  processed in chunks, and the only full-size array the renderer keeps is that one plane
  stack of mu (float32, one CT's worth), so memory stays bounded (a few tens of MB beyond it).
  Differentiable w.r.t. the pose (the sample positions are built from it with torch ops).
* **Channels** (:meth:`DRRRenderer.channels`) are made by *voxel splatting* with a
  separable box footprint: the mass (g; muscles: lean voxels only, see
  :func:`MSKdeXLib.anatomy.ct_metrics.mass_weights`) or volume (cm^3) of every voxel of every structure is
  projected through the cone beam and spread over the detector pixels as a uniform rectangle
  centred on the projection of the voxel centre. The rectangle's width along u (columns) is
  max(1, sqrt(sum_a (du/da)^2)) pixels, du/da being the projected length of the voxel's edge
  along CT axis a (linearised at the voxel centre, so perspective is included): the box whose
  variance matches that of the voxel's projected footprint (a convolution of three boxes);
  likewise along v. Each pixel gets the exact overlap of the rectangle with it (the detector
  pixel integrates what falls on it), normalised to sum to one, so
  there are no holes whatever the magnification (a box of width >= 1 pixel always covers its
  neighbours; for voxels smaller than a pixel this is bilinear splatting). A voxel is splatted
  only when its whole rectangle lies on the detector; otherwise it is counted as lost and its
  structure is flagged as not inside. Because every gram lands on some pixel, a channel's
  sum over the detector *equals* the structure's CT mass / volume by construction, for any
  pose that keeps it inside the detector; magnification only changes where the mass lands,
  never how much (a ray integral would need its samples weighted by (distance / SID)^2 to
  achieve the same). The voxel coordinates, per-voxel masses and channel ids of the selected
  structures are gathered once (first call) and kept; each call costs one projection of the
  voxel centres and, per chunk of voxels, one index and one weight tensor of
  (voxels x taps_v x taps_u) and one ``scatter_add`` per quantity into the flattened
  (channel, row, col) canvas: no loop over structures, no supersampling. Differentiable
  w.r.t. the pose too (through the centres, widths and overlaps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..anatomy.ct_metrics import MM3_PER_CM3
from ..anatomy.density import DensityModel
from ..anatomy.quantities import CHANNEL_KINDS, QUANTITY_NAMES
from ..anatomy.structures import Structure
from ..errors import UserError
from ..io.images import Volume
from ..settings import MU_WATER_PER_MM
from .geometry import Camera, ap_pose


#: the renderer's channel kinds ("mass": g per pixel, "volume": cm^3 per pixel); names with units:
#: ``QUANTITY_NAMES`` (both from :mod:`MSKdeXLib.anatomy.quantities`)
QUANTITIES = CHANNEL_KINDS
__all__ = ["MU_WATER_PER_MM", "QUANTITIES", "QUANTITY_NAMES", "ChannelResult", "DRRRenderer", "default_view",
           "isocentre_of", "union_mask"]

# Elements per processing chunk (bounds temporary memory: ~12-24 bytes per element).
# Measured on an idle 2-core Xeon (benchmarks/RESULTS.md, run F): with 1 thread 1 << 18 is best
# (cache-sized); with 2 threads 1 << 19 (pelvis 256^2: 12 ms vs 55 ms with 1 << 22; chest 512^2:
# 0.30 s vs 0.74 s). Larger chunks only pay off on an overloaded machine (fewer OpenMP barriers).
_PLANE_CHUNK_ELEMENTS = 1 << 18
_PLANE_CHUNK_ELEMENTS_MT = 1 << 19
_SPLAT_CHUNK_ELEMENTS = 1 << 20
_SLAB_VOXELS = 1 << 22  # label scans run over slabs of slices of about this many voxels


# ---------------------------------------------------------------------------------------------
# Default view
# ---------------------------------------------------------------------------------------------
def isocentre_of(ct: Volume, labels=None) -> np.ndarray:
    """LPS centre (mm) of the bounding box of the labelled bones.

    Falls back to all labelled voxels when there are no bones, and to the CT's centre when
    ``labels`` is None.
    """
    if labels is not None:
        chosen = labels.select(kinds=["bone"]) or labels.structures
        if chosen:
            mask = union_mask(labels, chosen)
            if mask.any():
                lo, hi = [], []
                for axis in range(3):  # array axes (k, j, i)
                    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                    lo.append(hit[0])
                    hi.append(hit[-1])
                lo_ijk, hi_ijk = np.array(lo[::-1], float), np.array(hi[::-1], float)
                corners = np.array([[a, b, c, 1.0] for a in (lo_ijk[0], hi_ijk[0])
                                    for b in (lo_ijk[1], hi_ijk[1]) for c in (lo_ijk[2], hi_ijk[2])])
                pts = (ct.index_to_lps() @ corners.T)[:3].T
                return (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    return ct.corners_lps().mean(axis=0)


def union_mask(labels, structures) -> np.ndarray:
    """Boolean [k, j, i] mask of the union of ``structures`` (one lookup pass per layer)."""
    mask = np.zeros(labels.grid.array.shape, dtype=bool)
    for layer, lut in _layer_luts(labels, structures).items():
        arr = labels.layers[layer]
        step = max(1, _SLAB_VOXELS // max(1, arr[0].size))
        for k0 in range(0, arr.shape[0], step):  # slabs: no full-size temporaries
            mask[k0:k0 + step] |= np.take(lut, arr[k0:k0 + step], mode="clip")
    return mask


def _layer_luts(labels, structures) -> dict[int, np.ndarray]:
    """Per label layer, a boolean lookup table of the label values of ``structures``."""
    by_layer: dict[int, list[int]] = {}
    for s in structures:
        layer, value = labels.entries[labels.resolve(s).label]
        by_layer.setdefault(layer, []).append(int(value))
    out = {}
    for layer, values in by_layer.items():
        lut = np.zeros(max(int(labels.layers[layer].max()), max(values)) + 2, dtype=bool)
        lut[values] = True  # negative values clip to 0 (background, never selected)
        out[layer] = lut
    return out


def default_view(ct: Volume, labels, camera: Camera, source_to_isocentre_mm: float | None = None
                 ) -> np.ndarray:
    """The default AP pose (4x4 ``ct_to_camera``) centred on the labelled bones."""
    return ap_pose(isocentre_of(ct, labels), camera, source_to_isocentre_mm)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _as_pose_batch(pose, device, dtype=torch.float64) -> torch.Tensor:
    """(B, 4, 4) tensor from a 4x4 / Bx4x4 numpy array or tensor (keeps autograd)."""
    if isinstance(pose, torch.Tensor):
        p = pose.to(device=device)
        if not p.is_floating_point():
            p = p.to(dtype)
    else:
        p = torch.as_tensor(np.asarray(pose, dtype=np.float64), device=device)
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[-2:] != (4, 4):
        raise UserError(f"pose must be 4x4 or Bx4x4, got shape {tuple(p.shape)}")
    return p


def _rigid_inverse(p: torch.Tensor) -> torch.Tensor:
    r, t = p[:, :3, :3], p[:, :3, 3:]
    rt = r.transpose(1, 2)
    top = torch.cat([rt, -rt @ t], dim=2)
    bottom = torch.zeros_like(p[:, 3:, :])
    bottom[:, :, 3] = 1
    return torch.cat([top, bottom], dim=1)


#: a batch's rays are marched only in the detector window where they meet the volume when it holds at
#: most this fraction of the detector
_LIVE_RAYS_MAX_FRACTION = 0.8


def _plane_boxes(planes: torch.Tensor) -> np.ndarray:
    """(n, 4) [x_lo, x_hi, y_lo, y_hi] of each plane of (n, 1, H, W) ``planes``: the open box (voxel
    indices) outside which its bilinear samples are zero (its non-zero voxels' box grown by one
    voxel; ``padding_mode='zeros'``, ``align_corners=True``); NaN for an empty plane."""
    nz = (planes[:, 0] != 0).cpu().numpy()
    out = np.full((nz.shape[0], 4), np.nan)
    for k, plane in enumerate(nz):
        rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
        if rows.size:
            out[k] = (cols[0] - 1.0, cols[-1] + 1.0, rows[0] - 1.0, rows[-1] + 1.0)
    return out


def _chunk_corners(axis: int, pos: torch.Tensor, boxes: np.ndarray, chunk: int) -> tuple[int, list[int], torch.Tensor]:
    """(number of chunks of ``chunk`` planes, the first plane of each chunk with a non-empty
    plane, (K, 8, 4) homogeneous voxel-index corners of each such chunk's box: [first, last plane]
    along ``axis`` x the union of its planes' ``boxes``)."""
    x_ax, y_ax = [a for a in (0, 1, 2) if a != axis]
    starts = list(range(0, len(boxes), chunk))
    corners, kept = [], []
    for m0 in starts:
        b = boxes[m0:m0 + chunk]
        b = b[~np.isnan(b[:, 0])]
        if not len(b):
            continue
        x0, x1, y0, y1 = b[:, 0].min(), b[:, 1].max(), b[:, 2].min(), b[:, 3].max()
        c = np.zeros((8, 4))
        c[:, 3] = 1.0
        c[:, axis] = [float(pos[m0]), float(pos[min(m0 + chunk, len(boxes)) - 1])] * 4
        c[:, x_ax] = [x0, x0, x1, x1] * 2
        c[:, y_ax] = [y0] * 4 + [y1] * 4
        corners.append(c)
        kept.append(m0)
    return len(starts), kept, torch.as_tensor(np.stack(corners) if corners else np.zeros((0, 8, 4)))


def _ray_windows(m: torch.Tensor, camera: Camera, chunks: tuple[int, list[int], torch.Tensor], chunk: int
                 ) -> list | None:
    """Per chunk of ``chunk`` planes, the detector window (r0, r1, c0, c1) holding every ray of the
    (B, 4, 4) poses ``m`` (camera mm -> voxel index) that meets a non-zero sample of the chunk
    (None: the chunk has none): the chunk's samples lie in its box (``chunks``,
    :func:`_chunk_corners`), and a ray meeting it passes through the projection's bounding
    rectangle of the box's 8 corners (grown by a pixel). None when a corner is not in front of the
    source."""
    n, kept, corners = chunks
    out: list = [None] * n
    if not kept:
        return out
    h, w = camera.rows, camera.cols
    with torch.no_grad():
        to_cam = torch.linalg.inv(m.detach().to(device="cpu", dtype=torch.float64))  # (B, 4, 4)
        p = torch.einsum("bij,knj->bkni", to_cam, corners)  # (B, K, 8, 4)
        z = p[..., 2]
        if bool((z <= 1e-6).any()):
            return None
        cx, cy = camera.principal_point
        col = p[..., 0] / z * (camera.sid_mm / camera.spacing_col_mm) + cx
        row = p[..., 1] / z * (camera.sid_mm / camera.spacing_row_mm) + cy
        lo_r = torch.floor(row.amin(dim=(0, 2)) - 1.0).clamp(0, h).long().tolist()
        hi_r = torch.ceil(row.amax(dim=(0, 2)) + 1.0).clamp(-1, h - 1).long().tolist()
        lo_c = torch.floor(col.amin(dim=(0, 2)) - 1.0).clamp(0, w).long().tolist()
        hi_c = torch.ceil(col.amax(dim=(0, 2)) + 1.0).clamp(-1, w - 1).long().tolist()
    for i, m0 in enumerate(kept):
        if lo_r[i] <= hi_r[i] and lo_c[i] <= hi_c[i]:
            out[m0 // chunk] = (lo_r[i], hi_r[i] + 1, lo_c[i], hi_c[i] + 1)
    return out


def _box_overlaps(centre: torch.Tensor, width: torch.Tensor, taps: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap of boxes [centre - width/2, centre + width/2] (pixel units; pixel p spans
    p +- 0.5) with ``taps`` consecutive pixels from the one holding the box's left edge.

    Returns (weights (taps, n) normalised to sum to one per box, first pixel (n,) int64);
    ``taps`` must be >= ceil(max width) + 1. Differentiable in centre and width. Taps are the
    leading axis so that every elementwise operation runs over long contiguous rows.
    """
    lo = centre - 0.5 * width
    hi = lo + width
    first = torch.floor(lo.detach() + 0.5)
    rows = []
    for t in range(taps):  # pixel first + t spans [first + t - 0.5, first + t + 0.5]
        left = first + (t - 0.5)
        rows.append((torch.minimum(hi, left + 1.0) - torch.maximum(lo, left)).clamp_min(0.0))
    ov = torch.stack(rows)
    return ov / ov.sum(0, keepdim=True), first.long()


@dataclass
class ChannelResult:
    """Channels of one splatting pass: ``images[q]`` (B, K, rows, cols) per quantity
    ('mass' in g per pixel, 'volume' in cm^3 per pixel) and ``inside`` (B, K) bool: every
    part of the structure projects inside the detector (so its sums are exact).
    ``footprint_taps``: (rows, cols) of pixels the widest voxel footprint may touch."""

    images: dict
    inside: torch.Tensor
    footprint_taps: tuple[int, int] = (0, 0)


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------
class DRRRenderer:
    """Attenuation DRRs and per-structure mass / volume channels of one CT for one camera.

    ``structures``: the channels, in order (Structure objects or names; default: every
    structure present in ``labels``). ``step_mm``: sample spacing along the dominant CT axis
    for attenuation (default: one sample per CT slice); ``samples_per_ray`` overrides it.
    ``mu_water_per_mm``: linear attenuation of water (1/mm).
    """

    def __init__(self, ct: Volume, camera: Camera, labels=None, structures=None,
                 density: DensityModel = DensityModel(), device="cpu", step_mm: float | None = None,
                 mu_water_per_mm: float = MU_WATER_PER_MM, samples_per_ray: int | None = None):
        if labels is not None and not labels.grid.same_grid(ct):
            raise UserError("label map is not on the CT grid", labels.grid.source or None)
        if step_mm is not None and step_mm <= 0:
            raise UserError(f"step must be positive, got {step_mm} mm")
        if mu_water_per_mm <= 0:
            raise UserError(f"mu_water must be positive, got {mu_water_per_mm} /mm")
        self.ct, self.camera, self.labels, self.density = ct, camera, labels, density
        self.device = torch.device(device)
        self.step_mm, self.samples_per_ray = step_mm, samples_per_ray
        self.mu_water_per_mm = float(mu_water_per_mm)
        if structures is None:
            self.structures: list[Structure] = list(labels.structures) if labels is not None else []
        else:
            if labels is None and len(structures):
                raise UserError("structures need a label map")
            self.structures = [labels.resolve(s) for s in structures]
        self._index_to_lps = torch.as_tensor(ct.index_to_lps(), device=self.device)
        # mu is built per plane stack from ct.array (no persistent [k, j, i] copy: bounded memory)
        self._planes: dict = {}
        self._chunks: dict = {}  # per plane stack and chunk size: the chunks' boxes (_chunk_corners)
        self._rays: dict = {}  # per dtype: what every attenuation call of this camera shares (_ray_constants)
        self._voxels = None

    def share_planes(self, other: "DRRRenderer") -> None:
        """Use ``other``'s cache of plane stacks (a renderer of the same CT for another camera: the
        stacks do not depend on the camera)."""
        if other.ct is not self.ct or other.mu_water_per_mm != self.mu_water_per_mm:
            raise ValueError("plane stacks are shared only between renderers of the same CT")
        self._planes, self._chunks = other._planes, other._chunks

    # --- attenuation ---------------------------------------------------------------------
    def mu_volume(self, structures=(), order: tuple[int, int, int] = (0, 1, 2)) -> torch.Tensor:
        """mu = mu_water * max(0, 1 + HU/1000) [1/mm] as a new float32 tensor, array axes
        [k, j, i] permuted by ``order``; with ``structures``, zero outside their voxels."""
        src = torch.from_numpy(np.asarray(self.ct.array)).permute(order)
        vol = torch.empty(tuple(src.shape), dtype=torch.float32, device=self.device)
        vol.copy_(src)  # one copy of the CT, in the permuted memory order
        vol.mul_(self.mu_water_per_mm / 1000.0).add_(self.mu_water_per_mm).clamp_(min=0.0)
        if structures:
            mask = torch.from_numpy(union_mask(self.labels, structures)).permute(order)
            vol.mul_(mask.to(self.device))
        return vol

    def _plane_stack(self, structures, axis: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(planes (n, 1, H, W), positions (n,) in voxel index units along ``axis``)."""
        key = (tuple(s.label for s in structures), axis, n)
        if key in self._planes:
            return self._planes[key]
        if len(self._planes) >= 2:  # keep memory bounded: at most two stacks cached
            self._planes.pop(next(iter(self._planes)))
        x_ax, y_ax = [a for a in (0, 1, 2) if a != axis]
        vol = self.mu_volume(structures, (2 - axis, 2 - y_ax, 2 - x_ax))  # [axis, y, x]
        size = vol.shape[0]
        if n == size:
            pos = torch.arange(size, dtype=torch.float64, device=self.device)
            planes = vol
        else:  # linear resampling along the axis (zero outside the CT), cell-centred samples
            pos = (torch.arange(n, dtype=torch.float64, device=self.device) + 0.5) * size / n - 0.5
            padded = torch.cat([torch.zeros_like(vol[:1]), vol, torch.zeros_like(vol[:1])])
            p = (pos + 1).clamp(0, size + 1)
            i0 = p.floor().long().clamp(max=size)
            f = (p - i0).to(vol.dtype)[:, None, None]
            planes = padded[i0] * (1 - f) + padded[(i0 + 1).clamp(max=size + 1)] * f
        self._planes[key] = (planes.unsqueeze(1), pos)
        return self._planes[key]

    def ray_samples(self, axis: int) -> int:
        """Attenuation samples per ray when ``axis`` (0 = i, 1 = j, 2 = k) is the dominant CT axis."""
        size = self.ct.array.shape[2 - axis]
        if self.samples_per_ray:
            return int(self.samples_per_ray)
        if self.step_mm:
            return max(2, math.ceil(size * self.ct.spacing[axis] / self.step_mm))
        return size

    def dominant_axis(self, pose) -> int:
        """CT axis (0 = i, 1 = j, 2 = k) most parallel to the principal ray of ``pose`` (4x4)."""
        return self._dominant_axes(_as_pose_batch(pose, "cpu")[:1])[0]

    def attenuation(self, pose, structures: Sequence | None = None) -> torch.Tensor:
        """Line integrals of mu (unitless), (B, rows, cols). Differentiable w.r.t. ``pose``.

        With ``structures`` (names or Structure objects), only their voxels attenuate.
        Assumes the CT lies between the source and the detector. Poses sharing a dominant
        axis are marched together (one ``grid_sample`` per chunk of planes for all of them).
        """
        chosen = [self.labels.resolve(s) for s in structures] if structures else []
        poses = _as_pose_batch(pose, self.device)
        axes = self._dominant_axes(poses)
        if len(set(axes)) == 1:  # one march of the whole batch, no copies (the same values and gradients)
            return self._attenuation_batch(poses, chosen, axes[0])
        out: list = [None] * poses.shape[0]
        for axis in sorted(set(axes)):
            idx = [b for b, a in enumerate(axes) if a == axis]
            drrs = self._attenuation_batch(poses[idx], chosen, axis)
            for j, b in enumerate(idx):
                out[b] = drrs[j]
        return torch.stack(out)

    def _dominant_axes(self, poses: torch.Tensor) -> list[int]:
        """:meth:`dominant_axis` of each of (B, 4, 4) ``poses``."""
        p = poses.detach().to(device="cpu", dtype=torch.float64)
        rays = p[:, 2, :3]  # each pose's principal ray (camera z) in LPS: row 2 of R
        axes = torch.as_tensor(self.ct.direction, dtype=torch.float64)
        return [int(a) for a in torch.argmax((rays @ axes).abs(), dim=1)]

    def _pixels_camera(self, dtype) -> torch.Tensor:
        """(rows, cols, 3) detector pixel centres in camera mm."""
        cam = self.camera
        cx, cy = cam.principal_point
        cols = (torch.arange(cam.cols, dtype=dtype, device=self.device) - cx) * cam.spacing_col_mm
        rows = (torch.arange(cam.rows, dtype=dtype, device=self.device) - cy) * cam.spacing_row_mm
        px = torch.stack(torch.meshgrid(rows, cols, indexing="ij")[::-1], dim=-1)  # (R, C, 2) x, y
        return torch.cat([px, torch.full_like(px[..., :1], cam.sid_mm)], dim=-1)

    def _ray_constants(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(LPS mm -> voxel index 4x4, detector pixel centres (rows, cols, 3) in camera mm, their
        distances from the source (rows, cols) in mm) in ``dtype``: the same for every pose, so
        computed once per renderer and dtype (the values each call computed before)."""
        if dtype not in self._rays:
            pix = self._pixels_camera(dtype)
            self._rays[dtype] = (torch.linalg.inv(self._index_to_lps).to(dtype), pix, pix.norm(dim=-1))
        return self._rays[dtype]

    def _attenuation_batch(self, poses: torch.Tensor, structures, axis: int) -> torch.Tensor:
        """(B, rows, cols) line integrals of (B, 4, 4) ``poses`` whose dominant axis is ``axis``.
        Only the rays that can meet the volume's non-zero samples are marched (:func:`_ray_windows`;
        the others integrate exact zeros), and without a gradient each chunk of planes only its own
        rays: the same sums, in the same order, as marching every ray."""
        cam = self.camera
        n = self.ray_samples(axis)
        planes, pos = self._plane_stack(structures, axis, n)
        x_ax, y_ax = [a for a in (0, 1, 2) if a != axis]
        size = self.ct.array.shape[2 - axis]
        dt = poses.dtype
        # camera -> voxel index (i, j, k)
        lps_to_index, pix, norm = self._ray_constants(dt)  # norm: (R, C) |source -> pixel|
        m = lps_to_index @ _rigid_inverse(poses)  # (B, 4, 4)
        d = torch.einsum("rcj,bij->brci", pix, m[:, :3, :3])  # ray directions source -> pixel, index units
        src = m[:, :3, 3][:, None, None]  # (B, 1, 1, 3)
        nb = poses.shape[0]
        per_chunk = _PLANE_CHUNK_ELEMENTS if torch.get_num_threads() == 1 else _PLANE_CHUNK_ELEMENTS_MT
        chunk = max(1, per_chunk // (nb * cam.rows * cam.cols))  # the whole detector's (the same sums)
        key = (tuple(s.label for s in structures), axis, n, chunk)
        if key not in self._chunks:
            self._chunks[key] = _chunk_corners(axis, pos, _plane_boxes(planes), chunk)
        wins = _ray_windows(m, cam, self._chunks[key], chunk)
        grad = torch.is_grad_enabled() and poses.requires_grad
        r0, r1, c0, c1 = 0, cam.rows, 0, cam.cols
        live = [w for w in wins if w is not None] if wins is not None else []
        if wins is not None and not live and not grad:
            return torch.zeros(nb, cam.rows, cam.cols, dtype=torch.float32, device=self.device)
        if live:
            r0, r1 = min(w[0] for w in live), max(w[1] for w in live)
            c0, c1 = min(w[2] for w in live), max(w[3] for w in live)
        if not live or (r1 - r0) * (c1 - c0) > _LIVE_RAYS_MAX_FRACTION * cam.rows * cam.cols:
            wins, r0, r1, c0, c1 = None, 0, cam.rows, 0, cam.cols  # every ray (a gradient of zeros still has a graph)
        window = (slice(None), slice(r0, r1), slice(c0, c1))
        if not grad:  # the rays of the window alone (with a gradient: every ray's, then the window's:
            d, norm = d[window], norm[r0:r1, c0:c1]  # the gradient's sums stay the same)
        da = d[..., axis]
        q = torch.stack([d[..., x_ax] / da, d[..., y_ax] / da], dim=-1)  # (B, R, C, 2)
        base = torch.stack([src[..., x_ax], src[..., y_ax]], -1) - src[..., axis, None] * q
        extent = torch.tensor([self.ct.array.shape[2 - x_ax] - 1, self.ct.array.shape[2 - y_ax] - 1],
                              dtype=dt, device=self.device).clamp_min(1)
        scale = 2.0 / extent
        base_n, q_n = (base * scale - 1).float(), (q * scale).float()
        # step between planes along the ray, in mm: (plane spacing / |d_axis|) * |source->pixel|
        step = (size / n) * norm / da.abs()
        if grad:
            base_n, q_n, step = base_n[window], q_n[window], step[window]
        h, w = r1 - r0, c1 - c0
        acc = torch.zeros(nb, h, w, dtype=torch.float32, device=self.device)
        posf = pos.float()
        for m0 in range(0, n, chunk):
            p = posf[m0:m0 + chunk]
            if wins is not None and wins[m0 // chunk] is None:
                continue  # no ray meets a non-zero sample of these planes
            if wins is None:
                grid = torch.addcmul(base_n.unsqueeze(0), p[:, None, None, None, None], q_n.unsqueeze(0))
                vals = torch.nn.functional.grid_sample(planes[m0:m0 + chunk], grid.reshape(len(p), nb * h, w, 2),
                                                       mode="bilinear", padding_mode="zeros", align_corners=True)
                acc = acc + vals.sum(dim=(0, 1)).reshape(nb, h, w)
                continue
            a0, a1, b0, b1 = wins[m0 // chunk]
            sub = (slice(None), slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
            grid = torch.addcmul(base_n[sub].unsqueeze(0), p[:, None, None, None, None], q_n[sub].unsqueeze(0))
            vals = torch.nn.functional.grid_sample(planes[m0:m0 + chunk], grid.reshape(len(p), -1, b1 - b0, 2),
                                                   mode="bilinear", padding_mode="zeros", align_corners=True)
            part = vals.sum(dim=(0, 1)).reshape(nb, a1 - a0, b1 - b0)
            if grad:  # out of place (the gradient's graph), adding the zeros of the rest of the window
                acc = acc + torch.nn.functional.pad(part, (b0 - c0, c1 - b1, a0 - r0, r1 - a1))
            else:
                acc[sub] += part
        acc = acc * step.to(acc.dtype)
        if (h, w) != (cam.rows, cam.cols):
            acc = torch.nn.functional.pad(acc, (c0, cam.cols - c1, r0, cam.rows - r1))
        return acc

    # --- channels (voxel splatting) ------------------------------------------------------
    def _voxel_lists(self):
        """Voxel indices (N, 3) float32 (i, j, k), channel ids (N,) int64 and per-voxel mass (N,)
        float32 g of all structures, plus the voxel volume (cm^3). Built once, kept."""
        if self._voxels is None:
            hu = self.ct.array
            voxel_cm3 = self.ct.voxel_volume_mm3 / MM3_PER_CM3
            muscle = np.array([s.kind == "muscle" for s in self.structures])
            idx, ch, mass = [], [], []
            todo = list(enumerate(self.structures))
            while todo:  # rounds, in case two channels share a (layer, value)
                seen, batch, rest = set(), [], []
                for c, s in todo:
                    key = self.labels.entries[s.label]
                    (rest if key in seen else batch).append((c, s))
                    seen.add(key)
                todo = rest
                for layer, lut in _layer_luts(self.labels, [s for _, s in batch]).items():
                    arr = self.labels.layers[layer]
                    code = np.full(lut.size, -1, dtype=np.int64)  # label value -> channel
                    for c, s in batch:
                        lay, value = self.labels.entries[s.label]
                        if lay == layer:
                            code[value] = c
                    step = max(1, _SLAB_VOXELS // max(1, arr[0].size))
                    for k0 in range(0, arr.shape[0], step):  # slabs: no full-size temporaries
                        slab = arr[k0:k0 + step]
                        flat = np.flatnonzero(np.take(lut, slab, mode="clip"))
                        if not flat.size:
                            continue
                        c = code[np.clip(slab.ravel()[flat], 0, None)]
                        h = hu[k0:k0 + step].ravel()[flat].astype(np.float64)
                        g = self.density.density(h) * voxel_cm3
                        g = np.where(muscle[c] & ~self.density.lean(h), 0.0, g)  # lean mass for muscles
                        idx.append(flat + k0 * arr[0].size)
                        ch.append(c)
                        mass.append(g)
            empty = not idx
            flat = np.concatenate(idx) if not empty else np.zeros(0, np.int64)
            nk, nj, ni = hu.shape
            ijk = np.stack([flat % ni, (flat // ni) % nj, flat // (ni * nj)], axis=1).astype(np.float32)
            self._voxels = (torch.as_tensor(ijk, device=self.device),
                            torch.as_tensor(np.concatenate(ch) if not empty else np.zeros(0, np.int64),
                                            device=self.device),
                            torch.as_tensor((np.concatenate(mass) if not empty else np.zeros(0)).astype(np.float32),
                                            device=self.device),
                            float(voxel_cm3))
        return self._voxels

    def _project_voxels(self, pose: torch.Tensor, ijk: torch.Tensor):
        """Voxel centres -> (u, v) pixel coordinates, depth z (mm) and footprint widths (px).

        ``pose``: (4, 4) ct_to_camera. Widths: max(1, sqrt(sum_a (du/da)^2)) with du/da the
        projected voxel edge along index axis a, linearised at the centre (likewise for v).
        """
        cam = self.camera
        fx = cam.sid_mm / cam.spacing_col_mm
        fy = cam.sid_mm / cam.spacing_row_mm
        cx, cy = cam.principal_point
        m = (pose @ self._index_to_lps.to(pose.dtype)).to(torch.float32)
        m3, t = m[:3, :3], m[:3, 3]
        p = torch.addmm(t, ijk, m3.T)
        z = p[:, 2]
        iz = 1.0 / z
        ur, vr = p[:, 0] * iz * fx, p[:, 1] * iz * fy  # relative to the principal point
        # du/da = (fx m3[0, a] - ur m3[2, a]) / z, so sum_a (du/da)^2 is a quadratic in ur with
        # pose-only coefficients: (|fx m3[0]|^2 - 2 ur fx m3[0].m3[2] + ur^2 |m3[2]|^2) / z^2
        e0, e1, e2 = m3[0], m3[1], m3[2]
        b2 = (e2 * e2).sum()
        iz2 = iz * iz
        qu = fx * fx * (e0 * e0).sum() - 2.0 * fx * (e0 * e2).sum() * ur + b2 * ur * ur
        qv = fy * fy * (e1 * e1).sum() - 2.0 * fy * (e1 * e2).sum() * vr + b2 * vr * vr
        wu = torch.sqrt((iz2 * qu).clamp_min(1.0))  # = max(1, sqrt(.)), also guards rounding < 0
        wv = torch.sqrt((iz2 * qv).clamp_min(1.0))
        return ur + cx, vr + cy, z, wu, wv  # widths >= 1 px: no holes

    def footprint_taps(self, pose) -> tuple[int, int]:
        """(rows, cols): pixels the widest voxel footprint may touch for ``pose`` (4x4)."""
        ijk = self._voxel_lists()[0]
        with torch.no_grad():
            _, _, z, wu, wv = self._project_voxels(_as_pose_batch(pose, self.device)[0].detach(), ijk)
            ok = z > 0
            if not bool(ok.any()):
                return (2, 2)
            return (math.ceil(float(wv[ok].max())) + 1, math.ceil(float(wu[ok].max())) + 1)

    def render_channels(self, pose, quantities: Iterable[str] = QUANTITIES) -> ChannelResult:
        """Mass and/or volume channels of all structures in one splatting pass."""
        quantities = tuple(quantities)
        bad = [q for q in quantities if q not in QUANTITIES]
        if bad or not quantities:
            raise UserError(f"unknown channel quantity {bad}; use {QUANTITIES}")
        if not self.structures:
            raise UserError("no structures to render channels of (give a label map)")
        poses = _as_pose_batch(pose, self.device)
        ijk, ch, mass, voxel_cm3 = self._voxel_lists()
        K, R, C = len(self.structures), self.camera.rows, self.camera.cols
        track = torch.is_grad_enabled() and poses.requires_grad
        images, insides, taps_all = [], [], (0, 0)
        for b in range(poses.shape[0]):
            u, v, z, wu, wv = self._project_voxels(poses[b], ijk)
            # whole footprint [u - w/2, u + w/2] on the detector [-0.5, C - 0.5] (pixel c spans c +- 0.5)
            ok = (z > 0) & (u - 0.5 * wu >= -0.5) & (u + 0.5 * wu <= C - 0.5) \
                & (v - 0.5 * wv >= -0.5) & (v + 0.5 * wv <= R - 0.5)
            okf = ok.to(torch.float32)
            lost = torch.zeros(K, dtype=torch.float32, device=self.device).index_add_(0, ch, 1.0 - okf)
            # dropped voxels: a unit footprint at the principal point with zero weight
            cx, cy = self.camera.principal_point
            one = torch.ones_like(wu)
            u, v = torch.where(ok, u, torch.full_like(u, cx)), torch.where(ok, v, torch.full_like(v, cy))
            wu, wv = torch.where(ok, wu, one), torch.where(ok, wv, one)
            nu = math.ceil(float(wu.detach().max())) + 1 if wu.numel() else 2
            nv = math.ceil(float(wv.detach().max())) + 1 if wv.numel() else 2
            taps_all = (max(taps_all[0], nv), max(taps_all[1], nu))
            rp, cp = R + nv, C + nu  # canvas padded so that taps past the last pixel need no clamp
            out = [torch.zeros(K * rp * cp, dtype=torch.float32, device=self.device) for _ in quantities]
            vals = [mass * okf if q == "mass" else okf * voxel_cm3 for q in quantities]
            itype = torch.int32 if K * rp * cp < 2 ** 31 else torch.int64  # int32: less traffic
            tu = torch.arange(nu, device=self.device, dtype=itype)
            tv = torch.arange(nv, device=self.device, dtype=itype)
            tap_offset = (tv[:, None] * cp + tu[None]).reshape(-1, 1)  # (nv * nu, 1)
            chan_base = ch.to(itype) * (rp * cp)
            chunk = max(1 << 12, _SPLAT_CHUNK_ELEMENTS // (nu * nv))
            for v0 in range(0, u.numel(), chunk):
                sl = slice(v0, v0 + chunk)
                ou, c0 = _box_overlaps(u[sl], wu[sl], nu)  # (nu, n), (n,)
                ov, r0 = _box_overlaps(v[sl], wv[sl], nv)  # (nv, n), (n,)
                index = (tap_offset + (chan_base[sl] + (r0 * cp + c0).to(itype))[None]).reshape(-1)
                for qi, val in enumerate(vals):
                    w = ((ov * val[sl][None])[:, None, :] * ou[None, :, :]).reshape(-1)
                    if track:
                        out[qi] = out[qi].index_add(0, index, w)
                    else:
                        out[qi].index_add_(0, index, w)
            images.append(torch.stack([o.reshape(K, rp, cp)[:, :R, :C] for o in out]))
            insides.append(lost == 0)
        stacked = torch.stack(images)  # (B, Q, K, R, C)
        return ChannelResult({q: stacked[:, i] for i, q in enumerate(quantities)},
                             torch.stack(insides), taps_all)  # type: ignore[arg-type]

    def channels(self, pose, quantity: str = "mass") -> torch.Tensor:
        """(B, K, rows, cols): g per pixel ('mass') or cm^3 per pixel ('volume').

        Each channel sums to the structure's ``mskdex metrics`` mass_g / volume_cm3 when the
        structure projects inside the detector (see :meth:`inside_detector`).
        """
        return self.render_channels(pose, (quantity,)).images[quantity]

    def masks(self, pose) -> torch.Tensor:
        """(B, K, rows, cols) bool: pixels that any part of the structure projects onto.

        The support of the volume channel, plus the pixel nearest to every voxel centre's
        projection (so a point of the structure always lands on its mask).
        """
        masks = self.channels(pose, "volume") > 0
        poses = _as_pose_batch(pose, self.device).detach()
        ijk, ch, _, _ = self._voxel_lists()
        K, R, C = len(self.structures), self.camera.rows, self.camera.cols
        with torch.no_grad():
            for b in range(poses.shape[0]):
                u, v, z, _, _ = self._project_voxels(poses[b], ijk)
                u, v = torch.round(u).long(), torch.round(v).long()
                ok = (z > 0) & (u >= 0) & (u < C) & (v >= 0) & (v < R)
                flat_mask = masks[b].reshape(-1)
                flat_mask[(ch * (R * C) + v * C + u)[ok]] = True
                masks[b] = flat_mask.reshape(K, R, C)
        return masks

    def inside_detector(self, pose) -> torch.Tensor:
        """(B, K) bool: every (sub-)voxel of the structure projects inside the detector."""
        return self.render_channels(pose, ("volume",)).inside
