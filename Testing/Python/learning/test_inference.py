"""Inference: a tiny model trained on the real pelvis CT's projections, applied to radiographs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MSKdeXLib.cli import main
from projection_dataset import parallel_projection_dataset
from MSKdeXLib.errors import UserError
from MSKdeXLib.io.images import Radiograph
from MSKdeXLib.learning.inference import case_id_from_path, load_model, predict, write_outputs


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


CFG = {"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
       "discriminator": {"width": 8, "n_layers": 2, "n_scales": 1},
       "data": {"batch_size": 2}, "steps": 1, "log_every": 1, "checkpoint_every": 10, "val_every": 10}


@pytest.fixture(scope="module")
def model_dir(pelvis, tmp_path_factory):
    from MSKdeXLib.learning.training import train

    ct, labels = pelvis
    d = tmp_path_factory.mktemp("inf_ds")
    parallel_projection_dataset(ct, labels, d, ["hip_left", "gluteus_medius_left"], ("mass_g", "volume_cm3"),
                                n_records=3, size=32, seed=4)
    out = tmp_path_factory.mktemp("inf") / "model"
    train(CFG, d, out)
    return out


@pytest.fixture(scope="module")
def xray_256(pelvis):
    """A 256 x 256 radiograph-like image of the real pelvis CT: projected density, 1.5 mm pixels."""
    from scipy.ndimage import zoom

    ct, _ = pelvis
    rho = np.clip(1 + ct.array.astype(np.float64) / 1000, 0, None).sum(axis=1)[::-1]  # (k, i)
    img = zoom(rho, (256 / rho.shape[0], 256 / rho.shape[1]), order=1)
    sp = (ct.spacing[2] * rho.shape[0] / 256, ct.spacing[0] * rho.shape[1] / 256)
    return Radiograph(img.astype(np.float32), sp, "file", "/data/subject-0001/xray.dcm")


def test_predict_256_outputs(model_dir, xray_256, tmp_path, capsys):
    model = load_model(model_dir)
    t0 = time.perf_counter()
    est = predict(model, xray_256, tta=4, seed=1)
    seconds = time.perf_counter() - t0
    print(f"\ninference 256x256 -> {model.image_size}, 5 passes, CPU: {seconds:.3f} s")
    assert est.id == "subject-0001" and est.samples.shape == (5, 4)
    lo, hi = est.interval()
    assert np.all(lo <= est.mean + 1e-9) and np.all(est.mean <= hi + 1e-9)
    assert np.all(est.samples > 0)
    files = write_outputs(tmp_path / "p", est)
    # channel images carry the model's spacing and sum to the un-augmented estimate
    for i, c in enumerate(est.channels):
        img = sitk.ReadImage(str(files[f"{c['structure']}:{c['quantity']}"]))
        assert img.GetSpacing() == pytest.approx(model.pixel_spacing_mm[::-1])
        assert sitk.GetArrayFromImage(img).astype(np.float64).sum() == pytest.approx(est.samples[0, i], rel=1e-5)
    doc = json.loads((tmp_path / "p" / "estimates.json").read_text())
    by = {(r["structure"], r["quantity"]): r["value"] for r in doc["rows"]}
    csv_lines = (tmp_path / "p" / "estimates.csv").read_text().splitlines()
    assert csv_lines[0].startswith("id,structure,kind,mass_g") and len(csv_lines) == 3
    row = dict(zip(csv_lines[0].split(","), csv_lines[1].split(",")))
    assert float(row["mass_g"]) == pytest.approx(by[(row["structure"], "mass_g")], rel=1e-5)
    png = (tmp_path / "p" / "overlay.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # outputs are never overwritten without force
    with pytest.raises(UserError, match="--force"):
        write_outputs(tmp_path / "p", est)
    # with --force the folder ends up holding exactly this run's channels: an earlier run's channel
    # of another structure is removed, a user's note beside it is not an image and stays
    stale = tmp_path / "p" / "channels" / "adductor_longus__mass_g.nrrd"
    stale.write_bytes(b"old")
    (tmp_path / "p" / "channels" / "notes.txt").write_text("mine")
    files = write_outputs(tmp_path / "p", est, force=True)
    images = sorted(f.name for f in (tmp_path / "p" / "channels").iterdir() if f.suffix == ".nrrd")
    assert images == sorted(Path(v).name for k, v in files.items() if ":" in k)
    assert not stale.exists() and (tmp_path / "p" / "channels" / "notes.txt").exists()


def test_overlay_uses_structure_colours(model_dir, xray_256):
    from MSKdeXLib.learning.inference import overlay_rgb

    est = predict(load_model(model_dir), xray_256, tta=0)
    rgb, legend = overlay_rgb(est)
    assert rgb.shape == (*est.input_image.shape, 3) and 0 <= rgb.min() and rgb.max() <= 1
    colours = {s.name.replace("_", " "): tuple(c / 255 for c in s.color) for s in est.structures}
    assert legend and all(colours[n] == pytest.approx(c) for n, c in legend)


def test_warnings_for_unlike_inputs(model_dir, xray_256):
    model = load_model(model_dir)
    calm = predict(model, xray_256, tta=0)
    no_spacing = predict(model, Radiograph(xray_256.pixels, None), tta=0)
    assert any("no pixel spacing" in w for w in no_spacing.warnings)
    assert not any("no pixel spacing" in w for w in calm.warnings)
    noise = Radiograph(np.random.default_rng(0).exponential(size=(256, 256)).astype(np.float32) ** 3, (0.1, 0.1))
    odd = predict(model, noise, tta=0)
    assert any("far from the model" in w for w in odd.warnings)
    assert any("unlike the training data" in w for w in odd.warnings)


def test_case_ids():
    assert case_id_from_path("/a/subject-0007/xray.dcm") == "subject-0007"
    assert case_id_from_path("/a/b/case12.dcm") == "case12"
    assert case_id_from_path("/a/p7/estimates.json") == "p7"


def test_predict_cli(model_dir, tmp_path, xray_256, capsys):
    from MSKdeXLib.io.radiographs import write_dx_dicom

    dcm = tmp_path / "case9.dcm"
    try:
        write_dx_dicom(dcm, xray_256)
    except TypeError:
        pytest.skip("write_dx_dicom signature changed")
    rc = main(["predict", "--model", str(model_dir), "--xray", str(dcm), "--out", str(tmp_path / "o"),
               "--tta", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "hip_left" in out
    doc = json.loads((tmp_path / "o" / "estimates.json").read_text())
    assert doc["id"] == "case9" and doc["tta_passes"] == 3
    rc = main(["predict", "--model", str(model_dir), "--xray", str(dcm), "--out", str(tmp_path / "o")])
    assert rc == 2  # exists, no --force


def _records(info, split):
    from MSKdeXLib.learning.dataset.records import load_record

    ts = [load_record(info, r) for r in info.split(split)]
    return [t["xray"][0].numpy() for t in ts], [t["truth"].numpy() for t in ts]


def test_conformal_quantile_and_scores():
    from MSKdeXLib.learning.inference import conformal_quantile, conformal_scores, interval_scale, quantile_set

    v = np.arange(1.0, 20.0)  # 19 scores: ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(v[::-1], 0.9) == 18.0
    assert conformal_quantile(v[:5], 0.9) == float("inf")  # too few for 90 %
    s = np.array([[10.0, 100.0], [12.0, 100.0], [14.0, 100.0]])
    u = interval_scale(s, 0.01)
    assert u == pytest.approx([2.0, 1.0])  # TTA SD, else 1 % of the estimate
    assert conformal_scores(s, np.array([16.0, 97.0]), 0.01) == pytest.approx([2.0, 3.0])
    pooled = quantile_set(np.arange(20.0).reshape(10, 2), 0.9, min_per_channel=20)
    assert pooled["pooled"] and pooled["quantiles"] == [18.0, 18.0]


def test_calibrated_interval_covers_heldout_at_nominal_rate(pelvis, model_dir, tmp_path):
    """Split-conformal calibration on 40 jittered projections of the real CT, coverage measured
    on 40 other ones: near the nominal 90 %, where the raw TTA percentiles cover far less."""
    from MSKdeXLib.learning.dataset.records import load_dataset_info
    from MSKdeXLib.learning.inference import Estimates, calibrate, channel_sums

    ct, labels = pelvis
    model = load_model(model_dir)
    sets = {}
    for name, seed in (("cal", 11), ("test", 12)):
        parallel_projection_dataset(ct, labels, tmp_path / name, ["hip_left", "gluteus_medius_left"],
                                    ("mass_g", "volume_cm3"), n_records=40, size=32, seed=seed,
                                    val_records=0, jitter={"rotation_deg": 6.0, "translation": 0.08})
        sets[name] = _records(load_dataset_info(tmp_path / name), "train")
    cal = calibrate(model.generator, *sets["cal"], level=0.9, tta=4, seed=3)
    assert cal["n"] == 40 and not cal["tta"]["pooled"] and len(cal["tta"]["quantiles"]) == 4
    hits, raw_hits = [], []
    for i, (x, t) in enumerate(zip(*sets["test"])):
        samples, first = channel_sums(model.generator, x, 4, 100 + i, model.device)
        est = Estimates("r", model.structures, model.channels, samples, first, x, model.pixel_spacing_mm,
                        calibration=cal)
        lo, hi = est.interval()
        hits.append((lo <= t) & (t <= hi))
        raw = Estimates("r", model.structures, model.channels, samples, first, x, model.pixel_spacing_mm)
        rlo, rhi = raw.interval()  # uncalibrated: 5-95th TTA percentiles
        raw_hits.append((rlo <= t) & (t <= rhi))
        assert est.interval_method()["calibrated"] and est.level == 0.9
    coverage = float(np.mean(hits))
    print(f"\ncalibrated coverage {coverage:.3f} (nominal 0.9), raw 90 % TTA percentiles {np.mean(raw_hits):.3f}")
    assert 0.78 <= coverage <= 1.0, coverage
    assert float(np.mean(raw_hits)) < coverage - 0.2


def test_sum_head_gain_comes_from_the_unaugmented_input(pelvis):
    """Test-time augmentation: every pass of a generator with a sum head uses the gain of the
    un-augmented input (a 2 % shift would swamp the < 1 % intensity signal the head reads), so
    pass by pass its sums are the plain backbone's times that one gain."""
    import torch

    from MSKdeXLib.learning.inference import _tta_batch, channel_sums
    from MSKdeXLib.learning.networks.generator import build_generator

    ct, _ = pelvis
    img = np.clip(1 + ct.array.astype(np.float64) / 1000, 0, None).sum(axis=1)[::-1]
    x = np.asarray(img[:96:3, :96:3], np.float32)
    x = (x - x.mean()) / x.std()
    arch = {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "sum_head": True, "sum_head_pool": 4}
    torch.manual_seed(0)
    gen = build_generator(arch, 2, [1.0, 1.0]).eval()
    head = gen.sum_head
    with torch.no_grad():
        x0 = torch.from_numpy(x)[None, None]
        head.mean.copy_(head.features(x0)[0])
        head.std.fill_(0.02)  # standardised like a trained head: shifts move its input a lot
        head.linear.weight.normal_(0, 0.05)
        head.linear.bias.copy_(torch.tensor([0.5, -0.5]))
        gain = torch.exp(head(x0))[0].double().numpy()
        own = torch.exp(head(_tta_batch(x, 4, 3))).double().numpy()  # what each pass alone would say
    assert np.abs(np.log(gain)).max() > 0.2  # the head matters ...
    assert np.abs(np.log(own[1:] / gain)).max() > 0.05  # ... and the augmented passes would change it
    with_head, _ = channel_sums(gen, x, tta=4, seed=3, device=torch.device("cpu"))
    gen.sum_head = None
    plain, _ = channel_sums(gen, x, tta=4, seed=3, device=torch.device("cpu"))
    np.testing.assert_allclose(with_head / plain, np.broadcast_to(gain, plain.shape), rtol=1e-4)
