"""Image similarity between a radiograph and a (bone-only) DRR, in torch and differentiable.

All measures return one value per moving image, **higher is better**, 1 for identical images
and invariant to an affine contrast change ``a * image + b`` (a > 0) of either image, because
they are built from normalised cross-correlation (NCC). Intensities are unitless (a radiograph's
grey values have an unknown scale; a DRR's line integrals are unitless).

Shapes: ``fixed`` (H, W) - the radiograph; ``moving`` (B, H, W) or (H, W) - DRR(s);
``mask`` (H, W) bool/float or None - pixels that count (collimation edges and invalid pixels
removed, see :func:`valid_mask`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Similarity = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

_EPS = 1e-8


def _prep(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None):
    """(fixed (1,H,W), moving (B,H,W), weights (1,H,W)) as float tensors on moving's device."""
    moving = torch.as_tensor(moving)
    if moving.dim() == 2:
        moving = moving[None]
    dtype = moving.dtype if moving.is_floating_point() else torch.float32
    moving = moving.to(dtype)
    fixed = torch.as_tensor(fixed, device=moving.device).to(dtype)
    if fixed.dim() == 2:
        fixed = fixed[None]
    if mask is None:
        w = torch.ones_like(fixed)
    else:
        w = torch.as_tensor(mask, device=moving.device).to(dtype).reshape(fixed.shape)
        # pixels outside the mask may hold anything (NaN included): zero them
        fixed = torch.where(w > 0, fixed, torch.zeros_like(fixed))
        moving = torch.where(w > 0, moving, torch.zeros_like(moving))
    if fixed.shape[-2:] != moving.shape[-2:]:
        raise ValueError(f"image sizes differ: fixed {tuple(fixed.shape[-2:])}, moving {tuple(moving.shape[-2:])}")
    return fixed, moving, w


def _weighted_ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """NCC over the last two dims with weights ``w`` (broadcast); a flat image gives 0."""
    ws = w.sum(dim=(-2, -1)).clamp_min(_EPS)
    ma = (a * w).sum(dim=(-2, -1)) / ws
    mb = (b * w).sum(dim=(-2, -1)) / ws
    da = a - ma[..., None, None]
    db = b - mb[..., None, None]
    cov = (w * da * db).sum(dim=(-2, -1))
    va = (w * da * da).sum(dim=(-2, -1))
    vb = (w * db * db).sum(dim=(-2, -1))
    return cov / torch.sqrt(va * vb + 1e-30)


def ncc(fixed, moving, mask=None) -> torch.Tensor:
    """Normalised cross-correlation of intensities, (B,)."""
    f, m, w = _prep(fixed, moving, mask)
    return _weighted_ncc(f, m, w)


def image_gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (d/drow, d/dcol) of (B, H, W) images, same size (zero at the border)."""
    gr = torch.zeros_like(img)
    gc = torch.zeros_like(img)
    gr[..., 1:-1, :] = 0.5 * (img[..., 2:, :] - img[..., :-2, :])
    gc[..., :, 1:-1] = 0.5 * (img[..., :, 2:] - img[..., :, :-2])
    return gr, gc


def _gradient_weights(w: torch.Tensor) -> torch.Tensor:
    """Weights for gradient images: a pixel counts only when its 3x3 neighbourhood is valid."""
    inner = torch.zeros_like(w)
    inner[..., 1:-1, 1:-1] = 1.0
    eroded = -F.max_pool2d(-w[:, None], 3, stride=1, padding=1)[:, 0]
    return w * eroded * inner


def gradient_correlation(fixed, moving, mask=None) -> torch.Tensor:
    """Gradient correlation: mean of the NCCs of the row and column derivatives, (B,)."""
    f, m, w = _prep(fixed, moving, mask)
    fr, fc = image_gradients(f)
    mr, mc = image_gradients(m)
    wg = _gradient_weights(w)
    return 0.5 * (_weighted_ncc(fr, mr, wg) + _weighted_ncc(fc, mc, wg))


def _patch_stats(a: torch.Tensor, w: torch.Tensor, patch: int) -> tuple[torch.Tensor, ...]:
    """The fixed image's side of :func:`_local_ncc`: (weight sums, means, variances, regulariser,
    patch weights) of ``a`` (1, H, W) with weights ``w`` per patch."""
    stride = max(1, patch // 2)
    pool = lambda x: F.avg_pool2d(x[:, None], patch, stride=stride)[:, 0].flatten(1)  # noqa: E731
    sw = pool(w).clamp_min(_EPS)
    ma = pool(w * a) / sw
    va = (pool(w * a * a) / sw - ma * ma).clamp_min(0)
    # regularise relative to the whole image's variance: invariant to contrast scaling
    ga = (w * a * a).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp_min(_EPS)
    ea = 1e-6 * ga[:, None] + 1e-30
    weight = pool(w).clamp(0, 1) * torch.sqrt(va.detach())
    return sw, ma, va, ea, weight


def _local_ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, patch: int, stats=None):
    """Per-patch NCC of (B,H,W) images in windows of ``patch`` px (stride patch/2).

    Returns (ncc (B, P), weight (1 or B, P)): a patch's weight is its valid fraction times the
    standard deviation of ``a`` (the fixed image) in it, so flat patches do not count.
    ``stats``: :func:`_patch_stats` of ``a`` and ``w`` when already computed.
    """
    stride = max(1, patch // 2)
    pool = lambda x: F.avg_pool2d(x[:, None], patch, stride=stride)[:, 0].flatten(1)  # noqa: E731
    sw, ma, va, ea, weight = _patch_stats(a, w, patch) if stats is None else stats
    mb = pool(w * b) / sw
    vb = (pool(w * b * b) / sw - mb * mb).clamp_min(0)
    cov = pool(w * a * b) / sw - ma * mb
    gb = (w * b * b).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)).clamp_min(_EPS)
    eb = 1e-6 * gb[:, None] + 1e-30
    r = cov / torch.sqrt((va + ea) * (vb + eb))
    return r, weight


def _fixed_side(f: torch.Tensor, w: torch.Tensor, patch: int) -> tuple:
    """What :func:`patch_gradient_ncc` computes of the fixed image alone: (gradient weights,
    [(derivative, its :func:`_patch_stats`) per direction])."""
    wg = _gradient_weights(w)
    return wg, [(a, _patch_stats(a, wg, patch)) for a in image_gradients(f)]


def _pgncc(m: torch.Tensor, patch: int, side: tuple) -> torch.Tensor:
    wg, fixed = side
    total = 0.0
    for (a, stats), b in zip(fixed, image_gradients(m)):
        r, weight = _local_ncc(a, b, wg, patch, stats)
        total = total + (r * weight).sum(-1) / weight.sum(-1).clamp_min(1e-30)
    return 0.5 * total


def patch_gradient_ncc(fixed, moving, mask=None, patch: int = 16) -> torch.Tensor:
    """Patch-wise gradient NCC: local NCCs of the row and column derivatives in ``patch``-px
    windows, averaged with weights favouring structured patches of the radiograph, (B,)."""
    f, m, w = _prep(fixed, moving, mask)
    patch = int(max(3, min(patch, f.shape[-1], f.shape[-2])))
    return _pgncc(m, patch, _fixed_side(f, w, patch))


class PatchGradientNCC:
    """:func:`patch_gradient_ncc` that keeps the fixed image's side (derivatives, gradient weights,
    patch statistics) of the last ``keep`` (fixed, mask) pairs it met: a registration compares each
    view's radiograph with thousands of DRRs. The moving image's operations are the function's, in
    the same order: the same values and gradients. A pair is recognised by identity, torch's
    in-place version counters, dtype, device and size."""

    def __init__(self, patch: int = 16, keep: int = 8):
        self.patch, self.keep = patch, keep
        self._sides: list = []

    def __call__(self, fixed, moving, mask=None) -> torch.Tensor:
        f, m, w = _prep(fixed, moving, mask)
        patch = int(max(3, min(self.patch, f.shape[-1], f.shape[-2])))
        if not isinstance(fixed, torch.Tensor) or fixed.requires_grad or not (mask is None or isinstance(mask, torch.Tensor)):
            return _pgncc(m, patch, _fixed_side(f, w, patch))
        key = (fixed._version, None if mask is None else mask._version, m.dtype, m.device, tuple(m.shape[-2:]))
        for (fx, mk, k), side in self._sides:
            if fx is fixed and mk is mask and k == key:
                return _pgncc(m, patch, side)
        side = _fixed_side(f, w, patch)
        self._sides = [((fixed, mask, key), side)] + self._sides[:max(0, self.keep - 1)]
        return _pgncc(m, patch, side)


def downsample(img: torch.Tensor, factor: int) -> torch.Tensor:
    """Area-average (…, H, W) by an integer ``factor`` (trailing rows/cols dropped)."""
    if factor == 1:
        return img
    shape = img.shape
    x = img.reshape(-1, 1, *shape[-2:])
    x = F.avg_pool2d(x, factor, stride=factor)
    return x.reshape(*shape[:-2], *x.shape[-2:])


def multiscale(measure: Similarity, scales: tuple[int, ...] = (1, 2, 4)) -> Similarity:
    """A measure averaged over image scales (area-downsampled by each factor in ``scales``)."""

    def fn(fixed, moving, mask=None):
        f, m, w = _prep(fixed, moving, mask)
        vals = []
        for s in scales:
            if min(f.shape[-2:]) // s < 32:
                continue
            ws = downsample(w, s)
            vals.append(measure(downsample(f, s)[0], downsample(m, s), (ws > 0.999).to(m.dtype)[0]))
        return torch.stack(vals).mean(0)

    return fn


#: names accepted by :func:`get_similarity`
MEASURES = ("ncc", "gc", "pgncc", "ms-pgncc", "ms-gc")


def get_similarity(name: str, patch: int = 16) -> Similarity:
    """A similarity measure by name: ncc, gc (gradient correlation), pgncc (patch gradient NCC),
    ms-pgncc / ms-gc (multi-scale versions)."""
    if name == "ncc":
        return ncc
    if name == "gc":
        return gradient_correlation
    if name == "pgncc":
        return PatchGradientNCC(patch)
    if name == "ms-pgncc":
        return multiscale(lambda f, m, w=None: patch_gradient_ncc(f, m, w, patch))
    if name == "ms-gc":
        return multiscale(gradient_correlation)
    raise ValueError(f"unknown similarity '{name}'; use one of {MEASURES}")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def valid_mask(pixels: np.ndarray, border_px: int = 2, rel_tol: float = 1e-3) -> np.ndarray:
    """Pixels of a radiograph that take part in the similarity, bool (H, W).

    Removes non-finite pixels, a ``border_px`` margin, and collimation: outer rows/columns that
    are (nearly) constant - shutters and burned-in blank borders carry no anatomy.
    """
    img = np.asarray(pixels, dtype=np.float64)
    ok = np.isfinite(img)
    h, w = img.shape
    if not ok.any():
        return ok
    vals = np.where(ok, img, np.nan)
    tol = rel_tol * (np.nanstd(vals) + 1e-12)
    row_flat = np.nan_to_num(np.nanstd(vals, axis=1), nan=0.0) <= tol
    col_flat = np.nan_to_num(np.nanstd(vals, axis=0), nan=0.0) <= tol
    r0 = int(np.argmin(row_flat)) if not row_flat.all() else h
    r1 = h - int(np.argmin(row_flat[::-1])) if not row_flat.all() else 0
    c0 = int(np.argmin(col_flat)) if not col_flat.all() else w
    c1 = w - int(np.argmin(col_flat[::-1])) if not col_flat.all() else 0
    box = np.zeros_like(ok)
    box[r0 + border_px:max(r0 + border_px, r1 - border_px), c0 + border_px:max(c0 + border_px, c1 - border_px)] = True
    return ok & box
