"""Virtual cohort: anatomy changes on the real pelvis CT, reproducibility, paired truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from MSKdeXLib.learning import cohort as co
from MSKdeXLib.anatomy.density import DensityModel
from MSKdeXLib.anatomy.ct_metrics import structure_metrics

MUSCLE = "gluteus_medius_left"


def _metrics(ct, labels):
    return {m.structure.name: m for m in structure_metrics(ct, labels, labels.select(kinds=["muscle", "bone"]))}


def _apply(ct, labels, fn):
    hu = ct.array.astype(np.float32, copy=True)
    lab = labels.label_array()
    fn(hu, lab)
    new = ct.with_array(hu)
    return new, co.relabel(new, labels, lab)


def test_atrophy_lowers_that_muscle_only(pelvis):
    ct, labels = pelvis
    label = labels.table.by_name(MUSCLE).label
    rng = np.random.default_rng(0)
    removed = []
    ct2, lab2 = _apply(ct, labels, lambda hu, lab: removed.append(
        co.atrophy(hu, lab, label, 0.2, ct.spacing, rng)))
    before, after = _metrics(ct, labels), _metrics(ct2, lab2)
    b, a = before[MUSCLE], after[MUSCLE]
    assert removed[0] == b.voxels - a.voxels == round(0.2 * b.voxels)
    assert a.volume_cm3 == pytest.approx(0.8 * b.volume_cm3, rel=0.01)
    assert a.mass_g < 0.85 * b.mass_g
    # removed voxels became fat (outside the lean window), at the muscle's boundary
    gone = labels.mask(MUSCLE) & ~lab2.mask(MUSCLE)
    assert np.all(ct2.array[gone] < -29) and np.median(ct2.array[gone]) == pytest.approx(-100, abs=15)
    core = labels.mask(MUSCLE) & ~gone
    assert core.sum() > 0
    for name, m in before.items():
        if name != MUSCLE:
            assert after[name].voxels == m.voxels and after[name].mass_g == pytest.approx(m.mass_g, rel=1e-6)


def test_hypertrophy_and_infiltration(pelvis):
    ct, labels = pelvis
    label = labels.table.by_name(MUSCLE).label
    rng = np.random.default_rng(1)
    ct2, lab2 = _apply(ct, labels, lambda hu, lab: co.hypertrophy(hu, lab, label, 0.1, ct.spacing, rng))
    b, a = _metrics(ct, labels)[MUSCLE], _metrics(ct2, lab2)[MUSCLE]
    assert 1.05 * b.volume_cm3 < a.volume_cm3 <= 1.101 * b.volume_cm3
    assert a.mass_g > 1.04 * b.mass_g
    grown = lab2.mask(MUSCLE) & ~labels.mask(MUSCLE)
    assert np.all(labels.label_array()[grown] == 0)  # only unlabelled fat was taken
    ct3, lab3 = _apply(ct, labels, lambda hu, lab: co.fat_infiltration(hu, lab, label, 0.15, rng))
    c = _metrics(ct3, lab3)[MUSCLE]
    assert c.volume_cm3 == b.volume_cm3 and c.mass_g < 0.9 * b.mass_g


def test_hypertrophy_draws_from_the_configured_lean_window(pelvis):
    """Grown voxels take HU from the muscle's lean voxels as the DensityModel defines them (not a
    hard-coded [-29, 150]): a narrow window [60, 80] gives grown voxels inside it."""
    ct, labels = pelvis
    label = labels.table.by_name(MUSCLE).label
    narrow = DensityModel(lean_window_hu=(60.0, 80.0))
    for density, (lo, hi) in ((narrow, (60.0, 80.0)), (DensityModel(), (-29.0, 150.0))):
        ct2, lab2 = _apply(ct, labels, lambda hu, lab: co.hypertrophy(
            hu, lab, label, 0.1, ct.spacing, np.random.default_rng(1), density=density))
        grown = lab2.mask(MUSCLE) & ~labels.mask(MUSCLE)
        assert grown.sum() > 0 and lo <= ct2.array[grown].min() and ct2.array[grown].max() <= hi


def test_subcutaneous_fat_and_elastic(pelvis):
    ct, labels = pelvis
    rng = np.random.default_rng(2)
    hu, lab = ct.array.astype(np.float32, copy=True), labels.label_array()
    body0 = co.body_mask(hu).sum()
    assert co.subcutaneous_fat(hu, lab, 6.0, ct.spacing, rng) > 0
    assert co.body_mask(hu).sum() > body0 and np.array_equal(lab, labels.label_array())
    hu2, lab2, dmax = co.elastic_deform(hu, lab, ct.spacing, 3.0, 80.0, np.random.default_rng(3))
    assert 0 < dmax < 25 and hu2.shape == hu.shape
    assert set(np.unique(lab2)) <= set(np.unique(lab))  # nearest neighbour: no new label values
    same, _, zero = co.elastic_deform(hu, lab, ct.spacing, 0.0, 80.0, rng)
    assert zero == 0.0 and same is hu


def test_sampling_is_per_subject():
    names = ["a_left", "b_right", "c"]
    assert co.sample_subject(7, 3, names) == co.sample_subject(7, 3, names)
    assert co.sample_subject(7, 3, names) != co.sample_subject(8, 3, names)
    assert co.sample_subject(7, 3, names) != co.sample_subject(7, 4, names)


@pytest.fixture(scope="module")
def small_cohorts(pelvis_case, tmp_path_factory):
    """Seed 5: subjects 0-1 built by 2 spawned workers, and subject 1 alone; seed 6: subject 1."""
    root = tmp_path_factory.mktemp("cohort")

    def config(seed):
        return co.CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), seed=seed,
                               rows=40, cols=40)

    co.build_cohort(config(5), 2, root / "a", workers=2)
    co.build_cohort(config(5), 1, root / "b", workers=1, start=1)
    co.build_cohort(config(6), 1, root / "c", workers=1, start=1)
    return root


def _subject(folder: Path):
    from safetensors.numpy import load_file

    from MSKdeXLib.io.radiographs import load_radiograph

    return (load_file(str(folder / "targets.safetensors")), json.loads((folder / "metrics.json").read_text()),
            load_radiograph(folder / "xray.dcm").pixels, json.loads((folder / "subject.json").read_text()))


def test_subjects_reproducible_per_seed_and_index(small_cohorts):
    a_t, a_m, a_x, a_s = _subject(small_cohorts / "a" / "subject-0001")
    b_t, b_m, b_x, b_s = _subject(small_cohorts / "b" / "subject-0001")
    c_t, c_m, c_x, c_s = _subject(small_cohorts / "c" / "subject-0001")
    assert all(np.array_equal(a_t[k], b_t[k]) for k in ("mass", "volume"))
    assert np.array_equal(a_x, b_x) and a_m["structures"] == b_m["structures"]
    assert a_s["ct_to_camera"] == b_s["ct_to_camera"] and a_s["spec"] == b_s["spec"]
    assert not np.array_equal(a_t["mass"], c_t["mass"]) and not np.array_equal(a_x, c_x)
    assert a_m["structures"] != c_m["structures"]
    doc = json.loads((small_cohorts / "a" / "cohort.json").read_text())
    assert [s["name"] for s in doc["subjects"]] == ["subject-0000", "subject-0001"]


def test_channel_sums_equal_metrics_and_pose_is_recorded(small_cohorts, pelvis):
    from MSKdeXLib.projection.geometry import check_rigid

    for name in ("subject-0000", "subject-0001"):
        folder = small_cohorts / "a" / name
        t, m, x, s = _subject(folder)
        names = [r["name"] for r in m["structures"]]
        assert names == [d["name"] for d in s["structures"]]
        for q, key in (("mass", "mass_g"), ("volume", "volume_cm3")):
            truth = np.array([r[key] for r in m["structures"]])
            sums = t[q].astype(np.float64).sum(axis=(1, 2))
            np.testing.assert_allclose(sums, truth, rtol=0.005)
        side = json.loads((folder / "xray.json").read_text())
        pose = check_rigid(np.array(side["ct_to_camera"]))
        np.testing.assert_allclose(pose, np.array(s["ct_to_camera"]))
        assert x.shape == (40, 40) and side["geometry"]["rows"] == 40
    # the subjects are really different from the source CT: some muscle truth changed
    base = {r["name"]: r for r in co.metrics_document(*pelvis, pelvis[1].select(kinds=["muscle"]),
                                                       DensityModel())["structures"]}
    changed = [r for r in m["structures"] if r["kind"] == "muscle"
               and abs(r["mass_g"] / base[r["name"]]["mass_g"] - 1) > 0.02]
    assert changed


def test_cli_refuses_bad_input(tmp_path, capsys):
    from MSKdeXLib.cli import main

    code = main(["cohort", "--ct", str(tmp_path / "missing.nii.gz"), "--labels", "x", "--n", "2",
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "missing.nii.gz" in capsys.readouterr().err


def test_body_wide_change_correlates_muscles():
    """Muscle changes = one body-wide change per subject + a smaller per-muscle part, bounded."""
    names = [f"m{i}" for i in range(8)]
    r = co.CohortRanges(body_change=(-0.3, 0.2), change_probability=1.0, max_atrophy=0.1, max_hypertrophy=0.1)
    specs = [co.sample_subject(0, i, names, r) for i in range(40)]
    body = np.array([s.body_change for s in specs])
    ch = np.array([[s.muscle_changes.get(n, 0.0) for n in names] for s in specs])
    assert body.min() >= -0.3 and body.max() <= 0.2 and body.std() > 0.1
    assert np.all(np.abs(ch - body[:, None]) <= 0.1 + 1e-12)
    assert all(np.corrcoef(body, ch[:, k])[0, 1] > 0.8 for k in range(len(names)))
    # no body-wide part: muscles independent of each other, changes within the per-muscle ranges
    r0 = co.CohortRanges(body_change=(0.0, 0.0))
    s0 = co.sample_subject(0, 1, names, r0)
    assert s0.body_change == 0.0 and all(-r0.max_atrophy <= v <= r0.max_hypertrophy for v in s0.muscle_changes.values())


def test_cli_body_composition_ranges(tmp_path, capsys):
    """--ranges FILE|demo and the body-composition flags give the cohort's ranges; bad values and
    unknown keys are one-line errors (exit 2) naming the flag or file."""
    import json

    from MSKdeXLib.cli import build_parser, main
    from MSKdeXLib.cli.cohort_cmd import ranges_from_args
    from MSKdeXLib.demo import demo_ranges

    base = ["cohort", "--ct", "ct.nii.gz", "--labels", "l.nii.gz", "--n", "1", "--out", str(tmp_path / "o")]
    parse = build_parser().parse_args
    assert ranges_from_args(parse(base)) == co.CohortRanges()
    (tmp_path / "r.json").write_text(json.dumps({"noise": [0.001, 0.002], "max_atrophy": 0.3}))
    r = ranges_from_args(parse(base + ["--ranges", str(tmp_path / "r.json"), "--body-change", "-0.4", "0.1",
                                       "--max-infiltration", "0.05", "--subcutaneous-fat-mm", "2"]))
    assert r.noise == (0.001, 0.002) and r.max_atrophy == 0.3 and r.body_change == (-0.4, 0.1)
    assert r.max_infiltration == 0.05 and r.subcutaneous_fat_mm == 2.0 and r.max_hypertrophy == 0.15
    assert ranges_from_args(parse(base + ["--ranges", "demo"])).to_dict() == demo_ranges()
    (tmp_path / "bad.json").write_text(json.dumps({"atrophy_max": 0.3}))
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    run = ["cohort", "--ct", str(ct), "--labels", str(ct), "--n", "1", "--out", str(tmp_path / "o")]
    for extra, words in ((["--ranges", str(tmp_path / "bad.json")], "atrophy_max"),
                         (["--body-change", "0.2", "-0.1"], "--body-change"),
                         (["--max-atrophy", "1.5"], "--max-atrophy")):
        assert main(run + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err


SIDED = ["gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
         "gluteus_minimus_left", "gluteus_minimus_right", "iliopsoas_left", "iliopsoas_right"]


def test_specificity_preset_draws_each_muscle_and_side_on_its_own():
    """Per-muscle extras (change minus the body-wide part) are uncorrelated across muscles and
    sides, except through the hip-OA pattern, which lowers the affected side's medius/minimus/iliopsoas."""
    r = co.preset_ranges("specificity")
    specs = [co.sample_subject(14, i, SIDED, r) for i in range(600)]
    ch = np.array([[s.muscle_changes.get(n, 0.0) for n in SIDED] for s in specs])
    body = np.array([s.body_change for s in specs])
    plain = np.array([s.oa_side is None for s in specs])
    extra = ch[plain] - body[plain, None]
    c = np.corrcoef(extra.T)
    assert np.abs(c[~np.eye(len(SIDED), dtype=bool)]).max() < 0.15
    assert 0.3 < 1 - plain.mean() < 0.5  # OA pattern in ~40 % of subjects
    left = np.array([s.oa_side == "left" for s in specs])
    med_l, med_r = SIDED.index("gluteus_medius_left"), SIDED.index("gluteus_medius_right")
    assert (ch[left, med_l] - ch[left, med_r]).mean() < -0.05
    assert all(np.mean([s.infiltration.get("iliopsoas_left", 0) for s in specs if s.oa_side == side])
               > np.mean([s.infiltration.get("iliopsoas_left", 0) for s in specs if s.oa_side is None])
               for side in ("left",))
    sc = np.array([s.scale for s in specs])
    assert np.all(np.abs(sc - 1) <= 0.1 + 1e-12) and abs(np.corrcoef(sc[:, 0], sc[:, 1])[0, 1]) < 0.15
    assert abs(np.corrcoef(sc.prod(axis=1), body)[0, 1]) < 0.15  # habitus independent of the muscles
    # a draw survives its JSON form (as physics.json and the benchmarks store it)
    assert all(co.SubjectSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s for s in specs[:20])
    acq = specs[0].acquisition
    assert {"sid_mm", "focal_spot_mm", "detector_blur_mm", "collimation_fraction"} <= set(acq)
    assert 0.5 < np.mean([bool(s.processing.get("unsharp_amount")) for s in specs]) < 0.9


def test_default_ranges_draw_nothing_new():
    s = co.sample_subject(3, 2, SIDED)
    assert s.oa_side is None and s.scale == (1.0, 1.0, 1.0) and s.processing == {}
    assert set(s.acquisition) == {"energy_kvp", "noise", "scatter", "contrast"}
    with pytest.raises(co.UserError, match="unknown cohort preset"):
        co.preset_ranges("nope")


def test_vendor_processing():
    rng = np.random.default_rng(0)
    codes = np.zeros((40, 40), np.float32)
    codes[5:35, 5:35] = np.round(1000 + 2000 * rng.random((30, 30)))
    assert co.vendor_processing(codes, 12, 2.0, {}) is codes
    out = co.vendor_processing(codes, 12, 2.0, {"unsharp_amount": 1.0, "unsharp_sigma_mm": 10.0})
    assert np.all(out[codes == 0] == 0) and out[5:35, 5:35].std() > codes[5:35, 5:35].std()
    lut = co.vendor_processing(codes, 12, 2.0, {"lut_strength": 6.0})
    order = np.argsort(codes[5:35, 5:35].ravel())
    assert np.all(np.diff(lut[5:35, 5:35].ravel()[order]) >= 0)  # monotone
    assert lut.max() <= 4095 and not np.array_equal(lut, codes)


def test_specificity_subject_sums_stay_exact(pelvis_case, tmp_path):
    """A specificity-preset subject (scaled anatomy, own SID, collimation, vendor processing):
    channel sums still equal the CT truth, and the size change shows in the truth."""
    config = co.CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), seed=14, rows=40, cols=40,
                             voxel_mm=6.0, ranges=co.preset_ranges("specificity").to_dict())
    co.build_cohort(config, 1, tmp_path / "c")
    t, m, x, s = _subject(tmp_path / "c" / "subject-0000")
    for q, key in (("mass", "mass_g"), ("volume", "volume_cm3")):
        truth = np.array([r[key] for r in m["structures"]])
        np.testing.assert_allclose(t[q].astype(np.float64).sum(axis=(1, 2)), truth, rtol=0.005)
    spec = s["spec"]
    assert spec["scale"] != [1.0, 1.0, 1.0] and "sid_mm" in spec["acquisition"]
    side = json.loads((tmp_path / "c" / "subject-0000" / "xray.json").read_text())
    assert abs(side["geometry"]["sid_mm"] - spec["acquisition"]["sid_mm"]) < 1e-6


def test_scale_anatomy_scales_every_truth(pelvis):
    ct, labels = pelvis
    centre = co.bone_centre(ct, labels)
    ct2, lab2 = co.scale_anatomy(ct, labels, (1.1, 0.9, 1.05), centre)
    before, after = _metrics(ct, labels), _metrics(ct2, lab2)
    for name, m in before.items():
        assert after[name].volume_cm3 == pytest.approx(m.volume_cm3 * 1.1 * 0.9 * 1.05, rel=1e-9)
        assert after[name].mass_g == pytest.approx(m.mass_g * 1.1 * 0.9 * 1.05, rel=1e-9)
    np.testing.assert_allclose(co.bone_centre(ct2, lab2), centre, atol=3.0)  # about the centre (voxel rounding)
    assert co.scale_anatomy(ct, labels, (1.0, 1.0, 1.0), centre)[0] is ct
