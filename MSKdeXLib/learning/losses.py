"""Training losses of the decomposition network (each switchable through its weight).

Conventions: ``pred``/``target`` are (B, C, H, W). Pixel losses work on *normalised* channels
(channel / channel scale, O(1)); the intensity-sum loss works on physical channels (g or cm^3
per pixel) against the CT-derived truth (g or cm^3). ``mask`` is (B, C) bool/0-1: which
(sample, channel) pairs a loss applies to; a loss with an empty mask is an exact 0 that still
belongs to the autograd graph.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, C) ``values`` over ``mask``; 0 (in the graph) when the mask is empty."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def paired_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error per (sample, channel), averaged over the paired (masked) ones."""
    return _masked_mean((pred - target).abs().mean(dim=(2, 3)), mask)


def _ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation per (B, C) over the spatial axes."""
    a = a - a.mean(dim=(2, 3), keepdim=True)
    b = b - b.mean(dim=(2, 3), keepdim=True)
    num = (a * b).sum(dim=(2, 3))
    den = torch.sqrt((a * a).sum(dim=(2, 3)) * (b * b).sum(dim=(2, 3)) + eps)
    return num / den


def gradient_correlation(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 - GC, GC = mean of the NCCs of the row and column finite differences (0 when identical)."""
    gc = 0.5 * (_ncc(pred[..., 1:, :] - pred[..., :-1, :], target[..., 1:, :] - target[..., :-1, :])
                + _ncc(pred[..., :, 1:] - pred[..., :, :-1], target[..., :, 1:] - target[..., :, :-1]))
    return _masked_mean(1.0 - gc, mask)


def intensity_sum(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None,
                  eps: float = 1e-6, squared: bool = False, form: str = "relative") -> torch.Tensor:
    """Object-wise intensity-sum loss (OWIS): mean_c |sum(pred_c) - truth_c| / truth_c.

    ``form``: "relative" (that), "squared" (mean_c of the squared relative error; also
    ``squared=True``) or "log" (mean_c |log(sum(pred_c) / truth_c)|, symmetric in over- and
    under-estimation). ``pred`` physical channels (B, C, H, W), ``truth`` (B, C) in the same
    units (summed over pixels); ``mask`` (B, C) selects the (sample, channel) pairs averaged.
    Exactly 0 iff every (selected) channel sum equals its truth; > 0 otherwise.
    """
    form = "squared" if squared else form
    sums = pred.double().sum(dim=(2, 3))
    t = truth.double().abs().clamp_min(eps)
    if form == "log":
        err = (torch.log(sums.clamp_min(eps)) - torch.log(t)).abs()
    elif form in ("relative", "squared"):
        err = (sums - truth.double()).abs() / t
        if form == "squared":
            err = err * err
    else:
        raise ValueError(f"unknown intensity-sum form '{form}' (relative, squared or log)")
    return _masked_mean(err, mask).to(pred.dtype)


def lsgan_discriminator(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]],
                        real_label: float = 1.0) -> torch.Tensor:
    """LSGAN discriminator loss over scales: 0.5 * (E(D(real) - a)^2 + E D(fake)^2), with
    ``a = real_label`` (1; below 1 = one-sided label smoothing)."""
    loss = sum(0.5 * ((r[-1] - real_label) ** 2).mean() + 0.5 * (f[-1] ** 2).mean() for r, f in zip(real, fake))
    return loss / len(real)


def lsgan_generator(fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """LSGAN generator loss over scales: E (D(fake) - 1)^2."""
    return sum(((f[-1] - 1) ** 2).mean() for f in fake) / len(fake)


def feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """Unpaired feature matching: L1 between the batch-mean discriminator features of real
    and generated channels (every intermediate layer of every scale; the score map excluded).
    Real features are treated as constants."""
    terms = []
    for r, f in zip(real, fake):
        for fr, ff in zip(r[:-1], f[:-1]):
            terms.append((ff.mean(dim=(0, 2, 3)) - fr.detach().mean(dim=(0, 2, 3))).abs().mean())
    return torch.stack(terms).mean()


def cycle_l1(reconstructed: torch.Tensor, xray: torch.Tensor) -> torch.Tensor:
    """Cycle consistency: L1 between the radiograph rebuilt from the channels and the input."""
    return F.l1_loss(reconstructed, xray)
