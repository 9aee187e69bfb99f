"""Starting poses for registration: the default AP view, paired landmarks (PnP), and a coarse
search over in-plane shift and rotation when nothing is given.

Landmarks file: CSV with columns ``x,y,z,row,col`` (CT LPS mm; radiograph pixel row/column,
0-based, pixel centres at integers), an optional header line, >= 4 rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from ..errors import UserError
from ..projection.geometry import AP_ROTATION, Camera, default_source_to_isocentre, project, rigid
from .similarity import Similarity, image_gradients

MIN_LANDMARKS = 4


def load_landmarks(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(points_lps (N, 3) mm, pixels (N, 2) as (row, col)) from a CSV ``x,y,z,row,col``."""
    p = Path(path)
    if not p.exists():
        raise UserError("landmarks file not found", p)
    rows = []
    with p.open(newline="") as fh:
        for n, rec in enumerate(csv.reader(fh), start=1):
            rec = [v.strip() for v in rec if v.strip() != ""]
            if not rec or rec[0].startswith("#"):
                continue
            try:
                vals = [float(v) for v in rec]
            except ValueError:
                if n == 1 and not rows:
                    continue  # header
                raise UserError(f"line {n}: landmarks need numbers x,y,z,row,col", p) from None
            if len(vals) != 5:
                raise UserError(f"line {n}: expected 5 values x,y,z,row,col, got {len(vals)}", p)
            rows.append(vals)
    if len(rows) < MIN_LANDMARKS:
        raise UserError(f"landmarks need at least {MIN_LANDMARKS} point pairs, got {len(rows)}", p)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, :3], a[:, 3:5]


def _rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    return Rotation.from_rotvec(v).as_matrix()


def solve_pnp(points_lps: np.ndarray, pixels_rc: np.ndarray, camera: Camera,
              initial: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Pose (ct_to_camera 4x4) minimising the reprojection error of paired landmarks, by
    least squares (scipy) on a rotation vector + translation; returns (pose, RMS error in px).

    Starts from ``initial`` or, by default, from AP and PA orientations with the landmarks'
    centroid on the ray through their mean pixel at the default isocentre distance, keeping
    the best solution."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    pix = np.asarray(pixels_rc, dtype=np.float64).reshape(-1, 2)
    if len(pts) != len(pix):
        raise UserError(f"landmarks: {len(pts)} CT points but {len(pix)} pixels")
    if len(pts) < MIN_LANDMARKS:
        raise UserError(f"landmarks need at least {MIN_LANDMARKS} point pairs, got {len(pts)}")
    centroid = pts.mean(0)

    def residual(p):
        pose = rigid(_rotvec_to_matrix(p[:3]), p[3:])
        return (project(camera, pose, pts) - pix).ravel()

    starts = []
    if initial is not None:
        starts.append(np.asarray(initial, dtype=np.float64))
    else:
        d = default_source_to_isocentre(camera)
        k_inv = np.linalg.inv(camera.intrinsics())
        r_mean, c_mean = pix.mean(0)
        ray = k_inv @ np.array([c_mean, r_mean, 1.0])
        target = ray / ray[2] * d
        pa = np.diag([-1.0, 1.0, -1.0]) @ AP_ROTATION  # rotated 180 deg about the image rows
        for rot in (AP_ROTATION, pa):
            starts.append(rigid(rot, target - rot @ centroid))
    best = None
    for s in starts:
        p0 = np.r_[Rotation.from_matrix(s[:3, :3]).as_rotvec(), s[:3, 3]]
        sol = least_squares(residual, p0, method="lm" if len(pts) * 2 >= 6 else "trf",
                            x_scale=np.r_[[0.1] * 3, [10.0] * 3], max_nfev=2000)
        pose = rigid(_rotvec_to_matrix(sol.x[:3]), sol.x[3:])
        depth_ok = np.all((pts @ pose[:3, :3].T + pose[:3, 3])[:, 2] > 0)
        rms = float(np.sqrt(np.mean(sol.fun ** 2)))
        if depth_ok and (best is None or rms < best[1]):
            best = (pose, rms)
    if best is None:
        raise UserError("landmarks: no pose puts the points in front of the source")
    return best


def _rotate_image(img: torch.Tensor, angle_deg: torch.Tensor, centre_rc: tuple[float, float]) -> torch.Tensor:
    """Rotate (H, W) by each angle (A,) about pixel ``centre_rc`` -> (A, H, W), zeros outside."""
    h, w = img.shape
    a = torch.deg2rad(angle_deg.to(img.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    cr, cc = centre_rc
    # output pixel p -> source pixel R^-1 (p - c) + c in (col, row) = (x, y) coordinates
    rows, cols = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    dx, dy = cols - cc, rows - cr
    sx = cos[:, None, None] * dx + sin[:, None, None] * dy + cc
    sy = -sin[:, None, None] * dx + cos[:, None, None] * dy + cr
    grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1)
    return F.grid_sample(img[None, None].expand(len(a), 1, h, w), grid, align_corners=True,
                         padding_mode="zeros")[:, 0]


def _shift_image(img: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """Integer shift of (H, W) so that out[r, c] = img[r - dr, c - dc] (zeros outside)."""
    out = torch.zeros_like(img)
    h, w = img.shape
    rs, rd = (slice(0, h - dr), slice(dr, h)) if dr >= 0 else (slice(-dr, h), slice(0, h + dr))
    cs, cd = (slice(0, w - dc), slice(dc, w)) if dc >= 0 else (slice(-dc, w), slice(0, w + dc))
    out[rd, cd] = img[rs, cs]
    return out


def inplane_search(fixed: torch.Tensor, drr: torch.Tensor, mask: torch.Tensor | None, similarity: Similarity,
                   centre_rc: tuple[float, float], max_angle_deg: float = 20.0, angle_step_deg: float = 2.5,
                   max_shift_px: int | None = None, candidates: int = 4) -> tuple[float, float, float, float]:
    """Best in-plane rotation and shift of a DRR over the radiograph, in 2D.

    For each angle, FFT cross-correlation of the gradient images proposes ``candidates`` shifts,
    each scored with ``similarity`` on the rotated+shifted DRR. Returns
    (angle_deg, shift_rows_px, shift_cols_px, similarity): the radiograph matches the DRR
    rotated by angle about ``centre_rc`` then moved by the shift.
    """
    fixed = torch.as_tensor(fixed, dtype=torch.float32)
    drr = torch.as_tensor(drr, dtype=torch.float32)
    h, w = fixed.shape
    w_mask = torch.ones_like(fixed) if mask is None else torch.as_tensor(mask).to(torch.float32)
    if max_shift_px is None:
        max_shift_px = max(h, w) // 4
    n = int(round(2 * max_angle_deg / angle_step_deg)) + 1
    angles = torch.linspace(-max_angle_deg, max_angle_deg, n) if n > 1 else torch.zeros(1)
    fr, fc = image_gradients(fixed[None])
    fr, fc = fr[0] * w_mask, fc[0] * w_mask
    size = (2 * h, 2 * w)
    ff = [torch.fft.rfft2(g - g[w_mask > 0].mean(), s=size) for g in (fr, fc)]
    rotated = _rotate_image(drr, angles, centre_rc)
    best = (0.0, 0.0, 0.0, -np.inf)
    with torch.no_grad():
        for ai, img in enumerate(rotated):
            mr, mc = image_gradients(img[None])
            corr = sum(torch.fft.irfft2(fa * torch.conj(torch.fft.rfft2(g[0], s=size)), s=size)
                       for fa, g in zip(ff, (mr, mc)))
            # corr[dr, dc] (mod size) = sum fixed(p) moving(p - d)
            dr = torch.fft.fftfreq(size[0], 1.0 / size[0]).round().long()
            dc = torch.fft.fftfreq(size[1], 1.0 / size[1]).round().long()
            ok = (dr.abs()[:, None] <= max_shift_px) & (dc.abs()[None, :] <= max_shift_px)
            corr = torch.where(ok, corr, torch.full_like(corr, -np.inf))
            top = torch.topk(corr.flatten(), candidates).indices
            shifts = [(int(dr[i // size[1]]), int(dc[i % size[1]])) for i in top.tolist()]
            batch = torch.stack([_shift_image(img, a, b) for a, b in shifts])
            s = similarity(fixed, batch, w_mask)
            k = int(torch.argmax(s))
            if float(s[k]) > best[3]:
                best = (float(angles[ai]), float(shifts[k][0]), float(shifts[k][1]), float(s[k]))
    return best


def inplane_params(angle_deg: float, shift_rc_px: tuple[float, float], camera: Camera,
                   depth_mm: float) -> np.ndarray:
    """PoseSpace parameters (rx, ry, rz, tx, ty, tz) for an in-plane rotation and an image shift
    of a body whose centre lies ``depth_mm`` from the source."""
    dr, dc = shift_rc_px
    scale = depth_mm / camera.sid_mm
    return np.array([0.0, 0.0, angle_deg, dc * camera.spacing_col_mm * scale,
                     dr * camera.spacing_row_mm * scale, 0.0])
