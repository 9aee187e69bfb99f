"""Pictures: grey-level windowing, colour composites of structure channels with a legend,
overlays on a radiograph, and the DRR preview PNG.

Images are 2D arrays in display orientation (row 0 at the top, column 0 at the left); with
the default AP view that is radiological display (patient's right on the image's left, head
up). Colours are RGB 0..255 as in :class:`~MSKdeXLib.anatomy.structures.Structure`. Uses matplotlib's
Agg backend only (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserError
from .io.outputs import atomic_path


def window(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
           mask: np.ndarray | None = None) -> np.ndarray:
    """Grey levels in [0, 1] between two percentiles of ``image`` (float32); the percentiles
    are taken over the ``mask`` pixels when a non-empty mask is given."""
    img = np.asarray(image, dtype=np.float64)
    vals = img[mask] if mask is not None and np.any(mask) else img
    lo, hi = np.percentile(vals, [low_pct, high_pct]) if vals.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``tiles`` x ``tiles`` alternating tiles of two same-shape 2D images (registration QA)."""
    if a.shape != b.shape:
        raise UserError(f"checkerboard needs images of one shape, got {a.shape} and {b.shape}")
    r = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    c = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((r + c) % 2 == 0, a, b)


def colour_composite(channels: np.ndarray, colours: Sequence[Sequence[int]],
                     high_pct: float = 99.0) -> np.ndarray:
    """RGB float image (rows, cols, 3) in [0, 1] from K channels (K, rows, cols).

    Each channel is scaled by the ``high_pct`` percentile of its non-zero pixels, so small
    and large structures are equally visible; overlapping structures mix their colours and
    brightness grows with the summed coverage.
    """
    ch = np.asarray(channels, dtype=np.float64)
    if ch.ndim != 3:
        raise ValueError(f"channels must be (K, rows, cols), got {ch.shape}")
    if len(colours) != ch.shape[0]:
        raise ValueError(f"{ch.shape[0]} channels but {len(colours)} colours")
    alpha = np.zeros_like(ch)
    for k in range(ch.shape[0]):
        nz = ch[k][ch[k] > 0]
        if nz.size:
            alpha[k] = np.clip(ch[k] / max(np.percentile(nz, high_pct), 1e-12), 0.0, 1.0)
    col = np.asarray(colours, dtype=np.float64).reshape(-1, 3) / 255.0
    total = alpha.sum(axis=0)
    mixed = np.einsum("krc,kd->rcd", alpha, col) / np.maximum(total, 1e-12)[..., None]
    return (mixed * np.clip(total, 0.0, 1.0)[..., None]).astype(np.float32)


def overlay(radiograph: np.ndarray, channels: np.ndarray, colours: Sequence[Sequence[int]],
            opacity: float = 0.6) -> np.ndarray:
    """RGB (rows, cols, 3) in [0, 1]: the windowed radiograph with the channel composite on top."""
    grey = window(radiograph)[..., None].repeat(3, axis=-1)
    comp = colour_composite(channels, colours)
    a = opacity * np.clip(comp.max(axis=-1, keepdims=True) * 1.5, 0.0, 1.0)
    return (grey * (1 - a) + comp / np.maximum(comp.max(axis=-1, keepdims=True), 1e-6) * a).astype(np.float32)


def add_legend(ax, names: Sequence[str], colours: Sequence[Sequence[int]], max_rows: int = 24) -> None:
    """A legend of coloured squares beside ``ax`` (matplotlib Axes)."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="none", label=n.replace("_", " "))
               for n, c in zip(names, colours)]
    ncol = max(1, -(-len(handles) // max_rows))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7,
              frameon=False, ncol=ncol, handlelength=1.0, borderaxespad=0.0)


def save_figure(fig, path: str | Path, force: bool = False, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (never overwrites without ``force``)."""
    import matplotlib.pyplot as plt

    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)


def drr_preview(path: str | Path, drr: np.ndarray, channels: np.ndarray | None, names: Sequence[str],
                colours: Sequence[Sequence[int]], title: str = "", force: bool = False,
                pixel_spacing: tuple[float, float] | None = None) -> Path:
    """PNG with the attenuation DRR (grey, bright = attenuating) beside a colour composite of
    ``channels`` (K, rows, cols) with a legend. Radiological display: row 0 at the top."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 1 if channels is None else 2
    aspect = 1.0 if pixel_spacing is None else pixel_spacing[0] / pixel_spacing[1]
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + (2.6 if panels == 2 else 0), 4.6),
                             squeeze=False)
    ax = axes[0, 0]
    ax.imshow(window(drr), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    ax.set_title("attenuation DRR", fontsize=9)
    for a in axes[0]:
        a.set_xticks([])
        a.set_yticks([])
    _orientation_marks(ax)
    if channels is not None:
        ax2 = axes[0, 1]
        ax2.imshow(colour_composite(channels, colours), aspect=aspect, interpolation="nearest")
        ax2.set_title("structure channels", fontsize=9)
        _orientation_marks(ax2)
        add_legend(ax2, names, colours)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, force)


def _orientation_marks(ax) -> None:
    """'R' / 'L' letters for the default radiological display (patient right on image left)."""
    style = dict(color="yellow", fontsize=9, fontweight="bold", transform=ax.transAxes, va="top")
    ax.text(0.02, 0.98, "R", ha="left", **style)
    ax.text(0.98, 0.98, "L", ha="right", **style)
