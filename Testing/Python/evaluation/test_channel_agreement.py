"""Decomposition agreement: predicted channel images against the true projections of virtual
subjects (real pelvis CT cohort), on the model's grid."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from MSKdeXLib.evaluation.channel_agreement import channel_correlation, heldout_agreement

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_channel_correlation_is_pearson_per_channel():
    rng = np.random.default_rng(0)
    t = rng.random((3, 8, 9))
    np.testing.assert_allclose(channel_correlation(t, t), 1.0)
    np.testing.assert_allclose(channel_correlation(3.0 * t + 2.0, t), 1.0)  # scale and offset do not count
    np.testing.assert_allclose(channel_correlation(-t, t), -1.0)
    p = rng.random((3, 8, 9))
    want = [np.corrcoef(p[c].ravel(), t[c].ravel())[0, 1] for c in range(3)]
    np.testing.assert_allclose(channel_correlation(p, t), want, rtol=1e-12)
    flat = t.copy()
    flat[1] = 5.0
    r = channel_correlation(flat, t)
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2]]).all()
    with pytest.raises(ValueError):
        channel_correlation(t[:, :4], t)


@pytest.fixture(scope="module")
def subjects(pelvis_case, tmp_path_factory):
    """Two virtual subjects of the real pelvis CT and their training-set records (24 x 24)."""
    from MSKdeXLib.learning.cohort import CohortConfig, build_cohort
    from MSKdeXLib.learning.dataset.builder import DatasetSettings, build_dataset

    root = tmp_path_factory.mktemp("agree")
    build_cohort(CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), seed=5, rows=48, cols=48,
                              voxel_mm=6.0), 2, root / "cohort")
    folders = sorted(p for p in (root / "cohort").iterdir() if p.is_dir())
    cam = json.loads((folders[0] / "subject.json").read_text())["camera"]
    spacing = (cam["spacing_row_mm"] * 2, cam["spacing_col_mm"] * 2)
    build_dataset(folders, root / "records", DatasetSettings(image_size=(24, 24), pixel_spacing_mm=spacing))
    return folders, root / "records"


def _as_estimate(name, channels, images):
    return SimpleNamespace(id=name, channels=channels, channel_images=images)


def test_true_channels_agree_perfectly_and_another_subjects_do_not(subjects):
    from MSKdeXLib.learning.dataset.records import load_dataset_info, load_record

    folders, records = subjects
    info = load_dataset_info(records)
    recs = {r["source"].split("/")[-1]: load_record(info, r) for r in info.records}
    a, b = (f.name for f in folders)
    own = heldout_agreement([_as_estimate(n, info.channels, recs[n]["targets"].numpy()) for n in (a, b)], records)
    assert own["n_subjects"] == 2 and {p["n"] for p in own["per_channel"]} == {2}
    assert all(p["mean_r"] == pytest.approx(1.0) for p in own["per_channel"])
    assert set(own["kind_mean"]) == {"muscle", "bone"}
    # subject a's channels against subject b's truth: the hand-computed correlation, below 1
    swapped = heldout_agreement([_as_estimate(b, info.channels, recs[a]["targets"].numpy())], records)
    want = channel_correlation(recs[a]["targets"].numpy(), recs[b]["targets"].numpy())
    got = {(p["structure"], p["quantity"]): p["mean_r"] for p in swapped["per_channel"]}
    for c, w in zip(info.channels, want):
        assert got[(c["structure"], c["quantity"])] == pytest.approx(w, abs=1e-9)
    assert min(want) < 0.999
    # channels pair by name, not by position: reversed channel order gives the same numbers
    rev = heldout_agreement([_as_estimate(b, info.channels[::-1], recs[a]["targets"].numpy()[::-1])], records)
    assert {(p["structure"], p["quantity"]): p["mean_r"] for p in rev["per_channel"]} == pytest.approx(got)


def test_prediction_grid_is_the_records_grid(subjects, tmp_path):
    """What makes the comparison valid: ``predict`` resamples a subject's radiograph exactly as
    the training-set builder did, so its channel images lie on the records' grid."""
    from MSKdeXLib.learning.dataset.records import load_dataset_info, load_record
    from MSKdeXLib.errors import UserError
    from MSKdeXLib.learning.inference import load_model, predict
    from MSKdeXLib.io.radiographs import load_radiograph
    from MSKdeXLib.learning.training import train

    folders, records = subjects
    tiny = {"model": {"features": [8, 16], "strides": [2], "num_res_units": 1}, "data": {"batch_size": 1,
            "val_split": "train"}, "steps": 1, "log_every": 1, "checkpoint_every": 1, "val_every": 1,
            "calibration": {"enabled": False}}
    train(tiny, records, tmp_path / "model")
    model = load_model(tmp_path / "model")
    info = load_dataset_info(records)
    for f in folders:
        est = predict(model, load_radiograph(f / "xray.dcm"), tta=0, rec_id=f.name)
        rec = next(r for r in info.records if r["source"].endswith(f.name))
        np.testing.assert_allclose(est.input_image, load_record(info, rec)["xray"].numpy()[0], atol=1e-5)
    res = heldout_agreement([est], records)
    assert res["n_subjects"] == 1 and all(-1 <= p["mean_r"] <= 1 for p in res["per_channel"])
    with pytest.raises(UserError, match="no record"):
        heldout_agreement([_as_estimate("subject-9999", info.channels, est.channel_images)], records)
