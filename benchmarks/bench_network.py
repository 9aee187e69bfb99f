"""Benchmarks of the decomposition network: inference time, training throughput, ablation.

Four parts (``--part``; ``all`` = the first three):

* ``inference``: seconds per radiograph of :func:`MSKdeXLib.learning.inference.predict` (resampling,
  normalisation, generator, channel sums) for a 512 x 512 radiograph (projected density of the
  real pelvis CT) -> a ``--image-size`` model grid (default 256 x 256), with the default
  generator architecture and the 22-class hip/thigh set's 41 channels (19 muscles x mass +
  volume, 3 bones x mass), without and with test-time augmentation (4 or 8 extra passes). Timing
  does not depend on the weights, so the generator is untrained. Median over ``--repeats``.
* ``throughput``: training images per second of one full optimisation step (generator forward,
  discriminator step, generator losses of the full model, backward, AdamW) at ``--image-size``
  with the default architecture, batch ``--batch-size``, on ``--device`` (``cuda`` uses bf16
  autocast, as ``mskdex train`` does with ``amp``).
* ``ablation``: the paper's ablation on a virtual cohort of the real pelvis CT (muscle changes,
  deformation, pose and acquisition changes; :mod:`MSKdeXLib.learning.cohort`): ``--subjects`` training,
  ``--val`` calibration and ``--heldout`` test subjects, records of ``--ablation-size`` px,
  ``--steps`` steps per variant, same seed. Variants: ``full`` (paired bone L1 + gradient
  correlation, unpaired muscle GAN + feature matching, cycle, intensity sum), ``no_owis``
  (intensity-sum loss off), ``no_bone_paired`` (bone L1 + GC off), ``paired_muscles`` (full +
  paired muscle L1: what unpairing costs on virtual data). Reports held-out muscle mean PCC
  (mass, volume), muscle MAPE and the calibrated interval's coverage (``--tta`` passes).

* ``specificity``: the network beside the baselines (constant, global-scalar oracle, ridge on the
  radiograph, template; :mod:`MSKdeXLib.evaluation.comparison`) on the **specificity cohort**
  (``mskdex cohort --preset specificity``, seed 14): ``--spec-train`` subjects (indices 0..),
  ``--spec-val`` (10000..: calibration and the ridge penalty) and the FIXED test split
  ``--spec-test`` (20000..). Per network configuration (``--spec-configs``: the paper's unpaired
  muscles, paired muscle L1) three rows: the backbone's channel sums alone, the sum head's gain
  alone (times the backbone's mean training sums) and the full model. Columns: means over the
  muscles of PCC, share PCC, partial PCC given the true total muscle mass, asymmetry-index PCC,
  the gluteus/iliopsoas pairs' asymmetry PCC, MAPE, muscle pixel r, coverage with effective n.

Each part writes ``OUT/<part>.json``; ``--markdown`` prints the tables. The same script runs on
a GPU (``--device cuda``) at full scale, e.g.::

    python benchmarks/bench_network.py --part ablation --device cuda --subjects 200 --val 40 \\
        --heldout 50 --ablation-size 256 --detector 512 --steps 20000 --out bench_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "full": {},
    "no_owis": {"intensity_sum": 0.0, "intensity_sum_sq": 0.0, "intensity_sum_log": 0.0},
    "no_bone_paired": {"l1": 0.0, "gradient_correlation": 0.0},
    "paired_muscles": {"muscle_l1": 100.0},
}


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
def hip22_channels():
    from MSKdeXLib.anatomy.structures import get_table

    table = get_table("hip22")
    structs = list(table.structures)
    channels = [{"structure": s.name, "quantity": q, "kind": s.kind} for q in ("mass_g", "volume_cm3")
                for s in structs if s.kind == "muscle" or q == "mass_g"]
    return structs, channels


def pelvis_radiograph(size: int = 512):
    """A radiograph-like image of the real pelvis CT (parallel projected density)."""
    from scipy.ndimage import zoom

    from MSKdeXLib.io import sample_data
    from MSKdeXLib.io.images import Radiograph
    from MSKdeXLib.io.volumes import load_ct

    case = sample_data.pelvis_ct() or sample_data.default_case()
    ct = load_ct(case.ct)
    rho = np.clip(1 + ct.array.astype(np.float64) / 1000, 0, None).sum(axis=1)[::-1]
    img = zoom(rho, (size / rho.shape[0], size / rho.shape[1]), order=1)
    sp = (ct.spacing[2] * rho.shape[0] / size, ct.spacing[0] * rho.shape[1] / size)
    return Radiograph(img.astype(np.float32), sp, "file", "bench/xray.dcm")


def bench_inference(args) -> dict:
    from MSKdeXLib.learning.inference import Model, predict
    from MSKdeXLib.learning.networks.generator import DEFAULT_ARCH, build_generator

    dev = torch.device(args.device)
    structs, channels = hip22_channels()
    arch = {**DEFAULT_ARCH, "recon_head": False}
    gen = build_generator(arch, len(channels), [0.01] * len(channels)).to(dev).eval()
    n = args.image_size
    rad = pelvis_radiograph(512)
    fov = (rad.pixels.shape[0] * rad.pixel_spacing[0], rad.pixels.shape[1] * rad.pixel_spacing[1])
    config = {"channels": channels, "structures": [s.to_dict() for s in structs], "image_size": [n, n],
              "pixel_spacing_mm": [fov[0] / n, fov[1] / n], "normalisation": {"method": "zscore"},
              "channel_scales": [0.01] * len(channels), "architecture": arch}
    model = Model(gen, config, Path("untrained"), dev)
    out = {"image_size": [n, n], "input_size": list(rad.pixels.shape), "channels": len(channels),
           "architecture": arch, "parameters": sum(p.numel() for p in gen.parameters())}
    for tta in (0, 4, 8):
        predict(model, rad, tta=tta)  # warm-up
        times = []
        for r in range(args.repeats):
            _sync(dev)
            t0 = time.perf_counter()
            predict(model, rad, tta=tta, seed=r)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[f"tta{tta}"] = {"passes": 1 + tta, "median_s": statistics.median(times), "min_s": min(times),
                            "max_s": max(times), "repeats": len(times)}
        print(f"inference {n}x{n}, {1 + tta} pass(es): median {statistics.median(times):.3f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# Training throughput
# ------------------------------------------------------------------------------------------------
def bench_throughput(args) -> dict:
    from MSKdeXLib.learning.networks.discriminator import MultiScaleDiscriminator
    from MSKdeXLib.learning.networks.generator import DEFAULT_ARCH, build_generator
    from MSKdeXLib.learning.training import DEFAULT_LOSSES, channel_groups, discriminator_loss, generator_losses

    dev = torch.device(args.device)
    _, channels = hip22_channels()
    c, n, b = len(channels), args.image_size, args.batch_size
    torch.manual_seed(0)
    gen = build_generator({**DEFAULT_ARCH, "recon_head": True}, c, [0.01] * c).to(dev)
    groups = channel_groups(channels, ["muscle"])
    disc = MultiScaleDiscriminator(int(groups["gan"].sum()), 32, 3, 2).to(dev)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.999))
    # a batch of the right shapes and magnitudes (timing does not depend on the values)
    g = torch.Generator().manual_seed(0)
    targets = torch.rand(b, c, n, n, generator=g) * 0.01
    batch = {"xray": torch.randn(b, 1, n, n, generator=g), "targets": targets,
             "paired": torch.ones(b, c, dtype=torch.bool), "truth": targets.double().sum(dim=(2, 3))}
    batch = {k: v.to(dev) for k, v in batch.items()}
    amp = dev.type == "cuda" and not args.no_amp
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    weights = dict(DEFAULT_LOSSES)

    def step() -> None:
        with autocast():
            pred, recon = gen(batch["xray"], reconstruct=True)
        opt_d.zero_grad(set_to_none=True)
        with autocast():
            loss_d = discriminator_loss(pred, batch, gen.scales, groups, disc)
        loss_d.float().backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        with autocast():
            losses = generator_losses(pred.float(), recon.float(), batch, gen.scales, groups, weights, disc, disc)
        losses["total"].float().backward()
        opt_g.step()

    for _ in range(args.warmup):
        step()
    _sync(dev)
    times = []
    for _ in range(args.train_steps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"training {n}x{n}, batch {b}: {med:.3f} s/step, {b / med:.2f} images/s", flush=True)
    return {"image_size": [n, n], "batch_size": b, "channels": c, "amp_bf16": amp, "steps_timed": len(times),
            "median_s_per_step": med, "images_per_s": b / med, "losses": weights}


# ------------------------------------------------------------------------------------------------
# Ablation
# ------------------------------------------------------------------------------------------------
def ablation_data(args, root: Path) -> tuple[Path, list[Path]]:
    """Cohort (train + val + held-out subjects) and the training set (train + val splits)."""
    from MSKdeXLib.io import sample_data
    from MSKdeXLib.learning.cohort import CohortConfig, build_cohort
    from MSKdeXLib.learning.dataset.builder import DatasetSettings, build_dataset
    from MSKdeXLib.demo import demo_ranges

    case = sample_data.pelvis_ct() or sample_data.default_case()
    n_total = args.subjects + args.val + args.heldout
    config = CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=args.seed,
                          rows=args.detector, cols=args.detector, voxel_mm=args.voxel_mm, ranges=demo_ranges())
    cohort = root / "cohort"
    t0 = time.time()
    if not (cohort / "cohort.json").exists() or len(json.loads((cohort / "cohort.json").read_text())["subjects"]) < n_total:
        build_cohort(config, n_total, cohort, workers=args.workers, force=True)
    print(f"cohort of {n_total}: {time.time() - t0:.0f} s", flush=True)
    subjects = sorted(p for p in cohort.iterdir() if p.is_dir())[:n_total]
    train_c, val_c = subjects[:args.subjects], subjects[args.subjects:args.subjects + args.val]
    held = subjects[args.subjects + args.val:]
    cam = json.loads((subjects[0] / "subject.json").read_text())["camera"]
    fov = cam["spacing_row_mm"] * cam["rows"], cam["spacing_col_mm"] * cam["cols"]
    size = args.ablation_size
    common = dict(image_size=(size, size), pixel_spacing_mm=(fov[0] / size, fov[1] / size))
    data = root / "dataset"
    t0 = time.time()
    build_dataset(train_c, data, DatasetSettings(**common, split="train"))
    build_dataset(val_c, data, DatasetSettings(**common, split="val"))
    build_dataset(held, root / "heldout_records", DatasetSettings(**common, split="test"))  # true channels
    print(f"training set: {time.time() - t0:.0f} s", flush=True)
    return data, held


def variant_config(args, losses: dict) -> dict:
    from MSKdeXLib.learning.training import DEFAULT_LOSSES

    return {"seed": args.seed, "steps": args.steps, "checkpoint_every": args.steps, "val_every": args.steps,
            "log_every": max(1, args.steps // 20), "amp": True,
            "data": {"batch_size": args.batch_size, "augment": {"enabled": False}},
            "model": {"features": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1,
                      "upsample": "nontrainable", "norm": args.norm,
                      **({} if args.sum_head is None else {"sum_head": args.sum_head == "on"}),
                      **({} if args.sum_head_pool is None else {"sum_head_pool": args.sum_head_pool})},
            **({} if args.owis_kinds is None else {"intensity_sum_kinds": args.owis_kinds}),
            "discriminator": {"width": 16, "n_layers": 2, "n_scales": 2},
            "losses": {**DEFAULT_LOSSES, "intensity_sum": args.owis_weight,
                       "intensity_sum_sq": args.owis_sq_weight, "intensity_sum_log": args.owis_log_weight,
                       **losses},
            "adversarial": {"start_step": int(round(args.adv_start * args.steps)),
                            "ramp_steps": int(round(args.adv_ramp * args.steps)), "d_lr_ratio": args.d_lr_ratio,
                            "instance_noise": args.instance_noise, "real_label": args.real_label},
            "optimizer": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 50, "min_lr_fraction": 0.0},
            "calibration": {"enabled": True, "split": "val", "level": 0.9, "tta": args.tta,
                            "floor_fraction": 0.01}}


def bench_ablation(args) -> dict:
    from MSKdeXLib.evaluation.channel_agreement import heldout_agreement
    from MSKdeXLib.evaluation.agreement import evaluate
    from MSKdeXLib.learning.inference import load_model, predict
    from MSKdeXLib.io.radiographs import load_radiograph
    from MSKdeXLib.learning.training import train

    root = Path(args.out) / "ablation_work"
    data, held = ablation_data(args, root)
    truths = {f.name: {r["name"]: r for r in json.loads((f / "metrics.json").read_text())["structures"]}
              for f in held}
    rads = {f.name: load_radiograph(f / "xray.dcm") for f in held}
    results = {}
    for name in args.variants:
        t0 = time.time()
        res = train(variant_config(args, VARIANTS[name]), data, root / f"model_{name}", device=args.device,
                    force=True)
        t_train = time.time() - t0
        model = load_model(root / f"model_{name}", args.device)
        pred, truth, ests = [], [], []
        for sid, rad in rads.items():
            est = predict(model, rad, tta=args.tta, seed=args.seed, rec_id=sid)
            ests.append(est)
            pred += [{**r, "level": est.level} for r in est.rows()]
            truth += [{"id": sid, "structure": c["structure"], "quantity": c["quantity"],
                       "value": truths[sid][c["structure"]][c["quantity"]]} for c in model.channels]
        ev = evaluate(pred, truth)
        agreement = heldout_agreement(ests, root / "heldout_records")
        muscles = {c["structure"] for c in model.channels if c["kind"] == "muscle"}
        summ = {}
        for q in ("mass_g", "volume_cm3"):
            st = [s for s in ev.stats if s["quantity"] == q and s["structure"] in muscles]
            summ[q] = {"mean_pcc": float(np.nanmean([s["pcc"] for s in st])),
                       "mean_mape_percent": float(np.mean([s["mape_percent"] for s in st])),
                       "coverage": float(np.mean([s["coverage"] for s in st]))}
        results[name] = {"losses": res.model_config["training"]["losses"], "train_seconds": round(t_train, 1),
                         "muscles": summ, "coverage_all_channels": ev.coverage(),
                         "channel_agreement": agreement["kind_mean"],
                         "calibration": (res.model_config.get("calibration") or {}).get("tta", {}).get("pooled"),
                         "calibration_note": res.model_config.get("calibration_note"),
                         "statistics": ev.stats, "history_last": res.history[-1] if res.history else {}}
        print(f"{name}: muscle PCC mass {summ['mass_g']['mean_pcc']:.3f} volume {summ['volume_cm3']['mean_pcc']:.3f}"
              f", MAPE {summ['mass_g']['mean_mape_percent']:.1f} %, coverage "
              f"{ev.coverage().get('overall', {}).get('coverage', float('nan')):.2f} ({t_train:.0f} s)", flush=True)
    return {"subjects": {"train": args.subjects, "val": args.val, "heldout": args.heldout},
            "image_size": args.ablation_size, "detector_px": args.detector, "voxel_mm": args.voxel_mm,
            "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "tta": args.tta,
            "config_example": variant_config(args, {}), "variants": results}


# ------------------------------------------------------------------------------------------------
# Specificity: network vs baselines on a fixed test split of the specificity cohort
# ------------------------------------------------------------------------------------------------
#: the specificity benchmark's cohort seed and index ranges: train 0.., validation 10000.., and the
#: FIXED test split 20000..20000+n-1 (no choice is made on it; subject i depends only on seed and i)
SPEC_SEED, SPEC_VAL_START, SPEC_TEST_START = 14, 10000, 20000
SPEC_CONFIGS = ("unpaired", "paired")


def specificity_data(args, root: Path) -> tuple[Path, Path]:
    """Specificity-preset cohorts (train / val / test index ranges) and their records: the
    training set (train + val splits) and the test records (true channels of the test subjects)."""
    from MSKdeXLib.io import sample_data
    from MSKdeXLib.learning.cohort import CohortConfig, build_cohort, preset_ranges
    from MSKdeXLib.learning.dataset.builder import DatasetSettings, build_dataset

    case = sample_data.pelvis_ct() or sample_data.default_case()
    config = CohortConfig(ct=str(case.ct), labels=str(case.labels), table=case.table, seed=SPEC_SEED,
                          rows=args.spec_detector, cols=args.spec_detector, voxel_mm=args.voxel_mm, physics=True,
                          ranges={**preset_ranges("specificity").to_dict(), **json.loads(args.spec_ranges)})
    folders = {}
    for split, start, n in (("train", 0, args.spec_train), ("val", SPEC_VAL_START, args.spec_val),
                            ("test", SPEC_TEST_START, args.spec_test)):
        if n == 0:  # e.g. a validation-only diagnostic
            continue
        out = root / f"cohort_{split}"
        doc = out / "cohort.json"
        have = {e["index"] for e in json.loads(doc.read_text())["subjects"]} if doc.exists() else set()
        t0 = time.time()
        missing = sorted(set(range(start, start + n)) - have)
        if missing and have and missing == list(range(missing[0], start + n)):  # extend a cached cohort
            build_cohort(config, len(missing), out, workers=args.workers, start=missing[0])
        elif missing:
            build_cohort(config, n, out, workers=args.workers, force=True, start=start)
        folders[split] = [out / f"subject-{i:04d}" for i in range(start, start + n)]
        print(f"{split} cohort ({n} subjects from index {start}): {time.time() - t0:.0f} s", flush=True)
    cam = json.loads((folders["train"][0] / "subject.json").read_text())["camera"]
    fov = cam["spacing_row_mm"] * cam["rows"], cam["spacing_col_mm"] * cam["cols"]
    size = args.spec_size
    common = dict(image_size=(size, size), pixel_spacing_mm=(fov[0] / size, fov[1] / size))
    data, test = root / "dataset", root / "test_records"
    build_dataset(folders["train"], data, DatasetSettings(**common, split="train"))
    build_dataset(folders["val"], data, DatasetSettings(**common, split="val"))
    if folders.get("test"):
        build_dataset(folders["test"], test, DatasetSettings(**common, split="test"))
    return data, test


def specificity_config(args, name: str) -> dict:
    """The demo's training configuration (paper's unpaired muscles, or paired muscle L1) at this scale."""
    from MSKdeXLib.demo import PAIRED_MUSCLE_LOSSES, DemoSettings, training_config

    cfg = training_config(DemoSettings(steps=args.spec_steps, image_px=args.spec_size, seed=args.seed,
                                       batch_size=args.batch_size))
    if name == "paired":
        cfg["losses"] = {**cfg["losses"], **PAIRED_MUSCLE_LOSSES}
    cfg["model"] = {**cfg["model"], **json.loads(args.spec_model)}
    for key, value in json.loads(args.spec_train_config).items():  # e.g. {"data": {"resimulate": {...}}}
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


@torch.no_grad()
def network_parts(model_dir: Path, records_dir: Path, split: str) -> dict:
    """Per record of ``split``: the backbone's channel sums (gain 1), the sum head's gain (None
    without a head), the full model's sums, the full channel images, ids."""
    from MSKdeXLib.learning.dataset.records import load_dataset_info, load_record
    from MSKdeXLib.learning.inference import load_model

    gen = load_model(model_dir, "cpu").generator
    info = load_dataset_info(records_dir)
    ids, base, gains, images = [], [], [], []
    for r in info.split(split):
        x = load_record(info, r)["xray"].float()[None]
        b, g = gen.parts(x)
        ids.append(Path(r["source"]).name)
        base.append(b[0].double().sum(dim=(1, 2)).numpy())
        gains.append(None if g is None else g[0].double().numpy())
        images.append((b[0] * (1 if g is None else g[0][:, None, None])).numpy())
    base = np.array(base)
    gain = None if gains[0] is None else np.array(gains)
    return {"ids": ids, "backbone": base, "gain": gain, "full": base if gain is None else base * gain,
            "images": np.array(images)}


def network_rows(name: str, model_dir: Path, data: Path, test_dir: Path, channels: list, split: str = "test") -> dict:
    """Summaries (comparison table rows) of one trained network: backbone sums, the sum head's
    gain alone (times the backbone's mean training sums), the full model (calibrated interval)."""
    from MSKdeXLib.evaluation.agreement import evaluate
    from MSKdeXLib.evaluation.baselines import split_arrays
    from MSKdeXLib.evaluation.channel_agreement import channel_correlation
    from MSKdeXLib.evaluation.comparison import rows_of, summary
    from MSKdeXLib.learning.inference import calibration_quantiles, interval_scale

    test = split_arrays(test_dir, split)
    parts = network_parts(model_dir, test_dir, split)
    assert parts["ids"] == test.ids
    truth = rows_of(test.ids, channels, test.truth)
    muscle = [j for j, c in enumerate(channels) if c.get("kind") == "muscle"]
    r = np.array([channel_correlation(p, t) for p, t in zip(parts["images"], test.images)])
    pix = {q: float(np.nanmean(r[:, [j for j in muscle if channels[j]["quantity"] == q]]))
           for q in ("mass_g", "volume_cm3")}
    cfg = json.loads((model_dir / "config.json").read_text())
    cal = cfg.get("calibration")
    out = {f"{name}: backbone sums": summary(evaluate(rows_of(test.ids, channels, parts["backbone"]), truth), pix)}
    if parts["gain"] is not None:
        train_base = network_parts(model_dir, data, "train")["backbone"].mean(axis=0)
        out[f"{name}: sum-head gain x mean backbone"] = summary(
            evaluate(rows_of(test.ids, channels, parts["gain"] * train_base), truth))
    full = parts["full"]
    lo = hi = None
    if cal:
        half = calibration_quantiles(cal, 1)[None] * np.array(
            [interval_scale(f[None], float(cal.get("floor_fraction", 0.01))) for f in full])
        lo, hi = np.maximum(full - half, 0.0), full + half
    out[f"{name}: full model"] = summary(
        evaluate(rows_of(test.ids, channels, full, lo, hi, float(cal["level"]) if cal else None), truth), pix)
    return out


def bench_specificity(args) -> dict:
    """Network (each configuration: backbone, head, full) beside the baselines on the fixed test split."""
    from MSKdeXLib.evaluation.comparison import compare_with_baselines
    from MSKdeXLib.learning.dataset.records import load_dataset_info
    from MSKdeXLib.learning.training import train

    root = Path(args.out) / "specificity_work"
    t0 = time.time()
    data, test_dir = specificity_data(args, root)
    t_data = time.time() - t0
    channels = load_dataset_info(data).channels
    # --spec-eval val: every choice (configuration, variant) is made here; test: the reported run
    eval_dir, split = (data, "val") if args.spec_eval == "val" else (test_dir, "test")
    rows, seconds = {}, {}
    for name in args.spec_configs:
        t0 = time.time()
        model_dir = root / f"model_{name}{args.spec_tag}"
        if not (args.spec_reuse and (model_dir / "config.json").exists()):
            train(specificity_config(args, name), data, model_dir, device="cpu", force=True)
        seconds[name] = round(time.time() - t0, 1)
        rows.update(network_rows(name + args.spec_tag, model_dir, data, eval_dir, channels, split))
        print(f"{name}: trained in {seconds[name]:.0f} s", flush=True)
    comp = compare_with_baselines(data, eval_dir, rows, split)
    return {"evaluated_on": split, "scale": {"train": args.spec_train, "val": args.spec_val, "test": args.spec_test,
                      "seed": SPEC_SEED, "index_ranges": {"train": [0, args.spec_train],
                                                          "val": [SPEC_VAL_START, SPEC_VAL_START + args.spec_val],
                                                          "test": [SPEC_TEST_START, SPEC_TEST_START + args.spec_test]},
                      "image_px": args.spec_size, "detector_px": args.spec_detector, "voxel_mm": args.voxel_mm,
                      "steps": args.spec_steps, "batch_size": args.batch_size},
            "data_seconds": round(t_data, 1), "train_seconds": seconds, "ridge_alpha": comp["ridge_alpha"],
            "configs": {n: specificity_config(args, n) for n in args.spec_configs},
            "rows": comp["rows"], "markdown": comp["markdown"]}


def markdown(results: dict) -> str:
    lines = []
    if "inference" in results:
        r = results["inference"]
        lines += [f"Inference ({r['image_size'][0]}x{r['image_size'][1]}, {r['channels']} channels): "
                  f"1 pass {r['tta0']['median_s']:.3f} s, 5 passes (TTA 4) {r['tta4']['median_s']:.3f} s, "
                  f"9 passes (TTA 8) {r['tta8']['median_s']:.3f} s", ""]
    if "throughput" in results:
        r = results["throughput"]
        lines += [f"Training throughput ({r['image_size'][0]}x{r['image_size'][1]}, batch {r['batch_size']}): "
                  f"{r['images_per_s']:.2f} images/s ({r['median_s_per_step']:.2f} s/step)", ""]
    if "ablation" in results:
        a = results["ablation"]
        lines += ["| variant | muscle PCC mass | muscle PCC volume | MAPE mass % | MAPE volume % | "
                  "coverage (90 % nominal) | muscle channel r mass / volume | bone channel r | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in a["variants"].items():
            m, vol = v["muscles"]["mass_g"], v["muscles"]["volume_cm3"]
            cov = v["coverage_all_channels"].get("overall", {}).get("coverage", float("nan"))
            ag = v.get("channel_agreement", {})
            mr, br = ag.get("muscle", {}), ag.get("bone", {})
            lines.append(f"| {name} | {m['mean_pcc']:.3f} | {vol['mean_pcc']:.3f} | {m['mean_mape_percent']:.1f} | "
                         f"{vol['mean_mape_percent']:.1f} | {cov:.1%} | {mr.get('mass_g', float('nan')):.3f} / "
                         f"{mr.get('volume_cm3', float('nan')):.3f} | {br.get('mass_g', float('nan')):.3f} | "
                         f"{v['train_seconds']:.0f} |")
    if "specificity" in results:
        r = results["specificity"]
        sc = r["scale"]
        lines += [f"Specificity cohort (seed {sc['seed']}), table on the {r['evaluated_on']} split: {sc['train']} train / {sc['val']} val / {sc['test']} "
                  f"test subjects (test indices {sc['index_ranges']['test']}), {sc['image_px']} px records, "
                  f"{sc['steps']} steps; ridge alpha {r['ridge_alpha']:g}", "", r["markdown"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "inference", "throughput", "ablation", "specificity"), default="all",
                   help="'all' = inference, throughput and ablation; 'specificity' runs alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (inference / throughput)")
    p.add_argument("--image-size", type=int, default=256, help="model grid of inference / throughput")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-steps", type=int, default=3, help="timed steps of the throughput part")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--subjects", type=int, default=60)
    p.add_argument("--val", type=int, default=20)
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--ablation-size", type=int, default=64)
    p.add_argument("--detector", type=int, default=128)
    p.add_argument("--voxel-mm", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--tta", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--owis-weight", type=float, default=20.0, help="intensity-sum loss weight (ablation)")
    p.add_argument("--owis-sq-weight", type=float, default=0.0,
                   help="weight of the squared intensity-sum loss (ablation)")
    p.add_argument("--owis-log-weight", type=float, default=0.0,
                   help="weight of the log-ratio intensity-sum loss |log(sum / truth)| (ablation)")
    p.add_argument("--owis-kinds", nargs="+", default=None,
                   help="structure kinds the intensity-sum losses average over (default: all channels)")
    p.add_argument("--sum-head", choices=("on", "off"), default=None,
                   help="generator sum head (per-channel log-gain from the pooled radiograph); default: "
                        "the training default")
    p.add_argument("--sum-head-pool", type=int, default=None, help="side of the radiograph pooled by the sum head")
    p.add_argument("--norm", default="instance", help="generator normalisation (ablation): instance, batch")
    p.add_argument("--adv-start", type=float, default=0.0,
                   help="GAN + feature matching start at this fraction of --steps (ablation)")
    p.add_argument("--adv-ramp", type=float, default=0.0, help="then ramp up over this fraction of --steps")
    p.add_argument("--d-lr-ratio", type=float, default=1.0, help="discriminator lr / generator lr (ablation)")
    p.add_argument("--instance-noise", type=float, default=0.0, help="discriminator input noise SD (ablation)")
    p.add_argument("--real-label", type=float, default=1.0, help="LSGAN real target (ablation)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    g = p.add_argument_group("specificity part (fixed test split: seed 14, indices 20000..)")
    g.add_argument("--spec-train", type=int, default=120, help="training subjects (indices 0..)")
    g.add_argument("--spec-val", type=int, default=30, help="validation subjects (indices 10000..): every choice")
    g.add_argument("--spec-test", type=int, default=60, help="test subjects (indices 20000..): never looked at")
    g.add_argument("--spec-size", type=int, default=32, help="record side, px (the network's input)")
    g.add_argument("--spec-detector", type=int, default=96, help="simulated detector side, px")
    g.add_argument("--spec-steps", type=int, default=3000, help="training steps per configuration")
    g.add_argument("--spec-ranges", default="{}",
                   help="JSON overriding cohort ranges of the preset (diagnostics; use another --out)")
    g.add_argument("--spec-configs", nargs="*", default=list(SPEC_CONFIGS), choices=SPEC_CONFIGS,
                   help="unpaired = the paper's (demo's) configuration; paired = muscle L1 (upper bound)")
    g.add_argument("--spec-eval", choices=("val", "test"), default="test",
                   help="split the table is computed on: 'val' for every choice, 'test' once per reported model")
    g.add_argument("--spec-model", default="{}", help="JSON merged into the model config (variants, on val)")
    g.add_argument("--spec-train-config", default="{}",
                   help="JSON merged (one level deep) into the training config, e.g. "
                        "'{\"data\": {\"resimulate\": {\"probability\": 0.8}}}' (variants, on val)")
    g.add_argument("--spec-tag", default="", help="suffix of the model folders and rows (variants)")
    g.add_argument("--spec-reuse", action="store_true", help="reuse trained models of the same tag")
    p.add_argument("--out", default="bench_network_out")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from MSKdeXLib.io.outputs import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    parts = ("inference", "throughput", "ablation") if args.part == "all" else (args.part,)
    for part in parts:
        t0 = time.time()
        results[part] = {"machine": machine(args.device),
                         **{"inference": bench_inference, "throughput": bench_throughput,
                            "ablation": bench_ablation, "specificity": bench_specificity}[part](args)}
        results[part]["seconds"] = round(time.time() - t0, 1)
        write_json(out / f"{part}.json", results[part], force=True)   # strict JSON: an undefined PCC is null
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
