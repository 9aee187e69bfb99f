"""Per-muscle *specificity*: does a method know more than one number per subject?

Muscle masses of one person move together (body size, sarcopenia), so a per-muscle PCC can be
high for a method that only knows the subject's total muscle. These measures are blind to that
shared factor (``n`` = subjects with every muscle of the quantity, complete cases only):

* **share PCC** of muscle ``i``: PCC over subjects of ``x_i / sum_j x_j`` (estimate vs truth; the
  sum over the muscles of the same quantity), i.e. of the muscle's share of total muscle;
* **asymmetry PCC** of a left/right pair: PCC over subjects of the asymmetry index
  ``AI = (L - R) / (L + R)`` (estimate vs truth), per quantity;
* **partial PCC** of muscle ``i`` given the true total muscle *mass* ``T`` (g, the sum of the
  muscles' CT lean masses, for both quantities): PCC of the residuals of the estimate and of the
  truth after a least-squares line on ``T`` (with intercept). A method whose estimate is a
  function of ``T`` alone scores 0 (defined as 0 when its residual vanishes).

Coverage of intervals (``effective_sample_size``): values of one subject share its errors, so
the binomial uncertainty of a coverage uses the effective number of independent values
``n_eff = N / (1 + (m - 1) rho)`` (design effect; ``m`` = mean values per subject, ``rho`` the
one-way ANOVA intra-class correlation of the hit indicators, clipped to [0, 1]; 1 when it is
undefined), between the number of subjects and the number of values.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

from .statistics import QUANTITIES, pearson

#: the structure whose truth the partial PCC controls for (summed over the muscles)
CONTROL_QUANTITY = "mass_g"
_SIDE = re.compile(r"^(?P<stem>.+?)[_ ](?P<side>left|right|l|r)$", re.IGNORECASE)


def side_pairs(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """(stem, left name, right name) of every structure pair named ``<stem>_left`` /
    ``<stem>_right`` (or ``_l`` / ``_r``), in the order of the stems' first appearance."""
    sides: dict[str, dict[str, str]] = {}
    for n in names:
        m = _SIDE.match(n)
        if m:
            sides.setdefault(m["stem"], {})[m["side"].lower()[0]] = n
    return [(stem, d["l"], d["r"]) for stem, d in sides.items() if "l" in d and "r" in d]


def asymmetry_index(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(L - R) / (L + R), elementwise (NaN where L + R is 0)."""
    left, right = np.asarray(left, float), np.asarray(right, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(left + right != 0, (left - right) / (left + right), np.nan)


def shares(values: np.ndarray) -> np.ndarray:
    """Each column's share of the row sum (n, m)."""
    v = np.asarray(values, float)
    return v / v.sum(axis=1, keepdims=True)


def residual(y: np.ndarray, control: np.ndarray) -> np.ndarray:
    """``y`` minus its least-squares line on ``control`` (with intercept)."""
    a = np.column_stack([np.ones(len(control)), np.asarray(control, float)])
    coef, *_ = np.linalg.lstsq(a, np.asarray(y, float), rcond=None)
    return np.asarray(y, float) - a @ coef


def partial_pcc(pred: np.ndarray, truth: np.ndarray, control: np.ndarray) -> float:
    """PCC of ``pred`` and ``truth`` after removing their linear dependence on ``control``;
    0 when ``pred`` is (numerically) a linear function of ``control``."""
    rp, rt = residual(pred, control), residual(truth, control)
    scale = max(float(np.std(pred)), float(np.abs(np.mean(pred))), 1e-300)
    if float(np.std(rp)) <= 1e-9 * scale:
        return 0.0
    return pearson(rp, rt)


def effective_sample_size(hits_by_subject: dict[str, list[bool]]) -> dict[str, float]:
    """Coverage's effective sample size from the hit indicators grouped by subject:
    {"n_values", "n_subjects", "icc", "n_effective"} (see the module docstring)."""
    groups = [np.asarray(v, float) for v in hits_by_subject.values() if len(v)]
    k, n = len(groups), int(sum(len(g) for g in groups))
    if k == 0:
        return {"n_values": 0, "n_subjects": 0, "icc": float("nan"), "n_effective": 0.0}
    y = np.concatenate(groups)
    p = y.mean()
    rho = 1.0
    if k > 1 and n > k:
        msb = sum(len(g) * (g.mean() - p) ** 2 for g in groups) / (k - 1)
        msw = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n - k)
        n0 = (n - sum(len(g) ** 2 for g in groups) / n) / (k - 1)
        den = msb + (n0 - 1) * msw
        if den > 0:
            rho = float(np.clip((msb - msw) / den, 0.0, 1.0))
    n_eff = n / (1.0 + (n / k - 1.0) * rho)
    return {"n_values": n, "n_subjects": k, "icc": rho, "n_effective": float(n_eff)}


def wilson_interval(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (effective) trials."""
    if n <= 0:
        return float("nan"), float("nan")
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def subject_matrix(pairs: dict[tuple[str, str], list[tuple[str, float, float]]], structures: list[str],
                   quantity: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(subject ids, estimates (n, m), truths (n, m)) of ``structures`` for ``quantity``,
    subjects with a value for every structure only (sorted ids)."""
    per = [{i: (p, t) for i, p, t in pairs.get((s, quantity), [])} for s in structures]
    ids = sorted(set.intersection(*(set(d) for d in per))) if per else []
    pred = np.array([[d[i][0] for d in per] for i in ids], float).reshape(len(ids), len(structures))
    truth = np.array([[d[i][1] for d in per] for i in ids], float).reshape(len(ids), len(structures))
    return ids, pred, truth


def specificity(pairs: dict[tuple[str, str], list[tuple[str, float, float]]], muscles: list[str]
                ) -> dict[str, Any]:
    """Share, asymmetry and partial PCCs of the ``muscles`` (names as in ``pairs``, an
    :class:`~MSKdeXLib.evaluation.agreement.Evaluation`'s), per quantity, with a summary of
    means over muscles / pairs. Empty dict with fewer than 2 muscles."""
    muscles = [m for m in muscles if any((m, q) in pairs for q in QUANTITIES)]
    if len(muscles) < 2:
        return {}
    ids_c, _, truth_c = subject_matrix(pairs, muscles, CONTROL_QUANTITY)
    control = dict(zip(ids_c, truth_c.sum(axis=1)))
    out: dict[str, Any] = {"muscles": muscles, "control": f"true total muscle {CONTROL_QUANTITY} (sum of "
                           f"{len(muscles)} muscles)", "per_muscle": [], "pairs": [], "summary": {}}
    pairs_lr = side_pairs(muscles)
    for q in QUANTITIES:
        ids, pred, truth = subject_matrix(pairs, muscles, q)
        if len(ids) < 3:
            continue
        sp, st = shares(pred), shares(truth)
        ctrl = np.array([control.get(i, np.nan) for i in ids])
        ok = np.isfinite(ctrl)
        per = []
        for j, m in enumerate(muscles):
            per.append({"structure": m, "quantity": q, "n": len(ids), "pcc": pearson(pred[:, j], truth[:, j]),
                        "share_pcc": pearson(sp[:, j], st[:, j]),
                        "partial_pcc": partial_pcc(pred[ok, j], truth[ok, j], ctrl[ok]) if ok.sum() >= 4
                        else float("nan")})
        col = {m: j for j, m in enumerate(muscles)}
        prs = [{"pair": stem, "left": lft, "right": rgt, "quantity": q, "n": len(ids),
                "asymmetry_pcc": pearson(asymmetry_index(pred[:, col[lft]], pred[:, col[rgt]]),
                                         asymmetry_index(truth[:, col[lft]], truth[:, col[rgt]]))}
               for stem, lft, rgt in pairs_lr]
        out["per_muscle"] += per
        out["pairs"] += prs
        mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
        out["summary"][q] = {"n_subjects": len(ids), "mean_pcc": mean([r["pcc"] for r in per]),
                             "mean_share_pcc": mean([r["share_pcc"] for r in per]),
                             "mean_partial_pcc": mean([r["partial_pcc"] for r in per]),
                             "mean_asymmetry_pcc": mean([r["asymmetry_pcc"] for r in prs]) if prs
                             else float("nan")}
    return out


def to_markdown(spec: dict[str, Any]) -> str:
    """Tables of :func:`specificity`'s result ('' when empty)."""
    if not spec or not spec.get("per_muscle"):
        return ""
    lines = ["### Specificity (beyond one number per subject)", "",
             f"Partial PCC controls for the {spec['control']}; share = a muscle's part of the total of its "
             "quantity; asymmetry index = (L - R) / (L + R).", "",
             "| muscle | quantity | n | PCC | share PCC | partial PCC |", "|---|---|---:|---:|---:|---:|"]
    for r in spec["per_muscle"]:
        lines.append(f"| {r['structure']} | {r['quantity']} | {r['n']} | {r['pcc']:.3f} | {r['share_pcc']:.3f} | "
                     f"{r['partial_pcc']:.3f} |")
    if spec["pairs"]:
        lines += ["", "| pair | quantity | n | asymmetry PCC |", "|---|---|---:|---:|"]
        lines += [f"| {r['pair']} | {r['quantity']} | {r['n']} | {r['asymmetry_pcc']:.3f} |" for r in spec["pairs"]]
    lines.append("")
    for q, s in spec["summary"].items():
        lines.append(f"Means over the muscles ({q}, n = {s['n_subjects']} subjects): PCC {s['mean_pcc']:.3f}, "
                     f"share PCC {s['mean_share_pcc']:.3f}, partial PCC {s['mean_partial_pcc']:.3f}, "
                     f"asymmetry PCC {s['mean_asymmetry_pcc']:.3f}")
    return "\n".join(lines) + "\n"
