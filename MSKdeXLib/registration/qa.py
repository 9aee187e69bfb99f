"""Visual QA of a registration: the radiograph with the registered bone DRR's edges in colour,
beside a checkerboard of radiograph and DRR (both contrast-normalised)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.outputs import atomic_path
from ..visualize import checkerboard, window


def edges(drr: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Bool edge map of a bone DRR (Canny on the contrast-normalised image)."""
    from skimage.feature import canny

    if not np.any(drr > 0):
        return np.zeros(drr.shape, dtype=bool)
    return canny(window(drr, 1, 99, drr > 0), sigma=sigma, low_threshold=0.05, high_threshold=0.15)


def qa_figure(path: str | Path, radiograph: np.ndarray, body_drrs: dict[str, np.ndarray],
              colours: dict[str, tuple[int, int, int]] | None = None, title: str = "",
              force: bool = False) -> Path:
    """Write the QA picture (PNG) to ``path``: left, the radiograph with each body's DRR edges
    in its colour; right, a checkerboard of radiograph and summed bone DRR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xr = window(radiograph, 1, 99)
    overlay = np.repeat(xr[..., None], 3, axis=2)
    palette = [(255, 60, 60), (60, 220, 60), (70, 140, 255), (255, 200, 0), (255, 0, 255), (0, 230, 230)]
    total = np.zeros_like(xr)
    for k, (name, drr) in enumerate(body_drrs.items()):
        rgb = np.array((colours or {}).get(name, palette[k % len(palette)]), dtype=np.float64) / 255.0
        overlay[edges(drr)] = rgb
        total = total + drr
    board = checkerboard(xr, window(total, 1, 99, total > 0))
    h, w = xr.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4 * h / w + 0.4), dpi=110)
    axes[0].imshow(overlay, interpolation="nearest")
    axes[0].set_title("radiograph + registered bone edges", fontsize=9)
    axes[1].imshow(board, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
    axes[1].set_title("checkerboard: radiograph / bone DRR", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    handles = [plt.Line2D([], [], color=np.array((colours or {}).get(n, palette[k % len(palette)])) / 255.0, lw=2,
                          label=n) for k, n in enumerate(body_drrs)]
    if handles:
        axes[0].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, force) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
