"""Training-set builder: exact area resampling, the documented format, cache, shards, real cases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from MSKdeXLib.errors import UserError
from MSKdeXLib.learning.dataset import builder as ds


def test_area_resampling_keeps_sums():
    rng = np.random.default_rng(0)
    img = rng.random((3, 37, 41))
    # output grid larger than the input: everything lands inside, sums exact
    out = ds.resample_sum(img, (1.3, 1.7), (17.2, 21.9), (40, 48), (2.1, 1.9))
    np.testing.assert_allclose(out.sum(axis=(1, 2)), img.sum(axis=(1, 2)), rtol=1e-12)
    # same grid, same centre: identity
    same = ds.resample_sum(img, (1.5, 1.5), (18.0, 20.0), (37, 41), (1.5, 1.5))
    np.testing.assert_allclose(same, img, atol=1e-12)
    # integer down-sampling by 2 equals 2x2 binning
    sq = rng.random((8, 8))
    np.testing.assert_allclose(ds.resample_sum(sq, (1, 1), (3.5, 3.5), (4, 4), (2, 2)),
                               sq.reshape(4, 2, 4, 2).sum(axis=(1, 3)), atol=1e-12)
    # a constant image stays constant where covered (mean resampling)
    const = ds.resample_mean(np.full((20, 20), 3.0), (1.0, 1.0), (9.5, 9.5), (7, 7), (2.5, 2.5))
    np.testing.assert_allclose(const, 3.0)
    # a channel cropped by the output grid loses exactly the part outside
    one = np.zeros((10, 10))
    one[0, 0] = 1.0
    assert ds.resample_sum(one, (1, 1), (4.5, 4.5), (4, 4), (1, 1)).sum() == 0.0


@pytest.fixture(scope="module")
def cohort_dir(pelvis_case, tmp_path_factory):
    from MSKdeXLib.learning.cohort import CohortConfig, build_cohort

    root = tmp_path_factory.mktemp("ds")
    build_cohort(CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), seed=3, rows=48,
                              cols=48), 3, root / "cohort")
    return root / "cohort"


def _settings(cohort_dir, **kw):
    """A record grid (40 x 36) coarser than the subjects' detector: it still covers the anatomy."""
    cam = json.loads((cohort_dir / "subject-0000" / "subject.json").read_text())["camera"]
    s = cam["spacing_row_mm"]
    return ds.DatasetSettings(**{"image_size": (40, 36), "pixel_spacing_mm": (1.25 * s, 1.4 * s),
                                 "kinds": ("muscle", "bone"), **kw})


def test_build_dataset_format_and_truth(cohort_dir, tmp_path):
    from MSKdeXLib.learning.dataset.records import load_dataset_info, load_record

    out = tmp_path / "data"
    summary = ds.build_dataset([cohort_dir], out, _settings(cohort_dir))
    assert summary["built"] == 3 and summary["cached"] == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["format"] == "mskdex-dataset/1" and doc["image_size"] == [40, 36]
    assert doc["normalisation"]["pixel_spacing_mm"] == doc["pixel_spacing_mm"]
    kinds = {c["kind"] for c in doc["channels"]}
    assert kinds == {"muscle", "bone"}
    assert all(c["quantity"] == "mass_g" for c in doc["channels"] if c["kind"] == "bone")
    info = load_dataset_info(out)  # the trainer's reader accepts it
    assert len(info.records) == 3 and {r["split"] for r in info.records} <= {"train", "val", "test"}
    for rec in info.records:
        t = load_record(info, rec)
        assert t["paired"].all() and rec["kind"] == "virtual"
        assert abs(float(t["xray"].mean())) < 1e-4 and float(t["xray"].std()) == pytest.approx(1.0, rel=1e-3)
        metrics = {r["name"]: r for r in json.loads(
            (cohort_dir / rec["source"].split("/")[-1] / "metrics.json").read_text())["structures"]}
        truth = np.array([metrics[c["structure"]][c["quantity"]] for c in doc["channels"]])
        np.testing.assert_allclose(t["truth"].numpy(), truth)
        # resampled channels keep their sums (the anatomy lies inside the record's grid)
        np.testing.assert_allclose(t["targets"].double().sum(dim=(1, 2)).numpy(), truth, rtol=0.005)


def test_cache_and_shards(cohort_dir, tmp_path):
    settings = _settings(cohort_dir)
    full = tmp_path / "full"
    ds.build_dataset([cohort_dir], full, settings)
    again = ds.build_dataset([cohort_dir], full, settings)
    assert again["built"] == 0 and again["cached"] == 3
    # a changed input rebuilds only its record
    copy = tmp_path / "copy"
    shutil.copytree(cohort_dir, copy)
    ds.build_dataset([copy], tmp_path / "c", settings)
    m = json.loads((copy / "subject-0001" / "metrics.json").read_text())
    m["structures"][0]["mass_g"] += 1.0
    (copy / "subject-0001" / "metrics.json").write_text(json.dumps(m))
    redo = ds.build_dataset([copy], tmp_path / "c", settings)
    assert redo["built"] == 1 and redo["cached"] == 2
    # other settings in the same folder: refused without force
    from MSKdeXLib.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        ds.build_dataset([cohort_dir], full, _settings(cohort_dir, image_size=(32, 32)))
    # shards partition the records; the last merge lists them all
    sharded = tmp_path / "sharded"
    ids = []
    for i in range(2):
        s = ds.build_dataset([cohort_dir], sharded, settings, shard=(i, 2))
        ids.append({p.stem for p in (sharded / "records").glob("*.json")})
        assert s["built"] == [2, 1][i]
    assert ids[0] < ids[1] and len(ids[1]) == 3
    doc = ds.merge(sharded)
    assert sorted(r["id"] for r in doc["records"]) == sorted(
        r["id"] for r in json.loads((full / "dataset.json").read_text())["records"])


def test_real_case_bones_paired_muscles_unpaired(pelvis, pelvis_case, tmp_path):
    """A real case as `mskdex register` leaves it: bones of each body at its registered pose
    (paired unless doubtful), muscles at the CT's default view (unpaired)."""
    from MSKdeXLib.learning.cohort import render_channels
    from MSKdeXLib.learning.dataset.records import load_dataset_info, load_record
    from MSKdeXLib.anatomy.density import DensityModel
    from MSKdeXLib.projection.geometry import Camera, perturbed_pose
    from MSKdeXLib.projection.rendering import default_view, isocentre_of
    from MSKdeXLib.projection.simulate import SimulationSettings, simulate_radiograph, write_dicom_dx

    ct, labels = pelvis
    case = tmp_path / "case01"
    case.mkdir()
    cam = Camera(48, 48, 9.0, 9.0)
    base = default_view(ct, labels, cam)
    pose = perturbed_pose(base, (0, 0, 4.0), (6.0, 0, 0), isocentre_of(ct, labels))
    femur_pose = perturbed_pose(pose, (3.0, 0, 0), (0, 0, 0), isocentre_of(ct, labels))
    hip_pose = perturbed_pose(pose, (0, 2.0, 0), (0, 3.0, 0), isocentre_of(ct, labels))
    write_dicom_dx(case / "xray.dcm", simulate_radiograph(ct, cam, pose, SimulationSettings(), 1, labels))
    reg = {"format": "mskdex-registration/1", "xray": "xray.dcm", "ct": str(pelvis_case.ct),
           "labels": str(pelvis_case.labels), "geometry": cam.to_dict(),
           "bodies": [{"name": "pelvis", "structures": ["hip_left", "hip_right", "sacrum"],
                       "ct_to_camera": pose.tolist(), "doubtful": False},
                      {"name": "femur_left", "structures": ["femur_left"], "ct_to_camera": femur_pose.tolist(),
                       "doubtful": True},
                      # a part of the pelvis registered after it: the last body holding a bone places it
                      {"name": "hip_left_part", "structures": ["hip_left"], "ct_to_camera": hip_pose.tolist(),
                       "doubtful": False}]}
    (case / "registration.json").write_text(json.dumps(reg))
    settings = ds.DatasetSettings(image_size=(48, 48), pixel_spacing_mm=(9.0, 9.0),
                                  structures=["hip_left", "femur_left", "gluteus_medius_left"])
    with pytest.raises(UserError, match=r"1 case\(s\) with a doubtful registration: .*\(femur_left\).*--include-doubtful"):
        ds.build_dataset([case], tmp_path / "real", settings)  # doubtful is refused by default (issue 15)
    assert not (tmp_path / "real").exists()
    ds.build_dataset([case], tmp_path / "real", settings, include_doubtful=True)
    info = load_dataset_info(tmp_path / "real")
    rec = info.records[0]
    assert rec["kind"] == "real"
    assert rec["registration"] == {"status": "doubtful", "doubtful_bodies": ["femur_left"]}
    t = load_record(info, rec)
    names = [f"{c['structure']}:{c['quantity']}" for c in info.channels]
    assert dict(zip(names, t["paired"].tolist())) == {
        "femur_left:mass_g": False, "hip_left:mass_g": True,
        "gluteus_medius_left:mass_g": False, "gluteus_medius_left:volume_cm3": False}
    np.testing.assert_allclose(t["targets"].double().sum(dim=(1, 2)).numpy(), t["truth"].numpy(), rtol=0.005)
    hip, femur, muscle = (labels.resolve(n) for n in ("hip_left", "femur_left", "gluteus_medius_left"))
    at_pose = render_channels(ct, labels, [hip, muscle], cam, pose, DensityModel())["mass"]
    at_base = render_channels(ct, labels, [muscle], cam, base, DensityModel())["mass"]
    at_femur = render_channels(ct, labels, [femur], cam, femur_pose, DensityModel())["mass"]
    at_hip_part = render_channels(ct, labels, [hip], cam, hip_pose, DensityModel())["mass"]
    np.testing.assert_allclose(t["targets"][names.index("hip_left:mass_g")].numpy(), at_hip_part[0], rtol=1e-4,
                               atol=1e-6)
    assert np.abs(at_hip_part[0] - at_pose[0]).sum() > 0.1 * at_pose[0].sum()
    np.testing.assert_allclose(t["targets"][names.index("femur_left:mass_g")].numpy(), at_femur[0], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(t["targets"][names.index("gluteus_medius_left:mass_g")].numpy(), at_base[0],
                               rtol=1e-4, atol=1e-6)
    assert np.abs(at_pose[1] - at_base[0]).sum() > 0.1 * at_base[0].sum()
