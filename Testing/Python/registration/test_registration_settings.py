"""Registration settings rules: a part's depth bound from its size, the DRR blur matched to the
radiograph's, and the batched Gaussian blur they use (real chest CT for the sizes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MSKdeXLib.projection.geometry import AP_ROTATION, Camera, ap_pose
from MSKdeXLib.registration import pipeline
from MSKdeXLib.registration.settings import PartSettings, RegistrationSettings, SearchSettings
from MSKdeXLib.projection.simulate import simulate_radiograph


def test_part_depth_bound_rule():
    off = PartSettings(depth_per_radius_px=0.0)
    assert off.depth_bound(60.0) == off.bounds_depth_mm
    p = PartSettings(depth_per_radius_px=0.025, bounds_depth_mm=0.25, bounds_depth_max_mm=1.0)
    s = RegistrationSettings(part=p)
    assert s.part.depth_bound(None) == 0.25                  # radius unknown: the fixed bound
    assert s.part.depth_bound(5.0) == 0.25                   # small part: clipped below
    assert s.part.depth_bound(30.0, 1.5) == pytest.approx(0.025 * 30.0 / 1.5)
    assert s.part.depth_bound(30.0, 3.0) == pytest.approx(0.25)   # coarser pixels: depth less observable
    assert s.part.depth_bound(500.0) == 1.0                  # clipped above
    radii = np.linspace(1, 200, 50)
    assert np.all(np.diff([s.part.depth_bound(r) for r in radii]) >= 0)  # monotone in size
    assert np.all(np.diff([p.depth_bound(40.0, px) for px in np.linspace(0.5, 4, 20)]) <= 0)
    # only parts use the rule: a joint keeps its own depth bound
    assert s.part.motion(60.0)[3][2] == pytest.approx(1.0)
    assert s.joint.motion(60.0)[3][2] == s.joint.bounds_depth_mm
    assert s.part.motion(60.0)[4][2] <= 0.5      # CMA-ES sigma at most half the bound


def test_inplane_radius_of_spine_and_vertebra(chest):
    """In an AP view the camera's image plane holds the patient's L-R and S-I axes: the in-plane
    RMS radius equals the RMS distance computed directly on those two LPS coordinates, and a
    multi-vertebra spine is several times wider than one vertebra (its depth bound larger)."""
    ct, labels = chest
    cam = Camera(64, 64, 4.0, 4.0, 1000.0)
    bodies = pipeline.parse_bodies("spine=vertebrae_T8..vertebrae_T11,vertebrae_T9", labels)
    radii = {}
    for b in bodies:
        p = labels.grid.voxel_centres_lps(b.mask(labels))
        pose = ap_pose(p.mean(0), cam)
        radii[b.name] = pipeline.inplane_radius_mm(labels, b, pose)
        # which LPS axis is the camera's depth: the row of AP_ROTATION mapping to camera z
        depth_axis = int(np.argmax(np.abs(AP_ROTATION[2])))
        q = np.delete(p, depth_axis, axis=1)
        assert radii[b.name] == pytest.approx(np.sqrt(((q - q.mean(0)) ** 2).sum(1).mean()), rel=1e-6)
    assert radii["spine"] > 1.5 * radii["vertebrae_T9"]
    s = RegistrationSettings(part=PartSettings(depth_per_radius_px=0.025))
    assert s.part.depth_bound(radii["spine"], 1.5) > 1.5 * s.part.depth_bound(radii["vertebrae_T9"], 1.5)
    assert s.part.depth_bound(radii["vertebrae_T9"], 1.5) == s.part.bounds_depth_mm  # one vertebra: stays


def test_blur_batch_matches_scipy_and_keeps_gradients():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    img = rng.random((2, 40, 50))
    t = torch.tensor(img, requires_grad=True)
    out = pipeline.blur_batch(t, (1.3, 0.7))
    for b in range(2):
        want = ndimage.gaussian_filter(img[b], (1.3, 0.7), mode="nearest", truncate=3.0)
        # interior (away from the edge handling)
        assert np.allclose(out[b, 5:-5, 5:-5].detach().numpy(), want[5:-5, 5:-5], atol=2e-3)
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    # a constant image stays constant; a tiny sigma changes nothing
    assert torch.allclose(pipeline.blur_batch(torch.full((1, 9, 9), 2.0), (1.0, 1.0)), torch.full((1, 9, 9), 2.0))
    assert pipeline.blur_batch(t, (0.01, 0.01)) is t


def test_drr_blur_sigma_matches_area_averaging():
    """Matched DRR blur = the radiograph's own blur plus a box of the level's pixel width (of
    detector pixels) in quadrature; checked against the variance of a sampled box average."""
    s = pipeline.RegistrationSettings(drr_match_blur=True, drr_blur_mm=0.2)
    assert pipeline.RegistrationSettings().drr_blur_sigma_mm(3.0, 1.5) == 0.0  # off by default
    assert s.drr_blur_sigma_mm(1.5, 1.5) == pytest.approx(0.2)
    box = np.random.default_rng(0).uniform(-1.5, 1.5, 200000)  # a 3-mm box
    want = np.sqrt(0.2 ** 2 + box.var() - 1.5 ** 2 / 12)
    assert s.drr_blur_sigma_mm(3.0, 1.5) == pytest.approx(want, rel=0.01)


def test_refine_full_res_adds_the_detector_level(pelvis):
    """With ``refine_full_res`` a first body is refined last on the detector's own pixels (the
    pyramid's finest level is coarser when the detector is larger than ``fine_px``); without it
    the refinement stops at the pyramid's finest level (:func:`pipeline.pyramid_factors`)."""
    ct, labels = pelvis
    cam = Camera(100, 100, 4.0, 4.0, 1000.0)
    body = pipeline.parse_bodies("pelvis", labels)
    truth = ap_pose(pipeline.body_centre(labels, body[0]), cam)
    xray = simulate_radiograph(ct, cam, truth, seed=1, labels=labels).pixels
    s = RegistrationSettings(first=SearchSettings(inplane_search=False, refine_full_res=True), cma=False,
                             refine_steps=3, fine_px=96, coarse_px=48)
    r = pipeline.register(ct, labels, xray, cam, body, truth, s, true_poses={"pelvis": truth})[0]
    levels = [tuple(h["level_px"]) for h in r.history if h["stage"] == "refine"]
    pyramid = [(cam.scaled(f).rows, cam.scaled(f).cols) if f > 1 else (cam.rows, cam.cols)
               for f in pipeline.pyramid_factors(cam, 48, 96)]
    assert max(pyramid) < (100, 100) and levels == pyramid + [(100, 100)]
    assert r.mpd_px < 0.5, r.mpd_px  # the projection stays on the truth (depth wanders in 3 steps: not checked)
    # the final similarity is measured where the doubtful thresholds were calibrated: the pyramid's finest level
    assert next(h for h in r.history if h["stage"] == "initial")["level_px"] == list(pyramid[-1])
    # the neighbourhood diagnostic (13 more evaluations and a DRR) only when asked for
    assert not any(h["stage"] == "neighbourhood" for h in r.history)
    s.neighbourhood, s.refine_steps = True, 1
    r = pipeline.register(ct, labels, xray, cam, body, truth, s)[0]
    n = next(h for h in r.history if h["stage"] == "neighbourhood")
    assert len(n["minus"]) == len(n["plus"]) == 6 and n["at"] == pytest.approx(r.final_similarity, abs=1e-4)


def test_tissue_drr_on_a_coarser_grid_matches_the_full_one(pelvis):
    """``tissue_drr_mm``: the tissue DRR of a 1.5 mm view is rendered at 3 mm and bilinearly
    up-sampled (the same field of view): it stays within a few per cent of the one rendered on
    the view's own pixels (the tissue volume has 3 mm voxels), keeps the gradients, and views
    with pixels as coarse as it are rendered directly (identical)."""
    from MSKdeXLib.registration.views import BodyVolumes

    ct, labels = pelvis
    bodies = pipeline.parse_bodies("pelvis", labels)
    cam = Camera(128, 128, 1.5, 1.5, 1000.0)
    pose = torch.as_tensor(ap_pose(pipeline.body_centre(labels, bodies[0]), cam), dtype=torch.float32)
    direct = BodyVolumes(ct, labels, RegistrationSettings(tissue_drr_mm=0.0), "cpu", torch.float32, bodies)
    coarse = BodyVolumes(ct, labels, RegistrationSettings(tissue_drr_mm=3.0), "cpu", torch.float32, bodies)
    a, b = direct.tissue_drr(cam, pose)[0], coarse.tissue_drr(cam, pose)[0]
    assert b.shape == a.shape and float(a.max()) > 1.0
    inner = (a > 0.05 * a.max())[2:-2, 2:-2]
    err = (b - a).abs()[2:-2, 2:-2][inner]
    assert float(err.mean()) < 0.02 * float(a.max()) and float(err.max()) < 0.15 * float(a.max())
    assert abs(float(b.sum() / a.sum()) - 1.0) < 0.01       # the same rays on average
    cam3 = Camera(64, 64, 3.0, 3.0, 1000.0)                 # as coarse as tissue_drr_mm: rendered directly
    assert torch.equal(direct.tissue_drr(cam3, pose), coarse.tissue_drr(cam3, pose))
    p = pose.clone().requires_grad_(True)
    coarse.tissue_drr(cam, p).sum().backward()
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_joint_doubtful_when_its_centre_leaves_the_parent():
    """``joint.doubtful_shift_mm``: a femur whose rotation centre ends farther than that from
    where the pelvis puts it, in the image plane, is doubtful; depth does not count; 0: off."""
    from MSKdeXLib.registration.bodies import Body
    from MSKdeXLib.registration.kinds import JointBody, Search

    s = RegistrationSettings()
    s.joint.doubtful_shift_mm = 1.2
    j = JointBody.__new__(JointBody)
    j.s, j.motion = s, s.joint
    x = np.zeros(6)
    assert not j.dislocated(x)
    assert not j.dislocated(np.r_[0, 0, 0, 0.8, 0.8, 0.2])     # 1.13 mm in plane
    assert j.dislocated(np.r_[0, 0, 0, 0.9, 0.9, 0.0])         # 1.27 mm
    assert not j.dislocated(np.r_[0, 0, 0, 0.0, 0.0, 3.0])     # depth only
    search = Search(8.0, 1.0, 30.0, np.array([3.0, 3.0, 0.25]), 1)
    assert j.doubtful(0.9, np.r_[0, 0, 0, 1.3, 0, 0], search, False)
    assert not j.doubtful(0.9, np.r_[0, 0, 0, 1.1, 0, 0], search, False)
    j.parent = Body("pelvis", [])
    reasons = j.doubtful_reasons(0.1, np.r_[0, 0, 0, 1.3, 0, 0], search, True)
    assert reasons[0].startswith("similarity 0.100 below") and "joint centre moved 1.3 mm" in reasons[-1]
    assert "its parent pelvis is doubtful" in reasons and j.doubtful_reasons(0.9, np.zeros(6), search, False) == []
    s.joint.doubtful_shift_mm = 0.0
    assert not j.dislocated(np.r_[0, 0, 0, 2.5, 0, 0])
