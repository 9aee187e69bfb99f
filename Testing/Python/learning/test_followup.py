"""Follow-up reading (issue 14): a patient's baseline CT, re-simulated at the follow-up's pose, reads a
muscle change made in the CT; its physics agrees with the CT's lean mass; its intervals are calibrated;
``mskdex followup`` writes its outputs and refuses bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from MSKdeXLib.anatomy.ct_metrics import structure_metrics
from MSKdeXLib.io.outputs import write_volume
from MSKdeXLib.learning import cohort as co
from MSKdeXLib.learning import followup as fu
from MSKdeXLib.learning import resimulation as rs
from MSKdeXLib.projection.simulate import SimulationSettings, simulate_radiograph, write_dicom_dx

CHANGE = {"gluteus_medius_left": -0.35}


@pytest.fixture(scope="module")
def case(small_baseline):
    """The real pelvis CT at 6 mm, a 64 x 64 px AP view, its physics and a reader of 200 re-simulations."""
    ct, labels, camera, pose, physics, base = small_baseline
    reader = fu.fit_reader(physics, base, fu.ReaderSettings(samples=200, grid=16, seed=3))
    return ct, labels, camera, pose, physics, base, reader


def _changed(ct, labels, changes, infiltration=None):
    hu = ct.array.astype(np.float32, copy=True)
    lab = labels.label_array().astype(np.int32)
    co.change_muscles(hu, lab, labels.table, ct.spacing, changes, infiltration or {}, np.random.default_rng(0))
    new = ct.with_array(hu)
    return new, co.relabel(new, labels, lab)


def _lean(ct, labels, names):
    by = {m.structure.name: m.mass_g for m in structure_metrics(ct, labels, labels.select(kinds=["muscle"]))}
    return np.array([by[n] for n in names])


def test_physics_channels_hold_the_ct_lean_mass(case):
    """Each muscle's lean-mass channel sums to its lean mass on the CT (the whole pelvis is in view)."""
    _, _, _, _, physics, base, _ = case
    sums = np.array([physics.muscle_mass[n].sum() for n in physics.muscles])
    np.testing.assert_allclose(sums, base, rtol=0.01)
    assert all(physics.atrophy_coefficient[n] > 0 for n in physics.muscles)
    # no change, the physics' own acquisition: the reader returns about the baseline
    est = physics_estimate = case[6].predict(rs.resimulate(physics), physics.camera)
    assert physics_estimate.shape == base.shape and np.all(np.abs(est / base - 1) < 0.25)


def test_reader_finds_the_muscle_changed_in_the_ct(case):
    """Gluteus medius (left) atrophied by 35 % in the CT, simulated at the true pose: the reader puts the
    largest loss on it, within 15 points of the truth; the unchanged muscles move less on average."""
    ct, labels, camera, pose, _, base, reader = case
    ct2, labels2 = _changed(ct, labels, CHANGE)
    truth = _lean(ct2, labels2, reader.muscles) / base - 1
    codes = simulate_radiograph(ct2, camera, pose, SimulationSettings(kvp=78, noise_level=0.003, scatter_fraction=0.2),
                                seed=1).pixels
    est = reader.predict(codes, camera) / base - 1
    k = reader.muscles.index("gluteus_medius_left")
    assert truth[k] < -0.3
    assert np.argmin(est) == k and abs(est[k] - truth[k]) < 0.15
    others = np.delete(np.abs(est), k)
    assert others.mean() < 0.5 * abs(est[k])


def test_intervals_cover_fresh_resimulations(case):
    """Split-conformal 90 % intervals: on 60 fresh draws (muscles and acquisition) of the same patient,
    between 80 % and 98 % of the 600 muscle values fall inside."""
    _, _, camera, _, physics, base, reader = case
    rng = np.random.default_rng(123)
    hits = []
    for i in range(60):
        changes, spec = rs.draw(rng, physics)
        truth = base * np.array([changes.lean_factor(n) for n in physics.muscles])
        est = reader.predict(rs.resimulate(physics, changes, spec, 1000 + i), camera)
        hits.append(np.abs(est - truth) <= reader.half_width_g)
    assert 0.80 <= np.mean(hits) <= 0.98
    assert np.all(reader.holdout_pcc > 0.3)


def test_settings_refuse_bad_values():
    for bad in ({"samples": 10}, {"grid": 2}, {"coverage": 1.0}, {"margin": 0.5}, {"preset": "nope"},
                {"fat_mm": -1.0}, {"elastic_mm": 20.0}):
        with pytest.raises(Exception) as exc:
            fu.ReaderSettings(**bad).ranges()
        assert type(exc.value).__name__ == "UserError"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "MSKdeXLib", "followup", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def files(case, tmp_path_factory):
    """Baseline CT + labels on disk, and a follow-up radiograph (DICOM + sidecar with the true pose) of
    the CT with gluteus medius (left) atrophied, its pose a little off the baseline view."""
    ct, labels, camera, pose, _, _, _ = case
    d = tmp_path_factory.mktemp("followup")
    write_volume(d / "ct.nii.gz", ct)
    write_volume(d / "labels.nii.gz", labels.grid.with_array(labels.layers[0]))
    ct2, _ = _changed(ct, labels, CHANGE)
    moved = co.perturbed_pose(pose, (1.0, -1.0, 0.5), (3.0, -2.0, 4.0), co.bone_centre(ct, labels))
    settings = SimulationSettings(kvp=78, noise_level=0.003, scatter_fraction=0.2)
    write_dicom_dx(d / "fu.dcm", simulate_radiograph(ct2, camera, moved, settings, seed=2), camera, moved, settings, 2)
    (d / "truth.json").write_text(json.dumps({"bodies": [{"name": "truth", "ct_to_camera": moved.tolist()}]}))
    return d


def test_cli_writes_the_estimate(files):
    d = files
    r = _cli("--ct", str(d / "ct.nii.gz"), "--labels", str(d / "labels.nii.gz"), "--xray", str(d / "fu.dcm"),
             "--registration", str(d / "truth.json"), "--samples", "300", "--grid", "16", "--out", str(d / "out"),
             "--progress", "json")
    assert r.returncode == 0, r.stderr
    # the progress counts every view, calibration follow-up and re-simulation and ends at its total
    steps = [json.loads(line) for line in r.stderr.splitlines() if line.startswith('{"event": "progress"')]
    assert steps and steps[-1]["step"] == steps[-1]["total"] == (12 - 1) + 40 + 300
    doc = json.loads((d / "out" / "followup.json").read_text())
    assert doc["format"] == fu.FOLLOWUP_FORMAT and doc["pose"]["source"].endswith("truth.json")
    m = doc["muscles"]
    assert doc["implausible_muscles"] == [] and doc["doubtful"] is False
    assert doc["reader"]["calibration_samples"] == 40 and "from the CT" in doc["reader"]["calibration"]
    # the loss is read (at this tiny scale: 64 px, a 6 mm CT) and the truth (-34 %) lies in its interval
    lo, hi = m["gluteus_medius_left"]["change_interval_percent"]
    assert lo < -34 < m["gluteus_medius_left"]["change_percent"] < -10 < hi
    assert set(doc["asymmetry"]["estimate"]) >= {"gluteus_medius", "iliopsoas"}
    rows = (d / "out" / "followup.csv").read_text().strip().splitlines()
    assert rows[0].startswith("muscle,baseline_g") and len(rows) == 1 + len(m)
    assert (d / "out" / "followup.png").read_bytes()[:4] == b"\x89PNG"
    # never overwritten unless asked
    again = _cli("--ct", str(d / "ct.nii.gz"), "--labels", str(d / "labels.nii.gz"), "--xray", str(d / "fu.dcm"),
                 "--registration", str(d / "truth.json"), "--out", str(d / "out"))
    assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ({"--xray": "missing.dcm"}, "missing.dcm"),
    ({"--samples": "5"}, "--samples must be >= 40"),
    ({"--preset": "nope"}, "--preset"),
    ({"--margin": "0.6"}, "--margin must be in [0, 0.4)"),
    ({"--registration": "bad.json"}, "bad.json"),
])
def test_cli_bad_input_is_one_line(files, change, message):
    d = files
    (d / "bad.json").write_text(json.dumps({"bodies": []}))
    args = {"--ct": str(d / "ct.nii.gz"), "--labels": str(d / "labels.nii.gz"), "--xray": str(d / "fu.dcm"),
            "--registration": str(d / "truth.json"), "--out": str(d / "never")}
    args.update({k: (str(d / v) if k in ("--xray", "--registration") else v) for k, v in change.items()})
    r = _cli(*[x for kv in args.items() for x in kv], "--progress", "none")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (d / "never").exists()


def test_jittered_views_and_ct_calibration(case):
    """The reader's views: the registered pose first (its physics exactly), then poses a registration error
    away (the water path moves, its total stays within 1 %); the CT-simulated calibration follow-ups carry
    each muscle's true relative lean mass from the changed CT (losses and gains, within the preset's range)."""
    ct, labels, camera, pose, physics, base, _ = case
    st = fu.ReaderSettings(samples=40, poses=3, calibration_samples=20, seed=1)
    views, base2 = fu.jittered_physics(ct, labels, camera, pose, st)
    assert len(views) == 3 and all(v.camera == camera for v in views)
    np.testing.assert_array_equal(views[0].water.numpy(), physics.water.numpy())
    np.testing.assert_allclose(base2, base)
    for v in views[1:]:
        assert not np.array_equal(v.water.numpy(), physics.water.numpy())
        assert abs(float(v.water.sum()) / float(physics.water.sum()) - 1) < 0.01
    cal = fu.ct_change_samples(ct, labels, camera, pose, physics.muscles, st)
    assert len(cal.codes) == 20 and cal.codes[0].shape == (camera.rows, camera.cols)
    assert cal.factor.shape == (20, len(physics.muscles))
    assert cal.factor.min() < 0.9 and 0.3 < cal.factor.min() and cal.factor.max() < 1.3
    assert len({c.tobytes() for c in cal.codes}) == 20


def test_implausible_estimates_are_named():
    names = ["a", "b", "c", "d"]
    base = np.array([100.0, 100.0, 100.0, 100.0])
    assert fu.implausible(names, np.array([50.0, 150.0, 200.0, 1.0]), base) == []
    assert fu.implausible(names, np.array([-5.0, 0.0, 201.0, 90.0]), base) == ["a", "b", "c"]


def test_soft_tissue_variants(case):
    """The reader's soft-tissue spread: a fat-thickness change moves the body's outline (water path) but
    no muscle's lean mass; a smooth deformation moves the anatomy and keeps each muscle's lean mass within
    a few %; with both off nothing is drawn; views other than the first carry their own variant."""
    ct, labels, camera, pose, physics, base, _ = case
    names = physics.muscles
    fat = fu.ReaderSettings(fat_mm=12.0)
    thick, thick_labels = fu.soft_tissue_variant(ct, labels, fat, np.random.default_rng(5))
    assert not np.array_equal(thick.array, ct.array)
    np.testing.assert_array_equal(thick_labels.label_array(), labels.label_array())
    np.testing.assert_allclose(_lean(thick, thick_labels, names), base, rtol=1e-9)
    body = lambda v: int(co.body_mask(v.array).sum())  # noqa: E731
    assert body(thick) != body(ct)
    bent, bent_labels = fu.soft_tissue_variant(ct, labels, fu.ReaderSettings(elastic_mm=3.0), np.random.default_rng(6))
    assert not np.array_equal(bent_labels.label_array(), labels.label_array())
    # a smooth field is not volume-preserving: at 6 mm voxels and 3 mm SD a muscle's lean mass moves by up
    # to ~15 %; so each view carries its own lean mass, the reader's targets scale it
    moved = _lean(bent, bent_labels, names)
    assert np.abs(moved / base - 1).max() > 0.01 and np.abs(moved / base - 1).max() < 0.2
    view, own = fu.baseline_physics(bent, bent_labels, camera, pose, co.preset_ranges("specificity"))
    np.testing.assert_allclose(view.lean_mass_g, moved)
    np.testing.assert_allclose([view.muscle_mass[n].sum() for n in names], moved, rtol=0.01)
    same, _ = fu.soft_tissue_variant(ct, labels, fu.ReaderSettings(), np.random.default_rng(7))
    np.testing.assert_array_equal(same.array, ct.array)
    st = fu.ReaderSettings(samples=40, poses=3, fat_mm=12.0, jitter_mm=0.0, jitter_deg=0.0, seed=2)
    views, _ = fu.jittered_physics(ct, labels, camera, pose, st)
    np.testing.assert_array_equal(views[0].water.numpy(), physics.water.numpy())
    totals = [abs(float(v.water.sum()) / float(physics.water.sum()) - 1) for v in views[1:]]
    assert max(totals) > 0.005, totals   # the fat change, not a pose jitter (off), moved the water path


def test_projection_warp_moves_the_physics(case):
    """The reader's 2D soft-tissue warp: a smooth field of about the asked SD; it moves the line integrals
    and the muscles' channels together, keeps their totals to a few %, and each muscle's lean mass
    follows its channel's sum; SD 0 changes nothing."""
    from MSKdeXLib.learning.projection_warp import smooth_displacement, warp_physics

    field = smooth_displacement((64, 80), (2.0, 3.0), (12.0, 12.0), np.random.default_rng(0))
    assert field.shape == (2, 64, 80)
    assert 1.0 < field[0].std() < 2.4 and 1.5 < field[1].std() < 3.6
    assert np.diff(field[1], axis=1).std() < 0.25 * field[1].std()   # smooth: neighbours move together
    _, _, camera, pose, physics, base, _ = case
    assert warp_physics(physics, 0.0, np.random.default_rng(1)) is physics
    moved = warp_physics(physics, 2.0, np.random.default_rng(1))
    assert not np.allclose(moved.water.numpy(), physics.water.numpy())
    assert abs(float(moved.water.sum()) / float(physics.water.sum()) - 1) < 0.03
    for n, k in zip(physics.muscles, range(len(physics.muscles))):
        old, new = physics.muscle_mass[n], moved.muscle_mass[n]
        assert not np.allclose(old, new) and abs(new.sum() / old.sum() - 1) < 0.15   # 64 px: resampling too
        np.testing.assert_allclose(moved.lean_mass_g[k], physics.lean_mass_g[k] * new.sum() / old.sum())
