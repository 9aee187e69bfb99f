"""The decomposition generator: a radiograph (1 channel) -> C non-negative channel images.

Backbone: MONAI ``UNet`` (residual units, configurable widths/strides) or ``BasicUNet``. Up-sampling
(``upsample``): "nontrainable" (bilinear resize then a 3x3 convolution: no checkerboard artefacts,
the default of new models) or "deconv" (MONAI's transposed convolutions; model configs written
before this key existed mean "deconv", so old model files still load).
Output channel ``c`` is ``softplus(raw_c) * scale_c``, so it is non-negative and in physical
units per pixel (g or cm^3 per pixel at the model's pixel spacing); ``scale_c`` (stored in the
model config as ``channel_scales``) is the typical per-pixel value of channel ``c`` in the
training data, so the network works on O(1) numbers.

Sum head (``sum_head``; on for new models, off for model configs without the key): instance
normalisation removes each feature map's per-image mean and scale, so the UNet's channel *sums*
barely depend on the image. The sum head is a global branch from the (un-normalised) input
radiograph, area-pooled to ``sum_head_pool`` x ``sum_head_pool``, standardised per pooled
pixel with the training split's mean and SD, and mapped linearly to one log-gain per channel,
``g_c(x) = 2 tanh(z_c / 2)`` (bounded to e^+-2); the output becomes
``softplus(raw_c) * scale_c * exp(g_c(x))``. Its weights start at zero (the model starts as the
plain one), and the intensity-sum loss trains it like a regression of the sums on the pooled
radiograph (measured, 2500 CPU steps: held-out muscle PCC 0.11 -> 0.51 with unpaired muscles,
benchmarks/RESULTS_network.md). Test-time augmentation feeds it the un-augmented input.

Cycle consistency uses a small *learned reconstruction head* (``recon``): two 3x3 convolutions
mapping the normalised channels (``out / scale``) back to the normalised radiograph. It exists
only when the cycle loss is switched on (so no unused parameters under DDP).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...errors import UserError

#: default architecture (JSON-ready); see :func:`build_generator`
DEFAULT_ARCH: dict[str, Any] = {
    "backbone": "unet",            # "unet" (monai.networks.nets.UNet) or "basicunet"
    "features": [32, 64, 128, 256, 512],  # UNet channel widths per level
    "strides": [2, 2, 2, 2],       # UNet down-sampling per level (len(features) - 1)
    "num_res_units": 2,
    "norm": "instance",
    "dropout": 0.0,
    "upsample": "nontrainable",    # "nontrainable" (resize + conv) or "deconv" (transposed conv)
    "recon_head": True,            # cycle consistency head (radiograph <- channels)
    "sum_head": True,              # per-channel log-gain from the pooled radiograph (see module doc)
    "sum_head_pool": 16,           # side of the pooled radiograph the sum head reads
}


class SumHead(nn.Module):
    """Radiograph (B, 1, H, W) -> per-channel log-gain (B, C), bounded to [-2, 2], 0 at init.

    The pooled radiograph is standardised per pooled pixel with the buffers ``mean`` / ``std``
    (set from the training split by :meth:`set_input_stats`; 0 / 1 until then): the subject
    signal is a < 1 % change of the z-scored radiograph, which an un-standardised linear layer
    would need huge weights (hence many optimiser steps) to read."""

    def __init__(self, n_channels: int, pool: int):
        super().__init__()
        self.pool = int(pool)
        n = self.pool * self.pool
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.linear = nn.Linear(n, n_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def features(self, xray: torch.Tensor) -> torch.Tensor:
        """Pooled radiograph (B, pool * pool), not standardised."""
        return F.adaptive_avg_pool2d(xray.float(), self.pool).flatten(1)

    @torch.no_grad()
    def set_input_stats(self, xrays: torch.Tensor) -> None:
        """Standardise with the per-pooled-pixel mean and SD of ``xrays`` (N, 1, H, W)."""
        self.set_feature_stats(self.features(xrays))

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise with the mean and SD over N images of their pooled radiographs
        ``features`` (N, pool * pool, from :meth:`features`); SDs are floored at 5 % of their
        median (a pixel constant in training cannot blow up)."""
        f = features.double()
        sd = f.std(dim=0, unbiased=False) if f.shape[0] > 1 else torch.ones_like(f[0])
        sd = sd.clamp_min(max(0.05 * float(sd.median()), 1e-6))
        self.mean.copy_(f.mean(dim=0).float())
        self.std.copy_(sd.float())

    def forward(self, xray: torch.Tensor) -> torch.Tensor:
        z = self.linear((self.features(xray) - self.mean) / self.std)
        return 2.0 * torch.tanh(0.5 * z)


class ReconstructionHead(nn.Module):
    """Normalised channels (B, C, H, W) -> normalised radiograph (B, 1, H, W)."""

    def __init__(self, n_channels: int, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(n_channels, width, 3, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DecompositionGenerator(nn.Module):
    """Radiograph (B, 1, H, W) -> channels (B, C, H, W) >= 0 in physical units per pixel."""

    def __init__(self, n_channels: int, scales: Sequence[float], arch: dict[str, Any] | None = None):
        super().__init__()
        arch = resolve_arch(arch)
        if len(scales) != n_channels:
            raise UserError(f"need one channel scale per channel ({n_channels}), got {len(scales)}")
        self.arch = arch
        self.n_channels = n_channels
        self.backbone = _backbone(arch, n_channels)
        self.register_buffer("scales", torch.as_tensor(list(scales), dtype=torch.float32).view(1, -1, 1, 1))
        self.recon = ReconstructionHead(n_channels) if arch.get("recon_head") else None
        self.sum_head = SumHead(n_channels, int(arch["sum_head_pool"])) if arch.get("sum_head") else None

    def forward(self, xray: torch.Tensor, reconstruct: bool = False, sum_input: torch.Tensor | None = None):
        """Channels (B, C, H, W); with ``reconstruct`` also the rebuilt radiograph (B, 1, H, W)
        (one forward call, as DistributedDataParallel wants). ``sum_input`` (B, 1, H, W): what
        the sum head reads instead of ``xray`` (test-time augmentation: the un-augmented input,
        since the head reads < 1 % intensity changes that a small shift swamps)."""
        out, gain = self.parts(xray, sum_input)
        if gain is not None:
            out = out * gain[:, :, None, None]
        return (out, self.reconstruct(out)) if reconstruct else out

    def parts(self, xray: torch.Tensor, sum_input: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two factors of the output: the backbone's channels ``softplus(raw) * scale``
        (B, C, H, W), and the sum head's gain ``exp(g(x))`` (B, C), None without a sum head.
        Their channel sums tell where an estimate comes from (benchmarks: backbone vs head)."""
        base = F.softplus(self.backbone(xray).float()) * self.scales
        if self.sum_head is None:
            return base, None
        return base, torch.exp(self.sum_head(xray if sum_input is None else sum_input))

    def reconstruct(self, channels: torch.Tensor) -> torch.Tensor:
        """Radiograph rebuilt from (physical) channels, for the cycle loss."""
        if self.recon is None:
            raise RuntimeError("this generator was built without a reconstruction head")
        return self.recon(channels / self.scales)


UPSAMPLE_MODES = ("nontrainable", "deconv")


def resolve_arch(arch: dict[str, Any] | None) -> dict[str, Any]:
    """``arch`` completed by :data:`DEFAULT_ARCH`; a given arch without ``upsample`` (a model
    config from before that key) keeps the transposed convolutions it was trained with, and one
    without ``sum_head`` has none."""
    given = dict(arch or {})
    if given and "upsample" not in given:
        given["upsample"] = "deconv"
    if given and "sum_head" not in given:
        given["sum_head"] = False
    out = {**DEFAULT_ARCH, **given}
    if out["upsample"] not in UPSAMPLE_MODES:
        raise UserError(f"unknown model.upsample '{out['upsample']}' (use {' or '.join(UPSAMPLE_MODES)})")
    return out


def _resize_unet_class():
    """MONAI's UNet with each transposed convolution replaced by bilinear up-sampling followed
    by a 3x3 convolution (same widths, norm, activation and residual unit as MONAI's up layer)."""
    from monai.networks.blocks import Convolution, ResidualUnit
    from monai.networks.nets import UNet

    class ResizeUNet(UNet):
        def _get_up_layer(self, in_channels: int, out_channels: int, strides: int, is_top: bool) -> nn.Module:
            conv = Convolution(self.dimensions, in_channels, out_channels, strides=1,
                               kernel_size=self.up_kernel_size, act=self.act, norm=self.norm,
                               dropout=self.dropout, bias=self.bias,
                               conv_only=is_top and self.num_res_units == 0, adn_ordering=self.adn_ordering)
            layers = [nn.Upsample(scale_factor=strides, mode="bilinear", align_corners=False), conv]
            if self.num_res_units > 0:
                layers.append(ResidualUnit(self.dimensions, out_channels, out_channels, strides=1,
                                           kernel_size=self.kernel_size, subunits=1, act=self.act,
                                           norm=self.norm, dropout=self.dropout, bias=self.bias,
                                           last_conv_only=is_top, adn_ordering=self.adn_ordering))
            return nn.Sequential(*layers)

    return ResizeUNet


def _backbone(arch: dict[str, Any], n_out: int) -> nn.Module:
    from monai.networks.nets import BasicUNet, UNet

    name = arch["backbone"]
    feats = [int(f) for f in arch["features"]]
    resize = arch.get("upsample", "deconv") == "nontrainable"
    if name == "unet":
        strides = [int(s) for s in arch["strides"]]
        if len(strides) != len(feats) - 1:
            raise UserError(f"model.strides needs {len(feats) - 1} entries (len(features) - 1)")
        cls = _resize_unet_class() if resize else UNet
        return cls(spatial_dims=2, in_channels=1, out_channels=n_out, channels=feats, strides=strides,
                   num_res_units=int(arch["num_res_units"]), norm=arch["norm"],
                   dropout=float(arch["dropout"]))
    if name == "basicunet":
        if len(feats) != 6:
            raise UserError("model.features of 'basicunet' needs 6 widths")
        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=n_out, features=feats,
                         norm=arch["norm"], dropout=float(arch["dropout"]),
                         upsample="nontrainable" if resize else "deconv")
    raise UserError(f"unknown generator backbone '{name}' (use 'unet' or 'basicunet')")


def build_generator(arch: dict[str, Any], n_channels: int, scales: Sequence[float]) -> DecompositionGenerator:
    """A generator from its JSON architecture description."""
    return DecompositionGenerator(n_channels, scales, arch)


def min_image_size(arch: dict[str, Any]) -> int:
    """The image side must be a multiple of this (total down-sampling factor)."""
    arch = resolve_arch(arch)
    if arch["backbone"] == "basicunet":
        return 16
    f = 1
    for s in arch["strides"]:
        f *= int(s)
    return f
