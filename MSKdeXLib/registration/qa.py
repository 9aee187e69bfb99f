"""Visual QA of a registration, made to answer "is it aligned?" at a glance: the contrast-stretched
radiograph with each registered body's DRR bone edges in its own colour, zoomed panels where the
bodies meet (the hip joints: femoral head in acetabulum) or around each later body, side letters,
and each body's similarity and doubtful flag written in the picture.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..visualize import (body_box, body_window, draw_orientation, orientation_letters, save_figure,
                         side_caption, window)

#: edge colours of the bodies, in registration order (bright, distinct on grey)
BODY_COLOURS = [(255, 64, 64), (64, 255, 64), (64, 170, 255), (255, 215, 0), (255, 64, 255), (0, 235, 235),
                (255, 150, 40), (190, 140, 255)]

CAPTION = ("Coloured lines: the bone edges of each body's DRR at its registered pose, drawn on the radiograph. "
           "Aligned: every line lies on a bone edge of the radiograph (cortex, pelvic brim, obturator foramen, "
           "femoral head and neck). Misaligned: lines parallel to an edge but offset, or crossing the bone. The "
           "zoomed panels show where two bodies meet (a hip joint: femoral head in the acetabulum) or a body "
           "closer. sim = the registration's similarity (patch-wise gradient correlation, higher is better); "
           "DOUBTFUL = below the threshold calibrated for that kind of body, at its motion bound, or (first body) "
           "its own bones add too little to the similarity of the soft tissue moving with them: check by eye "
           "before using it.")


def edges(drr: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Bool edge map of a bone DRR (Canny on the contrast-normalised image)."""
    from skimage.feature import canny

    if not np.any(drr > 0):
        return np.zeros(drr.shape, dtype=bool)
    return canny(window(drr, 1, 99, drr > 0), sigma=sigma, low_threshold=0.05, high_threshold=0.15)


def support(drr: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Pixels where a body's DRR holds more than ``fraction`` of its maximum."""
    d = np.asarray(drr, dtype=np.float64)
    return d > fraction * d.max() if d.size and d.max() > 0 else np.zeros(d.shape, dtype=bool)


def zoom_boxes(body_drrs: dict[str, np.ndarray], min_fraction: float = 0.22) -> list[tuple[str, tuple[slice, slice]]]:
    """(label, (rows, cols) slices) of the zoomed panels: for each body after the first, the square
    around where its projection meets the bodies before it (a joint), else around the body; at
    least ``min_fraction`` of the image's smaller side, clipped to the image."""
    names = list(body_drrs)
    if not names:
        return []
    shape = next(iter(body_drrs.values())).shape
    side_min = int(round(min_fraction * min(shape)))
    earlier = np.zeros(shape, dtype=bool)
    out = []
    for k, name in enumerate(names):
        own = support(body_drrs[name])
        if k > 0 and own.any():
            meet = own & ndimage.binary_dilation(earlier, iterations=max(1, min(shape) // 100))
            region, label = (meet, f"{name} meets {names[0]}") if meet.any() else (own, name)
            rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
            cr, cc = (rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0
            half = max(side_min, int(1.3 * max(rows[-1] - rows[0], cols[-1] - cols[0])) + 4) / 2.0
            half = min(half, min(shape) / 2.0)
            r0 = int(np.clip(round(cr - half), 0, shape[0] - 2 * half))
            c0 = int(np.clip(round(cc - half), 0, shape[1] - 2 * half))
            out.append((label, (slice(r0, r0 + int(2 * half)), slice(c0, c0 + int(2 * half)))))
        earlier |= own
    return sorted(out, key=lambda z: z[1][1].start)  # left to right as on the image


def _edge_rgba(body_edges: dict[str, np.ndarray], colours: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """RGBA image (rows, cols, 4): each body's edge pixels in its colour, transparent elsewhere."""
    shape = next(iter(body_edges.values())).shape
    rgba = np.zeros((*shape, 4))
    for name, e in body_edges.items():
        rgba[e, :3] = np.asarray(colours[name], dtype=np.float64) / 255.0
        rgba[e, 3] = 1.0
    return rgba


def _score_text(result: Any) -> tuple[str, str]:
    """(text, colour) of one body's similarity and flag, from a registration result (or None)."""
    if result is None:
        return "", "white"
    sim = float(getattr(result, "final_similarity", float("nan")))
    below = getattr(result, "doubtful_below", None)
    thr = f" (doubtful below {below:.2f})" if below is not None else ""
    if getattr(result, "doubtful", False):
        reasons = getattr(result, "doubtful_reasons", None) or []
        return f"sim {sim:.3f}{thr}: DOUBTFUL{': ' + '; '.join(reasons) if reasons else ''}", "#ff5050"
    return f"sim {sim:.3f}{thr}: ok", "#60ff60"


def qa_figure(path: str | Path, radiograph: np.ndarray, body_drrs: dict[str, np.ndarray],
              colours: dict[str, tuple[int, int, int]] | None = None, title: str = "",
              force: bool = False, results: Sequence[Any] | None = None,
              patient_orientation: Sequence[str] | None = None) -> Path:
    """Write the QA picture (PNG) to ``path``: left, the whole radiograph (cropped to the patient,
    contrast-stretched) with every body's DRR edges in its colour; right, zoomed panels
    (:func:`zoom_boxes`) with the same edges over a locally stretched radiograph. ``results`` (the
    registration's per-body results: ``name``, ``final_similarity``, ``doubtful``,
    ``doubtful_below``) put each body's similarity and flag in the picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rad = np.asarray(radiograph, dtype=np.float64)
    names = list(body_drrs)
    cols = {n: tuple((colours or {}).get(n, BODY_COLOURS[k % len(BODY_COLOURS)])) for k, n in enumerate(names)}
    thick = min(rad.shape) // 400  # edges about 1/400 of the image thick (1 px below 800 px)
    sigma = max(1.0, min(rad.shape) / 256.0)  # the outlines of the bones, not their inner texture
    body_edges = {n: ndimage.binary_dilation(edges(d, sigma), iterations=thick) if thick else edges(d, sigma)
                  for n, d in body_drrs.items()}
    by_name = {getattr(r, "name", None): r for r in (results or [])}
    left, right, assumed = orientation_letters(patient_orientation)
    zooms = zoom_boxes(body_drrs)
    n_zoom = len(zooms)
    zc = 1 if n_zoom <= 2 else 2
    zr = max(1, -(-n_zoom // zc))
    box = body_box(rad)
    h_main = 6.0
    w_main = h_main * (box[1].stop - (box[1].start or 0)) / max(1, box[0].stop - (box[0].start or 0))
    zw = h_main / zr
    fig = plt.figure(figsize=(w_main + zc * zw + 0.2, h_main + 2.4), facecolor="black")
    gs = fig.add_gridspec(zr, 1 + zc, width_ratios=[w_main] + [zw] * zc, left=0.01, right=0.99,
                          top=1 - 0.5 / (h_main + 2.4), bottom=1.9 / (h_main + 2.4), wspace=0.03, hspace=0.12)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(body_window(rad)[box], cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    if names:
        ax.imshow(_edge_rgba(body_edges, cols)[box], interpolation="nearest")
    ax.set_axis_off()
    draw_orientation(ax, left, right)
    ax.set_title("radiograph + registered bone edges", fontsize=10, color="white")
    for k, (label, (rs, cs)) in enumerate(zooms):
        zax = fig.add_subplot(gs[k // zc, 1 + k % zc])
        crop = rad[rs, cs]
        zax.imshow(window(crop, 1.0, 99.5), cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
        zax.imshow(_edge_rgba({n: e[rs, cs] for n, e in body_edges.items()}, cols), interpolation="nearest")
        zax.set_xticks([])
        zax.set_yticks([])
        for spine in zax.spines.values():
            spine.set_color("0.6")
        zax.set_title(label.replace("_", " "), fontsize=8, color="white")
        # where the zoom sits in the overview
        ax.add_patch(plt.Rectangle((cs.start - (box[1].start or 0) - 0.5, rs.start - (box[0].start or 0) - 0.5),
                                   cs.stop - cs.start, rs.stop - rs.start, fill=False, ec="0.85", lw=0.8, ls=":"))
    handles = []
    for n in names:
        text, tcol = _score_text(by_name.get(n))
        handles.append(Line2D([], [], color=np.asarray(cols[n]) / 255.0, lw=2.5,
                              label=f"{n.replace('_', ' ')}   {text}" if text else n.replace("_", " ")))
    if handles:
        leg = fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.01, 1.05 / (h_main + 2.4)),
                         fontsize=9, frameon=False, ncol=1 if len(handles) <= 4 else 2, labelcolor="white")
        for t, n in zip(leg.get_texts(), names):
            if getattr(by_name.get(n), "doubtful", False):
                t.set_color("#ff5050")
    if title:
        fig.suptitle(title, fontsize=10, color="white")
    width = w_main + zc * zw + 0.2
    fig.text(0.01, 0.01, textwrap.fill(f"{CAPTION} {side_caption(left, right, assumed)}", int(width * 14)),
             fontsize=7.5, color="white",
             ha="left", va="bottom")
    return save_figure(fig, path, force, dpi=110)
