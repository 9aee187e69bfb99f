"""Radiograph simulation (MSKdeXLib.projection.simulate) and ``mskdex simulate-xray`` on the real pelvis CT."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch

from MSKdeXLib.cli import main
from MSKdeXLib.errors import UserError
from MSKdeXLib.projection.geometry import Camera, perturbed_pose, project
from MSKdeXLib.io.radiographs import load_radiograph
from MSKdeXLib.projection.filters import gaussian_blur
from MSKdeXLib.projection.simulate import (MASS_ATTENUATION_CM2_G, ENERGIES_KEV, SimulationSettings, detect,
                                           mass_attenuation, spectrum, split_materials, simulate_radiograph,
                                           transmission_poly, write_dicom_dx)

from MSKdeXLib.projection.rendering import isocentre_of  # noqa: E402

CAM = Camera(48, 48, 8.0, 8.0, 1000.0)  # small detector: 384 mm field, fast
QUIET = dict(quantum_noise=False, electronic_noise_photons=0.0, focal_spot_mm=0.0, detector_blur_mm=0.0,
             scatter_fraction=0.0)


@pytest.fixture(scope="module")
def view(pelvis):
    from MSKdeXLib.projection.rendering import default_view

    ct, labels = pelvis
    return ct, labels, default_view(ct, labels, CAM)


# --------------------------------------------------------------------------------------------
# Physics on arrays
# --------------------------------------------------------------------------------------------
def test_spectrum_and_attenuation_tables():
    np.testing.assert_allclose(mass_attenuation("water", ENERGIES_KEV), MASS_ATTENUATION_CM2_G["water"])
    assert np.all(np.diff(mass_attenuation("bone", np.linspace(15, 120, 50))) < 0)
    means = []
    for kvp, al in ((60, 2.5), (75, 2.5), (90, 2.5), (75, 5.0)):
        e, w = spectrum(kvp, al)
        assert w.sum() == pytest.approx(1.0) and np.all(w >= 0) and e.max() < kvp
        means.append(float((e * w).sum()))
    assert means[0] < means[1] < means[2]                     # harder with kVp
    assert means[3] > means[1]                                # and with filtration
    assert 35 < means[1] < 55


def test_transmission_poly_beam_hardening():
    e, w = spectrum(75.0)
    water = torch.linspace(0.0, 30.0, 31, dtype=torch.float64)   # g/cm^2
    t = transmission_poly(water, torch.zeros_like(water), e, w)
    assert t[0] == pytest.approx(1.0) and torch.all(torch.diff(t) < 0)
    mu_eff = -torch.log(t[1:]) / water[1:]
    assert torch.all(torch.diff(mu_eff) < 0)                  # effective mu falls: beam hardening
    mono = np.exp(-mass_attenuation("water", (e * w).sum()) * water.numpy())
    assert t[1] == pytest.approx(mono[1], rel=0.05)           # thin slab ~ mean energy
    # bone attenuates more than the same mass of water
    b = transmission_poly(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), e, w)
    assert b[0] < transmission_poly(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), e, w)[0]


def test_gaussian_blur_matches_scipy(projection_image):
    from scipy.ndimage import gaussian_filter

    img = projection_image
    t = torch.as_tensor(img)
    for sigma in (1.5, 3.0):
        ours = gaussian_blur(t, sigma).numpy()
        ref = gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
        np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-3 * img.max())
    wide = gaussian_blur(t, 20.0).numpy()                     # downsampled path
    ref = gaussian_filter(img, 20.0, mode="nearest")
    assert np.abs(wide - ref).mean() < 0.02 * img.max()
    const = torch.full((30, 40), 7.0, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_blur(const, 12.0).numpy(), 7.0)


@pytest.fixture(scope="module")
def projection_image(pelvis):
    ct, _ = pelvis
    return np.clip(1.0 + ct.array / 1000.0, 0, None).sum(axis=1)[::-1].astype(np.float64)


def test_split_materials_adds_up(pelvis):
    ct, _ = pelvis
    soft, bone = split_materials(ct, (100.0, 1000.0))
    rho = lambda v: np.maximum(0.0, 1.0 + v.array.astype(np.float64) / 1000.0)  # noqa: E731
    np.testing.assert_allclose(rho(soft) + rho(bone), rho(ct), atol=1e-4)
    assert rho(bone)[ct.array < 100].max() == 0.0 and rho(soft)[ct.array > 1000].max() == 0.0


def test_detector_chain_on_transmission(projection_image):
    att = torch.as_tensor(projection_image * 0.02 * 3.0)       # mu_water * rho * 3 mm voxels
    cam = Camera(*att.shape, 1.0, 1.0)
    lo, hi = float(att.min()), float(att.max())
    s = SimulationSettings(window=(lo, hi), bits=16, **QUIET)
    codes, info = detect(torch.exp(-att), cam, s, seed=0)
    expected = np.round(np.clip((att.numpy() - lo) / (hi - lo), 0, 1) * 65535)
    assert np.abs(codes.numpy() - expected).max() <= 1.0      # log + window, independent check
    # gamma brightens, collimation zeroes outside its rectangle
    g, _ = detect(torch.exp(-att), cam, SimulationSettings(window=(lo, hi), bits=16, gamma=2.0, **QUIET), 0)
    assert np.all(g.numpy() >= codes.numpy() - 1) and g.mean() > codes.mean()
    c, _ = detect(torch.exp(-att), cam, SimulationSettings(collimation_mm=(-20, 20, -10, 30), **QUIET), 0)
    cx, cy = cam.principal_point
    rows, cols = np.nonzero(c.numpy())
    assert (rows - cy).min() >= -10 and (rows - cy).max() <= 30 and (cols - cx).min() >= -20
    assert (cols - cx).max() <= 20 and len(rows) > 0.9 * 41 * 41
    # scatter lowers contrast (fixed window)
    sc, _ = detect(torch.exp(-att), cam, SimulationSettings(**{**QUIET, "scatter_fraction": 0.5},
                                                            window=(lo, hi), bits=16), 0)
    assert sc.numpy().std() < 0.9 * codes.numpy().std()


def test_noise_responds_to_dose(projection_image):
    att = torch.as_tensor(projection_image * 0.06)
    cam = Camera(*att.shape, 1.0, 1.0)
    lo, hi = float(att.min()), float(att.max())
    std = {}
    for dose in (1e3, 1e5):
        s = SimulationSettings(photons_per_mm2=dose, electronic_noise_photons=0.0, window=(lo, hi), bits=16,
                               scatter_fraction=0.0)
        a, _ = detect(torch.exp(-att), cam, s, seed=1)
        b, _ = detect(torch.exp(-att), cam, s, seed=2)
        std[dose] = float((a - b).std())
    assert std[1e3] > std[1e5] > 0
    assert 5.0 < std[1e3] / std[1e5] < 20.0                   # Poisson: ~sqrt(100) = 10
    # noise_level sets the relative noise at the median signal
    s = SimulationSettings(noise_level=0.02, electronic_noise_photons=0.0, scatter_fraction=0.0,
                           window=(lo, hi), bits=16, focal_spot_mm=0.0, detector_blur_mm=0.0)
    a, info = detect(torch.exp(-att), cam, s, seed=1)
    b, _ = detect(torch.exp(-att), cam, s, seed=2)
    rel = (a - b).numpy() * (hi - lo) / 65535 / np.sqrt(2)    # log-domain noise = relative noise
    near = np.abs(np.exp(-att.numpy()) - np.median(np.exp(-att.numpy()))) < 0.1 * np.median(np.exp(-att.numpy()))
    assert rel[near].std() == pytest.approx(0.02, rel=0.25)


def test_settings_validation_and_dict():
    s = SimulationSettings(kvp=80, window=(1, 5), collimation_mm=(-100, 100, -80, 80))
    d = s.to_dict()
    json.dumps(d)
    assert SimulationSettings.from_dict(d) == s
    for bad in (dict(kvp=300), dict(spectrum="laser"), dict(scatter_fraction=1.0), dict(bits=20),
                dict(photons_per_mm2=0), dict(window=(5, 1)), dict(gamma=0), dict(noise_level=2.0),
                dict(collimation_mm=(10, -10, 0, 5)), dict(bone_hu_range=(500, 100))):
        with pytest.raises(UserError):
            SimulationSettings(**bad)


# --------------------------------------------------------------------------------------------
# On the renderer
# --------------------------------------------------------------------------------------------
def test_simulation_deterministic_and_bone_bright(view):
    ct, labels, pose = view
    s = SimulationSettings(photons_per_mm2=2e3, bits=16)
    a = simulate_radiograph(ct, CAM, pose, s, seed=5, labels=labels, isocentre_lps=isocentre_of(ct, labels))
    b = simulate_radiograph(ct, CAM, pose, s, seed=5, labels=labels)
    c = simulate_radiograph(ct, CAM, pose, s, seed=6, labels=labels)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, c.pixels)
    assert a.pixels.dtype == np.float32 and a.shape == (CAM.rows, CAM.cols)
    assert a.pixel_spacing == (8.0, 8.0) and a.metadata["seed"] == 5
    assert a.metadata["detector"]["magnification"] == pytest.approx(1000 / 850, rel=1e-6)
    # bone bright: replacing the left femur by muscle (40 HU) darkens exactly the pixels where it
    # projects (found with geometry.project, independently of the renderer)
    fm = labels.mask("femur_left")
    rc = np.round(project(CAM, pose, ct.voxel_centres_lps(fm))).astype(int)
    femur = np.zeros(a.shape, bool)
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < CAM.rows) & (rc[:, 1] >= 0) & (rc[:, 1] < CAM.cols)
    femur[rc[ok, 0], rc[ok, 1]] = True
    assert femur.sum() > 10
    fixed = SimulationSettings(**QUIET, window=(0.0, 8.0), bits=16)
    with_bone = simulate_radiograph(ct, CAM, pose, fixed, seed=0).pixels
    no_bone = simulate_radiograph(ct.with_array(np.where(fm, 40.0, ct.array).astype(np.float32)), CAM, pose,
                                  fixed, seed=0).pixels
    assert (with_bone - no_bone)[femur].mean() > 0.02 * 65535
    assert np.abs(with_bone - no_bone)[~femur].mean() < 0.05 * (with_bone - no_bone)[femur].mean()


def test_poly_split_additive_and_mono(view):
    from MSKdeXLib.projection.rendering import DRRRenderer

    ct, labels, pose = view
    soft, bone = split_materials(ct, (100.0, 1000.0))
    tot = DRRRenderer(ct, CAM).attenuation(pose)
    parts = DRRRenderer(soft, CAM).attenuation(pose) + DRRRenderer(bone, CAM).attenuation(pose)
    torch.testing.assert_close(parts, tot, rtol=1e-4, atol=1e-4)
    # mono without noise/blur is exactly the windowed log of the renderer's line integral
    lo, hi = float(tot.min()), float(tot.max())
    m = simulate_radiograph(ct, CAM, pose, SimulationSettings(spectrum="mono", window=(lo, hi), bits=16,
                                                              **QUIET), seed=0)
    expected = np.round(np.clip((tot[0].numpy() - lo) / (hi - lo), 0, 1) * 65535)
    assert np.abs(m.pixels - expected).max() <= 2.0
    # polychromatic: bone contrast relative to soft tissue higher than mono (lower mean energy)
    p = simulate_radiograph(ct, CAM, pose, SimulationSettings(**QUIET, bits=16), seed=0)
    assert np.corrcoef(p.pixels.ravel(), m.pixels.ravel())[0, 1] > 0.9


def test_dicom_round_trip_and_sidecar(tmp_path, view):
    ct, labels, pose = view
    s = SimulationSettings(bits=12)
    rad = simulate_radiograph(ct, CAM, pose, s, seed=11, labels=labels, isocentre_lps=isocentre_of(ct, labels))
    dcm, side = write_dicom_dx(tmp_path / "sim.dcm", rad, CAM, pose, s, 11)
    back = load_radiograph(dcm)
    np.testing.assert_array_equal(back.pixels, rad.pixels)
    assert back.pixel_spacing == (8.0, 8.0) and back.spacing_source == "ImagerPixelSpacing"
    assert back.metadata["magnification_factor"] == pytest.approx(1000 / 850, rel=1e-4)
    assert pydicom.dcmread(dcm).BitsStored == 12
    doc = json.loads(side.read_text())
    assert doc["geometry"] == CAM.to_dict() and doc["seed"] == 11
    np.testing.assert_allclose(doc["ct_to_camera"], pose)
    assert SimulationSettings.from_dict(doc["settings"]) == s
    with pytest.raises(UserError, match="--force"):
        write_dicom_dx(tmp_path / "sim.dcm", rad, CAM, pose, s, 11)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def test_cli_simulate_xray(tmp_path, pelvis_case, view, capsys):
    ct, labels, base = view
    out = tmp_path / "xr.dcm"
    args = ["simulate-xray", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels),
            "--out", str(out), "--rows", "40", "--cols", "48", "--pixel-spacing", "8", "9",
            "--rotation", "0", "0", "5", "--translation", "10", "0", "0", "--seed", "3",
            "--progress", "none"]
    assert main(args) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    r = load_radiograph(out)
    assert r.shape == (40, 48) and r.pixel_spacing == (8.0, 9.0)
    cam = Camera.from_dict(doc["geometry"])
    from MSKdeXLib.projection.rendering import default_view

    expected = perturbed_pose(default_view(ct, labels, cam), (0, 0, 5), (10, 0, 0), isocentre_of(ct, labels))
    np.testing.assert_allclose(doc["ct_to_camera"], expected, atol=1e-9)
    assert doc["seed"] == 3 and doc["ct_source"] == str(pelvis_case.ct)
    assert doc["source_to_isocentre_mm"] == pytest.approx(850.0)  # the default view's isocentre
    capsys.readouterr()
    assert main(args) == 2                                    # exists, no --force
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err
    assert main(args + ["--force"]) == 0
    np.testing.assert_array_equal(load_radiograph(out).pixels, r.pixels)  # same seed, same image
    for bad in (["--kvp", "500"], ["--scatter-fraction", "1.5"], ["--pixel-spacing", "1", "2", "3"]):
        capsys.readouterr()
        assert main(args[:-2] + bad + ["--progress", "none", "--force"]) == 2
        assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["simulate-xray", "--ct", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path / "a.dcm"),
                 "--progress", "none"]) == 2
    assert main(["simulate-xray", "--ct", str(pelvis_case.ct), "--out", str(tmp_path / "a.png"),
                 "--progress", "none"]) == 2
