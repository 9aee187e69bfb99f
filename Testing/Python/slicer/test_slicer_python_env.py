"""Every command the Slicer module starts runs with only what Slicer ships plus what the module
installs (MSKdeXLib.dependencies), through a PythonSlicer-like launcher, and Cancel stops it.

The environment is built once per package list (slicer_python_env.py; ~2 minutes, then cached
under .cache/, git-ignored)."""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import pytest

import slicer_python_env as spe
from conftest import TINY_REGISTRATION, TINY_TRAIN, alive, launcher_children, make_launcher
from slicer_box import reference_dir

ROOT = Path(__file__).resolve().parents[3]
VERSION = "v5.8.1"  # the oldest supported release: the strictest package set


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level names of every absolute import in MSKdeXLib (lazy ones included) that are not
    the standard library or MSKdeXLib."""
    found: dict[str, set[str]] = {}
    for f in (ROOT / "MSKdeXLib").rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            mods = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module] if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module else []
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top != "MSKdeXLib":
                    found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def test_one_dependency_list_covers_every_import():
    """Defect 3: every package the core imports is shipped by Slicer or in the module's one
    installer list (torch through the PyTorch extension); the list names no package Slicer ships."""
    from MSKdeXLib import dependencies as deps

    known = {d.lower() for d in deps.SLICER_SHIPS} | {deps.distribution(r).lower() for r in deps.SLICER_INSTALLS} \
        | {deps.distribution(deps.TORCH), *deps.COMMAND_LINE_ONLY, "slicer"}
    for name, files in _third_party_imports().items():
        dist = deps.IMPORT_NAMES.get(name, name).lower()
        assert dist in known, f"{name} (imported by {sorted(files)}) is neither shipped by Slicer nor installed"
    if reference_dir(VERSION):
        shipped = {n.lower() for n in spe.shipped_packages(VERSION)}
        assert {"numpy", "scipy", "pillow", "pydicom"} <= shipped  # what SLICER_SHIPS relies on
        assert not shipped & {deps.distribution(r).lower() for r in deps.SLICER_INSTALLS}
    # pyproject's dependencies include the module's list (the command line needs the same)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for r in (deps.TORCH, *deps.SLICER_INSTALLS):
        assert f'"{deps.distribution(r)}' in pyproject, r


@pytest.fixture(scope="module")
def slicer_python(tmp_path_factory):
    """(environment folder, PythonSlicer launcher stand-in running its interpreter)."""
    if reference_dir(VERSION) is None:
        pytest.skip(f"Slicer {VERSION} build files not found in ../shared/reference")
    try:
        env = spe.build(VERSION)
    except RuntimeError as exc:  # no package index reachable
        pytest.skip(f"cannot build the Slicer-like Python environment: {exc}")
    exe = make_launcher(tmp_path_factory.mktemp("SlicerEnv"), str(spe.python_of(env)))
    yield env, exe
    import os
    import signal

    for pid in launcher_children(exe):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _job(exe, *argv):
    from MSKdeXLib import jobs

    return jobs.Job([str(exe), "-m", "MSKdeXLib", *map(str, argv)])


def test_environment_is_slicers_plus_the_module_list(slicer_python):
    from MSKdeXLib import dependencies as deps

    env, _ = slicer_python
    have = spe.freeze(env)
    for name, version in spe.shipped_packages(VERSION).items():
        if name.lower() not in ("pip", "setuptools", "wheel"):
            assert have.get(name.lower().replace("_", "-")) == version, name  # Slicer's versions kept
    import subprocess

    out = subprocess.run([spe.python_of(env), "-c", "from MSKdeXLib import dependencies as d; print(d.missing())"],
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr  # the module would not ask to install more
    assert "tqdm" not in have and "monai" in have and deps.distribution(deps.TORCH) in have


def test_module_commands_run_in_slicers_python(slicer_python, pelvis_case, tiny_dataset, pelvis, tmp_path):
    """The commands the module starts (jobs.*_args, as the Logic builds them), run by the
    launcher in the Slicer-like environment: help, metrics, a tiny registration, training and
    an estimate."""
    import numpy as np

    from MSKdeXLib import jobs
    from MSKdeXLib.io.images import Radiograph
    from MSKdeXLib.io.radiographs import write_radiograph_image

    env, exe = slicer_python
    help_job = _job(exe, "--help").start()
    assert help_job.wait(120) == 0, help_job.summary()
    for sub in ("register", "train", "predict", "metrics"):
        j = _job(exe, sub, "--help").start()
        assert j.wait(120) == 0, j.summary()
    m = _job(exe, "metrics", "--ct", pelvis_case.ct, "--labels", pelvis_case.labels, "--structures", "sacrum",
             "--json", tmp_path / "m.json").start()
    assert m.wait(120) == 0, m.summary()
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["structures"][0]["name"] == "sacrum"

    ct, labels = pelvis
    rho = np.clip(1 + ct.array / 1000.0, 0, None).sum(axis=1)[::-1, ::-1].astype(np.float32)
    xray = write_radiograph_image(tmp_path / "xray.tif", Radiograph(rho, (3.0, 3.0), "file"), force=True)
    reg = _job(exe, *jobs.register_args(str(pelvis_case.ct), str(pelvis_case.labels), str(xray),
                                        str(tmp_path / "reg"), bones="pelvis", spacing_mm=(3.0, 3.0), device="cpu",
                                        extra=TINY_REGISTRATION)).start()
    assert reg.wait(300) in (0, 3), reg.summary()  # 3: finished, registration doubtful (tiny settings)
    assert reg.succeeded and (tmp_path / "reg" / "registration.json").is_file()
    data, cfg = tiny_dataset
    tr = _job(exe, *jobs.train_args(str(data), str(tmp_path / "model"), config=str(cfg), device="cpu")).start()
    assert tr.wait(300) == 0, tr.summary()
    assert [e["step"] for e in tr.state.events if e["event"] == "progress"] == [1, 2]
    pr = _job(exe, *jobs.predict_args(str(tmp_path / "model"), str(xray), str(tmp_path / "est"), device="cpu",
                                      pixel_spacing_mm=(3.0, 3.0))).start()
    assert pr.wait(300) == 0, pr.summary()
    assert json.loads((tmp_path / "est" / "estimates.json").read_text(encoding="utf-8"))["structures"]


def test_cancel_through_the_launcher_stops_the_worker(slicer_python, tiny_dataset, tmp_path):
    """Defect 5 in Slicer's Python: the launcher does not forward signals; Job.cancel stops the
    interpreter it started (process group), promptly."""
    from MSKdeXLib import jobs

    env, exe = slicer_python
    data, cfg = tiny_dataset
    long_cfg = tmp_path / "long.json"
    long_cfg.write_text(json.dumps({**TINY_TRAIN, "steps": 100000}))
    before = set(launcher_children(exe))
    job = _job(exe, *jobs.train_args(str(data), str(tmp_path / "model"), config=str(long_cfg), device="cpu")).start()
    t_end = time.time() + 180
    while job.state.step < 1 and time.time() < t_end and not job.finished:
        job.poll()
        time.sleep(0.05)
    assert job.state.step >= 1, job.summary()
    workers = [p for p in launcher_children(exe) if p not in before]
    assert workers and all(alive(w) for w in workers)
    t0 = time.time()
    job.cancel()
    job.wait(30)
    assert time.time() - t0 < 15
    assert job.cancelled and not job.succeeded
    assert not any(alive(w) for w in workers)
