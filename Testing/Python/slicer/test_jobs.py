"""Running ``mskdex`` as a subprocess (MSKdeXLib.jobs): real commands, progress, errors, cancel."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from MSKdeXLib import jobs
from MSKdeXLib.anatomy.ct_metrics import structure_metrics


def test_metrics_subprocess_output_matches_in_process(pelvis_case, pelvis, tmp_path):
    out = tmp_path / "metrics.json"
    logs = []
    job = jobs.Job(jobs.mskdex_command("metrics", "--ct", pelvis_case.ct, "--labels", pelvis_case.labels,
                                       "--structures", "gluteus medius left,femur right",
                                       "--json", out),
                   on_log=lambda stream, line: logs.append((stream, line))).start()
    assert job.pid is not None
    assert job.wait(timeout=120) == 0 and job.succeeded
    report = json.loads(out.read_text(encoding="utf-8"))
    ct, labels = pelvis
    expected = {m.structure.name: m for m in structure_metrics(ct, labels, labels.select(
        ["gluteus medius left", "femur right"]))}
    got = {r["name"]: r for r in report["structures"]}
    assert set(got) == set(expected)
    for name, m in expected.items():
        assert got[name]["mass_g"] == pytest.approx(m.mass_g, rel=1e-9)
        assert got[name]["volume_cm3"] == pytest.approx(m.volume_cm3, rel=1e-9)
    # printed table (stdout) is parsed line-wise too
    job2 = jobs.run_mskdex("metrics", "--ct", pelvis_case.ct, "--labels", pelvis_case.labels,
                           "--structures", "sacrum", timeout=120)
    assert job2.returncode == 0
    line = next(ln for ln in job2.state.stdout if ln.startswith("sacrum"))
    assert float(line.split()[2]) == pytest.approx(labels.mask("sacrum").sum() * ct.voxel_volume_mm3 / 1000, abs=0.01)


def test_user_error_is_reported_not_traceback(tmp_path):
    job = jobs.run_mskdex("metrics", "--ct", tmp_path / "missing.nii.gz", "--labels", tmp_path / "x.nii.gz",
                          timeout=120)
    assert job.returncode == 2 and not job.succeeded
    assert "missing.nii.gz" in job.state.error and "not found" in job.state.error
    assert not any("Traceback" in ln for ln in job.state.log)
    assert "exit code 2" in job.summary()


_PROGRESS_SCRIPT = textwrap.dedent("""
    import sys, time
    from MSKdeXLib.jobs import accept_cancel
    from MSKdeXLib.progress import Progress
    accept_cancel()  # as mskdex does: cancellable even when the test run ignores SIGINT
    n, delay = int(sys.argv[1]), float(sys.argv[2])
    p = Progress("json", total=n, desc="train")
    print("plain log line", file=sys.stderr, flush=True)
    try:
        for i in range(n):
            time.sleep(delay)
            p.update(1, loss=1.0 / (i + 1))
        p.event("done", result="ok")
    except KeyboardInterrupt:
        p.event("log", message="interrupted")
        sys.exit(130)
""")


def test_json_progress_events_are_parsed():
    events = []
    job = jobs.Job([sys.executable, "-c", _PROGRESS_SCRIPT, "5", "0.0"], on_event=events.append).start()
    assert job.wait(timeout=60) == 0
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5]
    assert [e["loss"] for e in progress] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
    assert events[-1]["event"] == "done" and job.state.fraction == 1.0 and job.state.stage == "train"
    assert job.state.log == ["plain log line"]
    assert jobs.parse_event('{"event": "log"}') == {"event": "log"}
    assert jobs.parse_event("{not json}") is None and jobs.parse_event('{"a": 1}') is None


def test_cancel_a_running_job():
    job = jobs.Job([sys.executable, "-c", _PROGRESS_SCRIPT, "10000", "0.05"]).start()
    t0 = time.time()
    while not job.state.events and time.time() - t0 < 30:  # wait until it really runs
        job.poll()
        time.sleep(0.02)
    assert job.running and job.state.events
    job.cancel(grace_s=5.0)
    code = job.wait(timeout=10)
    assert job.cancelled and not job.succeeded and not job.running
    assert code == 130  # stopped cleanly through KeyboardInterrupt, not killed
    assert job.state.events[-1].get("message") == "interrupted"
    assert job.state.step < 10000


def test_module_command_lines_parse_with_the_real_subcommands():
    """The arguments the Slicer module builds (jobs.*_args) are accepted by the real parsers and
    land in the options the subcommands read."""
    from MSKdeXLib.cli import build_parser

    parser = build_parser()
    a = parser.parse_args(jobs.register_args("ct.nii.gz", "labels.seg.nrrd", "x.tif", "out", bones="pelvis,femur_left",
                                             landmarks="lm.csv", sid_mm=1100.0, spacing_mm=(0.2, 0.25),
                                             table="totalseg_v1", device="cpu"))
    assert (a.command, a.ct, a.labels, a.xray, a.out, a.bones, a.landmarks) == (
        "register", "ct.nii.gz", "labels.seg.nrrd", "x.tif", "out", "pelvis,femur_left", "lm.csv")
    assert a.sid == 1100.0 and a.pixel_spacing == [0.2, 0.25] and a.table == "totalseg_v1"
    assert a.progress == "json" and a.device == "cpu" and not a.force
    t = parser.parse_args(jobs.train_args("ds", "model", config="c.json", resume=True, device="cuda"))
    assert (t.command, t.data, t.out, t.config, t.resume, t.device, t.progress) == (
        "train", "ds", "model", "c.json", True, "cuda", "json")
    t2 = parser.parse_args(jobs.train_args("ds", "model"))
    assert t2.config is None and not t2.resume and t2.device == "auto"
    p = parser.parse_args(jobs.predict_args("model", "x.tif", "est", pixel_spacing_mm=(0.2, 0.25), tta=3))
    assert (p.command, p.model, p.xray, p.out, p.pixel_spacing, p.tta, p.force) == (
        "predict", "model", "x.tif", "est", [0.2, 0.25], 3, False)
    assert "--progress" not in jobs.predict_args("m", "x", "o")  # predict reports no progress events
    f = parser.parse_args(jobs.followup_args("ct.nii.gz", "labels.nii.gz", "fu.tif", "fu", registration="reg.json",
                                             sid_mm=1050.0, spacing_mm=(0.2, 0.25), table="totalseg_v1",
                                             extra=["--samples", "40"]))
    assert (f.command, f.ct, f.labels, f.xray, f.out, f.registration, f.table) == (
        "followup", "ct.nii.gz", "labels.nii.gz", "fu.tif", "fu", "reg.json", "totalseg_v1")
    assert f.sid == 1050.0 and f.pixel_spacing == [0.2, 0.25] and f.samples == 40 and f.progress == "json"
    f2 = parser.parse_args(jobs.followup_args("c", "l", "x", "o"))
    assert f2.registration is None and f2.pixel_spacing is None and not f2.force and f2.reader is None
    f3 = parser.parse_args(jobs.followup_args("c", "l", "x", "o", reader="fit"))
    assert f3.reader == "fit"


def test_losses_of_training_events():
    ev = {"event": "progress", "stage": "train", "step": 3, "total": 10, "loss_total": 2.5,
          "loss_intensity_sum": 0.25, "elapsed_s": 1.0}
    assert jobs.losses_of(ev) == {"total": 2.5, "intensity_sum": 0.25}
    assert jobs.losses_of({"event": "progress", "step": 1, "similarity": 0.3}) == {}
