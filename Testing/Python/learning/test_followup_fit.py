"""The model-based follow-up reader (issue 14, session 11): the deformation modes predict what the cohort's
elastic deformation does to the line integrals, and a fit of the physics recovers known muscle changes,
with and without a deformation from the modes' own span."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from MSKdeXLib.learning import cohort as co
from MSKdeXLib.learning import followup_fit as ff
from MSKdeXLib.learning.resimulation import resimulate
from MSKdeXLib.projection.simulate import material_paths

CONTROL_MM = 160.0   # coarser than the cohort's 80 mm: fewer control points, a fast test


class _Given:
    """A stand-in generator whose ``normal`` returns given control displacements (mm), one axis per call."""

    def __init__(self, fields):
        self.fields = list(fields)

    def normal(self, loc, scale, size):
        return self.fields.pop(0).reshape(size)


@pytest.fixture(scope="module")
def case(small_baseline):
    """The real pelvis CT at 6 mm, a 64 x 64 px AP view, its physics, the deformation Jacobian and a fit model."""
    ct, labels, camera, pose, physics, base = small_baseline
    jac = ff.deformation_jacobian(ct, camera, pose, physics.spec, CONTROL_MM)
    model = ff.FitModel.build(physics, base, ff.deformation_modes(jac, keep=0.999), draws=1000)
    return ct, labels, camera, pose, physics, jac, model


def test_jacobian_predicts_the_elastic_deformation(case):
    """A 1 mm-SD field of the cohort's own ``elastic_deform``: the CT deformed and re-rendered changes the
    paths as the Jacobian predicts (correlation > 0.9, amplitude within 25 %)."""
    ct, _, camera, pose, physics, jac, _ = case
    hu = ct.array.astype(np.float32)
    ctrl = ff.control_grid(hu.shape, ct.spacing, CONTROL_MM)
    d = np.random.default_rng(4).normal(0.0, 1.0, (3, *ctrl))
    lab = np.zeros(hu.shape, np.int32)
    warped, _, _ = co.elastic_deform(hu, lab, ct.spacing, 1.0, CONTROL_MM, _Given(d))
    settings = co.acquisition_settings(physics.spec, camera)
    moved = material_paths(ct.with_array(warped), camera, pose, settings)
    actual = np.stack([moved["water"].numpy() - physics.water.numpy(), moved["bone"].numpy() - physics.bone.numpy()])
    # the Jacobian's rows: control points in C order, then the 3 array axes
    predicted = np.tensordot(np.moveaxis(d, 0, -1).ravel(), jac.astype(np.float64), 1)
    r = np.corrcoef(actual.ravel(), predicted.ravel())[0, 1]
    assert r > 0.9, r
    assert 0.75 < np.linalg.norm(predicted) / np.linalg.norm(actual) < 1.25


def _observed(physics, model, r, z, spec):
    """The library's chain (12-bit codes, practically no noise) of the baseline with muscle changes ``r``
    and mode coefficients ``z`` (mm)."""
    water, bone = model.paths(r, z)
    quiet = replace(spec, acquisition={**spec.acquisition, "noise": 1e-6})
    return resimulate(replace(physics, water=water, bone=bone), None, quiet, 0).astype(np.float64)


def test_fit_recovers_known_changes(case):
    """Known relative changes (-25 .. +10 %) of the 10 muscles, a fresh acquisition with vendor processing:
    recovered to < 1 point without a deformation; with a 1 mm deformation drawn from the modes' span a fit
    without modes is off by more than 1 point somewhere, one with the modes still recovers them (< 1.5 points)."""
    _, _, camera, _, physics, _, model = case
    rng = np.random.default_rng(11)
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 78.0, "noise": 0.003, "scatter": 0.25,
                                                        "contrast": 1.1, "sid_mm": camera.sid_mm},
                          processing={"unsharp_amount": 0.8, "unsharp_sigma_mm": 10.0, "lut_strength": 3.0})
    r = rng.uniform(-0.25, 0.10, len(physics.muscles))
    lin = ff.linearise(model, spec, len(model.modes))
    plain = ff.fit_followup(model, _observed(physics, model, r, np.zeros(0), spec), spec, lin, 0.0, 1, 0.3, 30)
    assert np.abs(plain.change - r).max() < 0.01, plain.change - r
    z = rng.normal(0.0, 1.0, len(model.modes))
    codes = _observed(physics, model, r, z, spec)
    blind = ff.fit_followup(model, codes, spec, lin, 0.0, 1, 0.3, 30)
    assert np.abs(blind.change - r).max() > 0.01
    fitted = ff.fit_followup(model, codes, spec, lin, 1.0, 1, 0.3, 30)
    assert np.abs(fitted.change - r).max() < 0.015, fitted.change - r
    assert np.all(fitted.sd_change > 0)


def test_fit_with_the_acquisition_unknown(case):
    """The acquisition left to the fit (prior of the specificity preset; collimation read off the image):
    a known change under an acquisition far from the prior's mean is still recovered to < 1.5 points, and
    kVp, gamma and the LUT's strength are found (within 3 kV, 0.05, 0.5)."""
    _, _, camera, _, physics, _, model = case
    rng = np.random.default_rng(12)
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 72.0, "noise": 0.003, "scatter": 0.15,
                                                        "contrast": 0.9, "sid_mm": camera.sid_mm,
                                                        "collimation_fraction": [0.05, 0.0, 0.0, 0.03]},
                          processing={"lut_strength": 5.0})
    r = rng.uniform(-0.25, 0.10, len(physics.muscles))
    codes = _observed(physics, model, r, np.zeros(0), spec)
    res, found = ff.fit_unknown_acquisition(model, codes, co.SubjectSpec(0, 0, acquisition={"sid_mm": camera.sid_mm}),
                                            co.preset_ranges("specificity"), 0.0, 1, 0.3)
    assert np.abs(res.change - r).max() < 0.015, res.change - r
    assert abs(found.acquisition["energy_kvp"] - 72.0) < 3.0
    assert abs(found.acquisition["contrast"] - 0.9) < 0.05
    assert abs(found.processing["lut_strength"] - 5.0) < 0.5
    assert found.acquisition["collimation_fraction"][0] > 0.03 and found.acquisition["collimation_fraction"][1] == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_fit_whose_parameters_turn_non_finite_says_so(case):
    """A Gauss-Newton step that becomes non-finite stops the fit with :class:`FitDiverged` (the reader turns
    it into a one-line error), not with an error about a simulation setting made from its numbers."""
    _, _, camera, _, physics, _, model = case
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 78.0, "noise": 0.003, "scatter": 0.25,
                                                        "contrast": 1.1, "sid_mm": camera.sid_mm})
    lin = ff.linearise(model, spec, 0)
    codes = _observed(physics, model, np.zeros(len(physics.muscles)), np.zeros(0), spec)
    codes[codes.shape[0] // 2, codes.shape[1] // 2] = np.inf
    with pytest.raises(ff.FitDiverged, match="iteration 1"):
        ff.fit_followup(model, codes, spec, lin, 0.0, 1, 0.3, 5)


def test_a_nuisance_in_the_model_is_fitted_in_every_stage(case):
    """A nuisance the image holds (here a broad water-path change, like a layer of fat: 0.3 g/cm^2 at its
    peak per unit) biases a fit that does not model it by more than 2 points somewhere; added to the model
    (``with_nuisance``, prior SD 1) it is fitted with the muscles and the unknown acquisition, in the first
    stage and with the modes, and the changes are recovered to < 1.5 points."""
    _, _, camera, _, physics, _, model = case
    rows, cols = physics.water.shape
    y, x = np.mgrid[:rows, :cols]
    layer = 0.3 * np.exp(-(((y - rows / 2) / (0.4 * rows)) ** 2 + ((x - cols / 2) / (0.5 * cols)) ** 2))
    nuisance = np.stack([layer, np.zeros_like(layer)])[None]
    with_layer = model.with_nuisance(nuisance, np.array([1.0]), ("fat layer",))
    assert with_layer.n_nuisance == 1 and model.n_nuisance == 0
    rng = np.random.default_rng(13)
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 80.0, "noise": 0.003, "scatter": 0.2,
                                                        "contrast": 1.0, "sid_mm": camera.sid_mm})
    r = rng.uniform(-0.25, 0.10, len(physics.muscles))
    z = rng.normal(0.0, 1.0, len(model.modes))
    water, bone = with_layer.paths(r, z, np.array([1.5]))
    quiet = replace(spec, acquisition={**spec.acquisition, "noise": 1e-6})
    codes = resimulate(replace(physics, water=water, bone=bone), None, quiet, 0).astype(np.float64)
    blind = co.SubjectSpec(0, 0, acquisition={"sid_mm": camera.sid_mm})
    ranges = co.preset_ranges("specificity")
    unmodelled, _ = ff.fit_unknown_acquisition(model, codes, blind, ranges, 1.0, 1, 0.3)
    assert np.abs(unmodelled.change - r).max() > 0.02, unmodelled.change - r
    first, _ = ff.fit_unknown_acquisition(with_layer, codes, blind, ranges, 0.0, 1, 0.3)
    assert len(first.nuisance) == 1 and len(first.theta) == len(ff.ACQUISITION)
    res, _ = ff.fit_unknown_acquisition(with_layer, codes, blind, ranges, 1.0, 1, 0.3, start=first)
    assert np.abs(res.change - r).max() < 0.015, res.change - r
    assert abs(res.nuisance[0] - 1.5) < 0.15, res.nuisance


def _fat_changed(case, change_mm: float, r: np.ndarray, spec) -> np.ndarray:
    """Codes (12 bit, practically no noise) of the baseline CT with its subcutaneous fat changed by the
    cohort's own function (``change_mm``) and the muscles' relative changes ``r`` (their water-path patterns)."""
    ct, labels, camera, pose, physics, _, model = case
    hu = ct.array.astype(np.float32).copy()
    assert co.subcutaneous_fat(hu, labels.label_array().astype(np.int32), change_mm, ct.spacing,
                               np.random.default_rng(1)) > 0
    paths = material_paths(ct.with_array(hu), camera, pose, co.acquisition_settings(physics.spec, camera))
    water = paths["water"].double() + torch.from_numpy(np.tensordot(r, model.patterns, 1))
    quiet = replace(spec, acquisition={**spec.acquisition, "noise": 1e-6})
    return resimulate(replace(physics, water=water, bone=paths["bone"].double()), None, quiet, 0).astype(np.float64)


@pytest.mark.parametrize("change_mm", [8.0, -5.0])
def test_the_fat_bands_read_a_follow_up_whose_fat_changed(case, change_mm):
    """The subcutaneous fat made thicker (8 mm) or thinner (5 mm) by the cohort's function, muscles changed,
    acquisition unknown: a fit without the fat term is off by more than 20 points somewhere; with
    :func:`fat_bands` (prior of U(-9, 9) mm) it reads every muscle within 3 points, and the bands it fills
    are on the side of the change (thicker / thinner)."""
    ct, labels, camera, pose, physics, _, model = case
    edges = ff.fat_edges(9.0)
    bands = ff.fat_bands(ct, labels, camera, pose, physics.spec, edges)
    assert bands.shape == (2 * len(edges), 2, camera.rows, camera.cols) and np.all(bands[:, 0] >= -1e-6)
    fat = model.with_nuisance(bands, ff.fat_band_sd(edges, 9.0), ff.fat_band_names(edges))
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 80.0, "noise": 0.003, "scatter": 0.2,
                                                        "contrast": 1.0, "sid_mm": camera.sid_mm})
    r = np.random.default_rng(14).uniform(-0.25, 0.10, len(physics.muscles))
    codes = _fat_changed(case, change_mm, r, spec)
    blind = co.SubjectSpec(0, 0, acquisition={"sid_mm": camera.sid_mm})
    ranges = co.preset_ranges("specificity")
    without, _ = ff.fit_unknown_acquisition(model, codes, blind, ranges, 0.0, 2, 2.0, step_control=True)
    assert np.abs(without.change - r).max() > 0.2, without.change - r
    res, _ = ff.fit_unknown_acquisition(fat, codes, blind, ranges, 0.0, 2, 2.0, step_control=True)
    assert np.abs(res.change - r).max() < 0.03, res.change - r
    thicker, thinner = res.nuisance[:len(edges)].sum(), res.nuisance[len(edges):].sum()
    if change_mm > 0:
        assert thicker > 0.5 and abs(thinner) < 0.2, res.nuisance
    else:
        assert thinner < -0.5 and abs(thicker) < 0.2, res.nuisance


def test_step_control_keeps_only_steps_that_lower_the_cost(case):
    """A follow-up the model cannot make (fat 8 mm thicker, unmodelled): the plain chord steps end above the
    cost they started from or with a muscle below -100 %; with step control every step lowers the MAP
    cost, so the fit ends below where it started, and no relative change is below -1."""
    _, _, camera, _, physics, _, model = case
    spec = co.SubjectSpec(index=0, seed=0, acquisition={"energy_kvp": 80.0, "noise": 0.003, "scatter": 0.2,
                                                        "contrast": 1.0, "sid_mm": camera.sid_mm})
    r = np.random.default_rng(14).uniform(-0.25, 0.10, len(physics.muscles))
    codes = _fat_changed(case, 8.0, r, spec)
    lin = ff.linearise(model, spec, 0)
    start = ff.fit_followup(model, codes, spec, lin, 0.0, 2, 2.0, 0, step_control=True)
    plain = ff.fit_followup(model, codes, spec, lin, 0.0, 2, 2.0, 15)
    assert plain.cost > start.cost or plain.change.min() < -1.0, (plain.cost, start.cost, plain.change)
    controlled = ff.fit_followup(model, codes, spec, lin, 0.0, 2, 2.0, 15, step_control=True)
    assert controlled.cost < start.cost and controlled.iterations >= 1
    assert controlled.change.min() >= -1.0
