"""Pictures of an evaluation (:class:`MSKdeXLib.evaluation.agreement.Evaluation`): per structure,
estimate vs truth with the estimates' intervals as bars, and Bland-Altman with its labelled lines;
each figure carries a caption saying what to look for.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from .io.outputs import atomic_path

SCATTER_CAPTION = ("One panel per structure, one point per case: the estimate against the CT-derived truth; "
                   "bars: the estimate's {level} interval{cover}; dashed line: estimate = truth. Look for points "
                   "along the line (high r) and bars crossing it (interval covers the truth). A flat row of points "
                   "means the same value for every case: the method does not follow this structure.")
BLAND_ALTMAN_CAPTION = ("One panel per structure: estimate - truth against their mean. Solid line: the bias (mean "
                        "difference); dashed lines: the 95 % limits of agreement (upper / lower limit = bias +- 1.96 "
                        "SD of the differences); grey: zero. Look for a bias "
                        "near 0, narrow limits, and no slope (an error that grows with the size of the structure).")


def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def _intervals(ev, key) -> dict[str, tuple[float, float, float]]:
    """id -> (low, high, level) of the predictions of one (structure, quantity)."""
    return {i: (lo, hi, lv) for i, lo, hi, _, lv in ev.intervals.get(key, [])}


def _level_text(ev) -> str:
    levels = sorted({round(float(lv), 4) for vs in ev.intervals.values() for *_, lv in vs if np.isfinite(lv)})
    return f"{levels[0]:.0%}" if len(levels) == 1 else "stated"


def _finish(fig, title: str, caption: str, path: Path, force: bool) -> Path:
    """Title above, caption below, no overlap with the panels; written atomically."""
    import matplotlib.pyplot as plt

    width = fig.get_size_inches()[0]
    text = textwrap.fill(caption, max(60, int(width * 15)))
    lines = text.count("\n") + 1
    h = fig.get_size_inches()[1]
    bottom = (0.2 + 0.16 * lines) / h
    top = 1 - 0.45 / h
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / h, va="top")
    fig.tight_layout(rect=(0, bottom, 1, top))
    fig.text(0.01, 0.01, text, fontsize=7.5, ha="left", va="bottom")
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def scatter_figure(ev, q: str, keys: list, by_key: dict[Any, dict], path: Path, force: bool = False) -> Path:
    """scatter_<q>.png: estimate vs truth per structure, with interval bars where present."""
    import matplotlib.pyplot as plt

    unit = "g" if q == "mass_g" else "cm³"
    r, c = _grid(len(keys))
    fig, axes = plt.subplots(r, c, figsize=(3.2 * c, 3.0 * r + 1.0), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        ids, p, t = zip(*ev.pairs[k])
        p, t = np.array(p), np.array(t)
        iv = _intervals(ev, k)
        lo_all, hi_all = [min(p.min(), t.min())], [max(p.max(), t.max())]
        if iv:
            lo = np.array([iv.get(i, (v, v, 0))[0] for i, v in zip(ids, p)])
            hi = np.array([iv.get(i, (v, v, 0))[1] for i, v in zip(ids, p)])
            ax.errorbar(t, p, yerr=np.vstack([p - lo, hi - p]).clip(0), fmt="o", ms=3, lw=0.8, capsize=1.5,
                        color="tab:blue", ecolor="tab:blue", alpha=0.8)
            lo_all.append(lo.min())
            hi_all.append(hi.max())
        else:
            ax.scatter(t, p, s=10)
        a, b = min(lo_all), max(hi_all)
        ax.plot([a, b], [a, b], "k--", lw=0.8)
        s = by_key[k]
        cov = f", {s['coverage']:.0%} covered" if np.isfinite(s.get("coverage", float("nan"))) else ""
        ax.set_title(f"{k[0].replace('_', ' ')}\nr = {s['pcc']:.2f}, n = {s['n']}{cov}", fontsize=8)
        ax.set_xlabel(f"CT truth ({unit})", fontsize=7)
        ax.set_ylabel(f"estimate ({unit})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(keys):]:
        ax.set_axis_off()
    cover = f" (calibrated intervals cover the truth for {ev.coverage()[q]['coverage']:.0%} of the values)" \
        if ev.intervals and q in ev.coverage() else ""
    caption = SCATTER_CAPTION.format(level=_level_text(ev) if ev.intervals else "(no)", cover=cover)
    return _finish(fig, f"Estimate vs CT truth: {q}", caption, path, force)


def bland_altman_figure(ev, q: str, keys: list, by_key: dict[Any, dict], path: Path, force: bool = False) -> Path:
    """bland_altman_<q>.png with the bias and limits of agreement drawn and labelled."""
    import matplotlib.pyplot as plt

    unit = "g" if q == "mass_g" else "cm³"
    r, c = _grid(len(keys))
    fig, axes = plt.subplots(r, c, figsize=(3.2 * c, 3.0 * r + 1.0), squeeze=False)
    for ax, k in zip(axes.ravel(), keys):
        _, p, t = map(np.array, zip(*ev.pairs[k]))
        s = by_key[k]
        ax.scatter((p + t) / 2, p - t, s=10)
        d = p - t
        lo, hi = min(d.min(), s["loa_low"]), max(d.max(), s["loa_high"])
        pad = 0.15 * max(hi - lo, 1e-12)
        ax.set_ylim(lo - pad, hi + pad)
        for v, ls, name in ((s["bias"], "-", "bias"), (s["loa_high"], "--", "upper limit"),
                            (s["loa_low"], "--", "lower limit")):
            ax.axhline(v, color="k", ls=ls, lw=0.8)
            ax.annotate(f"{name} {v:+.3g}", xy=(1.0, v), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=6)
        ax.axhline(0.0, color="0.6", lw=0.5)
        ax.set_title(k[0].replace("_", " "), fontsize=8)
        ax.set_xlabel(f"mean of estimate and truth ({unit})", fontsize=7)
        ax.set_ylabel(f"estimate - truth ({unit})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(keys):]:
        ax.set_axis_off()
    return _finish(fig, f"Bland-Altman: {q}", BLAND_ALTMAN_CAPTION, path, force)


def agreement_figures(ev, out_dir: Path, force: bool = False) -> list[Path]:
    """scatter_<quantity>.png and bland_altman_<quantity>.png (one panel per structure)."""
    import matplotlib

    matplotlib.use("Agg")
    from .evaluation.statistics import QUANTITIES

    written = []
    by_key = {(s["structure"], s["quantity"]): s for s in ev.stats}
    for q in QUANTITIES:
        keys = [k for k in sorted(ev.pairs) if k[1] == q and k in by_key]
        if keys:
            written.append(scatter_figure(ev, q, keys, by_key, Path(out_dir) / f"scatter_{q}.png", force))
            written.append(bland_altman_figure(ev, q, keys, by_key, Path(out_dir) / f"bland_altman_{q}.png", force))
    return written
