"""A method beside the baselines, on one test split, in one table (benchmark and demo report).

:func:`baseline_estimates` fits the baselines of :mod:`.baselines` on a training set's train
split (the ridge penalty on its val split) and estimates the test records' channel sums;
:func:`summary` reduces any method's :class:`~MSKdeXLib.evaluation.agreement.Evaluation` on the
test subjects to the table's numbers (means over the muscles); :func:`markdown_table` prints it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .agreement import Evaluation, evaluate
from .baselines import ConstantBaseline, GlobalOracle, RidgeBaseline, SplitArrays, TemplateBaseline
from .channel_agreement import channel_correlation
from .statistics import QUANTITIES

#: the muscle pairs the issue's asymmetry target names (TotalSegmentator v1 stems)
TARGET_PAIRS = ("gluteus_maximus", "gluteus_medius", "gluteus_minimus", "iliopsoas")
BASELINES = ("constant", "global_oracle", "ridge", "template")


def rows_of(ids: Sequence[str], channels: Sequence[dict], values: np.ndarray,
            low: np.ndarray | None = None, high: np.ndarray | None = None, level: float | None = None
            ) -> list[dict[str, Any]]:
    """Long-format rows {id, structure, kind, quantity, value[, low, high, level]} of (n, C) values."""
    out = []
    for i, sid in enumerate(ids):
        for j, c in enumerate(channels):
            r = {"id": sid, "structure": c["structure"], "kind": c.get("kind"), "quantity": c["quantity"],
                 "value": float(values[i, j])}
            if low is not None and high is not None:
                r.update(low=float(low[i, j]), high=float(high[i, j]), level=level)
            out.append(r)
    return out


def baseline_estimates(train: SplitArrays, val: SplitArrays | None, test: SplitArrays) -> dict[str, Any]:
    """{name: (n_test, C) channel sums} of the baselines, plus "ridge_alpha", "ridge_val_errors"
    and "template_pixel_r" (per test subject and channel: the template images vs the true ones)."""
    ridge_val = val if val is not None and len(val.ids) else None
    if ridge_val is not None:
        ridge, errors = RidgeBaseline.select(train.xray, train.truth, ridge_val.xray, ridge_val.truth)
    else:  # no validation split: a middle penalty, not tuned
        ridge, errors = RidgeBaseline().fit(train.xray, train.truth, 100.0), {}
    template = TemplateBaseline().fit(train.images, train.total)
    pixel_r = np.array([channel_correlation(template.images, im) for im in test.images])
    return {"constant": ConstantBaseline().fit(train.truth).predict(len(test.ids)),
            "global_oracle": GlobalOracle().fit(train.total, train.truth).predict(test.total),
            "ridge": ridge.predict(test.xray), "template": template.predict(test.total),
            "ridge_alpha": ridge.alpha, "ridge_val_errors": errors, "template_pixel_r": pixel_r}


def _mean(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def summary(ev: Evaluation, pixel_r: dict[str, float] | None = None) -> dict[str, Any]:
    """The table's numbers of one method: per quantity the means over the muscles of PCC, share
    PCC, partial PCC (given the true total muscle mass), asymmetry PCC and MAPE; the asymmetry
    PCC of each target pair (mass); coverage with its effective n; muscle pixel r (given)."""
    muscles = set(ev.muscles())
    spec = ev.specificity()
    out: dict[str, Any] = {"n_subjects": None, "quantities": {}, "pairs": {}, "pixel_r": pixel_r or {}}
    for q in QUANTITIES:
        st = [s for s in ev.stats if s["quantity"] == q and s["structure"] in muscles]
        sq = spec.get("summary", {}).get(q, {})
        out["quantities"][q] = {"mean_pcc": _mean(s["pcc"] for s in st),
                                "mean_mape_percent": _mean(s["mape_percent"] for s in st),
                                "mean_share_pcc": sq.get("mean_share_pcc", float("nan")),
                                "mean_partial_pcc": sq.get("mean_partial_pcc", float("nan")),
                                "mean_asymmetry_pcc": sq.get("mean_asymmetry_pcc", float("nan"))}
        out["n_subjects"] = sq.get("n_subjects", out["n_subjects"])
    for r in spec.get("pairs", []):
        out["pairs"].setdefault(r["pair"], {})[r["quantity"]] = r["asymmetry_pcc"]
    cov = ev.coverage().get("overall")
    if cov:
        out["coverage"] = {k: cov[k] for k in ("coverage", "n", "n_subjects", "n_effective", "ci95_effective")}
    return out


def evaluate_baselines(est: dict[str, Any], test: SplitArrays, channels: Sequence[dict]) -> dict[str, dict]:
    """{baseline name: :func:`summary`} on the test subjects (template with its pixel r)."""
    truth = rows_of(test.ids, channels, test.truth)
    muscle = [j for j, c in enumerate(channels) if c.get("kind") == "muscle"]
    out = {}
    for name in BASELINES:
        pix = None
        if name == "template":
            r = est["template_pixel_r"][:, muscle]
            pix = {q: _mean(np.nanmean(r[:, [k for k, j in enumerate(muscle) if channels[j]["quantity"] == q]],
                                       axis=0)) for q in QUANTITIES}
        out[name] = summary(evaluate(rows_of(test.ids, channels, est[name]), truth), pix)
    return out


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def markdown_table(results: dict[str, dict[str, Any]], pairs: Sequence[str] = TARGET_PAIRS) -> str:
    """One row per method: muscle means (mass / volume) of PCC, share PCC, partial PCC,
    asymmetry PCC, the target pairs' asymmetry PCC (mass), MAPE, pixel r, coverage."""
    head = ["method", "PCC m / v", "share PCC m / v", "partial PCC m / v", "asym PCC m / v",
            *[f"asym {p.replace('gluteus_', 'g.')} (m)" for p in pairs], "MAPE % m / v", "muscle pixel r m / v",
            "90 % coverage (n_eff)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in results.items():
        m, v = s["quantities"]["mass_g"], s["quantities"]["volume_cm3"]
        both = lambda k, fmt=".2f": f"{_f(m[k], fmt)} / {_f(v[k], fmt)}"  # noqa: E731
        pix = s.get("pixel_r") or {}
        cov = s.get("coverage")
        cells = [name, both("mean_pcc"), both("mean_share_pcc"), both("mean_partial_pcc"), both("mean_asymmetry_pcc"),
                 *[_f(s["pairs"].get(p, {}).get("mass_g")) for p in pairs], both("mean_mape_percent", ".1f"),
                 f"{_f(pix.get('mass_g'))} / {_f(pix.get('volume_cm3'))}" if pix else "-",
                 f"{cov['coverage']:.0%} ({cov['n_effective']:.0f} of {cov['n']}, {cov['n_subjects']} subj.)"
                 if cov else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_with_baselines(records_dir, test_records_dir, methods: dict[str, dict[str, Any]],
                           test_split: str = "test") -> dict[str, Any]:
    """The baselines fitted on ``records_dir``'s train split (ridge penalty on its val split)
    and evaluated on ``test_records_dir``'s ``test_split``, beside the already summarised
    ``methods`` ({name: :func:`summary`} on the same test subjects). Returns {"rows": {name:
    summary}, "ridge_alpha", "n_train", "n_test", "markdown"}."""
    from .baselines import split_arrays
    from ..learning.dataset.records import load_dataset_info

    train, val = split_arrays(records_dir, "train"), split_arrays(records_dir, "val")
    test = split_arrays(test_records_dir, test_split)
    channels = load_dataset_info(test_records_dir).channels
    est = baseline_estimates(train, val, test)
    rows = {**evaluate_baselines(est, test, channels), **methods}
    return {"rows": rows, "ridge_alpha": est["ridge_alpha"], "n_train": len(train.ids), "n_val": len(val.ids),
            "n_test": len(test.ids), "markdown": markdown_table(rows)}
