"""End-to-end 2D-3D registration on the real pelvis CT, and the CLI's bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MSKdeXLib.cli import main
from MSKdeXLib.projection.geometry import Camera
from MSKdeXLib.registration import kinds, pipeline
from MSKdeXLib.registration.settings import PartSettings, RegistrationSettings, SearchSettings
from MSKdeXLib.registration.optimize import PoseSpace

CAM = Camera(128, 128, 3.0, 3.0, 1000.0)


def test_mtre_helper_is_an_independent_distance():
    pts = np.random.default_rng(0).normal(size=(50, 3)) * 40
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, 800]
    assert pipeline.mtre_mm(pts, pose, pose) == 0.0
    moved = pose.copy()
    moved[:3, 3] += [3.0, 4.0, 0.0]
    assert pipeline.mtre_mm(pts, pose, moved) == pytest.approx(5.0)


def test_pyramid_factors():
    assert pipeline.pyramid_factors(CAM, 48, 192) == [2.0, 1.0]
    f = pipeline.pyramid_factors(Camera(2000, 1600, 0.15, 0.15), 48, 192)
    assert f[-1] == pytest.approx(2000 / 192) and all(b == 2 * a for b, a in zip(f, f[1:]))
    assert 2000 / f[0] >= 48 * 0.99 and 2000 / f[0] < 2 * 48


def test_parse_bodies(pelvis):
    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis,femur_left,lumbar=vertebrae_L4+vertebrae_L5", labels)
    assert [b.name for b in bodies] == ["pelvis", "femur_left", "lumbar"]
    assert [s.name for s in bodies[0].structures] == ["hip_left", "hip_right", "sacrum"]
    assert bodies[2].mask(labels).sum() == labels.mask("vertebrae_L4").sum() + labels.mask("vertebrae_L5").sum()
    from MSKdeXLib.errors import UserError

    with pytest.raises(UserError, match="not in the label map"):
        pipeline.parse_bodies("humerus_left", labels)
    with pytest.raises(UserError, match="unknown structure"):
        pipeline.parse_bodies("pelvis=hip_left+nonsense", labels)


def test_registration_recovers_pelvis_pose_from_perturbed_starts(pelvis):
    """Simulated radiograph at a hidden pose; 10 seeded perturbed starts; mTRE < 2 mm in >= 9 (the issue's criterion)."""
    from MSKdeXLib.projection.rendering import default_view
    from MSKdeXLib.projection.simulate import simulate_radiograph

    torch.manual_seed(0)
    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis", labels)
    centre = pipeline.body_centre(labels, bodies[0])
    base = default_view(ct, labels, CAM)
    # 2 CMA-ES runs of 96 evaluations (the defaults: 1 run of 480; 48 per run before round 6, when the first
    # body ran 3 runs: with 2 x 48 two or three of these ten starts were lost, with 2 x 96 none, with 1 x 96 four)
    settings = RegistrationSettings(first=SearchSettings(inplane_search=False, cma_restarts=2), cma_max_evals=96,
                                    refine_steps=15, fine_px=128)
    rng = np.random.default_rng(2024)
    truth = PoseSpace(base, centre).matrix(np.r_[rng.uniform(-4, 4, 3), rng.uniform(-10, 10, 3)])
    xray = simulate_radiograph(ct, CAM, truth, seed=7, labels=labels).pixels
    around_truth = PoseSpace(truth, centre)
    errors, flags = [], []
    for seed in range(10):
        r = np.random.default_rng(seed)
        start = around_truth.matrix(np.r_[r.uniform(-5, 5, 3), r.uniform(-10, 10, 3)])
        settings.seed = seed
        res = pipeline.register(ct, labels, xray, CAM, bodies, start, settings, true_poses={"pelvis": truth})[0]
        assert res.final_similarity >= res.initial_similarity
        errors.append(res.mtre_mm)
        flags.append(res.doubtful)
    errors = np.array(errors)
    assert (errors < 2.0).sum() >= 9, errors
    # the doubtful flag never marks a success and is raised for clear failures
    assert not any(f for f, e in zip(flags, errors) if e < 2.0)


def _simulate(tmp_path, pelvis_case, rows=64):
    assert main(["simulate-xray", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels),
                 "--out", str(tmp_path / "x.dcm"), "--rows", str(rows), "--cols", str(rows),
                 "--pixel-spacing", "6", "--progress", "none"]) == 0
    return tmp_path / "x.dcm"


def test_cli_bad_inputs(tmp_path, pelvis_case, capsys):
    from PIL import Image

    png = tmp_path / "plain.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)).save(png)
    base = ["register", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--progress", "none"]
    # radiograph without spacing and no sidecar
    assert main(base + ["--xray", str(png), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "plain.png" in err and "spacing" in err and len(err.strip().splitlines()) == 1
    xray = _simulate(tmp_path, pelvis_case)
    # bones missing from the label map
    assert main(base + ["--xray", str(xray), "--bones", "humerus_left", "--out", str(tmp_path / "o2")]) == 2
    assert "not in the label map" in capsys.readouterr().err
    # landmarks with fewer than 4 pairs
    lm = tmp_path / "lm.csv"
    lm.write_text("x,y,z,row,col\n0,0,0,10,10\n10,0,0,10,20\n0,10,0,20,10\n")
    assert main(base + ["--xray", str(xray), "--landmarks", str(lm), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "lm.csv" in err and "at least 4" in err


def test_cli_register_writes_outputs(tmp_path, pelvis_case):
    import json

    xray = _simulate(tmp_path, pelvis_case)
    out = tmp_path / "reg"
    args = ["register", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--xray", str(xray),
            "--bones", "pelvis", "--out", str(out), "--progress", "none", "--no-inplane-search",
            "--max-evals", "32", "--refine-steps", "10"]
    assert main(args) == 0
    rep = json.loads((out / "registration.json").read_text())
    body = rep["bodies"][0]
    assert body["name"] == "pelvis" and np.shape(body["ct_to_camera"]) == (4, 4)
    assert body["final_similarity"] >= body["initial_similarity"]
    assert "mtre_mm" in body and rep["geometry"]["rows"] == 64
    assert body["kind"] == "first" and rep["structure_body"]["sacrum"] == "pelvis"
    default = pipeline.RegistrationSettings()  # the thresholds in effect: soft tissue on by default
    assert rep["similarity"]["soft_tissue"] is True
    assert rep["similarity"]["doubtful_below"] == pytest.approx(default.first.doubtful_below_tissue)
    assert rep["similarity"]["doubtful_below"] == pytest.approx(default.doubtful_threshold(body["kind"]))
    assert body["doubtful_below"] == pytest.approx(default.first.doubtful_below_tissue)
    assert (out / "qa.png").stat().st_size > 1000
    import SimpleITK as sitk

    ch = sitk.GetArrayFromImage(sitk.ReadImage(str(out / rep["channels"]["pelvis/hip_left"])))
    assert ch.shape == (64, 64) and ch.sum() > 0
    # never overwrites without --force
    assert main(args) == 2
    # with --force, channels of an earlier run that this report does not list are removed
    stale = out / "channels" / "femur_left__femur_left_mass_g.nrrd"
    stale.write_bytes(b"old")
    assert main(args + ["--force"]) == 0
    rep = json.loads((out / "registration.json").read_text())
    assert sorted(p.name for p in (out / "channels").iterdir()) == sorted(
        Path(v).name for v in rep["channels"].values())


def test_fit_sphere_and_hip_joint_centres(pelvis):
    """Sphere fit is exact on a sphere; the femoral heads' centres are plausible hip joints."""
    rng = np.random.default_rng(3)
    d = rng.normal(size=(200, 3))
    pts = np.array([10.0, -20.0, 30.0]) + 23.0 * d / np.linalg.norm(d, axis=1, keepdims=True)
    c, r = pipeline.fit_sphere(pts[:60] * 1.0)
    assert np.allclose(c, [10, -20, 30], atol=1e-6) and r == pytest.approx(23.0)
    ct, labels = pelvis
    pelvis_body, left, right = pipeline.parse_bodies("pelvis,femur_left,femur_right", labels)
    centres = {}
    for femur in (left, right):
        c = pipeline.joint_centre(labels, femur, pelvis_body)
        assert c is not None
        fem = labels.grid.voxel_centres_lps(femur.mask(labels))
        hip = labels.grid.voxel_centres_lps(pelvis_body.mask(labels))
        # inside the femur's bounding box, within a head radius of both bones
        assert np.all(c >= fem.min(0) - 3) and np.all(c <= fem.max(0) + 3)
        assert np.linalg.norm(fem - c, axis=1).min() < 5.0
        assert 10.0 < np.linalg.norm(hip - c, axis=1).min() < 35.0
        centres[femur.name] = c
    # left (LPS +x) and right heads are mirror images about the midline: same height and depth
    assert centres["femur_left"][0] > 40 > -40 > centres["femur_right"][0]
    assert abs(centres["femur_left"][2] - centres["femur_right"][2]) < 10
    assert abs(centres["femur_left"][1] - centres["femur_right"][1]) < 10
    # bones that do not touch form no joint
    assert pipeline.joint_centre(labels, left, right) is None


def test_articulated_simulation_adds_up(pelvis):
    """Parts rendered at the whole CT's pose give simulate_radiograph's image (line integrals add)."""
    from MSKdeXLib.registration.articulated import simulate_articulated
    from MSKdeXLib.projection.rendering import default_view
    from MSKdeXLib.projection.simulate import simulate_radiograph

    ct, labels = pelvis
    cam = Camera(48, 48, 8.0, 8.0, 1000.0)
    pose = default_view(ct, labels, cam)
    femur = pipeline.parse_bodies("femur_left", labels)[0].mask(labels)
    a = simulate_articulated(ct, cam, pose, [(femur, pose)], seed=3)
    b = simulate_radiograph(ct, cam, pose, seed=3).pixels
    assert np.abs(a - b).max() <= 1.0  # detector codes: rounding only
    moved = pose.copy()
    moved[:3, 3] += [15.0, 0.0, 0.0]
    c = simulate_articulated(ct, cam, pose, [(femur, moved)], seed=3)
    assert np.abs(c - b).max() > 20


def test_femur_registration_follows_a_hip_rotation(pelvis):
    """Pelvis first, then the left femur about its hip: recovers a simulated 8 deg hip rotation."""
    from MSKdeXLib.projection.geometry import ap_pose
    from MSKdeXLib.registration.articulated import extend_inferior, rotate_about, simulate_articulated

    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis,femur_left", labels)
    every = bodies[0].mask(labels) | bodies[1].mask(labels)
    truth = ap_pose(ct.voxel_centres_lps(every).mean(0), CAM)
    centre = pipeline.joint_centre(labels, bodies[1], bodies[0])
    hip = rotate_about(centre, np.array([3.0, -5.0, 5.0]) / np.sqrt(59.0) * 8.0)
    big, pad = extend_inferior(ct, labels, bodies[1:])
    xray = simulate_articulated(big, CAM, truth, [(pad(bodies[1].mask(labels)), truth @ hip)], seed=1)
    start = PoseSpace(truth, pipeline.body_centre(labels, bodies[0])).matrix([1.0, -1.0, 1.5, 4.0, -3.0, 5.0])
    settings = RegistrationSettings(first=SearchSettings(inplane_search=False), cma_max_evals=64, refine_steps=15)
    settings.set("joint.cma_max_evals", "48")   # the femur's own budget per CMA-ES run
    res = pipeline.register(ct, labels, xray, CAM, bodies, start, settings,
                            true_poses={"pelvis": truth, "femur_left": truth @ hip})
    evals = {r.name: [h["evaluations"] for h in r.history if h["stage"] == "cma-es"] for r in res}
    # whole generations of cma_popsize: at most one past the budget
    assert evals["pelvis"] and all(64 <= n <= 64 + settings.cma_popsize for n in evals["pelvis"]), evals
    assert evals["femur_left"] and all(48 <= n <= 48 + settings.cma_popsize for n in evals["femur_left"]), evals
    pts = labels.grid.voxel_centres_lps(bodies[1].mask(labels))
    before = pipeline.mtre_mm(pts, truth @ hip, res[1].initial_pose)
    assert res[0].mtre_mm < 2.0
    assert any(h["stage"] == "joint" for h in res[1].history)
    assert res[1].mtre_mm < 2.0 and res[1].mtre_mm < before, (before, res[1].mtre_mm)


def test_body_volume_drr_equals_masked_ct_drr(pelvis, chest):
    """A body's cropped bone volume renders the same DRR as the full CT masked to its structures:
    exactly at the CT's own voxel size (pelvis, 3 mm), with the same line-integral total when
    block-averaged (chest, 0.7 mm -> 1.4 mm); a detector window renders the same pixels."""
    from MSKdeXLib.registration.bodyvolume import body_volume, crop_camera
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    cam = Camera(64, 64, 5.0, 5.0, 1000.0)
    for (ct, labels), names, exact in ((pelvis, ["hip_left", "sacrum"], True),
                                       (chest, ["vertebrae_T9", "vertebrae_T10"], False)):
        sts = [labels.resolve(n) for n in names]
        pose = default_view(ct, labels, cam)
        ref = DRRRenderer(ct, cam, labels=labels, structures=sts).attenuation(pose, sts)[0]
        vol = body_volume(ct, labels, sts)
        assert vol.array.size < ct.array.size / 4
        got = DRRRenderer(vol, cam).attenuation(pose)[0]
        if exact:
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.max()))
        else:
            assert vol.spacing[0] == pytest.approx(2 * ct.spacing[0])
            assert float(got.sum()) == pytest.approx(float(ref.sum()), rel=0.01)
            assert float((got - ref).abs().mean()) < 0.05 * float(ref[ref > 0].mean())
        win = DRRRenderer(vol, crop_camera(cam, 10, 40, 20, 55)).attenuation(pose)[0]
        assert torch.allclose(win, got[10:40, 20:55], atol=1e-6 * float(got.max()))


def test_tissue_volume_is_the_rest_of_the_ct(pelvis):
    """The tissue volume and the bodies' bone volumes add up to the whole CT's DRR (pelvis, at its
    own 3 mm voxels: exactly), and the tissue holds none of the bodies' bones."""
    from MSKdeXLib.registration.bodyvolume import body_mask, body_volume, tissue_volume
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view

    ct, labels = pelvis
    cam = Camera(64, 64, 5.0, 5.0, 1000.0)
    pose = default_view(ct, labels, cam)
    bodies = pipeline.parse_bodies("pelvis,femur_left", labels)
    sts = [st for b in bodies for st in b.structures]
    tissue = tissue_volume(ct, labels, sts, target_mm=3.0, body_only=False)
    assert tissue.array.shape == ct.array.shape
    total = DRRRenderer(ct, cam).attenuation(pose)[0]
    parts = DRRRenderer(tissue, cam).attenuation(pose)[0]
    for b in bodies:
        parts = parts + DRRRenderer(body_volume(ct, labels, b.structures, target_mm=3.0), cam).attenuation(pose)[0]
    assert torch.allclose(parts, total, rtol=1e-4, atol=1e-5 * float(total.max()))
    from MSKdeXLib.projection.rendering import union_mask

    assert np.all(tissue.array[union_mask(labels, sts)] == -1000.0)
    rest = ~union_mask(labels, sts)  # elsewhere the CT itself (below -1000 HU: air, as a DRR sees it)
    np.testing.assert_allclose(tissue.array[rest], np.maximum(ct.array[rest], -1000.0), atol=0.05)
    # body_only (the default) leaves out what lies apart from the patient (here table parts), nothing else
    patient = body_mask(ct)
    assert (rest & ~patient & (ct.array > -400)).any()  # there is something to leave out
    assert patient.sum() > 0.9 * (ct.array > -400).sum()  # the patient is nearly everything above -400 HU
    want = DRRRenderer(ct.with_array(np.where(rest & patient, ct.array, -1000.0).astype(np.float32)), cam)
    got = DRRRenderer(tissue_volume(ct, labels, sts, target_mm=3.0), cam).attenuation(pose)[0]
    ref = want.attenuation(pose)[0]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.max()))
    assert float(got.sum()) < float(DRRRenderer(tissue, cam).attenuation(pose)[0].sum())


def test_soft_tissue_first_body_registers_and_carries_the_tissue(pelvis):
    """With ``soft_tissue`` the first body's DRR holds the CT's other tissue: the pelvis registers
    from a perturbed start, the femur after it sees that tissue in its background."""
    from MSKdeXLib.projection.rendering import default_view
    from MSKdeXLib.projection.simulate import simulate_radiograph

    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis,femur_left", labels)
    truth = default_view(ct, labels, CAM)
    xray = simulate_radiograph(ct, CAM, truth, seed=4, labels=labels).pixels
    start = PoseSpace(truth, pipeline.body_centre(labels, bodies[0])).matrix(np.r_[3.0, -2.0, 4.0, 8.0, -6.0, 5.0])
    s = pipeline.RegistrationSettings(soft_tissue=True, seed=0)
    res = pipeline.register(ct, labels, xray, CAM, bodies, start, s, true_poses={b.name: truth for b in bodies})
    assert res[0].mtre_mm < 1.0 and res[1].mtre_mm < 2.0, [r.mtre_mm for r in res]
    assert not res[0].doubtful
    gain = next(h for h in res[0].history if h["stage"] == "own-gain")
    assert gain["gain"] > s.first.doubtful_gain and gain["similarity"] == pytest.approx(res[0].final_similarity, abs=1e-4)


def test_first_body_whose_bones_do_not_match_is_doubtful(pelvis):
    """A radiograph whose pelvis bone is replaced by muscle-like tissue: at the true pose the soft
    tissue lines up and the similarity stays high, but the pelvis's own DRR adds nothing, so the
    first body is doubtful (``first.doubtful_gain``); with the rule off (0) it is not."""
    import dataclasses

    from MSKdeXLib.projection.rendering import default_view
    from MSKdeXLib.projection.simulate import simulate_radiograph

    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis", labels)
    boneless = dataclasses.replace(ct, array=np.where(bodies[0].mask(labels), np.float32(40.0), ct.array).astype(ct.array.dtype))
    truth = default_view(ct, labels, CAM)
    xray = simulate_radiograph(boneless, CAM, truth, seed=4, labels=labels).pixels
    results = {}
    for gain in (RegistrationSettings().first.doubtful_gain, 0.0):
        s = pipeline.RegistrationSettings(soft_tissue=True, seed=0, cma=False)
        s.first.inplane_search, s.first.doubtful_gain = False, gain
        s.neighbourhood = gain > 0   # the diagnostic and the rule share one similarity without the bones
        results[gain] = pipeline.register(ct, labels, xray, CAM, bodies, truth, s)[0]
    lost = results[RegistrationSettings().first.doubtful_gain]
    entry = next(h for h in lost.history if h["stage"] == "own-gain")
    around = next(h for h in lost.history if h["stage"] == "neighbourhood")
    assert around["without_body"] == pytest.approx(entry["similarity"] - entry["gain"], abs=2e-5)
    assert lost.final_similarity > s.doubtful_threshold("first"), lost.final_similarity   # the similarity alone passes it
    assert entry["gain"] < RegistrationSettings().first.doubtful_gain and lost.doubtful
    assert not results[0.0].doubtful
    from MSKdeXLib.registration.qa import _score_text
    assert "own bones add" in _score_text(lost)[0] and "own bones add" not in _score_text(results[0.0])[0]
    assert any("own bones add" in r for r in lost.doubtful_reasons) and lost.to_dict()["doubtful_reasons"] == lost.doubtful_reasons
    assert results[0.0].doubtful_reasons == []


def test_search_bound_fraction():
    """How far a CMA-ES result moved, as the largest fraction of the search box over the 6 parameters."""
    search = kinds.Search(6.0, 12.0, 25.0, np.array([45.0, 45.0, 20.0]), 1)
    assert search.bound_fraction(np.zeros(6)) == 0.0
    assert search.bound_fraction(np.r_[12.5, 0, 0, 0, 0, 0]) == pytest.approx(0.5)
    assert search.bound_fraction(np.r_[0, 0, -5.0, 0, 9.0, -20.0]) == pytest.approx(1.0)
    assert search.bound_fraction(np.r_[0, 0, 0, 40.5, 0, 0]) == pytest.approx(0.9)


def test_body_ranges_all_bones_and_parts(chest):

    """'a..b' ranges follow the table order; 'bones' is every bone; a vertebra after its
    'spine' is registered as a part of it (not as a ball joint)."""
    ct, labels = chest
    bodies = pipeline.parse_bodies("bones,spine=vertebrae_T10..vertebrae_T8,vertebrae_T9", labels)
    assert [s.name for s in bodies[1].structures] == ["vertebrae_T10", "vertebrae_T9", "vertebrae_T8"]
    assert {s.name for s in bodies[0].structures} == {s.name for s in labels.select(kinds=["bone"])}
    reg = [(bodies[0], np.eye(4)), (bodies[1], np.eye(4))]
    assert pipeline.parent_group(bodies[2], reg)[0].name == "spine"
    assert pipeline.parent_group(bodies[1], reg[:1])[0].name == "bones"
    assert pipeline.parent_group(bodies[0], reg) is None
    # background of T9: every other bone at the pose of the last body holding it
    groups = pipeline.background_groups(bodies[2], reg)
    names = {s.name for sts, _ in groups for s in sts}
    assert "vertebrae_T9" not in names and {"vertebrae_T8", "rib_left_5"} <= names
    from MSKdeXLib.errors import UserError

    with pytest.raises(UserError, match="unknown structure"):
        pipeline.parse_bodies("spine=vertebrae_T8..nonsense", labels)


def test_part_of_a_registered_group_moves_a_little(pelvis):
    """A body made of some of a registered body's structures is a 'part': pelvis first from a
    perturbed start, then the sacrum - turned by 2.5 deg about its centre in the simulated
    radiograph - with small bounded motions from the pelvis pose: the pelvis within 2 mm, the
    part's projection closer to its truth than where it started. (The chest's vertebrae use the
    same path: benchmarks/RESULTS_registration.md.)"""
    from MSKdeXLib.projection.geometry import ap_pose
    from MSKdeXLib.registration.articulated import rotate_about, simulate_articulated

    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis,sacrum", labels)
    truth = ap_pose(pipeline.body_centre(labels, bodies[0]), CAM)
    move = rotate_about(pipeline.body_centre(labels, bodies[1]), np.array([1.0, 2.0, -1.0]) / np.sqrt(6) * 2.5)
    xray = simulate_articulated(ct, CAM, truth, [(bodies[1].mask(labels), truth @ move)], seed=2)
    start = PoseSpace(truth, pipeline.body_centre(labels, bodies[0])).matrix([1.5, -1.0, 2.0, 3.0, -2.0, 2.0])
    # bone-only DRRs: at this detector's 3 mm pixels the pelvis's depth is not resolved to 2 mm with
    # the soft tissue either (2.0 vs 1.6 mm); the soft-tissue path: test_soft_tissue_first_body_...
    # (20 full-resolution steps, the default before round 8: this tiny search needs them for the pelvis)
    settings = pipeline.RegistrationSettings(first=SearchSettings(inplane_search=False, full_res_steps=20),
                                             cma_max_evals=48, refine_steps=20,
                                             roi_cma_restarts=1, soft_tissue=False)
    res = pipeline.register(ct, labels, xray, CAM, bodies, start, settings,
                            true_poses={"pelvis": truth, "sacrum": truth @ move})
    assert [r.kind for r in res] == ["first", "part"]
    assert any(h.get("of") == "pelvis" for h in res[1].history)
    pts = labels.grid.voxel_centres_lps(bodies[1].mask(labels))
    before = pipeline.mtre_mm(pts, truth @ move, res[1].initial_pose)
    before_px = pipeline.mean_projection_distance_px(CAM, pts, truth @ move, res[1].initial_pose)
    assert res[0].mtre_mm < 2.0, res[0].mtre_mm
    # in the image the part lands on its truth; its depth stays with the pelvis's (not observable)
    assert res[1].mpd_px < 0.5 and res[1].mpd_px < 0.7 * before_px, (before_px, res[1].mpd_px)
    assert res[1].mtre_mm < before + 0.25 and res[1].mtre_mm < 2.5, (before, res[1].mtre_mm)
    motion = next(h for h in res[1].history if h["stage"] == "part-motion")
    assert np.all(np.abs(motion["deg"]) <= settings.part.bounds_deg)
    # the depth bound is the size rule's (PartSettings.depth_bound), recorded in the history
    bounds = next(h for h in res[1].history if h["stage"] == "part-bounds")
    radius = pipeline.inplane_radius_mm(labels, bodies[1], res[1].initial_pose)
    assert bounds["depth_mm"] == pytest.approx(settings.part.depth_bound(radius, CAM.spacing_col_mm), abs=1e-3)
    assert abs(motion["translation_mm"][2]) <= bounds["depth_mm"] + 0.005


def test_part_prior_and_tight_window(chest):
    """A part's prior penalises rotation and in-plane translation (never depth), as the
    Gaussian formula gives; its similarity window holds its own projection and nothing farther
    than ``part.roi_mm`` from it (the wide window holds neighbours)."""
    from MSKdeXLib.projection.geometry import ap_pose, project

    pen = kinds.prior_penalty(0.01, 3.0, 1.5)
    x = torch.tensor([[0, 0, 0, 0, 0, 0], [3.0, 0, -6.0, 1.5, -3.0, 0.25], [0, 0, 0, 0, 0, 5.0]], dtype=torch.float64)
    want = [0.0, 0.01 * (1 + 4 + 1 + 4), 0.0]
    assert pen(x).tolist() == pytest.approx(want)
    assert kinds.prior_penalty(0.01, 3.0)(x)[1].item() == pytest.approx(0.05)

    ct, labels = chest
    bodies = pipeline.parse_bodies("bones,vertebrae_T9", labels)
    cam = Camera(96, 96, 4.0, 4.0, 1000.0)
    pose = ap_pose(pipeline.body_centre(labels, bodies[1]), cam)
    pixels = torch.rand(96, 96).numpy()
    windows = {}
    for roi in (10.0, 0.0):
        s = RegistrationSettings(part=PartSettings(roi_mm=roi), roi_fine_mm=4.0)
        vols = pipeline.BodyVolumes(ct, labels, s, "cpu", torch.float32)
        levels = [pipeline.Level(cam, torch.as_tensor(pixels), s, "cpu", torch.float32)]
        registered = [(bodies[0], pose)]
        part = kinds.classify(bodies[1], labels, s, registered)
        assert isinstance(part, kinds.PartBody)
        windows[roi] = part.views(levels, cam, pose, pipeline.BodyVolumes(ct, labels, s, "cpu", torch.float32))[0][0]
    tight, wide = windows[10.0], windows[0.0]
    assert tight.mask.sum() < 0.6 * wide.mask.sum()
    # every counted pixel lies within 10 mm (+ a pixel) of the projected T9 voxels, on the detector
    pts = labels.grid.voxel_centres_lps(bodies[1].mask(labels))[::7]
    rc = project(cam, pose, pts)
    cx, cy = tight.camera.principal_point
    dx, dy = cam.principal_point[0] - cx, cam.principal_point[1] - cy  # window offset (cols, rows)
    rr, cc = np.nonzero(tight.mask.numpy())
    d = np.sqrt(((rr[:, None] + dy - rc[None, :, 0]) ** 2 + (cc[:, None] + dx - rc[None, :, 1]) ** 2).min(1))
    assert d.max() * 4.0 <= 10.0 + 2 * 4.0 * np.sqrt(2)
    # the background (ribs, neighbours) is rendered in the window
    assert float(tight.background.max()) > 0


def test_window_dilates_by_a_square(pelvis):
    """A later body's detector window: the pixels within the margin (a square of 2 round(margin /
    pixel) + 1 px, dilated as two 1-D max pools) of its projection, the same mask as one square
    max pool, cut to its box."""
    import torch.nn.functional as F

    from MSKdeXLib.registration import views

    ct, labels = pelvis
    s = RegistrationSettings()
    cam = Camera(160, 160, 3.0, 3.0, 1000.0)
    pixels = np.random.default_rng(0).normal(size=(cam.rows, cam.cols)).astype(np.float32)
    level = views.Level(cam, torch.as_tensor(pixels), s, "cpu", torch.float32)
    vols = views.BodyVolumes(ct, labels, s, "cpu", torch.float32)
    femur = pipeline.parse_bodies("femur_left", labels)[0]
    own = vols.drr(femur.structures, cam, torch.as_tensor(pipeline.default_view(ct, labels, cam)))[0] > 0
    for margin in (40.0, 9.0):
        k = 2 * int(round(margin / cam.spacing_col_mm)) + 1
        square = (F.max_pool2d(own[None, None].float(), k, stride=1, padding=k // 2)[0, 0] > 0) & level.mask
        win_cam, fixed, mask = views.window(level, own, margin)
        rows, cols = np.flatnonzero(square.numpy().any(1)), np.flatnonzero(square.numpy().any(0))
        assert (win_cam.rows, win_cam.cols) == (rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) < (cam.rows, cam.cols)
        assert torch.equal(mask, square[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def test_renderers_of_one_volume_share_its_planes(pelvis):
    """The renderers of one body volume for several cameras (pyramid levels, windows) build its
    plane stacks once, and render what a renderer of their own renders, bit for bit."""
    from MSKdeXLib.projection.rendering import DRRRenderer
    from MSKdeXLib.registration import views
    from MSKdeXLib.registration.bodyvolume import crop_camera

    ct, labels = pelvis
    s = RegistrationSettings()
    vols = views.BodyVolumes(ct, labels, s, "cpu", torch.float32)
    femur = pipeline.parse_bodies("femur_left", labels)[0]
    big = Camera(160, 160, 3.0, 3.0, 1000.0)
    small = crop_camera(big, 110, 160, 90, 150)  # a window holding the femur
    pose = torch.as_tensor(pipeline.default_view(ct, labels, big))
    first, second = vols.renderer(femur.structures, big), vols.renderer(femur.structures, small)
    assert first is not second and second._planes is first._planes
    d_small = vols.drr(femur.structures, small, pose)
    own = DRRRenderer(vols._vols[tuple(sorted(st.label for st in femur.structures))], small)
    assert torch.equal(d_small, own.attenuation(pose.float())) and d_small.abs().sum() > 0
    assert len(first._planes) == 1
