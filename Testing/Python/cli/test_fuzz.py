"""Fuzzing the command line as a careful user would (issue 15): truncated and non-finite inputs,
NaN/inf/negative options, broken files, read-only outputs, broken pipes, Ctrl-C, doubtful
registrations, NaN weights. Every bad input must give its exit code, one line naming the file or
option (never a traceback) and leave nothing in the output's parent folder.

Inputs are tiny (the real pelvis CT at every 3rd voxel, 41x34x38 at 4.5 mm; 32-64 px images; a
2-step model) and made once for the module; the whole file runs in well under a minute.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MSKdeXLib.cli import main
from MSKdeXLib.errors import EXIT_BROKEN_PIPE, EXIT_DOUBTFUL, EXIT_INTERRUPTED, EXIT_USER_ERROR

TINY_TRAIN = {"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
              "discriminator": {"width": 8, "n_layers": 2, "n_scales": 1},
              "data": {"batch_size": 2}, "steps": 2, "log_every": 1, "checkpoint_every": 1000, "val_every": 1000}


def _quiet_main(argv: list[str]) -> int:
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


@pytest.fixture(scope="module")
def kit(pelvis_case, tmp_path_factory, one_torch_thread):
    """Tiny real inputs, good and broken, made once."""
    import SimpleITK as sitk
    from safetensors.torch import load_file, save_file

    from MSKdeXLib.io.radiographs import write_dx_dicom
    from MSKdeXLib.io.volumes import load_ct, load_labels
    from projection_dataset import parallel_projection_dataset

    d = tmp_path_factory.mktemp("fuzz_kit")
    ct = sitk.ReadImage(str(pelvis_case.ct))[::3, ::3, ::3]
    labels = sitk.ReadImage(str(pelvis_case.labels))[::3, ::3, ::3]
    sitk.WriteImage(ct, str(d / "ct.nii.gz"))
    sitk.WriteImage(labels, str(d / "labels.nii.gz"))
    data = (d / "ct.nii.gz").read_bytes()
    (d / "ct_trunc.nii.gz").write_bytes(data[: int(len(data) * 0.4)])  # a cut download
    sitk.WriteImage(ct, str(d / "full.nii"))
    raw = (d / "full.nii").read_bytes()
    (d / "ct_short.nii").write_bytes(raw[: int(len(raw) * 0.6)])  # ITK alone reads this as zeros
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    arr[10:13, 10:14, 10:15] = np.nan  # 60 NaN voxels inside the body
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(ct)
    sitk.WriteImage(nan_img, str(d / "ct_nan.nrrd"))
    base = ["--ct", str(d / "ct.nii.gz"), "--labels", str(d / "labels.nii.gz")]

    assert _quiet_main(["simulate-xray", *base, "--out", str(d / "xray.dcm"), "--rows", "64", "--cols", "64",
                        "--pixel-spacing", "6", "--progress", "none"]) == 0
    rng = np.random.default_rng(0)
    write_dx_dicom(d / "noise.dcm", rng.random((64, 64)).astype(np.float32), 6.0)

    # models: trained for 2 steps; a copy with a NaN weight; a copy with its weights file cut
    vol = load_ct(d / "ct.nii.gz")
    parallel_projection_dataset(vol, load_labels(d / "labels.nii.gz", vol), d / "ds",
                                ["hip_left", "gluteus_medius_left"], ("mass_g",), n_records=3, size=32, seed=4)
    (d / "tiny.json").write_text(json.dumps(TINY_TRAIN))
    assert _quiet_main(["train", "--config", str(d / "tiny.json"), "--data", str(d / "ds"), "--out",
                        str(d / "model"), "--progress", "none", "--device", "cpu"]) == 0
    shutil.copytree(d / "model", d / "model_nan")
    w = load_file(str(d / "model_nan" / "model.safetensors"))
    first = sorted(k for k, v in w.items() if v.is_floating_point())[0]
    w[first].view(-1)[:3] = float("nan")
    save_file(w, str(d / "model_nan" / "model.safetensors"), metadata={"format": "mskdex-model/1"})
    shutil.copytree(d / "model", d / "model_cut")
    blob = (d / "model_cut" / "model.safetensors").read_bytes()
    (d / "model_cut" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    # a data set whose radiographs are NaN: every loss is NaN from step 1
    shutil.copytree(d / "ds", d / "ds_nan")
    for rec in (d / "ds_nan" / "records").glob("*.safetensors"):
        t = load_file(str(rec))
        t["xray"][:] = float("nan")
        save_file(t, str(rec))
    (d / "bad_lr.json").write_text(json.dumps({**TINY_TRAIN, "optimizer": {"lr": -1}}))

    # a virtual subject, and copies with a garbage subject.json / a cut targets file
    assert _quiet_main(["cohort", *base, "--n", "1", "--out", str(d / "cohort"), "--detector", "32", "32",
                        "--progress", "none"]) == 0
    subject = d / "cohort" / "subject-0000"
    shutil.copytree(subject, d / "garbage" / "subject-0000")
    (d / "garbage" / "subject-0000" / "subject.json").write_text('{"format": "mskdex-subject/1", "structures": [')
    shutil.copytree(subject, d / "cut" / "subject-0000")
    t = d / "cut" / "subject-0000" / "targets.safetensors"
    t.write_bytes(t.read_bytes()[:2000])

    # a real case (CT, labels, radiograph, registration.json) whose femur registration is doubtful
    side = json.loads((d / "xray.json").read_text())
    real = d / "real" / "case1"
    real.mkdir(parents=True)
    for name in ("ct.nii.gz", "labels.nii.gz", "xray.dcm"):
        shutil.copy(d / name, real / name)
    bodies = [{"name": "pelvis", "structures": ["hip_left", "hip_right", "sacrum"],
               "ct_to_camera": side["ct_to_camera"], "doubtful": False},
              {"name": "femur_left", "structures": ["femur_left"], "ct_to_camera": side["ct_to_camera"],
               "doubtful": True}]
    (real / "registration.json").write_text(json.dumps({"format": "mskdex-registration/1", "geometry":
                                                        side["geometry"], "bodies": bodies}))

    # estimates of two cases (one value null) and their truth, for evaluate
    assert _quiet_main(["metrics", *base, "--json", str(d / "truth" / "case1.json")]) == 0
    shutil.copy(d / "truth" / "case1.json", d / "truth" / "case2.json")
    metrics = {r["name"]: r for r in json.loads((d / "truth" / "case1.json").read_text())["structures"]}
    (d / "pred").mkdir()
    for case, value in (("case1", None), ("case2", metrics["hip_left"]["mass_g"] * 1.02)):
        rows = [{"structure": "hip_left", "quantity": "mass_g", "value": value},
                {"structure": "gluteus_medius_left", "quantity": "mass_g",
                 "value": metrics["gluteus_medius_left"]["mass_g"] * 0.97}]
        (d / "pred" / f"{case}.json").write_text(json.dumps({"format": "mskdex-estimates/1", "id": case,
                                                             "rows": rows}))
    (d / "garbage.csv").write_text("this,is\nnot,estimates\n")
    dcm = (d / "xray.dcm").read_bytes()
    (d / "xray_cut.dcm").write_bytes(dcm[: int(len(dcm) * 0.6)])  # a radiograph cut in its pixel data
    return d


@pytest.fixture
def work(tmp_path):
    """The output's parent folder: must be empty again after a failed command."""
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder the command may not write into: read-only by mode, and (root ignores modes) every
    os.open/os.mkdir under it fails with EROFS, as on a read-only file system."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        p = os.fspath(path)
        if os.path.abspath(p).startswith(str(ro)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)

    def fake_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        refuse(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


def _ct(k, name="ct.nii.gz"):
    return ["--ct", str(k / name), "--labels", str(k / "labels.nii.gz")]


# (id, argv(kit, out), exit code, regex the one stderr line must match)
CASES = [
    # metrics
    ("metrics-truncated-gzip", lambda k, o: ["metrics", *_ct(k, "ct_trunc.nii.gz")], 2,
     r"ct_trunc\.nii\.gz: CT is truncated"),
    ("metrics-truncated-nii", lambda k, o: ["metrics", *_ct(k, "ct_short.nii")], 2,
     r"ct_short\.nii: CT is truncated: its pixel data holds \d+ of the \d+ bytes"),
    ("metrics-nan-block", lambda k, o: ["metrics", *_ct(k, "ct_nan.nrrd")], 2,
     r"ct_nan\.nrrd: CT has 60 non-finite voxels \(NaN 60, inf 0\) in array index box \[10:13, 10:14, 10:15\]"),
    ("metrics-slope-nan", lambda k, o: ["metrics", *_ct(k), "--density-slope", "nan"], 2,
     r"argument --density-slope: must be a finite number, got 'nan'"),
    ("metrics-slope-negative", lambda k, o: ["metrics", *_ct(k), "--density-slope", "-0.001"], 2,
     r"--density-slope must be > 0, got -0\.001"),
    ("metrics-window-inf", lambda k, o: ["metrics", *_ct(k), "--lean-window", "-29", "inf"], 2,
     r"argument --lean-window: must be a finite number"),
    # drr
    ("drr-truncated", lambda k, o: ["drr", *_ct(k, "ct_trunc.nii.gz"), "--out", o, "--rows", "32", "--cols", "32",
                                    "--progress", "none"], 2, r"ct_trunc\.nii\.gz: CT is truncated"),
    ("drr-nan-block", lambda k, o: ["drr", *_ct(k, "ct_nan.nrrd"), "--out", o, "--progress", "none"], 2,
     r"ct_nan\.nrrd: CT has 60 non-finite voxels"),
    ("drr-rotation-nan", lambda k, o: ["drr", *_ct(k), "--out", o, "--rotation", "nan", "0", "0"], 2,
     r"argument --rotation: must be a finite number, got 'nan'"),
    ("drr-sid-negative", lambda k, o: ["drr", *_ct(k), "--out", o, "--sid", "-5"], 2, r"--sid must be > 0, got -5"),
    ("drr-step-zero", lambda k, o: ["drr", *_ct(k), "--out", o, "--step", "0"], 2, r"--step must be > 0"),
    # simulate-xray
    ("simulate-truncated", lambda k, o: ["simulate-xray", *_ct(k, "ct_trunc.nii.gz"), "--out", o + ".dcm",
                                         "--progress", "none"], 2, r"ct_trunc\.nii\.gz: CT is truncated"),
    ("simulate-nan-block", lambda k, o: ["simulate-xray", *_ct(k, "ct_nan.nrrd"), "--out", o + ".dcm",
                                         "--progress", "none"], 2, r"ct_nan\.nrrd: CT has 60 non-finite"),
    ("simulate-kvp-inf", lambda k, o: ["simulate-xray", *_ct(k), "--out", o + ".dcm", "--kvp", "inf"], 2,
     r"argument --kvp: must be a finite number"),
    ("simulate-photons-negative", lambda k, o: ["simulate-xray", *_ct(k), "--out", o + ".dcm", "--photons", "-1"],
     2, r"--photons must be > 0"),
    # register
    ("register-sid-nan", lambda k, o: ["register", *_ct(k), "--xray", str(k / "noise.dcm"), "--out", o,
                                       "--sid", "nan"], 2, r"argument --sid: must be a finite number"),
    ("register-truncated-ct", lambda k, o: ["register", *_ct(k, "ct_trunc.nii.gz"), "--xray", str(k / "xray.dcm"),
                                            "--out", o, "--progress", "none"], 2, r"ct_trunc\.nii\.gz: CT is truncated"),
    ("register-nan-ct", lambda k, o: ["register", *_ct(k, "ct_nan.nrrd"), "--xray", str(k / "xray.dcm"),
                                      "--out", o, "--progress", "none"], 2, r"ct_nan\.nrrd: CT has 60 non-finite"),
    ("register-truncated-xray", lambda k, o: ["register", *_ct(k), "--xray", str(k / "xray_cut.dcm"), "--out", o,
                                              "--pixel-spacing", "6", "--progress", "none"], 2,
     r"xray_cut\.dcm: cannot decode DICOM pixel data .*less than expected"),
    ("register-not-an-image", lambda k, o: ["register", *_ct(k), "--xray", str(k / "tiny.json"), "--out", o,
                                            "--progress", "none"], 2, r"tiny\.json: not an image"),
    # cohort
    ("cohort-truncated", lambda k, o: ["cohort", *_ct(k, "ct_trunc.nii.gz"), "--n", "1", "--out", o,
                                       "--progress", "none"], 2, r"ct_trunc\.nii\.gz: CT is truncated"),
    ("cohort-n-negative", lambda k, o: ["cohort", *_ct(k), "--n", "-1", "--out", o], 2, r"--n must be >= 1, got -1"),
    ("cohort-sid-nan", lambda k, o: ["cohort", *_ct(k), "--n", "1", "--out", o, "--sid", "nan"], 2,
     r"argument --sid: must be a finite number"),
    # build-dataset
    ("dataset-garbage-subject", lambda k, o: ["build-dataset", "--cases", str(k / "garbage"), "--out", o,
                                              "--progress", "none"], 2,
     r"subject-0000/subject\.json: subject description is not valid JSON"),
    ("dataset-truncated-targets", lambda k, o: ["build-dataset", "--cases", str(k / "cut"), "--out", o,
                                                "--image-size", "32", "32", "--progress", "none"], 2,
     r"subject-0000/targets\.safetensors: targets unreadable \(truncated or corrupt"),
    ("dataset-doubtful", lambda k, o: ["build-dataset", "--cases", str(k / "real"), "--out", o,
                                       "--image-size", "32", "32", "--progress", "none"], 2,
     r"1 case\(s\) with a doubtful registration: real_case1 \(femur_left\).*--include-doubtful"),
    ("dataset-spacing-nan", lambda k, o: ["build-dataset", "--cases", str(k / "cohort"), "--out", o,
                                          "--pixel-spacing", "nan"], 2, r"argument --pixel-spacing: must be a finite number"),
    ("dataset-fractions", lambda k, o: ["build-dataset", "--cases", str(k / "cohort"), "--out", o,
                                        "--val-fraction", "0.6", "--test-fraction", "0.5"], 2,
     r"--val-fraction \+ --test-fraction must be < 1"),
    # train
    ("train-lr-negative", lambda k, o: ["train", "--config", str(k / "bad_lr.json"), "--data", str(k / "ds"),
                                        "--out", o, "--progress", "none", "--device", "cpu"], 2,
     r"bad_lr\.json: training config: optimizer\.lr must be > 0, got -1"),
    ("train-steps-negative", lambda k, o: ["train", "--data", str(k / "ds"), "--out", o, "--steps", "-1"], 2,
     r"--steps must be >= 1, got -1"),
    ("train-nan-losses", lambda k, o: ["train", "--config", str(k / "tiny.json"), "--data", str(k / "ds_nan"),
                                       "--out", o, "--progress", "none", "--device", "cpu"], 2,
     r"training diverged: loss .* is not finite at step 1; no model written"),
    # predict
    ("predict-nan-weights", lambda k, o: ["predict", "--model", str(k / "model_nan"), "--xray", str(k / "xray.dcm"),
                                          "--out", o, "--device", "cpu"], 2,
     r"model_nan/model\.safetensors: weight '.+' holds \d+ NaN/inf values: the model is unusable"),
    ("predict-truncated-weights", lambda k, o: ["predict", "--model", str(k / "model_cut"), "--xray",
                                                str(k / "xray.dcm"), "--out", o, "--device", "cpu"], 2,
     r"model_cut/model\.safetensors: not a valid safetensors file"),
    ("predict-truncated-dicom", lambda k, o: ["predict", "--model", str(k / "model"), "--xray",
                                              str(k / "xray_cut.dcm"), "--out", o], 2,
     r"xray_cut\.dcm: cannot decode DICOM pixel data"),
    ("predict-spacing-nan", lambda k, o: ["predict", "--model", str(k / "model"), "--xray", str(k / "xray.dcm"),
                                          "--out", o, "--pixel-spacing", "nan"], 2,
     r"argument --pixel-spacing: must be a finite number"),
    ("predict-truncated-xray", lambda k, o: ["predict", "--model", str(k / "model"), "--xray",
                                             str(k / "ct_trunc.nii.gz"), "--out", o], 2, r"ct_trunc\.nii\.gz: not an image"),
    # evaluate
    ("evaluate-garbage", lambda k, o: ["evaluate", "--pred", str(k / "garbage.csv"), "--truth", str(k / "truth"),
                                       "--out", o], 2, r"garbage\.csv: CSV needs columns"),
    # demo
    ("demo-steps-negative", lambda k, o: ["demo", "--out", o, "--steps", "-1"], 2, r"--steps must be >= 1, got -1"),
]


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors (bad option values): exit 2, one line
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, code, message", [pytest.param(c[1], c[2], c[3], id=c[0]) for c in CASES])
def test_bad_input_one_line_and_no_leftovers(kit, work, capsys, argv, code, message):
    import re

    rc, _, err = _run(argv(kit, str(work / "out")), capsys)
    line = _one_line(err)
    assert rc == code, line
    assert re.search(message, line), line
    assert sorted(os.listdir(work)) == [], "left behind in the output's parent folder"


@pytest.mark.parametrize("command", ["metrics", "drr", "simulate-xray", "register", "cohort", "build-dataset",
                                     "train", "predict", "evaluate", "demo"])
def test_read_only_destination(kit, read_only, capsys, command):
    out = str(read_only / "out")
    argv = {"metrics": ["metrics", *_ct(kit), "--json", out + ".json"],
            "drr": ["drr", *_ct(kit), "--out", out, "--progress", "none"],
            "simulate-xray": ["simulate-xray", *_ct(kit), "--out", out + ".dcm", "--rows", "32", "--cols", "32",
                              "--pixel-spacing", "12", "--progress", "none"],
            "cohort": ["cohort", *_ct(kit), "--n", "1", "--out", out, "--detector", "32", "32", "--progress", "none"],
            "build-dataset": ["build-dataset", "--cases", str(kit / "cohort"), "--out", out, "--image-size", "32", "32",
                              "--progress", "none"],
            "register": ["register", *_ct(kit), "--xray", str(kit / "xray.dcm"), "--out", out, "--progress", "none"],
            "train": ["train", "--config", str(kit / "tiny.json"), "--data", str(kit / "ds"), "--out", out,
                      "--progress", "none", "--device", "cpu"],
            "predict": ["predict", "--model", str(kit / "model"), "--xray", str(kit / "xray.dcm"), "--out", out],
            "evaluate": ["evaluate", "--pred", str(kit / "pred"), "--truth", str(kit / "truth"), "--out", out],
            "demo": ["demo", "--out", out, "--quick"],
            }[command]
    rc, _, err = _run(argv, capsys)
    line = _one_line(err)
    assert rc == EXIT_USER_ERROR and "Read-only file system" in line and str(read_only) in line, line
    assert os.listdir(read_only) == []


def test_nonfinite_mask_is_recorded(kit, work, capsys):
    out = work / "m.json"
    rc, _, err = _run(["metrics", *_ct(kit, "ct_nan.nrrd"), "--nonfinite", "mask", "--json", str(out)], capsys)
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert doc["ct"]["nonfinite"]["voxels"] == 60 and doc["ct"]["nonfinite"]["filled_hu"] == -1000.0
    good = json.loads((kit / "truth" / "case1.json").read_text())
    mass = {r["name"]: r["mass_g"] for r in doc["structures"]}
    assert all(np.isfinite(v) for v in mass.values())
    assert sum(mass.values()) < sum(r["mass_g"] for r in good["structures"])  # the masked voxels count as air


def test_doubtful_registration_exit_code_and_report(kit, work, capsys):
    """A radiograph of noise: the registration finishes, is doubtful, says so by exit code 3."""
    out = work / "reg"
    rc, stdout, err = _run(["register", *_ct(kit), "--xray", str(kit / "noise.dcm"), "--out", str(out),
                            "--bones", "pelvis", "--max-evals", "0", "--refine-steps", "1", "--fine-px", "32",
                            "--no-inplane-search", "--progress", "none"], capsys)
    assert rc == EXIT_DOUBTFUL, err
    assert "DOUBTFUL: exit code 3" in stdout
    doc = json.loads((out / "registration.json").read_text())
    assert doc["doubtful"] is True and doc["bodies"][0]["doubtful"] is True
    assert sorted(os.listdir(work)) == ["reg"] and {"qa.png", "channels"} <= set(os.listdir(out))


def test_include_doubtful_records_the_status(kit, work, capsys):
    rc, _, err = _run(["build-dataset", "--cases", str(kit / "real"), "--out", str(work / "ds"), "--image-size",
                       "32", "32", "--include-doubtful", "--progress", "none"], capsys)
    assert rc == 0, err
    rec = json.loads((work / "ds" / "dataset.json").read_text())["records"][0]
    assert rec["registration"] == {"status": "doubtful", "doubtful_bodies": ["femur_left"]}


def test_evaluate_lists_dropped_cases(kit, work, capsys):
    rc, stdout, err = _run(["evaluate", "--pred", str(kit / "pred"), "--truth", str(kit / "truth"),
                            "--out", str(work / "ev")], capsys)
    assert rc == 0, err
    assert "dropped: case1: estimate is not a finite number (null/NaN) (hip_left mass_g)" in stdout
    doc = json.loads((work / "ev" / "evaluation.json").read_text())
    assert {"id": "case1", "structure": "hip_left", "quantity": "mass_g",
            "reason": "estimate is not a finite number (null/NaN)"} in doc["dropped"]


def test_force_replaces_only_after_completion(tmp_path):
    from MSKdeXLib.errors import UserError
    from MSKdeXLib.io.outputs import output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="not empty"):
        with output_folder(out, force=False):
            pass
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out, force=True) as stage:
            (stage / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
    with output_folder(out, force=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
           "MSKDEX_JOB": "1"}  # interruptible even when the test run itself ignores SIGINT (background CI)
    return subprocess.Popen([sys.executable, "-m", "MSKdeXLib", *args], env=env, **kw)


def _interrupt_once_working(p: subprocess.Popen) -> str:
    """SIGINT to ``p`` (run with --progress json) after its first progress event; returns the rest
    of its stderr once it exited with code 130."""
    t_end = time.time() + 120
    for line in p.stderr:  # wait until it is working
        if '"event": "progress"' in line or time.time() > t_end:
            break
    p.send_signal(signal.SIGINT)
    try:
        rest = p.communicate(timeout=90)[1]
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("mskdex did not stop within 90 s of SIGINT")
    assert p.returncode == EXIT_INTERRUPTED
    return rest


def test_broken_pipe_exits_quietly(kit):
    """`mskdex metrics ... | head -0`: the reader is gone before mskdex writes."""
    p = _cli("metrics", *_ct(kit), "--all", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(120) == EXIT_BROKEN_PIPE and err == ""


def test_sigint_mid_registration_leaves_nothing(kit, work):
    """Ctrl-C while `register` optimises: exit 130, one line, nothing left (a rerun needs no --force)."""
    out = work / "reg"
    p = _cli("register", *_ct(kit), "--xray", str(kit / "xray.dcm"), "--out", str(out), "--bones", "pelvis",
             "--fine-px", "32", "--progress", "json", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rest = _interrupt_once_working(p)
    assert [ln for ln in rest.splitlines() if not ln.startswith("{")] == ["mskdex register: interrupted"]
    assert os.listdir(work) == []


def test_sigint_mid_training_leaves_nothing(kit, work):
    """Ctrl-C before the first checkpoint: exit 130 and no folder (after one: a resumable checkpoint)."""
    (work.parent / "long.json").write_text(json.dumps({**TINY_TRAIN, "steps": 100000}))
    p = _cli("train", "--config", str(work.parent / "long.json"), "--data", str(kit / "ds"), "--out",
             str(work / "model"), "--progress", "json", "--device", "cpu",
             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rest = _interrupt_once_working(p)
    assert [ln for ln in rest.splitlines() if not ln.startswith("{")] == ["mskdex train: interrupted"]
    assert os.listdir(work) == []


def test_nonfinite_similarity_is_a_failed_registration(kit, work, capsys, monkeypatch):
    """Whatever makes the similarity NaN, register must not report success (here: a stand-in
    registration that returns NaN, after writing its files)."""
    from types import SimpleNamespace

    from MSKdeXLib.registration import run as reg_run

    def nan_registration(req, device, notify):
        (req.out / "registration.json").write_text("{}")
        body = SimpleNamespace(name="pelvis", final_similarity=float("nan"), ct_to_camera=np.eye(4),
                               initial_similarity=0.1, doubtful=False, mtre_mm=None, runtime_s=0.0)
        return SimpleNamespace(results=[body], path=req.out / "registration.json")

    monkeypatch.setattr(reg_run, "register_radiograph", nan_registration)
    rc, _, err = _run(["register", *_ct(kit), "--xray", str(kit / "xray.dcm"), "--out", str(work / "reg"),
                       "--progress", "none"], capsys)
    line = _one_line(err)
    assert rc == EXIT_USER_ERROR and "xray.dcm: registration failed: body 'pelvis' has a non-finite similarity" in line
    assert os.listdir(work) == []


def test_predict_warnings_reach_csv_and_json(kit, work, capsys):
    rc, stdout, err = _run(["predict", "--model", str(kit / "model"), "--xray", str(kit / "xray.dcm"),
                            "--out", str(work / "pred"), "--device", "cpu"], capsys)
    assert rc == 0, err
    doc = json.loads((work / "pred" / "estimates.json").read_text())
    assert doc["warnings"] and all(s["warnings"] for s in doc["structures"])  # the 2-step model is far off
    per = {s["structure"]: s["warnings"] for s in doc["structures"]}
    assert any("outside the training range" in w for w in per["hip_left"])
    import csv

    rows = list(csv.DictReader((work / "pred" / "estimates.csv").read_text().splitlines()))
    assert rows[0]["warnings"] == "; ".join(per[rows[0]["structure"]])
    assert "warning: estimates outside the training range for: " in stdout
