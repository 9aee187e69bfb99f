"""Image filters shared by the radiograph simulation and the registration (torch, differentiable).

Units: sigmas in detector pixels, (rows, cols).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def separable_gaussian(x: torch.Tensor, sigma_rc: tuple[float, float], min_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images, sigma (rows, cols) in pixels, edges
    replicated, kernel radius ceil(3 sigma) (at most the image size - 1); an axis whose sigma is
    below ``min_sigma`` is left as it is. Differentiable."""
    for dim, s in ((2, sigma_rc[0]), (3, sigma_rc[1])):
        if s < min_sigma:
            continue
        radius = min(max(1, int(math.ceil(3.0 * s))), x.shape[dim] - 1)
        if radius < 1:
            continue
        t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        k = (k / k.sum()).view(1, 1, -1, 1) if dim == 2 else (k / k.sum()).view(1, 1, 1, -1)
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, pad, mode="replicate"), k)
    return x


def gaussian_blur(img: torch.Tensor, sigma_px: float | tuple[float, float]) -> torch.Tensor:
    """Gaussian blur of a (rows, cols) tensor, sigma in pixels (row, col); edges replicated.

    Large kernels (sigma > 8 px) are applied on a downsampled copy (scatter is smooth)."""
    sr, sc = (sigma_px, sigma_px) if np.isscalar(sigma_px) else sigma_px
    if max(sr, sc) < 0.1:
        return img
    factor = max(1, int(min(sr, sc) // 4)) if min(sr, sc) > 8 else 1
    x = img[None, None]
    if factor > 1:
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(
            x, (0, -img.shape[1] % factor, 0, -img.shape[0] % factor), mode="replicate"), factor)
        sr, sc = sr / factor, sc / factor
    x = separable_gaussian(x, (sr, sc), 0.1)
    if factor > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        x = x[..., :img.shape[0], :img.shape[1]]
    return x[0, 0]
