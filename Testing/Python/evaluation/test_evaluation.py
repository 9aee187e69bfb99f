"""Evaluation statistics against scipy / numpy, and file pairing, on truth from the real CTs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats as sst

from MSKdeXLib.cli import main
from MSKdeXLib.evaluation.agreement import agreement, evaluate, icc_2_1, read_rows

STRUCTS = ["hip_left", "femur_left", "gluteus_maximus_left", "gluteus_medius_left", "iliopsoas_left"]


def test_icc_matches_shrout_fleiss_table():
    """Shrout & Fleiss (1979), Table 2 (6 targets x 4 judges): ICC(2,1) = 0.29."""
    data = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert icc_2_1(data) == pytest.approx(0.29, abs=0.005)
    x = np.array([1.0, 2.0, 4.0, 7.0])
    assert icc_2_1(x, x) == pytest.approx(1.0)
    assert icc_2_1(x, x + 3) < sst.pearsonr(x, x + 3)[0] == pytest.approx(1.0)  # absolute agreement


@pytest.fixture(scope="module")
def cohort(pelvis):
    """Truth of 8 'subjects': the real pelvis CT's metrics scaled per subject (lean-mass change),
    plus noisy predictions; two more structures give truth rows that have no prediction."""
    from MSKdeXLib.anatomy.ct_metrics import structure_metrics

    ct, labels = pelvis
    base = {m.structure.name: m for m in structure_metrics(ct, labels, [labels.table.by_name(n) for n in STRUCTS])}
    rng = np.random.default_rng(0)
    truth, pred = [], []
    for i in range(8):
        f = rng.uniform(0.7, 1.3)
        for n, m in base.items():
            for q in ("mass_g", "volume_cm3"):
                t = getattr(m, q) * f * rng.uniform(0.95, 1.05)
                truth.append({"id": f"s{i}", "structure": n, "quantity": q, "value": t})
                pred.append({"id": f"s{i}", "structure": n.replace("_", " ").title(), "quantity": q,
                             "value": t * rng.normal(1.05, 0.08)})
    for m in structure_metrics(ct, labels, [labels.table.by_name(n) for n in ("femur_right", "sacrum")]):
        truth.append({"id": "extra", "structure": m.structure.name, "quantity": "mass_g", "value": m.mass_g})
    return pred, truth


def test_statistics_match_scipy(cohort):
    pred, truth = cohort
    ev = evaluate(pred, truth)
    assert len(ev.stats) == 2 * len(STRUCTS) and ev.unmatched_truth == 2 and ev.unmatched_pred == 0
    for s in ev.stats:
        v = ev.pairs[(s["structure"], s["quantity"])]
        p = np.array([a[1] for a in v])
        t = np.array([a[2] for a in v])
        assert s["n"] == 8
        assert s["pcc"] == pytest.approx(sst.pearsonr(p, t)[0], rel=1e-9)
        assert s["mae"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
        assert s["mape_percent"] == pytest.approx(100 * np.mean(np.abs(p - t) / t), rel=1e-12)
        d = p - t
        assert s["bias"] == pytest.approx(d.mean()) and s["loa_high"] - s["loa_low"] == pytest.approx(
            2 * 1.96 * np.std(d, ddof=1))
        # ICC(2,1) from the variances of row / column means (McGraw & Wong's form, written independently)
        y = np.column_stack([p, t])
        n, k = y.shape
        msr = k * np.var(y.mean(1), ddof=1)
        msc = n * np.var(y.mean(0), ddof=1)
        mse = (np.sum((y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()) ** 2)
               / ((n - 1) * (k - 1)))
        assert s["icc"] == pytest.approx((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n), rel=1e-9)
    head = ev.headline()
    assert head["mass_g"] == pytest.approx(np.mean([s["pcc"] for s in ev.stats if s["quantity"] == "mass_g"]))
    assert agreement(np.ones(3), np.ones(3))["mae"] == 0.0


def test_files_pairing_and_cli(cohort, tmp_path, capsys):
    """Predictions as estimates.json per subject folder; truth as metrics JSON (mskdex metrics
    --json format) per subject folder, plus a wide CSV; the evaluate command pairs them."""
    pred, truth = cohort
    for i in range(8):
        sid = f"s{i}"
        d = tmp_path / "pred" / sid
        d.mkdir(parents=True)
        rows = [dict(r, low=r["value"], high=r["value"]) for r in pred if r["id"] == sid]
        (d / "estimates.json").write_text(json.dumps({"format": "mskdex-estimates/1", "id": sid, "rows": rows}))
        (d / "estimates.csv").write_text("ignored,because,json,exists\n")
        m = tmp_path / "truth" / sid
        m.mkdir(parents=True)
        per = {}
        for r in truth:
            if r["id"] == sid:
                per.setdefault(r["structure"], {"name": r["structure"]})[r["quantity"]] = r["value"]
        (m / "metrics.json").write_text(json.dumps({"structures": list(per.values()), "settings": {}}))
    rows = read_rows(tmp_path / "truth")
    assert {r["id"] for r in rows} == {f"s{i}" for i in range(8)} and len(rows) == 8 * 2 * len(STRUCTS)
    with open(tmp_path / "truth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "structure", "mass_g", "volume_cm3"])
        for r in rows:
            if r["quantity"] == "mass_g":
                vol = next(x["value"] for x in rows if x["id"] == r["id"] and x["structure"] == r["structure"]
                           and x["quantity"] == "volume_cm3")
                w.writerow([r["id"], r["structure"], repr(r["value"]), repr(vol)])
    a = evaluate(read_rows(tmp_path / "pred"), read_rows(tmp_path / "truth.csv"))
    b = evaluate(pred, [t for t in truth if t["id"] != "extra"])
    assert [s["pcc"] for s in a.stats] == pytest.approx([s["pcc"] for s in b.stats], rel=1e-12)
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
               "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert rc == 0 and "mean PCC over structures" in out
    assert f"{b.headline()['mass_g']:.3f}" in out
    for name in ("evaluation.csv", "evaluation.md", "evaluation.json", "pairs.csv", "scatter_mass_g.png",
                 "bland_altman_volume_cm3.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 0
    table = list(csv.DictReader(open(tmp_path / "ev" / "evaluation.csv")))
    assert len(table) == 2 * len(STRUCTS)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope" in err


def test_interval_coverage_from_files(cohort, tmp_path, capsys):
    """Predictions with intervals (estimates.json rows, wide CSV with *_low/_high): coverage per
    structure/quantity and overall equals an independent count; the reports carry it."""
    pred, truth = cohort
    tv = {(t["id"], t["structure"], t["quantity"]): t["value"] for t in truth}
    rng = np.random.default_rng(1)
    for i in range(8):
        sid = f"s{i}"
        rows = []
        for r in (r for r in pred if r["id"] == sid):
            half = abs(r["value"]) * rng.uniform(0.02, 0.15)
            rows.append(dict(r, low=r["value"] - half, high=r["value"] + half))
        d = tmp_path / "pred" / sid
        d.mkdir(parents=True)
        (d / "estimates.json").write_text(json.dumps({"format": "mskdex-estimates/1", "id": sid, "interval": 0.8,
                                                      "rows": rows}))
    rows = read_rows(tmp_path / "pred")
    assert all({"low", "high"} <= set(r) and r["level"] == 0.8 for r in rows)
    ev = evaluate(rows, truth)
    from MSKdeXLib.anatomy.structures import normalize_name

    names = {normalize_name(n): n for n in STRUCTS}
    hit = {}
    for r in rows:
        t = tv[(r["id"], names[normalize_name(r["structure"])], r["quantity"])]
        hit.setdefault((names[normalize_name(r["structure"])], r["quantity"]), []).append(r["low"] <= t <= r["high"])
    for s in ev.stats:
        assert s["coverage"] == pytest.approx(np.mean(hit[(s["structure"], s["quantity"])]))
        assert s["n_interval"] == 8 and s["nominal_level"] == 0.8
    allhit = [h for v in hit.values() for h in v]
    cov = ev.coverage()
    assert cov["overall"]["coverage"] == pytest.approx(np.mean(allhit)) and cov["overall"]["n"] == len(allhit)
    assert cov["overall"]["nominal"] == 0.8 and 0 < cov["overall"]["coverage"] < 1
    # wide CSV (estimates.csv layout) gives the same coverage
    with open(tmp_path / "wide.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "structure", "mass_g", "mass_g_low", "mass_g_high", "volume_cm3", "volume_cm3_low",
                    "volume_cm3_high"])
        by = {(r["id"], r["structure"], r["quantity"]): r for r in rows}
        for (i, s, q), r in by.items():
            if q == "mass_g":
                v = by[(i, s, "volume_cm3")]
                w.writerow([i, s, r["value"], r["low"], r["high"], v["value"], v["low"], v["high"]])
    ev2 = evaluate(read_rows(tmp_path / "wide.csv"), truth)
    assert ev2.coverage()["overall"]["coverage"] == pytest.approx(cov["overall"]["coverage"])
    # reports: CSV column, Markdown line, JSON, command-line headline
    with open(tmp_path / "truth.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "structure", "quantity", "value"])
        w.writerows([t["id"], t["structure"], t["quantity"], repr(t["value"])] for t in truth)
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth.csv"),
                 "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"{cov['overall']['coverage']:.1%} overall" in out and "nominal 80%" in out
    table = list(csv.DictReader(open(tmp_path / "ev" / "evaluation.csv")))
    assert float(table[0]["coverage"]) == pytest.approx(ev.stats[0]["coverage"], rel=1e-5)
    assert "coverage" in (tmp_path / "ev" / "evaluation.md").read_text()
    doc = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert doc["interval_coverage"]["overall"]["coverage"] == pytest.approx(cov["overall"]["coverage"])
    # predictions without intervals: no coverage column
    assert evaluate(pred, truth).coverage() == {} and "coverage" not in evaluate(pred, truth).to_csv()
