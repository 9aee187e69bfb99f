"""Specificity metrics (share, asymmetry, partial PCC; coverage's effective n) on synthetic cases
with known answers, and their place in ``evaluate``."""

from __future__ import annotations

import numpy as np
import pytest

from MSKdeXLib.evaluation import specificity as sp
from MSKdeXLib.evaluation.agreement import evaluate

MUSCLES = ["gluteus_medius_left", "gluteus_medius_right", "iliopsoas_left", "iliopsoas_right", "autochthon_left"]


def _cohort(n: int, seed: int = 0) -> np.ndarray:
    """Muscle masses (n, 5): a body-wide factor times independent per-muscle factors."""
    rng = np.random.default_rng(seed)
    base = np.array([150.0, 150.0, 250.0, 250.0, 300.0])
    return base * rng.uniform(0.7, 1.2, (n, 1)) * rng.uniform(0.8, 1.2, (n, len(base)))


def _rows(values: np.ndarray, quantity: str = "mass_g", kind: str | None = "muscle") -> list[dict]:
    return [{"id": f"s{i:03d}", "structure": m, "quantity": quantity, "value": float(v),
             **({"kind": kind} if kind else {})} for i, row in enumerate(values) for m, v in zip(MUSCLES, row)]


def test_side_pairs_and_asymmetry_index():
    assert sp.side_pairs(MUSCLES) == [("gluteus_medius", "gluteus_medius_left", "gluteus_medius_right"),
                                      ("iliopsoas", "iliopsoas_left", "iliopsoas_right")]
    assert sp.side_pairs(["psoas_l", "psoas_r", "femur"]) == [("psoas", "psoas_l", "psoas_r")]
    np.testing.assert_allclose(sp.asymmetry_index([3.0, 1.0], [1.0, 1.0]), [0.5, 0.0])


def test_right_decomposition_with_a_wrong_global_factor_scores_one():
    """Truth times a random per-subject factor: every share and asymmetry is exact (PCC 1),
    while the per-muscle PCC is not."""
    truth = _cohort(80)
    pred = truth * np.random.default_rng(1).uniform(0.6, 1.4, (80, 1))
    res = sp.specificity(evaluate(_rows(pred), _rows(truth)).pairs, MUSCLES)
    s = res["summary"]["mass_g"]
    assert s["mean_share_pcc"] == pytest.approx(1.0) and s["mean_asymmetry_pcc"] == pytest.approx(1.0)
    assert s["mean_pcc"] < 0.9 and s["n_subjects"] == 80
    assert len(res["pairs"]) == 2 and {r["pair"] for r in res["pairs"]} == {"gluteus_medius", "iliopsoas"}


def test_one_number_per_subject_scores_zero_beyond_it():
    """Estimates that are a function of the true total alone: high per-muscle PCC, partial PCC
    0 (by definition), asymmetry PCC about 0 (the cohort's asymmetries are independent of the total)."""
    truth = _cohort(2000, seed=2)
    total = truth.sum(axis=1)
    pred = np.outer(total, truth.mean(axis=0) / total.mean()) + np.array([1.0, 2.0, 0.0, -1.0, 3.0])
    res = sp.specificity(evaluate(_rows(pred), _rows(truth)).pairs, MUSCLES)
    s = res["summary"]["mass_g"]
    assert s["mean_pcc"] > 0.7
    assert s["mean_partial_pcc"] == 0.0
    assert abs(s["mean_asymmetry_pcc"]) < 0.1 and abs(s["mean_share_pcc"]) < 0.1


def test_partial_pcc_known_values():
    rng = np.random.default_rng(3)
    t = rng.normal(size=500)
    y = 2 * t + rng.normal(size=500)
    assert sp.partial_pcc(y, y, t) == pytest.approx(1.0)
    assert sp.partial_pcc(3 + 4 * t, y, t) == 0.0
    # the part of y beyond t is the noise: an estimate that knows half of it (and nothing else)
    noise = y - 2 * t
    other = rng.normal(size=500)
    r = sp.partial_pcc(2 * t + noise + other, y, t)
    assert r == pytest.approx(1 / np.sqrt(2), abs=0.06)


def test_effective_sample_size():
    # every value of a subject hits or misses together: as many independent values as subjects
    same = {f"s{i}": [i % 3 != 0] * 10 for i in range(30)}
    e = sp.effective_sample_size(same)
    assert e["n_values"] == 300 and e["n_subjects"] == 30 and e["icc"] == pytest.approx(1.0)
    assert e["n_effective"] == pytest.approx(30.0)
    # independent hits: close to the number of values
    rng = np.random.default_rng(4)
    ind = {f"s{i}": list(rng.random(10) < 0.9) for i in range(200)}
    e = sp.effective_sample_size(ind)
    assert 1600 < e["n_effective"] <= 2000 and e["n_subjects"] == 200
    lo, hi = sp.wilson_interval(0.9, 30)
    assert lo < 0.9 < hi and hi - lo > sp.wilson_interval(0.9, 300)[1] - sp.wilson_interval(0.9, 300)[0]


def test_evaluate_reports_specificity_and_coverage_n(tmp_path):
    truth = _cohort(40, seed=5)
    pred = truth * 1.05
    rows = [{**r, "low": r["value"] * 0.9, "high": r["value"] * 1.1, "level": 0.9} for r in _rows(pred)]
    ev = evaluate(rows, _rows(truth, kind=None))  # kinds from the predictions' rows
    assert ev.muscles() == sorted(MUSCLES)
    cov = ev.coverage()["overall"]
    assert cov["coverage"] == 1.0 and cov["n"] == 200 and cov["n_subjects"] == 40
    assert 40 <= cov["n_effective"] <= 200
    s = ev.specificity()["summary"]["mass_g"]
    assert s["mean_share_pcc"] == pytest.approx(1.0)
    md = ev.to_markdown()
    assert "share PCC" in md and "asymmetry PCC" in md and "effective n" in md
    # names known to the built-in tables get their kind without a kind column
    assert evaluate(_rows(pred, kind=None), _rows(truth, kind=None)).muscles() == sorted(MUSCLES)
