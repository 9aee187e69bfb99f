"""Registration building blocks: similarity measures, pose parameters, PnP, in-plane search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MSKdeXLib.errors import UserError
from MSKdeXLib.projection.geometry import Camera, ap_pose, perturbed_pose, project
from MSKdeXLib.registration import initialise, similarity
from MSKdeXLib.registration.optimize import PoseSpace


def _phantom(h=96, w=80, seed=0) -> torch.Tensor:
    """A smooth random image with edges: blurred noise plus a few bright discs."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.avg_pool2d(torch.rand(1, 1, h + 8, w + 8, generator=g), 9, 1)[0, 0]
    rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for k in range(4):
        r0, c0, rad = (torch.rand(3, generator=g) * torch.tensor([h, w, 15.0])).tolist()
        img = img + 2.0 * ((rr - r0) ** 2 + (cc - c0) ** 2 < (rad + 5) ** 2).float()
    return img


@pytest.mark.parametrize("name", similarity.MEASURES)
def test_measures_identity_contrast_and_misalignment(name):
    fn = similarity.get_similarity(name, patch=12)
    a = _phantom()
    mask = torch.from_numpy(similarity.valid_mask(a.numpy(), border_px=2))
    same = fn(a, a, mask)
    assert same.shape == (1,)
    assert float(same) == pytest.approx(1.0, abs=1e-4)
    # invariant to an affine contrast change of either image
    assert float(fn(a, 3.7 * a - 11.0, mask)) == pytest.approx(1.0, abs=1e-4)
    assert float(fn(0.02 * a + 5.0, a, mask)) == pytest.approx(1.0, abs=1e-4)
    # a shifted copy scores lower, an unrelated image much lower; batch = one value each
    batch = torch.stack([a, torch.roll(a, 3, 1), _phantom(seed=5)])
    vals = fn(a, batch, mask)
    assert vals.shape == (3,)
    assert vals[0] > vals[1] > vals[2]
    assert float(vals[2]) < 0.5


def test_measures_are_differentiable():
    a = _phantom()
    b = torch.roll(a, 2, 0).clone().requires_grad_(True)
    for name in similarity.MEASURES:
        s = similarity.get_similarity(name)(a, b)
        (g,) = torch.autograd.grad(s.sum(), b)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_ncc_matches_numpy_and_mask_excludes_pixels():
    a, b = _phantom(seed=1), _phantom(seed=2)
    ref = np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1]
    assert float(similarity.ncc(a, b)) == pytest.approx(ref, abs=1e-5)
    mask = torch.zeros_like(a, dtype=torch.bool)
    mask[10:50, 5:60] = True
    bad = b.clone()
    bad[~mask] = torch.nan  # garbage outside the mask does not matter
    assert float(similarity.ncc(a, bad, mask)) == pytest.approx(float(similarity.ncc(a, b, mask)), abs=1e-5)


def test_valid_mask_removes_collimation_and_invalid_pixels():
    img = _phantom().numpy()
    img[:7] = 0.0                # shutter at the top
    img[:, -5:] = 0.0            # and on the right
    img[40, 40] = np.nan
    m = similarity.valid_mask(img, border_px=1)
    assert not m[:8].any() and not m[:, -6:].any() and not m[40, 40]
    assert m[8:-1, 1:-6].sum() == m.sum()
    assert m.mean() > 0.7


def test_pose_space_round_trip_and_torch_matches_numpy():
    cam = Camera(64, 64, 3.0, 3.0, 1000.0)
    base = ap_pose([10.0, -20.0, 30.0], cam)
    space = PoseSpace(base, [12.0, -18.0, 25.0])
    x = np.array([3.0, -7.0, 12.0, 5.0, -4.0, 9.0])
    m = space.matrix(x)
    mt = space.matrices(torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(m, mt, atol=1e-9)
    np.testing.assert_allclose(space.params_of(m), x, atol=1e-8)
    # a pure rotation keeps the body centre fixed in the camera frame
    m_rot = space.matrix([5.0, 6.0, 7.0, 0, 0, 0])
    np.testing.assert_allclose(m_rot[:3, :3] @ space.centre_lps + m_rot[:3, 3], space.centre_camera, atol=1e-9)


def test_pnp_recovers_a_known_pose():
    rng = np.random.default_rng(3)
    cam = Camera(200, 180, 1.5, 1.5, 1000.0)
    iso = np.array([0.0, 20.0, -40.0])
    truth = perturbed_pose(ap_pose(iso, cam), (8.0, -6.0, 12.0), (15.0, -20.0, 25.0), iso)
    pts = iso + rng.uniform(-100, 100, size=(6, 3))
    pix = project(cam, truth, pts)
    pose, rms = initialise.solve_pnp(pts, pix, cam)
    assert rms < 1e-4
    np.testing.assert_allclose(pose, truth, atol=1e-4)
    # noisy clicks still land close
    pose_n, rms_n = initialise.solve_pnp(pts, pix + rng.normal(0, 0.5, pix.shape), cam)
    assert 0.1 < rms_n < 1.0
    err = np.linalg.norm((pts @ pose_n[:3, :3].T + pose_n[:3, 3]) - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert err.mean() < 10.0


def test_landmarks_file_errors(tmp_path):
    f = tmp_path / "lm.csv"
    f.write_text("x,y,z,row,col\n1,2,3,4,5\n2,3,4,5,6\n3,4,5,6,7\n")
    with pytest.raises(UserError, match="at least 4"):
        initialise.load_landmarks(f)
    f.write_text("1,2,3,4\n")
    with pytest.raises(UserError, match="expected 5"):
        initialise.load_landmarks(f)
    with pytest.raises(UserError, match="not found"):
        initialise.load_landmarks(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="at least 4"):
        initialise.solve_pnp(np.zeros((3, 3)), np.zeros((3, 2)), Camera(10, 10))
    f.write_text("x,y,z,row,col\n" + "\n".join(f"{i},{i*2},{i*3},{i},{i+1}" for i in range(5)) + "\n")
    pts, pix = initialise.load_landmarks(f)
    assert pts.shape == (5, 3) and pix.shape == (5, 2) and pix[4, 1] == 5


def test_inplane_search_finds_rotation_and_shift():
    img = _phantom(96, 96, seed=7)
    centre = (47.0, 50.0)
    moved = initialise._rotate_image(img, torch.tensor([-7.5]), centre)[0]
    moved = initialise._shift_image(moved, 5, -8)
    sim = similarity.get_similarity("gc")
    ang, dr, dc, s = initialise.inplane_search(moved, img, None, sim, centre, max_angle_deg=15, angle_step_deg=2.5)
    assert (ang, dr, dc) == (-7.5, 5.0, -8.0)
    assert s > 0.9


def test_pgncc_keeping_the_fixed_side_changes_nothing(pelvis):
    """The registration's similarity (``get_similarity('pgncc')``) keeps each radiograph's own side
    (derivatives, patch statistics): on DRRs of the real pelvis CT its values and gradients equal
    :func:`patch_gradient_ncc`'s bit for bit, on the first and on later calls, with and without
    a mask, and a radiograph changed in place is recomputed."""
    from MSKdeXLib.projection.rendering import DRRRenderer, default_view, isocentre_of

    ct, labels = pelvis
    cam = Camera(72, 64, 5.0, 5.0, 1000.0)
    renderer = DRRRenderer(ct, cam)
    base, iso = default_view(ct, labels, cam), isocentre_of(ct, labels)
    fixed = renderer.attenuation(perturbed_pose(base, (2, -3, 4), (3, -2, 5), iso))[0]
    moving = renderer.attenuation(np.stack([perturbed_pose(base, r, t, iso) for r, t in
                                            [((0, 0, 0), (0, 0, 0)), ((5, 0, -4), (6, 3, 0)), ((-3, 6, 2), (0, -8, 10))]]))
    mask = torch.from_numpy(similarity.valid_mask(fixed.numpy(), border_px=3))
    fn = similarity.get_similarity("pgncc", patch=8)
    assert isinstance(fn, similarity.PatchGradientNCC)
    for m in (mask, None):
        ref = similarity.patch_gradient_ncc(fixed, moving, m, 8)
        assert ref.std() > 0.01
        for _ in range(2):
            assert torch.equal(fn(fixed, moving, m), ref)
        x = moving.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(similarity.patch_gradient_ncc(fixed, x * 2.0, m, 8).sum(), x)
        (g_kept,) = torch.autograd.grad(fn(fixed, x * 2.0, m).sum(), x)
        assert torch.equal(g_ref, g_kept) and g_ref.abs().sum() > 0
    before = fn(fixed, moving, mask)
    fixed.mul_(-1.0)  # the same tensor, changed in place
    after = fn(fixed, moving, mask)
    assert torch.equal(after, similarity.patch_gradient_ncc(fixed, moving, mask, 8)) and not torch.equal(after, before)
