"""Where the demo's unpaired muscle channels land: the demo's training run with each
``discriminator.condition`` (and optional adversarial-balance settings), measured on the demo's
**validation** subjects only (the calibration split; the held-out subjects the report quotes are
not looked at).

Input: a finished demo folder (``mskdex demo --out DEMO``; its ``dataset/`` holds the training and
validation records). Per variant: train with :func:`MSKdeXLib.demo.training_config` plus the
variant's overrides (same seed, steps, data), then on the first ``--n`` validation (and, for
over-fitting, training) records: muscle pixel r (Pearson r over pixels of each predicted muscle
channel with its true projection on the 32 px grid, mean over muscle channels and subjects; 1 =
placed), bone pixel r, and the muscles' mean PCC of the channel sums against the truth.
One torch thread, deterministic algorithms. Example (about 4 minutes per variant on one core)::

    python benchmarks/bench_demo_placement.py --demo work/demo --out work/placement \\
        --variants none bones_noise --markdown
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _variant(condition: str, noise: float) -> dict:
    return {"discriminator": {"condition": condition}, "adversarial": {"instance_noise": noise}}


#: name -> training-config overrides on top of the demo's (discriminator condition, instance noise SD)
VARIANTS = {
    "none": _variant("none", 0.0),            # the paper's unconditioned PatchGAN (the demo before)
    "none_noise": _variant("none", 0.3),
    "bones": _variant("bones", 0.0),
    "bones_noise": _variant("bones", 0.3),    # the demo's default
    "xray": _variant("xray", 0.0),
}


def placement(model, info, split: str, n: int) -> dict[str, float]:
    """Muscle / bone pixel r and muscle sum PCC of ``model`` on the first ``n`` records of ``split``."""
    import torch

    from MSKdeXLib.evaluation.channel_agreement import channel_correlation
    from MSKdeXLib.learning.dataset.records import load_record

    rs, sums, truths = [], [], []
    with torch.no_grad():
        for rec in info.split(split)[:n]:
            t = load_record(info, rec)
            p = model.generator(t["xray"].float()[None])[0].numpy()
            rs.append(channel_correlation(p, t["targets"].numpy()))
            sums.append(p.sum(axis=(1, 2)))
            truths.append(t["truth"].numpy())
    rs, sums, truths = np.array(rs), np.array(sums), np.array(truths)
    muscle = np.array([c["kind"] == "muscle" for c in info.channels])
    pcc = [np.corrcoef(sums[:, j], truths[:, j])[0, 1] for j in np.flatnonzero(muscle)]
    return {"muscle_pixel_r": float(np.nanmean(rs[:, muscle])), "bone_pixel_r": float(np.nanmean(rs[:, ~muscle])),
            "muscle_sum_pcc": float(np.nanmean(pcc)), "n": int(len(rs))}


def run_variant(name: str, demo: Path, out: Path, n: int) -> dict:
    from MSKdeXLib.demo import DemoSettings, training_config
    from MSKdeXLib.learning.dataset.records import load_dataset_info
    from MSKdeXLib.learning.inference import load_model
    from MSKdeXLib.learning.training import train

    cfg = training_config(DemoSettings())
    for key, value in VARIANTS[name].items():
        cfg[key] = {**cfg[key], **value}
    t0 = time.time()
    res = train(cfg, demo / "dataset", out / name, device="cpu", force=True)
    seconds = time.time() - t0
    model, info = load_model(out / name, "cpu"), load_dataset_info(demo / "dataset")
    d_loss = [(r["step"], r["discriminator"], r.get("gan")) for r in res.history if "discriminator" in r]
    return {"variant": name, "overrides": VARIANTS[name], "train_seconds": round(seconds, 1),
            "val": placement(model, info, "val", n), "train": placement(model, info, "train", n),
            "discriminator_loss": d_loss[::4]}


def markdown(rows: list[dict]) -> str:
    lines = ["| discriminator | val muscle pixel r | val bone pixel r | val muscle sum PCC | train muscle sum PCC | "
             "D loss at end | train s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        v, t = r["val"], r["train"]
        d_end = r["discriminator_loss"][-1][1] if r["discriminator_loss"] else float("nan")
        lines.append(f"| {r['variant']} | {v['muscle_pixel_r']:.2f} | {v['bone_pixel_r']:.2f} | "
                     f"{v['muscle_sum_pcc']:.2f} | {t['muscle_sum_pcc']:.2f} | {d_end:.4f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from MSKdeXLib.reproducibility import deterministic_torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a finished demo folder (its dataset/ is used)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--n", type=int, default=20, help="records per split measured")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with deterministic_torch():
        for name in a.variants:
            rows.append(run_variant(name, a.demo, a.out, a.n))
            (a.out / "placement.json").write_text(json.dumps(rows, indent=1))
    if a.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
