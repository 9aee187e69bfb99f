"""`mskdex demo --quick` run twice as a user runs it (separate processes, different thread
settings and cohort workers) gives bit-identical estimates (issue 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _demo(out: Path, env_extra: dict[str, str], *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSKDEX_PINNED",))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "MSKdeXLib", "demo", "--quick", "--out", str(out),
                          "--progress", "none", *args], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # two quick demos: ~40 s on 2 idle cores
def test_two_quick_demos_give_identical_numbers_whatever_the_threads_and_workers(tmp_path):
    # the first run starts with 2 math threads everywhere and builds the cohort in-process; the
    # second with the defaults and 2 cohort worker processes: the demo pins both to the same
    a = _demo(tmp_path / "a", {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"},
              "--workers", "1")
    b = _demo(tmp_path / "b", {}, "--workers", "2")
    for s in (a, b):
        rec = s["reproducibility"]
        assert rec["pinned"] and rec["torch_threads"] == 1 and rec["deterministic_algorithms"]
        assert rec["environment"]["OMP_NUM_THREADS"] == "1"
    assert a["heldout"] == b["heldout"] and len(a["heldout"]) == 3
    for name in a["heldout"]:
        ra = json.loads((tmp_path / "a" / "predictions" / f"{name}.json").read_text())["rows"]
        rb = json.loads((tmp_path / "b" / "predictions" / f"{name}.json").read_text())["rows"]
        assert [(r["structure"], r["quantity"], r["value"], r["low"], r["high"]) for r in ra] == \
               [(r["structure"], r["quantity"], r["value"], r["low"], r["high"]) for r in rb]
    for key in ("muscle_mean_pcc", "mean_pcc", "channel_agreement", "interval_coverage"):
        assert a[key] == b[key], key
    # the training itself went the same way step by step, not only to the same end
    ha = json.loads((tmp_path / "a" / "model" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "model" / "history.json").read_text())
    assert ha == hb and ha
