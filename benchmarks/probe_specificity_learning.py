"""How much per-muscle specificity can a learner find, as a function of the number of training subjects?

A probe on a training set built from the specificity cohort (the network's own 32 x 32 records): the
*last* ``--holdout`` subjects of the train split are held out (never the benchmark's test split), and
on the first ``n`` subjects, for each ``--sizes`` n:

* **ridge** (:class:`~MSKdeXLib.evaluation.baselines.RidgeBaseline`, penalty chosen on the last 20 %
  of the n) of every muscle's mass on the standardised pixels;
* **direct CNN**: a small convolutional regressor of the targets that specificity needs (the left-right
  asymmetry index of each pair and the log share of each muscle), trained on the n subjects with
  AdamW; the radiograph and its left-right mirror as two input channels.

Reported: mean asymmetry PCC and share PCC on the held-out subjects, and for the CNN also on its own
training subjects (does it fit them at all?).

    python benchmarks/probe_specificity_learning.py --data OUT/specificity_work/dataset --sizes 100 300 800 \
        --holdout 200 --epochs 60 --markdown
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MSKdeXLib.evaluation.baselines import RidgeBaseline, split_arrays  # noqa: E402
from MSKdeXLib.evaluation.specificity import side_pairs  # noqa: E402
from MSKdeXLib.evaluation.statistics import pearson  # noqa: E402
from MSKdeXLib.learning.dataset.records import load_dataset_info  # noqa: E402


def specificity_targets(masses: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(asymmetry index per pair (n, pairs), share of total muscle mass per muscle (n, muscles))."""
    pairs = side_pairs(names)
    left = masses[:, [names.index(lft) for _, lft, _ in pairs]]
    right = masses[:, [names.index(rgt) for _, _, rgt in pairs]]
    return (left - right) / (left + right), masses / masses.sum(axis=1, keepdims=True)


def mean_pcc(est: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([pearson(est[:, i], truth[:, i]) for i in range(truth.shape[1])]))


def ridge_probe(x: np.ndarray, masses: np.ndarray, names: list[str], train: np.ndarray, test: np.ndarray
                ) -> dict[str, float]:
    inner = max(int(0.8 * len(train)), 1)
    model, _ = RidgeBaseline.select(x[train[:inner]], masses[train[:inner]], x[train[inner:]], masses[train[inner:]])
    model = RidgeBaseline().fit(x[train], masses[train], model.alpha)
    a_hat, s_hat = specificity_targets(model.predict(x[test]), names)
    a, s = specificity_targets(masses[test], names)
    return {"asym": mean_pcc(a_hat, a), "share": mean_pcc(s_hat, s), "alpha": model.alpha}


def cnn_probe(images: np.ndarray, masses: np.ndarray, names: list[str], train: np.ndarray, test: np.ndarray,
              epochs: int, seed: int = 0) -> dict[str, float]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    a, s = specificity_targets(masses, names)
    t = np.concatenate([a, np.log(s)], axis=1)
    mu, sd = t[train].mean(axis=0), t[train].std(axis=0) + 1e-12
    x = torch.tensor(images[:, None], dtype=torch.float32)
    x = torch.cat([x, x.flip(-1)], dim=1)                       # the image and its mirror
    y = torch.tensor((t - mu) / sd, dtype=torch.float32)

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.GELU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.GELU(), nn.MaxPool2d(2))

    side = images.shape[-1] // 8
    net = nn.Sequential(block(2, 32), block(32, 64), block(64, 96), nn.Flatten(), nn.Dropout(0.3),
                        nn.Linear(96 * side * side, t.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=5e-2)
    steps = epochs * ((len(train) + 15) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(epochs):
        net.train()
        order = rng.permutation(train)
        for i in range(0, len(order), 16):
            b = order[i:i + 16]
            loss = ((net(x[b] + 0.02 * torch.randn_like(x[b])) - y[b]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    out = {}
    with torch.no_grad():
        for name, idx in (("held-out", test), ("train", train[:len(test)])):
            p = net(x[idx]).numpy() * sd + mu
            k = a.shape[1]
            out[f"asym {name}"] = mean_pcc(p[:, :k], a[idx])
            out[f"share {name}"] = mean_pcc(np.exp(p[:, k:]), s[idx])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training-set folder (mskdex build-dataset) of the specificity cohort")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 800])
    p.add_argument("--holdout", type=int, default=200, help="last subjects of the train split held out")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info = load_dataset_info(a.data)
    arrays = split_arrays(a.data, "train")
    cols = [i for i, c in enumerate(info.channels) if c.get("kind") == "muscle" and c["quantity"] == "mass_g"]
    names = [info.channels[i]["structure"] for i in cols]
    masses = arrays.truth[:, cols]
    order = np.argsort([int(i.split("-")[-1]) for i in arrays.ids])      # by cohort index
    n_all = len(order)
    test = order[n_all - a.holdout:]
    if max(a.sizes) > n_all - a.holdout:
        p.error(f"--sizes up to {n_all - a.holdout} with {n_all} training subjects and --holdout {a.holdout}")
    z = (arrays.xray - arrays.xray.mean(axis=1, keepdims=True)) / arrays.xray.std(axis=1, keepdims=True)
    side = int(round(np.sqrt(z.shape[1])))
    rows = []
    for n in a.sizes:
        t0 = time.time()
        train = order[:n]
        row = {"n": n, **{f"ridge {k}": v for k, v in ridge_probe(z, masses, names, train, test).items()}}
        if not a.no_cnn:
            row.update({f"cnn {k}": v for k, v in
                        cnn_probe(z.reshape(-1, side, side), masses, names, train, test, a.epochs).items()})
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(row, flush=True)
    if a.markdown:
        print(f"\nHeld-out: {a.holdout} training-split subjects (last by index); n = training subjects; "
              f"{side} x {side} records.\n")
        print("| n | ridge asym PCC | ridge share PCC | CNN asym PCC held-out (train) | CNN share PCC held-out (train) |")
        print("|---:|---:|---:|---:|---:|")
        for r in rows:
            cnn = (f"{r['cnn asym held-out']:.2f} ({r['cnn asym train']:.2f}) | "
                   f"{r['cnn share held-out']:.2f} ({r['cnn share train']:.2f})") if "cnn asym train" in r else "- | -"
            print(f"| {r['n']} | {r['ridge asym']:.2f} | {r['ridge share']:.2f} | {cnn} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
