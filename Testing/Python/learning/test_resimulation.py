"""Re-simulation in the projection domain: exact reproduction of a cohort radiograph, the muscle-change
model against a real change of the CT, and re-simulated training samples (targets scaled alike)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MSKdeXLib.io.radiographs import load_radiograph
from MSKdeXLib.learning import cohort as co
from MSKdeXLib.learning import resimulation as rs
from MSKdeXLib.projection.simulate import SimulationSettings, material_paths


@pytest.fixture(scope="module")
def spec_cohort(pelvis_case, tmp_path_factory):
    """Two specificity-preset subjects (vendor processing, own SID, collimation) at 6 mm, 40 x 40 px."""
    root = tmp_path_factory.mktemp("resim")
    config = co.CohortConfig(ct=str(pelvis_case.ct), labels=str(pelvis_case.labels), seed=14, rows=40, cols=40,
                             voxel_mm=6.0, physics=True, ranges=co.preset_ranges("specificity").to_dict())
    co.build_cohort(config, 2, root / "cohort")
    return root, config


def test_physics_only_when_asked(spec_cohort, pelvis_case, tmp_path):
    root, config = spec_cohort
    assert json.loads((root / "cohort" / "subject-0000" / "subject.json").read_text())["files"]["physics"]
    plain = co.CohortConfig(**{**config.__dict__, "physics": False, "camera": None})
    co.build_cohort(plain, 1, tmp_path / "plain")
    folder = tmp_path / "plain" / "subject-0000"
    assert not (folder / "physics.safetensors").exists()
    with pytest.raises(Exception, match="physics.safetensors"):
        rs.load_physics(folder)


def test_no_change_reproduces_the_stored_radiograph(spec_cohort):
    root, _ = spec_cohort
    for name in ("subject-0000", "subject-0001"):
        folder = root / "cohort" / name
        phys = rs.load_physics(folder)
        stored = load_radiograph(folder / "xray.dcm").pixels
        np.testing.assert_array_equal(rs.resimulate(phys), stored)
        # a change, another acquisition or another noise seed each changes the image
        assert not np.array_equal(rs.resimulate(phys, noise_seed=phys.noise_seed + 1), stored)
        changes, spec = rs.draw(np.random.default_rng(0), phys)
        assert changes.change and spec.acquisition != phys.spec.acquisition
        assert not np.array_equal(rs.resimulate(phys, changes), stored)


def test_water_change_matches_a_real_change_of_the_ct(spec_cohort):
    """Fat infiltration / atrophy applied to the realised CT: the water-path change it causes agrees
    with the projection-domain model (pixel pattern r > 0.95, total within 10 %)."""
    root, config = spec_cohort
    folder = root / "cohort" / "subject-0000"
    phys = rs.load_physics(folder)
    doc = json.loads((folder / "subject.json").read_text())
    spec = co.sample_subject(config.seed, 0, co.cohort_muscles(config), config.cohort_ranges())
    assert spec.to_dict() == doc["spec"]
    sub = co.realise_subject(config, spec)
    settings = SimulationSettings()
    base = material_paths(sub.ct, sub.camera, sub.pose, settings)["water"]
    np.testing.assert_allclose(base.numpy(), phys.water.numpy(), rtol=1e-6, atol=1e-9)
    muscle = "gluteus_medius_left"
    label = sub.labels.table.by_name(muscle).label
    for mechanism, fraction in (("infiltration", 0.3), ("atrophy", -0.2)):
        real = np.zeros(base.shape)
        for seed in range(12):  # the model is the expected change over the random voxel patterns
            hu = sub.ct.array.astype(np.float32, copy=True)
            lab = sub.labels.label_array().astype(np.int32)
            rng = np.random.default_rng(seed)
            if mechanism == "atrophy":
                co.atrophy(hu, lab, label, -fraction, sub.ct.spacing, rng)
                changes = rs.MuscleDraw(change={muscle: fraction})
            else:
                co.fat_infiltration(hu, lab, label, fraction, rng)
                changes = rs.MuscleDraw(infiltration={muscle: fraction})
            real += (material_paths(sub.ct.with_array(hu), sub.camera, sub.pose, settings)["water"] - base).numpy() / 12
        model = rs.water_change(phys, changes).numpy()
        assert np.corrcoef(real.ravel(), model.ravel())[0, 1] > 0.9, mechanism
        assert abs(model.sum() / real.sum() - 1.0) < 0.1, (mechanism, model.sum(), real.sum())


def test_resimulated_samples_scale_targets_with_the_draw(spec_cohort, tmp_path):
    from MSKdeXLib.learning.dataset.builder import DatasetSettings, build_dataset
    from MSKdeXLib.learning.dataset.records import RecordDataset, load_dataset_info

    root, _ = spec_cohort
    build_dataset([root / "cohort"], tmp_path / "ds", DatasetSettings(image_size=(16, 16), split="train",
                                                                     pixel_spacing_mm=(6.0, 6.0)))
    info = load_dataset_info(tmp_path / "ds")
    plain = RecordDataset(info, "train")
    resim = RecordDataset(info, "train", resimulate_cfg={"probability": 1.0})
    a, b = plain[0], resim[0]
    assert not torch.equal(a["xray"], b["xray"])
    ratio = (b["truth"] / a["truth"]).numpy()
    kinds = [c["kind"] for c in info.channels]
    bone = np.array([k == "bone" for k in kinds])
    np.testing.assert_allclose(ratio[bone], 1.0)
    assert np.ptp(ratio[~bone]) > 0.05                      # muscles change, each on its own
    sums = (b["targets"].double().sum(dim=(1, 2)) / a["targets"].double().sum(dim=(1, 2))).numpy()
    ok = a["targets"].double().sum(dim=(1, 2)).numpy() > 0
    np.testing.assert_allclose(sums[ok], ratio[ok], rtol=1e-5)
    # reproducible per (seed, epoch, index); another epoch draws again
    assert torch.equal(resim[0]["xray"], b["xray"])
    resim.set_epoch(1)
    assert not torch.equal(resim[0]["xray"], b["xray"])
    with pytest.raises(Exception, match="probability"):
        RecordDataset(info, "train", resimulate_cfg={"probability": 2.0})


def test_training_with_resimulation_runs_and_is_recorded(spec_cohort, tmp_path):
    """A tiny training run with data.resimulate on: it trains, the option is in the model's config,
    and a bad option stops with one line."""
    from MSKdeXLib.errors import UserError
    from MSKdeXLib.learning.dataset.builder import DatasetSettings, build_dataset
    from MSKdeXLib.learning.training import train

    root, _ = spec_cohort
    build_dataset([root / "cohort"], tmp_path / "ds", DatasetSettings(image_size=(16, 16), split="train",
                                                                     pixel_spacing_mm=(6.0, 6.0)))
    tiny = {"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
            "discriminator": {"width": 8, "n_layers": 2, "n_scales": 1},
            "data": {"batch_size": 2, "resimulate": {"probability": 1.0}}, "steps": 2, "log_every": 1,
            "checkpoint_every": 2, "val_every": 2}
    train(tiny, tmp_path / "ds", tmp_path / "m", device="cpu")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["resimulate"]["probability"] == 1.0
    with pytest.raises(UserError, match="resimulate"):
        train({**tiny, "data": {"resimulate": {"probability": 1.5}}}, tmp_path / "ds", tmp_path / "m2", device="cpu")
    with pytest.raises(UserError, match="unknown key"):
        train({**tiny, "data": {"resimulate": {"probabilty": 1.0}}}, tmp_path / "ds", tmp_path / "m3", device="cpu")


def test_corrupt_physics_is_one_line(spec_cohort, tmp_path):
    import shutil

    from MSKdeXLib.errors import UserError

    root, _ = spec_cohort
    (tmp_path / "c").mkdir()
    shutil.copy(root / "cohort" / "cohort.json", tmp_path / "c" / "cohort.json")
    folder = shutil.copytree(root / "cohort" / "subject-0000", tmp_path / "c" / "subject-0000")
    data = (folder / "physics.safetensors").read_bytes()
    (folder / "physics.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="physics"):
        rs.load_physics(folder)


def test_cli_cohort_physics_flag(pelvis_case, tmp_path):
    from MSKdeXLib.cli import main

    out = tmp_path / "c"
    assert main(["cohort", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), "--n", "1",
                 "--out", str(out), "--detector", "24", "24", "--voxel-mm", "8", "--physics"]) == 0
    phys = rs.load_physics(out / "subject-0000")
    assert phys.water.shape == (24, 24) and set(phys.atrophy_coefficient) == set(phys.muscles)
    assert all(v > 0 for v in phys.atrophy_coefficient.values())
