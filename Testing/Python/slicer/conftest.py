"""Fixtures of the Slicer-in-a-box tests: one Slicer session per test and Slicer version."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import slicer_box  # noqa: E402

#: training settings small enough for a test (seconds on one CPU core)
TINY_TRAIN = {"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
              "discriminator": {"width": 8, "n_layers": 2, "n_scales": 1},
              "data": {"batch_size": 2}, "steps": 2, "log_every": 1, "checkpoint_every": 10, "val_every": 10}
#: ``mskdex register`` options that keep a registration to seconds
TINY_REGISTRATION = ["--max-evals", "0", "--refine-steps", "2", "--fine-px", "32"]


@pytest.fixture
def scene():
    """A fresh REAL MRML scene (slicer-core), cleared after the test."""
    slicer = slicer_box.slicer_core()
    if slicer is None:
        pytest.skip("slicer-core (Slicer's MRML in plain Python) not installed")
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(True)


@pytest.fixture(params=slicer_box.VERSIONS)
def box(request, tmp_path):
    """A started Slicer session (Slicer's Python of one release + slicer-core MRML + stand-ins)."""
    if slicer_box.slicer_core() is None:
        pytest.skip("slicer-core (Slicer's MRML in plain Python) not installed")
    if slicer_box.reference_dir(request.param) is None:
        pytest.skip(f"Slicer {request.param} Python sources not found in {slicer_box.REFERENCE}")
    b = slicer_box.SlicerBox(request.param, tmp_path / "slicer").start()
    yield b
    b.stop()


@pytest.fixture
def panel(box):
    """The module loaded, its panel set up and shown (what a user gets by selecting MSKdeX)."""
    box.load_module()
    box.create_widget()
    box.enter()
    return box.widget


@pytest.fixture
def sample_cache(box, pelvis_case):
    """Slicer's download cache holding the sample files (as after a first download): SampleData
    verifies their SHA-256 and loads them without a network."""
    cache = Path(box.scene.GetCacheManager().GetRemoteCacheDirectory())
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(pelvis_case.ct, cache / "MSKdeXPelvisCT.nii.gz")
    shutil.copy(pelvis_case.labels, cache / "MSKdeXPelvisLabels.nii.gz")
    return cache


@pytest.fixture(scope="session")
def tiny_dataset(pelvis, tmp_path_factory):
    """A 3-record training set of two structures (hip_left, gluteus_medius_left) and a tiny
    training config file."""
    from projection_dataset import parallel_projection_dataset

    ct, labels = pelvis
    d = tmp_path_factory.mktemp("box_dataset")
    parallel_projection_dataset(ct, labels, d, ["hip_left", "gluteus_medius_left"], ("mass_g", "volume_cm3"),
                                n_records=3, size=32, seed=4)
    cfg = d.parent / "box_train.json"
    cfg.write_text(json.dumps(TINY_TRAIN))
    return d, cfg


LAUNCHER = '''#!{python}
"""PythonSlicer stand-in: like the CTK launcher, starts the real interpreter as a child
process and does not forward signals (a SIGINT/SIGTERM ends the launcher, not the child)."""
import os, subprocess, sys
env = dict(os.environ)
env["PYTHONNOUSERSITE"] = "1"
child = subprocess.Popen([{real!r}] + sys.argv[1:], env=env)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "children.txt"), "a") as f:
    f.write(f"{{child.pid}}\\n")
sys.exit(child.wait())
'''


def make_launcher(folder: Path, real_python: str) -> Path:
    """bin/PythonSlicer (the launcher stand-in) in ``folder``; its children's pids go to
    bin/children.txt."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "PythonSlicer"
    exe.write_text(LAUNCHER.format(python=sys.executable, real=real_python))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def launcher_children(exe: Path) -> list[int]:
    p = exe.parent / "children.txt"
    return [int(x) for x in p.read_text(encoding="utf-8").split()] if p.is_file() else []


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """sys.executable is Slicer's PythonSlicer launcher stand-in (as inside Slicer); stray
    children are killed at the end whatever the test did."""
    exe = make_launcher(tmp_path / "Slicer", sys.executable)
    monkeypatch.setattr(sys, "executable", str(exe))
    yield exe
    for pid in launcher_children(exe):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


#: ``mskdex followup`` options that keep a reading to seconds (the least re-simulations, one pose,
#: held-out intervals, a 16 px reader)
TINY_FOLLOWUP = ["--samples", "40", "--grid", "16", "--poses", "1", "--calibration-samples", "0"]


@pytest.fixture(scope="session")
def followup_view(pelvis):
    """A follow-up radiograph of the real pelvis CT: (Radiograph of detector codes, Camera, pose
    ct_to_camera) at the default AP view of a 64 x 64 px, 6 mm, SID 1000 mm detector (78 kVp, noise,
    scatter), the CT unchanged."""
    from MSKdeXLib.learning import cohort as co
    from MSKdeXLib.projection.geometry import Camera
    from MSKdeXLib.projection.simulate import SimulationSettings, simulate_radiograph

    ct, labels = pelvis
    cam = Camera(64, 64, 6.0, 6.0, 1000.0)
    pose = co.base_view(ct, labels, cam)
    rg = simulate_radiograph(ct, cam, pose, SimulationSettings(kvp=78, noise_level=0.003, scatter_fraction=0.2),
                             seed=1)
    return rg, cam, pose


@pytest.fixture(scope="session")
def followup_registration(pelvis_case, followup_view, tmp_path_factory):
    """A REAL ``mskdex register`` (tiny settings, the pelvis) of the pelvis CT to the follow-up radiograph
    of :func:`followup_view`, written as a TIFF with its spacing: (registration output folder, the
    radiograph file). What the module's Registration leaves for the Follow-up to pick up."""
    import torch

    from MSKdeXLib.cli import main
    from MSKdeXLib.io.radiographs import write_radiograph_image

    rg, cam, _ = followup_view
    d = tmp_path_factory.mktemp("followup_registration")
    write_radiograph_image(d / "fu.tif", rg, force=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["register", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--xray",
                   str(d / "fu.tif"), "--out", str(d / "registration"), "--bones", "pelvis", "--sid",
                   repr(cam.sid_mm), *TINY_REGISTRATION, "--progress", "none"])
    finally:
        torch.set_num_threads(n)
    assert rc in (0, 3)
    return d / "registration", d / "fu.tif"
