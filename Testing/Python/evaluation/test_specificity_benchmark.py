"""Issue 14's benchmark command still regenerates its table: ``benchmarks/bench_network.py --part
specificity`` at a tiny scale (real pelvis CT, 8 training and 4 validation subjects of the specificity
preset, 5 training steps; validation split only, the test split is not built) writes every baseline's
row beside the network's three rows, with the definitions' fixed points holding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from MSKdeXLib.io import sample_data

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(sample_data.pelvis_ct() is None, reason="needs the real pelvis CT (../shared/data)")
def test_specificity_benchmark_writes_the_network_beside_the_baselines(tmp_path):
    out = tmp_path / "spec"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_network.py"), "--part", "specificity", "--threads", "1",
           "--spec-train", "8", "--spec-val", "4", "--spec-test", "0", "--spec-steps", "5",
           "--spec-configs", "unpaired", "--spec-eval", "val", "--out", str(out), "--markdown"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((out / "specificity.json").read_text())
    assert doc["evaluated_on"] == "val" and doc["scale"]["index_ranges"]["val"] == [10000, 10004]
    rows = doc["rows"]
    assert set(rows) == {"constant", "global_oracle", "ridge", "template", "unpaired: backbone sums",
                         "unpaired: sum-head gain x mean backbone", "unpaired: full model"}
    for name in ("global_oracle", "template"):   # functions of the true total: nothing left beyond it
        for q in ("mass_g", "volume_cm3"):
            assert rows[name]["quantities"][q]["mean_partial_pcc"] == pytest.approx(0.0, abs=1e-9)
    assert all(r["n_subjects"] == 4 for r in rows.values())
    assert "| unpaired: full model |" in doc["markdown"] and "| global_oracle |" in run.stdout
