"""Baselines with known answers: constant, global-scalar oracle, ridge, template."""

from __future__ import annotations

import numpy as np
import pytest

from MSKdeXLib.evaluation import baselines as bl
from MSKdeXLib.evaluation.specificity import asymmetry_index
from MSKdeXLib.evaluation.statistics import pearson


def test_constant_is_the_training_mean():
    y = np.array([[1.0, 10.0], [3.0, 30.0]])
    np.testing.assert_allclose(bl.ConstantBaseline().fit(y).predict(3), [[2.0, 20.0]] * 3)


def test_oracle_exact_when_muscles_are_linear_in_the_total():
    rng = np.random.default_rng(0)
    total = rng.uniform(1000, 2000, 50)
    y = np.column_stack([5 + 0.2 * total, -3 + 0.5 * total, 0.3 * total])
    o = bl.GlobalOracle().fit(total[:30], y[:30])
    np.testing.assert_allclose(o.predict(total[30:]), y[30:], rtol=1e-9)


def test_oracle_knows_no_asymmetry():
    """Left and right change independently of the body-wide factor: the oracle's asymmetry
    index does not follow the truth (PCC about 0), although each muscle's PCC is high."""
    rng = np.random.default_rng(1)
    n = 4000
    body = rng.uniform(0.7, 1.2, n)
    left, right = 200 * body * rng.uniform(0.8, 1.2, n), 200 * body * rng.uniform(0.8, 1.2, n)
    other = 500 * body * rng.uniform(0.9, 1.1, n)
    y = np.column_stack([left, right, other])
    total = y.sum(axis=1)
    o = bl.GlobalOracle().fit(total[:2000], y[:2000])
    p = o.predict(total[2000:])
    assert pearson(p[:, 0], y[2000:, 0]) > 0.6
    assert abs(pearson(asymmetry_index(p[:, 0], p[:, 1]), asymmetry_index(left[2000:], right[2000:]))) < 0.06


def test_ridge_recovers_a_linear_map_and_picks_its_penalty_on_validation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 30))
    w = rng.normal(size=(30, 2))
    y = 100 + x @ w
    model, errors = bl.RidgeBaseline.select(x[:80], y[:80], x[80:100], y[80:100])
    assert model.alpha == min(errors)  # the least penalty fits best: the map is exact
    np.testing.assert_allclose(model.predict(x[100:]), y[100:], rtol=0.01)
    # targets unrelated to the image: the strongest penalty (predict the mean) wins
    noise = 100 + rng.normal(size=(120, 2))
    model, errors = bl.RidgeBaseline.select(x[:80], noise[:80], x[80:100], noise[80:100])
    assert model.alpha == max(errors)


def test_template_scaled_by_the_total():
    rng = np.random.default_rng(3)
    template = rng.random((2, 4, 4))
    k = rng.uniform(0.8, 1.2, 10)
    images = template[None] * k[:, None, None, None]
    total = 1000 * k
    t = bl.TemplateBaseline().fit(images, total)
    np.testing.assert_allclose(t.images, template * k.mean())
    np.testing.assert_allclose(t.predict(total), images.sum(axis=(2, 3)), rtol=1e-9)
