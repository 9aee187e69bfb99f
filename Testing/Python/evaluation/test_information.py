"""The linear-Gaussian information bound on synthetic cases with known answers."""

import numpy as np
import pytest

from MSKdeXLib.evaluation.information import asymmetry_gradient, attainable_pcc, posterior_covariance


def test_one_parameter_matches_the_closed_form():
    # y = j * theta + e over N pixels: posterior precision = |j|^2 / s2 + 1 / v
    rng = np.random.default_rng(0)
    j = rng.normal(size=(1, 50))
    s2, v = 4.0, 0.5
    snr = float((j @ j.T)[0, 0]) / s2 * v
    pcc = attainable_pcc(j, np.full(50, s2), [v], [[1.0]])
    assert pcc[0] == pytest.approx(np.sqrt(snr / (1.0 + snr)), rel=1e-9)


def test_bound_matches_the_bayes_estimator_in_simulation():
    # two parameters with overlapping footprints: the posterior-mean estimator's PCC over
    # simulated subjects approaches the bound
    rng = np.random.default_rng(1)
    n_pix, prior = 40, np.array([1.0, 2.0])
    J = np.stack([np.exp(-((np.arange(n_pix) - c) / 6.0) ** 2) for c in (15, 22)])
    var = np.full(n_pix, 0.3)
    cov = posterior_covariance(J, var, prior)
    theta = rng.normal(size=(20000, 2)) * np.sqrt(prior)
    y = theta @ J + rng.normal(size=(20000, n_pix)) * np.sqrt(var)
    est = (y / var) @ J.T @ cov                                 # posterior mean (zero prior mean)
    for k in range(2):
        c = np.eye(2)[k]
        assert np.corrcoef(est[:, k], theta[:, k])[0, 1] == pytest.approx(attainable_pcc(J, var, prior, [c])[0], abs=0.01)


def test_a_nuisance_that_mimics_the_signal_removes_the_information():
    # the signal's footprint is also made by an unknown nuisance of large variance
    j = np.r_[np.ones(10), np.zeros(10)][None]
    var = np.full(20, 1.0)
    alone = attainable_pcc(j, var, [1.0], [[1.0]])[0]
    samples = np.outer(np.random.default_rng(2).normal(size=200) * 100.0, j[0])
    confounded = attainable_pcc(j, var, [1.0], [[1.0]], nuisance_samples=samples)[0]
    assert alone > 0.95 and confounded < 0.2
    # a nuisance elsewhere in the image costs nothing
    other = np.outer(np.random.default_rng(3).normal(size=200) * 100.0, 1.0 - j[0])
    assert attainable_pcc(j, var, [1.0], [[1.0]], nuisance_samples=other)[0] == pytest.approx(alone, abs=1e-6)


def test_asymmetry_gradient_is_the_derivative():
    L, R, h = 300.0, 200.0, 1e-4
    ai = lambda a, b: (a - b) / (a + b)  # noqa: E731
    dl, dr = asymmetry_gradient(L, R)
    assert dl == pytest.approx((ai(L + h, R) - ai(L - h, R)) / (2 * h), rel=1e-6)
    assert dr == pytest.approx((ai(L, R + h) - ai(L, R - h)) / (2 * h), rel=1e-6)


def test_bad_shapes_and_variances_are_refused():
    with pytest.raises(ValueError, match="jacobian"):
        posterior_covariance(np.ones((2, 5)), np.ones(4), np.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        posterior_covariance(np.ones((1, 3)), np.zeros(3), np.ones(1))
