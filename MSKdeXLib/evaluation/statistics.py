"""Correlation and agreement statistics shared by the evaluation modules (no pairing, no files).

* :func:`pearson` - Pearson correlation (NaN for fewer than 2 values or a constant input);
* :func:`icc_2_1` - ICC(2,1), two-way random effects, absolute agreement, single measures.
"""

from __future__ import annotations

import numpy as np

from ..anatomy.quantities import QUANTITIES  # noqa: F401  (the quantities estimated per structure, named there)


def _constant(v: np.ndarray) -> bool:
    """True when ``v`` does not vary beyond rounding (e.g. a mean copied to every case)."""
    return float(v.std()) <= 1e-12 * max(float(np.abs(v).max()), 1e-300)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN for fewer than 2 values or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or _constant(x) or _constant(y):
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / np.sqrt((xc * xc).sum() * (yc * yc).sum()))


def icc_2_1(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """ICC(2,1): two-way random, absolute agreement, single measures (Shrout & Fleiss 1979).

    ``x`` and ``y`` are two raters' values of n targets, or ``x`` alone an (n, k) matrix."""
    data = np.asarray(x, float) if y is None else np.column_stack([np.asarray(x, float), np.asarray(y, float)])
    n, k = data.shape
    if n < 2:
        return float("nan")
    grand = data.mean()
    ss_rows = k * ((data.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((data.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((data - grand) ** 2).sum() - ss_rows - ss_cols
    msr, msc, mse = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    den = msr + (k - 1) * mse + k * (msc - mse) / n
    return float((msr - mse) / den) if den != 0 else float("nan")
