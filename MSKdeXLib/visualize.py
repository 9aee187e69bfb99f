"""Pictures: grey-level windowing, colour composites of structure channels with a legend,
overlays on a radiograph, and the DRR preview PNG.

Images are 2D arrays in display orientation (row 0 at the top, column 0 at the left); with
the default AP view that is radiological display (patient's right on the image's left, head
up). Colours are RGB 0..255 as in :class:`~MSKdeXLib.anatomy.structures.Structure`. Uses matplotlib's
Agg backend only (no display needed).
"""

from __future__ import annotations

import textwrap
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
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png", facecolor=fig.get_facecolor())
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


# ---------------------------------------------------------------------------------------------
# Decomposition pictures (predict's overlay.png, the demo report): channels on the radiograph
# ---------------------------------------------------------------------------------------------
#: muscle fill colours, one hue per muscle: (patient's right, patient's left) shades
_MUSCLE_PAIRS = [((31, 119, 180), (120, 180, 230)), ((230, 100, 10), (255, 170, 90)),
                 ((35, 150, 35), (130, 215, 110)), ((210, 30, 40), (255, 130, 130)),
                 ((130, 80, 190), (200, 160, 240)), ((140, 86, 75), (205, 150, 135)),
                 ((220, 90, 180), (250, 170, 220)), ((150, 150, 20), (220, 220, 90)),
                 ((20, 170, 190), (120, 225, 235))]
#: bone outline colours, one per bone (light, to stand out on the grey radiograph)
_BONE_LINES = [(255, 255, 255), (255, 235, 60), (0, 255, 255), (255, 120, 255), (160, 255, 120),
               (255, 190, 120), (180, 200, 255), (255, 255, 170)]
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def _base_name(name: str) -> tuple[str, str]:
    """(name without its side, side 'right' / 'left' / '') of a structure name."""
    for side in ("right", "left"):
        for fix in (f"_{side}", f" {side}"):
            if name.lower().endswith(fix):
                return name[: -len(fix)], side
    return name, ""


def structure_colours(names: Sequence[str], kinds: Sequence[str]) -> list[tuple[int, int, int]]:
    """Display colours (RGB 0..255), all different: a muscle's two sides share a hue (dark =
    patient's right, light = left), each muscle its own hue; bones take light outline colours."""
    hue: dict[str, int] = {}
    out, bones = [], 0
    for n, k in zip(names, kinds):
        if k == "bone":
            out.append(_BONE_LINES[bones % len(_BONE_LINES)])
            bones += 1
            continue
        base, side = _base_name(n)
        pair = _MUSCLE_PAIRS[hue.setdefault(base, len(hue)) % len(_MUSCLE_PAIRS)]
        out.append(pair[1] if side == "left" else pair[0])
    return out


def orientation_letters(patient_orientation: Sequence[str] | None) -> tuple[str, str, bool]:
    """(letter at the image's left edge, at its right edge, assumed?) from a DICOM Patient
    Orientation (row direction, column direction); without one the default AP radiological
    display is assumed (patient's right on the image's left: 'R' left, 'L' right)."""
    if patient_orientation and len(patient_orientation) >= 1 and str(patient_orientation[0])[:1] in _OPPOSITE:
        toward = str(patient_orientation[0])[:1]
        return _OPPOSITE[toward], toward, False
    return "R", "L", True


_DIRECTION = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "H": "head", "F": "feet"}


def side_caption(left: str, right: str, assumed: bool) -> str:
    """'R / L = the patient's right / left side.' (+ that it is assumed) for a caption."""
    return (f"{left} / {right} = the patient's {_DIRECTION.get(left, left)} / {_DIRECTION.get(right, right)} side"
            + (" (assumed: AP view, radiological display)." if assumed else "."))


def draw_orientation(ax, left: str = "R", right: str = "L") -> None:
    """Side letters in the top corners of ``ax`` (inside the image, on a dark box)."""
    style = dict(color="yellow", fontsize=11, fontweight="bold", transform=ax.transAxes, va="top",
                 bbox=dict(facecolor="black", alpha=0.6, edgecolor="none", pad=1.5))
    ax.text(0.015, 0.985, left, ha="left", **style)
    ax.text(0.985, 0.985, right, ha="right", **style)


def body_window(image: np.ndarray) -> np.ndarray:
    """Grey levels [0, 1] of a radiograph for reading: stretched over the patient (pixels
    brighter than the air), then adaptive histogram equalisation (CLAHE) so the bone edges
    show at any brightness; the air stays black."""
    from skimage.exposure import equalize_adapthist

    img = np.asarray(image, dtype=np.float64)
    body = body_mask(img)
    grey = window(img, 0.5, 99.8, body)
    eq = equalize_adapthist(grey, kernel_size=max(8, min(grey.shape) // 6), clip_limit=0.012)
    return np.where(body, 0.25 * grey + 0.75 * eq, grey).astype(np.float32)


def body_mask(image: np.ndarray) -> np.ndarray:
    """Pixels of the patient: brighter than a quarter of the way from the air (1st
    percentile) to the densest (99th)."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1.0, 99.0])
    return img > lo + 0.25 * (hi - lo)


def body_box(image: np.ndarray, margin: float = 0.04) -> tuple[slice, slice]:
    """(rows, cols) slices of the patient's bounding box plus ``margin`` of the image size."""
    m = body_mask(image)
    if not m.any():
        return slice(None), slice(None)
    r, c = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    dr, dc = int(round(margin * m.shape[0])), int(round(margin * m.shape[1]))
    return (slice(max(0, r[0] - dr), min(m.shape[0], r[-1] + dr + 1)),
            slice(max(0, c[0] - dc), min(m.shape[1], c[-1] + dc + 1)))


def resample_channels(channels: np.ndarray, spacing: Sequence[float], shape: Sequence[int],
                      spacing_to: Sequence[float], centre_to: Sequence[float] | None = None) -> np.ndarray:
    """Channels (K, h, w) of a grid of ``spacing`` (mm, row/col) centred on the principal point,
    interpolated (cubic, >= 0) onto a grid ``shape`` of ``spacing_to`` whose principal point is
    pixel ``centre_to`` (row, col; default the middle): content per pixel (g or cm^3), so the
    sums stay about the same. For pictures only: the estimates are the sums on the model grid."""
    from scipy import ndimage

    ch = np.asarray(channels, dtype=np.float64)
    k, h, w = ch.shape
    rows, cols = int(shape[0]), int(shape[1])
    cr, cc = ((rows - 1) / 2.0, (cols - 1) / 2.0) if centre_to is None else (float(centre_to[0]), float(centre_to[1]))
    mr = (np.arange(rows) - cr) * spacing_to[0] / spacing[0] + (h - 1) / 2.0
    mc = (np.arange(cols) - cc) * spacing_to[1] / spacing[1] + (w - 1) / 2.0
    grid = np.meshgrid(mr, mc, indexing="ij")
    area = (spacing_to[0] * spacing_to[1]) / (spacing[0] * spacing[1])
    out = np.stack([ndimage.map_coordinates(c, grid, order=3, mode="constant", cval=0.0) for c in ch])
    return np.clip(out, 0.0, None) * area


def draw_decomposition(ax, radiograph: np.ndarray, channels: np.ndarray | None, names: Sequence[str],
                       kinds: Sequence[str], colours: Sequence[Sequence[int]], aspect: float = 1.0,
                       fill: float = 0.45, level: float = 0.3) -> None:
    """The contrast-stretched radiograph with, per muscle, a translucent fill (stronger where the
    channel holds more) and its outline at ``level`` of its peak, and per bone an outline only.
    ``channels`` (K, rows, cols) on the radiograph's grid; None draws the radiograph alone."""
    grey = body_window(radiograph)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    shapes = []
    if channels is not None:
        order = sorted(range(len(names)), key=lambda i: -float(np.sum(channels[i])))  # large first
        for i in order:
            ch = np.asarray(channels[i], dtype=np.float64)
            pos = ch[ch > 0]
            if not pos.size:
                continue
            v = np.clip(ch / max(float(np.percentile(pos, 99.0)), 1e-12), 0.0, 1.0)
            col = np.asarray(colours[i], dtype=np.float64) / 255.0
            if kinds[i] != "bone":
                a = (fill * np.clip((v - 0.5 * level) / (1.0 - 0.5 * level), 0.0, 1.0))[..., None]
                rgb = rgb * (1 - a) + col * a
            shapes.append((v, col, kinds[i] == "bone"))
    ax.imshow(np.clip(rgb, 0, 1), aspect=aspect, interpolation="bilinear")
    for v, col, bone in shapes:
        if v.max() > level:
            ax.contour(v, levels=[level], colors=[col], linewidths=1.4 if bone else 1.1,
                       linestyles="solid" if bone else "solid")
    ax.set_xticks([])
    ax.set_yticks([])


def structure_legend(fig, names: Sequence[str], kinds: Sequence[str], colours: Sequence[Sequence[int]],
                     anchor: tuple[float, float] = (1.0, 0.5)) -> None:
    """The figure's legend outside the images (right side): muscles as filled squares (each
    muscle's right then left side), then bones as outline lines, with readable names."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = []
    first: dict[str, int] = {}
    for i, n in enumerate(names):
        first.setdefault(_base_name(n)[0], i)
    order = sorted(range(len(names)), key=lambda i: (kinds[i] == "bone", first[_base_name(names[i])[0]],
                                                     _base_name(names[i])[1] != "right"))
    for i in order:
        n, k, c = names[i], kinds[i], colours[i]
        rgb = np.asarray(c, dtype=np.float64) / 255.0
        label = n.replace("_", " ")
        if k == "bone":
            handles.append(Line2D([], [], color=rgb, lw=2.0, label=f"{label} (bone, outline)"))
        else:
            handles.append(Patch(facecolor=rgb, edgecolor=rgb, label=label))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=anchor, fontsize=8, frameon=False,
               handlelength=1.4, borderaxespad=0.0, labelcolor="white")


def decomposition_figure(path: str | Path, radiograph: np.ndarray, panels: Sequence[tuple[str, np.ndarray]],
                         names: Sequence[str], kinds: Sequence[str], *, title: str = "", caption: str = "",
                         patient_orientation: Sequence[str] | None = None,
                         pixel_spacing: Sequence[float] | None = None, force: bool = False) -> Path:
    """PNG: the radiograph alone, then one panel per (title, channels (K, rows, cols) on the
    radiograph's grid), all with side letters; one legend outside the images; a caption below
    saying what to look for. Radiological display as the radiograph is stored."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    colours = structure_colours(names, kinds)
    left, right, assumed = orientation_letters(patient_orientation)
    aspect = 1.0 if pixel_spacing is None else float(pixel_spacing[0]) / float(pixel_spacing[1])
    box = body_box(radiograph)
    rad = np.asarray(radiograph)[box]
    rows, cols = rad.shape
    n = 1 + len(panels)
    w = 4.6
    h = w * rows * aspect / cols
    lw = 2.9  # legend column (inches)
    fig, axes = plt.subplots(1, n, figsize=(w * n + lw, h + 1.4), squeeze=False, facecolor="black")
    for ax, (sub, ch) in zip(axes[0], [("radiograph", None), *panels]):
        draw_decomposition(ax, rad, None if ch is None else np.asarray(ch)[(slice(None), *box)], names, kinds,
                           colours, aspect)
        draw_orientation(ax, left, right)
        ax.set_title(sub, fontsize=10, color="white")
    fig.subplots_adjust(left=0.005, right=(w * n) / (w * n + lw), top=1 - 0.5 / (h + 1.4),
                        bottom=0.85 / (h + 1.4), wspace=0.03)
    structure_legend(fig, names, kinds, colours, anchor=((w * n) / (w * n + lw) + 0.01, 0.5))
    if title:
        fig.suptitle(title, fontsize=11, color="white")
    text = " ".join(t for t in (caption, side_caption(left, right, assumed)) if t)
    fig.text(0.005, 0.015, textwrap.fill(text, int(16 * (w * n + lw))), fontsize=8, ha="left", va="bottom",
             color="white")
    return save_figure(fig, path, force, dpi=110)
