"""An interrupted `mskdex demo` (Ctrl-C or kill) leaves no half-written demo: the demo is built in
a staging folder beside --out and renamed into place only when complete (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _interrupt_demo(out: Path, sig: int, *args: str) -> int:
    """Start a quick demo into ``out``, send ``sig`` once its staging folder holds the cohort's
    first subject (mid-run), return the exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # as at a terminal: SIGINT at its default even when this test runs as a background job (a shell
    # without job control starts those with SIGINT ignored, and Python would keep it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "MSKdeXLib", "demo", "--quick", "--out", str(out),
                             "--progress", "none", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(out.parent.glob(f".{out.name}.partial-*/cohort/subject-0000/metrics.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the demo ended before it could be interrupted"
        proc.send_signal(sig)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_nothing_and_keeps_the_previous_demo(tmp_path, sig):
    fresh = tmp_path / "fresh"
    assert _interrupt_demo(fresh, sig) == 130
    assert not fresh.exists() and not list(tmp_path.glob(".fresh.*"))  # nothing half-written, no staging left
    # a forced re-run over an earlier demo, interrupted, leaves the earlier demo as it was
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"format": "mskdex-demo/1", "marker": 1}))
    (old / "report.md").write_text("earlier demo")
    assert _interrupt_demo(old, sig, "--force") == 130
    assert sorted(p.name for p in old.iterdir()) == ["report.md", "summary.json"]
    assert json.loads((old / "summary.json").read_text())["marker"] == 1
    assert not list(tmp_path.glob(".old.*"))
