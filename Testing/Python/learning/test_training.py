"""Training, checkpoints, resume, model folders and a 2-process (gloo) DDP run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from MSKdeXLib.learning.checkpoint import flatten_optimizer, load_model_files, unflatten_optimizer
from MSKdeXLib.cli import main
from projection_dataset import parallel_projection_dataset
from MSKdeXLib.errors import UserError
from MSKdeXLib.learning.inference import load_model
from MSKdeXLib.learning.training import default_config, load_config, merge_config, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


TINY = {"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        "discriminator": {"width": 8, "n_layers": 2, "n_scales": 2},
        "data": {"batch_size": 2}, "log_every": 1, "checkpoint_every": 2, "val_every": 2}


@pytest.fixture(scope="module")
def data_dir(pelvis, tmp_path_factory):
    ct, labels = pelvis
    d = tmp_path_factory.mktemp("train_ds")
    parallel_projection_dataset(ct, labels, d, ["hip_left", "gluteus_maximus_left", "gluteus_medius_left"],
                                ("mass_g",), n_records=4, size=32, seed=2)
    return d


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "model"
    return train({**TINY, "steps": 3}, data_dir, out), out


def test_resume_gives_the_uninterrupted_losses(data_dir, trained, tmp_path):
    full, _ = trained
    part = train({**TINY, "steps": 1}, data_dir, tmp_path / "m")
    assert part.step == 1 and json.loads((tmp_path / "m" / "checkpoint.json").read_text())["step"] == 1
    res = train({**TINY, "steps": 3}, data_dir, tmp_path / "m", resume=True)
    assert res.step == 3 and [h["step"] for h in res.history] == [1, 2, 3]
    for a, b in zip(full.history, res.history):
        train_keys = {k for k in a if not k.startswith("val_")}  # validation runs at each run's end
        assert train_keys == {k for k in b if not k.startswith("val_")} and "intensity_sum" in train_keys
        for k in train_keys:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    # the model folders are identical too
    w1, _ = load_model_files(trained[1])
    w2, _ = load_model_files(tmp_path / "m")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # the command line resumes with the checkpoint's own config and data folder
    assert main(["train", "--out", str(tmp_path / "m"), "--resume", "--steps", "4", "--progress", "none"]) == 0
    assert json.loads((tmp_path / "m" / "checkpoint.json").read_text())["step"] == 4
    # a changed loss weight is refused on resume (one line)
    with pytest.raises(UserError, match="config differs"):
        train({**TINY, "steps": 4, "losses": {"gan": 0.0}}, data_dir, tmp_path / "m", resume=True)


def test_outputs_and_model_config(trained, data_dir):
    res, out = trained
    for name in ("model.safetensors", "config.json", "checkpoint.safetensors", "checkpoint.json",
                 "history.json", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    ds = json.loads((data_dir / "dataset.json").read_text())
    assert cfg["channels"] == ds["channels"] and cfg["normalisation"] == ds["normalisation"]
    assert cfg["image_size"] == ds["image_size"] and cfg["pixel_spacing_mm"] == ds["pixel_spacing_mm"]
    assert len(cfg["channel_scales"]) == len(cfg["channels"]) and min(cfg["channel_scales"]) > 0
    assert cfg["code_version"] and cfg["data_summary"]["records"]["train"] == 3
    # one validation record is too few for a 90 % conformal interval: left uncalibrated, with the reason
    assert cfg["calibration"] is None and "too few" in cfg["calibration_note"]
    assert all(np.isfinite(h["total"]) for h in res.history)
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_save_load_identical_predictions(trained, tmp_path):
    from MSKdeXLib.learning.checkpoint import save_model

    _, out = trained
    m1 = load_model(out)
    save_model(tmp_path / "copy", m1.generator, {k: v for k, v in m1.config.items() if k != "format"})
    m2 = load_model(tmp_path / "copy")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m1.generator(x), m2.generator(x))


def test_pickle_and_mismatched_models_are_refused(trained, tmp_path, capsys):
    _, out = trained
    m = load_model(out)
    # 1. a pickle file instead of safetensors
    pk = tmp_path / "pickled"
    pk.mkdir()
    torch.save(m.generator.state_dict(), pk / "model.pt")
    (pk / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(UserError, match="pickle") as e:
        load_model(pk)
    assert "\n" not in str(e.value)
    # 2. a pickle renamed .safetensors
    torch.save(m.generator.state_dict(), pk / "model.safetensors")
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_model(pk)
    # 3. structures that do not match the channels
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    cfg["structures"] = cfg["structures"][1:]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not in the config's structures"):
        load_model(bad)
    # 4. a channel too many for the weights
    cfg = json.loads((out / "config.json").read_text())
    cfg["channels"].append(dict(cfg["channels"][0], quantity="volume_cm3"))
    cfg["channel_scales"].append(1.0)
    cfg["n_channels"] += 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="weights do not match"):
        load_model(bad)
    # the command line turns it into one line and exit code 2
    rc = main(["predict", "--model", str(pk), "--xray", str(pk / "config.json"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "safetensors" in err


def test_config_defaults_and_optimizer_flattening(tmp_path):
    assert main(["train", "--write-default-config", str(tmp_path / "c.json")]) == 0
    cfg = load_config(tmp_path / "c.json")
    assert cfg == default_config()
    assert cfg["losses"]["l1"] == 100 and cfg["optimizer"]["betas"] == [0.5, 0.999]
    with pytest.raises(UserError, match="unknown"):
        merge_config({"lossez": {}})
    p = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(p.parameters(), lr=1e-4, betas=(0.5, 0.999))
    p(torch.ones(1, 3)).sum().backward()
    opt.step()
    t, meta = flatten_optimizer(opt, "opt")
    sd = unflatten_optimizer(t, json.loads(json.dumps(meta)), "opt")
    opt2 = torch.optim.AdamW(p.parameters(), lr=1.0)
    opt2.load_state_dict(sd)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        for n, v in a["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][k][n]))


def test_two_process_gloo_ddp(data_dir, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**TINY, "data": {"batch_size": 1}, "steps": 2}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "MSKdeXLib", "train", "--config", str(cfg), "--data", str(data_dir), "--out",
           str(tmp_path / "ddp"), "--progress", "none", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "ddp" / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
    m = load_model(tmp_path / "ddp")
    assert all(torch.isfinite(v).all() for v in m.generator.state_dict().values())


def test_learning_rate_schedules(data_dir, tmp_path):
    from MSKdeXLib.learning.training import learning_rate

    const = {"lr": 1e-3}
    assert all(learning_rate(const, s, 100) == 1e-3 for s in (0, 50, 99))
    cos = {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 10, "min_lr_fraction": 0.1}
    lrs = [learning_rate(cos, s, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[9] == pytest.approx(2e-3)  # linear warm-up
    assert lrs[10] == pytest.approx(2e-3) and lrs[-1] > 2e-4 and lrs[-1] == pytest.approx(2e-4, rel=0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert learning_rate(cos, 60, 110) == pytest.approx(2e-4 + 0.5 * 1.8e-3)  # half-way
    with pytest.raises(UserError, match="schedule"):
        train({**TINY, "optimizer": {"schedule": "step"}}, data_dir, tmp_path / "m")


def test_training_calibrates_the_interval_and_it_round_trips(pelvis, tmp_path):
    """With enough validation records, training stores a conformal calibration in config.json;
    load -> predict applies it (mean +- q * u) and estimates.json says how the interval was made."""
    from MSKdeXLib.learning.checkpoint import save_model
    from MSKdeXLib.io.images import Radiograph
    from MSKdeXLib.learning.inference import interval_scale, predict

    ct, labels = pelvis
    d = tmp_path / "ds"
    parallel_projection_dataset(ct, labels, d, ["hip_left", "gluteus_maximus_left"], ("mass_g",), n_records=24,
                                size=32, seed=5, val_records=20)
    res = train({**TINY, "steps": 1, "calibration": {"tta": 2}}, d, tmp_path / "m")
    cal = res.model_config["calibration"]
    assert cal["n"] == 20 and cal["level"] == 0.9 and cal["tta"]["passes"] == 3 and cal["split"] == "val"
    assert all(np.isfinite(q) and q > 0 for q in cal["tta"]["quantiles"] + cal["single"]["quantiles"])
    m = load_model(tmp_path / "m")
    assert m.config["calibration"] == json.loads(json.dumps(cal))
    save_model(tmp_path / "copy", m.generator, {k: v for k, v in m.config.items() if k != "format"})
    m2 = load_model(tmp_path / "copy")
    rad = Radiograph(np.random.default_rng(0).random((32, 32)).astype(np.float32) + 1, m.pixel_spacing_mm)
    for tta, part in ((3, "tta"), (0, "single"), (1, "single")):
        a, b = predict(m, rad, tta=tta, seed=1), predict(m2, rad, tta=tta, seed=1)
        lo, hi = a.interval()
        assert np.array_equal(lo, b.interval()[0]) and np.array_equal(hi, b.interval()[1])
        spread = a.samples if part == "tta" else a.mean[None]  # single-pass quantiles: relative floor only
        half = np.asarray(cal[part]["quantiles"]) * interval_scale(spread, cal["floor_fraction"])
        assert hi == pytest.approx(a.mean + half) and lo == pytest.approx(np.maximum(a.mean - half, 0))
        doc = a.to_json()
        how = doc["interval_method"]
        assert doc["interval"] == 0.9 and how["calibrated"] and how["mode"] == part
    # by default predict runs as many passes as the interval was calibrated with
    assert predict(m, rad).samples.shape[0] == cal["tta"]["passes"] == 3
    # a model without calibration (an older model folder) still predicts, and says so
    old = {k: v for k, v in m.config.items() if k not in ("format", "calibration")}
    save_model(tmp_path / "old", m.generator, old)
    from MSKdeXLib.learning.inference import DEFAULT_TTA

    assert predict(load_model(tmp_path / "old"), rad).samples.shape[0] == 1 + DEFAULT_TTA
    est = predict(load_model(tmp_path / "old"), rad, tta=2)
    how = est.to_json()["interval_method"]
    assert not how["calibrated"] and "uncalibrated" in how["note"]
    lo, hi = est.interval()
    assert np.array_equal(lo, np.percentile(est.samples, 5, axis=0))
    # ... and can be calibrated afterwards from the command line (same record as training made)
    assert main(["train", "--calibrate-only", "--out", str(tmp_path / "old"), "--data", str(d),
                 "--device", "cpu"]) == 0
    again = load_model(tmp_path / "old").config["calibration"]
    assert again["single"]["quantiles"] == pytest.approx(cal["single"]["quantiles"]) and again["n"] == 20
    assert main(["train", "--calibrate-only", "--out", str(tmp_path / "old"), "--data", str(d)]) == 2  # no --force


def test_adversarial_warmup_schedule_and_balance(data_dir, tmp_path):
    """GAN + feature matching (and the discriminator's updates) start at ``start_step`` and ramp
    up linearly; the discriminator's lr is ``d_lr_ratio`` x the generator's; the instance noise
    decays to 0; the settings are recorded in the model config."""
    from MSKdeXLib.learning.training import adversarial_schedule

    a = {"start_step": 4, "ramp_steps": 4, "instance_noise": 0.2}
    f = [adversarial_schedule(a, s, 12) for s in range(12)]
    assert [x for x, _ in f[:4]] == [0.0] * 4 and [x for x, _ in f[4:8]] == [0.25, 0.5, 0.75, 1.0]
    assert all(x == 1.0 for x, _ in f[8:]) and f[0][1] == pytest.approx(0.2)
    assert all(n1 > n2 > 0 for (_, n1), (_, n2) in zip(f, f[1:]))
    assert adversarial_schedule({}, 0, 10) == (1.0, 0.0)  # defaults: the plain GAN from step 0
    frac = {"start_step": 0.5, "ramp_steps": 0.25}  # fractions of the total: same schedule as 4 / 2 of 8
    assert [adversarial_schedule(frac, s, 8)[0] for s in range(8)] == [0, 0, 0, 0, 0.5, 1, 1, 1]
    adv = {"start_step": 2, "ramp_steps": 0, "d_lr_ratio": 0.5, "instance_noise": 0.1, "real_label": 0.9}
    res = train({**TINY, "steps": 3, "adversarial": adv}, data_dir, tmp_path / "m")
    h = res.history
    for r in h[:2]:  # before start_step: no adversarial term, discriminator untouched
        assert "gan" not in r and "feature_matching" not in r and "discriminator" not in r
        assert "intensity_sum" in r and "l1" in r
    assert {"gan", "feature_matching", "discriminator"} <= set(h[2])
    assert res.model_config["training"]["adversarial"]["d_lr_ratio"] == 0.5
    from MSKdeXLib.learning.checkpoint import load_checkpoint

    parts, meta = load_checkpoint(tmp_path / "m")
    lr_g = meta["config"]["optimizer"]["lr"]
    assert parts["opt_d"]["param_groups"][0]["lr"] == pytest.approx(0.5 * parts["opt_g"]["param_groups"][0]["lr"])
    assert parts["opt_g"]["param_groups"][0]["lr"] == pytest.approx(lr_g)


def test_sum_head_is_standardised_on_the_training_split(data_dir, tmp_path):
    """A model trained with the sum head stores it in its config and weights, with its input
    standardisation = per-block mean / SD of the training radiographs (computed here by numpy)."""
    from safetensors.numpy import load_file

    cfg = {**TINY, "model": {**TINY["model"], "sum_head": True, "sum_head_pool": 4}, "steps": 2}
    train(cfg, data_dir, tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert model.config["architecture"]["sum_head"] is True
    head = model.generator.sum_head
    recs = [r for r in json.loads((data_dir / "dataset.json").read_text())["records"] if r["split"] == "train"]
    x = np.stack([load_file(str(data_dir / r["file"]))["xray"][0] for r in recs]).astype(np.float64)
    blocks = x.reshape(len(x), 4, x.shape[1] // 4, 4, x.shape[2] // 4).mean(axis=(2, 4)).reshape(len(x), -1)
    np.testing.assert_allclose(head.mean.numpy(), blocks.mean(0), rtol=1e-5, atol=1e-6)
    sd = blocks.std(0)
    np.testing.assert_allclose(head.std.numpy(), np.maximum(sd, 0.05 * np.median(sd)), rtol=1e-4)


def test_checkpoint_from_before_the_sum_head_resumes_without_it(data_dir, tmp_path):
    """A checkpoint written before ``sum_head`` existed (no key in its model config) resumes as
    the plain model it was trained as, whatever the current default."""
    cfg = {**TINY, "model": {**TINY["model"], "sum_head": False}, "steps": 1}
    train(cfg, data_dir, tmp_path / "m")
    ck = tmp_path / "m" / "checkpoint.json"
    meta = json.loads(ck.read_text())
    for key in ("sum_head", "sum_head_pool"):
        meta["config"]["model"].pop(key)
    ck.write_text(json.dumps(meta))
    res = train({**meta["config"], "steps": 2}, data_dir, tmp_path / "m", resume=True)
    assert res.step == 2 and load_model(tmp_path / "m").generator.sum_head is None
