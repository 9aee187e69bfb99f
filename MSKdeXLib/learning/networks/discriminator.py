"""Multi-scale PatchGAN discriminator (LSGAN), returning intermediate features.

Each scale is a PatchGAN (stride-2 4x4 convolutions, leaky ReLU, no batch statistics so that
it is independent of the batch split under DDP); scale ``s`` sees the input average-pooled
``s`` times. The output of each scale is a list of feature maps whose last entry is the
patch score map. Input: normalised channel images (channel / scale), (B, C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PatchDiscriminator(nn.Module):
    """One PatchGAN: returns [feature maps ..., score map]."""

    def __init__(self, in_channels: int, width: int = 32, n_layers: int = 3):
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2))]
        w = width
        for i in range(1, n_layers):
            w2 = min(width * 2 ** i, 8 * width)
            blocks.append(nn.Sequential(nn.Conv2d(w, w2, 4, 2, 1), nn.GroupNorm(1, w2), nn.LeakyReLU(0.2)))
            w = w2
        blocks.append(nn.Sequential(nn.Conv2d(w, w, 3, 1, 1), nn.GroupNorm(1, w), nn.LeakyReLU(0.2)))
        blocks.append(nn.Conv2d(w, 1, 3, 1, 1))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return feats


class MultiScaleDiscriminator(nn.Module):
    """``n_scales`` PatchGANs on the input at full, 1/2, 1/4 ... resolution."""

    def __init__(self, in_channels: int, width: int = 32, n_layers: int = 3, n_scales: int = 2):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_channels, width, n_layers) for _ in range(n_scales))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out
