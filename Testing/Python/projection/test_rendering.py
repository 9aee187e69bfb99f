"""DRR engine on the real CTs: exact channel sums, additivity, where the mass lands (against
independent point sampling), masks vs projection, gradients, and the attenuation integral
against an independent 3D ray-marching reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from MSKdeXLib.projection.geometry import Camera, ap_pose, perturbed_pose, project, rotation_xyz
from MSKdeXLib.io.images import LabelMap
from MSKdeXLib.anatomy.ct_metrics import mass_weights, structure_metrics
from MSKdeXLib.projection.rendering import DRRRenderer, default_view, isocentre_of
from MSKdeXLib.anatomy.structures import Structure, StructureTable

# 100^2 pixels of 4 mm: about the field of view of the default 256^2 x 1.6 mm detector.
SMALL = Camera(100, 100, 4.0, 4.0, 1000.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: these small problems gain nothing from more, and CI shares its cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


POSES = [((0, 0, 0), (0, 0, 0)), ((30, 0, 0), (20, 0, 0)), ((0, 30, 0), (0, -20, 10)),
         ((0, 0, 30), (0, 0, -20)), ((-20, 15, -25), (-10, 20, 15))]


@pytest.fixture(scope="module")
def pelvis_renderer(pelvis):
    ct, labels = pelvis
    chosen = labels.select(kinds=["muscle", "bone"])
    return DRRRenderer(ct, SMALL, labels, chosen)


def _direct_truth(ct, labels, structures, density) -> dict:
    """Mass (g) and volume (cm^3) per structure straight from the convention (DESIGN 4: rho =
    max(0, 1 + HU/1000), muscles count lean voxels only), over each structure's voxels only:
    fast on the 512x512 chest, where metrics.structure_metrics works on the whole grid."""
    cm3 = ct.voxel_volume_mm3 / 1000.0
    out = {}
    for s in structures:
        hu = ct.array[labels.mask(s)].astype(np.float64)
        grams = density.density(hu) * cm3
        if s.kind == "muscle":
            grams = np.where(density.lean(hu), grams, 0.0)
        out[s.name] = SimpleNamespace(mass_g=float(grams.sum()), volume_cm3=hu.size * cm3)
    return out


def _relative_errors(renderer, result, ct, labels, b=0, truth=None):
    if truth is None:
        truth = {m.structure.name: m for m in structure_metrics(ct, labels, renderer.structures)}
    errs, inside = [], 0
    for k, s in enumerate(renderer.structures):
        if not bool(result.inside[b, k]):
            continue
        inside += 1
        for q, attr in (("mass", "mass_g"), ("volume", "volume_cm3")):
            got = result.images[q][b, k].double().sum().item()
            want = getattr(truth[s.name], attr)
            errs.append(abs(got - want) / max(want, 1e-9))
    return np.array(errs), inside


@pytest.mark.parametrize("rotation,translation", POSES)
def test_channel_sums_equal_metrics_pelvis(pelvis, pelvis_renderer, rotation, translation):
    ct, labels = pelvis
    iso = isocentre_of(ct, labels)
    pose = perturbed_pose(default_view(ct, labels, SMALL), rotation, translation, iso)
    result = pelvis_renderer.render_channels(pose)
    errs, inside = _relative_errors(pelvis_renderer, result, ct, labels)
    assert inside >= 12, "too few structures inside the detector for a meaningful check"
    assert errs.max() < 5e-3
    assert errs.max() < 1e-5  # exact up to float32 rounding
    # a structure reported as not inside really loses mass
    for k in np.flatnonzero(~result.inside[0].numpy()):
        s = pelvis_renderer.structures[k]
        lost = labels.mask(s).sum() * ct.voxel_volume_mm3 / 1000 - result.images["volume"][0, k].sum().item()
        assert lost > 0


def test_channel_sums_equal_metrics_chest(chest):
    ct, labels = chest
    camera = Camera(96, 96, 5.0, 5.0, 1000.0)
    chosen = labels.select(["autochthon_left", "autochthon_right", "iliopsoas_left", "vertebrae_T12",
                            "vertebrae_L1", "rib_left_9", "rib_right_9", "scapula_left", "sternum"])
    renderer = DRRRenderer(ct, camera, labels, chosen)
    pose = perturbed_pose(default_view(ct, labels, camera), (10, -15, 20), (5, 10, -10), isocentre_of(ct, labels))
    result = renderer.render_channels(pose)
    truth = _direct_truth(ct, labels, renderer.structures, renderer.density)
    errs, inside = _relative_errors(renderer, result, ct, labels, truth=truth)
    assert inside >= 0.9 * len(chosen)
    assert errs.max() < 5e-3
    assert errs.max() < 1e-5


def test_disjoint_structures_add_up_to_their_union(pelvis):
    ct, labels = pelvis
    parts = [labels.resolve(n) for n in ("gluteus_medius_left", "gluteus_minimus_left",
                                         "gluteus_maximus_left")]
    union_layer = np.zeros(ct.array.shape, dtype=np.int32)
    for s in parts:
        union_layer[labels.mask(s)] = 1
    union = Structure(900, "gluteal_union_left", "muscle", "left", (255, 0, 0))
    table = StructureTable("test", list(labels.table.structures) + [union])
    entries = {**labels.entries, 900: (len(labels.layers), 1)}
    merged = LabelMap(labels.grid, labels.layers + [union_layer], table, entries)
    renderer = DRRRenderer(ct, SMALL, merged, parts + [union])
    pose = perturbed_pose(default_view(ct, labels, SMALL), (5, 10, -5), (3, 0, 4), isocentre_of(ct, labels))
    mass = renderer.channels(pose, "mass")[0].double()
    total = mass[:3].sum(0)
    assert mass[3].sum() > 100  # grams: a real muscle group
    assert torch.allclose(total, mass[3], atol=1e-5 * float(mass[3].max()), rtol=1e-4)


def _moments(img: np.ndarray) -> np.ndarray:
    """(row centroid, col centroid, row std, col std) of an image, pixels."""
    rows, cols = np.mgrid[:img.shape[0], :img.shape[1]]
    w = img / img.sum()
    mr, mc = (w * rows).sum(), (w * cols).sum()
    return np.array([mr, mc, np.sqrt((w * (rows - mr) ** 2).sum()), np.sqrt((w * (cols - mc) ** 2).sum())])


@pytest.mark.parametrize("camera", [SMALL, Camera(128, 128, 1.5, 1.5, 1000.0)])
def test_channels_match_point_sampled_projection(pelvis, camera):
    """Mass lands where the voxels project: compare with an independent image made by
    projecting random points spread uniformly inside every voxel (geometry.project, float64,
    exact perspective) and binning their mass to the nearest pixel."""
    ct, labels = pelvis
    name = "gluteus_minimus_left"  # about 100 x 50 mm: inside both detectors
    s = labels.resolve(name)
    mask = labels.mask(s)
    centre = ct.voxel_centres_lps(mask).mean(axis=0)
    pose = perturbed_pose(ap_pose(centre, camera), (10, -20, 25), (0, 0, 0), centre)
    result = DRRRenderer(ct, camera, labels, [s]).render_channels(pose, ("mass",))
    assert bool(result.inside[0, 0])
    img = result.images["mass"][0, 0].double().numpy()
    rng = np.random.default_rng(1)
    n = 48  # points per voxel
    kji = np.argwhere(mask)
    grams = mass_weights(ct, s, DRRRenderer(ct, camera).density)[mask]
    ijk = kji[:, ::-1][None] + rng.uniform(-0.5, 0.5, (n, len(kji), 3))
    a = ct.index_to_lps()
    rc = np.rint(project(camera, pose, ijk.reshape(-1, 3) @ a[:3, :3].T + a[:3, 3])).astype(int)
    ref = np.zeros((camera.rows, camera.cols))
    np.add.at(ref, (rc[:, 0], rc[:, 1]), np.tile(grams, n) / n)
    assert abs(img.sum() / ref.sum() - 1) < 1e-5
    got, want = _moments(img), _moments(ref)
    assert np.abs(got[:2] - want[:2]).max() < 0.03  # centroid, pixels (half a pixel off would fail)
    assert np.abs(got[2:] / want[2:] - 1).max() < 0.01  # spread: footprint widths are right
    # pixel-wise agreement (the reference has sampling noise, so smooth both by 2 x 2 pixels)
    blur = lambda x: x[:-1, :-1] + x[1:, :-1] + x[:-1, 1:] + x[1:, 1:]  # noqa: E731
    assert np.corrcoef(blur(img).ravel(), blur(ref).ravel())[0, 1] > 0.995
    assert np.abs(blur(img) - blur(ref)).sum() / blur(ref).sum() < 0.08


def test_masks_contain_projected_voxel_centres(pelvis):
    ct, labels = pelvis
    pose = perturbed_pose(default_view(ct, labels, SMALL), (12, -20, 25), (5, -5, 10), isocentre_of(ct, labels))
    names = ["gluteus_minimus_left", "iliopsoas_right", "vertebrae_L3", "femur_left", "rib_left_11"]
    renderer = DRRRenderer(ct, SMALL, labels, names)
    masks = renderer.masks(pose)[0].numpy()
    rng = np.random.default_rng(0)
    for k, s in enumerate(renderer.structures):
        pts = ct.voxel_centres_lps(labels.mask(s))
        pts = pts[rng.choice(len(pts), size=min(200, len(pts)), replace=False)]
        rc = np.rint(project(SMALL, pose, pts)).astype(int)
        ok = (rc[:, 0] >= 0) & (rc[:, 0] < SMALL.rows) & (rc[:, 1] >= 0) & (rc[:, 1] < SMALL.cols)
        assert masks[k][rc[ok, 0], rc[ok, 1]].all(), s.name
        # and the mask is not everything
        assert masks[k].mean() < 0.5


def test_default_view_puts_bone_centre_on_principal_point(pelvis):
    ct, labels = pelvis
    pose = default_view(ct, labels, SMALL)
    (row, col), = project(SMALL, pose, isocentre_of(ct, labels)[None])
    cx, cy = SMALL.principal_point
    assert abs(row - cy) < 1e-6 and abs(col - cx) < 1e-6
    assert np.allclose(pose[:3, :3] @ [1, 0, 0], [1, 0, 0])  # +L to image right: radiological


def _reference_attenuation(renderer, pose: np.ndarray, samples: int = 600) -> np.ndarray:
    """Independent trilinear ray marching with torch's 3D grid_sample (slow, for checks)."""
    ct, cam = renderer.ct, renderer.camera
    src = np.linalg.inv(pose)[:3, 3]
    pix = cam.pixel_centres_camera().reshape(-1, 3)
    pix_lps = (np.linalg.inv(pose) @ np.c_[pix, np.ones(len(pix))].T)[:3].T
    to_idx = ct.lps_to_index()
    corners = ct.corners_lps()
    d = pix_lps - src
    length = np.linalg.norm(d, axis=1)
    d /= length[:, None]
    t = (corners - src) @ d.T  # bounds of the CT along each ray (loose)
    t0, t1 = t.min(0), t.max(0)
    steps = (t1 - t0) / samples
    ts = t0[:, None] + (np.arange(samples) + 0.5)[None] * steps[:, None]
    pts = src + ts[..., None] * d[:, None, :]
    ijk = pts @ to_idx[:3, :3].T + to_idx[:3, 3]
    size = np.array(ct.size) - 1
    grid = torch.as_tensor(2 * ijk / size - 1, dtype=torch.float32)[None, None]
    mu = renderer.mu_volume()[None, None]
    vals = torch.nn.functional.grid_sample(mu, grid, align_corners=True)[0, 0, 0].double().numpy()
    return (vals.sum(1) * steps).reshape(cam.rows, cam.cols)


@pytest.mark.parametrize("rotation", [(0, 0, 0), (20, -25, 30), (0, 0, 60)])
def test_attenuation_matches_independent_ray_marching(pelvis, rotation):
    ct, labels = pelvis
    cam = Camera(48, 48, 8.0, 8.0, 1000.0)
    renderer = DRRRenderer(ct, cam, labels, [])
    pose = perturbed_pose(default_view(ct, labels, cam), rotation, (0, 0, 0), isocentre_of(ct, labels))
    ours = renderer.attenuation(pose)[0].double().numpy()
    ref = _reference_attenuation(renderer, pose)
    assert ours.max() > 1.0  # a real body: line integrals of several units
    ncc = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert ncc > 0.999
    assert abs(ours.sum() / ref.sum() - 1) < 0.01


def test_more_samples_and_batches_agree(pelvis):
    ct, labels = pelvis
    cam = Camera(40, 40, 10.0, 10.0, 1000.0)
    base = default_view(ct, labels, cam)
    iso = isocentre_of(ct, labels)
    poses = np.stack([perturbed_pose(base, (0, 10, 0), (0, 0, 0), iso), perturbed_pose(base, (5, 0, -15), (8, 0, 0), iso)])
    default = DRRRenderer(ct, cam, labels, [])
    fine = DRRRenderer(ct, cam, labels, [], samples_per_ray=3 * ct.array.shape[1])
    batch = default.attenuation(poses)
    assert batch.shape == (2, 40, 40)
    for b in range(2):
        single = default.attenuation(poses[b])[0]
        assert torch.allclose(batch[b], single, atol=1e-5)
        assert torch.allclose(fine.attenuation(poses[b])[0], single, rtol=0.03, atol=0.05)


def test_bone_only_attenuation(pelvis):
    ct, labels = pelvis
    cam = Camera(48, 48, 8.0, 8.0, 1000.0)
    bones = labels.select(kinds=["bone"])
    renderer = DRRRenderer(ct, cam, labels, bones)
    pose = default_view(ct, labels, cam)
    full = renderer.attenuation(pose)[0]
    bone = renderer.attenuation(pose, structures=bones)[0]
    masks = renderer.masks(pose)[0].any(0)
    assert (bone <= full + 1e-5).all()
    assert bone[~masks].abs().max() < 0.05 * bone.max()  # nothing outside the projected bones
    assert bone.max() > 0.5


def _pose_from_params(base: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """base @ [R_z(angle) | t] built with torch ops (differentiable)."""
    a = params[0]
    c, s = torch.cos(a), torch.sin(a)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    r = torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero]), torch.stack([zero, zero, one])])
    top = torch.cat([r, params[1:4, None]], dim=1)
    m = torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=params.dtype)], dim=0)
    return base @ m


def test_pose_gradient_matches_finite_differences(pelvis):
    ct, labels = pelvis
    cam = Camera(48, 48, 8.0, 8.0, 1000.0)
    renderer = DRRRenderer(ct, cam, labels, [])
    iso = isocentre_of(ct, labels)
    centre = np.eye(4)
    centre[:3, 3] = iso
    base = torch.as_tensor(default_view(ct, labels, cam) @ centre)  # parameters act about the isocentre
    uncentre = torch.as_tensor(np.linalg.inv(centre))
    target = renderer.attenuation(_pose_from_params(base, torch.tensor([0.05, 6.0, -4.0, 3.0],
                                                                      dtype=torch.float64)) @ uncentre)

    def loss(params):
        return ((renderer.attenuation(_pose_from_params(base, params) @ uncentre) - target) ** 2).mean()

    params = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss(params).backward()
    grad = params.grad.numpy()
    assert np.isfinite(grad).all()
    steps = [0.004, 0.5, 0.5, 0.5]
    fd = []
    for i, h in enumerate(steps):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = h
        with torch.no_grad():
            fd.append((loss(params.detach() + e) - loss(params.detach() - e)).item() / (2 * h))
    fd = np.array(fd)
    # the target was made by moving in every parameter: all gradients are clearly non-zero
    assert (np.abs(fd) > 1e-6).all()
    assert np.all(np.sign(grad) == np.sign(fd))
    assert np.allclose(grad, fd, rtol=0.25, atol=0.05 * np.abs(fd).max())


def test_channels_are_differentiable(pelvis):
    ct, labels = pelvis
    cam = Camera(32, 32, 12.0, 12.0, 1000.0)
    renderer = DRRRenderer(ct, cam, labels, [labels.resolve("femur_left")])
    pose = torch.as_tensor(default_view(ct, labels, cam)).requires_grad_(True)
    img = renderer.channels(pose, "mass")
    weights = torch.linspace(0, 1, cam.cols, dtype=torch.float32)
    (img * weights).sum().backward()
    assert torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0


def test_rotation_about_isocentre_keeps_it_fixed(pelvis):
    ct, labels = pelvis
    iso = isocentre_of(ct, labels)
    base = ap_pose(iso, SMALL)
    moved = perturbed_pose(base, (10, 20, 30), (0, 0, 0), iso)
    assert np.allclose(project(SMALL, base, iso[None]), project(SMALL, moved, iso[None]))
    assert np.allclose(moved[:3, :3], base[:3, :3] @ rotation_xyz(10, 20, 30))


@pytest.mark.parametrize("per_chunk", [None, 1 << 22])
def test_marching_only_rays_that_meet_the_volume_changes_nothing(pelvis, monkeypatch, per_chunk):
    """A femur's DRR marched only where its rays can meet each chunk of planes' non-zero samples
    (the default) equals, bit for bit, the DRR of every ray marched (what the renderer did
    before), with and without a gradient, one plane or many per chunk, also with the femur partly
    off the detector; and the windows are really smaller than the detector."""
    from MSKdeXLib.projection import rendering

    if per_chunk:
        monkeypatch.setattr(rendering, "_PLANE_CHUNK_ELEMENTS", per_chunk)
    ct, labels = pelvis
    cam = Camera(160, 160, 3.0, 3.0, 1000.0)
    femur = [labels.resolve("femur_left")]
    renderer = DRRRenderer(ct, cam, labels, femur)
    base = default_view(ct, labels, cam)
    iso = isocentre_of(ct, labels)
    poses = torch.as_tensor(np.stack([perturbed_pose(base, r, t, iso) for r, t in
                                      [((0, 0, 0), (0, 0, 0)), ((10, -15, 20), (5, 10, -8)),
                                       ((0, 0, 0), (115, 0, 0)), ((25, 5, 0), (0, -20, 30))]]))

    def drrs(frac: float, grad: bool):
        monkeypatch.setattr(rendering, "_LIVE_RAYS_MAX_FRACTION", frac)
        p = poses.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            d = renderer.attenuation(p, structures=femur)
        if not grad:
            return d, None
        (d * torch.linspace(0, 1, d.numel(), dtype=d.dtype).reshape(d.shape)).sum().backward()
        return d.detach(), p.grad

    every, _ = drrs(0.0, False)
    assert 100 < (every[2] != 0).sum() < 0.6 * (every[0] != 0).sum()  # the third pose: the femur partly off the detector
    assert torch.equal(drrs(1.0, False)[0], every)
    d_all, g_all = drrs(0.0, True)
    d_live, g_live = drrs(1.0, True)
    assert torch.equal(d_all, every) and torch.equal(d_live, every)
    assert torch.equal(g_all, g_live) and g_all.abs().sum() > 0
    off = torch.as_tensor(perturbed_pose(base, (0, 0, 0), (400, 0, 0), iso))[None].requires_grad_(True)
    d_off = renderer.attenuation(off, structures=femur)  # no ray meets the femur: zeros, and a gradient
    d_off.sum().backward()
    assert (d_off == 0).all() and (off.grad == 0).all()
    n = renderer.ray_samples(1)
    planes, pos = renderer._plane_stack(femur, 1, n)
    chunks = rendering._chunk_corners(1, pos, rendering._plane_boxes(planes), 3)
    m = torch.linalg.inv(renderer._index_to_lps) @ rendering._rigid_inverse(poses[:1])
    wins = rendering._ray_windows(m, cam, chunks, 3)
    live = [w for w in wins if w is not None]
    assert live and None in wins  # planes of the femur's box (the volume is the CT's) without any femur voxel
    assert max((w[1] - w[0]) * (w[3] - w[2]) for w in live) < 0.5 * cam.rows * cam.cols


def test_one_march_per_batch_and_kept_ray_constants_change_nothing(pelvis):
    """On the pelvis CT: a batch whose poses share a dominant axis, marched as it is (no copy per
    axis), equals bit for bit what the renderer did before (the poses indexed per axis, the DRRs
    stacked back), values and pose gradients; the rays' constants a renderer keeps per dtype are
    the values it computed in every call before; and a batch whose poses differ in their dominant
    axis still gets each pose's DRR, in order."""
    ct, labels = pelvis
    cam = Camera(72, 64, 4.0, 4.5, 1000.0)
    bone = [labels.resolve(n) for n in ("hip_left", "hip_right", "sacrum")]
    base = default_view(ct, labels, cam)
    iso = isocentre_of(ct, labels)
    poses = torch.as_tensor(np.stack([perturbed_pose(base, r, t, iso) for r, t in
                                      [((0, 0, 0), (0, 0, 0)), ((8, -12, 20), (5, 10, -8)), ((-15, 5, -30), (-20, 0, 25))]]))

    def render(r: DRRRenderer, p: torch.Tensor, before: bool):
        p = p.clone().requires_grad_(True)
        if before:  # the per-axis path every batch took before
            axes = r._dominant_axes(p)
            out: list = [None] * p.shape[0]
            for axis in sorted(set(axes)):
                idx = [b for b, a in enumerate(axes) if a == axis]
                for j, b in enumerate(idx):
                    out[b] = r._attenuation_batch(p[idx], bone, axis)[j]
            d = torch.stack(out)
        else:
            d = r.attenuation(p, structures=bone)
        (d * torch.linspace(0, 1, d.numel(), dtype=d.dtype).reshape(d.shape)).sum().backward()
        return d.detach(), p.grad

    r = DRRRenderer(ct, cam, labels, bone)
    assert len(set(r._dominant_axes(poses))) == 1
    d_new, g_new = render(r, poses, False)
    d_old, g_old = render(DRRRenderer(ct, cam, labels, bone), poses, True)
    assert torch.equal(d_new, d_old) and torch.equal(g_new, g_old) and g_new.abs().sum() > 0 and d_new.max() > 1
    with torch.no_grad():
        assert torch.equal(r.attenuation(poses.float(), structures=bone), DRRRenderer(ct, cam, labels, bone).attenuation(poses.float(), structures=bone))
    for dt in (torch.float64, torch.float32):
        to_index, pix, norm = r._rays[dt]
        assert torch.equal(to_index, torch.linalg.inv(r._index_to_lps).to(dt))
        assert torch.equal(pix, r._pixels_camera(dt)) and torch.equal(norm, r._pixels_camera(dt).norm(dim=-1))
    side = poses.clone()
    side[2] = torch.as_tensor(perturbed_pose(base, (90, 0, 0), (0, 0, 0), iso))  # seen from above: another axis
    axes = r._dominant_axes(side)
    assert len(set(axes)) == 2
    with torch.no_grad():
        mixed = r.attenuation(side, structures=bone)
        for b in range(3):
            one = r.attenuation(side[b], structures=bone)[0]
            assert torch.allclose(mixed[b], one, rtol=1e-5, atol=1e-5) and one.max() > 1
